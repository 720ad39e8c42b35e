//! An in-process HTTPS server speaking the Kubernetes API's HTTP/JSON for the requests podwire
//! makes (GET of a namespaced object for now), with its own CA, so the real clients (the
//! plugin's ureq+rustls fallback) are tested against a real TLS peer on 127.0.0.1.

use anyhow::{Context, Result};
use base64::Engine as _;
use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::path::Path;
use std::sync::{Arc, Mutex};

#[derive(Debug, Clone)]
pub struct ApiServer {
    pub url: String,
    pub ca_pem: String,
    pub token: String,
    /// Objects by API path, e.g. `/api/v1/namespaces/default/pods/web`.
    pub objects: Arc<Mutex<BTreeMap<String, Value>>>,
    /// Every request seen: (method, path, authorization header).
    pub requests: Arc<Mutex<Vec<(String, String, String)>>>,
}

fn status(code: u16, reason: &str, message: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "message": message, "reason": reason, "code": code})
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
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(
                vec![cert.der().clone(), ca.der().clone()],
                rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
            )?;
        let config = Arc::new(config);
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let url = format!("https://127.0.0.1:{}", listener.local_addr()?.port());
        let server = ApiServer {
            url,
            ca_pem: ca.pem(),
            token: "podwire-test-token".into(),
            objects: Arc::default(),
            requests: Arc::default(),
        };
        let s = server.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming().flatten() {
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

    pub fn put(&self, path: &str, obj: Value) {
        if let Ok(mut o) = self.objects.lock() {
            o.insert(path.to_string(), obj);
        }
    }

    fn handle(&self, stream: impl Read + Write) -> Result<()> {
        let mut reader = BufReader::new(stream);
        let mut line = String::new();
        reader.read_line(&mut line)?;
        let mut parts = line.split_whitespace();
        let (method, path) = (
            parts.next().unwrap_or_default().to_string(),
            parts.next().unwrap_or_default().to_string(),
        );
        let mut auth = String::new();
        loop {
            let mut h = String::new();
            if reader.read_line(&mut h)? == 0 || h == "\r\n" {
                break;
            }
            if let Some((k, v)) = h.split_once(':') {
                if k.eq_ignore_ascii_case("authorization") {
                    auth = v.trim().to_string();
                }
            }
        }
        if let Ok(mut r) = self.requests.lock() {
            r.push((method.clone(), path.clone(), auth.clone()));
        }
        let (code, body) = if auth != format!("Bearer {}", self.token) {
            (401, status(401, "Unauthorized", "Unauthorized"))
        } else if method != "GET" {
            (405, status(405, "MethodNotAllowed", "only GET is served"))
        } else {
            match self.objects.lock().ok().and_then(|o| o.get(&path).cloned()) {
                Some(obj) => (200, obj),
                None => (404, status(404, "NotFound", &format!("{path} not found"))),
            }
        };
        let body = body.to_string();
        let stream = reader.get_mut();
        write!(
            stream,
            "HTTP/1.1 {code} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )?;
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
