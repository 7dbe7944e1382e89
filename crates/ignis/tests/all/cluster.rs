//! Cluster mode end to end: three `ignis serve` processes on one private
//! PostgreSQL database (`ignis_store::testing`), each with its own HTTP and
//! internal listener on ephemeral ports. Actors are placed by leases, and
//! messages sent to any node reach the one owner.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};

use crate::harness::*;

/// A node of the test cluster: its process and its internal address.
struct Node {
    proc: Proc,
    internal: String,
    id: String,
    admin: std::net::SocketAddr,
}

impl Node {
    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.proc.addr)
    }

    /// Counter `name` (with its `_total`) from the node's `/metrics`.
    async fn metric(&self, name: &str) -> u64 {
        let r =
            crate::admin::admin_get(self.admin, "/metrics", Some(&crate::admin::bearer())).await;
        assert_eq!(r.status, 200, "{}", r.text());
        r.text()
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{name}{{}} ")))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .unwrap_or_else(|| panic!("no {name} in /metrics:\n{}", r.text())) as u64
    }
}

/// The counter actor class, its client function and hello, with `[cluster]`
/// settings `cluster` and more tables `tables` at the end.
fn cluster_manifest(dir: &std::path::Path, cluster: &str, tables: &str) -> std::path::PathBuf {
    write(
        dir,
        "ignis.toml",
        &format!(
            r#"[server]
cache_dir = "{cache}"

[cluster]
{cluster}

[actors.counter]
component = "{counter}"
tenant = "app"
cpu_time = "10s"

[functions.client]
component = "{client}"
tenant = "app"

[[routes]]
path = "/counter/{{id}}/..."
actor = "counter"

[functions.hello]
component = "{hello}"

[[routes]]
path = "/bump"
function = "client"

[[routes]]
path = "/hello"
function = "hello"
{tables}
"#,
            cache = shared_cache(),
            counter = wasm("counter"),
            client = wasm("counter_client"),
            hello = wasm("hello"),
        ),
    )
}

/// Starts one node of the cluster on database `url`.
fn start_node(manifest: &std::path::Path, url: &str) -> Node {
    let mut proc = spawn_with(
        &[
            "serve",
            manifest.to_str().unwrap(),
            "--cluster-listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
        ],
        &[
            ("IGNIS_CLUSTER", url),
            ("IGNIS_LOG", "info"),
            ("IGNIS_ADMIN_TOKEN", crate::admin::TOKEN),
        ],
    );
    let admin = proc.stdout_line("admin on http://").parse().unwrap();
    let line = proc.stdout_line("cluster on http://");
    let (internal, id) = line
        .split_once(" (node ")
        .unwrap_or_else(|| panic!("unexpected cluster line {line:?}"));
    Node {
        internal: internal.to_string(),
        id: id.trim_end_matches(')').to_string(),
        admin,
        proc,
    }
}

/// A test cluster on a fresh database of the private server: the
/// manifest of [`cluster_manifest`] and `n` nodes serving it.
struct TestCluster {
    server: &'static ignis_store::testing::TestPostgres,
    url: String,
    nodes: Vec<Node>,
    _dir: tempfile::TempDir,
}

/// `None` when PostgreSQL is not installed and not required.
fn test_cluster(settings: &str, tables: &str, n: usize) -> Option<TestCluster> {
    let server = ignis_store::testing::shared()?;
    let url = server.database();
    let dir = tempfile::tempdir().unwrap();
    let manifest = cluster_manifest(dir.path(), settings, tables);
    let nodes = (0..n).map(|_| start_node(&manifest, &url)).collect();
    Some(TestCluster {
        server,
        url,
        nodes,
        _dir: dir,
    })
}

impl TestCluster {
    /// The database's name.
    fn db(&self) -> &str {
        self.url.rsplit("dbname=").next().unwrap()
    }

    /// The owners actor `counter/id` has had, as `EPOCH:NODE`, by epoch.
    fn owners(&self, id: &str) -> Vec<String> {
        self.server
            .sql(
                self.db(),
                &format!(
                    "SELECT epoch || ':' || node FROM ignis_actor_owners \
                     WHERE class = 'counter' AND id = '{id}'::bytea ORDER BY epoch"
                ),
            )
            .lines()
            .map(|l| l.trim().to_string())
            .filter(|l| !l.is_empty())
            .collect()
    }
}

/// Like `send`, but a connection error (the node is gone) is `None`.
async fn try_send(c: &HttpClient, req: http::Request<Full<Bytes>>) -> Option<Reply> {
    let resp = tokio::time::timeout(Duration::from_secs(60), c.request(req))
        .await
        .expect("an answer or an error within 60s")
        .ok()?;
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body = resp.into_body().collect().await.ok()?.to_bytes();
    Some(Reply {
        status,
        headers,
        body,
    })
}

fn incr(url: &str) -> http::Request<Full<Bytes>> {
    http::Request::post(url).body(Full::default()).unwrap()
}

/// 1,000 concurrent increments of one actor, sent round-robin to three
/// nodes, count exactly 1,000: each value acknowledged once, so exactly
/// one activation ran them (the other two nodes forwarded), and the actor
/// had one owner.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_count_1000_round_robin_increments_exactly() {
    let Some(t) = test_cluster("", "", 3) else {
        return;
    };
    let nodes = &t.nodes;
    let c = client();
    let targets: Vec<String> = nodes
        .iter()
        .map(|n| n.url("/counter/shared/incr"))
        .collect();
    let workers: Vec<_> = (0..30)
        .map(|w| {
            let (c, targets) = (c.clone(), targets.clone());
            tokio::spawn(async move {
                let mut acked = Vec::new();
                for i in 0..1000 / 30 + 1 {
                    let n = w * 34 + i;
                    if n >= 1000 {
                        break;
                    }
                    let r = send(&c, incr(&targets[n % 3])).await;
                    assert_eq!(r.status, 200, "{}", r.text());
                    acked.push(r.text().parse::<u64>().unwrap());
                }
                acked
            })
        })
        .collect();
    let mut all = Vec::new();
    for w in workers {
        all.extend(w.await.unwrap());
    }
    let distinct: BTreeSet<u64> = all.iter().copied().collect();
    assert_eq!(all.len(), 1000);
    assert_eq!(distinct, (1..=1000).collect::<BTreeSet<u64>>());
    for node in nodes {
        let r = get(&c, &node.url("/counter/shared/get")).await;
        assert_eq!((r.status, r.text().as_str()), (200, "1000"));
    }
    let history = t.owners("shared");
    assert_eq!(history.len(), 1, "one owner: {history:?}");
    assert!(
        nodes.iter().any(|n| history[0] == format!("1:{}", n.id)),
        "{history:?}"
    );
    // Every message sent to a node that does not own the actor (its share
    // of the increments and one read) was forwarded; none from the owner.
    for (k, node) in nodes.iter().enumerate() {
        let sent = (0..1000).filter(|n| n % 3 == k).count() as u64 + 1;
        let owner = history[0] == format!("1:{}", node.id);
        let forwarded = node.metric("ignis_actor_forwarded_total").await;
        assert_eq!(forwarded, if owner { 0 } else { sent }, "node {k}");
    }
    for node in t.nodes {
        stop(node.proc);
    }
}

/// SIGKILL the actor's owner under load: the actor is active again on
/// another node once the owner's lease expires; no value is acknowledged
/// twice (never two owners committing: the epoch history has exactly the
/// two owners), and every acknowledged increment is in the final count.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_owner_moves_its_actor_and_loses_no_acknowledged_increment() {
    let Some(mut t) = test_cluster("lease = \"1s\"\nforward_timeout = \"2s\"", "", 3) else {
        return;
    };
    let mut nodes = std::mem::take(&mut t.nodes);
    let c = client();
    // The first message makes node 0 the owner.
    let r = send(&c, incr(&nodes[0].url("/counter/moving/incr"))).await;
    assert_eq!((r.status, r.text().as_str()), (200, "1"));
    let stop_load = Arc::new(AtomicBool::new(false));
    let (acked_tx, mut acked_rx) = tokio::sync::mpsc::unbounded_channel::<(usize, u64)>();
    let workers: Vec<_> = (0..9)
        .map(|w| {
            let (c, target, tx, stop_load) = (
                c.clone(),
                nodes[w % 3].url("/counter/moving/incr"),
                acked_tx.clone(),
                stop_load.clone(),
            );
            tokio::spawn(async move {
                let mut retried = 0u32;
                while !stop_load.load(Ordering::SeqCst) {
                    let Some(r) = try_send(&c, incr(&target)).await else {
                        return retried; // this worker's node was killed
                    };
                    match r.status {
                        200 => {
                            let _ = tx.send((w % 3, r.text().parse().unwrap()));
                        }
                        // Retryable while the actor moves: its owner is
                        // unreachable until its lease expires.
                        503 => {
                            assert!(r.headers.contains_key("retry-after"), "{}", r.text());
                            retried += 1;
                        }
                        // The owner died with the forwarded message in
                        // flight: its outcome is unknown (not acknowledged).
                        502 => retried += 1,
                        s => panic!("unexpected {s}: {}", r.text()),
                    }
                }
                retried
            })
        })
        .collect();
    drop(acked_tx);
    let mut acked = vec![1u64];
    while acked.len() < 200 {
        acked.push(acked_rx.recv().await.expect("acknowledgements").1);
    }
    let owner = nodes.remove(0);
    let owner_id = owner.id.clone();
    sigkill(owner.proc);
    // Acknowledgements go on from the two survivors once one owns it.
    let mut after_kill = 0;
    while after_kill < 200 {
        let (node, n) = acked_rx
            .recv()
            .await
            .expect("acknowledgements after the kill");
        acked.push(n);
        after_kill += usize::from(node != 0);
    }
    stop_load.store(true, Ordering::SeqCst);
    let mut retried = 0;
    for w in workers {
        retried += w.await.unwrap();
    }
    while let Ok((_, n)) = acked_rx.try_recv() {
        acked.push(n);
    }
    let distinct: BTreeSet<u64> = acked.iter().copied().collect();
    assert_eq!(
        distinct.len(),
        acked.len(),
        "a value was acknowledged twice"
    );
    let r = get(&c, &nodes[0].url("/counter/moving/get")).await;
    assert_eq!(r.status, 200);
    let count: u64 = r.text().parse().unwrap();
    assert!(
        count >= *distinct.last().unwrap(),
        "acknowledged {} but the count is {count}",
        distinct.last().unwrap()
    );
    let history = t.owners("moving");
    assert_eq!(history.len(), 2, "{history:?}");
    assert_eq!(history[0], format!("1:{owner_id}"));
    assert!(
        nodes.iter().any(|n| history[1] == format!("2:{}", n.id)),
        "{history:?}"
    );
    assert!(
        retried > 0,
        "the survivors were told to retry while the actor moved"
    );
    for node in nodes {
        stop(node.proc);
    }
}

/// The owner is paused (SIGSTOP) in the middle of a message, past its
/// lease: another node takes the actor over (epoch 2). When the owner
/// resumes, its message's commit is refused by the fence: the client gets
/// a retryable 503, and the write is not in the count. The resumed node
/// then serves the actor by forwarding to the new owner.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_owners_late_commit_is_refused_and_its_client_told_to_retry() {
    let Some(mut t) = test_cluster("lease = \"1s\"\nforward_timeout = \"1s\"", "", 2) else {
        return;
    };
    let nodes = std::mem::take(&mut t.nodes);
    let c = client();
    let r = send(&c, incr(&nodes[0].url("/counter/paused/incr"))).await;
    assert_eq!((r.status, r.text().as_str()), (200, "1"));
    // A message that will be mid-run when the owner is paused.
    let late = tokio::spawn({
        let (c, u) = (c.clone(), nodes[0].url("/counter/paused/incr?spin_ms=1000"));
        async move { send(&c, incr(&u)).await }
    });
    assert!(
        nodes[0]
            .proc
            .wait_log("incr spinning", Duration::from_secs(30)),
        "the message started"
    );
    signal(&nodes[0].proc.child, "STOP");
    // Reads through the other node: forwarded to the paused owner (they
    // time out) until its lease expires, then served by the new owner.
    let deadline = Instant::now() + Duration::from_secs(30);
    let read = loop {
        let r = get(&c, &nodes[1].url("/counter/paused/get")).await;
        if r.status == 200 {
            break r.text();
        }
        assert!(matches!(r.status, 503 | 504), "{}: {}", r.status, r.text());
        assert!(Instant::now() < deadline, "no takeover within 30s");
    };
    assert_eq!(read, "1", "the new owner reads what was committed");
    signal(&nodes[0].proc.child, "CONT");
    let r = late.await.unwrap();
    assert_eq!(r.status, 503, "{}", r.text());
    assert!(r.headers.contains_key("retry-after"));
    assert!(r.text().contains("moved to another node"), "{}", r.text());
    let r = get(&c, &nodes[1].url("/counter/paused/get")).await;
    assert_eq!(
        (r.status, r.text().as_str()),
        (200, "1"),
        "the late write is not applied"
    );
    // The resumed node forwards to the new owner (once its heartbeat has
    // renewed its membership; until then it says to retry).
    let deadline = Instant::now() + Duration::from_secs(30);
    let r = loop {
        let r = send(&c, incr(&nodes[0].url("/counter/paused/incr"))).await;
        if r.status != 503 {
            break r;
        }
        assert!(r.text().contains("membership lapsed"), "{}", r.text());
        assert!(
            Instant::now() < deadline,
            "the resumed node never served again"
        );
    };
    assert_eq!((r.status, r.text().as_str()), (200, "2"));
    assert_eq!(
        t.owners("paused"),
        [format!("1:{}", nodes[0].id), format!("2:{}", nodes[1].id)]
    );
    assert_eq!(nodes[0].metric("ignis_actor_fenced_commits_total").await, 1);
    assert_eq!(nodes[1].metric("ignis_actor_fenced_commits_total").await, 0);
    let mut nodes = nodes.into_iter();
    let log = stop(nodes.next().unwrap().proc);
    assert!(log.contains("the lease moved to another node"), "{log}");
    stop(nodes.next().unwrap().proc);
}

/// The internal listener takes only what nodes of the cluster send: no
/// token or a wrong one is 403, a malformed actor header 400, a body
/// over 64 MiB 413, a message forwarded too many times (a loop) 508, and
/// a connection that is not HTTP/2 or never sends its preface is closed.
/// Nothing reaches the actor (its count stays 0).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_internal_listener_refuses_strangers_malformed_messages_and_loops() {
    let Some(mut t) = test_cluster("", "", 2) else {
        return;
    };
    let nodes = std::mem::take(&mut t.nodes);
    let token = t
        .server
        .sql(
            t.db(),
            "SELECT value FROM ignis_cluster WHERE name = 'forward_token'",
        )
        .trim()
        .to_string();
    assert_eq!(token.len(), 32, "{token:?}");
    // The actor lives on node 1.
    let c = client();
    let r = get(&c, &nodes[1].url("/counter/guarded/get")).await;
    assert_eq!((r.status, r.text().as_str()), (200, "0"));
    let h2: HttpClient =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .http2_only(true)
            .build_http();
    let internal = |headers: &[(&str, &str)]| {
        let mut req =
            http::Request::post(format!("http://{}/counter/guarded/incr", nodes[0].internal));
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        req.body(Full::default()).unwrap()
    };
    let actor = ("ignis-forward-actor", "counter/guarded");
    let hops = ("ignis-forward-hops", "1");
    let r = send(&h2, internal(&[actor, hops])).await;
    assert_eq!(r.status, 403, "no token: {}", r.text());
    let wrong = "0".repeat(32);
    let r = send(
        &h2,
        internal(&[("ignis-cluster-token", &wrong), actor, hops]),
    )
    .await;
    assert_eq!(r.status, 403, "wrong token: {}", r.text());
    let with = ("ignis-cluster-token", token.as_str());
    let r = send(
        &h2,
        internal(&[with, ("ignis-forward-actor", "no-slash"), hops]),
    )
    .await;
    assert_eq!(r.status, 400, "{}", r.text());
    let r = send(
        &h2,
        internal(&[with, ("ignis-forward-actor", "counter/%FF"), hops]),
    )
    .await;
    assert_eq!(r.status, 400, "an id that is not UTF-8: {}", r.text());
    let r = send(&h2, internal(&[with, actor])).await;
    assert_eq!(r.status, 400, "no hop count: {}", r.text());
    // Node 0 does not own the actor: a message that already made the most
    // hops is refused instead of going round again.
    let r = send(&h2, internal(&[with, actor, ("ignis-forward-hops", "3")])).await;
    assert_eq!(r.status, 508, "{}", r.text());
    assert!(r.text().contains("forwarding loop"), "{}", r.text());
    // A body over 64 MiB is refused before anything runs.
    let mut big = internal(&[with, actor, hops]);
    *big.body_mut() = Full::new(Bytes::from(vec![b'x'; (64 << 20) + 1]));
    let r = send(&h2, big).await;
    assert_eq!(r.status, 413, "{}", r.text());
    // HTTP/1.1 instead of the HTTP/2 preface: closed without an answer.
    let (answer, closed) =
        silent_peer(&nodes[0].internal, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert!(
        closed,
        "an HTTP/1.1 request was not refused (got {answer:?})"
    );
    assert!(!answer.contains("HTTP/1.1 200"), "{answer}");
    // A connection that never sends its preface is closed (after 10 s).
    let (_, closed) = silent_peer(&nodes[0].internal, b"").await;
    assert!(closed, "a silent connection was kept open");
    // A good one is forwarded to the owner and counted once.
    let r = send(&h2, internal(&[with, actor, hops])).await;
    assert_eq!((r.status, r.text().as_str()), (200, "1"));
    let r = get(&c, &nodes[0].url("/counter/guarded/get")).await;
    assert_eq!((r.status, r.text().as_str()), (200, "1"));
    // A guest's call through `ignis:actor/client` on node 0 is forwarded
    // with its identity (checked on node 0, carried to the owner); a
    // client's own `ignis-caller` is not.
    let r = get(&c, &nodes[0].url("/bump?id=guarded&op=caller")).await;
    assert_eq!((r.status, r.text().as_str()), (200, "app/client"));
    let forged = http::Request::get(nodes[0].url("/counter/guarded/caller"))
        .header("ignis-caller", "other/evil")
        .body(Full::default())
        .unwrap();
    let r = send(&c, forged).await;
    assert_eq!((r.status, r.text().as_str()), (200, "none"));
    for node in nodes {
        stop(node.proc);
    }
}

/// Connects to `addr`, writes `bytes` and reads until the peer closes or
/// 60 s pass: what it answered, and whether it closed.
async fn silent_peer(addr: &str, bytes: &[u8]) -> (String, bool) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(bytes).await.unwrap();
    let mut got = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(60), async {
        let mut buf = [0u8; 4096];
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await
    .is_ok();
    (String::from_utf8_lossy(&got).into_owned(), closed)
}

/// Runs `ignis ARGS` without a cluster database in the environment; it
/// must fail. Its stderr.
fn refused(args: &[&str]) -> String {
    let out = ignis()
        .args(args)
        .env_remove("IGNIS_DATABASE_URL")
        .env_remove("IGNIS_CLUSTER")
        .output()
        .unwrap();
    assert!(!out.status.success(), "ignis {args:?} succeeded");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Cluster mode without a database is refused at start, saying what to set.
#[test]
fn cluster_mode_without_a_database_is_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let manifest = cluster_manifest(dir.path(), "listen = \"127.0.0.1:0\"", "");
    let manifest = manifest.to_str().unwrap();
    let stderr = refused(&["serve", manifest, "--listen", "127.0.0.1:0"]);
    assert!(
        stderr.contains("cluster mode needs a PostgreSQL database")
            && stderr.contains("IGNIS_DATABASE_URL"),
        "{stderr}"
    );
    let stderr = refused(&["serve", manifest, "--cluster-advertise", "user@host:1"]);
    assert!(stderr.contains("--cluster-advertise"), "{stderr}");
    // The cluster's addresses without cluster mode.
    let other = tempfile::tempdir().unwrap();
    let plain = hello_manifest(other.path(), "", "");
    let stderr = refused(&[
        "serve",
        plain.to_str().unwrap(),
        "--cluster-listen",
        "127.0.0.1:0",
    ]);
    assert!(
        stderr.contains("--cluster-listen and --cluster-advertise need cluster mode"),
        "{stderr}"
    );
}

/// `ignis cluster status` with a database it cannot use: unreachable, not
/// a PostgreSQL URL, or a malformed option. Each fails with an error that
/// names the database without its password (no PostgreSQL needed).
#[test]
fn cluster_status_refuses_a_bad_database_naming_it_without_the_password() {
    // Port 1 on loopback: nothing listens there.
    let err = refused(&[
        "cluster",
        "status",
        "--cluster",
        "postgres://ignis:pw-s3cret@127.0.0.1:1/orders",
    ]);
    assert!(
        err.contains("opening the cluster's database")
            && err.contains("postgres://ignis@127.0.0.1:1/orders"),
        "{err}"
    );
    assert!(!err.contains("s3cret"), "the password leaked: {err}");
    for bad in [
        "mysql://ignis:pw-s3cret@db/x",
        "postgres://ignis:pw-s3cret@127.0.0.1:1/c?connect_timeout=soon",
    ] {
        let err = refused(&["cluster", "status", "--cluster", bad]);
        assert!(
            err.contains("not a PostgreSQL connection string"),
            "{bad}: {err}"
        );
        assert!(!err.contains("s3cret"), "the password leaked: {err}");
    }
}

/// A deploy through one node's admin API is recorded in the database and
/// served by every node (woken by `NOTIFY`); a rollback through another
/// node goes everywhere too; a node started later serves the latest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deploy_on_one_node_is_served_by_all() {
    use base64::Engine as _;
    let Some(server) = ignis_store::testing::shared() else {
        return;
    };
    let url = server.database();
    let dir = tempfile::tempdir().unwrap();
    let manifest = crate::admin::manifest(dir.path(), "[cluster]\n");
    let start =
        |manifest: &std::path::Path| crate::admin::serve_with_admin(manifest, &["--cluster", &url]);
    let nodes: Vec<_> = (0..3).map(|_| start(&manifest)).collect();
    let c = client();
    let hello = |addr: std::net::SocketAddr| format!("http://{addr}/hello");
    let body = serde_json::json!({
        "config": "tenant = \"acme\"\nenv = { GREETING = \"cluster-wide\" }\n",
        "component": base64::engine::general_purpose::STANDARD
            .encode(std::fs::read(wasm("hello")).unwrap()),
    });
    let put = |admin: std::net::SocketAddr, path: &str, body: Option<serde_json::Value>| {
        let method = if body.is_some() { "PUT" } else { "POST" };
        http::Request::builder()
            .method(method)
            .uri(format!("http://{admin}{path}"))
            .header("authorization", crate::admin::bearer())
            .body(Full::new(
                body.map_or_else(Bytes::new, |b| Bytes::from(b.to_string())),
            ))
            .unwrap()
    };
    let r = send(
        &c,
        put(nodes[0].1, "/v1/functions/hello", Some(body.clone())),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let served_everywhere = |text: &'static str| {
        let (c, addrs) = (
            c.clone(),
            nodes.iter().map(|n| n.0.addr).collect::<Vec<_>>(),
        );
        async move {
            let deadline = Instant::now() + Duration::from_secs(30);
            for addr in addrs {
                loop {
                    let r = get(&c, &hello(addr)).await;
                    if r.text() == text {
                        break;
                    }
                    assert!(
                        Instant::now() < deadline,
                        "{addr} still serves {:?}",
                        r.text()
                    );
                    tokio::task::yield_now().await;
                }
            }
        }
    };
    served_everywhere("cluster-wide\n").await;
    let listing =
        crate::admin::admin_get(nodes[2].1, "/v1/functions", Some(&crate::admin::bearer())).await;
    let listing: serde_json::Value = serde_json::from_slice(&listing.body).unwrap();
    assert_eq!(listing["deploys"][0]["action"], "cluster", "{listing}");
    // A rollback through node 2 goes back everywhere.
    let r = send(&c, put(nodes[2].1, "/v1/functions/hello/rollback", None)).await;
    assert_eq!(r.status, 200, "{}", r.text());
    served_everywhere("Hello from Ignis!\n").await;
    // A node started now serves the latest change.
    let r = send(&c, put(nodes[1].1, "/v1/functions/hello", Some(body))).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let late = start(&manifest);
    let r = get(&c, &hello(late.0.addr)).await;
    assert_eq!(r.text(), "cluster-wide\n");
    for (proc, _) in nodes.into_iter().chain([late]) {
        stop(proc);
    }
}

/// The database goes away while a node runs (its sessions are killed and
/// new ones refused): actor messages get a retryable 503 with a reason,
/// stateless functions keep serving, and once the database takes
/// connections again the node recovers by itself and the actor's count
/// goes on from what was acknowledged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losing_the_database_fails_actors_with_503_and_recovers_by_itself() {
    let Some(mut t) = test_cluster("lease = \"1s\"", "", 1) else {
        return;
    };
    let (server, db) = (t.server, t.db().to_string());
    let node = t.nodes.remove(0);
    let c = client();
    let r = send(&c, incr(&node.url("/counter/outage/incr"))).await;
    assert_eq!((r.status, r.text().as_str()), (200, "1"));
    server.sql(
        "postgres",
        &format!(
            "ALTER DATABASE {db} ALLOW_CONNECTIONS false; \
             SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE datname = '{db}'"
        ),
    );
    // Every actor message fails retryably until the database is back
    // (the first may still find its lease held: its commit fails).
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut refused = 0;
    while refused < 5 {
        let r = send(&c, incr(&node.url("/counter/outage/incr"))).await;
        assert_eq!(r.status, 503, "{}", r.text());
        assert!(r.headers.contains_key("retry-after"));
        assert!(
            r.text().contains("unavailable") || r.text().contains("lapsed"),
            "{}",
            r.text()
        );
        refused += 1;
        assert!(Instant::now() < deadline);
    }
    let r = get(&c, &node.url("/hello")).await;
    assert_eq!(r.status, 200, "stateless functions keep serving");
    server.sql(
        "postgres",
        &format!("ALTER DATABASE {db} ALLOW_CONNECTIONS true"),
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    let r = loop {
        let r = send(&c, incr(&node.url("/counter/outage/incr"))).await;
        if r.status == 200 {
            break r;
        }
        assert_eq!(r.status, 503, "{}", r.text());
        assert!(Instant::now() < deadline, "no recovery within 30 s");
    };
    assert_eq!(r.text(), "2", "the refused increments were not applied");
    stop(node.proc);
}

/// Every node schedules every cron trigger, and each occurrence runs on
/// one node: the actor's count is at most the number of occurrences
/// claimed (on the code before, each of the three nodes ran each one).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cron_occurrence_runs_on_one_node_of_the_cluster() {
    let trigger = "[[triggers.cron]]\nname = \"tick\"\nschedule = \"* * * * * *\"\nactor = \"counter\"\nid = \"nightly\"\npath = \"/incr\"\n";
    let Some(mut t) = test_cluster("", trigger, 3) else {
        return;
    };
    let (server, db) = (t.server, t.db().to_string());
    let nodes = std::mem::take(&mut t.nodes);
    let claimed = || -> u64 {
        server
            .sql(
                &db,
                "SELECT count(*) FROM ignis_cron_runs WHERE trigger = 'tick'",
            )
            .parse()
            .unwrap()
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while claimed() < 4 {
        assert!(Instant::now() < deadline, "no cron occurrences claimed");
    }
    for node in nodes {
        stop(node.proc);
    }
    let runs = claimed();
    let count: u64 = server
        .sql(
            &db,
            "SELECT convert_from(value, 'UTF8') FROM ignis_actor_kv \
             WHERE id = 'nightly'::bytea AND key = 'count'::bytea",
        )
        .parse()
        .unwrap();
    assert!(
        (1..=runs).contains(&count),
        "{count} runs for {runs} claimed occurrences"
    );
}

/// An alarm set on an actor whose owner then dies fires on another node
/// once the owner's lease has run out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_owners_alarm_fires_on_another_node() {
    let Some(mut t) = test_cluster("lease = \"1s\"", "", 2) else {
        return;
    };
    let mut nodes = std::mem::take(&mut t.nodes);
    let c = client();
    let r = send(&c, incr(&nodes[0].url("/counter/waker/alarm?in_ms=1500"))).await;
    assert_eq!((r.status, r.text().as_str()), (200, "alarm set"));
    let owner = nodes.remove(0);
    sigkill(owner.proc);
    // Only the survivor's polling can fire it; it is read through the
    // survivor (which takes the actor over once the lease ran out).
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let r = get(&c, &nodes[0].url("/counter/waker/alarms")).await;
        if r.status == 200 && r.text().starts_with("fired=1 ") {
            assert!(r.text().ends_with("pending=false"), "{}", r.text());
            break;
        }
        assert!(matches!(r.status, 200 | 503), "{}: {}", r.status, r.text());
        assert!(
            Instant::now() < deadline,
            "the alarm never fired: {}",
            r.text()
        );
    }
    let history = t.owners("waker");
    assert_eq!(history.len(), 2, "{history:?}");
    assert_eq!(history[1], format!("2:{}", nodes[0].id));
    stop(nodes.remove(0).proc);
}

/// Runs `ignis cluster ARGS` against the cluster's database; returns (ok,
/// stdout, stderr).
async fn cluster_cli(url: &str, args: &[&str]) -> (bool, String, String) {
    let mut cmd = ignis();
    cmd.arg("cluster").args(args).env("IGNIS_CLUSTER", url);
    let out = tokio::task::spawn_blocking(move || cmd.output().unwrap())
        .await
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `ignis cluster apply` records a manifest's functions, routes and
/// triggers for every node: both nodes serve the new route and the new
/// configuration, each reports the change it took, and the sections that
/// are each node's own (here `[server]`, absent from the applied file)
/// stay as they were. A change the nodes refuse (a new actor class needs
/// a restart) fails the command naming each node and its reason, and the
/// nodes keep serving the previous change; a malformed manifest is refused
/// before anything is recorded; a reload (SIGHUP) of one node's file is
/// refused in cluster mode.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ignis_cluster_apply_reaches_every_node_and_reports_refusals() {
    let Some(t) = test_cluster("", "", 2) else {
        return;
    };
    let c = client();
    let served = std::fs::read_to_string(t._dir.path().join("ignis.toml")).unwrap();
    let operator = tempfile::tempdir().unwrap();
    // The operator's copy: no [server] section, hello configured, a route
    // more.
    let (_, shared) = served.split_once("[cluster]").unwrap();
    let changed = format!(
        "[cluster]{}\n[[routes]]\npath = \"/greet\"\nfunction = \"hello\"\n",
        shared.replace(
            &format!("[functions.hello]\ncomponent = \"{}\"", wasm("hello")),
            &format!(
                "[functions.hello]\ncomponent = \"{}\"\nenv = {{ GREETING = \"applied\" }}",
                wasm("hello")
            ),
        )
    );
    assert!(changed.contains("GREETING"), "{changed}");
    let file = write(operator.path(), "ignis.toml", &changed);
    let (ok, out, err) = cluster_cli(&t.url, &["apply", file.to_str().unwrap()]).await;
    assert!(ok, "stdout:\n{out}\nstderr:\n{err}");
    for n in &t.nodes {
        assert!(
            out.contains(&format!("node {} ({}): applied change 1", n.id, n.internal)),
            "{out}"
        );
        assert_eq!(get(&c, &n.url("/greet")).await.text(), "applied\n");
        assert_eq!(get(&c, &n.url("/hello")).await.text(), "applied\n");
        assert_eq!(get(&c, &n.url("/counter/a/incr")).await.status, 200);
    }

    // A change the nodes refuse: each says why, the command fails, and
    // they keep serving change 1.
    let more = write(
        operator.path(),
        "more.toml",
        &format!(
            "{changed}\n[actors.second]\ncomponent = \"{}\"\n",
            wasm("counter")
        ),
    );
    let (ok, out, _) = cluster_cli(&t.url, &["apply", more.to_str().unwrap()]).await;
    assert!(!ok, "{out}");
    for n in &t.nodes {
        assert!(
            out.contains(&format!(
                "node {} ({}): REFUSED change 2: adding or removing actor classes needs a restart",
                n.id, n.internal
            )),
            "{out}"
        );
        assert_eq!(get(&c, &n.url("/greet")).await.text(), "applied\n");
    }
    let (ok, status, err) = cluster_cli(&t.url, &["status"]).await;
    assert!(ok, "{err}");
    assert!(status.contains("latest change: 2 by "), "{status}");
    assert_eq!(
        status.lines().filter(|l| l.contains(" yes ")).count(),
        2,
        "{status}"
    );

    // Malformed: the file, line and key are named and nothing is recorded.
    let bad = write(
        operator.path(),
        "bad.toml",
        &changed.replace("path = \"/greet\"", "path = 42"),
    );
    let (ok, out, err) = cluster_cli(&t.url, &["apply", bad.to_str().unwrap()]).await;
    assert!(!ok, "{out}");
    assert!(err.contains("bad.toml") && err.contains("path"), "{err}");
    let (_, status, _) = cluster_cli(&t.url, &["status"]).await;
    assert!(status.contains("latest change: 2 by "), "{status}");

    // Without a database to name, apply says how to name one.
    let plain = write(
        operator.path(),
        "plain.toml",
        &changed.replace("[cluster]", ""),
    );
    let err = refused(&["cluster", "apply", plain.to_str().unwrap()]);
    assert!(
        err.contains("--cluster URL") && err.contains("no [cluster] section"),
        "{err}"
    );

    // A node's own file is not reloaded in cluster mode.
    signal(&t.nodes[0].proc.child, "HUP");
    assert!(
        t.nodes[0]
            .proc
            .wait_log("ignis cluster apply FILE", Duration::from_secs(30)),
        "the reload was not refused"
    );
    assert_eq!(get(&c, &t.nodes[0].url("/greet")).await.text(), "applied\n");
    for node in t.nodes {
        stop(node.proc);
    }
}
