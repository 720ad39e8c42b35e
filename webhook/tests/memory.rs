//! Memory under hostile input: whatever arrives, the injector's peak resident memory stays
//! under the limit of the shipped manifest (128Mi), answering every request with an
//! AdmissionReview (admitted, or shed with a status code), never dying of OOM.

mod common;

use common::*;
use podwire_injector::serve::{parse_cost, Limits};
use serde_json::{json, Value};
use std::time::Duration;

/// The manifest's memory limit for the injector (install/base/injector.yaml).
const MANIFEST_LIMIT: u64 = 128 << 20;

/// A controller-created pod with `extra` as an unknown spec field (the API server passes
/// unknown fields of an admitted object through to webhooks as they were sent).
fn review_with(extra: Value) -> Vec<u8> {
    let mut review: Value =
        serde_json::from_slice(&fixture_bytes("controller-pod.json")).expect("fixture");
    review["request"]["object"]["spec"]["x-hostile"] = extra;
    serde_json::to_vec(&review).expect("json")
}

/// Close to `bytes` of the cheapest-to-send, most expensive-to-parse JSON: empty arrays, or
/// one-member objects.
fn hostile(bytes: usize, objects: bool) -> Vec<u8> {
    let unit = if objects { "{\"a\":0}," } else { "[]," };
    let n = bytes / unit.len();
    let mut body = review_with(json!("PLACEHOLDER"));
    let text = String::from_utf8(body.clone()).expect("utf8");
    let items = unit.repeat(n);
    let array = format!("[{}]", items.trim_end_matches(','));
    body = text.replace("\"PLACEHOLDER\"", &array).into_bytes();
    body
}

/// The largest `unit`-array body whose [`parse_cost`] stays under `cost`: admitted, and as
/// dear to parse as the budget allows.
fn priced_under(cost: usize, objects: bool) -> Vec<u8> {
    let (mut lo, mut hi) = (1usize, 4 << 20);
    while lo + 1 < hi {
        let mid = (lo + hi) / 2;
        if parse_cost(&hostile(mid, objects)) < cost {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    hostile(lo, objects)
}

/// The injector container's literal environment in the shipped manifest: the test runs the
/// binary the way the Deployment does (MIMALLOC_PURGE_DELAY among it).
fn manifest_env() -> Vec<(String, String)> {
    let path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../install/base/injector.yaml");
    let text = std::fs::read_to_string(&path).expect("install/base/injector.yaml");
    let mut env = Vec::new();
    for doc in serde_yaml_ng::Deserializer::from_str(&text) {
        let v: Value = serde::Deserialize::deserialize(doc).expect("YAML");
        if v["kind"] != json!("Deployment") {
            continue;
        }
        let memory_limit =
            &v["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["memory"];
        assert_eq!(
            memory_limit,
            &json!("128Mi"),
            "MANIFEST_LIMIT follows the manifest"
        );
        for e in v["spec"]["template"]["spec"]["containers"][0]["env"]
            .as_array()
            .into_iter()
            .flatten()
        {
            if let (Some(k), Some(val)) = (e["name"].as_str(), e["value"].as_str()) {
                env.push((k.to_string(), val.to_string()));
            }
        }
    }
    assert!(
        env.iter().any(|(k, _)| k == "MIMALLOC_PURGE_DELAY"),
        "{env:?}"
    );
    env
}

fn start_injector() -> (Injector, String) {
    let dir = tempfile::tempdir().expect("tmp");
    let ca = write_cert(dir.path(), "tls", Duration::from_secs(3600));
    let cert = dir.path().join("tls.crt").display().to_string();
    let key = dir.path().join("tls.key").display().to_string();
    let env = manifest_env();
    let inj = start(
        &[
            "--tls-cert",
            &cert,
            "--tls-key",
            &key,
            "--no-namespace-watch",
        ],
        &env.iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect::<Vec<_>>(),
    );
    // The files are read at start; the directory may go.
    drop(dir);
    (inj, ca)
}

#[test]
fn hostile_bodies_at_once_stay_under_the_manifest_limit() {
    let (inj, ca) = start_injector();
    let url = inj.url("/inject");
    let (code, _) =
        post(&client(&ca), &url, &fixture_bytes("controller-pod.json")).expect("warm-up");
    assert_eq!(code, 200);
    eprintln!("idle peak RSS {} MiB", inj.peak_rss() >> 20);
    for objects in [false, true] {
        let body = hostile((39 << 20) / 10, objects);
        assert!(
            body.len() <= 4 << 20,
            "under --max-body-bytes: {}",
            body.len()
        );
        let answers: Vec<(u16, String)> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..16)
                .map(|_| {
                    let (agent, url, body) = (client(&ca), url.clone(), &body);
                    s.spawn(move || post(&agent, &url, body).expect("an answer"))
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("client thread"))
                .collect()
        });
        for (code, text) in &answers {
            let v: Value = serde_json::from_str(text)
                .unwrap_or_else(|e| panic!("answer {code} is not JSON ({e}): {text:.300}"));
            assert_eq!(v["kind"], json!("AdmissionReview"), "{text:.300}");
            assert!([200, 413, 429].contains(code), "status {code}: {text:.300}");
        }
        let peak = inj.peak_rss();
        assert!(
            peak < MANIFEST_LIMIT,
            "peak resident memory {} MiB over the manifest's 128Mi (objects: {objects})",
            peak >> 20
        );
        eprintln!(
            "objects={objects}: peak RSS {} MiB; answers {:?}",
            peak >> 20,
            answers.iter().map(|a| a.0).collect::<Vec<_>>()
        );
    }
    // Bodies priced just under the parse budget are admitted, one parse at a time.
    let budget = Limits::default().memory.parse_bytes();
    for objects in [false, true] {
        let body = priced_under(budget * 95 / 100, objects);
        let answers: Vec<(u16, String)> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..16)
                .map(|_| {
                    let (agent, url, body) = (client(&ca), url.clone(), &body);
                    s.spawn(move || post(&agent, &url, body).expect("an answer"))
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("client thread"))
                .collect()
        });
        for (code, text) in &answers {
            assert!([200, 429].contains(code), "status {code}: {text:.300}");
            let v: Value = serde_json::from_str(text).expect("JSON answer");
            assert_eq!(v["kind"], json!("AdmissionReview"));
        }
        assert!(answers.iter().any(|(c, _)| *c == 200), "some are admitted");
        let peak = inj.peak_rss();
        eprintln!(
            "priced bodies of {} bytes, objects={objects}: peak RSS {} MiB; answers {:?}",
            body.len(),
            peak >> 20,
            answers.iter().map(|a| a.0).collect::<Vec<_>>()
        );
        assert!(
            peak < MANIFEST_LIMIT,
            "peak resident memory {} MiB over the manifest's 128Mi (priced bodies, objects: {objects})",
            peak >> 20
        );
    }
    // Still serving ordinary pods afterwards.
    let (code, text) =
        post(&client(&ca), &url, &fixture_bytes("controller-pod.json")).expect("ordinary pod");
    assert_eq!(code, 200, "{text}");
    assert!(text.contains("\"patch\""), "{text:.300}");
}
