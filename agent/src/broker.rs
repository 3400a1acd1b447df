//! The embedded MQTT broker (rumqttd), for gateways without Mosquitto and for the demo and tests.
//!
//! rumqttd's `Broker::start` blocks and has no shutdown, so the broker runs on its own thread for
//! the life of the process. It needs a concrete port: for port 0 we bind a free one, release it
//! and hand it over (a tiny race with other processes, acceptable for tests and the demo), then
//! wait until the broker accepts connections.

use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use rumqttd::{Broker, Config, ConnectionSettings, RouterConfig, ServerSettings};

#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("no free port on {0}: {1}")]
    Port(SocketAddr, std::io::Error),
    #[error("starting the broker thread: {0}")]
    Thread(std::io::Error),
    #[error("the embedded broker did not accept connections on {0} within 10 s")]
    NotReady(SocketAddr),
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
                auth: None,
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
