//! Per-stream data contracts: which readings are accepted, and in which unit.
//!
//! A contract (`[[contract]]` in the config; the old name `[[filter]]` still works) names a
//! stream pattern in MQTT wildcard syntax over the `/`-separated stream name (`+` matches one
//! level, `#` the rest), e.g. `+/temperature` or `node-7/#`. The first contract whose pattern
//! matches a stream applies; a stream no contract matches is accepted as is. A contract checks,
//! in this order:
//!
//! 1. `required`: fields the reading must carry (`unit`, `time`, `value` = a numeric value,
//!    `sum`) -> `missing_unit`, `missing_time`, `missing_value`, `missing_sum`;
//! 2. `unit`: a reading with another unit is converted when `convert` declares that unit
//!    (`value * scale + offset`), else refused (`wrong_unit`); a reading without a unit is taken
//!    to be in the expected unit (add `required = ["unit"]` to refuse it);
//! 3. `min` / `max` (inclusive, after conversion) -> `out_of_range`;
//! 4. `deadband`: a numeric reading within +-deadband of the last kept one is dropped
//!    (`deadband`; OPC UA semantics: kept only when `|v - last| > deadband`);
//! 5. `max_rate_per_second`: a token bucket per stream in event time (burst of one second's
//!    worth, at least one reading); a reading without a token is dropped (`rate_limited`).
//!
//! Non-numeric readings (SenML `vs`, `vb`, `vd`, sum only) go through `required`, the unit check
//! (without conversion) and the rate limit.
//!
//! # State and its bounds
//!
//! Deadband and rate state is kept per stream in a table of at most `max_streams` entries;
//! when a new stream finds it full, the least recently used entry (CLOCK approximation) is
//! forgotten and counted ([`Filter::state_evictions`]): memory is bounded, and a forgotten
//! stream starts afresh. The table also caches which contract a stream matched, so patterns are
//! matched once per stream, not per reading. Lookups borrow the stream name: after warm-up
//! a reading of a known stream costs no allocation.
//!
//! State changes are transactional so the pipeline can keep its promise that a failed journal
//! commit changes nothing: [`Filter::mark`] / [`Filter::rollback_to`] undo the checks made
//! since a mark (a message that failed to decode half-way, a reading the window refused,
//! a whole batch whose commit failed), and [`Filter::commit`] makes them final and hands over
//! the rejections to count.
//!
//! Pure: no I/O. Tested by the unit tests below.

use std::collections::{BTreeMap, HashMap};

use serde::Deserialize;

use crate::decode::{ReadingRef, Value};

/// A field a contract can require.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RequiredField {
    /// A unit (`u`/`bu`, or `unit` in plain JSON).
    Unit,
    /// A time from the payload (`t`/`bt`, or `ts`), not the time of arrival.
    Time,
    /// A numeric value (refuses text, boolean, data and sum-only readings).
    Value,
    /// A sum (`s`/`bs`).
    Sum,
}

/// A linear unit conversion into the contract's unit: `value * scale + offset`.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UnitConversion {
    #[serde(default = "one")]
    pub scale: f64,
    #[serde(default)]
    pub offset: f64,
}

fn one() -> f64 {
    1.0
}

/// One contract as written in the config (`[[contract]]`).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FilterConfig {
    /// Stream pattern, MQTT wildcard syntax.
    pub stream: String,
    /// Expected unit (SenML unit name, e.g. `Cel`).
    pub unit: Option<String>,
    /// Units converted into `unit`, by name: `convert.K = { offset = -273.15 }`.
    #[serde(default)]
    pub convert: BTreeMap<String, UnitConversion>,
    /// Smallest valid value (inclusive, in `unit`).
    pub min: Option<f64>,
    /// Largest valid value (inclusive, in `unit`).
    pub max: Option<f64>,
    /// Drop a numeric reading within +-deadband of the last kept one.
    pub deadband: Option<f64>,
    /// Readings kept per second of event time, per stream; the excess is dropped.
    pub max_rate_per_second: Option<f64>,
    /// Fields every reading must carry.
    #[serde(default)]
    pub required: Vec<RequiredField>,
}

impl FilterConfig {
    /// The same contract, also converting `from` into `unit` by `value * scale + offset`.
    pub fn with_conversion(mut self, from: &str, scale: f64, offset: f64) -> Self {
        self.convert
            .insert(from.to_string(), UnitConversion { scale, offset });
        self
    }

    /// `(field, message)` for each problem in this contract.
    pub fn problems(&self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        let mut bad = |field: &str, msg: String| out.push((field.to_string(), msg));
        if let Err(e) = RulePattern::parse(&self.stream) {
            bad("stream", e);
        }
        for (field, v) in [("min", self.min), ("max", self.max)] {
            if v.is_some_and(|v| !v.is_finite()) {
                bad(field, "must be a finite number".to_string());
            }
        }
        if let (Some(lo), Some(hi)) = (self.min, self.max)
            && lo > hi
        {
            bad("max", format!("max ({hi}) is below min ({lo})"));
        }
        if self.deadband.is_some_and(|d| !(d.is_finite() && d >= 0.0)) {
            bad("deadband", "must be a finite number, 0 or more".to_string());
        }
        if self
            .max_rate_per_second
            .is_some_and(|r| !(r.is_finite() && r > 0.0))
        {
            bad(
                "max_rate_per_second",
                "must be a finite number above 0".to_string(),
            );
        }
        if self.unit.as_deref() == Some("") {
            bad(
                "unit",
                "must not be empty (leave it out for any unit)".into(),
            );
        }
        if !self.convert.is_empty() && self.unit.is_none() {
            bad(
                "convert",
                "converts into `unit`, which is not set".to_string(),
            );
        }
        for (from, c) in &self.convert {
            let key = format!("convert.{from}");
            if Some(from) == self.unit.as_ref() {
                bad(&key, "converts the expected unit into itself".to_string());
            }
            if !(c.scale.is_finite() && c.scale != 0.0) {
                bad(&format!("{key}.scale"), "must be finite and not 0".into());
            }
            if !c.offset.is_finite() {
                bad(&format!("{key}.offset"), "must be finite".into());
            }
        }
        out
    }
}

/// A parsed MQTT-style pattern over `/`-separated names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RulePattern {
    levels: Vec<Level>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Level {
    Exact(String),
    One,
    Rest,
}

impl RulePattern {
    pub fn parse(pattern: &str) -> Result<RulePattern, String> {
        if pattern.is_empty() {
            return Err("pattern must not be empty".into());
        }
        let parts: Vec<&str> = pattern.split('/').collect();
        let mut levels = Vec::with_capacity(parts.len());
        for (i, part) in parts.iter().enumerate() {
            levels.push(match *part {
                "#" if i + 1 == parts.len() => Level::Rest,
                "#" => return Err(format!("`{pattern}`: `#` may only be the last level")),
                "+" => Level::One,
                p if p.contains(['#', '+']) => {
                    return Err(format!(
                        "`{pattern}`: wildcards must stand alone in a level"
                    ));
                }
                p => Level::Exact(p.to_string()),
            });
        }
        Ok(RulePattern { levels })
    }

    pub fn matches(&self, name: &str) -> bool {
        let mut parts = name.split('/');
        for level in &self.levels {
            match level {
                Level::Rest => return true,
                Level::One => {
                    if parts.next().is_none() {
                        return false;
                    }
                }
                Level::Exact(want) => {
                    if parts.next() != Some(want.as_str()) {
                        return false;
                    }
                }
            }
        }
        parts.next().is_none()
    }
}

/// Why a reading was refused by its contract.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Rejection {
    Missing(RequiredFieldTag),
    WrongUnit,
    OutOfRange,
    Deadband,
    RateLimited,
}

/// [`RequiredField`] as a small ordered key (for counting).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum RequiredFieldTag {
    Unit,
    Time,
    Value,
    Sum,
}

impl From<RequiredField> for RequiredFieldTag {
    fn from(f: RequiredField) -> Self {
        match f {
            RequiredField::Unit => RequiredFieldTag::Unit,
            RequiredField::Time => RequiredFieldTag::Time,
            RequiredField::Value => RequiredFieldTag::Value,
            RequiredField::Sum => RequiredFieldTag::Sum,
        }
    }
}

impl Rejection {
    /// Every reason label, for documentation and tests.
    pub const REASONS: [&'static str; 8] = [
        "missing_unit",
        "missing_time",
        "missing_value",
        "missing_sum",
        "wrong_unit",
        "out_of_range",
        "deadband",
        "rate_limited",
    ];

    /// Label for metrics and dead letters.
    pub fn reason(self) -> &'static str {
        match self {
            Rejection::Missing(RequiredFieldTag::Unit) => "missing_unit",
            Rejection::Missing(RequiredFieldTag::Time) => "missing_time",
            Rejection::Missing(RequiredFieldTag::Value) => "missing_value",
            Rejection::Missing(RequiredFieldTag::Sum) => "missing_sum",
            Rejection::WrongUnit => "wrong_unit",
            Rejection::OutOfRange => "out_of_range",
            Rejection::Deadband => "deadband",
            Rejection::RateLimited => "rate_limited",
        }
    }
}

/// A compiled contract.
#[derive(Debug)]
struct Contract {
    pattern: RulePattern,
    /// The pattern as written: the metrics label.
    label: String,
    unit: Option<String>,
    convert: Vec<(String, UnitConversion)>,
    min: f64,
    max: f64,
    deadband: Option<f64>,
    rate: Option<f64>,
    required: Vec<RequiredField>,
}

impl Contract {
    fn stateful(&self) -> bool {
        self.deadband.is_some() || self.rate.is_some()
    }
}

/// No contract matched the stream.
const NO_CONTRACT: u32 = u32::MAX;

/// Deadband and rate state of one stream: what a rollback restores.
#[derive(Debug, Clone, Copy, PartialEq)]
struct StreamState {
    /// Last kept numeric value (converted), NaN before the first.
    last_kept: f64,
    tokens: f64,
    /// Event time of the last refill, `i64::MIN` before the first reading.
    refill_ms: i64,
}

impl StreamState {
    const FRESH: StreamState = StreamState {
        last_kept: f64::NAN,
        tokens: 0.0,
        refill_ms: i64::MIN,
    };
}

#[derive(Debug)]
struct Slot {
    name: Box<str>,
    contract: u32,
    /// Bumped when the slot is given to another stream, so stale undo entries are skipped.
    generation: u32,
    /// CLOCK reference bit.
    referenced: bool,
    state: StreamState,
}

/// A reading the contract accepted, with its value in the contract's unit.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Kept<'x> {
    pub value: Option<Value<'x>>,
    pub unit: Option<&'x str>,
    /// Whether the value was converted from another unit.
    pub converted: bool,
}

/// Which contract refused a reading (for sampling).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ContractId(u32);

/// A refused reading: why, and by which contract.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rejected {
    pub rejection: Rejection,
    pub contract: ContractId,
}

/// Where [`Filter::rollback_to`] returns to.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Mark {
    undo: usize,
    pending: usize,
    names: usize,
}

/// A rejection handed to [`Filter::commit`]'s callback.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Counted<'x> {
    /// The contract's pattern, as written.
    pub contract: &'x str,
    pub stream: &'x str,
    pub rejection: Rejection,
}

#[derive(Debug)]
struct Pending {
    contract: u32,
    rejection: Rejection,
    name: std::ops::Range<usize>,
}

/// The compiled contracts and their per-stream state.
#[derive(Debug)]
pub struct Filter {
    contracts: Vec<Contract>,
    /// Hashed with foldhash, as [`crate::window::StreamMap`].
    index: HashMap<Box<str>, u32, foldhash::fast::RandomState>,
    slots: Vec<Slot>,
    max_streams: usize,
    /// CLOCK hand.
    hand: usize,
    evictions: u64,
    undo: Vec<(u32, u32, StreamState)>,
    pending: Vec<Pending>,
    /// Stream names of the pending rejections, back to back.
    names: String,
}

impl Filter {
    /// Default size of the per-stream state table.
    pub const DEFAULT_MAX_STREAMS: usize = 16_384;

    /// Compiles the contracts; call after [`FilterConfig::problems`] reported none.
    pub fn build(configs: &[FilterConfig], max_streams: usize) -> Result<Filter, String> {
        let contracts = configs
            .iter()
            .map(|c| {
                Ok(Contract {
                    pattern: RulePattern::parse(&c.stream)?,
                    label: c.stream.clone(),
                    unit: c.unit.clone(),
                    convert: c.convert.iter().map(|(k, v)| (k.clone(), *v)).collect(),
                    min: c.min.unwrap_or(f64::NEG_INFINITY),
                    max: c.max.unwrap_or(f64::INFINITY),
                    deadband: c.deadband,
                    rate: c.max_rate_per_second,
                    required: c.required.clone(),
                })
            })
            .collect::<Result<_, String>>()?;
        Ok(Filter {
            contracts,
            index: HashMap::default(),
            slots: Vec::new(),
            max_streams: max_streams.max(1),
            hand: 0,
            evictions: 0,
            undo: Vec::new(),
            pending: Vec::new(),
            names: String::new(),
        })
    }

    /// The contract patterns, in order (the metrics labels besides `none`).
    pub fn contract_labels(&self) -> impl Iterator<Item = &str> {
        self.contracts.iter().map(|c| c.label.as_str())
    }

    /// Streams whose state was forgotten to make room for new ones.
    pub fn state_evictions(&self) -> u64 {
        self.evictions
    }

    /// Streams with state in the table.
    pub fn tracked_streams(&self) -> usize {
        self.index.len()
    }

    /// Checks one reading against its stream's contract and, if kept, updates the stream's
    /// deadband and rate state. Rejections are remembered until [`Filter::commit`].
    pub fn check<'x>(&'x mut self, r: &ReadingRef<'x>) -> Result<Kept<'x>, Rejected> {
        let slot = self.slot_of(r.stream);
        let s = &mut self.slots[slot];
        let contract = s.contract;
        let Some(c) = self.contracts.get(contract as usize) else {
            return Ok(Kept {
                value: r.value,
                unit: r.unit,
                converted: false,
            });
        };
        if c.stateful() {
            self.undo.push((slot as u32, s.generation, s.state));
        }
        match judge(c, r, &mut s.state) {
            Ok(mut kept) => {
                if kept.converted {
                    kept.unit = c.unit.as_deref();
                }
                Ok(kept)
            }
            Err(rejection) => {
                let start = self.names.len();
                self.names.push_str(r.stream);
                self.pending.push(Pending {
                    contract,
                    rejection,
                    name: start..self.names.len(),
                });
                Err(Rejected {
                    rejection,
                    contract: ContractId(contract),
                })
            }
        }
    }

    pub fn mark(&self) -> Mark {
        Mark {
            undo: self.undo.len(),
            pending: self.pending.len(),
            names: self.names.len(),
        }
    }

    /// Undoes every check since `mark`: stream state as it was, rejections forgotten.
    pub fn rollback_to(&mut self, mark: Mark) {
        while self.undo.len() > mark.undo {
            let Some((slot, generation, before)) = self.undo.pop() else {
                break;
            };
            if let Some(s) = self.slots.get_mut(slot as usize)
                && s.generation == generation
            {
                s.state = before;
            }
        }
        self.pending.truncate(mark.pending);
        self.names.truncate(mark.names);
    }

    /// Undoes every check since the last commit.
    pub fn rollback(&mut self) {
        self.rollback_to(Mark::default());
    }

    /// Makes the checks since the last commit final and hands each rejection to `count`.
    pub fn commit(&mut self, mut count: impl FnMut(Counted<'_>)) {
        for p in &self.pending {
            let contract = self
                .contracts
                .get(p.contract as usize)
                .map_or("none", |c| c.label.as_str());
            count(Counted {
                contract,
                stream: &self.names[p.name.clone()],
                rejection: p.rejection,
            });
        }
        self.pending.clear();
        self.names.clear();
        self.undo.clear();
    }

    /// The slot of `stream`, creating it (and evicting another) when new.
    fn slot_of(&mut self, stream: &str) -> usize {
        if let Some(&i) = self.index.get(stream) {
            let i = i as usize;
            self.slots[i].referenced = true;
            return i;
        }
        let contract = self
            .contracts
            .iter()
            .position(|c| c.pattern.matches(stream))
            .map_or(NO_CONTRACT, |i| i as u32);
        let name: Box<str> = stream.into();
        if self.slots.len() < self.max_streams {
            self.slots.push(Slot {
                name: name.clone(),
                contract,
                generation: 0,
                referenced: false,
                state: StreamState::FRESH,
            });
            let i = self.slots.len() - 1;
            self.index.insert(name, i as u32);
            return i;
        }
        // CLOCK: the first slot not referenced since the hand last passed it.
        let i = loop {
            let i = self.hand;
            self.hand = (self.hand + 1) % self.slots.len();
            let s = &mut self.slots[i];
            if !std::mem::take(&mut s.referenced) {
                break i;
            }
        };
        self.evictions += 1;
        let s = &mut self.slots[i];
        self.index.remove(&s.name);
        s.name = name.clone();
        s.contract = contract;
        s.generation = s.generation.wrapping_add(1);
        s.state = StreamState::FRESH;
        self.index.insert(name, i as u32);
        i
    }
}

/// The contract's verdict on one reading; updates `state` only for a kept reading (and the
/// rate bucket's refill).
fn judge<'x>(
    c: &Contract,
    r: &ReadingRef<'x>,
    state: &mut StreamState,
) -> Result<Kept<'x>, Rejection> {
    for &field in &c.required {
        let present = match field {
            RequiredField::Unit => r.unit.is_some(),
            RequiredField::Time => r.has_time,
            RequiredField::Value => r.number().is_some(),
            RequiredField::Sum => r.sum.is_some(),
        };
        if !present {
            return Err(Rejection::Missing(field.into()));
        }
    }
    let mut value = r.value;
    let mut converted = false;
    if let (Some(want), Some(got)) = (c.unit.as_deref(), r.unit)
        && want != got
    {
        let conversion = c.convert.iter().find(|(from, _)| from == got);
        match (conversion, value) {
            (Some((_, conv)), Some(Value::Number(x))) => {
                let y = x * conv.scale + conv.offset;
                if !y.is_finite() {
                    return Err(Rejection::OutOfRange);
                }
                value = Some(Value::Number(y));
                converted = true;
            }
            _ => return Err(Rejection::WrongUnit),
        }
    }
    let number = match value {
        Some(Value::Number(x)) => Some(x),
        _ => None,
    };
    if let Some(x) = number {
        if !(c.min..=c.max).contains(&x) {
            return Err(Rejection::OutOfRange);
        }
        if let Some(d) = c.deadband
            && (x - state.last_kept).abs() <= d
        {
            return Err(Rejection::Deadband);
        }
    }
    if let Some(rate) = c.rate {
        let burst = rate.max(1.0);
        if state.refill_ms == i64::MIN {
            state.tokens = burst;
            state.refill_ms = r.time_ms;
        } else if r.time_ms > state.refill_ms {
            let elapsed_s = (r.time_ms - state.refill_ms) as f64 / 1000.0;
            state.tokens = (state.tokens + elapsed_s * rate).min(burst);
            state.refill_ms = r.time_ms;
        }
        if state.tokens < 1.0 {
            return Err(Rejection::RateLimited);
        }
        state.tokens -= 1.0;
    }
    if let Some(x) = number {
        state.last_kept = x;
    }
    Ok(Kept {
        value,
        unit: r.unit,
        converted,
    })
}

/// Decides which rejections are copied into the dead-letter table: the first of each
/// (contract, reason), then at most one per `interval_ms`. Bounded by contracts x reasons.
#[derive(Debug)]
pub struct DeadLetterSampler {
    interval_ms: i64,
    last: HashMap<(ContractId, Rejection), i64>,
}

impl DeadLetterSampler {
    pub fn new(interval_ms: u64) -> Self {
        DeadLetterSampler {
            interval_ms: i64::try_from(interval_ms).unwrap_or(i64::MAX),
            last: HashMap::new(),
        }
    }

    /// Whether this rejection is sampled at `now_ms`; if so it counts as the latest sample.
    pub fn sample(&mut self, rejected: Rejected, now_ms: i64) -> bool {
        let key = (rejected.contract, rejected.rejection);
        match self.last.get_mut(&key) {
            Some(last) if now_ms.saturating_sub(*last) < self.interval_ms => false,
            Some(last) => {
                *last = now_ms;
                true
            }
            None => {
                self.last.insert(key, now_ms);
                true
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reading(stream: &str, value: f64) -> ReadingRef<'_> {
        ReadingRef {
            stream,
            time_ms: 0,
            has_time: true,
            value: Some(Value::Number(value)),
            sum: None,
            unit: None,
        }
    }

    fn at(r: ReadingRef<'_>, time_ms: i64) -> ReadingRef<'_> {
        ReadingRef { time_ms, ..r }
    }

    fn rule(stream: &str) -> FilterConfig {
        FilterConfig {
            stream: stream.into(),
            ..FilterConfig::default()
        }
    }

    /// The verdict alone (the filter stays borrowed only for the call).
    fn verdict(f: &mut Filter, r: &ReadingRef<'_>) -> Result<Option<f64>, &'static str> {
        f.check(r)
            .map(|k| match k.value {
                Some(Value::Number(x)) => Some(x),
                _ => None,
            })
            .map_err(|e| e.rejection.reason())
    }

    #[test]
    fn patterns_follow_mqtt_wildcards() {
        let p = RulePattern::parse("+/temperature").unwrap();
        assert!(p.matches("node-1/temperature"));
        assert!(!p.matches("node-1/humidity"));
        assert!(!p.matches("a/b/temperature"));
        let p = RulePattern::parse("node-1/#").unwrap();
        assert!(p.matches("node-1/x"));
        assert!(p.matches("node-1/x/y"));
        assert!(!p.matches("node-2/x"));
        assert!(RulePattern::parse("#").unwrap().matches("anything/at/all"));
        assert!(RulePattern::parse("a/#/b").is_err());
        assert!(RulePattern::parse("a+/b").is_err());
        assert!(RulePattern::parse("").is_err());
    }

    #[test]
    fn first_matching_rule_decides_and_bounds_are_inclusive() {
        let mut f = Filter::build(
            &[
                FilterConfig {
                    min: Some(-40.0),
                    max: Some(85.0),
                    ..rule("+/temperature")
                },
                FilterConfig {
                    min: Some(0.0),
                    ..rule("#")
                },
            ],
            100,
        )
        .unwrap();
        assert_eq!(
            verdict(&mut f, &reading("n/temperature", 85.0)),
            Ok(Some(85.0))
        );
        assert_eq!(
            verdict(&mut f, &reading("n/temperature", -40.0)),
            Ok(Some(-40.0))
        );
        assert_eq!(
            verdict(&mut f, &reading("n/temperature", 85.1)),
            Err("out_of_range")
        );
        assert_eq!(
            verdict(&mut f, &reading("n/humidity", -1.0)),
            Err("out_of_range")
        );
        assert_eq!(verdict(&mut f, &reading("n/humidity", 1e9)), Ok(Some(1e9)));
    }

    #[test]
    fn a_stream_without_a_rule_is_accepted() {
        let mut f = Filter::build(&[], 100).unwrap();
        assert_eq!(verdict(&mut f, &reading("x", f64::MAX)), Ok(Some(f64::MAX)));
        let mut counted = 0;
        f.commit(|_| counted += 1);
        assert_eq!(counted, 0);
    }

    #[test]
    fn units_are_checked_and_declared_conversions_applied() {
        let contract = FilterConfig {
            unit: Some("Cel".into()),
            min: Some(-40.0),
            max: Some(85.0),
            ..rule("+/temperature")
        }
        .with_conversion("K", 1.0, -273.15)
        .with_conversion("degF", 5.0 / 9.0, -160.0 / 9.0);
        let mut f = Filter::build(&[contract], 100).unwrap();
        let with_unit = |unit, v| ReadingRef {
            unit: Some(unit),
            ..reading("n/temperature", v)
        };
        let k = f.check(&with_unit("K", 300.0)).unwrap();
        assert_eq!(k.unit, Some("Cel"));
        assert!(k.converted);
        assert!(matches!(k.value, Some(Value::Number(x)) if (x - 26.85).abs() < 1e-9));
        let k = f.check(&with_unit("degF", 68.0)).unwrap();
        assert!(matches!(k.value, Some(Value::Number(x)) if (x - 20.0).abs() < 1e-9));
        // The range applies after conversion: 212 degF is 100 Cel.
        assert_eq!(
            verdict(&mut f, &with_unit("degF", 212.0)),
            Err("out_of_range")
        );
        assert_eq!(verdict(&mut f, &with_unit("Cel", 20.0)), Ok(Some(20.0)));
        assert_eq!(verdict(&mut f, &with_unit("%RH", 20.0)), Err("wrong_unit"));
        // No unit: taken to be in the expected unit.
        assert_eq!(
            verdict(&mut f, &reading("n/temperature", 20.0)),
            Ok(Some(20.0))
        );
        // A text value in a convertible unit cannot be converted.
        let text = ReadingRef {
            value: Some(Value::Text("hot")),
            ..with_unit("K", 0.0)
        };
        assert_eq!(verdict(&mut f, &text), Err("wrong_unit"));
    }

    #[test]
    fn required_fields() {
        let mut f = Filter::build(
            &[
                FilterConfig {
                    required: vec![
                        RequiredField::Unit,
                        RequiredField::Time,
                        RequiredField::Value,
                    ],
                    ..rule("a/#")
                },
                FilterConfig {
                    required: vec![RequiredField::Sum],
                    ..rule("b/#")
                },
            ],
            100,
        )
        .unwrap();
        let full = ReadingRef {
            unit: Some("W"),
            ..reading("a/x", 1.0)
        };
        assert_eq!(verdict(&mut f, &full), Ok(Some(1.0)));
        let no_unit = reading("a/x", 1.0);
        assert_eq!(verdict(&mut f, &no_unit), Err("missing_unit"));
        let no_time = ReadingRef {
            has_time: false,
            ..full
        };
        assert_eq!(verdict(&mut f, &no_time), Err("missing_time"));
        let flag = ReadingRef {
            value: Some(Value::Bool(true)),
            ..full
        };
        assert_eq!(verdict(&mut f, &flag), Err("missing_value"));
        assert_eq!(verdict(&mut f, &reading("b/x", 1.0)), Err("missing_sum"));
        let summed = ReadingRef {
            sum: Some(5.0),
            value: None,
            ..reading("b/x", 0.0)
        };
        assert_eq!(verdict(&mut f, &summed), Ok(None));
    }

    #[test]
    fn deadband_drops_readings_within_d_of_the_last_kept_one() {
        let mut f = Filter::build(
            &[FilterConfig {
                deadband: Some(0.5),
                ..rule("#")
            }],
            100,
        )
        .unwrap();
        let got: Vec<_> = [20.0, 20.4, 20.5, 20.6, 20.2, 21.2, 20.0]
            .into_iter()
            .map(|v| verdict(&mut f, &reading("s", v)).is_ok())
            .collect();
        // 20.4 and 20.5 are within 0.5 of 20; 20.6 is kept; 20.2 is within 0.5 of 20.6.
        assert_eq!(got, [true, false, false, true, false, true, true]);
        // Streams have their own state.
        assert!(verdict(&mut f, &reading("t", 20.6)).is_ok());
    }

    #[test]
    fn rate_limit_is_a_token_bucket_in_event_time() {
        let mut f = Filter::build(
            &[FilterConfig {
                max_rate_per_second: Some(2.0),
                ..rule("#")
            }],
            100,
        )
        .unwrap();
        let mut kept_at = |t: i64| verdict(&mut f, &at(reading("s", t as f64), t)).is_ok();
        // A burst of two, then one per 500 ms.
        assert!(kept_at(0));
        assert!(kept_at(0));
        assert!(!kept_at(0));
        assert!(!kept_at(400));
        assert!(kept_at(500));
        assert!(!kept_at(600));
        // Out-of-order times refill nothing.
        assert!(!kept_at(100));
        assert!(kept_at(1000));
        // A long pause refills only the burst.
        assert!(kept_at(60_000));
        assert!(kept_at(60_000));
        assert!(!kept_at(60_000));
    }

    #[test]
    fn rejections_are_counted_by_contract_stream_and_reason_at_commit() {
        let mut f = Filter::build(
            &[FilterConfig {
                max: Some(10.0),
                ..rule("+/t")
            }],
            100,
        )
        .unwrap();
        assert!(f.check(&reading("a/t", 11.0)).is_err());
        assert!(f.check(&reading("b/t", 12.0)).is_err());
        assert!(f.check(&reading("b/t", 1.0)).is_ok());
        let mut seen = Vec::new();
        f.commit(|c| {
            seen.push((
                c.contract.to_string(),
                c.stream.to_string(),
                c.rejection.reason(),
            ))
        });
        assert_eq!(
            seen,
            [
                ("+/t".to_string(), "a/t".to_string(), "out_of_range"),
                ("+/t".to_string(), "b/t".to_string(), "out_of_range")
            ]
        );
        let mut again = 0;
        f.commit(|_| again += 1);
        assert_eq!(again, 0, "a commit hands each rejection over once");
    }

    #[test]
    fn rollback_restores_state_and_forgets_rejections() {
        let mut f = Filter::build(
            &[FilterConfig {
                deadband: Some(1.0),
                max_rate_per_second: Some(1.0),
                ..rule("#")
            }],
            100,
        )
        .unwrap();
        assert!(f.check(&reading("s", 10.0)).is_ok());
        f.commit(|_| {});
        let mark = f.mark();
        assert!(f.check(&at(reading("s", 20.0), 5_000)).is_ok());
        assert!(f.check(&at(reading("s", 30.0), 5_000)).is_err()); // rate
        assert!(f.check(&at(reading("s", 20.5), 9_000)).is_err()); // deadband
        f.rollback_to(mark);
        let mut counted = 0;
        f.commit(|_| counted += 1);
        assert_eq!(counted, 0);
        // As if nothing happened: 20 is kept again (deadband against 10, bucket refilled).
        assert_eq!(
            verdict(&mut f, &at(reading("s", 20.0), 5_000)),
            Ok(Some(20.0))
        );
        f.commit(|_| {});
        // Whole-batch rollback: back to the last commit.
        assert!(f.check(&at(reading("s", 40.0), 10_000)).is_ok());
        f.rollback();
        assert_eq!(
            verdict(&mut f, &at(reading("s", 20.5), 10_000)),
            Err("deadband")
        );
    }

    #[test]
    fn the_state_table_is_bounded_and_evicts_the_least_recently_used() {
        let mut f = Filter::build(
            &[FilterConfig {
                deadband: Some(1.0),
                ..rule("#")
            }],
            3,
        )
        .unwrap();
        for s in ["a", "b", "c"] {
            assert!(f.check(&reading(s, 0.0)).is_ok());
        }
        assert_eq!(f.tracked_streams(), 3);
        // "a" is used again; "d" then takes the place of one that was not.
        assert_eq!(verdict(&mut f, &reading("a", 0.5)), Err("deadband"));
        assert!(f.check(&reading("d", 0.0)).is_ok());
        assert_eq!(f.tracked_streams(), 3);
        assert_eq!(f.state_evictions(), 1);
        assert_eq!(
            verdict(&mut f, &reading("a", 0.5)),
            Err("deadband"),
            "a kept its state"
        );
        assert_eq!(verdict(&mut f, &reading("d", 0.5)), Err("deadband"));
        for s in ["e", "f", "g", "h"] {
            assert!(f.check(&reading(s, 0.0)).is_ok());
        }
        assert_eq!(f.tracked_streams(), 3);
        assert_eq!(f.state_evictions(), 5);
    }

    #[test]
    fn dead_letters_are_sampled_per_contract_and_reason() {
        let mut f = Filter::build(
            &[FilterConfig {
                max: Some(0.0),
                ..rule("#")
            }],
            10,
        )
        .unwrap();
        let Err(rej) = f.check(&reading("s", 1.0)) else {
            panic!("kept")
        };
        let mut s = DeadLetterSampler::new(1000);
        assert!(s.sample(rej, 0));
        assert!(!s.sample(rej, 999));
        assert!(s.sample(rej, 1000));
        let other = Rejected {
            rejection: Rejection::Deadband,
            ..rej
        };
        assert!(s.sample(other, 1001));
    }

    #[test]
    fn every_problem_of_a_contract_is_reported() {
        let c = FilterConfig {
            min: Some(5.0),
            max: Some(1.0),
            deadband: Some(-1.0),
            max_rate_per_second: Some(0.0),
            ..rule("a/#/b")
        }
        .with_conversion("K", 0.0, f64::NAN);
        let fields: Vec<String> = c.problems().into_iter().map(|(f, _)| f).collect();
        assert_eq!(
            fields,
            [
                "stream",
                "max",
                "deadband",
                "max_rate_per_second",
                "convert",
                "convert.K.scale",
                "convert.K.offset"
            ]
        );
    }
}
