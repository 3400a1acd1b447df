//! Any bytes through the decoder and a set of data contracts (unit conversion, range, deadband,
//! rate limit, required fields): never panics, kept values respect their contract, and a
//! rollback makes a second pass give exactly the same verdicts (with a state table larger than
//! any pack, so no stream is evicted in between). A tiny table exercises eviction.
#![no_main]

use edgewise_fuzz::decode::{DecodeLimits, PayloadDecoder, PayloadFormat, Value};
use edgewise_fuzz::filter::{Filter, FilterConfig, RequiredField};
use libfuzzer_sys::fuzz_target;

fn contracts() -> Vec<FilterConfig> {
    vec![
        FilterConfig {
            stream: "+/temperature".into(),
            unit: Some("Cel".into()),
            min: Some(-40.0),
            max: Some(85.0),
            deadband: Some(0.1),
            max_rate_per_second: Some(2.0),
            ..FilterConfig::default()
        }
        .with_conversion("K", 1.0, -273.15),
        FilterConfig {
            stream: "a/#".into(),
            required: vec![
                RequiredField::Unit,
                RequiredField::Time,
                RequiredField::Value,
            ],
            ..FilterConfig::default()
        },
        FilterConfig {
            stream: "#".into(),
            min: Some(0.0),
            deadband: Some(0.0),
            ..FilterConfig::default()
        },
    ]
}

/// One pass: every verdict, as (kept value bits or reason).
fn pass(
    filter: &mut Filter,
    decoder: &mut PayloadDecoder,
    payload: &[u8],
) -> Vec<Result<Option<u64>, &'static str>> {
    let mut verdicts = Vec::new();
    let _ = decoder.decode_each(
        "sensors/a/x",
        payload,
        PayloadFormat::Auto,
        1_700_000_000_000,
        |r| {
            let temperature = r.stream.split('/').nth(1) == Some("temperature")
                && r.stream.matches('/').count() == 1;
            let verdict = match filter.check(&r) {
                Ok(kept) => {
                    if temperature && let Some(Value::Number(x)) = kept.value {
                        assert!((-40.0..=85.0).contains(&x), "{r:?} kept as {x}");
                        assert!(kept.unit.is_none_or(|u| u == "Cel"), "{r:?}");
                    }
                    Ok(kept.value.and_then(|v| match v {
                        Value::Number(x) => Some(x.to_bits()),
                        _ => None,
                    }))
                }
                Err(rejected) => Err(rejected.rejection.reason()),
            };
            verdicts.push(verdict);
        },
    );
    verdicts
}

fuzz_target!(|data: &[u8]| {
    let mut decoder = PayloadDecoder::new(DecodeLimits::default());
    let mut tiny = match Filter::build(&contracts(), 4) {
        Ok(f) => f,
        Err(e) => panic!("contracts: {e}"),
    };
    pass(&mut tiny, &mut decoder, data);
    assert!(tiny.tracked_streams() <= 4);
    let max_streams = decoder.limits().max_records + 1;
    let mut filter = match Filter::build(&contracts(), max_streams) {
        Ok(f) => f,
        Err(e) => panic!("contracts: {e}"),
    };
    let first = pass(&mut filter, &mut decoder, data);
    filter.rollback();
    let second = pass(&mut filter, &mut decoder, data);
    assert_eq!(first, second, "rollback did not restore the contract state");
    let rejected = second.iter().filter(|v| v.is_err()).count();
    let mut counted = 0;
    filter.commit(|_| counted += 1);
    assert_eq!(counted, rejected);
});
