//! PostgreSQL restarted under load: the receiver answers 503 with `Retry-After` while the
//! database is away, recovers by itself (no restart of the receiver), and clients that retry
//! until they get a 2xx lose and duplicate nothing.
//!
//! Runs only when `EDGEWISE_TEST_PG_URL` is set and `EDGEWISE_TEST_PG_RESTART_CMD` is a shell
//! command that restarts that server (`.ci/cloud.sh`: `pg_ctlcluster 15 main restart`).

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use common::{PgTestDb, batch, client, pg_url, summary};
use edgewise_cloud::{Receiver, ServerConfig, Storage, SummaryFilter, SummaryQuery};
use reqwest::StatusCode;

const DEVICES: usize = 4;
const BATCHES: i64 = 60;
const PER_BATCH: i64 = 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn receiver_recovers_from_a_postgres_restart_and_retries_lose_nothing() {
    let (Some(_), Ok(restart)) = (pg_url(), std::env::var("EDGEWISE_TEST_PG_RESTART_CMD")) else {
        eprintln!("EDGEWISE_TEST_PG_URL or EDGEWISE_TEST_PG_RESTART_CMD is not set: skipped");
        return;
    };
    let db = PgTestDb::create().await;
    let store = db.store(8).await;
    let mut tokens = Vec::new();
    for d in 0..DEVICES {
        tokens.push(store.register_device(format!("gw-{d}")).await.unwrap());
    }
    let listen: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let cfg = ServerConfig {
        rate_limit: None,
        ..ServerConfig::default()
    };
    let receiver = Receiver::start(listen, store.clone(), cfg).await.unwrap();
    let url = format!("http://{}/v1/ingest", receiver.local_addr());
    let accepted = Arc::new(AtomicU64::new(0));
    let refused = Arc::new(AtomicU64::new(0));

    let mut tasks = Vec::new();
    for (d, token) in tokens.into_iter().enumerate() {
        let (http, url, accepted, refused) =
            (client(), url.clone(), accepted.clone(), refused.clone());
        tasks.push(tokio::spawn(async move {
            let agent = format!("gw-{d}");
            for b in 0..BATCHES {
                let summaries = (0..PER_BATCH)
                    .map(|i| summary(&agent, "n1/t", (b * PER_BATCH + i) * 10_000, 0))
                    .collect();
                let body = batch(&agent, summaries);
                let mut attempts = 0;
                loop {
                    attempts += 1;
                    assert!(attempts < 400, "batch {b} of {agent} never accepted");
                    let r = http
                        .post(&url)
                        .bearer_auth(&token)
                        .header("content-type", "application/cbor")
                        .body(body.clone())
                        .send()
                        .await;
                    match r {
                        Ok(r) if r.status() == StatusCode::OK => {
                            accepted.fetch_add(1, Ordering::Relaxed);
                            break;
                        }
                        Ok(r) => {
                            assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
                            assert!(r.headers().contains_key("retry-after"));
                            refused.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e) => panic!("the receiver itself failed: {e}"),
                    }
                    // Shorter than the advertised Retry-After, to keep the test quick.
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }));
    }

    // Restart PostgreSQL once the load is running.
    while accepted.load(Ordering::Relaxed) < 20 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let out = tokio::process::Command::new("sh")
        .arg("-c")
        .arg(&restart)
        .output()
        .await
        .expect("run the restart command");
    assert!(
        out.status.success(),
        "restart failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    for t in tasks {
        t.await.unwrap();
    }
    let accepted_now = accepted.load(Ordering::Relaxed);
    assert_eq!(accepted_now, DEVICES as u64 * BATCHES as u64);
    assert!(
        refused.load(Ordering::Relaxed) > 0,
        "the restart did not happen under load (no 503 seen)"
    );

    let stored = store
        .find_summaries(SummaryFilter {
            query: SummaryQuery {
                limit: 10_000,
                ..SummaryQuery::default()
            },
            ..SummaryFilter::default()
        })
        .await
        .unwrap();
    assert_eq!(stored.len(), DEVICES * (BATCHES * PER_BATCH) as usize);
    let m = receiver.metrics().snapshot();
    assert_eq!(m.summaries_inserted, stored.len() as u64);
    let health = client()
        .get(format!("http://{}/healthz", receiver.local_addr()))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), StatusCode::OK);
    eprintln!(
        "accepted {accepted_now} batches, {} refused with 503 while PostgreSQL restarted; \
         {} duplicates",
        refused.load(Ordering::Relaxed),
        m.summaries_duplicate
    );
    receiver.stop().await;
}
