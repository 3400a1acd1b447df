//! Device tokens: generation, hashing, and reading them from an `Authorization` header.
//!
//! A [`DeviceToken`] is 32 bytes from a CSPRNG (`rand::rng()`, ChaCha seeded from the OS), written
//! as 64 lowercase hex characters. The token is shown to the operator once; only its
//! [`TokenHash`] (SHA-256, hex) is stored. The receiver looks a device up *by the hash of the
//! presented token* and then compares the found hash with [`TokenHash::matches`] in constant time,
//! so no stored secret is compared with client input by an early-exit comparison.
//!
//! Pure functions, no I/O; tested by the unit tests below.

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
