//! `podwire-injector serve` over HTTPS with a real TLS client (ureq + rustls), on
//! AdmissionReviews shaped exactly as the API server sends them (tests/fixtures/*.json).

mod common;

use common::*;
use podwire_lab::apiserver::ApiServer;
use serde_json::{json, Value};
use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

const FIXTURES: [&str; 11] = [
    "controller-pod.json",
    "inject-true.json",
    "kube-system.json",
    "hostnetwork-inject-true.json",
    "already-injected.json",
    "malformed.json",
    "dry-run.json",
    "deployment.json",
    "update.json",
    "bad-annotation.json",
    "bad-quantity.json",
];

/// What `podwire-injector review --config tests/fixtures/config.yaml [extra]` answers.
fn offline_review(name: &str, extra: &[&str]) -> Value {
    offline_review_of(&fixture_bytes(name), extra)
}

fn offline_review_of(body: &[u8], extra: &[&str]) -> Value {
    let config = fixture("config.yaml");
    let mut child = Command::new(env!("CARGO_BIN_EXE_podwire-injector"))
        .args(["review", "--config"])
        .arg(&config)
        .args(extra)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn review");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(body)
        .expect("write");
    let out = child.wait_with_output().expect("review");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("review answer")
}

/// An injector serving certificate files written in `dir`, with `config` and `extra`
/// arguments, `env`; a client trusting its CA, and the CA.
fn serving(
    dir: &std::path::Path,
    config: &std::path::Path,
    extra: &[&str],
    env: &[(&str, &str)],
) -> (Injector, ureq::Agent, String) {
    let ca = write_cert(dir, "tls", Duration::from_secs(3600));
    let (cert, key) = (dir.join("tls.crt"), dir.join("tls.key"));
    let (cert, key) = (cert.display().to_string(), key.display().to_string());
    let mut args = vec!["--tls-cert", cert.as_str(), "--tls-key", key.as_str()];
    args.extend(extra);
    (start_with(config, &args, env), client(&ca), ca)
}

/// [`serving`] with the fixture config and no cluster (`--no-namespace-watch`), plus `extra`.
fn serving_offline(dir: &std::path::Path, extra: &[&str]) -> (Injector, ureq::Agent, String) {
    let mut args = vec!["--no-namespace-watch"];
    args.extend(extra);
    serving(dir, &fixture("config.yaml"), &args, &[])
}

/// [`serving`] with the fixture config, talking to `api` through a kubeconfig in `dir`.
fn serving_with_api(
    dir: &std::path::Path,
    api: &ApiServer,
    extra: &[&str],
) -> (Injector, ureq::Agent, String) {
    let path = dir.join("kubeconfig");
    api.write_kubeconfig(&path, &api.token).expect("kubeconfig");
    let kubeconfig = path.display().to_string();
    serving(
        dir,
        &fixture("config.yaml"),
        extra,
        &[("KUBECONFIG", &kubeconfig)],
    )
}

/// An HTTP/2 connection to the injector at `addr` (ALPN `h2`, trusting only `ca`).
async fn h2_connect<B>(
    addr: std::net::SocketAddr,
    ca: &str,
) -> (
    hyper::client::conn::http2::SendRequest<B>,
    hyper::client::conn::http2::Connection<
        hyper_util::rt::TokioIo<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>,
        B,
        hyper_util::rt::TokioExecutor,
    >,
)
where
    B: hyper::body::Body + Unpin + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let mut tls = (*tls_config(ca)).clone();
    tls.alpn_protocols = vec![b"h2".to_vec()];
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").expect("name");
    let stream = tokio_rustls::TlsConnector::from(std::sync::Arc::new(tls))
        .connect(name, tcp)
        .await
        .expect("TLS");
    assert_eq!(stream.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .expect("HTTP/2 handshake")
}

#[test]
fn https_answers_equal_the_offline_review_for_every_fixture() {
    let dir = tempfile::tempdir().expect("tmp");
    let (inj, agent, _) = serving_offline(dir.path(), &[]);
    for name in FIXTURES {
        let (code, body) = post(&agent, &inj.url("/inject"), &fixture_bytes(name)).expect(name);
        assert_eq!(code, 200, "{name}: {body}");
        let answer: Value = serde_json::from_str(&body).expect("JSON answer");
        assert_eq!(answer, offline_review(name, &[]), "{name}");
    }
    // The same pods again as replicas (same object, new uid): answered from the injector's
    // memo, still exactly what a fresh review answers.
    let hits = || {
        let (_, m) = get(&agent, &inj.url("/metrics")).expect("metrics");
        metric(&m, "podwire_injector_memo_hits_total")
    };
    let mut replayed = 0;
    // Pod objects (with the request's namespace and name) replayed already: dry-run.json's
    // is controller-pod.json's.
    let mut seen = std::collections::HashSet::new();
    for name in FIXTURES {
        let Ok(mut v) = serde_json::from_slice::<Value>(&fixture_bytes(name)) else {
            continue;
        };
        let first = seen.insert(format!(
            "{}|{}|{}",
            v["request"]["object"], v["request"]["namespace"], v["request"]["name"]
        ));
        for i in 0..3 {
            v["request"]["uid"] = json!(format!("replica-{i}-of-{name}"));
            let replica = serde_json::to_vec(&v).expect("JSON");
            let before = hits();
            let (code, body) = post(&agent, &inj.url("/inject"), &replica).expect(name);
            assert_eq!(code, 200, "{name}: {body}");
            let answer: Value = serde_json::from_str(&body).expect("JSON answer");
            assert_eq!(
                answer,
                offline_review_of(&replica, &[]),
                "{name} (replica {i})"
            );
            // The third replica of a namespaced pod CREATE that was decided is a memo hit
            // (the first is only noted, the second kept), or every replica of one kept
            // before; nothing else ever is.
            let decided = answer["response"]["status"]["code"] != json!(400);
            let kept = decided && podwire_injector::memo::Request::read(&replica).is_some();
            let hit = kept && (i == 2 || !first);
            assert_eq!(
                hits() - before,
                f64::from(u8::from(hit)),
                "{name} (replica {i})"
            );
            replayed += usize::from(hit && i == 2);
        }
    }
    assert!(replayed >= 6, "only {replayed} fixtures were replayed");
    // The cases the API server actually sends, spelled out.
    let resp = |name: &str| -> Value {
        let (_, body) = post(&agent, &inj.url("/inject"), &fixture_bytes(name)).expect(name);
        serde_json::from_str::<Value>(&body).expect("JSON")["response"].clone()
    };
    let controller = resp("controller-pod.json");
    assert_eq!(controller["allowed"], json!(true));
    assert_eq!(controller["patchType"], json!("JSONPatch"));
    assert!(resp("kube-system.json").get("patch").is_none());
    let host = resp("hostnetwork-inject-true.json");
    assert!(host.get("patch").is_none());
    assert!(
        host["warnings"][0]
            .as_str()
            .unwrap_or("")
            .contains("hostNetwork"),
        "{host}"
    );
    assert!(resp("already-injected.json").get("patch").is_none());
    let bad = resp("malformed.json");
    assert_eq!(bad["allowed"], json!(false));
    assert_eq!(bad["status"]["code"], json!(400));
}

#[test]
fn bad_requests_get_clean_answers_never_500() {
    let dir = tempfile::tempdir().expect("tmp");
    let (inj, agent, ca) = serving_offline(
        dir.path(),
        &["--max-body-bytes", "8192", "--request-timeout", "1s"],
    );
    let url = inj.url("/inject");

    // Oversized, with a Content-Length: 413 with an AdmissionReview-shaped denial.
    let mut big = fixture_bytes("controller-pod.json");
    big.resize(20_000, b' ');
    let (code, body) = post(&agent, &url, &big).expect("oversized");
    assert_eq!(code, 413, "{body}");
    let v: Value = serde_json::from_str(&body).expect("JSON");
    assert_eq!(v["kind"], json!("AdmissionReview"));
    assert_eq!(v["response"]["allowed"], json!(false));
    assert_eq!(v["response"]["status"]["code"], json!(413));
    assert!(body.contains("--max-body-bytes"), "{body}");

    // Oversized and chunked (no Content-Length): found while reading.
    let r = agent
        .post(&url)
        .set("Content-Type", "application/json")
        .send(std::io::Cursor::new(big.clone()));
    let code = match r {
        Ok(r) => r.status(),
        Err(ureq::Error::Status(c, _)) => c,
        Err(e) => panic!("chunked oversized: {e}"),
    };
    assert_eq!(code, 413);

    // Not JSON, empty, wrong kind: a denial inside a 200 (as `review`).
    for b in [
        &b"\x00\xffnot json"[..],
        b"",
        b"{\"kind\":\"Pod\"}",
        b"[1,2",
    ] {
        let (code, body) = post(&agent, &url, b).expect("garbage");
        assert_eq!(code, 200, "{body}");
        let v: Value = serde_json::from_str(&body).expect("JSON");
        assert_eq!(v["response"]["allowed"], json!(false), "{body}");
    }

    // A body that never arrives: 408 after --request-timeout, not a hung connection.
    let mut s = raw_tls(inj.addr, &ca);
    let answer = raw_exchange(
        &mut s,
        b"POST /inject HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"api",
    );
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("\"kind\":\"AdmissionReview\""), "{answer}");

    // Wrong method and path.
    assert_eq!(get(&agent, &url).expect("GET /inject").0, 405);
    assert_eq!(get(&agent, &inj.url("/nope")).expect("404").0, 404);

    // Plain HTTP and garbage on the TLS port do not hurt the server.
    for junk in [
        &b"GET /healthz HTTP/1.1\r\n\r\n"[..],
        b"\x16\x03\x01\x00\x05hello",
    ] {
        let mut tcp = std::net::TcpStream::connect(inj.addr).expect("tcp");
        let _ = tcp.write_all(junk);
    }
    let (code, _) = post(&agent, &url, &fixture_bytes("controller-pod.json")).expect("still up");
    assert_eq!(code, 200);
    let (_, m) = get(&agent, &inj.url("/metrics")).expect("metrics");
    assert!(
        metric(&m, "podwire_injector_requests_total{result=\"error\"}") >= 7.0,
        "{m}"
    );
}

#[test]
fn health_readiness_metrics_and_dry_run() {
    let dir = tempfile::tempdir().expect("tmp");
    let (inj, agent, _) = serving_offline(dir.path(), &[]);
    assert_eq!(
        get(&agent, &inj.url("/healthz")).expect("healthz"),
        (200, "ok\n".into())
    );
    assert_eq!(
        get(&agent, &inj.url("/readyz")).expect("readyz"),
        (200, "ok\n".into())
    );
    for name in [
        "controller-pod.json",
        "controller-pod.json",
        "kube-system.json",
        "dry-run.json",
        "malformed.json",
    ] {
        post(&agent, &inj.url("/inject"), &fixture_bytes(name)).expect(name);
    }
    let (code, m) = get(&agent, &inj.url("/metrics")).expect("metrics");
    assert_eq!(code, 200);
    assert_eq!(
        metric(&m, "podwire_injector_requests_total{result=\"injected\"}"),
        2.0,
        "{m}"
    );
    assert_eq!(
        metric(&m, "podwire_injector_requests_total{result=\"skipped\"}"),
        1.0
    );
    assert_eq!(
        metric(&m, "podwire_injector_requests_total{result=\"error\"}"),
        1.0
    );
    assert_eq!(
        metric(
            &m,
            "podwire_injector_decisions_total{step=\"ignored-namespace\"}"
        ),
        1.0
    );
    // A dry run is answered in full but not counted as a pod.
    assert_eq!(metric(&m, "podwire_injector_dry_run_requests_total"), 1.0);
    assert_eq!(
        metric(&m, "podwire_injector_request_duration_seconds_count"),
        5.0
    );
    assert_eq!(metric(&m, "podwire_injector_cert_reloads_total"), 1.0);
    let expiry = metric(&m, "podwire_injector_cert_expiry_timestamp_seconds");
    let now = time::OffsetDateTime::now_utc().unix_timestamp() as f64;
    assert!(expiry > now + 3000.0 && expiry < now + 3700.0, "{expiry}");
    // SIGTERM: a clean exit.
    assert!(inj.terminate().success());
}

#[test]
fn cert_files_are_reloaded_without_dropping_connections() {
    let dir = tempfile::tempdir().expect("tmp");
    let (inj, old, ca1) = serving_offline(dir.path(), &[]);
    let body = fixture_bytes("controller-pod.json");
    assert_eq!(
        post(&old, &inj.url("/inject"), &body).expect("first").0,
        200
    );

    // A broken pair (a half-written update) is refused: the old certificate stays.
    std::fs::write(
        dir.path().join("tls.key"),
        "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
    )
    .expect("write");
    eventually(
        "the broken key is reported",
        Duration::from_secs(10),
        || inj.log().contains("still serving the previous certificate"),
    );
    assert_eq!(
        get(&client(&ca1), &inj.url("/readyz")).expect("readyz").0,
        200
    );

    // cert-manager renews with a new CA: new connections get the new certificate...
    let ca2 = write_cert(dir.path(), "tls", Duration::from_secs(7200));
    let new = client(&ca2);
    eventually(
        "the new certificate is served",
        Duration::from_secs(10),
        || post(&new, &inj.url("/inject"), &body).is_ok_and(|(c, _)| c == 200),
    );
    // ...while the connection opened before keeps working (kept alive, not dropped).
    for _ in 0..5 {
        assert_eq!(
            post(&old, &inj.url("/inject"), &body)
                .expect("kept-alive")
                .0,
            200
        );
    }
    // A fresh client that only trusts the old CA is refused: the swap really happened.
    assert!(post(&client(&ca1), &inj.url("/inject"), &body).is_err());
    let (_, m) = get(&new, &inj.url("/metrics")).expect("metrics");
    assert_eq!(
        metric(&m, "podwire_injector_cert_reloads_total"),
        2.0,
        "{m}"
    );
}

#[test]
fn namespace_labels_come_from_a_watch_and_match_review() {
    let api = ApiServer::start().expect("api");
    let ns = |name: &str, labels: Value| {
        api.put(
            &format!("/api/v1/namespaces/{name}"),
            json!({"apiVersion": "v1", "kind": "Namespace",
                   "metadata": {"name": name, "labels": labels}}),
        );
    };
    ns("legacy", json!({"istio-injection": "enabled"}));
    ns("kube-system", json!({}));
    let dir = tempfile::tempdir().expect("tmp");
    let (inj, agent, _) = serving_with_api(dir.path(), &api, &["--no-node-watch"]);
    eventually(
        "ready once the namespace watch synced",
        Duration::from_secs(20),
        || get(&agent, &inj.url("/readyz")).is_ok_and(|(c, _)| c == 200),
    );
    let answer = |name: &str| -> Value {
        let (_, b) = post(&agent, &inj.url("/inject"), &fixture_bytes(name)).expect(name);
        serde_json::from_str(&b).expect("JSON")
    };
    // "legacy" selected: same as review --namespace-labels istio-injection=enabled.
    assert_eq!(
        answer("inject-true.json"),
        offline_review(
            "inject-true.json",
            &["--namespace-labels", "istio-injection=enabled"]
        )
    );
    assert!(answer("inject-true.json")["response"]
        .get("patch")
        .is_some());
    // The label goes: nothing injected, as review with the namespace's (empty) labels says.
    ns("legacy", json!({"team": "legacy"}));
    eventually("the label change is seen", Duration::from_secs(10), || {
        answer("inject-true.json")
            == offline_review("inject-true.json", &["--namespace-labels", "team=legacy"])
    });
    let resp = answer("inject-true.json")["response"].clone();
    assert!(resp.get("patch").is_none(), "{resp}");
    assert!(
        !resp["warnings"]
            .as_array()
            .map(Vec::is_empty)
            .unwrap_or(true),
        "{resp}"
    );
    // A namespace the watch does not know: decided as review with no labels.
    let mut elsewhere: Value =
        serde_json::from_slice(&fixture_bytes("inject-true.json")).expect("JSON");
    elsewhere["request"]["namespace"] = json!("elsewhere");
    let elsewhere = serde_json::to_vec(&elsewhere).expect("JSON");
    let (_, b) = post(&agent, &inj.url("/inject"), &elsewhere).expect("elsewhere");
    let got: Value = serde_json::from_str(&b).expect("JSON");
    assert_eq!(got, offline_review_of(&elsewhere, &[]));
    assert!(got["response"].get("patch").is_some(), "{got}");
    let (_, m) = get(&agent, &inj.url("/metrics")).expect("metrics");
    assert!(
        metric(&m, "podwire_injector_known_namespaces") >= 2.0,
        "{m}"
    );
    assert!(api.count("GET", "/api/v1/namespaces") >= 2, "list + watch");
}

#[test]
fn config_file_changes_apply_without_a_restart() {
    let dir = tempfile::tempdir().expect("tmp");
    // As a mounted ConfigMap: its own directory, updated by writing a new file and renaming it.
    let cfg_dir = dir.path().join("config");
    std::fs::create_dir(&cfg_dir).expect("config dir");
    let cfg = cfg_dir.join("config.yaml");
    let original = std::fs::read_to_string(fixture("config.yaml")).expect("config");
    std::fs::write(&cfg, &original).expect("config");
    let values = cfg_dir.join("values.yaml");
    let level = |l: &str| format!("global:\n  proxy:\n    logLevel: {l}\n");
    std::fs::write(&values, level("error")).expect("values");
    let write = |path: &std::path::Path, text: &str| {
        let tmp = cfg_dir.join(".new");
        std::fs::write(&tmp, text).expect("write");
        std::fs::rename(&tmp, path).expect("rename");
    };
    let replace = |text: &str| write(&cfg, text);
    let values_arg = values.display().to_string();
    let (inj, agent, _) = serving(
        dir.path(),
        &cfg,
        &["--no-namespace-watch", "--values-file", values_arg.as_str()],
        &[],
    );
    let body = fixture_bytes("controller-pod.json");
    let patch = || -> String {
        let (code, b) = post(&agent, &inj.url("/inject"), &body).expect("inject");
        assert_eq!(code, 200, "{b}");
        let v: Value = serde_json::from_str(&b).expect("JSON");
        let p = v["response"]["patch"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        use base64::Engine;
        let p = base64::engine::general_purpose::STANDARD
            .decode(p)
            .expect("base64");
        String::from_utf8(p).expect("UTF-8")
    };
    // Three times: the first sighting is only noted, the second kept, the third answered
    // from the memo, which the change must not outlive.
    for _ in 0..3 {
        assert!(patch().contains("\"podwire\""));
    }
    let (_, m) = get(&agent, &inj.url("/metrics")).expect("metrics");
    assert_eq!(metric(&m, "podwire_injector_memo_hits_total"), 1.0);
    replace(&original.replace(
        "example.com/injected-by: podwire",
        "example.com/injected-by: podwire-reloaded",
    ));
    eventually(
        "the changed config file is applied",
        Duration::from_secs(15),
        || patch().contains("podwire-reloaded"),
    );
    assert!(
        inj.log().contains("applied the config file"),
        "{}",
        inj.log()
    );
    // A broken file (not YAML for the config) is refused; the config in use stays.
    replace("policy: [unterminated\n");
    eventually(
        "the broken config file is reported",
        Duration::from_secs(15),
        || inj.log().contains("keeping the config in use"),
    );
    assert!(patch().contains("podwire-reloaded"));
    assert!(
        inj.log().contains(&cfg.display().to_string()),
        "{}",
        inj.log()
    );
    // Istio's settings given as a file reload the same way.
    assert!(patch().contains("--proxyLogLevel=error"));
    write(&values, &level("debug"));
    eventually(
        "the changed values file is applied",
        Duration::from_secs(15),
        || patch().contains("--proxyLogLevel=debug"),
    );
    assert!(patch().contains("podwire-reloaded"));
    // The broken config file, still there at that reload, was reported once, not again.
    assert_eq!(
        inj.log().matches("keeping the config in use").count(),
        1,
        "{}",
        inj.log()
    );
}

/// kube-apiserver's webhook client takes HTTP/2 when the server offers it, and sends
/// concurrent reviews as streams of one connection. curl (libcurl + nghttp2, an HTTP/2 stack
/// of its own) does the same here: every answer is what the offline review answers.
#[test]
fn http2_streams_on_one_connection_are_answered_as_over_http1() {
    let curl = which("curl");
    let dir = tempfile::tempdir().expect("tmp");
    let (inj, _, ca) = serving_offline(dir.path(), &[]);
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, &ca).expect("ca");
    // Distinct pods (each rendered), a refusal and an unreadable review.
    let mut bodies: Vec<Vec<u8>> = Vec::new();
    let pod: Value = serde_json::from_slice(&fixture_bytes("controller-pod.json")).expect("pod");
    for i in 0..10 {
        let mut v = pod.clone();
        v["request"]["uid"] = json!(format!("h2-{i}"));
        v["request"]["object"]["metadata"]["labels"]["stream"] = json!(i.to_string());
        bodies.push(serde_json::to_vec(&v).expect("JSON"));
    }
    bodies.push(fixture_bytes("bad-annotation.json"));
    bodies.push(fixture_bytes("malformed.json"));
    let mut cmd = Command::new(&curl);
    cmd.args([
        "--silent",
        "--show-error",
        "--parallel",
        "--parallel-max",
        "16",
    ]);
    for (i, body) in bodies.iter().enumerate() {
        let (req, out) = (
            dir.path().join(format!("req-{i}")),
            dir.path().join(format!("out-{i}")),
        );
        std::fs::write(&req, body).expect("body");
        if i > 0 {
            cmd.arg("--next");
        }
        cmd.args(["--http2", "--cacert"])
            .arg(&ca_file)
            .args(["-H", "Content-Type: application/json", "--data-binary"])
            .arg(format!("@{}", req.display()))
            .arg("-o")
            .arg(&out)
            .args(["-w", "%{http_version} %{response_code} %{num_connects}\\n"])
            .arg(inj.url("/inject"));
    }
    let run = cmd.output().expect("curl");
    assert!(
        run.status.success(),
        "curl: {}",
        String::from_utf8_lossy(&run.stderr)
    );
    let report = String::from_utf8_lossy(&run.stdout).to_string();
    let lines: Vec<Vec<&str>> = report.lines().map(|l| l.split(' ').collect()).collect();
    assert_eq!(lines.len(), bodies.len(), "{report}");
    assert!(
        lines.iter().all(|l| l[0] == "2" && l[1] == "200"),
        "every review over HTTP/2, answered 200:\n{report}"
    );
    let connects: u32 = lines.iter().map(|l| l[2].parse::<u32>().expect("n")).sum();
    assert_eq!(connects, 1, "all streams on one connection:\n{report}");
    for (i, body) in bodies.iter().enumerate() {
        let out = std::fs::read(dir.path().join(format!("out-{i}"))).expect("answer");
        let answer: Value = serde_json::from_slice(&out).expect("JSON answer");
        assert_eq!(answer, offline_review_of(body, &[]), "stream {i}");
    }
}

/// A program the test needs, found on PATH (scripts/setup installs it): never skipped.
fn which(program: &str) -> std::path::PathBuf {
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|d| d.join(program))
        .find(|p| p.is_file())
        .unwrap_or_else(|| panic!("{program} is not installed: run scripts/setup (as root)"))
}

/// SIGTERM while reviews are half received, one over HTTP/1.1 and one as an HTTP/2 stream (as
/// kube-apiserver sends them): no new connection is accepted, both reviews are answered in
/// full, then the idle connections are closed by the injector and it exits at once.
#[test]
fn sigterm_answers_reviews_in_flight_over_http1_and_http2() {
    use bytes::Bytes;
    use http_body_util::{BodyExt, StreamBody};
    use hyper::body::Frame;
    use std::io::Write as _;

    let dir = tempfile::tempdir().expect("tmp");
    let (inj, agent, ca) = serving_offline(dir.path(), &[]);
    let body = fixture_bytes("controller-pod.json");
    let want = offline_review_of(&body, &[]);
    let (head, tail) = body.split_at(body.len() / 2);

    // HTTP/1.1: the headers and half the body.
    let mut h1 = raw_tls(inj.addr, &ca);
    write!(
        h1,
        "POST /inject HTTP/1.1\r\nHost: injector\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n",
        body.len()
    )
    .expect("headers");
    h1.write_all(head).expect("half the body");
    h1.flush().expect("flush");

    // HTTP/2: a stream with half the body.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let (addr, url) = (inj.addr, inj.url("/inject"));
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(2);
    let (answer, closed, keep) = rt.block_on(async move {
        let (mut send, conn) = h2_connect(addr, &ca).await;
        let closed = tokio::spawn(conn);
        // Held until the end: the client never closes the connection itself.
        let keep = send.clone();
        let frames = futures::stream::unfold(rx, |mut rx| async move {
            let chunk = rx.recv().await?;
            Some((Ok::<_, std::convert::Infallible>(Frame::data(chunk)), rx))
        });
        let req = hyper::Request::post(url)
            .header("content-type", "application/json")
            .body(StreamBody::new(Box::pin(frames)))
            .expect("request");
        let answer = tokio::spawn(async move {
            let resp = send.send_request(req).await.expect("response");
            let status = resp.status().as_u16();
            let bytes = resp.into_body().collect().await.expect("body").to_bytes();
            (status, bytes)
        });
        (answer, closed, keep)
    });
    tx.blocking_send(Bytes::copy_from_slice(head))
        .expect("half the stream");

    // Both reviews are in the injector's hands.
    let in_flight = || {
        let (_, m) = get(&agent, &inj.url("/metrics")).expect("metrics");
        (
            metric(&m, "podwire_injector_requests_in_flight"),
            metric(&m, "podwire_injector_open_connections{protocol=\"h2\"}"),
        )
    };
    eventually("both reviews in flight", Duration::from_secs(10), || {
        in_flight() == (2.0, 1.0)
    });
    drop(agent);
    inj.sigterm();
    eventually("the listener closed", Duration::from_secs(10), || {
        std::net::TcpStream::connect(inj.addr).is_err()
    });

    // The rest of both bodies: full answers.
    let h1_answer = raw_exchange(&mut h1, tail);
    let (status_line, h1_body) = (
        h1_answer.lines().next().unwrap_or_default().to_string(),
        h1_answer
            .split_once("\r\n\r\n")
            .map(|(_, b)| b)
            .unwrap_or_default(),
    );
    assert_eq!(status_line, "HTTP/1.1 200 OK", "{h1_answer}");
    assert_eq!(
        serde_json::from_str::<Value>(h1_body).expect("JSON"),
        want,
        "HTTP/1.1"
    );
    tx.blocking_send(Bytes::copy_from_slice(tail))
        .expect("rest of the stream");
    drop(tx);
    let (status, h2_body) = rt.block_on(answer).expect("HTTP/2 answer");
    assert_eq!(status, 200);
    assert_eq!(
        serde_json::from_slice::<Value>(&h2_body).expect("JSON"),
        want,
        "HTTP/2"
    );
    // The injector ends the HTTP/2 connection itself (GOAWAY), and exits well before its
    // 15 s drain timeout.
    rt.block_on(async {
        tokio::time::timeout(Duration::from_secs(5), closed)
            .await
            .expect("the injector closed the HTTP/2 connection")
            .expect("connection task")
            .expect("a clean HTTP/2 close");
    });
    assert!(inj.exit_within(Duration::from_secs(5)).success());
    drop(keep);
}

/// An HTTP/2 connection with no stream for the request timeout is closed by the injector
/// (GOAWAY), as HTTP/1.1's header read timeout closes an idle one.
#[test]
fn idle_http2_connections_are_closed() {
    let dir = tempfile::tempdir().expect("tmp");
    let (inj, agent, ca) = serving_offline(dir.path(), &["--request-timeout", "1s"]);
    let (addr, url) = (inj.addr, inj.url("/healthz"));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let started = std::time::Instant::now();
    let (closed, send) = rt.block_on(async move {
        let (mut send, conn) = h2_connect::<String>(addr, &ca).await;
        let closed = tokio::spawn(conn);
        let resp = send
            .send_request(hyper::Request::get(url).body(String::new()).expect("req"))
            .await
            .expect("healthz");
        assert_eq!(resp.status(), 200);
        let closed = tokio::time::timeout(Duration::from_secs(10), closed)
            .await
            .expect("the injector closed the idle HTTP/2 connection")
            .expect("connection task");
        (closed, send)
    });
    closed.expect("a clean HTTP/2 close");
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "closed before it was idle"
    );
    drop(send);
    eventually("no HTTP/2 connection left", Duration::from_secs(10), || {
        get(&agent, &inj.url("/metrics")).is_ok_and(|(_, m)| {
            metric(&m, "podwire_injector_open_connections{protocol=\"h2\"}") == 0.0
        })
    });
}

/// Past `--max-connections`, a connection waits in the accept queue until one closes.
#[test]
fn connections_past_the_cap_wait_for_a_free_slot() {
    let dir = tempfile::tempdir().expect("tmp");
    let (inj, _, ca) = serving_offline(
        dir.path(),
        &["--max-connections", "1", "--request-timeout", "30s"],
    );
    const HEALTHZ: &[u8] = b"GET /healthz HTTP/1.1\r\nHost: injector\r\n\r\n";
    let mut first = raw_tls(inj.addr, &ca);
    let answer = raw_exchange(&mut first, HEALTHZ);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    // The first connection stays open (keep-alive): the second is not served meanwhile.
    let (addr, ca2) = (inj.addr, ca.clone());
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut second = raw_tls(addr, &ca2);
        let _ = tx.send(raw_exchange(&mut second, HEALTHZ));
    });
    assert!(
        rx.recv_timeout(Duration::from_millis(700)).is_err(),
        "a second connection was served past --max-connections 1"
    );
    drop(first);
    let answer = rx
        .recv_timeout(Duration::from_secs(10))
        .expect("the second connection served once the first closed");
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
}

/// Where an answer puts the proxy: "native" (an init container), "classic" (a container).
fn layout(answer: &Value) -> &'static str {
    use base64::Engine;
    let patch = answer["response"]["patch"].as_str().expect("a patch");
    let patch = base64::engine::general_purpose::STANDARD
        .decode(patch)
        .expect("base64");
    let ops: Vec<Value> = serde_json::from_slice(&patch).expect("JSON patch");
    let proxy_under = |list: &str| {
        ops.iter().any(|op| {
            op["path"].as_str().is_some_and(|p| p.starts_with(list))
                && op["value"].to_string().contains(r#""name":"istio-proxy""#)
        })
    };
    match (
        proxy_under("/spec/initContainers"),
        proxy_under("/spec/containers"),
    ) {
        (true, false) => "native",
        (false, true) => "classic",
        other => panic!("proxy in neither or both lists {other:?}: {ops:?}"),
    }
}

/// Istio's default `ENABLE_NATIVE_SIDECARS=auto`, as istiod applies it: native sidecars while
/// every node's kubelet is 1.33 or newer, classic ones while an older kubelet (or one that
/// reports no readable version) is in the cluster; a pod already bound to a node follows that
/// node's kubelet. The change is the node watch's, with no restart. Ready only after the
/// nodes' first list: the first answer already knows them.
#[test]
fn auto_native_sidecars_follow_the_nodes_kubelets() {
    let api = ApiServer::start().expect("api");
    let node = |name: &str, version: &str| {
        api.put(
            &format!("/api/v1/nodes/{name}"),
            json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": name},
                   "status": {"nodeInfo": {"kubeletVersion": version}}}),
        );
    };
    node("new-1", "v1.33.2");
    node("new-2", "v1.34.0-eks-2b1f");
    node("old-1", "v1.32.4");
    let dir = tempfile::tempdir().expect("tmp");
    let (inj, agent, _) = serving_with_api(dir.path(), &api, &[]);
    eventually(
        "ready once the node watch synced",
        Duration::from_secs(20),
        || get(&agent, &inj.url("/readyz")).is_ok_and(|(c, _)| c == 200),
    );
    let body = fixture_bytes("controller-pod.json");
    let answer = || -> Value {
        let (_, b) = post(&agent, &inj.url("/inject"), &body).expect("review");
        serde_json::from_str(&b).expect("JSON")
    };
    // Ready means the nodes are known: classic from the first answer on.
    assert_eq!(layout(&answer()), "classic");
    eventually("the log names the node", Duration::from_secs(10), || {
        inj.log().contains("node old-1 runs kubelet v1.32.4")
    });
    // A pod already bound to a node follows that node's kubelet; bound to a node the watch
    // has not seen, it is decided on all of them.
    let bound_to = |node: &str| -> &'static str {
        let mut review: Value = serde_json::from_slice(&body).expect("fixture");
        review["request"]["object"]["spec"]["nodeName"] = json!(node);
        let bytes = serde_json::to_vec(&review).expect("JSON");
        let (_, b) = post(&agent, &inj.url("/inject"), &bytes).expect("review");
        layout(&serde_json::from_str(&b).expect("JSON"))
    };
    assert_eq!(bound_to("new-2"), "native");
    assert_eq!(bound_to("old-1"), "classic");
    assert_eq!(bound_to("not-seen"), "classic");
    api.delete("/api/v1/nodes/old-1");
    eventually("native once it left", Duration::from_secs(10), || {
        layout(&answer()) == "native"
    });
    assert_eq!(answer(), offline_review_of(&body, &[]), "native as offline");
    node("old-2", "v1.31.0");
    eventually("classic again", Duration::from_secs(10), || {
        layout(&answer()) == "classic"
    });
    assert_eq!(bound_to("new-1"), "native");
    api.delete("/api/v1/nodes/old-2");
    eventually("native once it left", Duration::from_secs(10), || {
        layout(&answer()) == "native"
    });
    node("odd-1", "");
    eventually(
        "classic with an unreadable version",
        Duration::from_secs(10),
        || layout(&answer()) == "classic",
    );
    assert!(api.count("GET", "/api/v1/nodes") >= 2, "list + watch");
}

/// Without list and watch on nodes, `auto` cannot be decided: not ready, and `/readyz` says
/// what is missing.
#[test]
fn a_forbidden_node_watch_keeps_the_injector_unready_and_says_why() {
    let api = ApiServer::start().expect("api");
    api.forbid("/api/v1/nodes");
    let dir = tempfile::tempdir().expect("tmp");
    let (inj, agent, _) = serving_with_api(dir.path(), &api, &[]);
    eventually(
        "readyz names the node watch's failure",
        Duration::from_secs(20),
        || {
            get(&agent, &inj.url("/readyz")).is_ok_and(|(c, b)| {
                c == 503 && b.contains("node watch") && b.contains("--no-node-watch")
            })
        },
    );
}
