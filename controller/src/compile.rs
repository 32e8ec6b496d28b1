//! The snapshot compiler: configuration + discovered endpoints + certificates → the
//! next [`Snapshot`]. Pure except for reading certificate files and issuing internal
//! certificates (cached per host list, so recompiling does not churn them).

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use anyhow::Context;
use rampart_config::snapshot::{
    CertificateBundle, ClientAuthBundle, OnDemandPolicy, Snapshot, SCHEMA,
};
use rampart_config::{Config, Endpoint, TlsSource};
use rampart_pki::Ca;

use crate::discovery::Found;

/// Internal certificates are valid this long; the controller re-issues at start.
const INTERNAL_LIFETIME: Duration = Duration::from_secs(90 * 24 * 3600);
/// An internal certificate with less than this left is issued anew.
const INTERNAL_RENEW_BEFORE: Duration = Duration::from_secs(30 * 24 * 3600);

/// Whether an issued certificate has less than [`INTERNAL_RENEW_BEFORE`] left (or
/// cannot be read).
fn renewal_due(bundle: &CertificateBundle) -> bool {
    let now = rampart_config::unix_now();
    rampart_pki::validity_pem(&bundle.chain_pem).map_or(true, |(_, not_after)| {
        not_after < now + INTERNAL_RENEW_BEFORE.as_secs()
    })
}

/// Compiles snapshots; holds the internal CA and the certificates it issued.
#[derive(Debug)]
pub struct Compiler {
    serving_ca: Ca,
    issued: HashMap<Vec<String>, CertificateBundle>,
    /// Certificates and HTTP-01 answers from the ACME orderer.
    pub acme: crate::acme::Output,
    /// The fleet's session ticket keys (the leader's, rotated by `tickets::run`).
    pub tickets: Option<rampart_config::snapshot::TicketKeys>,
    /// The last snapshot this compiler published: an identical one is not published
    /// again (a discovery error repeating, a provider re-reading the same containers).
    pub last: Option<rampart_config::snapshot::Snapshot>,
}

impl Compiler {
    /// Whether an internal certificate it issued is due for renewal.
    #[must_use]
    pub fn internal_renewal_due(&self) -> bool {
        self.issued.values().any(renewal_due)
    }

    /// A compiler issuing `internal` certificates from `serving_ca`.
    #[must_use]
    pub fn new(serving_ca: Ca) -> Self {
        Self {
            serving_ca,
            issued: HashMap::new(),
            acme: crate::acme::Output::default(),
            tickets: None,
            last: None,
        }
    }

    /// The snapshot of `config` with `found` endpoints merged in, at `version`.
    ///
    /// # Errors
    /// When a certificate file cannot be read or an internal certificate issued.
    pub fn compile(
        &mut self,
        config: &Config,
        found: &[Found],
        version: u64,
    ) -> anyhow::Result<Snapshot> {
        let mut routes = merge_routes(config, found);
        for r in &mut routes {
            inline_pages(&mut r.error_pages)
                .with_context(|| format!("routes {}: error_pages", r.name))?;
        }
        let mut pools = merge_pools(config, found);
        for (name, pool) in &mut pools {
            inline_pages(&mut pool.error_pages)
                .with_context(|| format!("pools.{name}.error_pages"))?;
        }
        let mut error_pages = config.error_pages.clone();
        inline_pages(&mut error_pages).context("error_pages")?;
        Ok(Snapshot {
            schema: SCHEMA,
            version,
            limits: config.limits.clone(),
            forwarding: config.forwarding.clone(),
            error_pages,
            routes,
            pools,
            certificates: self.certificates(config)?,
            default_sni: config.server.default_sni.clone(),
            acme_challenges: self.acme.challenges.clone(),
            acme_tls_alpn: self.acme.tls_alpn.clone(),
            session_tickets: self.tickets.clone(),
            on_demand: config.tls_on_demand.as_ref().map(|o| OnDemandPolicy {
                allow: o.allow.clone(),
                hold_ms: u64::try_from(o.hold.0.as_millis()).unwrap_or(u64::MAX),
            }),
        })
    }

    fn certificates(&mut self, config: &Config) -> anyhow::Result<Vec<CertificateBundle>> {
        let mut out = Vec::with_capacity(config.tls.len());
        for (i, entry) in config.tls.iter().enumerate() {
            let hosts: Vec<String> = entry.hosts.iter().map(ToString::to_string).collect();
            let bundle = match &entry.source {
                TlsSource::Files { cert, key } => CertificateBundle {
                    hosts: entry.hosts.clone(),
                    chain_pem: std::fs::read_to_string(cert)
                        .with_context(|| format!("tls[{i}]: reading {}", cert.display()))?,
                    key_pem: std::fs::read_to_string(key)
                        .with_context(|| format!("tls[{i}]: reading {}", key.display()))?,
                    client_auth: None,
                },
                TlsSource::Acme(_)
                    if self
                        .acme
                        .certificates
                        .contains_key(&crate::acme::names_of(&entry.hosts)) =>
                {
                    self.acme.certificates[&crate::acme::names_of(&entry.hosts)].clone()
                }
                // ACME names are served from the internal CA until the orderer delivers.
                TlsSource::Internal | TlsSource::Acme(_) => {
                    if let Some(b) = self.issued.get(&hosts).filter(|b| !renewal_due(b)) {
                        b.clone()
                    } else {
                        let issued = self
                            .serving_ca
                            .issue_server(&hosts, INTERNAL_LIFETIME)
                            .with_context(|| {
                                format!("tls[{i}]: issuing an internal certificate")
                            })?;
                        let b = CertificateBundle {
                            hosts: entry.hosts.clone(),
                            chain_pem: issued.chain_pem,
                            key_pem: issued.key_pem,
                            client_auth: None,
                        };
                        self.issued.insert(hosts, b.clone());
                        b
                    }
                }
            };
            let client_auth = match &entry.client_auth {
                Some(auth) => Some(ClientAuthBundle::read(auth).with_context(|| {
                    format!("tls[{i}].client_auth: reading {}", auth.ca_file.display())
                })?),
                None => None,
            };
            out.push(CertificateBundle {
                client_auth,
                ..bundle
            });
        }
        if config.tls_on_demand.is_some() {
            // Names approved on demand that no entry covers (an entry added for one
            // later wins), once their certificate is there.
            for name in &self.acme.on_demand {
                let covered = config
                    .tls
                    .iter()
                    .any(|e| e.hosts.iter().any(|h| h.matches(name)));
                if let Some(b) = self.acme.certificates.get(std::slice::from_ref(name)) {
                    if !covered {
                        out.push(b.clone());
                    }
                }
            }
        }
        Ok(out)
    }
}

/// The configured routes, then the providers' (a provider's route whose name the file
/// already uses is left out: the file wins).
#[must_use]
pub fn merge_routes(config: &Config, found: &[Found]) -> Vec<rampart_config::Route> {
    let mut routes = config.routes.clone();
    for f in found {
        for r in &f.routes {
            if !routes.iter().any(|x| x.name == r.name) {
                routes.push(r.clone());
            }
        }
    }
    routes
}

/// The configured pools with every provider's endpoints appended (each address once;
/// the static entry wins). A pool only a provider's routes name is created with the
/// defaults (round robin, passive health checks) and the provider's pool labels
/// (protocol, TLS, PROXY protocol).
#[must_use]
pub fn merge_pools(config: &Config, found: &[Found]) -> BTreeMap<String, rampart_config::Pool> {
    let mut pools = config.pools.clone();
    for f in found {
        for (name, eps) in &f.pools {
            if !pools.contains_key(name)
                && f.routes.iter().any(
                    |r| matches!(&r.action, rampart_config::Action::Forward(to) if to.names(name)),
                )
            {
                let mut pool = rampart_config::Pool::default();
                if let Some(settings) = f.pool_settings.get(name) {
                    settings.apply(&mut pool);
                }
                pools.insert(name.clone(), pool);
            }
            let Some(pool) = pools.get_mut(name) else {
                continue;
            };
            for ep in eps {
                if !pool
                    .endpoints
                    .iter()
                    .any(|e: &Endpoint| e.address == ep.address)
                {
                    pool.endpoints.push(ep.clone());
                }
            }
        }
    }
    pools
}

/// Error pages as the proxies get them: a page from a file is read here and sent
/// inline, as certificate files are, so that proxies need no copy of it.
fn inline_pages(pages: &mut Option<rampart_config::ErrorPages>) -> anyhow::Result<()> {
    let Some(pages) = pages else { return Ok(()) };
    for page in [&mut pages.html, &mut pages.json, &mut pages.text]
        .into_iter()
        .flatten()
    {
        if let rampart_config::PageSource::File(path) = page {
            let text = std::fs::read_to_string(&*path)
                .with_context(|| format!("reading {}", path.display()))?;
            *page = rampart_config::PageSource::Inline(text);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn discovered_endpoints_join_static_ones_once() {
        let config = rampart_config::parse(
            "[listeners]\nhttp = \"127.0.0.1:1\"\n[pools.web]\nendpoints = [{ address = \"127.0.0.1:10\" }]\n",
            "t",
        )
        .unwrap();
        let ep = |a: &str| Endpoint {
            address: a.parse().unwrap(),
            weight: 1,
        };
        let found = Found {
            pools: [
                (
                    "web".to_string(),
                    vec![ep("127.0.0.1:10"), ep("127.0.0.1:11")],
                ),
                ("gone".to_string(), vec![ep("127.0.0.1:12")]),
            ]
            .into(),
            ..Found::default()
        };
        let pools = merge_pools(&config, &[found]);
        let addrs: Vec<String> = pools["web"]
            .endpoints
            .iter()
            .map(|e| e.address.to_string())
            .collect();
        assert_eq!(addrs, ["127.0.0.1:10", "127.0.0.1:11"]);
        assert!(!pools.contains_key("gone"));
    }

    #[test]
    fn a_pool_only_labels_define_takes_their_settings_and_the_files_pool_wins() {
        let config = rampart_config::parse(
            "[listeners]\nhttp = \"127.0.0.1:1\"\n[pools.web]\nendpoints = [{ address = \"127.0.0.1:10\" }]\n",
            "t",
        )
        .unwrap();
        let ep = Endpoint {
            address: "127.0.0.1:20".parse().unwrap(),
            weight: 1,
        };
        let h2c = rampart_config::PoolSettings {
            protocol: Some(rampart_config::UpstreamProtocol::H2c),
            ..Default::default()
        };
        let route = |pool: &str| {
            let mut r = rampart_config::parse(
                "[listeners]\nhttp = \"127.0.0.1:1\"\n[[routes]]\nname = \"r\"\naction = { respond = { status = 200 } }\n",
                "t",
            )
            .unwrap()
            .routes
            .remove(0);
            r.name = pool.to_string();
            r.action = rampart_config::Action::Forward(pool.into());
            r
        };
        let found = Found {
            pools: [
                ("grpc".to_string(), vec![ep.clone()]),
                ("web".to_string(), vec![ep]),
            ]
            .into(),
            pool_settings: [("grpc".to_string(), h2c.clone()), ("web".to_string(), h2c)].into(),
            routes: vec![route("grpc"), route("web")],
            ..Found::default()
        };
        let pools = merge_pools(&config, &[found]);
        assert_eq!(
            pools["grpc"].protocol,
            rampart_config::UpstreamProtocol::H2c
        );
        assert_eq!(
            pools["web"].protocol,
            rampart_config::UpstreamProtocol::Http1
        );
    }

    #[test]
    fn error_page_files_travel_inline_and_an_unreadable_one_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let page = dir.path().join("e.html");
        std::fs::write(&page, "<h1>{status}</h1>").unwrap();
        let mut pages = Some(rampart_config::ErrorPages {
            html: Some(rampart_config::PageSource::File(page)),
            text: Some(rampart_config::PageSource::Inline("x".into())),
            ..Default::default()
        });
        inline_pages(&mut pages).unwrap();
        let pages = pages.unwrap();
        assert_eq!(
            pages.html,
            Some(rampart_config::PageSource::Inline(
                "<h1>{status}</h1>".into()
            ))
        );
        assert_eq!(
            pages.text,
            Some(rampart_config::PageSource::Inline("x".into()))
        );
        let mut missing = Some(rampart_config::ErrorPages {
            json: Some(rampart_config::PageSource::File(dir.path().join("no.json"))),
            ..Default::default()
        });
        let e = format!("{:#}", inline_pages(&mut missing).unwrap_err());
        assert!(e.contains("no.json"), "{e}");
    }

    #[test]
    fn internal_certificates_are_renewed_in_their_last_third() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::load_or_create(dir.path(), "test CA").unwrap();
        let bundle = |lifetime: Duration| {
            let issued = ca.issue_server(&["a.test".into()], lifetime).unwrap();
            CertificateBundle {
                hosts: vec!["a.test".parse().unwrap()],
                chain_pem: issued.chain_pem,
                key_pem: issued.key_pem,
                client_auth: None,
            }
        };
        assert!(!renewal_due(&bundle(INTERNAL_LIFETIME)));
        assert!(renewal_due(&bundle(Duration::from_secs(10 * 24 * 3600))));
        let aging = bundle(Duration::from_secs(24 * 3600));
        let mut compiler = Compiler::new(ca);
        compiler.issued.insert(vec!["a.test".into()], aging);
        assert!(compiler.internal_renewal_due());
    }
}
