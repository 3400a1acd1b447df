//! The I/O half of the simulator: [`Simulator::run`] connects to the broker, publishes every
//! node's messages on schedule until `stop` resolves, then drains.
//!
//! Per MQTT connection there are two tasks: a poller that only polls the rumqttc `EventLoop`
//! (counting PUBACKs and written publishes, reconnecting with capped exponential backoff) and a
//! publisher that walks its nodes in offset order, sleeping until each one is due. Publishers
//! never run inside the poller (rumqttc stalls otherwise, bytebeamio/rumqtt#1025).
//!
//! Invariants: memory is bounded (the request channel holds [`REQUEST_QUEUE`] messages, a
//! publisher waits when it is full; the unacknowledged set is bounded by rumqttc's inflight
//! window). Sessions are clean, so on reconnect rumqttc would drop the publishes the broker had
//! not acknowledged: the poller keeps them and requeues them after the next CONNACK, which makes
//! QoS 1 at-least-once across reconnects (duplicates are possible then, never losses). `run`
//! returns `Ok` only once every QoS 1 publish was acknowledged (QoS 0: written to the socket).
//!
//! Tested by `tests/sim.rs` against a real broker (embedded rumqttd, or `EDGEWISE_TEST_MQTT_URL`).

use std::collections::VecDeque;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use edgewise_protocol::senml::BufferTooSmall;
use rumqttc::{
    AsyncClient, ConnectionError, Event, EventLoop, MqttOptions, Outgoing, Packet, QoS, Request,
};
use tokio::sync::{oneshot, watch};
use tokio::task::JoinSet;
use tokio::time::{Instant, sleep, sleep_until, timeout, timeout_at};
use tracing::{debug, warn};

use crate::sim::config::{ConfigError, SimConfig};
use crate::sim::counters::{SimCounters, SimReport};
use crate::sim::fleet::VirtualNode;

/// Requests a publisher may queue ahead of its connection's event loop.
pub const REQUEST_QUEUE: usize = 256;
/// Largest MQTT packet in either direction (packs are ~100 bytes; rumqttc's default is 10 KiB).
const MAX_PACKET_BYTES: usize = 1 << 20;
const MIN_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// How long the final DISCONNECT may take before the poller is aborted.
const DISCONNECT_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum SimError {
    #[error("invalid simulator config: {0}")]
    Config(#[from] ConfigError),
    #[error(
        "no CONNACK from the MQTT broker at {broker} within {timeout_ms} ms (last error: {last_error})"
    )]
    Connect {
        broker: String,
        timeout_ms: u64,
        last_error: String,
    },
    #[error("the MQTT event loop of connection {0} stopped")]
    ConnectionClosed(usize),
    #[error("encoding a pack: {0}")]
    Encode(BufferTooSmall),
    #[error(
        "{unconfirmed} of {published} publishes were not confirmed by the broker within {timeout_ms} ms"
    )]
    DrainTimeout {
        published: u64,
        unconfirmed: u64,
        timeout_ms: u64,
    },
    #[error("a publisher task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
}

/// N virtual nodes spread over a few MQTT connections. See the module docs.
pub struct Simulator {
    cfg: SimConfig,
    nodes: Vec<VirtualNode>,
    counters: Arc<SimCounters>,
}

impl Simulator {
    /// Validate `cfg` (capping `connections` at `nodes`) and build the nodes.
    pub fn new(cfg: SimConfig) -> Result<Self, SimError> {
        let cfg = cfg.validate()?;
        let nodes = (0..cfg.nodes)
            .map(|i| VirtualNode::new(i, &cfg))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|reason| ConfigError::NodeIdPrefix {
                prefix: cfg.node_id_prefix.clone(),
                reason,
            })?;
        Ok(Self {
            cfg,
            nodes,
            counters: Arc::default(),
        })
    }

    /// The validated config.
    pub fn config(&self) -> &SimConfig {
        &self.cfg
    }

    /// The run's live counters; keep the `Arc` to read them while `run` is going.
    pub fn counters(&self) -> Arc<SimCounters> {
        Arc::clone(&self.counters)
    }

    /// Publish until `stop` resolves, then wait (at most `drain_timeout_ms`) until the broker
    /// has acknowledged every QoS 1 publish, disconnect and return the final counts.
    ///
    /// Fails early if a connection gets no CONNACK within `connect_timeout_ms`. On any error
    /// the counters stay readable through [`Simulator::counters`].
    pub async fn run(self, stop: impl Future<Output = ()> + Send) -> Result<SimReport, SimError> {
        let Simulator {
            cfg,
            nodes,
            counters,
        } = self;
        let qos = if cfg.qos == 0 {
            QoS::AtMostOnce
        } else {
            QoS::AtLeastOnce
        };
        let start = Instant::now();
        let origin_ms = cfg.start_time_ms.unwrap_or_else(unix_now_ms);
        let last_error = Arc::new(Mutex::new(String::from("none")));

        let (shutdown_tx, shutdown_rx) = watch::channel(false);
        let mut pollers = JoinSet::new();
        let mut clients = Vec::with_capacity(cfg.connections);
        let mut connacks = Vec::with_capacity(cfg.connections);
        for c in 0..cfg.connections {
            let mut opts = MqttOptions::new(
                format!("{}-{c}", cfg.client_id_prefix),
                cfg.broker_host.clone(),
                cfg.broker_port,
            );
            opts.set_keep_alive(Duration::from_secs(30))
                .set_clean_session(true)
                .set_max_packet_size(MAX_PACKET_BYTES, MAX_PACKET_BYTES);
            let (client, eventloop) = AsyncClient::new(opts, REQUEST_QUEUE);
            let (connack_tx, connack_rx) = oneshot::channel();
            let poller = Poller {
                index: c,
                counters: Arc::clone(&counters),
                last_error: Arc::clone(&last_error),
                connack: Some(connack_tx),
                shutdown: shutdown_rx.clone(),
            };
            pollers.spawn(poller.run(eventloop));
            clients.push(client);
            connacks.push(connack_rx);
        }

        let all_connected = async {
            for rx in connacks {
                if rx.await.is_err() {
                    return false;
                }
            }
            true
        };
        let connect_timeout = Duration::from_millis(cfg.connect_timeout_ms);
        if !matches!(timeout(connect_timeout, all_connected).await, Ok(true)) {
            let _ = shutdown_tx.send(true);
            pollers.abort_all();
            let last_error = last_error.lock().map(|e| e.clone()).unwrap_or_default();
            return Err(SimError::Connect {
                broker: format!("{}:{}", cfg.broker_host, cfg.broker_port),
                timeout_ms: cfg.connect_timeout_ms,
                last_error,
            });
        }

        // Node i goes to connection i % connections; each group stays in offset order.
        let mut groups: Vec<Vec<VirtualNode>> = (0..cfg.connections).map(|_| Vec::new()).collect();
        for (i, node) in nodes.into_iter().enumerate() {
            groups[i % cfg.connections].push(node);
        }
        let (halt_tx, halt_rx) = watch::channel(false);
        let mut publishers = JoinSet::new();
        for (c, group) in groups.into_iter().enumerate() {
            let publisher = Publisher {
                index: c,
                client: clients[c].clone(),
                qos,
                start,
                origin_ms,
                interval: Duration::from_micros(cfg.interval_us),
                counters: Arc::clone(&counters),
                halt: halt_rx.clone(),
            };
            publishers.spawn(publisher.run(group));
        }

        let mut failure: Option<SimError> = None;
        tokio::select! {
            () = stop => {}
            Some(res) = publishers.join_next() => failure = flatten(res).err(),
        }
        let _ = halt_tx.send(true);

        let drain_timeout = Duration::from_millis(cfg.drain_timeout_ms);
        let deadline = Instant::now() + drain_timeout;
        loop {
            match timeout_at(deadline, publishers.join_next()).await {
                Ok(None) => break,
                Ok(Some(res)) => {
                    if let Err(e) = flatten(res) {
                        failure.get_or_insert(e);
                    }
                }
                Err(_) => {
                    // A publisher blocked on a full queue: the broker is gone.
                    publishers.abort_all();
                    break;
                }
            }
        }

        loop {
            let s = counters.snapshot();
            let confirmed = match qos {
                QoS::AtMostOnce => counters.messages_written(),
                _ => s.messages_acked,
            };
            if confirmed >= s.messages_published {
                break;
            }
            if Instant::now() >= deadline {
                failure.get_or_insert(SimError::DrainTimeout {
                    published: s.messages_published,
                    unconfirmed: s.messages_published - confirmed,
                    timeout_ms: cfg.drain_timeout_ms,
                });
                break;
            }
            sleep(Duration::from_millis(5)).await;
        }

        for client in &clients {
            let _ = client.try_disconnect();
        }
        let _ = timeout(DISCONNECT_TIMEOUT, async {
            while pollers.join_next().await.is_some() {}
        })
        .await;
        let _ = shutdown_tx.send(true);
        pollers.abort_all();
        drop(clients);

        match failure {
            Some(e) => Err(e),
            None => Ok(counters.snapshot()),
        }
    }
}

fn flatten(res: Result<Result<(), SimError>, tokio::task::JoinError>) -> Result<(), SimError> {
    res.map_err(SimError::Task).and_then(|r| r)
}

fn unix_now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// Publishes the messages of one connection's nodes on schedule.
struct Publisher {
    index: usize,
    client: AsyncClient,
    qos: QoS,
    start: Instant,
    origin_ms: i64,
    interval: Duration,
    counters: Arc<SimCounters>,
    halt: watch::Receiver<bool>,
}

impl Publisher {
    /// Node k of round r is due at `start + r * interval + offset_k`, and that slot, in whole
    /// milliseconds, is its pack's event time. A publisher that falls behind publishes back to
    /// back until it has caught up; none of its rounds is skipped, and a node's event times stay
    /// one interval apart (give or take the rounding; the interval is at least 1 ms).
    async fn run(mut self, mut nodes: Vec<VirtualNode>) -> Result<(), SimError> {
        let mut round_start = self.start;
        let mut batch = Vec::new();
        loop {
            for node in &mut nodes {
                if *self.halt.borrow() {
                    return Ok(());
                }
                let due = round_start + Duration::from_micros(node.offset_us());
                if due > Instant::now() {
                    tokio::select! {
                        () = sleep_until(due) => {}
                        _ = self.halt.changed() => return Ok(()),
                    }
                }
                // Event time is the slot the node was due in, not the moment it got out: a
                // publisher catching up must not give two packs of one node the same time (the
                // agent's journal would rightly take the second for a redelivery).
                let slot_ms =
                    i64::try_from(due.duration_since(self.start).as_millis()).unwrap_or(i64::MAX);
                let now_ms = self.origin_ms.saturating_add(slot_ms);
                batch.clear();
                node.next_messages(now_ms, &mut batch)
                    .map_err(SimError::Encode)?;
                for message in batch.drain(..) {
                    if message.tally.dropped {
                        self.counters.dropped(&message.tally);
                        continue;
                    }
                    // Not cancelled on halt: a publish is either fully handed over and counted,
                    // or not made at all.
                    self.client
                        .publish(node.topic(), self.qos, false, message.payload)
                        .await
                        .map_err(|_| SimError::ConnectionClosed(self.index))?;
                    self.counters.published(&message.tally);
                }
            }
            round_start += self.interval;
        }
    }
}

/// Drives one connection's rumqttc event loop.
struct Poller {
    index: usize,
    counters: Arc<SimCounters>,
    last_error: Arc<Mutex<String>>,
    connack: Option<oneshot::Sender<()>>,
    shutdown: watch::Receiver<bool>,
}

impl Poller {
    async fn run(mut self, mut eventloop: EventLoop) {
        let mut backoff = MIN_BACKOFF;
        // Requests rumqttc held when the connection dropped; bounded by inflight + REQUEST_QUEUE.
        let mut unsent: VecDeque<Request> = VecDeque::new();
        loop {
            let event = tokio::select! {
                event = eventloop.poll() => event,
                _ = self.shutdown.changed() => return,
            };
            match event {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    backoff = MIN_BACKOFF;
                    if let Some(tx) = self.connack.take() {
                        let _ = tx.send(());
                    }
                    if !unsent.is_empty() {
                        debug!(
                            connection = self.index,
                            requeued = unsent.len(),
                            "reconnected"
                        );
                        unsent.extend(eventloop.pending.drain(..));
                        eventloop.pending = std::mem::take(&mut unsent);
                    }
                }
                Ok(Event::Incoming(Packet::PubAck(_))) => self.counters.acked(),
                Ok(Event::Outgoing(Outgoing::Publish(_))) => self.counters.written(),
                Ok(Event::Outgoing(Outgoing::Disconnect)) => return,
                Ok(_) => {}
                Err(ConnectionError::RequestsDone) => return,
                Err(e) => {
                    self.counters.connection_error();
                    warn!(connection = self.index, error = %e, retry_in_ms = backoff.as_millis() as u64, "MQTT connection failed");
                    if let Ok(mut last) = self.last_error.lock() {
                        *last = e.to_string();
                    }
                    // A clean session would drop these on reconnect: keep them (see module docs).
                    unsent.extend(eventloop.pending.drain(..));
                    tokio::select! {
                        () = sleep(backoff) => {}
                        _ = self.shutdown.changed() => return,
                    }
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
    }
}
