//! The serving certificate, hot-swappable: a rustls [`ResolvesServerCert`] whose current
//! [`CertifiedKey`] is replaced atomically, so handshakes in flight and connections already
//! open never fail while the certificate is rotated. The certificate comes from PEM files
//! (reloaded when they change: cert-manager, a mounted Secret) or from the self-managed Secret.

use crate::metrics::Metrics;
use crate::Error;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

/// A parsed serving certificate: chain, key, and the leaf's validity.
#[derive(Debug, Clone)]
pub struct ServingCert {
    pub key: Arc<CertifiedKey>,
    /// Seconds since the epoch.
    pub not_before: i64,
    pub not_after: i64,
    /// The PEM it was read from, to tell a change from a re-write of the same thing.
    pub pem: Vec<u8>,
}

pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Parse a PEM chain (leaf first) and its PEM private key.
pub fn parse_serving_cert(
    cert_pem: &[u8],
    key_pem: &[u8],
    origin: &str,
) -> Result<ServingCert, Error> {
    let bad = |reason: String| Error::Tls {
        what: format!("loading the serving certificate from {origin}"),
        reason,
    };
    let chain: Vec<CertificateDer<'static>> = rustls_pemfile::certs(&mut &cert_pem[..])
        .collect::<Result<_, _>>()
        .map_err(|e| bad(format!("the certificate PEM is unreadable: {e}")))?;
    let Some(leaf) = chain.first() else {
        return Err(bad("no CERTIFICATE block in the certificate PEM".into()));
    };
    let (not_before, not_after) = validity(leaf).map_err(bad)?;
    let key: PrivateKeyDer<'static> = rustls_pemfile::private_key(&mut &key_pem[..])
        .map_err(|e| bad(format!("the key PEM is unreadable: {e}")))?
        .ok_or_else(|| bad("no PRIVATE KEY block in the key PEM".into()))?;
    let certified = CertifiedKey::from_der(chain, key, &provider()).map_err(|e| {
        bad(format!(
            "the key does not fit the certificate or is not supported: {e}"
        ))
    })?;
    let mut pem = cert_pem.to_vec();
    pem.extend_from_slice(key_pem);
    Ok(ServingCert {
        key: Arc::new(certified),
        not_before,
        not_after,
        pem,
    })
}

/// The current serving certificate, shared by every connection.
#[derive(Debug, Default)]
pub struct CertStore {
    current: RwLock<Option<ServingCert>>,
    pub metrics: Arc<Metrics>,
}

impl CertStore {
    pub fn new(metrics: Arc<Metrics>) -> Self {
        CertStore {
            current: RwLock::default(),
            metrics,
        }
    }

    /// Install `cert` unless it is the one already served; true when it changed.
    pub fn install(&self, cert: ServingCert) -> bool {
        let mut cur = self.current.write().unwrap_or_else(|p| p.into_inner());
        if cur.as_ref().is_some_and(|c| c.pem == cert.pem) {
            return false;
        }
        self.metrics.cert_loaded(cert.not_after);
        tracing::info!(
            not_after = cert.not_after,
            "serving certificate loaded (new connections use it from now on)"
        );
        *cur = Some(cert);
        true
    }

    /// The served certificate's notAfter, if one is loaded.
    pub fn not_after(&self) -> Option<i64> {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map(|c| c.not_after)
    }

    /// Ready to serve: a certificate is loaded and not expired.
    pub fn valid_now(&self) -> bool {
        self.not_after().is_some_and(|na| na > now_unix())
    }

    pub fn current_leaf(&self) -> Option<CertificateDer<'static>> {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .and_then(|c| c.key.cert.first().cloned())
    }

    /// A rustls server config answering with whatever certificate is current at handshake.
    pub fn server_config(self: &Arc<Self>) -> Result<Arc<rustls::ServerConfig>, Error> {
        let mut config = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| Error::Tls {
                what: "building the TLS server config".into(),
                reason: e.to_string(),
            })?
            .with_no_client_auth()
            .with_cert_resolver(self.clone());
        // kube-apiserver's webhook client (Go's transport) takes HTTP/2 when offered.
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(Arc::new(config))
    }
}

impl ResolvesServerCert for CertStore {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map(|c| c.key.clone())
    }
}

pub fn now_unix() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

/// (notBefore, notAfter) of a DER certificate, in seconds since the epoch (x509-parser, as
/// doctor reads certificates).
pub fn validity(cert: &[u8]) -> Result<(i64, i64), String> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert)
        .map_err(|e| format!("the certificate is not valid DER X.509 ({e})"))?;
    let v = parsed.validity();
    Ok((v.not_before.timestamp(), v.not_after.timestamp()))
}

/// The certificate's subjectPublicKeyInfo, as encoded.
pub fn public_key_info(cert: &[u8]) -> Option<Vec<u8>> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert).ok()?;
    Some(parsed.tbs_certificate.subject_pki.raw.to_vec())
}

/// PEM files given on the command line (cert-manager, a mounted Secret): read now, and
/// again whenever they change.
#[derive(Debug, Clone)]
pub struct CertFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl CertFiles {
    pub fn load(&self) -> Result<ServingCert, Error> {
        let read = |p: &Path| {
            std::fs::read(p).map_err(|error| Error::Io {
                what: format!("reading {}", p.display()),
                error,
            })
        };
        parse_serving_cert(
            &read(&self.cert)?,
            &read(&self.key)?,
            &format!("{} and {}", self.cert.display(), self.key.display()),
        )
    }

    /// Reload into `store` whenever the files (or the directories holding them: Kubernetes
    /// swaps a `..data` symlink) change, and every `poll` in case an event was missed. A
    /// broken pair is reported and the previous certificate kept.
    pub fn spawn_reloader(self, store: Arc<CertStore>, poll: Duration) -> Result<(), Error> {
        let files = [self.cert.clone(), self.key.clone()];
        crate::filewatch::spawn(
            &[&files[0], &files[1]],
            poll,
            "the certificate files",
            move || match self.load() {
                Ok(cert) => {
                    store.install(cert);
                }
                Err(e) => tracing::warn!("{e}; still serving the previous certificate"),
            },
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_validity_from_der() {
        let mut params =
            rcgen::CertificateParams::new(vec!["a.example".to_string()]).expect("params");
        // 2020-01-02T03:04:05Z (UTCTime) and 2051-06-07T08:09:10Z (GeneralizedTime).
        params.not_before = time::OffsetDateTime::from_unix_timestamp(1_577_934_245).expect("t");
        params.not_after = time::OffsetDateTime::from_unix_timestamp(2_569_738_150).expect("t");
        let key = rcgen::KeyPair::generate().expect("key");
        let cert = params.self_signed(&key).expect("cert");
        let (nb, na) = validity(cert.der()).expect("validity");
        assert_eq!(nb, 1_577_934_245);
        assert_eq!(na, 2_569_738_150);
        assert!(validity(b"\x30\x03\x02\x01").is_err());
        assert!(validity(b"").is_err());
    }
}
