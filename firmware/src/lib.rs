//! Edgewise sensor-node firmware: a `no_std`, allocation-free core, and (feature `sim`) a host
//! simulator that runs many nodes against a real MQTT broker.
//!
//! # Layout
//!
//! - [`source`]: the [`ValueSource`] trait (one metric value at a time) and [`Waveform`], a
//!   deterministic baseline + sine + noise signal.
//! - [`node`]: [`Node`] = a validated [`NodeId`] and its [`Metric`]s; each tick samples them and
//!   encodes one SenML-CBOR pack (base name `"{id}/"`) into the caller's buffer. Nodes publish to
//!   `sensors/{id}`.
//! - [`prng`]: SplitMix64, the tiny generator behind waveform noise and simulated faults.
//! - [`sim`] (feature `sim`, std + tokio + rumqttc): [`sim::Simulator`] runs N virtual nodes over
//!   a few MQTT connections, injects faults (out of range, malformed, late) and counts precisely
//!   what it sent. The `edgewise-sim` binary is its command line.
//!
//! The core builds without `std` and without an allocator (`cargo build --no-default-features`);
//! its unit tests run on the host. `tests/sim.rs` checks the simulator against a real broker.
#![cfg_attr(not(any(test, feature = "std")), no_std)]

pub mod node;
pub mod prng;
pub mod source;

#[cfg(feature = "sim")]
pub mod sim;

pub use node::{InvalidNodeId, Metric, Node, NodeError, NodeId, SensorError, TOPIC_PREFIX};
pub use source::{ValueSource, Waveform, WaveformConfig};
