//! HTTPS served directly from a certificate and key (`Receiver::start_tls`).

mod common;

use std::net::SocketAddr;
use std::path::PathBuf;

use common::{batch, windows};
use edgewise_cloud::{Receiver, ServerConfig, Store, tls};
use reqwest::StatusCode;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

fn https_client() -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let pem = std::fs::read(fixture("test-cert.pem")).unwrap();
    reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(&pem).unwrap())
        .build()
        .unwrap()
}

#[tokio::test]
async fn serves_ingest_and_queries_over_https_only() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("cloud.db")).unwrap();
    let token = store.add_device("gw-1").unwrap();
    let config = tls::server_config(&fixture("test-cert.pem"), &fixture("test-key.pem")).unwrap();
    let listen: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let receiver = Receiver::start_tls(listen, store, ServerConfig::default(), config)
        .await
        .unwrap();
    let addr = receiver.local_addr();
    let client = https_client();

    let r = client
        .post(format!("https://{addr}/v1/ingest"))
        .bearer_auth(&token)
        .header("content-type", "application/cbor")
        .body(batch("gw-1", windows("gw-1", "n1/t", 3)))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let r = client
        .get(format!("https://{addr}/v1/summaries"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let rows: serde_json::Value = serde_json::from_str(&r.text().await.unwrap()).unwrap();
    assert_eq!(rows.as_array().map(Vec::len), Some(3));

    // Plain HTTP on the TLS port gets no HTTP answer; the server keeps serving.
    let plain = common::client()
        .get(format!("http://{addr}/healthz"))
        .send()
        .await;
    assert!(plain.is_err(), "plain HTTP was answered on the TLS port");
    // A client that does not trust the certificate is refused at the handshake.
    let untrusting = common::client()
        .get(format!("https://{addr}/healthz"))
        .send()
        .await;
    assert!(untrusting.is_err());
    let r = client
        .get(format!("https://{addr}/healthz"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);

    receiver.stop().await;
    assert!(
        client
            .get(format!("https://{addr}/healthz"))
            .send()
            .await
            .is_err()
    );
}

#[test]
fn bad_pem_files_give_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let empty = dir.path().join("empty.pem");
    std::fs::write(&empty, "not pem").unwrap();
    let cert = fixture("test-cert.pem");
    let key = fixture("test-key.pem");
    let e = tls::server_config(&empty, &key).unwrap_err();
    assert!(e.to_string().contains("no PEM certificate"), "{e}");
    let e = tls::server_config(&cert, &empty).unwrap_err();
    assert!(e.to_string().contains("no PEM private key"), "{e}");
    let e = tls::server_config(&dir.path().join("missing.pem"), &key).unwrap_err();
    assert!(e.to_string().contains("missing.pem"), "{e}");
    // A key that does not belong to the certificate.
    let other_key = dir.path().join("other-key.pem");
    let status = std::process::Command::new("openssl")
        .args([
            "ecparam",
            "-name",
            "prime256v1",
            "-genkey",
            "-noout",
            "-out",
        ])
        .arg(&other_key)
        .status();
    if matches!(status, Ok(s) if s.success()) {
        assert!(tls::server_config(&cert, &other_key).is_err());
    }
}
