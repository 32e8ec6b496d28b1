//! DNS automation: keep each public name pointing at the live, ready proxy instances.
//!
//! - [`plan`]: the pure planner (desired vs actual → changes, ownership, floor).
//! - [`view`]: which instances are ready (heartbeats and an active probe).
//! - [`provider`]: the trait of the Route53, RFC 2136 and embedded providers.
//! - [`Dns`]: one pass — read the provider, plan, apply in bounded batches, isolating a
//!   rejected record so that the rest still lands — and [`run`], the loop that makes a
//!   pass when the view changes and every `interval`, on the leader only.

pub mod embedded;
pub mod plan;
pub mod provider;
pub mod rfc2136;
pub mod route53;
pub mod view;
mod wire;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use prometheus::{Histogram, IntCounterVec, IntGauge, IntGaugeVec, Registry};
use rampart_config::snapshot::{DnsPlan, DnsStatus};
use rampart_config::{DnsPolicy, DnsProvider, DnsSettings};
use tokio::sync::watch;

use self::plan::{Change, Instance, NameSpec, Plan, Policy};
use self::provider::{kind_str, Provider, ProviderError};
use self::view::Seen;

/// Builds the configured provider (starting the embedded server if that is the one).
///
/// # Errors
/// When the provider cannot be set up (a TSIG key file, a socket).
pub async fn build_provider(
    settings: &DnsSettings,
    shutdown: watch::Receiver<bool>,
) -> anyhow::Result<Arc<dyn Provider>> {
    let zone = settings.zone.as_str();
    Ok(match &settings.provider {
        DnsProvider::Embedded { listen } => {
            embedded::Embedded::start(zone, *listen, shutdown).await? as Arc<dyn Provider>
        }
        DnsProvider::Route53 {
            hosted_zone_id,
            region,
            endpoint_url,
            wait_for_insync,
        } => Arc::new(
            route53::Route53::new(
                zone,
                hosted_zone_id.clone(),
                region.clone(),
                endpoint_url.clone(),
                *wait_for_insync,
            )
            .await?,
        ),
        DnsProvider::Rfc2136 {
            server,
            tsig_key_name,
            tsig_algorithm,
            tsig_secret_file,
        } => Arc::new(rfc2136::Rfc2136::new(
            *server,
            zone,
            tsig_key_name,
            *tsig_algorithm,
            tsig_secret_file,
        )?),
    })
}

/// The planner's name specs for `settings`; without set identifiers (plain DNS), every
/// policy publishes one set per name and type.
#[must_use]
pub fn specs(settings: &DnsSettings, set_ids: bool) -> Vec<NameSpec> {
    settings
        .names
        .iter()
        .map(|n| NameSpec {
            name: n.name.as_str().to_string(),
            policy: match (n.policy, set_ids) {
                (_, false) | (DnsPolicy::Simple, _) => Policy::Simple,
                (DnsPolicy::Multivalue, true) => Policy::Multivalue,
                (DnsPolicy::Weighted, true) => Policy::Weighted,
            },
            ttl: u32::try_from(n.ttl.0.as_secs()).unwrap_or(u32::MAX),
            min_records: n.min_records,
        })
        .collect()
}

/// The DNS metrics (registered on the controller's registry).
#[derive(Debug, Clone)]
pub struct DnsMetrics {
    records: IntGaugeVec,
    last_sync: IntGauge,
    changes: IntCounterVec,
    drift: IntGauge,
    floor: IntGaugeVec,
    errors: IntCounterVec,
    convergence: Histogram,
}

impl DnsMetrics {
    /// Creates the DNS metrics on `registry`.
    ///
    /// # Panics
    /// Never: names are constant and unique.
    #[must_use]
    pub fn new(registry: &Registry) -> Self {
        let r = crate::metrics::Registrar(registry);
        let records = r.gauge_vec(
            "rampart_dns_records",
            "Values published per managed name.",
            "name",
        );
        let last_sync = r.gauge(
            "rampart_dns_last_sync_timestamp_seconds",
            "Unix time of the last DNS pass that completed without error.",
        );
        let changes = r.counter_vec(
            "rampart_dns_changes_total",
            "Record-set changes by result.",
            "result",
        );
        let drift = r.gauge(
            "rampart_dns_drift",
            "Managed names whose records differ from the desired ones after the last pass (failed or not owned).",
        );
        let floor = r.gauge_vec(
            "rampart_dns_floor_held",
            "1 while a name keeps its last values because every instance looks dead.",
            "name",
        );
        let errors = r.counter_vec(
            "rampart_dns_sync_errors_total",
            "DNS passes that failed, by kind (transient, fatal).",
            "kind",
        );
        let convergence = r.histogram(
            "rampart_dns_convergence_seconds",
            "From an instance becoming ready or dying to the provider reflecting it.",
            vec![0.5, 1.0, 2.0, 5.0, 10.0, 15.0, 30.0, 60.0, 120.0, 300.0],
        );
        Self {
            records,
            last_sync,
            changes,
            drift,
            floor,
            errors,
            convergence,
        }
    }
}

/// What one pass did.
#[derive(Debug, Default)]
pub struct Outcome {
    /// The plan computed from the provider's records.
    pub plan: Plan,
    /// Changes applied.
    pub applied: usize,
    /// Names whose changes the provider rejected, with its reason.
    pub failed: Vec<(String, String)>,
    /// Each managed name before and after the plan.
    pub names: Vec<rampart_config::snapshot::DnsNameStatus>,
}

/// The managed `names` as `actual` holds them and as `plan` would leave them (drift:
/// they differ).
fn name_status(
    names: &[String],
    actual: &[plan::RecordSet],
    plan: &Plan,
) -> Vec<rampart_config::snapshot::DnsNameStatus> {
    use plan::{Change, Kind};
    let values = |sets: &[&plan::RecordSet], txt: bool| -> Vec<String> {
        let mut v: Vec<String> = sets
            .iter()
            .filter(|r| (r.kind == Kind::Txt) == txt)
            .flat_map(|r| r.values.iter().cloned())
            .collect();
        v.sort();
        v.dedup();
        v
    };
    names
        .iter()
        .map(|name| {
            let before: Vec<&plan::RecordSet> = actual.iter().filter(|r| &r.name == name).collect();
            let mut after: Vec<plan::RecordSet> = before.iter().map(|r| (*r).clone()).collect();
            for change in &plan.changes {
                let (Change::Upsert(r) | Change::Delete(r)) = change;
                if &r.name != name {
                    continue;
                }
                after.retain(|x| (x.kind, &x.set_id) != (r.kind, &r.set_id));
                if let Change::Upsert(r) = change {
                    after.push(r.clone());
                }
            }
            let after: Vec<&plan::RecordSet> = after.iter().collect();
            let (actual, desired) = (values(&before, false), values(&after, false));
            rampart_config::snapshot::DnsNameStatus {
                name: name.clone(),
                owners: values(&before, true),
                drift: actual != desired,
                actual,
                desired,
            }
        })
        .collect()
}

/// The DNS reconciler of one zone.
#[derive(Debug)]
pub struct Dns {
    provider: Arc<dyn Provider>,
    metrics: DnsMetrics,
    status: Mutex<DnsStatus>,
    /// Readiness of each instance as last reflected by the provider.
    converged: Mutex<BTreeMap<String, bool>>,
    /// The latest view of the instances (for plans asked from outside).
    view: Mutex<Vec<Seen>>,
    /// The settings of the latest pass.
    settings: Mutex<Option<DnsSettings>>,
    /// Until then, passes add but never remove values ([`Plan::hold_removals`]).
    warm_until: Mutex<Option<Instant>>,
}

impl Dns {
    /// A reconciler writing to `provider`.
    #[must_use]
    pub fn new(provider: Arc<dyn Provider>, zone: &str, metrics: DnsMetrics) -> Self {
        Self {
            status: Mutex::new(DnsStatus {
                provider: provider.kind().to_string(),
                zone: zone.to_string(),
                ..DnsStatus::default()
            }),
            provider,
            metrics,
            converged: Mutex::new(BTreeMap::new()),
            view: Mutex::new(Vec::new()),
            settings: Mutex::new(None),
            warm_until: Mutex::new(None),
        }
    }

    /// The provider.
    #[must_use]
    pub fn provider(&self) -> &Arc<dyn Provider> {
        &self.provider
    }

    /// For `/status`.
    #[must_use]
    pub fn status(&self) -> DnsStatus {
        lock(&self.status).clone()
    }

    /// The settings in use (once the loop has run).
    #[must_use]
    pub fn settings(&self) -> Option<DnsSettings> {
        lock(&self.settings).clone()
    }

    /// The plan of `settings` against the latest view, in words (`rampart dns plan`).
    ///
    /// # Errors
    /// When the provider's records cannot be read.
    pub async fn preview(&self, settings: &DnsSettings) -> Result<DnsStatus, ProviderError> {
        let view = lock(&self.view).clone();
        let plan = self.plan(settings, &view).await?;
        let mut status = self.status();
        status.instances = view.iter().map(|s| s.detail.clone()).collect();
        status.plan = describe(&plan, &[]);
        Ok(status)
    }

    /// Plans without applying: what a pass would do now.
    ///
    /// # Errors
    /// When the provider's records cannot be read.
    pub async fn plan(&self, settings: &DnsSettings, seen: &[Seen]) -> Result<Plan, ProviderError> {
        let actual = self.provider.records().await?;
        Ok(self.plan_against(settings, seen, &actual))
    }

    fn plan_against(
        &self,
        settings: &DnsSettings,
        seen: &[Seen],
        actual: &[plan::RecordSet],
    ) -> Plan {
        plan::plan(
            &settings.owner_id,
            &specs(settings, self.provider.set_ids()),
            &instances(seen),
            actual,
        )
    }

    /// One pass: read, plan, apply in batches of `settings.batch_size`. A rejected batch
    /// is split by name so that one bad record never blocks the others.
    ///
    /// # Errors
    /// When the provider cannot be read, or fails in a way a retry of the same pass
    /// would not fix (the outcome so far is in the status).
    pub async fn pass(
        &self,
        settings: &DnsSettings,
        seen: &[Seen],
    ) -> Result<Outcome, ProviderError> {
        let result = self.pass_inner(settings, seen).await;
        let mut status = lock(&self.status);
        status.instances = seen.iter().map(|s| s.detail.clone()).collect();
        match &result {
            Ok(outcome) => {
                status.last_sync_unix = Some(crate::fleet::unix_ms() / 1000);
                status.last_error = None;
                status.plan = describe(&outcome.plan, &outcome.failed);
                status.names.clone_from(&outcome.names);
                self.metrics
                    .last_sync
                    .set(i64::try_from(crate::fleet::unix_ms() / 1000).unwrap_or(i64::MAX));
            }
            Err(e) => {
                status.last_error = Some(e.to_string());
                let kind = match e {
                    ProviderError::Fatal(_) => "fatal",
                    _ => "transient",
                };
                self.metrics.errors.with_label_values(&[kind]).inc();
            }
        }
        result
    }

    async fn pass_inner(
        &self,
        settings: &DnsSettings,
        seen: &[Seen],
    ) -> Result<Outcome, ProviderError> {
        let actual = self.provider.records().await?;
        let mut plan = self.plan_against(settings, seen, &actual);
        let warming = lock(&self.warm_until).is_some_and(|t| Instant::now() < t);
        if warming {
            let (kept, held) = plan.hold_removals(&actual);
            if held > 0 {
                tracing::info!("DNS: {held} removals held while the view warms up (every proxy gets one instance_timeout to be heard after a start or a change of leader)");
            }
            plan = kept;
        }
        let mut outcome = Outcome::default();
        let mut fatal = None;
        for batch in plan.batches(settings.batch_size) {
            match self.apply_isolated(&batch, &mut outcome).await {
                Ok(()) => {}
                Err(e) => {
                    fatal = Some(e);
                    break;
                }
            }
        }
        self.metrics
            .changes
            .with_label_values(&["applied"])
            .inc_by(outcome.applied as u64);
        let failed_changes = plan.changes.len() - outcome.applied;
        self.metrics
            .changes
            .with_label_values(&["failed"])
            .inc_by(failed_changes as u64);
        self.metrics.floor.reset();
        for name in &plan.floored {
            self.metrics.floor.with_label_values(&[name]).set(1);
        }
        self.metrics
            .drift
            .set(i64::try_from(outcome.failed.len() + plan.skipped.len()).unwrap_or(i64::MAX));
        let names: Vec<String> = settings.names.iter().map(|n| n.name.to_string()).collect();
        outcome.names = name_status(&names, &actual, &plan);
        outcome.plan = plan;
        if let Some(e) = fatal {
            return Err(e);
        }
        // What the provider holds now, without reading it again: the records read
        // before, with the changes of every name that did not fail.
        let after = records_after(&actual, &outcome);
        self.export_records(settings, &after);
        self.observe_convergence(settings, seen, &outcome);
        Ok(outcome)
    }

    /// Applies `changes` as one batch, or name by name if the provider rejects it.
    ///
    /// # Errors
    /// When the provider fails for another reason than a rejected record.
    pub async fn apply_batch(&self, changes: &[Change]) -> Result<Outcome, ProviderError> {
        let mut outcome = Outcome::default();
        self.apply_isolated(changes, &mut outcome).await?;
        Ok(outcome)
    }

    /// Applies one batch; on rejection, each name's changes alone.
    async fn apply_isolated(
        &self,
        batch: &[Change],
        outcome: &mut Outcome,
    ) -> Result<(), ProviderError> {
        match self.provider.apply(batch).await {
            Ok(()) => {
                outcome.applied += batch.len();
                return Ok(());
            }
            Err(ProviderError::Rejected(e)) if single_name(batch) => {
                outcome.failed.push((name_of(&batch[0]).to_string(), e));
                return Ok(());
            }
            Err(ProviderError::Rejected(e)) => {
                tracing::warn!(
                    "DNS batch of {} changes rejected ({e}); applying name by name",
                    batch.len()
                );
            }
            Err(e) => return Err(e),
        }
        let mut start = 0;
        while start < batch.len() {
            let name = name_of(&batch[start]);
            let end = batch[start..]
                .iter()
                .position(|c| name_of(c) != name)
                .map_or(batch.len(), |n| start + n);
            match self.provider.apply(&batch[start..end]).await {
                Ok(()) => outcome.applied += end - start,
                Err(ProviderError::Rejected(e)) => {
                    tracing::warn!("DNS changes of {name} rejected: {e}");
                    outcome.failed.push((name.to_string(), e));
                }
                Err(e) => return Err(e),
            }
            start = end;
        }
        Ok(())
    }

    /// After a pass, the instances whose readiness the provider now reflects: observe how
    /// long that took.
    fn observe_convergence(&self, settings: &DnsSettings, seen: &[Seen], outcome: &Outcome) {
        // Published per name: values the provider holds now = desired, unless the name
        // failed, was skipped or is held at its floor.
        let blocked = !outcome.failed.is_empty() || !outcome.plan.floored.is_empty();
        let mut converged = lock(&self.converged);
        let mut pending_since: Option<Instant> = None;
        for s in seen {
            let before = converged.get(&s.id).copied().unwrap_or(false);
            if before != s.ready {
                pending_since = Some(pending_since.map_or(s.since, |p| p.min(s.since)));
            }
        }
        for (id, was) in converged.iter() {
            if *was && !seen.iter().any(|s| &s.id == id) {
                // Gone from the registry altogether (revoked): no time to measure from.
                pending_since = pending_since.or(Some(Instant::now()));
            }
        }
        if blocked || settings.names.is_empty() {
            return;
        }
        if let Some(since) = pending_since {
            let secs = since.elapsed().as_secs_f64();
            self.metrics.convergence.observe(secs);
            lock(&self.status).last_convergence_secs = Some(secs);
            tracing::info!("DNS converged {secs:.2}s after the last instance change");
        }
        *converged = seen.iter().map(|s| (s.id.clone(), s.ready)).collect();
    }

    /// Refreshes the per-name record gauges from the provider's answer.
    fn export_records(&self, settings: &DnsSettings, actual: &[plan::RecordSet]) {
        self.metrics.records.reset();
        for n in &settings.names {
            let count: usize = actual
                .iter()
                .filter(|r| r.name == n.name.as_str() && r.kind != plan::Kind::Txt)
                .map(|r| r.values.len())
                .sum();
            self.metrics
                .records
                .with_label_values(&[n.name.as_str()])
                .set(i64::try_from(count).unwrap_or(i64::MAX));
        }
    }
}

/// `actual` with the changes of `outcome`'s plan applied, except those of failed names.
fn records_after(actual: &[plan::RecordSet], outcome: &Outcome) -> Vec<plan::RecordSet> {
    let same = |a: &plan::RecordSet, b: &plan::RecordSet| {
        a.name == b.name && a.kind == b.kind && a.set_id == b.set_id
    };
    let mut after = actual.to_vec();
    for change in &outcome.plan.changes {
        if outcome.failed.iter().any(|(n, _)| n == name_of(change)) {
            continue;
        }
        match change {
            Change::Upsert(r) => {
                after.retain(|x| !same(x, r));
                after.push(r.clone());
            }
            Change::Delete(r) => after.retain(|x| !same(x, r)),
        }
    }
    after
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock()
        .expect("DNS lock is never poisoned: no panics while held")
}

fn name_of(c: &Change) -> &str {
    match c {
        Change::Upsert(r) | Change::Delete(r) => &r.name,
    }
}

fn single_name(batch: &[Change]) -> bool {
    batch.iter().all(|c| name_of(c) == name_of(&batch[0]))
}

fn instances(seen: &[Seen]) -> Vec<Instance> {
    seen.iter()
        .map(|s| Instance {
            id: s.id.clone(),
            addrs: s.addrs.clone(),
            ready: s.ready,
        })
        .collect()
}

/// A plan in words, for `/status` and `rampart dns plan`.
#[must_use]
pub fn describe(plan: &Plan, failed: &[(String, String)]) -> DnsPlan {
    let line = |verb: &str, r: &plan::RecordSet| {
        let set = r
            .set_id
            .as_ref()
            .map(|s| format!(" [set {s}]"))
            .unwrap_or_default();
        let weight = r.weight.map(|w| format!(" weight {w}")).unwrap_or_default();
        let values: Vec<&str> = r.values.iter().map(String::as_str).collect();
        format!(
            "{verb} {} {}{set}{weight} {} (ttl {})",
            r.name,
            kind_str(r.kind),
            values.join(" "),
            r.ttl
        )
    };
    DnsPlan {
        changes: plan
            .changes
            .iter()
            .map(|c| match c {
                Change::Upsert(r) => line("upsert", r),
                Change::Delete(r) => line("delete", r),
            })
            .collect(),
        skipped: plan
            .skipped
            .iter()
            .map(|(n, why)| format!("{n}: {why}"))
            .collect(),
        floored: plan
            .floored
            .iter()
            .map(|n| format!("{n}: every instance looks dead; keeping its last values"))
            .collect(),
        failed: failed.iter().map(|(n, e)| format!("{n}: {e}")).collect(),
    }
}

/// The loop: a pass whenever the view of the instances changes, and every
/// `settings.interval`; only while this controller leads. Settings are re-read from
/// `config` on every pass (names, owner, batch size); the provider is fixed at start.
pub async fn run(
    dns: Arc<Dns>,
    config: watch::Receiver<rampart_config::Config>,
    mut seen: watch::Receiver<Vec<Seen>>,
    mut leader: watch::Receiver<bool>,
    fleet: Arc<crate::fleet::Fleet>,
    mut shutdown: watch::Receiver<bool>,
) {
    let Some(first) = config.borrow().dns.clone() else {
        return;
    };
    // The view starts empty: removals wait until every live proxy had time to send a
    // heartbeat and pass its probes.
    let warmup =
        fleet.registry.stale_after() + first.probe.interval.0 * first.probe.healthy_threshold;
    *lock(&dns.warm_until) = Some(Instant::now() + warmup);
    let mut was_leader = *leader.borrow();
    let mut tick = tokio::time::interval(first.interval.0);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // With a local store nobody campaigns: the leader channel is closed and says true.
    let mut campaigning = true;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            r = seen.changed() => if r.is_err() { return },
            r = leader.changed(), if campaigning => campaigning = r.is_ok(),
            _ = shutdown.wait_for(|s| *s) => return,
        }
        let Some(mut settings) = config.borrow().dns.clone() else {
            continue;
        };
        if settings.provider != first.provider || settings.zone != first.zone {
            tracing::warn!(
                "dns.provider or dns.zone changed: restart the controller to switch; until then the [dns] settings it started with stay in use ({} for {})",
                dns.provider.kind(),
                first.zone
            );
            settings = first.clone();
        }
        let view = seen.borrow_and_update().clone();
        lock(&dns.view).clone_from(&view);
        *lock(&dns.settings) = Some(settings.clone());
        let leading = *leader.borrow();
        if leading && !was_leader {
            *lock(&dns.warm_until) = Some(Instant::now() + warmup);
        }
        // Warm-up ends early once every enrolled proxy has been heard from and each
        // ready one has its first probe verdict.
        let settled = fleet.registry.all_heard()
            && view.iter().all(|s| {
                !settings.probe.enabled || !s.detail.heartbeat_ready || s.detail.probe_ok.is_some()
            });
        if settled {
            *lock(&dns.warm_until) = None;
        }
        was_leader = leading;
        if !leading {
            continue;
        }
        match dns.pass(&settings, &view).await {
            Ok(outcome) => {
                if !outcome.plan.changes.is_empty() || !outcome.failed.is_empty() {
                    tracing::info!(
                        "DNS: {} changes applied, {} names failed",
                        outcome.applied,
                        outcome.failed.len()
                    );
                }
            }
            Err(e) => tracing::warn!("DNS pass failed: {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use plan::{owner_value, Change, Kind, RecordSet};

    fn set(name: &str, kind: Kind, values: &[&str]) -> RecordSet {
        RecordSet {
            name: name.into(),
            kind,
            set_id: None,
            ttl: 60,
            weight: None,
            values: values.iter().map(|v| (*v).to_string()).collect(),
        }
    }

    #[test]
    fn names_show_owner_values_and_drift() {
        let actual = vec![
            set("www.example.com", Kind::Txt, &[&owner_value("me")]),
            set("www.example.com", Kind::A, &["192.0.2.1"]),
            set("api.example.com", Kind::A, &["192.0.2.9"]),
        ];
        let plan = Plan {
            changes: vec![Change::Upsert(set(
                "www.example.com",
                Kind::A,
                &["192.0.2.1", "192.0.2.2"],
            ))],
            ..Plan::default()
        };
        let names = ["www.example.com".to_string(), "api.example.com".to_string()];
        let status = name_status(&names, &actual, &plan);
        assert_eq!(status[0].owners, [owner_value("me")]);
        assert_eq!(status[0].actual, ["192.0.2.1"]);
        assert_eq!(status[0].desired, ["192.0.2.1", "192.0.2.2"]);
        assert!(status[0].drift);
        assert!(status[1].owners.is_empty());
        assert_eq!(status[1].actual, status[1].desired);
        assert!(!status[1].drift);
    }
}
