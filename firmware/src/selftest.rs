//! The node self-test: the whole sensor-node pipeline on a simulated chip and an in-memory broker,
//! checked byte for byte. The MCU self-test binary (`firmware/boards/mps2-an386`) runs it on a
//! Cortex-M4F under QEMU; the host test below runs the same code, so both must produce exactly
//! [`EXPECTED_WIRE`].
//!
//! Scenario: a [`SimulatedBme280`] (datasheet calibration, drifting raw samples) behind the real
//! [`Bme280`] driver; a [`Sampler`] taking [`SAMPLES`] samples 10 s apart, two per SenML-CBOR
//! message; an [`Uplink`] over a [`MemoryLink`] whose broker side answers CONNACK and one PUBACK
//! per message. What the node wrote (CONNECT, then each QoS 1 PUBLISH) must equal the expected
//! bytes. Invariants: no allocation, no I/O besides the memory link, deterministic.
//!
//! The expected bytes were produced on the host and checked there independently (below: the
//! MQTT framing by hand, the payloads by decoding them with minicbor and comparing with the
//! datasheet's compensated values).

use core::fmt;

use embedded_hal::delay::DelayNs;
use embedded_hal::i2c::ErrorKind;

use crate::block_on::block_on;
use crate::bme280::simulated::SimulatedBme280;
use crate::bme280::{ADDRESS_PRIMARY, Bme280, Bme280Config, Bme280Error};
use crate::mqtt::MemoryLink;
use crate::node::NodeId;
use crate::sampler::{BME280_METRICS, Bme280Sensor, Polled, Sampler, Schedule};
use crate::uplink::{LinkState, Uplink, UplinkConfig};

pub const NODE_ID: &str = "selftest-01";
pub const TOPIC: &str = "sensors/selftest-01";
pub const START_MS: i64 = 1_700_000_000_000;
pub const PERIOD_MS: u32 = 10_000;
/// Samples taken; two per message.
pub const SAMPLES: usize = 4;
const PER_MESSAGE: usize = 2;
/// CONNACK (accepted), PUBACK 1, PUBACK 2.
pub const BROKER_REPLIES: [u8; 12] = [0x20, 2, 0, 0, 0x40, 2, 0, 1, 0x40, 2, 0, 2];

/// What the node must write: CONNECT, then PUBLISH (QoS 1, id 1, seq 0), PUBLISH (id 2, seq 1).
#[rustfmt::skip]
pub const EXPECTED_WIRE: &[u8] = &[
    0x10, 0x17, 0x00, 0x04, 0x4d, 0x51, 0x54, 0x54, 0x04, 0x02, 0x00, 0x3c, 0x00, 0x0b, 0x73, 0x65,
    0x6c, 0x66, 0x74, 0x65, 0x73, 0x74, 0x2d, 0x30, 0x31, 0x32, 0xd5, 0x01, 0x00, 0x13, 0x73, 0x65,
    0x6e, 0x73, 0x6f, 0x72, 0x73, 0x2f, 0x73, 0x65, 0x6c, 0x66, 0x74, 0x65, 0x73, 0x74, 0x2d, 0x30,
    0x31, 0x00, 0x01, 0x86, 0xa7, 0x21, 0x6c, 0x73, 0x65, 0x6c, 0x66, 0x74, 0x65, 0x73, 0x74, 0x2d,
    0x30, 0x31, 0x2f, 0x22, 0x1a, 0x65, 0x53, 0xf1, 0x00, 0x63, 0x73, 0x65, 0x71, 0x00, 0x00, 0x6b,
    0x74, 0x65, 0x6d, 0x70, 0x65, 0x72, 0x61, 0x74, 0x75, 0x72, 0x65, 0x01, 0x63, 0x43, 0x65, 0x6c,
    0x02, 0xfb, 0x40, 0x39, 0x14, 0x7a, 0xe1, 0x47, 0xae, 0x14, 0x06, 0x00, 0xa4, 0x00, 0x68, 0x68,
    0x75, 0x6d, 0x69, 0x64, 0x69, 0x74, 0x79, 0x01, 0x63, 0x25, 0x52, 0x48, 0x02, 0xfa, 0x42, 0x5b,
    0xfd, 0x00, 0x06, 0x00, 0xa4, 0x00, 0x68, 0x70, 0x72, 0x65, 0x73, 0x73, 0x75, 0x72, 0x65, 0x01,
    0x62, 0x50, 0x61, 0x02, 0xfb, 0x40, 0xf8, 0x92, 0xd4, 0x10, 0x00, 0x00, 0x00, 0x06, 0x00, 0xa4,
    0x00, 0x6b, 0x74, 0x65, 0x6d, 0x70, 0x65, 0x72, 0x61, 0x74, 0x75, 0x72, 0x65, 0x01, 0x63, 0x43,
    0x65, 0x6c, 0x02, 0xfb, 0x40, 0x39, 0x54, 0x7a, 0xe1, 0x47, 0xae, 0x14, 0x06, 0x0a, 0xa4, 0x00,
    0x68, 0x68, 0x75, 0x6d, 0x69, 0x64, 0x69, 0x74, 0x79, 0x01, 0x63, 0x25, 0x52, 0x48, 0x02, 0xfa,
    0x42, 0x5f, 0x5c, 0x00, 0x06, 0x0a, 0xa4, 0x00, 0x68, 0x70, 0x72, 0x65, 0x73, 0x73, 0x75, 0x72,
    0x65, 0x01, 0x62, 0x50, 0x61, 0x02, 0xfb, 0x40, 0xf8, 0x96, 0x51, 0x50, 0x00, 0x00, 0x00, 0x06,
    0x0a, 0x32, 0xcd, 0x01, 0x00, 0x13, 0x73, 0x65, 0x6e, 0x73, 0x6f, 0x72, 0x73, 0x2f, 0x73, 0x65,
    0x6c, 0x66, 0x74, 0x65, 0x73, 0x74, 0x2d, 0x30, 0x31, 0x00, 0x02, 0x86, 0xa7, 0x21, 0x6c, 0x73,
    0x65, 0x6c, 0x66, 0x74, 0x65, 0x73, 0x74, 0x2d, 0x30, 0x31, 0x2f, 0x22, 0x1a, 0x65, 0x53, 0xf1,
    0x14, 0x63, 0x73, 0x65, 0x71, 0x01, 0x00, 0x6b, 0x74, 0x65, 0x6d, 0x70, 0x65, 0x72, 0x61, 0x74,
    0x75, 0x72, 0x65, 0x01, 0x63, 0x43, 0x65, 0x6c, 0x02, 0xfb, 0x40, 0x39, 0x94, 0x7a, 0xe1, 0x47,
    0xae, 0x14, 0x06, 0x00, 0xa4, 0x00, 0x68, 0x68, 0x75, 0x6d, 0x69, 0x64, 0x69, 0x74, 0x79, 0x01,
    0x63, 0x25, 0x52, 0x48, 0x02, 0xfa, 0x42, 0x62, 0xbc, 0x00, 0x06, 0x00, 0xa4, 0x00, 0x68, 0x70,
    0x72, 0x65, 0x73, 0x73, 0x75, 0x72, 0x65, 0x01, 0x62, 0x50, 0x61, 0x02, 0xfa, 0x47, 0xc4, 0xce,
    0x7e, 0x06, 0x00, 0xa4, 0x00, 0x6b, 0x74, 0x65, 0x6d, 0x70, 0x65, 0x72, 0x61, 0x74, 0x75, 0x72,
    0x65, 0x01, 0x63, 0x43, 0x65, 0x6c, 0x02, 0xfb, 0x40, 0x39, 0xd4, 0x7a, 0xe1, 0x47, 0xae, 0x14,
    0x06, 0x0a, 0xa4, 0x00, 0x68, 0x68, 0x75, 0x6d, 0x69, 0x64, 0x69, 0x74, 0x79, 0x01, 0x63, 0x25,
    0x52, 0x48, 0x02, 0xfa, 0x42, 0x66, 0x1d, 0x00, 0x06, 0x0a, 0xa4, 0x00, 0x68, 0x70, 0x72, 0x65,
    0x73, 0x73, 0x75, 0x72, 0x65, 0x01, 0x62, 0x50, 0x61, 0x02, 0xfa, 0x47, 0xc4, 0xea, 0x70, 0x06,
    0x0a,
];

/// Why the self-test failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SelfTestError {
    Sensor(Bme280Error<ErrorKind>),
    /// A pack did not fit its buffer or the queue slot.
    Encode,
    /// The uplink did not deliver every message (state, messages still queued).
    NotDelivered {
        queued: usize,
    },
    /// The bytes on the wire differ from [`EXPECTED_WIRE`] first at `at`.
    Mismatch {
        at: usize,
        expected: Option<u8>,
        got: Option<u8>,
    },
}

impl fmt::Display for SelfTestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Sensor(e) => write!(f, "sensor: {e}"),
            Self::Encode => f.write_str("a message did not fit its buffer"),
            Self::NotDelivered { queued } => write!(f, "{queued} messages were not delivered"),
            Self::Mismatch { at, expected, got } => write!(
                f,
                "wire bytes differ at offset {at}: expected {expected:02x?}, got {got:02x?}"
            ),
        }
    }
}

/// A delay that returns at once (the simulated chip measures instantly).
pub struct NoDelay;

impl DelayNs for NoDelay {
    fn delay_ns(&mut self, _ns: u32) {}
}

/// What a passing run did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SelfTestReport {
    pub samples: u32,
    pub messages: u32,
    pub payload_bytes: usize,
    pub wire_bytes: usize,
    pub first_temperature_centi_celsius: i32,
}

/// Run the scenario, writing the node's output into `wire`; returns how many bytes it wrote.
pub fn run(wire: &mut [u8]) -> Result<(usize, SelfTestReport), SelfTestError> {
    let mut delay = NoDelay;
    let bme = Bme280::new(
        SimulatedBme280::new(ADDRESS_PRIMARY),
        ADDRESS_PRIMARY,
        Bme280Config::default(),
        &mut delay,
    )
    .map_err(SelfTestError::Sensor)?;
    let id = NodeId::parse(NODE_ID).map_err(|_| SelfTestError::Encode)?;
    let sensor = Bme280Sensor { bme280: bme, delay };
    let mut sampler = Sampler::<_, 3, PER_MESSAGE>::new(
        &id,
        BME280_METRICS,
        sensor,
        Schedule::new(START_MS, PERIOD_MS),
    );
    let link = MemoryLink::new(&BROKER_REPLIES, wire);
    let config = UplinkConfig {
        client_id: NODE_ID,
        topic: TOPIC,
        keep_alive_s: 60,
        username: None,
        password: None,
        min_backoff_ms: 1_000,
        max_backoff_ms: 60_000,
        jitter_seed: 1,
    };
    let mut uplink = Uplink::<_, 4, 256>::new(config, link);
    let mut buf = [0u8; 256];
    let mut payload_bytes = 0;
    let mut now = START_MS;
    for _ in 0..SAMPLES {
        match sampler
            .poll(now, &mut buf)
            .map_err(|_| SelfTestError::Encode)?
        {
            Polled::Message { len, .. } => {
                payload_bytes += len;
                uplink
                    .enqueue(&buf[..len])
                    .map_err(|_| SelfTestError::Encode)?;
            }
            Polled::SensorFailed(e) => return Err(SelfTestError::Sensor(e)),
            Polled::Idle | Polled::Sampled => {}
        }
        now += i64::from(PERIOD_MS);
    }
    let state = block_on(uplink.service(now));
    if state != LinkState::Idle || uplink.queued() > 0 {
        return Err(SelfTestError::NotDelivered {
            queued: uplink.queued(),
        });
    }
    let first_temperature_centi_celsius = {
        let (_, t, _) = SimulatedBme280::raw(0);
        crate::bme280::datasheet_example::CALIBRATION
            .compensate_temperature(t)
            .1
    };
    let report = SelfTestReport {
        samples: sampler.counters().samples,
        messages: uplink.counters().published,
        payload_bytes,
        wire_bytes: uplink.link_mut().written().len(),
        first_temperature_centi_celsius,
    };
    Ok((report.wire_bytes, report))
}

/// Compare what the node wrote with [`EXPECTED_WIRE`].
pub fn check(written: &[u8]) -> Result<(), SelfTestError> {
    let n = written.len().max(EXPECTED_WIRE.len());
    for at in 0..n {
        let (expected, got) = (EXPECTED_WIRE.get(at).copied(), written.get(at).copied());
        if expected != got {
            return Err(SelfTestError::Mismatch { at, expected, got });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    extern crate std;
    use std::println;
    use std::vec::Vec;

    use minicbor::Decoder;
    use minicbor::data::Type;

    use super::*;
    use crate::bme280::datasheet_example as ex;

    #[test]
    fn the_scenario_writes_the_expected_bytes() {
        let mut wire = [0u8; 1024];
        let (n, report) = run(&mut wire).unwrap();
        println!("{:?}\n{:02x?}", report, &wire[..n]);
        check(&wire[..n]).unwrap();
        assert_eq!((report.samples, report.messages), (4, 2));
        assert_eq!(report.first_temperature_centi_celsius, 2508);
    }

    fn num(d: &mut Decoder<'_>) -> f64 {
        match d.datatype().unwrap() {
            Type::F64 => d.f64().unwrap(),
            Type::F32 => f64::from(d.f32().unwrap()),
            _ => d.i64().unwrap() as f64,
        }
    }

    #[test]
    fn the_expected_bytes_are_mqtt_framed_senml_with_the_datasheet_values() {
        let w = EXPECTED_WIRE;
        // CONNECT: client id "selftest-01", clean session, keep-alive 60.
        let connect_len = 2 + 10 + 2 + NODE_ID.len();
        assert_eq!(&w[..4], &[0x10, (connect_len - 2) as u8, 0, 4]);
        assert_eq!(&w[9..12], &[0x02, 0, 60]);
        let mut at = connect_len;
        let mut packet_ids = Vec::new();
        let mut sample = 0;
        while at < w.len() {
            assert_eq!(w[at], 0x32, "QoS 1 PUBLISH at {at}");
            // Remaining length: 1 or 2 bytes here.
            let (remaining, hdr) = if w[at + 1] & 0x80 == 0 {
                (usize::from(w[at + 1]), 2)
            } else {
                (
                    usize::from(w[at + 1] & 0x7F) | usize::from(w[at + 2]) << 7,
                    3,
                )
            };
            let body = &w[at + hdr..at + hdr + remaining];
            assert_eq!(usize::from(body[1]), TOPIC.len());
            assert_eq!(&body[2..2 + TOPIC.len()], TOPIC.as_bytes());
            let id = u16::from_be_bytes([body[2 + TOPIC.len()], body[3 + TOPIC.len()]]);
            packet_ids.push(id);
            let payload = &body[4 + TOPIC.len()..];
            let mut d = Decoder::new(payload);
            assert_eq!(d.array().unwrap(), Some(6));
            for r in 0..6 {
                let fields = d.map().unwrap().unwrap();
                let mut name = "";
                let mut value = f64::NAN;
                let mut t = f64::NAN;
                for _ in 0..fields {
                    if d.datatype().unwrap() == Type::String {
                        assert_eq!(d.str().unwrap(), "seq");
                        assert_eq!(d.u32().unwrap(), u32::from(id) - 1);
                        continue;
                    }
                    match d.i64().unwrap() {
                        -2 => assert_eq!(d.str().unwrap(), "selftest-01/"),
                        -3 => {
                            let bt = num(&mut d);
                            assert_eq!(bt, (START_MS / 1000) as f64 + 20.0 * f64::from(id - 1));
                        }
                        0 => name = d.str().unwrap(),
                        1 => drop(d.str().unwrap()),
                        2 => value = num(&mut d),
                        6 => t = num(&mut d),
                        other => panic!("label {other}"),
                    }
                }
                let s = sample + r / 3;
                let (p, tt, h) = SimulatedBme280::raw(s as u32);
                let c = ex::CALIBRATION;
                let (t_fine, centi) = c.compensate_temperature(tt);
                let expected = match name {
                    "temperature" => f64::from(centi) / 100.0,
                    "humidity" => f64::from(c.compensate_humidity(h, t_fine)) / 1024.0,
                    "pressure" => f64::from(c.compensate_pressure(p, t_fine)) / 256.0,
                    other => panic!("metric {other}"),
                };
                assert_eq!(value, expected, "{name} of sample {s}");
                assert_eq!(t, 10.0 * (r / 3) as f64);
            }
            assert_eq!(d.position(), payload.len());
            sample += 2;
            at += hdr + remaining;
        }
        assert_eq!(packet_ids, [1, 2]);
        // The first sample is the datasheet example: 25.08 °C, 100653.27 Pa.
        assert!(w.windows(8).any(|x| x == 25.08f64.to_be_bytes()));
    }

    #[test]
    fn a_changed_byte_is_reported_with_its_offset() {
        let mut wire = [0u8; 1024];
        let (n, _) = run(&mut wire).unwrap();
        wire[n - 1] ^= 1;
        assert!(matches!(
            check(&wire[..n]),
            Err(SelfTestError::Mismatch { at, .. }) if at == n - 1
        ));
        assert!(matches!(
            check(&wire[..n - 1]),
            Err(SelfTestError::Mismatch {
                expected: Some(_),
                got: None,
                ..
            })
        ));
    }
}
