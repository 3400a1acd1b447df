//! Many receivers on one PostgreSQL database: overlapping, retried and revised batches sent
//! through every replica at once are stored exactly once, at their highest revision.
//!
//! Runs only when `EDGEWISE_TEST_PG_URL` is set (`.ci/cloud.sh` sets it).

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;

use common::{PgTestDb, batch, client, pg_url, summary};
use edgewise_cloud::{IngestOutcome, Receiver, ServerConfig, Storage, SummaryQuery};
use edgewise_protocol::WindowSummary;
use reqwest::StatusCode;

const REPLICAS: usize = 3;
const DEVICES: usize = 4;
const STREAMS: usize = 3;
const WINDOWS: i64 = 60;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn overlapping_retried_batches_through_every_replica_are_stored_exactly_once() {
    if pg_url().is_none() {
        eprintln!("EDGEWISE_TEST_PG_URL is not set: skipped");
        return;
    }
    let db = PgTestDb::create().await;
    let mut receivers = Vec::new();
    // Replicas start together: the migrations must tolerate that.
    let stores = futures_join(&db).await;
    for store in stores {
        let listen: SocketAddr = "127.0.0.1:0".parse().unwrap();
        receivers.push(
            Receiver::start(listen, store, ServerConfig::default())
                .await
                .unwrap(),
        );
    }
    let admin = db.store(2).await;
    let mut tokens = Vec::new();
    for d in 0..DEVICES {
        tokens.push(admin.register_device(format!("gw-{d}")).await.unwrap());
    }

    // Each device: windows in batches of 10 that overlap by 5, every batch posted to every
    // replica at the same time; every 7th window also comes as revision 1 in a later batch.
    let http = client();
    let urls: Vec<String> = receivers
        .iter()
        .map(|r| format!("http://{}/v1/ingest", r.local_addr()))
        .collect();
    let mut tasks = Vec::new();
    for (d, token) in tokens.iter().enumerate() {
        let agent = format!("gw-{d}");
        let mut batches: Vec<Vec<WindowSummary>> = Vec::new();
        let mut start = 0;
        while start < WINDOWS {
            let mut b = Vec::new();
            for w in start..(start + 10).min(WINDOWS) {
                for s in 0..STREAMS {
                    b.push(summary(&agent, &format!("n{s}/t"), w * 10_000, 0));
                }
                if w % 7 == 0 && start > 0 {
                    b.push(summary(&agent, "n0/t", (w - 5) * 10_000, 1));
                }
            }
            batches.push(b);
            start += 5;
        }
        let mut posts: Vec<(Vec<u8>, Vec<&String>)> = batches
            .into_iter()
            .map(|b| (batch(&agent, b), urls.iter().collect()))
            .collect();
        // And one window of its own for each replica, so that every replica provably writes
        // (which replica wins a race for the shared windows is up to the scheduler).
        for (r, url) in urls.iter().enumerate() {
            let own = summary(&agent, "own/t", (WINDOWS + r as i64) * 10_000, 0);
            posts.push((batch(&agent, vec![own]), vec![url]));
        }
        for (body, targets) in posts {
            for url in targets {
                let (http, url, body, token) =
                    (http.clone(), url.clone(), body.clone(), token.clone());
                tasks.push(tokio::spawn(async move {
                    // A client retries until it gets a 2xx, as the agent does.
                    for _ in 0..20 {
                        let r = http
                            .post(&url)
                            .bearer_auth(&token)
                            .header("content-type", "application/cbor")
                            .body(body.clone())
                            .send()
                            .await;
                        if let Ok(r) = r {
                            if r.status() == StatusCode::OK {
                                let text = r.text().await.unwrap();
                                return serde_json::from_str::<IngestOutcome>(&text).unwrap();
                            }
                            assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
                        }
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    }
                    panic!("batch never accepted");
                }));
            }
        }
    }
    let mut total = IngestOutcome::default();
    for t in tasks {
        let o = t.await.unwrap();
        total.inserted += o.inserted;
        total.revised += o.revised;
        total.duplicates += o.duplicates;
    }

    let expected_windows = DEVICES * STREAMS * WINDOWS as usize + DEVICES * REPLICAS;
    let stored = admin.summaries_all().await;
    assert_eq!(stored.len(), expected_windows);
    let mut keys: HashMap<(String, String, i64), u32> = HashMap::new();
    for s in &stored {
        let key = (
            s.device_id.clone(),
            s.summary.stream.clone(),
            s.summary.window_start_ms,
        );
        assert!(
            keys.insert(key, s.summary.revision).is_none(),
            "stored twice"
        );
    }
    // Every revised window holds revision 1.
    for d in 0..DEVICES {
        for w in (1..WINDOWS).filter(|w| w % 7 == 0) {
            let key = (format!("gw-{d}"), "n0/t".to_owned(), (w - 5) * 10_000);
            assert_eq!(keys.get(&key), Some(&1), "{key:?}");
        }
    }
    // Across replicas, each window was inserted by exactly one request.
    assert_eq!(total.inserted, expected_windows as u64);
    let per_replica: u64 = receivers
        .iter()
        .map(|r| r.metrics().snapshot().summaries_inserted)
        .sum();
    assert_eq!(per_replica, expected_windows as u64);
    for (i, r) in receivers.iter().enumerate() {
        let inserted = r.metrics().snapshot().summaries_inserted;
        assert!(
            inserted >= DEVICES as u64,
            "replica {i} inserted {inserted}, less than its own windows"
        );
    }
    for r in receivers {
        r.stop().await;
    }
}

async fn futures_join(db: &PgTestDb) -> Vec<edgewise_cloud::PgStore> {
    let mut handles = Vec::new();
    for _ in 0..REPLICAS {
        let config = db.config.clone();
        handles.push(tokio::spawn(async move {
            edgewise_cloud::PgStore::connect_with(config, &edgewise_cloud::PgConfig::default())
                .await
        }));
    }
    let mut stores = Vec::new();
    for h in handles {
        stores.push(h.await.unwrap().expect("replica opens the database"));
    }
    stores
}

trait AllSummaries {
    async fn summaries_all(&self) -> Vec<edgewise_cloud::StoredSummary>;
}

impl AllSummaries for edgewise_cloud::PgStore {
    async fn summaries_all(&self) -> Vec<edgewise_cloud::StoredSummary> {
        self.find_summaries(edgewise_cloud::SummaryFilter {
            query: SummaryQuery {
                limit: 10_000,
                ..SummaryQuery::default()
            },
            ..Default::default()
        })
        .await
        .unwrap()
    }
}
