//! Serving: responses, streaming, concurrency, environment.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;

use crate::harness::*;

fn manifest() -> String {
    format!(
        r#"
[functions.hello]
component = "{hello}"
env = {{ GREETING = "hi from the manifest" }}

[functions.plain]
component = "{hello}"

[functions.echo]
component = "{echo}"
max_body = "8MiB"

[functions.compute]
component = "{compute}"

[functions.hello3]
component = "{hello3}"

[[routes]]
path = "/p3"
function = "hello3"

[[routes]]
path = "/hello"
function = "hello"

[[routes]]
path = "/plain/..."
function = "plain"

[[routes]]
path = "/echo"
function = "echo"

[[routes]]
path = "/compute"
function = "compute"
"#,
        hello = wasm("hello"),
        echo = wasm("echo"),
        compute = wasm("compute"),
        hello3 = wasm("hello_p3"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hello_env_and_routes() {
    let server = TestServer::start(&manifest()).await;
    let c = client();
    let r = get(&c, &server.url("/hello")).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.text(), "hi from the manifest\n");
    assert!(r.headers.contains_key("x-request-id"));
    let r = get(&c, &server.url("/plain/anything/below")).await;
    assert_eq!((r.status, r.text().as_str()), (200, "Hello from Ignis!\n"));
    let r = get(&c, &server.url("/nowhere")).await;
    assert_eq!(r.status, 404);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn echo_returns_large_bodies_intact() {
    let server = TestServer::start(&manifest()).await;
    let c = client();
    let body: Vec<u8> = (0..3_000_000u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 24) as u8)
        .collect();
    let r = post(&c, &server.url("/echo"), body.clone()).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body.len(), body.len());
    assert!(r.body == body, "echoed bytes differ");
    server.shutdown().await;
}

/// The echo guest answers the first chunk before the client has sent the
/// second: bodies stream both ways, nothing is buffered whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn echo_streams_in_both_directions() {
    let server = TestServer::start(&manifest()).await;
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, std::io::Error>>(4);
    let body = StreamBody::new(tokio_stream_from(rx));
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http();
    let req = http::Request::post(server.url("/echo")).body(body).unwrap();
    tx.send(Ok(Frame::data(Bytes::from_static(b"first chunk;"))))
        .await
        .unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(30), client.request(req))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    let first = tokio::time::timeout(Duration::from_secs(30), body.frame())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(
        first.into_data().unwrap(),
        Bytes::from_static(b"first chunk;")
    );
    // Only now send the rest.
    tx.send(Ok(Frame::data(Bytes::from_static(b"second chunk"))))
        .await
        .unwrap();
    drop(tx);
    let rest = body.collect().await.unwrap().to_bytes();
    assert_eq!(rest, Bytes::from_static(b"second chunk"));
    server.shutdown().await;
}

fn tokio_stream_from<T: Send + 'static>(
    mut rx: tokio::sync::mpsc::Receiver<T>,
) -> impl futures_core_stream::Stream<Item = T> {
    futures_core_stream::from_fn(move |cx| rx.poll_recv(cx))
}

/// A tiny `Stream` adapter so the test needs no stream crate.
mod futures_core_stream {
    use std::pin::Pin;
    use std::task::{Context, Poll};

    pub use futures_core::Stream;

    pub struct FromFn<F>(F);

    impl<T, F: FnMut(&mut Context<'_>) -> Poll<Option<T>> + Unpin> Stream for FromFn<F> {
        type Item = T;
        fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<T>> {
            (self.0)(cx)
        }
    }

    pub fn from_fn<T, F: FnMut(&mut Context<'_>) -> Poll<Option<T>> + Unpin>(f: F) -> FromFn<F> {
        FromFn(f)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_concurrent_requests_to_two_functions() {
    let server = TestServer::start(&manifest()).await;
    let c = client();
    let mut tasks = Vec::new();
    for i in 0..200u64 {
        let c = c.clone();
        let url = if i % 2 == 0 {
            server.url("/hello")
        } else {
            server.url(&format!("/compute?n={}", 100 + i))
        };
        tasks.push(tokio::spawn(async move { (i, get(&c, &url).await) }));
    }
    for t in tasks {
        let (i, r) = t.await.unwrap();
        assert_eq!(r.status, 200, "request {i}: {}", r.text());
        if i % 2 == 0 {
            assert_eq!(r.text(), "hi from the manifest\n");
        } else {
            let n = 100 + i;
            let expected = (2..n)
                .filter(|&c| (2..c).take_while(|d| d * d <= c).all(|d| c % d != 0))
                .count();
            assert_eq!(r.text(), format!("primes below {n}: {expected}\n"));
        }
    }
    assert_eq!(
        server
            .function("hello")
            .stats()
            .requests
            .load(std::sync::atomic::Ordering::Relaxed),
        100
    );
    assert_eq!(
        server
            .function("compute")
            .stats()
            .requests
            .load(std::sync::atomic::Ordering::Relaxed),
        100
    );
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_prior_knowledge_works() {
    let server = TestServer::start(&manifest()).await;
    let c: HttpClient =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .http2_only(true)
            .build_http();
    let mut tasks = Vec::new();
    for _ in 0..20 {
        let c = c.clone();
        let url = server.url("/hello");
        tasks.push(tokio::spawn(async move { get(&c, &url).await }));
    }
    for t in tasks {
        let r = t.await.unwrap();
        assert_eq!(
            (r.status, r.text().as_str()),
            (200, "hi from the manifest\n")
        );
    }
    server.shutdown().await;
}

/// A WASI 0.3 (`wasi:http@0.3.0` service world) component is served next to
/// 0.2 ones, from the same runtime.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wasi_http_0_3_service_components_are_served() {
    let server = TestServer::start(&manifest()).await;
    let c = client();
    for _ in 0..20 {
        let r = get(&c, &server.url("/p3")).await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.text(), "Hello from Ignis over WASI 0.3!\n");
        assert_eq!(r.headers["content-type"], "text/plain");
    }
    wait_idle(server.function("hello3")).await;
    server.shutdown().await;
}
