//! `ignis-bench deploy`: how long a new version takes to serve, against
//! its peer (a restart), and what memory an old version gives back.
//!
//! One node (`ignis serve`, admin API on) serves a hello component. Then:
//! - **table deploys**: the same component with a new table (an
//!   environment value the guest prints): the compile cache hits, so this
//!   is the swap itself (parse, link, first instantiation, swap);
//! - **component deploys**: the component with a custom section appended
//!   (new bytes, new SHA-256: a full compile);
//! - **restarts** (the peers: what a change costs without hot deploy):
//!   stop the node (SIGTERM, wait), start it again until its first 200: on
//!   the same manifest (warm compile cache: the peer of a table deploy),
//!   and on a new component (a compile: the peer of a component deploy).
//!
//! Each deploy's time runs from sending the `PUT` to the first response
//! of the new version (polled right after the answer). Memory: the node's
//! resident set after start and after each component deploy (every old
//! version drained: hello requests end at once); a leak grows with every
//! deploy, allocator retention levels off.

use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

pub(crate) const TOKEN: &str = "bench-admin-token-0123456789";

/// Command-line arguments.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The ignis binary.
    #[arg(long)]
    pub ignis: PathBuf,
    /// The hello component.
    #[arg(long)]
    pub component: PathBuf,
    /// Deploys of each kind (and restarts: a quarter of this, at least 3).
    #[arg(long, default_value_t = 20)]
    pub deploys: usize,
    /// Write the JSON results here.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

pub(crate) struct Node {
    pub(crate) child: Child,
    pub(crate) http: String,
    pub(crate) admin: String,
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start(ignis: &Path, manifest: &Path) -> anyhow::Result<Node> {
    start_with(ignis, manifest, &[])
}

/// `ignis serve manifest` on free ports with the admin API on, and
/// `extra` arguments; returns once it announced its listeners.
pub(crate) fn start_with(ignis: &Path, manifest: &Path, extra: &[&str]) -> anyhow::Result<Node> {
    let mut child = Command::new(ignis)
        .args(["serve"])
        .arg(manifest)
        .args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
        .args(extra)
        .env("IGNIS_ADMIN_TOKEN", TOKEN)
        .env("IGNIS_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .context("starting ignis")?;
    let mut out = std::io::BufReader::new(child.stdout.take().expect("piped"));
    let (mut http, mut admin) = (None, None);
    while http.is_none() || admin.is_none() {
        let mut line = String::new();
        if out.read_line(&mut line)? == 0 {
            bail!("ignis exited before announcing its listeners");
        }
        if let Some(a) = line.trim().strip_prefix("listening on http://") {
            http = Some(a.to_string());
        }
        if let Some(a) = line.trim().strip_prefix("admin on http://") {
            admin = Some(a.to_string());
        }
    }
    // Keep reading stdout so the node never blocks on a full pipe.
    std::thread::spawn(move || for _ in out.lines() {});
    Ok(Node {
        child,
        http: http.expect("read"),
        admin: admin.expect("read"),
    })
}

/// The resident set of process `pid`, bytes (Linux).
fn rss(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .context("no VmRSS")?;
    Ok(kb * 1024)
}

pub(crate) type HttpClient =
    Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>;

pub(crate) async fn request(
    client: &HttpClient,
    method: &str,
    url: &str,
    body: Option<String>,
) -> anyhow::Result<(u16, String)> {
    let mut req = http::Request::builder().method(method).uri(url);
    if body.is_some() {
        req = req.header("authorization", format!("Bearer {TOKEN}"));
    }
    let req = req.body(Full::new(Bytes::from(body.unwrap_or_default())))?;
    let resp = client.request(req).await?;
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await?.to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

/// `bytes` with a custom section named `ignis-bench` holding `n` appended:
/// the same program, a different SHA-256 (the compile cache misses).
fn with_custom_section(bytes: &[u8], n: usize) -> Vec<u8> {
    fn leb(mut v: usize, out: &mut Vec<u8>) {
        loop {
            let byte = (v & 0x7f) as u8;
            v >>= 7;
            if v == 0 {
                out.push(byte);
                return;
            }
            out.push(byte | 0x80);
        }
    }
    let name = b"ignis-bench";
    let payload = n.to_le_bytes();
    let mut content = Vec::new();
    leb(name.len(), &mut content);
    content.extend_from_slice(name);
    content.extend_from_slice(&payload);
    let mut out = bytes.to_vec();
    out.push(0);
    leb(content.len(), &mut out);
    out.extend_from_slice(&content);
    out
}

/// Deploys `component` with GREETING=`greeting`; returns the seconds from
/// the request to the first answer of the new version.
async fn deploy(
    client: &HttpClient,
    node: &Node,
    component: &[u8],
    greeting: &str,
) -> anyhow::Result<f64> {
    use base64::Engine as _;
    let body = serde_json::json!({
        "config": format!("max_concurrency = 1000\nenv = {{ GREETING = \"{greeting}\" }}\n"),
        "component": base64::engine::general_purpose::STANDARD.encode(component),
    });
    let started = Instant::now();
    let (status, answer) = request(
        client,
        "PUT",
        &format!("http://{}/v1/functions/hello", node.admin),
        Some(body.to_string()),
    )
    .await?;
    if status != 200 {
        bail!("deploy answered {status}: {answer}");
    }
    loop {
        let (status, text) =
            request(client, "GET", &format!("http://{}/hello", node.http), None).await?;
        if status == 200 && text.trim() == greeting {
            return Ok(started.elapsed().as_secs_f64());
        }
        if started.elapsed() > Duration::from_secs(60) {
            bail!("the new version did not answer within 60 s (last: {status} {text:?})");
        }
    }
}

/// Starts a node on `manifest` and returns the seconds until its first
/// 200; then stops it.
async fn restart(ignis: &Path, manifest: &Path, client: &HttpClient) -> anyhow::Result<f64> {
    let started = Instant::now();
    let node = start(ignis, manifest)?;
    loop {
        let r = request(client, "GET", &format!("http://{}/hello", node.http), None).await;
        if matches!(r, Ok((200, _))) {
            break;
        }
        if started.elapsed() > Duration::from_secs(60) {
            bail!("the restarted node did not answer within 60 s");
        }
    }
    let took = started.elapsed().as_secs_f64();
    let _ = Command::new("kill")
        .args(["-TERM", &node.child.id().to_string()])
        .status();
    Ok(took)
}

pub(crate) fn percentile(v: &[f64], p: f64) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

pub(crate) fn summary(name: &str, v: &[f64]) -> serde_json::Value {
    println!(
        "{name:<18} n={:<3} p50 {:>8.2} ms   p99 {:>8.2} ms   max {:>8.2} ms",
        v.len(),
        percentile(v, 0.5) * 1e3,
        percentile(v, 0.99) * 1e3,
        percentile(v, 1.0) * 1e3
    );
    serde_json::json!({
        "n": v.len(),
        "p50_ms": percentile(v, 0.5) * 1e3,
        "p99_ms": percentile(v, 0.99) * 1e3,
        "max_ms": percentile(v, 1.0) * 1e3,
        "samples_ms": v.iter().map(|s| s * 1e3).collect::<Vec<_>>(),
    })
}

/// Runs the benchmark and prints the figures.
pub async fn run(args: &Args) -> anyhow::Result<()> {
    let dir = std::env::temp_dir().join(format!("ignis-bench-deploy-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let component = std::fs::read(&args.component)
        .with_context(|| format!("reading {}", args.component.display()))?;
    let manifest = dir.join("ignis.toml");
    std::fs::write(
        &manifest,
        format!(
            "[server]\ncache_dir = \"{}\"\n[functions.hello]\ncomponent = \"{}\"\nmax_concurrency = 1000\n[[routes]]\npath = \"/hello\"\nfunction = \"hello\"\n",
            dir.join("cache").display(),
            args.component.canonicalize()?.display()
        ),
    )?;
    let client: HttpClient = Client::builder(TokioExecutor::new()).build_http();

    let node = start(&args.ignis, &manifest)?;
    request(&client, "GET", &format!("http://{}/hello", node.http), None).await?;
    let pid = node.child.id();
    let rss_start = rss(pid)?;

    let mut table = Vec::new();
    for i in 0..args.deploys {
        table.push(deploy(&client, &node, &component, &format!("table-{i}")).await?);
    }
    let mut compiled = Vec::new();
    let mut rss_each = Vec::new();
    for i in 0..args.deploys {
        let bytes = with_custom_section(&component, i);
        compiled.push(deploy(&client, &node, &bytes, &format!("component-{i}")).await?);
        rss_each.push(rss(pid)?);
    }
    let rss_after = rss(pid)?;
    drop(node);

    // The peers: restarts on the same manifest (compile cache warm), and
    // on a new component each time (compiled at start).
    let restarts_n = (args.deploys / 4).max(3);
    let mut restarts = Vec::new();
    let mut restarts_compiled = Vec::new();
    let fresh = dir.join("fresh.wasm");
    let fresh_manifest = dir.join("fresh.toml");
    std::fs::write(
        &fresh_manifest,
        std::fs::read_to_string(&manifest)?.replace(
            &args.component.canonicalize()?.display().to_string(),
            &fresh.display().to_string(),
        ),
    )?;
    for i in 0..restarts_n {
        restarts.push(restart(&args.ignis, &manifest, &client).await?);
        std::fs::write(&fresh, with_custom_section(&component, 1000 + i))?;
        restarts_compiled.push(restart(&args.ignis, &fresh_manifest, &client).await?);
    }

    println!("deploy to first request of the new version:");
    let half = rss_each[rss_each.len() / 2 - 1];
    let results = serde_json::json!({
        "table_deploy": summary("table (cache hit)", &table),
        "restart_peer": summary("restart, same", &restarts),
        "component_deploy": summary("component (compile)", &compiled),
        "restart_compile_peer": summary("restart, new comp.", &restarts_compiled),
        "ratio_table_to_restart_p50": percentile(&table, 0.5) / percentile(&restarts, 0.5),
        "ratio_component_to_restart_p50": percentile(&compiled, 0.5) / percentile(&restarts_compiled, 0.5),
        "rss_start_bytes": rss_start,
        "rss_after_deploys_bytes": rss_after,
        "rss_after_each_component_deploy_bytes": rss_each,
        "rss_growth_first_half_per_deploy_bytes": (half as f64 - rss_start as f64) / (args.deploys / 2) as f64,
        "rss_growth_second_half_per_deploy_bytes": (rss_after as f64 - half as f64) / (args.deploys - args.deploys / 2) as f64,
    });
    let figure = |key: &str| results[key].as_f64().unwrap_or(0.0);
    println!(
        "ratios (p50): table deploy / restart {:.3}, component deploy / restart with a new component {:.3}",
        figure("ratio_table_to_restart_p50"),
        figure("ratio_component_to_restart_p50")
    );
    println!(
        "memory growth per component deploy: first half {:+.0} KiB, second half {:+.0} KiB",
        figure("rss_growth_first_half_per_deploy_bytes") / 1024.0,
        figure("rss_growth_second_half_per_deploy_bytes") / 1024.0
    );
    println!(
        "memory: RSS {:.1} MiB at start, {:.1} MiB after {} table and {} component deploys ({:+.0} KiB per component deploy)",
        rss_start as f64 / (1 << 20) as f64,
        rss_after as f64 / (1 << 20) as f64,
        args.deploys,
        args.deploys,
        (rss_after as f64 - rss_start as f64) / args.deploys as f64 / 1024.0
    );
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_vec_pretty(&results)?)?;
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
