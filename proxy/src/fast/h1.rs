//! The HTTP/1 fast path: the common request — HTTP/1.1, no body or a Content-Length
//! body of up to 64 KiB, no upgrade, its head complete in the first read — carried by
//! Rampart itself rather than by Pingora. What happens to it is decided by the one
//! request policy ([`policy::decide`]) that Pingora's path calls too; this module only
//! moves bytes: it parses the head, writes the policy's answer or the upstream head of
//! its forward plan, and runs the upstream attempt (balancer pick, pooled connection,
//! retries, timeouts, passive health, body streaming). A request it cannot carry
//! (chunked or large bodies, `Expect`, upgrades, HTTP/1.0, an incomplete first read) is
//! declined before the policy runs and goes to Pingora with the bytes read so far
//! ([`Served::Pingora`]), so no decision is ever made twice; a request forwarded to a
//! pool this path does not reach (TLS, HTTP/2, PROXY protocol) goes there with its
//! decision.
//!
//! Why: Pingora's HTTP/1 request cycle cost ~3× the CPU of a minimal forwarder per
//! request (loadtest/README.md, "the data-path question"). Here a request is parsed
//! once (httparse), its upstream head written in one buffer, and the response head
//! rewritten and sent together with the first body bytes; bodies are passed through
//! as they come (Content-Length, or chunked with [`ChunkScanner`] finding the end).
//! Upstream connections are kept per worker thread ([`IdlePool`]): workers are
//! single-threaded runtimes, so no lock is taken.
//!
//! `server.http1_fast_path = false` sends every request to Pingora.

use std::future::Future as _;
use std::io::Write as _;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{BufMut, BytesMut};
use http::header::{HeaderName, HeaderValue};
use http::{HeaderMap, Method, Uri};
use pingora::protocols::Stream;
use prometheus::IntCounter;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::upstream::FinalHead;
use super::{
    answer_request, body_failed, finish_upstream_head, forward_request, parse_length, push_header,
    request_line, BodyError, ConnInfo, Downstream, HopByHop, Prepared, Served, MAX_BODY,
    MAX_HEADERS,
};
use crate::access::Arrival;
use crate::clock::within;
use crate::generation::Generation;
use crate::headers::{tokens, HeaderEdits};
use crate::metrics::Metrics;
use crate::policy::{self, Answer, Forward, Verdict};

/// Serves the request whose first bytes are `bytes`, or hands them back for Pingora.
pub async fn serve(
    stream: &mut Stream,
    bytes: BytesMut,
    generation: Arc<Generation>,
    conn: ConnInfo<'_>,
) -> Served {
    let started = Instant::now();
    let mut raw_headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let Some(head) = Head::parse(&bytes, &mut raw_headers) else {
        return Served::Pingora(bytes, None);
    };
    let decision = policy::decide(&generation, head.policy_view(), conn.client()).await;
    if !super::reaches(&generation, &decision, false) {
        return Served::Pingora(bytes, Some(Box::new(decision)));
    }
    let (request_id, trace) = (decision.request_id, decision.trace);
    let mut client = Http1Client {
        stream,
        send_timeout: generation.config.limits.send_timeout.0,
    };
    let plan = match decision.verdict {
        Verdict::Forward(plan) => plan,
        Verdict::Answer(answer) => {
            // An unread body cannot be skipped safely: the connection ends.
            let close = head.client_close || conn.closing || head.body_len > 0;
            let arrival = Arrival::of(&generation, &head.parts, conn.peer, decision.route, trace);
            let request = Prepared::answering(
                &head.parts,
                decision.route,
                request_id,
                close,
                (arrival, trace),
            );
            let keep =
                answer_request(&mut client, &answer, &request, &generation, conn, started).await;
            return if keep {
                Served::KeepAlive
            } else {
                Served::Close
            };
        }
    };
    let arrival = Arrival::of(&generation, &head.parts, conn.peer, Some(plan.route), trace);
    let mut request = head.prepare(&plan, request_id, &generation, &bytes, (arrival, trace));
    drop(head);
    drop(bytes);
    if request.body_missing > 0 {
        if let Err(e) = read_body(client.stream, &mut request, &generation, started).await {
            body_failed(&mut client, e, &request, &generation, conn, started).await;
            return Served::Close;
        }
    }
    if forward_request(
        &mut client,
        (&request, &plan),
        &generation,
        conn,
        started,
        &super::upstream::Http1,
    )
    .await
    {
        Served::KeepAlive
    } else {
        Served::Close
    }
}

/// A request head this path can carry, parsed.
struct Head<'h, 'b> {
    req: httparse::Request<'h, 'b>,
    /// The head's bytes as received.
    raw: &'b [u8],
    parts: http::request::Parts,
    head_len: usize,
    body_len: u64,
    client_close: bool,
}

impl<'h, 'b> Head<'h, 'b> {
    /// Parses the head at the start of `bytes`; `None` when this path cannot carry the
    /// request (transport reasons only: no decision about it is made here).
    fn parse(bytes: &'b [u8], raw: &'h mut [httparse::Header<'b>]) -> Option<Self> {
        let mut req = httparse::Request::new(raw);
        // A head not complete in the first read or a head that does not parse: Pingora
        // reads on, or answers the error.
        let Ok(httparse::Status::Complete(head_len)) = req.parse(bytes) else {
            return None;
        };
        if req.version != Some(1) {
            return None;
        }
        let path = req.path?;
        // Origin-form and absolute-form; `*` and authority-form are Pingora's.
        if !(path.starts_with('/') || path.starts_with("http://") || path.starts_with("https://")) {
            return None;
        }
        let mut client_close = false;
        let mut length: Option<u64> = None;
        for h in req.headers.iter() {
            let name = h.name.as_bytes();
            if name.eq_ignore_ascii_case(b"transfer-encoding")
                || name.eq_ignore_ascii_case(b"upgrade")
                || name.eq_ignore_ascii_case(b"expect")
            {
                return None;
            }
            if name.eq_ignore_ascii_case(b"content-length") {
                // Several fields (even equal ones) and lists are Pingora's to reconcile
                // or refuse.
                if length.is_some() {
                    return None;
                }
                length = Some(parse_length(h.value)?);
            }
            if name.eq_ignore_ascii_case(b"connection") {
                client_close |= tokens(h.value).any(|t| t.eq_ignore_ascii_case(b"close"));
            }
        }
        let body_len = length.unwrap_or(0);
        let early = bytes.len() - head_len;
        // Bytes pipelined after the body, or a body larger than this path buffers.
        if early as u64 > body_len || body_len > MAX_BODY {
            return None;
        }
        let mut headers = HeaderMap::with_capacity(req.headers.len());
        for h in req.headers.iter() {
            let name = HeaderName::from_bytes(h.name.as_bytes()).ok()?;
            headers.append(name, HeaderValue::from_bytes(h.value).ok()?);
        }
        let (mut parts, ()) = http::Request::new(()).into_parts();
        parts.method = Method::from_bytes(req.method?.as_bytes()).ok()?;
        parts.uri = Uri::try_from(path).ok()?;
        parts.headers = headers;
        Some(Self {
            req,
            raw: &bytes[..head_len],
            parts,
            head_len,
            body_len,
            client_close,
        })
    }

    fn policy_view(&self) -> policy::Request<'_> {
        policy::Request {
            parts: &self.parts,
            raw_head: Some(self.raw),
            raw_target: self.req.path.unwrap_or("/").as_bytes(),
            body_ended: false,
        }
    }

    /// The request to forward under `plan`: its upstream head, then the body bytes
    /// that came with the head in `bytes`.
    fn prepare(
        &self,
        plan: &Forward,
        request_id: HeaderValue,
        generation: &Generation,
        bytes: &[u8],
        logged: (Option<Box<Arrival>>, Option<crate::policy::Trace>),
    ) -> Prepared {
        let head = upstream_head(&self.req, plan, generation, &request_id);
        let mut request = Prepared::new(&self.parts, (plan, generation), request_id, head, logged);
        request.client_close = self.client_close;
        request.with_body(self.body_len, &bytes[self.head_len..])
    }
}

/// Reads the rest of the request body from the client into the upstream request, as
/// the full path reads it: each read within `limits.body_read_timeout`, and after that
/// long no slower than `limits.min_body_rate`.
async fn read_body(
    stream: &mut Stream,
    request: &mut Prepared,
    generation: &Generation,
    started: Instant,
) -> Result<(), BodyError> {
    let limits = &generation.config.limits;
    request.upstream_head.reserve(request.body_missing);
    while request.body_missing > 0 {
        let mut room = (&mut request.upstream_head).limit(request.body_missing);
        let read = tokio::time::timeout(limits.body_read_timeout.0, stream.read_buf(&mut room));
        match read.await {
            Ok(Ok(n)) if n > 0 => request.body_missing -= n,
            Ok(_) => return Err(BodyError::ClientGone),
            Err(_) => return Err(BodyError::Stalled),
        }
        if request.body_too_slow(limits, started) {
            return Err(BodyError::TooSlow);
        }
    }
    Ok(())
}

/// An HTTP/1 client connection.
pub(crate) struct Http1Client<'a> {
    stream: &'a mut Stream,
    send_timeout: Duration,
}

impl Downstream for Http1Client<'_> {
    const PAYLOAD: bool = false;

    fn counter(metrics: &Metrics) -> &IntCounter {
        &metrics.fast_path_requests
    }

    async fn head(
        &mut self,
        raw: &[u8],
        head: &FinalHead,
        request: &Prepared,
        generation: &Generation,
        close: bool,
        body: &[u8],
        _end: bool,
    ) -> bool {
        let mut out = downstream_head(raw, head, request, generation, close);
        out.extend_from_slice(body);
        self.body(&out, false).await
    }

    async fn body(&mut self, bytes: &[u8], _end: bool) -> bool {
        if bytes.is_empty() {
            return true;
        }
        let write = async {
            self.stream.write_all(bytes).await?;
            self.stream.flush().await
        };
        matches!(within(self.send_timeout, write).await, Ok(Ok(())))
    }

    async fn answer(
        &mut self,
        answer: &Answer,
        request: &Prepared,
        generation: &Generation,
        close: bool,
    ) -> bool {
        let id = policy::id_header(generation, &request.request_id);
        let pages = request.pages(generation);
        let bytes = answer.h1_bytes(id, request.style, request.head_request, close, pages);
        self.body(&bytes, true).await
    }
}

/// The request head sent upstream under `plan`: the client's request line (or the
/// plan's target) and headers in their order and case, `Host` from the plan, without
/// hop-by-hop headers, with the forwarding headers and the request id.
fn upstream_head(
    req: &httparse::Request<'_, '_>,
    plan: &Forward,
    generation: &Generation,
    request_id: &HeaderValue,
) -> Vec<u8> {
    let id_name = &generation.forwarding.request_id;
    let hop_by_hop = HopByHop::of(req.headers);
    let raw_target = req.path.unwrap_or("/").as_bytes();
    let mut out = request_line(req.method.unwrap_or("GET"), raw_target, plan);
    let edits = &generation.routes[plan.route].request_headers;
    let mut host_sent = false;
    for h in req.headers.iter() {
        if h.name.eq_ignore_ascii_case("host") {
            if !host_sent && !edits.drops("host") {
                push_header(&mut out, h.name.as_bytes(), plan.host.as_bytes());
            }
            host_sent = true;
            continue;
        }
        if hop_by_hop.contains(h.name) || !generation.passes_header(plan, h.name) {
            continue;
        }
        push_header(&mut out, h.name.as_bytes(), h.value);
    }
    if !host_sent && !edits.drops("host") {
        // Spelt as Pingora spells a Host it adds.
        push_header(&mut out, b"Host", plan.host.as_bytes());
    }
    finish_upstream_head(&mut out, plan, edits, (id_name, request_id));
    out
}

/// The response head for the client: the upstream's status and headers without
/// hop-by-hop ones, with the request id, and `Connection: close` when the connection
/// ends after this response.
pub(crate) fn downstream_head(
    raw: &[u8],
    head: &FinalHead,
    request: &Prepared,
    generation: &Generation,
    close: bool,
) -> Vec<u8> {
    let mut raw_headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut raw_headers);
    // Parsed before: cannot fail.
    let _ = resp.parse(raw);
    let id_name = &generation.forwarding.request_id;
    let hop_by_hop = HopByHop::of(resp.headers);
    let mut out = Vec::with_capacity(raw.len() + 128);
    let _ = write!(
        out,
        "HTTP/1.1 {} {}\r\n",
        head.status,
        resp.reason.unwrap_or("")
    );
    let none = HeaderEdits::default();
    let edits = request.response_edits(generation).unwrap_or(&none);
    for h in resp.headers.iter() {
        if hop_by_hop.contains(h.name)
            || id_name.as_str().eq_ignore_ascii_case(h.name)
            || edits.drops(h.name)
        {
            continue;
        }
        push_header(&mut out, h.name.as_bytes(), h.value);
    }
    for (name, value) in &edits.set {
        push_header(&mut out, name.as_str().as_bytes(), value.as_bytes());
    }
    for cookie in head.cookies.iter().flatten() {
        push_header(&mut out, b"set-cookie", cookie.as_bytes());
    }
    push_header(
        &mut out,
        id_name.as_str().as_bytes(),
        request.request_id.as_bytes(),
    );
    if close {
        out.extend_from_slice(b"connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
    out
}

/// What the fast path would send upstream for the request whose first bytes are
/// `bytes` (its head, then the body bytes that came with it), from a client on
/// 127.0.0.1: `None` when it declines the request (to Pingora) or the policy answers
/// it. For the `http1` fuzz target; the policy must complete without waiting (no
/// `basic_auth` in `generation`), or this answers `None`.
#[doc(hidden)]
#[must_use]
pub fn upstream_request_for(bytes: &[u8], generation: &Generation) -> Option<Vec<u8>> {
    let mut raw = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let head = Head::parse(bytes, &mut raw)?;
    let client = crate::policy::Client {
        scheme: crate::edge::Scheme::Http,
        peer: Some(std::net::IpAddr::from([127, 0, 0, 1])),
        tls: None,
    };
    let decide = std::pin::pin!(policy::decide(generation, head.policy_view(), client));
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    let std::task::Poll::Ready(decision) = decide.poll(&mut cx) else {
        return None;
    };
    let Verdict::Forward(plan) = decision.verdict else {
        return None;
    };
    let request = head.prepare(&plan, decision.request_id, generation, bytes, (None, None));
    Some(request.upstream_head)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::edge::Scheme;
    use crate::headers::HOP_BY_HOP;
    use crate::policy::Client;

    /// A generation forwarding every request to a pool, for `prepare`.
    fn forwarding_generation() -> (Generation, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let text = format!(
            "[server]\ndata_dir = {:?}\n\n[listeners]\nhttp = \"127.0.0.1:0\"\n\n[[routes]]\nname = \"all\"\naction = {{ forward = \"app\" }}\n\n\
             [pools.app]\nendpoints = [{{ address = \"127.0.0.1:9\" }}]\n",
            dir.path()
        );
        let config = rampart_config::parse(&text, "test.toml").unwrap();
        let builder =
            crate::generation::Builder::new(dir.path().to_path_buf(), Arc::new(Metrics::new()));
        (builder.build(config, 1, None).unwrap(), dir)
    }

    fn parsed_upstream_head(head: &[u8]) -> (String, String, Vec<(String, String)>) {
        let mut raw = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut req = httparse::Request::new(&mut raw);
        let n = req.parse(head).expect("the upstream head parses");
        assert_eq!(n, httparse::Status::Complete(head.len()), "one whole head");
        assert_eq!(req.version, Some(1));
        let headers = req
            .headers
            .iter()
            .map(|h| {
                let value = String::from_utf8_lossy(h.value).into_owned();
                (h.name.to_ascii_lowercase(), value)
            })
            .collect();
        (
            req.method.unwrap().to_string(),
            req.path.unwrap().to_string(),
            headers,
        )
    }

    /// What the fast path sends upstream for the head `text`, or `None` when it
    /// declines it (to Pingora) or the policy answers it.
    fn forwarded_head(text: &str, generation: &Generation) -> Option<Prepared> {
        let mut raw = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let head = Head::parse(text.as_bytes(), &mut raw)?;
        let client = Client {
            scheme: Scheme::Http,
            peer: Some("127.0.0.1".parse().unwrap()),
            tls: None,
        };
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let decision = runtime.block_on(policy::decide(generation, head.policy_view(), client));
        let Verdict::Forward(plan) = decision.verdict else {
            return None;
        };
        Some(head.prepare(
            &plan,
            decision.request_id,
            generation,
            text.as_bytes(),
            (None, None),
        ))
    }

    /// Whatever a client sends, a request the fast path takes goes upstream as one
    /// unambiguous HTTP/1.1 head: same method, the target it was routed on, one Host,
    /// no framing but one `Content-Length`, the length of the body the fast path reads,
    /// no hop-by-hop header, forwarding headers of our own. At least a tenth of the
    /// generated heads must be forwarded, or the property checks too little.
    #[test]
    fn the_upstream_head_is_one_unambiguous_request() {
        use proptest::prelude::*;
        use std::sync::atomic::{AtomicUsize, Ordering};
        static GENERATION: std::sync::LazyLock<(Generation, tempfile::TempDir)> =
            std::sync::LazyLock::new(forwarding_generation);
        const CASES: u32 = 4096;
        let strategy = (
            proptest::sample::select(vec![
                "GET", "GET", "HEAD", "DELETE", "POST", "OPTIONS", "CONNECT", "G T",
            ]),
            proptest::sample::select(vec![
                "/",
                "/",
                "/a?b=c",
                "/a/../b",
                "//x",
                "*",
                "http://h/x",
                "http://a.test/y",
                "/%2e%2e/",
                "/a b",
                "/p#/../x",
            ]),
            proptest::collection::vec(
                (
                    proptest::sample::select(vec![
                        "Connection",
                        "Keep-Alive",
                        "TE",
                        "Transfer-Encoding",
                        "Content-Length",
                        "Upgrade",
                        "Expect",
                        "X-Forwarded-For",
                        "Forwarded",
                        "X-Request-Id",
                        "X-A",
                        "X-A",
                        "X-B",
                        "Trailer",
                        "Proxy-Connection",
                        "Bad Name",
                    ]),
                    proptest::sample::select(vec![
                        "a.test",
                        "close",
                        "keep-alive, x-a",
                        "host",
                        "chunked",
                        "0",
                        "0",
                        "5",
                        "0, 0",
                        "websocket",
                        "100-continue",
                        "1.2.3.4",
                        "x\tY",
                        "\u{e9}",
                        "",
                        "a\rb",
                    ]),
                ),
                0..4,
            ),
            any::<bool>(),
            proptest::sample::select(vec![0usize, 1, 1, 1, 1, 1, 1, 2]),
            proptest::sample::select(vec![
                "a.test",
                "a.test",
                "A.Test:80",
                "[::1]",
                "a.test\", for=1",
            ]),
        );
        let forwarded = AtomicUsize::new(0);
        let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig::with_cases(CASES));
        runner
            .run(
                &strategy,
                |(method, path, headers, bare_lf, hosts, host)| {
                    let generation = &GENERATION.0;
                    let eol = if bare_lf { "\n" } else { "\r\n" };
                    let mut text = format!("{method} {path} HTTP/1.1{eol}");
                    for _ in 0..hosts {
                        text.push_str(&format!("Host: {host}{eol}"));
                    }
                    for (name, value) in &headers {
                        text.push_str(&format!("{name}: {value}{eol}"));
                    }
                    text.push_str(eol);
                    let Some(prepared) = forwarded_head(&text, generation) else {
                        return Ok(());
                    };
                    forwarded.fetch_add(1, Ordering::Relaxed);
                    let (m, p, up) = parsed_upstream_head(&prepared.upstream_head);
                    prop_assert_eq!(m, method);
                    let routed = path
                        .strip_prefix("http://h")
                        .or_else(|| path.strip_prefix("http://a.test"))
                        .unwrap_or(path);
                    prop_assert_eq!(p, routed);
                    prop_assert!(!path.contains('#') && method != "CONNECT");
                    let count = |n: &str| up.iter().filter(|(k, _)| k == n).count();
                    prop_assert_eq!(count("host"), 1);
                    let sent_host = &up.iter().find(|(k, _)| k == "host").unwrap().1;
                    prop_assert!(
                        !sent_host.contains('"') && !sent_host.contains(','),
                        "host {}",
                        sent_host
                    );
                    prop_assert_eq!(count("x-forwarded-for"), 1);
                    prop_assert_eq!(count("x-request-id"), 1);
                    prop_assert_eq!(count("transfer-encoding"), 0);
                    prop_assert!(count("content-length") <= 1);
                    if count("content-length") == 0 {
                        prop_assert_eq!(prepared.body_len, 0);
                    }
                    for (k, v) in &up {
                        prop_assert!(!HOP_BY_HOP.contains(&k.as_str()), "{} went upstream", k);
                        if k == "content-length" {
                            prop_assert_eq!(v.trim().parse::<u64>().ok(), Some(prepared.body_len));
                            prop_assert_eq!(prepared.body_missing as u64, prepared.body_len);
                        }
                        if k == "x-forwarded-for" {
                            prop_assert_eq!(v, "127.0.0.1");
                        }
                    }
                    // Headers the client's Connection named stay behind, except those the
                    // proxy relies on.
                    let named: Vec<String> = headers
                        .iter()
                        .filter(|(n, _)| n.eq_ignore_ascii_case("connection"))
                        .flat_map(|(_, v)| v.split(',').map(|t| t.trim().to_ascii_lowercase()))
                        .filter(|t| {
                            !t.is_empty() && !crate::headers::PROTECTED.contains(&t.as_str())
                        })
                        .collect();
                    for n in named {
                        prop_assert_eq!(count(&n), 0, "{} was named by Connection", n);
                    }
                    Ok(())
                },
            )
            .unwrap();
        let forwarded = forwarded.into_inner();
        assert!(
            forwarded >= CASES as usize / 10,
            "only {forwarded} of {CASES} generated heads were forwarded"
        );
    }

    #[test]
    fn hop_by_hop_includes_headers_named_by_connection_but_not_framing() {
        let headers = [
            httparse::Header {
                name: "Connection",
                value: b"x-secret, content-length",
            },
            httparse::Header {
                name: "connection",
                value: b"close",
            },
        ];
        let hop = HopByHop::of(&headers);
        assert!(hop.contains("Keep-Alive"));
        assert!(hop.contains("X-Secret"));
        assert!(hop.contains("connection"));
        assert!(!hop.contains("Content-Length"));
        assert!(!hop.contains("x-other"));
    }
}
