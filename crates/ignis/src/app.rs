//! Loading a manifest's functions and serving them.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, bail};
use ignis_actors::cron::CronTriggers;
use ignis_actors::{ActorDirectory, FunctionGate};
use ignis_admin::{AdminServer, Node, NodeParts};
use ignis_config::{ComponentSource, Manifest};
use ignis_edge::observe::Traffic;
use ignis_edge::tls::CertStore;
use ignis_edge::{Edge, Server};
use ignis_runtime::bindings::keyvalue::KvLimits;
use ignis_runtime::outbound::{Backend, TenantOutbound};
use ignis_runtime::sched::FairScheduler;
use ignis_runtime::{Function, Platform, Runtime, RuntimeSettings};
use ignis_store::{ActorStorage, KvBackend, SqliteStore};

use crate::guest_build;

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
    /// The embedded store, open when a function declares a key-value store
    /// or the manifest has actor classes.
    pub store: Option<SqliteStore>,
    /// The durable actor directory, when the manifest has actor classes.
    pub directory: Option<Arc<ActorDirectory>>,
    /// What the admin listener reports on.
    pub node: Arc<Node>,
    /// The cron triggers (started by [`serve`]).
    pub cron: Arc<CronTriggers>,
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
        || manifest
            .functions
            .values()
            .any(|f| !f.key_value_stores.is_empty())
    {
        Some(SqliteStore::open(&manifest.storage.path).with_context(|| {
            format!(
                "opening the key-value store {}",
                manifest.storage.path.display()
            )
        })?)
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
        kv: store.clone().map(|s| Arc::new(s) as Arc<dyn KvBackend>),
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
            (Some(s), false) => Some(Arc::new(s.clone()) as Arc<dyn ActorStorage>),
            _ => None,
        },
        actor_caller: Default::default(),
        tenant_outbound: manifest
            .functions
            .values()
            .map(|f| {
                let budget = TenantOutbound::new(&manifest.tenant(&f.tenant));
                (f.tenant.clone(), Arc::new(budget))
            })
            .collect(),
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
    let directory = match &store {
        Some(store) if !manifest.actors.is_empty() => {
            let mut classes = Vec::new();
            for (name, config) in &manifest.actors {
                classes.push(runtime.load_actor_class(config, &paths.actors[name])?);
            }
            let directory = ActorDirectory::start(
                classes,
                Arc::new(store.clone()),
                runtime.settings().activation_slots,
            );
            let _ = caller_slot.set(directory.clone());
            Some(directory)
        }
        _ => None,
    };
    let cron = Arc::new(CronTriggers::new(manifest, &gates, directory.as_ref())?);
    let traffic = Traffic::new(manifest);
    let edge = Edge::new(manifest, &gates, directory.clone(), &upstreams, &traffic)?;
    let node = Node::new(NodeParts {
        functions: functions
            .iter()
            .map(|(name, f)| (name.clone(), (f.clone(), gates[name].clone())))
            .collect(),
        directory: directory.clone(),
        upstreams,
        traffic,
        weights: manifest
            .tenants
            .iter()
            .map(|(name, t)| (name.clone(), t.weight))
            .collect(),
        cron: cron.clone(),
        storage: store.as_ref().map(|s| s.stats().clone()),
        routes: manifest.routes.clone(),
    });
    Ok(App {
        node,
        cron,
        runtime,
        functions,
        gates,
        scheduler,
        edge,
        store,
        directory,
    })
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
pub async fn serve(manifest: &Manifest, app: App) -> anyhow::Result<()> {
    let Listeners { http, admin, https } = bind(manifest, &app).await?;
    println!("listening on http://{}", http.local_addr());
    if let Some((server, _)) = &https {
        println!("listening on https://{}", server.local_addr());
    }
    if let Some(admin) = &admin {
        println!("admin on http://{}", admin.local_addr());
    }
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
    let cron = app.cron.start();
    let signal = async move {
        shutdown_signal().await;
        node.set_ready(false);
        drop(cron);
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
    tokio::join!(signal, admin, public).2?;
    Ok(())
}
