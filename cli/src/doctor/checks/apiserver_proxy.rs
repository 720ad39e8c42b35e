//! "Automatic sidecar injection fails if the Kubernetes API server has proxy settings".

use super::*;
/// Does a Go HTTP client (the API server's) skip the proxy for `host` with this NO_PROXY?
/// golang.org/x/net/http/httpproxy: `*` matches all; `foo.svc` matches it and its
/// subdomains; `.svc` and `*.svc` match subdomains only. IPs and CIDRs cannot match a name.
pub(super) fn bypasses(no_proxy: &str, host: &str) -> bool {
    let host = host.to_ascii_lowercase();
    no_proxy.split(',').any(|entry| {
        let e = entry.trim().to_ascii_lowercase();
        if e == "*" {
            return true;
        }
        // A port in the entry limits it to that port; the webhook is called on 443.
        let e = match e.rsplit_once(':') {
            Some((h, p)) if p.bytes().all(|b| b.is_ascii_digit()) && !h.contains(':') => {
                if p != "443" {
                    return false;
                }
                h.to_string()
            }
            _ => e,
        };
        if e.is_empty() {
            return false;
        }
        let e = e.strip_prefix('*').unwrap_or(&e).to_string();
        if let Some(domain) = e.strip_prefix('.') {
            host.ends_with(&format!(".{domain}"))
        } else {
            host == e || host.ends_with(&format!(".{e}"))
        }
    })
}

pub(super) fn apiserver_proxy(inp: &Inputs) -> Outcome {
    let pods = match &inp.cluster.apiservers {
        Ok(p) => p,
        Err(e) => return unknown(e.clone()),
    };
    if pods.is_empty() {
        return unknown(
            "no pod labelled component=kube-apiserver in kube-system (a managed control plane?): \
             check the API server's HTTP(S)_PROXY / NO_PROXY with your provider",
        );
    }
    let host = webhooks(inp)
        .ok()
        .and_then(|h| h.first().map(webhook_host))
        .unwrap_or_else(|| format!("{INJECTOR}.{SYSTEM_NS}.svc"));
    let mut evidence = Vec::new();
    let mut bad = false;
    for pod in pods {
        let pname = pod.metadata.name.as_deref().unwrap_or("?");
        for c in pod.spec.iter().flat_map(|s| s.containers.iter()) {
            let env: BTreeMap<&str, &str> = c
                .env
                .iter()
                .flatten()
                .filter_map(|e| e.value.as_deref().map(|v| (e.name.as_str(), v)))
                .filter(|(_, v)| !v.is_empty())
                .collect();
            // Go reads the upper-case name first, then the lower-case one.
            let any = |names: [&str; 2]| names.iter().find_map(|n| env.get(n).copied());
            let https = any(["HTTPS_PROXY", "https_proxy"]);
            let http = any(["HTTP_PROXY", "http_proxy"]);
            let no_proxy = any(["NO_PROXY", "no_proxy"]).unwrap_or("");
            let Some(proxy) = https.or(http) else {
                evidence.push(format!("{pname}/{}: no proxy settings", c.name));
                continue;
            };
            if bypasses(no_proxy, &host) {
                evidence.push(format!(
                    "{pname}/{}: proxy {proxy}, but NO_PROXY {no_proxy:?} exempts {host}",
                    c.name
                ));
            } else {
                bad = true;
                evidence.push(format!(
                    "{pname}/{}: proxy {proxy} and NO_PROXY {no_proxy:?} does not exempt {host}: the API server sends the webhook call to the proxy (\"Service Unavailable\" in its log)",
                    c.name
                ));
            }
        }
    }
    if bad {
        fail(
            evidence,
            format!(
                "add .svc (or {host}) to both NO_PROXY and no_proxy of kube-apiserver in /etc/kubernetes/manifests/kube-apiserver.yaml on every control-plane node (the kubelet restarts it), or remove the proxy settings"
            ),
        )
    } else {
        pass(evidence)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_proxy_follows_go() {
        let h = "podwire-injector.podwire-system.svc";
        for (np, want) in [
            (".svc", true),
            ("svc", true),
            ("*.svc", true),
            ("*", true),
            (h, true),
            ("podwire-system.svc", true),
            (".podwire-system.svc", true),
            ("127.0.0.1,localhost,10.0.0.0/8", false),
            ("", false),
            ("other.svc", false),
            (".svc:443", true),
            (".svc:8443", false),
            ("x.podwire-injector.podwire-system.svc", false),
        ] {
            assert_eq!(bypasses(np, h), want, "{np:?}");
        }
    }
}
