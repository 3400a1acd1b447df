//! MQTT 3.1.1 for a publishing sensor node, without allocation.
//!
//! - [`packet`]: encode CONNECT / PUBLISH / PINGREQ / DISCONNECT, decode fixed headers, CONNACK
//!   and PUBACK (pure, byte-exact tests).
//! - [`client`]: [`Session`], one connection over an `embedded-io-async` transport, QoS 1
//!   publishes that wait for their PUBACK.
//! - [`memory`]: [`MemoryLink`], an in-memory transport with a scripted broker side, for the host
//!   tests and the MCU self-test.
//!
//! Why 3.1.1 and not MQTT 5 (rust-mqtt 0.6 speaks only MQTT 5): a node must be able to publish
//! to the agent's embedded broker, which serves MQTT 3.1.1 only, as well as to a Mosquitto.

pub mod client;
pub mod memory;
pub mod packet;

pub use client::{MqttError, Session};
pub use memory::MemoryLink;
pub use packet::{Connect, ConnectReturn, PacketError, Publish};
