//! The self-managed CA and serving certificate: what the leader keeps in the Secret, and
//! when it rotates what. Pure functions of (what is stored, the settings, now).
//!
//! Rules:
//! - the serving certificate is renewed `renew_after` after it was issued (2/3 of its
//!   validity by default), signed by the newest CA;
//! - the CA is renewed after 2/3 of its own validity; the previous CA stays in `ca.crt`
//!   until it expires, so clients holding the old bundle keep trusting the served certificate;
//! - a serving certificate signed by a new CA is only issued once the webhook configuration's
//!   caBundle holds that CA (unless nothing valid is served at all).

use crate::tls::{now_unix, parse_serving_cert, provider, validity};
use crate::Error;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, KeyPair, KeyUsagePurpose,
};
use rustls::client::danger::ServerCertVerifier;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use std::sync::Arc;
use std::time::Duration;

/// Certificates are dated this much in the past, for clocks slightly behind ours.
const SKEW: i64 = 60;

pub const TLS_CRT: &str = "tls.crt";
pub const TLS_KEY: &str = "tls.key";
pub const CA_CRT: &str = "ca.crt";
pub const CA_KEY: &str = "ca.key";

#[derive(Debug, Clone)]
pub struct Policy {
    /// DNS names of the serving certificate; the first one is checked by clients.
    pub dns_names: Vec<String>,
    pub cert_validity: Duration,
    pub cert_renew_after: Duration,
    pub ca_validity: Duration,
}

impl Policy {
    /// The names the API server may use for `service` in `namespace`.
    pub fn dns_names(service: &str, namespace: &str) -> Vec<String> {
        vec![
            format!("{service}.{namespace}.svc"),
            format!("{service}.{namespace}.svc.cluster.local"),
            service.to_string(),
            format!("{service}.{namespace}"),
        ]
    }
}

/// The Secret's four PEM entries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Material {
    /// CA certificates, newest first (`ca.crt`, also the caBundle).
    pub ca_crt: String,
    /// Key of the newest CA.
    pub ca_key: String,
    pub tls_crt: String,
    pub tls_key: String,
}

/// What the leader should do with the Secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    Keep,
    /// Write this, and why (for the log).
    Write(Material, String),
}

fn pems(bundle: &str) -> Vec<CertificateDer<'static>> {
    rustls_pemfile::certs(&mut bundle.as_bytes())
        .filter_map(Result::ok)
        .collect()
}

fn ca_name(not_before: i64) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "podwire");
    // A distinct subject per CA, so old and new CAs in one bundle are never confused.
    dn.push(
        DnType::CommonName,
        format!("podwire-injector-ca-{not_before}"),
    );
    dn
}

fn ca_params(not_before: i64, not_after: i64) -> Result<CertificateParams, Error> {
    let mut p = CertificateParams::new(Vec::<String>::new()).map_err(rc("CA parameters"))?;
    p.distinguished_name = ca_name(not_before);
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    p.not_before = ts(not_before)?;
    p.not_after = ts(not_after)?;
    Ok(p)
}

fn ts(t: i64) -> Result<time::OffsetDateTime, Error> {
    time::OffsetDateTime::from_unix_timestamp(t).map_err(|e| Error::Tls {
        what: "dating a certificate".into(),
        reason: e.to_string(),
    })
}

fn rc(what: &'static str) -> impl Fn(rcgen::Error) -> Error {
    move |e| Error::Tls {
        what: format!("generating the {what}"),
        reason: e.to_string(),
    }
}

fn secs(d: Duration) -> i64 {
    i64::try_from(d.as_secs()).unwrap_or(i64::MAX / 4)
}

/// A new CA: (cert PEM, key PEM).
pub fn new_ca(policy: &Policy, now: i64) -> Result<(String, String), Error> {
    let key = KeyPair::generate().map_err(rc("CA key"))?;
    let nb = now - SKEW;
    let cert = ca_params(nb, now + secs(policy.ca_validity))?
        .self_signed(&key)
        .map_err(rc("CA certificate"))?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// A serving certificate signed by the CA (`ca_pem`, `ca_key_pem`): (cert PEM, key PEM).
pub fn issue(
    policy: &Policy,
    ca_pem: &str,
    ca_key_pem: &str,
    now: i64,
) -> Result<(String, String), Error> {
    let ca_der = pems(ca_pem).into_iter().next().ok_or_else(|| Error::Tls {
        what: "issuing the serving certificate".into(),
        reason: "ca.crt holds no certificate".into(),
    })?;
    let (ca_nb, ca_na) = validity(&ca_der).map_err(|reason| Error::Tls {
        what: "reading the CA certificate".into(),
        reason,
    })?;
    let ca_key = KeyPair::from_pem(ca_key_pem).map_err(rc("CA key from ca.key"))?;
    // The issuer as rcgen needs it: same subject and key as the stored CA.
    let issuer = ca_params(ca_nb, ca_na)?
        .self_signed(&ca_key)
        .map_err(rc("CA certificate"))?;
    let mut p =
        CertificateParams::new(policy.dns_names.clone()).map_err(rc("serving parameters"))?;
    let mut dn = DistinguishedName::new();
    dn.push(
        DnType::CommonName,
        policy.dns_names.first().cloned().unwrap_or_default(),
    );
    p.distinguished_name = dn;
    p.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    p.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    p.not_before = ts(now - SKEW)?;
    // Never past the CA's own end.
    p.not_after = ts((now + secs(policy.cert_validity)).min(ca_na))?;
    let key = KeyPair::generate().map_err(rc("serving key"))?;
    let cert = p
        .signed_by(&key, &issuer, &ca_key)
        .map_err(rc("serving certificate"))?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// Does a client trusting `ca_bundle` (PEM) accept `leaf` for `name` at `now`? `Err` says why not.
pub fn verify(
    ca_bundle: &str,
    leaf: &CertificateDer<'_>,
    name: &str,
    now: i64,
) -> Result<(), String> {
    let mut roots = rustls::RootCertStore::empty();
    for c in pems(ca_bundle) {
        roots
            .add(c)
            .map_err(|e| format!("a CA in the bundle is unusable: {e}"))?;
    }
    if roots.is_empty() {
        return Err("the CA bundle is empty".into());
    }
    let verifier =
        rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider())
            .build()
            .map_err(|e| e.to_string())?;
    let server = ServerName::try_from(name.to_string()).map_err(|e| e.to_string())?;
    let at = UnixTime::since_unix_epoch(Duration::from_secs(u64::try_from(now).unwrap_or(0)));
    verifier
        .verify_server_cert(leaf, &[], &server, &[], at)
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// Is `stored` usable as it is, and if not, what to write instead. `published_cas`: the
/// caBundle the webhook configuration holds now (PEM), to tell whether a new CA may sign yet.
pub fn plan(
    stored: Option<&Material>,
    policy: &Policy,
    published_cas: &str,
    now: i64,
) -> Result<Action, Error> {
    let name = policy.dns_names.first().cloned().unwrap_or_default();
    let fresh = |why: String| -> Result<Action, Error> {
        let (ca_crt, ca_key) = new_ca(policy, now)?;
        let (tls_crt, tls_key) = issue(policy, &ca_crt, &ca_key, now)?;
        Ok(Action::Write(
            Material {
                ca_crt,
                ca_key,
                tls_crt,
                tls_key,
            },
            why,
        ))
    };
    let Some(m) = stored else {
        return fresh("no certificate yet: created a CA and a serving certificate".into());
    };
    // The CAs still valid, newest first, and the newest CA's key must fit.
    let cas: Vec<(CertificateDer<'static>, i64, i64)> = pems(&m.ca_crt)
        .into_iter()
        .filter_map(|c| validity(&c).ok().map(|(nb, na)| (c, nb, na)))
        .filter(|(_, _, na)| *na > now)
        .collect();
    let Some((newest, ca_nb, _)) = cas.first().cloned() else {
        return fresh("the CA in the Secret is missing or expired: started over".into());
    };
    let key_fits = KeyPair::from_pem(&m.ca_key)
        .ok()
        .and_then(|k| ca_params(ca_nb, ca_nb + 1).ok()?.self_signed(&k).ok())
        .is_some_and(|probe| pubkey_matches(&newest, probe.der()));
    if !key_fits {
        return fresh("ca.key does not belong to the newest CA in ca.crt: started over".into());
    }
    let pem_of = |c: &CertificateDer<'_>| {
        let b64 = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, c.as_ref());
        let lines: Vec<&str> = b64
            .as_bytes()
            .chunks(64)
            .filter_map(|l| std::str::from_utf8(l).ok())
            .collect();
        format!(
            "-----BEGIN CERTIFICATE-----\n{}\n-----END CERTIFICATE-----\n",
            lines.join("\n")
        )
    };
    let mut bundle: String = cas.iter().map(|(c, ..)| pem_of(c)).collect();
    let mut ca_key = m.ca_key.clone();
    let mut why = Vec::new();
    if bundle != m.ca_crt {
        why.push("dropped expired CAs from ca.crt".to_string());
    }
    // Rotate the CA after 2/3 of its life; the old one stays in the bundle.
    let ca_life = secs(policy.ca_validity);
    if now >= ca_nb + SKEW + ca_life * 2 / 3 {
        let (c, k) = new_ca(policy, now)?;
        bundle = format!("{c}{bundle}");
        ca_key = k;
        why.push("CA renewed (the previous CA stays in ca.crt until it expires)".into());
    }
    let newest_pem = pems(&bundle)
        .into_iter()
        .next()
        .map(|c| pem_of(&c))
        .unwrap_or_default();
    // The serving certificate: valid for the bundle, and not due for renewal.
    let serving = parse_serving_cert(m.tls_crt.as_bytes(), m.tls_key.as_bytes(), "the Secret");
    let (serving_ok, due) = match &serving {
        Ok(s) => {
            let leaf = s.key.cert.first().cloned();
            let ok = leaf.is_some_and(|l| verify(&bundle, &l, &name, now).is_ok());
            (ok, now >= serving_due(s.not_before, s.not_after, policy))
        }
        Err(_) => (false, true),
    };
    let signed_by_newest = serving
        .as_ref()
        .ok()
        .and_then(|s| s.key.cert.first().cloned())
        .is_some_and(|l| verify(&newest_pem, &l, &name, now).is_ok());
    // A new CA signs only once clients had time to get it: published in the caBundle, and
    // for a while (the API server reloads webhook configurations asynchronously).
    let newest_created = pems(&newest_pem)
        .first()
        .and_then(|c| validity(c).ok())
        .map_or(now, |(nb, _)| nb + SKEW);
    let may_switch =
        published_cas.contains(newest_pem.trim()) && now >= newest_created + switch_delay(policy);
    let (mut tls_crt, mut tls_key) = (m.tls_crt.clone(), m.tls_key.clone());
    if !serving_ok {
        (tls_crt, tls_key) = issue(policy, &newest_pem, &ca_key, now)?;
        why.push("the serving certificate was unusable (missing, expired, or not signed by ca.crt): issued a new one".into());
    } else if due && (signed_by_newest || may_switch) {
        (tls_crt, tls_key) = issue(policy, &newest_pem, &ca_key, now)?;
        why.push("serving certificate renewed".into());
    } else if due {
        tracing::info!(
            "serving certificate renewal waits until the caBundle has held the new CA for {}s",
            switch_delay(policy)
        );
    }
    let next = Material {
        ca_crt: bundle,
        ca_key,
        tls_crt,
        tls_key,
    };
    if &next == m {
        Ok(Action::Keep)
    } else {
        Ok(Action::Write(next, why.join("; ")))
    }
}

/// A serving certificate is renewed once it has less than the share of its life that
/// `cert_validity - cert_renew_after` leaves (2/3 of its validity by default; sooner for one
/// cut short by its CA's end).
fn serving_due(not_before: i64, not_after: i64, policy: &Policy) -> i64 {
    let margin = secs(policy.cert_validity.saturating_sub(policy.cert_renew_after));
    (not_before + SKEW + secs(policy.cert_renew_after)).min(not_after - margin)
}

/// How long a new CA is in the caBundle before it signs the serving certificate.
fn switch_delay(policy: &Policy) -> i64 {
    (secs(policy.cert_validity.saturating_sub(policy.cert_renew_after)) / 2).min(60)
}

/// When `plan` will next have something to do (seconds since the epoch), for scheduling.
pub fn next_due(m: &Material, policy: &Policy) -> Option<i64> {
    let serving =
        parse_serving_cert(m.tls_crt.as_bytes(), m.tls_key.as_bytes(), "the Secret").ok()?;
    let ca = pems(&m.ca_crt).into_iter().next()?;
    let (ca_nb, _) = validity(&ca).ok()?;
    let ca_created = ca_nb + SKEW;
    let mut due = serving_due(serving.not_before, serving.not_after, policy)
        .min(ca_created + secs(policy.ca_validity) * 2 / 3);
    // Waiting for a new CA to settle before it signs.
    if due <= now_unix() && ca_created + switch_delay(policy) > now_unix() {
        due = ca_created + switch_delay(policy);
    }
    Some(due)
}

/// Same subjectPublicKeyInfo in both certificates.
fn pubkey_matches(a: &[u8], b: &[u8]) -> bool {
    match (spki(a), spki(b)) {
        (Some(x), Some(y)) => x == y,
        _ => false,
    }
}

fn spki(cert: &[u8]) -> Option<Vec<u8>> {
    crate::tls::public_key_info(cert)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> Policy {
        Policy {
            dns_names: Policy::dns_names("podwire-injector", "podwire-system"),
            cert_validity: Duration::from_secs(900),
            cert_renew_after: Duration::from_secs(600),
            ca_validity: Duration::from_secs(9000),
        }
    }

    fn written(a: Action) -> (Material, String) {
        match a {
            Action::Write(m, why) => (m, why),
            Action::Keep => panic!("expected a write"),
        }
    }

    fn leaf(m: &Material) -> CertificateDer<'static> {
        pems(&m.tls_crt).remove(0)
    }

    const NAME: &str = "podwire-injector.podwire-system.svc";

    #[test]
    fn creates_then_keeps_then_renews_the_serving_cert_under_the_same_ca() {
        let p = policy();
        let t0 = 1_900_000_000;
        let (m, why) = written(plan(None, &p, "", t0).expect("plan"));
        assert!(why.contains("created"), "{why}");
        assert_eq!(pems(&m.ca_crt).len(), 1);
        verify(&m.ca_crt, &leaf(&m), NAME, t0).expect("chains to the CA");
        for n in &p.dns_names {
            verify(&m.ca_crt, &leaf(&m), n, t0).expect(n);
        }
        assert_eq!(
            plan(Some(&m), &p, &m.ca_crt, t0 + 100).expect("plan"),
            Action::Keep
        );
        assert_eq!(next_due(&m, &p), Some(t0 + 600));
        let (m2, why) = written(plan(Some(&m), &p, &m.ca_crt, t0 + 600).expect("plan"));
        assert_eq!(why, "serving certificate renewed");
        assert_eq!(m2.ca_crt, m.ca_crt);
        assert_ne!(m2.tls_crt, m.tls_crt);
        // A client holding the bundle from before trusts the renewed certificate.
        verify(&m.ca_crt, &leaf(&m2), NAME, t0 + 600).expect("old bundle, new cert");
    }

    #[test]
    fn ca_rotation_keeps_the_old_ca_and_waits_for_the_bundle_to_be_published() {
        let p = policy();
        let t0 = 1_900_000_000;
        let (m0, _) = written(plan(None, &p, "", t0).expect("plan"));
        let t1 = t0 + 6000; // 2/3 of the CA's life
        let (m, _) = written(plan(Some(&m0), &p, &m0.ca_crt, t1 - 100).expect("plan"));
        let (m2, why) = written(plan(Some(&m), &p, &m.ca_crt, t1).expect("plan"));
        assert!(why.contains("CA renewed"), "{why}");
        assert_eq!(pems(&m2.ca_crt).len(), 2);
        assert!(m2.ca_crt.ends_with(&m.ca_crt), "old CA kept last");
        // Not due yet: it stays with the old CA, which the new bundle still holds.
        verify(&m2.ca_crt, &leaf(&m2), NAME, t1).expect("new bundle, old cert");
        assert_eq!(m2.tls_crt, m.tls_crt);
        // Due, but the new CA is not in the caBundle yet (or only just): it waits.
        let due = t1 + 500;
        assert_eq!(
            plan(Some(&m2), &p, &m.ca_crt, due).expect("plan"),
            Action::Keep
        );
        assert_eq!(
            plan(Some(&m2), &p, &m2.ca_crt, t1 + 10).expect("plan"),
            Action::Keep
        );
        // Published for long enough: the serving cert moves to the new CA.
        let (m3, why) = written(plan(Some(&m2), &p, &m2.ca_crt, due).expect("plan"));
        assert_eq!(why, "serving certificate renewed");
        let newest = pems(&m3.ca_crt).remove(0);
        let newest_only = format!(
            "-----BEGIN CERTIFICATE-----\n{}\n-----END CERTIFICATE-----\n",
            base64::Engine::encode(&base64::engine::general_purpose::STANDARD, newest.as_ref())
        );
        verify(&newest_only, &leaf(&m3), NAME, due).expect("signed by the new CA");
        assert!(verify(&m.ca_crt, &leaf(&m3), NAME, due).is_err());
        // When the old CA expires it leaves the bundle.
        let (m4, why) = written(plan(Some(&m3), &p, &m3.ca_crt, t0 + 9001).expect("plan"));
        assert!(why.contains("dropped expired CAs"), "{why}");
        assert_eq!(pems(&m4.ca_crt).len(), 1);
    }

    #[test]
    fn broken_material_starts_over() {
        let p = policy();
        let t0 = 1_900_000_000;
        let (m, _) = written(plan(None, &p, "", t0).expect("plan"));
        let (other, _) = written(plan(None, &p, "", t0).expect("plan"));
        let mut wrong_key = m.clone();
        wrong_key.ca_key = other.ca_key.clone();
        let (_, why) = written(plan(Some(&wrong_key), &p, "", t0).expect("plan"));
        assert!(why.contains("ca.key does not belong"), "{why}");
        let mut foreign = m.clone();
        foreign.tls_crt = other.tls_crt.clone();
        foreign.tls_key = other.tls_key.clone();
        let (fixed, why) = written(plan(Some(&foreign), &p, &m.ca_crt, t0).expect("plan"));
        assert!(why.contains("unusable"), "{why}");
        assert_eq!(fixed.ca_crt, m.ca_crt);
        verify(&m.ca_crt, &leaf(&fixed), NAME, t0).expect("reissued under the kept CA");
        let (_, why) = written(plan(Some(&m), &p, "", t0 + 9001).expect("plan"));
        assert!(why.contains("expired"), "{why}");
    }
}
