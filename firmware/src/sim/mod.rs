//! The host simulator: many virtual sensor nodes publishing SenML-CBOR to a real MQTT broker,
//! with injected faults and exact counts of what was sent.
//!
//! - [`config`]: [`SimConfig`], [`Faults`] and [`TrafficFaults`], validated by [`Simulator::new`].
//! - [`fleet`]: [`VirtualNode`], the no_std [`crate::Node`] plus fault injection (pure, no I/O).
//! - [`counters`]: live [`SimCounters`] and the final [`SimReport`].
//! - [`runner`]: [`Simulator::run`], the tokio + rumqttc part.
//!
//! ```no_run
//! # async fn demo() -> Result<(), edgewise_firmware::sim::SimError> {
//! use edgewise_firmware::sim::{Faults, SimConfig, Simulator};
//! let cfg = SimConfig {
//!     nodes: 50,
//!     interval_us: 1_000_000,
//!     faults: Faults { malformed: 0.01, ..Faults::default() },
//!     ..SimConfig::default()
//! };
//! let report = Simulator::new(cfg)?
//!     .run(tokio::time::sleep(std::time::Duration::from_secs(10)))
//!     .await?;
//! println!("{report}");
//! # Ok(()) }
//! ```

pub mod config;
pub mod counters;
pub mod fleet;
pub mod runner;

pub use config::{
    ConfigError, Faults, MAX_BURST, MAX_NODES, MIN_INTERVAL_US, SimConfig, TrafficFaults,
    unique_client_id_prefix,
};
pub use counters::{SimCounters, SimReport};
pub use fleet::{MalformedKind, Message, SIM_METRICS, SimMetric, Tally, VirtualNode};
pub use runner::{SimError, Simulator};
