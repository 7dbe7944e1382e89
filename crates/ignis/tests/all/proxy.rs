//! The reverse proxy (`[upstreams.NAME]`, docs/proxy.md) against real
//! origins on 127.0.0.1:0 that record what they receive.

use std::collections::{BTreeMap, BTreeSet};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::pem::PemObject;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::harness::*;
use crate::http_limits::{exchange, smuggling_vectors, status_of};

/// What an origin received.
#[derive(Debug, Clone)]
struct Seen {
    method: String,
    version: http::Version,
    path: String,
    headers: http::HeaderMap,
    body: Bytes,
}

/// An origin on 127.0.0.1:0 (HTTP/1.1 and h2c): answers `NAME METHOD
/// PATH`, records every request, and has a few special paths:
/// `/healthz` (200 or 503 as `healthy` says), `/echo` (streams the request
/// body back), `/slow` (answers after 5 s), `/ws` (WebSocket handshake,
/// then echoes bytes).
struct Recorder {
    addr: SocketAddr,
    name: String,
    seen: Arc<Mutex<Vec<Seen>>>,
    healthy: Arc<AtomicBool>,
    /// Connections accepted.
    connections: Arc<AtomicU64>,
    /// Connections open now.
    open: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Recorder {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Recorder {
    async fn start(name: &str) -> Recorder {
        Self::start_with(name, None, None).await
    }

    /// The same over TLS with `config` (its ALPN decides h2 or HTTP/1.1),
    /// and closing HTTP/1.1 connections idle for `idle`.
    async fn start_with(
        name: &str,
        tls: Option<Arc<rustls::ServerConfig>>,
        idle: Option<Duration>,
    ) -> Recorder {
        let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
        let healthy = Arc::new(AtomicBool::new(true));
        let connections = Arc::new(AtomicU64::new(0));
        let accepted = connections.clone();
        let open = Arc::new(AtomicU64::new(0));
        let still_open = open.clone();
        let (s, h, n) = (seen.clone(), healthy.clone(), name.to_string());
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                accepted.fetch_add(1, Ordering::SeqCst);
                still_open.fetch_add(1, Ordering::SeqCst);
                let (s, h, n) = (s.clone(), h.clone(), n.clone());
                let acceptor = acceptor.clone();
                let still_open = still_open.clone();
                tokio::spawn(async move {
                    struct Closed(Arc<AtomicU64>);
                    impl Drop for Closed {
                        fn drop(&mut self) {
                            self.0.fetch_sub(1, Ordering::SeqCst);
                        }
                    }
                    let _closed = Closed(still_open);
                    let service = hyper::service::service_fn(move |req| {
                        let (s, h, n) = (s.clone(), h.clone(), n.clone());
                        async move { Ok::<_, Infallible>(answer(req, &s, &h, &n).await) }
                    });
                    let mut builder =
                        hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                    if let Some(idle) = idle {
                        builder
                            .http1()
                            .timer(hyper_util::rt::TokioTimer::new())
                            .header_read_timeout(idle);
                    }
                    match acceptor {
                        None => {
                            let _ = builder
                                .serve_connection_with_upgrades(TokioIo::new(stream), service)
                                .await;
                        }
                        Some(acceptor) => {
                            let Ok(tls) = acceptor.accept(stream).await else {
                                return;
                            };
                            let _ = builder
                                .serve_connection_with_upgrades(TokioIo::new(tls), service)
                                .await;
                        }
                    }
                });
            }
        });
        Recorder {
            addr,
            name: name.to_string(),
            seen,
            healthy,
            connections,
            open,
            task,
        }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Requests seen, health checks left out.
    fn requests(&self) -> Vec<Seen> {
        self.seen
            .lock()
            .unwrap()
            .iter()
            .filter(|s| s.path != "/healthz")
            .cloned()
            .collect()
    }
}

type OriginBody = http_body_util::combinators::BoxBody<Bytes, hyper::Error>;

async fn answer(
    mut req: Request<Incoming>,
    seen: &Mutex<Vec<Seen>>,
    healthy: &AtomicBool,
    name: &str,
) -> Response<OriginBody> {
    let path = req.uri().path().to_string();
    let full = |status: u16, text: String| {
        let mut r = Response::new(Full::new(Bytes::from(text)).map_err(|n| match n {}).boxed());
        *r.status_mut() = StatusCode::from_u16(status).unwrap();
        r
    };
    let mut record = Seen {
        method: req.method().to_string(),
        version: req.version(),
        path: path.clone(),
        headers: req.headers().clone(),
        body: Bytes::new(),
    };
    match path.as_str() {
        "/echo" => {
            seen.lock().unwrap().push(record);
            // Streamed back as it arrives: nothing buffered here either.
            Response::new(req.into_body().boxed())
        }
        "/ws" => {
            seen.lock().unwrap().push(record);
            let upgrade = hyper::upgrade::on(&mut req);
            tokio::spawn(async move {
                if let Ok(io) = upgrade.await {
                    let mut io = TokioIo::new(io);
                    let mut buf = [0u8; 1024];
                    while let Ok(n) = io.read(&mut buf).await {
                        if n == 0 || io.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                }
            });
            let mut r = full(101, String::new());
            r.headers_mut()
                .insert("connection", http::HeaderValue::from_static("upgrade"));
            r.headers_mut()
                .insert("upgrade", http::HeaderValue::from_static("websocket"));
            r
        }
        "/stall" => {
            seen.lock().unwrap().push(record);
            // One chunk, then nothing: the sender is held until the
            // origin's task is dropped with the test.
            let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, hyper::Error>>(1);
            let _ = tx.try_send(Ok(Frame::data(Bytes::from_static(b"first"))));
            tokio::spawn(async move {
                let _held = tx;
                std::future::pending::<()>().await;
            });
            Response::new(StreamBody::new(tokio_stream_from(rx)).boxed())
        }
        "/healthz" => {
            seen.lock().unwrap().push(record);
            if healthy.load(Ordering::SeqCst) {
                full(200, "ok".into())
            } else {
                full(503, "down".into())
            }
        }
        _ => {
            record.body = req
                .into_body()
                .collect()
                .await
                .map(|b| b.to_bytes())
                .unwrap_or_default();
            let method = record.method.clone();
            seen.lock().unwrap().push(record);
            if path == "/slow" {
                tokio::time::sleep(Duration::from_secs(5)).await;
            }
            if path == "/empty" {
                return full(204, String::new());
            }
            let mut r = full(200, format!("{name} {method} {path}"));
            // `/close` asks to close the connection after this response.
            let connection = if path == "/close" {
                "close"
            } else {
                "x-origin-private"
            };
            r.headers_mut()
                .insert("connection", http::HeaderValue::from_static(connection));
            r.headers_mut()
                .insert("x-origin-private", http::HeaderValue::from_static("1"));
            r
        }
    }
}

/// An origin that reads one request head and closes the connection
/// without answering (a crash mid-request); counts the requests it got.
async fn resetter() -> (SocketAddr, Arc<AtomicU64>, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let count = Arc::new(AtomicU64::new(0));
    let c = count.clone();
    let task = tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                return;
            };
            let c = c.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 8192];
                let mut got = Vec::new();
                while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => got.extend_from_slice(&buf[..n]),
                    }
                }
                c.fetch_add(1, Ordering::SeqCst);
                drop(stream);
            });
        }
    });
    (addr, count, task)
}

/// A port nothing listens on.
async fn dead_port() -> SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    l.local_addr().unwrap()
}

fn manifest(upstream: &str, origins: &[String], extra: &str) -> String {
    let list: Vec<String> = origins.iter().map(|o| format!("\"{o}\"")).collect();
    format!(
        "[upstreams.{upstream}]\norigins = [{}]\n{extra}\n\n[[routes]]\npath = \"/...\"\nupstream = \"{upstream}\"\n",
        list.join(", ")
    )
}

/// Which origin answered (the first word of the body).
fn who(r: &Reply) -> String {
    r.text().split(' ').next().unwrap_or_default().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_reach_the_origin_with_forwarding_headers_and_without_hop_by_hop_fields() {
    let origin = Recorder::start("a").await;
    let server = TestServer::start(&manifest("api", &[origin.url()], "")).await;
    let c = client();
    let req = Request::post(server.url("/orders?id=7"))
        .header("host", "shop.example:8080")
        .header("connection", "x-secret")
        .header("x-secret", "hop")
        .header("keep-alive", "timeout=5")
        .header("x-forwarded-for", "6.6.6.6")
        .header("forwarded", "for=6.6.6.6")
        .header("x-kept", "end-to-end")
        .body(Full::new(Bytes::from_static(b"payload")))
        .unwrap();
    let r = send(&c, req).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.text(), "a POST /orders");
    let id = r.headers["x-request-id"].to_str().unwrap().to_string();
    // The origin's hop-by-hop fields stay on its hop; Via says we passed.
    assert!(
        !r.headers.contains_key("x-origin-private"),
        "{:?}",
        r.headers
    );
    assert_eq!(r.headers["via"], "1.1 ignis");

    let seen = origin.requests();
    assert_eq!(seen.len(), 1);
    let s = &seen[0];
    assert_eq!((s.method.as_str(), s.path.as_str()), ("POST", "/orders"));
    assert_eq!(s.body, "payload");
    let h = &s.headers;
    assert_eq!(h["host"], "shop.example:8080");
    assert_eq!(h["x-kept"], "end-to-end");
    assert!(
        !h.contains_key("x-secret") && !h.contains_key("keep-alive"),
        "{h:?}"
    );
    // The client is not a trusted proxy: its forwarding headers are replaced.
    assert_eq!(h["x-forwarded-for"], "127.0.0.1");
    assert_eq!(h["x-forwarded-proto"], "http");
    assert_eq!(h["x-forwarded-host"], "shop.example:8080");
    assert_eq!(
        h["forwarded"],
        "for=127.0.0.1;proto=http;host=\"shop.example:8080\""
    );
    assert_eq!(h["via"], "1.1 ignis");
    assert_eq!(h["x-request-id"], id.as_str());
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trusted_proxies_extend_the_chain_and_host_can_be_rewritten() {
    let origin = Recorder::start("a").await;
    let text = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\ncache_dir = \"{}\"\ntrusted_proxies = [\"127.0.0.0/8\"]\n{}",
        shared_cache(),
        manifest("api", &[origin.url()], "host = \"origin\"")
    );
    let server = TestServer::start_full(&text).await;
    let req = Request::get(server.url("/"))
        .header("x-forwarded-for", "198.51.100.7")
        .header("x-forwarded-proto", "https")
        .body(Full::default())
        .unwrap();
    assert_eq!(send(&client(), req).await.status, 200);
    let h = &origin.requests()[0].headers;
    assert_eq!(h["x-forwarded-for"], "198.51.100.7, 127.0.0.1");
    assert_eq!(h["x-forwarded-proto"], "https");
    assert_eq!(h["host"], origin.addr.to_string().as_str());
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_robin_spreads_the_load_evenly() {
    let origins = [
        Recorder::start("a").await,
        Recorder::start("b").await,
        Recorder::start("c").await,
    ];
    let urls: Vec<String> = origins.iter().map(Recorder::url).collect();
    let server = TestServer::start(&manifest("api", &urls, "")).await;
    let c = client();
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    for _ in 0..90 {
        *counts
            .entry(who(&get(&c, &server.url("/x")).await))
            .or_default() += 1;
    }
    assert_eq!(
        counts.values().copied().collect::<Vec<_>>(),
        [30, 30, 30],
        "{counts:?}"
    );
    server.shutdown().await;
}

/// Waits (at most 10 s) until the origins together saw `n` requests.
async fn until_seen(origins: &[&Recorder], n: usize) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while origins.iter().map(|o| o.requests().len()).sum::<usize>() < n {
        assert!(
            tokio::time::Instant::now() < deadline,
            "requests did not arrive"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn least_requests_avoids_a_busy_origin() {
    let a = Recorder::start("a").await;
    let b = Recorder::start("b").await;
    let c = client();
    // Round robin alternates whatever the load; least requests sends
    // everything to the idle origin while the other holds a slow request.
    for (policy, want_idle) in [("round-robin", 5), ("least-requests", 10)] {
        let server = TestServer::start(&manifest(
            "api",
            &[a.url(), b.url()],
            &format!("balance = \"{policy}\""),
        ))
        .await;
        let seen_before = a.requests().len() + b.requests().len();
        let (c2, url) = (c.clone(), server.url("/slow"));
        let slow = tokio::spawn(async move { get(&c2, &url).await });
        until_seen(&[&a, &b], seen_before + 1).await;
        let busy = if a.requests().last().is_some_and(|s| s.path == "/slow") {
            a.name.clone()
        } else {
            b.name.clone()
        };
        let mut to_idle = 0;
        for _ in 0..10 {
            if who(&get(&c, &server.url("/x")).await) != busy {
                to_idle += 1;
            }
        }
        assert_eq!(to_idle, want_idle, "{policy}");
        assert_eq!(slow.await.unwrap().status, 200);
        server.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hashing_keeps_each_key_on_one_origin() {
    let origins = [
        Recorder::start("a").await,
        Recorder::start("b").await,
        Recorder::start("c").await,
    ];
    let urls: Vec<String> = origins.iter().map(Recorder::url).collect();
    let server = TestServer::start(&manifest(
        "api",
        &urls,
        "balance = \"hash\"\nhash_key = \"header:x-user\"",
    ))
    .await;
    let c = client();
    let mut home: BTreeMap<u32, String> = BTreeMap::new();
    for round in 0..3 {
        for user in 0..60u32 {
            let req = Request::get(server.url("/x"))
                .header("x-user", format!("user-{user}"))
                .body(Full::default())
                .unwrap();
            let at = who(&send(&c, req).await);
            if round == 0 {
                home.insert(user, at);
            } else {
                assert_eq!(home[&user], at, "user-{user} moved");
            }
        }
    }
    let used: BTreeSet<&String> = home.values().collect();
    assert_eq!(
        used.len(),
        3,
        "keys should spread over all origins: {home:?}"
    );
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_origin_is_ejected_and_idempotent_requests_go_elsewhere() {
    let live = Recorder::start("live").await;
    let dead = dead_port().await;
    let server = TestServer::start(&manifest(
        "api",
        &[format!("http://{dead}"), live.url()],
        "eject_after = 3\neject_for = \"60m\"",
    ))
    .await;
    let upstream = server.edge.upstream("api").unwrap().clone();
    let c = client();
    for _ in 0..10 {
        let r = get(&c, &server.url("/x")).await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(who(&r), "live");
    }
    // Three failures ejected it: it got three attempts, no more.
    let sent: BTreeMap<String, u64> = upstream.sent().into_iter().collect();
    assert_eq!(sent[&format!("http://{dead}")], 3, "{sent:?}");
    assert_eq!(
        upstream.usable(),
        [(format!("http://{dead}"), false), (live.url(), true)]
    );
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reset_is_retried_for_get_but_never_for_post() {
    let live = Recorder::start("live").await;
    let (reset, reset_count, _task) = resetter().await;
    let server = TestServer::start(&manifest(
        "api",
        &[format!("http://{reset}"), live.url()],
        "eject_after = 1000",
    ))
    .await;
    let c = client();
    // Round robin starts at the resetter: the GET is retried on `live`.
    let r = get(&c, &server.url("/x")).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(who(&r), "live");
    assert_eq!(reset_count.load(Ordering::SeqCst), 1);
    // The next pick is the resetter again (round robin), for a POST.
    let before = live.requests().len();
    let r = post(&c, &server.url("/pay"), "once").await;
    assert_eq!(r.status, 502, "{}", r.text());
    let id = r.headers["x-request-id"].to_str().unwrap().to_string();
    assert!(
        r.text().contains(&format!("request id {id}")),
        "{}",
        r.text()
    );
    assert!(
        !r.text().contains("127.0.0.1"),
        "internals leaked: {}",
        r.text()
    );
    assert_eq!(reset_count.load(Ordering::SeqCst), 2);
    assert_eq!(live.requests().len(), before, "the POST was retried");
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_checks_take_an_origin_out_and_bring_it_back() {
    let a = Recorder::start("a").await;
    let b = Recorder::start("b").await;
    let server = TestServer::start(&manifest(
        "api",
        &[a.url(), b.url()],
        "[upstreams.api.health]\npath = \"/healthz\"\ninterval = \"100ms\"\ntimeout = \"100ms\"\nunhealthy_after = 2\nhealthy_after = 2",
    ))
    .await;
    let upstream = server.edge.upstream("api").unwrap().clone();
    let wait_for = |want: bool| {
        let upstream = upstream.clone();
        async move {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
            while upstream.usable()[0].1 != want {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "health never became {want}"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    a.healthy.store(false, Ordering::SeqCst);
    wait_for(false).await;
    let c = client();
    for _ in 0..10 {
        assert_eq!(who(&get(&c, &server.url("/x")).await), "b");
    }
    assert_eq!(a.requests().len(), 0);
    a.healthy.store(true, Ordering::SeqCst);
    wait_for(true).await;
    let mut seen = BTreeSet::new();
    for _ in 0..4 {
        seen.insert(who(&get(&c, &server.url("/x")).await));
    }
    assert_eq!(seen.len(), 2, "{seen:?}");
    // Checks carry the origin's authority as Host.
    let checks: Vec<Seen> = a
        .seen
        .lock()
        .unwrap()
        .iter()
        .filter(|s| s.path == "/healthz")
        .cloned()
        .collect();
    assert!(checks.len() >= 4);
    assert_eq!(checks[0].headers["host"], a.addr.to_string().as_str());
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_origin_gets_504_and_no_usable_origin_gets_502_at_once() {
    let a = Recorder::start("a").await;
    let server =
        TestServer::start(&manifest("api", &[a.url()], "response_timeout = \"200ms\"")).await;
    let c = client();
    let r = get(&c, &server.url("/slow")).await;
    assert_eq!(r.status, 504, "{}", r.text());
    assert!(r.text().contains("request id"), "{}", r.text());
    // The timeout is not retried: the origin saw one request.
    assert_eq!(a.requests().len(), 1);
    server.shutdown().await;

    let dead = dead_port().await;
    let server = TestServer::start(&manifest(
        "api",
        &[format!("http://{dead}")],
        "eject_after = 1\neject_for = \"60m\"",
    ))
    .await;
    assert_eq!(get(&c, &server.url("/x")).await.status, 502);
    let started = std::time::Instant::now();
    let r = get(&c, &server.url("/x")).await;
    assert_eq!(r.status, 502);
    assert!(r.text().contains("no origin is usable"), "{}", r.text());
    // Answered without trying to connect (the origin is ejected).
    assert!(started.elapsed() < Duration::from_secs(2));
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_stream_both_ways_and_the_request_body_is_capped() {
    let a = Recorder::start("a").await;
    let server = TestServer::start(&manifest("api", &[a.url()], "max_body = \"1MiB\"")).await;
    // A 64 KiB chunk, then the echo must come back before the rest is
    // sent: the proxy streams instead of buffering.
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, Infallible>>(1);
    let body = StreamBody::new(tokio_stream_from(rx));
    let req = Request::post(server.url("/echo")).body(body).unwrap();
    let streaming: hyper_util::client::legacy::Client<_, StreamBody<_>> =
        hyper_util::client::legacy::Client::builder(TokioExecutor::new()).build_http();
    tx.send(Ok(Frame::data(Bytes::from(vec![b'x'; 64 * 1024]))))
        .await
        .unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(10), streaming.request(req))
        .await
        .expect("head while the body is still open")
        .unwrap();
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    let mut got = 0;
    while got < 64 * 1024 {
        let frame = tokio::time::timeout(Duration::from_secs(10), body.frame())
            .await
            .expect("echo of the first chunk before the request body ended")
            .unwrap()
            .unwrap();
        got += frame.into_data().map_or(0, |d| d.len());
    }
    tx.send(Ok(Frame::data(Bytes::from_static(b"end"))))
        .await
        .unwrap();
    drop(tx);
    let rest = body.collect().await.unwrap().to_bytes();
    assert_eq!(rest, "end");

    // Past max_body: 413 from the declared length alone, before the origin
    // (the head and a first piece are sent; a client still writing the
    // whole 2 MiB could see its write fail on the closed connection first).
    let before = a.requests().len();
    let mut s = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    s.write_all(b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 2097152\r\n\r\nxxxx")
        .await
        .unwrap();
    let mut reply = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut reply)).await;
    let reply = String::from_utf8_lossy(&reply);
    assert!(reply.starts_with("HTTP/1.1 413"), "{reply}");
    assert_eq!(a.requests().len(), before);
    server.shutdown().await;
}

/// A stream of frames from a channel (what `tokio-stream` would give).
fn tokio_stream_from<T>(rx: tokio::sync::mpsc::Receiver<T>) -> impl futures_core::Stream<Item = T> {
    struct S<T>(tokio::sync::mpsc::Receiver<T>);
    impl<T> futures_core::Stream for S<T> {
        type Item = T;
        fn poll_next(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Option<T>> {
            self.0.poll_recv(cx)
        }
    }
    S(rx)
}

/// Opens a WebSocket through `addr`: the stream and the response head
/// (lower-cased).
async fn ws_open(addr: SocketAddr) -> (tokio::net::TcpStream, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(
        b"GET /ws HTTP/1.1\r\nHost: chat.example\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
          Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
    )
    .await
    .unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        s.read_exact(&mut byte).await.unwrap();
        head.push(byte[0]);
    }
    (s, String::from_utf8_lossy(&head).to_ascii_lowercase())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_connections_pass_through() {
    let a = Recorder::start("a").await;
    let server = TestServer::start(&manifest("api", &[a.url()], "")).await;
    let (mut s, head) = ws_open(server.addr).await;
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert!(head.contains("upgrade: websocket"), "{head}");
    let seen = &a.requests()[0];
    assert_eq!(seen.headers["upgrade"], "websocket");
    assert_eq!(
        seen.headers["sec-websocket-key"],
        "dGhlIHNhbXBsZSBub25jZQ=="
    );
    // A masked text frame "hi", then raw bytes: the tunnel carries both ways.
    let frame = [0x81u8, 0x82, 1, 2, 3, 4, b'h' ^ 1, b'i' ^ 2];
    s.write_all(&frame).await.unwrap();
    let mut back = [0u8; 8];
    tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut back))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(back, frame);
    server.shutdown().await;
}

/// Tunnels are capped per upstream (503 past the cap, the slot back when a
/// tunnel closes) and closed when idle.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websockets_are_capped_and_idle_ones_closed() {
    let a = Recorder::start("a").await;
    let server = TestServer::start(&manifest(
        "api",
        &[a.url()],
        "max_websockets = 1\nwebsocket_idle_timeout = \"1s\"",
    ))
    .await;
    let (first, head) = ws_open(server.addr).await;
    assert!(head.starts_with("http/1.1 101"), "{head}");
    let (_, head) = ws_open(server.addr).await;
    assert!(head.starts_with("http/1.1 503"), "{head}");
    assert!(head.contains("retry-after"), "{head}");
    assert_eq!(
        a.requests().len(),
        1,
        "the refused handshake reached the origin"
    );
    // The first one, left idle, is closed by the proxy.
    let mut first = first;
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(10), first.read_to_end(&mut rest)).await;
    assert!(closed.is_ok(), "an idle WebSocket stayed open");
    // Its slot is free again.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (_, head) = ws_open(server.addr).await;
        if head.starts_with("http/1.1 101") {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the slot never came back: {head}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    server.shutdown().await;

    // 0 refuses WebSocket altogether.
    let server = TestServer::start(&manifest("api", &[a.url()], "max_websockets = 0")).await;
    let (_, head) = ws_open(server.addr).await;
    assert!(head.starts_with("http/1.1 503"), "{head}");
    server.shutdown().await;
}

/// Every smuggling vector through the proxy: 400, the connection closed,
/// and the origin (which records every request) saw nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smuggling_vectors_never_reach_the_origin() {
    let a = Recorder::start("a").await;
    let server = TestServer::start(&manifest("api", &[a.url()], "")).await;
    for (name, request) in smuggling_vectors("/x") {
        let (reply, closed) = exchange(server.addr, request.as_bytes()).await;
        assert_eq!(status_of(&reply), 400, "{name}: {reply}");
        assert!(closed, "{name}: the connection stayed open");
        assert_eq!(
            a.requests().len(),
            0,
            "{name} reached the origin: {:?}",
            a.requests()
        );
    }
    // A clean request still goes through.
    let (reply, _) = exchange(
        server.addr,
        b"GET /x HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status_of(&reply), 200, "{reply}");
    assert_eq!(a.requests().len(), 1);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_origins_by_prior_knowledge() {
    let a = Recorder::start("a").await;
    let server = TestServer::start(&manifest("api", &[a.url()], "http2 = true")).await;
    let c = client();
    for _ in 0..5 {
        let r = get(&c, &server.url("/x")).await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.text(), "a GET /x");
    }
    let seen = a.requests();
    assert_eq!(seen.len(), 5);
    assert!(
        seen.iter().all(|s| s.version == http::Version::HTTP_2),
        "{seen:?}"
    );
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_origins_are_verified_with_the_configured_ca_and_server_name() {
    let dir = tempfile::tempdir().unwrap();
    let ca = crate::tls::Ca::new();
    ca.leaf(&["origin.internal"], dir.path(), "origin");
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, ca.pem()).unwrap();
    let chain = vec![
        rustls::pki_types::CertificateDer::from_pem_file(dir.path().join("origin.pem")).unwrap(),
    ];
    let key =
        rustls::pki_types::PrivateKeyDer::from_pem_file(dir.path().join("origin.key")).unwrap();
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(chain, key)
    .unwrap();
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let origin = Recorder::start_with("secure", Some(Arc::new(config)), None).await;
    let url = format!("https://{}", origin.addr);
    let c = client();

    // The configured CA and name, HTTP/2 offered by ALPN: verified, h2.
    let extra = format!(
        "http2 = true\ntls_server_name = \"origin.internal\"\ntls_ca = \"{}\"",
        ca_file.display()
    );
    let server = TestServer::start(&manifest("api", std::slice::from_ref(&url), &extra)).await;
    let r = get(&c, &server.url("/x")).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.text(), "secure GET /x");
    assert_eq!(origin.requests()[0].version, http::Version::HTTP_2);
    server.shutdown().await;

    // Without HTTP/2: ALPN says http/1.1.
    let extra = format!(
        "tls_server_name = \"origin.internal\"\ntls_ca = \"{}\"",
        ca_file.display()
    );
    let server = TestServer::start(&manifest("api", std::slice::from_ref(&url), &extra)).await;
    assert_eq!(get(&c, &server.url("/y")).await.status, 200);
    assert_eq!(origin.requests()[1].version, http::Version::HTTP_11);
    server.shutdown().await;

    // The certificate does not name 127.0.0.1: refused, 502, and the web
    // PKI (the default) does not know the test CA either.
    for extra in [format!("tls_ca = \"{}\"", ca_file.display()), String::new()] {
        let server = TestServer::start(&manifest("api", std::slice::from_ref(&url), &extra)).await;
        let r = get(&c, &server.url("/z")).await;
        assert_eq!(r.status, 502, "{extra}: {}", r.text());
        server.shutdown().await;
    }
    assert_eq!(origin.requests().len(), 2);

    // tls_verify = false takes any certificate.
    let server = TestServer::start(&manifest(
        "api",
        std::slice::from_ref(&url),
        "tls_verify = false",
    ))
    .await;
    assert_eq!(get(&c, &server.url("/w")).await.status, 200);
    assert_eq!(origin.requests().len(), 3);
    server.shutdown().await;

    // A CA file that is not PEM is a startup error naming the file.
    std::fs::write(dir.path().join("bad.pem"), "not a certificate").unwrap();
    let text = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\ncache_dir = \"{}\"\n{}",
        shared_cache(),
        manifest(
            "api",
            &[url],
            &format!("tls_ca = \"{}\"", dir.path().join("bad.pem").display())
        )
    );
    let manifest = ignis_config::Manifest::from_str_at(&text, &repo().join("test.toml")).unwrap();
    let err = ignis::app::load(&manifest, ignis::app::Sources::PrebuiltOnly)
        .err()
        .expect("a bad CA file is refused");
    assert!(format!("{err:#}").contains("bad.pem"), "{err:#}");
}

/// A function in front of an upstream: it sees the request first and
/// passes it on as `http://api/...`, through the upstream's balancing,
/// ejection and retries. A function whose routes do not name the upstream
/// cannot reach it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_function_in_front_of_an_upstream_reaches_it_through_balancing_and_health() {
    let a = Recorder::start("a").await;
    let b = Recorder::start("b").await;
    let dead = dead_port().await;
    let text = format!(
        r#"
[upstreams.api]
origins = ["http://{dead}", "{a}", "{b}"]
eject_after = 1
eject_for = "60m"

[functions.front]
component = "{fetch}"

[functions.other]
component = "{fetch}"

[[routes]]
path = "/front"
function = "front"
upstream = "api"

[[routes]]
path = "/other"
function = "other"
"#,
        a = a.url(),
        b = b.url(),
        fetch = wasm("fetch"),
    );
    let server = TestServer::start(&text).await;
    let upstream = server.edge.upstream("api").unwrap().clone();
    let c = client();
    let mut answered = BTreeMap::<String, usize>::new();
    for _ in 0..6 {
        let r = get(&c, &server.url("/front?url=http://api/x")).await;
        assert_eq!(r.status, 200, "{}", r.text());
        *answered.entry(who(&r)).or_default() += 1;
    }
    assert_eq!(
        answered.keys().collect::<Vec<_>>(),
        ["a", "b"],
        "{answered:?}"
    );
    assert_eq!(answered.values().sum::<usize>(), 6);
    // The dead origin was tried once, ejected, and its request retried.
    let sent: BTreeMap<String, u64> = upstream.sent().into_iter().collect();
    assert_eq!(sent[&format!("http://{dead}")], 1, "{sent:?}");
    // The origin sees the guest's request with Via and the request id, and
    // no forwarding headers (the guest is the client).
    let seen = &a.requests()[0];
    assert_eq!(seen.headers["via"], "1.1 ignis");
    assert!(seen.headers.contains_key("x-request-id"));
    assert!(!seen.headers.contains_key("x-forwarded-for"));

    let before = a.requests().len() + b.requests().len();
    let r = get(&c, &server.url("/other?url=http://api/x")).await;
    assert_eq!(r.status, 502, "{}", r.text());
    assert!(r.text().contains("Denied"), "{}", r.text());
    assert_eq!(a.requests().len() + b.requests().len(), before);
    server.shutdown().await;
}

/// HTTP/1.1 origin connections are kept and reused: sequential requests
/// (with bodies, without, HEAD, 204) share one connection; a response with
/// `Connection: close` retires its connection and the next request opens a
/// new one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn origin_connections_are_kept_alive_and_retired_when_the_origin_closes() {
    let a = Recorder::start("a").await;
    let server = TestServer::start(&manifest("api", &[a.url()], "")).await;
    let c = client();
    for i in 0..30 {
        let r = match i % 4 {
            0 => get(&c, &server.url("/x")).await,
            1 => post(&c, &server.url("/y"), "body").await,
            2 => {
                let req = Request::head(server.url("/h"))
                    .body(Full::default())
                    .unwrap();
                send(&c, req).await
            }
            _ => get(&c, &server.url("/empty")).await,
        };
        assert!(
            r.status == 200 || r.status == 204,
            "{i}: {} {}",
            r.status,
            r.text()
        );
    }
    assert_eq!(
        a.connections.load(Ordering::SeqCst),
        1,
        "sequential requests should share one connection"
    );
    let r = get(&c, &server.url("/close")).await;
    assert_eq!(r.status, 200);
    assert_eq!(get(&c, &server.url("/x")).await.status, 200);
    assert_eq!(a.connections.load(Ordering::SeqCst), 2);
    // Concurrent requests each hold a connection; afterwards they are idle
    // and reused, never more than the pool keeps.
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let (c, url) = (c.clone(), server.url("/x"));
        tasks.push(tokio::spawn(async move { get(&c, &url).await.status }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), 200);
    }
    let after_burst = a.connections.load(Ordering::SeqCst);
    assert!(after_burst <= 10, "{after_burst}");
    for _ in 0..10 {
        assert_eq!(get(&c, &server.url("/x")).await.status, 200);
    }
    assert_eq!(a.connections.load(Ordering::SeqCst), after_burst);
    server.shutdown().await;
}

/// An origin that closes idle keep-alive connections sooner than the
/// proxy's pool would: the next request gets a new connection, not a 502,
/// and the origin is not counted as failing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kept_connection_the_origin_closed_is_not_a_failure() {
    let a = Recorder::start_with("a", None, Some(Duration::from_millis(100))).await;
    let server = TestServer::start(&manifest("api", &[a.url()], "eject_after = 1")).await;
    let upstream = server.edge.upstream("api").unwrap().clone();
    let c = client();
    for _ in 0..3 {
        assert_eq!(get(&c, &server.url("/x")).await.status, 200);
        // Wait until the origin has closed the idle connection.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while a.open.load(Ordering::SeqCst) > 0 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the origin kept its connection"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    assert_eq!(get(&c, &server.url("/x")).await.status, 200);
    assert_eq!(a.connections.load(Ordering::SeqCst), 4);
    assert_eq!(
        upstream.usable(),
        [(a.url(), true)],
        "the origin was ejected"
    );
    server.shutdown().await;
}

/// A body that stops moving, either way, is ended after `body_timeout`: an
/// origin that stalls mid-response cuts the client's response (no longer
/// held open forever), and a client that trickles its upload gets 408.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_bodies_are_cut_after_body_timeout() {
    let a = Recorder::start("a").await;
    let server = TestServer::start(&manifest("api", &[a.url()], "body_timeout = \"300ms\"")).await;
    // The origin sends "first" and stalls: the client sees the chunk, then
    // the body ends in an error, not a clean end.
    let resp = client()
        .request(
            Request::get(server.url("/stall"))
                .body(Full::default())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let body = tokio::time::timeout(Duration::from_secs(10), resp.into_body().collect())
        .await
        .expect("the stalled body was ended");
    assert!(body.is_err(), "a cut body must not look complete");

    // The client sends 2 of 10 bytes and stalls: 408.
    let mut s = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    s.write_all(b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\nab")
        .await
        .unwrap();
    let mut reply = Vec::new();
    let mut buf = [0u8; 1024];
    while !String::from_utf8_lossy(&reply).contains("\r\n\r\n") {
        let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf))
            .await
            .expect("an answer to a stalled upload")
            .unwrap();
        assert!(n > 0, "closed without an answer");
        reply.extend_from_slice(&buf[..n]);
    }
    let reply = String::from_utf8_lossy(&reply);
    assert!(reply.starts_with("HTTP/1.1 408"), "{reply}");
    server.shutdown().await;
}

/// The `traceparent` fields: `(trace id, parent id, flags)`.
fn trace_fields(v: &http::HeaderValue) -> (String, String, String) {
    let parts: Vec<&str> = v.to_str().unwrap().split('-').collect();
    assert_eq!((parts.len(), parts[0]), (4, "00"), "{v:?}");
    (parts[1].into(), parts[2].into(), parts[3].into())
}

/// Request ids are UUIDv7s the node makes (a client's own `x-request-id`
/// is not believed, a trusted proxy's is); the trace of a valid
/// `traceparent` continues to the origin with this hop's own span.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_ids_are_the_nodes_and_traces_continue_to_the_origin() {
    let origin = Recorder::start("a").await;
    let c = client();
    let client_trace = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let claimed = "0190f3a2-7c4e-7d1a-9b2c-3d4e5f607182";
    let request = |server: &TestServer| {
        Request::get(server.url("/x"))
            .header("x-request-id", claimed)
            .header("traceparent", client_trace)
            .body(Full::default())
            .unwrap()
    };

    // Untrusted client: its id is replaced, its trace continued.
    let server = TestServer::start(&manifest("api", &[origin.url()], "")).await;
    let r = send(&c, request(&server)).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let id = r.headers["x-request-id"].to_str().unwrap().to_string();
    assert_ne!(id, claimed);
    let uuid = uuid::Uuid::parse_str(&id).unwrap();
    assert_eq!(uuid.get_version_num(), 7, "{id}");
    let seen = origin.requests().pop().unwrap();
    assert_eq!(seen.headers["x-request-id"], id.as_str());
    let (trace, parent, flags) = trace_fields(&seen.headers["traceparent"]);
    assert_eq!(trace, "4bf92f3577b34da6a3ce929d0e0e4736");
    assert_ne!(parent, "00f067aa0ba902b7", "this hop has its own span");
    assert_eq!(flags, "01");
    // Without a traceparent, a new trace starts (its id is the request id).
    let r = get(&c, &server.url("/x")).await;
    let id = r.headers["x-request-id"].to_str().unwrap().replace('-', "");
    let seen = origin.requests().pop().unwrap();
    assert_eq!(trace_fields(&seen.headers["traceparent"]).0, id);
    server.shutdown().await;

    // A trusted proxy's UUID is kept; anything else it sends is replaced.
    let text = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\ncache_dir = \"{}\"\ntrusted_proxies = [\"127.0.0.1\"]\n{}",
        shared_cache(),
        manifest("api", &[origin.url()], "")
    );
    let server = TestServer::start_full(&text).await;
    let r = send(&c, request(&server)).await;
    assert_eq!(r.headers["x-request-id"], claimed);
    assert_eq!(
        origin.requests().pop().unwrap().headers["x-request-id"],
        claimed
    );
    let req = Request::get(server.url("/x"))
        .header("x-request-id", "abc\"; drop")
        .body(Full::default())
        .unwrap();
    let r = send(&c, req).await;
    let id = r.headers["x-request-id"].to_str().unwrap();
    assert_eq!(uuid::Uuid::parse_str(id).unwrap().get_version_num(), 7);
    server.shutdown().await;
}
