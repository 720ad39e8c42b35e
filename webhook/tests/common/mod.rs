//! Shared by the `serve` tests: start the real binary, talk to it with a real TLS client.
#![allow(dead_code)]

use podwire_injector::certs::{issue, new_ca, Policy};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

pub fn fixture_bytes(name: &str) -> Vec<u8> {
    std::fs::read(fixture(name)).expect("fixture")
}

/// A running `podwire-injector serve`; killed when dropped.
pub struct Injector {
    child: Child,
    pub addr: SocketAddr,
    pub log: Arc<Mutex<String>>,
}

impl Injector {
    pub fn url(&self, path: &str) -> String {
        format!("https://{}{path}", self.addr)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The process's peak resident memory so far (`VmHWM`), in bytes.
    pub fn peak_rss(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()))
            .expect("/proc/PID/status");
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .expect("VmHWM")
            * 1024
    }

    pub fn log(&self) -> String {
        self.log.lock().map(|l| l.clone()).unwrap_or_default()
    }

    /// SIGTERM (graceful) and wait.
    pub fn terminate(self) -> std::process::ExitStatus {
        self.sigterm();
        self.exit_within(Duration::from_secs(20))
    }

    /// Send SIGTERM: the injector stops accepting and finishes what is open.
    pub fn sigterm(&self) {
        let pid = self.child.id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
    }

    /// Its exit status, which must come within `limit`.
    pub fn exit_within(mut self, limit: Duration) -> std::process::ExitStatus {
        let start = Instant::now();
        loop {
            if let Ok(Some(s)) = self.child.try_wait() {
                return s;
            }
            assert!(
                start.elapsed() < limit,
                "no exit within {limit:?}: {}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Injector {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `podwire-injector --log-level info serve --config tests/fixtures/config.yaml --listen
/// 127.0.0.1:0 ARGS`; returns once it listens.
pub fn start(args: &[&str], env: &[(&str, &str)]) -> Injector {
    start_with(&fixture("config.yaml"), args, env)
}

/// [`start`] with another config file.
pub fn start_with(config: &Path, args: &[&str], env: &[(&str, &str)]) -> Injector {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_podwire-injector"));
    cmd.args(["--log-level", "info", "serve", "--config"])
        .arg(config)
        .args(["--listen", "127.0.0.1:0"])
        // Istio's settings come from the config file here (tests/istio_settings.rs reads
        // them from the cluster).
        .arg("--no-istio-config")
        .args(args)
        .env_remove("KUBECONFIG")
        .env_remove("POD_NAMESPACE")
        .env_remove("POD_NAME")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("spawn podwire-injector serve");
    let stderr = child.stderr.take().expect("stderr");
    let log = Arc::new(Mutex::new(String::new()));
    let (tx, rx) = std::sync::mpsc::channel();
    let l = log.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Some(rest) = line.split("serving https://").nth(1) {
                let _ = tx.send(rest.trim_end_matches("/inject").to_string());
            }
            if let Ok(mut l) = l.lock() {
                l.push_str(&line);
                l.push('\n');
            }
        }
    });
    let addr = match rx.recv_timeout(Duration::from_secs(20)) {
        Ok(a) => a.parse().expect("address"),
        Err(_) => {
            let _ = child.kill();
            let _ = child.wait();
            std::thread::sleep(Duration::from_millis(100));
            panic!(
                "injector did not start listening: {}",
                log.lock().map(|l| l.clone()).unwrap_or_default()
            );
        }
    };
    Injector { child, addr, log }
}

/// A CA and a serving certificate for 127.0.0.1 and localhost, written as `{prefix}.crt`,
/// `{prefix}.key`; returns the CA PEM.
pub fn write_cert(dir: &Path, prefix: &str, validity: Duration) -> String {
    let policy = Policy {
        dns_names: vec!["127.0.0.1".into(), "localhost".into()],
        cert_validity: validity,
        cert_renew_after: validity,
        ca_validity: Duration::from_secs(86400),
    };
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let (ca, ca_key) = new_ca(&policy, now).expect("CA");
    let (crt, key) = issue(&policy, &ca, &ca_key, now).expect("cert");
    // Written next to, then renamed over, as a Secret volume update would.
    let tmp = dir.join(format!(".{prefix}.tmp"));
    std::fs::write(&tmp, crt).expect("write");
    std::fs::rename(&tmp, dir.join(format!("{prefix}.crt"))).expect("rename");
    std::fs::write(&tmp, key).expect("write");
    std::fs::rename(&tmp, dir.join(format!("{prefix}.key"))).expect("rename");
    ca
}

pub fn tls_config(ca_pem: &str) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pemfile::certs(&mut ca_pem.as_bytes()) {
        roots.add(c.expect("CA PEM")).expect("CA");
    }
    Arc::new(
        rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth(),
    )
}

/// A real TLS client (ureq + rustls) trusting only `ca_pem`.
pub fn client(ca_pem: &str) -> ureq::Agent {
    ureq::AgentBuilder::new()
        .tls_config(tls_config(ca_pem))
        .timeout(Duration::from_secs(10))
        .build()
}

/// (status, body); transport errors are returned as Err.
pub fn call(req: ureq::Request, body: Option<&[u8]>) -> Result<(u16, String), String> {
    let r = match body {
        Some(b) => req.set("Content-Type", "application/json").send_bytes(b),
        None => req.call(),
    };
    match r {
        Ok(resp) => {
            let code = resp.status();
            Ok((code, resp.into_string().map_err(|e| e.to_string())?))
        }
        Err(ureq::Error::Status(code, resp)) => Ok((code, resp.into_string().unwrap_or_default())),
        Err(e) => Err(e.to_string()),
    }
}

pub fn post(agent: &ureq::Agent, url: &str, body: &[u8]) -> Result<(u16, String), String> {
    call(agent.post(url), Some(body))
}

pub fn get(agent: &ureq::Agent, url: &str) -> Result<(u16, String), String> {
    call(agent.get(url), None)
}

pub fn eventually(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < timeout, "timed out waiting for: {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A raw TLS connection, for requests ureq would not send (a body that never arrives).
pub fn raw_tls(
    addr: SocketAddr,
    ca_pem: &str,
) -> rustls::StreamOwned<rustls::ClientConnection, TcpStream> {
    let tcp = TcpStream::connect(addr).expect("connect");
    tcp.set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    let conn =
        rustls::ClientConnection::new(tls_config(ca_pem), "127.0.0.1".try_into().expect("name"))
            .expect("tls");
    rustls::StreamOwned::new(conn, tcp)
}

/// Send `head` (and whatever follows) and read everything the server answers until it closes.
pub fn raw_exchange(
    stream: &mut rustls::StreamOwned<rustls::ClientConnection, TcpStream>,
    send: &[u8],
) -> String {
    stream.write_all(send).expect("send");
    stream.flush().expect("flush");
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                out.extend_from_slice(&buf[..n]);
                if let Some(text) = complete_response(&out) {
                    return text;
                }
            }
            Err(_) => break,
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// One complete HTTP/1.1 response with a Content-Length, if `b` holds it.
fn complete_response(b: &[u8]) -> Option<String> {
    let text = String::from_utf8_lossy(b);
    let (head, body) = text.split_once("\r\n\r\n")?;
    let len: usize = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().ok())?
        })
        .unwrap_or(0);
    (body.len() >= len).then(|| text.into_owned())
}

/// The value of a metric line (`name{labels} value`) in Prometheus text.
pub fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no {series} in:\n{text}"))
}

/// The name the API server uses for the webhook Service (and the self-managed certificate's).
pub const SVC: &str = "podwire-injector.podwire-system.svc";

/// A client for `https://podwire-injector.podwire-system.svc:PORT`, resolved to 127.0.0.1,
/// trusting only `ca_pem` (as the API server trusts only the caBundle). `close`: a new
/// connection (and handshake) for every request.
pub fn svc_client(ca_pem: &str) -> ureq::Agent {
    ureq::AgentBuilder::new()
        .tls_config(tls_config(ca_pem))
        .timeout(Duration::from_secs(10))
        .resolver(|netloc: &str| -> std::io::Result<Vec<SocketAddr>> {
            let port = netloc
                .rsplit(':')
                .next()
                .and_then(|p| p.parse().ok())
                .unwrap_or(443);
            Ok(vec![SocketAddr::from(([127, 0, 0, 1], port))])
        })
        .build()
}

pub fn svc_url(addr: SocketAddr, path: &str) -> String {
    format!("https://{SVC}:{}{path}", addr.port())
}

/// The MutatingWebhookConfiguration as installed (two webhooks, caBundle not yet filled in).
pub fn webhook_config() -> serde_json::Value {
    let hook = |name: &str| {
        serde_json::json!({
            "name": name,
            "admissionReviewVersions": ["v1"],
            "sideEffects": "None",
            "failurePolicy": "Fail",
            "timeoutSeconds": 10,
            "clientConfig": {"service": {"name": "podwire-injector", "namespace": "podwire-system",
                                         "path": "/inject", "port": 443}},
            "rules": [{"operations": ["CREATE"], "apiGroups": [""], "apiVersions": ["v1"],
                       "resources": ["pods"]}],
            "namespaceSelector": {"matchLabels": {"istio-injection": "enabled"}}
        })
    };
    serde_json::json!({
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "MutatingWebhookConfiguration",
        "metadata": {"name": "podwire-sidecar-injector"},
        "webhooks": [hook("namespace.sidecar-injector.podwire.io"),
                     hook("object.sidecar-injector.podwire.io")]
    })
}

pub const MWC_PATH: &str =
    "/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations/podwire-sidecar-injector";
pub const SECRET_PATH: &str = "/api/v1/namespaces/podwire-system/secrets/podwire-injector-tls";
pub const LEASE_PATH: &str =
    "/apis/coordination.k8s.io/v1/namespaces/podwire-system/leases/podwire-injector-leader";

/// The caBundle of every webhook in the configuration (decoded PEM), if all are set.
pub fn ca_bundles(mwc: &serde_json::Value) -> Vec<String> {
    use base64::Engine as _;
    mwc["webhooks"]
        .as_array()
        .map(|ws| {
            ws.iter()
                .map(|w| {
                    w["clientConfig"]["caBundle"]
                        .as_str()
                        .and_then(|b| base64::engine::general_purpose::STANDARD.decode(b).ok())
                        .map(|b| String::from_utf8_lossy(&b).into_owned())
                        .unwrap_or_default()
                })
                .collect()
        })
        .unwrap_or_default()
}
