//! The agent's Prometheus metrics (text format, rendered with `podwire_core::prom`).

use podwire_core::lookup::LookupStatus;
use podwire_core::node::Repair;
use podwire_core::prom::{labelled, single, Histogram};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::time::Duration;

/// Upper bounds of the look-up latency buckets, in seconds.
const BUCKETS: [f64; 8] = [0.0001, 0.00025, 0.0005, 0.001, 0.005, 0.025, 0.1, 1.0];
const RESULTS: [&str; 4] = ["found", "not_found", "not_ready", "error"];
/// `podwire_repairs_total`'s `action` label: the repair mode that was carried out (`off`: only
/// reported), or `failed`.
pub const REPAIR_ACTIONS: [&str; 4] = ["delete", "label", "off", "failed"];

#[derive(Debug)]
pub struct Metrics {
    lookups: [AtomicU64; 4],
    latency: Histogram<8>,
    pub installed: AtomicBool,
    pub synced: AtomicBool,
    pub api_reachable: AtomicBool,
    pub installs: AtomicU64,
    pub reinserts: AtomicU64,
    pub reverted_storms: AtomicU64,
    repairs: [AtomicU64; 4],
    pub cached_pods: AtomicU64,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            lookups: Default::default(),
            latency: Histogram::new(BUCKETS),
            installed: Default::default(),
            synced: Default::default(),
            api_reachable: Default::default(),
            installs: Default::default(),
            reinserts: Default::default(),
            reverted_storms: Default::default(),
            repairs: Default::default(),
            cached_pods: Default::default(),
        }
    }
}

impl Metrics {
    pub fn lookup(&self, status: &LookupStatus, took: Duration) {
        let i = match status {
            LookupStatus::Found { .. } => 0,
            LookupStatus::NotFound => 1,
            LookupStatus::NotReady { .. } => 2,
            LookupStatus::Error { .. } => 3,
        };
        self.lookups[i].fetch_add(1, Relaxed);
        self.latency.observe(took);
    }

    /// One raced pod handled with `mode`; `ok: false` counts it as `failed`.
    pub fn repaired(&self, mode: Repair, ok: bool) {
        let i = match (ok, mode) {
            (false, _) => 3,
            (true, Repair::Delete) => 0,
            (true, Repair::Label) => 1,
            (true, Repair::Off) => 2,
        };
        self.repairs[i].fetch_add(1, Relaxed);
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        let flag = |b: &AtomicBool| u8::from(b.load(Relaxed));
        single(
            &mut out,
            "gauge",
            "podwire_installed",
            "1 when podwire-cni is installed and chained into the primary CNI config",
            flag(&self.installed),
        );
        single(
            &mut out,
            "gauge",
            "podwire_pod_cache_synced",
            "1 once the node's pod watch has completed its first list",
            flag(&self.synced),
        );
        single(
            &mut out,
            "gauge",
            "podwire_api_reachable",
            "1 when the last API server call succeeded",
            flag(&self.api_reachable),
        );
        single(
            &mut out,
            "gauge",
            "podwire_cached_pods",
            "Pods of this node in the agent's cache",
            self.cached_pods.load(Relaxed),
        );
        single(
            &mut out,
            "counter",
            "podwire_installs_total",
            "Times podwire-cni was written into the primary CNI config",
            self.installs.load(Relaxed),
        );
        single(
            &mut out,
            "counter",
            "podwire_reinserts_total",
            "Times the entry had to be put back after the primary CNI rewrote its config",
            self.reinserts.load(Relaxed),
        );
        single(&mut out, "counter", "podwire_reverted_storms_total", "Times another component kept removing podwire's entry (more than 5 re-inserts a minute)", self.reverted_storms.load(Relaxed));
        let load = |v: &[AtomicU64]| v.iter().map(|a| a.load(Relaxed)).collect::<Vec<_>>();
        labelled(
            &mut out,
            "podwire_repairs_total",
            "Mesh pods found running without redirection, by action",
            "action",
            REPAIR_ACTIONS.iter().copied().zip(load(&self.repairs)),
        );
        labelled(
            &mut out,
            "podwire_lookups_total",
            "Plugin look-ups answered, by result",
            "result",
            RESULTS.iter().copied().zip(load(&self.lookups)),
        );
        self.latency.render(
            &mut out,
            "podwire_lookup_duration_seconds",
            "Time to answer a plugin look-up",
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_is_cumulative() {
        let m = Metrics::default();
        m.lookup(&LookupStatus::NotFound, Duration::from_micros(300));
        m.lookup(&LookupStatus::NotFound, Duration::from_millis(50));
        let text = m.render();
        assert!(
            text.contains("podwire_lookups_total{result=\"not_found\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("podwire_lookup_duration_seconds_bucket{le=\"0.0005\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("podwire_lookup_duration_seconds_bucket{le=\"0.1\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("podwire_lookup_duration_seconds_count 2"),
            "{text}"
        );
    }
}
