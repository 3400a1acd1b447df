//! MQTT 3.1.1 packets a sensor node needs, encoded into and decoded from byte slices (no I/O).
//!
//! Encoded: CONNECT, PUBLISH (QoS 0 and 1), PINGREQ, DISCONNECT. Decoded: the fixed header of
//! anything, and CONNACK / PUBACK bodies. Invariants: an encoder writes the whole packet or
//! returns [`PacketError::BufferTooSmall`] (never a partial packet that looks valid); strings
//! are length-prefixed UTF-8 up to 65 535 bytes; remaining lengths use the spec's 1..=4 byte
//! variable-length integer. Tested below against bytes from the MQTT 3.1.1 specification's
//! layouts (sections 2.2, 3.1, 3.2, 3.3, 3.4).

use core::fmt;

/// MQTT control packet types (the high nibble of the first byte).
pub mod kind {
    pub const CONNECT: u8 = 1;
    pub const CONNACK: u8 = 2;
    pub const PUBLISH: u8 = 3;
    pub const PUBACK: u8 = 4;
    pub const PINGREQ: u8 = 12;
    pub const PINGRESP: u8 = 13;
    pub const DISCONNECT: u8 = 14;
}

/// Largest remaining length MQTT can express (4 varint bytes).
pub const MAX_REMAINING_LENGTH: usize = 268_435_455;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PacketError {
    /// The packet does not fit the buffer.
    BufferTooSmall,
    /// A string field is longer than 65 535 bytes, or the packet than MQTT allows.
    TooLong,
    /// Bytes that are not a valid MQTT packet of the expected kind.
    Malformed,
}

impl fmt::Display for PacketError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::BufferTooSmall => "MQTT packet does not fit the buffer",
            Self::TooLong => "MQTT field or packet too long",
            Self::Malformed => "malformed MQTT packet",
        })
    }
}

/// CONNECT options (MQTT 3.1.1, protocol level 4).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Connect<'a> {
    pub client_id: &'a str,
    pub keep_alive_s: u16,
    pub clean_session: bool,
    pub username: Option<&'a str>,
    pub password: Option<&'a [u8]>,
}

/// One PUBLISH; `packet_id` is required for QoS 1 and ignored for QoS 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Publish<'a> {
    pub topic: &'a str,
    pub payload: &'a [u8],
    pub qos1: bool,
    pub packet_id: u16,
    /// Set when re-sending a QoS 1 message that may have reached the broker.
    pub dup: bool,
    pub retain: bool,
}

/// CONNACK return codes (section 3.2.2.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectReturn {
    Accepted,
    UnacceptableProtocol,
    IdentifierRejected,
    ServerUnavailable,
    BadUsernameOrPassword,
    NotAuthorized,
    Other(u8),
}

impl ConnectReturn {
    fn from_code(code: u8) -> Self {
        match code {
            0 => Self::Accepted,
            1 => Self::UnacceptableProtocol,
            2 => Self::IdentifierRejected,
            3 => Self::ServerUnavailable,
            4 => Self::BadUsernameOrPassword,
            5 => Self::NotAuthorized,
            c => Self::Other(c),
        }
    }
}

/// A fixed header: packet type, its flags nibble, and the length of what follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub kind: u8,
    pub flags: u8,
    pub remaining: usize,
}

/// What parsing the start of a fixed header gave; running short is expected, not an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeaderParse {
    /// Header and the number of bytes it took.
    Complete(Header, usize),
    /// At least one more byte is needed.
    Incomplete,
}

/// Parse a fixed header from the start of `bytes`.
pub fn parse_header(bytes: &[u8]) -> Result<HeaderParse, PacketError> {
    let Some(&first) = bytes.first() else {
        return Ok(HeaderParse::Incomplete);
    };
    let mut remaining = 0usize;
    for i in 0..4 {
        let Some(&b) = bytes.get(1 + i) else {
            return Ok(HeaderParse::Incomplete);
        };
        remaining |= usize::from(b & 0x7F) << (7 * i);
        if b & 0x80 == 0 {
            let header = Header {
                kind: first >> 4,
                flags: first & 0x0F,
                remaining,
            };
            return Ok(HeaderParse::Complete(header, 2 + i));
        }
    }
    Err(PacketError::Malformed)
}

/// CONNACK body (2 bytes): session present, return code.
pub fn parse_connack(h: &Header, body: &[u8]) -> Result<(bool, ConnectReturn), PacketError> {
    match (h.kind, h.remaining, body) {
        (kind::CONNACK, 2, [flags, code]) if flags & 0xFE == 0 => {
            Ok((flags & 1 == 1, ConnectReturn::from_code(*code)))
        }
        _ => Err(PacketError::Malformed),
    }
}

/// PUBACK body (2 bytes): the packet id.
pub fn parse_puback(h: &Header, body: &[u8]) -> Result<u16, PacketError> {
    match (h.kind, h.remaining, body) {
        (kind::PUBACK, 2, [hi, lo]) => Ok(u16::from_be_bytes([*hi, *lo])),
        _ => Err(PacketError::Malformed),
    }
}

/// Writes into a slice, failing instead of overrunning.
struct Out<'b> {
    buf: &'b mut [u8],
    n: usize,
}

impl Out<'_> {
    fn byte(&mut self, b: u8) -> Result<(), PacketError> {
        self.bytes(&[b])
    }

    fn bytes(&mut self, b: &[u8]) -> Result<(), PacketError> {
        let dst = self
            .buf
            .get_mut(self.n..self.n + b.len())
            .ok_or(PacketError::BufferTooSmall)?;
        dst.copy_from_slice(b);
        self.n += b.len();
        Ok(())
    }

    fn u16(&mut self, v: u16) -> Result<(), PacketError> {
        self.bytes(&v.to_be_bytes())
    }

    fn binary(&mut self, b: &[u8]) -> Result<(), PacketError> {
        let len = u16::try_from(b.len()).map_err(|_| PacketError::TooLong)?;
        self.u16(len)?;
        self.bytes(b)
    }

    fn remaining_length(&mut self, mut len: usize) -> Result<(), PacketError> {
        if len > MAX_REMAINING_LENGTH {
            return Err(PacketError::TooLong);
        }
        loop {
            let mut b = (len % 128) as u8;
            len /= 128;
            if len > 0 {
                b |= 0x80;
            }
            self.byte(b)?;
            if len == 0 {
                return Ok(());
            }
        }
    }
}

fn string_len(s: &[u8]) -> Result<usize, PacketError> {
    if s.len() > usize::from(u16::MAX) {
        return Err(PacketError::TooLong);
    }
    Ok(2 + s.len())
}

/// Encode a CONNECT into `buf`; returns its length.
pub fn encode_connect(c: &Connect<'_>, buf: &mut [u8]) -> Result<usize, PacketError> {
    let mut flags = 0u8;
    if c.clean_session {
        flags |= 0x02;
    }
    let mut remaining = 10 + string_len(c.client_id.as_bytes())?;
    if let Some(u) = c.username {
        flags |= 0x80;
        remaining += string_len(u.as_bytes())?;
    }
    if let Some(p) = c.password {
        flags |= 0x40;
        remaining += string_len(p)?;
    }
    let mut out = Out { buf, n: 0 };
    out.byte(kind::CONNECT << 4)?;
    out.remaining_length(remaining)?;
    out.binary(b"MQTT")?;
    out.byte(4)?; // protocol level: 3.1.1
    out.byte(flags)?;
    out.u16(c.keep_alive_s)?;
    out.binary(c.client_id.as_bytes())?;
    if let Some(u) = c.username {
        out.binary(u.as_bytes())?;
    }
    if let Some(p) = c.password {
        out.binary(p)?;
    }
    Ok(out.n)
}

/// Encode everything of a PUBLISH that precedes the payload (fixed header, topic, packet id)
/// into `buf`; returns its length. The payload follows it on the wire unchanged.
pub fn encode_publish_header(p: &Publish<'_>, buf: &mut [u8]) -> Result<usize, PacketError> {
    let mut first = kind::PUBLISH << 4;
    if p.qos1 {
        first |= 0x02;
        if p.dup {
            first |= 0x08;
        }
    }
    if p.retain {
        first |= 0x01;
    }
    let id_len = if p.qos1 { 2 } else { 0 };
    let remaining = string_len(p.topic.as_bytes())? + id_len + p.payload.len();
    let mut out = Out { buf, n: 0 };
    out.byte(first)?;
    out.remaining_length(remaining)?;
    out.binary(p.topic.as_bytes())?;
    if p.qos1 {
        out.u16(p.packet_id)?;
    }
    Ok(out.n)
}

/// Encode a whole PUBLISH into `buf`; returns its length.
pub fn encode_publish(p: &Publish<'_>, buf: &mut [u8]) -> Result<usize, PacketError> {
    let n = encode_publish_header(p, buf)?;
    let mut out = Out { buf, n };
    out.bytes(p.payload)?;
    Ok(out.n)
}

pub const PINGREQ: [u8; 2] = [kind::PINGREQ << 4, 0];
pub const DISCONNECT: [u8; 2] = [kind::DISCONNECT << 4, 0];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_matches_the_spec_layout() {
        let mut buf = [0u8; 64];
        let n = encode_connect(
            &Connect {
                client_id: "node-1",
                keep_alive_s: 60,
                clean_session: true,
                username: None,
                password: None,
            },
            &mut buf,
        )
        .unwrap();
        assert_eq!(
            &buf[..n],
            &[
                0x10, 18, 0, 4, b'M', b'Q', b'T', b'T', 4, 0x02, 0, 60, 0, 6, b'n', b'o', b'd',
                b'e', b'-', b'1'
            ]
        );
        let n = encode_connect(
            &Connect {
                client_id: "c",
                keep_alive_s: 0x1234,
                clean_session: false,
                username: Some("u"),
                password: Some(b"pw"),
            },
            &mut buf,
        )
        .unwrap();
        assert_eq!(
            &buf[..n],
            &[
                0x10, 20, 0, 4, b'M', b'Q', b'T', b'T', 4, 0xC0, 0x12, 0x34, 0, 1, b'c', 0, 1,
                b'u', 0, 2, b'p', b'w'
            ]
        );
    }

    #[test]
    fn publish_qos1_qos0_dup_and_long_remaining_lengths() {
        let mut buf = [0u8; 400];
        let p = Publish {
            topic: "a/b",
            payload: &[0xAA, 0xBB],
            qos1: true,
            packet_id: 0x0102,
            dup: false,
            retain: false,
        };
        let n = encode_publish(&p, &mut buf).unwrap();
        assert_eq!(
            &buf[..n],
            &[0x32, 9, 0, 3, b'a', b'/', b'b', 1, 2, 0xAA, 0xBB]
        );
        let n = encode_publish(&Publish { dup: true, ..p }, &mut buf).unwrap();
        assert_eq!((buf[0], n), (0x3A, 11));
        let qos0 = Publish {
            qos1: false,
            dup: true,
            ..p
        };
        let n = encode_publish(&qos0, &mut buf).unwrap();
        assert_eq!(&buf[..n], &[0x30, 7, 0, 3, b'a', b'/', b'b', 0xAA, 0xBB]);

        // 323 bytes remaining: 0xC3 0x02 (spec 2.2.3: 128..=16383 take two bytes).
        let payload = [7u8; 316];
        let n = encode_publish(
            &Publish {
                payload: &payload,
                ..p
            },
            &mut buf,
        )
        .unwrap();
        assert_eq!(&buf[..3], &[0x32, 0xC3, 0x02]);
        assert_eq!(n, 3 + 323);
        match parse_header(&buf[..n]).unwrap() {
            HeaderParse::Complete(h, 3) => assert_eq!(h.remaining, 323),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn short_buffers_fail_for_every_length() {
        let p = Publish {
            topic: "sensors/n",
            payload: &[1, 2, 3],
            qos1: true,
            packet_id: 9,
            dup: false,
            retain: false,
        };
        let mut buf = [0u8; 64];
        let full = encode_publish(&p, &mut buf).unwrap();
        for len in 0..full {
            assert_eq!(
                encode_publish(&p, &mut buf[..len]),
                Err(PacketError::BufferTooSmall)
            );
        }
    }

    #[test]
    fn headers_connack_and_puback_parse_and_reject_garbage() {
        assert_eq!(parse_header(&[]), Ok(HeaderParse::Incomplete));
        assert_eq!(parse_header(&[0x20]), Ok(HeaderParse::Incomplete));
        assert_eq!(parse_header(&[0x30, 0x80]), Ok(HeaderParse::Incomplete));
        assert_eq!(
            parse_header(&[0x30, 0xFF, 0xFF, 0xFF, 0xFF]),
            Err(PacketError::Malformed)
        );
        let Ok(HeaderParse::Complete(h, 2)) = parse_header(&[0x20, 2, 1, 0]) else {
            panic!("a CONNACK header")
        };
        assert_eq!(
            parse_connack(&h, &[1, 0]),
            Ok((true, ConnectReturn::Accepted))
        );
        assert_eq!(
            parse_connack(&h, &[0, 5]),
            Ok((false, ConnectReturn::NotAuthorized))
        );
        assert_eq!(parse_connack(&h, &[2, 0]), Err(PacketError::Malformed));
        let Ok(HeaderParse::Complete(h, 2)) = parse_header(&[0x40, 2]) else {
            panic!("a PUBACK header")
        };
        assert_eq!(parse_puback(&h, &[0x01, 0x02]), Ok(0x0102));
        assert_eq!(parse_connack(&h, &[0, 0]), Err(PacketError::Malformed));
    }
}
