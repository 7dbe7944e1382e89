//! Outbound HTTP: allowlist, private-address policy, connection reuse.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use http_body_util::Full;
use hyper_util::rt::{TokioExecutor, TokioIo};

use crate::harness::*;

/// A keep-alive origin on 127.0.0.1:0 that counts connections and requests.
struct Origin {
    addr: SocketAddr,
    connections: Arc<AtomicU64>,
    requests: Arc<AtomicU64>,
}

async fn origin() -> Origin {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let connections = Arc::new(AtomicU64::new(0));
    let requests = Arc::new(AtomicU64::new(0));
    let (conns, reqs) = (connections.clone(), requests.clone());
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            conns.fetch_add(1, Ordering::SeqCst);
            let reqs = reqs.clone();
            tokio::spawn(async move {
                let service =
                    hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                        let n = reqs.fetch_add(1, Ordering::SeqCst) + 1;
                        async move {
                            Ok::<_, Infallible>(http::Response::new(Full::new(Bytes::from(
                                format!("origin saw {} #{n}", req.uri().path()),
                            ))))
                        }
                    });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    Origin {
        addr,
        connections,
        requests,
    }
}

fn manifest(allowed: &str) -> String {
    format!(
        r#"
[functions.fetch]
component = "{fetch}"
allowed_outbound_hosts = [{allowed}]

[[routes]]
path = "/fetch"
function = "fetch"
"#,
        fetch = wasm("fetch"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allowed_host_works_and_connections_are_reused() {
    let origin = origin().await;
    let port = origin.addr.port();
    let server = TestServer::start(&manifest(&format!("\"localhost:{port}\""))).await;
    let c = client();
    for i in 1..=20u64 {
        let r = get(
            &c,
            &server.url(&format!("/fetch?url=http://localhost:{port}/data")),
        )
        .await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.text(), format!("origin saw /data #{i}"));
    }
    assert_eq!(origin.requests.load(Ordering::SeqCst), 20);
    let conns = origin.connections.load(Ordering::SeqCst);
    assert!(
        conns <= 2,
        "20 sequential requests opened {conns} connections"
    );
    assert_eq!(server.function("fetch").outbound_connections(), conns);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unlisted_hosts_and_loopback_are_refused() {
    let origin = origin().await;
    let port = origin.addr.port();
    let server = TestServer::start(&manifest(&format!("\"localhost:{port}\", \"*\""))).await;
    let c = client();
    // 127.0.0.1 is matched only by the wildcard, which never allows private addresses.
    let r = get(
        &c,
        &server.url(&format!("/fetch?url=http://127.0.0.1:{port}/")),
    )
    .await;
    assert_eq!(r.status, 502);
    assert!(r.text().contains("DestinationIpProhibited"), "{}", r.text());
    // A name that resolves to loopback, matched by the wildcard only (other port): refused too.
    let r = get(
        &c,
        &server.url(&format!(
            "/fetch?url=http://localhost:{}/",
            port.wrapping_add(1)
        )),
    )
    .await;
    assert_eq!(r.status, 502);
    assert!(r.text().contains("DestinationIpProhibited"), "{}", r.text());
    assert_eq!(origin.requests.load(Ordering::SeqCst), 0);
    server.shutdown().await;

    let server = TestServer::start(&manifest(&format!("\"localhost:{port}\""))).await;
    for url in [
        format!("http://127.0.0.1:{port}/"),
        "http://denied.example/".to_string(),
    ] {
        let r = get(&c, &server.url(&format!("/fetch?url={url}"))).await;
        assert_eq!(r.status, 502);
        assert!(
            r.text().contains("HttpRequestDenied"),
            "{url}: {}",
            r.text()
        );
    }
    assert_eq!(origin.connections.load(Ordering::SeqCst), 0);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_listed_means_nothing_allowed() {
    let origin = origin().await;
    let server = TestServer::start(&manifest("")).await;
    let r = get(
        &client(),
        &server.url(&format!(
            "/fetch?url=http://localhost:{}/",
            origin.addr.port()
        )),
    )
    .await;
    assert_eq!(r.status, 502);
    assert!(r.text().contains("HttpRequestDenied"), "{}", r.text());
    assert_eq!(origin.connections.load(Ordering::SeqCst), 0);
    server.shutdown().await;
}
