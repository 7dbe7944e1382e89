//! Instance reuse (`reuse`): a function's instance serves consecutive
//! requests, one at a time, and is retired by count, by age, or by any
//! failure; per-request limits stay per request; never across functions or
//! tenants. The guests count the requests their instance served, so each
//! response says which request of its instance it was.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::time::Duration;

use crate::harness::*;

/// `instance request N` -> N.
fn nth(r: &Reply) -> u64 {
    assert_eq!(r.status, 200, "{}", r.text());
    r.text()
        .trim()
        .strip_prefix("instance request ")
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("not an instance count: {}", r.text()))
}

fn p3(name: &str, extra: &str) -> String {
    format!(
        r#"
[functions.{name}]
component = "{wasm}"
{extra}

[[routes]]
path = "/{name}/..."
function = "{name}"
"#,
        wasm = wasm("limits_p3"),
    )
}

/// Sends `path` and waits until its request has left the instance (given
/// back or retired), so the next request sees the pool as it is.
async fn one(server: &TestServer, function: &str, path: &str) -> Reply {
    let r = get(&client(), &server.url(path)).await;
    wait_idle(server.function(function)).await;
    r
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_03_instance_serves_consecutive_requests_until_max_requests() {
    let server = TestServer::start(&p3("svc", "reuse = { max_requests = 3 }")).await;
    let mut seen = Vec::new();
    for _ in 0..7 {
        seen.push(nth(&one(&server, "svc", "/svc/instance").await));
    }
    // Three requests per instance, then a fresh one.
    assert_eq!(seen, [1, 2, 3, 1, 2, 3, 1]);
    let stats = server.function("svc").stats();
    assert_eq!(stats.fresh_instances.load(Ordering::SeqCst), 3);
    assert_eq!(stats.reused.load(Ordering::SeqCst), 4);
    assert_eq!(stats.idle_instances.load(Ordering::SeqCst), 1);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_03_function_reuses_by_default_and_reuse_false_turns_it_off() {
    let text = format!("{}{}", p3("dflt", ""), p3("off", "reuse = false"));
    let server = TestServer::start(&text).await;
    let mut dflt = Vec::new();
    let mut off = Vec::new();
    for _ in 0..3 {
        dflt.push(nth(&one(&server, "dflt", "/dflt/instance").await));
        off.push(nth(&one(&server, "off", "/off/instance").await));
    }
    assert_eq!(dflt, [1, 2, 3]);
    assert_eq!(off, [1, 1, 1]);
    let off = server.function("off").stats();
    assert_eq!(off.fresh_instances.load(Ordering::SeqCst), 3);
    assert_eq!(off.idle_instances.load(Ordering::SeqCst), 0);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_02_function_reuses_only_when_asked() {
    let text = format!(
        r#"
[functions.fresh]
component = "{limits}"

[functions.kept]
component = "{limits}"
reuse = true

[[routes]]
path = "/fresh/..."
function = "fresh"

[[routes]]
path = "/kept/..."
function = "kept"
"#,
        limits = wasm("limits"),
    );
    let server = TestServer::start(&text).await;
    let mut fresh = Vec::new();
    let mut kept = Vec::new();
    for _ in 0..3 {
        fresh.push(nth(&one(&server, "fresh", "/fresh/instance").await));
        kept.push(nth(&one(&server, "kept", "/kept/instance").await));
    }
    assert_eq!(
        fresh,
        [1, 1, 1],
        "0.2 components get a fresh instance by default"
    );
    assert_eq!(kept, [1, 2, 3]);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn functions_and_tenants_never_share_an_instance() {
    // The same component deployed twice, in two tenants, and a third
    // function in the first tenant: each keeps its own instances.
    let text = format!(
        "{}{}{}",
        p3("a", "tenant = \"alpha\""),
        p3("b", "tenant = \"beta\""),
        p3("c", "tenant = \"alpha\"")
    );
    let server = TestServer::start(&text).await;
    assert_eq!(server.function("a").tenant(), "alpha");
    assert_eq!(server.function("b").tenant(), "beta");
    let mut seen: BTreeMap<&str, Vec<u64>> = BTreeMap::new();
    for _ in 0..3 {
        for f in ["a", "b", "c"] {
            let n = nth(&one(&server, f, &format!("/{f}/instance")).await);
            seen.entry(f).or_default().push(n);
        }
    }
    for f in ["a", "b", "c"] {
        assert_eq!(seen[f], [1, 2, 3], "function {f}: {seen:?}");
    }
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trap_retires_its_instance_and_the_next_request_gets_a_fresh_one() {
    let server = TestServer::start(&p3("svc", "")).await;
    assert_eq!(nth(&one(&server, "svc", "/svc/instance").await), 1);
    assert_eq!(nth(&one(&server, "svc", "/svc/instance").await), 2);
    let r = one(&server, "svc", "/svc/trap").await;
    assert_eq!(r.status, 500, "{}", r.text());
    assert!(r.text().contains("request id"), "{}", r.text());
    assert!(
        !r.text().contains("panic"),
        "no guest internals: {}",
        r.text()
    );
    // The trapped instance is gone; the next request instantiates.
    assert_eq!(nth(&one(&server, "svc", "/svc/instance").await), 1);
    let stats = server.function("svc").stats();
    assert_eq!(stats.traps.load(Ordering::SeqCst), 1);
    assert_eq!(stats.fresh_instances.load(Ordering::SeqCst), 2);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cpu_and_wall_limits_stay_per_request_on_a_kept_instance() {
    // Each request uses more than half the CPU budget and of the wall
    // time: on one instance their sums pass both, yet every request is
    // within its own limits.
    // `spin` has the same CPU budget and a wall time far past it, so its
    // looping request is stopped by CPU even while other tests load the
    // machine (pooled slices run below normal priority).
    let text = format!(
        "{}{}",
        p3("svc", "cpu_time = \"400ms\"\nwall_time = \"2s\""),
        p3("spin", "cpu_time = \"400ms\"\nwall_time = \"60s\"")
    );
    let server = TestServer::start(&text).await;
    let mut seen = Vec::new();
    for _ in 0..3 {
        seen.push(nth(&one(&server, "svc", "/svc/busy?ms=250").await));
    }
    for _ in 0..2 {
        seen.push(nth(&one(&server, "svc", "/svc/sleep?ms=1200").await));
    }
    assert_eq!(seen, [1, 2, 3, 4, 5]);
    // A request past its own wall time is stopped, and retires the instance.
    let r = one(&server, "svc", "/svc/sleep?ms=5000").await;
    assert_eq!(r.status, 504, "{}", r.text());
    assert_eq!(nth(&one(&server, "svc", "/svc/instance").await), 1);
    let stats = server.function("svc").stats();
    assert_eq!(stats.wall_kills.load(Ordering::SeqCst), 1);
    // A request past its own CPU budget likewise.
    assert_eq!(nth(&one(&server, "spin", "/spin/instance").await), 1);
    assert_eq!(nth(&one(&server, "spin", "/spin/instance").await), 2);
    let r = one(&server, "spin", "/spin/loop").await;
    assert_eq!(r.status, 504, "{}", r.text());
    assert!(r.text().contains("cpu time limit exceeded"), "{}", r.text());
    assert_eq!(nth(&one(&server, "spin", "/spin/instance").await), 1);
    let stats = server.function("spin").stats();
    assert_eq!(stats.cpu_kills.load(Ordering::SeqCst), 1);
    server.shutdown().await;
}

/// Sends `n` concurrent requests for `path`; how many responses said
/// "request N of my instance", per N.
async fn concurrently(server: &TestServer, path: &str, n: usize) -> BTreeMap<u64, u64> {
    let c = client();
    let requests: Vec<_> = (0..n)
        .map(|_| {
            let (c, url) = (c.clone(), server.url(path));
            tokio::spawn(async move { get(&c, &url).await })
        })
        .collect();
    let mut per_n: BTreeMap<u64, u64> = BTreeMap::new();
    for r in requests {
        *per_n.entry(nth(&r.await.unwrap())).or_default() += 1;
    }
    per_n
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_concurrent_requests_are_all_answered_and_instances_stay_within_max_concurrency()
 {
    // A long queue_timeout: this test is about answers, not admission.
    let text = format!(
        "{}{}",
        p3("svc", "max_concurrency = 16\nqueue_timeout = \"30s\""),
        p3(
            "few",
            "max_concurrency = 16\nqueue_timeout = \"30s\"\nreuse = { max_idle = 2 }"
        )
    );
    let server = TestServer::start(&text).await;
    let per_n = concurrently(&server, "/svc/sleep?ms=5", 200).await;
    assert_eq!(per_n.values().sum::<u64>(), 200);
    let svc = server.function("svc");
    wait_idle(svc).await;
    let stats = svc.stats();
    // Every instance counted 1, 2, 3, ... without gaps: as many requests
    // were an instance's first as instances were created, and each N was
    // reached by no more instances than N - 1.
    let fresh = stats.fresh_instances.load(Ordering::SeqCst);
    assert_eq!(per_n[&1], fresh);
    let mut previous = u64::MAX;
    for (n, count) in &per_n {
        assert!(
            *count <= previous,
            "request {n} of {count} instances: {per_n:?}"
        );
        previous = *count;
    }
    // Nothing was retired (no failure, young, few requests each), so every
    // instance ever made is alive and idle now: never more than
    // max_concurrency of them.
    assert!(fresh <= 16, "{fresh} instances for max_concurrency 16");
    assert_eq!(stats.idle_instances.load(Ordering::SeqCst), fresh);
    assert_eq!(stats.reused.load(Ordering::SeqCst), 200 - fresh);
    // With max_idle = 2, at most two wait once the burst is over.
    let per_n = concurrently(&server, "/few/sleep?ms=5", 50).await;
    assert_eq!(per_n.values().sum::<u64>(), 50);
    let few = server.function("few");
    wait_idle(few).await;
    assert!(few.stats().idle_instances.load(Ordering::SeqCst) <= 2);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_instance_past_max_age_is_retired() {
    let server = TestServer::start(&p3("svc", "reuse = { max_age = \"1s\" }")).await;
    assert_eq!(nth(&one(&server, "svc", "/svc/instance").await), 1);
    let stats = server.function("svc").stats().clone();
    assert_eq!(stats.idle_instances.load(Ordering::SeqCst), 1);
    // The sweep (every quarter of max_age) retires it; it notifies the
    // function's waiters.
    tokio::time::timeout(
        Duration::from_secs(30),
        stats.wait_until(|s| s.idle_instances.load(Ordering::SeqCst) == 0),
    )
    .await
    .expect("the idle instance was retired at max_age");
    assert_eq!(nth(&one(&server, "svc", "/svc/instance").await), 1);
    assert_eq!(stats.fresh_instances.load(Ordering::SeqCst), 2);
    server.shutdown().await;
}
