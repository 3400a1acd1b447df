//! The node core (simulated BME280 -> sampler -> SenML-CBOR -> offline queue -> MQTT 3.1.1 QoS 1)
//! against a real broker (embedded rumqttd, or `EDGEWISE_TEST_MQTT_URL`) over a tokio TCP
//! socket: what a subscriber receives must be every message, in order, and the agent's own
//! decoder must read the packs into the readings the driver computed.

mod common;

use std::time::Duration;

use common::{Proxy, Subscriber, broker, free_port, unique};
use edgewise_firmware::bme280::datasheet_example as ex;
use edgewise_firmware::bme280::simulated::SimulatedBme280;
use edgewise_firmware::bme280::{ADDRESS_PRIMARY, Bme280, Bme280Config};
use edgewise_firmware::node::NodeId;
use edgewise_firmware::sampler::{BME280_METRICS, Bme280Sensor, Polled, Sampler, Schedule};
use edgewise_firmware::selftest::NoDelay;
use edgewise_firmware::uplink::{Link, LinkState, Uplink, UplinkConfig};
use embedded_io_async::{ErrorKind, ErrorType, Read, Write};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const START_MS: i64 = 1_700_000_000_000;

/// A reopenable TCP connection, as a board's socket would be.
struct TcpLink {
    addr: String,
    stream: Option<tokio::net::TcpStream>,
}

impl ErrorType for TcpLink {
    type Error = ErrorKind;
}

impl Link for TcpLink {
    type OpenError = std::io::Error;
    async fn open(&mut self) -> Result<(), std::io::Error> {
        self.stream = None;
        self.stream = Some(tokio::net::TcpStream::connect(&self.addr).await?);
        Ok(())
    }
}

impl Read for TcpLink {
    async fn read(&mut self, buf: &mut [u8]) -> Result<usize, ErrorKind> {
        let s = self.stream.as_mut().ok_or(ErrorKind::NotConnected)?;
        s.read(buf).await.map_err(io_error)
    }
}

impl Write for TcpLink {
    async fn write(&mut self, buf: &[u8]) -> Result<usize, ErrorKind> {
        let s = self.stream.as_mut().ok_or(ErrorKind::NotConnected)?;
        s.write(buf).await.map_err(io_error)
    }

    async fn flush(&mut self) -> Result<(), ErrorKind> {
        let s = self.stream.as_mut().ok_or(ErrorKind::NotConnected)?;
        s.flush().await.map_err(io_error)
    }
}

fn io_error(e: std::io::Error) -> ErrorKind {
    match e.kind() {
        std::io::ErrorKind::ConnectionReset => ErrorKind::ConnectionReset,
        std::io::ErrorKind::BrokenPipe => ErrorKind::BrokenPipe,
        _ => ErrorKind::Other,
    }
}

type NodeSampler = Sampler<Bme280Sensor<SimulatedBme280, NoDelay>, 3, 2>;

fn sampler(node_id: &str) -> NodeSampler {
    let mut delay = NoDelay;
    let bme = Bme280::new(
        SimulatedBme280::new(ADDRESS_PRIMARY),
        ADDRESS_PRIMARY,
        Bme280Config::default(),
        &mut delay,
    )
    .expect("simulated chip");
    let id = NodeId::parse(node_id).expect("node id");
    Sampler::new(
        &id,
        BME280_METRICS,
        Bme280Sensor { bme280: bme, delay },
        Schedule::new(START_MS, 1_000),
    )
}

fn uplink_config<'a>(client_id: &'a str, topic: &'a str) -> UplinkConfig<'a> {
    UplinkConfig {
        client_id,
        topic,
        keep_alive_s: 30,
        username: None,
        password: None,
        min_backoff_ms: 50,
        max_backoff_ms: 400,
        jitter_seed: 9,
    }
}

/// Take `samples` samples (from the sampler's schedule) and queue the messages they make.
fn sample_into<L: Link>(
    s: &mut NodeSampler,
    up: &mut Uplink<'_, L, 8, 512>,
    now_ms: &mut i64,
    samples: usize,
) {
    let mut buf = [0u8; 512];
    for _ in 0..samples {
        match s.poll(*now_ms, &mut buf).expect("fits") {
            Polled::Message { len, .. } => {
                up.enqueue(&buf[..len]).expect("fits a slot");
            }
            Polled::Sampled => {}
            other => panic!("{other:?}"),
        }
        *now_ms += 1_000;
    }
}

/// Service the uplink on a clock that jumps to each retry time, until idle or `rounds` run out.
async fn drain<L: Link>(up: &mut Uplink<'_, L, 8, 512>, now_ms: &mut i64, rounds: usize) {
    for _ in 0..rounds {
        let serviced = tokio::time::timeout(Duration::from_secs(5), up.service(*now_ms)).await;
        match serviced {
            Ok(LinkState::Idle) if up.queued() == 0 => return,
            Ok(LinkState::RetryAt(t)) => *now_ms = t.max(*now_ms),
            _ => {}
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn seq_of(payload: &[u8]) -> u32 {
    let mut d = minicbor::Decoder::new(payload);
    d.array().expect("array");
    let fields = d.map().expect("map").expect("definite");
    for _ in 0..fields {
        if d.datatype().expect("label") == minicbor::data::Type::String {
            assert_eq!(d.str().expect("label"), "seq");
            return d.u32().expect("seq");
        }
        d.skip().expect("label");
        d.skip().expect("value");
    }
    panic!("no seq in the first record")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn packs_reach_a_real_broker_in_order_and_the_agent_decodes_them() {
    let broker = broker();
    let node = unique("fw").replace('_', "-");
    let node = &node[..node.len().min(32)];
    let topic = format!("edgewise-test/{}/sensors/{node}", unique("up"));
    let sub = Subscriber::start(&broker, &topic).await;

    let mut s = sampler(node);
    let link = TcpLink {
        addr: format!("{}:{}", broker.host, broker.port),
        stream: None,
    };
    let mut up = Uplink::<_, 8, 512>::new(uplink_config(node, &topic), link);
    let mut now = START_MS;
    sample_into(&mut s, &mut up, &mut now, 6);
    assert_eq!(up.queued(), 3);
    drain(&mut up, &mut now, 20).await;
    let c = up.counters();
    assert_eq!((c.published, c.connects, c.connect_failures), (3, 1, 0));

    let received = sub.collect(3).await;
    assert_eq!(received.len(), 3);
    let seqs: Vec<u32> = received.iter().map(|r| seq_of(&r.payload)).collect();
    assert_eq!(seqs, [0, 1, 2]);

    // The agent's decoder: 3 metrics x 2 samples per message, event times from the schedule,
    // values the datasheet compensation gives for the simulated chip's raw samples.
    let mut readings = Vec::new();
    for r in &received {
        edgewise_agent::decode::decode(
            &r.topic,
            &r.payload,
            edgewise_agent::decode::PayloadFormat::Auto,
            &edgewise_agent::decode::DecodeLimits::default(),
            START_MS,
            &mut readings,
        )
        .expect("the agent reads the node's pack");
    }
    assert_eq!(readings.len(), 18);
    let c = ex::CALIBRATION;
    for (i, r) in readings.iter().enumerate() {
        let sample = (i / 3) as u32;
        assert_eq!(r.time_ms, START_MS + i64::from(sample) * 1_000, "{r:?}");
        let (p, t, h) = SimulatedBme280::raw(sample);
        let (t_fine, centi) = c.compensate_temperature(t);
        let (metric, value) = match i % 3 {
            0 => ("temperature", f64::from(centi) / 100.0),
            1 => (
                "humidity",
                f64::from(c.compensate_humidity(h, t_fine)) / 1024.0,
            ),
            _ => (
                "pressure",
                f64::from(c.compensate_pressure(p, t_fine)) / 256.0,
            ),
        };
        assert_eq!(r.stream, format!("{node}/{metric}"));
        assert_eq!(r.value, value, "{r:?}");
    }
    assert_eq!(readings[0].value, 25.08);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_connection_is_reopened_and_nothing_is_lost() {
    let broker = broker();
    let proxy = Proxy::start(&broker).await;
    let node = "fw-cut-node";
    let topic = format!("edgewise-test/{}/sensors/{node}", unique("cut"));
    let sub = Subscriber::start(&broker, &topic).await;

    let mut s = sampler(node);
    let link = TcpLink {
        addr: format!("127.0.0.1:{}", proxy.port),
        stream: None,
    };
    let client_id = unique("fw-cut");
    let mut up = Uplink::<_, 8, 512>::new(uplink_config(&client_id, &topic), link);
    let mut now = START_MS;
    sample_into(&mut s, &mut up, &mut now, 4);
    drain(&mut up, &mut now, 20).await;
    assert_eq!(up.counters().published, 2);

    assert_eq!(proxy.cut(), 1);
    sample_into(&mut s, &mut up, &mut now, 6);
    drain(&mut up, &mut now, 50).await;
    let c = up.counters();
    assert_eq!(up.queued(), 0, "{c:?}");
    assert!(c.connection_losses >= 1 && c.connects >= 2, "{c:?}");
    assert_eq!(c.published, 5, "{c:?}");

    // At least once: every seq arrives, in order of first arrival.
    let received = sub.collect(5).await;
    let mut seqs: Vec<u32> = received.iter().map(|r| seq_of(&r.payload)).collect();
    seqs.dedup();
    assert_eq!(seqs, [0, 1, 2, 3, 4]);
}

#[tokio::test]
async fn without_a_broker_the_queue_keeps_the_newest_and_counts_what_it_dropped() {
    let port = free_port();
    let mut s = sampler("fw-offline");
    let link = TcpLink {
        addr: format!("127.0.0.1:{port}"),
        stream: None,
    };
    let mut up = Uplink::<_, 8, 512>::new(uplink_config("fw-offline", "sensors/fw-offline"), link);
    let mut now = START_MS;
    sample_into(&mut s, &mut up, &mut now, 24);
    let LinkState::RetryAt(retry) = up.service(now).await else {
        panic!("nothing listens on port {port}")
    };
    assert!(retry > now);
    let c = up.counters();
    assert_eq!((c.connect_failures, c.dropped, c.published), (1, 4, 0));
    assert_eq!(up.queued(), 8);
}
