//! The watcher's metrics (names in [`crate::metrics::names`]), registered in Kalmar's registry.

use prometheus::{IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry};

use crate::metrics::{labels, names};

/// Watched kinds, the `kind` label values.
pub const KINDS: [&str; 3] = ["pod", "namespace", "node"];

/// Direct-lookup results, the `result` label values.
pub const DIRECT_RESULTS: [&str; 5] = ["found", "not-found", "cached", "rate-limited", "error"];

#[derive(Clone)]
pub struct KubeMetrics {
    objects: IntGaugeVec,
    restarts: IntCounterVec,
    conflicts: IntCounter,
    conflicting_ips: IntGauge,
    sync_age: IntGauge,
    direct: IntCounterVec,
}

// === impl KubeMetrics ===

impl KubeMetrics {
    pub fn register(registry: &Registry) -> Self {
        let objects = IntGaugeVec::new(
            Opts::new(
                names::KUBERNETES_OBJECTS,
                "Objects in the live index, by kind.",
            ),
            &[labels::KIND],
        )
        .expect("static metric definition");
        let restarts = IntCounterVec::new(
            Opts::new(
                names::KUBERNETES_WATCH_RESTARTS,
                "Watch or list failures that restarted a watcher, by kind.",
            ),
            &[labels::KIND],
        )
        .expect("static metric definition");
        let conflicts = IntCounter::new(
            names::KUBERNETES_IP_CONFLICTS,
            "Times an address became claimed by two live pods (attributed to nobody).",
        )
        .expect("static metric definition");
        let conflicting_ips = IntGauge::new(
            names::KUBERNETES_CONFLICTING_IPS,
            "Addresses claimed by two or more live pods now.",
        )
        .expect("static metric definition");
        let sync_age = IntGauge::new(
            names::KUBERNETES_SYNC_AGE,
            "Seconds since every watch was last known in sync with the API (0 while healthy).",
        )
        .expect("static metric definition");
        let direct = IntCounterVec::new(
            Opts::new(
                names::KUBERNETES_DIRECT_LOOKUPS,
                "Direct pod lookups for unindexed clients inside pod_cidrs, by result.",
            ),
            &[labels::RESULT],
        )
        .expect("static metric definition");
        for c in [
            Box::new(objects.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(restarts.clone()),
            Box::new(conflicts.clone()),
            Box::new(conflicting_ips.clone()),
            Box::new(sync_age.clone()),
            Box::new(direct.clone()),
        ] {
            if let Err(error) = registry.register(c) {
                tracing::error!(%error, "registering a kubernetes metric failed");
            }
        }
        for kind in KINDS {
            objects.with_label_values(&[kind]).set(0);
            restarts.with_label_values(&[kind]).inc_by(0);
        }
        for result in DIRECT_RESULTS {
            direct.with_label_values(&[result]).inc_by(0);
        }
        Self {
            objects,
            restarts,
            conflicts,
            conflicting_ips,
            sync_age,
            direct,
        }
    }

    pub fn counts(&self, c: &super::Counts) {
        let set = |kind: &str, n: usize| {
            self.objects
                .with_label_values(&[kind])
                .set(i64::try_from(n).unwrap_or(i64::MAX))
        };
        set("pod", c.pods);
        set("namespace", c.namespaces);
        set("node", c.nodes);
        self.conflicting_ips
            .set(i64::try_from(c.conflicting_ips).unwrap_or(i64::MAX));
    }

    pub fn conflicts(&self, new: u64) {
        self.conflicts.inc_by(new);
    }

    pub fn restart(&self, kind: &'static str) {
        self.restarts.with_label_values(&[kind]).inc();
    }

    pub fn sync_age(&self, seconds: u64) {
        self.sync_age
            .set(i64::try_from(seconds).unwrap_or(i64::MAX));
    }

    pub fn direct(&self, result: &'static str) {
        self.direct.with_label_values(&[result]).inc();
    }

    /// Back to zero objects when the watchers stop.
    pub fn reset(&self) {
        self.counts(&super::Counts::default());
        self.sync_age(0);
    }
}

impl std::fmt::Debug for KubeMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("KubeMetrics")
    }
}
