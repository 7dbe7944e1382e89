//! `ignis-bench cluster`: what cluster mode costs and how fast it reacts,
//! with three `ignis serve` nodes on one PostgreSQL database, all on this
//! machine (so the three nodes, the database and the load generator share
//! its cores).
//!
//! - **Forwarding overhead**: open-loop messages to one actor at a fixed
//!   rate, sent to its owner and (in the same round, one after the other)
//!   to another node, which forwards them over HTTP/2: the p50 difference is
//!   the cost of a forward. Twice: a message that touches no storage (the
//!   forward alone) and a read (one database round trip on the owner).
//!   Beside the storage-free message, in the same rounds and at the same
//!   rate, the relay floor: the bench's bare hyper hello loaded directly,
//!   through nginx and through Ignis's reverse proxy. nginx's difference is
//!   what one more process in the path costs here with a peer's code in it
//!   (77-96 µs p50 at 400/s on this two-core VM in the runs of 2026-12-01,
//!   where each hop wakes a sleeping thread); the forward's overhead is
//!   reported against it.
//! - **1 vs 3 nodes**: closed-loop increments over 1,000 actors, all sent to
//!   one node, then the same load split over three (each actor owned by one
//!   of them, two thirds of the messages forwarded): the per-node
//!   efficiency is (three nodes' total / 3) / one node's.
//! - **Deploy propagation**: a new version of a function deployed through
//!   one node's admin API, timed from the request to the first answer of
//!   the new version from every other node.
//! - **Failover**: the owner of an actor is killed (`kill -9`) while a
//!   client sends increments to another node; timed from the kill to the
//!   first successful reply to a message sent after it (the owner's lease
//!   must expire first). Then the same with a clean stop (SIGTERM: the
//!   node leaves the membership).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use crate::deploy::{HttpClient, Node, percentile, request, start_with, summary};
use crate::proxy::Relays;
use crate::{LoadSpec, Report};

/// Command-line arguments.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The ignis binary.
    #[arg(long)]
    pub ignis: PathBuf,
    /// The counter actor component (examples/counter).
    #[arg(long)]
    pub counter: PathBuf,
    /// The hello component (examples/hello).
    #[arg(long)]
    pub hello: PathBuf,
    /// The cluster's database (a URL or key=value string).
    #[arg(long, env = "IGNIS_BENCH_DATABASE", hide_env_values = true)]
    pub database: String,
    /// Measured seconds per load run.
    #[arg(long, default_value_t = 6.0)]
    pub seconds: f64,
    /// Rounds of each measurement.
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
    /// Write the JSON results here.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Measure the forwarding overhead only (no JSON written).
    #[arg(long)]
    pub only_forwarding: bool,
    /// Open-loop rate (messages/s) of the forwarding-overhead runs. The
    /// recorded figure is at the default; other rates show how much of the
    /// overhead is waking idle cores (docs/perf/2026-12-01-cluster-forwarding.md).
    #[arg(long, default_value_t = 400.0, value_parser = crate::positive_rate)]
    pub forward_rate: f64,
    /// The nginx binary. Next to the storage-free message, in the same
    /// rounds and at the same rate, the bench measures the relay floor: a
    /// bare hyper hello directly, through nginx and through Ignis's reverse
    /// proxy (what one more process in the path costs on this machine).
    #[arg(long, default_value = "/usr/sbin/nginx")]
    pub nginx: PathBuf,
    /// Skip the relay floor (no nginx needed).
    #[arg(long)]
    pub no_relay: bool,
}

/// A node with its three addresses.
struct ClusterNode {
    node: Node,
}

impl ClusterNode {
    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.node.http)
    }
}

fn start_node(args: &Args, manifest: &std::path::Path) -> anyhow::Result<ClusterNode> {
    let node = start_with(
        &args.ignis,
        manifest,
        &[
            "--cluster",
            &args.database,
            "--cluster-listen",
            "127.0.0.1:0",
        ],
    )?;
    Ok(ClusterNode { node })
}

fn spec(addr: &str, path: &str, connections: usize, seconds: f64, rate: Option<f64>) -> LoadSpec {
    LoadSpec {
        addr: addr.to_string(),
        path: path.to_string(),
        connections,
        duration: Duration::from_secs_f64(seconds),
        warmup: Duration::from_secs(1),
        rate,
        tls: None,
        tls_name: String::new(),
        h2: false,
        h2_connections: 1,
        reconnect: false,
    }
}

async fn post(client: &HttpClient, url: &str) -> Option<(u16, String)> {
    let req = http::Request::post(url)
        .body(http_body_util::Full::default())
        .ok()?;
    let resp = tokio::time::timeout(Duration::from_secs(30), client.request(req))
        .await
        .ok()?
        .ok()?;
    let status = resp.status().as_u16();
    let body = http_body_util::BodyExt::collect(resp.into_body())
        .await
        .ok()?
        .to_bytes();
    Some((status, String::from_utf8_lossy(&body).into_owned()))
}

fn latency(r: &Report) -> serde_json::Value {
    serde_json::json!({
        "throughput": r.throughput,
        "p50_us": r.latency_us.p50,
        "p99_us": r.latency_us.p99,
        "p999_us": r.latency_us.p999,
        "statuses": r.statuses,
        "unfinished": r.unfinished,
    })
}

/// Open-loop messages `op` to actor `counter/fwd` (owned by node 0) at
/// `args.forward_rate` (400/s by default), sent to node 0 and then to node
/// 1 (which forwards them), for `args.rounds` rounds; prints and returns
/// the p50s, p99s and the overhead (median forwarded p50 − median direct
/// p50). With `relays`, each round also loads the origin's `/hello`
/// directly, through nginx and through Ignis's reverse proxy, with the same
/// connections and rate: the overhead of one more process in the path with
/// a peer's code in it, measured beside the forward's.
async fn forwarding(
    args: &Args,
    nodes: &[ClusterNode],
    op: &str,
    relays: Option<&Relays>,
) -> serde_json::Value {
    let path = format!("/counter/fwd/{op}");
    let open_loop =
        |addr: &str, path: &str| spec(addr, path, 4, args.seconds, Some(args.forward_rate));
    let (mut direct, mut forwarded) = (Vec::new(), Vec::new());
    let (mut direct_p50, mut forwarded_p50) = (Vec::new(), Vec::new());
    // p50s of the origin directly, through Ignis, through nginx.
    let mut relay_p50: [Vec<f64>; 3] = Default::default();
    for _ in 0..args.rounds {
        let d = crate::run(&open_loop(&nodes[0].node.http, &path)).await;
        let f = crate::run(&open_loop(&nodes[1].node.http, &path)).await;
        direct_p50.push(d.latency_us.p50 as f64);
        forwarded_p50.push(f.latency_us.p50 as f64);
        direct.push(latency(&d));
        forwarded.push(latency(&f));
        for (addr, p50s) in relays
            .map(Relays::plain)
            .into_iter()
            .flatten()
            .zip(&mut relay_p50)
        {
            let r = crate::run(&open_loop(addr, "/hello")).await;
            p50s.push(r.latency_us.p50 as f64);
        }
    }
    let overhead_us = percentile(&forwarded_p50, 0.5) - percentile(&direct_p50, 0.5);
    println!(
        "forwarding `{op}` at {}/s: p50 direct {:.0} µs, forwarded {:.0} µs: overhead {overhead_us:.0} µs (target < 100 µs)",
        args.forward_rate,
        percentile(&direct_p50, 0.5),
        percentile(&forwarded_p50, 0.5)
    );
    let relay = relays.map(|_| {
        let [origin, ignis, nginx] = relay_p50.each_ref().map(|v| percentile(v, 0.5));
        println!(
            "relay floor at {}/s: bare hyper p50 {origin:.0} µs, through nginx {nginx:.0} µs (+{:.0}), \
             through Ignis's reverse proxy {ignis:.0} µs (+{:.0}); the forward's overhead / nginx's {:.2}",
            args.forward_rate,
            nginx - origin,
            ignis - origin,
            overhead_us / (nginx - origin)
        );
        serde_json::json!({
            "origin_p50_us": relay_p50[0],
            "ignis_proxy_p50_us": relay_p50[1],
            "nginx_p50_us": relay_p50[2],
            "nginx_overhead_p50_us": nginx - origin,
            "ignis_proxy_overhead_p50_us": ignis - origin,
            "forward_overhead_over_nginx": overhead_us / (nginx - origin),
        })
    });
    // Closed loop, the cores saturated: what a forward costs in CPU shows
    // as the throughput lost (steadier than latency on a noisy machine).
    let (mut direct_rps, mut forwarded_rps) = (Vec::new(), Vec::new());
    for _ in 0..args.rounds {
        let d = crate::run(&spec(&nodes[0].node.http, &path, 16, args.seconds, None)).await;
        let f = crate::run(&spec(&nodes[1].node.http, &path, 16, args.seconds, None)).await;
        direct_rps.push(d.throughput);
        forwarded_rps.push(f.throughput);
    }
    let ratio = percentile(&forwarded_rps, 0.5) / percentile(&direct_rps, 0.5);
    println!(
        "forwarding `{op}`, closed loop: direct {:.0}/s, forwarded {:.0}/s: forwarded / direct {ratio:.2}",
        percentile(&direct_rps, 0.5),
        percentile(&forwarded_rps, 0.5)
    );
    serde_json::json!({
        "op": op,
        "rate_per_s": args.forward_rate,
        "direct": direct,
        "forwarded": forwarded,
        "overhead_p50_us": overhead_us,
        "closed_loop_direct_per_s": direct_rps,
        "closed_loop_forwarded_per_s": forwarded_rps,
        "closed_loop_ratio": ratio,
        "relay_floor": relay,
    })
}

/// Kills (`signal`) the owner of a fresh actor while a client sends its
/// increments to another node; returns the seconds from the signal to the
/// first successful reply to an increment sent after it.
async fn failover(
    client: &HttpClient,
    nodes: &mut Vec<ClusterNode>,
    id: &str,
    signal: &str,
) -> anyhow::Result<f64> {
    let owner = nodes.remove(0);
    let (status, _) = post(client, &owner.url(&format!("/counter/{id}/incr")))
        .await
        .context("first increment")?;
    if status != 200 {
        bail!("the first increment answered {status}");
    }
    let other = nodes[0].url(&format!("/counter/{id}/incr"));
    // Served by the owner through the other node before the kill.
    for _ in 0..20 {
        match post(client, &other).await {
            Some((200, _)) => {}
            r => bail!("a forwarded increment before the kill failed: {r:?}"),
        }
    }
    let killed = Instant::now();
    let mut owner = owner;
    let _ = std::process::Command::new("kill")
        .args([&format!("-{signal}"), &owner.node.child.id().to_string()])
        .status();
    loop {
        let sent = Instant::now();
        if let Some((200, _)) = post(client, &other).await
            && sent >= killed
        {
            let took = killed.elapsed().as_secs_f64();
            let _ = owner.node.child.wait();
            return Ok(took);
        }
        if killed.elapsed() > Duration::from_secs(60) {
            bail!("no successful reply within 60 s of the kill");
        }
    }
}

/// Runs the benchmark and prints the figures.
pub async fn run(args: &Args) -> anyhow::Result<()> {
    let dir = std::env::temp_dir().join(format!("ignis-bench-cluster-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let manifest = dir.join("ignis.toml");
    std::fs::write(
        &manifest,
        format!(
            "[server]\ncache_dir = \"{}\"\n\n[cluster]\n\n\
             [functions.hello]\ncomponent = \"{}\"\nmax_concurrency = 256\n\n\
             [actors.counter]\ncomponent = \"{}\"\nmailbox = 1024\n\n\
             [[routes]]\npath = \"/hello\"\nfunction = \"hello\"\n\n\
             [[routes]]\npath = \"/counter/{{id}}/...\"\nactor = \"counter\"\n",
            dir.join("cache").display(),
            args.hello.canonicalize()?.display(),
            args.counter.canonicalize()?.display(),
        ),
    )?;
    let client: HttpClient = Client::builder(TokioExecutor::new()).build_http();
    let mut nodes = Vec::new();
    for _ in 0..3 {
        nodes.push(start_node(args, &manifest)?);
    }
    for n in &nodes {
        let (status, _) = request(&client, "GET", &n.url("/hello"), None).await?;
        if status != 200 {
            bail!("a node answered {status} to /hello");
        }
    }

    // Forwarding overhead: one actor owned by node 0, sent a message at a
    // fixed rate directly and through node 1, alternating: one that
    // touches no storage (`whoami`: the forward alone) and a read (`get`:
    // one database round trip on the owner, as most messages have).
    post(&client, &nodes[0].url("/counter/fwd/incr"))
        .await
        .context("placing the actor")?;
    let relays = if args.no_relay {
        None
    } else {
        let workers = std::thread::available_parallelism().map_or(2, |n| n.get());
        Some(
            Relays::start(&args.ignis, &args.nginx, &dir.join("relays"), workers)
                .await
                .context("starting the relay floor's origin and proxies (--no-relay skips it)")?,
        )
    };
    let bare = forwarding(args, &nodes, "whoami", relays.as_ref()).await;
    drop(relays);
    let read = forwarding(args, &nodes, "get", None).await;
    if args.only_forwarding {
        drop(nodes);
        let _ = std::fs::remove_dir_all(&dir);
        return Ok(());
    }

    // 1 vs 3 nodes: 1,000 actors, closed loop.
    let (mut one, mut three) = (Vec::new(), Vec::new());
    for round in 0..args.rounds {
        let r = crate::run(&spec(
            &nodes[0].node.http,
            &format!("/counter/one{round}-{{i:1000}}/incr"),
            48,
            args.seconds,
            None,
        ))
        .await;
        one.push(r.throughput);
        let path = format!("/counter/three{round}-{{i:1000}}/incr");
        let specs: Vec<LoadSpec> = nodes
            .iter()
            .map(|n| spec(&n.node.http, &path, 16, args.seconds, None))
            .collect();
        let (a, b, c) = tokio::join!(
            crate::run(&specs[0]),
            crate::run(&specs[1]),
            crate::run(&specs[2])
        );
        three.push(a.throughput + b.throughput + c.throughput);
    }
    let (one_p50, three_p50) = (percentile(&one, 0.5), percentile(&three, 0.5));
    let efficiency = three_p50 / 3.0 / one_p50;
    println!(
        "1,000 actors: one node {one_p50:.0} increments/s, three nodes {three_p50:.0}/s in all: per-node efficiency {efficiency:.2}"
    );

    // Deploy propagation.
    let hello = std::fs::read(&args.hello)?;
    let mut propagation = Vec::new();
    for i in 0..10 {
        use base64::Engine as _;
        let greeting = format!("gen-{i}");
        let body = serde_json::json!({
            "config": format!("max_concurrency = 256\nenv = {{ GREETING = \"{greeting}\" }}\n"),
            "component": base64::engine::general_purpose::STANDARD.encode(&hello),
        });
        let started = Instant::now();
        let (status, answer) = request(
            &client,
            "PUT",
            &format!("http://{}/v1/functions/hello", nodes[i % 3].node.admin),
            Some(body.to_string()),
        )
        .await?;
        if status != 200 {
            bail!("deploy answered {status}: {answer}");
        }
        for n in nodes
            .iter()
            .filter(|n| n.node.admin != nodes[i % 3].node.admin)
        {
            loop {
                let (status, text) = request(&client, "GET", &n.url("/hello"), None).await?;
                if status == 200 && text.trim() == greeting {
                    break;
                }
                if started.elapsed() > Duration::from_secs(30) {
                    bail!("the new version did not reach every node within 30 s");
                }
            }
        }
        propagation.push(started.elapsed().as_secs_f64());
    }
    println!("deploy propagation (request to every other node serving it):");
    let propagation_summary = summary("propagation", &propagation);

    // Failover, killed and stopped cleanly; a fresh node replaces each.
    let mut killed = Vec::new();
    for round in 0..args.rounds {
        killed.push(failover(&client, &mut nodes, &format!("killed{round}"), "KILL").await?);
        nodes.push(start_node(args, &manifest)?);
    }
    let mut left = Vec::new();
    for round in 0..args.rounds {
        left.push(failover(&client, &mut nodes, &format!("left{round}"), "TERM").await?);
        nodes.push(start_node(args, &manifest)?);
    }
    println!("failover (signal to the first reply from another node; default 4 s leases):");
    let killed_summary = summary("kill -9", &killed);
    let left_summary = summary("clean stop", &left);
    let results = serde_json::json!({
        "forwarding": bare,
        "forwarding_read": read,
        "actors_1000": {
            "one_node_per_s": one,
            "three_nodes_per_s": three,
            "per_node_efficiency": efficiency,
        },
        "deploy_propagation": propagation_summary,
        "failover_kill": killed_summary,
        "failover_clean_stop": left_summary,
    });
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_vec_pretty(&results)?)?;
    }
    drop(nodes);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
