//! One MQTT connection of the agent, in either protocol version (`mqtt.protocol`): rumqttc's
//! 3.1.1 client or its MQTT 5 client behind one small interface, so the ingest loop does not
//! care which. What differs:
//! - MQTT 5 sends our receive maximum (`mqtt.receive_maximum`) in CONNECT: the broker sends a
//!   connection at most that many unacknowledged QoS 1 messages (Mosquitto uses it instead of
//!   its `max_inflight_messages`, 20 by default).
//! - The persistent session: 3.1.1 asks for it with `clean_session = false`; MQTT 5 with
//!   `clean_start = false` and a session expiry interval, here the largest (never expires, as a
//!   3.1.1 session), so messages published while the agent is down wait at the broker.

use std::time::Duration;

use bytes::Bytes;
use rumqttc::v5;
use rumqttc::{Outgoing, QoS, TlsConfiguration, Transport};

use crate::config::{AgentConfig, BrokerUrl, MqttProtocol};

/// MQTT packet ids are 16 bits, so a connection never has more unacked QoS 1 messages than this.
/// Sizing the request channel above it means an ack can never wait for a full channel while the
/// event loop waits for the pipeline: no deadlock.
const REQUEST_CHANNEL_CAPACITY: usize = u16::MAX as usize + 64;

/// MQTT 5 session expiry that means "never" (the 3.1.1 behaviour of `clean_session = false`).
const SESSION_NEVER_EXPIRES: u32 = u32::MAX;

/// Packet ids rumqttc's MQTT 5 client keeps for our own outgoing requests. The agent publishes
/// nothing, only subscribes; left unset, rumqttc sizes this table by the broker's receive
/// maximum (65,535 with Mosquitto): 14 MiB of memory the agent never uses.
const OUTGOING_INFLIGHT: u16 = 16;

/// A message as a connection received it: what the pipeline reads, and what its ack needs.
#[derive(Debug, Clone)]
pub struct Received {
    pub topic: String,
    pub payload: Bytes,
    pub qos: QoS,
    /// The packet id the ack names (0 for QoS 0).
    pub pkid: u16,
}

impl Received {
    /// Whether the broker waits for this message's ack (QoS 1 or 2; QoS 0 has none).
    pub fn needs_ack(&self) -> bool {
        self.qos != QoS::AtMostOnce
    }
}

/// What one poll of a connection produced, as the ingest loop needs it.
#[derive(Debug)]
pub enum Incoming {
    Publish(Received),
    ConnAck {
        session_present: bool,
    },
    SubAck,
    /// Our DISCONNECT went out.
    DisconnectSent,
    Other,
}

/// A failed poll: the error in words, and why it is a refusal (TLS or credentials) rather than
/// the network, if it is one.
#[derive(Debug)]
pub struct SessionError {
    pub message: String,
    pub refusal: Option<&'static str>,
}

impl std::fmt::Display for SessionError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

/// The client side of a connection: subscribes, acks, disconnects. Cheap to clone.
#[derive(Clone)]
pub enum Client {
    V311(rumqttc::AsyncClient),
    V5(v5::AsyncClient),
}

/// The event loop of a connection: polled by its task, and nothing else (as rumqttc requires).
pub enum Session {
    V311(Box<rumqttc::EventLoop>),
    V5 {
        eventloop: Box<v5::EventLoop>,
        /// The broker answered this connection attempt's CONNECT (see [`refusal_v5`]).
        connected: bool,
    },
}

/// Builds the client and event loop of connection `index` (`0..mqtt.connections`) from the
/// config: the protocol version, TLS for `mqtts://` (a certificate that does not verify fails
/// the connection, which is retried with back-off and logged; it never falls back to
/// plaintext), and the user name and password when configured.
pub fn connect(cfg: &AgentConfig, index: usize) -> Result<(Client, Session), String> {
    match cfg.mqtt.protocol {
        MqttProtocol::V311 => {
            let (client, eventloop) = connect_v311(cfg, index)?;
            Ok((Client::V311(client), Session::V311(Box::new(eventloop))))
        }
        MqttProtocol::V5 => {
            let (client, eventloop) = connect_v5(cfg, index)?;
            let session = Session::V5 {
                eventloop: Box::new(eventloop),
                connected: false,
            };
            Ok((Client::V5(client), session))
        }
    }
}

/// What both protocol versions take from the config.
struct Common {
    client_id: String,
    host: String,
    port: u16,
    keep_alive: Duration,
    transport: Option<Transport>,
    credentials: Option<(String, String)>,
}

fn common(cfg: &AgentConfig, index: usize) -> Result<Common, String> {
    let url = BrokerUrl::parse(&cfg.mqtt.url).map_err(|e| format!("mqtt.url: {e}"))?;
    let transport = if url.tls {
        let tls = cfg
            .mqtt
            .tls
            .client_config("mqtt.tls", &[])
            .map_err(|e| e.to_string())?;
        Some(Transport::tls_with_config(TlsConfiguration::Rustls(tls)))
    } else {
        None
    };
    let credentials = cfg
        .mqtt_credentials()
        .map_err(|e| e.to_string())?
        .map(|(user, password)| (user.to_string(), password.expose().to_string()));
    Ok(Common {
        client_id: cfg.connection_client_id(index),
        host: url.host,
        port: url.port,
        keep_alive: Duration::from_secs(cfg.mqtt.keep_alive_seconds),
        transport,
        credentials,
    })
}

/// The MQTT 3.1.1 client and event loop of connection `index` (see [`connect`]).
pub fn connect_v311(
    cfg: &AgentConfig,
    index: usize,
) -> Result<(rumqttc::AsyncClient, rumqttc::EventLoop), String> {
    let c = common(cfg, index)?;
    let mut opts = rumqttc::MqttOptions::new(c.client_id, c.host, c.port);
    opts.set_keep_alive(c.keep_alive)
        .set_clean_session(false)
        .set_manual_acks(true)
        .set_max_packet_size(cfg.mqtt.max_packet_bytes, cfg.mqtt.max_packet_bytes);
    if let Some(transport) = c.transport {
        opts.set_transport(transport);
    }
    if let Some((user, password)) = c.credentials {
        opts.set_credentials(user, password);
    }
    Ok(rumqttc::AsyncClient::new(opts, REQUEST_CHANNEL_CAPACITY))
}

/// The MQTT 5 client and event loop of connection `index` (see [`connect`]).
fn connect_v5(cfg: &AgentConfig, index: usize) -> Result<(v5::AsyncClient, v5::EventLoop), String> {
    let c = common(cfg, index)?;
    let mut opts = v5::MqttOptions::new(c.client_id, c.host, c.port);
    let max_packet = u32::try_from(cfg.mqtt.max_packet_bytes).unwrap_or(u32::MAX);
    opts.set_keep_alive(c.keep_alive)
        .set_clean_start(false)
        .set_session_expiry_interval(Some(SESSION_NEVER_EXPIRES))
        .set_receive_maximum(Some(cfg.mqtt.receive_maximum))
        .set_outgoing_inflight_upper_limit(OUTGOING_INFLIGHT)
        .set_manual_acks(true)
        .set_max_packet_size(Some(max_packet));
    if let Some(transport) = c.transport {
        opts.set_transport(transport);
    }
    if let Some((user, password)) = c.credentials {
        opts.set_credentials(user, password);
    }
    Ok(v5::AsyncClient::new(opts, REQUEST_CHANNEL_CAPACITY))
}

impl Client {
    /// Acknowledges a QoS 1 or 2 message (nothing for QoS 0). Fails only when the connection's
    /// task has ended.
    pub async fn ack(&self, message: &Received) -> Result<(), String> {
        match self {
            Client::V311(c) => {
                let mut p = rumqttc::Publish::new("", message.qos, Vec::new());
                p.pkid = message.pkid;
                c.ack(&p).await.map_err(|e| e.to_string())
            }
            Client::V5(c) => {
                let mut p =
                    v5::mqttbytes::v5::Publish::new("", qos_v5(message.qos), Vec::new(), None);
                p.pkid = message.pkid;
                c.ack(&p).await.map_err(|e| e.to_string())
            }
        }
    }

    /// Subscribes to `filters` with QoS 1.
    pub async fn subscribe(&self, filters: &[String]) -> Result<(), String> {
        match self {
            Client::V311(c) => c
                .subscribe_many(
                    filters
                        .iter()
                        .map(|t| rumqttc::SubscribeFilter::new(t.clone(), QoS::AtLeastOnce)),
                )
                .await
                .map_err(|e| e.to_string()),
            Client::V5(c) => c
                .subscribe_many(filters.iter().map(|t| {
                    v5::mqttbytes::v5::Filter::new(t.clone(), v5::mqttbytes::QoS::AtLeastOnce)
                }))
                .await
                .map_err(|e| e.to_string()),
        }
    }

    /// Queues a DISCONNECT behind the requests already queued (the last acks).
    pub fn try_disconnect(&self) -> Result<(), String> {
        match self {
            Client::V311(c) => c.try_disconnect().map_err(|e| e.to_string()),
            Client::V5(c) => c.try_disconnect().map_err(|e| e.to_string()),
        }
    }
}

impl Session {
    /// The next event of the connection (connecting first if it is not connected).
    pub async fn poll(&mut self) -> Result<Incoming, SessionError> {
        match self {
            Session::V311(e) => match e.poll().await {
                Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(p))) => {
                    Ok(Incoming::Publish(Received {
                        topic: p.topic,
                        payload: p.payload,
                        qos: p.qos,
                        pkid: p.pkid,
                    }))
                }
                Ok(rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(ack))) => {
                    Ok(Incoming::ConnAck {
                        session_present: ack.session_present,
                    })
                }
                Ok(rumqttc::Event::Incoming(rumqttc::Packet::SubAck(_))) => Ok(Incoming::SubAck),
                Ok(rumqttc::Event::Outgoing(Outgoing::Disconnect)) => Ok(Incoming::DisconnectSent),
                Ok(_) => Ok(Incoming::Other),
                Err(e) => Err(SessionError {
                    message: e.to_string(),
                    refusal: refusal(&e),
                }),
            },
            Session::V5 {
                eventloop,
                connected,
            } => {
                use v5::mqttbytes::v5::Packet;
                match eventloop.poll().await {
                    Ok(v5::Event::Incoming(Packet::Publish(p))) => {
                        Ok(Incoming::Publish(Received {
                            // MQTT requires UTF-8 topics and the broker checks them; should
                            // one be broken, its bad bytes become U+FFFD and the message goes
                            // on to the pipeline like any other rather than vanishing here.
                            topic: match String::from_utf8(p.topic.to_vec()) {
                                Ok(t) => t,
                                Err(e) => String::from_utf8_lossy(e.as_bytes()).into_owned(),
                            },
                            payload: p.payload,
                            qos: qos_v311(p.qos),
                            pkid: p.pkid,
                        }))
                    }
                    Ok(v5::Event::Incoming(Packet::ConnAck(ack))) => {
                        *connected = true;
                        Ok(Incoming::ConnAck {
                            session_present: ack.session_present,
                        })
                    }
                    Ok(v5::Event::Incoming(Packet::SubAck(_))) => Ok(Incoming::SubAck),
                    Ok(v5::Event::Outgoing(Outgoing::Disconnect)) => Ok(Incoming::DisconnectSent),
                    Ok(_) => Ok(Incoming::Other),
                    Err(e) => {
                        let answered = std::mem::replace(connected, false);
                        Err(SessionError {
                            message: e.to_string(),
                            refusal: refusal_v5(&e, answered),
                        })
                    }
                }
            }
        }
    }
}

fn qos_v5(q: QoS) -> v5::mqttbytes::QoS {
    match q {
        QoS::AtMostOnce => v5::mqttbytes::QoS::AtMostOnce,
        QoS::AtLeastOnce => v5::mqttbytes::QoS::AtLeastOnce,
        QoS::ExactlyOnce => v5::mqttbytes::QoS::ExactlyOnce,
    }
}

fn qos_v311(q: v5::mqttbytes::QoS) -> QoS {
    match q {
        v5::mqttbytes::QoS::AtMostOnce => QoS::AtMostOnce,
        v5::mqttbytes::QoS::AtLeastOnce => QoS::AtLeastOnce,
        v5::mqttbytes::QoS::ExactlyOnce => QoS::ExactlyOnce,
    }
}

const TLS_FAILED: &str = "the TLS handshake failed (broker certificate not trusted, expired or for \
                          another host, or our client certificate refused); not falling back to \
                          plaintext";
const BAD_CREDENTIALS: &str =
    "the broker refused our user name and password (mqtt.username, mqtt.password_file)";
// With TLS 1.3 the server checks our certificate after our side of the handshake is done, so its
// refusal arrives as an alert on the first read.
const TLS_ALERT: &str = "the broker ended the TLS session with an alert: usually our client \
                         certificate (mqtt.tls.client_cert_file) is missing or not signed by a \
                         CA it trusts";
// Bytes that do not frame as MQTT, typically a TLS server's alert read by a plaintext client.
const NOT_MQTT: &str = "the broker answered with bytes that are not MQTT: if that port serves \
                        TLS, use mqtts:// (and [mqtt.tls])";

const NO_MQTT5: &str = "the broker does not speak MQTT 5 (it refused or dropped our MQTT 5 \
                        CONNECT; the embedded broker speaks 3.1.1 only): set mqtt.protocol = \
                        \"3.1.1\"";

/// Why an MQTT 3.1.1 connection error is a refusal (TLS or credentials) rather than the
/// network, in words.
fn refusal(e: &rumqttc::ConnectionError) -> Option<&'static str> {
    use rumqttc::{ConnectReturnCode, ConnectionError, StateError};
    match e {
        ConnectionError::Tls(_) => Some(TLS_FAILED),
        ConnectionError::ConnectionRefused(
            ConnectReturnCode::BadUserNamePassword | ConnectReturnCode::NotAuthorized,
        ) => Some(BAD_CREDENTIALS),
        ConnectionError::MqttState(state) if state.to_string().contains("received fatal alert") => {
            Some(TLS_ALERT)
        }
        ConnectionError::MqttState(StateError::Deserialization(framing))
            if !matches!(framing, rumqttc::mqttbytes::Error::Io(_)) =>
        {
            Some(NOT_MQTT)
        }
        _ => None,
    }
}

/// [`refusal`] for MQTT 5 connections; also names a broker that does not speak MQTT 5: one
/// that refuses the protocol version, or closes the connection before answering our CONNECT
/// (`answered` false; rumqttd and other 3.1.1-only brokers do that).
fn refusal_v5(e: &v5::ConnectionError, answered: bool) -> Option<&'static str> {
    use v5::mqttbytes::v5::ConnectReturnCode;
    use v5::{ConnectionError, StateError};
    match e {
        ConnectionError::Tls(_) => Some(TLS_FAILED),
        ConnectionError::ConnectionRefused(
            ConnectReturnCode::BadUserNamePassword | ConnectReturnCode::NotAuthorized,
        ) => Some(BAD_CREDENTIALS),
        ConnectionError::ConnectionRefused(
            ConnectReturnCode::RefusedProtocolVersion
            | ConnectReturnCode::UnsupportedProtocolVersion,
        ) => Some(NO_MQTT5),
        ConnectionError::MqttState(StateError::ConnectionAborted) if !answered => Some(NO_MQTT5),
        ConnectionError::MqttState(state) if state.to_string().contains("received fatal alert") => {
            Some(TLS_ALERT)
        }
        ConnectionError::MqttState(StateError::Deserialization(framing))
            if !matches!(framing, v5::mqttbytes::Error::Io(_)) =>
        {
            Some(NOT_MQTT)
        }
        _ => None,
    }
}
