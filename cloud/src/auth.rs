//! Device tokens: generation, hashing at rest, and reading them from an `Authorization` header.
//!
//! A [`DeviceToken`] is 32 bytes from a CSPRNG (`rand::rng()`, ChaCha seeded from the OS), written
//! as 64 lowercase hex characters. The token is shown to the operator once; only its hash is
//! stored. The receiver looks a device up *by the hash of the presented token* and then compares
//! the found hash with [`TokenHash::matches`] in constant time, so no stored secret is compared
//! with client input by an early-exit comparison. Revocation is a column checked by that same
//! lookup on every request (no cache), so a revoked token is refused from the next request on.
//!
//! # Which hash, and why ([`TokenHasher`])
//!
//! With a [`TokenKey`] (the receiver's `--token-key-file`), the stored value is
//! `hmac-sha256:<hex HMAC-SHA256(key, SHA-256(token))>`: a **keyed** hash, with the key kept
//! outside the database. Someone who reads or writes the database (a leaked backup, an injected
//! query) can neither test token guesses offline nor plant a hash of a token they chose, without
//! also stealing the key file. A *slow* hash (Argon2, bcrypt) was not chosen: it protects
//! low-entropy secrets (passwords) against offline guessing, but these tokens carry 256 random
//! bits, which no amount of guessing reaches; and since every ingest request authenticates, a
//! deliberately slow hash would cost tens of milliseconds of CPU per request and hand any client
//! a cheap way to load the receiver. The lookup also needs a deterministic hash (no per-row salt).
//!
//! Without a key the stored value is the plain SHA-256 hex of the token (the original format).
//! Because the keyed form is computed from that SHA-256, existing databases migrate without the
//! tokens: opening a store with a key rewrites every plain hash to its keyed form in one
//! transaction ([`TokenHasher::upgrade`]); devices keep their tokens. After that, a plain hash in
//! the database no longer authenticates anyone, and opening the database without the key is
//! refused (instead of every device silently failing to authenticate).
//!
//! Pure functions, no I/O except [`TokenKey::load`]; tested by the unit tests below and by
//! `tests/security.rs` (migration of an old database, revocation, wrong tokens over HTTP).

use std::path::Path;
use std::sync::Arc;

use axum::http::HeaderMap;
use axum::http::header::AUTHORIZATION;
use rand::RngCore;
use sha2::{Digest, Sha256};

/// Longest bearer token accepted before hashing; real tokens are 64 characters.
pub const MAX_TOKEN_CHARS: usize = 256;

/// A freshly issued device secret. Its `Debug` output is redacted so it never reaches a log.
#[derive(Clone, PartialEq, Eq)]
pub struct DeviceToken(String);

impl DeviceToken {
    /// Random bytes in a token.
    pub const BYTES: usize = 32;

    /// A new random token.
    pub fn generate() -> Self {
        let mut bytes = [0u8; Self::BYTES];
        rand::rng().fill_bytes(&mut bytes);
        DeviceToken(hex::encode(bytes))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn into_string(self) -> String {
        self.0
    }

    pub fn hash(&self) -> TokenHash {
        TokenHash::of(&self.0)
    }
}

impl std::fmt::Debug for DeviceToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DeviceToken(<redacted>)")
    }
}

/// SHA-256 of a token, as 64 lowercase hex characters: what the devices table stores.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenHash(String);

impl TokenHash {
    pub fn of(token: &str) -> Self {
        TokenHash(hex::encode(Sha256::digest(token.as_bytes())))
    }

    pub fn as_hex(&self) -> &str {
        &self.0
    }

    /// Compares with a stored hex hash in constant time (for equal lengths): the time taken
    /// does not depend on where the first differing byte is.
    pub fn matches(&self, stored_hex: &str) -> bool {
        let (a, b) = (self.0.as_bytes(), stored_hex.as_bytes());
        if a.len() != b.len() {
            return false;
        }
        let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
        // Keep the compiler from turning the fold into an early-exit comparison.
        std::hint::black_box(diff) == 0
    }
}

/// The prefix of keyed hashes in the `token_hash` column.
pub const KEYED_PREFIX: &str = "hmac-sha256:";

impl TokenHash {
    /// Whether a stored value is in the keyed format.
    pub fn is_keyed(stored: &str) -> bool {
        stored.starts_with(KEYED_PREFIX)
    }
}

/// The receiver's secret for keyed token hashes: at least [`TokenKey::MIN_BYTES`] random bytes,
/// written as hex in a file only the receiver can read (`openssl rand -hex 32 > token.key;
/// chmod 600 token.key`). Every replica sharing a database must use the same key. `Debug` is
/// redacted.
#[derive(Clone)]
pub struct TokenKey(Arc<ring::hmac::Key>);

impl std::fmt::Debug for TokenKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TokenKey(<redacted>)")
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TokenKeyError {
    #[error("reading the token key {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error(
        "the token key {path} is accessible by group or others (mode {mode:04o}); run `chmod 600 {path}`"
    )]
    LoosePermissions { path: String, mode: u32 },
    #[error("the token key must be at least {} hex characters (`openssl rand -hex 32`)", 2 * TokenKey::MIN_BYTES)]
    TooShort,
    #[error("the token key is not hex (`openssl rand -hex 32`)")]
    NotHex,
}

impl TokenKey {
    /// Shortest key accepted, in bytes.
    pub const MIN_BYTES: usize = 32;

    /// A key from its hex text (surrounding whitespace ignored).
    pub fn from_hex(text: &str) -> Result<TokenKey, TokenKeyError> {
        let bytes = hex::decode(text.trim()).map_err(|_| TokenKeyError::NotHex)?;
        if bytes.len() < Self::MIN_BYTES {
            return Err(TokenKeyError::TooShort);
        }
        Ok(TokenKey(Arc::new(ring::hmac::Key::new(
            ring::hmac::HMAC_SHA256,
            &bytes,
        ))))
    }

    /// Reads a key file; refuses one that group or others may access.
    pub fn load(path: &Path) -> Result<TokenKey, TokenKeyError> {
        let read_err = |source| TokenKeyError::Read {
            path: path.display().to_string(),
            source,
        };
        let meta = std::fs::metadata(path).map_err(read_err)?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = meta.permissions().mode() & 0o7777;
            if mode & 0o077 != 0 {
                return Err(TokenKeyError::LoosePermissions {
                    path: path.display().to_string(),
                    mode,
                });
            }
        }
        if meta.len() > 4096 {
            return Err(TokenKeyError::NotHex);
        }
        let text = std::fs::read_to_string(path).map_err(read_err)?;
        Self::from_hex(&text)
    }
}

/// How the store hashes tokens: keyed with a [`TokenKey`], or plain SHA-256 (see the module docs).
#[derive(Debug, Clone, Default)]
pub struct TokenHasher {
    key: Option<TokenKey>,
}

impl TokenHasher {
    pub fn keyed(key: TokenKey) -> Self {
        TokenHasher { key: Some(key) }
    }

    pub fn is_keyed(&self) -> bool {
        self.key.is_some()
    }

    /// What the database stores for `token`.
    pub fn hash(&self, token: &str) -> TokenHash {
        let plain = Sha256::digest(token.as_bytes());
        match &self.key {
            Some(key) => Self::keyed_hash(key, &plain),
            None => TokenHash(hex::encode(plain)),
        }
    }

    /// The keyed form of a stored plain SHA-256 hex hash (the migration step); `None` without a
    /// key, or when `stored` is not a plain hash.
    pub fn upgrade(&self, stored: &str) -> Option<TokenHash> {
        let key = self.key.as_ref()?;
        let mut plain = [0u8; 32];
        hex::decode_to_slice(stored, &mut plain).ok()?;
        Some(Self::keyed_hash(key, &plain))
    }

    fn keyed_hash(key: &TokenKey, plain_sha256: &[u8]) -> TokenHash {
        let tag = ring::hmac::sign(&key.0, plain_sha256);
        TokenHash(format!("{KEYED_PREFIX}{}", hex::encode(tag.as_ref())))
    }
}

/// Why a request carries no usable bearer token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("the Authorization header is missing")]
    MissingHeader,
    #[error("the Authorization header is not `Bearer <token>`")]
    NotBearer,
    #[error("the bearer token is empty or longer than {MAX_TOKEN_CHARS} characters")]
    BadTokenLength,
}

/// The token of an `Authorization: Bearer <token>` header (scheme matched case-insensitively).
pub fn bearer_token(headers: &HeaderMap) -> Result<&str, AuthError> {
    let value = headers.get(AUTHORIZATION).ok_or(AuthError::MissingHeader)?;
    let value = value.to_str().map_err(|_| AuthError::NotBearer)?;
    let (scheme, token) = value.split_once(' ').ok_or(AuthError::NotBearer)?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err(AuthError::NotBearer);
    }
    let token = token.trim();
    if token.is_empty() || token.len() > MAX_TOKEN_CHARS {
        return Err(AuthError::BadTokenLength);
    }
    Ok(token)
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    #[test]
    fn tokens_are_random_hex_and_hash_deterministically() {
        let a = DeviceToken::generate();
        let b = DeviceToken::generate();
        assert_ne!(a, b);
        assert_eq!(a.as_str().len(), 64);
        assert!(a.as_str().chars().all(|c| c.is_ascii_hexdigit()));
        assert_eq!(a.hash(), TokenHash::of(a.as_str()));
        assert_ne!(a.hash(), b.hash());
        assert_eq!(a.hash().as_hex().len(), 64);
        assert!(a.hash().matches(TokenHash::of(a.as_str()).as_hex()));
        assert!(!a.hash().matches(b.hash().as_hex()));
        assert!(!a.hash().matches(&a.hash().as_hex()[..63]));
        assert!(!a.hash().matches(""));
        assert!(!format!("{a:?}").contains(a.as_str()));
        // Known SHA-256 vector.
        assert_eq!(
            TokenHash::of("abc").as_hex(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn keyed_hashes_need_the_key_and_upgrade_from_plain_ones() {
        let key = TokenKey::from_hex(&"ab".repeat(32)).unwrap();
        let other = TokenKey::from_hex(&"cd".repeat(32)).unwrap();
        let keyed = TokenHasher::keyed(key);
        let t = DeviceToken::generate();
        let h = keyed.hash(t.as_str());
        assert!(TokenHash::is_keyed(h.as_hex()));
        assert_eq!(h.as_hex().len(), KEYED_PREFIX.len() + 64);
        assert_eq!(h, keyed.hash(t.as_str()));
        assert_ne!(h, TokenHasher::keyed(other).hash(t.as_str()));
        // Unkeyed is the original plain SHA-256 format.
        let plain = TokenHasher::default().hash(t.as_str());
        assert_eq!(plain, t.hash());
        assert!(!TokenHash::is_keyed(plain.as_hex()));
        // Migration: the keyed form computed from the stored plain hash, without the token.
        assert_eq!(keyed.upgrade(plain.as_hex()), Some(h.clone()));
        assert_eq!(keyed.upgrade(h.as_hex()), None);
        assert_eq!(TokenHasher::default().upgrade(plain.as_hex()), None);
        assert!(!format!("{keyed:?}").contains("ab"));
    }

    #[test]
    fn token_keys_are_checked() {
        assert!(matches!(
            TokenKey::from_hex("abcd"),
            Err(TokenKeyError::TooShort)
        ));
        assert!(matches!(
            TokenKey::from_hex(&"zz".repeat(32)),
            Err(TokenKeyError::NotHex)
        ));
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("key");
        std::fs::write(&p, format!("{}\n", "01".repeat(32))).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = TokenKey::load(&p).unwrap_err().to_string();
        assert!(e.contains("chmod 600"), "{e}");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(TokenKey::load(&p).is_ok());
    }

    #[test]
    fn bearer_header_parsing() {
        let mut h = HeaderMap::new();
        assert_eq!(bearer_token(&h), Err(AuthError::MissingHeader));
        h.insert(AUTHORIZATION, HeaderValue::from_static("Basic abc"));
        assert_eq!(bearer_token(&h), Err(AuthError::NotBearer));
        h.insert(AUTHORIZATION, HeaderValue::from_static("Bearer "));
        assert_eq!(bearer_token(&h), Err(AuthError::BadTokenLength));
        h.insert(AUTHORIZATION, HeaderValue::from_static("bearer t0k"));
        assert_eq!(bearer_token(&h), Ok("t0k"));
    }
}
