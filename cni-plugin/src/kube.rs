//! The fallback pod source: a direct `GET /api/v1/namespaces/NS/pods/NAME` with the configured
//! kubeconfig, when the agent cannot answer. Blocking HTTP (ureq + rustls): no async runtime.

use crate::env::PodRef;
use crate::lookup::Lookup;
use base64::Engine as _;
use podwire_core::lookup::{self, PodMatch};
use podwire_core::PodInfo;
use serde::Deserialize;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

const TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, Default, Deserialize)]
struct Kubeconfig {
    #[serde(default)]
    clusters: Vec<NamedCluster>,
    #[serde(default)]
    users: Vec<NamedUser>,
    #[serde(default)]
    contexts: Vec<NamedContext>,
    #[serde(default, rename = "current-context")]
    current_context: String,
}

#[derive(Debug, Deserialize)]
struct NamedCluster {
    name: String,
    cluster: Cluster,
}

#[derive(Debug, Deserialize)]
struct NamedUser {
    name: String,
    #[serde(default)]
    user: User,
}

#[derive(Debug, Deserialize)]
struct NamedContext {
    name: String,
    context: Context,
}

#[derive(Debug, Deserialize)]
struct Cluster {
    server: String,
    #[serde(default, rename = "certificate-authority")]
    ca_file: Option<PathBuf>,
    #[serde(default, rename = "certificate-authority-data")]
    ca_data: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
struct User {
    #[serde(default)]
    token: Option<String>,
    #[serde(default, rename = "tokenFile")]
    token_file: Option<PathBuf>,
    #[serde(default, rename = "client-certificate")]
    cert_file: Option<PathBuf>,
    #[serde(default, rename = "client-certificate-data")]
    cert_data: Option<String>,
    #[serde(default, rename = "client-key")]
    key_file: Option<PathBuf>,
    #[serde(default, rename = "client-key-data")]
    key_data: Option<String>,
}

#[derive(Debug, Deserialize)]
struct Context {
    cluster: String,
    #[serde(default)]
    user: String,
}

/// PEM bytes from an inline base64 `*-data` field or a file path (relative to the kubeconfig).
fn pem(
    data: &Option<String>,
    file: &Option<PathBuf>,
    base: &Path,
    what: &str,
) -> Result<Option<Vec<u8>>, String> {
    if let Some(d) = data {
        return base64::engine::general_purpose::STANDARD
            .decode(d.trim())
            .map(Some)
            .map_err(|e| format!("{what}-data is not base64: {e}"));
    }
    match file {
        Some(f) => {
            let f = base.join(f);
            std::fs::read(&f)
                .map(Some)
                .map_err(|e| format!("cannot read {what} {}: {e}", f.display()))
        }
        None => Ok(None),
    }
}

fn tls_config(
    ca: Option<Vec<u8>>,
    client: Option<(Vec<u8>, Vec<u8>)>,
) -> Result<rustls::ClientConfig, String> {
    let mut roots = rustls::RootCertStore::empty();
    let ca = ca.ok_or("the cluster has no certificate-authority(-data): podwire will not talk to an unverified API server")?;
    for cert in rustls_pemfile::certs(&mut ca.as_slice()) {
        roots
            .add(cert.map_err(|e| format!("bad CA PEM: {e}"))?)
            .map_err(|e| format!("bad CA certificate: {e}"))?;
    }
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| e.to_string())?
    .with_root_certificates(roots);
    match client {
        None => Ok(builder.with_no_client_auth()),
        Some((cert, key)) => {
            let certs = rustls_pemfile::certs(&mut cert.as_slice())
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| format!("bad client certificate PEM: {e}"))?;
            let key = rustls_pemfile::private_key(&mut key.as_slice())
                .map_err(|e| format!("bad client key PEM: {e}"))?
                .ok_or("no private key in client-key(-data)")?;
            builder
                .with_client_auth_cert(certs, key)
                .map_err(|e| format!("client certificate: {e}"))
        }
    }
}

/// Percent-encoding is unnecessary: names were validated as DNS-ish in `env`.
pub fn get_pod(kubeconfig: &Path, pod: &PodRef) -> Result<Lookup, String> {
    let text = std::fs::read_to_string(kubeconfig)
        .map_err(|e| format!("cannot read kubeconfig {}: {e}", kubeconfig.display()))?;
    let kc: Kubeconfig = serde_yaml_ng::from_str(&text)
        .map_err(|e| format!("kubeconfig {} is not valid: {e}", kubeconfig.display()))?;
    let base = kubeconfig.parent().unwrap_or(Path::new("/"));
    let ctx = kc
        .contexts
        .iter()
        .find(|c| c.name == kc.current_context)
        .or(kc.contexts.first())
        .map(|c| &c.context);
    let cluster = kc
        .clusters
        .iter()
        .find(|c| ctx.is_none_or(|x| x.cluster == c.name))
        .map(|c| &c.cluster)
        .ok_or_else(|| format!("kubeconfig {} names no cluster", kubeconfig.display()))?;
    let default_user = User::default();
    let user = kc
        .users
        .iter()
        .find(|u| ctx.is_none_or(|x| x.user == u.name))
        .map(|u| &u.user)
        .unwrap_or(&default_user);

    let agent = ureq::AgentBuilder::new().timeout(TIMEOUT);
    // Plain HTTP would send the token in clear and trust whatever answers: anyone on the way
    // could say "not a mesh pod".
    if !cluster.server.starts_with("https://") {
        return Err(format!(
            "kubeconfig {}: the cluster's server {:?} is not https://; podwire-cni only asks an \
             API server it can verify",
            kubeconfig.display(),
            cluster.server
        ));
    }
    let ca = pem(
        &cluster.ca_data,
        &cluster.ca_file,
        base,
        "certificate-authority",
    )?;
    let cert = pem(&user.cert_data, &user.cert_file, base, "client-certificate")?;
    let key = pem(&user.key_data, &user.key_file, base, "client-key")?;
    let agent = agent.tls_config(Arc::new(tls_config(ca, cert.zip(key))?));
    let token = match (&user.token, &user.token_file) {
        (Some(t), _) => Some(t.trim().to_string()),
        // Projected tokens rotate: read the file on every call.
        (None, Some(f)) => Some(
            std::fs::read_to_string(base.join(f))
                .map_err(|e| format!("cannot read tokenFile {}: {e}", f.display()))?
                .trim()
                .to_string(),
        ),
        _ => None,
    };
    let url = format!(
        "{}/api/v1/namespaces/{}/pods/{}",
        cluster.server.trim_end_matches('/'),
        pod.namespace,
        pod.name
    );
    let mut req = agent.build().get(&url).set("Accept", "application/json");
    if let Some(t) = token {
        req = req.set("Authorization", &format!("Bearer {t}"));
    }
    match req.call() {
        Ok(resp) => {
            let pod_info = the_pod(resp.into_reader().take_limited(), pod)
                .map_err(|e| format!("GET {url}: {e}"))?;
            // The agent's rule: another UID, or one being deleted when the runtime names
            // none, is another incarnation of the name, so the answer is unknown.
            let req = pod.request();
            match lookup::pod_match(&pod_info, &req) {
                PodMatch::Same => Ok(Lookup::Found(Box::new(pod_info))),
                PodMatch::OtherUid { held } => Err(format!(
                    "GET {url}: {}",
                    lookup::other_uid_reason(&req, &held, "the API server")
                )),
                // the_pod checked the name and namespace.
                PodMatch::Different => Err(format!("GET {url}: the answer is another pod")),
            }
        }
        // Only the API server's own "no such pod" (a Status, reason NotFound) is one: any 404
        // (a proxy's page, a wrong server path) is not.
        Err(ureq::Error::Status(404, resp)) => {
            let body = resp.into_string().unwrap_or_default();
            if is_not_found(&body, pod) {
                Ok(Lookup::NotFound)
            } else {
                Err(format!(
                    "GET {url}: HTTP 404 that is not the API server's NotFound Status for pod \
                     {}: {}",
                    pod.name,
                    body.chars().take(200).collect::<String>()
                ))
            }
        }
        Err(ureq::Error::Status(code, resp)) => Err(format!(
            "GET {url}: HTTP {code}: {}",
            resp.into_string()
                .unwrap_or_default()
                .chars()
                .take(200)
                .collect::<String>()
        )),
        Err(e) => Err(format!("GET {url}: {e}")),
    }
}

/// The pod in a GET's answer: it must be a Pod, the one asked for (name, namespace), with a
/// UID. Any JSON object would otherwise read as a pod without a proxy.
fn the_pod(answer: impl std::io::Read, want: &PodRef) -> Result<PodInfo, String> {
    let v: serde_json::Value =
        serde_json::from_reader(answer).map_err(|e| format!("the answer is not JSON: {e}"))?;
    let kind = v.get("kind").and_then(serde_json::Value::as_str);
    if kind != Some("Pod") {
        return Err(format!("the answer is not a Pod (kind {kind:?})"));
    }
    let pod =
        PodInfo::deserialize(&v).map_err(|e| format!("the answer is not a readable Pod: {e}"))?;
    let m = &pod.metadata;
    if m.name != want.name || m.namespace != want.namespace || m.uid.is_empty() {
        return Err(format!(
            "the answer is pod {:?}/{:?} (uid {:?}), not {}/{}",
            m.namespace, m.name, m.uid, want.namespace, want.name
        ));
    }
    Ok(pod)
}

/// Whether a 404's body is the API server's NotFound Status for this pod (kube-apiserver names
/// it in `details`; a 404 for a path it does not serve names nothing).
fn is_not_found(body: &str, want: &PodRef) -> bool {
    let Ok(v) = serde_json::from_str::<serde_json::Value>(body) else {
        return false;
    };
    let s = |p: &str| v.pointer(p).and_then(serde_json::Value::as_str);
    s("/kind") == Some("Status")
        && s("/reason") == Some("NotFound")
        && s("/details/kind") == Some("pods")
        && s("/details/name") == Some(want.name.as_str())
}

trait TakeLimited: std::io::Read + Sized {
    fn take_limited(self) -> std::io::Take<Self> {
        self.take(podwire_core::lookup::MAX_MESSAGE_BYTES as u64 * 4)
    }
}
impl<R: std::io::Read> TakeLimited for R {}
