//! The durable buffer under faults, end to end with a real broker and a real receiver:
//! a corrupt database on start, the byte cap during a long outage (eviction + gap records), and
//! SIGTERM while an upload hangs.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use edgewise_agent::Agent;

const T0: i64 = 1_700_000_000_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_database_is_moved_aside_and_the_agent_runs_on() {
    let setup = Setup::new();
    let receiver = setup.cloud.start(free_addr()).await;
    let cfg = setup.agent_config(receiver.local_addr());
    std::fs::write(&cfg.store.path, vec![0x42u8; 64 * 1024]).unwrap();

    let agent = Agent::start(cfg.clone()).await.unwrap();
    let m = agent.metrics().clone();
    assert_eq!(m.store_recovered_corrupt.get(), 1);
    let aside: Vec<_> = std::fs::read_dir(setup.dir.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().contains(".corrupt-"))
        .collect();
    assert_eq!(aside.len(), 1, "the corrupt file is kept for inspection");
    assert_eq!(
        std::fs::read(aside[0].path()).unwrap(),
        vec![0x42u8; 64 * 1024]
    );

    // The fresh database works: readings flow, and the cloud learns about the lost buffer.
    subscribed(&agent).await;
    let msgs: Vec<_> = (0..5)
        .map(|i| {
            (
                setup.topic("n1"),
                temperature("n1", T0 + i * 1000, 20.0 + i as f64),
            )
        })
        .collect();
    publish_all(&setup.broker, &msgs).await;
    wait_until(15, "the summary and the gap record synced", || {
        m.summaries_synced.get() == 1 && m.gaps_synced.get() == 1
    })
    .await;
    let stored = setup.cloud.stored();
    assert_eq!(stored.len(), 1);
    assert_eq!(stored[0].summary.count, 5);
    let gaps = setup.cloud.gaps();
    assert_eq!(gaps.len(), 1, "{gaps:?}");
    assert_eq!(gaps[0].reason, "store_corrupt");
    assert_eq!(gaps[0].device_id, DEVICE);
    agent.stop().await;
    receiver.stop().await;

    // A healthy file is not touched on the next start.
    let agent = Agent::start(cfg).await.unwrap();
    assert_eq!(agent.metrics().store_recovered_corrupt.get(), 0);
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_the_cap_plain_summaries_are_evicted_oldest_first_and_the_cloud_gets_the_gap() {
    let setup = Setup::new();
    let cloud_addr = free_addr(); // down for now
    let mut cfg = setup.agent_config(cloud_addr);
    cfg.store.max_buffer_bytes = 64 * 1024;
    let cap = cfg.store.max_buffer_bytes;
    let agent = Agent::start(cfg.clone()).await.unwrap();
    let m = agent.metrics().clone();
    subscribed(&agent).await;

    // 40 streams x 20 windows, one reading each: 800 summaries, about 3x the cap.
    let (streams, windows) = (40, 20);
    let mut msgs = Vec::new();
    for w in 0..windows {
        for s in 0..streams {
            let node = format!("e{s}");
            msgs.push((
                setup.topic(&node),
                temperature(&node, T0 + w * 10_000, 20.0),
            ));
        }
    }
    publish_all(&setup.broker, &msgs).await;
    let total = (streams * windows) as u64;
    wait_until(20, "every window closed", || {
        m.windows_closed.get() == total
    })
    .await;
    assert!(m.buffer_evictions.get() > 0, "{}", m.render());
    assert!(
        m.outbox_bytes.get() <= cap,
        "{} > {cap}",
        m.outbox_bytes.get()
    );
    assert!(m.gaps_recorded.get() >= 1);
    assert_eq!(m.outbox_rows.get() + m.buffer_evictions.get(), total);
    let metrics_text = reqwest::get(format!("http://{}/metrics", agent.http_addr()))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for name in ["buffer_bytes", "buffer_rows", "buffer_evictions_total"] {
        assert!(
            metrics_text.contains(&format!("edgewise_agent_{name} ")),
            "{name} missing"
        );
    }

    // The receiver comes back: what was kept arrives, plus the gap records.
    let receiver = setup.cloud.start(cloud_addr).await;
    wait_until(20, "the buffer drained", || {
        m.outbox_rows.get() == 0 && m.buffer_gap_rows.get() == 0
    })
    .await;
    let stored = setup.cloud.stored();
    assert_eq!(stored.len() as u64 + m.buffer_evictions.get(), total);
    assert_eq!(m.gaps_synced.get(), m.gaps_recorded.get());
    // The receiver knows exactly what is missing: the gap counts add up to the evictions, and
    // every window that did not arrive lies inside a gap of its stream.
    let gaps = setup.cloud.gaps();
    assert_eq!(gaps.len() as u64, m.gaps_recorded.get());
    assert_eq!(
        gaps.iter().map(|g| g.count).sum::<u64>(),
        m.buffer_evictions.get()
    );
    assert!(gaps.iter().all(|g| g.reason == "buffer_full"));
    for w in 0..windows {
        for s in 0..streams {
            let stream = format!("e{s}/temperature");
            let start = T0 + w * 10_000;
            let arrived = stored
                .iter()
                .any(|x| x.summary.stream == stream && x.summary.window_start_ms == start);
            let covered = gaps.iter().any(|g| {
                g.streams.contains(&stream) && g.from_ms <= start && start + 10_000 <= g.to_ms
            });
            assert!(
                arrived || covered,
                "{stream} @ {w} neither arrived nor in a gap"
            );
        }
    }
    // Oldest first: every stored window is newer than (or as new as) every evicted one. The
    // outbox is filled in close order (stream, window), so compare within the close batches:
    // the newest window of every stream must have survived.
    for s in 0..streams {
        let stream = format!("e{s}/temperature");
        assert!(
            stored.iter().any(|x| x.summary.stream == stream
                && x.summary.window_start_ms == T0 + (windows - 1) * 10_000),
            "the newest window of {stream} was evicted"
        );
    }
    agent.stop().await;
    receiver.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_exits_cleanly_within_seconds_even_with_an_upload_hanging() {
    let setup = Setup::new();
    // A "receiver" that accepts connections and never answers: the upload hangs until its
    // 10 s timeout unless shutdown cuts it short.
    let hang = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let hang_addr = hang.local_addr().unwrap();
    let cfg_text = setup
        .agent_config_text(hang_addr)
        .replace("timeout_ms = 2000", "timeout_ms = 10000");
    assert!(cfg_text.contains("timeout_ms = 10000"));
    let cfg_path = setup.dir.path().join("agent.toml");
    std::fs::write(&cfg_path, cfg_text).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_edgewise-agent"))
        .args(["run", "--config"])
        .arg(&cfg_path)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(800)).await;
    publish_all(
        &setup.broker,
        &[(setup.topic("n1"), temperature("n1", T0, 20.0))],
    )
    .await;
    // The window closes by idle timeout (600 ms) and the upload starts and hangs.
    let (conn, _) = tokio::task::spawn_blocking(move || hang.accept())
        .await
        .unwrap()
        .unwrap();
    let term_at = Instant::now();
    let sent = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(sent.success());
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if term_at.elapsed() > Duration::from_secs(8) {
            let _ = child.kill();
            panic!("no exit within 8 s of SIGTERM");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    drop(conn);
    assert!(status.success(), "{status}");
    assert!(
        term_at.elapsed() < Duration::from_secs(5),
        "took {:?}",
        term_at.elapsed()
    );
    // The summary is still buffered for the next run.
    let store = edgewise_agent::store::Store::open(&setup.dir.path().join("agent.db"), 10).unwrap();
    assert_eq!(store.outbox_size().unwrap().0, 1);
}
