//! Secrets the agent presents (the device token for the cloud, the MQTT password): where they
//! come from, and the checks on the files that hold them.
//!
//! A secret comes from, in order: the config value itself (discouraged: `check` warns, since
//! config files get copied, committed and pasted into tickets), a file named in the config, or an
//! environment variable (e.g. systemd's `LoadCredential=`/`Environment=`). A secret file must be a
//! regular file of at most [`MAX_SECRET_BYTES`], not readable or writable by group or others
//! (`chmod 600`), like ssh refuses a private key with loose permissions. [`Secret`]'s `Debug`
//! never shows the value, so it cannot reach a log by accident.
//!
//! Tested by the unit tests below (sources in order, permissions, size, empty files).

use std::path::{Path, PathBuf};

/// Largest secret file read; tokens are 64 characters.
pub const MAX_SECRET_BYTES: u64 = 4096;

/// A secret value; its `Debug` output is redacted.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl From<String> for Secret {
    fn from(value: String) -> Self {
        Secret(value)
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("cannot read {key} {path}: {source}")]
    Read {
        key: String,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{key} {path} is not a regular file")]
    NotAFile { key: String, path: PathBuf },
    #[error(
        "{key} {path} is accessible by group or others (mode {mode:04o}); run `chmod 600 {path}`"
    )]
    LoosePermissions {
        key: String,
        path: PathBuf,
        mode: u32,
    },
    #[error("{key} {path} is larger than {MAX_SECRET_BYTES} bytes")]
    TooLarge { key: String, path: PathBuf },
    #[error("{key} {path} is empty")]
    Empty { key: String, path: PathBuf },
    #[error("environment variable {var} is empty or not UTF-8")]
    BadEnv { var: String },
}

/// Where one secret may come from; `key` is the config key path of the file setting (for errors).
#[derive(Debug, Clone, Copy)]
pub struct SecretSource<'a> {
    pub key: &'a str,
    pub inline: Option<&'a str>,
    pub file: Option<&'a Path>,
    pub env: &'a str,
}

impl SecretSource<'_> {
    /// The secret, or `None` when no source provides one.
    pub fn load(&self) -> Result<Option<Secret>, SecretError> {
        if let Some(v) = self.inline {
            return Ok(Some(Secret(v.to_string())));
        }
        if let Some(path) = self.file {
            return read_secret_file(self.key, path).map(Some);
        }
        match std::env::var(self.env) {
            Ok(v) if !v.trim().is_empty() => Ok(Some(Secret(v.trim().to_string()))),
            Ok(_) | Err(std::env::VarError::NotUnicode(_)) => Err(SecretError::BadEnv {
                var: self.env.to_string(),
            }),
            Err(std::env::VarError::NotPresent) => Ok(None),
        }
    }
}

/// Reads a secret file after checking its type, size and permissions; surrounding whitespace
/// (a trailing newline from `echo`) is removed.
pub fn read_secret_file(key: &str, path: &Path) -> Result<Secret, SecretError> {
    let err_path = || (key.to_string(), path.to_owned());
    let meta = std::fs::metadata(path).map_err(|source| SecretError::Read {
        key: key.to_string(),
        path: path.to_owned(),
        source,
    })?;
    if !meta.is_file() {
        let (key, path) = err_path();
        return Err(SecretError::NotAFile { key, path });
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = meta.permissions().mode() & 0o7777;
        if mode & 0o077 != 0 {
            let (key, path) = err_path();
            return Err(SecretError::LoosePermissions { key, path, mode });
        }
    }
    if meta.len() > MAX_SECRET_BYTES {
        let (key, path) = err_path();
        return Err(SecretError::TooLarge { key, path });
    }
    let text = std::fs::read_to_string(path).map_err(|source| SecretError::Read {
        key: key.to_string(),
        path: path.to_owned(),
        source,
    })?;
    let value = text.trim();
    if value.is_empty() {
        let (key, path) = err_path();
        return Err(SecretError::Empty { key, path });
    }
    Ok(Secret(value.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn write(dir: &Path, name: &str, text: &str, mode: u32) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
        p
    }

    #[test]
    fn a_private_file_is_read_and_trimmed() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(dir.path(), "t", "abc123\n", 0o600);
        let s = read_secret_file("sync.token_file", &p).unwrap();
        assert_eq!(s.expose(), "abc123");
        assert!(!format!("{s:?}").contains("abc123"));
        let p = write(dir.path(), "r", "abc123", 0o400);
        assert!(read_secret_file("sync.token_file", &p).is_ok());
    }

    #[test]
    fn loose_permissions_are_refused_with_the_fix() {
        let dir = tempfile::tempdir().unwrap();
        for mode in [0o644, 0o640, 0o604, 0o660, 0o666] {
            let p = write(dir.path(), "t", "abc", mode);
            let e = read_secret_file("sync.token_file", &p).unwrap_err();
            let msg = e.to_string();
            assert!(matches!(e, SecretError::LoosePermissions { .. }), "{msg}");
            assert!(
                msg.contains("sync.token_file") && msg.contains("chmod 600"),
                "{msg}"
            );
        }
    }

    #[test]
    fn empty_large_missing_and_directory_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(dir.path(), "e", " \n", 0o600);
        assert!(matches!(
            read_secret_file("k", &p),
            Err(SecretError::Empty { .. })
        ));
        let p = write(dir.path(), "l", &"x".repeat(5000), 0o600);
        assert!(matches!(
            read_secret_file("k", &p),
            Err(SecretError::TooLarge { .. })
        ));
        assert!(matches!(
            read_secret_file("k", &dir.path().join("missing")),
            Err(SecretError::Read { .. })
        ));
        assert!(matches!(
            read_secret_file("k", dir.path()),
            Err(SecretError::NotAFile { .. })
        ));
    }

    #[test]
    fn inline_comes_first_then_the_file_then_the_environment() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(dir.path(), "t", "from-file", 0o600);
        let env = "EDGEWISE_TEST_SECRET_ORDER";
        let src = SecretSource {
            key: "k",
            inline: Some("inline"),
            file: Some(&p),
            env,
        };
        assert_eq!(src.load().unwrap().unwrap().expose(), "inline");
        let src = SecretSource {
            inline: None,
            ..src
        };
        assert_eq!(src.load().unwrap().unwrap().expose(), "from-file");
        let src = SecretSource { file: None, ..src };
        assert!(src.load().unwrap().is_none());
        // SAFETY of set_var: this test alone uses this variable.
        unsafe { std::env::set_var(env, "from-env\n") };
        assert_eq!(src.load().unwrap().unwrap().expose(), "from-env");
        unsafe { std::env::remove_var(env) };
    }
}
