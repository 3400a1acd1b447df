//! Edgewise sensor-node firmware: a `no_std`, allocation-free core that real boards run, and
//! (feature `sim`) a host simulator that runs many nodes against a real MQTT broker.
//!
//! # Layout
//!
//! The node, from the sensor to the broker:
//!
//! - [`bme280`]: the Bosch BME280 driver over `embedded_hal::i2c::I2c` + `DelayNs` (forced mode,
//!   the datasheet's integer compensation), and a register-level simulated chip.
//! - [`sampler`]: a [`sampler::Schedule`], a [`sampler::Sensor`] (the BME280 adapter is
//!   [`sampler::Bme280Sensor`]) and the [`sampler::Sampler`] that packs `S` samples per message.
//! - [`batch`]: SenML-CBOR packs of several samples with base name, base time and a sequence
//!   number.
//! - [`queue`]: the bounded [`queue::OfflineQueue`] (oldest dropped and counted when full).
//! - [`mqtt`]: MQTT 3.1.1 packets and a QoS 1 publishing [`mqtt::Session`] over
//!   `embedded-io-async`, plus an in-memory transport.
//! - [`uplink`]: [`uplink::Uplink`] = queue + session + reconnect with jittered backoff over a
//!   board's [`uplink::Link`].
//! - [`selftest`]: the whole pipeline checked byte for byte; the Cortex-M4F binary in
//!   `boards/mps2-an386` runs it under QEMU.
//! - [`sntp`]: the SNTP request and reply parse a board uses to get Unix time from its gateway.
//! - [`block_on`]: a spin executor for always-ready I/O (tests, self-test).
//!
//! The simulator's building blocks, and the simulator itself:
//!
//! - [`source`]: the [`ValueSource`] trait (one metric value at a time) and [`Waveform`], a
//!   deterministic baseline + sine + noise signal.
//! - [`node`]: [`Node`] = a validated [`NodeId`] and its [`Metric`]s; each tick samples them and
//!   encodes one SenML-CBOR pack (base name `"{id}/"`) into the caller's buffer. Nodes publish to
//!   `sensors/{id}`.
//! - [`prng`]: SplitMix64, the tiny generator behind waveform noise, faults and backoff jitter.
//! - [`sim`] (feature `sim`, std + tokio + rumqttc): [`sim::Simulator`] runs N virtual nodes over
//!   a few MQTT connections, injects faults and counts precisely what it sent. The `edgewise-sim`
//!   binary is its command line.
//!
//! Board binaries live in `boards/` (outside the workspace, each with its own target):
//! `esp32c3` (the Wi-Fi node) and `mps2-an386` (the QEMU self-test).
//!
//! The core builds without `std` and without an allocator (`cargo build -p edgewise-firmware
//! --target thumbv7em-none-eabihf`); its unit tests run on the host (embedded-hal-mock for the
//! bus, scripted in-memory brokers for MQTT). `tests/uplink.rs` publishes through the core to a
//! real broker and `tests/sim.rs` checks the simulator against one.
#![cfg_attr(not(any(test, feature = "std")), no_std)]

pub mod batch;
pub mod block_on;
pub mod bme280;
pub mod mqtt;
pub mod node;
pub mod prng;
pub mod queue;
pub mod sampler;
pub mod selftest;
pub mod sntp;
pub mod source;
pub mod uplink;

#[cfg(feature = "sim")]
pub mod sim;

pub use node::{InvalidNodeId, Metric, Node, NodeError, NodeId, SensorError, TOPIC_PREFIX};
pub use source::{ValueSource, Waveform, WaveformConfig};
