//! SNTP (RFC 4330) without I/O: the 48-byte client request and the parse of the server's answer
//! into Unix milliseconds. A board has no wall clock: it asks the gateway once at boot and then
//! hourly, and stamps readings with `offset + uptime`.
//!
//! Invariants: a reply is accepted only if it is a server-mode answer (mode 4) of at least 48
//! bytes, not a kiss-o'-death (stratum 0), from a synchronised server (leap indicator not 3),
//! with a transmit time after 2020 (a zero or wrapped timestamp means an unsynchronised server).
//! Tested below with replies built by hand.

use core::fmt;

/// Seconds from 1900-01-01 (NTP era 0) to 1970-01-01.
const NTP_TO_UNIX_S: u64 = 2_208_988_800;
/// 2020-01-01T00:00:00Z in Unix ms: anything earlier is not a real time.
const EARLIEST_UNIX_MS: i64 = 1_577_836_800_000;
pub const PACKET_LEN: usize = 48;
pub const PORT: u16 = 123;

/// The client request: version 4, mode 3 (client), everything else zero.
pub fn request() -> [u8; PACKET_LEN] {
    let mut p = [0u8; PACKET_LEN];
    p[0] = (4 << 3) | 3;
    p
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SntpError {
    TooShort { len: usize },
    NotAServerReply { mode: u8 },
    KissOfDeath,
    Unsynchronised,
    Implausible { unix_ms: i64 },
}

impl fmt::Display for SntpError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::TooShort { len } => write!(f, "SNTP reply of {len} bytes, expected 48"),
            Self::NotAServerReply { mode } => write!(f, "SNTP reply has mode {mode}, expected 4"),
            Self::KissOfDeath => f.write_str("SNTP server sent a kiss-o'-death (stratum 0)"),
            Self::Unsynchronised => f.write_str("SNTP server is not synchronised"),
            Self::Implausible { unix_ms } => write!(f, "SNTP time {unix_ms} ms is before 2020"),
        }
    }
}

/// The server's transmit time, in Unix milliseconds.
pub fn parse_reply(reply: &[u8]) -> Result<i64, SntpError> {
    if reply.len() < PACKET_LEN {
        return Err(SntpError::TooShort { len: reply.len() });
    }
    let mode = reply[0] & 0x07;
    if mode != 4 {
        return Err(SntpError::NotAServerReply { mode });
    }
    if reply[0] >> 6 == 3 {
        return Err(SntpError::Unsynchronised);
    }
    if reply[1] == 0 {
        return Err(SntpError::KissOfDeath);
    }
    let secs = u64::from(u32::from_be_bytes([
        reply[40], reply[41], reply[42], reply[43],
    ]));
    let frac = u64::from(u32::from_be_bytes([
        reply[44], reply[45], reply[46], reply[47],
    ]));
    let unix_ms = (secs as i64 - NTP_TO_UNIX_S as i64) * 1_000 + ((frac * 1_000) >> 32) as i64;
    if unix_ms < EARLIEST_UNIX_MS {
        return Err(SntpError::Implausible { unix_ms });
    }
    Ok(unix_ms)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply(first: u8, stratum: u8, unix_s: u64, frac: u32) -> [u8; PACKET_LEN] {
        let mut p = [0u8; PACKET_LEN];
        p[0] = first;
        p[1] = stratum;
        p[40..44].copy_from_slice(&((unix_s + NTP_TO_UNIX_S) as u32).to_be_bytes());
        p[44..48].copy_from_slice(&frac.to_be_bytes());
        p
    }

    #[test]
    fn the_request_is_a_v4_client_packet() {
        let r = request();
        assert_eq!(r[0], 0x23);
        assert!(r[1..].iter().all(|&b| b == 0));
    }

    #[test]
    fn a_server_reply_gives_unix_milliseconds() {
        // 0x24: LI 0, version 4, mode 4; stratum 2; 1_700_000_000.25 s.
        let r = reply(0x24, 2, 1_700_000_000, 1 << 30);
        assert_eq!(parse_reply(&r), Ok(1_700_000_000_250));
    }

    #[test]
    fn bad_replies_are_refused() {
        let ok = reply(0x24, 2, 1_700_000_000, 0);
        assert_eq!(parse_reply(&ok[..47]), Err(SntpError::TooShort { len: 47 }));
        assert_eq!(
            parse_reply(&reply(0x23, 2, 1_700_000_000, 0)),
            Err(SntpError::NotAServerReply { mode: 3 })
        );
        assert_eq!(
            parse_reply(&reply(0x24, 0, 1_700_000_000, 0)),
            Err(SntpError::KissOfDeath)
        );
        assert_eq!(
            parse_reply(&reply(0xE4, 2, 1_700_000_000, 0)),
            Err(SntpError::Unsynchronised)
        );
        assert!(matches!(
            parse_reply(&reply(0x24, 2, 0, 0)),
            Err(SntpError::Implausible { .. })
        ));
    }
}
