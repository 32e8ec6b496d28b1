//! Request spans over OTLP/HTTP (protobuf, the OpenTelemetry collector's
//! `/v1/traces`): one server span per sampled request and a client span per upstream
//! attempt, in the OpenTelemetry HTTP semantic conventions. Spans are built from what
//! [`super::finish`] already has, queued without waiting (a full queue drops and
//! counts), and sent in batches by one background thread, so the request path never
//! waits for the collector. The messages are the official definitions
//! (`opentelemetry-proto`), encoded with prost.

use std::sync::mpsc::{sync_channel, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::{any_value, AnyValue, InstrumentationScope, KeyValue};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::{
    span, status, ResourceSpans, ScopeSpans, Span, Status,
};
use prometheus::{IntCounter, IntCounterVec};
use prost::Message;

/// Spans sent in one request to the collector at most.
const BATCH: usize = 512;
/// A batch goes out at least this often while spans wait.
const FLUSH: Duration = Duration::from_secs(1);
/// One export may take this long.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(10);

/// The exporter's counters.
#[derive(Clone, Debug)]
pub struct SpanCounters {
    /// Spans the collector accepted.
    pub exported: IntCounter,
    /// Spans dropped, by reason (`queue_full`, `export_failed`).
    pub dropped: IntCounterVec,
}

/// The queue of spans and the thread exporting them; the thread ends once every
/// sender is gone (the generations using this exporter).
#[derive(Debug)]
pub struct Exporter {
    endpoint: String,
    service: String,
    capacity: usize,
    tx: SyncSender<Span>,
    counters: SpanCounters,
}

impl Exporter {
    /// Starts an exporter to `endpoint` for `service` with a queue of `capacity` spans.
    ///
    /// # Errors
    /// When the HTTP client or the thread cannot be made.
    pub fn start(
        endpoint: &str,
        service: &str,
        capacity: usize,
        counters: SpanCounters,
    ) -> anyhow::Result<Arc<Self>> {
        let (tx, rx) = sync_channel(capacity);
        let client = reqwest::Client::builder()
            .timeout(EXPORT_TIMEOUT)
            .build()
            .context("tracing: the OTLP HTTP client")?;
        let resource = Resource {
            attributes: vec![string("service.name", service)],
            ..Resource::default()
        };
        let (thread_endpoint, thread_counters) = (endpoint.to_string(), counters.clone());
        std::thread::Builder::new()
            .name("otlp-export".into())
            .spawn(move || export_loop(&rx, &client, &thread_endpoint, &resource, &thread_counters))
            .context("tracing: starting the OTLP exporter")?;
        Ok(Arc::new(Self {
            endpoint: endpoint.to_string(),
            service: service.to_string(),
            capacity,
            tx,
            counters,
        }))
    }

    /// Whether this exporter is the one `settings` describe (a reload keeps it then).
    #[must_use]
    pub fn serves(&self, settings: &rampart_config::Tracing) -> bool {
        self.endpoint == settings.otlp_endpoint
            && self.service == settings.service_name
            && self.capacity == settings.queue
    }

    /// Queues `span`; drops and counts it when the queue is full.
    pub fn send(&self, span: Span) {
        if let Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) = self.tx.try_send(span) {
            self.counters
                .dropped
                .with_label_values(&["queue_full"])
                .inc();
        }
    }
}

/// Batches what is queued and posts it; a failed export drops its batch (counted)
/// rather than holding spans the collector may never take.
fn export_loop(
    rx: &Receiver<Span>,
    client: &reqwest::Client,
    endpoint: &str,
    resource: &Resource,
    counters: &SpanCounters,
) {
    let Ok(rt) = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    else {
        tracing::error!("tracing: no runtime for the OTLP exporter; spans are dropped");
        return;
    };
    let mut failing = false;
    loop {
        let mut batch = Vec::with_capacity(BATCH);
        match rx.recv() {
            Ok(span) => batch.push(span),
            Err(_) => return,
        }
        let deadline = Instant::now() + FLUSH;
        while batch.len() < BATCH {
            match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok(span) => batch.push(span),
                Err(RecvTimeoutError::Timeout) => break,
                Err(RecvTimeoutError::Disconnected) => break,
            }
        }
        let n = batch.len() as u64;
        let body = ExportTraceServiceRequest {
            resource_spans: vec![ResourceSpans {
                resource: Some(resource.clone()),
                scope_spans: vec![ScopeSpans {
                    scope: Some(InstrumentationScope {
                        name: "rampart".into(),
                        version: env!("CARGO_PKG_VERSION").into(),
                        ..InstrumentationScope::default()
                    }),
                    spans: batch,
                    schema_url: String::new(),
                }],
                schema_url: String::new(),
            }],
        }
        .encode_to_vec();
        let sent = rt.block_on(async {
            client
                .post(endpoint)
                .header(http::header::CONTENT_TYPE, "application/x-protobuf")
                .body(body)
                .send()
                .await
                .and_then(reqwest::Response::error_for_status)
        });
        match sent {
            Ok(_) => {
                failing = false;
                counters.exported.inc_by(n);
            }
            Err(e) => {
                counters
                    .dropped
                    .with_label_values(&["export_failed"])
                    .inc_by(n);
                if !failing {
                    failing = true;
                    tracing::warn!(
                        "tracing: exporting to {endpoint}: {e}; spans are dropped until it works"
                    );
                }
            }
        }
    }
}

/// A string attribute.
#[must_use]
pub fn string(key: &str, value: &str) -> KeyValue {
    attr(key, any_value::Value::StringValue(value.to_string()))
}

/// An integer attribute.
#[must_use]
pub fn int(key: &str, value: i64) -> KeyValue {
    attr(key, any_value::Value::IntValue(value))
}

/// A boolean attribute.
#[must_use]
pub fn boolean(key: &str, value: bool) -> KeyValue {
    attr(key, any_value::Value::BoolValue(value))
}

fn attr(key: &str, value: any_value::Value) -> KeyValue {
    KeyValue {
        key: key.to_string(),
        value: Some(AnyValue { value: Some(value) }),
        ..KeyValue::default()
    }
}

/// Unix nanoseconds of `at`.
#[must_use]
pub fn unix_nanos(at: SystemTime) -> u64 {
    at.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

/// What a span needs besides its attributes.
#[derive(Clone, Copy, Debug)]
pub struct SpanIds {
    /// The trace.
    pub trace_id: u128,
    /// This span.
    pub span_id: u64,
    /// Its parent, if any.
    pub parent: Option<u64>,
    /// Trace flags.
    pub flags: u8,
}

/// A span of `kind` (server or client) named `name` from `start` to `end`.
#[must_use]
pub fn span(
    ids: SpanIds,
    name: String,
    kind: span::SpanKind,
    (start, end): (SystemTime, SystemTime),
    attributes: Vec<KeyValue>,
    error: bool,
) -> Span {
    Span {
        trace_id: ids.trace_id.to_be_bytes().to_vec(),
        span_id: ids.span_id.to_be_bytes().to_vec(),
        parent_span_id: ids
            .parent
            .map(|p| p.to_be_bytes().to_vec())
            .unwrap_or_default(),
        flags: u32::from(ids.flags),
        name,
        kind: kind as i32,
        start_time_unix_nano: unix_nanos(start),
        end_time_unix_nano: unix_nanos(end),
        attributes,
        status: error.then(|| Status {
            message: String::new(),
            code: status::StatusCode::Error as i32,
        }),
        ..Span::default()
    }
}
