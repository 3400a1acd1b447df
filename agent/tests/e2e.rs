//! End to end on loopback: a real broker, the agent, a real receiver on SQLite.
//!
//! Each test publishes a known set of readings and asserts the exact summaries stored at the
//! receiver, under normal operation, with the receiver down, and across agent restarts; and that
//! text and boolean readings reach the receiver's `/v1/latest`.

mod common;

use std::net::SocketAddr;

use common::*;
use edgewise_agent::Agent;
use edgewise_agent::config::MqttProtocol;
use edgewise_cloud::Receiver;
use rumqttc::QoS;

/// Aligned to a 10 s window boundary.
const T0: i64 = 1_700_000_000_000;

/// Two nodes, two windows each, known statistics, plus an out-of-range reading.
fn known_readings(setup: &Setup) -> Vec<(String, Vec<u8>)> {
    let mut m = Vec::new();
    for (node, base) in [("n1", 20.0), ("n2", 10.0)] {
        for i in 0..5 {
            // window 0: base + 0..4, window 1: base + 10..14
            m.push((
                setup.topic(node),
                temperature(node, T0 + i * 1000, base + i as f64),
            ));
            m.push((
                setup.topic(node),
                temperature(node, T0 + 10_000 + i * 1000, base + 10.0 + i as f64),
            ));
        }
    }
    m.push((setup.topic("n1"), temperature("n1", T0 + 500, 1000.0)));
    m
}

fn assert_known_summaries(setup: &Setup) {
    let stored = setup.cloud.stored();
    let got: Vec<(String, i64, u64, f64, f64, f64)> = stored
        .iter()
        .map(|s| {
            let s = &s.summary;
            (
                s.stream.clone(),
                s.window_start_ms - T0,
                s.count,
                s.min,
                s.max,
                s.mean,
            )
        })
        .collect();
    assert_eq!(
        got,
        vec![
            ("n1/temperature".to_string(), 0, 5, 20.0, 24.0, 22.0),
            ("n1/temperature".to_string(), 10_000, 5, 30.0, 34.0, 32.0),
            ("n2/temperature".to_string(), 0, 5, 10.0, 14.0, 12.0),
            ("n2/temperature".to_string(), 10_000, 5, 20.0, 24.0, 22.0),
        ]
    );
    for s in &stored {
        assert!((s.summary.stddev - 2f64.sqrt()).abs() < 1e-12);
        assert_eq!(s.summary.revision, 0);
        assert_eq!(s.summary.unit.as_deref(), Some("Cel"));
    }
}

/// A receiver on a free port, and an agent syncing to it, subscribed to the broker.
async fn agent_and_receiver(setup: &Setup) -> (Agent, Receiver) {
    let receiver = setup.cloud.start(free_addr()).await;
    let agent = Agent::start(setup.agent_config(receiver.local_addr()))
        .await
        .unwrap();
    subscribed(&agent).await;
    (agent, receiver)
}

/// The known readings through an agent with `connections` connections speaking `protocol`:
/// every reading counted once, every message acked once, the exact summaries at the cloud.
async fn delivered_exactly_once(connections: usize, protocol: MqttProtocol) {
    let setup = Setup::new();
    let receiver = setup.cloud.start(free_addr()).await;
    let mut cfg = setup.agent_config(receiver.local_addr());
    cfg.mqtt.connections = connections;
    cfg.mqtt.protocol = protocol;
    let agent = Agent::start(cfg).await.unwrap();
    subscribed_on(&agent, connections as u64).await;
    assert_eq!(agent.metrics().mqtt_connected.get(), connections as u64);

    publish_all(&setup.broker, &known_readings(&setup)).await;
    let m = agent.metrics().clone();
    wait_until(15, "4 summaries synced", || m.summaries_synced.get() == 4).await;

    assert_eq!(m.readings_accepted.get(), 20);
    assert_eq!(m.readings_rejected.get("duplicate"), 0);
    assert_eq!(m.readings_rejected.get("out_of_range"), 1);
    assert_eq!(m.acks_sent.get(), 21);
    assert_known_summaries(&setup);
    agent.stop().await;
    assert_eq!(m.mqtt_connected.get(), 0);
    receiver.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn known_readings_become_exact_summaries_at_the_cloud() {
    delivered_exactly_once(1, MqttProtocol::V311).await;
}

/// Three connections holding shared subscriptions: the broker splits the messages between
/// them and each is delivered, acked and counted once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_shared_connections_deliver_every_reading_exactly_once() {
    delivered_exactly_once(3, MqttProtocol::V311).await;
}

/// MQTT 5, one connection and three: every reading once, each message acked once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt5_connections_deliver_every_reading_exactly_once() {
    if external_broker("mqtt5_connections_deliver_every_reading_exactly_once") {
        delivered_exactly_once(1, MqttProtocol::V5).await;
        delivered_exactly_once(3, MqttProtocol::V5).await;
    }
}

/// The MQTT 5 session outlives the agent: messages delivered but not acked before a crash, and
/// messages published while it was down, come to the next run (the session expiry interval is
/// set; without it the broker drops the session, and those messages, at the disconnect).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt5_agent_crashed_mid_window_loses_nothing_it_acked_or_missed() {
    if external_broker("mqtt5_agent_crashed_mid_window_loses_nothing_it_acked_or_missed") {
        interrupted_mid_window(
            Interruption::Crash,
            1,
            MqttProtocol::V5,
            SecondHalf::WhileDown,
        )
        .await;
    }
}

/// The receive maximum reaches the broker: with no acks, Mosquitto sends an MQTT 5 connection
/// exactly `receive_maximum` QoS 1 messages (an MQTT 3.1.1 one gets its
/// `max_inflight_messages`, 20 by default), and the rest once they are acked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt5_receive_maximum_sets_how_many_messages_wait_for_their_ack() {
    if !external_broker("mqtt5_receive_maximum_sets_how_many_messages_wait_for_their_ack") {
        return;
    }
    const MESSAGES: usize = 120;
    for receive_maximum in [50u16, 200] {
        let setup = Setup::new();
        let mut cfg = setup.agent_config(free_addr());
        cfg.mqtt.protocol = MqttProtocol::V5;
        cfg.mqtt.receive_maximum = receive_maximum;
        let before_acks =
            messages_before_any_ack(&setup, &cfg, &setup.broker, MESSAGES, QoS::AtLeastOnce).await;
        let unacked = usize::from(receive_maximum).min(MESSAGES);
        assert_eq!(before_acks, unacked, "receive maximum {receive_maximum}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_embedded_broker_sends_its_in_flight_window_before_any_ack() {
    use edgewise_agent::broker::MAX_INFLIGHT;
    // The vendored rumqttd's window (vendor/README.md), where rumqttd 0.20 has 100.
    assert_eq!(
        embedded_before_any_ack(MAX_INFLIGHT + 200, QoS::AtLeastOnce).await,
        MAX_INFLIGHT
    );
}

/// MQTT: a subscriber gets a publish at the lower of the publish's QoS and its subscription's.
/// The agent subscribes with QoS 1; rumqttd 0.20 sent it QoS 0 publishes as QoS 1, inside its
/// in-flight window, waiting for acks nobody needed (vendor/README.md).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_embedded_broker_sends_qos_0_publishes_at_qos_0_outside_its_window() {
    use edgewise_agent::broker::MAX_INFLIGHT;
    assert_eq!(
        embedded_before_any_ack(MAX_INFLIGHT + 200, QoS::AtMostOnce).await,
        MAX_INFLIGHT + 200
    );
}

/// [`messages_before_any_ack`] against an embedded broker of its own.
async fn embedded_before_any_ack(messages: usize, qos: QoS) -> usize {
    use edgewise_agent::broker::EmbeddedBroker;
    let broker = EmbeddedBroker::start(([127, 0, 0, 1], 0).into(), 1 << 20).unwrap();
    let setup = Setup::new();
    let mut cfg = setup.agent_config(free_addr());
    cfg.mqtt.url = format!("mqtt://{}", broker.addr);
    let to = (broker.addr.ip().to_string(), broker.addr.port());
    messages_before_any_ack(&setup, &cfg, &to, messages, qos).await
}

/// Connects one agent connection with `cfg` (it subscribes with QoS 1), publishes `messages`
/// readings at `qos` to `broker` and returns how many arrived while none was acked; then acks
/// them one by one and checks that the rest arrive, each once, and that each arrived at `qos`;
/// then that a new connection of the same session gets none again (every ack reached the
/// broker).
async fn messages_before_any_ack(
    setup: &Setup,
    cfg: &edgewise_agent::config::AgentConfig,
    broker: &(String, u16),
    messages: usize,
    qos: QoS,
) -> usize {
    use std::time::Duration;
    // Room for all: a full channel would stop the connection reading and hide the broker's limit.
    let (connection, mut rx) = Listening::start(cfg, 2 * messages).await;
    let sent: Vec<(String, Vec<u8>)> = (0..messages)
        .map(|i| (setup.topic("n1"), temperature("n1", T0 + i as i64, 20.0)))
        .collect();
    publish_all_at(broker, &sent, qos).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before_acks = rx.len();

    // Acked, the rest follow, each once.
    let mut got = 0;
    while got < messages {
        let d = tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .expect("the broker sent the rest after the acks")
            .expect("the connection is running");
        assert_eq!(d.message.qos, qos, "message {got}");
        connection.client.ack(&d.message).await.unwrap();
        got += 1;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(rx.is_empty(), "nothing is delivered twice");
    connection.stop().await;

    let (again, rx) = Listening::start(cfg, 16).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        rx.is_empty(),
        "the broker had every ack: it sent nothing again"
    );
    again.stop().await;
    before_acks
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receiver_down_for_part_of_the_run_loses_and_duplicates_nothing() {
    let setup = Setup::new();
    let cloud_addr = free_addr(); // nothing listens here yet
    let agent = Agent::start(setup.agent_config(cloud_addr)).await.unwrap();
    subscribed(&agent).await;

    publish_all(&setup.broker, &known_readings(&setup)).await;
    let m = agent.metrics().clone();
    wait_until(15, "4 windows closed and upload failing", || {
        m.windows_closed.get() == 4 && m.sync_failures.get() >= 2
    })
    .await;
    assert_eq!(m.summaries_synced.get(), 0);
    assert!(setup.cloud.stored().is_empty());

    let receiver = setup.cloud.start(cloud_addr).await;
    wait_until(15, "the outbox drained", || {
        m.summaries_synced.get() == 4 && m.outbox_rows.get() == 0
    })
    .await;
    assert_known_summaries(&setup);
    agent.stop().await;
    receiver.stop().await;
}

/// How the first agent run ends, mid-window.
#[derive(Clone, Copy)]
enum Interruption {
    /// `Agent::stop`: the batch in hand is committed and acked.
    CleanStop,
    /// Every task aborted at once: acks in flight are lost, so the broker redelivers messages
    /// that are already journaled, and they must not be counted twice.
    Crash,
}

/// When the second half of the readings is published.
#[derive(Clone, Copy, PartialEq)]
enum SecondHalf {
    /// Once the second agent has subscribed.
    AfterRestart,
    /// Between the runs: the broker holds it in the agent's persistent session.
    WhileDown,
}

/// Publishes half of the readings, interrupts the agent, starts a new one on the same
/// database and session, publishes the rest (`second_half` says when), and checks the exact
/// summaries at the cloud.
async fn interrupted_mid_window(
    how: Interruption,
    connections: usize,
    protocol: MqttProtocol,
    second_half: SecondHalf,
) {
    let setup = Setup::new();
    let receiver = setup.cloud.start(free_addr()).await;
    let mut cfg = setup.agent_config(receiver.local_addr());
    cfg.mqtt.connections = connections;
    cfg.mqtt.protocol = protocol;
    let all = known_readings(&setup);
    let (first, second) = all.split_at(all.len() / 2);

    // First run: the idle timeout is far away, so every window is still open when it ends.
    let mut long_idle = cfg.clone();
    long_idle.window.idle_timeout_ms = 600_000;
    let agent = Agent::start(long_idle).await.unwrap();
    subscribed_on(&agent, connections as u64).await;
    publish_all(&setup.broker, first).await;
    let m = agent.metrics().clone();
    match how {
        Interruption::CleanStop => {
            let n = first.len() as u64;
            wait_until(10, "the first half acked", || m.acks_sent.get() == n).await;
            // The ingest loop's steps were timed.
            assert!(m.ingest_busy_us.get() > 0);
            agent.stop().await;
        }
        Interruption::Crash => {
            wait_until(10, "some readings journaled", || {
                m.journal_commits.get() >= 1
            })
            .await;
            agent.abort();
        }
    }

    // Second run: rebuilt from the journal, receives the rest (and any redeliveries).
    if second_half == SecondHalf::WhileDown {
        publish_all(&setup.broker, second).await;
    }
    let agent = Agent::start(cfg).await.unwrap();
    subscribed_on(&agent, connections as u64).await;
    if second_half == SecondHalf::AfterRestart {
        publish_all(&setup.broker, second).await;
    }
    wait_until(15, "4 summaries stored", || setup.cloud.stored().len() == 4).await;
    assert_known_summaries(&setup);
    agent.stop().await;
    receiver.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_restarted_mid_window_still_reports_the_exact_window() {
    interrupted_mid_window(
        Interruption::CleanStop,
        1,
        MqttProtocol::V311,
        SecondHalf::AfterRestart,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_crashed_mid_window_loses_nothing_it_acked() {
    interrupted_mid_window(
        Interruption::Crash,
        1,
        MqttProtocol::V311,
        SecondHalf::AfterRestart,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_with_three_shared_connections_crashed_mid_window_loses_nothing_it_acked() {
    interrupted_mid_window(
        Interruption::Crash,
        3,
        MqttProtocol::V311,
        SecondHalf::AfterRestart,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_payloads_are_counted_dead_lettered_and_survived() {
    let setup = Setup::new();
    let receiver = setup.cloud.start(free_addr()).await;
    let cfg = setup.agent_config(receiver.local_addr());
    let db = cfg.store.path.clone();
    let agent = Agent::start(cfg).await.unwrap();
    subscribed(&agent).await;

    let topic = setup.topic("n1");
    let mut msgs: Vec<(String, Vec<u8>)> = vec![
        (topic.clone(), b"".to_vec()),
        (topic.clone(), b"{not json".to_vec()),
        (topic.clone(), vec![0x9f, 0xff, 0x00, 0x13]),
        (topic.clone(), b"[{\"n\":\"x\",\"v\":\"text\"}]".to_vec()),
        (topic.clone(), vec![0xff; 5000]),
        (
            topic.clone(),
            b"[{\"bn\":\"n1/\",\"n\":\"temperature\",\"v\":1e999}]".to_vec(),
        ),
    ];
    msgs.push((topic.clone(), temperature("n1", T0, 21.0)));
    msgs.push((
        topic.clone(),
        b"{\"value\": 22.0, \"ts\": 1700000001000}".to_vec(),
    ));
    publish_all(&setup.broker, &msgs).await;
    let m = agent.metrics().clone();
    wait_until(10, "every message handled", || {
        m.messages_received.get() == msgs.len() as u64
    })
    .await;
    assert_eq!(m.readings_accepted.get(), 2, "two good readings");
    assert!(m.messages_rejected.total() >= 4, "{}", m.render());
    // The agent is still healthy and serving.
    let health = reqwest::get(format!("http://{}/healthz", agent.http_addr()))
        .await
        .unwrap();
    assert_eq!(health.status(), 200);
    let metrics = reqwest::get(format!("http://{}/metrics", agent.http_addr()))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(metrics.contains("edgewise_agent_messages_rejected_total{reason="));
    agent.stop().await;
    receiver.stop().await;
    let dead = edgewise_agent::store::Store::open(&db, 100)
        .unwrap()
        .dead_letters(100)
        .unwrap();
    assert_eq!(dead.len() as u64, m.messages_rejected.total());
    assert!(
        dead.iter()
            .all(|d| d.topic == topic && !d.reason.is_empty())
    );
}

/// A SenML JSON pack of node `n1` at `time_ms`: its door (`vs`) and alarm (`vb`) states.
fn door_and_alarm(time_ms: i64, door: &str, alarm: bool) -> Vec<u8> {
    format!(
        r#"[{{"bn":"n1/","bt":{},"n":"door","vs":"{door}"}},{{"n":"alarm","vb":{alarm}}}]"#,
        time_ms as f64 / 1000.0
    )
    .into_bytes()
}

/// `GET /v1/latest?device=<DEVICE>` of the receiver: `(stream, time_ms, kind, value)` rows.
async fn served_latest(receiver: SocketAddr) -> Vec<(String, i64, String, serde_json::Value)> {
    let url = format!("http://{receiver}/v1/latest?device={DEVICE}");
    let response = reqwest::get(&url).await.unwrap();
    assert_eq!(response.status(), 200);
    let rows: Vec<serde_json::Value> =
        serde_json::from_str(&response.text().await.unwrap()).unwrap();
    rows.into_iter()
        .map(|r| {
            assert_eq!(r["device_id"], DEVICE);
            (
                r["stream"].as_str().unwrap().to_owned(),
                r["time_ms"].as_i64().unwrap(),
                r["kind"].as_str().unwrap().to_owned(),
                r["value"].clone(),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_and_boolean_readings_are_served_as_latest_values_by_the_receiver() {
    let setup = Setup::new();
    let (agent, receiver) = agent_and_receiver(&setup).await;
    let m = agent.metrics().clone();

    publish_all(
        &setup.broker,
        &[(setup.topic("n1"), door_and_alarm(T0, "open", true))],
    )
    .await;
    wait_until(15, "2 latest values synced", || {
        m.latest_values_synced.get() == 2
    })
    .await;
    let row = |stream: &str, t: i64, kind: &str, value: serde_json::Value| {
        (stream.to_owned(), t, kind.to_owned(), value)
    };
    assert_eq!(
        served_latest(receiver.local_addr()).await,
        [
            row("n1/alarm", T0, "bool", true.into()),
            row("n1/door", T0, "text", "open".into()),
        ]
    );
    assert_eq!(m.readings_accepted.get(), 0, "no number was windowed");

    // A newer state replaces the served one.
    publish_all(
        &setup.broker,
        &[(
            setup.topic("n1"),
            door_and_alarm(T0 + 5_000, "closed", false),
        )],
    )
    .await;
    wait_until(15, "4 latest values synced", || {
        m.latest_values_synced.get() == 4
    })
    .await;
    assert_eq!(
        served_latest(receiver.local_addr()).await,
        [
            row("n1/alarm", T0 + 5_000, "bool", false.into()),
            row("n1/door", T0 + 5_000, "text", "closed".into()),
        ]
    );
    agent.stop().await;
    receiver.stop().await;
}

/// An MQTT 5 agent pointed at a broker that speaks only 3.1.1 (the embedded rumqttd) fails to
/// connect with an error that says what to change.
#[tokio::test]
async fn mqtt5_against_a_broker_without_it_says_so() {
    use edgewise_agent::ingest::{Incoming, connect};
    let broker = edgewise_agent::broker::EmbeddedBroker::start(
        SocketAddr::from(([127, 0, 0, 1], 0)),
        256 * 1024,
    )
    .unwrap();
    let setup = Setup::new();
    let mut cfg = setup.agent_config(free_addr());
    cfg.mqtt.url = format!("mqtt://{}", broker.addr);
    cfg.mqtt.protocol = MqttProtocol::V5;
    let (_client, mut session) = connect(&cfg, 0).unwrap();
    let outcome = tokio::time::timeout(std::time::Duration::from_secs(10), async {
        loop {
            match session.poll().await {
                Ok(Incoming::ConnAck { .. }) => return None,
                Ok(_) => {}
                Err(e) => return Some(e),
            }
        }
    })
    .await
    .expect("an answer within 10 s");
    let err = outcome.expect("the connection fails");
    assert!(
        err.refusal.is_some_and(|why| why.contains("mqtt.protocol")),
        "{err} ({:?})",
        err.refusal
    );
}
