//! The sampling half of a sensor node: a [`Schedule`] says when to sample, a [`Sensor`] gives
//! the values, a [`Batch`] collects them, and every `S` samples the [`Sampler`] encodes one
//! SenML-CBOR message with the next sequence number.
//!
//! Invariants: no allocation; sequence numbers start at 0 and grow by one per message (wrapping
//! at `u32::MAX`); a failed sensor read is counted and skipped (the schedule moves on, the batch
//! keeps what it has); if the sampler was not polled for several periods, the missed samples are
//! counted, not taken late in a burst. Time is passed in (`now_ms`, Unix milliseconds), so tests
//! and the simulator drive it directly.
//!
//! Tested below with a scripted sensor; [`Bme280Sensor`] is the real-sensor adapter.

use core::fmt;

use embedded_hal::delay::DelayNs;
use embedded_hal::i2c::I2c;

use crate::batch::{Batch, MetricInfo};
use crate::bme280::{Bme280, Bme280Error};
use crate::node::{NODE_ID_MAX_LEN, NodeId};
use edgewise_protocol::senml::BufferTooSmall;

/// A sensor that reads `M` metric values at once.
pub trait Sensor<const M: usize> {
    type Error: fmt::Debug;
    fn read(&mut self) -> Result<[f64; M], Self::Error>;
}

/// Fixed-period schedule: due at `start, start + period, ...`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Schedule {
    period_ms: i64,
    next_ms: i64,
    missed: u32,
}

impl Schedule {
    /// First sample at `start_ms`; `period_ms` is at least 1.
    pub fn new(start_ms: i64, period_ms: u32) -> Self {
        Self {
            period_ms: i64::from(period_ms.max(1)),
            next_ms: start_ms,
            missed: 0,
        }
    }

    /// When the next sample is due.
    pub fn next_ms(&self) -> i64 {
        self.next_ms
    }

    /// Periods that passed without a sample (the node was busy or asleep too long).
    pub fn missed(&self) -> u32 {
        self.missed
    }

    /// If a sample is due at `now_ms`, its nominal time; the schedule then moves past `now_ms`.
    pub fn poll(&mut self, now_ms: i64) -> Option<i64> {
        if now_ms < self.next_ms {
            return None;
        }
        let due = self.next_ms;
        let behind = (now_ms - due) / self.period_ms;
        self.missed = self.missed.saturating_add(behind as u32);
        let at = due + behind * self.period_ms;
        self.next_ms = at + self.period_ms;
        Some(at)
    }
}

/// Counters of a [`Sampler`] since start.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SamplerCounters {
    pub samples: u32,
    pub sensor_errors: u32,
    pub messages: u32,
}

/// What one [`Sampler::poll`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Polled<E> {
    /// Not due yet.
    Idle,
    /// A sample went into the batch.
    Sampled,
    /// A sample completed the batch: a message of this many bytes is in the caller's buffer.
    Message { len: usize, seq: u32 },
    /// The sensor failed; the sample was skipped.
    SensorFailed(E),
}

/// Samples a sensor on schedule and packs `S` samples per message.
pub struct Sampler<T, const M: usize, const S: usize> {
    sensor: T,
    metrics: [MetricInfo; M],
    base_name: [u8; NODE_ID_MAX_LEN + 1],
    base_name_len: usize,
    schedule: Schedule,
    batch: Batch<M, S>,
    next_seq: u32,
    counters: SamplerCounters,
}

impl<T: Sensor<M>, const M: usize, const S: usize> Sampler<T, M, S> {
    pub fn new(id: &NodeId, metrics: [MetricInfo; M], sensor: T, schedule: Schedule) -> Self {
        let mut base_name = [0u8; NODE_ID_MAX_LEN + 1];
        // A NodeId is at most NODE_ID_MAX_LEN bytes, so "{id}/" always fits.
        let base_name_len = id.base_name(&mut base_name).map(str::len).unwrap_or(0);
        Self {
            sensor,
            metrics,
            base_name,
            base_name_len,
            schedule,
            batch: Batch::new(),
            next_seq: 0,
            counters: SamplerCounters::default(),
        }
    }

    pub fn schedule(&self) -> &Schedule {
        &self.schedule
    }

    pub fn counters(&self) -> SamplerCounters {
        self.counters
    }

    pub fn sensor_mut(&mut self) -> &mut T {
        &mut self.sensor
    }

    /// Sample if due at `now_ms`; when the batch fills, encode it into `out`.
    pub fn poll(
        &mut self,
        now_ms: i64,
        out: &mut [u8],
    ) -> Result<Polled<T::Error>, BufferTooSmall> {
        let Some(at_ms) = self.schedule.poll(now_ms) else {
            return Ok(Polled::Idle);
        };
        let values = match self.sensor.read() {
            Ok(v) => v,
            Err(e) => {
                self.counters.sensor_errors = self.counters.sensor_errors.saturating_add(1);
                return Ok(Polled::SensorFailed(e));
            }
        };
        self.counters.samples = self.counters.samples.saturating_add(1);
        self.batch.push(at_ms, values);
        if !self.batch.is_full() {
            return Ok(Polled::Sampled);
        }
        let seq = self.next_seq;
        let base_name = core::str::from_utf8(&self.base_name[..self.base_name_len]).unwrap_or("");
        let len = self.batch.encode(base_name, seq, &self.metrics, out);
        // Whether or not it fit, start a fresh batch: a pack that can never fit must not wedge
        // the node.
        self.batch.clear();
        let len = len?;
        self.next_seq = seq.wrapping_add(1);
        self.counters.messages = self.counters.messages.saturating_add(1);
        Ok(Polled::Message { len, seq })
    }
}

/// The BME280's three metrics, in the order [`Bme280Sensor`] reads them.
pub const BME280_METRICS: [MetricInfo; 3] = [
    MetricInfo {
        name: "temperature",
        unit: "Cel",
    },
    MetricInfo {
        name: "humidity",
        unit: "%RH",
    },
    MetricInfo {
        name: "pressure",
        unit: "Pa",
    },
];

/// A [`Bme280`] and its delay as a [`Sensor`] of temperature (Cel), humidity (%RH), pressure (Pa).
pub struct Bme280Sensor<I, D> {
    pub bme280: Bme280<I>,
    pub delay: D,
}

impl<I: I2c, D: DelayNs> Sensor<3> for Bme280Sensor<I, D> {
    type Error = Bme280Error<I::Error>;

    fn read(&mut self) -> Result<[f64; 3], Self::Error> {
        let m = self.bme280.measure(&mut self.delay)?;
        Ok([m.celsius(), m.relative_humidity(), m.pascal()])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Scripted {
        n: u32,
        fail_every: u32,
    }

    impl Sensor<2> for Scripted {
        type Error = &'static str;
        fn read(&mut self) -> Result<[f64; 2], &'static str> {
            self.n += 1;
            if self.fail_every > 0 && self.n.is_multiple_of(self.fail_every) {
                return Err("nack");
            }
            Ok([f64::from(self.n), -f64::from(self.n)])
        }
    }

    const METRICS: [MetricInfo; 2] = [
        MetricInfo {
            name: "a",
            unit: "Cel",
        },
        MetricInfo {
            name: "b",
            unit: "%RH",
        },
    ];

    #[test]
    fn schedule_fires_on_period_and_counts_missed_periods() {
        let mut s = Schedule::new(1_000, 100);
        assert_eq!(s.poll(999), None);
        assert_eq!(s.poll(1_000), Some(1_000));
        assert_eq!(s.poll(1_050), None);
        assert_eq!(s.poll(1_100), Some(1_100));
        // Asleep for 3.5 periods: one sample at the latest due time, 3 counted as missed.
        assert_eq!(s.poll(1_550), Some(1_500));
        assert_eq!(s.missed(), 3);
        assert_eq!(s.next_ms(), 1_600);
    }

    #[test]
    fn every_third_sample_completes_a_message_with_the_next_seq() {
        let id = NodeId::parse("n-1").unwrap();
        let sensor = Scripted {
            n: 0,
            fail_every: 0,
        };
        let mut sampler = Sampler::<_, 2, 3>::new(&id, METRICS, sensor, Schedule::new(0, 10));
        let mut out = [0u8; 256];
        let mut seqs = [u32::MAX; 3];
        let mut got = 0;
        for t in 0..90 {
            match sampler.poll(t, &mut out).unwrap() {
                Polled::Message { len, seq } => {
                    assert!(len > 20);
                    seqs[got] = seq;
                    got += 1;
                }
                Polled::Idle | Polled::Sampled => {}
                Polled::SensorFailed(e) => panic!("{e}"),
            }
        }
        assert_eq!(seqs, [0, 1, 2]);
        assert_eq!(
            sampler.counters(),
            SamplerCounters {
                samples: 9,
                sensor_errors: 0,
                messages: 3
            }
        );
    }

    #[test]
    fn sensor_failures_are_counted_and_skipped_and_short_buffers_do_not_wedge() {
        let id = NodeId::parse("n").unwrap();
        let sensor = Scripted {
            n: 0,
            fail_every: 2,
        };
        let mut sampler = Sampler::<_, 2, 2>::new(&id, METRICS, sensor, Schedule::new(0, 1));
        let mut out = [0u8; 256];
        assert_eq!(sampler.poll(0, &mut out), Ok(Polled::Sampled));
        assert_eq!(sampler.poll(1, &mut out), Ok(Polled::SensorFailed("nack")));
        assert!(matches!(
            sampler.poll(2, &mut out),
            Ok(Polled::Message { seq: 0, .. })
        ));
        assert_eq!(sampler.counters().sensor_errors, 1);
        // A buffer too small: error, batch discarded, seq not consumed.
        assert_eq!(sampler.poll(3, &mut out), Ok(Polled::SensorFailed("nack")));
        assert_eq!(sampler.poll(4, &mut out), Ok(Polled::Sampled));
        assert_eq!(
            sampler.poll(5, &mut out[..10]),
            Ok(Polled::SensorFailed("nack"))
        );
        assert_eq!(sampler.poll(6, &mut out[..10]), Err(BufferTooSmall));
        assert_eq!(sampler.poll(7, &mut out), Ok(Polled::SensorFailed("nack")));
        assert_eq!(sampler.poll(8, &mut out), Ok(Polled::Sampled));
        assert_eq!(sampler.poll(9, &mut out), Ok(Polled::SensorFailed("nack")));
        assert!(matches!(
            sampler.poll(10, &mut out),
            Ok(Polled::Message { seq: 1, .. })
        ));
    }
}
