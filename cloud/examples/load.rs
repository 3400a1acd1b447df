//! Load client: many simulated devices post realistic CBOR batches to in-process receivers
//! (1 or more replicas) over real HTTP on loopback, and it reports summaries stored per second,
//! ingest latency percentiles, and where the CPU went.
//!
//! ```text
//! cargo run --release -p edgewise-cloud --example load -- --backend sqlite --replicas 1
//! cargo run --release -p edgewise-cloud --example load -- --backend postgres \
//!     --pg-url postgres://postgres@127.0.0.1:5432/test --replicas 2
//! ```
//!
//! Each device has `--streams` streams and posts batches of `--batch` new windows (round robin
//! over its streams, one-minute windows, scored, every 50th an alert): by default 500 summaries,
//! the agent uploader's default `batch_max_summaries` (about 80 KB, under its 512 KiB
//! `batch_max_bytes`). `--concurrency` clients post at once, each over its own keep-alive
//! connection, spread over the replicas (`--pg-connections` sets each PostgreSQL replica's
//! pool size, default the receiver's). PostgreSQL runs use a fresh database that is dropped at
//! the end. The rate limit is off (it is per device and would only measure itself).
//!
//! The client is kept cheap so that the figures measure the receiver: each device's first batch
//! is encoded once, and every later batch is a copy of it with its eight-byte time fields moved
//! forward by whole minutes (new windows, same CBOR shape), so no encoding runs while the clock
//! does. The client runs on its own runtime (`--client-threads` threads named `load-client`),
//! the receivers on another (`receiver`, with their blocking pool), so the report can split the
//! CPU time: load client, receivers, PostgreSQL backends of the bench database, and the rest of
//! the machine (other processes). All of them share this machine's cores, so the figures are a
//! lower bound for a dedicated receiver host.

use std::collections::{BTreeMap, HashMap};
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
    client_threads: usize,
    /// PostgreSQL connections per replica.
    pg_connections: usize,
}

const USAGE: &str = "usage: load [--backend sqlite|postgres] [--pg-url URL] [--replicas N] \
[--devices N] [--streams N] [--batch N] [--concurrency N] [--seconds N] [--client-threads N] \
[--pg-connections N]   (defaults: sqlite, 1 replica, 200 devices, 20 streams, batches of 500, \
16 concurrent clients, 10 s, 1 client thread)";

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
        client_threads: 1,
        pg_connections: PgConfig::default().max_connections,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        if flag == "--help" || flag == "-h" {
            println!("{USAGE}");
            std::process::exit(0);
        }
        let value = it
            .next()
            .with_context(|| format!("{flag} needs a value\n{USAGE}"))?;
        match flag.as_str() {
            "--backend" => a.backend = value,
            "--pg-url" => a.pg_url = value,
            "--replicas" => a.replicas = value.parse()?,
            "--devices" => a.devices = value.parse()?,
            "--streams" => a.streams = value.parse()?,
            "--batch" => a.batch = value.parse()?,
            "--concurrency" => a.concurrency = value.parse()?,
            "--seconds" => a.seconds = value.parse()?,
            "--client-threads" => a.client_threads = value.parse()?,
            "--pg-connections" => a.pg_connections = value.parse()?,
            other => anyhow::bail!("unknown flag {other}\n{USAGE}"),
        }
    }
    anyhow::ensure!(
        a.replicas >= 1
            && a.devices >= a.concurrency
            && a.concurrency >= 1
            && a.batch >= 1
            && a.streams >= 1
            && a.client_threads >= 1,
        "need replicas, concurrency, batch, streams, client-threads >= 1 and devices >= concurrency"
    );
    Ok(a)
}

/// Milliseconds of the first window of every device.
const BASE_MS: i64 = 1_700_000_000_000;
const WINDOW_MS: i64 = 60_000;

/// `n` summaries of `device`: window `w` is stream `w % streams`, minute `w / streams`.
fn summaries_for(device: &str, streams: usize, n: usize) -> Vec<WindowSummary> {
    (0..n as u64)
        .map(|w| {
            let stream = format!("node-{}/temperature", w % streams as u64);
            let start = BASE_MS + (w / streams as u64) as i64 * WINDOW_MS;
            let mean = 21.0 + (w % 17) as f64 * 0.1;
            WindowSummary {
                agent_id: device.to_owned(),
                stream,
                window_start_ms: start,
                window_end_ms: start + WINDOW_MS,
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
                quantiles: None,
            }
        })
        .collect()
}

/// A device's encoded batch and where its time fields are, so the next batch is a copy with the
/// times moved forward instead of a new encoding.
struct BatchTemplate {
    body: Vec<u8>,
    /// Offsets of the 8-byte big-endian payloads of every summary's window start and end,
    /// first time and last time (CBOR `0x1b` unsigned integers: all are above 2^32).
    time_fields: Vec<usize>,
    /// How far each batch moves the times: the minutes one batch spans.
    step_ms: i64,
    next: i64,
}

impl BatchTemplate {
    fn new(device: &str, streams: usize, n: usize) -> anyhow::Result<Self> {
        let body = Batch::new(device.to_owned(), 0, summaries_for(device, streams, n)).to_cbor();
        let time_fields = time_fields(&body).context("walking the template batch")?;
        anyhow::ensure!(
            time_fields.len() == 4 * n,
            "expected 4 time fields per summary"
        );
        Ok(BatchTemplate {
            body,
            time_fields,
            step_ms: n.div_ceil(streams) as i64 * WINDOW_MS,
            next: 0,
        })
    }

    /// The next batch: new windows of the same streams.
    fn next_body(&mut self) -> Vec<u8> {
        let mut body = self.body.clone();
        let shift = self.next * self.step_ms;
        self.next += 1;
        for &at in &self.time_fields {
            let field = &mut body[at..at + 8];
            let mut v = [0u8; 8];
            v.copy_from_slice(field);
            let moved = i64::from_be_bytes(v) + shift;
            field.copy_from_slice(&moved.to_be_bytes());
        }
        body
    }
}

/// Offsets of the time fields (summary keys 2, 3, 11, 13) of an encoded [`Batch`].
fn time_fields(body: &[u8]) -> Result<Vec<usize>, anyhow::Error> {
    let mut d = minicbor::Decoder::new(body);
    let mut out = Vec::new();
    let entries = d.map()?.context("batch map has no length")?;
    for _ in 0..entries {
        if d.u32()? != 3 {
            d.skip()?;
            continue;
        }
        let n = d.array()?.context("summaries array has no length")?;
        for _ in 0..n {
            let fields = d.map()?.context("summary map has no length")?;
            for _ in 0..fields {
                let key = d.u32()?;
                if matches!(key, 2 | 3 | 11 | 13) {
                    let at = d.position();
                    anyhow::ensure!(body[at] == 0x1b, "time field {key} is not 8 bytes");
                    out.push(at + 1);
                }
                d.skip()?;
            }
        }
    }
    Ok(out)
}

/// CPU seconds (user + system) of this process's threads, by thread name, and of the whole
/// process (threads that ended included).
fn own_cpu() -> (HashMap<String, f64>, f64) {
    let mut by_name = HashMap::new();
    if let Ok(tasks) = std::fs::read_dir("/proc/self/task") {
        for task in tasks.flatten() {
            if let Some((name, secs)) = stat_cpu(&task.path().join("stat")) {
                *by_name.entry(name).or_insert(0.0) += secs;
            }
        }
    }
    let total = stat_cpu("/proc/self/stat".as_ref()).map_or(0.0, |(_, s)| s);
    (by_name, total)
}

/// `(comm, utime + stime in seconds)` from a `/proc/.../stat` file.
fn stat_cpu(path: &std::path::Path) -> Option<(String, f64)> {
    let stat = std::fs::read_to_string(path).ok()?;
    let (head, rest) = stat.rsplit_once(')')?;
    let name = head.split_once('(')?.1.to_owned();
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After the comm: state is field 3, utime 14, stime 15 (1-based over the whole line).
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    // USER_HZ is 100 on every Linux this runs on.
    Some((name, ticks as f64 / 100.0))
}

/// CPU seconds of the PostgreSQL backends serving database `db` (0 when there are none).
fn pg_backend_cpu(db: &str) -> f64 {
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return 0.0;
    };
    let needle = format!(" {db} ");
    procs
        .flatten()
        .filter(|p| {
            std::fs::read(p.path().join("cmdline"))
                .is_ok_and(|c| String::from_utf8_lossy(&c).contains(&needle))
        })
        .filter_map(|p| stat_cpu(&p.path().join("stat")))
        .map(|(_, s)| s)
        .sum()
}

/// Busy CPU seconds of the whole machine, from `/proc/stat`.
fn machine_busy() -> f64 {
    let Ok(stat) = std::fs::read_to_string("/proc/stat") else {
        return 0.0;
    };
    let Some(cpu) = stat.lines().next() else {
        return 0.0;
    };
    let t: Vec<u64> = cpu
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal ...; busy = all but idle and iowait.
    let busy: u64 = t
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != 3 && *i != 4 && *i < 8)
        .map(|(_, v)| v)
        .sum();
    busy as f64 / 100.0
}

struct CpuMark {
    threads: HashMap<String, f64>,
    process: f64,
    pg: f64,
    machine: f64,
}

impl CpuMark {
    fn now(pg_db: Option<&str>) -> Self {
        let (threads, process) = own_cpu();
        CpuMark {
            threads,
            process,
            pg: pg_db.map_or(0.0, pg_backend_cpu),
            machine: machine_busy(),
        }
    }
}

fn main() -> anyhow::Result<()> {
    let args = parse_args()?;
    let _ = rustls::crypto::ring::default_provider().install_default();
    let receivers_rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("receiver")
        .build()?;
    let client_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.client_threads)
        .enable_all()
        .thread_name("load-client")
        .build()?;
    let result = receivers_rt.block_on(run(&args, client_rt.handle()));
    client_rt.shutdown_timeout(Duration::from_secs(1));
    result
}

async fn run(args: &Args, client_rt: &tokio::runtime::Handle) -> anyhow::Result<()> {
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
                let pool = PgConfig {
                    max_connections: args.pg_connections,
                    ..PgConfig::default()
                };
                stores.push(PgStore::connect_with(cfg.clone(), &pool).await?.into());
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

    let mut templates: Vec<Option<BatchTemplate>> = Vec::with_capacity(args.devices);
    for d in 0..args.devices {
        templates.push(Some(BatchTemplate::new(
            &format!("dev-{d:05}"),
            args.streams,
            args.batch,
        )?));
    }
    let body_bytes = templates[0].as_ref().map_or(0, |t| t.body.len());

    let pg_db = bench_db.as_ref().map(|(_, name)| name.as_str());
    let before = CpuMark::now(pg_db);
    let started = Instant::now();
    let deadline = started + Duration::from_secs(args.seconds);
    let mut workers = Vec::new();
    for w in 0..args.concurrency {
        let client = reqwest::Client::builder()
            .pool_max_idle_per_host(1)
            .build()?;
        let url = urls[w % urls.len()].clone();
        let mut mine: Vec<(String, BatchTemplate)> = Vec::new();
        for d in (w..args.devices).step_by(args.concurrency) {
            let template = templates[d].take().context("each device has one worker")?;
            mine.push((tokens[d].clone(), template));
        }
        workers.push(client_rt.spawn(async move {
            let mut latencies_us: Vec<u32> = Vec::new();
            // Failed requests by what came back: an HTTP status, or `transport`.
            let mut errors: BTreeMap<String, u64> = BTreeMap::new();
            let mut i = 0;
            while Instant::now() < deadline {
                let k = i % mine.len();
                let (token, template) = &mut mine[k];
                i += 1;
                let body = template.next_body();
                let t = Instant::now();
                let r = client
                    .post(&url)
                    .bearer_auth(&*token)
                    .header("content-type", "application/cbor")
                    .body(body)
                    .send()
                    .await;
                match r {
                    Ok(r) if r.status().is_success() => {
                        let _ = r.bytes().await;
                        latencies_us.push(t.elapsed().as_micros().min(u32::MAX as u128) as u32);
                    }
                    Ok(r) => *errors.entry(r.status().as_u16().to_string()).or_default() += 1,
                    Err(_) => *errors.entry("transport".to_owned()).or_default() += 1,
                }
            }
            (latencies_us, errors)
        }));
    }
    let mut latencies = Vec::new();
    let mut errors: BTreeMap<String, u64> = BTreeMap::new();
    for w in workers {
        let (l, e) = w.await?;
        latencies.extend(l);
        for (kind, n) in e {
            *errors.entry(kind).or_default() += n;
        }
    }
    let errors_text = if errors.is_empty() {
        "0 errors".to_owned()
    } else {
        let kinds: Vec<String> = errors.iter().map(|(k, n)| format!("{k} x{n}")).collect();
        format!(
            "{} errors: {}",
            errors.values().sum::<u64>(),
            kinds.join(", ")
        )
    };
    let elapsed = started.elapsed().as_secs_f64();
    let after = CpuMark::now(pg_db);
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
        "backend={} replicas={} devices={} batch={} ({} bytes) concurrency={} seconds={:.1}: \
         {:.0} summaries/s stored ({} in {} requests, {}; not retried), latency ms p50 {:.1} p99 {:.1} max {:.1}",
        args.backend,
        args.replicas,
        args.devices,
        args.batch,
        body_bytes,
        args.concurrency,
        elapsed,
        inserted as f64 / elapsed,
        inserted,
        latencies.len(),
        errors_text,
        pct(0.50),
        pct(0.99),
        pct(1.0),
    );
    let thread_delta = |name: &str| {
        after.threads.get(name).copied().unwrap_or(0.0)
            - before.threads.get(name).copied().unwrap_or(0.0)
    };
    let client_cpu = thread_delta("load-client");
    let process_cpu = after.process - before.process;
    let receiver_cpu = process_cpu - client_cpu;
    let pg_cpu = after.pg - before.pg;
    let machine_cpu = after.machine - before.machine;
    let others = (machine_cpu - process_cpu - pg_cpu).max(0.0);
    let cores = |s: f64| s / elapsed;
    let per_summary_us = |s: f64| {
        if inserted == 0 {
            0.0
        } else {
            s * 1e6 / inserted as f64
        }
    };
    println!(
        "cpu (cores busy on average, and us per stored summary): load client {:.2} ({:.1} us), \
         receivers {:.2} ({:.1} us), postgres backends {:.2} ({:.1} us), \
         other processes {:.2}, machine {:.2} of {}",
        cores(client_cpu),
        per_summary_us(client_cpu),
        cores(receiver_cpu),
        per_summary_us(receiver_cpu),
        cores(pg_cpu),
        per_summary_us(pg_cpu),
        cores(others),
        cores(machine_cpu),
        std::thread::available_parallelism().map_or(0, |n| n.get()),
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
