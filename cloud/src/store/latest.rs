//! Latest values: per `(device, stream)`, the newest text, boolean or data value a device sent
//! ([`LatestValue`] in a batch's field 5), for streams whose readings are not numbers (a door's
//! "open", a firmware version).
//!
//! Invariants every backend keeps (their unit tests and `tests/api.rs` check them):
//! - At most one row per `(device_id, stream)`: the value with the greatest `time_ms` received.
//!   A value with an older or the same `time_ms` (a re-send) changes nothing and counts as
//!   ignored, so storing is idempotent and the order batches arrive in does not matter.
//! - Stored in the same transaction as the batch's summaries and gaps: all or nothing.
//! - Every stored value passed [`LatestValue::validate`]; a batch holds at most
//!   [`MAX_LATEST_PER_BATCH`] of them. A latest value carries no agent id: it is the
//!   authenticated device's own.
//!
//! This module holds what both backends share: the batch check ([`newest_per_stream`]), the
//! query ([`LatestQuery`]), the stored row ([`StoredLatest`]) and its JSON shape, and the SQL.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use edgewise_protocol::{LatestValue, StateValue};
use serde::{Deserialize, Serialize};

use super::sqlite::{Arg, Select};
use super::{DEFAULT_QUERY_LIMIT, StoreError};

/// Most latest values accepted in one batch (an agent sends at most one per stream, and at most
/// 256 per batch).
pub const MAX_LATEST_PER_BATCH: usize = 1_000;

/// Checks a batch's latest values and keeps only the newest of each stream (on equal times, the
/// first in the batch), sorted by stream. Answers them with how many were dropped for a newer
/// or equal one in the same batch (counted as ignored).
pub(crate) fn newest_per_stream(
    mut latest: Vec<LatestValue>,
) -> Result<(Vec<LatestValue>, u64), StoreError> {
    if latest.len() > MAX_LATEST_PER_BATCH {
        return Err(StoreError::InvalidLatest {
            index: MAX_LATEST_PER_BATCH,
            reason: format!("at most {MAX_LATEST_PER_BATCH} latest values are accepted per batch"),
        });
    }
    for (index, v) in latest.iter().enumerate() {
        v.validate().map_err(|reason| StoreError::InvalidLatest {
            index,
            reason: reason.to_string(),
        })?;
    }
    let received = latest.len();
    // Stable: among equal times the batch order stays, so dedup keeps the first.
    latest.sort_by(|a, b| a.stream.cmp(&b.stream).then(b.time_ms.cmp(&a.time_ms)));
    latest.dedup_by(|later, kept| later.stream == kept.stream);
    let ignored = (received - latest.len()) as u64;
    Ok((latest, ignored))
}

/// Filter for latest values, ordered by device, then stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LatestQuery {
    pub device: Option<String>,
    pub stream: Option<String>,
    /// Only rows after this `(device_id, stream)` (the previous page's last row).
    pub after: Option<(String, String)>,
    /// Capped at [`MAX_QUERY_LIMIT`].
    pub limit: usize,
}

impl Default for LatestQuery {
    fn default() -> Self {
        LatestQuery {
            device: None,
            stream: None,
            after: None,
            limit: DEFAULT_QUERY_LIMIT,
        }
    }
}

/// A latest value as stored, with its device and when it arrived.
///
/// Serializes to JSON as [`LatestJson`]: `kind` says how to read `value`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(into = "LatestJson", try_from = "LatestJson")]
pub struct StoredLatest {
    pub device_id: String,
    pub stream: String,
    /// Event time of the value, ms since the Unix epoch.
    pub time_ms: i64,
    pub value: StateValue,
    pub received_at_ms: i64,
}

/// A stream's newest text, boolean or data value, with its device and when it arrived (the JSON
/// shape of a [`StoredLatest`]).
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
#[schema(as = StoredLatest)]
pub struct LatestJson {
    device_id: String,
    stream: String,
    /// Event time of the value, ms since the Unix epoch.
    time_ms: i64,
    kind: LatestKind,
    /// `text`: the string; `bool`: true or false; `data`: the bytes in base64url (RFC 4648
    /// section 5, no padding).
    value: LatestValueJson,
    received_at_ms: i64,
}

/// What a latest value is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum LatestKind {
    Text,
    Bool,
    Data,
}

/// A latest value in JSON: a string (text, or base64url data) or a boolean.
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(untagged)]
pub enum LatestValueJson {
    Bool(bool),
    String(String),
}

impl From<StoredLatest> for LatestJson {
    fn from(s: StoredLatest) -> Self {
        let (kind, value) = match s.value {
            StateValue::Text(t) => (LatestKind::Text, LatestValueJson::String(t)),
            StateValue::Bool(b) => (LatestKind::Bool, LatestValueJson::Bool(b)),
            StateValue::Data(d) => (
                LatestKind::Data,
                LatestValueJson::String(URL_SAFE_NO_PAD.encode(d)),
            ),
        };
        LatestJson {
            device_id: s.device_id,
            stream: s.stream,
            time_ms: s.time_ms,
            kind,
            value,
            received_at_ms: s.received_at_ms,
        }
    }
}

impl TryFrom<LatestJson> for StoredLatest {
    type Error = String;

    fn try_from(j: LatestJson) -> Result<Self, String> {
        let value = match (j.kind, j.value) {
            (LatestKind::Text, LatestValueJson::String(t)) => StateValue::Text(t),
            (LatestKind::Bool, LatestValueJson::Bool(b)) => StateValue::Bool(b),
            (LatestKind::Data, LatestValueJson::String(d)) => StateValue::Data(
                URL_SAFE_NO_PAD
                    .decode(d)
                    .map_err(|e| format!("data value is not base64url: {e}"))?,
            ),
            (kind, value) => return Err(format!("a {kind:?} value cannot be {value:?}")),
        };
        Ok(StoredLatest {
            device_id: j.device_id,
            stream: j.stream,
            time_ms: j.time_ms,
            value,
            received_at_ms: j.received_at_ms,
        })
    }
}

/// A value as its table columns: `kind` and the one of `value_text`, `value_bool`,
/// `value_bytes` that its kind uses (the others are NULL).
pub(crate) struct ValueColumns<'a> {
    pub kind: &'static str,
    pub text: Option<&'a str>,
    pub flag: Option<bool>,
    pub bytes: Option<&'a [u8]>,
}

impl<'a> ValueColumns<'a> {
    pub fn of(value: &'a StateValue) -> Self {
        let mut c = ValueColumns {
            kind: value.kind(),
            text: None,
            flag: None,
            bytes: None,
        };
        match value {
            StateValue::Text(t) => c.text = Some(t),
            StateValue::Bool(b) => c.flag = Some(*b),
            StateValue::Data(d) => c.bytes = Some(d),
        }
        c
    }
}

/// The value of a row, from its columns; [`StoreError::Corrupt`] if they do not fit its kind.
pub(crate) fn value_from_columns(
    kind: &str,
    text: Option<String>,
    flag: Option<bool>,
    bytes: Option<Vec<u8>>,
) -> Result<StateValue, StoreError> {
    match (kind, text, flag, bytes) {
        ("text", Some(t), _, _) => Ok(StateValue::Text(t)),
        ("bool", _, Some(b), _) => Ok(StateValue::Bool(b)),
        ("data", _, _, Some(d)) => Ok(StateValue::Data(d)),
        (kind, ..) => Err(StoreError::Corrupt(format!(
            "latest value of kind {kind:?} without its column"
        ))),
    }
}

/// The upsert's conflict clause, the same on both backends: a row changes only for a newer
/// `time_ms`, so the rows an insert affects are the values stored, and the rest were ignored.
pub(crate) const UPSERT_NEWER: &str = "ON CONFLICT (device_id, stream) DO UPDATE SET
         time_ms = excluded.time_ms, kind = excluded.kind, value_text = excluded.value_text,
         value_bool = excluded.value_bool, value_bytes = excluded.value_bytes,
         received_at_ms = excluded.received_at_ms
     WHERE excluded.time_ms > latest_values.time_ms";

/// The columns [`latest_sql`] selects, in order.
const LATEST_COLUMNS: &str =
    "device_id, stream, time_ms, kind, value_text, value_bool, value_bytes, received_at_ms";

/// The latest-value query's SQL and arguments, as [`super::sqlite::summary_sql`]; selects
/// [`LATEST_COLUMNS`].
pub(crate) fn latest_sql(q: &LatestQuery, param: impl Fn(usize) -> String) -> (String, Vec<Arg>) {
    let mut select = Select::new(
        &format!("SELECT {LATEST_COLUMNS} FROM latest_values"),
        param,
    );
    select.equal("device_id", &q.device);
    select.equal("stream", &q.stream);
    if let Some((device, stream)) = &q.after {
        select.and(
            "(device_id, stream) > (?, ?)",
            [Arg::Text(device.clone()), Arg::Text(stream.clone())],
        );
    }
    select.finish("device_id, stream", q.limit)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::MAX_QUERY_LIMIT;

    fn text(stream: &str, time_ms: i64, s: &str) -> LatestValue {
        LatestValue {
            stream: stream.to_owned(),
            time_ms,
            value: StateValue::Text(s.to_owned()),
        }
    }

    #[test]
    fn a_batch_keeps_the_newest_value_of_each_stream_and_counts_the_rest() {
        let (kept, ignored) = newest_per_stream(vec![
            text("door", 10, "open"),
            text("alarm", 5, "off"),
            text("door", 30, "closed"),
            text("door", 20, "ajar"),
            text("alarm", 5, "on"),
        ])
        .unwrap();
        assert_eq!(kept, [text("alarm", 5, "off"), text("door", 30, "closed")]);
        assert_eq!(ignored, 3);
    }

    #[test]
    fn an_invalid_value_or_too_many_names_the_index_and_reason() {
        let err = newest_per_stream(vec![text("door", 1, "open"), text("", 1, "x")]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "latest value 1 is invalid: stream is empty"
        );
        let many = vec![text("door", 1, "open"); MAX_LATEST_PER_BATCH + 1];
        assert!(matches!(
            newest_per_stream(many),
            Err(StoreError::InvalidLatest { index: 1000, .. })
        ));
        let full = vec![text("door", 1, "open"); MAX_LATEST_PER_BATCH];
        assert_eq!(newest_per_stream(full).unwrap().1, 999);
    }

    #[test]
    fn json_says_the_kind_and_carries_data_as_base64url() {
        let row = |value| StoredLatest {
            device_id: "gw-1".to_owned(),
            stream: "n1/fw".to_owned(),
            time_ms: 7,
            value,
            received_at_ms: 9,
        };
        let data = row(StateValue::Data(vec![0xfb, 0xff, 0x01]));
        let json = serde_json::to_value(&data).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"device_id": "gw-1", "stream": "n1/fw", "time_ms": 7,
                               "kind": "data", "value": "-_8B", "received_at_ms": 9})
        );
        assert_eq!(serde_json::from_value::<StoredLatest>(json).unwrap(), data);
        for value in [StateValue::Bool(false), StateValue::Text("true".to_owned())] {
            let r = row(value);
            let json = serde_json::to_value(&r).unwrap();
            assert_eq!(serde_json::from_value::<StoredLatest>(json).unwrap(), r);
        }
        let json = serde_json::to_value(row(StateValue::Bool(true))).unwrap();
        assert_eq!(
            (&json["kind"], &json["value"]),
            (&"bool".into(), &true.into())
        );
        let mut mismatched = json;
        mismatched["kind"] = "text".into();
        assert!(serde_json::from_value::<StoredLatest>(mismatched).is_err());
    }

    #[test]
    fn columns_round_trip_and_a_missing_column_is_corrupt() {
        for value in [
            StateValue::Text(String::new()),
            StateValue::Bool(true),
            StateValue::Data(Vec::new()),
        ] {
            let c = ValueColumns::of(&value);
            let back = value_from_columns(
                c.kind,
                c.text.map(str::to_owned),
                c.flag,
                c.bytes.map(<[u8]>::to_vec),
            )
            .unwrap();
            assert_eq!(back, value);
        }
        assert!(matches!(
            value_from_columns("data", Some("x".to_owned()), None, None),
            Err(StoreError::Corrupt(_))
        ));
    }

    #[test]
    fn query_sql_filters_pages_and_caps_the_limit() {
        let q = LatestQuery {
            device: Some("gw-1".to_owned()),
            stream: None,
            after: Some(("gw-1".to_owned(), "n1/door".to_owned())),
            limit: 50_000,
        };
        let (sql, args) = latest_sql(&q, |n| format!("${n}"));
        assert!(sql.contains("device_id = $1"), "{sql}");
        assert!(sql.contains("(device_id, stream) > ($2, $3)"), "{sql}");
        assert!(
            sql.ends_with("ORDER BY device_id, stream LIMIT $4"),
            "{sql}"
        );
        assert_eq!(args.last(), Some(&Arg::Int(MAX_QUERY_LIMIT as i64)));
    }
}
