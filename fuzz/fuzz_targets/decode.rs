//! Any bytes, in any payload format: the decoder never panics, what it yields respects the
//! limits, its counts match, and the owned API agrees with the borrowed one.
#![no_main]

use edgewise_fuzz::decode::{DecodeLimits, PayloadDecoder, PayloadFormat, Value, decode};
use libfuzzer_sys::fuzz_target;

const TOPIC: &str = "sensors/node-1/temperature";
const NOW_MS: i64 = 1_700_000_000_000;

fuzz_target!(|data: &[u8]| {
    let Some((&selector, payload)) = data.split_first() else {
        return;
    };
    let format = match selector % 4 {
        0 => PayloadFormat::Auto,
        1 => PayloadFormat::SenmlJson,
        2 => PayloadFormat::SenmlCbor,
        _ => PayloadFormat::PlainJson,
    };
    let limits = DecodeLimits {
        max_payload_bytes: 64 * 1024,
        max_records: 256,
        max_name_bytes: 64,
    };
    let mut decoder = PayloadDecoder::new(limits.clone());
    let (mut numeric, mut other) = (0, 0);
    let result = decoder.decode_each(TOPIC, payload, format, NOW_MS, |r| {
        assert!(!r.stream.is_empty() && r.stream.len() <= 64, "{r:?}");
        assert!(r.unit.is_none_or(|u| u.len() <= 64), "{r:?}");
        assert!(r.sum.is_none_or(f64::is_finite), "{r:?}");
        match r.value {
            Some(Value::Number(x)) => {
                assert!(x.is_finite());
                numeric += 1;
            }
            None => {
                assert!(r.sum.is_some(), "{r:?}");
                other += 1;
            }
            Some(_) => other += 1,
        }
    });
    let mut owned = Vec::new();
    let again = decode(TOPIC, payload, format, &limits, NOW_MS, &mut owned);
    match result {
        Ok(d) => {
            assert_eq!((d.readings, d.non_numeric), (numeric, other));
            assert_eq!(again, Ok(d));
            assert_eq!(owned.len(), numeric);
        }
        Err(e) => {
            assert!(!e.reason().is_empty() && !e.to_string().is_empty());
            assert_eq!(again, Err(e));
            assert!(owned.is_empty());
        }
    }
});
