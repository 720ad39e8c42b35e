//! `podwire-agent serve`, run as the real binary against a temporary directory.

use podwire_core::lookup::{LookupRequest, LookupResponse, LookupStatus, MAX_MESSAGE_BYTES};
use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_podwire-agent");
/// How soon a change in the directory must show in look-ups.
const RELOAD_DEADLINE: Duration = Duration::from_secs(2);

const SHOP_YAML: &str = r#"
# two pods and a Deployment (ignored)
apiVersion: v1
kind: Pod
metadata:
  name: web-1
  namespace: shop
  uid: uid-web-1
  annotations:
    sidecar.istio.io/status: '{"containers":["istio-proxy"]}'
    traffic.sidecar.istio.io/excludeInboundPorts: "9090"
spec:
  containers:
    - name: app
      image: web
    - name: istio-proxy
      securityContext: {runAsUser: 1337, runAsGroup: 1337}
---
apiVersion: apps/v1
kind: Deployment
metadata:
  name: web
  namespace: shop
spec:
  template:
    metadata: {labels: {app: web}}
---
apiVersion: v1
kind: Pod
metadata:
  name: solo
  annotations: {note: no-namespace}
"#;

const API_JSON: &str = r#"{
  "apiVersion": "v1",
  "kind": "Pod",
  "metadata": {"name": "api-0", "namespace": "shop", "uid": "uid-api-0",
               "annotations": {"sidecar.istio.io/interceptionMode": "REDIRECT"}},
  "spec": {"containers": [{"name": "api"}]}
}"#;

/// A running `podwire-agent serve` on a fresh directory; killed when dropped.
struct Agent {
    child: Child,
    pods: PathBuf,
    socket: PathBuf,
    log: PathBuf,
    _tmp: tempfile::TempDir,
}

impl Agent {
    /// Writes `files` into a new pods directory and starts serving it.
    fn start(files: &[(&str, &str)]) -> Agent {
        let tmp = tempfile::tempdir().expect("tempdir");
        let pods = tmp.path().join("pods");
        fs::create_dir(&pods).expect("pods dir");
        for (name, text) in files {
            fs::write(pods.join(name), text).expect("write manifest");
        }
        // The socket's directory does not exist yet: serve creates it.
        let socket = tmp.path().join("run/podwire/agent.sock");
        let log = tmp.path().join("agent.log");
        let child = Command::new(BIN)
            .args(["serve", "--log-level", "debug", "--pods-dir"])
            .arg(&pods)
            .arg("--socket")
            .arg(&socket)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs::File::create(&log).expect("log file"))
            .spawn()
            .expect("start podwire-agent");
        let mut agent = Agent {
            child,
            pods,
            socket,
            log,
            _tmp: tmp,
        };
        agent.wait_ready();
        agent
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if UnixStream::connect(&self.socket).is_ok() {
                return;
            }
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                panic!("agent exited early ({status}):\n{}", self.log());
            }
            assert!(
                Instant::now() < deadline,
                "agent not serving:\n{}",
                self.log()
            );
            sleep(Duration::from_millis(20));
        }
    }

    fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn lookup(&self, namespace: &str, name: &str, uid: &str) -> LookupStatus {
        lookup(&self.socket, namespace, name, uid)
    }

    /// Polls `lookup` until `check` accepts its answer, for at most [`RELOAD_DEADLINE`].
    fn eventually(
        &self,
        namespace: &str,
        name: &str,
        what: &str,
        check: impl Fn(&LookupStatus) -> bool,
    ) {
        let deadline = Instant::now() + RELOAD_DEADLINE;
        loop {
            let status = self.lookup(namespace, name, "");
            if check(&status) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{what}: still {status:?} after {RELOAD_DEADLINE:?}\n{}",
                self.log()
            );
            sleep(Duration::from_millis(25));
        }
    }

    fn terminate(&mut self, signal: &str) -> ExitStatus {
        let killed = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.child.id().to_string())
            .status()
            .expect("run kill");
        assert!(killed.success(), "kill -{signal} failed");
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            assert!(Instant::now() < deadline, "agent did not stop on {signal}");
            sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Sends `line` (a newline is added) and reads the one-line answer.
fn exchange(socket: &Path, line: &[u8]) -> LookupResponse {
    let mut stream = UnixStream::connect(socket).expect("connect to the agent");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("read timeout");
    // The agent may answer (and close) before it has read everything of an oversized
    // request: a failed write is then expected, the answer is what counts.
    let _ = stream
        .write_all(line)
        .and_then(|()| stream.write_all(b"\n"));
    read_answer(stream)
}

fn read_answer(stream: UnixStream) -> LookupResponse {
    let mut answer = String::new();
    let mut reader = BufReader::new(stream);
    reader.read_line(&mut answer).expect("read the answer");
    assert!(answer.ends_with('\n'), "answer not a full line: {answer:?}");
    let mut rest = String::new();
    match reader.read_line(&mut rest) {
        Ok(_) => assert_eq!(rest, "", "one answer line, then the connection closes"),
        // What an agent closing on an oversized request it did not read to the end gives.
        Err(err) => assert_eq!(err.kind(), std::io::ErrorKind::ConnectionReset, "{err}"),
    }
    serde_json::from_str(&answer).unwrap_or_else(|err| panic!("answer {answer:?}: {err}"))
}

fn lookup(socket: &Path, namespace: &str, name: &str, uid: &str) -> LookupStatus {
    let request = LookupRequest {
        v: 1,
        namespace: namespace.into(),
        name: name.into(),
        uid: uid.into(),
    };
    let line = serde_json::to_vec(&request).expect("encode request");
    let response = exchange(socket, &line);
    assert_eq!(response.v, 1);
    response.status
}

fn is_found(status: &LookupStatus) -> bool {
    matches!(status, LookupStatus::Found { .. })
}

fn annotation(status: &LookupStatus, key: &str) -> Option<String> {
    match status {
        LookupStatus::Found { pod } => pod.annotation(key).map(str::to_owned),
        _ => None,
    }
}

fn error_message(response: LookupResponse) -> String {
    match response.status {
        LookupStatus::Error { message } => message,
        other => panic!("expected an error answer, got {other:?}"),
    }
}

#[test]
fn serves_pods_from_yaml_and_json_manifests() {
    let agent = Agent::start(&[("shop.yaml", SHOP_YAML), ("api.json", API_JSON)]);

    let web = agent.lookup("shop", "web-1", "");
    assert_eq!(
        annotation(&web, "traffic.sidecar.istio.io/excludeInboundPorts").as_deref(),
        Some("9090"),
        "{web:?}"
    );
    if let LookupStatus::Found { pod } = &web {
        assert_eq!(pod.metadata.uid, "uid-web-1");
        let proxy = pod.container("istio-proxy").expect("proxy container");
        let sc = proxy.security_context.as_ref().expect("security context");
        assert_eq!(sc.run_as_user, Some(1337));
    }
    let api = agent.lookup("shop", "api-0", "uid-api-0");
    assert_eq!(
        annotation(&api, "sidecar.istio.io/interceptionMode").as_deref(),
        Some("REDIRECT"),
        "{api:?}"
    );
    // No namespace in the manifest: `default`; none in the request either: `default` too.
    let solo = agent.lookup("default", "solo", "");
    assert_eq!(annotation(&solo, "note").as_deref(), Some("no-namespace"));
    assert!(is_found(&agent.lookup("", "solo", "")));

    // The Deployment is not a pod.
    assert_eq!(agent.lookup("shop", "web", ""), LookupStatus::NotFound);
    assert_eq!(agent.lookup("shop", "nope", ""), LookupStatus::NotFound);
    assert_eq!(agent.lookup("default", "web-1", ""), LookupStatus::NotFound);
    // A UID that differs is another incarnation: unknown (the plugin fails closed), never
    // "not found"; the same UID is the pod.
    assert!(
        matches!(
            agent.lookup("shop", "web-1", "uid-other"),
            LookupStatus::NotReady { .. }
        ),
        "another UID must not be an answer"
    );
    assert!(is_found(&agent.lookup("shop", "web-1", "uid-web-1")));

    let log = agent.log();
    assert!(log.contains("serving 3 pods on"), "{log}");
    assert!(
        log.contains("look-up shop/web-1"),
        "debug look-up logs: {log}"
    );
}

#[test]
fn socket_is_private() {
    let agent = Agent::start(&[]);
    let meta = fs::symlink_metadata(&agent.socket).expect("socket metadata");
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    let parent = agent.socket.parent().expect("parent");
    let parent_mode = fs::metadata(parent).expect("dir").permissions().mode() & 0o777;
    assert_eq!(parent_mode, 0o700, "created socket directory");
    assert_eq!(agent.lookup("default", "x", ""), LookupStatus::NotFound);
}

#[test]
fn follows_changes_in_the_directory() {
    let agent = Agent::start(&[("api.json", API_JSON)]);
    assert_eq!(agent.lookup("shop", "web-1", ""), LookupStatus::NotFound);

    // A new file.
    fs::write(agent.pods.join("shop.yml"), SHOP_YAML).expect("add file");
    agent.eventually("shop", "web-1", "added file", is_found);
    assert!(is_found(&agent.lookup("default", "solo", "")));

    // An edited file.
    let edited = SHOP_YAML.replace(
        "excludeInboundPorts: \"9090\"",
        "excludeInboundPorts: \"9091\"",
    );
    fs::write(agent.pods.join("shop.yml"), edited).expect("edit file");
    agent.eventually("shop", "web-1", "edited file", |s| {
        annotation(s, "traffic.sidecar.istio.io/excludeInboundPorts").as_deref() == Some("9091")
    });

    // A file replaced by a rename (as editors and `kubectl`-style tools do).
    let staged = agent.pods.join(".api.json.tmp");
    fs::write(&staged, API_JSON.replace("REDIRECT", "TPROXY")).expect("stage file");
    fs::rename(&staged, agent.pods.join("api.json")).expect("rename");
    agent.eventually("shop", "api-0", "renamed file", |s| {
        annotation(s, "sidecar.istio.io/interceptionMode").as_deref() == Some("TPROXY")
    });

    // A deleted file.
    fs::remove_file(agent.pods.join("shop.yml")).expect("delete file");
    agent.eventually("shop", "web-1", "deleted file", |s| {
        *s == LookupStatus::NotFound
    });
    assert_eq!(agent.lookup("default", "solo", ""), LookupStatus::NotFound);
    assert!(is_found(&agent.lookup("shop", "api-0", "")));
    assert!(agent.log().contains("reloaded 1 pods"), "{}", agent.log());
}

#[test]
fn malformed_documents_do_not_hide_the_others() {
    let mixed = "kind: Pod\nmetadata: {name: first}\n---\nkind: Pod\nmetadata: [unclosed\n---\n\
                 kind: Pod\nmetadata: {name: typed, annotations: [a, list]}\n---\n\
                 kind: Pod\nmetadata: {name: last}\n";
    let agent = Agent::start(&[
        ("mixed.yaml", mixed),
        ("broken.json", "{\"kind\": \"Pod\", \"metadata\": "),
        ("garbage.yml", ":\n  - [\n"),
        ("api.json", API_JSON),
        ("notes.txt", "kind: Pod\nmetadata: {name: ignored}\n"),
    ]);
    assert!(is_found(&agent.lookup("default", "first", "")));
    assert!(is_found(&agent.lookup("default", "last", "")));
    assert!(is_found(&agent.lookup("shop", "api-0", "")));
    // Unreadable, with its name known: an error for that pod. Not in any manifest, while
    // other documents could not be read at all: unknown (see unreadable_manifests_* below).
    assert!(matches!(
        agent.lookup("default", "typed", ""),
        LookupStatus::Error { .. }
    ));
    assert!(matches!(
        agent.lookup("default", "ignored", ""),
        LookupStatus::NotReady { .. }
    ));

    let log = agent.log();
    assert!(log.contains("mixed.yaml document 2"), "{log}");
    assert!(log.contains("mixed.yaml document 3"), "{log}");
    assert!(log.contains("broken.json"), "{log}");
    assert!(log.contains("garbage.yml"), "{log}");
    assert!(log.contains("serving 3 pods"), "{log}");
}

/// Issue 9, item 1: the source holds shop/db-0 with UID A, the runtime sets up UID B.
#[test]
fn another_uid_is_unknown_until_the_source_catches_up() {
    let db =
        |uid: &str| format!("kind: Pod\nmetadata: {{name: db-0, namespace: shop, uid: {uid}}}\n");
    let agent = Agent::start(&[("db.yaml", &db("uid-a"))]);
    match agent.lookup("shop", "db-0", "uid-b") {
        LookupStatus::NotReady { message } => assert!(
            message.contains("UID uid-a") && message.contains("UID uid-b"),
            "{message}"
        ),
        other => panic!("a UID mismatch must be unknown, got {other:?}"),
    }
    // The source catches up: the new incarnation is found, the old one is now the unknown one.
    fs::write(agent.pods.join("db.yaml"), db("uid-b")).expect("rewrite");
    let deadline = Instant::now() + RELOAD_DEADLINE;
    while !is_found(&agent.lookup("shop", "db-0", "uid-b")) {
        assert!(Instant::now() < deadline, "not reloaded:\n{}", agent.log());
        sleep(Duration::from_millis(25));
    }
    assert!(matches!(
        agent.lookup("shop", "db-0", "uid-a"),
        LookupStatus::NotReady { .. }
    ));
}

/// Issue 9, item 2: a manifest that cannot be read never makes its pod "not found".
#[test]
fn unreadable_manifests_are_unknown_not_absent() {
    let labels = "kind: Pod\nmetadata: {name: db-0, namespace: shop, labels: {app: 5}}\n";
    let run_as = "kind: Pod\nmetadata: {name: web, namespace: shop}\nspec:\n  containers:\n  \
                  - name: istio-proxy\n    securityContext: {runAsUser: \"1337; -j DROP\"}\n";
    let agent = Agent::start(&[("db.yaml", labels), ("web.yaml", run_as)]);
    let message = |status: LookupStatus| match status {
        LookupStatus::Error { message } | LookupStatus::NotReady { message } => message,
        other => panic!("expected an unknown status, got {other:?}"),
    };
    let db = message(agent.lookup("shop", "db-0", ""));
    assert!(
        db.contains("db.yaml") && db.contains("metadata.labels.app"),
        "{db}"
    );
    let web = message(agent.lookup("shop", "web", ""));
    assert!(
        web.contains("web.yaml") && web.contains("runAsUser"),
        "{web}"
    );
    // Nothing unreadable without a name: a pod in no manifest is simply not found.
    assert_eq!(agent.lookup("shop", "other", ""), LookupStatus::NotFound);

    // A non-atomic writer, caught half-way: which pod the file holds cannot be told, so no
    // absent name is "not found" any more.
    fs::write(
        agent.pods.join("late.json"),
        r#"{"apiVersion":"v1","kind":"Pod","metadata":{"name":"la"#,
    )
    .expect("truncated write");
    let deadline = Instant::now() + RELOAD_DEADLINE;
    let truncated = loop {
        match agent.lookup("shop", "other", "") {
            LookupStatus::NotReady { message } => break message,
            _ => {
                assert!(Instant::now() < deadline, "not reloaded:\n{}", agent.log());
                sleep(Duration::from_millis(25));
            }
        }
    };
    assert!(truncated.contains("late.json"), "{truncated}");
    let log = agent.log();
    assert!(
        log.contains("DEGRADED") && log.contains("late.json"),
        "{log}"
    );

    // Fixed: answers come back.
    fs::write(
        agent.pods.join("late.json"),
        r#"{"apiVersion":"v1","kind":"Pod","metadata":{"name":"late","namespace":"shop"}}"#,
    )
    .expect("complete write");
    agent.eventually("shop", "other", "fixed file", |s| {
        *s == LookupStatus::NotFound
    });
    assert!(is_found(&agent.lookup("shop", "late", "")));
}

/// Issue 9, item 8: clients that connect and never write must not starve the plugin.
#[test]
fn idle_connections_do_not_starve_lookups() {
    let agent = Agent::start(&[("api.json", API_JSON)]);
    let idle: Vec<UnixStream> = (0..64)
        .map(|_| UnixStream::connect(&agent.socket).expect("connect"))
        .collect();
    // Four look-ups the way the plugin makes them: its 2 s timeout, one connection each.
    let workers: Vec<_> = (0..4)
        .map(|_| {
            let socket = agent.socket.clone();
            std::thread::spawn(move || {
                let mut stream = UnixStream::connect(&socket).expect("connect");
                stream
                    .set_read_timeout(Some(Duration::from_secs(2)))
                    .expect("timeout");
                stream
                    .write_all(b"{\"v\":1,\"namespace\":\"shop\",\"name\":\"api-0\"}\n")
                    .expect("write");
                let mut answer = String::new();
                BufReader::new(stream)
                    .read_line(&mut answer)
                    .map(|_| answer)
                    .map_err(|e| e.to_string())
            })
        })
        .collect();
    for worker in workers {
        let answer = worker.join().expect("worker").expect("answered within 2 s");
        assert!(answer.contains("\"found\""), "{answer}");
    }
    // The idle ones are dropped well within the plugin's timeout (an error line, then EOF).
    for stream in idle {
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        let message = error_message(read_answer(stream));
        assert!(message.contains("no request line"), "{message}");
    }
}

#[test]
fn bad_requests_get_error_answers_and_serving_goes_on() {
    let agent = Agent::start(&[("api.json", API_JSON)]);

    let message = error_message(exchange(&agent.socket, b"this is not json"));
    assert!(message.contains("not JSON"), "{message}");

    let message = error_message(exchange(
        &agent.socket,
        br#"{"v":2,"namespace":"shop","name":"api-0"}"#,
    ));
    assert!(message.contains("protocol version 2"), "{message}");

    let message = error_message(exchange(&agent.socket, br#"{"namespace":"shop"}"#));
    assert!(message.contains("version"), "{message}");

    let message = error_message(exchange(&agent.socket, br#"{"v":1,"namespace":"shop"}"#));
    assert!(message.contains("malformed"), "{message}");

    let mut huge = br#"{"v":1,"namespace":"shop","name":""#.to_vec();
    huge.resize(MAX_MESSAGE_BYTES + 16, b'a');
    huge.extend_from_slice(br#""}"#);
    let message = error_message(exchange(&agent.socket, &huge));
    assert!(message.contains("larger than"), "{message}");

    // A client that connects and goes away without a word, and one that stays silent.
    drop(UnixStream::connect(&agent.socket).expect("connect"));
    let silent = UnixStream::connect(&agent.socket).expect("connect");
    silent
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("read timeout");
    let started = Instant::now();
    let message = error_message(read_answer(silent));
    assert!(message.contains("no request line"), "{message}");
    assert!(started.elapsed() < Duration::from_secs(5));

    assert!(is_found(&agent.lookup("shop", "api-0", "uid-api-0")));
    assert_eq!(agent.lookup("shop", "other", ""), LookupStatus::NotFound);
}

#[test]
fn serves_connections_concurrently() {
    let agent = Agent::start(&[("api.json", API_JSON)]);
    // A silent client holds its connection for the whole read timeout; others are answered
    // meanwhile.
    let _silent = UnixStream::connect(&agent.socket).expect("connect");
    let started = Instant::now();
    let workers: Vec<_> = (0..8)
        .map(|_| {
            let socket = agent.socket.clone();
            std::thread::spawn(move || lookup(&socket, "shop", "api-0", ""))
        })
        .collect();
    for worker in workers {
        assert!(is_found(&worker.join().expect("worker")));
    }
    assert!(started.elapsed() < Duration::from_millis(1500));
}

#[test]
fn sigterm_removes_the_socket_and_exits_zero() {
    let mut agent = Agent::start(&[("api.json", API_JSON)]);
    let status = agent.terminate("TERM");
    assert!(status.success(), "exit status {status}\n{}", agent.log());
    assert!(!agent.socket.exists(), "socket left behind");
}

#[test]
fn sigint_removes_the_socket_and_exits_zero() {
    let mut agent = Agent::start(&[]);
    let status = agent.terminate("INT");
    assert!(status.success(), "exit status {status}\n{}", agent.log());
    assert!(!agent.socket.exists(), "socket left behind");
}

#[test]
fn replaces_a_stale_socket_but_nothing_else() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let pods = tmp.path().join("pods");
    fs::create_dir(&pods).expect("pods dir");
    fs::write(pods.join("api.json"), API_JSON).expect("manifest");
    let run = |socket: &Path| {
        Command::new(BIN)
            .arg("serve")
            .arg("--pods-dir")
            .arg(&pods)
            .arg("--socket")
            .arg(socket)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start podwire-agent")
    };

    // A regular file where the socket should be: refused, and left alone.
    let file = tmp.path().join("file.sock");
    fs::write(&file, "keep me").expect("write");
    let out = run(&file).wait_with_output().expect("wait");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("not a socket"), "{stderr}");
    assert!(out.stdout.is_empty());
    assert_eq!(fs::read_to_string(&file).expect("kept"), "keep me");

    // A socket nobody listens on any more: replaced.
    let stale = tmp.path().join("stale.sock");
    drop(UnixListener::bind(&stale).expect("bind"));
    assert!(stale.exists());
    let mut child = run(&stale);
    let deadline = Instant::now() + Duration::from_secs(20);
    while lookup_ok(&stale).is_none() {
        assert!(
            child.try_wait().expect("try_wait").is_none(),
            "agent exited"
        );
        assert!(Instant::now() < deadline, "agent not serving");
        sleep(Duration::from_millis(20));
    }

    // A socket another agent serves on: refused, and that agent keeps serving.
    let out = run(&stale).wait_with_output().expect("wait");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("already serving"), "{stderr}");
    assert!(lookup_ok(&stale).is_some());

    let _ = child.kill();
    let _ = child.wait();
}

fn lookup_ok(socket: &Path) -> Option<LookupStatus> {
    UnixStream::connect(socket).ok()?;
    Some(lookup(socket, "shop", "api-0", ""))
}

#[test]
fn a_missing_pods_dir_is_a_clear_error() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let missing = tmp.path().join("no-such-dir");
    let out = Command::new(BIN)
        .arg("serve")
        .arg("--pods-dir")
        .arg(&missing)
        .arg("--socket")
        .arg(tmp.path().join("agent.sock"))
        .output()
        .expect("run podwire-agent");
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("no-such-dir"), "{stderr}");
    assert!(stderr.contains("No such file or directory"), "{stderr}");
    assert!(!tmp.path().join("agent.sock").exists());
}

#[test]
fn help_describes_the_commands() {
    let out = Command::new(BIN).arg("--help").output().expect("run");
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(help.contains("serve"), "{help}");
    assert!(help.contains("--log-level"), "{help}");

    let out = Command::new(BIN)
        .args(["serve", "--help"])
        .output()
        .expect("run");
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for needle in [
        "--pods-dir <DIR>",
        "--socket <PATH>",
        "SIGTERM",
        "Pod manifests",
    ] {
        assert!(help.contains(needle), "{needle} missing:\n{help}");
    }
}

#[test]
fn a_startup_error_names_its_cause_once() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let missing = tmp.path().join("no-such-dir");
    let out = Command::new(BIN)
        .arg("serve")
        .arg("--pods-dir")
        .arg(&missing)
        .arg("--socket")
        .arg(tmp.path().join("agent.sock"))
        .output()
        .expect("run podwire-agent");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    let cause = std::io::Error::from(std::io::ErrorKind::NotFound).to_string();
    assert!(stderr.contains(&missing.display().to_string()), "{stderr}");
    assert_eq!(
        stderr.matches("os error 2").count(),
        1,
        "the cause ({cause}) is printed once: {stderr}"
    );
}
