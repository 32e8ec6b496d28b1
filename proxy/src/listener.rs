//! The client side of a listener, before HTTP: the connection limit, the TLS handshake
//! (with its own deadline and failure metrics), and the header read deadline. Then the
//! connection is handed to Pingora's HTTP proxy.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use async_trait::async_trait;
use pingora::apps::ServerApp;
use pingora::listeners::tls::Acceptor;
use pingora::protocols::Stream;
use pingora::proxy::HttpProxy;
use pingora::server::ShutdownWatch;

use crate::edge::Edge;
use crate::generation::Generation;
use crate::limits::deadline::{Arrivals, GuardedStream};
use crate::limits::rate::PerClient;

/// Longest wait at shutdown for requests of just-accepted connections to arrive.
const ARRIVAL_WAIT: Duration = Duration::from_secs(1);
use crate::metrics::Metrics;

/// A listener's connection handler wrapping the HTTP proxy.
pub struct EdgeApp {
    name: &'static str,
    proxy: Arc<HttpProxy<Edge>>,
    tls: Option<Acceptor>,
    current: Arc<ArcSwap<Generation>>,
    metrics: Arc<Metrics>,
    open: AtomicUsize,
    per_client: PerClient,
    arrivals: Arc<Arrivals>,
}

impl EdgeApp {
    /// A handler for the listener `name`; with `tls`, connections are TLS first.
    #[must_use]
    pub fn new(
        name: &'static str,
        proxy: HttpProxy<Edge>,
        tls: Option<Acceptor>,
        current: Arc<ArcSwap<Generation>>,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            name,
            proxy: Arc::new(proxy),
            tls,
            current,
            metrics,
            open: AtomicUsize::new(0),
            per_client: PerClient::default(),
            arrivals: Arc::new(Arrivals::default()),
        }
    }
}

/// Decrements the open-connection counts and gauge when a connection ends.
struct OpenGuard<'a>(&'a EdgeApp, Option<std::net::IpAddr>);

impl Drop for OpenGuard<'_> {
    fn drop(&mut self) {
        if let Some(ip) = self.1 {
            self.0.per_client.release(ip);
        }
        self.0.open.fetch_sub(1, Ordering::Relaxed);
        self.0
            .metrics
            .active_connections
            .with_label_values(&[self.0.name])
            .dec();
    }
}

#[async_trait]
impl ServerApp for EdgeApp {
    async fn process_new(
        self: &Arc<Self>,
        stream: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        let generation = self.current.load_full();
        let limits = &generation.config.limits;
        if self.open.fetch_add(1, Ordering::Relaxed) >= limits.max_connections {
            self.open.fetch_sub(1, Ordering::Relaxed);
            self.metrics
                .rejected_connections
                .with_label_values(&[self.name])
                .inc();
            return None;
        }
        let client = stream
            .get_socket_digest()
            .and_then(|d| d.peer_addr().and_then(|a| a.as_inet()).map(|a| a.ip()));
        if let Some(ip) = client {
            if !self.per_client.admit(ip, limits.max_connections_per_ip) {
                self.open.fetch_sub(1, Ordering::Relaxed);
                self.metrics
                    .rejected_client_connections
                    .with_label_values(&[self.name])
                    .inc();
                return None;
            }
        }
        self.metrics
            .active_connections
            .with_label_values(&[self.name])
            .inc();
        let _open = OpenGuard(self, client);
        let header_timeout = limits.header_read_timeout.0;
        drop(generation);

        let stream: Stream = match &self.tls {
            None => stream,
            Some(acceptor) => match self.handshake(acceptor, stream, header_timeout).await {
                Some(s) => s,
                None => return None,
            },
        };
        // HTTP/2 multiplexes many requests on one connection: the HTTP/1 header deadline
        // does not apply (its own limits are a later hardening item).
        let is_h2 = matches!(
            pingora::protocols::Ssl::selected_alpn_proto(&*stream),
            Some(pingora::protocols::ALPN::H2)
        );
        let stream: Stream = if is_h2 {
            stream
        } else {
            let metrics = self.metrics.clone();
            Box::new(
                GuardedStream::with_deadline(
                    stream,
                    header_timeout,
                    Arc::new(move || metrics.header_timeouts.inc()),
                )
                .counting(self.arrivals.ticket()),
            )
        };
        self.proxy.process_new(stream, shutdown).await
    }

    async fn cleanup(&self) {
        // The listener is closed by now; let requests of connections accepted just
        // before it closed arrive before Pingora drops connections awaiting a header.
        let limit = self.current.load().config.limits.header_read_timeout.0;
        self.arrivals.settled(limit.min(ARRIVAL_WAIT)).await;
        self.proxy.cleanup().await;
    }
}

impl EdgeApp {
    async fn handshake(
        &self,
        acceptor: &Acceptor,
        stream: Stream,
        limit: Duration,
    ) -> Option<Stream> {
        match tokio::time::timeout(limit, acceptor.tls_handshake(GuardedStream::plain(stream)))
            .await
        {
            Ok(Ok(tls)) => {
                self.metrics.tls_handshakes.inc();
                Some(Box::new(tls))
            }
            Ok(Err(e)) => {
                let reason = handshake_failure_reason(&e);
                // unknown_sni is counted by the resolver, which knows the name.
                if reason != "unknown_sni" {
                    self.metrics
                        .tls_handshake_failures
                        .with_label_values(&[reason])
                        .inc();
                }
                tracing::debug!(reason, "TLS handshake failed: {e}");
                None
            }
            Err(_) => {
                self.metrics
                    .tls_handshake_failures
                    .with_label_values(&["timeout"])
                    .inc();
                None
            }
        }
    }
}

/// A metric label for why a handshake failed, from the rustls error underneath.
fn handshake_failure_reason(e: &pingora::Error) -> &'static str {
    let mut source: Option<&(dyn std::error::Error + 'static)> = e
        .cause
        .as_deref()
        .map(|c| c as &(dyn std::error::Error + 'static));
    while let Some(err) = source {
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            if let Some(tls) = io.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
                return rustls_reason(tls);
            }
            return match io.kind() {
                std::io::ErrorKind::UnexpectedEof
                | std::io::ErrorKind::ConnectionReset
                | std::io::ErrorKind::BrokenPipe => "client_closed",
                _ => "io",
            };
        }
        if let Some(tls) = err.downcast_ref::<rustls::Error>() {
            return rustls_reason(tls);
        }
        source = err.source();
    }
    "other"
}

fn rustls_reason(e: &rustls::Error) -> &'static str {
    match e {
        rustls::Error::General(msg) if msg.contains("no server certificate") => "unknown_sni",
        rustls::Error::PeerIncompatible(_) => "incompatible_client",
        rustls::Error::InvalidMessage(_)
        | rustls::Error::InappropriateMessage { .. }
        | rustls::Error::InappropriateHandshakeMessage { .. } => "bad_message",
        rustls::Error::AlertReceived(_) => "client_alert",
        rustls::Error::NoApplicationProtocol => "no_alpn",
        _ => "other",
    }
}
