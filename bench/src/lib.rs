//! `edgewise-bench`: the end-to-end load harness. One command measures, in one run, how many
//! messages per second a broker delivers to a subscriber that only counts (its ceiling), and how
//! many the agent (release binary, journal on, inference on with the shipped model, syncing to a
//! local receiver) sustains with zero loss, with its CPU time and peak memory.
//!
//! # Layout
//!
//! - [`search`]: the stepped-rate search (probe, double, narrow) and the simulator's rate grid.
//! - [`trial`]: one load step end to end (consumer, simulator, accounting), and the agent child
//!   process with its config.
//! - [`mosquitto`]: the machine's Mosquitto config moved into a temporary directory on a free
//!   port, run as a child process.
//! - [`procfs`]: CPU seconds and peak RSS from `/proc`.
//! - [`report`]: step and case results, the table and the JSON.
//!
//! The binary (`src/main.rs`) runs the cases the flags pick. Pure parts are unit-tested here;
//! `.ci/bench.sh` runs a short smoke run of the whole harness against both brokers.

pub mod mosquitto;
pub mod procfs;
pub mod report;
pub mod search;
pub mod trial;

use std::net::{SocketAddr, TcpListener};

use anyhow::Context;

/// A free loopback port (bound, then released: a tiny race with other processes).
pub fn free_loopback_addr() -> anyhow::Result<SocketAddr> {
    let l = TcpListener::bind("127.0.0.1:0").context("binding a free loopback port")?;
    l.local_addr().context("reading the free port")
}
