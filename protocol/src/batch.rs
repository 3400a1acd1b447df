//! The batch an agent posts to the receiver's `POST /v1/ingest` (`Content-Type: application/cbor`).
//!
//! `version` is checked first: a receiver refuses a batch of a version it does not know, with a
//! clear error, instead of guessing at its fields.

use alloc::string::String;
use alloc::vec::Vec;
use minicbor::{Decode, Encode};

use crate::latest::LatestValue;
use crate::summary::WindowSummary;

/// What the agent's buffer had to evict when it was full: the cloud learns exactly what is
/// missing instead of losing it silently. Identified by `(agent_id, seq)`; `seq` increases per
/// agent, so a re-sent gap is recognised.
#[derive(Debug, Clone, PartialEq, Encode, Decode)]
#[cbor(map)]
pub struct Gap {
    #[n(0)]
    pub agent_id: String,
    #[n(1)]
    pub seq: u64,
    /// Streams whose summaries were evicted (at most [`Gap::MAX_STREAMS`] named).
    #[n(2)]
    pub streams: Vec<String>,
    /// Earliest window start and latest window end of what was evicted.
    #[n(3)]
    pub from_ms: i64,
    #[n(4)]
    pub to_ms: i64,
    /// Summaries evicted.
    #[n(5)]
    pub count: u64,
    /// Why, e.g. `buffer_full`.
    #[n(6)]
    pub reason: String,
    #[n(7)]
    pub recorded_at_ms: i64,
}

impl Gap {
    pub const MAX_STREAMS: usize = 64;
}

/// The batch format version this crate writes and reads.
pub const BATCH_VERSION: u16 = 1;

#[derive(Debug, Clone, PartialEq, Encode, Decode)]
#[cbor(map)]
pub struct Batch {
    #[n(0)]
    pub version: u16,
    #[n(1)]
    pub agent_id: String,
    /// Agent wall-clock time when the batch was built, ms since the Unix epoch (diagnostic only).
    #[n(2)]
    pub sent_at_ms: i64,
    #[n(3)]
    pub summaries: Vec<WindowSummary>,
    /// Eviction records; absent in batches without any.
    #[n(4)]
    #[cbor(default)]
    pub gaps: Vec<Gap>,
    /// Newest non-numeric value per stream; absent in batches without any.
    #[n(5)]
    #[cbor(default)]
    pub latest: Vec<LatestValue>,
}

#[derive(Debug)]
pub enum BatchError {
    /// The body is not a CBOR batch.
    Malformed(minicbor::decode::Error),
    UnsupportedVersion(u16),
}

impl core::fmt::Display for BatchError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::Malformed(e) => write!(f, "body is not a CBOR batch: {e}"),
            Self::UnsupportedVersion(v) => {
                write!(
                    f,
                    "batch version {v} is not supported (this receiver reads {BATCH_VERSION})"
                )
            }
        }
    }
}

#[cfg(feature = "std")]
impl std::error::Error for BatchError {}

impl Batch {
    pub fn new(agent_id: String, sent_at_ms: i64, summaries: Vec<WindowSummary>) -> Self {
        Batch {
            version: BATCH_VERSION,
            agent_id,
            sent_at_ms,
            summaries,
            gaps: Vec::new(),
            latest: Vec::new(),
        }
    }

    pub fn to_cbor(&self) -> Vec<u8> {
        // Encoding into a Vec cannot fail: the writer is infallible.
        minicbor::to_vec(self).unwrap_or_default()
    }

    pub fn from_cbor(bytes: &[u8]) -> Result<Self, BatchError> {
        let batch: Batch = minicbor::decode(bytes).map_err(BatchError::Malformed)?;
        if batch.version != BATCH_VERSION {
            return Err(BatchError::UnsupportedVersion(batch.version));
        }
        Ok(batch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::summary::tests::sample;
    use alloc::string::ToString;
    use alloc::vec;
    use proptest::prelude::*;

    #[test]
    fn round_trips() {
        let b = Batch::new("gw-1".to_string(), 42, vec![sample(), sample()]);
        assert_eq!(Batch::from_cbor(&b.to_cbor()).unwrap(), b);
    }

    /// A batch as the first agents wrote it: fields 0-3 only, no gaps and no latest values.
    #[derive(Encode)]
    #[cbor(map)]
    struct FirstBatch {
        #[n(0)]
        version: u16,
        #[n(1)]
        agent_id: String,
        #[n(2)]
        sent_at_ms: i64,
        #[n(3)]
        summaries: Vec<WindowSummary>,
    }

    #[test]
    fn gaps_and_latest_values_round_trip_and_are_optional_on_the_wire() {
        let mut b = Batch::new("gw-1".to_string(), 42, vec![sample()]);
        b.gaps.push(Gap {
            agent_id: "gw-1".to_string(),
            seq: 7,
            streams: vec!["n1/temperature".to_string()],
            from_ms: 0,
            to_ms: 10_000,
            count: 3,
            reason: "buffer_full".to_string(),
            recorded_at_ms: 11_000,
        });
        b.latest.push(LatestValue {
            stream: "n1/door".to_string(),
            time_ms: 5,
            value: crate::latest::StateValue::Text("open".to_string()),
        });
        assert_eq!(Batch::from_cbor(&b.to_cbor()).unwrap(), b);

        // An encoder that never wrote fields 4 and 5 (the first agents) is still understood.
        let old = minicbor::to_vec(FirstBatch {
            version: BATCH_VERSION,
            agent_id: "gw-1".to_string(),
            sent_at_ms: 42,
            summaries: vec![sample()],
        })
        .unwrap();
        assert_eq!(minicbor::Decoder::new(&old).map().unwrap(), Some(4));
        let decoded = Batch::from_cbor(&old).unwrap();
        assert_eq!(decoded.summaries, vec![sample()]);
        assert_eq!(decoded.gaps, vec![]);
        assert_eq!(decoded.latest, vec![]);
    }

    #[test]
    fn refuses_unknown_versions_and_garbage() {
        let mut b = Batch::new("gw-1".to_string(), 42, vec![]);
        b.version = 9;
        assert!(matches!(
            Batch::from_cbor(&b.to_cbor()),
            Err(BatchError::UnsupportedVersion(9))
        ));
        assert!(matches!(
            Batch::from_cbor(b"{\"json\": 1}"),
            Err(BatchError::Malformed(_))
        ));
        assert!(matches!(
            Batch::from_cbor(&[]),
            Err(BatchError::Malformed(_))
        ));
    }

    proptest! {
        #[test]
        fn any_summary_round_trips(
            stream in "[a-z0-9/_-]{1,40}",
            start in any::<i64>(),
            rev in any::<u32>(),
            count in any::<u64>(),
            vals in proptest::array::uniform6(any::<f64>().prop_filter("not NaN", |v| !v.is_nan())),
            unit in proptest::option::of("[A-Za-z%]{1,5}"),
        ) {
            let s = WindowSummary {
                agent_id: "gw".to_string(), stream, window_start_ms: start,
                window_end_ms: start.wrapping_add(1000), revision: rev, count,
                min: vals[0], max: vals[1], mean: vals[2], stddev: vals[3],
                first_value: vals[4], first_time_ms: start, last_value: vals[5],
                last_time_ms: start, unit, score: None, quantiles: None,
            };
            let b = Batch::new("gw".to_string(), 0, vec![s]);
            prop_assert_eq!(Batch::from_cbor(&b.to_cbor()).unwrap(), b);
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = Batch::from_cbor(&bytes);
        }
    }
}
