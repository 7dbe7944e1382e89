//! `ignis`: serve WebAssembly HTTP components from one binary.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use ignis::app::{self, Sources};
use ignis_config::Manifest;

/// Ignis runs untrusted WebAssembly HTTP components (wasi:http 0.2 and 0.3), each
/// request in its own fresh, resource-limited instance.
#[derive(Parser)]
#[command(version, about, long_about = None)]
struct Cli {
    /// Log lines as text (for people) or JSON objects (for collectors).
    #[arg(
        long,
        global = true,
        env = "IGNIS_LOG_FORMAT",
        value_enum,
        default_value = "text"
    )]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

/// The cluster's database, shared by `up`, `serve` and `cluster apply`.
#[derive(clap::Args)]
struct ClusterUrl {
    /// The cluster's shared PostgreSQL database (a URL or key=value
    /// string): `up` and `serve` join it (it becomes `storage.database`;
    /// `[cluster]`'s settings apply, or their defaults), `cluster apply`
    /// records to it. Prefer the IGNIS_CLUSTER environment variable: a
    /// command line is visible to every user of the machine.
    #[arg(
        long = "cluster",
        env = "IGNIS_CLUSTER",
        hide_env_values = true,
        value_name = "URL"
    )]
    url: Option<String>,
}

/// Listener overrides shared by `up` and `serve`.
#[derive(clap::Args)]
struct ListenArgs {
    /// Listen on this address instead of the manifest's `server.listen`
    /// (use 127.0.0.1:0 for any free port).
    #[arg(long, env = "IGNIS_LISTEN")]
    listen: Option<SocketAddr>,
    /// Serve HTTPS on this address instead of the manifest's `tls.listen`.
    #[arg(long, env = "IGNIS_TLS_LISTEN")]
    tls_listen: Option<SocketAddr>,
    /// Serve the admin API on this address instead of the manifest's
    /// `admin.listen`. Its bearer token comes from `[admin]` or from the
    /// IGNIS_ADMIN_TOKEN environment variable (which wins).
    #[arg(long, env = "IGNIS_ADMIN_LISTEN")]
    admin_listen: Option<SocketAddr>,
    #[command(flatten)]
    cluster: ClusterUrl,
    /// The cluster's internal listener instead of `cluster.listen` (use
    /// 127.0.0.1:0 for any free port).
    #[arg(long, env = "IGNIS_CLUSTER_LISTEN")]
    cluster_listen: Option<SocketAddr>,
    /// The `host:port` other nodes reach this node's internal listener at,
    /// instead of `cluster.advertise`.
    #[arg(long, env = "IGNIS_CLUSTER_ADVERTISE")]
    cluster_advertise: Option<String>,
}

#[derive(Subcommand)]
enum Command {
    /// Build the guest crates named in DIR/ignis.toml (installing the
    /// wasm32-wasip2 target if needed) and serve them.
    Up {
        /// Directory holding ignis.toml.
        #[arg(default_value = ".")]
        dir: PathBuf,
        /// Rebuild and reload when the manifest or a guest's sources change
        /// (a bad change is logged; the running version keeps serving).
        #[arg(long)]
        watch: bool,
        #[command(flatten)]
        listen: ListenArgs,
    },
    /// Serve the prebuilt components named in a manifest.
    Serve {
        /// Path to ignis.toml.
        manifest: PathBuf,
        #[command(flatten)]
        listen: ListenArgs,
    },
    /// Validate a manifest and its components (imports, exports) without serving.
    Check {
        /// Path to ignis.toml.
        manifest: PathBuf,
        /// Also build functions declared with `build` (a Rust crate or a command).
        #[arg(long)]
        build: bool,
    },
    /// Create a project from a template: a function in Rust, JavaScript or
    /// Python, or a durable actor class in Rust. `ignis up DIR` then builds
    /// and serves it.
    New {
        /// What to create.
        #[arg(value_enum)]
        kind: ignis::new::Kind,
        /// The directory to create (must not exist, or be empty); its last
        /// component names the project and its function.
        dir: PathBuf,
    },
    /// Write a self-signed certificate and its key (PEM) for local HTTPS:
    /// OUT/cert.pem and OUT/key.pem, for `[tls] cert` and `key`.
    Cert {
        /// Host names and IP addresses it is valid for.
        #[arg(long = "host", default_values = ["localhost", "127.0.0.1", "::1"])]
        hosts: Vec<String>,
        /// The directory to write into (created if needed).
        #[arg(long, default_value = ".ignis/tls")]
        out: PathBuf,
    },
    /// List what a running node serves (functions, routes, actor classes,
    /// upstreams) through its admin API; the token comes from
    /// IGNIS_ADMIN_TOKEN.
    Ls {
        /// The node's admin API.
        #[arg(long, env = "IGNIS_ADMIN_URL", default_value = "http://127.0.0.1:9901")]
        admin: String,
        /// Print the API's JSON instead of tables.
        #[arg(long)]
        json: bool,
    },
    /// Deploy a new version of a function or an actor class to a running
    /// node without a restart: its table from the manifest and its
    /// component (built first if the manifest builds it); the token comes
    /// from IGNIS_ADMIN_TOKEN.
    Deploy {
        /// The function or actor class.
        name: String,
        /// The manifest holding `[functions.NAME]` or `[actors.NAME]`.
        #[arg(long, default_value = "ignis.toml")]
        manifest: PathBuf,
        /// Send this component instead of the manifest's.
        #[arg(long)]
        component: Option<PathBuf>,
        /// Refuse unless the node serves this version now (0: the function
        /// must be new).
        #[arg(long)]
        expect_version: Option<u64>,
        /// The node's admin API.
        #[arg(long, env = "IGNIS_ADMIN_URL", default_value = "http://127.0.0.1:9901")]
        admin: String,
        /// Print the API's JSON answer.
        #[arg(long)]
        json: bool,
    },
    /// Restore the version of a function (or actor class) before the
    /// current one.
    Rollback {
        /// The function or actor class.
        name: String,
        /// NAME is an actor class.
        #[arg(long)]
        actor: bool,
        /// The node's admin API.
        #[arg(long, env = "IGNIS_ADMIN_URL", default_value = "http://127.0.0.1:9901")]
        admin: String,
        /// Print the API's JSON answer.
        #[arg(long)]
        json: bool,
    },
    /// Remove a function from a running node (refused while a route or a
    /// cron trigger names it; a rollback brings it back).
    Delete {
        /// The function.
        name: String,
        /// The node's admin API.
        #[arg(long, env = "IGNIS_ADMIN_URL", default_value = "http://127.0.0.1:9901")]
        admin: String,
        /// Print the API's JSON answer.
        #[arg(long)]
        json: bool,
    },
    /// Follow a running node's log through its admin API (lines as they
    /// are logged, as `IGNIS_LOG` filters them there); the token comes from
    /// IGNIS_ADMIN_TOKEN.
    Logs {
        /// The node's admin API.
        #[arg(long, env = "IGNIS_ADMIN_URL", default_value = "http://127.0.0.1:9901")]
        admin: String,
    },
    /// Write the WIT packages guests in other languages are built against
    /// (WASI 0.2 as this binary links it, and Ignis's key-value, config and
    /// actor packages) into DIR/deps, replacing what was there.
    Wit {
        /// The `wit` directory of a guest.
        dir: PathBuf,
    },
    /// Operate a cluster of nodes sharing one PostgreSQL database
    /// (docs/cluster.md).
    Cluster {
        #[command(subcommand)]
        command: ClusterCommand,
    },
    /// Run a benchmark scenario file (open-loop loads, phases, peers such as
    /// `wasmtime serve`) and write a report, raw JSON and a latency plot.
    Bench {
        /// The scenario, e.g. bench/noisy-neighbour.toml.
        scenario: PathBuf,
        /// The wasmtime binary for `kind = "wasmtime"` peers.
        #[arg(
            long,
            env = "IGNIS_WASMTIME",
            default_value = "target/bench-tools/bin/wasmtime"
        )]
        wasmtime: PathBuf,
        /// Directory for the report files.
        #[arg(long, default_value = "target/bench-results")]
        out: PathBuf,
    },
}

#[derive(Subcommand)]
enum ClusterCommand {
    /// Record a manifest's functions, actor classes, routes and cron
    /// triggers (with their components) as the cluster's next change:
    /// every node applies it within a second. Waits for the live nodes to
    /// report, and fails if one refused it. The other sections stay each
    /// node's own. The database is `--cluster`'s, else the manifest's
    /// `[cluster]` one (`storage.database` or IGNIS_DATABASE_URL).
    Apply {
        /// Path to ignis.toml.
        manifest: PathBuf,
        /// Build the functions and actor classes declared with `build`
        /// first.
        #[arg(long)]
        build: bool,
        #[command(flatten)]
        cluster: ClusterUrl,
        /// Seconds to wait for the nodes' reports.
        #[arg(long, default_value_t = 30)]
        wait: u64,
    },
    /// List the cluster's nodes (alive or not, internal address, the
    /// change each applied) and its latest change.
    Status {
        /// The cluster's database.
        #[arg(
            long,
            env = "IGNIS_CLUSTER",
            hide_env_values = true,
            value_name = "URL"
        )]
        cluster: String,
    },
}

/// The cluster's database for `ignis cluster apply`: `--cluster`, else the
/// manifest's when it is in cluster mode.
fn cluster_url(arg: &ClusterUrl, manifest: &mut Manifest) -> anyhow::Result<String> {
    database_overrides(manifest, arg)?;
    anyhow::ensure!(
        manifest.cluster.is_some(),
        "name the cluster's database with --cluster URL (or IGNIS_CLUSTER): {} has no [cluster] section",
        manifest.path.display()
    );
    let url = manifest.storage.database.as_ref().ok_or_else(|| {
        anyhow::anyhow!(
            "{} names no cluster database: set cluster.database, IGNIS_DATABASE_URL or --cluster URL",
            manifest.path.display()
        )
    })?;
    Ok(url.expose().to_string())
}

/// The database the environment (IGNIS_DATABASE_URL) or `--cluster` names
/// instead of the manifest's; `--cluster` also turns cluster mode on (with
/// `[cluster]`'s defaults if the manifest has none).
fn database_overrides(manifest: &mut Manifest, cluster: &ClusterUrl) -> anyhow::Result<()> {
    if let Some(url) = from_env("IGNIS_DATABASE_URL", ignis_config::DatabaseUrl::new)? {
        manifest.storage.database = Some(url);
    }
    if let Some(url) = &cluster.url {
        let url = ignis_config::DatabaseUrl::new(url)
            .map_err(|why| anyhow::anyhow!("--cluster (or IGNIS_CLUSTER): {why}"))?;
        manifest.storage.database = Some(url);
        manifest
            .cluster
            .get_or_insert_with(ignis_config::ClusterConfig::with_defaults);
    }
    Ok(())
}

/// The environment variable `name`, checked by `parse`, if set (a secret
/// that need not be in the manifest); the error names the variable.
fn from_env<T>(
    name: &str,
    parse: impl FnOnce(&str) -> Result<T, String>,
) -> anyhow::Result<Option<T>> {
    let Some(value) = std::env::var_os(name) else {
        return Ok(None);
    };
    let value = value
        .to_str()
        .ok_or_else(|| anyhow::anyhow!("{name} is not UTF-8"))?;
    parse(value)
        .map(Some)
        .map_err(|why| anyhow::anyhow!("{name}: {why}"))
}

fn load_manifest(path: &Path, args: Option<&ListenArgs>) -> anyhow::Result<Manifest> {
    let mut manifest = Manifest::load(path)?;
    let Some(args) = args else {
        return Ok(manifest);
    };
    if let Some(addr) = args.listen {
        manifest.server.listen = addr;
    }
    if let Some(addr) = args.admin_listen {
        manifest.admin.listen = addr;
    }
    if let Some(token) = from_env("IGNIS_ADMIN_TOKEN", ignis_config::AdminToken::new)? {
        manifest.admin.token = Some(token);
    }
    database_overrides(&mut manifest, &args.cluster)?;
    if args.cluster_listen.is_some() || args.cluster_advertise.is_some() {
        let Some(cluster) = manifest.cluster.as_mut() else {
            anyhow::bail!(
                "--cluster-listen and --cluster-advertise need cluster mode: a [cluster] section \
                 in {} or --cluster URL",
                path.display()
            );
        };
        if let Some(addr) = args.cluster_listen {
            cluster.listen = addr;
        }
        if let Some(advertise) = &args.cluster_advertise {
            ignis_config::check_advertise(advertise)
                .map_err(|why| anyhow::anyhow!("--cluster-advertise: {why}"))?;
            cluster.advertise = Some(advertise.clone());
        }
    }
    match (&mut manifest.tls, args.tls_listen) {
        (Some(tls), Some(addr)) => tls.listen = addr,
        (None, Some(_)) => anyhow::bail!(
            "--tls-listen needs a [tls] section in {} (certificates to serve)",
            path.display()
        ),
        _ => {}
    }
    Ok(manifest)
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let _flush_on_exit = ignis::logging::init(matches!(cli.log_format, LogFormat::Json));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    // Loading starts the guest scheduler, whose threads run in this runtime.
    let _context = runtime.enter();
    match cli.command {
        Command::Up { dir, watch, listen } => {
            let manifest = load_manifest(&dir.join("ignis.toml"), Some(&listen))?;
            let app = app::load(&manifest, Sources::Build)?;
            runtime.block_on(app::serve(&manifest, app, watch))
        }
        Command::Serve { manifest, listen } => {
            let manifest = load_manifest(&manifest, Some(&listen))?;
            let app = runtime.block_on(async { app::load(&manifest, Sources::PrebuiltOnly) })?;
            runtime.block_on(app::serve(&manifest, app, false))
        }
        Command::Check { manifest, build } => {
            let manifest = load_manifest(&manifest, None)?;
            let sources = if build {
                Sources::Build
            } else {
                Sources::PrebuiltOnly
            };
            let app = app::load(&manifest, sources).context("check failed")?;
            if let Some(tls) = &manifest.tls {
                ignis_edge::tls::CertStore::load(tls).context("check failed: [tls]")?;
                println!("ok: TLS certificates");
            }
            for (name, f) in &app.functions {
                println!(
                    "ok: function `{name}` (tenant {}, cache {:?})",
                    f.tenant(),
                    f.cache_outcome()
                );
            }
            println!(
                "ok: {} functions, {} routes; {} compiled, {} from cache",
                app.functions.len(),
                manifest.routes.len(),
                app.runtime.cache().compiles(),
                app.runtime.cache().hits()
            );
            Ok(())
        }
        Command::New { kind, dir } => {
            ignis::new::create(kind, &dir)?;
            let kind = clap::ValueEnum::to_possible_value(&kind).expect("every kind is listed");
            println!(
                "created a {} project in {}; build and serve it with: ignis up {}",
                kind.get_name(),
                dir.display(),
                dir.display()
            );
            Ok(())
        }
        Command::Wit { dir } => ignis::new::write_wit(&dir),
        Command::Logs { admin } => {
            runtime.block_on(ignis::admin_client::logs(&admin, &mut std::io::stdout()))
        }
        Command::Deploy {
            name,
            manifest,
            component,
            expect_version,
            admin,
            json,
        } => {
            let component = match component {
                Some(c) => c,
                None => {
                    let mut m = Manifest::load(&manifest)?;
                    m.functions.retain(|n, _| *n == name);
                    m.actors.retain(|n, _| *n == name);
                    let mut paths = app::component_paths(&m, Sources::Build)?;
                    paths
                        .functions
                        .remove(&name)
                        .or_else(|| paths.actors.remove(&name))
                        .ok_or_else(|| {
                            anyhow::anyhow!(
                                "{} has no function or actor class `{name}`",
                                manifest.display()
                            )
                        })?
                }
            };
            print!(
                "{}",
                runtime.block_on(ignis::admin_client::deploy(
                    &admin,
                    &manifest,
                    &name,
                    &component,
                    expect_version,
                    json
                ))?
            );
            Ok(())
        }
        Command::Rollback {
            name,
            actor,
            admin,
            json,
        } => {
            print!(
                "{}",
                runtime.block_on(ignis::admin_client::rollback(&admin, &name, actor, json))?
            );
            Ok(())
        }
        Command::Delete { name, admin, json } => {
            print!(
                "{}",
                runtime.block_on(ignis::admin_client::delete(&admin, &name, json))?
            );
            Ok(())
        }
        Command::Ls { admin, json } => {
            print!(
                "{}",
                runtime.block_on(ignis::admin_client::ls(&admin, json))?
            );
            Ok(())
        }
        Command::Cert { hosts, out } => {
            let (cert, key) = ignis::new::self_signed(&hosts, &out)?;
            println!(
                "wrote {} and {} (self-signed for {}); in ignis.toml:\n[tls]\ncert = \"{}\"\nkey = \"{}\"",
                cert.display(),
                key.display(),
                hosts.join(", "),
                cert.display(),
                key.display()
            );
            Ok(())
        }
        Command::Cluster {
            command:
                ClusterCommand::Apply {
                    manifest,
                    build,
                    cluster,
                    wait,
                },
        } => {
            let mut m = load_manifest(&manifest, None)?;
            let url = cluster_url(&cluster, &mut m)?;
            let sources = if build {
                Sources::Build
            } else {
                Sources::PrebuiltOnly
            };
            let paths = app::component_paths(&m, sources)?;
            runtime.block_on(ignis::cluster_cli::apply(
                &url,
                &manifest,
                &paths,
                std::time::Duration::from_secs(wait),
                &mut std::io::stdout(),
            ))
        }
        Command::Cluster {
            command: ClusterCommand::Status { cluster },
        } => {
            print!(
                "{}",
                runtime.block_on(ignis::cluster_cli::status(&cluster))?
            );
            Ok(())
        }
        Command::Bench {
            scenario,
            wasmtime,
            out,
        } => {
            let options = ignis::bench::BenchOptions { wasmtime, out };
            runtime.block_on(ignis::bench::run(&scenario, &options))?;
            Ok(())
        }
    }
}
