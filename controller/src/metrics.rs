//! The controller's Prometheus metrics (served on its admin listener).

use prometheus::{
    Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
};

/// Creates metrics and registers them on one registry. Names and help texts are
/// constants, so a failure here is a bug: it panics.
#[derive(Clone, Copy)]
pub(crate) struct Registrar<'a>(pub &'a Registry);

impl Registrar<'_> {
    fn add<C: prometheus::core::Collector + Clone + 'static>(self, c: C) -> C {
        self.0.register(Box::new(c.clone())).expect("unique metric");
        c
    }

    /// A gauge.
    pub(crate) fn gauge(self, name: &str, help: &str) -> IntGauge {
        self.add(IntGauge::new(name, help).expect("valid metric"))
    }

    /// A gauge with one label.
    pub(crate) fn gauge_vec(self, name: &str, help: &str, label: &str) -> IntGaugeVec {
        self.add(IntGaugeVec::new(Opts::new(name, help), &[label]).expect("valid metric"))
    }

    /// A counter.
    pub(crate) fn counter(self, name: &str, help: &str) -> IntCounter {
        self.add(IntCounter::new(name, help).expect("valid metric"))
    }

    /// A counter with one label.
    pub(crate) fn counter_vec(self, name: &str, help: &str, label: &str) -> IntCounterVec {
        self.add(IntCounterVec::new(Opts::new(name, help), &[label]).expect("valid metric"))
    }

    /// A histogram with `buckets`.
    pub(crate) fn histogram(self, name: &str, help: &str, buckets: Vec<f64>) -> Histogram {
        self.add(
            Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets))
                .expect("valid metric"),
        )
    }
}

/// Every metric of the controller.
#[derive(Debug, Clone)]
pub struct Metrics {
    /// The registry to render.
    pub registry: Registry,
    /// Version of the snapshot being served to proxies.
    pub snapshot_version: IntGauge,
    /// Size of the current snapshot in bytes (JSON).
    pub snapshot_bytes: IntGauge,
    /// Time to compile and encode a snapshot.
    pub snapshot_build: Histogram,
    /// Snapshot version each instance reports serving.
    pub instance_version: IntGaugeVec,
    /// Versions an instance is behind the current snapshot.
    pub instance_lag: IntGaugeVec,
    /// Instances by state (ready, not_ready, stale, revoked).
    pub instances: IntGaugeVec,
    /// Watch requests currently waiting.
    pub watches_open: IntGauge,
    /// Enrolment attempts by result.
    pub enrolments: IntCounterVec,
    /// Instances forgotten after `controller.forget_after` without a heartbeat.
    pub instances_forgotten: prometheus::IntCounter,
    /// Acks by result (ok, error).
    pub acks: IntCounterVec,
    /// Problems in each discovery provider's last read.
    pub discovery_errors: IntGaugeVec,
    /// Endpoints each discovery provider contributes.
    pub discovery_endpoints: IntGaugeVec,
    /// Configuration reloads that failed (the last good configuration stays in use).
    pub config_reload_failures: prometheus::IntCounter,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Creates and registers every metric.
    ///
    /// # Panics
    /// Never: names are constant and unique.
    #[must_use]
    pub fn new() -> Self {
        let registry = Registry::new();
        let r = Registrar(&registry);
        let build = rampart_config::build::get();
        let mut opts = prometheus::Opts::new(
            "rampart_build_info",
            "Version, git commit, compiler, target and profile of the running binary (always 1)",
        );
        for (k, v) in build.labels() {
            opts = opts.const_label(k, v);
        }
        let info = prometheus::IntGauge::with_opts(opts).expect("a valid constant metric");
        info.set(1);
        registry
            .register(Box::new(info))
            .expect("rampart_build_info is registered once per registry");
        let snapshot_build = r.histogram(
            "rampart_controller_snapshot_build_seconds",
            "Time to compile and encode a snapshot.",
            vec![0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5],
        );
        let config_reload_failures = r.counter(
            "rampart_config_reload_failures_total",
            "Configuration reloads that failed; the last good configuration keeps serving.",
        );
        Self {
            snapshot_version: r.gauge(
                "rampart_controller_snapshot_version",
                "Version of the snapshot served to proxies.",
            ),
            snapshot_bytes: r.gauge(
                "rampart_controller_snapshot_bytes",
                "Encoded size of the current snapshot.",
            ),
            snapshot_build,
            instance_version: r.gauge_vec(
                "rampart_controller_instance_version",
                "Snapshot version each proxy instance serves (label proxy: its instance id; not `instance`, which Prometheus gives every target).",
                "proxy",
            ),
            instance_lag: r.gauge_vec(
                "rampart_controller_instance_lag_versions",
                "How many versions each proxy instance is behind (label proxy: its instance id).",
                "proxy",
            ),
            instances: r.gauge_vec(
                "rampart_controller_instances",
                "Proxy instances by state.",
                "state",
            ),
            watches_open: r.gauge(
                "rampart_controller_watches_open",
                "Watch requests waiting for the next snapshot.",
            ),
            enrolments: r.counter_vec(
                "rampart_controller_enrolments_total",
                "Enrolment attempts by result.",
                "result",
            ),
            instances_forgotten: r.counter(
                "rampart_controller_instances_forgotten_total",
                "Proxy instances forgotten after controller.forget_after without a heartbeat.",
            ),
            acks: r.counter_vec(
                "rampart_controller_acks_total",
                "Snapshot acks from proxies by result.",
                "result",
            ),
            discovery_errors: r.gauge_vec(
                "rampart_discovery_errors",
                "Problems in the last read of each discovery provider.",
                "provider",
            ),
            discovery_endpoints: r.gauge_vec(
                "rampart_discovery_endpoints",
                "Endpoints each discovery provider contributes.",
                "provider",
            ),
            config_reload_failures,
            registry,
        }
    }

    /// The Prometheus text exposition of every metric.
    #[must_use]
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Encoding into a String only fails on invalid metric data, which we never build.
        let _ = prometheus::TextEncoder::new().encode_utf8(&self.registry.gather(), &mut out);
        out
    }
}
