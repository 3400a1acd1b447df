//! An MQTT 3.1.1 publishing session over any `embedded_io_async::Read + Write` transport (a TCP
//! socket of embassy-net on a board, a tokio socket or an in-memory pipe on the host).
//!
//! One packet is in flight at a time: [`Session::publish`] with QoS 1 writes the PUBLISH and
//! returns only when the broker's PUBACK for that packet id arrived. Incoming packets that a
//! publish-only node does not expect (a PINGRESP, or a PUBLISH if the broker sends one) are read
//! and discarded. Invariants: no allocation (headers are built on the stack, payloads written as given); every
//! transport error and every protocol violation ends the session with an error, never a panic;
//! the session never retries by itself (the caller decides, see `crate::uplink`).
//!
//! There are no timeouts here: time is the runtime's business. Wrap calls in the runtime's
//! timeout (`embassy_time::with_timeout`, `tokio::time::timeout`) and drop the session when it
//! fires; a QoS 1 message stays queued until acknowledged, so cancelling is safe.
//!
//! Tested below against a scripted in-memory broker, and by `tests/uplink.rs` against a real one.

use core::fmt;

use embedded_io_async::{Read, ReadExactError, Write};

use super::packet::{
    self, Connect, ConnectReturn, Header, HeaderParse, PacketError, Publish, kind,
};

/// Why a session ended; `E` is the transport's error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MqttError<E> {
    Transport(E),
    /// The broker closed the connection.
    Closed,
    /// The broker refused the CONNECT.
    Refused(ConnectReturn),
    /// The broker sent something that is not the MQTT we expect.
    Protocol(PacketError),
    /// The packet cannot be encoded (topic or CONNECT fields too long).
    Encode(PacketError),
}

impl<E: fmt::Debug> fmt::Display for MqttError<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Transport(e) => write!(f, "MQTT transport error: {e:?}"),
            Self::Closed => f.write_str("the MQTT broker closed the connection"),
            Self::Refused(code) => write!(f, "the MQTT broker refused the connection: {code:?}"),
            Self::Protocol(e) => write!(f, "MQTT protocol error from the broker: {e}"),
            Self::Encode(e) => write!(f, "encoding an MQTT packet: {e}"),
        }
    }
}

impl<E: fmt::Debug> core::error::Error for MqttError<E> {}

impl<E> From<ReadExactError<E>> for MqttError<E> {
    fn from(e: ReadExactError<E>) -> Self {
        match e {
            ReadExactError::UnexpectedEof => Self::Closed,
            ReadExactError::Other(e) => Self::Transport(e),
        }
    }
}

/// Incoming bodies larger than this are read and dropped in pieces of this size.
const DISCARD_CHUNK: usize = 32;

/// Longest CONNECT (client id, user name and password together are limited by this).
pub const CONNECT_MAX_BYTES: usize = 192;
/// Longest PUBLISH topic.
pub const TOPIC_MAX_BYTES: usize = 128;

/// A connected MQTT session. It keeps no buffers: a PUBLISH is written as its header (built
/// on the stack) followed by the caller's payload.
pub struct Session<T> {
    transport: T,
    session_present: bool,
}

impl<T: Read + Write> Session<T> {
    /// Send CONNECT over `transport` and wait for an accepting CONNACK.
    pub async fn connect(
        mut transport: T,
        connect: &Connect<'_>,
    ) -> Result<Self, MqttError<T::Error>> {
        let mut buf = [0u8; CONNECT_MAX_BYTES];
        let n = packet::encode_connect(connect, &mut buf).map_err(MqttError::Encode)?;
        write_packet(&mut transport, &buf[..n]).await?;
        let header = read_header(&mut transport).await?;
        if header.kind != kind::CONNACK || header.remaining != 2 {
            return Err(MqttError::Protocol(PacketError::Malformed));
        }
        let mut body = [0u8; 2];
        transport.read_exact(&mut body).await?;
        let (session_present, code) =
            packet::parse_connack(&header, &body).map_err(MqttError::Protocol)?;
        if code != ConnectReturn::Accepted {
            return Err(MqttError::Refused(code));
        }
        Ok(Self {
            transport,
            session_present,
        })
    }

    /// A session over a transport on which CONNECT was already accepted (the state of a
    /// session is only its transport, so a caller may keep the transport and re-attach).
    pub fn attached(transport: T) -> Self {
        Self {
            transport,
            session_present: false,
        }
    }

    /// Whether the broker still had a session for this client id.
    pub fn session_present(&self) -> bool {
        self.session_present
    }

    /// Publish; with QoS 1, wait for the PUBACK of `p.packet_id`.
    pub async fn publish(&mut self, p: &Publish<'_>) -> Result<(), MqttError<T::Error>> {
        if p.topic.len() > TOPIC_MAX_BYTES {
            return Err(MqttError::Encode(PacketError::TooLong));
        }
        let mut header = [0u8; 5 + 2 + TOPIC_MAX_BYTES + 2];
        let n = packet::encode_publish_header(p, &mut header).map_err(MqttError::Encode)?;
        let t = &mut self.transport;
        t.write_all(&header[..n])
            .await
            .map_err(MqttError::Transport)?;
        write_packet(t, p.payload).await?;
        if !p.qos1 {
            return Ok(());
        }
        loop {
            let header = read_header(&mut self.transport).await?;
            if header.kind == kind::PUBACK {
                let mut body = [0u8; 2];
                if header.remaining != 2 {
                    return Err(MqttError::Protocol(PacketError::Malformed));
                }
                self.transport.read_exact(&mut body).await?;
                let id = packet::parse_puback(&header, &body).map_err(MqttError::Protocol)?;
                if id == p.packet_id {
                    return Ok(());
                }
                // An ack for an earlier attempt of another packet: not ours, keep waiting.
            } else {
                self.discard(&header).await?;
            }
        }
    }

    /// Send a PINGREQ (keep-alive). The PINGRESP is discarded by the next read.
    pub async fn ping(&mut self) -> Result<(), MqttError<T::Error>> {
        write_packet(&mut self.transport, &packet::PINGREQ).await
    }

    /// Send DISCONNECT and give the transport back.
    pub async fn disconnect(mut self) -> Result<T, MqttError<T::Error>> {
        write_packet(&mut self.transport, &packet::DISCONNECT).await?;
        Ok(self.transport)
    }

    async fn discard(&mut self, header: &Header) -> Result<(), MqttError<T::Error>> {
        let mut left = header.remaining;
        let mut chunk = [0u8; DISCARD_CHUNK];
        while left > 0 {
            let n = left.min(DISCARD_CHUNK);
            self.transport.read_exact(&mut chunk[..n]).await?;
            left -= n;
        }
        Ok(())
    }
}

async fn write_packet<T: Write>(t: &mut T, bytes: &[u8]) -> Result<(), MqttError<T::Error>> {
    t.write_all(bytes).await.map_err(MqttError::Transport)?;
    t.flush().await.map_err(MqttError::Transport)
}

async fn read_header<T: Read>(t: &mut T) -> Result<Header, MqttError<T::Error>> {
    let mut bytes = [0u8; 5];
    let mut n = 0;
    loop {
        t.read_exact(&mut bytes[n..n + 1]).await?;
        n += 1;
        match packet::parse_header(&bytes[..n]).map_err(MqttError::Protocol)? {
            HeaderParse::Complete(h, _) => return Ok(h),
            HeaderParse::Incomplete if n < bytes.len() => {}
            HeaderParse::Incomplete => return Err(MqttError::Protocol(PacketError::Malformed)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::block_on::block_on;
    use crate::mqtt::memory::MemoryLink;

    fn connect_opts() -> Connect<'static> {
        Connect {
            client_id: "n1",
            keep_alive_s: 30,
            clean_session: true,
            username: None,
            password: None,
        }
    }

    fn publish(id: u16) -> Publish<'static> {
        Publish {
            topic: "t",
            payload: b"x",
            qos1: true,
            packet_id: id,
            dup: false,
            retain: false,
        }
    }

    #[test]
    fn connect_publish_with_puback_then_disconnect() {
        // CONNACK; then a PINGRESP and a stray PUBACK arrive before ours.
        let replies = [0x20, 2, 0, 0, 0xD0, 0, 0x40, 2, 0, 9, 0x40, 2, 0, 1];
        let mut written = [0u8; 64];
        let mut link = MemoryLink::new(&replies, &mut written);
        block_on(async {
            let mut s = Session::connect(&mut link, &connect_opts()).await.unwrap();
            assert!(!s.session_present());
            s.publish(&publish(1)).await.unwrap();
            s.disconnect().await.unwrap();
        });
        assert_eq!(link.unread(), 0);
        let w = link.written();
        assert_eq!(w.len(), 16 + 8 + 2);
        assert_eq!(&w[..4], &[0x10, 14, 0, 4]);
        assert_eq!(&w[16..24], &[0x32, 6, 0, 1, b't', 0, 1, b'x']);
        assert_eq!(&w[24..], &[0xE0, 0]);
    }

    #[test]
    fn refused_closed_and_garbage_are_errors() {
        let mut written = [0u8; 64];
        let mut link = MemoryLink::new(&[0x20, 2, 0, 4], &mut written);
        let r = block_on(Session::connect(&mut link, &connect_opts()));
        assert!(matches!(
            r,
            Err(MqttError::Refused(ConnectReturn::BadUsernameOrPassword))
        ));

        let mut link = MemoryLink::new(&[], &mut written);
        let r = block_on(Session::connect(&mut link, &connect_opts()));
        assert!(matches!(r, Err(MqttError::Closed)));

        let mut link = MemoryLink::new(&[0x30, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF], &mut written);
        let r = block_on(Session::connect(&mut link, &connect_opts()));
        assert!(matches!(
            r,
            Err(MqttError::Protocol(PacketError::Malformed))
        ));

        // Accepted, but the connection drops before the PUBACK.
        let mut link = MemoryLink::new(&[0x20, 2, 0, 0], &mut written);
        let r = block_on(async {
            let mut s = Session::connect(&mut link, &connect_opts()).await?;
            s.publish(&publish(3)).await
        });
        assert_eq!(r, Err(MqttError::Closed));
    }

    #[test]
    fn a_topic_too_long_is_an_encode_error() {
        let mut written = [0u8; 64];
        let mut link = MemoryLink::new(&[0x20, 2, 0, 0], &mut written);
        let topic = [b'a'; TOPIC_MAX_BYTES + 1];
        let topic = core::str::from_utf8(&topic).unwrap();
        let r = block_on(async {
            let mut s = Session::connect(&mut link, &connect_opts()).await?;
            s.publish(&Publish {
                topic,
                ..publish(1)
            })
            .await
        });
        assert_eq!(r, Err(MqttError::Encode(PacketError::TooLong)));
    }
}
