//! Self-managed TLS against an in-process server speaking the Kubernetes API's HTTP/JSON,
//! through the real `kube` client: the Lease, the Secret, the caBundle patch; then the real
//! binary, two replicas, certificate rotation under load.

mod common;

use common::*;
use podwire_injector::selfmanaged::{acquire, material_of, reconcile, release, Settings};
use podwire_lab::apiserver::ApiServer;
use serde_json::json;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

fn settings(identity: &str) -> Settings {
    Settings {
        namespace: "podwire-system".into(),
        secret: "podwire-injector-tls".into(),
        webhook_config: "podwire-sidecar-injector".into(),
        service: "podwire-injector".into(),
        lease: "podwire-injector-leader".into(),
        identity: identity.into(),
        cert_validity: Duration::from_secs(3600),
        cert_renew_after: Duration::from_secs(2400),
        ca_validity: Duration::from_secs(36000),
        lease_duration: Duration::from_secs(2),
        reconcile_interval: Duration::from_secs(1),
    }
}

async fn kube_client(api: &ApiServer, dir: &std::path::Path) -> kube::Client {
    let path = dir.join("kubeconfig");
    api.write_kubeconfig(&path, &api.token).expect("kubeconfig");
    let kc = kube::config::Kubeconfig::read_from(&path).expect("read kubeconfig");
    let cfg = kube::Config::from_custom_kubeconfig(kc, &Default::default())
        .await
        .expect("config");
    kube::Client::try_from(cfg).expect("client")
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

#[test]
fn the_lease_has_one_holder_and_is_taken_over_once_expired() {
    let api = ApiServer::start().expect("api");
    let dir = tempfile::tempdir().expect("tmp");
    runtime().block_on(async {
        let client = kube_client(&api, dir.path()).await;
        let leases: kube::Api<k8s_openapi::api::coordination::v1::Lease> =
            kube::Api::namespaced(client.clone(), "podwire-system");
        let (a, b) = (settings("replica-a"), settings("replica-b"));
        assert!(acquire(&leases, &a).await.expect("a creates"));
        assert!(!acquire(&leases, &b).await.expect("b waits"));
        assert!(acquire(&leases, &a).await.expect("a renews"));
        let lease = api.get(LEASE_PATH).expect("lease");
        assert_eq!(lease["spec"]["holderIdentity"], json!("replica-a"));
        assert_eq!(lease["spec"]["leaseDurationSeconds"], json!(2));
        assert_eq!(lease["spec"]["leaseTransitions"], json!(0));
        // a stops renewing: after the lease duration b takes over, and a then knows it lost.
        tokio::time::sleep(Duration::from_millis(2100)).await;
        assert!(acquire(&leases, &b).await.expect("b takes over"));
        assert!(!acquire(&leases, &a).await.expect("a lost"));
        let lease = api.get(LEASE_PATH).expect("lease");
        assert_eq!(lease["spec"]["holderIdentity"], json!("replica-b"));
        assert_eq!(lease["spec"]["leaseTransitions"], json!(1));
        // b shuts down and gives the Lease up: a takes it at once, not a lease duration later.
        release(&client, &a).await.expect("a holds nothing: no-op");
        assert_eq!(
            api.get(LEASE_PATH).expect("lease")["spec"]["holderIdentity"],
            json!("replica-b")
        );
        release(&client, &b).await.expect("b releases");
        assert!(api.get(LEASE_PATH).expect("lease")["spec"]["holderIdentity"].is_null());
        assert!(acquire(&leases, &a)
            .await
            .expect("a takes the released lease"));
        // A write based on a stale read conflicts (resourceVersion in every patch).
        let mut stale = api.get(LEASE_PATH).expect("lease");
        let rv = stale["metadata"]["resourceVersion"].clone();
        stale["spec"]["holderIdentity"] = json!("replica-b");
        api.put(LEASE_PATH, stale);
        let patched = leases
            .patch(
                "podwire-injector-leader",
                &kube::api::PatchParams::default(),
                &kube::api::Patch::Merge(json!({"metadata": {"resourceVersion": rv},
                                                "spec": {"holderIdentity": "replica-c"}})),
            )
            .await;
        assert!(
            matches!(&patched, Err(kube::Error::Api(s)) if s.code == 409),
            "{patched:?}"
        );
    });
}

#[test]
fn reconcile_creates_the_secret_and_keeps_every_ca_bundle_patched() {
    let api = ApiServer::start().expect("api");
    let dir = tempfile::tempdir().expect("tmp");
    runtime().block_on(async {
        let client = kube_client(&api, dir.path()).await;
        let s = settings("replica-a");
        // No webhook configuration yet: the Secret is made, the caBundle waits.
        reconcile(&client, &s).await.expect("reconcile without MWC");
        let secret = api.get(SECRET_PATH).expect("secret created");
        assert_eq!(secret["type"], json!("kubernetes.io/tls"));
        for k in ["tls.crt", "tls.key", "ca.crt", "ca.key"] {
            assert!(secret["data"][k].is_string(), "{k} in {secret}");
        }
        api.put(MWC_PATH, webhook_config());
        let due = reconcile(&client, &s).await.expect("reconcile");
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        assert!((now + 2300..=now + 2400).contains(&due), "{due} vs {now}");
        let typed: k8s_openapi::api::core::v1::Secret =
            serde_json::from_value(api.get(SECRET_PATH).expect("secret")).expect("Secret");
        let m = material_of(&typed).expect("material");
        let mwc = api.get(MWC_PATH).expect("mwc");
        assert_eq!(ca_bundles(&mwc), vec![m.ca_crt.clone(), m.ca_crt.clone()]);
        // The strategic merge touched only the caBundle.
        assert_eq!(
            mwc["webhooks"][1]["clientConfig"]["service"]["path"],
            json!("/inject")
        );
        assert_eq!(mwc["webhooks"][0]["failurePolicy"], json!("Fail"));
        // The served certificate chains to the bundle for the Service's names.
        let leaf = rustls_pemfile::certs(&mut m.tls_crt.as_bytes())
            .next()
            .expect("leaf")
            .expect("PEM");
        for name in [SVC, "podwire-injector.podwire-system.svc.cluster.local"] {
            podwire_injector::certs::verify(&m.ca_crt, &leaf, name, now).expect(name);
        }
        // Nothing to do: no writes.
        let writes = |api: &ApiServer| {
            api.count("PATCH", "/api/v1/namespaces/podwire-system/secrets")
                + api.count("POST", "/api/v1/namespaces/podwire-system/secrets")
                + api.count("PATCH", "/apis/admissionregistration.k8s.io")
        };
        let before = writes(&api);
        reconcile(&client, &s).await.expect("reconcile");
        assert_eq!(writes(&api), before);
        // `kubectl apply` of the install manifest resets one caBundle: repaired.
        let mut reset = api.get(MWC_PATH).expect("mwc");
        reset["webhooks"][1]["clientConfig"]["caBundle"] = json!("Cg==");
        api.put(MWC_PATH, reset);
        reconcile(&client, &s).await.expect("reconcile");
        assert_eq!(
            ca_bundles(&api.get(MWC_PATH).expect("mwc")),
            vec![m.ca_crt.clone(), m.ca_crt.clone()]
        );
        // A Secret someone emptied is rebuilt.
        let mut broken = api.get(SECRET_PATH).expect("secret");
        broken["data"]["tls.key"] = json!("");
        api.put(SECRET_PATH, broken);
        reconcile(&client, &s).await.expect("reconcile");
        let typed: k8s_openapi::api::core::v1::Secret =
            serde_json::from_value(api.get(SECRET_PATH).expect("secret")).expect("Secret");
        let fixed = material_of(&typed).expect("material");
        assert_eq!(fixed.ca_crt, m.ca_crt, "the CA is kept");
        assert_ne!(fixed.tls_crt, m.tls_crt);
    });
}

/// Two replicas in self-managed mode with `extra` flags; both ready.
fn replicas(api: &ApiServer, dir: &std::path::Path, extra: &[&str]) -> Vec<Injector> {
    api.put(
        "/api/v1/namespaces/podwire-system",
        json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "podwire-system"}}),
    );
    api.put(MWC_PATH, webhook_config());
    api.write_kubeconfig(&dir.join("kubeconfig"), &api.token)
        .expect("kubeconfig");
    let kubeconfig = dir.join("kubeconfig").display().to_string();
    let out: Vec<Injector> = ["replica-a", "replica-b"]
        .iter()
        .map(|id| {
            let mut args = vec![
                "--identity",
                id,
                "--lease-duration",
                "3s",
                "--reconcile-interval",
                "1s",
            ];
            args.extend_from_slice(extra);
            start(
                &args,
                &[
                    ("KUBECONFIG", kubeconfig.as_str()),
                    ("POD_NAMESPACE", "podwire-system"),
                ],
            )
        })
        .collect();
    eventually("the caBundle is patched", Duration::from_secs(20), || {
        api.get(MWC_PATH)
            .map(|m| {
                ca_bundles(&m)
                    .iter()
                    .all(|b| b.contains("BEGIN CERTIFICATE"))
            })
            .unwrap_or(false)
    });
    let ca = ca_bundles(&api.get(MWC_PATH).expect("mwc")).remove(0);
    for r in &out {
        let c = svc_client(&ca);
        eventually("replica ready", Duration::from_secs(20), || {
            get(&c, &svc_url(r.addr, "/readyz")).is_ok_and(|(c, _)| c == 200)
        });
    }
    out
}

#[test]
fn replicas_serve_the_secret_certificate_and_the_ca_bundle_is_repaired() {
    let api = ApiServer::start().expect("api");
    let dir = tempfile::tempdir().expect("tmp");
    let rs = replicas(&api, dir.path(), &[]);
    // One Secret, created once, by the one leader.
    assert_eq!(
        api.count("POST", "/api/v1/namespaces/podwire-system/secrets"),
        1
    );
    let holder = api.get(LEASE_PATH).expect("lease")["spec"]["holderIdentity"].clone();
    assert!(
        holder == json!("replica-a") || holder == json!("replica-b"),
        "{holder}"
    );
    // Both replicas answer a client that trusts only the caBundle, as the API server does.
    let ca = ca_bundles(&api.get(MWC_PATH).expect("mwc")).remove(0);
    let c = svc_client(&ca);
    for r in &rs {
        let (code, body) = post(
            &c,
            &svc_url(r.addr, "/inject"),
            &fixture_bytes("controller-pod.json"),
        )
        .expect("inject");
        assert_eq!(code, 200, "{body}");
        assert!(body.contains("\"patchType\":\"JSONPatch\""), "{body}");
    }
    // An external reset of the caBundle is repaired (the leader watches the configuration).
    let mut reset = api.get(MWC_PATH).expect("mwc");
    reset["webhooks"][0]["clientConfig"]["caBundle"] = json!("Cg==");
    api.put(MWC_PATH, reset);
    eventually("the caBundle is repaired", Duration::from_secs(10), || {
        api.get(MWC_PATH)
            .is_some_and(|m| ca_bundles(&m) == vec![ca.clone(), ca.clone()])
    });
    // The leader goes away: the other replica takes the Lease and keeps things patched.
    let (leader, other): (Vec<Injector>, Vec<Injector>) = rs
        .into_iter()
        .partition(|r| r.log().contains("became the certificate leader"));
    assert_eq!((leader.len(), other.len()), (1, 1));
    // SIGTERM: it finishes its requests and gives the Lease up on the way out.
    let took = Instant::now();
    for l in leader {
        assert!(l.terminate().success());
    }
    let other_id = if holder == json!("replica-a") {
        "replica-b"
    } else {
        "replica-a"
    };
    eventually("the other replica leads", Duration::from_secs(15), || {
        api.get(LEASE_PATH)
            .is_some_and(|l| l["spec"]["holderIdentity"] == json!(other_id))
    });
    // Released, so well within the 3s lease duration (the other renews every second).
    assert!(
        took.elapsed() < Duration::from_secs(3),
        "{:?}",
        took.elapsed()
    );
    let mut reset = api.get(MWC_PATH).expect("mwc");
    reset["webhooks"][1]["clientConfig"]["caBundle"] = json!("Cg==");
    api.put(MWC_PATH, reset);
    eventually(
        "the new leader repairs the caBundle",
        Duration::from_secs(10),
        || {
            api.get(MWC_PATH)
                .is_some_and(|m| ca_bundles(&m) == vec![ca.clone(), ca.clone()])
        },
    );
    let (code, _) = post(
        &c,
        &svc_url(other[0].addr, "/inject"),
        &fixture_bytes("kube-system.json"),
    )
    .expect("inject");
    assert_eq!(code, 200);
}

#[test]
fn certificate_rotation_under_load_fails_no_request() {
    let api = Arc::new(ApiServer::start().expect("api"));
    let dir = tempfile::tempdir().expect("tmp");
    // Serving certificates live 6s (renewed after 4s); the CA 15s (renewed after 10s).
    let rs = replicas(
        &api,
        dir.path(),
        &[
            "--cert-validity",
            "6s",
            "--ca-validity",
            "15s",
            "--no-namespace-watch",
        ],
    );
    let addrs: Vec<_> = rs.iter().map(|r| r.addr).collect();
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, max_cas) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let failures = Arc::new(Mutex::new(Vec::<String>::new()));
    let body = fixture_bytes("controller-pod.json");
    let threads: Vec<_> = (0..4)
        .map(|i| {
            let (api, stop, ok, max_cas, failures, body) = (
                api.clone(),
                stop.clone(),
                ok.clone(),
                max_cas.clone(),
                failures.clone(),
                body.clone(),
            );
            let url = svc_url(addrs[i % 2], "/inject");
            std::thread::spawn(move || {
                // Like the API server: trust exactly the configuration's caBundle, re-read
                // when it changes; half the clients keep connections alive, half reconnect.
                let (mut bundle, mut agent) = (String::new(), None);
                while !stop.load(Ordering::SeqCst) {
                    let now = ca_bundles(&api.get(MWC_PATH).expect("mwc")).remove(0);
                    if now != bundle || agent.is_none() {
                        max_cas.fetch_max(
                            now.matches("BEGIN CERTIFICATE").count() as u64,
                            Ordering::SeqCst,
                        );
                        agent = Some(svc_client(&now));
                        bundle = now;
                    }
                    let Some(a) = agent.as_ref() else { continue };
                    let mut req = a.post(&url);
                    if i % 2 == 1 {
                        req = req.set("Connection", "close");
                    }
                    match call(req, Some(&body)) {
                        Ok((200, b)) if b.contains("\"allowed\":true") => {
                            ok.fetch_add(1, Ordering::SeqCst);
                        }
                        other => failures
                            .lock()
                            .expect("lock")
                            .push(format!("{url}: {other:?}")),
                    }
                }
            })
        })
        .collect();
    // At least two serving rotations and one CA rotation.
    let start = Instant::now();
    std::thread::sleep(Duration::from_secs(17));
    stop.store(true, Ordering::SeqCst);
    for t in threads {
        t.join().expect("client thread");
    }
    let failures = failures.lock().expect("lock").clone();
    let ok = ok.load(Ordering::SeqCst);
    assert!(
        failures.is_empty(),
        "{} failed of {}: {:?}",
        failures.len(),
        ok,
        &failures[..failures.len().min(5)]
    );
    assert!(ok > 100, "only {ok} requests in {:?}", start.elapsed());
    assert!(
        max_cas.load(Ordering::SeqCst) >= 2,
        "the CA was not rotated"
    );
    let ca = ca_bundles(&api.get(MWC_PATH).expect("mwc")).remove(0);
    for r in &rs {
        let (_, m) = get(&svc_client(&ca), &svc_url(r.addr, "/metrics")).expect("metrics");
        let reloads = metric(&m, "podwire_injector_cert_reloads_total");
        assert!(reloads >= 3.0, "{} reloads: {}", reloads, r.log());
    }
    let logs: String = rs.iter().map(Injector::log).collect();
    let renewals = logs.matches("serving certificate renewed").count();
    assert!(renewals >= 2, "{renewals} serving renewals:\n{logs}");
    assert!(logs.contains("CA renewed"), "{logs}");
    eprintln!(
        "{ok} requests, 0 failed, during {renewals} serving certificate renewals and a CA renewal"
    );
}
