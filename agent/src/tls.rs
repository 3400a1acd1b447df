//! TLS for the agent's two outgoing hops (broker and cloud): [`TlsConfig`] (the `[mqtt.tls]` and
//! `[sync.tls]` tables) -> [`TlsConfig::client_config`] -> a rustls `ClientConfig` (ring provider).
//!
//! Trust: the PEM certificates in `ca_file` (a private PKI) or, without it, the system's roots
//! (`rustls-native-certs`: `/etc/ssl/certs`, `SSL_CERT_FILE`, `SSL_CERT_DIR`). The chain, the
//! validity dates and the host name are always checked by webpki; there is no switch to turn that
//! off. `pin_sha256` adds public-key pinning on top: the server's end-entity certificate must also
//! carry one of the listed public keys (SHA-256 of the DER SubjectPublicKeyInfo, hex), so a
//! certificate issued by a compromised or over-broad CA is still refused. List the next key
//! before rotating to it. `client_cert_file` + `client_key_file` present a client certificate
//! (mutual TLS).
//!
//! Every failure names the file and what is wrong with it; handshake failures carry rustls'
//! reason (e.g. `invalid peer certificate: UnknownIssuer`, `certificate expired`).
//!
//! Tested by the unit tests below (files, pins) and by `tests/tls.rs` (real handshakes with
//! certificates generated in the test: good, wrong CA, expired, pinned, mutual TLS).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use serde::Deserialize;
use sha2::{Digest, Sha256};

/// TLS settings of one outgoing connection.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    /// PEM file of the CA certificate(s) to trust instead of the system roots.
    pub ca_file: Option<PathBuf>,
    /// PEM certificate chain presented to the server (mutual TLS); needs `client_key_file`.
    pub client_cert_file: Option<PathBuf>,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1) of `client_cert_file`.
    pub client_key_file: Option<PathBuf>,
    /// Accepted server public keys: hex SHA-256 of the DER SubjectPublicKeyInfo. Empty: no pinning.
    pub pin_sha256: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("reading {key} {path}: {source}")]
    Read {
        key: String,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{key} {path} holds no PEM certificate")]
    NoCertificate { key: String, path: PathBuf },
    #[error("{key} {path} holds no usable PEM private key: {reason}")]
    NoKey {
        key: String,
        path: PathBuf,
        reason: String,
    },
    #[error("{key} {path}: a certificate is not a usable trust anchor: {reason}")]
    BadCa {
        key: String,
        path: PathBuf,
        reason: String,
    },
    #[error("no system root certificates found; set a ca_file")]
    NoSystemRoots,
    #[error("{key}[{index}] must be 64 hex characters (SHA-256 of the server's public key)")]
    BadPin { key: String, index: usize },
    #[error("client_cert_file and client_key_file must be set together")]
    HalfClientAuth,
    #[error("building the TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
}

impl TlsConfig {
    /// True when any TLS setting is given (so a plaintext URL next to it is a mistake).
    pub fn is_set(&self) -> bool {
        *self != TlsConfig::default()
    }

    /// What is wrong without reading any file, as `(field, message)`.
    pub fn problems(&self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        if self.client_cert_file.is_some() != self.client_key_file.is_some() {
            out.push((
                "client_key_file".to_string(),
                "client_cert_file and client_key_file must be set together".to_string(),
            ));
        }
        for (i, pin) in self.pin_sha256.iter().enumerate() {
            if parse_pin(pin).is_none() {
                out.push((
                    format!("pin_sha256[{i}]"),
                    "must be 64 hex characters (SHA-256 of the server's DER public key)".into(),
                ));
            }
        }
        out
    }

    /// Reads the files and builds the client configuration. `prefix` is the table's key path
    /// (e.g. `sync.tls`), used in errors; `alpn` the protocols to offer (e.g. `h2`).
    pub fn client_config(
        &self,
        prefix: &str,
        alpn: &[&[u8]],
    ) -> Result<Arc<ClientConfig>, TlsError> {
        let key = |field: &str| format!("{prefix}.{field}");
        let mut roots = RootCertStore::empty();
        match &self.ca_file {
            Some(path) => {
                let k = key("ca_file");
                for cert in read_certs(&k, path)? {
                    roots.add(cert).map_err(|e| TlsError::BadCa {
                        key: k.clone(),
                        path: path.clone(),
                        reason: e.to_string(),
                    })?;
                }
            }
            None => {
                let (added, _ignored) =
                    roots.add_parsable_certificates(rustls_native_certs::load_native_certs().certs);
                if added == 0 {
                    return Err(TlsError::NoSystemRoots);
                }
            }
        }
        let mut pins = Vec::with_capacity(self.pin_sha256.len());
        for (index, pin) in self.pin_sha256.iter().enumerate() {
            pins.push(parse_pin(pin).ok_or_else(|| TlsError::BadPin {
                key: key("pin_sha256"),
                index,
            })?);
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let webpki = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
            .build()
            .map_err(|e| rustls::Error::General(e.to_string()))?;
        let builder =
            ClientConfig::builder_with_provider(provider).with_safe_default_protocol_versions()?;
        let builder = if pins.is_empty() {
            builder.with_webpki_verifier(webpki)
        } else {
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(PinnedVerifier {
                    inner: webpki,
                    pins,
                }))
        };
        let mut cfg = match (&self.client_cert_file, &self.client_key_file) {
            (Some(cert), Some(key_path)) => {
                let chain = read_certs(&key("client_cert_file"), cert)?;
                let pk = read_key(&key("client_key_file"), key_path)?;
                builder.with_client_auth_cert(chain, pk)?
            }
            (None, None) => builder.with_no_client_auth(),
            _ => return Err(TlsError::HalfClientAuth),
        };
        cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Ok(Arc::new(cfg))
    }
}

/// The hex SHA-256 of a certificate's public key (what `pin_sha256` lists). The same value as
/// `openssl x509 -in cert.pem -pubkey -noout | openssl pkey -pubin -outform der | sha256sum`.
pub fn spki_sha256(cert: &CertificateDer<'_>) -> Result<String, rustls::Error> {
    spki_digest(cert).map(hex::encode)
}

fn spki_digest(cert: &CertificateDer<'_>) -> Result<[u8; 32], rustls::Error> {
    let parsed = webpki::EndEntityCert::try_from(cert)
        .map_err(|e| rustls::Error::General(format!("cannot parse the certificate: {e}")))?;
    Ok(Sha256::digest(parsed.subject_public_key_info().as_ref()).into())
}

fn parse_pin(pin: &str) -> Option<[u8; 32]> {
    let mut out = [0u8; 32];
    hex::decode_to_slice(pin.trim(), &mut out).ok()?;
    Some(out)
}

fn read_file(key: &str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        key: key.to_string(),
        path: path.to_owned(),
        source,
    })
}

/// Every PEM certificate in `path` (at least one).
pub fn read_certs(key: &str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read_file(key, path)?;
    let certs: Vec<_> = CertificateDer::pem_slice_iter(&pem)
        .filter_map(Result::ok)
        .collect();
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            key: key.to_string(),
            path: path.to_owned(),
        });
    }
    Ok(certs)
}

/// The first PEM private key in `path`.
pub fn read_key(key: &str, path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let pem = read_file(key, path)?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|e| TlsError::NoKey {
        key: key.to_string(),
        path: path.to_owned(),
        reason: e.to_string(),
    })
}

/// webpki verification, then the end-entity public key must be one of the pins.
#[derive(Debug)]
struct PinnedVerifier {
    inner: Arc<WebPkiServerVerifier>,
    pins: Vec<[u8; 32]>,
}

impl ServerCertVerifier for PinnedVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let verified = self.inner.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        )?;
        let digest = spki_digest(end_entity)?;
        if self.pins.contains(&digest) {
            Ok(verified)
        } else {
            tracing::error!(
                server_key_sha256 = %hex::encode(digest),
                "the server's public key matches none of the pinned keys (pin_sha256)"
            );
            Err(rustls::Error::General(format!(
                "the server's public key (sha256 {}) matches none of pin_sha256",
                hex::encode(digest)
            )))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pins_and_half_client_auth_are_problems() {
        let cfg = TlsConfig {
            client_cert_file: Some("c.pem".into()),
            pin_sha256: vec!["00".repeat(32), "xyz".into()],
            ..TlsConfig::default()
        };
        let fields: Vec<String> = cfg.problems().into_iter().map(|(f, _)| f).collect();
        assert_eq!(fields, vec!["client_key_file", "pin_sha256[1]"]);
        assert!(!TlsConfig::default().is_set());
        assert!(cfg.is_set());
    }

    #[test]
    fn pins_are_what_the_documented_openssl_command_prints() {
        // `openssl x509 -in test-cert.pem -pubkey -noout | openssl pkey -pubin -outform der
        //  | sha256sum` on the receiver's test certificate.
        let path =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../cloud/tests/fixtures/test-cert.pem");
        let certs = read_certs("test", &path).unwrap();
        assert_eq!(
            spki_sha256(&certs[0]).unwrap(),
            "37b6046383f7c381268428e91a82a80f9a7511fb499d8ae8a753c3cb299e37c2"
        );
    }

    #[test]
    fn missing_and_empty_files_are_named_in_the_error() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = TlsConfig {
            ca_file: Some(dir.path().join("nope.pem")),
            ..TlsConfig::default()
        };
        let e = cfg.client_config("mqtt.tls", &[]).unwrap_err().to_string();
        assert!(
            e.contains("mqtt.tls.ca_file") && e.contains("nope.pem"),
            "{e}"
        );
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "no pem here").unwrap();
        let cfg = TlsConfig {
            ca_file: Some(empty),
            ..TlsConfig::default()
        };
        let e = cfg.client_config("sync.tls", &[]).unwrap_err().to_string();
        assert!(e.contains("no PEM certificate"), "{e}");
    }
}
