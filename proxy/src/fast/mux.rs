//! HTTP/2 upstreams of the HTTP/2 fast path: a request for an `h2` or `h2c` pool
//! (without a PROXY header) goes out as a stream of one of this worker's HTTP/2
//! connections to the endpoint, and its response — head, DATA as it arrives, trailers
//! (gRPC's status) — goes back on the client's stream. A body of unknown length (a
//! gRPC call, an upload) goes up as the client sends it while the response comes down,
//! both directions at once, as streaming gRPC calls need ([`Relay`]). The retry loop, the balancer's
//! pick, passive health, the error pages and the answers are the HTTP/1 attempt's
//! ([`upstream::forward`], [`upstream::judge_head`]); only the exchange differs.
//!
//! Why: through Pingora's path an HTTP/2 upstream cost 2.8× HAProxy's CPU per request
//! (loadtest/README.md, "Upstream protocols"), most of it Pingora's proxy session
//! around the `h2` client, which this path does without.
//!
//! Connections: per worker thread and endpoint (and TLS settings), as many as the
//! streams in flight need at the pool's `max_streams` each; a new one is opened under
//! the endpoint's connect gate, so a burst opens one connection, not one per request.
//! One with no stream for the pool's idle timeout is closed by its own task.

use std::cell::RefCell;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use std::future::poll_fn;
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use h2::client::SendRequest;
use h2::SendStream;
use http::header::{HeaderValue, HOST, TE};
use http::{Request, Uri};
use pingora::protocols::http::v2::server::HttpSession;

use super::h2::Http2Client;
use super::upstream::{self, judge_head, Attempt, Attempter, Failed, FailureKind, Relayed, Try};
use super::BodyError;
use crate::clock;
use crate::generation::{Generation, PoolRt};
use crate::limits::{BodyBreach, StreamedBody};
use crate::policy::Forward;

/// A stream's receive window: what an upstream may send ahead of the client reading
/// it, and so what a stream's slow client can keep buffered here (HTTP/2's default).
const STREAM_WINDOW: u32 = 65_535;
/// The largest window HTTP/2 allows (RFC 9113 §6.9.1).
const MAX_WINDOW: u32 = 0x7fff_ffff;

/// How a request goes to an HTTP/2 upstream: the first attempt's request, built
/// before the body is read, and what a retry needs to build its own. Its body is the
/// prepared request's (read whole before the first attempt, sent again by a retry) or
/// the client's, passed on as it arrives ([`Upload`]).
pub(crate) struct MuxRequest {
    /// Taken by the first attempt (moved into `h2`, not copied).
    first: std::sync::Mutex<Option<Request<()>>>,
    /// The body is passed on as the client sends it (see [`Upload`]).
    streamed: bool,
}

impl MuxRequest {
    /// The upstream request for the HTTP/2 request `session` holds under `plan`
    /// ([`upstream_request`]); `None` when the target is not a valid URI.
    pub(crate) fn new(
        session: &HttpSession,
        (plan, pool): (&Forward, &PoolRt),
        generation: &Generation,
        request_id: &HeaderValue,
    ) -> Option<Self> {
        let first = upstream_request(session, (plan, pool), generation, request_id)?;
        Some(Self {
            first: std::sync::Mutex::new(Some(first)),
            streamed: false,
        })
    }

    /// The request's body is passed on as the client sends it, rather than read whole
    /// first (only the first try can send it).
    pub(crate) fn streaming_body(self) -> Self {
        Self {
            streamed: true,
            ..self
        }
    }

    /// The request for a try: the first one, or one built again for a retry.
    fn take(&self, client: &Http2Client<'_>, t: &Try<'_>) -> Option<Request<()>> {
        let first = self
            .first
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        first.or_else(|| {
            let id = &t.request.request_id;
            upstream_request(client.session(), (t.plan, t.pool), t.generation, id)
        })
    }
}

/// The upstream request for the HTTP/2 request `session` holds under `plan`: its
/// method and target (or the plan's), `:authority` the plan's host, the headers every
/// transport passes (an HTTP/2 request has no connection-specific fields but
/// `TE: trailers`, which goes on), and the forwarding headers, the route's own and the
/// request id. `None` when the target is not a valid URI.
fn upstream_request(
    session: &HttpSession,
    (plan, pool): (&Forward, &PoolRt),
    generation: &Generation,
    request_id: &HeaderValue,
) -> Option<Request<()>> {
    let req = session.req_header();
    let target = plan
        .target
        .as_deref()
        .unwrap_or_else(|| req.uri.path_and_query().map_or("/", |pq| pq.as_str()));
    let scheme = if pool.peer.tls.is_some() {
        "https"
    } else {
        "http"
    };
    let authority = plan.host.to_str().ok()?;
    let uri = Uri::builder()
        .scheme(scheme)
        .authority(authority)
        .path_and_query(target)
        .build()
        .ok()?;
    let edits = &generation.routes[plan.route].request_headers;
    let mut out = Request::new(());
    *out.method_mut() = req.method.clone();
    *out.uri_mut() = uri;
    let headers = out.headers_mut();
    headers.reserve(req.headers.len() + plan.forwarded.len() + 4);
    for (name, value) in &req.headers {
        if name == HOST || name == TE || !generation.passes_header(plan, name.as_str()) {
            continue;
        }
        headers.append(name.clone(), value.clone());
    }
    if crate::headers::te_trailers(&req.headers) {
        headers.insert(TE, HeaderValue::from_static("trailers"));
    }
    let id = (&generation.forwarding.request_id, request_id);
    for (name, value) in super::added_headers(plan, edits, id) {
        // Made of valid header values by the policy and the configuration.
        if let Ok(mut value) = HeaderValue::from_bytes(value) {
            // Values that never repeat stay out of the HPACK table (as the request id,
            // see `policy::request_id`).
            value.set_sensitive(name == id.0 || name == "traceparent");
            headers.append(name.clone(), value);
        }
    }
    Some(out)
}

impl Attempter<Http2Client<'_>> for MuxRequest {
    async fn attempt(&self, client: &mut Http2Client<'_>, t: Try<'_>) -> Attempt {
        let Try {
            request,
            plan,
            generation,
            pool,
            idx,
            deadline,
            conn,
            ..
        } = t;
        let mut upload = self.upload(&t);
        let Exchanged {
            response,
            mut stream,
            slot,
            sent_at,
            connect,
        } = match self.exchange(client, &t, &mut upload).await {
            Ok(e) => e,
            Err(ended) => return ended,
        };
        let head_at = Instant::now();
        let ttfb = head_at.duration_since(sent_at);
        let (parts, mut body) = response.into_parts();
        let status = parts.status.as_u16();
        // Dropping `body` resets the upstream stream when the try ends here.
        if let Some(ended) = judge_head(client, &t, status, (head_at, ttfb), connect).await {
            return ended;
        }
        let cookies = plan.set_cookies(pool, idx, conn.scheme == crate::edge::Scheme::Https);
        let Some(header) = super::h2::response_header_of(parts, &cookies, request, generation)
        else {
            // A header the client's stream cannot carry: the stream is reset.
            return Attempt::Done(Relayed {
                status: 502,
                body_bytes: 0,
                ttfb,
                connect,
                keep_alive: false,
            });
        };
        let ended = body.is_end_stream() || request.head_request;
        let mut relay = Relay {
            ended,
            client_ok: client.send(header, &[], ended).await,
            sent: 0,
        };
        let writer = (relay.client_ok && !ended)
            .then(|| client.session_mut().take_response_body_writer())
            .flatten();
        if let Some(mut writer) = writer {
            let ends = Ends {
                deadline,
                pause: pool.timeouts.first_byte.0,
                send: generation.config.limits.send_timeout.0,
            };
            let endpoint = &pool.endpoints[idx];
            let drained = || endpoint.state.drained(pool.drain_timeout);
            let streams = Streams {
                session: client.session_mut(),
                upload: &mut upload,
                upstream: &mut stream,
                body: &mut body,
                client: &mut writer,
            };
            relay.run(streams, ends, drained).await;
        }
        drop((body, stream, slot));
        Attempt::Done(Relayed {
            status,
            body_bytes: relay.sent,
            ttfb,
            connect,
            keep_alive: relay.client_ok && relay.ended,
        })
    }
}

/// A request sent on a stream and its response head received.
struct Exchanged {
    response: http::Response<h2::RecvStream>,
    /// The request's side of the stream (what is left of a body passed on as it
    /// arrives goes on it).
    stream: SendStream<Bytes>,
    /// The stream's place on its connection, held while the body is read.
    slot: Slot,
    /// When the request was sent (for the time to first byte).
    sent_at: Instant,
    /// The connect, when this try opened the connection (else zero).
    connect: Duration,
}

impl MuxRequest {
    /// The body of try `t`: the prepared one, whole, or the client's as it arrives.
    fn upload(&self, t: &Try<'_>) -> Upload {
        let limits = &t.generation.config.limits;
        let max_body = t.generation.routes[t.plan.route].max_body;
        let grpc_stream = t.plan.stream_pause.is_some();
        let mut upload = Upload {
            out: None,
            from_client: self.streamed,
            done: false,
            received: 0,
            moved: t.now,
            limits: StreamedBody::new(limits, max_body, grpc_stream),
            read_pause: t.plan.stream_pause.unwrap_or(limits.body_read_timeout.0),
            started: t.now,
        };
        upload.rewind(&t.request.upstream_head);
        upload
    }

    /// Sends the request on a stream of a pooled connection to the try's endpoint, or
    /// of a new one, and waits for the response head (interim 1xx skipped by `h2`)
    /// while its body goes upstream. A stream the upstream refused unprocessed (a
    /// GOAWAY, `REFUSED_STREAM`) on a pooled connection is sent once more on a fresh
    /// one, as a stale HTTP/1 connection is — unless part of a body that cannot be
    /// sent again went on it.
    async fn exchange(
        &self,
        client: &mut Http2Client<'_>,
        t: &Try<'_>,
        upload: &mut Upload,
    ) -> Result<Exchanged, Attempt> {
        let (pool, idx, deadline, request) = (t.pool, t.idx, t.deadline, t.request);
        let first_byte = pool.timeouts.first_byte.0;
        let retry = request.idempotent;
        let failed = |kind, status, retry| Attempt::Failed(Failed::new(kind, status, retry));
        let mut now = t.now;
        let mut fresh_only = false;
        loop {
            if now >= deadline {
                return Err(failed(FailureKind::Timeout, 504, false));
            }
            let (send, slot, connect) = stream_to(pool, idx, now, deadline, fresh_only)
                .await
                .map_err(Attempt::Failed)?;
            let reused = connect.is_none();
            let sent_at = Instant::now();
            let read_limit = clock::after(sent_at, first_byte).min(deadline);
            // Built for the first try; a retry's can only fail as the first did.
            let Some(upstream_request) = self.take(client, t) else {
                return Err(failed(FailureKind::Error, 502, false));
            };
            let bodiless = upload.done;
            let open = async {
                let mut send = send.ready().await?;
                send.send_request(upstream_request, bodiless)
            };
            let result = match tokio::time::timeout_at(read_limit.into(), open).await {
                Ok(Ok((response, mut stream))) => {
                    upload.moved = sent_at;
                    let session = client.session_mut();
                    let head =
                        await_head(response, session, upload, &mut stream, first_byte, deadline);
                    match head.await {
                        Ok(response) => {
                            return Ok(Exchanged {
                                response,
                                stream,
                                slot,
                                sent_at,
                                connect: connect.unwrap_or_default(),
                            });
                        }
                        Err(e) => e,
                    }
                }
                Ok(Err(e)) => HeadError::H2(e),
                Err(_) => HeadError::Timeout,
            };
            let again = upload.resendable();
            match result {
                // A pooled connection that ended under the request (as a stale HTTP/1
                // one) or refused the stream: once more on a fresh one.
                HeadError::H2(e) if again && reused && (unprocessed(&e) || e.is_io()) => {
                    slot.close();
                    fresh_only = true;
                    upload.rewind(&request.upstream_head);
                    now = Instant::now();
                }
                HeadError::H2(e) => {
                    slot.close();
                    let safe = again && (retry || unprocessed(&e));
                    return Err(failed(FailureKind::Error, 502, safe));
                }
                HeadError::Timeout => {
                    return Err(failed(FailureKind::Timeout, 504, again && retry))
                }
                HeadError::Client(e) => return Err(Attempt::Client(e)),
            }
        }
    }
}

/// Why no response head came.
enum HeadError {
    /// The stream or its connection failed.
    H2(h2::Error),
    /// Not within the first-byte timeout (or the request's whole budget).
    Timeout,
    /// The client's body, passed on as it arrived, failed.
    Client(BodyError),
}

/// The response head, the body sent upstream meanwhile: within `first_byte` of the
/// body's last progress (a client streaming messages is never cut by it), while the
/// client keeps within its read limits, and by `deadline`.
async fn await_head(
    response: h2::client::ResponseFuture,
    session: &mut HttpSession,
    upload: &mut Upload,
    stream: &mut SendStream<Bytes>,
    first_byte: Duration,
    deadline: Instant,
) -> Result<http::Response<h2::RecvStream>, HeadError> {
    tokio::pin!(response);
    let head_by = |upload: &Upload| {
        upload
            .head_by(first_byte)
            .map_or(deadline, |at| at.min(deadline))
    };
    loop {
        let head_by_now = head_by(upload);
        let stall_by = upload.stall_by();
        let wake = stall_by.map_or(head_by_now, |at| at.min(head_by_now));
        tokio::select! {
            biased;
            r = &mut response => return r.map_err(HeadError::H2),
            r = poll_fn(|cx| upload.poll(cx, session, stream)), if !upload.done => match r {
                Ok(()) => {}
                Err(UploadError::Client(e)) => return Err(HeadError::Client(e)),
                // The upstream stopped taking the body: its answer (or its
                // stream's error) tells why.
                Err(UploadError::Upstream) => upload.done = true,
            },
            () = tokio::time::sleep_until(wake.into()) => {
                // Polling the upload may have moved it on: the limits are taken again.
                let now = Instant::now();
                if upload.stall_by().is_some_and(|at| now >= at) {
                    return Err(HeadError::Client(BodyError::Stalled));
                }
                if now >= head_by(upload) {
                    return Err(HeadError::Timeout);
                }
            }
        }
    }
}

/// The streams of a response being relayed, and the request body still going up.
struct Streams<'a> {
    /// The client's stream (its request body is read from it).
    session: &'a mut HttpSession,
    upload: &'a mut Upload,
    /// The request's side of the upstream stream.
    upstream: &'a mut SendStream<Bytes>,
    /// The response's side of the upstream stream.
    body: &'a mut h2::RecvStream,
    /// The response's side of the client's stream.
    client: &'a mut SendStream<Bytes>,
}

/// The time limits of a relay.
#[derive(Clone, Copy)]
struct Ends {
    /// The request's whole budget.
    deadline: Instant,
    /// The longest pause of both directions together (the pool's first-byte timeout).
    pause: Duration,
    /// The longest wait for the client to take a piece (`limits.send_timeout`).
    send: Duration,
}

impl Ends {
    /// When the relay's wait runs out: the client's stream taking the piece `down`
    /// waits for, else the next move of either direction (the last at `moved`
    /// downwards, the upload's upwards).
    fn wait_by(&self, down: Option<&Outgoing>, moved: Instant, upload: &Upload) -> Instant {
        match down {
            Some(out) => clock::after(out.since, self.send),
            None => clock::after(moved.max(upload.moved), self.pause),
        }
    }
}

/// How a response relay went.
struct Relay {
    /// The response ended on the client's stream.
    ended: bool,
    /// The client's stream took everything sent so far.
    client_ok: bool,
    /// Body bytes the client's stream was given.
    sent: u64,
}

impl Relay {
    /// Relays the response's DATA (as the client's stream window allows, the
    /// upstream's window opened again as it goes) and its trailers (gRPC's status),
    /// while what is left of the request body goes up: both directions at once, as a
    /// bidirectional gRPC call needs. Ends at the response's end, at a pause of both
    /// directions longer than `ends.pause`, a client that takes nothing for
    /// `ends.send`, the request's deadline, or the endpoint drained.
    async fn run(&mut self, s: Streams<'_>, ends: Ends, drained: impl Fn() -> bool) {
        let Streams {
            session,
            upload,
            upstream,
            body,
            client,
        } = s;
        let mut down: Option<Outgoing> = None;
        let mut moved = Instant::now();
        loop {
            if moved >= ends.deadline || drained() {
                return;
            }
            let wait_by = ends.wait_by(down.as_ref(), moved, upload);
            let wake = upload
                .stall_by()
                .map_or(wait_by, |at| at.min(wait_by))
                .min(ends.deadline);
            tokio::select! {
                biased;
                r = poll_fn(|cx| poll_out(client, &mut down, cx)), if down.is_some() => {
                    moved = Instant::now();
                    match r {
                        Ok(true) => {
                            self.ended = true;
                            return;
                        }
                        Ok(false) => {}
                        Err(_) => {
                            self.client_ok = false;
                            return;
                        }
                    }
                }
                d = poll_fn(|cx| body.poll_data(cx)), if down.is_none() => {
                    moved = Instant::now();
                    match d {
                        Some(Ok(data)) => {
                            let _ = body.flow_control().release_capacity(data.len());
                            self.sent += data.len() as u64;
                            let end = body.is_end_stream();
                            down = Some(Outgoing { data, end, since: moved });
                        }
                        None => match tokio::time::timeout(ends.pause, body.trailers()).await {
                            Ok(Ok(Some(trailers))) => {
                                self.client_ok = client.send_trailers(trailers).is_ok();
                                self.ended = self.client_ok;
                                return;
                            }
                            Ok(Ok(None)) => {
                                down = Some(Outgoing { data: Bytes::new(), end: true, since: moved });
                            }
                            _ => return,
                        },
                        // A reset or the connection gone: the client's stream is reset
                        // when the session is dropped.
                        Some(Err(_)) => return,
                    }
                }
                r = poll_fn(|cx| upload.poll(cx, session, upstream)), if !upload.done => match r {
                    Ok(()) => {}
                    // Part of the response went: the client's stream is reset.
                    Err(UploadError::Client(_)) => {
                        self.client_ok = false;
                        return;
                    }
                    Err(UploadError::Upstream) => upload.done = true,
                },
                () = tokio::time::sleep_until(wake.into()) => {
                    // Polling the upload may have moved it on: the limits are taken again.
                    let now = Instant::now();
                    let stalled = upload.stall_by().is_some_and(|at| now >= at);
                    let waited = now >= ends.wait_by(down.as_ref(), moved, upload);
                    if stalled || waited && down.is_some() {
                        // The client sent nothing, or took nothing, for too long.
                        self.client_ok = false;
                        return;
                    }
                    if waited || now >= ends.deadline {
                        return;
                    }
                }
            }
        }
    }
}

/// A piece of a body on its way to one side, waiting for that stream's window.
struct Outgoing {
    data: Bytes,
    /// It ends the stream.
    end: bool,
    /// When it started waiting.
    since: Instant,
}

/// Sends what `out` holds on `stream` as the stream's window allows; `Ready(Ok)` once
/// all of it (and the stream's end, when it carries it) is sent.
fn poll_send(
    stream: &mut SendStream<Bytes>,
    out: &mut Outgoing,
    cx: &mut Context<'_>,
) -> Poll<Result<(), h2::Error>> {
    if out.data.is_empty() {
        if out.end {
            stream.send_data(Bytes::new(), true)?;
        }
        return Poll::Ready(Ok(()));
    }
    loop {
        stream.reserve_capacity(out.data.len());
        match ready!(stream.poll_capacity(cx)) {
            Some(Ok(n)) if n > 0 => {
                let piece = out.data.split_to(n.min(out.data.len()));
                let last = out.data.is_empty();
                stream.send_data(piece, out.end && last)?;
                if last {
                    return Poll::Ready(Ok(()));
                }
            }
            Some(Ok(_)) => {}
            Some(Err(e)) => return Poll::Ready(Err(e)),
            // The stream was reset or closed.
            None => return Poll::Ready(Err(h2::Reason::CANCEL.into())),
        }
    }
}

/// [`poll_send`] of the piece `down` holds, taken when sent: `Ok(true)` when it ended
/// the stream.
fn poll_out(
    stream: &mut SendStream<Bytes>,
    down: &mut Option<Outgoing>,
    cx: &mut Context<'_>,
) -> Poll<Result<bool, h2::Error>> {
    let Some(out) = down.as_mut() else {
        return Poll::Ready(Ok(false));
    };
    ready!(poll_send(stream, out, cx))?;
    Poll::Ready(Ok(down.take().is_some_and(|out| out.end)))
}

/// A request body on its way upstream: the prepared one (read whole before the first
/// try; a retry sends it again), or one passed on as the client sends it (its length
/// unknown or over what the fast path reads whole), which only the first try can send.
struct Upload {
    /// What waits for the upstream stream's window.
    out: Option<Outgoing>,
    /// Read from the client's stream as it comes.
    from_client: bool,
    /// The whole body and its end went upstream.
    done: bool,
    /// Bytes read from the client so far.
    received: u64,
    /// When a piece last went upstream (or the try started).
    moved: Instant,
    /// What the body keeps to as it arrives (as on Pingora's path).
    limits: StreamedBody,
    /// The longest wait for the client's next piece (`limits.body_read_timeout`, or a
    /// gRPC stream's pause).
    read_pause: Duration,
    /// When the try started (for `min_body_rate`).
    started: Instant,
}

/// Why a body stopped going upstream.
enum UploadError {
    /// The client's side failed.
    Client(BodyError),
    /// The upstream's stream no longer takes it.
    Upstream,
}

impl Upload {
    /// Back to the start of the body, `whole` (the prepared one) for a try that sends
    /// it again.
    fn rewind(&mut self, whole: &[u8]) {
        self.out = (!self.from_client && !whole.is_empty()).then(|| Outgoing {
            data: Bytes::copy_from_slice(whole),
            end: true,
            since: self.moved,
        });
        self.done = !self.from_client && whole.is_empty();
    }

    /// Another try can send the body from its start.
    fn resendable(&self) -> bool {
        !self.from_client || (self.received == 0 && !self.done)
    }

    /// It waits for the client's next piece.
    fn waits_for_client(&self) -> bool {
        self.from_client && !self.done && self.out.is_none()
    }

    /// When the client has waited too long to send its next piece.
    fn stall_by(&self) -> Option<Instant> {
        self.waits_for_client()
            .then(|| clock::after(self.moved, self.read_pause))
    }

    /// When the response head is due, `first_byte` after the body's last progress;
    /// `None` while the client is the one to send (its own limits apply).
    fn head_by(&self, first_byte: Duration) -> Option<Instant> {
        (!self.waits_for_client()).then(|| clock::after(self.moved, first_byte))
    }

    /// Sends the body upstream as the client sends it and the upstream's window
    /// allows; `Ready(Ok)` once it has all gone, with its end.
    fn poll(
        &mut self,
        cx: &mut Context<'_>,
        session: &mut HttpSession,
        upstream: &mut SendStream<Bytes>,
    ) -> Poll<Result<(), UploadError>> {
        loop {
            if let Some(out) = self.out.as_mut() {
                ready!(poll_send(upstream, out, cx)).map_err(|_| UploadError::Upstream)?;
                let end = out.end;
                self.out = None;
                self.moved = Instant::now();
                if end {
                    self.done = true;
                    return Poll::Ready(Ok(()));
                }
            }
            if !self.from_client {
                self.done = true;
                return Poll::Ready(Ok(()));
            }
            let (data, end) = match ready!(session.poll_read_body_bytes(cx)) {
                Some(Ok(data)) => {
                    let end = session.is_body_done();
                    (data, end)
                }
                None => (Bytes::new(), true),
                Some(Err(_)) => {
                    return Poll::Ready(Err(UploadError::Client(BodyError::ClientGone)))
                }
            };
            self.received += data.len() as u64;
            if let Err(breach) = self.limits.check(self.received, self.started) {
                let e = match breach {
                    BodyBreach::TooLarge => BodyError::TooLarge,
                    BodyBreach::TooSlow => BodyError::TooSlow,
                };
                return Poll::Ready(Err(UploadError::Client(e)));
            }
            if data.is_empty() && !end {
                continue;
            }
            self.out = Some(Outgoing {
                data,
                end,
                since: self.moved,
            });
        }
    }
}

/// The upstream did not process the stream: it may be sent again, whatever its method.
fn unprocessed(e: &h2::Error) -> bool {
    e.is_go_away() || e.reason() == Some(h2::Reason::REFUSED_STREAM)
}

/// One HTTP/2 connection of this worker to an endpoint.
struct MuxConn {
    send: SendRequest<Bytes>,
    state: Arc<ConnState>,
}

impl MuxConn {
    /// Still worth keeping at `now_ms`: open, and busy or idle for less than its limit.
    fn keep(&self, now_ms: u64) -> bool {
        !self.state.closed.load(Ordering::Acquire) && !self.state.idle_expired(now_ms)
    }
}

/// This worker's HTTP/2 upstream connections.
#[derive(Default)]
struct Conns {
    /// By endpoint address and the pool's TLS settings (`PeerSettings::reuse_key`).
    by_key: HashMap<(SocketAddr, u64), Vec<MuxConn>>,
    /// When every list was last swept (endpoints that left the configuration are never
    /// asked for again; their connections go at the next sweep).
    last_sweep_ms: u64,
}

/// What the streams of a connection and its driver task share.
struct ConnState {
    /// Streams in flight.
    streams: AtomicUsize,
    /// The connection ended (or failed a stream in a way that condemns it).
    closed: AtomicBool,
    /// When its last stream ended (milliseconds on [`crate::health::now_ms`]'s clock).
    idle_since_ms: std::sync::atomic::AtomicU64,
    /// How long it is kept without a stream (the pool's `timeouts.idle`), in ms.
    idle_ms: u64,
}

impl ConnState {
    /// A connection opened for its first stream, kept `idle` without one.
    fn new(idle: Duration) -> Self {
        Self {
            streams: AtomicUsize::new(1),
            closed: AtomicBool::new(false),
            idle_since_ms: std::sync::atomic::AtomicU64::new(0),
            idle_ms: u64::try_from(idle.as_millis()).unwrap_or(u64::MAX),
        }
    }

    /// It has had no stream for its idle limit at `now_ms`.
    fn idle_expired(&self, now_ms: u64) -> bool {
        self.streams.load(Ordering::Acquire) == 0
            && now_ms.saturating_sub(self.idle_since_ms.load(Ordering::Relaxed)) >= self.idle_ms
    }
}

/// A stream's place on a connection, given back when the try is over.
struct Slot(Arc<ConnState>);

impl Slot {
    /// The connection failed a stream: no new stream goes to it.
    fn close(&self) {
        self.0.closed.store(true, Ordering::Release);
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.0
            .idle_since_ms
            .store(crate::health::now_ms(), Ordering::Relaxed);
        self.0.streams.fetch_sub(1, Ordering::AcqRel);
    }
}

thread_local! {
    /// This worker's HTTP/2 upstream connections, by endpoint address and TLS settings.
    static CONNS: RefCell<Conns> = RefCell::default();
}

/// A stream on a connection to endpoint `idx`: a pooled connection with room for one
/// more (unless `fresh_only`), else a new one. The connect time is `Some` for a new one.
async fn stream_to(
    pool: &PoolRt,
    idx: usize,
    now: Instant,
    deadline: Instant,
    fresh_only: bool,
) -> Result<(SendRequest<Bytes>, Slot, Option<Duration>), Failed> {
    let endpoint = &pool.endpoints[idx];
    let key = (endpoint.addr, pool.peer.reuse_key());
    let max = pool.peer.max_streams.max(1);
    let idle = pool.timeouts.idle.0;
    if !fresh_only {
        if let Some((send, slot)) = take(key, max) {
            return Ok((send, slot, None));
        }
    }
    let limit = clock::after(now, pool.timeouts.connect.0).min(deadline);
    // One connect at a time per endpoint: the requests of a burst wait for it and
    // share it rather than each opening a connection.
    let gate = endpoint.state.connect_gate();
    let Ok(_held) = tokio::time::timeout_at(limit.into(), gate.lock_owned()).await else {
        return Err(Failed::new(FailureKind::Connect, 504, true));
    };
    if !fresh_only {
        if let Some((send, slot)) = take(key, max) {
            return Ok((send, slot, None));
        }
    }
    let io = upstream::connect(pool, idx, limit).await?;
    // The connection's window holds every stream's full window: streams whose clients
    // read slowly (or not at all) can never stall the others sharing the connection.
    let connection_window = u32::try_from(max)
        .unwrap_or(u32::MAX)
        .saturating_mul(STREAM_WINDOW)
        .min(MAX_WINDOW);
    let mut builder = h2::client::Builder::new();
    builder
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(connection_window);
    let handshake = builder.handshake::<_, Bytes>(io);
    let (send, connection) = match tokio::time::timeout_at(limit.into(), handshake).await {
        Ok(Ok(pair)) => pair,
        Ok(Err(_)) => return Err(Failed::new(FailureKind::Connect, 502, true)),
        Err(_) => return Err(Failed::new(FailureKind::Connect, 504, true)),
    };
    let state = Arc::new(ConnState::new(idle));
    tokio::spawn(drive(connection, state.clone()));
    let slot = Slot(state.clone());
    let connected = Instant::now().saturating_duration_since(now);
    CONNS.with(|c| {
        c.borrow_mut().by_key.entry(key).or_default().push(MuxConn {
            send: send.clone(),
            state,
        });
    });
    Ok((send, slot, Some(connected)))
}

/// Runs an upstream connection until the upstream closes it, or until it has had no
/// stream for its idle limit (then it is closed here: the pool's handle alone would
/// keep it open for as long as the worker sees no other request to that endpoint).
async fn drive(
    connection: h2::client::Connection<super::conn::Upstream, Bytes>,
    state: Arc<ConnState>,
) {
    let idle = Duration::from_millis(state.idle_ms);
    tokio::pin!(connection);
    loop {
        tokio::select! {
            _ = connection.as_mut() => break,
            () = tokio::time::sleep(idle) => {
                if state.idle_expired(crate::health::now_ms()) {
                    // No new stream is given this connection from now on; one handed
                    // out just before fails as on a stale connection and is retried.
                    state.closed.store(true, Ordering::Release);
                    if state.streams.load(Ordering::Acquire) == 0 {
                        return;
                    }
                }
            }
        }
    }
    state.closed.store(true, Ordering::Release);
}

/// A stream slot on a live pooled connection to `key` with fewer than `max` streams;
/// connections that ended, or were idle too long, are let go on the way.
fn take(key: (SocketAddr, u64), max: usize) -> Option<(SendRequest<Bytes>, Slot)> {
    CONNS.with(|c| {
        let mut conns = c.borrow_mut();
        let now_ms = crate::health::now_ms();
        if now_ms.saturating_sub(conns.last_sweep_ms) > 5_000 {
            conns.last_sweep_ms = now_ms;
            conns.by_key.retain(|_, list| {
                list.retain(|c| c.keep(now_ms));
                !list.is_empty()
            });
        }
        let list = conns.by_key.get_mut(&key)?;
        list.retain(|c| c.keep(now_ms));
        // At most the pool's `max_streams`, and at most what the endpoint allows
        // (SETTINGS_MAX_CONCURRENT_STREAMS): a stream over its limit would wait on this
        // connection rather than go out on another.
        let conn = list.iter().find(|c| {
            let limit = max.min(c.send.current_max_send_streams());
            c.state.streams.load(Ordering::Acquire) < limit
        })?;
        conn.state.streams.fetch_add(1, Ordering::AcqRel);
        Some((conn.send.clone(), Slot(conn.state.clone())))
    })
}
