//! The embedded MQTT broker (rumqttd), for gateways without Mosquitto and for the demo and tests.
//!
//! rumqttd's `Broker::start` blocks and has no shutdown, so the broker runs on its own thread for
//! the life of the process. It needs a concrete port: for port 0 we bind a free one, release it
//! and hand it over (a tiny race with other processes, acceptable for tests and the demo), then
//! wait until the broker accepts connections.
//!
//! Security ([`BrokerSecurity`]): `users` makes rumqttd require a user name and password
//! (compared in constant time by rumqttd). `tls` serves MQTT over TLS: the agent terminates TLS
//! itself (rustls 0.23, ring) in front of rumqttd, which then listens on a loopback port only.
//! rumqttd's own TLS listener is not used because it performs each handshake inline in its accept
//! loop without a timeout (one stalled client stops all new connections), rereads the key files
//! per connection and can only make client certificates mandatory at compile time. Here each
//! handshake runs in its own task with [`HANDSHAKE_TIMEOUT`], at most [`MAX_TLS_CONNECTIONS`] at
//! once, and `client_ca_file` turns on mutual TLS (a client without a certificate signed by that
//! CA is refused in the handshake). The inner loopback port is reachable by local processes on the
//! gateway: set `users` too where other local users are not trusted.
//!
//! Tested by `tests/tls.rs` (TLS, mutual TLS, credentials, plaintext to the TLS port).

use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rumqttd::{Broker, Config, ConnectionSettings, RouterConfig, ServerSettings};
use rustls::server::WebPkiClientVerifier;
use tokio::sync::Semaphore;

use crate::config::{MqttConfig, MqttProtocol};
use crate::tls::{TlsError, read_certs, read_key};

/// Longest a client may take to complete its TLS handshake with the embedded broker.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Most TLS connections (in handshake or open) at once; more wait in the kernel's accept queue.
pub const MAX_TLS_CONNECTIONS: usize = 10_000;

/// QoS 1 messages the embedded broker sends one connection before their acks: `MAX_INFLIGHT`
/// of the vendored rumqttd (`vendor/README.md`; 100 in rumqttd 0.20 as published). QoS 0
/// publishes are not counted: the vendored copy delivers them at QoS 0 (rumqttd 0.20 sent them
/// at the subscription's QoS). Tested in `tests/e2e.rs`
/// (`the_embedded_broker_sends_its_in_flight_window_before_any_ack`,
/// `the_embedded_broker_sends_qos_0_publishes_at_qos_0_outside_its_window`).
pub const MAX_INFLIGHT: usize = 1_000;

/// The agent's `mqtt.broker_max_inflight` when it reads from the embedded broker (it runs it
/// itself, or `edgewise-bench` does): half the window, so the broker keeps sending the other
/// half while a batch commits. With the whole window the broker stalled once per commit: in a
/// 30 s step at 100,000 msg/s (100 sensors, QoS 1) the agent had 18,764 of 2,999,902 messages
/// missing 2 s after the end; with half, none, at 0.47 cores (README, "Performance").
pub const AGENT_MAX_INFLIGHT: usize = MAX_INFLIGHT / 2;

/// Fits an agent's MQTT settings to reading from the embedded broker it runs itself
/// (`--embedded-broker`): MQTT 3.1.1 only (rumqttd's MQTT 5 listener is incomplete), and
/// `broker_max_inflight`, when not set, [`AGENT_MAX_INFLIGHT`] (the agent would assume 100).
pub fn fit_agent(mqtt: &mut MqttConfig) -> Result<(), BrokerError> {
    if mqtt.protocol == MqttProtocol::V5 {
        return Err(BrokerError::Mqtt5);
    }
    mqtt.broker_max_inflight.get_or_insert(AGENT_MAX_INFLIGHT);
    Ok(())
}

#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error(
        "--embedded-broker speaks MQTT 3.1.1 only (rumqttd's MQTT 5 listener is incomplete): \
         set mqtt.protocol = \"3.1.1\" or use an external broker"
    )]
    Mqtt5,
    #[error("no free port on {0}: {1}")]
    Port(SocketAddr, std::io::Error),
    #[error("starting the broker thread: {0}")]
    Thread(std::io::Error),
    #[error("the embedded broker did not accept connections on {0} within 10 s")]
    NotReady(SocketAddr),
    #[error("the broker's TLS settings: {0}")]
    Tls(#[from] TlsError),
}

/// Who may connect to the embedded broker. The default: anyone, in plaintext.
#[derive(Debug, Clone, Default)]
pub struct BrokerSecurity {
    /// Serve MQTT over TLS on the listen address.
    pub tls: Option<BrokerTls>,
    /// User name -> password; when not empty, every client must present one of them.
    pub users: HashMap<String, String>,
}

/// The embedded broker's TLS identity and, optionally, the CA that client certificates must
/// chain to (mutual TLS).
#[derive(Debug, Clone)]
pub struct BrokerTls {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    pub client_ca_file: Option<PathBuf>,
}

impl BrokerTls {
    /// The rustls server configuration (ring provider).
    pub fn server_config(&self) -> Result<Arc<rustls::ServerConfig>, TlsError> {
        let certs = read_certs("broker cert_file", &self.cert_file)?;
        let key = read_key("broker key_file", &self.key_file)?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()?;
        let builder = match &self.client_ca_file {
            Some(path) => {
                let mut roots = rustls::RootCertStore::empty();
                for cert in read_certs("broker client_ca_file", path)? {
                    roots.add(cert)?;
                }
                let verifier =
                    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                        .build()
                        .map_err(|e| rustls::Error::General(e.to_string()))?;
                builder.with_client_cert_verifier(verifier)
            }
            None => builder.with_no_client_auth(),
        };
        Ok(Arc::new(builder.with_single_cert(certs, key)?))
    }
}

/// A running embedded broker.
#[derive(Debug, Clone, Copy)]
pub struct EmbeddedBroker {
    pub addr: SocketAddr,
}

impl EmbeddedBroker {
    /// Starts a broker listening on `listen` (port 0: a free port) and waits until it is ready.
    pub fn start(
        listen: SocketAddr,
        max_payload_bytes: usize,
    ) -> Result<EmbeddedBroker, BrokerError> {
        Self::start_secure(listen, max_payload_bytes, &BrokerSecurity::default())
    }

    /// Like [`EmbeddedBroker::start`], with TLS and/or required credentials.
    pub fn start_secure(
        listen: SocketAddr,
        max_payload_bytes: usize,
        security: &BrokerSecurity,
    ) -> Result<EmbeddedBroker, BrokerError> {
        let Some(tls) = &security.tls else {
            return Self::start_rumqttd(listen, max_payload_bytes, &security.users);
        };
        let server_config = tls.server_config()?;
        let public = TcpListener::bind(listen).map_err(|e| BrokerError::Port(listen, e))?;
        let addr = public
            .local_addr()
            .map_err(|e| BrokerError::Port(listen, e))?;
        public
            .set_nonblocking(true)
            .map_err(|e| BrokerError::Port(addr, e))?;
        let inner = Self::start_rumqttd(
            SocketAddr::from(([127, 0, 0, 1], 0)),
            max_payload_bytes,
            &security.users,
        )?;
        std::thread::Builder::new()
            .name("mqtt-tls".into())
            .spawn(move || {
                let runtime = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        tracing::error!(error = %e, "embedded broker TLS front could not start");
                        return;
                    }
                };
                runtime.block_on(serve_tls(public, server_config, inner.addr));
            })
            .map_err(BrokerError::Thread)?;
        tracing::info!(%addr, inner = %inner.addr, mutual_tls = tls.client_ca_file.is_some(), "embedded broker serving MQTT over TLS");
        Ok(EmbeddedBroker { addr })
    }

    fn start_rumqttd(
        listen: SocketAddr,
        max_payload_bytes: usize,
        users: &HashMap<String, String>,
    ) -> Result<EmbeddedBroker, BrokerError> {
        let addr = if listen.port() == 0 {
            let l = TcpListener::bind(listen).map_err(|e| BrokerError::Port(listen, e))?;
            l.local_addr().map_err(|e| BrokerError::Port(listen, e))?
        } else {
            listen
        };
        let server = ServerSettings {
            name: "edgewise-v4".into(),
            listen: addr,
            tls: None,
            next_connection_delay_ms: 1,
            connections: ConnectionSettings {
                connection_timeout_ms: 60_000,
                max_payload_size: max_payload_bytes,
                max_inflight_count: 1000,
                auth: (!users.is_empty()).then(|| users.clone()),
                external_auth: None,
                dynamic_filters: true,
            },
        };
        let config = Config {
            id: 0,
            router: RouterConfig {
                max_connections: 10_010,
                max_outgoing_packet_count: 200,
                max_segment_size: 16 * 1024 * 1024,
                max_segment_count: 10,
                ..RouterConfig::default()
            },
            v4: Some(HashMap::from([("1".to_string(), server)])),
            ..Config::default()
        };
        std::thread::Builder::new()
            .name("mqtt-broker".into())
            .spawn(move || {
                let mut broker = Broker::new(config);
                if let Err(e) = broker.start() {
                    tracing::error!(error = %e, "embedded broker stopped");
                }
            })
            .map_err(BrokerError::Thread)?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
            if Instant::now() > deadline {
                return Err(BrokerError::NotReady(addr));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(EmbeddedBroker { addr })
    }
}

/// Accepts TLS connections on `public` and relays each to rumqttd at `inner`.
async fn serve_tls(public: TcpListener, config: Arc<rustls::ServerConfig>, inner: SocketAddr) {
    let listener = match tokio::net::TcpListener::from_std(public) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(error = %e, "embedded broker TLS listener failed");
            return;
        }
    };
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    let permits = Arc::new(Semaphore::new(MAX_TLS_CONNECTIONS));
    loop {
        let Ok(permit) = Arc::clone(&permits).acquire_owned().await else {
            return;
        };
        let (stream, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let acceptor = acceptor.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let mut tls =
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                    Ok(Ok(tls)) => tls,
                    Ok(Err(e)) => {
                        tracing::warn!(%peer, error = %e, "MQTT TLS handshake refused");
                        return;
                    }
                    Err(_) => {
                        tracing::warn!(%peer, "MQTT TLS handshake timed out");
                        return;
                    }
                };
            let mut upstream = match tokio::net::TcpStream::connect(inner).await {
                Ok(s) => s,
                Err(e) => {
                    tracing::error!(error = %e, "embedded broker unreachable behind the TLS front");
                    return;
                }
            };
            let _ = upstream.set_nodelay(true);
            // Ends when either side closes; errors only mean the connection is gone.
            let _ = tokio::io::copy_bidirectional(&mut tls, &mut upstream).await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_agent_on_its_own_embedded_broker_commits_at_half_its_window_over_mqtt_3_1_1_only() {
        let mut mqtt = MqttConfig::default();
        fit_agent(&mut mqtt).unwrap();
        assert_eq!(mqtt.broker_max_inflight, Some(AGENT_MAX_INFLIGHT));
        assert_eq!(AGENT_MAX_INFLIGHT * 2, MAX_INFLIGHT);
        // A limit the operator set stays.
        let mut mqtt = MqttConfig {
            broker_max_inflight: Some(20),
            ..MqttConfig::default()
        };
        fit_agent(&mut mqtt).unwrap();
        assert_eq!(mqtt.broker_max_inflight, Some(20));
        let mut mqtt = MqttConfig {
            protocol: MqttProtocol::V5,
            ..MqttConfig::default()
        };
        let e = fit_agent(&mut mqtt).unwrap_err();
        assert!(e.to_string().contains("MQTT 3.1.1 only"), "{e}");
    }
}
