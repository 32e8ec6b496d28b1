//! The embedded provider: an authoritative DNS server (hickory-server) inside the
//! controller, answering for the zone from Rampart's own records. For `rampart up`, local
//! use and tests; the target of ACME DNS-01 challenges in tests.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use async_trait::async_trait;
use hickory_proto::rr::rdata::{NS, SOA};
use hickory_proto::rr::{LowerName, Name, RData, Record, RrKey};
use hickory_server::store::in_memory::InMemoryZoneHandler;
use hickory_server::zone_handler::{AxfrPolicy, Catalog, ZoneHandler, ZoneType};
use hickory_server::Server;
use tokio::net::{TcpListener, UdpSocket};
use tokio::sync::watch;

use super::plan::{Change, RecordSet};
use super::provider::{in_zone, Provider, ProviderError};
use super::wire;

/// The embedded authoritative server and its zone.
pub struct Embedded {
    zone: Name,
    zone_str: String,
    handler: Arc<InMemoryZoneHandler>,
    serial: AtomicU32,
    addr: SocketAddr,
}

impl std::fmt::Debug for Embedded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Embedded")
            .field("zone", &self.zone_str)
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl Embedded {
    /// Starts answering for `zone` on `listen` (UDP and TCP) until `shutdown`.
    ///
    /// # Errors
    /// When the zone name is invalid or the sockets cannot be bound.
    pub async fn start(
        zone: &str,
        listen: SocketAddr,
        mut shutdown: watch::Receiver<bool>,
    ) -> anyhow::Result<Arc<Self>> {
        let origin = Name::from_ascii(format!("{zone}."))
            .with_context(|| format!("{zone} is not a valid zone name (dns.zone)"))?;
        let handler =
            InMemoryZoneHandler::empty(origin.clone(), ZoneType::Primary, AxfrPolicy::Deny);
        let serial = 1;
        let ns_name = Name::from_ascii(format!("ns.{zone}."))?;
        let soa = SOA::new(
            ns_name.clone(),
            Name::from_ascii(format!("hostmaster.{zone}."))?,
            serial,
            3600,
            600,
            86_400,
            30,
        );
        handler
            .upsert(
                Record::from_rdata(origin.clone(), 30, RData::SOA(soa)),
                serial,
            )
            .await;
        handler
            .upsert(
                Record::from_rdata(origin.clone(), 3600, RData::NS(NS(ns_name))),
                serial,
            )
            .await;
        let handler = Arc::new(handler);
        let mut catalog = Catalog::new();
        catalog.upsert(
            LowerName::new(&origin),
            vec![handler.clone() as Arc<dyn ZoneHandler>],
        );
        let (udp, tcp) = bind_both(listen).await?;
        let addr = udp.local_addr()?;
        let mut server = Server::new(catalog);
        server.register_socket(udp);
        server.register_listener(tcp, Duration::from_secs(5), 64 * 1024);
        tokio::spawn(async move {
            let _ = shutdown.wait_for(|s| *s).await;
            if let Err(e) = server.shutdown_gracefully().await {
                tracing::debug!("embedded DNS server stopped: {e}");
            }
        });
        tracing::info!("embedded DNS server for {zone} on {addr} (udp and tcp)");
        Ok(Arc::new(Self {
            zone: origin,
            zone_str: zone.to_string(),
            handler,
            serial: AtomicU32::new(serial),
            addr,
        }))
    }

    /// The address it answers on.
    #[must_use]
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Bumps the zone's SOA serial so that secondaries and caches see a change.
    async fn bump_serial(&self) -> u32 {
        let serial = self.serial.fetch_add(1, Ordering::Relaxed) + 1;
        let key = RrKey::new(
            LowerName::new(&self.zone),
            hickory_proto::rr::RecordType::SOA,
        );
        let current = self.handler.records().await.get(&key).cloned();
        if let Some(set) = current {
            if let Some(RData::SOA(soa)) = set.records_without_rrsigs().next().map(|r| &r.data) {
                let mut soa = soa.clone();
                soa.serial = serial;
                self.handler
                    .upsert(
                        Record::from_rdata(self.zone.clone(), 30, RData::SOA(soa)),
                        serial,
                    )
                    .await;
            }
        }
        serial
    }
}

/// UDP and TCP sockets on the same address. With port 0, the OS picks the UDP port;
/// if that port is taken for TCP, another one is tried.
async fn bind_both(listen: SocketAddr) -> anyhow::Result<(UdpSocket, TcpListener)> {
    let attempts = if listen.port() == 0 { 20 } else { 1 };
    let mut last = None;
    for _ in 0..attempts {
        let udp = UdpSocket::bind(listen).await.with_context(|| {
            format!("binding the embedded DNS server to udp/{listen} (dns.provider.listen)")
        })?;
        let addr = udp.local_addr()?;
        match TcpListener::bind(addr).await {
            Ok(tcp) => return Ok((udp, tcp)),
            Err(e) => last = Some((addr, e)),
        }
    }
    let (addr, e) = last.expect("at least one attempt");
    Err(anyhow::Error::new(e).context(format!(
        "binding the embedded DNS server to tcp/{addr} (dns.provider.listen)"
    )))
}

#[async_trait]
impl Provider for Embedded {
    fn kind(&self) -> &'static str {
        "embedded"
    }

    fn set_ids(&self) -> bool {
        false
    }

    fn addr(&self) -> Option<SocketAddr> {
        Some(self.addr)
    }

    async fn records(&self) -> Result<Vec<RecordSet>, ProviderError> {
        let records = self.handler.records().await;
        let all: Vec<Record> = records
            .values()
            .flat_map(|set| set.records_without_rrsigs().cloned().collect::<Vec<_>>())
            .collect();
        Ok(wire::to_sets(&all))
    }

    async fn apply(&self, changes: &[Change]) -> Result<(), ProviderError> {
        // Check every change first: all or none, like a change batch.
        let mut prepared = Vec::with_capacity(changes.len());
        for change in changes {
            let set = match change {
                Change::Upsert(s) | Change::Delete(s) => s,
            };
            if !in_zone(&set.name, &self.zone_str) {
                return Err(ProviderError::Rejected(format!(
                    "{} is not inside the zone {}",
                    set.name, self.zone_str
                )));
            }
            let key = RrKey::new(
                LowerName::new(&wire::fqdn(&set.name)?),
                wire::record_type(set.kind),
            );
            let records = match change {
                Change::Upsert(s) => wire::to_records(s)?,
                Change::Delete(_) => Vec::new(),
            };
            prepared.push((key, records));
        }
        let serial = self.bump_serial().await;
        for (key, records) in prepared {
            self.handler.records_mut().await.remove(&key);
            for r in records {
                self.handler.upsert(r, serial).await;
            }
        }
        Ok(())
    }
}
