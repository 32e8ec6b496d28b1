//! The Route53 provider (aws-sdk-route53): one change batch per planner batch, with our
//! own jittered back-off on `Throttling` and `PriorRequestNotComplete` (the SDK's retry
//! is turned off so that the policy is in one place), and an optional wait for INSYNC.

use std::time::Duration;

use async_trait::async_trait;
use aws_config::retry::RetryConfig;
use aws_config::{BehaviorVersion, Region};
use aws_sdk_route53::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_route53::types::{
    Change as AwsChange, ChangeAction, ChangeBatch, ChangeStatus, ResourceRecord,
    ResourceRecordSet, RrType,
};
use aws_sdk_route53::Client;
use rand::Rng as _;
use tokio::sync::OnceCell;

use super::plan::{Change, Kind, RecordSet};
use super::provider::{in_zone, Provider, ProviderError};

/// Attempts of one call while Route53 throttles, before giving up until the next pass.
const ATTEMPTS: u32 = 6;
/// First back-off; doubled per attempt, with full jitter.
const BACKOFF: Duration = Duration::from_millis(250);
/// Longest single back-off.
const BACKOFF_CAP: Duration = Duration::from_secs(8);
/// How long to wait for a change to become INSYNC.
const INSYNC_DEADLINE: Duration = Duration::from_secs(300);

/// A Route53 hosted zone.
#[derive(Debug)]
pub struct Route53 {
    client: Client,
    zone: String,
    zone_id: OnceCell<String>,
    configured_id: Option<String>,
    wait_for_insync: bool,
}

impl Route53 {
    /// A provider for `zone`, with credentials and region from the AWS chain.
    pub async fn new(
        zone: &str,
        hosted_zone_id: Option<String>,
        region: Option<String>,
        endpoint_url: Option<String>,
        wait_for_insync: bool,
    ) -> anyhow::Result<Self> {
        // The SDK's HTTPS client panics when the system has no root certificates (a
        // FROM-scratch image without a CA bundle): say so instead.
        if rustls_native_certs::load_native_certs().certs.is_empty() {
            anyhow::bail!(
                "no trusted root certificates on this system, and the AWS SDK needs them to reach Route53: install the ca-certificates package, or point SSL_CERT_FILE at a PEM bundle (deploy/docker images carry one at /etc/ssl/certs/ca-certificates.crt)"
            );
        }
        let mut loader = aws_config::defaults(BehaviorVersion::latest());
        if let Some(r) = region {
            loader = loader.region(Region::new(r));
        }
        let shared = loader.load().await;
        Ok(Self::from_sdk_config(
            &shared,
            zone,
            hosted_zone_id,
            endpoint_url,
            wait_for_insync,
        ))
    }

    /// A provider for `zone` with an explicit AWS configuration (credentials, region).
    #[must_use]
    pub fn from_sdk_config(
        shared: &aws_config::SdkConfig,
        zone: &str,
        hosted_zone_id: Option<String>,
        endpoint_url: Option<String>,
        wait_for_insync: bool,
    ) -> Self {
        let mut conf =
            aws_sdk_route53::config::Builder::from(shared).retry_config(RetryConfig::disabled());
        if shared.region().is_none() {
            // Route53 is a global service; any region signs its requests.
            conf = conf.region(Region::new("us-east-1"));
        }
        if let Some(url) = endpoint_url {
            conf = conf.endpoint_url(url);
        }
        Self {
            client: Client::from_conf(conf.build()),
            zone: zone.to_string(),
            zone_id: OnceCell::new(),
            configured_id: hosted_zone_id
                .map(|id| id.trim_start_matches("/hostedzone/").to_string()),
            wait_for_insync,
        }
    }

    /// The hosted zone id: configured, or looked up once by name.
    async fn zone_id(&self) -> Result<&str, ProviderError> {
        self.zone_id
            .get_or_try_init(|| async {
                if let Some(id) = &self.configured_id {
                    return Ok(id.clone());
                }
                let out = retry("ListHostedZonesByName", || {
                    self.client
                        .list_hosted_zones_by_name()
                        .dns_name(format!("{}.", self.zone))
                        .max_items(1)
                        .send()
                })
                .await?;
                out.hosted_zones()
                    .iter()
                    .find(|z| z.name().trim_end_matches('.').eq_ignore_ascii_case(&self.zone))
                    .map(|z| z.id().trim_start_matches("/hostedzone/").to_string())
                    .ok_or_else(|| {
                        ProviderError::Fatal(format!(
                            "no Route53 hosted zone named {}; create it, or set dns.provider.hosted_zone_id",
                            self.zone
                        ))
                    })
            })
            .await
            .map(String::as_str)
    }

    async fn wait_insync(&self, change_id: &str) -> Result<(), ProviderError> {
        let deadline = tokio::time::Instant::now() + INSYNC_DEADLINE;
        loop {
            let out = retry("GetChange", || {
                self.client.get_change().id(change_id).send()
            })
            .await?;
            if out
                .change_info()
                .is_some_and(|c| c.status() == &ChangeStatus::Insync)
            {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(ProviderError::Transient(format!(
                    "change {change_id} not INSYNC after {}s",
                    INSYNC_DEADLINE.as_secs()
                )));
            }
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
    }
}

/// Runs `call` with jittered exponential back-off while Route53 throttles.
async fn retry<T, E, F, Fut>(what: &str, mut call: F) -> Result<T, ProviderError>
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, SdkError<E>>>,
{
    let mut attempt = 0;
    loop {
        attempt += 1;
        let err = match call().await {
            Ok(v) => return Ok(v),
            Err(e) => e,
        };
        let code = err.code().unwrap_or_default().to_string();
        let message = err.message().unwrap_or_default().to_string();
        let throttled = matches!(
            code.as_str(),
            "Throttling"
                | "ThrottlingException"
                | "PriorRequestNotComplete"
                | "RequestLimitExceeded"
        );
        if throttled && attempt < ATTEMPTS {
            let cap = BACKOFF.saturating_mul(1 << (attempt - 1)).min(BACKOFF_CAP);
            let pause = rand::rng().random_range(Duration::ZERO..=cap);
            tracing::debug!("Route53 {what}: {code}; retrying in {pause:?} (attempt {attempt})");
            tokio::time::sleep(pause).await;
            continue;
        }
        return Err(classify(what, &code, &message, &err));
    }
}

fn classify<E: std::error::Error + Send + Sync + 'static>(
    what: &str,
    code: &str,
    message: &str,
    err: &SdkError<E>,
) -> ProviderError {
    match code {
        "InvalidChangeBatch" | "InvalidInput" => {
            ProviderError::Rejected(format!("Route53 {what}: {code}: {message}"))
        }
        "NoSuchHostedZone" => ProviderError::Fatal(format!(
            "Route53 {what}: {message}; check dns.provider.hosted_zone_id"
        )),
        "AccessDenied" | "AccessDeniedException" | "InvalidClientTokenId" | "SignatureDoesNotMatch"
        | "UnrecognizedClientException" | "ExpiredToken" => ProviderError::Fatal(format!(
            "Route53 {what}: {code}: {message}; check the AWS credentials and that their policy allows route53:ListResourceRecordSets, route53:ChangeResourceRecordSets and route53:GetChange (README, DNS automation)"
        )),
        "" => ProviderError::Transient(format!(
            "Route53 {what}: {}",
            aws_sdk_route53::error::DisplayErrorContext(err)
        )),
        _ => ProviderError::Transient(format!("Route53 {what}: {code}: {message}")),
    }
}

fn rr_type(kind: Kind) -> RrType {
    match kind {
        Kind::A => RrType::A,
        Kind::Aaaa => RrType::Aaaa,
        Kind::Txt => RrType::Txt,
    }
}

/// Route53 writes `*` and other characters as `\ooo` octal escapes.
fn unescape(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    let bytes = name.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && i + 3 < bytes.len()
            && bytes[i + 1..i + 4].iter().all(u8::is_ascii_digit)
        {
            let n = u8::from_str_radix(&name[i + 1..i + 4], 8).unwrap_or(b'?');
            out.push(char::from(n));
            i += 4;
        } else {
            out.push(char::from(bytes[i]));
            i += 1;
        }
    }
    out.trim_end_matches('.').to_ascii_lowercase()
}

fn to_aws(action: ChangeAction, set: &RecordSet) -> Result<AwsChange, ProviderError> {
    let invalid = |e: aws_sdk_route53::error::BuildError| {
        ProviderError::Rejected(format!("{} {:?}: {e}", set.name, set.kind))
    };
    let mut rrs = ResourceRecordSet::builder()
        .name(format!("{}.", set.name))
        .r#type(rr_type(set.kind))
        .ttl(i64::from(set.ttl));
    if let Some(id) = &set.set_id {
        rrs = rrs.set_identifier(id);
        rrs = match set.weight {
            Some(w) => rrs.weight(i64::from(w)),
            None => rrs.multi_value_answer(true),
        };
    }
    for v in &set.values {
        rrs = rrs.resource_records(
            ResourceRecord::builder()
                .value(v)
                .build()
                .map_err(invalid)?,
        );
    }
    AwsChange::builder()
        .action(action)
        .resource_record_set(rrs.build().map_err(invalid)?)
        .build()
        .map_err(invalid)
}

#[async_trait]
impl Provider for Route53 {
    fn kind(&self) -> &'static str {
        "route53"
    }

    fn set_ids(&self) -> bool {
        true
    }

    async fn records(&self) -> Result<Vec<RecordSet>, ProviderError> {
        let zone_id = self.zone_id().await?;
        let mut out = Vec::new();
        let mut start: Option<(String, RrType, Option<String>)> = None;
        loop {
            let page = retry("ListResourceRecordSets", || {
                let mut req = self
                    .client
                    .list_resource_record_sets()
                    .hosted_zone_id(zone_id)
                    .max_items(300);
                if let Some((name, kind, id)) = &start {
                    req = req
                        .start_record_name(name)
                        .start_record_type(kind.clone())
                        .set_start_record_identifier(id.clone());
                }
                req.send()
            })
            .await?;
            for rrs in page.resource_record_sets() {
                let kind = match rrs.r#type() {
                    RrType::A => Kind::A,
                    RrType::Aaaa => Kind::Aaaa,
                    RrType::Txt => Kind::Txt,
                    _ => continue,
                };
                let name = unescape(rrs.name());
                if !in_zone(&name, &self.zone) {
                    continue;
                }
                let mut values: std::collections::BTreeSet<String> = rrs
                    .resource_records()
                    .iter()
                    .map(|r| r.value().to_string())
                    .collect();
                if let Some(alias) = rrs.alias_target() {
                    // Never ours: kept so that the planner sees the name is taken.
                    values.insert(format!("ALIAS {}", alias.dns_name()));
                }
                out.push(RecordSet {
                    name,
                    kind,
                    set_id: rrs.set_identifier().map(str::to_string),
                    ttl: rrs.ttl().and_then(|t| u32::try_from(t).ok()).unwrap_or(0),
                    weight: rrs.weight().and_then(|w| u8::try_from(w).ok()),
                    values,
                });
            }
            if !page.is_truncated() {
                break;
            }
            start = match (page.next_record_name(), page.next_record_type()) {
                (Some(n), Some(t)) => Some((
                    n.to_string(),
                    t.clone(),
                    page.next_record_identifier().map(str::to_string),
                )),
                _ => break,
            };
        }
        Ok(out)
    }

    async fn apply(&self, changes: &[Change]) -> Result<(), ProviderError> {
        let zone_id = self.zone_id().await?;
        let mut batch = ChangeBatch::builder().comment("rampart");
        for change in changes {
            batch = batch.changes(match change {
                Change::Upsert(s) => to_aws(ChangeAction::Upsert, s)?,
                Change::Delete(s) => to_aws(ChangeAction::Delete, s)?,
            });
        }
        let batch = batch
            .build()
            .map_err(|e| ProviderError::Rejected(format!("change batch: {e}")))?;
        let out = retry("ChangeResourceRecordSets", || {
            self.client
                .change_resource_record_sets()
                .hosted_zone_id(zone_id)
                .change_batch(batch.clone())
                .send()
        })
        .await?;
        if self.wait_for_insync {
            if let Some(info) = out.change_info() {
                self.wait_insync(info.id()).await?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unescaped() {
        assert_eq!(unescape("\\052.Example.com."), "*.example.com");
        assert_eq!(unescape("www.example.com."), "www.example.com");
    }
}
