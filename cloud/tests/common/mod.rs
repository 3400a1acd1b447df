//! Test harness: a real receiver on 127.0.0.1:0 over a fresh database (a SQLite file, or a
//! PostgreSQL database created for the test and dropped after it), and a reqwest client.
//!
//! PostgreSQL tests run only when `EDGEWISE_TEST_PG_URL` names a server (e.g.
//! `postgres://postgres@127.0.0.1:5432/test`); otherwise they pass without doing anything and
//! say so on stderr. Logs are silent unless `RUST_LOG` is set.
#![allow(dead_code)] // Not every test file uses every helper.

use std::net::SocketAddr;
use std::sync::Once;
use std::sync::atomic::{AtomicU32, Ordering};

use edgewise_cloud::{
    AnyStore, PgConfig, PgStore, Receiver, ServerConfig, Storage, Store, StoredSummary,
};
use edgewise_protocol::{Batch, WindowSummary};
use reqwest::StatusCode;
use tempfile::TempDir;

/// Which storage backend a test runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// The PostgreSQL server for tests, if one is configured.
pub fn pg_url() -> Option<String> {
    std::env::var("EDGEWISE_TEST_PG_URL")
        .ok()
        .filter(|s| !s.is_empty())
}

/// A PostgreSQL database created for one test, dropped (with its connections) on drop.
pub struct PgTestDb {
    admin: tokio_postgres::Config,
    pub name: String,
    pub config: tokio_postgres::Config,
}

impl PgTestDb {
    pub async fn create() -> PgTestDb {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let url = pg_url().expect("EDGEWISE_TEST_PG_URL is set");
        let admin: tokio_postgres::Config = url.parse().expect("EDGEWISE_TEST_PG_URL parses");
        let name = format!(
            "ew_test_{}_{}_{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed),
            rand::random::<u32>()
        );
        let (client, conn) = admin
            .connect(tokio_postgres::NoTls)
            .await
            .expect("connect to EDGEWISE_TEST_PG_URL");
        tokio::spawn(conn);
        client
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .expect("create test database");
        let mut config = admin.clone();
        config.dbname(&name);
        PgTestDb {
            admin,
            name,
            config,
        }
    }

    pub async fn store(&self, max_connections: usize) -> PgStore {
        let cfg = PgConfig {
            max_connections,
            ..PgConfig::default()
        };
        PgStore::connect_with(self.config.clone(), &cfg)
            .await
            .expect("open PostgreSQL store")
    }
}

impl Drop for PgTestDb {
    fn drop(&mut self) {
        let admin = self.admin.clone();
        let name = self.name.clone();
        // Drop runs inside the test's runtime: use a thread with its own.
        let _ = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async move {
                if let Ok((client, conn)) = admin.connect(tokio_postgres::NoTls).await {
                    tokio::spawn(conn);
                    let _ = client
                        .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                        .await;
                }
            });
        })
        .join();
    }
}

enum TestDb {
    Sqlite(TempDir),
    Postgres(Box<PgTestDb>),
}

pub struct Harness {
    pub backend: Backend,
    db: TestDb,
    pub store: AnyStore,
    pub receiver: Receiver,
    pub client: reqwest::Client,
}

/// A plain HTTP answer.
#[derive(Debug)]
pub struct Answer {
    pub status: StatusCode,
    pub body: String,
    pub headers: reqwest::header::HeaderMap,
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
    pub async fn start(backend: Backend) -> Harness {
        Self::start_with(backend, ServerConfig::default()).await
    }

    pub async fn start_with(backend: Backend, cfg: ServerConfig) -> Harness {
        init_logs();
        let (db, store) = match backend {
            Backend::Sqlite => {
                let dir = tempfile::tempdir().expect("temp dir");
                let store = Store::open(&dir.path().join("cloud.db")).expect("open store");
                (TestDb::Sqlite(dir), AnyStore::from(store))
            }
            Backend::Postgres => {
                let db = PgTestDb::create().await;
                let store = db.store(8).await;
                (TestDb::Postgres(Box::new(db)), AnyStore::from(store))
            }
        };
        let listen: SocketAddr = "127.0.0.1:0".parse().expect("address");
        let receiver = Receiver::start(listen, store.clone(), cfg)
            .await
            .expect("start receiver");
        Harness {
            backend,
            db,
            store,
            receiver,
            client: client(),
        }
    }

    /// Stops the receiver, then starts a new one on the same port over a newly opened store on
    /// the same database, as a process restart would.
    pub async fn restart(self, cfg: ServerConfig) -> Harness {
        let Harness {
            backend,
            db,
            store,
            receiver,
            client,
        } = self;
        let addr = receiver.local_addr();
        receiver.stop().await;
        drop(store);
        let store = match &db {
            TestDb::Sqlite(dir) => {
                AnyStore::from(Store::open(&dir.path().join("cloud.db")).expect("reopen store"))
            }
            TestDb::Postgres(pg) => AnyStore::from(pg.store(8).await),
        };
        let receiver = Receiver::start(addr, store.clone(), cfg)
            .await
            .expect("start receiver again on the same port");
        assert_eq!(receiver.local_addr(), addr);
        Harness {
            backend,
            db,
            store,
            receiver,
            client,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.receiver.local_addr())
    }

    pub async fn add_device(&self, id: &str) -> String {
        self.store
            .register_device(id.to_owned())
            .await
            .expect("add device")
    }

    pub async fn revoke(&self, id: &str) -> bool {
        self.store.revoke(id.to_owned()).await.expect("revoke")
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

pub async fn answer(response: reqwest::Response) -> Answer {
    let status = response.status();
    let headers = response.headers().clone();
    let body = response.text().await.expect("read answer body");
    Answer {
        status,
        body,
        headers,
    }
}

/// Runs each named `async fn(Backend)` as a test on SQLite (`sqlite::name`) and on PostgreSQL
/// (`postgres::name`, which passes without running when `EDGEWISE_TEST_PG_URL` is unset).
#[macro_export]
macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test]
                async fn $name() {
                    super::$name($crate::common::Backend::Sqlite).await
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test]
                async fn $name() {
                    if $crate::common::pg_url().is_none() {
                        eprintln!("EDGEWISE_TEST_PG_URL is not set: skipped");
                        return;
                    }
                    super::$name($crate::common::Backend::Postgres).await
                }
            )*
        }
    };
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
        quantiles: None,
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
