//! MQTT ingest: the broker connection and the group-commit loop that feeds the [`Pipeline`].
//!
//! Two kinds of task:
//! - [`run_connection`], one per MQTT connection (`mqtt.connections`), polls its [`Session`]
//!   (rumqttc's MQTT 3.1.1 or MQTT 5 event loop, `mqtt.protocol`; see [`session`]) and nothing
//!   else, as rumqttc requires, re-subscribes on every ConnAck, backs
//!   off on errors, and forwards each publish, tagged with its connection, into one bounded
//!   channel. A full channel stops the polling: the broker then holds the messages
//!   (backpressure), memory does not grow. Several connections hold shared subscriptions of one
//!   group ([`AgentConfig::subscription_filters`]): the broker splits the messages between them.
//! - [`run_pipeline`] takes messages in batches (up to `commit_max_messages`, or what arrived
//!   within `commit_interval_ms` of the first, or as soon as one connection reaches the broker's
//!   in-flight limit of unacked QoS 1 messages), runs [`Pipeline::ingest`] on the blocking pool,
//!   and only after the commit acks the batch's messages, each on the connection it came from, in
//!   the order received. It also closes due windows on a timer and wakes the uploader.
//!
//! The session is persistent (fixed client id; `clean_session = false` in 3.1.1, `clean_start =
//! false` with a session that never expires in MQTT 5) with manual acks: a
//! message received but not yet durable is redelivered by the broker after a reconnect or restart,
//! and the journal's unique key makes that redelivery harmless.
//!
//! Tested end to end against a real broker in `tests/`.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::{Notify, mpsc, watch};
use tokio::time::Instant;

use crate::config::AgentConfig;
use crate::metrics::Metrics;
use crate::pipeline::{Message, Pipeline};

mod session;
pub use session::{Client, Incoming, Received, Session, SessionError, connect, connect_v311};

/// An ingest step (a batch's commit and the window closes after it) at least this long is
/// logged: meanwhile no message is acked and the channel fills.
const SLOW_STEP: Duration = Duration::from_millis(50);

/// A message as the connection `connection` (an index into the clients) received it: its ack
/// goes back through that connection.
pub struct Delivery {
    pub connection: usize,
    pub message: Received,
}

/// One connection's task: its event loop, its client, its index among the connections, and
/// the topic filters it subscribes to.
pub struct Connection {
    pub session: Session,
    pub client: Client,
    pub index: usize,
    pub topics: Vec<String>,
}

/// Polls the connection until `stopping` is set and the disconnect went out (or failed).
pub async fn run_connection(
    connection: Connection,
    tx: mpsc::Sender<Delivery>,
    metrics: Arc<Metrics>,
    max_backoff: Duration,
    stopping: Arc<AtomicBool>,
) {
    let Connection {
        mut session,
        client,
        index,
        topics,
    } = connection;
    let mut backoff = Duration::from_millis(100);
    // This connection's share of the `mqtt_connected` and `mqtt_subscribed` gauges.
    let mut state = ConnectionGauges::new(&metrics);
    loop {
        match session.poll().await {
            Ok(Incoming::Publish(message)) => {
                // A closed channel means the pipeline stopped: the message stays unacked and the
                // broker redelivers it to the next run.
                let _ = tx
                    .send(Delivery {
                        connection: index,
                        message,
                    })
                    .await;
            }
            Ok(Incoming::ConnAck { session_present }) => {
                backoff = Duration::from_millis(100);
                metrics.mqtt_connections.inc();
                state.connected(true);
                tracing::info!(
                    session_present,
                    connection = index,
                    "connected to the broker"
                );
                let (client, topics) = (client.clone(), topics.clone());
                tokio::spawn(async move {
                    if let Err(e) = client.subscribe(&topics).await {
                        tracing::warn!(error = %e, "subscribe request failed");
                    }
                });
            }
            Ok(Incoming::SubAck) => state.subscribed(true),
            Ok(Incoming::DisconnectSent) if stopping.load(Ordering::Relaxed) => {
                state.connected(false);
                return;
            }
            Ok(_) => {}
            Err(e) => {
                state.connected(false);
                if stopping.load(Ordering::Relaxed) {
                    return;
                }
                metrics.mqtt_connection_errors.inc();
                match e.refusal {
                    // Configuration or security problems: loud, and retried (an operator may fix
                    // the broker's certificate or the credentials without restarting us).
                    Some(why) => {
                        tracing::error!(error = %e, connection = index, retry_in_ms = backoff.as_millis() as u64, "broker connection refused: {why}")
                    }
                    None => {
                        tracing::warn!(error = %e, connection = index, retry_in_ms = backoff.as_millis() as u64, "broker connection failed")
                    }
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(max_backoff);
            }
        }
    }
}

/// One connection's contribution to the `mqtt_connected` and `mqtt_subscribed` gauges, which
/// count the connections that are connected and subscribed: each connection moves them by at
/// most one, and takes its part back when it drops.
struct ConnectionGauges<'a> {
    metrics: &'a Metrics,
    connected: bool,
    subscribed: bool,
}

impl<'a> ConnectionGauges<'a> {
    fn new(metrics: &'a Metrics) -> Self {
        ConnectionGauges {
            metrics,
            connected: false,
            subscribed: false,
        }
    }

    fn connected(&mut self, now: bool) {
        if now != self.connected {
            self.connected = now;
            self.metrics.mqtt_connected.step(now);
        }
        if !now {
            self.subscribed(false);
        }
    }

    fn subscribed(&mut self, now: bool) {
        if now != self.subscribed {
            self.subscribed = now;
            self.metrics.mqtt_subscribed.step(now);
        }
    }
}

impl Drop for ConnectionGauges<'_> {
    fn drop(&mut self) {
        self.connected(false);
    }
}

/// Milliseconds since the Unix epoch, by the wall clock.
pub fn wall_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Settings of the group-commit loop.
#[derive(Debug, Clone, Copy)]
pub struct BatchPolicy {
    pub max_messages: usize,
    pub max_wait: Duration,
    /// Commit as soon as this many QoS 1/2 messages of one connection wait for their ack: the
    /// broker's in-flight limit ([`AgentConfig::in_flight_limit`]), past which it sends that
    /// connection nothing until they are acked. 0: no such limit known.
    pub max_unacked: usize,
    /// How often due windows are closed when no message arrives.
    pub tick: Duration,
}

impl BatchPolicy {
    pub fn from_config(cfg: &AgentConfig) -> Self {
        let idle = Duration::from_millis(cfg.window.idle_timeout_ms);
        BatchPolicy {
            max_messages: cfg.ingest.commit_max_messages,
            max_wait: cfg.commit_interval(),
            max_unacked: cfg.in_flight_limit(),
            tick: (idle / 4).clamp(Duration::from_millis(10), Duration::from_millis(250)),
        }
    }

    /// Whether the batch must commit now: it is as large as allowed, or the connection that
    /// delivered its last message has as many messages waiting for their ack as the broker
    /// sends it (`unacked` counts them per connection).
    fn full(&self, batch: &[Delivery], unacked: &[usize]) -> bool {
        batch.len() >= self.max_messages
            || (self.max_unacked > 0
                && batch
                    .last()
                    .is_some_and(|d| unacked[d.connection] >= self.max_unacked))
    }
}

/// The pipeline's end of the channel. It takes what is queued in bulk
/// ([`mpsc::Receiver::recv_many`]): one call frees the senders' slots together and wakes a waiting connection task once, where
/// taking messages one at a time woke it (a thread hop) for every message while the channel was
/// full. What a batch does not take stays staged, in order, for the next one.
struct Inbox {
    rx: mpsc::Receiver<Delivery>,
    staged: std::collections::VecDeque<Delivery>,
    scratch: Vec<Delivery>,
}

/// Most messages one bulk take moves out of the channel.
const TAKE_AT_ONCE: usize = 1024;

impl Inbox {
    fn new(rx: mpsc::Receiver<Delivery>) -> Self {
        Inbox {
            rx,
            staged: std::collections::VecDeque::new(),
            scratch: Vec::with_capacity(TAKE_AT_ONCE),
        }
    }

    /// The next message, waiting for one; `None` once the channel is closed and drained.
    async fn recv(&mut self) -> Option<Delivery> {
        if self.staged.is_empty() {
            self.take().await?;
        }
        self.staged.pop_front()
    }

    /// The next message if one arrives before `deadline`.
    async fn recv_until(&mut self, deadline: Instant) -> Option<Delivery> {
        if self.staged.is_empty() {
            tokio::time::timeout_at(deadline, self.take())
                .await
                .ok()??;
        }
        self.staged.pop_front()
    }

    /// Waits until the channel holds something, then stages all of it (up to
    /// [`TAKE_AT_ONCE`]); `None` when it is closed and empty.
    async fn take(&mut self) -> Option<()> {
        let n = self.rx.recv_many(&mut self.scratch, TAKE_AT_ONCE).await;
        self.staged.extend(self.scratch.drain(..));
        (n > 0).then_some(())
    }
}

/// Fills `batch`, which holds the batch's first message, until it is [`BatchPolicy::full`] or
/// `policy.max_wait` has passed since that first message (or the channel closed). `connections`:
/// how many connections deliver (every `Delivery::connection` is below it).
async fn fill_batch(
    inbox: &mut Inbox,
    batch: &mut Vec<Delivery>,
    policy: &BatchPolicy,
    connections: usize,
) {
    let mut unacked = vec![0usize; connections];
    for d in batch.iter() {
        count_unacked(&mut unacked, d);
    }
    let deadline = Instant::now() + policy.max_wait;
    while !policy.full(batch, &unacked) {
        let Some(next) = inbox.recv_until(deadline).await else {
            break;
        };
        count_unacked(&mut unacked, &next);
        batch.push(next);
    }
}

/// Counts a message that waits for its ack (QoS 1 or 2) against its connection.
fn count_unacked(unacked: &mut [usize], d: &Delivery) {
    if d.message.needs_ack()
        && let Some(n) = unacked.get_mut(d.connection)
    {
        *n += 1;
    }
}

/// Runs until `shutdown` turns true (or the channel closes). The batch in hand is committed and
/// acked before returning; messages still in the channel are left unacked for redelivery.
/// `clients[i]` acks what connection `i` delivered.
pub async fn run_pipeline(
    mut pipeline: Pipeline,
    rx: mpsc::Receiver<Delivery>,
    clients: Vec<Client>,
    policy: BatchPolicy,
    metrics: Arc<Metrics>,
    outbox_ready: Arc<Notify>,
    mut shutdown: watch::Receiver<bool>,
) {
    let origin = Instant::now();
    let mut inbox = Inbox::new(rx);
    let mut batch: Vec<Delivery> = Vec::with_capacity(policy.max_messages);
    let mut retry_delay = Duration::from_millis(50);
    // Windows the last close left due (see `Pipeline::close_due`): closed without waiting.
    let mut closing_pending = false;
    loop {
        if *shutdown.borrow() {
            return;
        }
        if batch.is_empty() {
            let tick = if closing_pending {
                Duration::ZERO
            } else {
                policy.tick
            };
            tokio::select! {
                biased;
                _ = shutdown.changed() => return,
                m = inbox.recv() => match m {
                    Some(p) => batch.push(p),
                    None => return,
                },
                _ = tokio::time::sleep(tick) => {}
            }
            if !batch.is_empty() {
                fill_batch(&mut inbox, &mut batch, &policy, clients.len()).await;
            }
        }

        let proc_ms = origin.elapsed().as_millis() as i64;
        let joined = tokio::task::spawn_blocking(move || {
            let started = std::time::Instant::now();
            let msgs: Vec<Message<'_>> = batch
                .iter()
                .map(|d| Message {
                    topic: &d.message.topic,
                    payload: &d.message.payload,
                })
                .collect();
            let committed = if msgs.is_empty() {
                Ok(())
            } else {
                pipeline.ingest(&msgs, wall_ms(), proc_ms)
            };
            let ingested = started.elapsed();
            let closed = pipeline.close_due(proc_ms);
            let took = started.elapsed();
            if took >= SLOW_STEP {
                // The broker holds (or, past its queue limit, drops) what arrives meanwhile.
                tracing::warn!(
                    took_ms = took.as_millis() as u64,
                    ingest_ms = ingested.as_millis() as u64,
                    messages = msgs.len(),
                    windows_closed = closed.as_ref().copied().unwrap_or(0),
                    "slow ingest step: the loop did not read from the broker meanwhile"
                );
            }
            drop(msgs);
            (pipeline, batch, committed, closed, took)
        })
        .await;
        let (p, b, committed, closed, took) = match joined {
            Ok(done) => done,
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            // The runtime is shutting down; nothing was acked for this batch.
            Err(_) => return,
        };
        pipeline = p;
        batch = b;
        metrics
            .ingest_busy_us
            .add(u64::try_from(took.as_micros()).unwrap_or(u64::MAX));
        closing_pending = pipeline.closing_pending();

        match committed {
            Ok(()) => {
                retry_delay = Duration::from_millis(50);
                for d in batch.drain(..) {
                    // rumqttc would do nothing with a QoS 0 "ack"; it is not counted either.
                    if !d.message.needs_ack() {
                        continue;
                    }
                    let Some(client) = clients.get(d.connection) else {
                        continue;
                    };
                    if client.ack(&d.message).await.is_ok() {
                        metrics.acks_sent.inc();
                    }
                }
            }
            Err(e) => {
                // Nothing was acked or applied; keep the batch and retry (disk full, locked...).
                metrics.store_errors.inc();
                tracing::error!(error = %e, retry_in_ms = retry_delay.as_millis() as u64, "journal commit failed; retrying the batch");
                tokio::select! {
                    _ = tokio::time::sleep(retry_delay) => {}
                    _ = shutdown.changed() => return,
                }
                retry_delay = (retry_delay * 2).min(Duration::from_secs(5));
            }
        }
        match closed {
            Ok(0) => {}
            Ok(_) => outbox_ready.notify_one(),
            Err(e) => {
                metrics.store_errors.inc();
                tracing::error!(error = %e, "closing windows failed; will retry");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rumqttc::QoS;

    fn policy(max_messages: usize, max_unacked: usize, max_wait: Duration) -> BatchPolicy {
        BatchPolicy {
            max_messages,
            max_wait,
            max_unacked,
            tick: Duration::from_secs(1),
        }
    }

    fn publish(qos: QoS) -> Delivery {
        on(0, qos)
    }

    fn on(connection: usize, qos: QoS) -> Delivery {
        Delivery {
            connection,
            message: Received {
                topic: "sensors/n1".into(),
                payload: vec![1u8, 2, 3].into(),
                qos,
                pkid: 1,
            },
        }
    }

    /// Fills a batch from a channel holding `queued` (the sender stays open, so only the policy
    /// can end the batch early), delivered by two connections; `None` if it did not end within
    /// 10 s.
    async fn fill(queued: Vec<Delivery>, policy: BatchPolicy) -> Option<Vec<Delivery>> {
        let (tx, rx) = mpsc::channel(queued.len() + 1);
        for p in queued {
            assert!(tx.send(p).await.is_ok());
        }
        let mut inbox = Inbox::new(rx);
        let mut batch = vec![inbox.recv().await.expect("a first message")];
        let filled = fill_batch(&mut inbox, &mut batch, &policy, 2);
        let done = tokio::time::timeout(Duration::from_secs(10), filled).await;
        drop(tx);
        done.ok().map(|()| batch)
    }

    fn qos1(batch: &[Delivery]) -> usize {
        batch
            .iter()
            .filter(|d| d.message.qos == QoS::AtLeastOnce)
            .count()
    }

    #[test]
    fn each_connection_counts_once_in_the_gauges_across_reconnects() {
        let m = Metrics::default();
        let mut a = ConnectionGauges::new(&m);
        let mut b = ConnectionGauges::new(&m);
        for _ in 0..2 {
            // A second ConnAck or SubAck on the same connection (a reconnect) adds nothing.
            a.connected(true);
            a.subscribed(true);
        }
        b.connected(true);
        assert_eq!((m.mqtt_connected.get(), m.mqtt_subscribed.get()), (2, 1));
        // A dropped connection is no longer subscribed either.
        a.connected(false);
        assert_eq!((m.mqtt_connected.get(), m.mqtt_subscribed.get()), (1, 0));
        a.connected(true);
        a.subscribed(true);
        // A task that ends (or is aborted) takes its part back.
        drop(a);
        drop(b);
        assert_eq!((m.mqtt_connected.get(), m.mqtt_subscribed.get()), (0, 0));
    }

    #[tokio::test]
    async fn a_batch_commits_when_the_brokers_in_flight_limit_is_reached() {
        // 99 QoS 1, then QoS 0 ones (not counted: the broker needs no ack for them), then the
        // 100th QoS 1: the batch ends there, long before its hour is up.
        let mut queued: Vec<Delivery> = (0..99).map(|_| publish(QoS::AtLeastOnce)).collect();
        queued.extend((0..20).map(|_| publish(QoS::AtMostOnce)));
        queued.extend((0..5).map(|_| publish(QoS::AtLeastOnce)));
        let batch = fill(queued, policy(1000, 100, Duration::from_secs(3600)))
            .await
            .expect("the batch ended at the in-flight limit");
        assert_eq!(batch.len(), 120);
        assert_eq!(qos1(&batch), 100);
    }

    #[tokio::test]
    async fn what_a_batch_leaves_in_the_inbox_is_the_next_batch_in_order() {
        // 250 messages, all taken from the channel at once; batches of 100 take them in order.
        let (tx, rx) = mpsc::channel(300);
        for pkid in 0..250u16 {
            let mut d = publish(QoS::AtLeastOnce);
            d.message.pkid = pkid;
            assert!(tx.send(d).await.is_ok());
        }
        drop(tx);
        let mut inbox = Inbox::new(rx);
        let mut seen = Vec::new();
        while let Some(first) = inbox.recv().await {
            let mut batch = vec![first];
            fill_batch(
                &mut inbox,
                &mut batch,
                &policy(100, 0, Duration::from_secs(3600)),
                1,
            )
            .await;
            assert!(batch.len() <= 100);
            seen.extend(batch.iter().map(|d| d.message.pkid));
        }
        assert_eq!(seen, (0..250).collect::<Vec<u16>>());
    }

    #[tokio::test]
    async fn the_in_flight_limit_is_counted_per_connection() {
        // 99 unacked on each of two connections: neither is at the broker's limit yet, so the
        // batch goes on; the 100th on connection 1 ends it.
        let mut queued: Vec<Delivery> = Vec::new();
        for _ in 0..99 {
            queued.push(on(0, QoS::AtLeastOnce));
            queued.push(on(1, QoS::AtLeastOnce));
        }
        queued.extend((0..5).map(|_| on(1, QoS::AtLeastOnce)));
        let batch = fill(queued, policy(1000, 100, Duration::from_secs(3600)))
            .await
            .expect("the batch ended at connection 1's in-flight limit");
        assert_eq!(batch.len(), 199);
        assert_eq!(batch.iter().filter(|d| d.connection == 1).count(), 100);
    }

    #[tokio::test]
    async fn without_a_known_limit_a_batch_waits_for_its_interval_or_its_size() {
        let queued = || {
            (0..150)
                .map(|_| publish(QoS::AtLeastOnce))
                .collect::<Vec<_>>()
        };
        // No limit: all 150 queued messages, then the 50 ms interval ends the batch.
        let batch = fill(queued(), policy(1000, 0, Duration::from_millis(50)));
        assert_eq!(batch.await.map(|b| b.len()), Some(150));
        // QoS 0 only: the limit never applies.
        let qos0: Vec<Delivery> = (0..150).map(|_| publish(QoS::AtMostOnce)).collect();
        let batch = fill(qos0, policy(1000, 100, Duration::from_millis(50)));
        assert_eq!(batch.await.map(|b| b.len()), Some(150));
        // The size limit still applies first.
        let batch = fill(queued(), policy(40, 100, Duration::from_secs(3600)));
        assert_eq!(batch.await.map(|b| b.len()), Some(40));
    }
}
