//! The plugin's own credentials for its fallback GET when the agent is down: the
//! service-account token and CA copied into the run dir (a hostPath the plugin can read from
//! the host) with a kubeconfig naming them, rewritten whenever the projected token rotates.

use crate::install;
use kube::config::{
    AuthInfo, Cluster, Context, Kubeconfig, NamedAuthInfo, NamedCluster, NamedContext,
};
use std::path::{Path, PathBuf};
use std::time::Duration;
use tracing::{info, warn};

/// The kubeconfig the plugin reads: kube-rs' own type, serialized.
pub fn kubeconfig(server: &str, ca: &Path, token: &Path) -> Result<String, serde_yaml_ng::Error> {
    let config = Kubeconfig {
        clusters: vec![NamedCluster {
            name: "local".into(),
            cluster: Some(Cluster {
                server: Some(server.into()),
                certificate_authority: Some(ca.display().to_string()),
                ..Cluster::default()
            }),
            ..NamedCluster::default()
        }],
        auth_infos: vec![NamedAuthInfo {
            name: "podwire-cni".into(),
            auth_info: Some(AuthInfo {
                token_file: Some(token.display().to_string()),
                ..AuthInfo::default()
            }),
            ..NamedAuthInfo::default()
        }],
        contexts: vec![NamedContext {
            name: "podwire".into(),
            context: Some(Context {
                cluster: "local".into(),
                user: Some("podwire-cni".into()),
                ..Context::default()
            }),
            ..NamedContext::default()
        }],
        current_context: Some("podwire".into()),
        api_version: Some("v1".into()),
        kind: Some("Config".into()),
        ..Kubeconfig::default()
    };
    serde_yaml_ng::to_string(&config)
}

/// Copy the token and CA next to a kubeconfig (mode 0600, in the run dir, not in net.d), and
/// again whenever either changes.
pub async fn keep_written(token_file: PathBuf, run_dir: PathBuf, server: String, period: Duration) {
    let ca_src = token_file.with_file_name("ca.crt");
    let (kubeconfig_path, token_copy, ca_copy) = (
        run_dir.join("kubeconfig"),
        run_dir.join("token"),
        run_dir.join("ca.crt"),
    );
    let mut last: Option<(Vec<u8>, Vec<u8>)> = None;
    loop {
        match (std::fs::read(&token_file), std::fs::read(&ca_src)) {
            (Ok(token), Ok(ca)) if last.as_ref() != Some(&(token.clone(), ca.clone())) => {
                let wrote = kubeconfig(&server, &ca_copy, &token_copy)
                    .map_err(|e| e.to_string())
                    .and_then(|text| {
                        install::write_atomic(&ca_copy, &ca, 0o600)
                            .and_then(|()| install::write_atomic(&token_copy, &token, 0o600))
                            .and_then(|()| {
                                install::write_atomic(&kubeconfig_path, text.as_bytes(), 0o600)
                            })
                            .map_err(|e| e.to_string())
                    });
                match wrote {
                    Ok(()) => {
                        info!(
                            "wrote the plugin's kubeconfig {} (token refreshed)",
                            kubeconfig_path.display()
                        );
                        last = Some((token, ca));
                    }
                    Err(e) => warn!(
                        "writing the plugin's kubeconfig {}: {e}",
                        kubeconfig_path.display()
                    ),
                }
            }
            (Ok(_), Ok(_)) => {}
            (Err(e), _) => warn!(
                "reading the service-account token {}: {e}",
                token_file.display()
            ),
            (_, Err(e)) => warn!("reading the cluster CA {}: {e}", ca_src.display()),
        }
        tokio::time::sleep(period).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_kubeconfig_is_one_kube_reads_back() {
        let text = kubeconfig(
            "https://10.0.0.1:443",
            Path::new("/var/run/podwire/ca.crt"),
            Path::new("/var/run/podwire/token"),
        )
        .expect("yaml");
        let back = Kubeconfig::from_yaml(&text).expect("kube reads it");
        assert_eq!(back.current_context.as_deref(), Some("podwire"));
        let cluster = back.clusters[0].cluster.as_ref().expect("cluster");
        assert_eq!(cluster.server.as_deref(), Some("https://10.0.0.1:443"));
        assert_eq!(
            back.auth_infos[0]
                .auth_info
                .as_ref()
                .and_then(|a| a.token_file.as_deref()),
            Some("/var/run/podwire/token")
        );
    }
}
