//! `cargo bench -p podwire-injector --bench stages`: where one review's time goes, in process
//! (no TLS, no HTTP), on the throughput bench's pod and config. Each stage is timed alone over
//! the same input; "parse" is the bare server's whole work, so every other line reads as
//! what the injector adds on top of it. Knob (env): BENCH_ITERATIONS (default 20000).

use podwire_core::inject::patch::render_pod;
use podwire_core::inject::{decide, plan, read_pod, Workload};
use podwire_core::MeshProfile;
use serde_json::Value;
use std::path::Path;
use std::time::Instant;

// The injector's allocator, as in the release binary.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let n: u32 = std::env::var("BENCH_ITERATIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000);
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let body = std::fs::read(dir.join("tests/fixtures/controller-pod.json")).expect("fixture");
    let profile = MeshProfile::istio();
    let cfg = podwire_injector::load_config(&dir.join("tests/fixtures/config.yaml"), &profile)
        .expect("config")
        .config;
    let review: Value = serde_json::from_slice(&body).expect("fixture JSON");
    let pod = review
        .pointer("/request/object")
        .expect("request.object")
        .clone();
    let info = read_pod(&pod).expect("pod");
    let workload = Workload::from_pod(&pod);
    let ops = plan(&pod, Some("shop"), None, &cfg, &profile)
        .expect("plan")
        .patch
        .expect("patch");
    let patch = serde_json::to_vec(&ops).expect("patch JSON");
    let answer = podwire_injector::review_resolving(&body, &cfg, &|_| None, &profile);

    let time = |name: &str, f: &mut dyn FnMut()| {
        let t = Instant::now();
        for _ in 0..n {
            f();
        }
        let us = t.elapsed().as_secs_f64() * 1e6 / f64::from(n);
        println!("{name:34} {us:7.2} us");
        us
    };
    println!(
        "one review of controller-pod.json ({} bytes), {n} iterations per stage",
        body.len()
    );
    let parse = time("parse (the bare server's work)", &mut || {
        std::hint::black_box(serde_json::from_slice::<Value>(&body).expect("parse"));
    });
    time("read_pod", &mut || {
        std::hint::black_box(read_pod(&pod).expect("pod"));
    });
    time("decide", &mut || {
        std::hint::black_box(decide(&info, None, &cfg, &profile));
    });
    time("render (Istio's sidecar)", &mut || {
        std::hint::black_box(render_pod(&pod, &workload, &cfg, &profile).expect("render"));
    });
    time("plan (decide + render + diff)", &mut || {
        std::hint::black_box(plan(&pod, Some("shop"), None, &cfg, &profile).expect("plan"));
    });
    time("patch to JSON", &mut || {
        std::hint::black_box(serde_json::to_vec(&ops).expect("JSON"));
    });
    time("patch to base64", &mut || {
        std::hint::black_box(base64_simd::STANDARD.encode_to_string(&patch));
    });
    time("answer to JSON", &mut || {
        std::hint::black_box(answer.review.to_json().expect("JSON"));
    });
    let whole = time("whole review + answer to JSON", &mut || {
        let r = podwire_injector::review_resolving(&body, &cfg, &|_| None, &profile);
        std::hint::black_box(r.review.to_json().expect("JSON"));
    });
    println!(
        "the injector's in-process work is {:.1}x the bare server's parse ({} bytes of patch)",
        whole / parse,
        patch.len()
    );
}
