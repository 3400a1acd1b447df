//! A private Mosquitto for one harness run: the machine's config, moved into a temporary
//! directory and onto a free loopback port, plus the operator settings under test.
//!
//! [`private_config`] is the pure rewrite (tested below): every line of the machine's config is
//! kept except those naming the machine's own files or listeners (`pid_file`,
//! `persistence_location`, `log_dest`, `listener`, `port`, `include_dir`), which are replaced
//! by ones inside the temporary directory and a `listener <port> 127.0.0.1`; `extra` lines
//! (e.g. `max_inflight_messages 100`) come last. [`Mosquitto::start`] runs it as a child
//! process, which is killed when the handle is dropped.

use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

/// Where Debian and Ubuntu keep the broker's config.
pub const MACHINE_CONFIG: &str = "/etc/mosquitto/mosquitto.conf";

/// Keys that name the machine broker's own files and listeners.
const RELOCATED: [&str; 6] = [
    "pid_file",
    "persistence_location",
    "log_dest",
    "listener",
    "port",
    "include_dir",
];

/// The machine's config `machine`, rewritten to run from `dir` on `127.0.0.1:port`.
pub fn private_config(machine: &str, dir: &Path, port: u16, extra: &[String]) -> String {
    let mut out = String::from("# The machine's Mosquitto config, moved by edgewise-bench.\n");
    let mut anonymous = false;
    for line in machine.lines() {
        let key = line.split_whitespace().next().unwrap_or("");
        if RELOCATED.contains(&key) {
            out.push_str("# (moved) ");
        }
        anonymous |= key == "allow_anonymous";
        out.push_str(line);
        out.push('\n');
    }
    out.push_str(&format!(
        "persistence_location {}/\nlog_dest file {}\nlistener {port} 127.0.0.1\n",
        dir.display(),
        dir.join("mosquitto.log").display()
    ));
    if !anonymous {
        // The harness's clients do not authenticate.
        out.push_str("allow_anonymous true\n");
    }
    for line in extra {
        out.push_str(line);
        out.push('\n');
    }
    out
}

/// A running private Mosquitto; killed on drop.
pub struct Mosquitto {
    pub addr: SocketAddr,
    child: Child,
    pub dir: PathBuf,
}

impl Mosquitto {
    /// The broker's process id (for its CPU time).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Writes the private config into `dir` and starts `mosquitto -c` on it, waiting (10 s at
    /// most) until it accepts connections.
    pub fn start(dir: &Path, machine_config: &Path, extra: &[String]) -> anyhow::Result<Mosquitto> {
        let machine = std::fs::read_to_string(machine_config)
            .with_context(|| format!("reading {}", machine_config.display()))?;
        let addr = crate::free_loopback_addr()?;
        // Started as root, Mosquitto switches to its own user (`mosquitto`) before it opens its
        // log and persistence files: the directory must be writable by that user too, or the
        // broker runs without a log ("Unable to open log file" in mosquitto.stderr).
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o777))
                .with_context(|| format!("making {} writable for the broker", dir.display()))?;
        }
        let conf = dir.join("mosquitto.conf");
        std::fs::write(&conf, private_config(&machine, dir, addr.port(), extra))
            .with_context(|| format!("writing {}", conf.display()))?;
        let stderr = std::fs::File::create(dir.join("mosquitto.stderr"))
            .context("creating mosquitto.stderr")?;
        let child = Command::new("mosquitto")
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .context("starting `mosquitto` (is it installed? apt-get install mosquitto)")?;
        let mut m = Mosquitto {
            addr,
            child,
            dir: dir.to_path_buf(),
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
            if let Ok(Some(status)) = m.child.try_wait() {
                let log = std::fs::read_to_string(dir.join("mosquitto.log")).unwrap_or_default();
                let err = std::fs::read_to_string(dir.join("mosquitto.stderr")).unwrap_or_default();
                bail!(
                    "mosquitto exited ({status}) on {}:\n{err}{log}",
                    conf.display()
                );
            }
            if Instant::now() > deadline {
                bail!("mosquitto did not listen on {addr} within 10 s");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(m)
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MACHINE: &str = "pid_file /run/mosquitto/mosquitto.pid\npersistence true\n\
        persistence_location /var/lib/mosquitto/\nlog_dest file /var/log/mosquitto/mosquitto.log\n\
        listener 1883 127.0.0.1\nallow_anonymous true\n";

    #[test]
    fn the_machine_config_moves_into_the_directory_and_onto_the_port() {
        let extra = vec!["max_inflight_messages 100".to_string()];
        let c = private_config(MACHINE, Path::new("/tmp/x"), 40001, &extra);
        let active: Vec<&str> = c
            .lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
            .collect();
        assert_eq!(
            active,
            [
                "persistence true",
                "allow_anonymous true",
                "persistence_location /tmp/x/",
                "log_dest file /tmp/x/mosquitto.log",
                "listener 40001 127.0.0.1",
                "max_inflight_messages 100",
            ]
        );
    }

    #[test]
    fn anonymous_access_is_added_when_the_machine_config_is_silent() {
        let c = private_config("persistence false\n", Path::new("/d"), 1, &[]);
        assert!(c.lines().any(|l| l == "allow_anonymous true"), "{c}");
        assert!(c.lines().any(|l| l == "listener 1 127.0.0.1"), "{c}");
    }
}
