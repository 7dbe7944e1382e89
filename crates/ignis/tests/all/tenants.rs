//! Tenants cannot reach or starve each other through durable actors: an
//! actor class belongs to a tenant and admits only the callers it lists;
//! the caller's identity reaches the actor and cannot be forged from
//! outside; activations are capped per class and per node, so a flood of
//! actor ids cannot take the instances other tenants' functions need.

use std::sync::atomic::Ordering;

use crate::harness::*;

fn manifest(dir: &std::path::Path, class_cap: u32) -> String {
    format!(
        r#"
[storage]
path = "{db}"

[actors.counter]
component = "{counter}"
tenant = "acme"
callers = ["partner"]
max_activations = {class_cap}

[functions.same]
component = "{client}"
tenant = "acme"

[functions.other]
component = "{client}"
tenant = "evil"

[functions.partner]
component = "{client}"
tenant = "partner"

[functions.hello]
component = "{hello}"
tenant = "bystander"

[[routes]]
path = "/counter/{{id}}/..."
actor = "counter"

[[routes]]
path = "/same"
function = "same"

[[routes]]
path = "/other"
function = "other"

[[routes]]
path = "/partner"
function = "partner"

[[routes]]
path = "/hello"
function = "hello"
"#,
        db = dir.join("actors.db").display(),
        counter = wasm("counter"),
        client = wasm("counter_client"),
        hello = wasm("hello"),
    )
}

/// Fails on the code before actor tenancy: every function could call every
/// actor class, and a message's `ignis-caller` header came through from
/// the client untouched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn actor_classes_admit_their_tenant_and_listed_callers_only() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&manifest(dir.path(), 100)).await;
    let directory = server.directory.clone().unwrap();
    let c = client();
    // Same tenant: allowed, and the actor learns who called.
    let r = get(&c, &server.url("/same?id=a")).await;
    assert_eq!((r.status, r.text().as_str()), (200, "counter a is now 1"));
    let r = get(&c, &server.url("/same?id=a&op=caller")).await;
    assert_eq!((r.status, r.text().as_str()), (200, "acme/same"));
    // Listed in `callers`: allowed.
    let r = get(&c, &server.url("/partner?id=a&op=caller")).await;
    assert_eq!((r.status, r.text().as_str()), (200, "partner/partner"));
    // Another tenant: refused before anything is activated.
    let before = directory.stats().activations.load(Ordering::SeqCst);
    let r = get(&c, &server.url("/other?id=fresh")).await;
    assert_eq!(r.status, 502, "{}", r.text());
    assert!(r.text().contains("Forbidden"), "{}", r.text());
    assert!(!directory.is_active("counter", "fresh"));
    assert_eq!(directory.stats().activations.load(Ordering::SeqCst), before);
    // A client cannot forge the caller: routes strip the header.
    let forged = http::Request::get(server.url("/counter/a/caller"))
        .header("ignis-caller", "acme/same")
        .body(Default::default())
        .unwrap();
    let r = send(&c, forged).await;
    assert_eq!((r.status, r.text().as_str()), (200, "none"));
}

/// Actor ids are bounded and printable: 400 otherwise. Fails on the code
/// before: a 5,000-byte id was accepted and activated.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_actor_ids_get_400() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&manifest(dir.path(), 100)).await;
    let c = client();
    for (len, status) in [(5000, 400), (257, 400), (256, 200)] {
        let id = "x".repeat(len);
        let r = post(&c, &server.url(&format!("/counter/{id}/incr")), "").await;
        assert_eq!(r.status, status, "{len}: {}", r.text());
    }
    let directory = server.directory.clone().unwrap();
    assert_eq!(directory.stats().activations.load(Ordering::SeqCst), 1);
}

/// Fails on the code before activation caps: 4,000 ids over 16 connections
/// took every pool slot (1,200 per class), and for the next idle timeout
/// every other tenant's function answered 500.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_actor_ids_cannot_take_other_tenants_instances() {
    const IDS: usize = 10_000;
    const CONNECTIONS: usize = 16;
    const CAP: u32 = 40;
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&manifest(dir.path(), CAP)).await;
    let directory = server.directory.clone().unwrap();
    let c = client();
    let flood: Vec<_> = (0..CONNECTIONS)
        .map(|w| {
            let (c, base) = (c.clone(), server.url("/counter"));
            tokio::spawn(async move {
                let mut statuses = std::collections::BTreeMap::<u16, usize>::new();
                for i in (w..IDS).step_by(CONNECTIONS) {
                    let r = post(&c, &format!("{base}/id-{i}/incr"), "").await;
                    *statuses.entry(r.status).or_default() += 1;
                }
                statuses
            })
        })
        .collect();
    // Another tenant's function, served all through the flood.
    let mut hello_failures = Vec::new();
    let mut hellos = 0;
    while !flood.iter().all(|t| t.is_finished()) {
        let r = get(&c, &server.url("/hello")).await;
        hellos += 1;
        if r.status != 200 {
            hello_failures.push((r.status, r.text()));
        }
        // The cap holds: never more live instances than the class allows.
        let active = directory.stats().active.load(Ordering::SeqCst);
        assert!(active <= u64::from(CAP), "{active} live activations");
    }
    let mut statuses = std::collections::BTreeMap::<u16, usize>::new();
    for t in flood {
        for (s, n) in t.await.unwrap() {
            *statuses.entry(s).or_default() += n;
        }
    }
    assert!(hello_failures.is_empty(), "{hello_failures:?}");
    assert!(hellos > 0);
    // Every actor message was served or shed with 503; none failed.
    assert_eq!(
        statuses.keys().filter(|s| **s != 200 && **s != 503).count(),
        0,
        "{statuses:?}"
    );
    assert!(statuses.get(&200).copied().unwrap_or(0) > 0, "{statuses:?}");
    // Idle activations made room for new ones (least recently used first).
    assert!(directory.stats().evictions.load(Ordering::SeqCst) > 0);
}
