//! The DNS SRV provider: a pool's endpoints are the targets of a name's SRV records
//! (as Consul, Nomad or a Kubernetes headless service publish them), re-resolved when
//! the records' TTL runs out. Only the records of the best (lowest) priority are used,
//! as RFC 2782 says; SRV weights become endpoint weights. Targets are resolved from the
//! answer's additional section, or by asking for their A and AAAA records.
//!
//! A failed or empty lookup keeps the last good endpoints and is reported.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use async_trait::async_trait;
use hickory_net::client::{Client, ClientHandle as _};
use hickory_net::runtime::TokioRuntimeProvider;
use hickory_net::udp::UdpClientStream;
use hickory_proto::op::ResponseCode;
use hickory_proto::rr::{DNSClass, Name, RData, RecordType};
use rampart_config::{Endpoint, SrvDiscovery};
use tokio::sync::watch;

use super::{Found, Provider};

/// Shortest pause between lookups, whatever the TTL says.
const MIN_INTERVAL: Duration = Duration::from_secs(1);
/// Pause after a failed lookup.
const RETRY: Duration = Duration::from_secs(2);
/// How long one query may take.
const TIMEOUT: Duration = Duration::from_secs(3);

/// Endpoints from SRV records.
#[derive(Debug)]
pub struct SrvProvider {
    settings: SrvDiscovery,
}

/// One SRV answer, resolved.
#[derive(Debug, Clone, PartialEq)]
struct Target {
    priority: u16,
    weight: u16,
    addr: SocketAddr,
}

impl SrvProvider {
    /// A provider for `settings`.
    #[must_use]
    pub fn new(settings: SrvDiscovery) -> Self {
        Self { settings }
    }

    /// The server to ask: configured, or the first nameserver of /etc/resolv.conf.
    fn server(&self) -> Result<SocketAddr, String> {
        if let Some(s) = self.settings.server {
            return Ok(s);
        }
        let conf = std::fs::read_to_string("/etc/resolv.conf").map_err(|e| {
            format!(
                "dns_srv {}: reading /etc/resolv.conf: {e}; set server = \"ADDR:53\"",
                self.settings.name
            )
        })?;
        conf.lines()
            .filter_map(|l| l.trim().strip_prefix("nameserver"))
            .find_map(|ip| ip.trim().parse::<IpAddr>().ok())
            .map(|ip| SocketAddr::new(ip, 53))
            .ok_or_else(|| {
                format!(
                    "dns_srv {}: no nameserver in /etc/resolv.conf; set server = \"ADDR:53\"",
                    self.settings.name
                )
            })
    }

    /// Looks the name up; returns the endpoints of the best priority and the TTL.
    async fn lookup(&self) -> Result<(Vec<Endpoint>, Duration), String> {
        let server = self.server()?;
        let what = format!("dns_srv {} (server {server})", self.settings.name);
        let stream = UdpClientStream::builder(server, TokioRuntimeProvider::default())
            .with_timeout(Some(TIMEOUT))
            .build();
        let (mut client, bg) = Client::<TokioRuntimeProvider>::from_sender(stream);
        let bg = tokio::spawn(bg);
        let result = async {
            let mut name = Name::from_ascii(self.settings.name.trim_end_matches('.'))
                .map_err(|e| format!("{what}: invalid name: {e}"))?;
            name.set_fqdn(true);
            let response = client
                .query(name, DNSClass::IN, RecordType::SRV)
                .await
                .map_err(|e| format!("{what}: {e}"))?;
            match response.response_code {
                ResponseCode::NoError => {}
                ResponseCode::NXDomain => {
                    return Err(format!(
                        "{what}: no such name (NXDOMAIN); check the service name"
                    ))
                }
                code => return Err(format!("{what}: the server answered {code}")),
            }
            // Addresses the server sent along.
            let mut known: BTreeMap<Name, Vec<IpAddr>> = BTreeMap::new();
            for r in &response.additionals {
                let ip = match &r.data {
                    RData::A(a) => IpAddr::V4(a.0),
                    RData::AAAA(a) => IpAddr::V6(a.0),
                    _ => continue,
                };
                known.entry(r.name.clone()).or_default().push(ip);
            }
            let mut ttl = u32::MAX;
            let mut targets = Vec::new();
            for r in &response.answers {
                let RData::SRV(srv) = &r.data else { continue };
                ttl = ttl.min(r.ttl);
                let ips = match known.get(&srv.target) {
                    Some(ips) => ips.clone(),
                    None => resolve(&mut client, &srv.target).await?,
                };
                for ip in ips {
                    targets.push(Target {
                        priority: srv.priority,
                        weight: srv.weight,
                        addr: SocketAddr::new(ip, srv.port),
                    });
                }
            }
            let ttl = Duration::from_secs(u64::from(if ttl == u32::MAX { 0 } else { ttl }));
            Ok((endpoints(&targets), ttl))
        }
        .await;
        bg.abort();
        result
    }
}

/// The A and AAAA addresses of `target`.
async fn resolve(
    client: &mut Client<TokioRuntimeProvider>,
    target: &Name,
) -> Result<Vec<IpAddr>, String> {
    let mut ips = Vec::new();
    for rtype in [RecordType::A, RecordType::AAAA] {
        let response = client
            .query(target.clone(), DNSClass::IN, rtype)
            .await
            .map_err(|e| format!("resolving the SRV target {target}: {e}"))?;
        ips.extend(response.answers.iter().filter_map(|r| match &r.data {
            RData::A(a) => Some(IpAddr::V4(a.0)),
            RData::AAAA(a) => Some(IpAddr::V6(a.0)),
            _ => None,
        }));
    }
    Ok(ips)
}

/// The endpoints of the best priority, SRV weights mapped to 1..=1000.
fn endpoints(targets: &[Target]) -> Vec<Endpoint> {
    let Some(best) = targets.iter().map(|t| t.priority).min() else {
        return Vec::new();
    };
    let mut out: Vec<Endpoint> = targets
        .iter()
        .filter(|t| t.priority == best)
        .map(|t| Endpoint {
            address: t
                .addr
                .to_string()
                .parse()
                .expect("a socket address is a valid endpoint address"),
            weight: u32::from(t.weight).clamp(1, 1000),
        })
        .collect();
    out.sort_by_key(|e| e.address.to_string());
    out.dedup_by(|a, b| a.address == b.address);
    out
}

#[async_trait]
impl Provider for SrvProvider {
    fn name(&self) -> String {
        format!("dns_srv:{}", self.settings.name)
    }

    async fn run(&self, out: watch::Sender<Found>, mut shutdown: watch::Receiver<bool>) {
        loop {
            let wait = match self.lookup().await {
                Ok((eps, _)) if eps.is_empty() => {
                    let e = format!(
                        "dns_srv {}: no SRV records; keeping the last good endpoints",
                        self.settings.name
                    );
                    out.send_if_modified(|f| replace_errors(f, vec![e]));
                    RETRY
                }
                Ok((eps, ttl)) => {
                    let found = Found {
                        pools: [(self.settings.pool.clone(), eps)].into(),
                        ..Found::default()
                    };
                    out.send_if_modified(|f| {
                        let changed = *f != found;
                        *f = found;
                        changed
                    });
                    ttl.clamp(MIN_INTERVAL, self.settings.interval.0.max(MIN_INTERVAL))
                }
                Err(e) => {
                    tracing::warn!("{e}; keeping the last good endpoints");
                    out.send_if_modified(|f| replace_errors(f, vec![e]));
                    RETRY
                }
            };
            tokio::select! {
                () = tokio::time::sleep(wait) => {}
                _ = shutdown.wait_for(|s| *s) => return,
            }
        }
    }
}

/// Sets `f.errors`; whether that changed anything.
fn replace_errors(f: &mut Found, errors: Vec<String>) -> bool {
    let changed = f.errors != errors;
    f.errors = errors;
    changed
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(priority: u16, weight: u16, addr: &str) -> Target {
        Target {
            priority,
            weight,
            addr: addr.parse().unwrap(),
        }
    }

    #[test]
    fn only_the_best_priority_serves_and_weights_carry_over() {
        let eps = endpoints(&[
            t(10, 5, "10.0.0.1:80"),
            t(20, 1, "10.0.0.2:80"),
            t(10, 0, "10.0.0.3:80"),
            t(10, 60000, "10.0.0.4:80"),
        ]);
        let got: Vec<(String, u32)> = eps
            .iter()
            .map(|e| (e.address.to_string(), e.weight))
            .collect();
        assert_eq!(
            got,
            vec![
                ("10.0.0.1:80".to_string(), 5),
                ("10.0.0.3:80".to_string(), 1),
                ("10.0.0.4:80".to_string(), 1000)
            ]
        );
        assert!(endpoints(&[]).is_empty());
    }
}
