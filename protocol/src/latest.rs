//! The latest value of a stream whose readings are not numbers: SenML text (`vs`), boolean
//! (`vb`) or data (`vd`) values, such as a door's "open"/"closed" or a firmware version string.
//!
//! Numeric readings go into windows; these do not aggregate, so the agent keeps only the newest
//! value per stream and passes it on. A batch carries at most one per stream; the receiver keeps
//! the one with the latest `time_ms` (a re-sent or older value changes nothing).

use alloc::string::String;
use alloc::vec::Vec;
use minicbor::{Decode, Encode};

/// A text, boolean or data value.
#[derive(Debug, Clone, PartialEq, Encode, Decode)]
pub enum StateValue {
    #[n(0)]
    Text(#[n(0)] String),
    #[n(1)]
    Bool(#[n(0)] bool),
    #[n(2)]
    Data(
        #[n(0)]
        #[cbor(with = "minicbor::bytes")]
        Vec<u8>,
    ),
}

impl StateValue {
    /// `text`, `bool` or `data`: the kind's name on the wire of the query API.
    pub fn kind(&self) -> &'static str {
        match self {
            StateValue::Text(_) => "text",
            StateValue::Bool(_) => "bool",
            StateValue::Data(_) => "data",
        }
    }
}

/// The newest non-numeric value of one stream of the batch's agent.
#[derive(Debug, Clone, PartialEq, Encode, Decode)]
#[cbor(map)]
pub struct LatestValue {
    #[n(0)]
    pub stream: String,
    /// Event time of the value, ms since the Unix epoch.
    #[n(1)]
    pub time_ms: i64,
    #[n(2)]
    pub value: StateValue,
}

/// Why a latest value is not acceptable to the receiver.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InvalidLatest {
    EmptyStream,
    /// A stream name longer than [`LatestValue::MAX_NAME_BYTES`].
    NameTooLong,
    /// A text or data value longer than [`LatestValue::MAX_VALUE_BYTES`].
    ValueTooLong,
}

impl core::fmt::Display for InvalidLatest {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::EmptyStream => f.write_str("stream is empty"),
            Self::NameTooLong => write!(
                f,
                "stream is longer than {} bytes",
                LatestValue::MAX_NAME_BYTES
            ),
            Self::ValueTooLong => write!(
                f,
                "value is longer than {} bytes",
                LatestValue::MAX_VALUE_BYTES
            ),
        }
    }
}

impl LatestValue {
    /// Longest accepted stream name, in bytes (as for summaries).
    pub const MAX_NAME_BYTES: usize = 256;
    /// Longest accepted text or data value, in bytes.
    pub const MAX_VALUE_BYTES: usize = 1024;

    /// Checks what every receiver must check before storing a latest value.
    pub fn validate(&self) -> Result<(), InvalidLatest> {
        if self.stream.is_empty() {
            return Err(InvalidLatest::EmptyStream);
        }
        if self.stream.len() > Self::MAX_NAME_BYTES {
            return Err(InvalidLatest::NameTooLong);
        }
        let len = match &self.value {
            StateValue::Text(s) => s.len(),
            StateValue::Bool(_) => 0,
            StateValue::Data(d) => d.len(),
        };
        if len > Self::MAX_VALUE_BYTES {
            return Err(InvalidLatest::ValueTooLong);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::string::ToString;
    use alloc::vec;
    use proptest::prelude::*;

    fn value() -> impl Strategy<Value = StateValue> {
        prop_oneof![
            ".{0,40}".prop_map(StateValue::Text),
            any::<bool>().prop_map(StateValue::Bool),
            proptest::collection::vec(any::<u8>(), 0..40).prop_map(StateValue::Data),
        ]
    }

    proptest! {
        #[test]
        fn round_trips(stream in "[a-z/]{1,30}", time_ms in any::<i64>(), value in value()) {
            let v = LatestValue { stream, time_ms, value };
            let bytes = minicbor::to_vec(&v).unwrap();
            prop_assert_eq!(minicbor::decode::<LatestValue>(&bytes).unwrap(), v);
        }
    }

    #[test]
    fn data_is_a_cbor_byte_string() {
        let v = StateValue::Data(vec![1, 2, 3]);
        let bytes = minicbor::to_vec(&v).unwrap();
        // [2, [h'010203']]: the variant index, then its one field, a byte string (major type
        // 2), not an array of numbers.
        assert_eq!(bytes, [0x82, 0x02, 0x81, 0x43, 1, 2, 3]);
    }

    #[test]
    fn validation_names_what_is_wrong() {
        let ok = LatestValue {
            stream: "door/state".to_string(),
            time_ms: 1,
            value: StateValue::Text("open".to_string()),
        };
        assert_eq!(ok.validate(), Ok(()));
        let empty = LatestValue {
            stream: String::new(),
            ..ok.clone()
        };
        assert_eq!(empty.validate(), Err(InvalidLatest::EmptyStream));
        let long_name = LatestValue {
            stream: "s".repeat(257),
            ..ok.clone()
        };
        assert_eq!(long_name.validate(), Err(InvalidLatest::NameTooLong));
        let long_value = LatestValue {
            value: StateValue::Data(vec![0; 1025]),
            ..ok.clone()
        };
        assert_eq!(long_value.validate(), Err(InvalidLatest::ValueTooLong));
        assert_eq!(
            InvalidLatest::ValueTooLong.to_string(),
            "value is longer than 1024 bytes"
        );
    }
}
