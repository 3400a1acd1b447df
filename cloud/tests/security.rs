//! Device authentication at rest and on the wire: keyed token hashes (and the migration of a
//! database holding plain SHA-256 hashes), revocation, rotation, a device writing another device's id, over
//! real HTTPS with a certificate generated here, and request logs that never hold a token.
//!
//! SQLite always; PostgreSQL too when `EDGEWISE_TEST_PG_URL` is set (CI).

mod common;

use std::io::Write;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, OnceLock};

use common::{PgTestDb, batch, pg_url, windows};
use edgewise_cloud::auth::{KEYED_PREFIX, TokenHash, TokenHasher, TokenKey};
use edgewise_cloud::store::{Storage, StoreError};
use edgewise_cloud::{AnyStore, Receiver, ServerConfig, Store};
use reqwest::StatusCode;

const STREAM: &str = "n1/temperature";

/// Everything any test in this binary logs, at every level.
fn captured_logs() -> &'static Arc<Mutex<Vec<u8>>> {
    static LOGS: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    LOGS.get_or_init(|| {
        let buf = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&buf);
        let _ = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::TRACE)
            .with_ansi(false)
            .with_writer(move || LogSink(Arc::clone(&sink)))
            .try_init();
        buf
    })
}

struct LogSink(Arc<Mutex<Vec<u8>>>);

impl Write for LogSink {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend_from_slice(data);
        Ok(data.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn key() -> TokenKey {
    TokenKey::from_hex(&"5a".repeat(32)).unwrap()
}

/// A receiver over HTTPS (certificate for 127.0.0.1 from a CA made here) and a client trusting it.
async fn https(store: AnyStore) -> (Receiver, reqwest::Client) {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let dir = tempfile::tempdir().unwrap();
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = rcgen::CertifiedIssuer::self_signed(ca_params, ca_key).unwrap();
    let leaf_key = rcgen::KeyPair::generate().unwrap();
    let leaf = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()])
        .unwrap()
        .signed_by(&leaf_key, &*ca)
        .unwrap();
    let (cert, key) = (dir.path().join("c.pem"), dir.path().join("k.pem"));
    std::fs::write(&cert, leaf.pem()).unwrap();
    std::fs::write(&key, leaf_key.serialize_pem()).unwrap();
    let tls = edgewise_cloud::tls::server_config(&cert, &key).unwrap();
    let listen: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let receiver = Receiver::start_tls(listen, store, ServerConfig::default(), tls)
        .await
        .unwrap();
    let client = reqwest::Client::builder()
        .tls_certs_only([reqwest::Certificate::from_pem(ca.pem().as_bytes()).unwrap()])
        .build()
        .unwrap();
    (receiver, client)
}

async fn ingest(
    receiver: &Receiver,
    client: &reqwest::Client,
    token: &str,
    device: &str,
) -> (StatusCode, String) {
    let r = client
        .post(format!("https://{}/v1/ingest", receiver.local_addr()))
        .bearer_auth(token)
        .header("content-type", "application/cbor")
        .body(batch(device, windows(device, STREAM, 2)))
        .send()
        .await
        .unwrap();
    (r.status(), r.text().await.unwrap())
}

/// The stored `token_hash` of every device, by id.
fn sqlite_hashes(db: &std::path::Path) -> Vec<(String, String)> {
    let conn = rusqlite::Connection::open(db).unwrap();
    let mut stmt = conn
        .prepare("SELECT id, token_hash FROM devices ORDER BY id")
        .unwrap();
    stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap()
}

async fn the_auth_rules_hold_over_https(store: AnyStore, old_token: &str) {
    captured_logs();
    let new_token = store.register_device("gw-2".into()).await.unwrap();
    let (receiver, client) = https(store.clone()).await;

    // The device registered before the key existed keeps working after the migration.
    assert_eq!(
        ingest(&receiver, &client, old_token, "gw-1").await.0,
        StatusCode::OK
    );
    assert_eq!(
        ingest(&receiver, &client, &new_token, "gw-2").await.0,
        StatusCode::OK
    );
    // A device writing another device's id.
    let (status, body) = ingest(&receiver, &client, &new_token, "gw-1").await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert!(body.contains("not the authenticated device"), "{body}");
    // A wrong token, and a token's plain SHA-256 (what an old database row held) as a token.
    let wrong = "f".repeat(64);
    assert_eq!(
        ingest(&receiver, &client, &wrong, "gw-1").await.0,
        StatusCode::UNAUTHORIZED
    );
    let plain = TokenHash::of(old_token);
    assert_eq!(
        ingest(&receiver, &client, plain.as_hex(), "gw-1").await.0,
        StatusCode::UNAUTHORIZED
    );
    // Revoked: refused from the very next request.
    assert!(store.revoke("gw-2".into()).await.unwrap());
    let (status, body) = ingest(&receiver, &client, &new_token, "gw-2").await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    assert!(body.contains("revoked"), "{body}");
    // Rotation: the new token works (and lifts the revocation), the old one is refused.
    let rotated = store.rotate_token("gw-2".into()).await.unwrap();
    assert_ne!(rotated, new_token);
    assert_eq!(
        ingest(&receiver, &client, &rotated, "gw-2").await.0,
        StatusCode::OK
    );
    assert_eq!(
        ingest(&receiver, &client, &new_token, "gw-2").await.0,
        StatusCode::UNAUTHORIZED
    );
    assert!(matches!(
        store.rotate_token("nobody".into()).await,
        Err(StoreError::UnknownDevice(_))
    ));
    receiver.stop().await;

    let logs = String::from_utf8_lossy(&captured_logs().lock().unwrap()).into_owned();
    assert!(logs.contains("/v1/ingest"), "request logging is on");
    for secret in [old_token, new_token.as_str(), rotated.as_str()] {
        assert!(!logs.contains(secret), "a token reached the logs");
    }
}

#[tokio::test]
async fn sqlite_old_database_migrates_to_keyed_hashes_and_auth_rules_hold() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("cloud.db");
    // A database written by the previous release: plain SHA-256 hashes.
    let old_token = Store::open(&db).unwrap().add_device("gw-1").unwrap();
    assert_eq!(
        sqlite_hashes(&db),
        vec![("gw-1".into(), TokenHash::of(&old_token).as_hex().to_owned())]
    );

    let store = Store::open(&db)
        .unwrap()
        .with_token_hasher(TokenHasher::keyed(key()))
        .unwrap();
    let hashes = sqlite_hashes(&db);
    assert!(hashes[0].1.starts_with(KEYED_PREFIX), "{hashes:?}");
    the_auth_rules_hold_over_https(AnyStore::from(store), &old_token).await;
    assert!(
        sqlite_hashes(&db)
            .iter()
            .all(|(_, h)| h.starts_with(KEYED_PREFIX))
    );

    // Keyed hashes need the key: opening without it (or with another key) is no silent lockout.
    let e = Store::open(&db)
        .unwrap()
        .with_token_hasher(TokenHasher::default())
        .unwrap_err();
    assert!(
        matches!(e, StoreError::TokenKeyRequired { keyed: 2 }),
        "{e}"
    );
    let other = TokenKey::from_hex(&"77".repeat(32)).unwrap();
    let wrong_key = Store::open(&db)
        .unwrap()
        .with_token_hasher(TokenHasher::keyed(other))
        .unwrap();
    assert_eq!(wrong_key.authenticate(&old_token).unwrap(), None);
    // Opening again with the key is a no-op migration.
    let again = Store::open(&db)
        .unwrap()
        .with_token_hasher(TokenHasher::keyed(key()))
        .unwrap();
    assert_eq!(again.authenticate(&old_token).unwrap(), Some("gw-1".into()));
}

/// The hash rewrite reads the hashes, then writes them: while another connection (another
/// receiver on the same file) holds the write lock it waits for it instead of failing at once
/// with "database is locked", as it did in a deferred transaction.
#[test]
fn sqlite_hash_rewrite_waits_for_another_writer() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("cloud.db");
    let old_token = Store::open(&db).unwrap().add_device("gw-1").unwrap();
    let store = Store::open(&db).unwrap();

    let other = rusqlite::Connection::open(&db).unwrap();
    other.execute_batch("BEGIN IMMEDIATE").unwrap();
    let (locked, release) = std::sync::mpsc::channel::<()>();
    let writer = std::thread::spawn(move || {
        locked.send(()).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(300));
        other.execute_batch("COMMIT").unwrap();
    });
    release.recv().unwrap();
    let started = std::time::Instant::now();
    let rewritten = store.with_token_hasher(TokenHasher::keyed(key()));
    writer.join().unwrap();
    let store = rewritten.expect("the rewrite waited for the lock");
    assert!(started.elapsed() >= std::time::Duration::from_millis(200));
    assert!(sqlite_hashes(&db)[0].1.starts_with(KEYED_PREFIX));
    assert_eq!(store.authenticate(&old_token).unwrap(), Some("gw-1".into()));
}

#[tokio::test]
async fn postgres_old_database_migrates_to_keyed_hashes_and_auth_rules_hold() {
    if pg_url().is_none() {
        eprintln!("EDGEWISE_TEST_PG_URL not set: PostgreSQL part skipped");
        return;
    }
    let db = PgTestDb::create().await;
    let old_token = db.store(4).await.add_device("gw-1").await.unwrap();
    let store = db
        .store(4)
        .await
        .with_token_hasher(TokenHasher::keyed(key()))
        .await
        .unwrap();
    the_auth_rules_hold_over_https(AnyStore::from(store), &old_token).await;
    let e = db
        .store(4)
        .await
        .with_token_hasher(TokenHasher::default())
        .await
        .unwrap_err();
    assert!(
        matches!(e, StoreError::TokenKeyRequired { keyed: 2 }),
        "{e}"
    );
}

/// `edgewise-cloud` with `args`: exit success, stdout, stderr.
fn cloud_cli(args: &[&std::ffi::OsStr]) -> (bool, String, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_edgewise-cloud"))
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).trim().to_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn the_cli_uses_the_token_key_file_and_refuses_a_keyed_database_without_it() {
    use std::ffi::OsStr;
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("cloud.db");
    let key = dir.path().join("token.key");
    std::fs::write(&key, format!("{}\n", "3c".repeat(32))).unwrap();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let with_key = |cmd: &[&str]| {
        let mut args: Vec<&OsStr> = cmd.iter().map(OsStr::new).collect();
        args.extend([
            OsStr::new("--db"),
            db.as_os_str(),
            OsStr::new("--token-key-file"),
            key.as_os_str(),
        ]);
        cloud_cli(&args)
    };

    // A key file others can read is refused, with the fix.
    let (ok, _, err) = with_key(&["device", "add", "gw-1"]);
    assert!(!ok);
    assert!(err.contains("chmod 600"), "{err}");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();

    let (ok, token, err) = with_key(&["device", "add", "gw-1"]);
    assert!(ok, "{err}");
    assert_eq!(token.len(), 64);
    let keyed = TokenHasher::keyed(TokenKey::load(&key).unwrap());
    assert_eq!(
        sqlite_hashes(&db),
        vec![("gw-1".into(), keyed.hash(&token).as_hex().to_owned())]
    );

    let (ok, rotated, err) = with_key(&["device", "rotate", "gw-1"]);
    assert!(ok, "{err}");
    assert_ne!(rotated, token);
    assert_eq!(sqlite_hashes(&db)[0].1, keyed.hash(&rotated).as_hex());

    // Without the key: a clear refusal, not devices that silently fail to authenticate.
    let (ok, _, err) = cloud_cli(&[
        OsStr::new("device"),
        OsStr::new("list"),
        OsStr::new("--db"),
        db.as_os_str(),
    ]);
    assert!(!ok);
    assert!(err.contains("--token-key-file"), "{err}");
    for secret in [&token, &rotated] {
        assert!(!err.contains(secret.as_str()));
    }
}
