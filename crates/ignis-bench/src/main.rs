//! `ignis-bench`: load generator and side-by-side peer benchmarks.
//!
//! ```text
//! ignis-bench hello-peers --ignis target/release/ignis --wasmtime wasmtime \
//!     --component examples/target/wasm32-wasip2/release/hello.wasm
//! ```
//! runs Ignis, `wasmtime serve` and a bare hyper server with the same hello
//! response, alternating in rounds within one run, and prints throughput
//! (closed loop) and open-loop latency with ratios.

use std::net::TcpListener as StdListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use ignis_bench::scenario::wait_ready;
use ignis_bench::{LoadSpec, Report, run};

#[derive(Parser)]
#[command(about = "Ignis load generator and peer benchmarks")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Serve a bare hyper "hello" (the no-WebAssembly baseline).
    HyperHello {
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: String,
    },
    /// Load one URL and print the report as JSON.
    Load {
        /// host:port
        #[arg(long)]
        addr: String,
        /// Request path.
        #[arg(long, default_value = "/")]
        path: String,
        /// Keep-alive connections.
        #[arg(long, default_value_t = 32)]
        connections: usize,
        /// Measured seconds.
        #[arg(long, default_value_t = 10.0)]
        seconds: f64,
        /// Open-loop rate (requests/s); closed loop when absent.
        #[arg(long, value_parser = ignis_bench::positive_rate)]
        rate: Option<f64>,
        /// A new connection for every request (new connections per second).
        #[arg(long)]
        reconnect: bool,
    },
    /// Ignis vs nginx as reverse proxies in front of the same origin
    /// (HTTP/1.1, HTTP/1.1 over TLS, HTTP/2 over TLS, new TLS connections).
    ProxyPeers(ignis_bench::proxy::Args),
    /// Deploy-to-first-request of a new version (same component, new
    /// component) against a restart, and memory after old versions drain.
    Deploy(ignis_bench::deploy::Args),
    /// Three cluster nodes on one PostgreSQL database: forwarding
    /// overhead, 1 vs 3 nodes, deploy propagation, failover.
    Cluster(ignis_bench::cluster::Args),
    /// Ignis vs `wasmtime serve` vs bare hyper on the same hello component.
    HelloPeers {
        /// The ignis binary.
        #[arg(long)]
        ignis: PathBuf,
        /// The wasmtime binary (wasmtime-cli 48).
        #[arg(long)]
        wasmtime: PathBuf,
        /// The hello component.
        #[arg(long)]
        component: PathBuf,
        /// Connections for the throughput runs.
        #[arg(long, default_value_t = 32)]
        connections: usize,
        /// Measured seconds per run.
        #[arg(long, default_value_t = 8.0)]
        seconds: f64,
        /// Rounds (peers alternate within each round).
        #[arg(long, default_value_t = 3)]
        rounds: usize,
        /// Open-loop rate for the latency runs; default: half of wasmtime's throughput.
        #[arg(long, value_parser = ignis_bench::positive_rate)]
        rate: Option<f64>,
        /// Write the JSON results here.
        #[arg(long)]
        json: Option<PathBuf>,
        /// Also run Ignis with `reuse = false` (a fresh instance per
        /// request), as a fourth peer: reuse against no reuse in one run.
        #[arg(long)]
        fresh: bool,
        /// Serve the first Ignis peer with `reuse = true` (instances kept
        /// between requests even for a WASI 0.2 component).
        #[arg(long)]
        reuse: bool,
        /// Also run two more Ignis peers: "quiet" (`access_log = false`,
        /// warnings only) and "observed" (access log written to a file,
        /// admin listener on and `/metrics` scraped every second): the
        /// cost of operations' observability.
        #[arg(long)]
        observed: bool,
        /// A workerd binary: also run workerd serving `--worker` (the same
        /// logic as a Cloudflare Worker) as a peer.
        #[arg(long, requires = "worker")]
        workerd: Option<PathBuf>,
        /// The Worker module (ES module with a `fetch` handler) for workerd.
        #[arg(long, requires = "workerd")]
        worker: Option<PathBuf>,
    },
}

fn free_port() -> anyhow::Result<u16> {
    Ok(StdListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

struct Peer {
    name: &'static str,
    child: Child,
    addr: String,
    path: &'static str,
}

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_peer(
    name: &'static str,
    cmd: &mut Command,
    addr: String,
    path: &'static str,
) -> anyhow::Result<Peer> {
    let child = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("starting {name}"))?;
    Ok(Peer {
        name,
        child,
        addr,
        path,
    })
}

/// A manifest serving `component` at every path; `extra` goes into its
/// function table (for example `reuse = false`).
fn ignis_manifest(
    dir: &Path,
    file: &str,
    component: &Path,
    extra: &str,
) -> anyhow::Result<PathBuf> {
    let manifest = dir.join(file);
    std::fs::write(
        &manifest,
        format!(
            "[server]\ncache_dir = \"{}\"\n[functions.hello]\ncomponent = \"{}\"\nmax_concurrency = 1000\n{extra}\n[[routes]]\npath = \"/...\"\nfunction = \"hello\"\n",
            dir.join("cache").display(),
            component.canonicalize()?.display()
        ),
    )?;
    Ok(manifest)
}

#[derive(serde::Serialize)]
struct PeerResult {
    name: &'static str,
    throughput: Vec<Report>,
    latency: Vec<Report>,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Which Ignis configurations `hello-peers` runs besides the default.
struct Variants {
    /// A fourth peer with `reuse = false`.
    fresh: bool,
    /// The first peer with `reuse = true`.
    reuse: bool,
    /// workerd and the Worker module it serves, as one more peer.
    workerd: Option<(PathBuf, PathBuf)>,
    /// The "quiet" and "observed" peers.
    observed: bool,
}

/// A workerd config serving the ES module `worker` on `port`.
fn workerd_config(dir: &Path, worker: &Path, port: u16) -> anyhow::Result<PathBuf> {
    std::fs::copy(worker, dir.join("worker.js"))
        .with_context(|| format!("copying {}", worker.display()))?;
    let config = dir.join("workerd.capnp");
    std::fs::write(
        &config,
        format!(
            r#"using Workerd = import "/workerd/workerd.capnp";
const config :Workerd.Config = (
  services = [ (name = "main", worker = .hello) ],
  sockets = [ (name = "http", address = "127.0.0.1:{port}", http = (), service = "main") ],
);
const hello :Workerd.Worker = (
  modules = [ (name = "worker.js", esModule = embed "worker.js") ],
  compatibilityDate = "2024-09-01",
);
"#
        ),
    )?;
    Ok(config)
}

#[allow(clippy::too_many_arguments)]
async fn hello_peers(
    ignis: &Path,
    wasmtime: &Path,
    component: &Path,
    connections: usize,
    seconds: f64,
    rounds: usize,
    rate: Option<f64>,
    json: Option<&Path>,
    variants: Variants,
) -> anyhow::Result<()> {
    // Create the report's directory now, not after minutes of measuring.
    if let Some(parent) = json
        .and_then(Path::parent)
        .filter(|p| !p.as_os_str().is_empty())
    {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("creating {} for the JSON report", parent.display()))?;
    }
    let dir = std::env::temp_dir().join(format!("ignis-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    // An `ignis serve` peer of `component` with `extra` in its function.
    let ignis_peer = |name: &'static str, file: &str, extra: &str| -> anyhow::Result<Peer> {
        let manifest = ignis_manifest(&dir, file, component, extra)?;
        let port = free_port()?;
        start_peer(
            name,
            Command::new(ignis)
                .arg("serve")
                .arg(&manifest)
                .args(["--listen", &format!("127.0.0.1:{port}")])
                .env("IGNIS_LOG", "warn"),
            format!("127.0.0.1:{port}"),
            "/hello",
        )
    };
    let extra = if variants.reuse { "reuse = true" } else { "" };
    let (pw, ph) = (free_port()?, free_port()?);
    let me = std::env::current_exe()?;
    let mut peers = vec![
        ignis_peer("ignis", "ignis.toml", extra)?,
        start_peer(
            "wasmtime serve",
            Command::new(wasmtime)
                .args(["serve", "-Scli", "--addr", &format!("127.0.0.1:{pw}")])
                .arg(component),
            format!("127.0.0.1:{pw}"),
            "/hello",
        )?,
        start_peer(
            "bare hyper",
            Command::new(me).args(["hyper-hello", "--listen", &format!("127.0.0.1:{ph}")]),
            format!("127.0.0.1:{ph}"),
            "/hello",
        )?,
    ];
    if variants.fresh {
        peers.push(ignis_peer("ignis (fresh)", "fresh.toml", "reuse = false")?);
    }
    let mut scraper = None;
    if variants.observed {
        let quiet = ignis_manifest(&dir, "quiet.toml", component, "")?;
        let text = std::fs::read_to_string(&quiet)?.replacen(
            "[server]\n",
            "[server]\naccess_log = false\n",
            1,
        );
        std::fs::write(&quiet, text)?;
        let port = free_port()?;
        peers.push(start_peer(
            "ignis (quiet)",
            Command::new(ignis)
                .arg("serve")
                .arg(&quiet)
                .args(["--listen", &format!("127.0.0.1:{port}")])
                .env("IGNIS_LOG", "warn"),
            format!("127.0.0.1:{port}"),
            "/hello",
        )?);
        let observed = ignis_manifest(&dir, "observed.toml", component, "")?;
        let (port, admin) = (free_port()?, free_port()?);
        let log = std::fs::File::create(dir.join("observed.log"))?;
        let child = Command::new(ignis)
            .arg("serve")
            .arg(&observed)
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .args(["--admin-listen", &format!("127.0.0.1:{admin}")])
            .env("IGNIS_LOG", "info")
            .env("IGNIS_ADMIN_TOKEN", OBSERVED_TOKEN)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("starting ignis (observed)")?;
        peers.push(Peer {
            name: "ignis (observed)",
            child,
            addr: format!("127.0.0.1:{port}"),
            path: "/hello",
        });
        scraper = Some(tokio::spawn(scrape_every_second(format!(
            "127.0.0.1:{admin}"
        ))));
    }
    if let Some((workerd, worker)) = &variants.workerd {
        let port = free_port()?;
        let config = workerd_config(&dir, worker, port)?;
        peers.push(start_peer(
            "workerd",
            Command::new(workerd).arg("serve").arg(config),
            format!("127.0.0.1:{port}"),
            "/hello",
        )?);
    }
    for p in &peers {
        wait_ready(&p.addr, p.path).await.with_context(|| p.name)?;
    }
    let mut results: Vec<PeerResult> = peers
        .iter()
        .map(|p| PeerResult {
            name: p.name,
            throughput: vec![],
            latency: vec![],
        })
        .collect();
    let duration = Duration::from_secs_f64(seconds);
    for round in 0..rounds {
        for (i, p) in peers.iter().enumerate() {
            let spec = LoadSpec {
                addr: p.addr.clone(),
                path: p.path.to_string(),
                connections,
                duration,
                warmup: Duration::from_secs(1),
                rate: None,
                ..LoadSpec::new("", "", 0, Duration::ZERO)
            };
            let r = run(&spec).await;
            eprintln!(
                "round {round} {:>15}: {:>9.0} req/s, statuses {:?}, io errors {}",
                p.name, r.throughput, r.statuses, r.io_errors
            );
            results[i].throughput.push(r);
        }
    }
    let wasmtime_tput = median(results[1].throughput.iter().map(|r| r.throughput).collect());
    let rate = rate.unwrap_or((wasmtime_tput / 2.0).floor().max(100.0));
    for round in 0..rounds {
        for (i, p) in peers.iter().enumerate() {
            let spec = LoadSpec {
                addr: p.addr.clone(),
                path: p.path.to_string(),
                connections: 16,
                duration,
                warmup: Duration::from_secs(1),
                rate: Some(rate),
                ..LoadSpec::new("", "", 0, Duration::ZERO)
            };
            let r = run(&spec).await;
            eprintln!(
                "round {round} {:>15}: open loop {rate:.0}/s p50 {} us p99 {} us p99.9 {} us, unfinished {}",
                p.name, r.latency_us.p50, r.latency_us.p99, r.latency_us.p999, r.unfinished
            );
            results[i].latency.push(r);
        }
    }
    println!(
        "| peer | throughput (req/s, median of {rounds}) | open-loop {rate:.0} req/s: p50 / p99 / p99.9 (us, median) | errors |"
    );
    println!("| --- | --- | --- | --- |");
    let mut medians = vec![];
    for r in &results {
        let t = median(r.throughput.iter().map(|x| x.throughput).collect());
        let p50 = median(r.latency.iter().map(|x| x.latency_us.p50 as f64).collect());
        let p99 = median(r.latency.iter().map(|x| x.latency_us.p99 as f64).collect());
        let p999 = median(r.latency.iter().map(|x| x.latency_us.p999 as f64).collect());
        let errors: u64 = r
            .throughput
            .iter()
            .chain(&r.latency)
            .map(|x| {
                x.io_errors
                    + x.unfinished
                    + x.statuses
                        .iter()
                        .filter(|(s, _)| **s != 200)
                        .map(|(_, n)| n)
                        .sum::<u64>()
            })
            .sum();
        println!(
            "| {} | {t:.0} | {p50:.0} / {p99:.0} / {p999:.0} | {errors} |",
            r.name
        );
        medians.push((t, p99));
    }
    println!();
    println!(
        "- throughput Ignis / wasmtime serve: {:.2}",
        medians[0].0 / medians[1].0
    );
    println!(
        "- throughput Ignis / bare hyper: {:.2}",
        medians[0].0 / medians[2].0
    );
    println!(
        "- p99 Ignis / wasmtime serve at {rate:.0} req/s: {:.2}",
        medians[0].1 / medians[1].1
    );
    if let Some(i) = results.iter().position(|r| r.name == "workerd") {
        println!(
            "- throughput Ignis / workerd: {:.2}",
            medians[0].0 / medians[i].0
        );
    }
    if let Some(fresh) = results
        .iter()
        .position(|r| r.name == "ignis (fresh)")
        .map(|i| medians[i])
    {
        println!(
            "- throughput Ignis / Ignis (fresh): {:.2}; Ignis (fresh) / wasmtime serve: {:.2}",
            medians[0].0 / fresh.0,
            fresh.0 / medians[1].0
        );
    }
    if let (Some(quiet), Some(observed)) = (
        results.iter().position(|r| r.name == "ignis (quiet)"),
        results.iter().position(|r| r.name == "ignis (observed)"),
    ) {
        println!(
            "- throughput Ignis (observed) / Ignis (quiet): {:.3}; p99 observed / quiet: {:.2}",
            medians[observed].0 / medians[quiet].0,
            medians[observed].1 / medians[quiet].1
        );
    }
    if let Some(scraper) = scraper {
        scraper.abort();
    }
    if let Some(path) = json {
        std::fs::write(path, serde_json::to_vec_pretty(&results)?)
            .with_context(|| format!("writing the JSON report to {}", path.display()))?;
    }
    drop(peers);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// The admin token of the "observed" peer.
const OBSERVED_TOKEN: &str = "bench-observed-token-0123456789";

/// Scrapes `/metrics` on `admin` every second, as Prometheus would, until
/// aborted; a failed scrape is reported once.
async fn scrape_every_second(admin: String) {
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<http_body_util::Empty<bytes::Bytes>>();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut reported = false;
    loop {
        tick.tick().await;
        let req = http::Request::get(format!("http://{admin}/metrics"))
            .header("authorization", format!("Bearer {OBSERVED_TOKEN}"))
            .body(http_body_util::Empty::new())
            .expect("a valid request");
        let ok = match client.request(req).await {
            Ok(resp) => {
                let ok = resp.status() == 200;
                let _ = http_body_util::BodyExt::collect(resp.into_body()).await;
                ok
            }
            Err(_) => false,
        };
        if !ok && !reported {
            eprintln!("scraping http://{admin}/metrics failed");
            reported = true;
        }
    }
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        match cli.command {
            Cmd::ProxyPeers(args) => ignis_bench::proxy::proxy_peers(args).await,
            Cmd::Deploy(args) => ignis_bench::deploy::run(&args).await,
            Cmd::Cluster(args) => ignis_bench::cluster::run(&args).await,
            Cmd::HyperHello { listen } => {
                let listener = tokio::net::TcpListener::bind(&listen).await?;
                println!("listening on http://{}", listener.local_addr()?);
                ignis_bench::hello::serve(listener).await
            }
            Cmd::Load {
                addr,
                path,
                connections,
                seconds,
                rate,
                reconnect,
            } => {
                let spec = LoadSpec {
                    addr,
                    path,
                    connections,
                    duration: Duration::from_secs_f64(seconds),
                    warmup: Duration::from_secs(1),
                    rate,
                    reconnect,
                    ..LoadSpec::new("", "", 0, Duration::ZERO)
                };
                println!("{}", serde_json::to_string_pretty(&run(&spec).await)?);
                Ok(())
            }
            Cmd::HelloPeers {
                ignis,
                wasmtime,
                component,
                connections,
                seconds,
                rounds,
                rate,
                json,
                fresh,
                reuse,
                observed,
                workerd,
                worker,
            } => {
                hello_peers(
                    &ignis,
                    &wasmtime,
                    &component,
                    connections,
                    seconds,
                    rounds,
                    rate,
                    json.as_deref(),
                    Variants {
                        fresh,
                        reuse,
                        workerd: workerd.zip(worker),
                        observed,
                    },
                )
                .await
            }
        }
    })
}
