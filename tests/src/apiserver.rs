//! An in-process HTTPS server speaking the Kubernetes API's HTTP/JSON for what podwire calls:
//! get, list (with `fieldSelector`), watch (chunked event stream from a `resourceVersion`,
//! `410 Gone` once compacted), create, merge / strategic-merge patch (status subresource
//! too; a `metadata.resourceVersion` in the patch is checked, `409 Conflict` when stale),
//! delete with preconditions. Its own CA and bearer token, on 127.0.0.1, so the real
//! clients (kube-rs, the plugin's ureq+rustls) are tested against a real TLS peer.

use anyhow::{Context, Result};
use base64::Engine as _;
use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

#[derive(Debug, Default)]
struct Store {
    rv: u64,
    /// Watches asking for anything older get `410 Gone`.
    compacted: u64,
    objects: BTreeMap<String, Value>,
    /// (resourceVersion, type, object path, object)
    log: Vec<(u64, &'static str, String, Value)>,
}

#[derive(Debug, Clone)]
pub struct ApiServer {
    pub url: String,
    pub ca_pem: String,
    pub token: String,
    store: Arc<(Mutex<Store>, Condvar)>,
    /// Every request seen: (method, path with query, authorization header).
    pub requests: Arc<Mutex<Vec<(String, String, String)>>>,
    /// While set, connections are dropped before TLS: the API server is down.
    pub down: Arc<AtomicBool>,
    /// Added to every answer: a slow API server.
    pub delay_ms: Arc<AtomicU64>,
    /// Paths under these prefixes are refused with 403, as RBAC refuses them.
    pub forbidden: Arc<Mutex<Vec<String>>>,
}

fn status(code: u16, reason: &str, message: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
           "message": message, "reason": reason, "code": code})
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' if i + 2 < b.len() => {
                // Bytes, not a str slice: a '%' before a multi-byte character must not panic.
                let hex = std::str::from_utf8(&b[i + 1..i + 3]).ok();
                match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                    Some(v) => out.push(v),
                    None => out.extend_from_slice(&b[i..i + 3]),
                }
                i += 3;
                continue;
            }
            b'+' => out.push(b' '),
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// RFC 7386 merge; with `strategic`, lists of objects keyed by `type` (conditions) or `name`
/// merge item by item, as the API server's strategic merge does for them.
fn merge(target: &mut Value, patch: &Value, strategic: bool) {
    match (target, patch) {
        (Value::Object(t), Value::Object(p)) => {
            for (k, v) in p {
                if v.is_null() {
                    t.remove(k);
                } else {
                    merge(t.entry(k.clone()).or_insert(Value::Null), v, strategic);
                }
            }
        }
        (Value::Array(t), Value::Array(p)) if strategic => {
            for item in p {
                let key = ["type", "name"]
                    .into_iter()
                    .find(|k| item.get(*k).is_some());
                match key.and_then(|k| t.iter_mut().find(|x| x.get(k) == item.get(k))) {
                    Some(existing) => merge(existing, item, true),
                    None => t.push(item.clone()),
                }
            }
        }
        (t, p) => *t = p.clone(),
    }
}

/// `/api/v1/namespaces/NS/pods/NAME` → ("pods", Some(NS), Some(NAME)); `/api/v1/pods` →
/// ("pods", None, None); `/api/v1/nodes/N` → ("nodes", None, Some(N)).
fn parse_path(path: &str) -> Option<(String, Option<String>, Option<String>)> {
    let rest = path.strip_prefix("/api/v1/").or_else(|| {
        path.strip_prefix("/apis/")
            .and_then(|r| r.splitn(3, '/').nth(2))
    })?;
    let parts: Vec<&str> = rest.split('/').collect();
    match parts.as_slice() {
        ["namespaces", ns, kind] => Some((kind.to_string(), Some(ns.to_string()), None)),
        ["namespaces", ns, kind, name] => Some((
            kind.to_string(),
            Some(ns.to_string()),
            Some(name.to_string()),
        )),
        [kind] => Some((kind.to_string(), None, None)),
        [kind, name] => Some((kind.to_string(), None, Some(name.to_string()))),
        _ => None,
    }
}

fn matches_collection(obj_path: &str, kind: &str, ns: &Option<String>) -> bool {
    match parse_path(obj_path) {
        Some((k, ons, Some(_))) => k == kind && (ns.is_none() || *ns == ons),
        _ => false,
    }
}

fn field(obj: &Value, dotted: &str) -> String {
    dotted
        .split('.')
        .try_fold(obj, |v, k| v.get(k))
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string()
}

fn selected(obj: &Value, field_selector: &str) -> bool {
    field_selector
        .split(',')
        .filter(|s| !s.is_empty())
        .all(|term| match term.split_once("!=") {
            Some((k, v)) => field(obj, k) != v,
            None => term
                .split_once('=')
                .is_none_or(|(k, v)| field(obj, k) == v.trim_start_matches('=')),
        })
}

struct Request {
    method: String,
    path: String,
    query: BTreeMap<String, String>,
    content_type: String,
    body: Vec<u8>,
}

impl ApiServer {
    pub fn start() -> Result<ApiServer> {
        let ca_key = KeyPair::generate()?;
        let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca = ca_params.self_signed(&ca_key)?;
        let key = KeyPair::generate()?;
        let params =
            CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()])?;
        let cert = params.signed_by(&key, &ca, &ca_key)?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = Arc::new(
            rustls::ServerConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()?
                .with_no_client_auth()
                .with_single_cert(
                    vec![cert.der().clone(), ca.der().clone()],
                    rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
                )?,
        );
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let server = ApiServer {
            url: format!("https://127.0.0.1:{}", listener.local_addr()?.port()),
            ca_pem: ca.pem(),
            token: "podwire-test-token".into(),
            store: Arc::default(),
            requests: Arc::default(),
            down: Arc::default(),
            delay_ms: Arc::default(),
            forbidden: Arc::default(),
        };
        let s = server.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming().flatten() {
                if s.down.load(Ordering::SeqCst) {
                    drop(conn);
                    continue;
                }
                let (s, config) = (s.clone(), config.clone());
                std::thread::spawn(move || {
                    if let Ok(tls) = rustls::ServerConnection::new(config) {
                        let _ = s.handle(rustls::StreamOwned::new(tls, conn));
                    }
                });
            }
        });
        Ok(server)
    }

    fn with_store<T>(&self, f: impl FnOnce(&mut Store) -> T) -> T {
        let (lock, cv) = &*self.store;
        let mut guard = lock.lock().unwrap_or_else(|p| p.into_inner());
        let out = f(&mut guard);
        cv.notify_all();
        out
    }

    fn record(store: &mut Store, kind: &'static str, path: &str, mut obj: Value) -> Value {
        store.rv += 1;
        let rv = store.rv;
        if let Some(meta) = obj.get_mut("metadata").and_then(Value::as_object_mut) {
            meta.insert("resourceVersion".into(), json!(rv.to_string()));
            if !meta.contains_key("uid") {
                meta.insert("uid".into(), json!(format!("uid-{rv}")));
            }
        }
        if kind == "DELETED" {
            store.objects.remove(path);
        } else {
            store.objects.insert(path.to_string(), obj.clone());
        }
        store.log.push((rv, kind, path.to_string(), obj.clone()));
        obj
    }

    /// Refuse every request under `path_prefix` with 403 Forbidden from now on.
    pub fn forbid(&self, path_prefix: &str) {
        if let Ok(mut f) = self.forbidden.lock() {
            f.push(path_prefix.to_string());
        }
    }

    /// Create or replace an object at its API path (an ADDED/MODIFIED watch event).
    pub fn put(&self, path: &str, obj: Value) -> Value {
        self.with_store(|s| {
            let kind = if s.objects.contains_key(path) {
                "MODIFIED"
            } else {
                "ADDED"
            };
            Self::record(s, kind, path, obj)
        })
    }

    pub fn delete(&self, path: &str) {
        self.with_store(|s| {
            if let Some(obj) = s.objects.get(path).cloned() {
                Self::record(s, "DELETED", path, obj);
            }
        });
    }

    pub fn get(&self, path: &str) -> Option<Value> {
        self.with_store(|s| s.objects.get(path).cloned())
    }

    /// The stored objects whose path starts with `prefix` (e.g. a namespace's Events).
    pub fn objects_under(&self, prefix: &str) -> Vec<Value> {
        self.with_store(|s| {
            s.objects
                .iter()
                .filter(|(p, _)| p.starts_with(prefix))
                .map(|(_, o)| o.clone())
                .collect()
        })
    }

    /// Forget history: watches from an older resourceVersion get `410 Gone`.
    pub fn compact(&self) {
        self.with_store(|s| s.compacted = s.rv);
    }

    /// Requests seen so far whose method and path (without query) match.
    pub fn count(&self, method: &str, path_prefix: &str) -> usize {
        self.requests
            .lock()
            .map(|r| {
                r.iter()
                    .filter(|(m, p, _)| m == method && p.starts_with(path_prefix))
                    .count()
            })
            .unwrap_or(0)
    }

    fn read_request(reader: &mut impl BufRead) -> Result<(Request, String)> {
        let mut line = String::new();
        reader.read_line(&mut line)?;
        let mut parts = line.split_whitespace();
        let method = parts.next().unwrap_or_default().to_string();
        let target = parts.next().unwrap_or_default().to_string();
        let (mut auth, mut content_type, mut len) = (String::new(), String::new(), 0usize);
        loop {
            let mut h = String::new();
            if reader.read_line(&mut h)? == 0 || h == "\r\n" {
                break;
            }
            if let Some((k, v)) = h.split_once(':') {
                let v = v.trim().to_string();
                match k.to_ascii_lowercase().as_str() {
                    "authorization" => auth = v,
                    "content-type" => content_type = v,
                    "content-length" => len = v.parse().unwrap_or(0),
                    _ => {}
                }
            }
        }
        let mut body = vec![0; len];
        reader.read_exact(&mut body)?;
        let (path, q) = target.split_once('?').unwrap_or((&target, ""));
        let query = q
            .split('&')
            .filter_map(|kv| {
                kv.split_once('=')
                    .map(|(k, v)| (k.to_string(), percent_decode(v)))
            })
            .collect();
        Ok((
            Request {
                method,
                path: path.to_string(),
                query,
                content_type,
                body,
            },
            format!("{target}\n{auth}"),
        ))
    }

    fn handle(&self, stream: impl Read + Write) -> Result<()> {
        let mut reader = BufReader::new(stream);
        let (req, seen) = Self::read_request(&mut reader)?;
        let (target, auth) = seen.split_once('\n').unwrap_or_default();
        if let Ok(mut r) = self.requests.lock() {
            r.push((req.method.clone(), target.to_string(), auth.to_string()));
        }
        std::thread::sleep(Duration::from_millis(self.delay_ms.load(Ordering::SeqCst)));
        let stream = reader.get_mut();
        if auth != format!("Bearer {}", self.token) {
            return respond(stream, 401, &status(401, "Unauthorized", "Unauthorized"));
        }
        let forbidden = self
            .forbidden
            .lock()
            .map(|f| f.iter().any(|p| req.path.starts_with(p.as_str())))
            .unwrap_or(false);
        if forbidden {
            // The real API server's wording for an RBAC refusal.
            let message = format!(
                "{} is forbidden: User \"system:serviceaccount:test:test\" cannot {} it",
                req.path,
                req.method.to_lowercase()
            );
            return respond(stream, 403, &status(403, "Forbidden", &message));
        }
        let watching = matches!(
            req.query.get("watch").map(String::as_str),
            Some("true" | "1")
        );
        if req.method == "GET" && watching {
            return self.watch(stream, &req);
        }
        let (code, body) = self.answer(&req);
        respond(stream, code, &body)
    }

    fn answer(&self, req: &Request) -> (u16, Value) {
        // The status subresource patches the object itself here.
        let path = req.path.trim_end_matches("/status").to_string();
        let Some((kind, ns, name)) = parse_path(&path) else {
            return (
                404,
                status(404, "NotFound", &format!("{} is not served here", req.path)),
            );
        };
        self.with_store(|s| match (req.method.as_str(), name) {
            ("GET", Some(n)) => match s.objects.get(&path) {
                Some(o) => (200, o.clone()),
                None => {
                    // As kube-apiserver says it: the Status names what was not found.
                    let mut st = status(404, "NotFound", &format!("{kind} \"{n}\" not found"));
                    st["details"] = json!({"name": n, "kind": kind});
                    (404, st)
                }
            },
            ("GET", None) => {
                let sel = req.query.get("fieldSelector").cloned().unwrap_or_default();
                let items: Vec<Value> = s
                    .objects
                    .iter()
                    .filter(|(p, o)| matches_collection(p, &kind, &ns) && selected(o, &sel))
                    .map(|(_, o)| o.clone())
                    .collect();
                (200, json!({"kind": "List", "apiVersion": "v1",
                             "metadata": {"resourceVersion": s.rv.to_string()}, "items": items}))
            }
            ("POST", None) => {
                let Ok(mut obj) = serde_json::from_slice::<Value>(&req.body) else {
                    return (400, status(400, "BadRequest", "body is not JSON"));
                };
                let name = match field(&obj, "metadata.name") {
                    n if !n.is_empty() => n,
                    _ => format!("{}{}", field(&obj, "metadata.generateName"), s.rv + 1),
                };
                obj["metadata"]["name"] = json!(name);
                let p = format!("{path}/{name}");
                if s.objects.contains_key(&p) {
                    return (409, status(409, "AlreadyExists", &format!("{p} already exists")));
                }
                (201, Self::record(s, "ADDED", &p, obj))
            }
            ("PATCH", Some(_)) => {
                let Some(mut obj) = s.objects.get(&path).cloned() else {
                    return (404, status(404, "NotFound", &format!("{path} not found")));
                };
                let Ok(patch) = serde_json::from_slice::<Value>(&req.body) else {
                    return (400, status(400, "BadRequest", "patch is not JSON"));
                };
                // A resourceVersion in the patch is a precondition, as on a real API server
                // (optimistic concurrency: Lease renewals, read-modify-write).
                if let Some(rv) = patch.pointer("/metadata/resourceVersion").and_then(Value::as_str) {
                    if field(&obj, "metadata.resourceVersion") != rv {
                        return (409, status(409, "Conflict", &format!("Operation cannot be fulfilled on {kind} \"{path}\": the object has been modified; please apply your changes to the latest version and try again")));
                    }
                }
                let strategic = req.content_type.contains("strategic-merge-patch");
                if !strategic && !req.content_type.contains("merge-patch") {
                    return (415, status(415, "UnsupportedMediaType", &req.content_type));
                }
                merge(&mut obj, &patch, strategic);
                (200, Self::record(s, "MODIFIED", &path, obj))
            }
            ("DELETE", Some(_)) => {
                let Some(obj) = s.objects.get(&path).cloned() else {
                    return (404, status(404, "NotFound", &format!("{path} not found")));
                };
                let pre: Value = serde_json::from_slice(&req.body).unwrap_or(Value::Null);
                if let Some(uid) = pre["preconditions"]["uid"].as_str() {
                    if field(&obj, "metadata.uid") != uid {
                        return (409, status(409, "Conflict", &format!("Precondition failed: UID in precondition: {uid}, UID in object meta: {}", field(&obj, "metadata.uid"))));
                    }
                }
                Self::record(s, "DELETED", &path, obj.clone());
                (200, obj)
            }
            _ => (405, status(405, "MethodNotAllowed", &req.method)),
        })
    }

    fn watch(&self, stream: &mut impl Write, req: &Request) -> Result<()> {
        let Some((kind, ns, _)) = parse_path(&req.path) else {
            return respond(stream, 404, &status(404, "NotFound", "no such collection"));
        };
        let sel = req.query.get("fieldSelector").cloned().unwrap_or_default();
        let mut from: u64 = req
            .query
            .get("resourceVersion")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let timeout = req
            .query
            .get("timeoutSeconds")
            .and_then(|v| v.parse().ok())
            .unwrap_or(30u64)
            .min(30);
        write!(stream, "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n")?;
        let deadline = Instant::now() + Duration::from_secs(timeout);
        let (lock, cv) = &*self.store;
        loop {
            let events: Vec<Value> = {
                let mut guard = lock.lock().unwrap_or_else(|p| p.into_inner());
                if from < guard.compacted {
                    let gone = json!({"type": "ERROR", "object": status(410, "Expired", &format!("too old resource version: {from} ({})", guard.compacted))});
                    drop(guard);
                    chunk(stream, &gone)?;
                    break;
                }
                let pending = |s: &Store| s.log.iter().any(|(rv, ..)| *rv > from);
                if !pending(&guard) {
                    let wait = deadline.saturating_duration_since(Instant::now());
                    guard = cv
                        .wait_timeout(guard, wait.min(Duration::from_millis(200)))
                        .map(|g| g.0)
                        .unwrap_or_else(|p| p.into_inner().0);
                }
                let evs = guard
                    .log
                    .iter()
                    .filter(|(rv, _, p, o)| {
                        *rv > from && matches_collection(p, &kind, &ns) && selected(o, &sel)
                    })
                    .map(|(_, t, _, o)| json!({"type": t, "object": o}))
                    .collect();
                from = guard.rv.max(from);
                evs
            };
            for e in events {
                chunk(stream, &e)?;
            }
            if self.down.load(Ordering::SeqCst) || Instant::now() >= deadline {
                break;
            }
        }
        write!(stream, "0\r\n\r\n")?;
        stream.flush()?;
        Ok(())
    }

    /// A kubeconfig (YAML, as kubeadm writes them) for this server with its CA and token.
    pub fn write_kubeconfig(&self, path: &Path, token: &str) -> Result<()> {
        let ca = base64::engine::general_purpose::STANDARD.encode(&self.ca_pem);
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: test\n  cluster:\n    server: {}\n    certificate-authority-data: {ca}\nusers:\n- name: podwire\n  user:\n    token: {token}\ncontexts:\n- name: test\n  context:\n    cluster: test\n    user: podwire\ncurrent-context: test\n",
            self.url
        );
        std::fs::write(path, text).context("writing kubeconfig")
    }
}

fn chunk(stream: &mut impl Write, v: &Value) -> Result<()> {
    let mut data = v.to_string();
    data.push('\n');
    write!(stream, "{:x}\r\n{data}\r\n", data.len())?;
    stream.flush()?;
    Ok(())
}

fn respond(stream: &mut impl Write, code: u16, body: &Value) -> Result<()> {
    let body = body.to_string();
    write!(
        stream,
        "HTTP/1.1 {code} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    stream.flush()?;
    Ok(())
}
