//! Chaos: the real `edgewise-agent` binary is `kill -9`ed again and again while a known sequence
//! of readings flows from a real broker to a real receiver, which is itself taken down for some
//! of the time. At the end, the receiver must hold every reading the data contracts accept in
//! exactly one summary of its window: nothing lost, nothing counted twice.
//!
//! - Kills: `EDGEWISE_CHAOS_KILLS` (default 3; CI runs more, see `.ci/store.sh`). Each run of the
//!   agent is killed at a random moment (uniform up to 1.5 s after start), or right after the
//!   receiver answered an upload (between the cloud's ack and the outbox delete), or while the
//!   receiver is down.
//! - Seed: `EDGEWISE_CHAOS_SEED` (default: time-based; printed so a failure can be replayed).
//! - Broker: the embedded rumqttd, or `EDGEWISE_TEST_MQTT_URL`.
//!
//! The published sequence: `STREAMS` nodes, each message a SenML pack of `PER_MESSAGE` readings
//! 10 ms apart in event time, in order per node; every 23rd reading is out of the contract's
//! range, and every 97th message is not SenML at all. A last far-future reading per node pushes
//! the watermark past every real window so all of them close (those sentinel windows are not
//! checked). Windows are 1 s, so each real window expects exactly the in-range readings sent for
//! it; the receiver's count, mean, min and max must match.

mod common;

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::*;
use edgewise_cloud::Receiver;
use edgewise_protocol::senml::{Record, encode_pack};
use rand::{Rng, SeedableRng};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};

const T0: i64 = 1_700_000_000_000;
const STREAMS: usize = 8;
const PER_MESSAGE: usize = 4;
const STEP_MS: i64 = 10;
const WINDOW_MS: i64 = 1000;
/// Sentinels are this far after the last real reading.
const SENTINEL_AFTER_MS: i64 = 3_600_000;

/// What was published for one window of one stream (in-range readings only).
#[derive(Debug, Default, Clone, Copy)]
struct Expected {
    count: u64,
    sum: f64,
    min: f64,
    max: f64,
}

struct Sequence {
    messages: Vec<(String, Vec<u8>)>,
    sentinels: Vec<(String, Vec<u8>)>,
    expected: BTreeMap<(String, i64), Expected>,
    readings: u64,
    out_of_range: u64,
    malformed: u64,
}

fn node(i: usize) -> String {
    format!("c{i}")
}

fn pack(node: &str, t_ms: i64, values: &[f64]) -> Vec<u8> {
    let recs: Vec<Record<'_>> = values
        .iter()
        .enumerate()
        .map(|(k, v)| Record {
            name: "temperature",
            unit: Some("Cel"),
            value: *v,
            time_offset_s: (k as i64 * STEP_MS) as f64 / 1000.0,
        })
        .collect();
    let mut buf = [0u8; 512];
    let n = encode_pack(&format!("{node}/"), t_ms as f64 / 1000.0, &recs, &mut buf).unwrap();
    buf[..n].to_vec()
}

fn sequence(setup: &Setup, messages_per_stream: usize) -> Sequence {
    let mut seq = Sequence {
        messages: Vec::new(),
        sentinels: Vec::new(),
        expected: BTreeMap::new(),
        readings: 0,
        out_of_range: 0,
        malformed: 0,
    };
    let mut n = 0u64;
    for m in 0..messages_per_stream {
        for s in 0..STREAMS {
            let name = node(s);
            let t = T0 + (m * PER_MESSAGE) as i64 * STEP_MS;
            if (m * STREAMS + s) % 97 == 96 {
                seq.messages
                    .push((setup.topic(&name), b"{\"not\": \"senml\"".to_vec()));
                seq.malformed += 1;
                continue;
            }
            let mut values = Vec::new();
            for k in 0..PER_MESSAGE {
                n += 1;
                let v = if n.is_multiple_of(23) {
                    500.0
                } else {
                    ((n * 7919) % 1000) as f64 / 20.0
                };
                values.push(v);
                seq.readings += 1;
                if v > 85.0 {
                    seq.out_of_range += 1;
                    continue;
                }
                let tk = t + k as i64 * STEP_MS;
                let e = seq
                    .expected
                    .entry((
                        format!("{name}/temperature"),
                        tk.div_euclid(WINDOW_MS) * WINDOW_MS,
                    ))
                    .or_insert(Expected {
                        min: f64::INFINITY,
                        max: f64::NEG_INFINITY,
                        ..Expected::default()
                    });
                e.count += 1;
                e.sum += v;
                e.min = e.min.min(v);
                e.max = e.max.max(v);
            }
            seq.messages
                .push((setup.topic(&name), pack(&name, t, &values)));
        }
    }
    let end = T0 + (messages_per_stream * PER_MESSAGE) as i64 * STEP_MS;
    for s in 0..STREAMS {
        let name = node(s);
        seq.sentinels.push((
            setup.topic(&name),
            pack(&name, end + SENTINEL_AFTER_MS, &[1.0]),
        ));
    }
    seq
}

/// Publishes `messages` with QoS 1 at about `per_second`, counting broker acks.
async fn publish_paced(
    broker: (String, u16),
    messages: Vec<(String, Vec<u8>)>,
    per_second: u64,
    acked: Arc<AtomicU64>,
) {
    let mut opts = MqttOptions::new(unique("chaos-pub"), broker.0, broker.1);
    opts.set_keep_alive(Duration::from_secs(30))
        .set_max_packet_size(1 << 20, 1 << 20);
    let (client, mut eventloop) = AsyncClient::new(opts, 1024);
    let total = messages.len() as u64;
    let counter = acked.clone();
    let poller = tokio::spawn(async move {
        while counter.load(Ordering::Relaxed) < total {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::PubAck(_))) => {
                    counter.fetch_add(1, Ordering::Relaxed);
                }
                Ok(_) => {}
                Err(e) => panic!("publisher connection failed: {e}"),
            }
        }
    });
    let started = Instant::now();
    for (i, (topic, payload)) in messages.into_iter().enumerate() {
        let due = Duration::from_secs_f64(i as f64 / per_second as f64);
        if let Some(wait) = due.checked_sub(started.elapsed()) {
            tokio::time::sleep(wait).await;
        }
        client
            .publish(topic, QoS::AtLeastOnce, false, payload)
            .await
            .unwrap();
    }
    tokio::time::timeout(Duration::from_secs(60), poller)
        .await
        .expect("the broker acked every publish")
        .unwrap();
    let _ = client.disconnect().await;
}

fn write_config(setup: &Setup, cloud: std::net::SocketAddr, client_id: &str) -> PathBuf {
    let text = format!(
        r#"
agent_id = "{DEVICE}"
[mqtt]
url = "mqtt://{}:{}"
client_id = "{client_id}"
topics = ["{}/#"]
reconnect_max_backoff_ms = 300
[store]
path = "{}"
[window]
window_seconds = 1
allowed_lateness_ms = 5000
idle_timeout_ms = 600000
[[filter]]
stream = "+/temperature"
min = -40.0
max = 85.0
[sync]
url = "http://{cloud}"
token = "{}"
batch_max_summaries = 200
interval_ms = 50
backoff_initial_ms = 50
backoff_max_ms = 300
timeout_ms = 2000
[http]
listen = "127.0.0.1:0"
"#,
        setup.broker.0,
        setup.broker.1,
        setup.topic_root,
        setup.dir.path().join("agent.db").display(),
        setup.cloud.token,
    );
    let path = setup.dir.path().join("agent.toml");
    std::fs::write(&path, text).unwrap();
    path
}

fn spawn_agent(config: &Path, log: &Path) -> Child {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap();
    Command::new(env!("CARGO_BIN_EXE_edgewise-agent"))
        .args(["run", "--config"])
        .arg(config)
        .env(
            "RUST_LOG",
            std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("starting edgewise-agent")
}

fn kill9(child: &mut Child) {
    // std's Child::kill sends SIGKILL on Unix.
    let _ = child.kill();
    let _ = child.wait();
}

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[derive(Debug, Default)]
struct KillStats {
    random: u64,
    after_upload: u64,
    during_outage: u64,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_at_random_moments_loses_and_duplicates_nothing() {
    let kills = env_u64("EDGEWISE_CHAOS_KILLS", 3);
    let seed = env_u64(
        "EDGEWISE_CHAOS_SEED",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
    );
    println!("chaos: kills={kills} seed={seed}");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let setup = Setup::new();
    let cloud_addr = free_addr();
    let mut receiver: Option<Receiver> = Some(setup.cloud.start(cloud_addr).await);
    let mut receiver_stats = (0u64, 0u64, 0u64); // inserted, duplicates, revised
    let config = write_config(&setup, cloud_addr, &unique("chaos-agent"));
    let log = setup.dir.path().join("agent.log");

    // About 0.8 s of agent life per kill; publish over roughly that long at 400 msgs/s.
    let messages_per_stream = ((kills.max(3) * 320) / STREAMS as u64).max(40) as usize;
    let seq = sequence(&setup, messages_per_stream);
    let published = Arc::new(AtomicU64::new(0));

    // The first run subscribes (creating the persistent session) before anything is published.
    let mut child = spawn_agent(&config, &log);
    let publishing_done = Arc::new(AtomicBool::new(false));
    tokio::time::sleep(Duration::from_millis(700)).await;
    let publisher = {
        let (broker, messages, acked, done) = (
            setup.broker.clone(),
            seq.messages.clone(),
            published.clone(),
            publishing_done.clone(),
        );
        tokio::spawn(async move {
            publish_paced(broker, messages, 400, acked).await;
            done.store(true, Ordering::Relaxed);
        })
    };

    let mut stats = KillStats::default();
    let started = Instant::now();
    for k in 0..kills {
        let mode = rng.random_range(0..10u32);
        if k > 0 {
            child = spawn_agent(&config, &log);
        }
        match mode {
            // Receiver down while this run lives; it comes back after the kill.
            0..=1 => {
                if let Some(r) = receiver.take() {
                    let s = r.metrics().snapshot();
                    receiver_stats.0 += s.summaries_inserted;
                    receiver_stats.1 += s.summaries_duplicate;
                    receiver_stats.2 += s.summaries_revised;
                    r.stop().await;
                }
                tokio::time::sleep(Duration::from_millis(rng.random_range(100..1200))).await;
                kill9(&mut child);
                stats.during_outage += 1;
            }
            // Right after the receiver answered an upload: the outbox delete races the kill.
            2..=4 if receiver.is_some() => {
                let r = receiver.as_ref().unwrap().metrics_handle();
                let before = r.snapshot().ingest_requests_2xx;
                let deadline = Instant::now() + Duration::from_secs(3);
                while r.snapshot().ingest_requests_2xx == before && Instant::now() < deadline {
                    tokio::time::sleep(Duration::from_micros(200)).await;
                }
                kill9(&mut child);
                stats.after_upload += 1;
            }
            _ => {
                tokio::time::sleep(Duration::from_millis(rng.random_range(0..1500))).await;
                kill9(&mut child);
                stats.random += 1;
            }
        }
        if receiver.is_none() && mode > 1 {
            receiver = Some(setup.cloud.start(cloud_addr).await);
        }
        if mode <= 1 && rng.random_bool(0.5) {
            receiver = Some(setup.cloud.start(cloud_addr).await);
        }
    }
    if receiver.is_none() {
        receiver = Some(setup.cloud.start(cloud_addr).await);
    }
    let chaos_secs = started.elapsed().as_secs_f64();

    // Last run: no more kills. Finish publishing, then push every real window closed.
    let mut child = spawn_agent(&config, &log);
    tokio::time::timeout(Duration::from_secs(120), publisher)
        .await
        .expect("publishing finished")
        .unwrap();
    assert!(publishing_done.load(Ordering::Relaxed));
    publish_all(&setup.broker, &seq.sentinels).await;

    let expected_windows = seq.expected.len();
    let deadline = Instant::now() + Duration::from_secs(120);
    let stored = loop {
        let stored: Vec<_> = setup
            .cloud
            .stored()
            .into_iter()
            .filter(|s| s.summary.window_start_ms < T0 + SENTINEL_AFTER_MS)
            .collect();
        if stored.len() >= expected_windows {
            break stored;
        }
        assert!(
            Instant::now() < deadline,
            "only {} of {expected_windows} windows reached the receiver (agent log: {})",
            stored.len(),
            log.display()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };

    // SIGTERM: a clean exit within a few seconds.
    let term_at = Instant::now();
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(
            term_at.elapsed() < Duration::from_secs(8),
            "agent did not exit within 8 s of SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let term_secs = term_at.elapsed().as_secs_f64();
    assert!(status.success(), "agent exited with {status}");
    if let Some(r) = receiver.take() {
        let s = r.metrics().snapshot();
        receiver_stats.0 += s.summaries_inserted;
        receiver_stats.1 += s.summaries_duplicate;
        receiver_stats.2 += s.summaries_revised;
        r.stop().await;
    }

    // The verdict, window by window.
    let mut lost = 0u64;
    let mut duplicated = 0u64;
    let mut wrong = Vec::new();
    let mut seen = BTreeMap::new();
    for s in &stored {
        let w = &s.summary;
        *seen.entry(w.id()).or_insert(0u32) += 1;
        let key = (w.stream.clone(), w.window_start_ms);
        let Some(e) = seq.expected.get(&key) else {
            duplicated += w.count;
            wrong.push(format!("unexpected window {key:?} count {}", w.count));
            continue;
        };
        if w.count < e.count {
            lost += e.count - w.count;
        } else {
            duplicated += w.count - e.count;
        }
        let mean = e.sum / e.count as f64;
        if w.count != e.count
            || w.min != e.min
            || w.max != e.max
            || (w.mean - mean).abs() > 1e-9 * mean.abs().max(1.0)
            || w.revision != 0
        {
            wrong.push(format!(
                "{key:?}: got count {} min {} max {} mean {} rev {}, expected count {} min {} max {} mean {mean}",
                w.count, w.min, w.max, w.mean, w.revision, e.count, e.min, e.max
            ));
        }
    }
    for (key, e) in &seq.expected {
        if !stored
            .iter()
            .any(|s| s.summary.stream == key.0 && s.summary.window_start_ms == key.1)
        {
            lost += e.count;
            wrong.push(format!("missing window {key:?} ({} readings)", e.count));
        }
    }
    let twice = seen.values().filter(|&&n| n > 1).count();
    let accounted: u64 = stored.iter().map(|s| s.summary.count).sum();
    let expected_readings: u64 = seq.expected.values().map(|e| e.count).sum();

    let agent_db =
        edgewise_agent::store::Store::open(&setup.dir.path().join("agent.db"), 10).unwrap();
    let pending_gaps = agent_db.pending_gaps().unwrap();
    let report = format!(
        "chaos report: seed {seed}, {kills} kills ({} random, {} right after an upload, {} during a receiver outage) in {chaos_secs:.1} s\n\
         messages published (broker-acked) {} of {} ({} not SenML)\n\
         readings published {}, rejected by contract {}, expected {expected_readings}, accounted at the receiver {accounted}\n\
         lost {lost}, duplicated {duplicated}, windows {} of {expected_windows}, summary ids stored twice {twice}\n\
         receiver: {} inserted, {} duplicate re-sends absorbed, {} revised; agent exited {term_secs:.2} s after SIGTERM",
        stats.random,
        stats.after_upload,
        stats.during_outage,
        published.load(Ordering::Relaxed),
        seq.messages.len(),
        seq.malformed,
        seq.readings,
        seq.out_of_range,
        stored.len(),
        receiver_stats.0,
        receiver_stats.1,
        receiver_stats.2,
    );
    println!("{report}");
    if let Ok(path) = std::env::var("EDGEWISE_CHAOS_REPORT")
        && let Ok(mut f) = std::fs::File::create(path)
    {
        let _ = writeln!(f, "{report}");
    }
    assert!(wrong.is_empty(), "{report}\n{}", wrong.join("\n"));
    assert_eq!((lost, duplicated, twice), (0, 0, 0), "{report}");
    assert_eq!(accounted, seq.readings - seq.out_of_range);
    assert_eq!(receiver_stats.2, 0, "no window was ever revised");
    assert!(
        pending_gaps.is_empty(),
        "no eviction was expected: {pending_gaps:?}"
    );
}
