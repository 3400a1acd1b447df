//! TLS and credentials on both hops, with real handshakes on loopback and certificates generated
//! here (rcgen): the embedded broker behind TLS (optionally mutual TLS and passwords) and the
//! receiver over HTTPS.
//!
//! Accepted: the right CA, a matching pin, a client certificate from the broker's client CA, the
//! right password, and the whole pipeline over TLS on both hops. Refused, each with the reason in
//! the error: a wrong CA, an expired certificate, plaintext to a TLS port, a missing or foreign
//! client certificate, a wrong password, a pin that does not match, plaintext URLs next to TLS
//! settings.

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{Cloud, DEVICE, free_addr, temperature, unique, wait_until};
use edgewise_agent::broker::{BrokerSecurity, BrokerTls, EmbeddedBroker};
use edgewise_agent::config::AgentConfig;
use edgewise_agent::tls::{TlsConfig, spki_sha256};
use edgewise_agent::{Agent, ingest, sync};
use edgewise_cloud::{Receiver, ServerConfig, Store as CloudStore};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair, date_time_ymd,
};

/// A test certificate authority that writes PEM files into a directory.
struct Ca {
    name: String,
    issuer: CertifiedIssuer<'static, KeyPair>,
}

impl Ca {
    fn new(name: &str) -> Ca {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        let issuer = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
        Ca {
            name: name.to_string(),
            issuer,
        }
    }

    fn write(&self, dir: &Path) -> PathBuf {
        let p = dir.join(format!("{}-ca.pem", self.name));
        std::fs::write(&p, self.issuer.pem()).unwrap();
        p
    }

    /// A certificate for `names` (DNS names or IPs) and its key, as PEM files.
    fn issue(&self, dir: &Path, file: &str, names: &[&str], expired: bool) -> (PathBuf, PathBuf) {
        let mut params =
            CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .unwrap();
        params.distinguished_name.push(DnType::CommonName, file);
        if expired {
            params.not_before = date_time_ymd(2020, 1, 1);
            params.not_after = date_time_ymd(2021, 1, 1);
        }
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &*self.issuer).unwrap();
        let (c, k) = (
            dir.join(format!("{file}.pem")),
            dir.join(format!("{file}.key")),
        );
        std::fs::write(&c, cert.pem()).unwrap();
        std::fs::write(&k, key.serialize_pem()).unwrap();
        (c, k)
    }
}

/// Everything one test needs: a server CA, a client CA, and an unrelated CA.
struct Pki {
    dir: tempfile::TempDir,
    server_ca: Ca,
    client_ca: Ca,
    rogue_ca: Ca,
}

impl Pki {
    fn new() -> Pki {
        common::init();
        Pki {
            dir: tempfile::tempdir().unwrap(),
            server_ca: Ca::new("server"),
            client_ca: Ca::new("clients"),
            rogue_ca: Ca::new("rogue"),
        }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    /// A TLS broker on loopback: server certificate for localhost from `server_ca`; with
    /// `mutual`, client certificates must come from `client_ca`; `users` required if not empty.
    fn broker(&self, expired: bool, mutual: bool, users: &[(&str, &str)]) -> SocketAddr {
        self.broker_named(&["localhost", "127.0.0.1"], expired, mutual, users)
    }

    /// [`Pki::broker`] with a server certificate for `names`.
    fn broker_named(
        &self,
        names: &[&str],
        expired: bool,
        mutual: bool,
        users: &[(&str, &str)],
    ) -> SocketAddr {
        let (cert_file, key_file) =
            self.server_ca
                .issue(self.path(), &unique("broker"), names, expired);
        let security = BrokerSecurity {
            tls: Some(BrokerTls {
                cert_file,
                key_file,
                client_ca_file: mutual.then(|| self.client_ca.write(self.path())),
            }),
            users: users
                .iter()
                .map(|(u, p)| (u.to_string(), p.to_string()))
                .collect::<HashMap<_, _>>(),
        };
        EmbeddedBroker::start_secure(SocketAddr::from(([127, 0, 0, 1], 0)), 64 * 1024, &security)
            .unwrap()
            .addr
    }

    /// A client certificate (`client_ca` or `rogue_ca`) as `[mqtt.tls]` lines.
    fn client_cert_toml(&self, ca: &Ca) -> String {
        let (c, k) = ca.issue(self.path(), &unique("client"), &["gw-test"], false);
        format!(
            "client_cert_file = \"{}\"\nclient_key_file = \"{}\"\n",
            c.display(),
            k.display()
        )
    }

    /// A private (mode 600) secret file.
    fn secret_file(&self, value: &str) -> PathBuf {
        use std::os::unix::fs::PermissionsExt;
        let p = self.path().join(unique("secret"));
        std::fs::write(&p, value).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        p
    }
}

/// An agent config whose `[mqtt]` table is `mqtt` (TOML lines) and `[sync]` is `sync`.
fn config(dir: &Path, mqtt: &str, sync: &str) -> AgentConfig {
    let text = format!(
        r#"
        agent_id = "{DEVICE}"
        [store]
        path = "{}"
        [window]
        window_seconds = 10
        allowed_lateness_ms = 20000
        idle_timeout_ms = 600
        [http]
        listen = "127.0.0.1:0"
        [mqtt]
        client_id = "{}"
        reconnect_max_backoff_ms = 500
        {mqtt}
        [sync]
        interval_ms = 100
        backoff_initial_ms = 50
        backoff_max_ms = 300
        timeout_ms = 3000
        {sync}
        "#,
        dir.join(format!("{}.db", unique("agent"))).display(),
        unique("agent"),
    );
    let cfg = AgentConfig::parse(&text).unwrap();
    assert_eq!(cfg.problems(), vec![], "{text}");
    cfg
}

/// Connects as the agent does and answers Ok at the broker's ConnAck, or the error (with the
/// agent's explanation of a refusal).
async fn connect_outcome(cfg: &AgentConfig) -> Result<(), String> {
    let (_client, mut session) = ingest::connect(cfg, 0)?;
    let outcome = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match session.poll().await {
                Ok(ingest::Incoming::ConnAck { .. }) => return Ok(()),
                Ok(_) => {}
                Err(e) => {
                    let why = e.refusal.unwrap_or("");
                    return Err(format!("{e} ({why})"));
                }
            }
        }
    })
    .await;
    let outcome = outcome.unwrap_or_else(|_| Err("no ConnAck within 10 s".into()));
    if let Err(e) = &outcome {
        eprintln!("connection refused: {e}");
    }
    outcome
}

fn mqtts(addr: SocketAddr, ca: &Path, extra: &str) -> String {
    format!(
        "url = \"mqtts://localhost:{}\"\ntopics = [\"t/#\"]\n{extra}\n[mqtt.tls]\nca_file = \"{}\"\n",
        addr.port(),
        ca.display()
    )
}

#[tokio::test]
async fn broker_with_the_right_ca_is_accepted() {
    let pki = Pki::new();
    let addr = pki.broker(false, false, &[]);
    let ca = pki.server_ca.write(pki.path());
    let cfg = config(pki.path(), &mqtts(addr, &ca, ""), "");
    connect_outcome(&cfg).await.unwrap();
}

#[tokio::test]
async fn broker_signed_by_another_ca_is_refused() {
    let pki = Pki::new();
    let addr = pki.broker(false, false, &[]);
    let wrong = pki.rogue_ca.write(pki.path());
    let cfg = config(pki.path(), &mqtts(addr, &wrong, ""), "");
    let e = connect_outcome(&cfg).await.unwrap_err();
    assert!(e.contains("UnknownIssuer"), "{e}");
    assert!(e.contains("not falling back to plaintext"), "{e}");
}

#[tokio::test]
async fn broker_with_an_expired_certificate_is_refused() {
    let pki = Pki::new();
    let addr = pki.broker(true, false, &[]);
    let ca = pki.server_ca.write(pki.path());
    let cfg = config(pki.path(), &mqtts(addr, &ca, ""), "");
    let e = connect_outcome(&cfg).await.unwrap_err();
    assert!(e.contains("expired"), "{e}");
}

#[tokio::test]
async fn broker_certificate_for_another_host_is_refused() {
    let pki = Pki::new();
    // A certificate from the trusted CA, but for another broker than the one in mqtt.url.
    let addr = pki.broker_named(&["other-broker.example"], false, false, &[]);
    let ca = pki.server_ca.write(pki.path());
    let cfg = config(pki.path(), &mqtts(addr, &ca, ""), "");
    let e = connect_outcome(&cfg).await.unwrap_err();
    assert!(e.contains("not valid for name"), "{e}");
}

#[tokio::test]
async fn plaintext_mqtt_to_the_tls_port_gets_no_session() {
    let pki = Pki::new();
    let addr = pki.broker(false, false, &[]);
    let cfg = config(
        pki.path(),
        &format!("url = \"mqtt://127.0.0.1:{}\"", addr.port()),
        "",
    );
    let e = connect_outcome(&cfg).await.unwrap_err();
    assert!(e.contains("use mqtts://"), "{e}");
}

#[tokio::test]
async fn mutual_tls_accepts_only_certificates_from_the_client_ca() {
    let pki = Pki::new();
    let addr = pki.broker(false, true, &[]);
    let ca = pki.server_ca.write(pki.path());

    let good = config(
        pki.path(),
        &format!(
            "{}{}",
            mqtts(addr, &ca, ""),
            pki.client_cert_toml(&pki.client_ca)
        ),
        "",
    );
    connect_outcome(&good).await.unwrap();

    let foreign = config(
        pki.path(),
        &format!(
            "{}{}",
            mqtts(addr, &ca, ""),
            pki.client_cert_toml(&pki.rogue_ca)
        ),
        "",
    );
    let e = connect_outcome(&foreign).await.unwrap_err();
    assert!(e.contains("UnknownCA"), "{e}");
    assert!(e.contains("client certificate"), "{e}");

    let none = config(pki.path(), &mqtts(addr, &ca, ""), "");
    let e = connect_outcome(&none).await.unwrap_err();
    assert!(e.contains("CertificateRequired"), "{e}");
}

#[tokio::test]
async fn broker_credentials_are_required_and_checked() {
    let pki = Pki::new();
    let addr = pki.broker(false, false, &[("gw-test", "s3cret-pass")]);
    let ca = pki.server_ca.write(pki.path());
    let good_file = pki.secret_file("s3cret-pass\n");
    let bad_file = pki.secret_file("wrong");
    let with = |user: &str, file: &Path| {
        mqtts(
            addr,
            &ca,
            &format!(
                "username = \"{user}\"\npassword_file = \"{}\"",
                file.display()
            ),
        )
    };
    connect_outcome(&config(pki.path(), &with("gw-test", &good_file), ""))
        .await
        .unwrap();
    assert!(
        connect_outcome(&config(pki.path(), &with("gw-test", &bad_file), ""))
            .await
            .is_err()
    );
    assert!(
        connect_outcome(&config(pki.path(), &with("someone", &good_file), ""))
            .await
            .is_err()
    );
    assert!(
        connect_outcome(&config(pki.path(), &mqtts(addr, &ca, ""), ""))
            .await
            .is_err()
    );
}

/// A receiver over HTTPS with a localhost certificate from `ca`, and its token for DEVICE.
async fn https_receiver(pki: &Pki, ca: &Ca, expired: bool) -> (Receiver, Cloud, PathBuf) {
    let (cert, key) = ca.issue(
        pki.path(),
        &unique("receiver"),
        &["localhost", "127.0.0.1"],
        expired,
    );
    let cloud = Cloud::new(&pki.path().join(unique("cloud")).tap_mkdir());
    let tls = edgewise_cloud::tls::server_config(&cert, &key).unwrap();
    let store = CloudStore::open(&cloud.db).unwrap();
    let receiver = Receiver::start_tls(free_addr(), store, ServerConfig::default(), tls)
        .await
        .unwrap();
    (receiver, cloud, cert)
}

trait TapMkdir {
    fn tap_mkdir(self) -> Self;
}

impl TapMkdir for PathBuf {
    fn tap_mkdir(self) -> Self {
        std::fs::create_dir_all(&self).unwrap();
        self
    }
}

/// GET /healthz with the agent's sync client for `[sync]` lines `sync`.
async fn sync_outcome(pki: &Pki, sync: &str) -> Result<u16, String> {
    let cfg = config(pki.path(), "", sync);
    let client = sync::http_client(&cfg).map_err(|e| e.to_string())?;
    let url = format!("{}/healthz", cfg.sync.url);
    client
        .get(url)
        .send()
        .await
        .map(|r| r.status().as_u16())
        .map_err(|e| {
            let chain = sync::error_chain(&e);
            eprintln!("request refused: {chain}");
            chain
        })
}

#[tokio::test]
async fn receiver_certificates_are_verified_and_pins_enforced() {
    let pki = Pki::new();
    let (receiver, _cloud, cert) = https_receiver(&pki, &pki.server_ca, false).await;
    let port = receiver.local_addr().port();
    let ca = pki.server_ca.write(pki.path());
    let rogue = pki.rogue_ca.write(pki.path());
    let https = |ca: &Path, pins: &str| {
        format!(
            "url = \"https://localhost:{port}\"\n[sync.tls]\nca_file = \"{}\"\n{pins}",
            ca.display()
        )
    };

    assert_eq!(sync_outcome(&pki, &https(&ca, "")).await, Ok(200));

    let e = sync_outcome(&pki, &https(&rogue, "")).await.unwrap_err();
    assert!(e.contains("UnknownIssuer"), "{e}");

    let der = edgewise_agent::tls::read_certs("test", &cert).unwrap();
    let pin = spki_sha256(&der[0]).unwrap();
    let other = "ab".repeat(32);
    let pinned = format!("pin_sha256 = [\"{other}\", \"{pin}\"]");
    assert_eq!(sync_outcome(&pki, &https(&ca, &pinned)).await, Ok(200));
    let e = sync_outcome(&pki, &https(&ca, &format!("pin_sha256 = [\"{other}\"]")))
        .await
        .unwrap_err();
    assert!(e.contains("matches none of pin_sha256"), "{e}");

    // Plain HTTP to the TLS port gets no HTTP answer.
    let plain = format!("url = \"http://127.0.0.1:{port}\"");
    assert!(sync_outcome(&pki, &plain).await.is_err());
    receiver.stop().await;

    let (expired, _cloud, _) = https_receiver(&pki, &pki.server_ca, true).await;
    let port = expired.local_addr().port();
    let e = sync_outcome(
        &pki,
        &format!(
            "url = \"https://localhost:{port}\"\n[sync.tls]\nca_file = \"{}\"",
            ca.display()
        ),
    )
    .await
    .unwrap_err();
    assert!(e.contains("expired"), "{e}");
    expired.stop().await;
}

#[test]
fn tls_settings_with_a_plaintext_url_are_refused_by_check() {
    let cfg = AgentConfig::parse(
        "agent_id = \"a\"\n[mqtt]\nurl = \"mqtt://b:1883\"\n[mqtt.tls]\nca_file = \"ca.pem\"\n\
         [sync]\nurl = \"http://c\"\n[sync.tls]\npin_sha256 = [\"00\"]\n",
    )
    .unwrap();
    let keys: Vec<String> = cfg.problems().into_iter().map(|p| p.key).collect();
    assert_eq!(keys, vec!["mqtt.tls", "sync.tls", "sync.tls.pin_sha256[0]"]);
    assert!(
        TlsConfig {
            ca_file: Some("x".into()),
            ..TlsConfig::default()
        }
        .is_set()
    );
}

/// Publishes over TLS with a client certificate and password; returns once all are acked.
async fn publish_tls(cfg: &AgentConfig, messages: &[(String, Vec<u8>)]) {
    let mut cfg = cfg.clone();
    cfg.mqtt.client_id = Some(unique("sensor"));
    let (client, eventloop) = ingest::connect_v311(&cfg, 0).unwrap();
    common::publish_on(client, eventloop, messages).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_whole_pipeline_runs_over_tls_with_credentials_on_both_hops() {
    let pki = Pki::new();
    let addr = pki.broker(false, true, &[("gw-test", "pw-1")]);
    let (receiver, cloud, _) = https_receiver(&pki, &pki.server_ca, false).await;
    let ca = pki.server_ca.write(pki.path());
    let password = pki.secret_file("pw-1");
    let token = pki.secret_file(&cloud.token);
    let mqtt = format!(
        "{}{}",
        mqtts(
            addr,
            &ca,
            &format!(
                "username = \"gw-test\"\npassword_file = \"{}\"",
                password.display()
            )
        ),
        pki.client_cert_toml(&pki.client_ca)
    );
    let sync = format!(
        "url = \"https://localhost:{}\"\ntoken_file = \"{}\"\n[sync.tls]\nca_file = \"{}\"",
        receiver.local_addr().port(),
        token.display(),
        ca.display()
    );
    let cfg = config(pki.path(), &mqtt, &sync);
    assert_eq!(cfg.warnings(), vec![], "nothing insecure in this config");
    assert_eq!(edgewise_agent::config::file_problems(&cfg), vec![]);
    let agent = Agent::start(cfg.clone()).await.unwrap();
    common::subscribed(&agent).await;

    let t0 = 1_700_000_000_000i64;
    let msgs: Vec<_> = (0..5)
        .map(|i| {
            (
                "t/n1".to_string(),
                temperature("n1", t0 + i * 1000, 20.0 + i as f64),
            )
        })
        .collect();
    publish_tls(&cfg, &msgs).await;
    let m = agent.metrics().clone();
    wait_until(15, "the summary reached the receiver", || {
        m.summaries_synced.get() == 1
    })
    .await;
    let stored = cloud.stored();
    assert_eq!(stored.len(), 1);
    assert_eq!(stored[0].summary.count, 5);
    agent.stop().await;
    receiver.stop().await;
}

#[test]
fn loose_token_file_permissions_fail_check_and_inline_secrets_warn() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("token");
    std::fs::write(&token, "t0k").unwrap();
    std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o644)).unwrap();
    let cfg = AgentConfig::parse(&format!(
        "agent_id = \"a\"\n[mqtt]\nurl = \"mqtt://10.0.0.5\"\nusername = \"u\"\npassword = \"p\"\n\
         [sync]\nurl = \"http://cloud.example.com\"\ntoken_file = \"{}\"\n",
        token.display()
    ))
    .unwrap();
    let problems = edgewise_agent::config::file_problems(&cfg);
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert_eq!(problems[0].key, "sync.token_file");
    assert!(problems[0].message.contains("chmod 600"));
    assert!(cfg.sync_token().unwrap_err().contains("mode 0644"));

    let warned: Vec<String> = cfg.warnings().into_iter().map(|w| w.key).collect();
    assert_eq!(warned, vec!["mqtt.password", "sync.url", "mqtt.url"]);
    let inline = AgentConfig::parse("agent_id = \"a\"\n[sync]\ntoken = \"t0k\"\n").unwrap();
    let warned: Vec<String> = inline.warnings().into_iter().map(|w| w.key).collect();
    assert_eq!(warned, vec!["sync.token"]);
}

/// `edgewise-agent check` on `text` written to a file in `dir`.
fn run_check(dir: &Path, text: &str) -> (i32, String) {
    let path = dir.join("agent.toml");
    std::fs::write(&path, text).unwrap();
    common::run_check(&path)
}

#[test]
fn check_warns_about_inline_tokens_and_fails_on_readable_token_files() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let (code, text) = run_check(
        dir.path(),
        "agent_id = \"a\"\n[sync]\nurl = \"https://cloud.example.com\"\ntoken = \"t0k\"\n",
    );
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("warning: sync.token:"), "{text}");
    assert!(!text.contains("t0k"), "check printed the token: {text}");

    let token = dir.path().join("token");
    std::fs::write(&token, "t0k-from-file").unwrap();
    std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o644)).unwrap();
    let config = format!(
        "agent_id = \"a\"\n[sync]\nurl = \"https://cloud.example.com\"\ntoken_file = \"{}\"\n",
        token.display()
    );
    let (code, text) = run_check(dir.path(), &config);
    assert_eq!(code, 1, "{text}");
    assert!(
        text.contains("sync.token_file") && text.contains("chmod 600"),
        "{text}"
    );
    std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o600)).unwrap();
    let (code, text) = run_check(dir.path(), &config);
    assert_eq!(code, 0, "{text}");
    assert!(!text.contains("warning"), "{text}");
}

/// A Mosquitto started for one test (killed when dropped), with TLS on a free loopback port.
struct Mosquitto {
    child: std::process::Child,
    addr: SocketAddr,
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Mosquitto {
    /// `None` unless `EDGEWISE_TEST_MOSQUITTO` names the mosquitto binary (CI sets it).
    /// Mutual TLS with `pki.client_ca`, and the user `gw-test` / `mosq-pw` required.
    fn start(pki: &Pki) -> Option<Mosquitto> {
        let bin = std::env::var("EDGEWISE_TEST_MOSQUITTO").ok()?;
        let passwd_bin =
            std::env::var("EDGEWISE_TEST_MOSQUITTO_PASSWD").unwrap_or("mosquitto_passwd".into());
        let dir = pki.path();
        let passwd = dir.join("mosquitto.passwd");
        let status = std::process::Command::new(passwd_bin)
            .args(["-b", "-c"])
            .arg(&passwd)
            .args(["gw-test", "mosq-pw"])
            .status()
            .unwrap();
        assert!(status.success(), "mosquitto_passwd failed");
        let (cert, key) = pki
            .server_ca
            .issue(dir, "mosquitto", &["localhost", "127.0.0.1"], false);
        let addr = free_addr();
        let conf = dir.join("mosquitto.conf");
        std::fs::write(
            &conf,
            format!(
                "user root\nallow_anonymous false\npassword_file {}\n\
                 listener {} 127.0.0.1\ncafile {}\ncertfile {}\nkeyfile {}\n\
                 require_certificate true\n",
                passwd.display(),
                addr.port(),
                pki.client_ca.write(dir).display(),
                cert.display(),
                key.display()
            ),
        )
        .unwrap();
        let child = std::process::Command::new(bin)
            .arg("-c")
            .arg(&conf)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let mosquitto = Mosquitto { child, addr };
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(addr).is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "mosquitto did not start"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Some(mosquitto)
    }
}

#[tokio::test]
async fn mosquitto_with_mutual_tls_and_passwords_accepts_and_refuses_like_the_embedded_broker() {
    let pki = Pki::new();
    let Some(mosquitto) = Mosquitto::start(&pki) else {
        eprintln!("EDGEWISE_TEST_MOSQUITTO not set: Mosquitto TLS test skipped");
        return;
    };
    let addr = mosquitto.addr;
    let ca = pki.server_ca.write(pki.path());
    let good_pw = pki.secret_file("mosq-pw");
    let bad_pw = pki.secret_file("nope");
    let creds = |pw: &Path| {
        format!(
            "username = \"gw-test\"\npassword_file = \"{}\"",
            pw.display()
        )
    };
    let client_cert = pki.client_cert_toml(&pki.client_ca);

    let good = config(
        pki.path(),
        &format!("{}{client_cert}", mqtts(addr, &ca, &creds(&good_pw))),
        "",
    );
    connect_outcome(&good).await.unwrap();

    let rogue = pki.rogue_ca.write(pki.path());
    let e = connect_outcome(&config(
        pki.path(),
        &format!("{}{client_cert}", mqtts(addr, &rogue, &creds(&good_pw))),
        "",
    ))
    .await
    .unwrap_err();
    assert!(e.contains("UnknownIssuer"), "{e}");

    let e = connect_outcome(&config(
        pki.path(),
        &format!("{}{client_cert}", mqtts(addr, &ca, &creds(&bad_pw))),
        "",
    ))
    .await
    .unwrap_err();
    assert!(e.contains("user name and password"), "{e}");

    let foreign = pki.client_cert_toml(&pki.rogue_ca);
    assert!(
        connect_outcome(&config(
            pki.path(),
            &format!("{}{foreign}", mqtts(addr, &ca, &creds(&good_pw))),
            "",
        ))
        .await
        .is_err()
    );
    assert!(
        connect_outcome(&config(pki.path(), &mqtts(addr, &ca, &creds(&good_pw)), ""))
            .await
            .is_err()
    );
    let plain = format!(
        "url = \"mqtt://127.0.0.1:{}\"\n{}",
        addr.port(),
        creds(&good_pw)
    );
    assert!(
        connect_outcome(&config(pki.path(), &plain, ""))
            .await
            .is_err()
    );
}
