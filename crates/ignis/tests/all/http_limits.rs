//! Bad requests get the right 4xx; the process never panics.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::harness::*;

fn manifest() -> String {
    format!(
        r#"
[server]
listen = "127.0.0.1:0"
cache_dir = "{cache}"
max_header_bytes = "8KiB"
max_headers = 20
header_read_timeout = "1s"

[functions.echo]
component = "{echo}"
max_body = "1KiB"

[functions.limits]
component = "{limits}"
max_body = "1KiB"

[[routes]]
path = "/echo"
function = "echo"

[[routes]]
path = "/consume"
function = "limits"
"#,
        cache = shared_cache(),
        echo = wasm("echo"),
        limits = wasm("limits"),
    )
}

pub fn status_of(reply: &str) -> u16 {
    reply
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {reply:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_and_too_many_headers_get_431() {
    let server = TestServer::start_full(&manifest()).await;
    let big = format!(
        "GET /echo HTTP/1.1\r\nhost: x\r\nx-big: {}\r\n\r\n",
        "a".repeat(20_000)
    );
    assert_eq!(status_of(&raw(server.addr, big.as_bytes()).await), 431);
    let mut many = String::from("GET /echo HTTP/1.1\r\nhost: x\r\n");
    for i in 0..40 {
        many.push_str(&format!("x-h{i}: v\r\n"));
    }
    many.push_str("\r\n");
    assert_eq!(status_of(&raw(server.addr, many.as_bytes()).await), 431);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_bodies_get_413() {
    let server = TestServer::start_full(&manifest()).await;
    let c = client();
    // Declared length over the limit: refused before any guest runs.
    let r = post(&c, &server.url("/echo"), vec![b'x'; 4096]).await;
    assert_eq!(r.status, 413);
    assert_eq!(
        server
            .function("echo")
            .stats()
            .requests
            .load(std::sync::atomic::Ordering::Relaxed),
        0
    );
    // Chunked body that crosses the limit while streaming, to a guest that
    // reads it all before answering: 413.
    let chunked = |path: &str| {
        let mut req = format!(
            "POST {path} HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n"
        );
        for _ in 0..8 {
            req.push_str(&format!("200\r\n{}\r\n", "y".repeat(512)));
        }
        req.push_str("0\r\n\r\n");
        req
    };
    let reply = raw(server.addr, chunked("/consume").as_bytes()).await;
    assert_eq!(status_of(&reply), 413, "{reply}");
    // A guest that already answered (echo streams as it reads) cannot get a
    // 413 any more: its response is cut off instead of ending cleanly.
    let reply = raw(server.addr, chunked("/echo").as_bytes()).await;
    assert_eq!(status_of(&reply), 200, "{reply}");
    assert!(
        !reply.ends_with("0\r\n\r\n"),
        "over-limit echo must not end as a complete response: {reply}"
    );
    // Within the limit is fine.
    let r = post(&c, &server.url("/echo"), vec![b'z'; 1000]).await;
    assert_eq!((r.status, r.body.len()), (200, 1000));
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_requests_get_400() {
    let server = TestServer::start_full(&manifest()).await;
    assert_eq!(status_of(&raw(server.addr, b"GARBAGE\r\n\r\n").await), 400);
    assert_eq!(
        status_of(
            &raw(
                server.addr,
                b"GET /echo HTTP/1.1\r\nbad header line\r\n\r\n"
            )
            .await
        ),
        400
    );
    assert_eq!(
        status_of(
            &raw(
                server.addr,
                b"POST /echo HTTP/1.1\r\nhost: x\r\ncontent-length: nope\r\n\r\n"
            )
            .await
        ),
        400
    );
    // The server is still serving.
    let r = post(&client(), &server.url("/echo"), "ok").await;
    assert_eq!((r.status, r.text().as_str()), (200, "ok"));
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_that_never_sends_a_request_is_closed() {
    // Fails on the code before: hyper-util's protocol detection (HTTP/1.1 or
    // the h2 preface) had no timeout, so these sockets stayed open forever.
    let server = TestServer::start_full(&manifest()).await;
    for first in [&b""[..], b"P", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"] {
        let mut conn = tokio::net::TcpStream::connect(server.addr).await.unwrap();
        conn.write_all(first).await.unwrap();
        let mut buf = Vec::new();
        let closed =
            tokio::time::timeout(Duration::from_secs(20), conn.read_to_end(&mut buf)).await;
        assert!(
            closed.is_ok(),
            "server should close a connection that sent {first:?} and nothing more"
        );
    }
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_and_idle_connections_are_closed() {
    let server = TestServer::start_full(&manifest()).await;
    // A head that never completes.
    let mut slow = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    slow.write_all(b"GET /echo HTTP/1.1\r\nhost: x\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(20), slow.read_to_end(&mut buf)).await;
    assert!(
        closed.is_ok(),
        "server should close a connection whose head never completes"
    );
    // An idle keep-alive connection after one request.
    let mut idle = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    idle.write_all(b"POST /echo HTTP/1.1\r\nhost: x\r\ncontent-length: 2\r\n\r\nhi")
        .await
        .unwrap();
    let mut buf = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(20), idle.read_to_end(&mut buf)).await;
    assert!(
        closed.is_ok(),
        "server should close an idle keep-alive connection"
    );
    assert!(String::from_utf8_lossy(&buf).starts_with("HTTP/1.1 200"));
    server.shutdown().await;
}

/// Sends `bytes` on a new connection and reads until the server closes it
/// (at most 10 s); the reply, and whether the server closed.
pub async fn exchange(addr: std::net::SocketAddr, bytes: &[u8]) -> (String, bool) {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(bytes).await.unwrap();
    let mut out = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out))
        .await
        .is_ok();
    (String::from_utf8_lossy(&out).into_owned(), closed)
}

/// Request smuggling vectors on the wire. Each ambiguous request gets 400,
/// its connection is closed, and nothing reaches the guest. The
/// Transfer-Encoding list, duplicate Host and absolute-form checks are
/// Ignis's own (`ambiguous_framing`); before them these four requests were
/// served (200) with the connection kept open: `te-twice`,
/// `te-identity-chunked`, `two-hosts`, `absolute-form-other-host`. The
/// repeated identical Content-Length and the bare LF ones are refused by
/// the head scanner in front of hyper (framing.rs); before it hyper served
/// them (200).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_smuggling_vectors_get_400_and_close_the_connection() {
    let server = TestServer::start_full(&manifest()).await;
    let echo = server.function("echo").stats().clone();
    let smuggled = "GET /echo HTTP/1.1\r\nHost: a\r\n\r\n";
    let cases = smuggling_vectors("/echo");
    for (name, request) in &cases {
        let before = echo.requests.load(std::sync::atomic::Ordering::Relaxed);
        let (reply, closed) = exchange(server.addr, request.as_bytes()).await;
        assert_eq!(status_of(&reply), 400, "{name}: {reply}");
        assert_eq!(reply.matches("HTTP/1.").count(), 1, "{name}: {reply}");
        assert!(closed, "{name}: the connection stayed open");
        assert_eq!(
            echo.requests.load(std::sync::atomic::Ordering::Relaxed),
            before,
            "{name}: reached the guest"
        );
    }

    // Content-Length with Transfer-Encoding: hyper drops the length, reads
    // the body as chunked (RFC 9112 section 6.1) and closes the connection
    // after the response, so the bytes after the chunked body are never
    // read as a second request.
    let (reply, closed) = exchange(
        server.addr,
        format!("POST /echo HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n{smuggled}").as_bytes(),
    )
    .await;
    assert_eq!(reply.matches("HTTP/1.").count(), 1, "{reply}");
    assert!(closed, "the connection stayed open: {reply}");
    assert_eq!(status_of(&reply), 200, "{reply}");
    // The guest got the chunked body (empty), not the 5 bytes the length named.
    let (head, echoed) = reply.split_once("\r\n\r\n").unwrap();
    let head = head.to_ascii_lowercase();
    assert!(
        (head.contains("content-length: 0") && echoed.is_empty())
            || (head.contains("transfer-encoding: chunked") && echoed == "0\r\n\r\n"),
        "{reply}"
    );

    // The same host in the target and in Host is fine.
    let (reply, _) = exchange(
        server.addr,
        b"GET http://A.example/echo HTTP/1.1\r\nHost: a.example:80\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status_of(&reply), 200, "{reply}");
    server.shutdown().await;
}

/// Request smuggling vectors on the wire (name, bytes) for a route at
/// `path`: each must get 400 with its connection closed, and reach nothing
/// behind the edge.
pub fn smuggling_vectors(path: &str) -> Vec<(&'static str, String)> {
    let smuggled = format!("GET {path} HTTP/1.1\r\nHost: a\r\n\r\n");
    let body = "5\r\nhello\r\n0\r\n\r\n";
    vec![
        (
            "differing-content-length",
            format!(
                "POST {path} HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!"
            ),
        ),
        (
            "content-length-list",
            format!("POST {path} HTTP/1.1\r\nHost: a\r\nContent-Length: 5, 5\r\n\r\nhello"),
        ),
        (
            "te-twice",
            format!(
                "POST {path} HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n{body}{smuggled}"
            ),
        ),
        (
            "te-identity-chunked",
            format!(
                "POST {path} HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: identity, chunked\r\n\r\n{body}{smuggled}"
            ),
        ),
        (
            "te-chunked-identity",
            format!(
                "POST {path} HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, identity\r\n\r\n{body}{smuggled}"
            ),
        ),
        (
            "te-space-before-colon",
            format!(
                "POST {path} HTTP/1.1\r\nHost: a\r\nTransfer-Encoding : chunked\r\n\r\n{body}{smuggled}"
            ),
        ),
        (
            "te-xchunked",
            format!(
                "POST {path} HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: xchunked\r\n\r\n{body}{smuggled}"
            ),
        ),
        (
            "te-vertical-tab",
            format!(
                "POST {path} HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: \x0bchunked\r\n\r\n{body}{smuggled}"
            ),
        ),
        (
            "te-on-http-1.0",
            format!(
                "POST {path} HTTP/1.0\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n{body}{smuggled}"
            ),
        ),
        (
            "obs-fold",
            format!(
                "POST {path} HTTP/1.1\r\nHost: a\r\nX-A: b\r\n c\r\nContent-Length: 5\r\n\r\nhello{smuggled}"
            ),
        ),
        (
            "obs-fold-transfer-encoding",
            format!(
                "POST {path} HTTP/1.1\r\nHost: a\r\nTransfer-Encoding:\r\n chunked\r\n\r\n{body}{smuggled}"
            ),
        ),
        (
            "bare-cr",
            format!(
                "POST {path} HTTP/1.1\r\nHost: a\rX: y\r\nContent-Length: 5\r\n\r\nhello{smuggled}"
            ),
        ),
        (
            "two-hosts",
            format!("GET {path} HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n{smuggled}"),
        ),
        (
            "absolute-form-other-host",
            format!("GET http://b.example{path} HTTP/1.1\r\nHost: a.example\r\n\r\n{smuggled}"),
        ),
        (
            "repeated-identical-content-length",
            format!(
                "POST {path} HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\nhello{smuggled}"
            ),
        ),
        (
            "bare-lf",
            format!("POST {path} HTTP/1.1\nHost: a\nContent-Length: 5\n\nhello{smuggled}"),
        ),
        (
            "bare-lf-in-one-line",
            format!("GET {path} HTTP/1.1\r\nHost: a\nX: y\r\n\r\n{smuggled}"),
        ),
        (
            "negative-content-length",
            format!("POST {path} HTTP/1.1\r\nHost: a\r\nContent-Length: -5\r\n\r\nhello"),
        ),
    ]
}
