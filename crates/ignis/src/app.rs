//! Loading a manifest's functions and serving them.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, bail};
use ignis_actors::{FairScheduler, FunctionActor};
use ignis_config::{ComponentSource, Manifest};
use ignis_edge::{Edge, Server};
use ignis_runtime::kv::KvLimits;
use ignis_runtime::outbound::Backend;
use ignis_runtime::{Function, Platform, Runtime, RuntimeSettings};
use ignis_store::{KvBackend, SqliteStore};

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
    /// Their actors (admission, mailbox), by function name.
    pub actors: BTreeMap<String, Arc<FunctionActor>>,
    /// The fair scheduler for guests that outlast their first slice.
    pub scheduler: Arc<FairScheduler>,
    /// The routing edge.
    pub edge: Arc<Edge>,
    /// The embedded key-value store, open when a function declares a store.
    pub store: Option<SqliteStore>,
}

/// Resolves each function's component path, building Rust crates if asked.
pub fn component_paths(
    manifest: &Manifest,
    sources: Sources,
) -> anyhow::Result<BTreeMap<String, PathBuf>> {
    let mut paths = BTreeMap::new();
    let mut target_checked = false;
    for (name, f) in &manifest.functions {
        let path = match (&f.source, sources) {
            (ComponentSource::Wasm(p), _) => p.clone(),
            (ComponentSource::RustCrate(dir), Sources::Build) => {
                if !target_checked {
                    guest_build::ensure_target()?;
                    target_checked = true;
                }
                tracing::info!(function = %name, dir = %dir.display(), "building guest");
                guest_build::build_crate(dir).with_context(|| format!("function `{name}`"))?
            }
            (ComponentSource::RustCrate(dir), Sources::PrebuiltOnly) => bail!(
                "function `{name}` is built from source ({}); use `ignis up` to build and serve it",
                dir.display()
            ),
        };
        paths.insert(name.clone(), path);
    }
    Ok(paths)
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
    let store = if manifest
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
    let platform = Platform {
        kv: store.clone().map(|s| Arc::new(s) as Arc<dyn KvBackend>),
        kv_limits: KvLimits {
            max_key_bytes: manifest.storage.max_key_bytes,
            max_value_bytes: manifest.storage.max_value_bytes,
            max_batch_keys: manifest.storage.max_batch_keys,
        },
        backends: manifest
            .backends
            .iter()
            .map(|(name, b)| (name.clone(), Arc::new(Backend::new(b))))
            .collect(),
    };
    let runtime = Runtime::with_platform(
        RuntimeSettings::from_manifest(manifest),
        Some(scheduler.clone()),
        platform,
    )?;
    let mut functions = BTreeMap::new();
    let mut actors = BTreeMap::new();
    for (name, config) in &manifest.functions {
        let function = runtime.load_function(config, &paths[name])?;
        actors.insert(name.clone(), FunctionActor::new(function.clone()));
        functions.insert(name.clone(), function);
    }
    let edge = Edge::new(manifest, &actors)?;
    Ok(App {
        runtime,
        functions,
        actors,
        scheduler,
        edge,
        store,
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

/// Binds and serves until SIGINT/SIGTERM. Prints `listening on http://ADDR`
/// on stdout once the socket is bound.
pub async fn serve(manifest: &Manifest, app: App) -> anyhow::Result<()> {
    let server = Server::bind(manifest.server.listen, app.edge.clone()).await?;
    println!("listening on http://{}", server.local_addr());
    for (name, f) in &app.functions {
        tracing::info!(function = %name, tenant = f.tenant(), "ready");
    }
    server.run(shutdown_signal()).await?;
    Ok(())
}
