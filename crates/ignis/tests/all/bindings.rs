//! Platform bindings end to end: `wasi:keyvalue` (both package versions)
//! backed by the embedded store, `wasi:config` with secrets.

use std::collections::BTreeSet;
use std::time::Duration;

use crate::harness::*;

/// `[storage]` in a fresh directory, plus functions and routes.
fn kv_manifest(dir: &std::path::Path, storage_extra: &str, rest: &str) -> String {
    format!(
        "[storage]\npath = \"{}\"\n{storage_extra}\n{rest}",
        dir.join("kv.db").display()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_thousand_concurrent_increments_count_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&kv_manifest(
        dir.path(),
        "",
        &single("kv", "kv", "acme", "\"default\""),
    ))
    .await;
    let c = client();
    let all = increment_concurrently(&c, &server.url("/kv/incr?key=hits"), 100, 10).await;
    assert_eq!(all, (1..=1000).collect::<BTreeSet<u64>>());
    let r = get(&c, &server.url("/kv/get?key=hits")).await;
    assert_eq!((r.status, r.text().as_str()), (200, "1000"));
}

/// One function, routed at `/...`.
fn single(name: &str, wasm_name: &str, tenant: &str, stores: &str) -> String {
    format!(
        "[functions.{name}]\ncomponent = \"{}\"\ntenant = \"{tenant}\"\nkey_value_stores = [{stores}]\nmax_concurrency = 200\n[[routes]]\npath = \"/...\"\nfunction = \"{name}\"\n",
        wasm(wasm_name)
    )
}

/// Several functions, each on its own host name.
fn by_host(functions: &[(&str, &str, &str, &str)]) -> String {
    functions
        .iter()
        .map(|(name, wasm_name, tenant, stores)| {
            format!(
                "[functions.{name}]\ncomponent = \"{}\"\ntenant = \"{tenant}\"\nkey_value_stores = [{stores}]\n[[routes]]\nhost = \"{name}.test\"\npath = \"/...\"\nfunction = \"{name}\"\n",
                wasm(wasm_name)
            )
        })
        .collect()
}

async fn on(c: &HttpClient, server: &TestServer, host: &str, method: &str, path: &str) -> Reply {
    send(
        c,
        http::Request::builder()
            .method(method)
            .uri(server.url(path))
            .header("host", host)
            .body(Default::default())
            .unwrap(),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compare_and_swap_under_contention_never_loses_an_update() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&kv_manifest(
        dir.path(),
        "",
        &single("kv", "kv", "acme", "\"default\""),
    ))
    .await;
    let c = client();
    let workers: Vec<_> = (0..20)
        .map(|_| {
            let (c, u) = (c.clone(), server.url("/kv/cas-incr?key=n"));
            tokio::spawn(async move {
                let mut retries = 0;
                for _ in 0..10 {
                    let r = post(&c, &u, "").await;
                    assert_eq!(r.status, 200, "{}", r.text());
                    let text = r.text();
                    let (_, tries) = text.split_once(' ').unwrap();
                    retries += tries.parse::<u32>().unwrap();
                }
                retries
            })
        })
        .collect();
    let mut retries = 0;
    for w in workers {
        retries += w.await.unwrap();
    }
    let r = get(&c, &server.url("/kv/get?key=n")).await;
    assert_eq!((r.status, r.text().as_str()), (200, "200"));
    // The swaps really raced: some found the value changed under them.
    assert!(
        retries > 0,
        "no compare-and-swap ever failed; nothing contended"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stores_are_per_tenant_and_must_be_declared() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&kv_manifest(
        dir.path(),
        "",
        &by_host(&[
            ("a1", "kv", "acme", "\"default\""),
            ("a2", "kv_draft", "acme", "\"default\", \"other\""),
            ("g1", "kv", "globex", "\"default\""),
        ]),
    ))
    .await;
    let c = client();
    let r = on(
        &c,
        &server,
        "a1.test",
        "PUT",
        "/kv/set?key=owner&value=acme",
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    // Same tenant, same store name: shared (across package versions, too).
    let r = on(&c, &server, "a2.test", "GET", "/kv/get?key=owner").await;
    assert_eq!((r.status, r.text().as_str()), (200, "acme"));
    // Another tenant's `default` is another store.
    let r = on(&c, &server, "g1.test", "GET", "/kv/get?key=owner").await;
    assert_eq!(r.status, 404, "{}", r.text());
    let r = on(
        &c,
        &server,
        "g1.test",
        "PUT",
        "/kv/set?key=owner&value=globex",
    )
    .await;
    assert_eq!(r.status, 200);
    let r = on(&c, &server, "a1.test", "GET", "/kv/get?key=owner").await;
    assert_eq!((r.status, r.text().as_str()), (200, "acme"));
    // A store the function did not declare, even one its tenant has: no such store.
    let r = on(
        &c,
        &server,
        "a1.test",
        "GET",
        "/kv/get?store=other&key=owner",
    )
    .await;
    assert_eq!(r.status, 500);
    assert!(r.text().contains("NoSuchStore"), "{}", r.text());
    let r = on(
        &c,
        &server,
        "a2.test",
        "GET",
        "/kv/get?store=other&key=owner",
    )
    .await;
    assert_eq!(r.status, 404, "{}", r.text());
}

/// `d1.test` on the first `wasi:keyvalue` draft, `d2.test` on the second,
/// over one store with `storage_extra` in `[storage]`.
async fn both_drafts(dir: &std::path::Path, storage_extra: &str) -> TestServer {
    TestServer::start(&kv_manifest(
        dir,
        storage_extra,
        &by_host(&[
            ("d1", "kv_draft", "one", "\"default\""),
            ("d2", "kv", "two", "\"default\""),
        ]),
    ))
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_package_versions_do_every_operation() {
    let dir = tempfile::tempdir().unwrap();
    let server = both_drafts(dir.path(), "").await;
    let c = client();
    for host in ["d1.test", "d2.test"] {
        let r = on(&c, &server, host, "PUT", "/kv/set?key=a&value=1").await;
        assert_eq!(r.status, 200, "{host}: {}", r.text());
        let r = on(&c, &server, host, "GET", "/kv/exists?key=a").await;
        assert_eq!(r.text(), "true", "{host}");
        let r = on(&c, &server, host, "POST", "/kv/incr?key=a&by=41").await;
        assert_eq!(r.text(), "42", "{host}");
        let r = on(&c, &server, host, "POST", "/kv/set-many?n=1500&size=3").await;
        // Over the default batch limit of 1000 keys.
        assert_eq!(r.status, 500, "{host}: {}", r.text());
        assert!(r.text().contains("limit is 1000"), "{host}: {}", r.text());
        let r = on(&c, &server, host, "POST", "/kv/set-many?n=1000&size=3").await;
        assert_eq!(r.text(), "1000", "{host}");
        let r = on(&c, &server, host, "POST", "/kv/set-many?n=500&size=3").await;
        assert_eq!(r.status, 200);
        let r = on(&c, &server, host, "GET", "/kv/get-many?n=1000").await;
        assert_eq!(r.text(), "1000", "{host}");
        // 1001 keys: listing follows the cursor across pages of 1000.
        let r = on(&c, &server, host, "GET", "/kv/list").await;
        assert_eq!(r.text().lines().count(), 1001, "{host}");
        let r = on(&c, &server, host, "POST", "/kv/delete-many?n=1000").await;
        assert_eq!(r.status, 200, "{host}");
        let r = on(&c, &server, host, "DELETE", "/kv/delete?key=a").await;
        assert_eq!(r.status, 200, "{host}");
        let r = on(&c, &server, host, "GET", "/kv/list").await;
        assert_eq!(r.text(), "", "{host}");
    }
    // Only draft2 has compare-and-swap.
    let r = on(&c, &server, "d1.test", "POST", "/kv/cas-incr?key=x").await;
    assert_eq!(r.status, 501);
    let r = on(&c, &server, "d2.test", "POST", "/kv/cas-incr?key=x").await;
    assert_eq!(r.text(), "1 0");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_keys_values_and_batches_get_error_variants() {
    let dir = tempfile::tempdir().unwrap();
    let server = both_drafts(
        dir.path(),
        "max_key_bytes = 16\nmax_value_bytes = 64\nmax_batch_keys = 5",
    )
    .await;
    let c = client();
    let long_key = "k".repeat(17);
    let long_value = "v".repeat(65);
    for host in ["d1.test", "d2.test"] {
        for (method, path, why) in [
            (
                "PUT",
                format!("/kv/set?key={long_key}&value=x"),
                "key is 17 bytes; the limit is 16",
            ),
            (
                "GET",
                format!("/kv/get?key={long_key}"),
                "key is 17 bytes; the limit is 16",
            ),
            (
                "PUT",
                format!("/kv/set?key=k&value={long_value}"),
                "value is 65 bytes; the limit is 64",
            ),
            (
                "POST",
                "/kv/set-many?n=6".to_string(),
                "batch has 6 keys; the limit is 5",
            ),
            (
                "GET",
                "/kv/get-many?n=6".to_string(),
                "batch has 6 keys; the limit is 5",
            ),
            (
                "POST",
                "/kv/set-many?n=2&size=65".to_string(),
                "value is 65 bytes; the limit is 64",
            ),
        ] {
            let r = on(&c, &server, host, method, &path).await;
            assert_eq!(r.status, 500, "{host} {path}: {}", r.text());
            assert!(
                r.text().contains("Other") && r.text().contains(why),
                "{host} {path}: {}",
                r.text()
            );
        }
        // Limits exactly met are fine, and the function keeps working.
        let r = on(
            &c,
            &server,
            host,
            "PUT",
            &format!("/kv/set?key={}&value={}", "k".repeat(16), "v".repeat(64)),
        )
        .await;
        assert_eq!(r.status, 200, "{host}: {}", r.text());
        let r = on(&c, &server, host, "POST", "/kv/set-many?n=5&size=64").await;
        assert_eq!(r.status, 200, "{host}: {}", r.text());
    }
    assert_eq!(
        server
            .function("d1")
            .stats()
            .traps
            .load(std::sync::atomic::Ordering::Relaxed),
        0
    );
    assert_eq!(
        server
            .function("d2")
            .stats()
            .traps
            .load(std::sync::atomic::Ordering::Relaxed),
        0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_writes_survive_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let manifest = write(
        dir.path(),
        "ignis.toml",
        &format!(
            "[server]\ncache_dir = \"{}\"\n{}",
            shared_cache(),
            kv_manifest(dir.path(), "", &single("kv", "kv", "acme", "\"default\"")),
        ),
    );
    let manifest = manifest.to_str().unwrap();
    let proc = spawn(&["serve", manifest]);
    let c = client();
    let base = format!("http://{}", proc.addr);
    // Concurrent writers, each acknowledged before the kill.
    let writers: Vec<_> = (0..20)
        .map(|i| {
            let (c, base) = (c.clone(), base.clone());
            tokio::spawn(async move {
                for j in 0..5 {
                    let r = post(
                        &c,
                        &format!("{base}/kv/set?key=k{i}-{j}&value=v{i}-{j}"),
                        "",
                    )
                    .await;
                    assert_eq!(r.status, 200);
                    let r = post(&c, &format!("{base}/kv/incr?key=total"), "").await;
                    assert_eq!(r.status, 200);
                }
            })
        })
        .collect();
    for w in writers {
        w.await.unwrap();
    }
    let r = get(&c, &format!("{base}/kv/get?store=nope&key=x")).await;
    assert_eq!(r.status, 500);
    let logs = stop(proc);
    // The log says why the guest got an error.
    assert!(
        logs.contains("store not declared in this function's key_value_stores"),
        "{logs}"
    );

    let proc = spawn(&["serve", manifest]);
    let base = format!("http://{}", proc.addr);
    let c = client();
    for i in 0..20 {
        for j in 0..5 {
            let r = get(&c, &format!("{base}/kv/get?key=k{i}-{j}")).await;
            assert_eq!((r.status, r.text()), (200, format!("v{i}-{j}")));
        }
    }
    let r = get(&c, &format!("{base}/kv/get?key=total")).await;
    assert_eq!((r.status, r.text().as_str()), (200, "100"));
    sigkill(proc);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_and_secrets_reach_the_guest_and_never_the_logs() {
    let dir = tempfile::tempdir().unwrap();
    let secret = "sk-live-7f3a9c1e5b2d4";
    write(
        dir.path(),
        "secrets.toml",
        &format!("api_token = \"{secret}\"\n"),
    );
    let manifest = write(
        dir.path(),
        "ignis.toml",
        &format!(
            "[server]\ncache_dir = \"{}\"\nsecrets_file = \"secrets.toml\"\n[functions.kv]\ncomponent = \"{}\"\nconfig = {{ greeting = \"bonjour\", region = {{ env = \"IGNIS_TEST_REGION\" }}, token = {{ secret = \"api_token\" }} }}\n[[routes]]\npath = \"/...\"\nfunction = \"kv\"\n",
            shared_cache(),
            wasm("kv"),
        ),
    );
    let manifest = manifest.to_str().unwrap();
    let check = ignis()
        .env("IGNIS_LOG", "debug")
        .env("IGNIS_TEST_REGION", "eu-west")
        .args(["check", manifest])
        .output()
        .unwrap();
    assert!(check.status.success());
    let proc = spawn_with(
        &["serve", manifest],
        &[("IGNIS_LOG", "debug"), ("IGNIS_TEST_REGION", "eu-west")],
    );
    let c = client();
    let base = format!("http://{}", proc.addr);
    for (key, want) in [
        ("greeting", "bonjour"),
        ("region", "eu-west"),
        ("token", secret),
    ] {
        let r = get(&c, &format!("{base}/config?key={key}")).await;
        assert_eq!((r.status, r.text().as_str()), (200, want), "{key}");
    }
    let r = get(&c, &format!("{base}/config?key=absent")).await;
    assert_eq!(r.status, 404);
    // A function without stores gets an error variant, not a trap.
    let r = get(&c, &format!("{base}/kv/get?key=a")).await;
    assert_eq!(r.status, 500);
    assert!(r.text().contains("NoSuchStore"), "{}", r.text());
    let logs = stop(proc);
    let check_out = format!(
        "{}{}",
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr)
    );
    assert!(
        logs.contains("function loaded"),
        "debug logs were captured: {logs}"
    );
    assert!(
        !logs.contains(secret),
        "the secret leaked into the server log"
    );
    assert!(
        !check_out.contains(secret),
        "the secret leaked into `ignis check`"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_store_file_serves_a_restarted_in_process_server() {
    // Durability inside one process lifetime: close, reopen, read.
    let dir = tempfile::tempdir().unwrap();
    let text = kv_manifest(
        dir.path(),
        "",
        &single("kv", "kv_draft", "acme", "\"default\""),
    );
    let c = client();
    {
        let server = TestServer::start(&text).await;
        let r = post(&c, &server.url("/kv/set?key=kept&value=yes"), "").await;
        assert_eq!(r.status, 200);
        server.shutdown().await;
    }
    let server = TestServer::start(&text).await;
    let r = tokio::time::timeout(
        Duration::from_secs(30),
        get(&c, &server.url("/kv/get?key=kept")),
    )
    .await
    .unwrap();
    assert_eq!((r.status, r.text().as_str()), (200, "yes"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_call_cannot_make_the_host_hold_more_than_max_batch_bytes() {
    // Fails on the code before: get-many read every value it was asked for,
    // so 1,000 copies of one 1 MiB key made the host hold 1 GiB for one
    // call; set-many had no total either.
    let dir = tempfile::tempdir().unwrap();
    let server = both_drafts(dir.path(), "max_batch_bytes = \"1KiB\"").await;
    let c = client();
    for host in ["d1.test", "d2.test"] {
        let r = on(&c, &server, host, "POST", "/kv/set-many?n=1&size=600").await;
        assert_eq!(r.status, 200, "{host}: {}", r.text());
        let r = on(&c, &server, host, "GET", "/kv/get-many?n=1").await;
        assert_eq!((r.status, r.text().as_str()), (200, "1"), "{host}");
        // The same 600-byte key twice is 1,200 bytes.
        let r = on(&c, &server, host, "GET", "/kv/get-many?n=2&same=1").await;
        assert_eq!(r.status, 500, "{host}: {}", r.text());
        assert!(
            r.text()
                .contains("get-many would return more than 1024 bytes"),
            "{host}: {}",
            r.text()
        );
        let r = on(&c, &server, host, "POST", "/kv/set-many?n=2&size=600").await;
        assert!(
            r.text()
                .contains("batch carries 1204 bytes; the limit is 1024"),
            "{host}: {}",
            r.text()
        );
    }
}

/// Two nodes on one PostgreSQL database (`storage.database`, key-value
/// only, so no node lock): increments sent to both at once count exactly,
/// and what one node writes the other reads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_postgres_two_nodes_share_key_value_state_exactly() {
    let Some(pg) = ignis_store::testing::shared() else {
        return;
    };
    let storage = format!("database = \"{}\"", pg.database());
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let functions = single("kv", "kv", "acme", "\"default\"");
    let a = TestServer::start(&kv_manifest(dir_a.path(), &storage, &functions)).await;
    let b = TestServer::start(&kv_manifest(dir_b.path(), &storage, &functions)).await;
    let c = client();
    let (url_a, url_b) = (a.url("/kv/incr?key=hits"), b.url("/kv/incr?key=hits"));
    let (on_a, on_b) = tokio::join!(
        increment_concurrently(&c, &url_a, 50, 10),
        increment_concurrently(&c, &url_b, 50, 10)
    );
    assert!(
        on_a.is_disjoint(&on_b),
        "two nodes acknowledged the same count"
    );
    let all: BTreeSet<u64> = on_a.union(&on_b).copied().collect();
    assert_eq!(all, (1..=1000).collect::<BTreeSet<u64>>());
    for server in [&a, &b] {
        let r = get(&c, &server.url("/kv/get?key=hits")).await;
        assert_eq!((r.status, r.text().as_str()), (200, "1000"));
    }
    assert!(
        !dir_a.path().join("kv.db").exists(),
        "with a database the SQLite file is not used"
    );
}
