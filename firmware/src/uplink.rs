//! The network half of a sensor node: [`Uplink`] keeps encoded messages in an
//! [`OfflineQueue`] and publishes them with QoS 1 over whatever [`Link`] the board has (a TCP
//! socket that can be reopened), reconnecting with capped, jittered exponential [`Backoff`].
//!
//! [`Uplink::service`] does one round: if disconnected and the backoff has passed, connect
//! (transport + MQTT CONNECT); then publish queued messages oldest first, removing each only
//! when its PUBACK arrived; when idle for half the keep-alive, ping. Any failure drops the
//! connection and schedules the next attempt. Invariants: no allocation; a message leaves the
//! queue only when acknowledged or when the full queue drops it as the oldest (counted); the
//! session is clean, so a message whose PUBACK was lost is sent again (DUP set) on the next
//! connection: at least once, duplicates possible (the agent's journal is idempotent on stream and
//! event time). If a `service` future is dropped mid-I/O (a runtime timeout), the next call
//! discards that connection, because the MQTT stream may hold half a packet.
//!
//! Tested below against in-memory connections that fail in scripted ways, and by
//! `tests/uplink.rs` against a real broker.

use core::fmt;

use embedded_io_async::{Read, Write};

use crate::mqtt::{Connect, MqttError, Publish, Session};
use crate::prng::SplitMix64;
use crate::queue::{MessageTooLarge, OfflineQueue, Pushed};

/// A reusable byte stream to the broker: a TCP socket on a board, a test double on the host.
///
/// Nodes run on single-threaded executors, so the future need not be `Send`.
#[allow(async_fn_in_trait)]
pub trait Link: Read + Write {
    type OpenError: fmt::Debug;
    /// Drop any current connection and open a new one.
    async fn open(&mut self) -> Result<(), Self::OpenError>;
}

/// Reconnect delays: `min_ms`, doubling up to `max_ms`, each drawn uniformly from its upper half
/// so a fleet that lost its gateway does not reconnect in lockstep.
#[derive(Debug, Clone)]
pub struct Backoff {
    min_ms: u32,
    max_ms: u32,
    current_ms: u32,
    rng: SplitMix64,
}

impl Backoff {
    pub fn new(min_ms: u32, max_ms: u32, seed: u64) -> Self {
        let min_ms = min_ms.max(1);
        Self {
            min_ms,
            max_ms: max_ms.max(min_ms),
            current_ms: min_ms,
            rng: SplitMix64::new(seed),
        }
    }

    /// The delay before the next attempt; doubles the base for the one after.
    pub fn next_delay_ms(&mut self) -> u32 {
        let base = self.current_ms;
        self.current_ms = base.saturating_mul(2).min(self.max_ms);
        let half = base / 2;
        half + self.rng.below(u64::from(base - half) + 1) as u32
    }

    /// A connection succeeded: start again from `min_ms`.
    pub fn reset(&mut self) {
        self.current_ms = self.min_ms;
    }
}

/// How the node talks to its broker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UplinkConfig<'a> {
    pub client_id: &'a str,
    /// Where every message goes, e.g. `sensors/{node_id}`.
    pub topic: &'a str,
    pub keep_alive_s: u16,
    pub username: Option<&'a str>,
    pub password: Option<&'a [u8]>,
    pub min_backoff_ms: u32,
    pub max_backoff_ms: u32,
    /// Seeds the backoff jitter; give each node its own.
    pub jitter_seed: u64,
}

/// Counters of an [`Uplink`] since start.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UplinkCounters {
    /// Messages the broker acknowledged.
    pub published: u32,
    /// Publishes that were re-sends of a message already sent once.
    pub resent: u32,
    /// Connections established (transport + CONNACK).
    pub connects: u32,
    /// Failed connection attempts.
    pub connect_failures: u32,
    /// Established connections that failed later.
    pub connection_losses: u32,
    /// Messages dropped from the full offline queue.
    pub dropped: u32,
}

/// The state of the link after a [`Uplink::service`] round.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkState {
    /// Connected and nothing left to send.
    Idle,
    /// Disconnected; the next attempt is due at this time (ms).
    RetryAt(i64),
}

/// Why the last connection attempt or connection failed (for the board's log).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UplinkError<C, T> {
    Connect(C),
    Mqtt(MqttError<T>),
}

impl<C: fmt::Debug, T: fmt::Debug> fmt::Display for UplinkError<C, T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Connect(e) => write!(f, "connecting to the broker failed: {e:?}"),
            Self::Mqtt(e) => fmt::Display::fmt(e, f),
        }
    }
}

type ErrorOf<L> = UplinkError<<L as Link>::OpenError, <L as embedded_io_async::ErrorType>::Error>;

/// Publishes a node's messages: offline queue + MQTT session + reconnect policy.
pub struct Uplink<'a, L: Link, const SLOTS: usize, const BYTES: usize> {
    config: UplinkConfig<'a>,
    link: L,
    /// CONNECT was accepted on the link and nothing failed since.
    connected: bool,
    /// Set while a service round does I/O; still set at the next round means it was cancelled.
    in_io: bool,
    queue: OfflineQueue<SLOTS, BYTES>,
    backoff: Backoff,
    retry_at_ms: i64,
    last_io_ms: i64,
    next_packet_id: u16,
    counters: UplinkCounters,
    last_error: Option<ErrorOf<L>>,
}

impl<'a, L: Link, const SLOTS: usize, const BYTES: usize> Uplink<'a, L, SLOTS, BYTES> {
    pub fn new(config: UplinkConfig<'a>, link: L) -> Self {
        Self {
            backoff: Backoff::new(
                config.min_backoff_ms,
                config.max_backoff_ms,
                config.jitter_seed,
            ),
            config,
            link,
            connected: false,
            in_io: false,
            queue: OfflineQueue::new(),
            retry_at_ms: i64::MIN,
            last_io_ms: 0,
            next_packet_id: 1,
            counters: UplinkCounters::default(),
            last_error: None,
        }
    }

    /// Queue a message for publishing (dropping the oldest if the queue is full).
    pub fn enqueue(&mut self, message: &[u8]) -> Result<Pushed, MessageTooLarge> {
        let pushed = self.queue.push(message)?;
        self.counters.dropped = self.queue.dropped();
        Ok(pushed)
    }

    pub fn queued(&self) -> usize {
        self.queue.len()
    }

    pub fn counters(&self) -> UplinkCounters {
        self.counters
    }

    pub fn is_connected(&self) -> bool {
        self.connected
    }

    /// The error that ended the last connection or attempt, if any.
    pub fn last_error(&self) -> Option<&ErrorOf<L>> {
        self.last_error.as_ref()
    }

    pub fn link_mut(&mut self) -> &mut L {
        &mut self.link
    }

    /// One round at `now_ms`: (re)connect if due, publish everything queued, keep alive.
    pub async fn service(&mut self, now_ms: i64) -> LinkState {
        if self.in_io {
            // The previous round was cancelled mid-I/O: the stream may hold half a packet.
            self.in_io = false;
            if self.connected {
                self.lose_connection(now_ms, None);
            } else {
                self.counters.connect_failures += 1;
                self.retry_at_ms = now_ms + i64::from(self.backoff.next_delay_ms());
            }
            return LinkState::RetryAt(self.retry_at_ms);
        }
        if !self.connected {
            if now_ms < self.retry_at_ms {
                return LinkState::RetryAt(self.retry_at_ms);
            }
            self.in_io = true;
            let connected = self.connect().await;
            self.in_io = false;
            match connected {
                Ok(()) => {
                    self.connected = true;
                    self.backoff.reset();
                    self.counters.connects += 1;
                    self.last_io_ms = now_ms;
                }
                Err(e) => {
                    self.counters.connect_failures += 1;
                    self.last_error = Some(e);
                    self.retry_at_ms = now_ms + i64::from(self.backoff.next_delay_ms());
                    return LinkState::RetryAt(self.retry_at_ms);
                }
            }
        }
        while let Some(attempts) = self.queue.front().map(|m| m.attempts) {
            self.queue.mark_attempt();
            let packet_id = self.next_packet_id;
            self.next_packet_id = packet_id.checked_add(1).unwrap_or(1);
            let Some(msg) = self.queue.front() else {
                break;
            };
            let p = Publish {
                topic: self.config.topic,
                payload: msg.payload,
                qos1: true,
                packet_id,
                dup: attempts > 0,
                retain: false,
            };
            self.in_io = true;
            let sent = Session::attached(&mut self.link).publish(&p).await;
            self.in_io = false;
            match sent {
                Ok(()) => {
                    self.queue.pop_front();
                    self.counters.published += 1;
                    self.counters.resent += u32::from(attempts > 0);
                    self.last_io_ms = now_ms;
                }
                Err(e) => {
                    self.lose_connection(now_ms, Some(UplinkError::Mqtt(e)));
                    return LinkState::RetryAt(self.retry_at_ms);
                }
            }
        }
        let keep_alive_ms = i64::from(self.config.keep_alive_s) * 1_000;
        if keep_alive_ms > 0 && now_ms - self.last_io_ms >= keep_alive_ms / 2 {
            self.in_io = true;
            let pinged = Session::attached(&mut self.link).ping().await;
            self.in_io = false;
            match pinged {
                Ok(()) => self.last_io_ms = now_ms,
                Err(e) => {
                    self.lose_connection(now_ms, Some(UplinkError::Mqtt(e)));
                    return LinkState::RetryAt(self.retry_at_ms);
                }
            }
        }
        LinkState::Idle
    }

    async fn connect(&mut self) -> Result<(), ErrorOf<L>> {
        self.link.open().await.map_err(UplinkError::Connect)?;
        let connect = Connect {
            client_id: self.config.client_id,
            keep_alive_s: self.config.keep_alive_s,
            clean_session: true,
            username: self.config.username,
            password: self.config.password,
        };
        Session::connect(&mut self.link, &connect)
            .await
            .map(drop)
            .map_err(UplinkError::Mqtt)
    }

    fn lose_connection(&mut self, now_ms: i64, error: Option<ErrorOf<L>>) {
        self.connected = false;
        self.in_io = false;
        self.counters.connection_losses += 1;
        if error.is_some() {
            self.last_error = error;
        }
        self.retry_at_ms = now_ms + i64::from(self.backoff.next_delay_ms());
    }
}

#[cfg(test)]
mod tests {
    extern crate std;
    use std::collections::VecDeque;
    use std::vec::Vec;

    use embedded_io_async::{ErrorKind, ErrorType};

    use super::*;
    use crate::block_on::block_on;

    /// A fake broker link. Each `open` takes the next script entry: `None` refuses, `Some(n)`
    /// accepts and breaks the connection at the publish after `n` acknowledged ones
    /// (`Some(None)`: never). It answers CONNECT with CONNACK and PUBLISH with PUBACK, and logs
    /// every packet it received in full.
    #[derive(Default)]
    struct FakeLink {
        log: Vec<Vec<u8>>,
        script: VecDeque<Option<Option<u32>>>,
        opens: u32,
        open: bool,
        pending: VecDeque<u8>,
        inbuf: Vec<u8>,
        publishes_left: Option<u32>,
        /// Reads never complete (a broker that went silent).
        stall: bool,
    }

    impl ErrorType for FakeLink {
        type Error = ErrorKind;
    }

    impl Link for FakeLink {
        type OpenError = &'static str;
        async fn open(&mut self) -> Result<(), &'static str> {
            self.opens += 1;
            self.pending.clear();
            self.inbuf.clear();
            match self.script.pop_front().unwrap_or(Some(None)) {
                None => {
                    self.open = false;
                    Err("refused")
                }
                Some(publishes_left) => {
                    self.open = true;
                    self.publishes_left = publishes_left;
                    Ok(())
                }
            }
        }
    }

    impl Read for FakeLink {
        async fn read(&mut self, buf: &mut [u8]) -> Result<usize, ErrorKind> {
            if self.stall {
                core::future::pending::<()>().await;
            }
            if !self.open || self.pending.is_empty() {
                return Err(ErrorKind::ConnectionReset);
            }
            let n = buf.len().min(self.pending.len());
            for b in buf.iter_mut().take(n) {
                *b = self.pending.pop_front().unwrap_or(0);
            }
            Ok(n)
        }
    }

    impl Write for FakeLink {
        async fn write(&mut self, buf: &[u8]) -> Result<usize, ErrorKind> {
            if !self.open {
                return Err(ErrorKind::NotConnected);
            }
            self.inbuf.extend_from_slice(buf);
            Ok(buf.len())
        }

        async fn flush(&mut self) -> Result<(), ErrorKind> {
            let packet = core::mem::take(&mut self.inbuf);
            match packet[0] >> 4 {
                1 => self.pending.extend([0x20, 2, 0, 0]),
                3 => {
                    if self.publishes_left == Some(0) {
                        self.open = false;
                        return Err(ErrorKind::ConnectionReset);
                    }
                    self.publishes_left = self.publishes_left.map(|n| n - 1);
                    // Packet id: after the 2-byte fixed header and the topic.
                    let topic_len = usize::from(packet[3]);
                    let id = &packet[4 + topic_len..6 + topic_len];
                    self.pending.extend([0x40, 2, id[0], id[1]]);
                }
                _ => {}
            }
            self.log.push(packet);
            Ok(())
        }
    }

    fn config() -> UplinkConfig<'static> {
        UplinkConfig {
            client_id: "n1",
            topic: "sensors/n1",
            keep_alive_s: 60,
            username: None,
            password: None,
            min_backoff_ms: 100,
            max_backoff_ms: 1_000,
            jitter_seed: 5,
        }
    }

    fn payloads(log: &[Vec<u8>]) -> Vec<(bool, u8)> {
        // (dup flag, first payload byte) of each PUBLISH the broker acknowledged.
        log.iter()
            .filter(|p| p[0] >> 4 == 3)
            .map(|p| (p[0] & 0x08 != 0, *p.last().unwrap_or(&0)))
            .collect()
    }

    #[test]
    fn backoff_doubles_with_jitter_up_to_the_cap_and_resets() {
        let mut b = Backoff::new(100, 1_000, 1);
        let delays: Vec<u32> = (0..6).map(|_| b.next_delay_ms()).collect();
        for (d, base) in delays.iter().zip([100, 200, 400, 800, 1_000, 1_000]) {
            assert!((base / 2..=base).contains(d), "{d} for base {base}");
        }
        b.reset();
        assert!(b.next_delay_ms() <= 100);
    }

    #[test]
    fn refused_connections_back_off_then_the_queue_drains_in_order() {
        let mut link = FakeLink::default();
        link.script.extend([None, None, Some(None)]);
        let mut up = Uplink::<_, 4, 16>::new(config(), link);
        for m in [1u8, 2, 3] {
            up.enqueue(&[m]).unwrap();
        }
        block_on(async {
            let LinkState::RetryAt(t1) = up.service(0).await else {
                panic!()
            };
            assert!((50..=100).contains(&t1));
            // Not yet due: no attempt.
            assert_eq!(up.service(t1 - 1).await, LinkState::RetryAt(t1));
            let LinkState::RetryAt(t2) = up.service(t1).await else {
                panic!()
            };
            assert!((t1 + 100..=t1 + 200).contains(&t2), "second delay doubles");
            assert_eq!(up.service(t2).await, LinkState::Idle);
        });
        assert_eq!(up.link_mut().opens, 3);
        assert_eq!(
            payloads(&up.link_mut().log),
            [(false, 1), (false, 2), (false, 3)]
        );
        let c = up.counters();
        assert_eq!((c.published, c.connects, c.connect_failures), (3, 1, 2));
        assert_eq!(up.queued(), 0);
        assert!(matches!(
            up.last_error(),
            Some(UplinkError::Connect("refused"))
        ));
    }

    #[test]
    fn a_lost_connection_keeps_the_unacked_message_and_resends_it_with_dup() {
        let mut link = FakeLink::default();
        link.script.extend([Some(Some(1)), Some(None)]);
        let mut up = Uplink::<_, 4, 16>::new(config(), link);
        for m in [1u8, 2, 3] {
            up.enqueue(&[m]).unwrap();
        }
        block_on(async {
            let LinkState::RetryAt(t) = up.service(0).await else {
                panic!()
            };
            assert_eq!(up.queued(), 2);
            assert_eq!(up.service(t).await, LinkState::Idle);
        });
        // Message 2 was written and then the link broke before its PUBACK: sent again with DUP.
        assert_eq!(
            payloads(&up.link_mut().log),
            [(false, 1), (true, 2), (false, 3)]
        );
        let c = up.counters();
        assert_eq!((c.published, c.resent, c.connection_losses), (3, 1, 1));
    }

    #[test]
    fn offline_the_queue_keeps_the_newest_and_counts_the_dropped() {
        let mut link = FakeLink::default();
        link.script.extend([None, Some(None)]);
        let mut up = Uplink::<_, 3, 16>::new(config(), link);
        let t = block_on(async {
            up.enqueue(&[0]).unwrap();
            let LinkState::RetryAt(t) = up.service(0).await else {
                panic!()
            };
            t
        });
        for m in 1u8..=4 {
            up.enqueue(&[m]).unwrap();
        }
        assert_eq!(up.counters().dropped, 2);
        block_on(up.service(t));
        assert_eq!(
            payloads(&up.link_mut().log),
            [(false, 2), (false, 3), (false, 4)]
        );
    }

    /// Poll `service` once (it stalls on the silent broker), then drop it, as a runtime
    /// timeout would.
    fn cancel_one_round(up: &mut Uplink<'_, FakeLink, 4, 16>, now_ms: i64) {
        use core::future::Future;
        use core::task::{Context, Poll, Waker};
        let mut round = core::pin::pin!(up.service(now_ms));
        let polled = round.as_mut().poll(&mut Context::from_waker(Waker::noop()));
        assert!(matches!(polled, Poll::Pending));
    }

    #[test]
    fn a_round_cancelled_mid_io_drops_that_connection_and_keeps_the_message() {
        let mut up = Uplink::<_, 4, 16>::new(config(), FakeLink::default());
        up.enqueue(&[7]).unwrap();
        // Cancelled while waiting for the CONNACK: a failed attempt, with backoff.
        up.link_mut().stall = true;
        cancel_one_round(&mut up, 0);
        up.link_mut().stall = false;
        let LinkState::RetryAt(t) = block_on(up.service(1)) else {
            panic!("a cancelled connect is a failed attempt")
        };
        assert_eq!(up.counters().connect_failures, 1);
        assert_eq!(up.link_mut().opens, 1);
        assert_eq!(block_on(up.service(t)), LinkState::Idle);
        assert_eq!(payloads(&up.link_mut().log), [(false, 7)]);

        // Connected; cancelled while waiting for the PUBACK: the connection is dropped and the
        // message is sent again, with DUP, on the next one.
        up.enqueue(&[8]).unwrap();
        up.link_mut().stall = true;
        cancel_one_round(&mut up, t + 1);
        up.link_mut().stall = false;
        let LinkState::RetryAt(t2) = block_on(up.service(t + 2)) else {
            panic!("the cancelled connection is dropped")
        };
        assert_eq!(up.counters().connection_losses, 1);
        assert_eq!(up.queued(), 1);
        assert_eq!(block_on(up.service(t2)), LinkState::Idle);
        assert_eq!(
            payloads(&up.link_mut().log),
            [(false, 7), (false, 8), (true, 8)]
        );
    }

    #[test]
    fn an_idle_connection_pings_at_half_the_keep_alive() {
        let mut up = Uplink::<_, 2, 8>::new(config(), FakeLink::default());
        let pings = |up: &mut Uplink<'_, FakeLink, 2, 8>| {
            up.link_mut()
                .log
                .iter()
                .filter(|p| p[..] == [0xC0, 0])
                .count()
        };
        block_on(async {
            assert_eq!(up.service(0).await, LinkState::Idle);
            assert_eq!(up.service(29_999).await, LinkState::Idle);
            assert_eq!(pings(&mut up), 0);
            assert_eq!(up.service(30_000).await, LinkState::Idle);
            assert_eq!(pings(&mut up), 1);
            assert_eq!(up.service(30_001).await, LinkState::Idle);
            assert_eq!(pings(&mut up), 1);
        });
        assert!(up.is_connected());
        assert_eq!(up.counters().connects, 1);
    }
}
