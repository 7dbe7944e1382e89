//! Hot deploy through the admin API and the CLI, SIGHUP reloads and
//! `ignis up --watch`, on the real `ignis` binary.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use base64::Engine as _;
use bytes::Bytes;
use http_body_util::Full;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};

use crate::admin::{TOKEN, admin_command, admin_get, bearer, manifest, serve_with_admin};
use crate::harness::*;

/// Sends a change request to the admin API.
async fn change(
    admin: SocketAddr,
    method: &str,
    path: &str,
    body: Option<serde_json::Value>,
    auth: Option<&str>,
) -> Reply {
    let mut req = http::Request::builder()
        .method(method)
        .uri(format!("http://{admin}{path}"));
    if let Some(auth) = auth {
        req = req.header("authorization", auth);
    }
    let body = body.map_or_else(Bytes::new, |b| Bytes::from(b.to_string()));
    send(&client(), req.body(Full::new(body)).unwrap()).await
}

/// PUTs `body` as hello's next version: it must be refused (422) with a
/// reason that contains `why`.
async fn refused(admin: SocketAddr, body: serde_json::Value, why: &str) {
    let r = change(
        admin,
        "PUT",
        "/v1/functions/hello",
        Some(body),
        Some(&bearer()),
    )
    .await;
    assert_eq!(r.status, 422, "{}", r.text());
    assert!(r.text().contains(why), "want {why:?} in: {}", r.text());
}

/// A deploy body: `component` (a file) with the table `config`.
fn deploy_body(component: &str, config: &str) -> serde_json::Value {
    let bytes = std::fs::read(component).unwrap();
    serde_json::json!({
        "config": config,
        "component": base64::engine::general_purpose::STANDARD.encode(bytes),
    })
}

/// The node's deploy directory for the manifest at `path` (as
/// `deploy.rs` names it: a hash of the canonical path).
fn deploy_dir(path: &std::path::Path) -> std::path::PathBuf {
    use sha2::Digest as _;
    let key = std::fs::canonicalize(path).unwrap();
    let hash: String = sha2::Sha256::digest(key.to_string_lossy().as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    std::path::Path::new(&shared_cache())
        .join("deploys")
        .join(format!("node-{}", &hash[..16]))
}

async fn hello(addr: SocketAddr) -> Reply {
    get(&client(), &format!("http://{addr}/hello")).await
}

async fn listing(admin: SocketAddr) -> serde_json::Value {
    let r = admin_get(admin, "/v1/functions", Some(&bearer())).await;
    assert_eq!(r.status, 200);
    serde_json::from_slice(&r.body).unwrap()
}

fn version_of(listing: &serde_json::Value, function: &str) -> Option<u64> {
    listing["functions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["name"] == function)
        .map(|f| f["version"]["version"].as_u64().unwrap())
}

/// Runs an `ignis` admin command against `admin`; returns (ok, stdout, stderr).
fn cli(admin: SocketAddr, args: &[&str]) -> (bool, String, String) {
    let url = format!("http://{admin}");
    let mut all = args.to_vec();
    all.extend_from_slice(&["--admin", &url]);
    admin_command(&all, Some(TOKEN))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deploy_rollback_and_delete_through_the_cli_and_the_api() {
    let dir = tempfile::tempdir().unwrap();
    let (proc, admin) = serve_with_admin(&manifest(dir.path(), ""), &[]);
    let addr = proc.addr;
    assert_eq!(hello(addr).await.text(), "Hello from Ignis!\n");
    assert_eq!(version_of(&listing(admin).await, "hello"), Some(1));

    // `ignis deploy` from a manifest of its own: same component, a new
    // table (an environment value the guest prints).
    let next = tempfile::tempdir().unwrap();
    let m2 = write(
        next.path(),
        "ignis.toml",
        &format!(
            "[functions.hello]\ncomponent = \"{}\"\ntenant = \"acme\"\nenv = {{ GREETING = \"v2\" }}\n",
            wasm("hello")
        ),
    );
    let (ok, out, err) = cli(
        admin,
        &["deploy", "hello", "--manifest", m2.to_str().unwrap()],
    );
    assert!(ok, "{out}{err}");
    assert!(out.contains("version 2 serves"), "{out}");
    assert_eq!(hello(addr).await.text(), "v2\n");
    let l = listing(admin).await;
    let f = l["functions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["name"] == "hello")
        .unwrap()
        .clone();
    assert_eq!(f["version"]["version"], 2);
    assert_eq!(f["version"]["previous"], serde_json::json!([1]));
    let record = &l["deploys"][0];
    assert_eq!(
        (&record["kind"], &record["name"]),
        (&"function".into(), &"hello".into())
    );
    assert_eq!(record["action"], "deploy");
    assert!(
        record["by"].as_str().unwrap().starts_with("api 127.0.0.1:"),
        "{record}"
    );
    // The same version again changes nothing.
    let (ok, out, _) = cli(
        admin,
        &[
            "deploy",
            "hello",
            "--manifest",
            m2.to_str().unwrap(),
            "--json",
        ],
    );
    assert!(ok);
    let answer: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(answer["changed"], false);
    assert_eq!(answer["version"], 2);

    // `ignis rollback`: version 1 serves again; nothing earlier is left.
    let (ok, out, err) = cli(admin, &["rollback", "hello"]);
    assert!(ok, "{out}{err}");
    assert!(out.contains("version 1 serves"), "{out}");
    assert_eq!(hello(addr).await.text(), "Hello from Ignis!\n");
    let (ok, _, err) = cli(admin, &["rollback", "hello"]);
    assert!(!ok);
    assert!(
        err.contains("409") && err.contains("no earlier version"),
        "{err}"
    );

    // Deleting a routed function is refused with the route named.
    let r = change(
        admin,
        "DELETE",
        "/v1/functions/hello",
        None,
        Some(&bearer()),
    )
    .await;
    assert_eq!(r.status, 422, "{}", r.text());
    assert!(r.text().contains("routes"), "{}", r.text());
    assert_eq!(hello(addr).await.status, 200);

    // A new function (no route yet) through the API, then deleted by the CLI.
    let r = change(
        admin,
        "PUT",
        "/v1/functions/extra",
        Some(deploy_body(
            &wasm("hello"),
            "tenant = \"other\"\nmax_concurrency = 4\n",
        )),
        Some(&bearer()),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(version_of(&listing(admin).await, "extra"), Some(1));
    let (ok, out, err) = cli(admin, &["delete", "extra"]);
    assert!(ok, "{out}{err}");
    assert_eq!(version_of(&listing(admin).await, "extra"), None);
    // `ls` shows the version column.
    let (ok, out, _) = cli(admin, &["ls"]);
    assert!(ok);
    assert!(
        out.contains("FUNCTION\tVERSION") && out.contains("hello\t1\t"),
        "{out}"
    );

    let log = stop(proc);
    assert!(
        log.contains("changed kind=\"function\" name=hello") && log.contains("by=\"api 127.0.0.1:"),
        "every change is logged with who asked:\n{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_changes_are_refused_and_the_old_version_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    let (proc, admin) = serve_with_admin(&manifest(dir.path(), ""), &[]);
    let addr = proc.addr;
    let auth = bearer();
    let good = deploy_body(
        &wasm("hello"),
        "tenant = \"acme\"\nenv = { GREETING = \"new\" }\n",
    );

    // No token, a wrong token: 401 and nothing changes.
    for a in [None, Some("Bearer wrong-token-0123456789")] {
        for (method, path) in [
            ("PUT", "/v1/functions/hello"),
            ("DELETE", "/v1/functions/hello"),
            ("POST", "/v1/functions/hello/rollback"),
        ] {
            let r = change(admin, method, path, Some(good.clone()), a).await;
            assert_eq!(r.status, 401, "{method} {path}");
        }
    }
    assert_eq!(hello(addr).await.text(), "Hello from Ignis!\n");

    // Malformed requests.
    let r = change(admin, "PUT", "/v1/functions/hello", None, Some(&auth)).await;
    assert_eq!(r.status, 400);
    let r = change(
        admin,
        "PUT",
        "/v1/functions/hello",
        Some(serde_json::json!({"component": "not base64!"})),
        Some(&auth),
    )
    .await;
    assert_eq!(r.status, 400, "{}", r.text());
    let r = change(
        admin,
        "PUT",
        "/v1/functions/hello",
        Some(serde_json::json!({"component": "", "surprise": 1})),
        Some(&auth),
    )
    .await;
    assert_eq!(r.status, 400, "unknown fields are refused: {}", r.text());
    let r = change(admin, "PATCH", "/v1/functions/hello", None, Some(&auth)).await;
    assert_eq!(r.status, 405);
    assert_eq!(r.headers["allow"], "PUT, DELETE");
    let r = change(
        admin,
        "PUT",
        "/v1/functions/a%2Fb",
        Some(good.clone()),
        Some(&auth),
    )
    .await;
    assert_eq!(r.status, 404);
    let r = change(
        admin,
        "POST",
        "/v1/functions/hello/other",
        None,
        Some(&auth),
    )
    .await;
    assert_eq!(r.status, 404);

    // Versions that cannot serve: 422 with the reason.
    let garbage = serde_json::json!({
        "config": "tenant = \"acme\"\n",
        "component": base64::engine::general_purpose::STANDARD.encode(b"\0asm not really"),
    });
    refused(admin, garbage, "function `hello`").await;
    // An actor class's component imports ignis:actor/storage, which a
    // function may not: the import is named.
    let actor = deploy_body(&wasm("counter"), "tenant = \"acme\"\n");
    refused(admin, actor, "ignis:actor").await;
    // A bad value: the key is named.
    let bad_table = deploy_body(&wasm("hello"), "memory = \"lots\"\n");
    refused(admin, bad_table, "functions.hello.memory").await;
    refused(admin, deploy_body(&wasm("hello"), "memory = ["), "config").await;
    // Past the slots the pool was sized for at start.
    let greedy = deploy_body(
        &wasm("hello"),
        "tenant = \"acme\"\nmax_concurrency = 10000\n",
    );
    refused(admin, greedy, "function_slots").await;
    // Past the body cap: 413 without reading it all.
    let mut s = tokio::net::TcpStream::connect(admin).await.unwrap();
    let head = format!(
        "PUT /v1/functions/hello HTTP/1.1\r\nhost: a\r\nauthorization: {auth}\r\ncontent-length: {}\r\n\r\n",
        ignis_admin::deploy::MAX_DEPLOY_BYTES + 1
    );
    s.write_all(head.as_bytes()).await.unwrap();
    let mut reader = tokio::io::BufReader::new(s);
    let mut status = String::new();
    reader.read_line(&mut status).await.unwrap();
    assert!(status.starts_with("HTTP/1.1 413"), "{status}");

    assert_eq!(hello(addr).await.text(), "Hello from Ignis!\n");
    assert_eq!(version_of(&listing(admin).await, "hello"), Some(1));
    // Refused uploads leave nothing on disk: only the two serving
    // components (hello, limits) are stored.
    let stored = deploy_dir(&dir.path().join("ignis.toml"));
    let files = std::fs::read_dir(&stored)
        .unwrap()
        .flatten()
        .filter(|e| e.path().extension().is_some_and(|x| x == "wasm"))
        .count();
    assert_eq!(files, 2, "{}", stored.display());

    // Two deploys racing with the same expected version: one wins, the
    // other gets 409 (whether it arrives during the first or after it).
    let racer = |greeting: &str| {
        let mut b = deploy_body(
            &wasm("hello"),
            &format!("tenant = \"acme\"\nenv = {{ GREETING = \"{greeting}\" }}\n"),
        );
        b["expect_version"] = 1.into();
        change(admin, "PUT", "/v1/functions/hello", Some(b), Some(&auth))
    };
    let (a, b) = tokio::join!(racer("a"), racer("b"));
    let mut statuses = [a.status, b.status];
    statuses.sort();
    assert_eq!(statuses, [200, 409], "{} / {}", a.text(), b.text());
    let winner = if a.status == 200 { "a\n" } else { "b\n" };
    assert_eq!(hello(addr).await.text(), winner);
    sigkill(proc);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redeploy_under_open_loop_load_fails_no_request() {
    let dir = tempfile::tempdir().unwrap();
    // A generous queue deadline: on a 2-core machine running other tests
    // (or a release build) a debug node can fall behind for a second; that
    // would shed requests whatever the deploy does, and this test is about
    // the deploy.
    let path = hello_manifest(dir.path(), "tenant = \"acme\"\nqueue_timeout = \"30s\"", "");
    let (proc, admin) = serve_with_admin(&path, &[]);
    let addr = proc.addr;
    let client = client();
    // 100 requests a second, each on its own schedule (open loop: a slow
    // answer does not delay the next request), before, during and after
    // the deploy.
    let deployed = Arc::new(AtomicBool::new(false));
    let (count_tx, mut count_rx) = tokio::sync::watch::channel(0usize);
    let mut sent = Vec::new();
    let mut ticks = tokio::time::interval(Duration::from_millis(10));
    let load = async {
        let started = Instant::now();
        loop {
            ticks.tick().await;
            let after_deploy = deployed.load(Ordering::SeqCst);
            let c = client.clone();
            sent.push((
                after_deploy,
                tokio::spawn(async move { get(&c, &format!("http://{addr}/hello")).await }),
            ));
            count_tx.send_replace(sent.len());
            // Until a second of traffic has followed the deploy.
            if after_deploy && started.elapsed() > Duration::from_secs(1) {
                let n_after = sent.iter().filter(|(a, _)| *a).count();
                if n_after >= 100 {
                    break;
                }
            }
        }
    };
    let deploy = async {
        // Let traffic flow on version 1 first: 50 requests sent.
        count_rx.wait_for(|n| *n >= 50).await.unwrap();
        let r = change(
            admin,
            "PUT",
            "/v1/functions/hello",
            Some(deploy_body(
                &wasm("hello"),
                "tenant = \"acme\"\nqueue_timeout = \"30s\"\nenv = { GREETING = \"v2\" }\n",
            )),
            Some(&bearer()),
        )
        .await;
        assert_eq!(r.status, 200, "{}", r.text());
        deployed.store(true, Ordering::SeqCst);
    };
    tokio::join!(load, deploy);
    let (mut old, mut new) = (0, 0);
    for (after_deploy, task) in sent {
        let r = task.await.unwrap();
        assert_eq!(
            r.status,
            200,
            "no request fails across the swap: {}",
            r.text()
        );
        match r.text().as_str() {
            "Hello from Ignis!\n" => {
                assert!(
                    !after_deploy,
                    "a request sent after the deploy answered got the old version"
                );
                old += 1;
            }
            "v2\n" => new += 1,
            other => panic!("neither version answered: {other:?}"),
        }
    }
    assert!(old > 0 && new >= 100, "old {old}, new {new}");
    sigkill(proc);
}

/// The next log line about a manifest reload.
async fn next_reload(log: &mut tokio::io::BufReader<tokio::net::TcpStream>) -> String {
    loop {
        let mut line = String::new();
        let n = tokio::time::timeout(Duration::from_secs(60), log.read_line(&mut line))
            .await
            .expect("a reload line within 60 s")
            .unwrap();
        assert!(n > 0, "the log stream ended");
        if line.contains("manifest reload") {
            return line;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_and_a_broken_manifest_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let path = manifest(dir.path(), "");
    let (proc, admin) = serve_with_admin(&path, &[]);
    let addr = proc.addr;
    let original = std::fs::read_to_string(&path).unwrap();
    // Follow the log to see each reload's outcome.
    let mut follower = tokio::net::TcpStream::connect(admin).await.unwrap();
    follower
        .write_all(
            format!(
                "GET /v1/logs HTTP/1.1\r\nhost: a\r\nauthorization: {}\r\n\r\n",
                bearer()
            )
            .as_bytes(),
        )
        .await
        .unwrap();
    let mut log = tokio::io::BufReader::new(follower);
    let mut status = String::new();
    log.read_line(&mut status).await.unwrap();
    assert!(status.starts_with("HTTP/1.1 200"), "{status}");

    // A value of the wrong type: refused, with file, line and key.
    let broken = original.replace(
        "[functions.limits]\n",
        "[functions.limits]\nmemory = \"lots\"\n",
    );
    std::fs::write(&path, &broken).unwrap();
    signal(&proc.child, "HUP");
    let line = next_reload(&mut log).await;
    assert!(line.contains("refused"), "{line}");
    let line_no = broken
        .lines()
        .position(|l| l.starts_with("memory = \"lots\""))
        .unwrap()
        + 1;
    assert!(
        line.contains(&format!("ignis.toml:{line_no}:"))
            && line.contains("functions.limits.memory"),
        "file, line and key: {line}"
    );
    assert_eq!(hello(addr).await.text(), "Hello from Ignis!\n");
    // A section that needs a restart: refused, naming it.
    std::fs::write(
        &path,
        original.replace("shutdown_grace = \"30s\"", "shutdown_grace = \"31s\""),
    )
    .unwrap();
    signal(&proc.child, "HUP");
    let line = next_reload(&mut log).await;
    assert!(
        line.contains("refused") && line.contains("[server]"),
        "{line}"
    );

    // A good change: a new greeting and a new route, swapped in.
    let good = format!(
        "{}[[routes]]\npath = \"/hi\"\nfunction = \"hello\"\n",
        original.replace(
            "tenant = \"acme\"\n",
            "tenant = \"acme\"\nenv = { GREETING = \"reloaded\" }\n"
        )
    );
    std::fs::write(&path, good).unwrap();
    signal(&proc.child, "HUP");
    let line = next_reload(&mut log).await;
    assert!(
        line.contains("manifest reloaded") && line.contains("hello"),
        "{line}"
    );
    assert_eq!(hello(addr).await.text(), "reloaded\n");
    let hi = get(&client(), &format!("http://{addr}/hi")).await;
    assert_eq!(hi.text(), "reloaded\n");
    let l = listing(admin).await;
    assert_eq!(version_of(&l, "hello"), Some(2));
    assert_eq!(
        version_of(&l, "limits"),
        Some(1),
        "an unchanged function is not reloaded"
    );
    assert_eq!(l["deploys"][0]["by"], "SIGHUP");
    sigkill(proc);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn up_watch_reloads_when_the_manifest_changes() {
    let dir = tempfile::tempdir().unwrap();
    let path = hello_manifest(dir.path(), "", "");
    let proc = spawn(&["up", "--watch", dir.path().to_str().unwrap()]);
    let addr = proc.addr;
    assert_eq!(hello(addr).await.text(), "Hello from Ignis!\n");
    let text = std::fs::read_to_string(&path).unwrap().replace(
        "[functions.hello]\n",
        "[functions.hello]\nenv = { GREETING = \"watched\" }\n",
    );
    std::fs::write(&path, text).unwrap();
    // The watcher polls every 500 ms; the reload compiles nothing new
    // (same component). Poll the answer, bounded.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let body = hello(addr).await.text();
        if body == "watched\n" {
            break;
        }
        assert_eq!(body, "Hello from Ignis!\n");
        assert!(
            Instant::now() < deadline,
            "--watch did not reload within 60 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let log = stop(proc);
    assert!(log.contains("a watched file changed"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_actor_class_swaps_between_messages_and_keeps_its_storage() {
    let dir = tempfile::tempdir().unwrap();
    let table = |extra: &str| {
        format!(
            "[actors.counter]\ncomponent = \"{}\"\ntenant = \"app\"\n{extra}",
            wasm("counter")
        )
    };
    let path = write(
        dir.path(),
        "ignis.toml",
        &format!(
            "[server]\ncache_dir = \"{}\"\n[storage]\npath = \"{}\"\n{}\n[[routes]]\npath = \"/counter/{{id}}/...\"\nactor = \"counter\"\n",
            shared_cache(),
            dir.path().join("actors.db").display(),
            table("")
        ),
    );
    let (proc, admin) = serve_with_admin(&path, &[]);
    let url = format!("http://{}/counter/a/incr", proc.addr);
    let c = client();
    for want in ["1", "2"] {
        assert_eq!(post(&c, &url, "").await.text().trim(), want);
    }
    let actors = |l: &serde_json::Value| l["actors"][0].clone();
    let before = actors(&listing(admin).await);
    assert_eq!(before["version"]["version"], 1);
    assert_eq!(before["activations"], 1);

    // A new version of the class (same component, a new table): the live
    // activation takes its next message on a fresh instance of it; the
    // count it stored is still there.
    let next = tempfile::tempdir().unwrap();
    let m2 = write(
        next.path(),
        "ignis.toml",
        &table("idle_timeout = \"45s\"\n"),
    );
    let (ok, out, err) = cli(
        admin,
        &["deploy", "counter", "--manifest", m2.to_str().unwrap()],
    );
    assert!(ok, "{out}{err}");
    assert!(
        out.contains("actor counter: deploy done, version 2"),
        "{out}"
    );
    assert_eq!(post(&c, &url, "").await.text().trim(), "3");
    let after = actors(&listing(admin).await);
    assert_eq!(after["version"]["version"], 2);
    assert_eq!(
        after["activations"], 2,
        "the next message ran on a fresh instance"
    );

    // Back to version 1 with the CLI; the count goes on.
    let (ok, out, err) = cli(admin, &["rollback", "counter", "--actor"]);
    assert!(ok, "{out}{err}");
    assert!(out.contains("version 1 serves"), "{out}");
    assert_eq!(post(&c, &url, "").await.text().trim(), "4");

    // Refused: bytes that are no component; a class this node does not have
    // (adding classes needs a restart); DELETE of a class.
    let auth = bearer();
    let garbage = serde_json::json!({
        "config": "tenant = \"app\"\n",
        "component": base64::engine::general_purpose::STANDARD.encode(b"\0asm?"),
    });
    let r = change(
        admin,
        "PUT",
        "/v1/actors/counter",
        Some(garbage),
        Some(&auth),
    )
    .await;
    assert_eq!(r.status, 422, "{}", r.text());
    let other = deploy_body(&wasm("counter"), "tenant = \"app\"\n");
    let r = change(admin, "PUT", "/v1/actors/other", Some(other), Some(&auth)).await;
    assert_eq!(r.status, 422, "{}", r.text());
    assert!(r.text().contains("needs a restart"), "{}", r.text());
    let r = change(admin, "DELETE", "/v1/actors/counter", None, Some(&auth)).await;
    assert_eq!(r.status, 405);
    let r = change(admin, "PUT", "/v1/actors/counter", None, None).await;
    assert_eq!(r.status, 401);
    assert_eq!(post(&c, &url, "").await.text().trim(), "5");
    sigkill(proc);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_acknowledged_deploy_survives_kill_9_and_an_edited_manifest_wins() {
    let dir = tempfile::tempdir().unwrap();
    let path = manifest(dir.path(), "");
    let (proc, admin) = serve_with_admin(&path, &[]);
    let r = change(
        admin,
        "PUT",
        "/v1/functions/hello",
        Some(deploy_body(
            &wasm("hello"),
            "tenant = \"acme\"\nenv = { GREETING = \"kept\" }\n",
        )),
        Some(&bearer()),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    // Killed right after the answer: nothing had a chance to flush.
    sigkill(proc);

    let (proc, admin) = serve_with_admin(&path, &[]);
    assert_eq!(hello(proc.addr).await.text(), "kept\n");
    let l = listing(admin).await;
    assert_eq!(l["deploys"][0]["action"], "restore");
    assert_eq!(l["deploys"][0]["name"], "hello");
    // A rollback goes back to what the manifest says.
    let (ok, out, err) = cli(admin, &["rollback", "hello"]);
    assert!(ok, "{out}{err}");
    assert_eq!(hello(proc.addr).await.text(), "Hello from Ignis!\n");
    let r = change(
        admin,
        "PUT",
        "/v1/functions/hello",
        Some(deploy_body(
            &wasm("hello"),
            "tenant = \"acme\"\nenv = { GREETING = \"again\" }\n",
        )),
        Some(&bearer()),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    sigkill(proc);

    // The manifest was edited while the node was down: the file wins.
    let mut text = std::fs::read_to_string(&path).unwrap();
    text.push_str("\n# edited\n");
    std::fs::write(&path, text).unwrap();
    let (proc, _) = serve_with_admin(&path, &[]);
    assert_eq!(hello(proc.addr).await.text(), "Hello from Ignis!\n");
    let log = stop(proc);
    assert!(log.contains("the manifest changed since"), "{log}");
}
