//! "Pods cannot be created at all": the webhook's caBundle against the served certificate
//! (x509 errors), the injector Service's endpoints ("no endpoints available"), the serving
//! certificate's expiry, and the webhook's failurePolicy/timeoutSeconds.

use super::*;
pub(super) fn served_chain(
    inp: &Inputs,
) -> Result<Vec<rustls::pki_types::CertificateDer<'static>>, Outcome> {
    let secret = inp
        .cluster
        .secret
        .as_ref()
        .map_err(|e| unknown(e.clone()))?;
    let fix = format!(
        "the injector's leader writes {SYSTEM_NS}/{INJECTOR_SECRET}: check it runs (kubectl -n {SYSTEM_NS} logs deploy/{INJECTOR}); then {RESTART_INJECTOR}"
    );
    let Some(pem) = secret.data.as_ref().and_then(|d| d.get("tls.crt")) else {
        return Err(fail(
            vec![format!(
                "secret {SYSTEM_NS}/{INJECTOR_SECRET} has no tls.crt"
            )],
            fix,
        ));
    };
    certs::pem_certs(
        &pem.0,
        &format!("secret {SYSTEM_NS}/{INJECTOR_SECRET} tls.crt"),
    )
    .map_err(|e| fail(vec![e], fix))
}

pub(super) fn ca_bundle(inp: &Inputs) -> Outcome {
    let hooks = match webhooks(inp) {
        Ok(h) => h,
        Err(e) => return unknown(e),
    };
    let chain = match served_chain(inp) {
        Ok(c) => c,
        Err(o) => return o,
    };
    let mut evidence = Vec::new();
    if let Some(leaf) = chain.first() {
        match certs::info(leaf) {
            Ok(i) => evidence.push(format!(
                "served certificate ({INJECTOR_SECRET} tls.crt): subject {}, issued by {}",
                i.subject, i.issuer
            )),
            Err(e) => evidence.push(format!("served certificate: {e}")),
        }
    }
    let mut failed = false;
    for w in hooks {
        let host = webhook_host(w);
        let bundle = w
            .client_config
            .ca_bundle
            .as_ref()
            .map(|b| b.0.clone())
            .unwrap_or_default();
        if bundle.is_empty() {
            failed = true;
            evidence.push(format!(
                "webhook {}: caBundle is empty: the API server cannot verify the injector (x509: certificate signed by unknown authority)",
                w.name
            ));
            continue;
        }
        let roots = match certs::pem_certs(&bundle, &format!("webhook {} caBundle", w.name)) {
            Ok(r) => r,
            Err(e) => {
                failed = true;
                evidence.push(e);
                continue;
            }
        };
        let subjects: Vec<String> = roots
            .iter()
            .filter_map(|r| certs::info(r).ok().map(|i| i.subject))
            .collect();
        match certs::verify(&chain, &roots, &host, inp.now) {
            Ok(Trust::Trusted) => evidence.push(format!(
                "webhook {}: the caBundle ({}) verifies the served certificate for {host}",
                w.name,
                subjects.join("; ")
            )),
            Ok(Trust::TrustedOutsideValidity(why)) => evidence.push(format!(
                "webhook {}: the caBundle ({}) signs the served certificate for {host} ({why}: see cert-expiry)",
                w.name,
                subjects.join("; ")
            )),
            Ok(Trust::Refused(why)) => {
                failed = true;
                evidence.push(format!(
                    "webhook {}: the caBundle ({}) does NOT verify the served certificate for {host}: {why} (the API server reports \"x509: certificate signed by unknown authority\")",
                    w.name,
                    subjects.join("; ")
                ));
            }
            Err(e) => return unknown(e),
        }
    }
    if failed {
        fail(
            evidence,
            format!(
                "the injector keeps the caBundle in step with its Secret's ca.crt; restart it so it re-syncs: {RESTART_INJECTOR}\n\
                 compare by hand: kubectl get mutatingwebhookconfiguration {WEBHOOK_CONFIG} -o jsonpath='{{.webhooks[0].clientConfig.caBundle}}' | base64 -d | md5sum; \
                 kubectl -n {SYSTEM_NS} get secret {INJECTOR_SECRET} -o jsonpath='{{.data.ca\\.crt}}' | base64 -d | md5sum"
            ),
        )
    } else {
        pass(evidence)
    }
}

pub(super) fn injector_endpoints(inp: &Inputs) -> Outcome {
    let c = inp.cluster;
    let mut evidence = Vec::new();
    let mut ready = 0usize;
    let mut errors = Vec::new();
    match &c.endpoints {
        Ok(ep) => {
            let subsets = ep.subsets.iter().flatten();
            let (r, nr) = subsets.fold((0, 0), |(r, nr), s| {
                (
                    r + s.addresses.as_ref().map_or(0, Vec::len),
                    nr + s.not_ready_addresses.as_ref().map_or(0, Vec::len),
                )
            });
            evidence.push(format!(
                "endpoints {SYSTEM_NS}/{INJECTOR}: {r} ready, {nr} not ready"
            ));
            ready += r;
        }
        Err(e) if e.contains(" 404 ") => {
            evidence.push(format!("endpoints {SYSTEM_NS}/{INJECTOR}: none (404)"))
        }
        Err(e) => errors.push(e.clone()),
    }
    match &c.endpoint_slices {
        Ok(slices) => {
            let all = slices.iter().flat_map(|s| s.endpoints.iter());
            // Kubernetes reads a missing `ready` as ready.
            let (r, nr) = all.fold((0, 0), |(r, nr), e| {
                if e.conditions.as_ref().and_then(|c| c.ready) == Some(false) {
                    (r, nr + 1)
                } else {
                    (r + 1, nr)
                }
            });
            evidence.push(format!(
                "endpointslices of service {INJECTOR}: {} slice(s), {r} ready, {nr} not ready",
                slices.len()
            ));
            ready += r;
        }
        Err(e) => errors.push(e.clone()),
    }
    if ready > 0 {
        return pass(evidence);
    }
    if errors.len() == 2 {
        return unknown(errors.join("; "));
    }
    evidence.extend(errors.into_iter().map(|e| format!("could not read: {e}")));
    evidence.push(format!(
        "pod creation fails with \"no endpoints available for service {INJECTOR}\" while the webhook's failurePolicy is Fail"
    ));
    let sel = "app.kubernetes.io/name=podwire-injector";
    fail(
        evidence,
        format!(
            "find out why the injector pods are not ready: kubectl -n {SYSTEM_NS} get pods -l {sel}; \
             kubectl -n {SYSTEM_NS} logs -l {sel}; kubectl -n {SYSTEM_NS} describe pods -l {sel}"
        ),
    )
}

pub(super) const MIN_VALIDITY_SECS: i64 = 7 * 86_400;

pub(super) fn cert_expiry(inp: &Inputs) -> Outcome {
    let chain = match served_chain(inp) {
        Ok(c) => c,
        Err(o) => return o,
    };
    let mut evidence = Vec::new();
    let mut bad = false;
    for (i, der) in chain.iter().enumerate() {
        let what = if i == 0 {
            "served certificate".to_string()
        } else {
            format!("chain certificate {i}")
        };
        let info = match certs::info(der) {
            Ok(x) => x,
            Err(e) => return unknown(format!("{what}: {e}")),
        };
        let left = info.not_after - inp.now;
        let line = if info.not_before > inp.now {
            bad = true;
            format!(
                "{what} ({}) is not valid before {} (in {}): clocks disagree?",
                info.subject,
                certs::date(info.not_before),
                certs::span(info.not_before - inp.now)
            )
        } else if left <= 0 {
            bad = true;
            format!(
                "{what} ({}) EXPIRED at {} ({} ago): the API server refuses it",
                info.subject,
                certs::date(info.not_after),
                certs::span(left)
            )
        } else if left < MIN_VALIDITY_SECS {
            bad = true;
            format!(
                "{what} ({}) expires at {}, in {}: the injector renews at 2/3 of the validity, so renewal is overdue",
                info.subject,
                certs::date(info.not_after),
                certs::span(left)
            )
        } else {
            format!(
                "{what} ({}) valid until {} (in {})",
                info.subject,
                certs::date(info.not_after),
                certs::span(left)
            )
        };
        evidence.push(line);
    }
    if bad {
        fail(
            evidence,
            format!(
                "the injector's leader renews the certificate: check it runs and may write the Secret (see the rbac check; kubectl -n {SYSTEM_NS} logs deploy/{INJECTOR}); \
                 to force a new one: kubectl -n {SYSTEM_NS} delete secret {INJECTOR_SECRET} && {RESTART_INJECTOR}"
            ),
        )
    } else {
        pass(evidence)
    }
}

/// Kubernetes' default; podwire answers in milliseconds, so a longer wait only stalls pod
/// creation when the injector is unreachable.
pub(super) const MAX_TIMEOUT: i32 = 10;

pub(super) fn failure_policy(inp: &Inputs) -> Outcome {
    let hooks = match webhooks(inp) {
        Ok(h) => h,
        Err(e) => return unknown(e),
    };
    let mut evidence = Vec::new();
    let mut ops = Vec::new();
    for (i, w) in hooks.iter().enumerate() {
        let fp = w.failure_policy.as_deref().unwrap_or("Fail");
        match w.failure_policy.as_deref() {
            Some("Ignore") => {
                evidence.push(format!(
                    "webhook {}: failurePolicy Ignore: when the injector is down, slow or untrusted, pods silently start WITHOUT a proxy (and without redirection), and nothing reports it",
                    w.name
                ));
                ops.push(format!(
                    "{{\"op\":\"replace\",\"path\":\"/webhooks/{i}/failurePolicy\",\"value\":\"Fail\"}}"
                ));
            }
            None => evidence.push(format!(
                "webhook {}: failurePolicy not set: the API server uses Fail (pods are refused while the injector cannot answer)",
                w.name
            )),
            Some(_) => evidence.push(format!(
                "webhook {}: failurePolicy {fp}: pods are refused while the injector cannot answer, never started without the proxy",
                w.name
            )),
        }
        match w.timeout_seconds {
            Some(t) if t > MAX_TIMEOUT => {
                evidence.push(format!(
                    "webhook {}: timeoutSeconds {t}: while the injector does not answer, every pod creation in selected namespaces waits {t}s before failing (controllers back off, rollouts stall); the injector answers in milliseconds, so {MAX_TIMEOUT}s is plenty",
                    w.name
                ));
                ops.push(format!(
                    "{{\"op\":\"replace\",\"path\":\"/webhooks/{i}/timeoutSeconds\",\"value\":{MAX_TIMEOUT}}}"
                ));
            }
            Some(t) => evidence.push(format!("webhook {}: timeoutSeconds {t}", w.name)),
            None => evidence.push(format!(
                "webhook {}: timeoutSeconds not set: the API server uses {MAX_TIMEOUT}s",
                w.name
            )),
        }
    }
    if ops.is_empty() {
        pass(evidence)
    } else {
        fail(
            evidence,
            format!(
                "kubectl patch mutatingwebhookconfiguration {WEBHOOK_CONFIG} --type=json -p='[{}]'",
                ops.join(",")
            ),
        )
    }
}
