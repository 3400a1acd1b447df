//! SenML (RFC 8428) labels and a no-allocation CBOR record-pack encoder.
//!
//! A pack is a CBOR array of maps. The first record carries the base name (`bn`) and base time
//! (`bt`); each record carries its name (`n`), unit (`u`), value (`v`) and time (`t`, seconds
//! relative to `bt`). Integer labels are those of RFC 8428 section 6.

use minicbor::Encoder;
use minicbor::encode::write::{Cursor, EndOfSlice};

/// SenML CBOR map labels (RFC 8428, section 6, table 4).
pub mod label {
    pub const BASE_VERSION: i64 = -1;
    pub const BASE_NAME: i64 = -2;
    pub const BASE_TIME: i64 = -3;
    pub const BASE_UNIT: i64 = -4;
    pub const BASE_VALUE: i64 = -5;
    pub const BASE_SUM: i64 = -6;
    pub const NAME: i64 = 0;
    pub const UNIT: i64 = 1;
    pub const VALUE: i64 = 2;
    pub const STRING_VALUE: i64 = 3;
    pub const BOOL_VALUE: i64 = 4;
    pub const SUM: i64 = 5;
    pub const TIME: i64 = 6;
    pub const UPDATE_TIME: i64 = 7;
    pub const DATA_VALUE: i64 = 8;
}

/// One measurement in a pack, borrowed from the caller.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Record<'a> {
    /// Appended to the pack's base name to form the full name (the stream).
    pub name: &'a str,
    /// SenML unit symbol, e.g. `Cel`, `%RH`, `Pa`.
    pub unit: Option<&'a str>,
    pub value: f64,
    /// Seconds relative to the pack's base time.
    pub time_offset_s: f64,
}

/// The pack did not fit the buffer; nothing usable was written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BufferTooSmall;

impl core::fmt::Display for BufferTooSmall {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str("SenML pack does not fit the buffer")
    }
}

/// Encode `records` as a SenML CBOR pack into `buf`; returns the number of bytes written.
///
/// `base_time_s` is seconds since the Unix epoch (SenML `bt`). The base name goes into the first
/// record only, as RFC 8428 allows.
pub fn encode_pack(
    base_name: &str,
    base_time_s: f64,
    records: &[Record<'_>],
    buf: &mut [u8],
) -> Result<usize, BufferTooSmall> {
    let mut enc = Encoder::new(Cursor::new(buf));
    write_pack(&mut enc, base_name, base_time_s, records).map_err(|_| BufferTooSmall)?;
    Ok(enc.into_writer().position())
}

fn write_pack(
    enc: &mut Encoder<Cursor<&mut [u8]>>,
    base_name: &str,
    base_time_s: f64,
    records: &[Record<'_>],
) -> Result<(), minicbor::encode::Error<EndOfSlice>> {
    enc.array(records.len() as u64)?;
    for (i, r) in records.iter().enumerate() {
        let base_fields = if i == 0 { 2 } else { 0 };
        let fields = base_fields + 3 + u64::from(r.unit.is_some());
        enc.map(fields)?;
        if i == 0 {
            enc.i64(label::BASE_NAME)?.str(base_name)?;
            enc.i64(label::BASE_TIME)?.f64(base_time_s)?;
        }
        enc.i64(label::NAME)?.str(r.name)?;
        if let Some(u) = r.unit {
            enc.i64(label::UNIT)?.str(u)?;
        }
        enc.i64(label::VALUE)?.f64(r.value)?;
        enc.i64(label::TIME)?.f64(r.time_offset_s)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_a_pack_that_minicbor_reads_back() {
        let mut buf = [0u8; 128];
        let recs = [
            Record {
                name: "temp",
                unit: Some("Cel"),
                value: 21.5,
                time_offset_s: 0.0,
            },
            Record {
                name: "hum",
                unit: None,
                value: 40.0,
                time_offset_s: 1.0,
            },
        ];
        let n = encode_pack("node-1/", 1_700_000_000.0, &recs, &mut buf).unwrap();
        let mut d = minicbor::Decoder::new(&buf[..n]);
        assert_eq!(d.array().unwrap(), Some(2));
        assert_eq!(d.map().unwrap(), Some(6));
        assert_eq!(d.i64().unwrap(), label::BASE_NAME);
        assert_eq!(d.str().unwrap(), "node-1/");
        assert_eq!(d.i64().unwrap(), label::BASE_TIME);
        assert_eq!(d.f64().unwrap(), 1_700_000_000.0);
        assert_eq!(d.i64().unwrap(), label::NAME);
        assert_eq!(d.str().unwrap(), "temp");
        assert_eq!(d.i64().unwrap(), label::UNIT);
        assert_eq!(d.str().unwrap(), "Cel");
        assert_eq!(d.i64().unwrap(), label::VALUE);
        assert_eq!(d.f64().unwrap(), 21.5);
        assert_eq!(d.i64().unwrap(), label::TIME);
        assert_eq!(d.f64().unwrap(), 0.0);
        assert_eq!(d.map().unwrap(), Some(3));
    }

    #[test]
    fn too_small_a_buffer_is_an_error_not_a_panic() {
        let mut buf = [0u8; 8];
        let recs = [Record {
            name: "temp",
            unit: None,
            value: 1.0,
            time_offset_s: 0.0,
        }];
        assert_eq!(
            encode_pack("node-1/", 0.0, &recs, &mut buf),
            Err(BufferTooSmall)
        );
    }
}
