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
                            if req.uri().path() == "/slow" {
                                // A slow origin: answers after 5 s.
                                tokio::time::sleep(std::time::Duration::from_secs(5)).await;
                            }
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
    // The name, and (it is loopback) the address it resolves to.
    let server = TestServer::start(&manifest(&format!(
        "\"localhost:{port}\", \"127.0.0.1:{port}\""
    )))
    .await;
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

/// A tenant that lists its own name, and points that name at loopback (or
/// the metadata address), is refused: only a listed address may be
/// private. Fails on the code before, where an exactly listed name could
/// resolve anywhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exactly_listed_name_resolving_to_loopback_is_refused() {
    let origin = origin().await;
    let port = origin.addr.port();
    let server = TestServer::start(&manifest(&format!("\"localhost:{port}\""))).await;
    let c = client();
    let r = get(
        &c,
        &server.url(&format!("/fetch?url=http://localhost:{port}/")),
    )
    .await;
    assert_eq!(r.status, 502);
    assert!(r.text().contains("DestinationIpProhibited"), "{}", r.text());
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

fn backend_manifest(backends: &str, function_extra: &str) -> String {
    format!(
        r#"
{backends}

[functions.fetch]
component = "{fetch}"
{function_extra}

[[routes]]
path = "/fetch"
function = "fetch"
"#,
        fetch = wasm("fetch"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn named_backends_pool_connections_and_time_out() {
    let origin = origin().await;
    let port = origin.addr.port();
    let server = TestServer::start(&backend_manifest(
        &format!(
            "[backends.origin]\nurl = \"http://127.0.0.1:{port}\"\ntimeout = \"500ms\"\npool_size = 4"
        ),
        "backends = [\"origin\"]",
    ))
    .await;
    let c = client();
    // Reached by name: 30 requests, a handful of connections.
    for i in 1..=30u64 {
        let r = get(&c, &server.url("/fetch?url=http://origin/hello")).await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.text(), format!("origin saw /hello #{i}"));
    }
    let conns = origin.connections.load(Ordering::SeqCst);
    assert!(
        conns <= 2,
        "30 sequential requests opened {conns} connections"
    );
    // Reached by its own URL: the backend's settings apply (loopback is
    // allowed because the operator named it), same pool.
    let r = get(
        &c,
        &server.url(&format!("/fetch?url=http://127.0.0.1:{port}/direct")),
    )
    .await;
    assert_eq!(
        (r.status, r.text()),
        (200, "origin saw /direct #31".to_string())
    );
    assert_eq!(origin.connections.load(Ordering::SeqCst), conns);
    // The backend's timeout cuts a slow origin.
    let r = get(&c, &server.url("/fetch?url=http://origin/slow")).await;
    assert_eq!(r.status, 502);
    assert!(r.text().contains("HttpResponseTimeout"), "{}", r.text());
    server.shutdown().await;

    // A function that does not list the backend cannot use it.
    let server = TestServer::start(&backend_manifest(
        &format!("[backends.origin]\nurl = \"http://127.0.0.1:{port}\""),
        "",
    ))
    .await;
    let before = origin.requests.load(Ordering::SeqCst);
    let r = get(&c, &server.url("/fetch?url=http://origin/hello")).await;
    assert_eq!(r.status, 502);
    assert!(r.text().contains("HttpRequestDenied"), "{}", r.text());
    assert_eq!(origin.requests.load(Ordering::SeqCst), before);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbound_calls_per_request_are_capped() {
    let origin = origin().await;
    let port = origin.addr.port();
    let server = TestServer::start(&backend_manifest(
        &format!("[backends.origin]\nurl = \"http://127.0.0.1:{port}\""),
        "backends = [\"origin\"]\nmax_outbound_requests = 3",
    ))
    .await;
    let c = client();
    for _ in 0..2 {
        let r = get(&c, &server.url("/fetch?url=http://origin/x&count=5")).await;
        assert_eq!(r.status, 200, "{}", r.text());
        let lines: Vec<&str> = r.text().leak().lines().collect();
        assert_eq!(lines.len(), 5, "{lines:?}");
        for line in &lines[..3] {
            assert!(line.ends_with(": 200"), "{lines:?}");
        }
        for line in &lines[3..] {
            assert!(line.contains("HttpRequestDenied"), "{lines:?}");
        }
    }
    // The limit is per guest request: each of the two got its three.
    assert_eq!(origin.requests.load(Ordering::SeqCst), 6);
    server.shutdown().await;
}

/// An HTTPS origin on 127.0.0.1:0 with a self-signed certificate for `localhost`.
async fn tls_origin() -> SocketAddr {
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(cert.signing_key.serialize_der().into());
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(vec![cert.cert.der().clone()], key)
    .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(stream).await else {
                    return;
                };
                let service = hyper::service::service_fn(|_req| async {
                    Ok::<_, Infallible>(http::Response::new(Full::new(Bytes::from_static(
                        b"secure origin",
                    ))))
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tls), service)
                    .await;
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_tls_is_verified_unless_turned_off() {
    let addr = tls_origin().await;
    let port = addr.port();
    let server = TestServer::start(&format!(
        r#"
[backends.checked]
url = "https://localhost:{port}"

[backends.unchecked]
url = "https://localhost:{port}"
tls_verify = false

[functions.strict]
component = "{fetch}"
backends = ["checked"]

[functions.lax]
component = "{fetch}"
backends = ["unchecked"]

[[routes]]
path = "/strict"
function = "strict"

[[routes]]
path = "/lax"
function = "lax"
"#,
        fetch = wasm("fetch"),
    ))
    .await;
    let c = client();
    // Verification is on by default: a self-signed certificate is refused.
    let r = get(&c, &server.url("/strict?url=http://checked/")).await;
    assert_eq!(r.status, 502, "{}", r.text());
    assert!(r.text().contains("TlsProtocolError"), "{}", r.text());
    // Turned off for this backend only: the same origin answers.
    let r = get(&c, &server.url("/lax?url=http://unchecked/")).await;
    assert_eq!((r.status, r.text().as_str()), (200, "secure origin"));
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_cannot_open_more_outbound_connections_than_its_cap() {
    // Fails on the code before: there was no per-tenant cap, so one
    // tenant's guests could open connections until the node ran out of
    // sockets, everyone else's outbound calls included.
    let origin = origin().await;
    let port = origin.addr.port();
    let allowed = format!("\"127.0.0.1:{port}\"");
    let server = TestServer::start(&format!(
        r#"
[tenants.capped]
max_outbound_connections = 1

[functions.fetch]
component = "{fetch}"
tenant = "capped"
allowed_outbound_hosts = [{allowed}]

[functions.other]
component = "{fetch}"
tenant = "other"
allowed_outbound_hosts = [{allowed}]

[[routes]]
path = "/fetch"
function = "fetch"

[[routes]]
path = "/other"
function = "other"
"#,
        fetch = wasm("fetch"),
    ))
    .await;
    let c = client();
    // The capped tenant's one connection is busy with a slow call ...
    let slow = {
        let (c, url) = (
            c.clone(),
            server.url(&format!("/fetch?url=http://127.0.0.1:{port}/slow")),
        );
        tokio::spawn(async move { get(&c, &url).await })
    };
    let seen = tokio::time::timeout(std::time::Duration::from_secs(20), async {
        while origin.requests.load(Ordering::SeqCst) == 0 {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    })
    .await;
    assert!(seen.is_ok(), "the slow call reached the origin");
    // ... so a second connection is refused at once, with its own code ...
    let r = get(
        &c,
        &server.url(&format!("/fetch?url=http://127.0.0.1:{port}/second")),
    )
    .await;
    assert_eq!(r.status, 502);
    assert!(r.text().contains("ConnectionLimitReached"), "{}", r.text());
    // ... while another tenant connects as usual.
    let r = get(
        &c,
        &server.url(&format!("/other?url=http://127.0.0.1:{port}/x")),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    // Once the slow call is done its connection (kept alive) serves again.
    let r = slow.await.unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    let r = get(
        &c,
        &server.url(&format!("/fetch?url=http://127.0.0.1:{port}/third")),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    server.shutdown().await;
}
