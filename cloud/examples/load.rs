//! Load client: many simulated devices post realistic CBOR batches to in-process receivers
//! (1 or more replicas) over real HTTP on loopback, and it reports summaries stored per second
//! and ingest latency percentiles.
//!
//! ```text
//! cargo run --release -p edgewise-cloud --example load -- --backend sqlite --replicas 1
//! cargo run --release -p edgewise-cloud --example load -- --backend postgres \
//!     --pg-url postgres://postgres@127.0.0.1:5432/test --replicas 2
//! ```
//!
//! Each device has `--streams` streams and posts batches of `--batch` new windows (round robin
//! over its streams, one-minute windows, scored, every 50th an alert). `--concurrency` clients
//! post at once, each over its own keep-alive connection, spread over the replicas. PostgreSQL
//! runs use a fresh database that is dropped at the end. The rate limit is off (it is per
//! device and would only measure itself). The receivers and the clients share this machine's
//! cores, so the figures are a lower bound for a dedicated receiver host.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::Context;
use edgewise_cloud::{AnyStore, PgConfig, PgStore, Receiver, ServerConfig, Storage, Store};
use edgewise_protocol::{Batch, Score, WindowSummary};

struct Args {
    backend: String,
    pg_url: String,
    replicas: usize,
    devices: usize,
    streams: usize,
    batch: usize,
    concurrency: usize,
    seconds: u64,
    prebuilt: usize,
}

fn parse_args() -> anyhow::Result<Args> {
    let mut a = Args {
        backend: "sqlite".into(),
        pg_url: "postgres://postgres@127.0.0.1:5432/test".into(),
        replicas: 1,
        devices: 200,
        streams: 20,
        batch: 500,
        concurrency: 16,
        seconds: 10,
        prebuilt: 4,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().with_context(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--backend" => a.backend = value,
            "--pg-url" => a.pg_url = value,
            "--replicas" => a.replicas = value.parse()?,
            "--devices" => a.devices = value.parse()?,
            "--streams" => a.streams = value.parse()?,
            "--batch" => a.batch = value.parse()?,
            "--concurrency" => a.concurrency = value.parse()?,
            "--seconds" => a.seconds = value.parse()?,
            "--prebuilt" => a.prebuilt = value.parse()?,
            other => anyhow::bail!("unknown flag {other}"),
        }
    }
    anyhow::ensure!(a.replicas >= 1 && a.devices >= a.concurrency && a.batch >= 1);
    Ok(a)
}

fn batch_for(device: &str, streams: usize, first_window: u64, n: usize) -> Vec<u8> {
    let base_ms: i64 = 1_700_000_000_000;
    let summaries: Vec<WindowSummary> = (0..n as u64)
        .map(|k| {
            let w = first_window + k;
            let stream = format!("node-{}/temperature", w % streams as u64);
            let start = base_ms + (w / streams as u64) as i64 * 60_000;
            let mean = 21.0 + (w % 17) as f64 * 0.1;
            WindowSummary {
                agent_id: device.to_owned(),
                stream,
                window_start_ms: start,
                window_end_ms: start + 60_000,
                revision: 0,
                count: 60,
                min: mean - 1.0,
                max: mean + 1.0,
                mean,
                stddev: 0.4,
                first_value: mean,
                first_time_ms: start + 500,
                last_value: mean,
                last_time_ms: start + 59_500,
                unit: Some("Cel".to_owned()),
                score: Some(Score {
                    value: if w % 50 == 0 { 0.97 } else { 0.12 },
                    alert: w % 50 == 0,
                    model: "anomaly@3f2a9c1d".to_owned(),
                }),
            }
        })
        .collect();
    Batch::new(device.to_owned(), 0, summaries).to_cbor()
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = parse_args()?;
    let _ = rustls::crypto::ring::default_provider().install_default();
    let dir = tempfile::tempdir()?;
    let mut bench_db: Option<(tokio_postgres::Config, String)> = None;

    let mut stores: Vec<AnyStore> = Vec::new();
    match args.backend.as_str() {
        "sqlite" => {
            for _ in 0..args.replicas {
                stores.push(Store::open(&dir.path().join("bench.db"))?.into());
            }
        }
        "postgres" => {
            let admin: tokio_postgres::Config = args.pg_url.parse()?;
            let name = format!("ew_bench_{}", std::process::id());
            let (client, conn) = admin.connect(tokio_postgres::NoTls).await?;
            tokio::spawn(conn);
            client
                .batch_execute(&format!("CREATE DATABASE {name}"))
                .await?;
            let mut cfg = admin.clone();
            cfg.dbname(&name);
            for _ in 0..args.replicas {
                stores.push(
                    PgStore::connect_with(cfg.clone(), &PgConfig::default())
                        .await?
                        .into(),
                );
            }
            bench_db = Some((admin, name));
        }
        other => anyhow::bail!("--backend is sqlite or postgres, not {other}"),
    }

    let mut tokens = Vec::new();
    for d in 0..args.devices {
        tokens.push(stores[0].register_device(format!("dev-{d:05}")).await?);
    }
    let cfg = ServerConfig {
        max_body_bytes: 16 * 1024 * 1024,
        rate_limit: None,
    };
    let mut receivers = Vec::new();
    for store in &stores {
        let listen: SocketAddr = "127.0.0.1:0".parse()?;
        receivers.push(Receiver::start(listen, store.clone(), cfg.clone()).await?);
    }
    let urls: Vec<String> = receivers
        .iter()
        .map(|r| format!("http://{}/v1/ingest", r.local_addr()))
        .collect();

    // Bodies are encoded before the clock starts (then on the fly if a device runs out), so the
    // client's encoding does not compete with the receivers for the cores being measured.
    let mut prebuilt: Vec<Vec<Vec<u8>>> = Vec::with_capacity(args.devices);
    for d in 0..args.devices {
        let device = format!("dev-{d:05}");
        prebuilt.push(
            (0..args.prebuilt)
                .rev()
                .map(|b| batch_for(&device, args.streams, (b * args.batch) as u64, args.batch))
                .collect(),
        );
    }
    let deadline = Instant::now() + Duration::from_secs(args.seconds);
    let started = Instant::now();
    let mut workers = Vec::new();
    for w in 0..args.concurrency {
        let client = reqwest::Client::builder()
            .pool_max_idle_per_host(1)
            .build()?;
        let url = urls[w % urls.len()].clone();
        let mine: Vec<(String, String)> = (w..args.devices)
            .step_by(args.concurrency)
            .map(|d| (format!("dev-{d:05}"), tokens[d].clone()))
            .collect();
        let mut ready: Vec<Vec<Vec<u8>>> = (w..args.devices)
            .step_by(args.concurrency)
            .map(|d| std::mem::take(&mut prebuilt[d]))
            .collect();
        let (streams, n) = (args.streams, args.batch);
        workers.push(tokio::spawn(async move {
            let mut latencies_us: Vec<u32> = Vec::new();
            let mut next_window = vec![(ready.first().map_or(0, Vec::len) * n) as u64; mine.len()];
            let mut errors = 0u64;
            let mut i = 0;
            while Instant::now() < deadline {
                let k = i % mine.len();
                i += 1;
                let (device, token) = &mine[k];
                let body = match ready[k].pop() {
                    Some(body) => body,
                    None => {
                        next_window[k] += n as u64;
                        batch_for(device, streams, next_window[k] - n as u64, n)
                    }
                };
                let t = Instant::now();
                let r = client
                    .post(&url)
                    .bearer_auth(token)
                    .header("content-type", "application/cbor")
                    .body(body)
                    .send()
                    .await;
                match r {
                    Ok(r) if r.status().is_success() => {
                        let _ = r.bytes().await;
                        latencies_us.push(t.elapsed().as_micros().min(u32::MAX as u128) as u32);
                    }
                    _ => errors += 1,
                }
            }
            (latencies_us, errors)
        }));
    }
    let mut latencies = Vec::new();
    let mut errors = 0;
    for w in workers {
        let (l, e) = w.await?;
        latencies.extend(l);
        errors += e;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let inserted: u64 = receivers
        .iter()
        .map(|r| r.metrics().snapshot().summaries_inserted)
        .sum();
    latencies.sort_unstable();
    let pct = |p: f64| -> f64 {
        if latencies.is_empty() {
            return 0.0;
        }
        let i = ((latencies.len() as f64 * p).ceil() as usize).clamp(1, latencies.len()) - 1;
        f64::from(latencies[i]) / 1000.0
    };
    println!(
        "backend={} replicas={} devices={} batch={} concurrency={} seconds={:.1}: \
         {:.0} summaries/s stored ({} in {} requests, {} errors), latency ms p50 {:.1} p99 {:.1} max {:.1}",
        args.backend,
        args.replicas,
        args.devices,
        args.batch,
        args.concurrency,
        elapsed,
        inserted as f64 / elapsed,
        inserted,
        latencies.len(),
        errors,
        pct(0.50),
        pct(0.99),
        pct(1.0),
    );
    for r in receivers {
        r.stop().await;
    }
    drop(stores);
    if let Some((admin, name)) = bench_db {
        let (client, conn) = admin.connect(tokio_postgres::NoTls).await?;
        tokio::spawn(conn);
        client
            .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
            .await?;
    }
    Ok(())
}
