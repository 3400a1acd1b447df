//! Running as a system service: systemd notifications (readiness, reload, stop, watchdog) and
//! the config reload plan for SIGHUP.
//!
//! - [`Notifier`] speaks the `sd_notify` protocol: one datagram per state change to the unix
//!   socket named by `NOTIFY_SOCKET` (a path, or `@name` for the abstract namespace). Without
//!   that variable (not started by systemd with `Type=notify`) every call is a no-op.
//! - [`watchdog_interval`] reads `WATCHDOG_USEC` (and `WATCHDOG_PID`, when set) and returns how
//!   often to send `WATCHDOG=1`: half the timeout, as systemd recommends. The binary sends it
//!   only after its own `/healthz` answered, so a wedged runtime stops the pings and systemd
//!   restarts the service.
//! - [`plan_reload`] compares the running config file with the new one: which keys changed,
//!   which of them a reload applies (by restarting the agent's tasks in-process: store, MQTT
//!   session and uploader are reopened with the new settings; acked readings are durable and
//!   unacked ones are redelivered by the broker, so nothing is lost), and which it refuses to
//!   change in a running process ([`RESTART_ONLY_KEYS`]: the gateway's identity and its database
//!   location; they keep their running values until the next restart). An invalid new file
//!   changes nothing.
//!
//! Tested below: datagrams arrive on a real unix socket, watchdog variables, key diffs, and
//! every kind of reload plan.

use std::collections::BTreeMap;
use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::time::Duration;

use crate::config::{AgentConfig, ConfigError, Problem};

/// Sends `sd_notify` messages to systemd (or nowhere, when not started by systemd).
#[derive(Debug)]
pub struct Notifier {
    target: Option<(UnixDatagram, NotifyAddr)>,
}

#[derive(Debug)]
enum NotifyAddr {
    Path(std::path::PathBuf),
    Abstract(Vec<u8>),
}

impl Notifier {
    /// From `NOTIFY_SOCKET`; a no-op notifier when it is unset or empty.
    pub fn from_env() -> std::io::Result<Notifier> {
        match std::env::var_os("NOTIFY_SOCKET") {
            Some(s) if !s.is_empty() => Notifier::for_socket(Path::new(&s)),
            _ => Ok(Notifier { target: None }),
        }
    }

    /// A notifier for the socket `addr` (`@name`: abstract namespace).
    pub fn for_socket(addr: &Path) -> std::io::Result<Notifier> {
        use std::os::unix::ffi::OsStrExt;
        let bytes = addr.as_os_str().as_bytes();
        let addr = match bytes.strip_prefix(b"@") {
            Some(name) => NotifyAddr::Abstract(name.to_vec()),
            None => NotifyAddr::Path(addr.to_owned()),
        };
        Ok(Notifier {
            target: Some((UnixDatagram::unbound()?, addr)),
        })
    }

    /// Whether messages go anywhere.
    pub fn enabled(&self) -> bool {
        self.target.is_some()
    }

    /// Sends one message, e.g. `"READY=1\nSTATUS=running"`.
    pub fn notify(&self, state: &str) -> std::io::Result<()> {
        let Some((socket, addr)) = &self.target else {
            return Ok(());
        };
        match addr {
            NotifyAddr::Path(p) => socket.send_to(state.as_bytes(), p).map(|_| ()),
            NotifyAddr::Abstract(name) => {
                use std::os::linux::net::SocketAddrExt;
                let a = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
                socket.send_to_addr(state.as_bytes(), &a).map(|_| ())
            }
        }
    }

    /// Sends `state`, logging (not failing) when systemd cannot be told: the agent keeps working.
    pub fn send(&self, state: &str) {
        if let Err(e) = self.notify(state) {
            tracing::warn!(error = %e, state, "sd_notify failed");
        }
    }
}

/// How often to send `WATCHDOG=1`: half of `WATCHDOG_USEC`, if the watchdog is on for this
/// process (`WATCHDOG_PID` unset or equal to our pid).
pub fn watchdog_interval() -> Option<Duration> {
    watchdog_interval_from(
        std::env::var("WATCHDOG_USEC").ok().as_deref(),
        std::env::var("WATCHDOG_PID").ok().as_deref(),
        std::process::id(),
    )
}

fn watchdog_interval_from(usec: Option<&str>, pid: Option<&str>, me: u32) -> Option<Duration> {
    if let Some(pid) = pid
        && pid.trim().parse::<u32>().ok() != Some(me)
    {
        return None;
    }
    let usec: u64 = usec?.trim().parse().ok().filter(|u| *u > 0)?;
    Some(Duration::from_micros(usec / 2))
}

/// Keys a reload never changes in a running process: who the gateway is (the broker keeps its
/// persistent session and unacked messages under the client id) and where its buffer lives.
/// They keep their running values until `systemctl restart`.
pub const RESTART_ONLY_KEYS: &[&str] = &["agent_id", "mqtt.client_id", "store.path"];

/// A config file as loaded: its text (for diffs) and the checked config.
#[derive(Debug, Clone)]
pub struct LoadedConfig {
    pub text: String,
    pub cfg: AgentConfig,
}

impl LoadedConfig {
    /// Reads, parses and checks `path` (as `edgewise-agent check` does).
    pub fn load(path: &Path) -> Result<LoadedConfig, ConfigError> {
        let cfg = AgentConfig::load(path)?;
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Ok(LoadedConfig { text, cfg })
    }
}

/// What a SIGHUP should do.
#[derive(Debug)]
pub enum ReloadPlan {
    /// The new file does not load: keep running as is, report why.
    Invalid(ConfigError),
    /// Nothing that a reload would change.
    Unchanged,
    /// Restart the agent's tasks with `next`. `applied`: changed keys that take effect;
    /// `need_restart`: changed keys kept at their running values.
    Apply {
        next: Box<LoadedConfig>,
        applied: Vec<String>,
        need_restart: Vec<String>,
    },
    /// Only restart-only keys changed: nothing to apply now.
    RestartOnly { need_restart: Vec<String> },
}

/// Compares the running config with the file's current content (`new`, already loaded).
/// `token_changed`: whether the device token (file or environment) differs from the running
/// one; a token rotation is applied like a changed key (`sync.token`).
pub fn plan_reload(
    running: &LoadedConfig,
    new: Result<LoadedConfig, ConfigError>,
    token_changed: bool,
) -> ReloadPlan {
    let mut new = match new {
        Ok(n) => n,
        Err(e) => return ReloadPlan::Invalid(e),
    };
    let changed = match changed_keys(&running.text, &new.text) {
        Ok(c) => c,
        // Cannot happen for a file that loaded, but a reload must never panic.
        Err(message) => {
            return ReloadPlan::Invalid(ConfigError::Invalid {
                path: "config".into(),
                problems: vec![Problem {
                    key: "(file)".into(),
                    message,
                }],
            });
        }
    };
    let (need_restart, mut applied): (Vec<String>, Vec<String>) = changed
        .into_iter()
        .partition(|k| RESTART_ONLY_KEYS.iter().any(|r| key_within(k, r)));
    if token_changed && !applied.iter().any(|k| key_within(k, "sync.token")) {
        applied.push("sync.token".into());
    }
    new.cfg.agent_id = running.cfg.agent_id.clone();
    new.cfg.mqtt.client_id = running.cfg.mqtt.client_id.clone();
    new.cfg.store.path = running.cfg.store.path.clone();
    match (applied.is_empty(), need_restart.is_empty()) {
        (true, true) => ReloadPlan::Unchanged,
        (true, false) => ReloadPlan::RestartOnly { need_restart },
        _ => ReloadPlan::Apply {
            next: Box::new(new),
            applied,
            need_restart,
        },
    }
}

/// `key` is `prefix` or lies under it (`sync.token` is within `sync.token`, `sync` is not).
fn key_within(key: &str, prefix: &str) -> bool {
    key == prefix
        || key
            .strip_prefix(prefix)
            .is_some_and(|rest| rest.starts_with('.') || rest.starts_with('['))
}

/// Key paths whose values differ between two TOML documents (`sync.interval_ms`,
/// `filter[1].max`; an added or removed key counts as changed). Sorted.
pub fn changed_keys(old: &str, new: &str) -> Result<Vec<String>, String> {
    let old: toml::Table = toml::from_str(old).map_err(|e| e.to_string())?;
    let new: toml::Table = toml::from_str(new).map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    diff_tables("", &old, &new, &mut out);
    out.sort();
    Ok(out)
}

fn diff_tables(prefix: &str, old: &toml::Table, new: &toml::Table, out: &mut Vec<String>) {
    let keys: BTreeMap<&String, ()> = old.keys().chain(new.keys()).map(|k| (k, ())).collect();
    for key in keys.into_keys() {
        let path = if prefix.is_empty() {
            key.clone()
        } else {
            format!("{prefix}.{key}")
        };
        diff_values(path, old.get(key), new.get(key), out);
    }
}

fn diff_values(
    path: String,
    old: Option<&toml::Value>,
    new: Option<&toml::Value>,
    out: &mut Vec<String>,
) {
    use toml::Value;
    match (old, new) {
        (Some(Value::Table(a)), Some(Value::Table(b))) => diff_tables(&path, a, b, out),
        // A section added or removed: name its keys, as if it had been there empty.
        (None, Some(Value::Table(t))) | (Some(Value::Table(t)), None) => {
            diff_tables(&path, &toml::Table::new(), t, out)
        }
        // Arrays of tables ([[filter]]): element by element, so the report names the rule.
        (Some(Value::Array(a)), Some(Value::Array(b)))
            if a.iter().chain(b).all(|v| v.is_table()) && !(a.is_empty() && b.is_empty()) =>
        {
            for i in 0..a.len().max(b.len()) {
                diff_values(format!("{path}[{i}]"), a.get(i), b.get(i), out);
            }
        }
        (a, b) if a != b => out.push(path),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn loaded(text: &str) -> LoadedConfig {
        let cfg = AgentConfig::parse(text).unwrap();
        assert!(cfg.problems().is_empty(), "{:?}", cfg.problems());
        LoadedConfig {
            text: text.to_string(),
            cfg,
        }
    }

    const BASE: &str = "agent_id = \"gw-1\"\n[sync]\ninterval_ms = 1000\n\
                        [[filter]]\nstream = \"+/t\"\nmin = 0.0\nmax = 10.0\n";

    #[test]
    fn notifications_arrive_on_a_real_socket_path_and_abstract_name() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify.sock");
        let server = UnixDatagram::bind(&path).unwrap();
        server
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let n = Notifier::for_socket(&path).unwrap();
        assert!(n.enabled());
        n.notify("READY=1\nSTATUS=running").unwrap();
        let mut buf = [0u8; 256];
        let len = server.recv(&mut buf).unwrap();
        assert_eq!(&buf[..len], b"READY=1\nSTATUS=running");

        use std::os::linux::net::SocketAddrExt;
        let name = format!("edgewise-test-{}", std::process::id());
        let abs = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let server = UnixDatagram::bind_addr(&abs).unwrap();
        server
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let n = Notifier::for_socket(Path::new(&format!("@{name}"))).unwrap();
        n.notify("WATCHDOG=1").unwrap();
        let len = server.recv(&mut buf).unwrap();
        assert_eq!(&buf[..len], b"WATCHDOG=1");
    }

    #[test]
    fn a_missing_socket_is_an_error_not_a_panic() {
        let n = Notifier::for_socket(Path::new("/nonexistent/notify.sock")).unwrap();
        assert!(n.notify("READY=1").is_err());
        n.send("READY=1"); // logged only
        assert!(!Notifier { target: None }.enabled());
        Notifier { target: None }.notify("READY=1").unwrap();
    }

    #[test]
    fn watchdog_interval_is_half_the_timeout_for_this_pid_only() {
        assert_eq!(
            watchdog_interval_from(Some("30000000"), None, 7),
            Some(Duration::from_secs(15))
        );
        assert_eq!(
            watchdog_interval_from(Some("30000000"), Some("7"), 7),
            Some(Duration::from_secs(15))
        );
        assert_eq!(watchdog_interval_from(Some("30000000"), Some("8"), 7), None);
        assert_eq!(watchdog_interval_from(None, None, 7), None);
        assert_eq!(watchdog_interval_from(Some("0"), None, 7), None);
        assert_eq!(watchdog_interval_from(Some("x"), None, 7), None);
    }

    #[test]
    fn changed_keys_name_tables_and_filter_rules() {
        let new = "agent_id = \"gw-1\"\n[sync]\ninterval_ms = 500\nbackoff_max_ms = 9000\n\
                   [[filter]]\nstream = \"+/t\"\nmin = 0.0\nmax = 12.0\n\
                   [[filter]]\nstream = \"+/h\"\nmax = 100.0\n";
        assert_eq!(
            changed_keys(BASE, new).unwrap(),
            vec![
                "filter[0].max",
                "filter[1].max",
                "filter[1].stream",
                "sync.backoff_max_ms",
                "sync.interval_ms"
            ]
        );
        assert_eq!(changed_keys(BASE, BASE).unwrap(), Vec::<String>::new());
        // Formatting and comments are not changes.
        let reformatted = format!("# comment\n{}", BASE.replace("1000", "1_000"));
        assert_eq!(
            changed_keys(BASE, &reformatted).unwrap(),
            Vec::<String>::new()
        );
    }

    #[test]
    fn reload_applies_live_keys_and_keeps_identity_and_store_path() {
        let running = loaded(BASE);
        let new = loaded(
            "agent_id = \"gw-2\"\n[store]\npath = \"/tmp/other.db\"\n[sync]\ninterval_ms = 250\n\
             [[filter]]\nstream = \"+/t\"\nmin = 0.0\nmax = 10.0\n",
        );
        match plan_reload(&running, Ok(new), false) {
            ReloadPlan::Apply {
                next,
                applied,
                need_restart,
            } => {
                assert_eq!(applied, vec!["sync.interval_ms"]);
                assert_eq!(need_restart, vec!["agent_id", "store.path"]);
                assert_eq!(next.cfg.sync.interval_ms, 250);
                assert_eq!(next.cfg.agent_id, "gw-1");
                assert_eq!(next.cfg.store.path, running.cfg.store.path);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn reload_plans_for_unchanged_restart_only_token_and_invalid_files() {
        let running = loaded(BASE);
        assert!(matches!(
            plan_reload(&running, Ok(loaded(BASE)), false),
            ReloadPlan::Unchanged
        ));
        match plan_reload(&running, Ok(loaded(BASE)), true) {
            ReloadPlan::Apply { applied, .. } => assert_eq!(applied, vec!["sync.token"]),
            other => panic!("{other:?}"),
        }
        let renamed = BASE.replace("gw-1", "gw-9");
        match plan_reload(&running, Ok(loaded(&renamed)), false) {
            ReloadPlan::RestartOnly { need_restart } => assert_eq!(need_restart, vec!["agent_id"]),
            other => panic!("{other:?}"),
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.toml");
        std::fs::write(&path, "agent_id = \"\"\n[window]\nwindow_seconds = 0\n").unwrap();
        match plan_reload(&running, LoadedConfig::load(&path), false) {
            ReloadPlan::Invalid(ConfigError::Invalid { problems, .. }) => {
                let keys: Vec<_> = problems.into_iter().map(|p| p.key).collect();
                assert_eq!(keys, vec!["agent_id", "window.window_seconds"]);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn key_prefixes_respect_segments() {
        assert!(key_within("store.path", "store.path"));
        assert!(key_within("filter[0].max", "filter"));
        assert!(!key_within("store.paths", "store.path"));
        assert!(!key_within("sync", "sync.token"));
    }
}
