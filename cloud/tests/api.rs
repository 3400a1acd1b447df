//! The receiver over real HTTP on loopback: every test runs on a fresh SQLite file
//! (`sqlite::*`) and on a fresh PostgreSQL database (`postgres::*`, when `EDGEWISE_TEST_PG_URL`
//! is set): one suite, both backends.

mod common;

use common::{Backend, Harness, answer, batch, summary, windows};
use edgewise_cloud::RateLimit;
use edgewise_cloud::{DeviceInfo, IngestOutcome, MetricsSnapshot, ServerConfig, StoredLatest};
use edgewise_protocol::{Batch, Gap, LatestValue, Quantiles, Score, StateValue};
use reqwest::StatusCode;

const STREAM: &str = "node-1/temperature";
const STREAM_Q: &str = "node-1%2Ftemperature";

fn outcome(inserted: u64, duplicates: u64, revised: u64) -> IngestOutcome {
    IngestOutcome {
        inserted,
        duplicates,
        revised,
        ..IngestOutcome::default()
    }
}

fn parse_outcome(body: &str) -> IngestOutcome {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("not an ingest answer ({e}): {body}"))
}

async fn good_batch_is_stored_and_served_by_summaries_query(b: Backend) {
    let h = Harness::start(b).await;
    let token = h.add_device("gw-1").await;
    let sent = windows("gw-1", STREAM, 3);

    let a = h
        .post_ingest(Some(&token), batch("gw-1", sent.clone()))
        .await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.body);
    assert_eq!(parse_outcome(&a.body), outcome(3, 0, 0));

    let stored = h.summaries(&format!("device=gw-1&stream={STREAM_Q}")).await;
    let got: Vec<_> = stored.iter().map(|s| s.summary.clone()).collect();
    assert_eq!(got, sent);
    assert!(stored.iter().all(|s| s.device_id == "gw-1"));

    // The JSON is flat and carries the deterministic hex id.
    let raw = h.get("/v1/summaries?device=gw-1&limit=1").await.json();
    assert_eq!(raw[0]["id"], sent[0].id().to_string());
    assert_eq!(raw[0]["mean"], 21.25);
    assert_eq!(raw.as_array().map(Vec::len), Some(1));

    // Time range is [from, to).
    let from = sent[1].window_start_ms;
    let to = sent[2].window_start_ms;
    let ranged = h.summaries(&format!("from={from}&to={to}")).await;
    assert_eq!(ranged.len(), 1);
    assert_eq!(ranged[0].summary, sent[1]);
    assert!(h.summaries("device=gw-2").await.is_empty());

    let devices: Vec<DeviceInfo> = serde_json::from_str(&h.get("/v1/devices").await.body).unwrap();
    assert_eq!(devices.len(), 1);
    assert_eq!(devices[0].id, "gw-1");
    assert_eq!(devices[0].summary_count, 3);
    assert!(devices[0].last_seen_ms.is_some());
}

async fn same_batch_twice_is_stored_once_and_reported_as_duplicates(b: Backend) {
    let h = Harness::start(b).await;
    let token = h.add_device("gw-1").await;
    let body = batch("gw-1", windows("gw-1", STREAM, 4));

    let first = h.post_ingest(Some(&token), body.clone()).await;
    assert_eq!(parse_outcome(&first.body), outcome(4, 0, 0));
    let second = h.post_ingest(Some(&token), body).await;
    assert_eq!(second.status, StatusCode::OK);
    assert_eq!(parse_outcome(&second.body), outcome(0, 4, 0));
    assert_eq!(h.summaries("").await.len(), 4);
}

async fn higher_revision_replaces_and_lower_is_a_duplicate(b: Backend) {
    let h = Harness::start(b).await;
    let token = h.add_device("gw-1").await;
    let rev0 = summary("gw-1", STREAM, 0, 0);
    let mut rev2 = summary("gw-1", STREAM, 0, 2);
    rev2.count = 11;
    h.post_ingest(Some(&token), batch("gw-1", vec![rev0.clone()]))
        .await;

    let a = h
        .post_ingest(Some(&token), batch("gw-1", vec![rev2.clone()]))
        .await;
    assert_eq!(parse_outcome(&a.body), outcome(0, 0, 1));
    let a = h
        .post_ingest(
            Some(&token),
            batch("gw-1", vec![summary("gw-1", STREAM, 0, 1)]),
        )
        .await;
    assert_eq!(parse_outcome(&a.body), outcome(0, 1, 0));

    let stored = h.summaries("").await;
    assert_eq!(stored.len(), 1);
    assert_eq!(stored[0].summary, rev2);
}

async fn missing_wrong_or_revoked_token_is_401(b: Backend) {
    let h = Harness::start(b).await;
    let token = h.add_device("gw-1").await;
    let body = batch("gw-1", windows("gw-1", STREAM, 1));

    let none = h.post_ingest(None, body.clone()).await;
    assert_eq!(none.status, StatusCode::UNAUTHORIZED);
    assert!(!none.error().is_empty());

    let wrong = h.post_ingest(Some("0123456789abcdef"), body.clone()).await;
    assert_eq!(wrong.status, StatusCode::UNAUTHORIZED);

    let basic = h
        .client
        .post(h.url("/v1/ingest"))
        .header("authorization", format!("Basic {token}"))
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(basic.status(), StatusCode::UNAUTHORIZED);

    assert!(h.revoke("gw-1").await);
    let revoked = h.post_ingest(Some(&token), body).await;
    assert_eq!(revoked.status, StatusCode::UNAUTHORIZED);

    assert!(h.summaries("").await.is_empty());
    assert_eq!(h.receiver.metrics().snapshot().rejected_unauthorized, 4);
}

async fn device_writing_another_devices_data_is_403_and_nothing_is_stored(b: Backend) {
    let h = Harness::start(b).await;
    let token = h.add_device("gw-1").await;
    h.add_device("gw-2").await;

    // The batch claims to be gw-2.
    let a = h
        .post_ingest(Some(&token), batch("gw-2", windows("gw-2", STREAM, 2)))
        .await;
    assert_eq!(a.status, StatusCode::FORBIDDEN);
    assert!(a.error().contains("gw-2"), "{}", a.body);

    // The batch is gw-1's, but its second summary is gw-2's.
    let mut mixed = windows("gw-1", STREAM, 2);
    mixed[1].agent_id = "gw-2".to_owned();
    let a = h.post_ingest(Some(&token), batch("gw-1", mixed)).await;
    assert_eq!(a.status, StatusCode::FORBIDDEN);
    assert!(a.error().contains("summary 1"), "{}", a.body);

    assert!(h.summaries("").await.is_empty());
    assert_eq!(h.receiver.metrics().snapshot().rejected_forbidden, 2);
}

async fn garbage_or_unknown_version_is_400_with_a_message(b: Backend) {
    let h = Harness::start(b).await;
    let token = h.add_device("gw-1").await;

    let a = h
        .post_ingest(Some(&token), b"{\"not\": \"cbor\"}".to_vec())
        .await;
    assert_eq!(a.status, StatusCode::BAD_REQUEST);
    assert!(a.error().contains("not a CBOR batch"), "{}", a.body);

    let a = h.post_ingest(Some(&token), Vec::new()).await;
    assert_eq!(a.status, StatusCode::BAD_REQUEST);

    let mut future = Batch::new("gw-1".to_owned(), 0, windows("gw-1", STREAM, 1));
    future.version = 7;
    let a = h.post_ingest(Some(&token), future.to_cbor()).await;
    assert_eq!(a.status, StatusCode::BAD_REQUEST);
    assert!(a.error().contains("version 7"), "{}", a.body);

    assert!(h.summaries("").await.is_empty());
    assert_eq!(h.receiver.metrics().snapshot().rejected_malformed, 3);
}

async fn invalid_summary_is_400_naming_index_and_reason_and_nothing_is_stored(b: Backend) {
    let h = Harness::start(b).await;
    let token = h.add_device("gw-1").await;

    let mut nan = windows("gw-1", STREAM, 3);
    nan[2].mean = f64::NAN;
    let a = h.post_ingest(Some(&token), batch("gw-1", nan)).await;
    assert_eq!(a.status, StatusCode::BAD_REQUEST);
    let msg = a.error();
    assert!(msg.contains("summary 2") && msg.contains("mean"), "{msg}");

    let mut empty = windows("gw-1", STREAM, 2);
    empty[1].count = 0;
    let a = h.post_ingest(Some(&token), batch("gw-1", empty)).await;
    assert_eq!(a.status, StatusCode::BAD_REQUEST);
    let msg = a.error();
    assert!(
        msg.contains("summary 1") && msg.contains("count is 0"),
        "{msg}"
    );

    assert!(h.summaries("").await.is_empty());
    assert_eq!(h.receiver.metrics().snapshot().rejected_invalid, 2);
}

async fn more_than_10000_summaries_is_400(b: Backend) {
    let h = Harness::start_with(
        b,
        ServerConfig {
            max_body_bytes: 8 * 1024 * 1024,
            ..ServerConfig::default()
        },
    )
    .await;
    let token = h.add_device("gw-1").await;
    let a = h
        .post_ingest(Some(&token), batch("gw-1", windows("gw-1", STREAM, 10_001)))
        .await;
    assert_eq!(a.status, StatusCode::BAD_REQUEST);
    assert!(a.error().contains("10001"), "{}", a.body);
    assert!(h.summaries("").await.is_empty());

    let a = h
        .post_ingest(Some(&token), batch("gw-1", windows("gw-1", STREAM, 10_000)))
        .await;
    assert_eq!(parse_outcome(&a.body), outcome(10_000, 0, 0));
}

async fn oversize_body_is_413_and_nothing_is_stored(b: Backend) {
    let limit = 64 * 1024;
    let h = Harness::start_with(
        b,
        ServerConfig {
            max_body_bytes: limit,
            ..ServerConfig::default()
        },
    )
    .await;
    let token = h.add_device("gw-1").await;
    let big = batch("gw-1", windows("gw-1", STREAM, 2_000));
    assert!(big.len() > limit);

    let a = h.post_ingest(Some(&token), big).await;
    assert_eq!(a.status, StatusCode::PAYLOAD_TOO_LARGE, "{}", a.body);
    assert!(a.error().contains("65536"), "{}", a.body);
    assert!(h.summaries("").await.is_empty());
    assert_eq!(h.receiver.metrics().snapshot().rejected_too_large, 1);

    // A body under the limit still goes through.
    let small = batch("gw-1", windows("gw-1", STREAM, 10));
    assert!(small.len() < limit);
    let a = h.post_ingest(Some(&token), small).await;
    assert_eq!(parse_outcome(&a.body), outcome(10, 0, 0));
}

async fn summaries_query_rejects_bad_parameters_with_a_message(b: Backend) {
    let h = Harness::start(b).await;
    for query in [
        "from=yesterday",
        "to=1.5",
        "from=10&to=10",
        "from=20&to=10",
        "limit=0",
        "limit=10001",
        "limit=-1",
        "colour=red",
    ] {
        let a = h.get(&format!("/v1/summaries?{query}")).await;
        assert_eq!(a.status, StatusCode::BAD_REQUEST, "{query}: {}", a.body);
        assert!(!a.error().is_empty(), "{query}");
    }
    // Empty values mean "not given"; the upper limit is allowed.
    assert!(
        h.summaries("device=&stream=&from=&to=&limit=10000")
            .await
            .is_empty()
    );
}

async fn metrics_count_every_outcome(b: Backend) {
    let h = Harness::start_with(
        b,
        ServerConfig {
            max_body_bytes: 16 * 1024,
            ..ServerConfig::default()
        },
    )
    .await;
    let token = h.add_device("gw-1").await;
    let two = batch("gw-1", windows("gw-1", STREAM, 2));
    let mut invalid = windows("gw-1", STREAM, 1);
    invalid[0].count = 0;

    h.post_ingest(Some(&token), two.clone()).await; // 2 inserted
    h.post_ingest(Some(&token), two).await; // 2 duplicates
    h.post_ingest(
        Some(&token),
        batch("gw-1", vec![summary("gw-1", STREAM, 0, 0)]),
    )
    .await; // 1 inserted
    h.post_ingest(
        Some(&token),
        batch("gw-1", vec![summary("gw-1", STREAM, 0, 3)]),
    )
    .await; // 1 revised
    h.post_ingest(None, Vec::new()).await; // unauthorized
    h.post_ingest(Some(&token), batch("gw-9", windows("gw-9", STREAM, 1)))
        .await; // forbidden
    h.post_ingest(Some(&token), b"garbage".to_vec()).await; // malformed
    h.post_ingest(Some(&token), batch("gw-1", invalid)).await; // invalid
    h.post_ingest(Some(&token), batch("gw-1", windows("gw-1", STREAM, 500)))
        .await; // too large

    let expected = MetricsSnapshot {
        ingest_requests_2xx: 4,
        ingest_requests_4xx: 5,
        ingest_requests_5xx: 0,
        summaries_inserted: 3,
        summaries_duplicate: 2,
        summaries_revised: 1,
        latest_stored: 0,
        latest_ignored: 0,
        rejected_unauthorized: 1,
        rejected_forbidden: 1,
        rejected_malformed: 1,
        rejected_invalid: 1,
        rejected_too_large: 1,
        rejected_rate_limited: 0,
    };
    assert_eq!(h.receiver.metrics().snapshot(), expected);

    let response = h.client.get(h.url("/metrics")).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let content_type = response.headers()["content-type"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(
        content_type.starts_with("text/plain; version=0.0.4"),
        "{content_type}"
    );
    let text = response.text().await.unwrap();
    for line in [
        "edgewise_ingest_requests_total{class=\"2xx\"} 4",
        "edgewise_ingest_requests_total{class=\"4xx\"} 5",
        "edgewise_ingest_requests_total{class=\"5xx\"} 0",
        "edgewise_summaries_total{outcome=\"inserted\"} 3",
        "edgewise_summaries_total{outcome=\"duplicate\"} 2",
        "edgewise_summaries_total{outcome=\"revised\"} 1",
        "edgewise_ingest_rejected_batches_total{reason=\"unauthorized\"} 1",
        "edgewise_ingest_rejected_batches_total{reason=\"forbidden\"} 1",
        "edgewise_ingest_rejected_batches_total{reason=\"malformed\"} 1",
        "edgewise_ingest_rejected_batches_total{reason=\"invalid\"} 1",
        "edgewise_ingest_rejected_batches_total{reason=\"too_large\"} 1",
        "edgewise_ingest_rejected_batches_total{reason=\"rate_limited\"} 0",
    ] {
        assert!(
            text.lines().any(|l| l == line),
            "missing {line:?} in\n{text}"
        );
    }
}

async fn healthz_answers_ok(b: Backend) {
    let h = Harness::start(b).await;
    let a = h.get("/healthz").await;
    assert_eq!(a.status, StatusCode::OK);
    assert_eq!(a.body, "ok");
}

async fn restart_on_the_same_port_and_db_keeps_serving_its_data(b: Backend) {
    let h = Harness::start(b).await;
    let token = h.add_device("gw-1").await;
    let sent = windows("gw-1", STREAM, 5);
    let a = h
        .post_ingest(Some(&token), batch("gw-1", sent.clone()))
        .await;
    assert_eq!(parse_outcome(&a.body), outcome(5, 0, 0));
    let addr = h.receiver.local_addr();

    let h = h.restart(ServerConfig::default()).await;
    assert_eq!(h.receiver.local_addr(), addr);

    let stored = h.summaries("device=gw-1").await;
    let got: Vec<_> = stored.into_iter().map(|s| s.summary).collect();
    assert_eq!(got, sent);
    // The token still works, and the old windows are recognised as duplicates.
    let a = h.post_ingest(Some(&token), batch("gw-1", sent)).await;
    assert_eq!(parse_outcome(&a.body), outcome(0, 5, 0));
    // Metrics belong to the new receiver instance.
    assert_eq!(h.receiver.metrics().snapshot().summaries_duplicate, 5);
    assert_eq!(h.receiver.metrics().snapshot().summaries_inserted, 0);
    h.receiver.stop().await;
}

async fn stop_closes_the_listener(b: Backend) {
    let h = Harness::start(b).await;
    let addr = h.receiver.local_addr();
    assert_eq!(h.get("/healthz").await.status, StatusCode::OK);
    h.receiver.stop().await;
    let refused = common::client()
        .get(format!("http://{addr}/healthz"))
        .send()
        .await;
    assert!(refused.is_err(), "a stopped receiver still answered");
}

fn gap(agent: &str, seq: u64) -> Gap {
    Gap {
        agent_id: agent.to_owned(),
        seq,
        streams: vec![STREAM.to_owned()],
        from_ms: 1_700_000_000_000,
        to_ms: 1_700_000_060_000,
        count: 6,
        reason: "buffer_full".to_owned(),
        recorded_at_ms: 1_700_000_061_000,
    }
}

async fn scores_and_gaps_are_stored_and_served(b: Backend) {
    let h = Harness::start(b).await;
    let token = h.add_device("gw-1").await;
    let mut sent = windows("gw-1", STREAM, 3);
    sent[1].score = Some(Score {
        value: 0.93,
        alert: true,
        model: "anomaly@3f2a9c1d".to_owned(),
    });
    sent[2].score = Some(Score {
        value: 0.02,
        alert: false,
        model: "anomaly@3f2a9c1d".to_owned(),
    });
    let mut b = Batch::new("gw-1".to_owned(), 0, sent.clone());
    b.gaps = vec![gap("gw-1", 1), gap("gw-1", 2)];
    let a = h.post_ingest(Some(&token), b.to_cbor()).await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.body);
    let out = parse_outcome(&a.body);
    assert_eq!((out.inserted, out.gaps_inserted), (3, 2));
    // Re-sent: every record is a duplicate.
    let a = h.post_ingest(Some(&token), b.to_cbor()).await;
    let out = parse_outcome(&a.body);
    assert_eq!(
        (out.duplicates, out.gaps_duplicate, out.gaps_inserted),
        (3, 2, 0)
    );

    let got: Vec<_> = h
        .summaries("")
        .await
        .into_iter()
        .map(|s| s.summary)
        .collect();
    assert_eq!(got, sent);
    let raw = h.get("/v1/summaries?limit=2").await.json();
    assert_eq!(raw[1]["score"]["alert"], true);
    assert_eq!(raw[1]["score"]["model"], "anomaly@3f2a9c1d");
    assert!(raw[0]["score"].is_null());

    let alerts = h.get("/v1/alerts?device=gw-1").await;
    assert_eq!(alerts.status, StatusCode::OK, "{}", alerts.body);
    let alerts = alerts.json();
    assert_eq!(alerts.as_array().map(Vec::len), Some(1));
    assert_eq!(alerts[0]["id"], sent[1].id().to_string());

    let gaps = h.get("/v1/gaps?device=gw-1").await;
    assert_eq!(gaps.status, StatusCode::OK, "{}", gaps.body);
    let gaps = gaps.json();
    assert_eq!(gaps.as_array().map(Vec::len), Some(2));
    assert_eq!(gaps[0]["seq"], 1);
    assert_eq!(gaps[0]["count"], 6);
    assert_eq!(gaps[0]["streams"][0], STREAM);
    assert_eq!(gaps[1]["reason"], "buffer_full");
    let devices = h.get("/v1/devices").await.json();
    assert_eq!(devices[0]["alert_count"], 1);
    assert_eq!(devices[0]["evicted_count"], 12);
}

async fn quantiles_are_stored_served_and_replaced_by_revisions(b: Backend) {
    let h = Harness::start(b).await;
    let token = h.add_device("gw-1").await;
    let mut sent = windows("gw-1", STREAM, 2);
    sent[0].quantiles = Some(Quantiles {
        p50: sent[0].mean,
        p90: sent[0].max,
        p99: sent[0].max,
        relative_error: 0.01,
    });
    let a = h
        .post_ingest(Some(&token), batch("gw-1", sent.clone()))
        .await;
    assert_eq!(parse_outcome(&a.body), outcome(2, 0, 0));
    let stored = h.summaries("").await;
    assert_eq!(
        (&stored[0].summary, &stored[1].summary),
        (&sent[0], &sent[1])
    );
    let raw = h.get("/v1/summaries").await.json();
    assert_eq!(raw[0]["quantiles"]["relative_error"], 0.01);
    assert!(raw[1]["quantiles"].is_null());
    // A revision (late readings) carries its own quantiles, or none.
    let mut rev1 = sent[1].clone();
    rev1.revision = 1;
    rev1.quantiles = Some(Quantiles {
        p50: rev1.min,
        p90: rev1.mean,
        p99: rev1.max,
        relative_error: 0.02,
    });
    let a = h
        .post_ingest(Some(&token), batch("gw-1", vec![rev1.clone()]))
        .await;
    assert_eq!(parse_outcome(&a.body), outcome(0, 0, 1));
    assert_eq!(h.summaries("").await[1].summary, rev1);
}

async fn a_foreign_or_invalid_gap_refuses_the_batch(b: Backend) {
    let h = Harness::start(b).await;
    let token = h.add_device("gw-1").await;
    h.add_device("gw-2").await;
    let mut b = Batch::new("gw-1".to_owned(), 0, windows("gw-1", STREAM, 1));
    b.gaps = vec![gap("gw-2", 1)];
    let a = h.post_ingest(Some(&token), b.to_cbor()).await;
    assert_eq!(a.status, StatusCode::FORBIDDEN, "{}", a.body);
    assert!(a.error().contains("gap 0"), "{}", a.body);
    let mut bad = gap("gw-1", 1);
    bad.to_ms = bad.from_ms - 1;
    b.gaps = vec![bad];
    let a = h.post_ingest(Some(&token), b.to_cbor()).await;
    assert_eq!(a.status, StatusCode::BAD_REQUEST, "{}", a.body);
    assert!(h.summaries("").await.is_empty());
    assert_eq!(
        h.get("/v1/gaps").await.json().as_array().map(Vec::len),
        Some(0)
    );
}

async fn pages_follow_the_next_cursor_header_to_the_end(b: Backend) {
    let h = Harness::start(b).await;
    let token = h.add_device("gw-1").await;
    let sent = windows("gw-1", STREAM, 25);
    h.post_ingest(Some(&token), batch("gw-1", sent.clone()))
        .await;
    let mut got = Vec::new();
    let mut url = "/v1/summaries?limit=10".to_owned();
    let mut pages = 0;
    loop {
        let response = h.client.get(h.url(&url)).send().await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        let next = response
            .headers()
            .get("next-cursor")
            .map(|v| v.to_str().unwrap().to_owned());
        let rows: Vec<edgewise_cloud::StoredSummary> =
            serde_json::from_str(&response.text().await.unwrap()).unwrap();
        got.extend(rows.into_iter().map(|r| r.summary));
        pages += 1;
        match next {
            Some(cursor) => url = format!("/v1/summaries?limit=10&after={cursor}"),
            None => break,
        }
    }
    assert_eq!(pages, 3);
    assert_eq!(got, sent);
    let a = h.get("/v1/summaries?after=nonsense").await;
    assert_eq!(a.status, StatusCode::BAD_REQUEST);
    let a = h.get("/v1/gaps?after=zz.1").await;
    assert_eq!(a.status, StatusCode::BAD_REQUEST);
}

on_both_backends!(
    openapi_document_lists_exactly_the_routes_served,
    rate_limited_device_gets_429_with_retry_after,
    gzip_bodies_are_accepted_and_limited_after_decompression,
    good_batch_is_stored_and_served_by_summaries_query,
    same_batch_twice_is_stored_once_and_reported_as_duplicates,
    higher_revision_replaces_and_lower_is_a_duplicate,
    missing_wrong_or_revoked_token_is_401,
    device_writing_another_devices_data_is_403_and_nothing_is_stored,
    garbage_or_unknown_version_is_400_with_a_message,
    invalid_summary_is_400_naming_index_and_reason_and_nothing_is_stored,
    more_than_10000_summaries_is_400,
    oversize_body_is_413_and_nothing_is_stored,
    summaries_query_rejects_bad_parameters_with_a_message,
    metrics_count_every_outcome,
    healthz_answers_ok,
    restart_on_the_same_port_and_db_keeps_serving_its_data,
    stop_closes_the_listener,
    scores_and_gaps_are_stored_and_served,
    a_foreign_or_invalid_gap_refuses_the_batch,
    quantiles_are_stored_served_and_replaced_by_revisions,
    pages_follow_the_next_cursor_header_to_the_end,
    latest_values_are_stored_newest_wins_and_served_as_json,
    invalid_or_too_many_latest_values_are_400_and_nothing_is_stored,
    latest_query_pages_and_rejects_bad_parameters,
);

async fn rate_limited_device_gets_429_with_retry_after(b: Backend) {
    let h = Harness::start_with(
        b,
        ServerConfig {
            rate_limit: Some(RateLimit {
                per_second: 0.5,
                burst: 2,
            }),
            ..ServerConfig::default()
        },
    )
    .await;
    let t1 = h.add_device("gw-1").await;
    let t2 = h.add_device("gw-2").await;
    let body = |agent: &str, i: i64| batch(agent, vec![summary(agent, STREAM, i * 10_000, 0)]);
    for i in 0..2 {
        let a = h.post_ingest(Some(&t1), body("gw-1", i)).await;
        assert_eq!(a.status, StatusCode::OK, "{}", a.body);
    }
    let limited = h.post_ingest(Some(&t1), body("gw-1", 2)).await;
    assert_eq!(
        limited.status,
        StatusCode::TOO_MANY_REQUESTS,
        "{}",
        limited.body
    );
    let retry: u64 = limited.headers["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=2).contains(&retry), "{retry}");
    assert!(limited.error().contains("rate limit"));
    // Other devices are not affected; the refused batch stored nothing.
    let a = h.post_ingest(Some(&t2), body("gw-2", 0)).await;
    assert_eq!(a.status, StatusCode::OK);
    assert_eq!(h.summaries("device=gw-1").await.len(), 2);
    assert_eq!(h.receiver.metrics().snapshot().rejected_rate_limited, 1);
    // A bad token is refused as 401 before any rate accounting.
    let a = h.post_ingest(Some("nope"), body("gw-1", 3)).await;
    assert_eq!(a.status, StatusCode::UNAUTHORIZED);
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(bytes).unwrap();
    e.finish().unwrap()
}

async fn gzip_bodies_are_accepted_and_limited_after_decompression(b: Backend) {
    let limit = 256 * 1024;
    let h = Harness::start_with(
        b,
        ServerConfig {
            max_body_bytes: limit,
            ..ServerConfig::default()
        },
    )
    .await;
    let token = h.add_device("gw-1").await;
    let sent = windows("gw-1", STREAM, 50);
    let post = |body: Vec<u8>, encoding: &'static str| {
        h.client
            .post(h.url("/v1/ingest"))
            .bearer_auth(&token)
            .header("content-type", "application/cbor")
            .header("content-encoding", encoding)
            .body(body)
            .send()
    };
    let a = answer(
        post(gzip(&batch("gw-1", sent.clone())), "gzip")
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.body);
    assert_eq!(parse_outcome(&a.body), outcome(50, 0, 0));
    let got: Vec<_> = h
        .summaries("")
        .await
        .into_iter()
        .map(|s| s.summary)
        .collect();
    assert_eq!(got, sent);

    // A small gzip body that inflates past the limit is refused with 413.
    let big = batch("gw-1", windows("gw-1", STREAM, 5_000));
    assert!(big.len() > limit);
    let packed = gzip(&big);
    assert!(packed.len() < limit);
    let a = answer(post(packed, "gzip").await.unwrap()).await;
    assert_eq!(a.status, StatusCode::PAYLOAD_TOO_LARGE, "{}", a.body);
    // Not gzip at all, though it says so: 400, not a crash.
    let a = answer(post(b"not gzip".to_vec(), "gzip").await.unwrap()).await;
    assert!(a.status.is_client_error(), "{}", a.status);
    // An encoding the receiver does not speak: 415.
    let a = answer(post(batch("gw-1", sent), "br").await.unwrap()).await;
    assert_eq!(a.status, StatusCode::UNSUPPORTED_MEDIA_TYPE, "{}", a.body);
    assert_eq!(h.summaries("").await.len(), 50);
}

async fn openapi_document_lists_exactly_the_routes_served(b: Backend) {
    let h = Harness::start(b).await;
    let a = h.get("/openapi.json").await;
    assert_eq!(a.status, StatusCode::OK);
    let doc = a.json();
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    let mut documented: Vec<(String, String)> = Vec::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for method in item.as_object().unwrap().keys() {
            documented.push((method.clone(), path.clone()));
        }
    }
    documented.sort();
    let served = [
        ("get", "/"),
        ("get", "/healthz"),
        ("get", "/metrics"),
        ("get", "/openapi.json"),
        ("get", "/v1/alerts"),
        ("get", "/v1/devices"),
        ("get", "/v1/gaps"),
        ("get", "/v1/latest"),
        ("get", "/v1/summaries"),
        ("post", "/v1/ingest"),
    ];
    let mut served: Vec<(String, String)> = served
        .iter()
        .map(|(m, p)| (m.to_string(), p.to_string()))
        .collect();
    served.sort();
    assert_eq!(documented, served);
    // Every documented GET route answers something other than 404/405.
    for (method, path) in &documented {
        if method == "get" {
            let a = h.get(path).await;
            assert!(a.status.is_success(), "{path}: {}", a.status);
        }
    }
    let schemas = doc["components"]["schemas"].as_object().unwrap();
    for name in [
        "StoredSummary",
        "StoredGap",
        "StoredLatest",
        "QuantilesJson",
        "DeviceInfo",
        "IngestOutcome",
        "ErrorBody",
    ] {
        assert!(schemas.contains_key(name), "schema {name} missing");
    }
    assert_eq!(
        doc["components"]["securitySchemes"]["device_token"]["scheme"],
        "bearer"
    );
}

fn latest(stream: &str, time_ms: i64, value: StateValue) -> LatestValue {
    LatestValue {
        stream: stream.to_owned(),
        time_ms,
        value,
    }
}

fn text(s: &str) -> StateValue {
    StateValue::Text(s.to_owned())
}

/// The CBOR body of a batch from `agent` with `summaries` and `latest` values.
fn batch_with_latest(
    agent: &str,
    summaries: Vec<edgewise_protocol::WindowSummary>,
    latest: Vec<LatestValue>,
) -> Vec<u8> {
    let mut b = Batch::new(agent.to_owned(), 1_700_000_100_000, summaries);
    b.latest = latest;
    b.to_cbor()
}

/// `GET /v1/latest?<query>`, which must answer 200.
async fn latest_values(h: &Harness, query: &str) -> Vec<StoredLatest> {
    let a = h.get(&format!("/v1/latest?{query}")).await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.body);
    serde_json::from_str(&a.body).expect("latest values JSON")
}

async fn latest_values_are_stored_newest_wins_and_served_as_json(b: Backend) {
    let h = Harness::start(b).await;
    let token = h.add_device("gw-1").await;
    let t2 = h.add_device("gw-2").await;
    const T: i64 = 1_700_000_000_000;
    let first = vec![
        latest("n1/door", T, text("open")),
        latest("n1/alarm", T, StateValue::Bool(true)),
        latest("n1/fw", T, StateValue::Data(vec![0xfb, 0xff, 0x01])),
        latest("n1/door", T - 1, text("closed")), // older, in the same batch
    ];
    let a = h
        .post_ingest(
            Some(&token),
            batch_with_latest("gw-1", windows("gw-1", STREAM, 1), first),
        )
        .await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.body);
    let out = parse_outcome(&a.body);
    assert_eq!(
        (out.inserted, out.latest_stored, out.latest_ignored),
        (1, 3, 1)
    );
    let a = h
        .post_ingest(
            Some(&t2),
            batch_with_latest("gw-2", vec![], vec![latest("n1/door", T, text("shut"))]),
        )
        .await;
    assert_eq!(parse_outcome(&a.body).latest_stored, 1);

    // The JSON: text as a string, bool as a boolean, data as base64url; by device, then stream.
    let raw = h.get("/v1/latest?device=gw-1").await;
    assert_eq!(raw.status, StatusCode::OK, "{}", raw.body);
    let raw = raw.json();
    let rows = raw.as_array().unwrap();
    assert_eq!(rows.len(), 3);
    let strip = |mut v: serde_json::Value| {
        assert!(v["received_at_ms"].as_i64().unwrap() > T - 86_400_000);
        v.as_object_mut().unwrap().remove("received_at_ms");
        v
    };
    assert_eq!(
        strip(rows[0].clone()),
        serde_json::json!({"device_id": "gw-1", "stream": "n1/alarm", "time_ms": T,
                           "kind": "bool", "value": true})
    );
    assert_eq!(
        strip(rows[1].clone()),
        serde_json::json!({"device_id": "gw-1", "stream": "n1/door", "time_ms": T,
                           "kind": "text", "value": "open"})
    );
    assert_eq!(
        strip(rows[2].clone()),
        serde_json::json!({"device_id": "gw-1", "stream": "n1/fw", "time_ms": T,
                           "kind": "data", "value": "-_8B"})
    );

    // Re-sent and older values change nothing; a newer one replaces the value.
    let resend = vec![
        latest("n1/door", T, text("open")),
        latest("n1/fw", T - 5, StateValue::Data(vec![9])),
    ];
    let a = h
        .post_ingest(Some(&token), batch_with_latest("gw-1", vec![], resend))
        .await;
    let out = parse_outcome(&a.body);
    assert_eq!((out.latest_stored, out.latest_ignored), (0, 2));
    let a = h
        .post_ingest(
            Some(&token),
            batch_with_latest(
                "gw-1",
                vec![],
                vec![latest("n1/door", T + 1, text("closed"))],
            ),
        )
        .await;
    assert_eq!(parse_outcome(&a.body).latest_stored, 1);

    let door = latest_values(&h, "stream=n1%2Fdoor").await;
    let got: Vec<_> = door
        .iter()
        .map(|r| (r.device_id.as_str(), r.time_ms, &r.value))
        .collect();
    assert_eq!(
        got,
        [("gw-1", T + 1, &text("closed")), ("gw-2", T, &text("shut")),]
    );
    let fw = latest_values(&h, "device=gw-1&stream=n1%2Ffw").await;
    assert_eq!(fw[0].value, StateValue::Data(vec![0xfb, 0xff, 0x01]));
    assert_eq!(latest_values(&h, "").await.len(), 4);

    let m = h.receiver.metrics().snapshot();
    assert_eq!((m.latest_stored, m.latest_ignored), (5, 3));
    let text = h.get("/metrics").await.body;
    for line in [
        "edgewise_latest_values_total{outcome=\"stored\"} 5",
        "edgewise_latest_values_total{outcome=\"ignored\"} 3",
    ] {
        assert!(
            text.lines().any(|l| l == line),
            "missing {line:?} in\n{text}"
        );
    }
}

async fn invalid_or_too_many_latest_values_are_400_and_nothing_is_stored(b: Backend) {
    let h = Harness::start(b).await;
    let token = h.add_device("gw-1").await;
    let ok = latest("n1/door", 1, text("open"));

    let too_long = latest("n1/fw", 1, StateValue::Data(vec![0; 1025]));
    let a = h
        .post_ingest(
            Some(&token),
            batch_with_latest(
                "gw-1",
                windows("gw-1", STREAM, 2),
                vec![ok.clone(), too_long],
            ),
        )
        .await;
    assert_eq!(a.status, StatusCode::BAD_REQUEST, "{}", a.body);
    let msg = a.error();
    assert!(
        msg.contains("latest value 1") && msg.contains("longer than 1024 bytes"),
        "{msg}"
    );

    let no_stream = latest("", 1, StateValue::Bool(false));
    let a = h
        .post_ingest(
            Some(&token),
            batch_with_latest("gw-1", vec![], vec![no_stream]),
        )
        .await;
    assert_eq!(a.status, StatusCode::BAD_REQUEST, "{}", a.body);
    assert_eq!(a.error(), "latest value 0 is invalid: stream is empty");

    let many: Vec<_> = (0..1_001)
        .map(|i| latest(&format!("n{i}/door"), 1, StateValue::Bool(true)))
        .collect();
    let a = h
        .post_ingest(Some(&token), batch_with_latest("gw-1", vec![], many))
        .await;
    assert_eq!(a.status, StatusCode::BAD_REQUEST, "{}", a.body);
    assert!(a.error().contains("at most 1000"), "{}", a.body);

    assert!(h.summaries("").await.is_empty());
    assert!(latest_values(&h, "").await.is_empty());
    assert_eq!(h.receiver.metrics().snapshot().rejected_invalid, 3);

    // 1,000 is accepted.
    let full: Vec<_> = (0..1_000)
        .map(|i| latest(&format!("n{i}/door"), 1, StateValue::Bool(true)))
        .collect();
    let a = h
        .post_ingest(Some(&token), batch_with_latest("gw-1", vec![], full))
        .await;
    assert_eq!(parse_outcome(&a.body).latest_stored, 1_000);
}

async fn latest_query_pages_and_rejects_bad_parameters(b: Backend) {
    let h = Harness::start(b).await;
    for device in ["gw-1", "gw.2"] {
        let token = h.add_device(device).await;
        let values = (0..5)
            .map(|i| latest(&format!("n{i}/state"), 1, text("on")))
            .collect();
        let a = h
            .post_ingest(Some(&token), batch_with_latest(device, vec![], values))
            .await;
        assert_eq!(a.status, StatusCode::OK, "{}", a.body);
    }
    let mut got = Vec::new();
    let mut url = "/v1/latest?limit=4".to_owned();
    let mut pages = 0;
    loop {
        let a = h.get(&url).await;
        assert_eq!(a.status, StatusCode::OK, "{}", a.body);
        let rows: Vec<StoredLatest> = serde_json::from_str(&a.body).unwrap();
        got.extend(
            rows.into_iter()
                .map(|r| format!("{}:{}", r.device_id, r.stream)),
        );
        pages += 1;
        match a.headers.get("next-cursor") {
            Some(c) => url = format!("/v1/latest?limit=4&after={}", c.to_str().unwrap()),
            None => break,
        }
    }
    // 10 rows in pages of 4: the third page is not full, so it ends the walk.
    assert_eq!(pages, 3);
    let mut expected: Vec<String> = ["gw-1", "gw.2"]
        .iter()
        .flat_map(|d| (0..5).map(move |i| format!("{d}:n{i}/state")))
        .collect();
    expected.sort();
    assert_eq!(got, expected);

    for query in [
        "limit=0",
        "limit=10001",
        "limit=x",
        "after=nonsense",
        "after=zz.00",
        "from=1",
        "colour=red",
    ] {
        let a = h.get(&format!("/v1/latest?{query}")).await;
        assert_eq!(a.status, StatusCode::BAD_REQUEST, "{query}: {}", a.body);
        assert!(!a.error().is_empty(), "{query}");
    }
    // Empty values mean "not given".
    assert_eq!(
        latest_values(&h, "device=&stream=&limit=&after=")
            .await
            .len(),
        10
    );
}
