//! Any bytes, in any payload format: the decoder never panics, what it yields respects the
//! limits, its counts match, and the owned API agrees with the borrowed one.
#![no_main]

use edgewise_fuzz::decode::{PayloadFormat, check_both_apis};
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
    let _ = check_both_apis(TOPIC, payload, format, NOW_MS);
});
