//! Test harness: a real receiver on 127.0.0.1:0 over a fresh SQLite file, and a reqwest client.
//!
//! Logs are silent unless `RUST_LOG` is set.
#![allow(dead_code)] // Not every test file uses every helper.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Once;

use edgewise_cloud::{Receiver, ServerConfig, Store, StoredSummary};
use edgewise_protocol::{Batch, WindowSummary};
use reqwest::StatusCode;
use tempfile::TempDir;

pub struct Harness {
    pub dir: TempDir,
    pub db_path: PathBuf,
    pub store: Store,
    pub receiver: Receiver,
    pub client: reqwest::Client,
}

/// A plain HTTP answer.
#[derive(Debug)]
pub struct Answer {
    pub status: StatusCode,
    pub body: String,
}

impl Answer {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("answer is not JSON ({e}): {:?}", self.body))
    }

    /// The `error` message of a JSON error answer.
    pub fn error(&self) -> String {
        self.json()["error"]
            .as_str()
            .unwrap_or_else(|| panic!("no error message in {:?}", self.body))
            .to_owned()
    }
}

fn init_logs() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        if std::env::var_os("RUST_LOG").is_some() {
            let _ = tracing_subscriber::fmt()
                .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
                .with_test_writer()
                .try_init();
        }
    });
}

pub fn client() -> reqwest::Client {
    // reqwest is built without a TLS provider in this workspace; it panics without one.
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
        .build()
        .expect("build reqwest client")
}

impl Harness {
    pub async fn start() -> Harness {
        Self::start_with(ServerConfig::default()).await
    }

    pub async fn start_with(cfg: ServerConfig) -> Harness {
        init_logs();
        let dir = tempfile::tempdir().expect("temp dir");
        let db_path = dir.path().join("cloud.db");
        let store = Store::open(&db_path).expect("open store");
        let listen: SocketAddr = "127.0.0.1:0".parse().expect("address");
        let receiver = Receiver::start(listen, store.clone(), cfg)
            .await
            .expect("start receiver");
        Harness {
            dir,
            db_path,
            store,
            receiver,
            client: client(),
        }
    }

    /// Stops the receiver, then starts a new one on the same port over a newly opened store on
    /// the same file, as a process restart would.
    pub async fn restart(self, cfg: ServerConfig) -> Harness {
        let Harness {
            dir,
            db_path,
            store,
            receiver,
            client,
        } = self;
        let addr = receiver.local_addr();
        receiver.stop().await;
        drop(store);
        let store = Store::open(&db_path).expect("reopen store");
        let receiver = Receiver::start(addr, store.clone(), cfg)
            .await
            .expect("start receiver again on the same port");
        assert_eq!(receiver.local_addr(), addr);
        Harness {
            dir,
            db_path,
            store,
            receiver,
            client,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.receiver.local_addr())
    }

    pub fn add_device(&self, id: &str) -> String {
        self.store.add_device(id).expect("add device")
    }

    pub async fn post_ingest(&self, token: Option<&str>, body: Vec<u8>) -> Answer {
        let mut request = self
            .client
            .post(self.url("/v1/ingest"))
            .header("content-type", "application/cbor")
            .body(body);
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        answer(request.send().await.expect("send ingest")).await
    }

    pub async fn get(&self, path_and_query: &str) -> Answer {
        let response = self
            .client
            .get(self.url(path_and_query))
            .send()
            .await
            .expect("send GET");
        answer(response).await
    }

    /// `GET /v1/summaries?<query>`, which must answer 200.
    pub async fn summaries(&self, query: &str) -> Vec<StoredSummary> {
        let a = self.get(&format!("/v1/summaries?{query}")).await;
        assert_eq!(a.status, StatusCode::OK, "{}", a.body);
        serde_json::from_str(&a.body).expect("summaries JSON")
    }
}

async fn answer(response: reqwest::Response) -> Answer {
    let status = response.status();
    let body = response.text().await.expect("read answer body");
    Answer { status, body }
}

/// A valid summary of window `[start_ms, start_ms + 10 s)`.
pub fn summary(agent: &str, stream: &str, start_ms: i64, revision: u32) -> WindowSummary {
    WindowSummary {
        agent_id: agent.to_owned(),
        stream: stream.to_owned(),
        window_start_ms: start_ms,
        window_end_ms: start_ms + 10_000,
        revision,
        count: 10,
        min: 19.5,
        max: 23.0,
        mean: 21.25,
        stddev: 1.1,
        first_value: 20.0,
        first_time_ms: start_ms + 100,
        last_value: 22.5,
        last_time_ms: start_ms + 9_900,
        unit: Some("Cel".to_owned()),
        score: None,
    }
}

/// `count` consecutive windows of one stream.
pub fn windows(agent: &str, stream: &str, count: usize) -> Vec<WindowSummary> {
    (0..count)
        .map(|i| summary(agent, stream, 1_700_000_000_000 + i as i64 * 10_000, 0))
        .collect()
}

/// The CBOR body of a batch from `agent`.
pub fn batch(agent: &str, summaries: Vec<WindowSummary>) -> Vec<u8> {
    Batch::new(agent.to_owned(), 1_700_000_100_000, summaries).to_cbor()
}
