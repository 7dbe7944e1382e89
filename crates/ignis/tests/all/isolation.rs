//! A misbehaving guest gets its own error and never hurts anyone else.

use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::io::AsyncWriteExt;

use crate::harness::*;

fn manifest(cpu: &str, wall: &str) -> String {
    format!(
        r#"
[functions.limits]
component = "{limits}"
memory = "32MiB"
cpu_time = "{cpu}"
wall_time = "{wall}"

[functions.hello]
component = "{hello}"

[[routes]]
path = "/limits/..."
function = "limits"

[[routes]]
path = "/hello"
function = "hello"
"#,
        limits = wasm("limits"),
        hello = wasm("hello"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn infinite_loops_are_stopped_while_others_are_served() {
    let server = TestServer::start(&manifest("300ms", "20s")).await;
    let c = client();
    // Two spinning guests: as many as there are worker threads.
    let spinners: Vec<_> = (0..2)
        .map(|_| {
            let c = c.clone();
            let url = server.url("/limits/loop");
            tokio::spawn(async move { get(&c, &url).await })
        })
        .collect();
    let limits = server.function("limits").clone();
    tokio::time::timeout(
        Duration::from_secs(30),
        limits
            .stats()
            .wait_until(|s| s.active.load(Ordering::SeqCst) == 2),
    )
    .await
    .expect("both spinners running");
    // While both spin, hello requests still complete.
    for _ in 0..20 {
        let r = get(&c, &server.url("/hello")).await;
        assert_eq!(r.status, 200);
    }
    for s in spinners {
        let r = s.await.unwrap();
        assert_eq!(r.status, 504, "{}", r.text());
        assert!(r.text().contains("cpu time limit exceeded"), "{}", r.text());
    }
    assert_eq!(limits.stats().cpu_kills.load(Ordering::Relaxed), 2);
    wait_idle(&limits).await;
    server.shutdown().await;
}

/// The epoch ticker parks while no store exists and the next request wakes
/// it: a spinning guest that starts on an idle server is still stopped at its
/// CPU budget (without ticks it would spin forever; a watchdog ends the run).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_server_parks_its_ticker_and_still_stops_a_spinning_guest() {
    let server = TestServer::start(&manifest("300ms", "20s")).await;
    let runtime = server.runtime.clone();
    let waiting = runtime.clone();
    let parked = tokio::task::spawn_blocking(move || {
        waiting.wait_epoch_ticker_parked(Duration::from_secs(30))
    })
    .await
    .unwrap();
    assert!(parked, "the ticker did not park on an idle server");
    let parked_at = runtime.epoch_ticks();
    // A guest that never yields blocks its worker thread and, with it,
    // tokio's timers: the watchdog is a plain thread, and it ends the run
    // (a panic would leave the test runtime waiting for that worker forever).
    let (answered, watch) = std::sync::mpsc::channel::<()>();
    let watchdog = std::thread::spawn(move || {
        if watch.recv_timeout(Duration::from_secs(60)).is_err() {
            eprintln!("the spinning guest was never stopped: the epoch ticker did not wake");
            std::process::exit(1);
        }
    });
    let r = get(&client(), &server.url("/limits/loop")).await;
    answered.send(()).unwrap();
    watchdog.join().unwrap();
    assert_eq!(r.status, 504, "{}", r.text());
    assert!(r.text().contains("cpu time limit exceeded"), "{}", r.text());
    assert!(runtime.epoch_ticks() > parked_at);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_bomb_gets_500_and_the_function_recovers() {
    let server = TestServer::start(&manifest("5s", "10s")).await;
    let c = client();
    let r = get(&c, &server.url("/limits/bomb")).await;
    assert_eq!(r.status, 500);
    assert!(r.text().contains("memory limit exceeded"), "{}", r.text());
    assert_eq!(
        server
            .function("limits")
            .stats()
            .memory_kills
            .load(Ordering::Relaxed),
        1
    );
    let r = get(&c, &server.url("/limits/sleep?ms=1")).await;
    assert_eq!((r.status, r.text().as_str()), (200, "slept\n"));
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guest_cannot_hold_unbounded_host_resources() {
    // Fails on the code before: the resource table took up to a million
    // entries, each header map up to 128 KiB of host memory, so one
    // request could make the host hold far more than its memory limit.
    let server = TestServer::start(&manifest("5s", "10s")).await;
    let c = client();
    let r = get(&c, &server.url("/limits/handles?n=1000")).await;
    assert_eq!(
        (r.status, r.text().as_str()),
        (200, "holding 1000 header maps\n")
    );
    let r = get(&c, &server.url("/limits/handles?n=5000")).await;
    assert_eq!(r.status, 500, "{}", r.text());
    assert!(r.text().contains("guest trapped"), "{}", r.text());
    let r = get(&c, &server.url("/hello")).await;
    assert_eq!(r.status, 200);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trap_gets_500_with_request_id() {
    let server = TestServer::start(&manifest("5s", "10s")).await;
    let c = client();
    let r = get(&c, &server.url("/limits/trap")).await;
    assert_eq!(r.status, 500);
    let id = r.headers["x-request-id"].to_str().unwrap().to_string();
    assert!(
        r.text().contains(&format!("request id {id}")),
        "{}",
        r.text()
    );
    assert!(r.text().contains("guest trapped"), "{}", r.text());
    let r = get(&c, &server.url("/limits/noreply")).await;
    assert_eq!(r.status, 500);
    assert!(r.text().contains("no response"), "{}", r.text());
    assert_eq!(
        server
            .function("limits")
            .stats()
            .traps
            .load(Ordering::Relaxed),
        1
    );
    // Still healthy afterwards.
    assert_eq!(get(&c, &server.url("/hello")).await.status, 200);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wall_deadline_gives_504() {
    let server = TestServer::start(&manifest("5s", "300ms")).await;
    let c = client();
    let r = get(&c, &server.url("/limits/sleep?ms=60000")).await;
    assert_eq!(r.status, 504);
    assert!(
        r.text().contains("wall time limit exceeded"),
        "{}",
        r.text()
    );
    assert_eq!(
        server
            .function("limits")
            .stats()
            .wall_kills
            .load(Ordering::Relaxed),
        1
    );
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_disconnect_cancels_the_guest() {
    let server = TestServer::start(&manifest("60s", "60s")).await;
    let limits = server.function("limits").clone();
    let mut conn = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    conn.write_all(b"GET /limits/loop HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    tokio::time::timeout(
        Duration::from_secs(30),
        limits
            .stats()
            .wait_until(|s| s.active.load(Ordering::SeqCst) == 1),
    )
    .await
    .expect("guest started");
    drop(conn);
    wait_idle(&limits).await;
    assert_eq!(limits.stats().cancelled.load(Ordering::Relaxed), 1);
    assert_eq!(limits.stats().cpu_kills.load(Ordering::Relaxed), 0);
    // Mid-body disconnect: the streaming guest is cancelled too.
    let mut conn = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    conn.write_all(b"GET /limits/drip?n=100000 HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let mut first = [0u8; 64];
    let n = tokio::io::AsyncReadExt::read(&mut conn, &mut first)
        .await
        .unwrap();
    assert!(String::from_utf8_lossy(&first[..n]).starts_with("HTTP/1.1 200"));
    drop(conn);
    wait_idle(&limits).await;
    assert_eq!(limits.stats().cancelled.load(Ordering::Relaxed), 2);
    server.shutdown().await;
}
