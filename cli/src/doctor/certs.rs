//! The webhook's certificate as the API server sees it: does the served chain verify against
//! the caBundle for the Service's DNS name, and when does it expire.

use rustls::client::danger::ServerCertVerifier;
use rustls::client::WebPkiServerVerifier;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, RootCertStore};
use std::sync::Arc;
use std::time::Duration;

/// Every certificate in a PEM text, in order (the leaf first for a served chain).
pub fn pem_certs(pem: &[u8], what: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let mut reader = pem;
    let certs = rustls_pemfile::certs(&mut reader)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{what}: not PEM: {e}"))?;
    if certs.is_empty() {
        return Err(format!("{what}: no CERTIFICATE in it"));
    }
    Ok(certs)
}

/// What a person needs to know about one certificate.
#[derive(Debug, Clone)]
pub struct Info {
    pub subject: String,
    pub issuer: String,
    pub not_before: i64,
    pub not_after: i64,
}

pub fn info(der: &CertificateDer<'_>) -> Result<Info, String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref())
        .map_err(|e| format!("not an X.509 certificate: {e}"))?;
    let v = cert.validity();
    Ok(Info {
        subject: cert.subject().to_string(),
        issuer: cert.issuer().to_string(),
        not_before: v.not_before.timestamp(),
        not_after: v.not_after.timestamp(),
    })
}

/// RFC 3339 for messages (`2026-11-22T02:00:00Z`).
pub fn date(unix: i64) -> String {
    k8s_openapi::jiff::Timestamp::from_second(unix)
        .map(|t| t.to_string())
        .unwrap_or_else(|_| format!("@{unix}"))
}

/// `3d 4h`, `5h 2m`, `40s`.
pub fn span(secs: i64) -> String {
    let s = secs.abs();
    let (d, h, m) = (s / 86_400, (s % 86_400) / 3600, (s % 3600) / 60);
    if d > 0 {
        format!("{d}d {h}h")
    } else if h > 0 {
        format!("{h}h {m}m")
    } else if m > 0 {
        format!("{m}m")
    } else {
        format!("{s}s")
    }
}

pub fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Trust {
    /// The chain verifies now, for the name.
    Trusted,
    /// It verifies inside its validity period, but not now (its expiry is another check's).
    TrustedOutsideValidity(String),
    /// The API server would refuse it: why, as rustls puts it.
    Refused(String),
}

/// Verify `chain` (leaf first) against the roots in `bundle` for `dns_name`, as a TLS client
/// holding that caBundle would, at `now`.
pub fn verify(
    chain: &[CertificateDer<'static>],
    bundle: &[CertificateDer<'static>],
    dns_name: &str,
    now: i64,
) -> Result<Trust, String> {
    let (leaf, intermediates) = chain
        .split_first()
        .ok_or_else(|| "no certificate to verify".to_string())?;
    let mut roots = RootCertStore::empty();
    let (added, _ignored) = roots.add_parsable_certificates(bundle.iter().cloned());
    if added == 0 {
        return Ok(Trust::Refused(
            "the caBundle holds no usable CA certificate".into(),
        ));
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider)
        .build()
        .map_err(|e| format!("building a verifier from the caBundle: {e}"))?;
    let name = ServerName::try_from(dns_name.to_string())
        .map_err(|e| format!("{dns_name:?} is not a DNS name: {e}"))?;
    let at =
        |t: i64| UnixTime::since_unix_epoch(Duration::from_secs(u64::try_from(t).unwrap_or(0)));
    match verifier.verify_server_cert(leaf, intermediates, &name, &[], at(now)) {
        Ok(_) => Ok(Trust::Trusted),
        Err(rustls::Error::InvalidCertificate(
            e @ (CertificateError::Expired
            | CertificateError::ExpiredContext { .. }
            | CertificateError::NotValidYet
            | CertificateError::NotValidYetContext { .. }),
        )) => {
            // Dates are the expiry check's business; here only the signature chain and the
            // name count, so verify again at a moment the leaf was valid.
            let i = info(leaf)?;
            let mid = i.not_before + (i.not_after - i.not_before) / 2;
            match verifier.verify_server_cert(leaf, intermediates, &name, &[], at(mid)) {
                Ok(_) => Ok(Trust::TrustedOutsideValidity(e.to_string())),
                Err(e) => Ok(Trust::Refused(e.to_string())),
            }
        }
        Err(e) => Ok(Trust::Refused(e.to_string())),
    }
}
