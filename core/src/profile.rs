//! A mesh profile: every key, name and port podwire uses to recognise a mesh pod and
//! redirect it, in one place. Istio's conventions are the default.

/// Ports the proxy listens on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxyPorts {
    /// Outbound capture (Istio: 15001).
    pub outbound: u16,
    /// Inbound capture (Istio: 15006).
    pub inbound: u16,
    /// Inbound tunnel (HBONE, Istio: 15008), never captured.
    pub tunnel: u16,
    /// Ports the proxy serves itself (status, health, stats): never captured inbound.
    pub inbound_excluded: Vec<u16>,
    /// Ports never captured outbound (the agent status port).
    pub outbound_excluded: Vec<u16>,
}

/// iptables chain names (kept identical to the mesh's own so runbooks keep working).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chains {
    pub inbound: &'static str,
    pub redirect: &'static str,
    pub in_redirect: &'static str,
    pub output: &'static str,
}

impl Chains {
    pub fn all(&self) -> [&'static str; 4] {
        [self.inbound, self.redirect, self.in_redirect, self.output]
    }
}

/// Keys of the annotations that shape the redirection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrafficKeys {
    pub include_inbound_ports: &'static str,
    pub exclude_inbound_ports: &'static str,
    pub include_outbound_ports: &'static str,
    pub exclude_outbound_ports: &'static str,
    pub include_outbound_ip_ranges: &'static str,
    pub exclude_outbound_ip_ranges: &'static str,
    pub exclude_interfaces: &'static str,
}

impl TrafficKeys {
    pub fn all(&self) -> [&'static str; 7] {
        [
            self.include_inbound_ports,
            self.exclude_inbound_ports,
            self.include_outbound_ports,
            self.exclude_outbound_ports,
            self.include_outbound_ip_ranges,
            self.exclude_outbound_ip_ranges,
            self.exclude_interfaces,
        ]
    }
}

/// Per-pod annotations overriding the proxy's resources (values are Kubernetes quantities).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResourceKeys {
    pub cpu_request: &'static str,
    pub memory_request: &'static str,
    pub cpu_limit: &'static str,
    pub memory_limit: &'static str,
}

/// One mesh's conventions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MeshProfile {
    pub name: &'static str,
    /// Namespace label selecting injection (`istio-injection`).
    pub namespace_label: &'static str,
    /// Per-pod label/annotation (`sidecar.istio.io/inject`).
    pub inject_key: &'static str,
    /// Annotation the injector leaves on an injected pod (`sidecar.istio.io/status`).
    pub status_key: &'static str,
    /// Annotation choosing the interception mode (`sidecar.istio.io/interceptionMode`).
    pub interception_mode_key: &'static str,
    /// Name of the proxy container (`istio-proxy`).
    pub proxy_container: &'static str,
    /// The mesh's own redirection init container (`istio-init`): a pod that has one is
    /// redirected by it, and a second set of rules would make it fail.
    pub init_container: &'static str,
    /// The proxy's first argument and the type that is a sidecar (`proxy sidecar`); any other
    /// type (`proxy router`: a gateway) receives its traffic directly and is not redirected.
    pub proxy_command: &'static str,
    pub sidecar_type: &'static str,
    /// Proxy env var that marks a proxyless pod (`DISABLE_ENVOY=true`): nothing would listen
    /// on the capture ports.
    pub proxyless_env: &'static str,
    /// Default uid/gid of the proxy (1337).
    pub proxy_uid: u32,
    pub proxy_gid: u32,
    pub ports: ProxyPorts,
    pub chains: Chains,
    pub traffic: TrafficKeys,
    pub resources: ResourceKeys,
    /// Source address the proxy binds for inbound passthrough (127.0.0.6 / ::6).
    pub inbound_passthrough_v4: &'static str,
    pub inbound_passthrough_v6: &'static str,
}

impl MeshProfile {
    /// Istio's sidecar conventions (the default profile).
    pub fn istio() -> Self {
        MeshProfile {
            name: "istio",
            namespace_label: "istio-injection",
            inject_key: "sidecar.istio.io/inject",
            status_key: "sidecar.istio.io/status",
            interception_mode_key: "sidecar.istio.io/interceptionMode",
            proxy_container: "istio-proxy",
            init_container: "istio-init",
            proxy_command: "proxy",
            sidecar_type: "sidecar",
            proxyless_env: "DISABLE_ENVOY",
            proxy_uid: 1337,
            proxy_gid: 1337,
            ports: ProxyPorts {
                outbound: 15001,
                inbound: 15006,
                tunnel: 15008,
                inbound_excluded: vec![15020, 15021, 15090],
                outbound_excluded: vec![15020],
            },
            chains: Chains {
                inbound: "ISTIO_INBOUND",
                redirect: "ISTIO_REDIRECT",
                in_redirect: "ISTIO_IN_REDIRECT",
                output: "ISTIO_OUTPUT",
            },
            traffic: TrafficKeys {
                include_inbound_ports: "traffic.sidecar.istio.io/includeInboundPorts",
                exclude_inbound_ports: "traffic.sidecar.istio.io/excludeInboundPorts",
                include_outbound_ports: "traffic.sidecar.istio.io/includeOutboundPorts",
                exclude_outbound_ports: "traffic.sidecar.istio.io/excludeOutboundPorts",
                include_outbound_ip_ranges: "traffic.sidecar.istio.io/includeOutboundIPRanges",
                exclude_outbound_ip_ranges: "traffic.sidecar.istio.io/excludeOutboundIPRanges",
                exclude_interfaces: "traffic.sidecar.istio.io/excludeInterfaces",
            },
            resources: ResourceKeys {
                cpu_request: "sidecar.istio.io/proxyCPU",
                memory_request: "sidecar.istio.io/proxyMemory",
                cpu_limit: "sidecar.istio.io/proxyCPULimit",
                memory_limit: "sidecar.istio.io/proxyMemoryLimit",
            },
            inbound_passthrough_v4: "127.0.0.6/32",
            inbound_passthrough_v6: "::6/128",
        }
    }
}

impl Default for MeshProfile {
    fn default() -> Self {
        Self::istio()
    }
}
