//! What a simulation run has sent, counted live ([`SimCounters`], shared atomics) and reported
//! at the end ([`SimReport`], plain numbers).
//!
//! Invariant: a message is counted once, right after the MQTT client accepted it (so it will be
//! written, and with QoS 1 retransmitted until acknowledged); its readings are counted with it.
//! `readings_published` counts the numeric records of well-formed packs, out-of-range and late
//! ones included; malformed messages carry no readings. Tested through `sim::fleet` and
//! `tests/sim.rs`, which compares these numbers with what a subscriber received.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use crate::sim::fleet::Tally;

/// Live counters of a run; read them with [`SimCounters::snapshot`] while it runs.
#[derive(Debug, Default)]
pub struct SimCounters {
    messages_published: AtomicU64,
    readings_published: AtomicU64,
    malformed_messages: AtomicU64,
    out_of_range_readings: AtomicU64,
    late_readings: AtomicU64,
    payload_bytes: AtomicU64,
    messages_acked: AtomicU64,
    messages_written: AtomicU64,
    connection_errors: AtomicU64,
    dropped_messages: AtomicU64,
    dropped_readings: AtomicU64,
    burst_messages: AtomicU64,
    out_of_order_messages: AtomicU64,
}

/// Counter values at one moment (the final ones when returned by `Simulator::run`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SimReport {
    /// Messages (packs and malformed payloads) handed to the MQTT client.
    pub messages_published: u64,
    /// Numeric readings in well-formed packs, including out-of-range and late ones.
    pub readings_published: u64,
    /// Messages whose payload is not SenML.
    pub malformed_messages: u64,
    /// Readings with a value far outside the physical range.
    pub out_of_range_readings: u64,
    /// Readings in packs whose base time is `late_by_ms` in the past.
    pub late_readings: u64,
    /// Sum of payload sizes of the published messages.
    pub payload_bytes: u64,
    /// QoS 1 publishes the broker acknowledged (PUBACK).
    pub messages_acked: u64,
    /// Failed connection attempts and dropped connections (each one was retried).
    pub connection_errors: u64,
    /// Messages the traffic faults dropped (never published), and the readings they held.
    pub dropped_messages: u64,
    pub dropped_readings: u64,
    /// Published messages that were part of a burst.
    pub burst_messages: u64,
    /// Published messages that were held back and sent after a newer one of their node.
    pub out_of_order_messages: u64,
}

impl SimCounters {
    pub fn snapshot(&self) -> SimReport {
        SimReport {
            messages_published: self.messages_published.load(Relaxed),
            readings_published: self.readings_published.load(Relaxed),
            malformed_messages: self.malformed_messages.load(Relaxed),
            out_of_range_readings: self.out_of_range_readings.load(Relaxed),
            late_readings: self.late_readings.load(Relaxed),
            payload_bytes: self.payload_bytes.load(Relaxed),
            messages_acked: self.messages_acked.load(Relaxed),
            connection_errors: self.connection_errors.load(Relaxed),
            dropped_messages: self.dropped_messages.load(Relaxed),
            dropped_readings: self.dropped_readings.load(Relaxed),
            burst_messages: self.burst_messages.load(Relaxed),
            out_of_order_messages: self.out_of_order_messages.load(Relaxed),
        }
    }

    pub(crate) fn published(&self, t: &Tally) {
        self.messages_published.fetch_add(1, Relaxed);
        self.readings_published.fetch_add(t.readings, Relaxed);
        self.malformed_messages
            .fetch_add(u64::from(t.malformed), Relaxed);
        self.out_of_range_readings
            .fetch_add(t.out_of_range_readings, Relaxed);
        self.late_readings.fetch_add(t.late_readings, Relaxed);
        self.payload_bytes.fetch_add(t.payload_bytes, Relaxed);
        self.burst_messages.fetch_add(u64::from(t.burst), Relaxed);
        self.out_of_order_messages
            .fetch_add(u64::from(t.out_of_order), Relaxed);
    }

    /// A message the traffic faults dropped: not published.
    pub(crate) fn dropped(&self, t: &Tally) {
        self.dropped_messages.fetch_add(1, Relaxed);
        self.dropped_readings.fetch_add(t.readings, Relaxed);
    }

    pub(crate) fn acked(&self) {
        self.messages_acked.fetch_add(1, Relaxed);
    }

    /// A publish was written to the network (the QoS 0 drain condition).
    pub(crate) fn written(&self) {
        self.messages_written.fetch_add(1, Relaxed);
    }

    pub(crate) fn messages_written(&self) -> u64 {
        self.messages_written.load(Relaxed)
    }

    pub(crate) fn connection_error(&self) {
        self.connection_errors.fetch_add(1, Relaxed);
    }
}

impl fmt::Display for SimReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "messages {} (acked {}, malformed {}, burst {}, out of order {}), readings {} \
             (out of range {}, late {}), dropped {} messages ({} readings), {} payload bytes, \
             {} connection errors",
            self.messages_published,
            self.messages_acked,
            self.malformed_messages,
            self.burst_messages,
            self.out_of_order_messages,
            self.readings_published,
            self.out_of_range_readings,
            self.late_readings,
            self.dropped_messages,
            self.dropped_readings,
            self.payload_bytes,
            self.connection_errors
        )
    }
}
