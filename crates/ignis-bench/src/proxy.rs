//! Ignis as a reverse proxy against nginx, in front of the same origin, in
//! one run (`ignis-bench proxy-peers`, `scripts/bench-proxy.sh`).
//!
//! The origin is this binary's bare hyper hello. Ignis proxies it through
//! an `[upstreams]` route; nginx (the Debian package) through an `upstream`
//! block with the same keep-alive pool (64 idle connections), as many
//! worker processes as Ignis has runtime threads (one per CPU), access logs
//! off, and the same forwarding headers (`X-Forwarded-For`,
//! `X-Forwarded-Proto`). Both listen on plain HTTP and on TLS (the same
//! self-signed certificate from `ignis cert`, HTTP/2 and HTTP/1.1 by ALPN).
//!
//! Per transport (HTTP/1.1, HTTP/1.1 over TLS, HTTP/2 over TLS), in rounds
//! that alternate the peers A B B A: closed-loop throughput with the CPU
//! time the proxy's processes used (so CPU per request), then open-loop
//! latency at one rate both sustain (half the slower peer's median
//! throughput), corrected for coordinated omission. Then new TLS
//! connections per second (a full handshake, one request, close).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use serde::Serialize;
use tokio_rustls::rustls;

use crate::scenario::wait_ready;
use crate::{LoadSpec, Report, run};

/// What to run.
#[derive(clap::Args)]
pub struct Args {
    /// The ignis binary.
    #[arg(long)]
    pub ignis: PathBuf,
    /// The nginx binary.
    #[arg(long, default_value = "/usr/sbin/nginx")]
    pub nginx: PathBuf,
    /// Request loops for the throughput runs.
    #[arg(long, default_value_t = 32)]
    pub connections: usize,
    /// Measured seconds per run.
    #[arg(long, default_value_t = 5.0)]
    pub seconds: f64,
    /// Rounds (peers alternate A B, B A).
    #[arg(long, default_value_t = 4)]
    pub rounds: usize,
    /// Write the JSON results here.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

/// A server process (and, for nginx, its workers), stopped on drop.
struct Server {
    name: &'static str,
    child: Child,
    plain: String,
    tls: String,
}

impl Drop for Server {
    /// SIGTERM first, then SIGKILL after 5 s: nginx's master stops its
    /// workers on SIGTERM, while a SIGKILL left them running orphaned,
    /// each taking about 1% of a core for the rest of the machine's
    /// measurements.
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while std::time::Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Server {
    /// CPU seconds used so far by the process and its children.
    fn cpu_seconds(&self) -> f64 {
        let root = self.child.id();
        let mut pids = vec![root];
        if let Ok(entries) = std::fs::read_dir("/proc") {
            for e in entries.flatten() {
                let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
                    continue;
                };
                if stat_fields(pid).is_some_and(|f| f.0 == root) {
                    pids.push(pid);
                }
            }
        }
        let ticks: u64 = pids
            .iter()
            .filter_map(|&p| stat_fields(p))
            .map(|f| f.1)
            .sum();
        ticks as f64 / 100.0
    }
}

/// `(parent pid, utime + stime in clock ticks)` from `/proc/PID/stat`.
fn stat_fields(pid: u32) -> Option<(u32, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &text[text.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split(' ').collect();
    // After the command: state(0) ppid(1) ... utime(11) stime(12).
    Some((
        f.get(1)?.parse().ok()?,
        f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?,
    ))
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// One transport's load settings.
#[derive(Clone, Copy, Serialize)]
enum Transport {
    #[serde(rename = "http1")]
    Http1,
    #[serde(rename = "http1-tls")]
    Http1Tls,
    #[serde(rename = "h2-tls")]
    H2Tls,
}

impl Transport {
    fn name(self) -> &'static str {
        match self {
            Transport::Http1 => "HTTP/1.1",
            Transport::Http1Tls => "HTTP/1.1 over TLS",
            Transport::H2Tls => "HTTP/2 over TLS",
        }
    }
}

#[derive(Serialize, Default)]
struct PeerRuns {
    throughput: Vec<Report>,
    cpu_us_per_request: Vec<f64>,
    latency: Vec<Report>,
}

#[derive(Serialize)]
struct TransportResult {
    transport: Transport,
    rate: f64,
    ignis: PeerRuns,
    nginx: PeerRuns,
}

#[derive(Serialize)]
struct Results {
    transports: Vec<TransportResult>,
    handshakes_ignis: Vec<f64>,
    handshakes_nginx: Vec<f64>,
    nginx_version: String,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// The origin (this binary's bare hyper hello) with Ignis's reverse proxy
/// and nginx in front of it, all answering; stopped on drop.
pub(crate) struct Relays {
    origin: Server,
    ignis: Server,
    nginx: Server,
    cert: PathBuf,
}

impl Relays {
    /// Starts the three in `dir` (a certificate from `ignis cert` for the
    /// TLS listeners; nginx with `workers` worker processes) and waits
    /// until each answers `/hello`.
    pub(crate) async fn start(
        ignis: &Path,
        nginx: &Path,
        dir: &Path,
        workers: usize,
    ) -> anyhow::Result<Relays> {
        std::fs::create_dir_all(dir)?;
        let status = Command::new(ignis)
            .args(["cert", "--host", "localhost", "--out"])
            .arg(dir.join("tls"))
            .stdout(Stdio::null())
            .status()
            .context("running ignis cert")?;
        if !status.success() {
            bail!("ignis cert failed");
        }
        let (cert, key) = (dir.join("tls/cert.pem"), dir.join("tls/key.pem"));
        let origin_port = free_port()?;
        let origin = Server {
            name: "origin",
            child: Command::new(std::env::current_exe()?)
                .args([
                    "hyper-hello",
                    "--listen",
                    &format!("127.0.0.1:{origin_port}"),
                ])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .context("starting the origin")?,
            plain: format!("127.0.0.1:{origin_port}"),
            tls: String::new(),
        };
        wait_ready(&origin.plain, "/hello").await?;
        let ignis = start_ignis(ignis, dir, origin_port, &cert, &key)?;
        let nginx = start_nginx(nginx, dir, origin_port, &cert, &key, workers)?;
        for s in [&ignis, &nginx] {
            wait_ready(&s.plain, "/hello")
                .await
                .with_context(|| s.name)?;
        }
        Ok(Relays {
            origin,
            ignis,
            nginx,
            cert,
        })
    }

    /// Plain HTTP addresses: the origin, Ignis in front of it, nginx in
    /// front of it.
    pub(crate) fn plain(&self) -> [&str; 3] {
        [&self.origin.plain, &self.ignis.plain, &self.nginx.plain]
    }
}

/// Runs the comparison and prints the table.
pub async fn proxy_peers(args: Args) -> anyhow::Result<()> {
    let dir = std::env::temp_dir().join(format!("ignis-bench-proxy-{}", std::process::id()));
    let workers = std::thread::available_parallelism().map_or(2, |n| n.get());
    let relays = Relays::start(&args.ignis, &args.nginx, &dir, workers).await?;
    let (ignis, nginx, cert) = (&relays.ignis, &relays.nginx, &relays.cert);
    let nginx_version = Command::new(&args.nginx)
        .arg("-v")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stderr).trim().to_string())
        .unwrap_or_default();

    let tls = client_tls(cert)?;
    let spec_for = |server: &Server, transport: Transport, rate: Option<f64>| {
        let (addr, h2) = match transport {
            Transport::Http1 => (&server.plain, false),
            Transport::Http1Tls => (&server.tls, false),
            Transport::H2Tls => (&server.tls, true),
        };
        let mut spec = LoadSpec::new(
            addr,
            "/hello",
            args.connections,
            Duration::from_secs_f64(args.seconds),
        );
        spec.rate = rate;
        if !matches!(transport, Transport::Http1) {
            spec.tls = Some(if h2 { tls.1.clone() } else { tls.0.clone() });
        }
        spec.h2 = h2;
        spec.h2_connections = 4;
        spec
    };

    let servers = [ignis, nginx];
    let mut transports = Vec::new();
    for transport in [Transport::Http1, Transport::Http1Tls, Transport::H2Tls] {
        let mut runs = [PeerRuns::default(), PeerRuns::default()];
        for round in 0..args.rounds {
            let order: [usize; 2] = if round % 2 == 0 { [0, 1] } else { [1, 0] };
            for i in order {
                let server = servers[i];
                let cpu = server.cpu_seconds();
                let r = run(&spec_for(server, transport, None)).await;
                let used = server.cpu_seconds() - cpu;
                // CPU over the warm-up and the window, per request in both.
                let requests = r.throughput * (args.seconds + 1.0);
                let per = used * 1e6 / requests.max(1.0);
                eprintln!(
                    "{} round {round} {:>5}: {:>8.0} req/s, {per:.1} us CPU/request, statuses {:?}, io errors {}",
                    transport.name(),
                    server.name,
                    r.throughput,
                    r.statuses,
                    r.io_errors
                );
                runs[i].cpu_us_per_request.push(per);
                runs[i].throughput.push(r);
            }
        }
        let slower = runs
            .iter()
            .map(|r| median(r.throughput.iter().map(|t| t.throughput).collect()))
            .fold(f64::INFINITY, f64::min);
        let rate = (slower / 2.0).max(100.0);
        for round in 0..args.rounds {
            let order: [usize; 2] = if round % 2 == 0 { [0, 1] } else { [1, 0] };
            for i in order {
                let r = run(&spec_for(servers[i], transport, Some(rate))).await;
                eprintln!(
                    "{} round {round} {:>5}: open loop {rate:.0}/s p50 {} us p99 {} us p99.9 {} us, unfinished {}",
                    transport.name(),
                    servers[i].name,
                    r.latency_us.p50,
                    r.latency_us.p99,
                    r.latency_us.p999,
                    r.unfinished
                );
                runs[i].latency.push(r);
            }
        }
        let [ignis_runs, nginx_runs] = runs;
        transports.push(TransportResult {
            transport,
            rate,
            ignis: ignis_runs,
            nginx: nginx_runs,
        });
    }

    // New TLS connections per second: handshake, one request, close.
    let mut handshakes = [Vec::new(), Vec::new()];
    for round in 0..args.rounds {
        let order: [usize; 2] = if round % 2 == 0 { [0, 1] } else { [1, 0] };
        for i in order {
            let mut spec = spec_for(servers[i], Transport::Http1Tls, None);
            spec.connections = 16;
            spec.reconnect = true;
            let r = run(&spec).await;
            eprintln!(
                "new TLS connections round {round} {:>5}: {:>7.0}/s, io errors {}",
                servers[i].name, r.throughput, r.io_errors
            );
            handshakes[i].push(r.throughput);
        }
    }
    let [handshakes_ignis, handshakes_nginx] = handshakes;
    let results = Results {
        transports,
        handshakes_ignis,
        handshakes_nginx,
        nginx_version,
    };
    print_table(&results);
    if let Some(path) = &args.json {
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::write(path, serde_json::to_string_pretty(&results)?)?;
        println!("raw results: {}", path.display());
    }
    Ok(())
}

fn print_table(r: &Results) {
    println!(
        "\nIgnis vs {} as a reverse proxy (medians over rounds)\n",
        r.nginx_version
    );
    println!(
        "| transport | throughput Ignis / nginx (req/s) | ratio | p50 / p99 / p99.9 Ignis (us) | p50 / p99 / p99.9 nginx (us) | p99 ratio | CPU/request Ignis / nginx (us) |"
    );
    println!("| --- | --- | --- | --- | --- | --- | --- |");
    for t in &r.transports {
        let thr = |p: &PeerRuns| median(p.throughput.iter().map(|x| x.throughput).collect());
        let pct = |p: &PeerRuns, f: fn(&Report) -> u64| {
            median(p.latency.iter().map(|x| f(x) as f64).collect())
        };
        let cpu = |p: &PeerRuns| median(p.cpu_us_per_request.clone());
        let (ti, tn) = (thr(&t.ignis), thr(&t.nginx));
        let p = |p: &PeerRuns| {
            (
                pct(p, |x| x.latency_us.p50),
                pct(p, |x| x.latency_us.p99),
                pct(p, |x| x.latency_us.p999),
            )
        };
        let (pi, pn) = (p(&t.ignis), p(&t.nginx));
        println!(
            "| {} | {ti:.0} / {tn:.0} | {:.2} | {:.0} / {:.0} / {:.0} at {:.0}/s | {:.0} / {:.0} / {:.0} | {:.2} | {:.1} / {:.1} |",
            t.transport.name(),
            ti / tn,
            pi.0,
            pi.1,
            pi.2,
            t.rate,
            pn.0,
            pn.1,
            pn.2,
            pi.1 / pn.1,
            cpu(&t.ignis),
            cpu(&t.nginx),
        );
    }
    let (hi, hn) = (
        median(r.handshakes_ignis.clone()),
        median(r.handshakes_nginx.clone()),
    );
    println!(
        "| new TLS connections (handshake + 1 request) | {hi:.0} / {hn:.0} per s | {:.2} | | | | |",
        hi / hn
    );
}

/// TLS client settings trusting `cert` (HTTP/1.1 only, and h2 + HTTP/1.1),
/// without session resumption so every connection is a full handshake.
fn client_tls(
    cert: &Path,
) -> anyhow::Result<(Arc<rustls::ClientConfig>, Arc<rustls::ClientConfig>)> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(cert)? {
        roots.add(c?)?;
    }
    let make = |alpn: Vec<Vec<u8>>| {
        let mut c = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("ring supports the defaults")
        .with_root_certificates(roots.clone())
        .with_no_client_auth();
        c.alpn_protocols = alpn;
        c.resumption = rustls::client::Resumption::disabled();
        Arc::new(c)
    };
    Ok((
        make(vec![b"http/1.1".to_vec()]),
        make(vec![b"h2".to_vec(), b"http/1.1".to_vec()]),
    ))
}

fn start_ignis(
    ignis: &Path,
    dir: &Path,
    origin: u16,
    cert: &Path,
    key: &Path,
) -> anyhow::Result<Server> {
    let (plain, tls) = (free_port()?, free_port()?);
    let manifest = dir.join("ignis.toml");
    std::fs::write(
        &manifest,
        format!(
            "[server]\nlisten = \"127.0.0.1:{plain}\"\ncache_dir = \"{cache}\"\n\
             [tls]\nlisten = \"127.0.0.1:{tls}\"\ncert = \"{cert}\"\nkey = \"{key}\"\n\
             [upstreams.origin]\norigins = [\"http://127.0.0.1:{origin}\"]\npool_size = 64\n\
             [[routes]]\npath = \"/...\"\nupstream = \"origin\"\n",
            cache = dir.join("cache").display(),
            cert = cert.display(),
            key = key.display(),
        ),
    )?;
    let child = Command::new(ignis)
        .arg("serve")
        .arg(&manifest)
        .env("IGNIS_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting ignis")?;
    Ok(Server {
        name: "ignis",
        child,
        plain: format!("127.0.0.1:{plain}"),
        tls: format!("127.0.0.1:{tls}"),
    })
}

fn start_nginx(
    nginx: &Path,
    dir: &Path,
    origin: u16,
    cert: &Path,
    key: &Path,
    workers: usize,
) -> anyhow::Result<Server> {
    let (plain, tls) = (free_port()?, free_port()?);
    let prefix = dir.join("nginx");
    std::fs::create_dir_all(prefix.join("logs"))?;
    let conf = prefix.join("nginx.conf");
    std::fs::write(
        &conf,
        format!(
            r#"worker_processes {workers};
daemon off;
master_process on;
pid {prefix}/nginx.pid;
error_log {prefix}/logs/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {prefix}/body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    keepalive_requests 1000000;
    upstream origin {{
        server 127.0.0.1:{origin};
        keepalive 64;
        keepalive_requests 1000000;
    }}
    server {{
        listen 127.0.0.1:{plain};
        listen 127.0.0.1:{tls} ssl http2;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        ssl_protocols TLSv1.2 TLSv1.3;
        location / {{
            proxy_pass http://origin;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $http_host;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_set_header X-Forwarded-Proto $scheme;
        }}
    }}
}}
"#,
            prefix = prefix.display(),
            cert = cert.display(),
            key = key.display(),
        ),
    )?;
    let child = Command::new(nginx)
        .arg("-p")
        .arg(&prefix)
        .arg("-c")
        .arg(&conf)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting nginx")?;
    Ok(Server {
        name: "nginx",
        child,
        plain: format!("127.0.0.1:{plain}"),
        tls: format!("127.0.0.1:{tls}"),
    })
}
