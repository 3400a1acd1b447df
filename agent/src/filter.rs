//! Per-stream data contracts: which readings are accepted.
//!
//! A rule names a stream pattern in MQTT wildcard syntax over the `/`-separated stream name
//! (`+` matches one level, `#` the rest), e.g. `+/temperature` or `node-7/#`. The first rule whose
//! pattern matches a stream applies; a stream no rule matches is accepted as is.
//!
//! Pure: no I/O. Tested by the unit tests below.

use serde::Deserialize;

use edgewise_protocol::Reading;

/// One contract rule as written in the config (`[[filter]]`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FilterConfig {
    /// Stream pattern, MQTT wildcard syntax.
    pub stream: String,
    /// Smallest valid value (inclusive).
    pub min: Option<f64>,
    /// Largest valid value (inclusive).
    pub max: Option<f64>,
}

impl FilterConfig {
    /// `(field, message)` for each problem in this rule.
    pub fn problems(&self) -> Vec<(&'static str, String)> {
        let mut out = Vec::new();
        if let Err(e) = RulePattern::parse(&self.stream) {
            out.push(("stream", e));
        }
        for (field, v) in [("min", self.min), ("max", self.max)] {
            if v.is_some_and(|v| !v.is_finite()) {
                out.push((field, "must be a finite number".to_string()));
            }
        }
        if let (Some(lo), Some(hi)) = (self.min, self.max)
            && lo > hi
        {
            out.push(("max", format!("max ({hi}) is below min ({lo})")));
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
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejection {
    OutOfRange,
}

impl Rejection {
    /// Label for metrics.
    pub fn reason(self) -> &'static str {
        match self {
            Rejection::OutOfRange => "out_of_range",
        }
    }
}

struct Rule {
    pattern: RulePattern,
    min: f64,
    max: f64,
}

/// The compiled contracts.
pub struct Filter {
    rules: Vec<Rule>,
}

impl Filter {
    /// Compiles the rules; call after [`FilterConfig::problems`] reported none.
    pub fn build(configs: &[FilterConfig]) -> Result<Filter, String> {
        let rules = configs
            .iter()
            .map(|c| {
                Ok(Rule {
                    pattern: RulePattern::parse(&c.stream)?,
                    min: c.min.unwrap_or(f64::NEG_INFINITY),
                    max: c.max.unwrap_or(f64::INFINITY),
                })
            })
            .collect::<Result<_, String>>()?;
        Ok(Filter { rules })
    }

    pub fn check(&self, reading: &Reading) -> Result<(), Rejection> {
        match self
            .rules
            .iter()
            .find(|r| r.pattern.matches(&reading.stream))
        {
            Some(rule) if !(rule.min..=rule.max).contains(&reading.value) => {
                Err(Rejection::OutOfRange)
            }
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reading(stream: &str, value: f64) -> Reading {
        Reading {
            stream: stream.into(),
            time_ms: 0,
            value,
            unit: None,
        }
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
        let f = Filter::build(&[
            FilterConfig {
                stream: "+/temperature".into(),
                min: Some(-40.0),
                max: Some(85.0),
            },
            FilterConfig {
                stream: "#".into(),
                min: Some(0.0),
                max: None,
            },
        ])
        .unwrap();
        assert_eq!(f.check(&reading("n/temperature", 85.0)), Ok(()));
        assert_eq!(f.check(&reading("n/temperature", -40.0)), Ok(()));
        assert_eq!(
            f.check(&reading("n/temperature", 85.1)),
            Err(Rejection::OutOfRange)
        );
        assert_eq!(
            f.check(&reading("n/humidity", -1.0)),
            Err(Rejection::OutOfRange)
        );
        assert_eq!(f.check(&reading("n/humidity", 1e9)), Ok(()));
    }

    #[test]
    fn a_stream_without_a_rule_is_accepted() {
        let f = Filter::build(&[]).unwrap();
        assert_eq!(f.check(&reading("x", f64::MAX)), Ok(()));
    }
}
