//! Self-managed TLS: every replica serves the certificate in the Secret (watched, reloaded
//! without dropping connections); one replica, the holder of a coordination.k8s.io/v1 Lease,
//! creates and rotates it ([`crate::certs::plan`]) and keeps `webhooks[*].clientConfig.caBundle`
//! of the MutatingWebhookConfiguration equal to the Secret's `ca.crt` (watched, so an
//! external reset is repaired at once).

use crate::certs::{self, Action, Material, Policy, CA_CRT, CA_KEY, TLS_CRT, TLS_KEY};
use crate::tls::{now_unix, parse_serving_cert, CertStore};
use crate::Error;
use futures::StreamExt;
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Patch, PatchParams, PostParams};
use kube::runtime::watcher::{self, Event};
use kube::runtime::WatchStreamExt;
use kube::{Api, Client};
use serde_json::json;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Notify;
use tokio::task::JoinHandle;

#[derive(Debug, Clone)]
pub struct Settings {
    pub namespace: String,
    pub secret: String,
    pub webhook_config: String,
    pub service: String,
    pub lease: String,
    pub identity: String,
    pub cert_validity: Duration,
    pub cert_renew_after: Duration,
    pub ca_validity: Duration,
    pub lease_duration: Duration,
    pub reconcile_interval: Duration,
}

impl Settings {
    pub fn policy(&self) -> Policy {
        Policy {
            dns_names: Policy::dns_names(&self.service, &self.namespace),
            cert_validity: self.cert_validity,
            cert_renew_after: self.cert_renew_after,
            ca_validity: self.ca_validity,
        }
    }
}

fn kube_err(what: String) -> impl FnOnce(kube::Error) -> Error {
    move |e| Error::Kube {
        what,
        message: e.to_string(),
    }
}

fn api_code(e: &kube::Error) -> Option<u16> {
    match e {
        kube::Error::Api(s) => Some(s.code),
        _ => None,
    }
}

/// The four PEM entries of the Secret, when all are there.
pub fn material_of(secret: &Secret) -> Option<Material> {
    let data = secret.data.as_ref()?;
    let get = |k: &str| {
        data.get(k)
            .and_then(|b| String::from_utf8(b.0.clone()).ok())
    };
    Some(Material {
        ca_crt: get(CA_CRT)?,
        ca_key: get(CA_KEY)?,
        tls_crt: get(TLS_CRT)?,
        tls_key: get(TLS_KEY)?,
    })
}

/// Start the Secret watch (every replica) and the leader loop.
pub fn spawn(client: Client, settings: Settings, certs: Arc<CertStore>) -> Vec<JoinHandle<()>> {
    let wake = Arc::new(Notify::new());
    let leading = Arc::new(AtomicBool::new(false));
    vec![
        tokio::spawn(watch_secret(
            client.clone(),
            settings.clone(),
            certs,
            wake.clone(),
        )),
        tokio::spawn(watch_webhook_config(
            client.clone(),
            settings.clone(),
            wake.clone(),
        )),
        tokio::spawn(lead(client, settings, wake, leading)),
    ]
}

/// Serve whatever serving certificate the Secret holds, from the first list on.
async fn watch_secret(client: Client, s: Settings, certs: Arc<CertStore>, wake: Arc<Notify>) {
    let api: Api<Secret> = Api::namespaced(client, &s.namespace);
    let cfg = watcher::Config::default().fields(&format!("metadata.name={}", s.secret));
    let mut stream = watcher::watcher(api, cfg).default_backoff().boxed();
    while let Some(ev) = stream.next().await {
        match ev {
            Ok(Event::Apply(secret) | Event::InitApply(secret)) => {
                if let Some(m) = material_of(&secret) {
                    match parse_serving_cert(
                        m.tls_crt.as_bytes(),
                        m.tls_key.as_bytes(),
                        &format!("Secret {}/{}", s.namespace, s.secret),
                    ) {
                        Ok(c) => {
                            certs.install(c);
                        }
                        Err(e) => tracing::warn!("{e}; still serving the previous certificate"),
                    }
                }
                wake.notify_one();
            }
            Ok(Event::Delete(_)) => {
                tracing::warn!(
                    "Secret {}/{} was deleted; still serving the loaded certificate until the leader recreates it",
                    s.namespace,
                    s.secret
                );
                wake.notify_one();
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(
                "watching Secret {}/{} failed (retrying): {e}",
                s.namespace,
                s.secret
            ),
        }
    }
}

/// Any change to the webhook configuration (a caBundle reset by `kubectl apply`): reconcile.
async fn watch_webhook_config(client: Client, s: Settings, wake: Arc<Notify>) {
    let api: Api<MutatingWebhookConfiguration> = Api::all(client);
    let cfg = watcher::Config::default().fields(&format!("metadata.name={}", s.webhook_config));
    let mut stream = watcher::watcher(api, cfg).default_backoff().boxed();
    while let Some(ev) = stream.next().await {
        match ev {
            Ok(Event::Apply(_) | Event::InitApply(_) | Event::Delete(_)) => wake.notify_one(),
            Ok(_) => {}
            Err(e) => tracing::warn!(
                "watching MutatingWebhookConfiguration {} failed (retrying): {e}",
                s.webhook_config
            ),
        }
    }
}

async fn lead(client: Client, s: Settings, wake: Arc<Notify>, leading: Arc<AtomicBool>) {
    let leases: Api<Lease> = Api::namespaced(client.clone(), &s.namespace);
    let renew_every = (s.lease_duration / 3).max(Duration::from_millis(200));
    let mut next_reconcile = tokio::time::Instant::now();
    let mut renewed_at: Option<tokio::time::Instant> = None;
    loop {
        // Renew at its pace, not on every wake-up.
        let now_leading = if renewed_at.is_some_and(|t| t.elapsed() < renew_every) {
            true
        } else {
            let held = match acquire(&leases, &s).await {
                Ok(l) => l,
                Err(e) => {
                    tracing::warn!("{e}");
                    false
                }
            };
            renewed_at = held.then(tokio::time::Instant::now);
            held
        };
        if now_leading != leading.swap(now_leading, Ordering::SeqCst) {
            tracing::info!(
                identity = s.identity,
                "{} the certificate leader (Lease {}/{})",
                if now_leading {
                    "became"
                } else {
                    "is no longer"
                },
                s.namespace,
                s.lease
            );
        }
        let mut woken = false;
        if now_leading && tokio::time::Instant::now() >= next_reconcile {
            let wait = match reconcile(&client, &s).await {
                Ok(due) => {
                    // At least a second: due times are in whole seconds.
                    let until_due = u64::try_from(due.saturating_sub(now_unix())).unwrap_or(0);
                    s.reconcile_interval
                        .min(Duration::from_secs(until_due.max(1)))
                }
                Err(e) => {
                    tracing::warn!("{e}");
                    Duration::from_secs(2).min(s.reconcile_interval)
                }
            };
            next_reconcile = tokio::time::Instant::now() + wait;
        }
        let sleep =
            renew_every.min(next_reconcile.saturating_duration_since(tokio::time::Instant::now()));
        tokio::select! {
            _ = tokio::time::sleep(sleep.max(Duration::from_millis(100))) => {}
            _ = wake.notified() => woken = true,
        }
        if woken {
            next_reconcile = tokio::time::Instant::now();
        }
    }
}

/// Hold the Lease: create it, renew it, or take it over once expired. True while held.
pub async fn acquire(api: &Api<Lease>, s: &Settings) -> Result<bool, Error> {
    let now = Timestamp::now();
    let dur = i32::try_from(s.lease_duration.as_secs().max(1)).unwrap_or(15);
    let what = || {
        format!(
            "holding Lease {}/{} as {}",
            s.namespace, s.lease, s.identity
        )
    };
    let existing = api.get_opt(&s.lease).await.map_err(kube_err(what()))?;
    let Some(lease) = existing else {
        let lease: Lease = serde_json::from_value(json!({
            "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
            "metadata": {"name": s.lease, "namespace": s.namespace},
            "spec": {"holderIdentity": s.identity, "leaseDurationSeconds": dur,
                     "acquireTime": MicroTime(now), "renewTime": MicroTime(now),
                     "leaseTransitions": 0}
        }))
        .map_err(|e| Error::Kube {
            what: what(),
            message: e.to_string(),
        })?;
        return match api.create(&PostParams::default(), &lease).await {
            Ok(_) => Ok(true),
            Err(e) if api_code(&e) == Some(409) => Ok(false),
            Err(e) => Err(kube_err(what())(e)),
        };
    };
    let spec = lease.spec.unwrap_or_default();
    let holder = spec.holder_identity.unwrap_or_default();
    let held_for = i64::from(spec.lease_duration_seconds.unwrap_or(dur));
    let renewed = spec.renew_time.map(|t| t.0.as_second()).unwrap_or(0);
    let mine = holder == s.identity;
    if !mine && !holder.is_empty() && renewed + held_for > now.as_second() {
        return Ok(false);
    }
    let mut patch = json!({
        "metadata": {"resourceVersion": lease.metadata.resource_version},
        "spec": {"holderIdentity": s.identity, "renewTime": MicroTime(now),
                 "leaseDurationSeconds": dur}
    });
    if !mine {
        patch["spec"]["acquireTime"] = json!(MicroTime(now));
        patch["spec"]["leaseTransitions"] = json!(spec.lease_transitions.unwrap_or(0) + 1);
    }
    match api
        .patch(&s.lease, &PatchParams::default(), &Patch::Merge(&patch))
        .await
    {
        Ok(_) => Ok(true),
        // Someone else renewed or took it between our read and write.
        Err(e) if api_code(&e) == Some(409) => Ok(false),
        Err(e) => Err(kube_err(what())(e)),
    }
}

/// On shutdown: give the Lease up if held, so another replica takes over at once instead of
/// after the lease duration.
pub async fn release(client: &Client, s: &Settings) -> Result<(), Error> {
    let api: Api<Lease> = Api::namespaced(client.clone(), &s.namespace);
    let what = || format!("releasing Lease {}/{}", s.namespace, s.lease);
    let Some(lease) = api.get_opt(&s.lease).await.map_err(kube_err(what()))? else {
        return Ok(());
    };
    if lease.spec.and_then(|sp| sp.holder_identity).as_deref() != Some(s.identity.as_str()) {
        return Ok(());
    }
    let patch = json!({
        "metadata": {"resourceVersion": lease.metadata.resource_version},
        "spec": {"holderIdentity": null, "leaseDurationSeconds": 1,
                 "renewTime": MicroTime(Timestamp::now())}
    });
    match api
        .patch(&s.lease, &PatchParams::default(), &Patch::Merge(&patch))
        .await
    {
        Ok(_) => Ok(()),
        Err(e) if api_code(&e) == Some(409) => Ok(()),
        Err(e) => Err(kube_err(what())(e)),
    }
}

/// Make the Secret valid and the caBundle match it. Returns when the next rotation is due.
pub async fn reconcile(client: &Client, s: &Settings) -> Result<i64, Error> {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &s.namespace);
    let hooks: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
    let policy = s.policy();
    let secret_name = format!("Secret {}/{}", s.namespace, s.secret);
    let mwc = hooks
        .get_opt(&s.webhook_config)
        .await
        .map_err(kube_err(format!(
            "reading MutatingWebhookConfiguration {}",
            s.webhook_config
        )))?;
    let published: String = mwc
        .as_ref()
        .and_then(|m| m.webhooks.as_ref())
        .map(|ws| {
            ws.iter()
                .filter_map(|w| w.client_config.ca_bundle.as_ref())
                .map(|b| String::from_utf8_lossy(&b.0).into_owned())
                .collect::<Vec<_>>()
                .join("")
        })
        .unwrap_or_default();
    let existing = secrets
        .get_opt(&s.secret)
        .await
        .map_err(kube_err(format!("reading {secret_name}")))?;
    let stored = existing.as_ref().and_then(material_of);
    let material = match (
        certs::plan(stored.as_ref(), &policy, &published, now_unix())?,
        stored,
    ) {
        (Action::Keep, Some(m)) => m,
        (Action::Keep, None) => {
            return Err(Error::Tls {
                what: format!("checking {secret_name}"),
                reason: "nothing stored and nothing planned".into(),
            })
        }
        (Action::Write(m, why), _) => {
            write_secret(&secrets, s, existing.as_ref(), &m).await?;
            tracing::info!("{secret_name} updated: {why}");
            m
        }
    };
    patch_ca_bundle(&hooks, s, mwc.as_ref(), &material).await?;
    certs::next_due(&material, &policy).ok_or_else(|| Error::Tls {
        what: format!("reading back {secret_name}"),
        reason: "the stored serving certificate does not parse".into(),
    })
}

async fn write_secret(
    api: &Api<Secret>,
    s: &Settings,
    existing: Option<&Secret>,
    m: &Material,
) -> Result<(), Error> {
    use base64::Engine as _;
    let b64 = |t: &str| base64::engine::general_purpose::STANDARD.encode(t);
    let data = json!({CA_CRT: b64(&m.ca_crt), CA_KEY: b64(&m.ca_key),
                      TLS_CRT: b64(&m.tls_crt), TLS_KEY: b64(&m.tls_key)});
    let what = format!("writing Secret {}/{}", s.namespace, s.secret);
    match existing {
        None => {
            let secret: Secret = serde_json::from_value(json!({
                "apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/tls",
                "metadata": {"name": s.secret, "namespace": s.namespace,
                             "labels": {"app.kubernetes.io/managed-by": "podwire-injector"}},
                "data": data,
            }))
            .map_err(|e| Error::Kube {
                what: what.clone(),
                message: e.to_string(),
            })?;
            api.create(&PostParams::default(), &secret)
                .await
                .map_err(kube_err(what))?;
        }
        Some(old) => {
            // resourceVersion: a concurrent writer (a former leader) makes this fail, not race.
            let patch = json!({"metadata": {"resourceVersion": old.metadata.resource_version},
                               "data": data});
            api.patch(&s.secret, &PatchParams::default(), &Patch::Merge(&patch))
                .await
                .map_err(kube_err(what))?;
        }
    }
    Ok(())
}

async fn patch_ca_bundle(
    api: &Api<MutatingWebhookConfiguration>,
    s: &Settings,
    mwc: Option<&MutatingWebhookConfiguration>,
    m: &Material,
) -> Result<(), Error> {
    let Some(mwc) = mwc else {
        tracing::warn!(
            "MutatingWebhookConfiguration {} not found: the API server does not call the injector \
             until it is installed (its caBundle is filled in once it exists)",
            s.webhook_config
        );
        return Ok(());
    };
    let webhooks = mwc.webhooks.as_deref().unwrap_or_default();
    let stale: Vec<&str> = webhooks
        .iter()
        .filter(|w| {
            w.client_config.ca_bundle.as_ref().map(|b| b.0.as_slice()) != Some(m.ca_crt.as_bytes())
        })
        .map(|w| w.name.as_str())
        .collect();
    if stale.is_empty() {
        return Ok(());
    }
    tracing::warn!(
        "caBundle of MutatingWebhookConfiguration {} does not match the CA that signed the served \
         certificate (webhooks {}): patching it",
        s.webhook_config,
        stale.join(", ")
    );
    use base64::Engine as _;
    let bundle = base64::engine::general_purpose::STANDARD.encode(&m.ca_crt);
    // Strategic merge: `webhooks` merge by name, so only caBundle changes.
    let patch = json!({"webhooks": stale.iter()
        .map(|n| json!({"name": n, "clientConfig": {"caBundle": bundle}}))
        .collect::<Vec<_>>()});
    api.patch(
        &s.webhook_config,
        &PatchParams::default(),
        &Patch::Strategic(&patch),
    )
    .await
    .map_err(kube_err(format!(
        "patching the caBundle of MutatingWebhookConfiguration {} (the injector needs RBAC \
         patch on mutatingwebhookconfigurations)",
        s.webhook_config
    )))?;
    Ok(())
}
