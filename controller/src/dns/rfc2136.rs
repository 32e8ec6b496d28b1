//! The RFC 2136 provider: reads the zone by AXFR and changes it with dynamic updates,
//! both signed with TSIG, from any authoritative server that speaks them (BIND 9, Knot,
//! PowerDNS). One UPDATE message per batch, so a batch is all or none.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use anyhow::Context as _;
use async_trait::async_trait;
use futures_util::StreamExt as _;
use hickory_net::client::{Client, ClientHandle as _};
use hickory_net::runtime::TokioRuntimeProvider;
use hickory_net::tcp::TcpClientStream;
use hickory_net::{DnsHandle as _, DnsMultiplexer};
use hickory_proto::op::{DnsRequest, Message, OpCode, Query, ResponseCode, UpdateMessage as _};
use hickory_proto::rr::rdata::tsig::TsigAlgorithm;
use hickory_proto::rr::{DNSClass, Name, RData, Record, RecordType, TSigner};
use rampart_config::TsigAlgorithm as Algorithm;

use super::plan::{Change, RecordSet};
use super::provider::{in_zone, Provider, ProviderError};
use super::wire;

/// How long one exchange with the server may take.
const TIMEOUT: Duration = Duration::from_secs(10);

/// A zone on an RFC 2136 server.
pub struct Rfc2136 {
    server: SocketAddr,
    zone: Name,
    zone_str: String,
    key_name: String,
    signer: TSigner,
}

impl std::fmt::Debug for Rfc2136 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rfc2136")
            .field("server", &self.server)
            .field("zone", &self.zone_str)
            .field("key", &self.key_name)
            .finish_non_exhaustive()
    }
}

impl Rfc2136 {
    /// A provider for `zone` on `server`, signing with the key in `secret_file`.
    ///
    /// # Errors
    /// When the key file cannot be read or holds no base64 secret.
    pub fn new(
        server: SocketAddr,
        zone: &str,
        key_name: &str,
        algorithm: Algorithm,
        secret_file: &Path,
    ) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(secret_file).with_context(|| {
            format!(
                "reading the TSIG secret {} (dns.provider.tsig_secret_file)",
                secret_file.display()
            )
        })?;
        let secret = parse_secret(&text).with_context(|| {
            format!(
                "{} holds no base64 TSIG secret; put the secret alone in the file, or use the key file `tsig-keygen {key_name}` writes",
                secret_file.display()
            )
        })?;
        let algorithm = match algorithm {
            Algorithm::HmacSha256 => TsigAlgorithm::HmacSha256,
            Algorithm::HmacSha384 => TsigAlgorithm::HmacSha384,
            Algorithm::HmacSha512 => TsigAlgorithm::HmacSha512,
        };
        let signer_name = Name::from_ascii(key_name)
            .with_context(|| format!("{key_name:?} is not a valid TSIG key name"))?;
        let signer = TSigner::new(secret, algorithm, signer_name, 300)
            .map_err(|e| anyhow::anyhow!("TSIG key {key_name}: {e}"))?;
        Ok(Self {
            server,
            zone: wire::fqdn(zone).map_err(|e| anyhow::anyhow!("{e}"))?,
            zone_str: zone.to_string(),
            key_name: key_name.to_string(),
            signer,
        })
    }

    async fn client(&self) -> Result<Client<TokioRuntimeProvider>, ProviderError> {
        let (stream, handle) = TcpClientStream::new(
            self.server,
            None,
            Some(TIMEOUT),
            TokioRuntimeProvider::default(),
        );
        let stream = stream.await.map_err(|e| {
            ProviderError::Transient(format!("connecting to the DNS server {}: {e}", self.server))
        })?;
        let mux = DnsMultiplexer::new(stream, handle)
            .with_timeout(TIMEOUT)
            .with_signer(self.signer.clone());
        let (client, background) = Client::from_sender(mux);
        tokio::spawn(background);
        Ok(client)
    }

    /// What a response code means for the loop.
    fn check(&self, what: &str, code: ResponseCode) -> Result<(), ProviderError> {
        match code {
            ResponseCode::NoError => Ok(()),
            ResponseCode::NotAuth | ResponseCode::Refused => Err(ProviderError::Fatal(format!(
                "{what}: the server {} answered {code}: check that the TSIG key {:?} (name, algorithm and secret) matches the server's, and that the zone's update-policy/allow-update and allow-transfer grant it",
                self.server, self.key_name
            ))),
            ResponseCode::NotZone => Err(ProviderError::Fatal(format!(
                "{what}: the server {} is not authoritative for {} (NOTZONE); check dns.zone and dns.provider.server",
                self.server, self.zone_str
            ))),
            ResponseCode::ServFail => Err(ProviderError::Transient(format!(
                "{what}: the server {} answered SERVFAIL",
                self.server
            ))),
            other => Err(ProviderError::Rejected(format!(
                "{what}: the server {} answered {other}",
                self.server
            ))),
        }
    }
}

/// The base64 secret from a file holding either the secret alone or a BIND key
/// statement (`secret "...";`).
fn parse_secret(text: &str) -> Option<Vec<u8>> {
    use base64::Engine as _;
    let candidate = match text.find("secret") {
        Some(i) => text[i + "secret".len()..].split('"').nth(1)?,
        None => text.trim(),
    };
    base64::engine::general_purpose::STANDARD
        .decode(candidate.trim())
        .ok()
        .filter(|k| !k.is_empty())
}

fn net_error(
    server: SocketAddr,
    key: &str,
    what: &str,
    e: impl std::fmt::Display,
) -> ProviderError {
    let text = e.to_string();
    // A response hickory cannot verify (no TSIG, a bad MAC) is an authentication
    // problem, not a network one.
    if text.contains("TSIG")
        || text.contains("tsig")
        || text.contains("BADKEY")
        || text.contains("BADSIG")
    {
        ProviderError::Fatal(format!(
            "{what}: the server {server} did not accept the TSIG key {key:?} (its answer was not signed with it: {text}); check that the key name, algorithm and secret match the server's key statement"
        ))
    } else {
        ProviderError::Transient(format!("{what}: {server}: {text}"))
    }
}

#[async_trait]
impl Provider for Rfc2136 {
    fn kind(&self) -> &'static str {
        "rfc2136"
    }

    fn set_ids(&self) -> bool {
        false
    }

    async fn records(&self) -> Result<Vec<RecordSet>, ProviderError> {
        let mut client = self.client().await?;
        let mut transfer = client.zone_transfer(self.zone.clone(), None);
        let mut records: Vec<Record> = Vec::new();
        while let Some(response) = transfer.next().await {
            let response = response
                .map_err(|e| net_error(self.server, &self.key_name, "zone transfer (AXFR)", e))?;
            self.check("zone transfer (AXFR)", response.metadata.response_code)?;
            records.extend(response.answers.iter().cloned());
        }
        if records.is_empty() {
            return Err(ProviderError::Fatal(format!(
                "zone transfer (AXFR) of {} from {} returned nothing; allow transfers to the TSIG key (allow-transfer {{ key \"{}\"; }};)",
                self.zone_str, self.server, self.key_name
            )));
        }
        Ok(wire::to_sets(&records))
    }

    async fn apply(&self, changes: &[Change]) -> Result<(), ProviderError> {
        let mut message = Message::query();
        message.metadata.op_code = OpCode::Update;
        message.metadata.recursion_desired = false;
        let mut zone = Query::new();
        zone.set_name(self.zone.clone())
            .set_query_class(DNSClass::IN)
            .set_query_type(RecordType::SOA);
        message.add_zone(zone);
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
            // Replace the whole set: delete it (class ANY, no data), then add the values.
            let rtype = wire::record_type(set.kind);
            let mut delete = Record::update0(wire::fqdn(&set.name)?, 0, rtype);
            delete.dns_class = DNSClass::ANY;
            delete.data = RData::Update0(rtype);
            message.add_update(delete);
            if let Change::Upsert(s) = change {
                for r in wire::to_records(s)? {
                    message.add_update(r);
                }
            }
        }
        let client = self.client().await?;
        let mut responses = client.send(DnsRequest::from(message));
        let response = responses
            .next()
            .await
            .ok_or_else(|| {
                ProviderError::Transient(format!("{}: no answer to the update", self.server))
            })?
            .map_err(|e| net_error(self.server, &self.key_name, "update", e))?;
        self.check("update", response.metadata.response_code)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_from_plain_and_bind_files() {
        assert_eq!(parse_secret("aGVsbG8=\n").unwrap(), b"hello");
        let bind = "key \"rampart\" {\n\talgorithm hmac-sha256;\n\tsecret \"aGVsbG8=\";\n};\n";
        assert_eq!(parse_secret(bind).unwrap(), b"hello");
        assert!(parse_secret("not base64 !").is_none());
        assert!(parse_secret("").is_none());
    }
}
