//! gRPC through Rampart (issue 25): a tonic service behind an `h2c` pool, called by a
//! tonic client over the HTTPS listener (HTTP/2 by ALPN): unary and the three
//! streaming kinds with their trailers and status codes intact, and the proxy's own
//! answers as gRPC statuses (no endpoint → UNAVAILABLE, `grpc-timeout` →
//! DEADLINE_EXCEEDED, rate limit → RESOURCE_EXHAUSTED, no route → UNIMPLEMENTED).
//!
//! The service is written against tonic's server traits by hand (what tonic-build
//! would generate from a four-method `.proto`), so no protoc runs in the build.

#![allow(missing_docs, clippy::unwrap_used)]

mod common;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use common::{eventually, Proxy};
use futures_util::{Stream, StreamExt};
use http::uri::PathAndQuery;
use tonic::codegen::{http, BoxFuture, Service, StdError};
use tonic::{Code, Request, Response, Status, Streaming};
use tonic_prost::ProstCodec;

/// The one message of the test service.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Msg {
    #[prost(string, tag = "1")]
    pub text: String,
    #[prost(uint32, tag = "2")]
    pub n: u32,
}

fn msg(text: &str, n: u32) -> Msg {
    Msg {
        text: text.to_string(),
        n,
    }
}

type MsgStream = Pin<Box<dyn Stream<Item = Result<Msg, Status>> + Send>>;

/// `rampart.test.Echo`: Say (unary; "fail:<code>" answers that status, "slow:<ms>"
/// answers late, "whoami" answers the client address the proxy forwarded), Count
/// (server streaming: n messages), Sum (client streaming: the texts joined) and Chat
/// (bidirectional: each message echoed as it comes).
#[derive(Clone, Default)]
struct Echo {
    /// grpc.health.v1 status answered for the service "" (1 SERVING, 2 NOT_SERVING).
    health: Arc<AtomicU16>,
}

impl tonic::server::NamedService for Echo {
    const NAME: &'static str = "rampart.test.Echo";
}

struct Say;
impl tonic::server::UnaryService<Msg> for Say {
    type Response = Msg;
    type Future = BoxFuture<Response<Msg>, Status>;
    fn call(&mut self, request: Request<Msg>) -> Self::Future {
        Box::pin(async move {
            let forwarded = request
                .metadata()
                .get("x-forwarded-for")
                .map(|v| v.to_str().unwrap().to_string());
            let m = request.into_inner();
            if let Some(code) = m.text.strip_prefix("fail:") {
                return Err(Status::new(
                    Code::from(code.parse::<i32>().unwrap()),
                    "as asked",
                ));
            }
            if let Some(ms) = m.text.strip_prefix("slow:") {
                tokio::time::sleep(Duration::from_millis(ms.parse().unwrap())).await;
            }
            if m.text == "whoami" {
                return Ok(Response::new(msg(&forwarded.unwrap_or_default(), 0)));
            }
            Ok(Response::new(msg(&format!("said {}", m.text), m.n)))
        })
    }
}

struct Count;
impl tonic::server::ServerStreamingService<Msg> for Count {
    type Response = Msg;
    type ResponseStream = MsgStream;
    type Future = BoxFuture<Response<MsgStream>, Status>;
    fn call(&mut self, request: Request<Msg>) -> Self::Future {
        let n = request.into_inner().n;
        Box::pin(async move {
            let stream = futures_util::stream::iter(0..n).then(|i| async move {
                // Messages apart in time: a stream that pauses between messages.
                tokio::time::sleep(Duration::from_millis(20)).await;
                Ok(msg("tick", i))
            });
            Ok(Response::new(Box::pin(stream) as MsgStream))
        })
    }
}

struct Sum;
impl tonic::server::ClientStreamingService<Msg> for Sum {
    type Response = Msg;
    type Future = BoxFuture<Response<Msg>, Status>;
    fn call(&mut self, request: Request<Streaming<Msg>>) -> Self::Future {
        Box::pin(async move {
            let mut stream = request.into_inner();
            let (mut texts, mut n) = (Vec::new(), 0);
            while let Some(m) = stream.next().await {
                let m = m?;
                texts.push(m.text);
                n += m.n;
            }
            Ok(Response::new(msg(&texts.join("+"), n)))
        })
    }
}

struct Chat;
impl tonic::server::StreamingService<Msg> for Chat {
    type Response = Msg;
    type ResponseStream = MsgStream;
    type Future = BoxFuture<Response<MsgStream>, Status>;
    fn call(&mut self, request: Request<Streaming<Msg>>) -> Self::Future {
        Box::pin(async move {
            let stream = request
                .into_inner()
                .map(|m| m.map(|m| msg(&format!("echo {}", m.text), m.n)));
            Ok(Response::new(Box::pin(stream) as MsgStream))
        })
    }
}

impl<B> Service<http::Request<B>> for Echo
where
    B: tonic::codegen::Body + Send + 'static,
    B::Error: Into<StdError> + Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Infallible>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        Box::pin(async move {
            let mut grpc = tonic::server::Grpc::new(ProstCodec::<Msg, Msg>::default());
            Ok(match req.uri().path() {
                "/rampart.test.Echo/Say" => grpc.unary(Say, req).await,
                "/rampart.test.Echo/Count" => grpc.server_streaming(Count, req).await,
                "/rampart.test.Echo/Sum" => grpc.client_streaming(Sum, req).await,
                "/rampart.test.Echo/Chat" => grpc.streaming(Chat, req).await,
                _ => Status::unimplemented("no such method").into_http(),
            })
        })
    }
}

/// `grpc.health.v1.Health` beside [`Echo`], answering Check with its status.
#[derive(Clone)]
struct HealthServer(Arc<AtomicU16>);

impl tonic::server::NamedService for HealthServer {
    const NAME: &'static str = "grpc.health.v1.Health";
}

impl<B> Service<http::Request<B>> for HealthServer
where
    B: tonic::codegen::Body + Send + 'static,
    B::Error: Into<StdError> + Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Infallible>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let health = self.0.clone();
        Box::pin(async move {
            let mut grpc = tonic::server::Grpc::new(ProstCodec::<Health, Health>::default());
            Ok(match req.uri().path() {
                "/grpc.health.v1.Health/Check" => grpc.unary(HealthCheck(health), req).await,
                _ => Status::unimplemented("no such method").into_http(),
            })
        })
    }
}

/// grpc.health.v1 HealthCheckRequest { service = 1 } and HealthCheckResponse
/// { status = 1 } share this shape closely enough for the test: field 1 of the
/// request is a string, of the response an enum; each side reads the field it knows.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Health {
    #[prost(uint32, tag = "1")]
    pub status: u32,
}

struct HealthCheck(Arc<AtomicU16>);
impl tonic::server::UnaryService<Health> for HealthCheck {
    type Response = Health;
    type Future = BoxFuture<Response<Health>, Status>;
    fn call(&mut self, _request: Request<Health>) -> Self::Future {
        let status = u32::from(self.0.load(Ordering::SeqCst));
        Box::pin(async move { Ok(Response::new(Health { status })) })
    }
}

/// Serves [`Echo`] in HTTP/2 cleartext (prior knowledge) on a loopback port.
async fn start_service(echo: Echo) -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
    let task = tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(HealthServer(echo.health.clone()))
            .add_service(echo)
            .serve_with_incoming(incoming)
            .await
            .unwrap();
    });
    (addr, task)
}

/// An h2c service that answers every call after 3 s, whatever its `grpc-timeout`.
async fn stalling_service() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(|_req| async {
                    tokio::time::sleep(Duration::from_secs(3)).await;
                    let resp = http::Response::builder()
                        .header("content-type", "application/grpc")
                        .header("grpc-status", "0")
                        .body(http_body_util::Empty::<bytes::Bytes>::new())
                        .unwrap();
                    Ok::<_, Infallible>(resp)
                });
                let _ =
                    hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                        .serve_connection(hyper_util::rt::TokioIo::new(tcp), svc)
                        .await;
            });
        }
    });
    addr
}

/// A tonic client of the proxy's HTTPS listener (HTTP/2 by ALPN) for `a.test`.
async fn client(proxy: &Proxy) -> tonic::client::Grpc<tonic::transport::Channel> {
    let pem = std::fs::read(proxy.ca_path()).unwrap();
    let tls = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(pem))
        .domain_name("a.test");
    let channel = tonic::transport::Channel::from_shared(format!("https://{}", proxy.https))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
        .unwrap();
    tonic::client::Grpc::new(channel)
}

fn path(method: &str) -> PathAndQuery {
    PathAndQuery::try_from(format!("/rampart.test.Echo/{method}")).unwrap()
}

async fn say(
    grpc: &mut tonic::client::Grpc<tonic::transport::Channel>,
    request: Request<Msg>,
) -> Result<Msg, Status> {
    grpc.ready().await.unwrap();
    grpc.unary(request, path("Say"), ProstCodec::default())
        .await
        .map(Response::into_inner)
}

const TLS_A: &str = "[[tls]]\nhosts = [\"a.test\"]\nsource = \"internal\"\n";

fn config(service: SocketAddr, route_extra: &str, pool_extra: &str) -> String {
    format!(
        "{TLS_A}[[routes]]\nname = \"grpc\"\npath_prefix = \"/rampart.test.Echo\"\naction = {{ forward = \"grpc\" }}\n{route_extra}\n\
         [pools.grpc]\nprotocol = \"h2c\"\nendpoints = [{{ address = \"{service}\" }}]\n{pool_extra}\n"
    )
}

/// Unary and the three streaming kinds through `grpc`, with their statuses.
async fn every_kind_of_call(
    mut grpc: tonic::client::Grpc<tonic::transport::Channel>,
    server: &str,
) {
    let got = say(&mut grpc, Request::new(msg("hello", 7))).await.unwrap();
    assert_eq!(got, msg("said hello", 7), "{server:?}");
    // A status in the service's trailers reaches the client as it is.
    let err = say(&mut grpc, Request::new(msg("fail:5", 0)))
        .await
        .unwrap_err();
    assert_eq!((err.code(), err.message()), (Code::NotFound, "as asked"));
    // The client's address as the proxy forwards it.
    let got = say(&mut grpc, Request::new(msg("whoami", 0)))
        .await
        .unwrap();
    assert_eq!(got.text, "127.0.0.1");

    grpc.ready().await.unwrap();
    let mut ticks = grpc
        .server_streaming(
            Request::new(msg("", 5)),
            path("Count"),
            ProstCodec::<Msg, Msg>::default(),
        )
        .await
        .unwrap()
        .into_inner();
    let mut seen = Vec::new();
    while let Some(m) = ticks.message().await.unwrap() {
        seen.push(m.n);
    }
    assert_eq!(seen, [0, 1, 2, 3, 4]);

    grpc.ready().await.unwrap();
    let parts = futures_util::stream::iter([msg("a", 1), msg("b", 2), msg("c", 3)]);
    let sum = grpc
        .client_streaming(
            Request::new(parts),
            path("Sum"),
            ProstCodec::<Msg, Msg>::default(),
        )
        .await
        .unwrap()
        .into_inner();
    assert_eq!(sum, msg("a+b+c", 6));

    // Bidirectional: each answer arrives before the next message is sent.
    grpc.ready().await.unwrap();
    let (tx, rx) = tokio::sync::mpsc::channel::<Msg>(1);
    let mut replies = grpc
        .streaming(
            Request::new(tokio_stream::wrappers::ReceiverStream::new(rx)),
            path("Chat"),
            ProstCodec::<Msg, Msg>::default(),
        )
        .await
        .unwrap()
        .into_inner();
    for i in 0..3 {
        tx.send(msg(&format!("m{i}"), i)).await.unwrap();
        let reply = replies.message().await.unwrap().unwrap();
        assert_eq!(reply, msg(&format!("echo m{i}"), i));
    }
    drop(tx);
    assert!(replies.message().await.unwrap().is_none());
}

#[tokio::test]
async fn unary_and_streaming_calls_pass_through_with_their_trailers() {
    common::init();
    let (service, _task) = start_service(Echo::default()).await;
    // gRPC clients declare no length: the HTTP/2 fast path passes their bodies on
    // as they arrive (all six calls counted by its metric), as Pingora's path does.
    for (server, fast) in [
        ("", 6.0),
        ("http1_fast_path = false\nhttp2_fast_path = false", 0.0),
    ] {
        let proxy = Proxy::start_with(server, &config(service, "", "")).await;
        let counter = "rampart_http2_fast_path_requests_total";
        let before = proxy.metric(counter).await;
        every_kind_of_call(client(&proxy).await, server).await;
        let carried = proxy.metric(counter).await - before;
        assert_eq!(carried, fast, "{server:?}: calls on the HTTP/2 fast path");
    }
}

/// A unary call whose request declares its length (`content-length`, as some gRPC
/// clients and every buffering HTTP/2 client send it).
fn sized(m: Msg) -> Request<Msg> {
    let len = prost::Message::encoded_len(&m) + 5;
    let mut r = Request::new(m);
    r.metadata_mut()
        .insert("content-length", len.to_string().parse().unwrap());
    r
}

#[tokio::test]
async fn unary_calls_of_a_declared_length_take_the_http2_fast_path_with_their_trailers() {
    common::init();
    let (service, _task) = start_service(Echo::default()).await;
    let proxy = Proxy::start(&config(service, "", "")).await;
    let mut grpc = client(&proxy).await;
    let fast = "rampart_http2_fast_path_requests_total";
    let before = proxy.metric(fast).await;
    for i in 0..3 {
        let got = say(&mut grpc, sized(msg("hello", i))).await.unwrap();
        assert_eq!(got, msg("said hello", i));
    }
    // The service's status travels in its trailers, and arrives as it was sent.
    let err = say(&mut grpc, sized(msg("fail:5", 0))).await.unwrap_err();
    assert_eq!((err.code(), err.message()), (Code::NotFound, "as asked"));
    let got = say(&mut grpc, sized(msg("whoami", 0))).await.unwrap();
    assert_eq!(got.text, "127.0.0.1");
    assert_eq!(proxy.metric(fast).await - before, 5.0, "{}", proxy.log());
}

#[tokio::test]
async fn the_proxys_own_answers_are_grpc_statuses() {
    common::init();
    let (service, _task) = start_service(Echo::default()).await;
    let dead = common::free_addr();
    let stall = stalling_service().await;
    let rate = "rate_limit = { requests = 1, per = \"60s\", burst = 1 }";
    let body = format!(
        "{TLS_A}[[routes]]\nname = \"limited\"\npriority = 10\nheaders = {{ \"x-route\" = \"limited\" }}\naction = {{ forward = \"grpc\" }}\n{rate}\n\
         [[routes]]\nname = \"dead\"\npriority = 10\nheaders = {{ \"x-route\" = \"dead\" }}\naction = {{ forward = \"dead\" }}\n\
         [[routes]]\nname = \"grpc\"\npath_prefix = \"/rampart.test.Echo\"\naction = {{ forward = \"grpc\" }}\n\
         [pools.grpc]\nprotocol = \"h2c\"\nendpoints = [{{ address = \"{service}\" }}]\n\
         [[routes]]\nname = \"stall\"\npriority = 10\nheaders = {{ \"x-route\" = \"stall\" }}\naction = {{ forward = \"stall\" }}\n\
         [pools.dead]\nprotocol = \"h2c\"\nendpoints = [{{ address = \"{dead}\" }}]\nretries = {{ attempts = 0 }}\n\
         [pools.stall]\nprotocol = \"h2c\"\nendpoints = [{{ address = \"{stall}\" }}]\n"
    );
    for server in ["", "http1_fast_path = false\nhttp2_fast_path = false"] {
        let proxy = Proxy::start_with(server, &body).await;
        let mut grpc = client(&proxy).await;
        let with_route = |route: &str, text: &str| {
            let mut r = Request::new(msg(text, 0));
            r.metadata_mut().insert("x-route", route.parse().unwrap());
            r
        };
        // No endpoint answers: UNAVAILABLE.
        let err = say(&mut grpc, with_route("dead", "x")).await.unwrap_err();
        assert_eq!(err.code(), Code::Unavailable, "{server:?}: {err:?}");
        // The rate limit: the first call passes, the second is RESOURCE_EXHAUSTED.
        say(&mut grpc, with_route("limited", "x")).await.unwrap();
        let err = say(&mut grpc, with_route("limited", "x"))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
        // No route: UNIMPLEMENTED.
        grpc.ready().await.unwrap();
        let err = grpc
            .unary(
                Request::new(msg("x", 0)),
                PathAndQuery::from_static("/other.Service/Call"),
                ProstCodec::<Msg, Msg>::default(),
            )
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::Unimplemented, "{err:?}");
        // grpc-timeout bounds the wait for a service that ignores it (tonic's server
        // would answer CANCELLED itself): DEADLINE_EXCEEDED. Sent by a plain HTTP/2
        // client: tonic's own timer would end the call at the same time.
        let h2 = proxy
            .client_builder(&["a.test"])
            .http2_prior_knowledge()
            .build()
            .unwrap();
        let body = prost::Message::encode_to_vec(&msg("slow:3000", 0));
        let mut framed = vec![0u8];
        framed.extend_from_slice(&u32::try_from(body.len()).unwrap().to_be_bytes());
        framed.extend_from_slice(&body);
        let started = std::time::Instant::now();
        let resp = h2
            .post(format!(
                "https://a.test:{}/rampart.test.Echo/Say",
                proxy.https.port()
            ))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .header("grpc-timeout", "300m")
            .header("x-route", "stall")
            .body(framed)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.headers()["grpc-status"], "4", "{:?}", resp.headers());
        assert!(started.elapsed() < Duration::from_secs(3));
    }
}

#[tokio::test]
async fn a_grpc_health_check_takes_a_not_serving_endpoint_out() {
    common::init();
    let echo = Echo::default();
    echo.health.store(1, Ordering::SeqCst);
    let (service, _task) = start_service(echo.clone()).await;
    let check = "health_check = { probe = { grpc = { service = \"\" } }, interval = \"100ms\", timeout = \"100ms\", healthy_threshold = 1, unhealthy_threshold = 1 }";
    let proxy = Proxy::start(&config(service, "", check)).await;
    let grpc = client(&proxy).await;
    let first = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            if say(&mut grpc.clone(), Request::new(msg("x", 0)))
                .await
                .is_ok()
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(
        first.is_ok(),
        "the first check never passed:\n{}",
        proxy.log()
    );
    echo.health.store(2, Ordering::SeqCst);
    eventually("NOT_SERVING takes the endpoint out", || {
        let mut grpc = grpc.clone();
        async move {
            let r = say(&mut grpc, Request::new(msg("x", 0))).await;
            matches!(r, Err(e) if e.code() == Code::Unavailable).then_some(())
        }
    })
    .await;
    echo.health.store(1, Ordering::SeqCst);
    eventually("SERVING brings it back", || {
        let mut grpc = grpc.clone();
        async move { say(&mut grpc, Request::new(msg("x", 0))).await.ok() }
    })
    .await;
}

#[tokio::test]
async fn h2c_clients_reach_grpc_services_on_the_plain_listener_when_it_is_enabled() {
    common::init();
    let (service, _task) = start_service(Echo::default()).await;
    let h2c_client = |proxy: &Proxy| {
        tonic::transport::Channel::from_shared(format!("http://{}", proxy.http))
            .unwrap()
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(5))
            .connect_lazy()
    };
    // The start of the body is still in [listeners].
    let on = format!("h2c = true\n{}", config(service, "", ""));
    for server in ["", "http1_fast_path = false\nhttp2_fast_path = false"] {
        let proxy = Proxy::start_with(server, &on).await;
        let mut grpc = tonic::client::Grpc::new(h2c_client(&proxy));
        let got = say(&mut grpc, Request::new(msg("over h2c", 1)))
            .await
            .unwrap();
        assert_eq!(got, msg("said over h2c", 1));
        every_kind_of_call(grpc, server).await;
        // HTTP/1 beside it, a request shorter than the preface included.
        for request in [
            "GET / HTTP/1.0\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n",
        ] {
            let mut tcp = tokio::net::TcpStream::connect(proxy.http).await.unwrap();
            tokio::io::AsyncWriteExt::write_all(&mut tcp, request.as_bytes())
                .await
                .unwrap();
            let mut out = Vec::new();
            let read = tokio::time::timeout(
                Duration::from_secs(5),
                tokio::io::AsyncReadExt::read_to_end(&mut tcp, &mut out),
            )
            .await;
            let out = String::from_utf8_lossy(&out);
            assert!(
                read.is_ok(),
                "{server:?} {request:?}: a stall after {out:?}"
            );
            assert!(
                out.starts_with("HTTP/1.1 404"),
                "{server:?} {request:?}: {out}"
            );
        }
    }
    // Off by default: the preface is not HTTP/1.
    let proxy = Proxy::start(&config(service, "", "")).await;
    let mut grpc = tonic::client::Grpc::new(h2c_client(&proxy));
    assert!(say(&mut grpc, Request::new(msg("x", 0))).await.is_err());
}

#[tokio::test]
async fn a_client_stream_that_pauses_is_not_cut_as_a_slow_body() {
    common::init();
    let (service, _task) = start_service(Echo::default()).await;
    // Pauses longer than body_read_timeout, at far below min_body_rate: an upload
    // this slow is cut, a gRPC stream is not (its pauses are bounded by first_byte).
    let body = format!(
        "[limits]\nbody_read_timeout = \"300ms\"\nmin_body_rate = \"100KB\"\n{}",
        config(service, "", "timeouts = { first_byte = \"5s\" }")
    );
    for server in ["", "http1_fast_path = false\nhttp2_fast_path = false"] {
        let proxy = Proxy::start_with(server, &body).await;
        let mut grpc = client(&proxy).await;
        grpc.ready().await.unwrap();
        let parts = futures_util::stream::iter([msg("a", 1), msg("b", 2), msg("c", 3)]).then(
            |m| async move {
                tokio::time::sleep(Duration::from_millis(700)).await;
                m
            },
        );
        let sum = grpc
            .client_streaming(
                Request::new(parts),
                path("Sum"),
                ProstCodec::<Msg, Msg>::default(),
            )
            .await;
        assert_eq!(sum.unwrap().into_inner(), msg("a+b+c", 6), "{server:?}");
    }
}
