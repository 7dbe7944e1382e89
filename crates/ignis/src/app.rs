//! Loading a manifest's functions and serving them.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use anyhow::{Context, bail};
use ignis_actors::cron::CronTriggers;
use ignis_actors::{ActorDirectory, FunctionGate};
use ignis_admin::{AdminServer, Node};
use ignis_config::{ComponentSource, Manifest};
use ignis_edge::observe::Traffic;
use ignis_edge::tls::CertStore;
use ignis_edge::{Edge, Server};
use ignis_runtime::bindings::keyvalue::KvLimits;
use ignis_runtime::outbound::{Backend, TenantBudgets};
use ignis_runtime::sched::FairScheduler;
use ignis_runtime::{Function, Platform, Runtime, RuntimeSettings};
use ignis_store::{ActorStorage, KvBackend, PgOptions, PgStore, SqliteStore, StoreStats};

use crate::cluster::{ClusterNode, InternalListener};
use crate::deploy::{Deployments, Initial};
use crate::guest_build;
use crate::otel::OtlpExporter;

/// What to do with functions declared as Rust crates (`build = "dir"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sources {
    /// Build them (`ignis up`).
    Build,
    /// Refuse them: only prebuilt components (`ignis serve`, `ignis check`).
    PrebuiltOnly,
}

/// The loaded application: runtime, functions and edge.
pub struct App {
    /// The process-wide runtime.
    pub runtime: Arc<Runtime>,
    /// Functions by name.
    pub functions: BTreeMap<String, Arc<Function>>,
    /// Their admission gates (concurrency cap, mailbox), by function name.
    pub gates: BTreeMap<String, Arc<FunctionGate>>,
    /// The fair scheduler for guests that outlast their first slice.
    pub scheduler: Arc<FairScheduler>,
    /// The routing edge.
    pub edge: Arc<Edge>,
    /// The store, open when a function declares a key-value store or the
    /// manifest has actor classes.
    pub store: Option<Store>,
    /// The durable actor directory, when the manifest has actor classes.
    pub directory: Option<Arc<ActorDirectory>>,
    /// What the admin listener reports on.
    pub node: Arc<Node>,
    /// The cron triggers as loaded (started by [`serve`] through
    /// `deployments`, which holds the current ones).
    pub cron: Arc<CronTriggers>,
    /// What deploys, rollbacks and reloads change.
    pub deployments: Arc<Deployments>,
    /// The trace exporter (`[telemetry]`), if on.
    pub telemetry: Option<Arc<OtlpExporter>>,
    /// In cluster mode with actor classes: this node's membership, and its
    /// internal listener (served by [`serve`]).
    pub cluster: Option<(Arc<ClusterNode>, Mutex<Option<InternalListener>>)>,
}

/// The node's storage engine (`[storage]`): the embedded SQLite file, or
/// a PostgreSQL database (`storage.database`).
#[derive(Clone)]
pub enum Store {
    /// The embedded engine.
    Sqlite(SqliteStore),
    /// The networked engine.
    Postgres(PgStore),
}

impl Store {
    /// Opens the manifest's store. With a database and actor classes, the
    /// node takes the database's node lock (one node serves actors from a
    /// database), unless it is in cluster mode (actors are then placed by
    /// leases). Must be called inside the tokio runtime.
    pub fn open(manifest: &Manifest) -> anyhow::Result<Store> {
        let storage = &manifest.storage;
        if manifest.cluster.is_some() && storage.database.is_none() {
            anyhow::bail!(
                "cluster mode needs a PostgreSQL database shared by the nodes: set \
                 cluster.database in {} or IGNIS_DATABASE_URL (or use --cluster URL)",
                manifest.path.display()
            );
        }
        let Some(url) = &storage.database else {
            let store = SqliteStore::open(&storage.path).with_context(|| {
                format!("opening the key-value store {}", storage.path.display())
            })?;
            return Ok(Store::Sqlite(store));
        };
        let options = PgOptions {
            node_lock: !manifest.actors.is_empty() && manifest.cluster.is_none(),
            ..PgOptions::default()
        };
        let handle = tokio::runtime::Handle::current();
        let store =
            tokio::task::block_in_place(|| handle.block_on(PgStore::open(url.expose(), &options)))
                .context("opening the PostgreSQL store (storage.database)")?;
        Ok(Store::Postgres(store))
    }

    /// The key-value contract.
    pub fn kv(&self) -> Arc<dyn KvBackend> {
        match self {
            Store::Sqlite(s) => Arc::new(s.clone()),
            Store::Postgres(s) => Arc::new(s.clone()),
        }
    }

    /// The actor storage contract.
    pub fn actors(&self) -> Arc<dyn ActorStorage> {
        match self {
            Store::Sqlite(s) => Arc::new(s.clone()),
            Store::Postgres(s) => Arc::new(s.clone()),
        }
    }

    /// The engine's counters.
    pub fn stats(&self) -> &Arc<StoreStats> {
        match self {
            Store::Sqlite(s) => s.stats(),
            Store::Postgres(s) => s.stats(),
        }
    }
}

/// Component paths of the manifest's functions and actor classes.
pub struct ComponentPaths {
    /// By function name.
    pub functions: BTreeMap<String, PathBuf>,
    /// By actor class name.
    pub actors: BTreeMap<String, PathBuf>,
}

/// Resolves each function's and actor class's component path, building
/// Rust crates if asked.
pub fn component_paths(manifest: &Manifest, sources: Sources) -> anyhow::Result<ComponentPaths> {
    let mut target_checked = false;
    let mut resolve = |kind: &str,
                       name: &str,
                       source: &ComponentSource|
     -> anyhow::Result<PathBuf> {
        Ok(match (source, sources) {
            (ComponentSource::Wasm(p), _) => p.clone(),
            (ComponentSource::RustCrate(dir), Sources::Build) => {
                if !target_checked {
                    guest_build::ensure_target()?;
                    target_checked = true;
                }
                tracing::info!(%kind, name, dir = %dir.display(), "building guest");
                guest_build::build_crate(dir).with_context(|| format!("{kind} `{name}`"))?
            }
            (ComponentSource::Command(build), Sources::Build) => {
                tracing::info!(%kind, name, command = %build.command, "building guest");
                let ignis = std::env::current_exe().context("locating the ignis executable")?;
                guest_build::run_command(build, &ignis)
                    .with_context(|| format!("{kind} `{name}`"))?
            }
            (source, Sources::PrebuiltOnly) => bail!(
                "{kind} `{name}` is built from source ({source}); use `ignis up` to build and serve it"
            ),
        })
    };
    let mut functions = BTreeMap::new();
    for (name, f) in &manifest.functions {
        functions.insert(name.clone(), resolve("function", name, &f.source)?);
    }
    let mut actors = BTreeMap::new();
    for (name, a) in &manifest.actors {
        actors.insert(name.clone(), resolve("actor class", name, &a.source)?);
    }
    Ok(ComponentPaths { functions, actors })
}

/// Loads every function of the manifest and builds the edge. Must be called
/// inside the tokio runtime that will serve (the scheduler's threads run
/// guests in its context).
pub fn load(manifest: &Manifest, sources: Sources) -> anyhow::Result<App> {
    let paths = component_paths(manifest, sources)?;
    let weights = manifest
        .tenants
        .iter()
        .map(|(name, t)| (name.clone(), t.weight))
        .collect();
    let scheduler = FairScheduler::new(
        manifest.server.guest_threads,
        weights,
        tokio::runtime::Handle::current(),
    )
    .context("starting the guest scheduler threads")?;
    let store = if !manifest.actors.is_empty()
        || manifest.cluster.is_some()
        || manifest
            .functions
            .values()
            .any(|f| !f.key_value_stores.is_empty())
    {
        Some(Store::open(manifest)?)
    } else {
        None
    };
    let upstreams = Edge::upstreams(manifest)?;
    let platform = Platform {
        upstreams: upstreams
            .iter()
            .map(|(name, u)| {
                let client: Arc<dyn ignis_runtime::outbound::UpstreamClient> = u.clone();
                (name.clone(), client)
            })
            .collect(),
        kv: store.as_ref().map(Store::kv),
        kv_limits: KvLimits {
            max_key_bytes: manifest.storage.max_key_bytes,
            max_value_bytes: manifest.storage.max_value_bytes,
            max_batch_keys: manifest.storage.max_batch_keys,
            max_batch_bytes: manifest.storage.max_batch_bytes,
        },
        backends: manifest
            .backends
            .iter()
            .map(|(name, b)| (name.clone(), Arc::new(Backend::new(b))))
            .collect(),
        actor_storage: match (&store, manifest.actors.is_empty()) {
            (Some(s), false) => Some(s.actors()),
            _ => None,
        },
        actor_caller: Default::default(),
        tenant_outbound: Arc::new(TenantBudgets::new(&manifest.tenants)),
    };
    let caller_slot = platform.actor_caller.clone();
    let runtime = Runtime::with_platform(
        RuntimeSettings::from_manifest(manifest),
        Some(scheduler.clone()),
        platform,
    )?;
    let mut functions = BTreeMap::new();
    let mut gates = BTreeMap::new();
    for (name, config) in &manifest.functions {
        let function = runtime.load_function(config, &paths.functions[name])?;
        gates.insert(name.clone(), FunctionGate::new(function.clone()));
        functions.insert(name.clone(), function);
    }
    let cluster = match (&manifest.cluster, &store) {
        (Some(config), Some(Store::Postgres(pg))) => Some(join_cluster(
            config,
            pg.clone(),
            !manifest.actors.is_empty(),
        )?),
        _ => None,
    };
    let directory = match &store {
        Some(store) if !manifest.actors.is_empty() => {
            let mut classes = Vec::new();
            for (name, config) in &manifest.actors {
                classes.push(runtime.load_actor_class(config, &paths.actors[name])?);
            }
            let directory = ActorDirectory::start_with(
                classes,
                store.actors(),
                runtime.settings().activation_slots,
                cluster
                    .as_ref()
                    .map(|(node, _)| node.clone() as Arc<dyn ignis_actors::Cluster>),
            );
            let _ = caller_slot.set(directory.clone());
            Some(directory)
        }
        _ => None,
    };
    let cron = Arc::new(CronTriggers::in_cluster(
        manifest,
        &gates,
        directory.as_ref(),
        cluster
            .as_ref()
            .map(|(node, _)| node.clone() as Arc<dyn ignis_actors::CronClaim>),
    )?);
    let telemetry = manifest
        .telemetry
        .as_ref()
        .map(OtlpExporter::start)
        .transpose()?;
    let traffic = match &telemetry {
        Some(exporter) => Traffic::with_spans(manifest, exporter.clone()),
        None => Traffic::new(manifest),
    };
    let edge = Edge::new(manifest, &gates, directory.clone(), &upstreams, &traffic)?;
    let deployments = Deployments::new(Initial {
        manifest,
        runtime: runtime.clone(),
        edge: edge.clone(),
        directory: directory.clone(),
        upstreams,
        storage: store.as_ref().map(|s| s.stats().clone()),
        paths: &paths,
        functions: functions
            .iter()
            .map(|(name, f)| (name.clone(), (f.clone(), gates[name].clone())))
            .collect(),
        traffic,
        cron: cron.clone(),
        sources,
    })?;
    let node = Node::new(
        deployments.parts(),
        Some(deployments.clone() as Arc<dyn ignis_admin::deploy::Deployer>),
    );
    deployments.attach(&node);
    if let Some((cluster, _)) = &cluster {
        deployments.attach_cluster(cluster.clone());
    }
    Ok(App {
        telemetry,
        deployments,
        node,
        cron,
        runtime,
        functions,
        gates,
        scheduler,
        edge,
        store,
        directory,
        cluster: cluster.map(|(node, listener)| (node, Mutex::new(listener))),
    })
}

/// Binds the internal listener if the node serves actors, joins the
/// cluster (advertising the listener) and starts the heartbeat. A node
/// without actor classes shares the deployments only: no listener, and
/// no address (no actor is ever placed on it).
fn join_cluster(
    config: &ignis_config::ClusterConfig,
    store: PgStore,
    actors: bool,
) -> anyhow::Result<(Arc<ClusterNode>, Option<InternalListener>)> {
    let handle = tokio::runtime::Handle::current();
    tokio::task::block_in_place(|| {
        handle.block_on(async {
            let listener = match actors {
                true => Some(InternalListener::bind(config.listen).await?),
                false => None,
            };
            let address = match (&config.advertise, &listener) {
                (_, None) => "-".to_string(),
                (Some(a), Some(_)) => a.clone(),
                (None, Some(l)) => l.local_addr().to_string(),
            };
            let node = ClusterNode::join(store, address, config)
                .await
                .context("joining the cluster")?;
            node.spawn_heartbeat();
            Ok((node, listener))
        })
    })
}

/// SIGHUP, caught from now on (before the listeners are announced, so a
/// SIGHUP sent after them never falls to the default action, which ends
/// the process).
#[cfg(unix)]
type Hangups = Option<tokio::signal::unix::Signal>;
#[cfg(not(unix))]
type Hangups = Option<()>;

fn catch_hangups() -> Hangups {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let hup = signal(SignalKind::hangup()).ok();
        if hup.is_none() {
            tracing::warn!("SIGHUP cannot be caught here; reload by restarting");
        }
        hup
    }
    #[cfg(not(unix))]
    None
}

/// Reloads the manifest at each SIGHUP: a manifest with an error changes
/// nothing and the error (file, line, key) is logged.
async fn reload_on_sighup(hangups: Hangups, deployments: Arc<Deployments>) {
    #[cfg(unix)]
    if let Some(mut hup) = hangups {
        while hup.recv().await.is_some() {
            tracing::info!("SIGHUP received: reloading the manifest");
            reload(&deployments, "SIGHUP").await;
        }
    }
    #[cfg(not(unix))]
    let _ = (hangups, deployments);
}

/// How often `ignis up --watch` looks for changed files.
pub const WATCH_INTERVAL: std::time::Duration = std::time::Duration::from_millis(500);
/// Most files `--watch` looks at (a guest with more is watched partly,
/// with a warning).
pub const MAX_WATCHED_FILES: usize = 20_000;

/// Reloads when the manifest or a guest's sources change (their
/// fingerprint: file count, sizes and latest modification time). The
/// watched set comes from the manifest as it was last read.
async fn watch_sources(manifest: PathBuf, deployments: Arc<Deployments>) {
    let mut last = fingerprint(&watched(&manifest));
    let mut ticks = tokio::time::interval(WATCH_INTERVAL);
    loop {
        ticks.tick().await;
        let roots = watched(&manifest);
        let now = tokio::task::spawn_blocking(move || fingerprint(&roots))
            .await
            .unwrap_or(last);
        if now != last {
            tracing::info!(manifest = %manifest.display(), "a watched file changed: rebuilding and reloading");
            reload(&deployments, "watch").await;
            // What the build wrote is not a change to act on again.
            let roots = watched(&manifest);
            last = tokio::task::spawn_blocking(move || fingerprint(&roots))
                .await
                .unwrap_or(now);
        }
    }
}

/// The manifest and its guests' sources: a Rust crate's directory (without
/// `target`), a build command's `watch` paths.
fn watched(manifest: &std::path::Path) -> Vec<PathBuf> {
    let mut roots = vec![manifest.to_path_buf()];
    if let Ok(m) = Manifest::load(manifest) {
        let sources = m
            .functions
            .values()
            .map(|f| &f.source)
            .chain(m.actors.values().map(|a| &a.source));
        for source in sources {
            match source {
                ComponentSource::RustCrate(dir) => roots.push(dir.clone()),
                ComponentSource::Command(b) => roots.extend(b.watch.iter().cloned()),
                ComponentSource::Wasm(p) => roots.push(p.clone()),
            }
        }
    }
    roots
}

/// (files, total bytes, latest modification) under `roots`, skipping
/// `target` and hidden directories.
fn fingerprint(roots: &[PathBuf]) -> (usize, u64, Option<std::time::SystemTime>) {
    let mut acc = (0usize, 0u64, None);
    let mut stack: Vec<PathBuf> = roots.to_vec();
    while let Some(path) = stack.pop() {
        if acc.0 >= MAX_WATCHED_FILES {
            tracing::warn!(
                max = MAX_WATCHED_FILES,
                "--watch: too many files; the rest are not watched"
            );
            break;
        }
        let Ok(meta) = std::fs::metadata(&path) else {
            continue;
        };
        if meta.is_dir() {
            let skip = path
                .file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n == "target" || n == "node_modules" || n.starts_with('.'));
            if skip && !roots.contains(&path) {
                continue;
            }
            if let Ok(entries) = std::fs::read_dir(&path) {
                stack.extend(entries.flatten().map(|e| e.path()));
            }
            continue;
        }
        acc.0 += 1;
        acc.1 += meta.len();
        acc.2 = acc.2.max(meta.modified().ok());
    }
    acc
}

/// Reloads the manifest and logs the outcome.
pub async fn reload(deployments: &Deployments, by: &str) {
    match deployments.reload(by).await {
        Ok(changed) if changed.is_empty() => {
            tracing::info!(target: "ignis::deploy", by, "manifest reloaded: nothing changed");
        }
        Ok(changed) => {
            tracing::info!(target: "ignis::deploy", by, changed = ?changed, "manifest reloaded");
        }
        Err(e) => {
            tracing::error!(target: "ignis::deploy", by, error = %e, "manifest reload refused; the running version is untouched");
        }
    }
}

/// Resolves when SIGINT or SIGTERM arrives.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => tracing::info!("SIGINT received"),
        () = term => tracing::info!("SIGTERM received"),
    }
}

/// A manifest's listeners, bound: plain HTTP (answering with redirects to
/// HTTPS when `tls.redirect_http` is set), with `[tls]` HTTPS, and with an
/// admin token the admin listener.
pub struct Listeners {
    /// `server.listen`.
    pub http: Server,
    /// `admin.listen`, if a token is configured.
    pub admin: Option<AdminServer>,
    /// `tls.listen`, with the certificate store it serves from (the file
    /// watcher only refers to the store: it lives as long as the server).
    pub https: Option<(Server, Arc<CertStore>)>,
}

/// Binds the listeners of `manifest` for `app`, loading (and watching)
/// the certificates of `[tls]`.
pub async fn bind(manifest: &Manifest, app: &App) -> anyhow::Result<Listeners> {
    let edge = &app.edge;
    let admin = AdminServer::bind(
        &manifest.admin,
        manifest.server.header_read_timeout,
        app.node.clone(),
    )
    .await?;
    if admin.is_none() {
        tracing::info!(
            "admin API off: no token configured ([admin] token or token_file, or IGNIS_ADMIN_TOKEN)"
        );
    }
    let mut http = Server::bind(manifest.server.listen, edge.clone()).await?;
    let https = match &manifest.tls {
        None => None,
        Some(config) => {
            let certs = CertStore::load(config).context("loading the TLS certificates ([tls])")?;
            CertStore::watch(&certs);
            let server = Server::bind_tls(config.listen, edge.clone(), &certs).await?;
            if config.redirect_http {
                http = http.redirect_to_https(server.local_addr().port());
            }
            Some((server, certs))
        }
    };
    Ok(Listeners { http, admin, https })
}

/// Binds and serves until SIGINT/SIGTERM. Prints `listening on http://ADDR`
/// on stdout once the sockets are bound, then `listening on https://ADDR` if
/// the manifest has `[tls]`.
///
/// SIGHUP reloads the manifest; with `watch`, so does a change to it or to
/// a guest's sources (rebuilt first), polled every [`WATCH_INTERVAL`].
pub async fn serve(manifest: &Manifest, app: App, watch: bool) -> anyhow::Result<()> {
    // Changes made through the API before a restart serve again.
    app.deployments.restore().await;
    let Listeners { http, admin, https } = bind(manifest, &app).await?;
    let hangups = catch_hangups();
    println!("listening on http://{}", http.local_addr());
    if let Some((server, _)) = &https {
        println!("listening on https://{}", server.local_addr());
    }
    if let Some(admin) = &admin {
        println!("admin on http://{}", admin.local_addr());
    }
    let cluster = app.cluster.as_ref().map(|(node, _)| node.clone());
    let internal = match (&app.cluster, &app.directory) {
        (Some((node, listener)), Some(directory)) => {
            let listener = listener.lock().unwrap_or_else(|p| p.into_inner()).take();
            listener.map(|listener| {
                println!(
                    "cluster on http://{} (node {})",
                    listener.local_addr(),
                    node.id()
                );
                tokio::spawn(listener.run(node.clone(), directory.clone()))
            })
        }
        _ => None,
    };
    for (name, f) in &app.functions {
        tracing::info!(function = %name, tenant = f.tenant(), "ready");
    }
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = move || {
        let mut rx = stop_rx.clone();
        async move {
            let _ = rx.wait_for(|stop| *stop).await;
        }
    };
    app.node.set_ready(true);
    let node = app.node.clone();
    // Cron triggers fire while the node serves; at the shutdown signal they
    // stop (a run in flight is cancelled with its guest).
    app.deployments.start_cron();
    let deployments = app.deployments.clone();
    let reloads = tokio::spawn(reload_on_sighup(hangups, app.deployments.clone()));
    let following = tokio::spawn(app.deployments.clone().follow_cluster());
    let watcher = watch.then(|| {
        tokio::spawn(watch_sources(
            manifest.path.clone(),
            app.deployments.clone(),
        ))
    });
    let signal = async move {
        shutdown_signal().await;
        node.set_ready(false);
        reloads.abort();
        following.abort();
        if let Some(w) = watcher {
            w.abort();
        }
        deployments.stop_cron();
        let _ = stop_tx.send(true);
    };
    // The admin listener outlives the drain (`/readyz` says 503 meanwhile)
    // and stops with the last public listener.
    let (admin_stop, admin_stopped) = tokio::sync::oneshot::channel::<()>();
    let admin = async move {
        if let Some(admin) = admin {
            admin
                .run(async {
                    let _ = admin_stopped.await;
                })
                .await;
        }
    };
    let public = async move {
        let ended = match https {
            None => http.run(stopped()).await,
            Some((https, _certs)) => {
                let (a, b) = tokio::join!(http.run(stopped()), https.run(stopped()));
                a.and(b)
            }
        };
        drop(admin_stop);
        ended
    };
    let telemetry = app.telemetry.clone();
    let ended = tokio::join!(signal, admin, public).2;
    // Leaving makes this node's actors movable at once; forwarded
    // messages stop with the process.
    if let Some(node) = cluster {
        node.leave().await;
    }
    if let Some(internal) = internal {
        internal.abort();
    }
    // The spans of the last requests go out before the process ends.
    if let Some(exporter) = telemetry {
        exporter.shutdown().await;
    }
    ended?;
    Ok(())
}
