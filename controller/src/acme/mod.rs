//! ACME certificates for the whole fleet: the controller is the single orderer.
//!
//! - [`plan`]: the pure planner (keep, order now, or wait: back-off, Retry-After, the
//!   CA's rate limits).
//! - [`Acme`]: the account (created once, kept in the store), orders over instant-acme
//!   with HTTP-01 answered by every proxy (the key authorisations travel in the
//!   snapshot), certificates and keys written to the store *before* they are pushed, and
//!   [`run`], the loop that decides every certificate on the leader only.

pub mod plan;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use instant_acme::{
    Account, AuthorizationStatus, ChallengeType, Identifier, NewAccount, NewOrder, OrderStatus,
    RetryPolicy,
};
use rampart_config::snapshot::CertificateBundle;
use rampart_config::{AcmeChallenge, AcmeSource, Config, HostPattern, TlsSource};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use self::plan::{Decision, Event, Failures, Held, RateModel};
use crate::dns::plan::{Change, Kind, RecordSet};
use crate::dns::provider::quote_txt;
use crate::fleet::Fleet;
use crate::on_demand::OnDemand;
use crate::store::Store;

/// How often every certificate is looked at (also after each configuration change);
/// the planner decides, so looking often costs nothing at the CA.
const TICK: Duration = Duration::from_secs(5);
/// Where the rate-limit history is kept, so that a restart or a failover remembers it.
const EVENTS_KEY: &str = "acme/events";
/// Orders retried at once after a `badNonce`, before one counts as failed.
const NONCE_RETRIES: u32 = 6;
/// How long to wait for every ready proxy to serve a new challenge before telling the CA.
const FLEET_WAIT: Duration = Duration::from_secs(30);

/// What the ACME side gives the snapshot compiler.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Output {
    /// Certificates obtained, by their sorted host list.
    pub certificates: BTreeMap<Vec<String>, CertificateBundle>,
    /// HTTP-01 answers of pending orders: token → key authorisation.
    pub challenges: BTreeMap<String, String>,
    /// TLS-ALPN-01 answers of pending orders: name → SHA-256 of the key authorisation
    /// (base64url).
    pub tls_alpn: BTreeMap<String, String>,
    /// Names approved on demand whose certificates (in `certificates`, keyed by the
    /// one name) are served.
    pub on_demand: BTreeSet<String>,
}

/// A certificate as kept in the store (`acme/certs/<id>`).
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Stored {
    names: Vec<String>,
    chain_pem: String,
    key_pem: String,
    not_before: u64,
    not_after: u64,
}

/// Per certificate, what the loop remembers between passes (`acme/state/<id>`).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct State {
    failures: u32,
    last_failure_at: u64,
    retry_after: Option<u64>,
    last_error: Option<String>,
    /// The CA's suggested renewal window (ARI) for the held certificate.
    #[serde(default)]
    ari: Option<(u64, u64)>,
    /// When to ask for renewal information again (the CA's Retry-After).
    #[serde(default)]
    ari_next: u64,
}

/// Asking again for renewal information: at least this long after a failure, at most
/// this long even when the CA says later.
const ARI_RETRY: Duration = Duration::from_secs(3600);
const ARI_MAX: Duration = Duration::from_secs(24 * 3600);

/// The ACME metrics (on the controller's registry).
#[derive(Clone, Debug)]
struct AcmeMetrics {
    not_after: prometheus::IntGaugeVec,
    renew_at: prometheus::IntGaugeVec,
    orders: prometheus::IntCounterVec,
    failures: prometheus::IntGaugeVec,
    next_try: prometheus::IntGaugeVec,
    rate_limited: prometheus::IntGaugeVec,
    headroom: prometheus::IntGaugeVec,
}

impl AcmeMetrics {
    fn new(registry: &prometheus::Registry) -> Self {
        let r = crate::metrics::Registrar(registry);
        let gauge = |name: &str, help: &str| r.gauge_vec(name, help, "name");
        let orders = r.counter_vec(
            "rampart_acme_orders_total",
            "ACME orders by result.",
            "result",
        );
        Self {
            not_after: gauge(
                "rampart_certificate_not_after_seconds",
                "Unix time at which the certificate of each ACME name expires.",
            ),
            renew_at: gauge(
                "rampart_acme_renewal_due_seconds",
                "Unix time at which renewal of each ACME name becomes due.",
            ),
            orders,
            failures: gauge(
                "rampart_acme_consecutive_failures",
                "Consecutive failed orders per name (0 once one succeeds).",
            ),
            next_try: gauge(
                "rampart_acme_next_attempt_seconds",
                "Unix time before which no order is sent for a name (back-off, Retry-After, rate limit); 0 when none is waiting.",
            ),
            rate_limited: gauge(
                "rampart_acme_rate_limited",
                "1 while an order for a name is held back by the model of the CA's rate limits.",
            ),
            headroom: gauge(
                "rampart_acme_rate_limit_headroom",
                "Orders for a name that the tightest of the CA's rate limits still allows now.",
            ),
        }
    }
}

/// The ACME orderer of a controller.
pub struct Acme {
    store: Arc<dyn Store>,
    fleet: Arc<Fleet>,
    out: watch::Sender<Output>,
    accounts: tokio::sync::Mutex<BTreeMap<String, Account>>,
    model: Mutex<RateModel>,
    metrics: AcmeMetrics,
    /// The DNS automation, whose provider takes the DNS-01 TXT records.
    dns: Option<Arc<crate::dns::Dns>>,
    /// What the dashboard shows of each certificate.
    reports: Reports,
    /// Names approved on demand (`[tls_on_demand]`).
    on_demand: Option<Arc<OnDemand>>,
}

impl std::fmt::Debug for Acme {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Acme").finish_non_exhaustive()
    }
}

/// The ACME side of one certificate, for the dashboard: what it holds, when it renews,
/// how the last order went and any back-off.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct AcmeReport {
    /// Not-after of the certificate held (Unix seconds).
    pub not_after: Option<u64>,
    /// When it is due for renewal (Unix seconds).
    pub renew_at: Option<u64>,
    /// "ok" or "error" for the last order this controller placed, if any.
    pub last_result: Option<String>,
    /// Failed orders in a row.
    pub failures: u32,
    /// The last failure.
    pub last_error: Option<String>,
    /// Backing off (failures or the CA's rate limits) until then (Unix seconds).
    pub waiting_until: Option<u64>,
    /// The wait is the CA's rate limit.
    pub rate_limited: bool,
}

/// Reports by certificate (its sorted names joined by commas), shared with the admin
/// listener.
pub type Reports = Arc<Mutex<BTreeMap<String, AcmeReport>>>;

/// The store id of the certificate for `names`.
fn cert_id(names: &[String]) -> String {
    rampart_pki::sha256_hex(names.join(",").as_bytes())[..16].to_string()
}

fn as_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn now_unix() -> u64 {
    crate::fleet::unix_ms() / 1000
}

/// A stable number in [0, 1) from `names`, to spread renewals and retries.
fn spread(names: &[String], salt: &str) -> f64 {
    let h = rampart_pki::sha256_hex(format!("{salt}:{}", names.join(",")).as_bytes());
    f64::from(u32::from_str_radix(&h[..8], 16).unwrap_or(0)) / f64::from(u32::MAX)
}

impl Acme {
    /// An orderer writing to `store`, waiting on `fleet`'s proxies for HTTP-01, writing
    /// DNS-01 records through `dns` and its reports to `reports`; and the receiver the
    /// compiler reads.
    #[must_use]
    pub fn new(
        store: Arc<dyn Store>,
        fleet: Arc<Fleet>,
        dns: Option<Arc<crate::dns::Dns>>,
        reports: Reports,
        on_demand: Option<Arc<OnDemand>>,
    ) -> (Arc<Self>, watch::Receiver<Output>) {
        let (out, rx) = watch::channel(Output::default());
        let metrics = AcmeMetrics::new(&fleet.metrics.registry);
        (
            Arc::new(Self {
                store,
                fleet,
                out,
                accounts: tokio::sync::Mutex::new(BTreeMap::new()),
                model: Mutex::new(RateModel::default()),
                metrics,
                dns,
                reports,
                on_demand,
            }),
            rx,
        )
    }

    /// Loads the certificates already in the store, so that a restart serves them at
    /// once and never orders them again.
    ///
    /// # Errors
    /// When the store cannot be listed.
    pub async fn load(&self) -> anyhow::Result<usize> {
        let mut certs = BTreeMap::new();
        for (key, value) in self.store.list("acme/certs").await? {
            match serde_json::from_slice::<Stored>(&value) {
                Ok(s) => {
                    certs.insert(s.names.clone(), bundle(&s)?);
                }
                Err(e) => tracing::error!("{key}: unreadable stored certificate: {e}"),
            }
        }
        let n = certs.len();
        self.out.send_modify(|o| o.certificates = certs);
        if let Some(bytes) = self.store.get(EVENTS_KEY).await? {
            match serde_json::from_slice::<Vec<Event>>(&bytes) {
                Ok(events) => self.model.lock().expect("model lock").events = events,
                Err(e) => tracing::error!("{EVENTS_KEY}: unreadable rate-limit history: {e}"),
            }
        }
        Ok(n)
    }

    async fn account(&self, source: &AcmeSource) -> anyhow::Result<Account> {
        let key = format!(
            "acme/accounts/{}",
            &rampart_pki::sha256_hex(format!("{}|{}", source.directory, source.email).as_bytes())
                [..16]
        );
        let mut accounts = self.accounts.lock().await;
        if let Some(a) = accounts.get(&key) {
            return Ok(a.clone());
        }
        let builder = match &source.directory_ca {
            Some(ca) => Account::builder_with_root(ca)
                .with_context(|| format!("trusting {} for the ACME directory", ca.display()))?,
            None => Account::builder()?,
        };
        let account = match self.store.get(&key).await? {
            Some(bytes) => {
                let credentials: instant_acme::AccountCredentials =
                    serde_json::from_slice(&bytes).context("stored ACME account credentials")?;
                builder.from_credentials(credentials).await?
            }
            None => {
                let contact = format!("mailto:{}", source.email);
                let eab = source.eab.as_ref().map(external_account_key).transpose()?;
                let (account, credentials) = builder
                    .create(
                        &NewAccount {
                            contact: &[&contact],
                            terms_of_service_agreed: true,
                            only_return_existing: false,
                        },
                        source.directory.clone(),
                        eab.as_ref(),
                    )
                    .await
                    .with_context(|| format!("creating an ACME account at {}", source.directory))?;
                self.store
                    .put(&key, &serde_json::to_vec(&credentials)?)
                    .await
                    .context("storing the ACME account")?;
                tracing::info!(
                    "ACME account created at {} for {}",
                    source.directory,
                    source.email
                );
                account
            }
        };
        accounts.insert(key, account.clone());
        Ok(account)
    }

    /// Orders a certificate for `names` now, stores it, and hands it to the compiler.
    ///
    /// # Errors
    /// What the CA or the validation said.
    pub async fn order(&self, names: &[String], source: &AcmeSource) -> anyhow::Result<()> {
        if source.challenge == AcmeChallenge::Dns01 && self.dns.is_none() {
            anyhow::bail!(
                "dns-01 for {} needs DNS automation: add a [dns] section whose zone holds these names",
                names.join(", ")
            );
        }
        let account = self.account(source).await?;
        let ids: Vec<Identifier> = names.iter().map(|n| Identifier::Dns(n.clone())).collect();
        self.model
            .lock()
            .expect("model lock")
            .events
            .push(Event::Order { at: now_unix() });
        let mut order = match self.held_identifier(names) {
            // A renewal names the certificate it replaces (ARI, RFC 9773 §5), which CAs
            // may reward with rate-limit exemptions; a CA without ARI, or one that
            // refuses the replacement (already replaced), gets a plain order.
            Some(id) => match account
                .new_order(&NewOrder::new(&ids).replaces(id.clone()))
                .await
            {
                Ok(order) => {
                    tracing::info!("ACME {}: ordering a replacement of {id}", names.join(","));
                    order
                }
                Err(e) => {
                    match &e {
                        instant_acme::Error::Unsupported(_) => {}
                        e => tracing::info!(
                            "ACME {}: the order replacing {id} was refused ({e}); ordering without `replaces`",
                            names.join(",")
                        ),
                    }
                    account
                        .new_order(&NewOrder::new(&ids))
                        .await
                        .context("creating the order")?
                }
            },
            None => account
                .new_order(&NewOrder::new(&ids))
                .await
                .context("creating the order")?,
        };
        let mut published = Vec::new();
        let mut txt = Vec::new();
        let result = self
            .validate(&mut order, source.challenge, &mut published, &mut txt)
            .await;
        let result = match result {
            Ok(()) => order
                .poll_ready(&RetryPolicy::default())
                .await
                .context("waiting for the order to be ready"),
            Err(e) => Err(e),
        };
        // The answers are not needed any more, whatever happened.
        self.out.send_modify(|o| {
            for answer in &published {
                match answer {
                    Published::Http01(token) => o.challenges.remove(token),
                    Published::TlsAlpn01(name) => o.tls_alpn.remove(name),
                };
            }
        });
        self.remove_txt(txt).await;
        let status = result?;
        if status != OrderStatus::Ready {
            let problems = self.problems(&mut order).await;
            for n in names {
                self.model
                    .lock()
                    .expect("model lock")
                    .events
                    .push(Event::FailedValidation {
                        at: now_unix(),
                        name: n.clone(),
                    });
            }
            anyhow::bail!("the order is {status:?}: {problems}");
        }
        let (key_pem, csr) = rampart_pki::server_request(names)?;
        order
            .finalize_csr(&csr)
            .await
            .context("finalizing the order")?;
        let chain_pem = order
            .poll_certificate(&RetryPolicy::default())
            .await
            .context("downloading the certificate")?;
        let (not_before, not_after) = rampart_pki::validity_pem(&chain_pem)?;
        let stored = Stored {
            names: names.to_vec(),
            chain_pem,
            key_pem,
            not_before,
            not_after,
        };
        // Written before it is pushed: a restart never orders it again. Not fenced
        // (`put_leading`): a certificate the CA issued is kept even if this controller
        // lost the lead meanwhile, as losing it would cost a rate-limit slot.
        self.store
            .put(
                &format!("acme/certs/{}", cert_id(names)),
                &serde_json::to_vec(&stored)?,
            )
            .await
            .context("storing the certificate")?;
        self.model
            .lock()
            .expect("model lock")
            .events
            .push(Event::Issued {
                at: now_unix(),
                names: names.iter().cloned().collect(),
            });
        let b = bundle(&stored)?;
        self.out.send_modify(|o| {
            o.certificates.insert(names.to_vec(), b);
        });
        tracing::info!(
            "ACME certificate for {} valid until {not_after}",
            names.join(", ")
        );
        Ok(())
    }

    /// Orders at `source.directory`, then at each fallback CA in turn while they fail.
    async fn order_with_fallbacks(
        &self,
        names: &[String],
        source: &AcmeSource,
    ) -> anyhow::Result<()> {
        let first = match self.order_retrying_nonces(names, source).await {
            Ok(()) => return Ok(()),
            Err(e) => e,
        };
        let mut errors = vec![format!("{}: {first:#}", source.directory)];
        for f in &source.fallback {
            tracing::warn!(
                "ACME {}: {} failed ({first:#}); trying {}",
                names.join(", "),
                source.directory,
                f.directory
            );
            let other = AcmeSource {
                directory: f.directory.clone(),
                directory_ca: f.directory_ca.clone(),
                eab: f.eab.clone(),
                fallback: Vec::new(),
                ..source.clone()
            };
            match self.order_retrying_nonces(names, &other).await {
                Ok(()) => {
                    tracing::info!(
                        "ACME {}: issued by the fallback CA {}",
                        names.join(", "),
                        f.directory
                    );
                    return Ok(());
                }
                Err(e) => errors.push(format!("{}: {e:#}", f.directory)),
            }
        }
        Err(anyhow::anyhow!("{}", errors.join("; ")))
    }

    /// [`Acme::order`], again at once when the CA rejected a nonce (`badNonce`: a
    /// transient protocol hiccup that instant-acme already retries per request; a whole
    /// order is retried up to [`NONCE_RETRIES`] times before it counts as a failure).
    async fn order_retrying_nonces(
        &self,
        names: &[String],
        source: &AcmeSource,
    ) -> anyhow::Result<()> {
        let mut attempt = 1;
        loop {
            match self.order(names, source).await {
                Err(e) if attempt < NONCE_RETRIES && format!("{e:#}").contains("badNonce") => {
                    tracing::info!(
                        "ACME {}: the CA rejected a nonce; ordering again",
                        names.join(", ")
                    );
                    attempt += 1;
                }
                other => return other,
            }
        }
    }

    /// Publishes each pending authorisation's answer — HTTP-01 or TLS-ALPN-01 in the
    /// snapshot for every proxy, or DNS-01 as TXT records through the DNS provider —
    /// waits until it is served, and tells the CA to validate. `published` and `txt`
    /// collect what to remove.
    async fn validate(
        &self,
        order: &mut instant_acme::Order,
        kind: AcmeChallenge,
        published: &mut Vec<Published>,
        txt: &mut Vec<RecordSet>,
    ) -> anyhow::Result<()> {
        let ctype = challenge_type(kind);
        let mut records: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        // The snapshot version before the answers: the one that serves them comes after.
        let published_before = self.fleet.published.borrow().version;
        {
            let mut authorizations = order.authorizations();
            while let Some(authz) = authorizations.next().await {
                let mut authz = authz.context("reading an authorization")?;
                match authz.status {
                    AuthorizationStatus::Valid => continue,
                    AuthorizationStatus::Pending => {}
                    other => {
                        anyhow::bail!("authorization for {:?} is {other:?}", authz.identifier())
                    }
                }
                let challenge = authz
                    .challenge(ctype.clone())
                    .with_context(|| format!("the CA offers no {ctype:?} challenge"))?;
                let key_auth = challenge.key_authorization();
                match kind {
                    AcmeChallenge::Http01 => {
                        let token = challenge.token.clone();
                        let value = key_auth.as_str().to_string();
                        self.out.send_modify(|o| {
                            o.challenges.insert(token.clone(), value);
                        });
                        published.push(Published::Http01(token));
                    }
                    AcmeChallenge::Dns01 => {
                        let Identifier::Dns(base) = challenge.identifier().identifier else {
                            anyhow::bail!("dns-01 only validates DNS names");
                        };
                        records
                            .entry(format!("_acme-challenge.{base}"))
                            .or_default()
                            .insert(quote_txt(&[key_auth.dns_value()]));
                    }
                    AcmeChallenge::TlsAlpn01 => {
                        let Identifier::Dns(name) = challenge.identifier().identifier else {
                            anyhow::bail!("tls-alpn-01 validates DNS names only here");
                        };
                        let name = name.clone();
                        // The certificate carries SHA-256(key authorization): the same
                        // digest as DNS-01's TXT value, base64url.
                        let digest = key_auth.dns_value();
                        self.out.send_modify(|o| {
                            o.tls_alpn.insert(name.clone(), digest);
                        });
                        published.push(Published::TlsAlpn01(name));
                    }
                }
            }
        }
        match kind {
            // Nothing new to serve when every authorization was still valid.
            AcmeChallenge::Http01 | AcmeChallenge::TlsAlpn01 if published.is_empty() => {}
            AcmeChallenge::Http01 | AcmeChallenge::TlsAlpn01 => {
                self.wait_for_fleet(published_before).await;
            }
            AcmeChallenge::Dns01 => {
                let dns = self.dns.as_ref().context("dns-01 needs a [dns] section")?;
                let sets: Vec<RecordSet> = records
                    .into_iter()
                    .map(|(name, values)| RecordSet {
                        name,
                        kind: Kind::Txt,
                        set_id: None,
                        ttl: 60,
                        weight: None,
                        values,
                    })
                    .collect();
                let changes: Vec<Change> = sets.iter().cloned().map(Change::Upsert).collect();
                txt.extend(sets);
                dns.provider()
                    .apply(&changes)
                    .await
                    .map_err(|e| anyhow::anyhow!("writing the dns-01 TXT records: {e}"))?;
            }
        }
        let mut authorizations = order.authorizations();
        while let Some(authz) = authorizations.next().await {
            let mut authz = authz.context("reading an authorization")?;
            if authz.status != AuthorizationStatus::Pending {
                continue;
            }
            if let Some(mut challenge) = authz.challenge(ctype.clone()) {
                challenge
                    .set_ready()
                    .await
                    .context("telling the CA to validate")?;
            }
        }
        Ok(())
    }

    /// Deletes the DNS-01 records of a finished order.
    async fn remove_txt(&self, sets: Vec<RecordSet>) {
        let (Some(dns), false) = (&self.dns, sets.is_empty()) else {
            return;
        };
        let changes: Vec<Change> = sets.into_iter().map(Change::Delete).collect();
        if let Err(e) = dns.provider().apply(&changes).await {
            tracing::warn!("removing dns-01 TXT records: {e}");
        }
    }

    /// Waits (bounded) until the snapshot with the new answers is published and every
    /// ready proxy reports serving it.
    async fn wait_for_fleet(&self, before: u64) {
        let mut published = self.fleet.published.subscribe();
        let deadline = tokio::time::Instant::now() + FLEET_WAIT;
        let target = loop {
            let v = published.borrow_and_update().version;
            if v > before {
                break v;
            }
            match tokio::time::timeout_at(deadline, published.changed()).await {
                Ok(Ok(())) => {}
                _ => {
                    tracing::warn!("no snapshot with the ACME answers within {FLEET_WAIT:?}; validating anyway");
                    return;
                }
            }
        };
        while tokio::time::Instant::now() < deadline {
            let behind = self
                .fleet
                .registry
                .status()
                .into_iter()
                .filter(|i| i.state == "ready")
                .any(|i| i.version < target);
            if !behind {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        tracing::warn!(
            "some proxies did not serve snapshot {target} within {FLEET_WAIT:?}; validating anyway"
        );
    }

    async fn problems(&self, order: &mut instant_acme::Order) -> String {
        let mut out = Vec::new();
        let mut authorizations = order.authorizations();
        while let Some(Ok(authz)) = authorizations.next().await {
            for ch in &authz.challenges {
                if let Some(p) = &ch.error {
                    out.push(format!(
                        "{}: {}",
                        ch.url,
                        p.detail.clone().unwrap_or_default()
                    ));
                }
            }
        }
        if out.is_empty() {
            "no details from the CA".into()
        } else {
            out.join("; ")
        }
    }

    /// One pass over every `acme` certificate of `config`. Returns whether an order
    /// waits for a proxy to become ready (the loop then looks again soon).
    pub async fn pass(&self, config: &Config) -> bool {
        let mut waiting = false;
        for entry in &config.tls {
            let TlsSource::Acme(source) = &entry.source else {
                continue;
            };
            waiting |= self.one(&names_of(&entry.hosts), source, None).await;
        }
        waiting |= self.on_demand_pass(config).await;
        waiting
    }

    /// The names approved on demand: ordered and renewed like configured ones (the
    /// application asked again before each renewal), dropped once the application no
    /// longer approves them and their certificate has expired.
    async fn on_demand_pass(&self, config: &Config) -> bool {
        let (Some(od), Some(settings)) = (&self.on_demand, &config.tls_on_demand) else {
            self.out.send_if_modified(|o| {
                let changed = !o.on_demand.is_empty();
                o.on_demand.clear();
                changed
            });
            return false;
        };
        let records = match od.records().await {
            Ok(r) => r,
            Err(e) => {
                tracing::error!("listing on-demand names: {e:#}");
                return false;
            }
        };
        let mut waiting = false;
        let mut serving = BTreeSet::new();
        for record in records {
            let names = vec![record.name.clone()];
            if record.denied_at.is_some() {
                match self.held(&names) {
                    Some(h) if h.not_after > now_unix() => {
                        serving.insert(record.name);
                    }
                    _ => self.drop_on_demand(od, &record.name).await,
                }
                continue;
            }
            waiting |= self
                .one(&names, &settings.acme, Some((od, &record, &settings.ask)))
                .await;
            serving.insert(record.name);
        }
        self.out.send_if_modified(|o| {
            let changed = o.on_demand != serving;
            o.on_demand = serving;
            changed
        });
        waiting
    }

    /// Forgets an on-demand name and its certificate.
    async fn drop_on_demand(&self, od: &OnDemand, name: &str) {
        let names = vec![name.to_string()];
        let id = cert_id(&names);
        for key in [format!("acme/certs/{id}"), format!("acme/state/{id}")] {
            if let Err(e) = self.store.delete(&key).await {
                tracing::error!("deleting {key}: {e:#}");
                return;
            }
        }
        if let Err(e) = od.forget(name).await {
            tracing::error!("forgetting the on-demand name {name}: {e:#}");
            return;
        }
        self.out.send_modify(|o| {
            o.certificates.remove(&names);
            o.on_demand.remove(name);
        });
        tracing::info!("on-demand TLS: {name} dropped (no longer approved, certificate expired)");
    }

    /// One certificate: keep, wait or order. `on_demand`: the name's record and the
    /// ask endpoint, asked again before a renewal. Returns whether the order waits
    /// for a proxy to become ready.
    async fn one(
        &self,
        names: &[String],
        source: &AcmeSource,
        on_demand: Option<(&OnDemand, &crate::on_demand::Approved, &str)>,
    ) -> bool {
        let answered_by_proxies = matches!(
            source.challenge,
            AcmeChallenge::Http01 | AcmeChallenge::TlsAlpn01
        );
        if answered_by_proxies && !self.any_proxy_ready() {
            // Nobody could answer the challenge: do not spend a failed validation.
            tracing::debug!(
                "ACME {}: waiting for a ready proxy to answer http-01",
                names.join(",")
            );
            return true;
        }
        let id = cert_id(names);
        let held = self.held(names);
        let state_key = format!("acme/state/{id}");
        let mut state: State = match self.store.get(&state_key).await {
            Ok(Some(b)) => serde_json::from_slice(&b).unwrap_or_default(),
            _ => State::default(),
        };
        let mut held = held;
        if let Some(h) = held.as_mut() {
            self.refresh_ari(names, source, &mut state).await;
            h.ari = state.ari;
        }
        let failures = Failures {
            count: state.failures,
            last_at: state.last_failure_at,
            retry_after: state.retry_after,
        };
        let wanted: BTreeSet<String> = names.iter().cloned().collect();
        let now = now_unix();
        let decision = {
            let mut model = self.model.lock().expect("model lock");
            model.prune(now);
            self.metrics
                .headroom
                .with_label_values(&[names.join(",")])
                .set(i64::try_from(model.headroom(now, &wanted)).unwrap_or(i64::MAX));
            plan::decide(
                now,
                &wanted,
                held.as_ref(),
                &failures,
                &model,
                spread(names, "ari"),
                0.5 + spread(names, "jitter") / 2.0,
            )
        };
        let label = names.join(",");
        if let Some(h) = &held {
            let at = plan::renew_at(h, spread(names, "ari"));
            self.metrics
                .not_after
                .with_label_values(&[&label])
                .set(as_i64(h.not_after));
            self.metrics
                .renew_at
                .with_label_values(&[&label])
                .set(as_i64(at));
        }
        self.metrics
            .failures
            .with_label_values(&[&label])
            .set(i64::from(state.failures));
        let (next, limited) = match &decision {
            Decision::Wait { blocked, until, .. } => {
                (*until, matches!(blocked, plan::Blocked::RateLimit(_)))
            }
            _ => (0, false),
        };
        self.metrics
            .next_try
            .with_label_values(&[&label])
            .set(as_i64(next));
        self.metrics
            .rate_limited
            .with_label_values(&[&label])
            .set(i64::from(limited));
        {
            let mut reports = self.reports.lock().expect("reports lock");
            let r = reports.entry(label.clone()).or_default();
            r.not_after = held.as_ref().map(|h| h.not_after);
            r.renew_at = held
                .as_ref()
                .map(|h| plan::renew_at(h, spread(names, "ari")));
            r.failures = state.failures;
            r.last_error.clone_from(&state.last_error);
            r.waiting_until = (next > 0).then_some(next);
            r.rate_limited = limited;
        }
        match decision {
            Decision::Keep { .. } => {}
            Decision::Wait {
                reason,
                blocked,
                until,
            } => {
                tracing::debug!(
                    "ACME {}: {reason:?} wanted, waiting ({blocked:?}) until {until}",
                    names.join(",")
                );
            }
            Decision::Order(reason) => {
                if let (Some((od, record, ask)), Some(_)) = (on_demand, &held) {
                    // A renewal of a name learnt on demand: still the application's?
                    match od.ask(&record.name, ask).await {
                        Ok(true) => {}
                        Ok(false) => {
                            tracing::info!(
                                "on-demand TLS: the ask endpoint no longer approves {}; not renewed, dropped when its certificate expires",
                                record.name
                            );
                            if let Err(e) = od.mark_denied(record).await {
                                tracing::error!("storing the on-demand record: {e:#}");
                            }
                            return false;
                        }
                        // The application's outage is not a customer leaving.
                        Err(e) => tracing::warn!(
                            "on-demand TLS: asking about {} before renewal: {e:#}; renewing",
                            record.name
                        ),
                    }
                }
                tracing::info!("ACME {}: ordering ({reason:?})", names.join(", "));
                let result = self.order_with_fallbacks(names, source).await;
                let outcome = if result.is_ok() { "ok" } else { "error" };
                self.metrics.orders.with_label_values(&[outcome]).inc();
                match result {
                    Ok(()) => {
                        // A new certificate: its renewal window is asked for anew.
                        state = State::default();
                        if let Some(h) = self.held(names) {
                            let at = plan::renew_at(&h, spread(names, "ari"));
                            let m = &self.metrics;
                            m.not_after
                                .with_label_values(&[&label])
                                .set(as_i64(h.not_after));
                            m.renew_at.with_label_values(&[&label]).set(as_i64(at));
                            m.failures.with_label_values(&[&label]).set(0);
                        }
                    }
                    Err(e) => {
                        tracing::warn!("ACME {}: {e:#}", names.join(", "));
                        state.failures += 1;
                        state.last_failure_at = now_unix();
                        state.last_error = Some(format!("{e:#}"));
                    }
                }
                {
                    let held = self.held(names);
                    let mut reports = self.reports.lock().expect("reports lock");
                    let r = reports.entry(label.clone()).or_default();
                    r.last_result = Some(outcome.to_string());
                    r.failures = state.failures;
                    r.last_error.clone_from(&state.last_error);
                    if let Some(h) = held {
                        r.not_after = Some(h.not_after);
                        r.renew_at = Some(plan::renew_at(&h, spread(names, "ari")));
                    }
                }
                let events = {
                    let mut model = self.model.lock().expect("model lock");
                    model.prune(now_unix());
                    serde_json::to_vec(&model.events)
                };
                if let Ok(b) = events {
                    if let Err(e) = self.store.put_leading(EVENTS_KEY, &b).await {
                        tracing::error!("storing the ACME rate-limit history: {e:#}");
                    }
                }
                if let Ok(b) = serde_json::to_vec(&state) {
                    if let Err(e) = self.store.put_leading(&state_key, &b).await {
                        tracing::error!("storing ACME state: {e:#}");
                    }
                }
            }
        }
        false
    }

    /// Asks the CA for the held certificate's renewal window (ARI, RFC 9773) when the
    /// last answer's Retry-After has passed, and keeps it in `state` (and the store).
    /// CAs without ARI are asked again a day later; renewal then follows the lifetime.
    async fn refresh_ari(&self, names: &[String], source: &AcmeSource, state: &mut State) {
        let now = now_unix();
        if now < state.ari_next {
            return;
        }
        let Some(id) = self.held_identifier(names) else {
            return;
        };
        let next = match self.renewal_info(&id, source).await {
            Ok((window, retry)) => {
                state.ari = Some(window);
                retry.clamp(Duration::from_secs(60), ARI_MAX)
            }
            Err(e)
                if e.to_string().contains("Unsupported")
                    || e.to_string().contains("not supported") =>
            {
                tracing::debug!("ACME {}: no renewal information: {e:#}", names.join(","));
                ARI_MAX
            }
            Err(e) => {
                tracing::info!("ACME {}: renewal information: {e:#}", names.join(","));
                ARI_RETRY
            }
        };
        state.ari_next = now + next.as_secs();
        if let Ok(b) = serde_json::to_vec(&state) {
            let key = format!("acme/state/{}", cert_id(names));
            if let Err(e) = self.store.put_leading(&key, &b).await {
                tracing::error!("storing ACME state: {e:#}");
            }
        }
    }

    async fn renewal_info(
        &self,
        id: &instant_acme::CertificateIdentifier<'_>,
        source: &AcmeSource,
    ) -> anyhow::Result<((u64, u64), Duration)> {
        let account = self.account(source).await?;
        let (info, retry) = account.renewal_info(id).await.map_err(|e| match e {
            instant_acme::Error::Unsupported(what) => anyhow::anyhow!("Unsupported: {what}"),
            other => anyhow::Error::new(other),
        })?;
        let secs = |t: time::OffsetDateTime| u64::try_from(t.unix_timestamp()).unwrap_or(0);
        Ok((
            (
                secs(info.suggested_window.start),
                secs(info.suggested_window.end),
            ),
            retry,
        ))
    }

    /// The ARI identifier of the certificate held for `names`, which a renewal
    /// replaces; `None` for a first order (or a certificate without an AKI).
    fn held_identifier(
        &self,
        names: &[String],
    ) -> Option<instant_acme::CertificateIdentifier<'static>> {
        let chain = self.out.borrow().certificates.get(names)?.chain_pem.clone();
        let (_, block) = x509_parser::pem::parse_x509_pem(chain.as_bytes()).ok()?;
        let der = rustls::pki_types::CertificateDer::from(block.contents);
        instant_acme::CertificateIdentifier::try_from(&der)
            .ok()
            .map(instant_acme::CertificateIdentifier::into_owned)
    }

    fn any_proxy_ready(&self) -> bool {
        self.fleet
            .registry
            .status()
            .iter()
            .any(|i| i.state == "ready")
    }

    fn held(&self, names: &[String]) -> Option<Held> {
        let out = self.out.borrow();
        let b = out.certificates.get(names)?;
        let (not_before, not_after) = rampart_pki::validity_pem(&b.chain_pem).ok()?;
        Some(Held {
            names: names.iter().cloned().collect(),
            not_before,
            not_after,
            revoked: false,
            ari: None,
        })
    }
}

/// The sorted host names of a `[[tls]]` entry.
#[must_use]
pub fn names_of(hosts: &[HostPattern]) -> Vec<String> {
    let mut names: Vec<String> = hosts.iter().map(ToString::to_string).collect();
    names.sort();
    names.dedup();
    names
}

fn bundle(s: &Stored) -> anyhow::Result<CertificateBundle> {
    let hosts = s
        .names
        .iter()
        .map(|n| {
            n.parse::<HostPattern>()
                .map_err(|e| anyhow::anyhow!("{n}: {e}"))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    Ok(CertificateBundle {
        hosts,
        chain_pem: s.chain_pem.clone(),
        key_pem: s.key_pem.clone(),
        client_auth: None,
    })
}

/// The loop: a pass at start, after each configuration change and every 5 s, on the
/// leader only.
pub async fn run(
    acme: Arc<Acme>,
    mut config: watch::Receiver<Config>,
    mut leader: watch::Receiver<bool>,
    mut shutdown: watch::Receiver<bool>,
) {
    if let Err(e) = acme.load().await {
        tracing::error!("loading stored ACME certificates: {e:#}");
    }
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let (mut config_open, mut leader_open) = (true, true);
    let mut was_leader = *leader.borrow();
    let mut soon = false;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = tokio::time::sleep(Duration::from_millis(500)), if soon => {}
            r = config.changed(), if config_open => config_open = r.is_ok(),
            r = leader.changed(), if leader_open => leader_open = r.is_ok(),
            () = approved(&acme) => {}
            _ = shutdown.wait_for(|s| *s) => return,
        }
        let leading = *leader.borrow();
        if !leading {
            was_leader = false;
            continue;
        }
        if !was_leader {
            // Taking over: what the previous leader ordered is in the store.
            if let Err(e) = acme.load().await {
                tracing::error!("loading stored ACME certificates: {e:#}");
                continue;
            }
            was_leader = true;
        }
        let cfg = config.borrow().clone();
        soon = acme.pass(&cfg).await;
    }
}

/// Returns when a name was approved on demand (never without on-demand TLS).
async fn approved(acme: &Acme) {
    match &acme.on_demand {
        Some(od) => od.approved.notified().await,
        None => std::future::pending().await,
    }
}

/// An answer an order published in [`Output`] for the proxies, removed when it ends.
enum Published {
    /// An HTTP-01 token (key of `Output::challenges`).
    Http01(String),
    /// A TLS-ALPN-01 name (key of `Output::tls_alpn`).
    TlsAlpn01(String),
}

fn challenge_type(kind: AcmeChallenge) -> ChallengeType {
    match kind {
        AcmeChallenge::Http01 => ChallengeType::Http01,
        AcmeChallenge::Dns01 => ChallengeType::Dns01,
        AcmeChallenge::TlsAlpn01 => ChallengeType::TlsAlpn01,
    }
}

/// The External Account Binding key of `eab`: its HMAC key file holds the key as CAs
/// show it, base64url (padding and surrounding whitespace tolerated).
fn external_account_key(
    eab: &rampart_config::Eab,
) -> anyhow::Result<instant_acme::ExternalAccountKey> {
    use base64::Engine as _;
    let path = &eab.hmac_key_file;
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading the EAB HMAC key {}", path.display()))?;
    let text = text.trim().trim_end_matches('=');
    let key = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(text)
        .with_context(|| {
            format!(
                "{}: the EAB HMAC key is not base64url (copy it as the CA shows it)",
                path.display()
            )
        })?;
    anyhow::ensure!(
        !key.is_empty(),
        "{}: the EAB HMAC key is empty",
        path.display()
    );
    Ok(instant_acme::ExternalAccountKey::new(eab.kid.clone(), &key))
}

#[cfg(test)]
mod tests {
    use super::external_account_key;

    #[test]
    fn eab_keys_are_read_as_cas_show_them() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("hmac");
        let eab = rampart_config::Eab {
            kid: "kid-1".into(),
            hmac_key_file: file.clone(),
        };
        // base64url with '-' and '_', a trailing newline and padding.
        std::fs::write(
            &file,
            "zWNDZM6eQGHWpSRTPal5eIUYFTu7EajVIoguysqZ9wG44nMEtx3MUAsUDkMTQ12W-_w=\n",
        )
        .unwrap();
        assert!(external_account_key(&eab).is_ok());
        std::fs::write(&file, "not base64!").unwrap();
        let e = format!("{:#}", external_account_key(&eab).err().unwrap());
        assert!(e.contains("not base64url"), "{e}");
        std::fs::remove_file(&file).unwrap();
        let e = format!("{:#}", external_account_key(&eab).err().unwrap());
        assert!(e.contains("reading the EAB HMAC key"), "{e}");
    }
}
