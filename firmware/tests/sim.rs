//! The simulator against a real MQTT broker (embedded rumqttd, or `EDGEWISE_TEST_MQTT_URL`): a
//! subscriber on the run's topics must receive exactly what the simulator counted.

mod common;

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use common::{BrokerAddr, Proxy, Subscriber, broker, free_port, unique};
use edgewise_firmware::sim::{
    Faults, SIM_METRICS, SimConfig, SimError, SimReport, Simulator, TrafficFaults,
};

const START_MS: i64 = 1_700_000_000_000;
const LATE_BY_MS: i64 = 3_600_000;

fn config(broker: &BrokerAddr, topic_prefix: &str) -> SimConfig {
    SimConfig {
        broker_host: broker.host.clone(),
        broker_port: broker.port,
        nodes: 30,
        interval_us: 100_000,
        connections: 3,
        qos: 1,
        client_id_prefix: unique("sim"),
        topic_prefix: topic_prefix.to_string(),
        seed: 11,
        start_time_ms: Some(START_MS),
        drain_timeout_ms: 10_000,
        ..SimConfig::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_receives_exactly_what_the_simulator_counted() {
    let broker = broker();
    let prefix = format!("edgewise-test/{}/sensors", unique("run"));
    let sub = Subscriber::start(&broker, &format!("{prefix}/#")).await;

    let faults = Faults {
        out_of_range: 0.1,
        malformed: 0.1,
        late: 0.1,
        late_by_ms: LATE_BY_MS,
    };
    let sim = Simulator::new(SimConfig {
        faults,
        ..config(&broker, &prefix)
    })
    .unwrap();
    let counters = sim.counters();
    let report = sim
        .run(tokio::time::sleep(Duration::from_millis(1_500)))
        .await
        .unwrap();
    assert_eq!(counters.snapshot(), report);

    // 30 nodes * 10 packs/s * 1.5 s, give or take scheduling: a real run, with every fault kind.
    assert!(report.messages_published >= 150, "{report}");
    assert_eq!(report.messages_acked, report.messages_published);
    assert!(
        report.malformed_messages > 0 && report.out_of_range_readings > 0,
        "{report}"
    );
    assert!(report.late_readings > 0, "{report}");
    assert_eq!(report.connection_errors, 0);

    let received = sub.collect(report.messages_published as usize).await;
    let mut readings = 0;
    let mut out_of_range = 0;
    let mut late = 0;
    let mut malformed = 0;
    let mut bytes = 0;
    let mut per_node: HashMap<String, u64> = HashMap::new();
    for r in &received {
        bytes += r.payload.len() as u64;
        let node = r
            .topic
            .strip_prefix(&format!("{prefix}/"))
            .expect("topic under the prefix");
        *per_node.entry(node.to_string()).or_default() += 1;
        let Some((bn, bt, values)) = &r.pack else {
            malformed += 1;
            continue;
        };
        assert_eq!(bn, &format!("{node}/"));
        assert_eq!(values.len(), SIM_METRICS.len());
        readings += values.len() as u64;
        if *bt < START_MS - LATE_BY_MS / 2 {
            late += values.len() as u64;
            assert!(*bt >= START_MS - LATE_BY_MS, "bt {bt}");
        } else {
            assert!(
                (START_MS..START_MS + 60_000).contains(bt),
                "event time {bt}"
            );
        }
        for (v, m) in values.iter().zip(SIM_METRICS.iter()) {
            let (lo, hi) = m.waveform.bounds();
            if *v == m.out_of_range_value {
                out_of_range += 1;
            } else {
                assert!((lo..=hi).contains(v), "{} = {v}", m.name);
            }
        }
    }
    assert_eq!(received.len() as u64, report.messages_published);
    assert_eq!(readings, report.readings_published);
    assert_eq!(malformed, report.malformed_messages);
    assert_eq!(out_of_range, report.out_of_range_readings);
    assert_eq!(late, report.late_readings);
    assert_eq!(bytes, report.payload_bytes);
    assert_eq!(per_node.len(), 30, "every node published");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qos0_runs_deliver_every_message_too() {
    let (report, received) = run_and_collect("qos0", 800, |c| SimConfig {
        nodes: 10,
        qos: 0,
        connections: 2,
        ..c
    })
    .await;
    assert!(report.messages_published >= 40, "{report}");
    assert_eq!(report.messages_acked, 0, "QoS 0 is not acknowledged");
    assert_eq!(report.readings_published, 2 * report.messages_published);
    assert_eq!(received.len() as u64, report.messages_published);
    assert!(received.iter().all(|r| r.pack.is_some()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interval_of_a_fraction_of_a_millisecond_keeps_its_rate_in_event_time() {
    // 2.5 ms: event times are whole milliseconds, so a node's packs step by 2 or 3 ms, 2.5 on
    // average (with whole milliseconds only, 2 or 3 ms were the nearest rates).
    let (report, received) = run_and_collect("frac", 600, |c| SimConfig {
        nodes: 4,
        interval_us: 2_500,
        connections: 2,
        ..c
    })
    .await;
    let times = times_by_node(&received);
    assert_eq!(times.len(), 4, "{report}");
    for (node, t) in &times {
        assert!(t.len() >= 40, "{node}: only {} packs: {report}", t.len());
        let steps: HashSet<i64> = t.windows(2).map(|w| w[1] - w[0]).collect();
        assert!(
            steps.is_subset(&HashSet::from([2, 3])),
            "{node}: steps {steps:?}"
        );
        // n intervals of 2.5 ms span 2.5 n ms, give or take the rounding of both ends.
        let (n, span) = (t.len() as i64 - 1, t[t.len() - 1] - t[0]);
        assert!(
            (span * 2 - n * 5).abs() <= 2,
            "{node}: {n} intervals in {span} ms"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publisher_that_falls_behind_keeps_each_nodes_event_times_one_interval_apart() {
    // 2,000 nodes every millisecond (2,000,000 packs/s): far more than one publisher can send,
    // even in a release build, so it publishes back to back, ever further behind its schedule.
    let run_ms = 400;
    let (report, received) = run_and_collect("behind", run_ms, |c| SimConfig {
        nodes: 2_000,
        interval_us: 1_000,
        connections: 2,
        ..c
    })
    .await;
    assert!(
        report.messages_published < 2_000 * run_ms / 2,
        "the publisher kept up, so this test shows nothing: {report}"
    );
    let times = times_by_node(&received);
    for (node, t) in &times {
        // Each connection keeps its nodes' order, and each pack of a node has its own slot: times
        // rise by a whole number of intervals (one, unless the broker dropped packs of this QoS 0
        // subscription under load), never repeat and never go back.
        let bad = t.windows(2).position(|w| w[1] <= w[0]);
        assert!(
            bad.is_none(),
            "{node}: times repeat or go back at {bad:?}: {:?}",
            &t[bad.unwrap_or(0).saturating_sub(5)..t.len().min(bad.unwrap_or(0) + 5)]
        );
    }
    assert!(
        times.values().map(Vec::len).sum::<usize>() > 0,
        "no packs received"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qos1_publishes_survive_dropped_connections() {
    let broker = broker();
    let proxy = Proxy::start(&broker).await;
    let prefix = format!("edgewise-test/{}/sensors", unique("cut"));
    let sub = Subscriber::start(&broker, &format!("{prefix}/#")).await;

    let via_proxy = BrokerAddr {
        host: "127.0.0.1".into(),
        port: proxy.port,
    };
    let faults = Faults {
        malformed: 0.1,
        ..Faults::default()
    };
    let cfg = SimConfig {
        faults,
        ..config(&via_proxy, &prefix)
    };
    let stop = async {
        for _ in 0..2 {
            tokio::time::sleep(Duration::from_millis(500)).await;
            assert_eq!(
                proxy.cut(),
                3,
                "one proxied connection per simulator connection"
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let report = Simulator::new(cfg).unwrap().run(stop).await.unwrap();
    assert!(report.connection_errors >= 3, "{report}");
    assert_eq!(report.messages_acked, report.messages_published);

    // At least once: every message arrives, some possibly twice (acks lost in the cut).
    let received = sub.collect(report.messages_published as usize).await;
    let distinct: HashSet<(&str, &[u8])> = received
        .iter()
        .map(|r| (r.topic.as_str(), r.payload.as_slice()))
        .collect();
    let malformed = received.iter().filter(|r| r.pack.is_none()).count() as u64;
    assert!(malformed >= report.malformed_messages, "{report}");
    assert_eq!(distinct.len() as u64, report.messages_published, "{report}");
}

/// One run with traffic faults; returns the report and what the subscriber received.
async fn traffic_run(traffic: TrafficFaults) -> (SimReport, Vec<common::Received>) {
    let (report, received) = run_and_collect("traffic", 1_000, |c| SimConfig {
        nodes: 10,
        connections: 2,
        traffic,
        ..c
    })
    .await;
    assert_eq!(report.messages_acked, report.messages_published);
    // Exactly the published messages arrive, none of the dropped ones.
    assert_eq!(received.len() as u64, report.messages_published, "{report}");
    (report, received)
}

/// Runs the simulator for `run_ms` with [`config`] changed by `shape`, on fresh topics named
/// after `tag`, and returns its report and what a subscriber to those topics received.
async fn run_and_collect(
    tag: &str,
    run_ms: u64,
    shape: impl FnOnce(SimConfig) -> SimConfig,
) -> (SimReport, Vec<common::Received>) {
    let broker = broker();
    let prefix = format!("edgewise-test/{}/sensors", unique(tag));
    let sub = Subscriber::start(&broker, &format!("{prefix}/#")).await;
    let report = Simulator::new(shape(config(&broker, &prefix)))
        .unwrap()
        .run(tokio::time::sleep(Duration::from_millis(run_ms)))
        .await
        .unwrap();
    let received = sub.collect(report.messages_published as usize).await;
    (report, received)
}

/// Each node's pack base times, in the order they arrived.
fn times_by_node(received: &[common::Received]) -> HashMap<String, Vec<i64>> {
    let mut times: HashMap<String, Vec<i64>> = HashMap::new();
    for r in received {
        let (bn, bt, _) = r.pack.as_ref().expect("a well-formed pack");
        times.entry(bn.clone()).or_default().push(*bt);
    }
    times
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drops_and_reordering_reach_the_broker_exactly_as_counted() {
    let (report, received) = traffic_run(TrafficFaults {
        drop: 0.1,
        out_of_order: 0.1,
        ..TrafficFaults::default()
    })
    .await;
    assert!(report.dropped_messages > 0, "{report}");
    assert!(report.out_of_order_messages > 0, "{report}");
    assert_eq!(report.dropped_readings, 2 * report.dropped_messages);
    // Per node, base times go backwards exactly once per held-back message.
    let mut last: HashMap<&str, i64> = HashMap::new();
    let mut backwards = 0;
    for r in &received {
        let (_, bt, _) = r.pack.as_ref().expect("no payload faults in this run");
        if last
            .insert(r.topic.as_str(), *bt)
            .is_some_and(|prev| *bt < prev)
        {
            backwards += 1;
        }
    }
    assert_eq!(backwards, report.out_of_order_messages, "{report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bursts_reach_the_broker_back_to_back_one_interval_apart() {
    let (report, received) = traffic_run(TrafficFaults {
        burst: 0.2,
        burst_size: 4,
        ..TrafficFaults::default()
    })
    .await;
    assert!(report.burst_messages >= 4, "{report}");
    assert_eq!(report.burst_messages % 4, 0, "whole bursts: {report}");
    // A burst: four packs of one node in a row whose base times step by exactly one interval.
    let mut runs = 0;
    for w in received.windows(4) {
        let same_node = w.iter().all(|r| r.topic == w[0].topic);
        let times: Vec<i64> = w
            .iter()
            .map(|r| r.pack.as_ref().map_or(0, |p| p.1))
            .collect();
        if same_node && times.windows(2).all(|t| t[1] - t[0] == 100) {
            runs += 1;
        }
    }
    assert!(runs >= 1, "{report}");
}

#[tokio::test]
async fn an_unreachable_broker_is_a_connect_error_not_a_hang() {
    let port = free_port(); // released: nothing listens there now
    let cfg = SimConfig {
        broker_port: port,
        connect_timeout_ms: 700,
        ..config(
            &BrokerAddr {
                host: "127.0.0.1".into(),
                port,
            },
            "sensors",
        )
    };
    let sim = Simulator::new(cfg).unwrap();
    let counters = sim.counters();
    let err = sim.run(std::future::pending()).await.unwrap_err();
    assert!(
        matches!(
            err,
            SimError::Connect {
                timeout_ms: 700,
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("refused"), "{err}");
    assert!(counters.snapshot().connection_errors >= 1);
    assert_eq!(counters.snapshot().messages_published, 0);
}

#[test]
fn invalid_configs_are_rejected_before_any_io() {
    let cfg = SimConfig {
        nodes: 0,
        ..SimConfig::default()
    };
    assert!(matches!(Simulator::new(cfg), Err(SimError::Config(_))));
}
