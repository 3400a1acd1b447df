//! Helpers for the integration tests: a real MQTT broker and a subscriber that tallies what
//! it receives.
//!
//! The broker is the one named by `EDGEWISE_TEST_MQTT_URL` (`mqtt://127.0.0.1:1883`, as on CI),
//! else an embedded rumqttd started once per test binary on a free loopback port. Every test
//! uses fresh client ids and topics, so tests and concurrent runs never see each other's traffic.

use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use edgewise_protocol::senml::label;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};

/// Where the test broker listens.
#[derive(Debug, Clone)]
pub struct BrokerAddr {
    pub host: String,
    pub port: u16,
}

pub fn broker() -> BrokerAddr {
    if let Ok(url) = std::env::var("EDGEWISE_TEST_MQTT_URL") {
        let (host, port) = edgewise_agent::config::parse_mqtt_url(&url)
            .unwrap_or_else(|e| panic!("EDGEWISE_TEST_MQTT_URL: {e}"));
        return BrokerAddr { host, port };
    }
    // One embedded broker (the agent's, the same the demo runs) per test binary.
    static EMBEDDED: OnceLock<u16> = OnceLock::new();
    BrokerAddr {
        host: "127.0.0.1".into(),
        port: *EMBEDDED.get_or_init(|| {
            edgewise_agent::broker::EmbeddedBroker::start(
                SocketAddr::from(([127, 0, 0, 1], 0)),
                1 << 20,
            )
            .expect("embedded broker")
            .addr
            .port()
        }),
    }
}

/// A free loopback port: bind port 0, read the port, release it.
pub fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    listener.local_addr().expect("local addr").port()
}

/// A name unique to this process and call, for client ids and topics.
pub fn unique(name: &str) -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!(
        "{name}-{}-{nanos}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// Base name, base time (ms) and values of a SenML-CBOR pack; `None` if it is not one.
pub fn decode_pack(bytes: &[u8]) -> Option<(String, i64, Vec<f64>)> {
    let mut d = minicbor::Decoder::new(bytes);
    let (mut bn, mut bt, mut values) = (None, None, Vec::new());
    for _ in 0..d.array().ok()?? {
        for _ in 0..d.map().ok()?? {
            match d.i64().ok()? {
                label::BASE_NAME => bn = Some(d.str().ok()?.to_string()),
                label::BASE_TIME => bt = Some((d.f64().ok()? * 1_000.0).round() as i64),
                label::VALUE => values.push(d.f64().ok()?),
                label::NAME | label::UNIT => drop(d.str().ok()?),
                _ => d.skip().ok()?,
            }
        }
    }
    (d.position() == bytes.len()).then_some((bn?, bt?, values))
}

/// One received message: its topic and, if it is a SenML pack, what the pack holds.
#[derive(Debug, Clone)]
pub struct Received {
    pub topic: String,
    pub payload: Vec<u8>,
    // Read by tests/sim.rs; tests/uplink.rs decodes with the agent's decoder instead.
    #[allow(dead_code)]
    pub pack: Option<(String, i64, Vec<f64>)>,
}

/// A subscriber to `filter` (QoS 1) that keeps every message it receives.
pub struct Subscriber {
    pub received: Arc<Mutex<Vec<Received>>>,
    _client: AsyncClient,
    task: tokio::task::JoinHandle<()>,
}

impl Subscriber {
    /// Connect, subscribe and wait for the SUBACK.
    pub async fn start(broker: &BrokerAddr, filter: &str) -> Subscriber {
        let mut opts = MqttOptions::new(unique("sub"), broker.host.clone(), broker.port);
        opts.set_max_packet_size(1 << 20, 1 << 20)
            .set_keep_alive(Duration::from_secs(30));
        let (client, mut eventloop) = AsyncClient::new(opts, 64);
        client
            .subscribe(filter, QoS::AtLeastOnce)
            .await
            .expect("queue the subscribe");
        let received = Arc::new(Mutex::new(Vec::new()));
        let (subacked_tx, subacked_rx) = tokio::sync::oneshot::channel();
        let sink = Arc::clone(&received);
        let task = tokio::spawn(async move {
            let mut subacked = Some(subacked_tx);
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        if let Some(tx) = subacked.take() {
                            let _ = tx.send(());
                        }
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        let r = Received {
                            topic: p.topic.clone(),
                            payload: p.payload.to_vec(),
                            pack: decode_pack(&p.payload),
                        };
                        sink.lock().unwrap().push(r);
                    }
                    Ok(_) => {}
                    Err(e) => {
                        eprintln!("subscriber: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
        });
        tokio::time::timeout(Duration::from_secs(10), subacked_rx)
            .await
            .expect("SUBACK within 10 s")
            .expect("subscriber task alive");
        Subscriber {
            received,
            _client: client,
            task,
        }
    }

    /// Wait until at least `n` messages arrived (or 15 s passed), then a little longer to catch
    /// any extra (duplicate) deliveries; returns everything received.
    pub async fn collect(&self, n: usize) -> Vec<Received> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
        while self.received.lock().unwrap().len() < n && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        self.received.lock().unwrap().clone()
    }
}

impl Drop for Subscriber {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A TCP proxy in front of the broker whose connections can be cut, to force reconnects.
pub struct Proxy {
    pub port: u16,
    connections: Arc<Mutex<Vec<tokio::task::JoinHandle<()>>>>,
    accept: tokio::task::JoinHandle<()>,
}

impl Proxy {
    pub async fn start(target: &BrokerAddr) -> Proxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the proxy");
        let port = listener.local_addr().expect("proxy addr").port();
        let target = format!("{}:{}", target.host, target.port);
        let connections = Arc::new(Mutex::new(Vec::new()));
        let live = Arc::clone(&connections);
        let accept = tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                let target = target.clone();
                let conn = tokio::spawn(async move {
                    if let Ok(mut outbound) = tokio::net::TcpStream::connect(&target).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
                live.lock().unwrap().push(conn);
            }
        });
        Proxy {
            port,
            connections,
            accept,
        }
    }

    /// Drop every proxied connection now (new ones are still accepted).
    pub fn cut(&self) -> usize {
        let conns: Vec<_> = self.connections.lock().unwrap().drain(..).collect();
        conns.iter().for_each(|c| c.abort());
        conns.len()
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.cut();
        self.accept.abort();
    }
}
