//! What a run measured: one [`StepResult`] per load step, one [`CaseResult`] per broker, QoS
//! and fleet size, the printed table and the JSON file. Pure formatting; tested below.

use crate::procfs::ProcessUsage;
use serde::Serialize;

/// What consumed the broker's messages in a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ConsumerKind {
    /// A plain MQTT client that only counts: the broker's own ceiling.
    Subscriber,
    /// The agent binary: journal, windows, inference, sync to the receiver.
    Agent,
}

/// One load step: a fixed publish rate for a fixed time, and what came out.
#[derive(Debug, Clone, Serialize)]
pub struct StepResult {
    pub consumer: ConsumerKind,
    pub broker: String,
    pub qos: u8,
    pub sensors: usize,
    /// `probe` (short, used by the search) or `confirm` (full length).
    pub phase: &'static str,
    /// The rate asked of the simulator (messages per second; each message holds 2 readings).
    pub target_rate: f64,
    /// The simulator's publish interval per sensor, in microseconds.
    pub interval_us: u64,
    pub seconds: f64,
    pub published_messages: u64,
    pub published_readings: u64,
    /// Messages published per second of the step.
    pub achieved_rate: f64,
    /// Messages the consumer had received when the step's wait ended.
    pub received_messages: u64,
    /// From the end of publishing until the consumer had every message; `None` if it never did.
    pub catch_up_ms: Option<u64>,
    /// Agent only: summaries stored at the receiver, the readings they count, distinct windows.
    pub summaries: Option<u64>,
    pub summary_readings: Option<u64>,
    pub distinct_windows: Option<u64>,
    /// Agent only: readings the agent refused, by reason (e.g. `late`, `duplicate`).
    pub readings_rejected: Option<std::collections::BTreeMap<String, u64>>,
    /// Agent only: journal commits during the step, and the windows the model scored.
    pub journal_commits: Option<u64>,
    pub windows_scored: Option<u64>,
    /// Agent only: CPU seconds while publishing, as cores (CPU seconds / step seconds).
    pub cpu_seconds: Option<f64>,
    pub cpu_cores: Option<f64>,
    /// Agent only: the share of the step its ingest loop spent in its steps, one batch at a
    /// time (`edgewise_agent_ingest_busy_microseconds_total`): near 1, that chain is the limit.
    pub ingest_busy: Option<f64>,
    /// Where the machine's CPU went while publishing.
    #[serde(flatten)]
    pub machine: MachineCpu,
    /// Agent only: its resident memory (JSON: the fields of [`Memory`], absent for a subscriber).
    #[serde(flatten)]
    pub memory: Option<Memory>,
    pub sustained: bool,
    /// Why the step failed, or `ok`.
    pub verdict: String,
}

/// The whole machine's CPU while a step published, in cores (CPU seconds per second): every
/// part of a run shares the machine, so a consumer has the cores the publisher and the broker
/// leave; one that wants more slows them down ("publisher behind") or falls behind itself.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize)]
pub struct MachineCpu {
    /// Busy cores of all processes: the machine's cores less its idle time
    /// ([`crate::procfs::MachineTicks`]).
    pub machine_busy_cores: f64,
    /// The machine's cores.
    pub machine_cores: f64,
    /// The Mosquitto process; absent for the embedded broker, which runs in the harness.
    pub broker_cores: Option<f64>,
    /// The harness's own process: the simulated sensors (the publisher), the counting
    /// subscriber when it is the consumer, the receiver, and the embedded broker when it is the
    /// broker.
    pub harness_cores: f64,
}

impl MachineCpu {
    /// `machine 1.35/2.00 busy (broker 0.81, harness 0.53)`.
    fn line(&self) -> String {
        let broker = self
            .broker_cores
            .map_or_else(String::new, |b| format!("broker {b:.2}, "));
        format!(
            "machine {:.2}/{:.2} busy ({broker}harness {:.2})",
            self.machine_busy_cores, self.machine_cores, self.harness_cores
        )
    }
}

/// A process's resident memory, in MiB: its peak (`VmHWM`), and what was resident when read,
/// file-backed (`RssFile`: the binary's code and read-only data, the shared libraries) and
/// anonymous (`RssAnon`: heap, stacks).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Memory {
    pub peak_rss_mib: f64,
    pub rss_file_mib: f64,
    pub rss_anon_mib: f64,
}

impl Memory {
    pub fn of(usage: &ProcessUsage) -> Memory {
        let mib = |kib: u64| kib as f64 / 1024.0;
        Memory {
            peak_rss_mib: mib(usage.peak_rss_kib),
            rss_file_mib: mib(usage.rss_file_kib),
            rss_anon_mib: mib(usage.rss_anon_kib),
        }
    }
}

/// One broker, QoS and fleet size: the broker's ceiling and the agent's sustained rate.
#[derive(Debug, Clone, Serialize)]
pub struct CaseResult {
    pub broker: String,
    pub qos: u8,
    pub sensors: usize,
    /// The confirmed (full-length) step of each consumer at its highest sustained rate.
    pub ceiling: Option<StepResult>,
    pub agent: Option<StepResult>,
    /// Agent's sustained rate / subscriber's ceiling (both achieved rates).
    pub ratio: Option<f64>,
    pub steps: Vec<StepResult>,
}

impl CaseResult {
    pub fn new(broker: &str, qos: u8, sensors: usize, steps: Vec<StepResult>) -> CaseResult {
        let best = |kind| {
            steps
                .iter()
                .filter(|s| s.consumer == kind && s.phase == "confirm" && s.sustained)
                .max_by(|a, b| a.achieved_rate.total_cmp(&b.achieved_rate))
                .cloned()
        };
        let ceiling = best(ConsumerKind::Subscriber);
        let agent = best(ConsumerKind::Agent);
        let ratio = match (&ceiling, &agent) {
            (Some(c), Some(a)) if c.achieved_rate > 0.0 => Some(a.achieved_rate / c.achieved_rate),
            _ => None,
        };
        CaseResult {
            broker: broker.to_string(),
            qos,
            sensors,
            ceiling,
            agent,
            ratio,
            steps,
        }
    }
}

fn opt(v: Option<f64>, decimals: usize) -> String {
    v.map_or_else(|| "-".into(), |v| format!("{v:.decimals$}"))
}

/// `29.8 MiB (file 24.4, anon 5.4)`: peak, then what was resident at the end of the step.
fn rss(s: &StepResult) -> String {
    s.memory.map_or_else(
        || "     -".into(),
        |m| {
            format!(
                "{:>6.1} MiB (file {:.1}, anon {:.1})",
                m.peak_rss_mib, m.rss_file_mib, m.rss_anon_mib
            )
        },
    )
}

/// One line per step, as the run goes.
pub fn step_line(s: &StepResult) -> String {
    format!(
        "  {:<10} {:<7} target {:>8.0}/s achieved {:>8.0}/s received {:>9}/{:<9} catch-up {:>6} cpu {:>5} cores{} rss {}  {}  {}",
        format!("{:?}", s.consumer).to_lowercase(),
        s.phase,
        s.target_rate,
        s.achieved_rate,
        s.received_messages,
        s.published_messages,
        s.catch_up_ms
            .map_or_else(|| "never".into(), |ms| format!("{ms}ms")),
        opt(s.cpu_cores, 2),
        s.ingest_busy.map_or_else(String::new, |b| format!(
            " (ingest loop {:.0}% busy)",
            b * 100.0
        )),
        rss(s),
        s.machine.line(),
        s.verdict
    )
}

/// The summary table of a run.
pub fn table(cases: &[CaseResult]) -> String {
    let mut out = String::from(
        "broker     qos sensors  ceiling msg/s  agent msg/s  ratio  agent cpu cores  peak RSS MiB  file+anon MiB\n",
    );
    for c in cases {
        let rate = |s: &Option<StepResult>| opt(s.as_ref().map(|s| s.achieved_rate), 0);
        let agent = c.agent.as_ref();
        let memory = agent.and_then(|a| a.memory);
        out.push_str(&format!(
            "{:<10} {:>3} {:>7}  {:>13}  {:>11}  {:>5}  {:>15}  {:>12}  {:>13}\n",
            c.broker,
            c.qos,
            c.sensors,
            rate(&c.ceiling),
            rate(&c.agent),
            c.ratio
                .map_or_else(|| "-".into(), |r| format!("{:.0}%", r * 100.0)),
            opt(agent.and_then(|a| a.cpu_cores), 2),
            opt(memory.map(|m| m.peak_rss_mib), 1),
            memory.map_or_else(
                || "-".into(),
                |m| format!("{:.1}+{:.1}", m.rss_file_mib, m.rss_anon_mib)
            ),
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn step(consumer: ConsumerKind, phase: &'static str, rate: f64, sustained: bool) -> StepResult {
        StepResult {
            consumer,
            broker: "mosquitto".into(),
            qos: 1,
            sensors: 100,
            phase,
            target_rate: rate,
            interval_us: 1_000,
            seconds: 30.0,
            published_messages: (rate * 30.0) as u64,
            published_readings: (rate * 60.0) as u64,
            achieved_rate: rate,
            received_messages: (rate * 30.0) as u64,
            catch_up_ms: Some(3),
            summaries: None,
            summary_readings: None,
            distinct_windows: None,
            readings_rejected: None,
            journal_commits: None,
            windows_scored: None,
            cpu_seconds: Some(6.0),
            cpu_cores: Some(0.2),
            ingest_busy: Some(0.25),
            machine: MachineCpu {
                machine_busy_cores: 1.5,
                machine_cores: 2.0,
                broker_cores: Some(0.25),
                harness_cores: 1.0,
            },
            memory: Some(Memory {
                peak_rss_mib: 9.5,
                rss_file_mib: 6.0,
                rss_anon_mib: 3.0,
            }),
            sustained,
            verdict: "ok".into(),
        }
    }

    #[test]
    fn a_case_takes_the_best_confirmed_sustained_step_of_each_consumer() {
        use ConsumerKind::*;
        let steps = vec![
            step(Subscriber, "probe", 40_000.0, true),
            step(Subscriber, "confirm", 20_000.0, true),
            step(Subscriber, "confirm", 25_000.0, false),
            step(Agent, "confirm", 18_000.0, true),
            step(Agent, "probe", 19_000.0, true),
        ];
        let c = CaseResult::new("mosquitto", 1, 100, steps);
        assert_eq!(c.ceiling.as_ref().unwrap().achieved_rate, 20_000.0);
        assert_eq!(c.agent.as_ref().unwrap().achieved_rate, 18_000.0);
        assert!((c.ratio.unwrap() - 0.9).abs() < 1e-9);
        let line = step_line(c.agent.as_ref().unwrap());
        assert!(
            line.contains(
                "cpu  0.20 cores (ingest loop 25% busy) rss    9.5 MiB (file 6.0, anon 3.0)  machine 1.50/2.00 busy (broker 0.25, harness 1.00)"
            ),
            "{line}"
        );
        let mut counter = step(Subscriber, "confirm", 20_000.0, true);
        counter.memory = None;
        counter.machine.broker_cores = None;
        counter.ingest_busy = None;
        let line = step_line(&counter);
        assert!(
            line.contains("rss      -  machine 1.50/2.00 busy (harness 1.00)  ok"),
            "{line}"
        );
        // The JSON keeps flat keys (`.ci/bench.sh` reads `.agent.peak_rss_mib`).
        let json = serde_json::to_value(c.agent.as_ref().unwrap()).unwrap();
        assert_eq!(json["peak_rss_mib"], 9.5);
        assert_eq!(json["rss_anon_mib"], 3.0);
        assert_eq!(json["machine_busy_cores"], 1.5);
        assert_eq!(json["broker_cores"], 0.25);
        let json = serde_json::to_value(&counter).unwrap();
        assert!(json.get("peak_rss_mib").is_none(), "{json}");
        let t = table(&[c]);
        assert!(
            t.contains("20000")
                && t.contains("18000")
                && t.contains("90%")
                && t.contains("6.0+3.0"),
            "{t}"
        );
        let none = CaseResult::new(
            "embedded",
            0,
            10_000,
            vec![step(Agent, "confirm", 5.0, false)],
        );
        assert_eq!((none.agent.is_none(), none.ratio), (true, None));
        assert!(table(&[none]).lines().nth(1).unwrap().contains(" - "));
    }
}
