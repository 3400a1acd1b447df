//! CPU time and peak memory of a process, read from Linux's `/proc/<pid>/stat` and `status`.
//!
//! Pure parsers ([`parse_cpu_ticks`], [`status_kib`]) plus [`ProcessUsage::read`], which
//! reads both files of a live process. Tested below on fixed text and on this process itself.

use std::path::PathBuf;

/// CPU time and peak resident memory of a process, at one moment.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ProcessUsage {
    /// User + system CPU seconds since the process started.
    pub cpu_seconds: f64,
    /// Peak resident set size (`VmHWM`), in KiB.
    pub peak_rss_kib: u64,
    /// Resident now, file-backed (`RssFile`: the binary's and libraries' pages), in KiB.
    pub rss_file_kib: u64,
    /// Resident now, anonymous (`RssAnon`: heap, stacks), in KiB.
    pub rss_anon_kib: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum ProcError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: unexpected format")]
    Format { path: PathBuf },
}

impl ProcessUsage {
    /// Reads `/proc/<pid>/stat` and `/proc/<pid>/status`; `ticks_per_second` is `CLK_TCK`.
    pub fn read(pid: u32, ticks_per_second: u64) -> Result<ProcessUsage, ProcError> {
        let cpu_seconds = cpu_seconds(pid, ticks_per_second)?;
        let status = PathBuf::from(format!("/proc/{pid}/status"));
        let text = read(&status)?;
        let kib = |key: &str| {
            status_kib(&text, key).ok_or(ProcError::Format {
                path: status.clone(),
            })
        };
        Ok(ProcessUsage {
            cpu_seconds,
            peak_rss_kib: kib("VmHWM")?,
            rss_file_kib: kib("RssFile")?,
            rss_anon_kib: kib("RssAnon")?,
        })
    }
}

/// `utime + stime` (fields 14 and 15) of a `/proc/<pid>/stat` line. The command name (field 2)
/// may hold spaces and parentheses, so fields are counted after its last `)`.
pub fn parse_cpu_ticks(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // `rest` starts at field 3 (state): utime is field 14, stime field 15.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// A `<key>: <n> kB` line of `/proc/<pid>/status` (`VmHWM`, `RssFile`, ...), in KiB.
pub fn status_kib(status: &str, key: &str) -> Option<u64> {
    let line = status
        .lines()
        .find(|l| l.strip_prefix(key).is_some_and(|r| r.starts_with(':')))?;
    let mut parts = line[key.len() + 1..].split_whitespace();
    let value: u64 = parts.next()?.parse().ok()?;
    (parts.next()? == "kB").then_some(value)
}

/// The CPU time of a process (user + system seconds since it started) from `/proc/<pid>/stat`
/// alone: for processes whose memory is not measured (the broker, the harness itself).
pub fn cpu_seconds(pid: u32, ticks_per_second: u64) -> Result<f64, ProcError> {
    let path = PathBuf::from(format!("/proc/{pid}/stat"));
    let ticks = parse_cpu_ticks(&read(&path)?).ok_or(ProcError::Format { path })?;
    Ok(ticks as f64 / ticks_per_second.max(1) as f64)
}

/// A `/proc` file's text.
fn read(path: &PathBuf) -> Result<String, ProcError> {
    std::fs::read_to_string(path).map_err(|source| ProcError::Read {
        path: path.clone(),
        source,
    })
}

/// The whole machine's idle time, from `/proc/stat`: idle + iowait clock ticks summed over
/// every CPU, and how many CPUs there are (`cpuN` lines). The difference of two readings over a
/// step says how many cores were free while it ran; busy is the rest. (Busy time is not read
/// from `/proc/stat`'s own busy fields: they are sampled at the timer tick, and under load on
/// this project's virtual machines they missed up to 0.3 cores that the processes' own times,
/// which the kernel accounts exactly, show as used; the idle time is accounted exactly.)
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MachineTicks {
    pub idle: u64,
    pub cpus: usize,
}

impl MachineTicks {
    pub fn read() -> Result<MachineTicks, ProcError> {
        let path = PathBuf::from("/proc/stat");
        parse_machine_ticks(&read(&path)?).ok_or(ProcError::Format { path })
    }
}

/// The `cpu ` line of `/proc/stat` (`cpu user nice system idle iowait ...`) and the number of
/// `cpuN` lines after it.
pub fn parse_machine_ticks(stat: &str) -> Option<MachineTicks> {
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let f: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .take(5)
        .map(|v| v.parse().ok())
        .collect::<Option<_>>()?;
    let [_user, _nice, _system, idle, iowait] = f[..] else {
        return None;
    };
    let cpus = stat
        .lines()
        .filter(|l| {
            l.strip_prefix("cpu")
                .is_some_and(|r| r.starts_with(|c: char| c.is_ascii_digit()))
        })
        .count();
    (cpus > 0).then_some(MachineTicks {
        idle: idle + iowait,
        cpus,
    })
}

/// The kernel's clock ticks per second for `/proc` times (`getconf CLK_TCK`); 100, Linux's
/// USER_HZ on every architecture we build for, when `getconf` is unavailable.
pub fn clock_ticks_per_second() -> u64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_ticks_are_counted_after_the_command_name() {
        let stat = "4242 (a (b) c) S 1 4242 4242 0 -1 4194560 500 0 0 0 1234 567 0 0 20 0 9 0 \
                    100 200000000 3000 18446744073709551615";
        assert_eq!(parse_cpu_ticks(stat), Some(1234 + 567));
        assert_eq!(parse_cpu_ticks("4242 (x) S 1 2"), None);
        assert_eq!(parse_cpu_ticks("no parenthesis"), None);
    }

    #[test]
    fn the_machines_idle_ticks_and_cpus_come_from_proc_stat() {
        let stat = "cpu  100 5 50 800 20 3 2 1 0 0\ncpu0 50 2 25 400 10 1 1 0 0 0\n\
                    cpu1 50 3 25 400 10 2 1 1 0 0\nintr 1 2\ncpufreq 3\n";
        let t = parse_machine_ticks(stat).unwrap();
        assert_eq!((t.idle, t.cpus), (800 + 20, 2));
        assert_eq!(parse_machine_ticks("cpu0 1 2 3 4 5 6 7 8\n"), None);
        assert_eq!(
            parse_machine_ticks("cpu  1 2 3\ncpu0 1 2 3\n"),
            None,
            "too few fields"
        );
        assert_eq!(parse_machine_ticks("cpu  1 2 x 4 5 6 7 8\ncpu0 1\n"), None);
        assert_eq!(
            parse_machine_ticks("cpu  1 2 3 4 5\n"),
            None,
            "no cpuN line"
        );
        let live = MachineTicks::read().unwrap();
        assert_eq!(
            Some(live.cpus),
            std::thread::available_parallelism().ok().map(|n| n.get())
        );
    }

    #[test]
    fn status_values_are_read_by_key_in_kib() {
        let status = "Name:\tagent\nVmPeak:\t  20000 kB\nVmHWM:\t    9876 kB\nVmRSS:\t 9000 kB\n\
                      RssAnon:\t    2000 kB\nRssFile:\t    7000 kB\n";
        assert_eq!(status_kib(status, "VmHWM"), Some(9876));
        assert_eq!(status_kib(status, "RssFile"), Some(7000));
        assert_eq!(status_kib(status, "RssAnon"), Some(2000));
        assert_eq!(status_kib(status, "Rss"), None, "a key is matched whole");
        assert_eq!(status_kib("VmHWM:\t12 MB\n", "VmHWM"), None);
        assert_eq!(status_kib("Name:\tx\n", "VmHWM"), None);
    }

    #[test]
    fn this_process_has_a_peak_rss_and_cpu_time() {
        // Burn 50 ms of CPU (a few ticks) so the tick count is not zero, in a release build too
        // (where a fixed loop is optimized down to nothing).
        let start = std::time::Instant::now();
        let mut x = 0u64;
        while start.elapsed() < std::time::Duration::from_millis(50) {
            x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(1));
        }
        let u = ProcessUsage::read(std::process::id(), clock_ticks_per_second()).unwrap();
        assert!(u.peak_rss_kib > 100, "{u:?}");
        assert!(u.rss_file_kib > 0 && u.rss_anon_kib > 0, "{u:?}");
        assert!(u.cpu_seconds > 0.0, "{u:?}");
        assert!(ProcessUsage::read(u32::MAX, 100).is_err());
        let cpu = cpu_seconds(std::process::id(), clock_ticks_per_second()).unwrap();
        assert!(cpu >= u.cpu_seconds, "{cpu} < {u:?}");
        assert!(cpu_seconds(u32::MAX, 100).is_err());
    }
}
