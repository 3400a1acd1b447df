//! The agent's decoder and data-contract modules, compiled from the agent's own source files
//! so the fuzz build instruments only them (and their small dependencies), not the whole agent
//! (tract, tokio, rusqlite...). `crate::decode` and `crate::filter` resolve here as they do in
//! the agent.

#[path = "../../agent/src/decode.rs"]
pub mod decode;
#[path = "../../agent/src/filter.rs"]
pub mod filter;
