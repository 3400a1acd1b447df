//! The dashboard in a real browser: headless Chromium loads `/` from a receiver with seeded data,
//! runs its JavaScript, and the rendered DOM must hold the fleet table and the charts. A
//! screenshot is saved (`$EDGEWISE_DASHBOARD_SCREENSHOT`, default `dashboard.png` in the temp
//! dir) for CI to keep.
//!
//! Runs only when `EDGEWISE_TEST_CHROMIUM` names the browser binary (`.ci/cloud.sh` installs
//! Debian's `chromium` and sets it).

mod common;

use common::{Backend, Harness, batch, summary};
use edgewise_protocol::{Batch, LatestValue, Score, StateValue, WindowSummary};
use reqwest::StatusCode;

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// 40 one-minute windows of a stream ending now, a sine wave; `alerts` of them scored as alerts.
fn series(agent: &str, stream: &str, alerts: &[usize]) -> Vec<WindowSummary> {
    let end = now_ms() / 60_000 * 60_000;
    (0..40)
        .map(|i| {
            let start = end - (40 - i as i64) * 60_000;
            let mut s = summary(agent, stream, start, 0);
            s.window_end_ms = start + 60_000;
            s.last_time_ms = start + 59_000;
            let base = 21.0 + 3.0 * (i as f64 / 5.0).sin();
            (s.min, s.max, s.mean) = (base - 1.0, base + 1.5, base);
            (s.first_value, s.last_value) = (base, base);
            let alert = alerts.contains(&i);
            s.score = Some(Score {
                value: if alert {
                    0.95
                } else {
                    0.1 + 0.02 * (i % 5) as f64
                },
                alert,
                model: "anomaly@3f2a9c1d".to_owned(),
            });
            s
        })
        .collect()
}

#[tokio::test]
async fn dashboard_renders_fleet_and_charts_in_headless_chromium() {
    let Some(chromium) = std::env::var_os("EDGEWISE_TEST_CHROMIUM") else {
        eprintln!("EDGEWISE_TEST_CHROMIUM is not set: skipped");
        return;
    };
    let h = Harness::start(Backend::Sqlite).await;
    let t1 = h.add_device("gw-1").await;
    let t2 = h.add_device("gw-2").await;
    h.add_device("gw-3").await;
    let mut b1 = series("gw-1", "node-1/temperature", &[30, 35]);
    b1.extend(series("gw-1", "node-1/humidity", &[]));
    let mut b1 = Batch::new("gw-1".to_owned(), now_ms(), b1);
    b1.latest = vec![
        LatestValue {
            stream: "node-1/door".to_owned(),
            time_ms: now_ms() - 60_000,
            value: StateValue::Text("<b>open</b>".to_owned()),
        },
        LatestValue {
            stream: "node-1/alarm".to_owned(),
            time_ms: now_ms() - 60_000,
            value: StateValue::Bool(false),
        },
    ];
    assert_eq!(
        h.post_ingest(Some(&t1), b1.to_cbor()).await.status,
        StatusCode::OK
    );
    let b2 = series("gw-2", "node-9/temperature", &[39]);
    assert_eq!(
        h.post_ingest(Some(&t2), batch("gw-2", b2)).await.status,
        StatusCode::OK
    );

    let shot = std::env::var_os("EDGEWISE_DASHBOARD_SCREENSHOT")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| std::env::temp_dir().join("dashboard.png"));
    let profile = tempfile::tempdir().unwrap();
    let url = h.url("/?device=gw-1");
    let common_args = [
        "--headless".to_owned(),
        "--no-sandbox".to_owned(),
        "--disable-gpu".to_owned(),
        "--disable-background-networking".to_owned(),
        "--disable-extensions".to_owned(),
        "--no-first-run".to_owned(),
        "--hide-scrollbars".to_owned(),
        "--window-size=1366,900".to_owned(),
        "--virtual-time-budget=10000".to_owned(),
        format!("--user-data-dir={}", profile.path().display()),
    ];
    let dom = tokio::process::Command::new(&chromium)
        .args(&common_args)
        .arg("--dump-dom")
        .arg(&url)
        .output()
        .await
        .expect("run chromium");
    let html = String::from_utf8_lossy(&dom.stdout).into_owned();
    assert!(
        html.contains("data-ready=\"1\""),
        "page did not finish: {}\n{html}",
        String::from_utf8_lossy(&dom.stderr)
    );
    let count = |needle: &str| html.matches(needle).count();
    assert_eq!(count("<tr class=\"device"), 3, "{html}");
    assert!(
        html.contains("<span id=\"error\"></span>"),
        "the page reported an error: {html}"
    );
    assert!(
        html.contains("3 devices · 3 alerts in the last hour"),
        "{html}"
    );
    // gw-1 is shown: two streams, each a value chart and a score chart, 40 points each.
    assert_eq!(count("class=\"chart values\""), 2, "{html}");
    assert_eq!(count("class=\"chart score\""), 2, "{html}");
    assert_eq!(count("data-points=\"40\""), 4, "{html}");
    assert_eq!(count("<polyline class=\"mean\""), 2);
    assert_eq!(count("<polygon class=\"band\""), 2);
    assert_eq!(count("<circle class=\"alert\""), 2);
    assert!(html.contains("<td class=\"alerts some\">2</td>"), "{html}");
    // Its latest values, by stream; text is shown as text, never as markup.
    assert_eq!(count("<tr class=\"latest\">"), 2, "{html}");
    assert!(
        html.contains("<td class=\"value bool\">false</td>"),
        "{html}"
    );
    assert!(
        html.contains("<td class=\"value text\">&lt;b&gt;open&lt;/b&gt;</td>"),
        "{html}"
    );

    let out = tokio::process::Command::new(&chromium)
        .args(&common_args)
        .arg(format!("--screenshot={}", shot.display()))
        .arg(&url)
        .output()
        .await
        .expect("run chromium for the screenshot");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let png = std::fs::read(&shot).expect("screenshot written");
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 10_000,
        "{} bytes",
        png.len()
    );
    eprintln!("dashboard screenshot: {}", shot.display());
}
