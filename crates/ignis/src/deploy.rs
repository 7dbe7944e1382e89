//! Hot deploy: a new version of a function is compiled, linked and
//! instantiated once beside the one serving, then the routing table, the
//! admin view and the cron triggers swap to it together; requests that
//! arrived before the swap finish on the old version, whose instances,
//! pool slots and compiled code are freed when its last request ends.
//!
//! Changes come from the admin API (deploy, rollback, delete: the
//! [`Deployer`] trait), from SIGHUP and from `ignis up --watch` (a manifest
//! reload: [`Deployments::reload`]).
//!
//! Invariants:
//! - All or nothing. Everything that can fail (the manifest, the
//!   component's compile, link and first instantiation, the pool's room,
//!   the routes, the cron triggers) runs before anything is swapped; a
//!   refused change leaves the node exactly as it was, and says why.
//! - One change at a time: the whole change holds `live`. A second change
//!   to a function already being changed is refused at once (409) instead
//!   of queueing behind it (`busy`).
//! - What a reload may change: functions, routes and cron triggers. Any
//!   other section (server, storage, backends, tenants, TLS, upstreams,
//!   admin, actors) needs a restart, and a reload that changes one is
//!   refused whole, naming it.
//! - The pool was sized at start (`server.function_slots`, doubled: a
//!   draining version beside its successor); a change that would take the
//!   functions' `max_concurrency` total past it, or a memory limit past the
//!   pool's slot size, is refused with the number to raise.
//! - Every version's component is copied into `cache_dir/deploys/PID/`
//!   under its SHA-256, so a rollback restores the exact bytes even if the
//!   file it came from was rebuilt since. At most [`MAX_PREVIOUS`] earlier
//!   versions per function are kept; files no version names are deleted,
//!   and so are the directories of processes that are gone (nodes sharing
//!   a cache directory never touch each other's).
//! - A change made through the API lasts until the next reload or restart,
//!   which serve what the manifest file says.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use ignis_actors::cron::{CronTasks, CronTriggers};
use ignis_actors::{ActorDirectory, FunctionGate};
use ignis_admin::deploy::{
    Change, DeployError, DeployRecord, DeployRequest, Deployed, Deployer, VersionInfo,
};
use ignis_admin::{MAX_DEPLOY_RECORDS, Node, NodeParts};
use ignis_config::Manifest;
use ignis_edge::observe::Traffic;
use ignis_edge::{Edge, Upstream};
use ignis_runtime::{Function, Runtime};
use ignis_store::StoreStats;
use sha2::{Digest, Sha256};

use crate::app::Sources;

/// Earlier versions kept per function for rollbacks.
pub const MAX_PREVIOUS: usize = 5;

/// Manifest sections a reload may change; any other needs a restart.
const RELOADABLE: [&str; 3] = ["functions", "routes", "triggers"];

/// The node's deployable state and the means to change it.
pub struct Deployments {
    runtime: Arc<Runtime>,
    edge: Arc<Edge>,
    directory: Option<Arc<ActorDirectory>>,
    upstreams: BTreeMap<String, Arc<Upstream>>,
    storage: Option<Arc<StoreStats>>,
    sources: Sources,
    dir: PathBuf,
    node: OnceLock<Weak<Node>>,
    busy: Mutex<BTreeSet<String>>,
    live: tokio::sync::Mutex<Live>,
    /// The running cron tasks, while the node serves.
    cron_tasks: Mutex<Option<CronTasks>>,
}

/// What serves now.
struct Live {
    doc: toml::Table,
    manifest: Manifest,
    functions: BTreeMap<String, Version>,
    /// Rollback stacks, newest last.
    previous: BTreeMap<String, Vec<Version>>,
    /// Highest version number given per function.
    numbers: BTreeMap<String, u64>,
    traffic: Arc<Traffic>,
    cron: Arc<CronTriggers>,
    records: VecDeque<DeployRecord>,
}

/// One version of a function.
#[derive(Clone)]
struct Version {
    number: u64,
    sha256: String,
    /// Its manifest table as it was given.
    section: toml::Value,
    /// The copy of its component under `cache_dir/deploys/`.
    stored: PathBuf,
    deployed_ms: u64,
    /// The loaded function and its gate (current versions only: an earlier
    /// version is kept as bytes, never as a loaded function).
    loaded: Option<(Arc<Function>, Arc<FunctionGate>)>,
}

/// What the initial load hands over.
pub struct Initial<'a> {
    /// The manifest served.
    pub manifest: &'a Manifest,
    /// The runtime everything loads into.
    pub runtime: Arc<Runtime>,
    /// The edge whose table deploys swap.
    pub edge: Arc<Edge>,
    /// The actor directory, if any.
    pub directory: Option<Arc<ActorDirectory>>,
    /// The upstreams.
    pub upstreams: BTreeMap<String, Arc<Upstream>>,
    /// The store's counters, if open.
    pub storage: Option<Arc<StoreStats>>,
    /// Component paths by function name.
    pub paths: &'a BTreeMap<String, PathBuf>,
    /// Loaded functions and their gates.
    pub functions: BTreeMap<String, (Arc<Function>, Arc<FunctionGate>)>,
    /// The traffic counters the edge records into.
    pub traffic: Arc<Traffic>,
    /// The cron triggers.
    pub cron: Arc<CronTriggers>,
    /// Whether reloads build sources.
    pub sources: Sources,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn hex_sha256(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Why a change failed inside the node: logged in full, the client told to
/// look at the log.
fn internal(what: &str, e: impl std::fmt::Display) -> DeployError {
    tracing::error!(target: "ignis::deploy", error = %e, "{what}");
    DeployError::Internal(format!("{what}; see the node's log"))
}

/// Marks a function as being changed until dropped.
struct Busy<'a> {
    set: &'a Mutex<BTreeSet<String>>,
    names: Vec<String>,
}

impl Drop for Busy<'_> {
    fn drop(&mut self) {
        let mut set = self.set.lock().unwrap_or_else(|p| p.into_inner());
        for n in &self.names {
            set.remove(n);
        }
    }
}

/// What a change swaps in, ready to commit.
struct Plan {
    doc: toml::Table,
    manifest: Manifest,
    /// Versions of the new manifest's functions (loaded).
    functions: BTreeMap<String, Version>,
    /// Functions whose version changed or that are gone.
    changed: Vec<String>,
}

/// Where a function's component comes from in a change.
enum Component {
    /// Keep the version serving if its table and bytes are the same.
    Resolve,
    /// This stored version (a rollback).
    Version(Version),
    /// These bytes (an upload).
    Bytes(Vec<u8>),
}

impl Deployments {
    /// The deployable state of a node that just loaded `initial`. Copies
    /// each component into `cache_dir/deploys/PID/`.
    pub fn new(initial: Initial<'_>) -> anyhow::Result<Arc<Deployments>> {
        let manifest = initial.manifest;
        let dir = deploy_dir(&manifest.server.cache_dir.join("deploys")).map_err(|e| {
            anyhow::anyhow!(
                "preparing {}/deploys: {e}",
                manifest.server.cache_dir.display()
            )
        })?;
        let doc: toml::Table = manifest
            .text
            .parse()
            .map_err(|e: toml::de::Error| anyhow::anyhow!("{}: {e}", manifest.path.display()))?;
        let started = now_ms();
        let mut functions = BTreeMap::new();
        let mut numbers = BTreeMap::new();
        for (name, (function, gate)) in initial.functions {
            let bytes = std::fs::read(&initial.paths[&name])
                .map_err(|e| anyhow::anyhow!("reading {}: {e}", initial.paths[&name].display()))?;
            let sha256 = hex_sha256(&bytes);
            let stored = store(&dir, &sha256, &bytes)?;
            numbers.insert(name.clone(), 1);
            functions.insert(
                name.clone(),
                Version {
                    number: 1,
                    sha256,
                    section: section(&doc, &name).unwrap_or(toml::Value::Table(Default::default())),
                    stored,
                    deployed_ms: started,
                    loaded: Some((function, gate)),
                },
            );
        }
        let mut live = Live {
            doc,
            manifest: manifest.clone(),
            functions,
            previous: BTreeMap::new(),
            numbers,
            traffic: initial.traffic,
            cron: initial.cron,
            records: VecDeque::new(),
        };
        live.records.push_front(DeployRecord {
            time_ms: started,
            function: "*".into(),
            action: "start",
            version: 1,
            by: "start".into(),
        });
        prune(&dir, &live);
        Ok(Arc::new(Deployments {
            runtime: initial.runtime,
            edge: initial.edge,
            directory: initial.directory,
            upstreams: initial.upstreams,
            storage: initial.storage,
            sources: initial.sources,
            dir,
            node: OnceLock::new(),
            busy: Mutex::new(BTreeSet::new()),
            live: tokio::sync::Mutex::new(live),
            cron_tasks: Mutex::new(None),
        }))
    }

    /// The admin view of what serves now (the node is built from it).
    pub fn parts(&self) -> NodeParts {
        let live = self.live.try_lock().expect("parts() before any change");
        self.parts_of(&live)
    }

    /// Connects the admin view the changes update.
    pub fn attach(&self, node: &Arc<Node>) {
        let _ = self.node.set(Arc::downgrade(node));
    }

    /// Starts the cron triggers (the node serves); they stop when
    /// [`Deployments::stop_cron`] runs.
    pub fn start_cron(&self) {
        let live = self.live.try_lock();
        let cron = match &live {
            Ok(live) => live.cron.clone(),
            Err(_) => return,
        };
        *self.cron_tasks.lock().unwrap_or_else(|p| p.into_inner()) = Some(cron.start());
    }

    /// Stops the cron triggers (a run in flight is cancelled).
    pub fn stop_cron(&self) {
        self.cron_tasks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
    }

    fn parts_of(&self, live: &Live) -> NodeParts {
        let versions = live
            .functions
            .iter()
            .map(|(name, v)| {
                let previous = live
                    .previous
                    .get(name)
                    .map(|p| p.iter().rev().map(|v| v.number).collect())
                    .unwrap_or_default();
                (
                    name.clone(),
                    VersionInfo {
                        version: v.number,
                        sha256: v.sha256.clone(),
                        deployed_ms: v.deployed_ms,
                        previous,
                    },
                )
            })
            .collect();
        NodeParts {
            functions: live
                .functions
                .iter()
                .filter_map(|(name, v)| v.loaded.clone().map(|l| (name.clone(), l)))
                .collect(),
            directory: self.directory.clone(),
            upstreams: self.upstreams.clone(),
            traffic: live.traffic.clone(),
            weights: live
                .manifest
                .tenants
                .iter()
                .map(|(name, t)| (name.clone(), t.weight))
                .collect(),
            cron: live.cron.clone(),
            storage: self.storage.clone(),
            routes: live.manifest.routes.clone(),
            versions,
            deploys: live.records.iter().cloned().collect(),
        }
    }

    fn claim(&self, names: &[String]) -> Result<Busy<'_>, DeployError> {
        let mut set = self.busy.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(taken) = names.iter().find(|n| set.contains(*n)) {
            return Err(DeployError::Conflict(format!(
                "another change to `{taken}` is under way; try again when it ends"
            )));
        }
        set.extend(names.iter().cloned());
        Ok(Busy {
            set: &self.busy,
            names: names.to_vec(),
        })
    }

    /// Reloads the manifest file (SIGHUP, `--watch`): rebuilds sources if
    /// this node builds them, swaps in what changed. On error nothing
    /// changes; the error names the file, line and key.
    pub async fn reload(&self, by: &str) -> Result<Vec<String>, DeployError> {
        let _busy = self.claim(&["*".to_string()])?;
        let mut live = self.live.lock().await;
        let path = live.manifest.path.clone();
        let text = std::fs::read_to_string(&path)
            .map_err(|e| DeployError::Invalid(format!("{}: cannot read: {e}", path.display())))?;
        let manifest = ignis_config::Manifest::from_str_at(&text, &path)
            .map_err(|e| DeployError::Invalid(e.to_string()))?;
        let doc: toml::Table = text.parse().map_err(|e: toml::de::Error| {
            DeployError::Invalid(format!("{}: {e}", path.display()))
        })?;
        let restart: Vec<&str> = doc
            .keys()
            .chain(live.doc.keys())
            .filter(|k| !RELOADABLE.contains(&k.as_str()))
            .filter(|k| doc.get(*k) != live.doc.get(*k))
            .map(String::as_str)
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        if !restart.is_empty() {
            return Err(DeployError::Invalid(format!(
                "{}: changing [{}] needs a restart; nothing was reloaded",
                path.display(),
                restart.join("], [")
            )));
        }
        // Build (or find) every component first, off the async threads.
        let sources = self.sources;
        let paths = {
            let manifest = manifest.clone();
            tokio::task::spawn_blocking(move || crate::app::component_paths(&manifest, sources))
                .await
                .map_err(|e| internal("building the guests failed", e))?
                .map_err(|e| DeployError::Invalid(format!("{e:#}")))?
        };
        let mut components = BTreeMap::new();
        for name in manifest.functions.keys() {
            let bytes = std::fs::read(&paths.functions[name]).map_err(|e| {
                DeployError::Invalid(format!("{}: {e}", paths.functions[name].display()))
            })?;
            components.insert(name.clone(), Component::Bytes(bytes));
        }
        let plan = self
            .plan(&live, doc, keep_fixed(manifest, &live.manifest), components)
            .await?;
        let changed = plan.changed.clone();
        self.commit(&mut live, plan, "reload", by);
        Ok(changed)
    }

    /// Checks, loads and pre-instantiates everything `manifest` needs
    /// that is not serving already. Changes nothing.
    async fn plan(
        &self,
        live: &Live,
        doc: toml::Table,
        manifest: Manifest,
        mut components: BTreeMap<String, Component>,
    ) -> Result<Plan, DeployError> {
        let settings = self.runtime.settings();
        let slots: u64 = manifest
            .functions
            .values()
            .map(|f| u64::from(f.limits.max_concurrency))
            .sum();
        if slots > u64::from(settings.function_slots) {
            return Err(DeployError::Invalid(format!(
                "the functions' max_concurrency total would be {slots}, past the {} slots this node reserved at start (server.function_slots; raising it needs a restart)",
                settings.function_slots
            )));
        }
        if let Some(f) = manifest
            .functions
            .values()
            .find(|f| f.limits.memory_bytes > settings.max_memory_bytes)
        {
            return Err(DeployError::Invalid(format!(
                "function `{}`: memory {} bytes is more than this node's pool slots hold ({} bytes, sized at start from the largest memory limit; a larger one needs a restart)",
                f.name, f.limits.memory_bytes, settings.max_memory_bytes
            )));
        }
        let mut functions = BTreeMap::new();
        let mut changed = Vec::new();
        for (name, config) in &manifest.functions {
            let current = live.functions.get(name);
            let new_section = section(&doc, name);
            let component = components.remove(name).unwrap_or(Component::Resolve);
            let version = match component {
                Component::Resolve => match current {
                    Some(v) if new_section.as_ref() == Some(&v.section) => v.clone(),
                    _ => {
                        return Err(internal(
                            "a change lost track of a function's component",
                            name,
                        ));
                    }
                },
                Component::Bytes(bytes) => {
                    let sha256 = hex_sha256(&bytes);
                    match current {
                        Some(v)
                            if v.sha256 == sha256 && new_section.as_ref() == Some(&v.section) =>
                        {
                            v.clone()
                        }
                        _ => {
                            let stored = store(&self.dir, &sha256, &bytes)
                                .map_err(|e| internal("storing the component failed", e))?;
                            Version {
                                number: live.numbers.get(name).copied().unwrap_or(0) + 1,
                                sha256,
                                section: new_section
                                    .clone()
                                    .unwrap_or_else(|| toml::Value::Table(Default::default())),
                                stored,
                                deployed_ms: 0,
                                loaded: None,
                            }
                        }
                    }
                }
                Component::Version(v) => v,
            };
            let version = if version.loaded.is_some() {
                version
            } else {
                let loaded = self.load(config, &version.stored).await?;
                changed.push(name.clone());
                Version {
                    loaded: Some(loaded),
                    section: new_section.unwrap_or(version.section),
                    ..version
                }
            };
            functions.insert(name.clone(), version);
        }
        changed.extend(
            live.functions
                .keys()
                .filter(|n| !manifest.functions.contains_key(*n))
                .cloned(),
        );
        Ok(Plan {
            doc,
            manifest,
            functions,
            changed,
        })
    }

    /// Compiles (or finds in the compile cache), links and instantiates
    /// once the component at `stored`, off the async threads.
    async fn load(
        &self,
        config: &ignis_config::FunctionConfig,
        stored: &Path,
    ) -> Result<(Arc<Function>, Arc<FunctionGate>), DeployError> {
        let runtime = self.runtime.clone();
        let (config, stored) = (config.clone(), stored.to_path_buf());
        let function = tokio::task::spawn_blocking(move || runtime.load_function(&config, &stored))
            .await
            .map_err(|e| internal("loading the component failed", e))?
            .map_err(|e| DeployError::Invalid(e.to_string()))?;
        // Instantiated once before it takes traffic: a component that
        // cannot start (its memory does not fit, a start function traps)
        // is refused here.
        function.instantiate_only().await.map_err(|e| {
            tracing::warn!(target: "ignis::deploy", function = %function.name(), error = ?e, "the new version failed to instantiate");
            DeployError::Invalid(format!(
                "function `{}`: the component failed to instantiate: {e:?}",
                function.name(),
            ))
        })?;
        let gate = FunctionGate::new(function.clone());
        Ok((function, gate))
    }

    /// Swaps `plan` in: routes, cron, admin view, then the records.
    fn commit(&self, live: &mut Live, plan: Plan, action: &'static str, by: &str) {
        let started = now_ms();
        let gates: BTreeMap<String, Arc<FunctionGate>> = plan
            .functions
            .iter()
            .filter_map(|(n, v)| v.loaded.as_ref().map(|(_, g)| (n.clone(), g.clone())))
            .collect();
        let traffic = live.traffic.next(&plan.manifest);
        // The manifest was validated and every target is loaded: these
        // cannot fail; if they do, nothing has been swapped yet.
        let cron = match live
            .cron
            .next(&plan.manifest, &gates, self.directory.as_ref())
        {
            Ok(c) => Arc::new(c),
            Err(e) => {
                tracing::error!(target: "ignis::deploy", error = %e, "cron triggers could not be rebuilt; change dropped");
                return;
            }
        };
        if let Err(e) = self.edge.swap(&plan.manifest, &gates, &traffic) {
            tracing::error!(target: "ignis::deploy", error = %e, "routing table could not be rebuilt; change dropped");
            return;
        }
        {
            let mut tasks = self.cron_tasks.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(old) = tasks.take() {
                old.retire();
                *tasks = Some(cron.start());
            }
        }
        for name in &plan.changed {
            if let Some(old) = live.functions.get(name) {
                let stack = live.previous.entry(name.clone()).or_default();
                // A rollback pops what it restores; anything else pushes
                // the version it replaces.
                if action != "rollback" {
                    stack.push(Version {
                        loaded: None,
                        ..old.clone()
                    });
                    if stack.len() > MAX_PREVIOUS {
                        stack.remove(0);
                    }
                }
            }
        }
        let mut functions = plan.functions;
        for name in &plan.changed {
            if let Some(v) = functions.get_mut(name) {
                v.deployed_ms = started;
                let n = live.numbers.entry(name.clone()).or_default();
                *n = (*n).max(v.number);
            }
            let (version, sha) = functions
                .get(name)
                .map_or((0, ""), |v| (v.number, v.sha256.as_str()));
            tracing::info!(target: "ignis::deploy", function = %name, action, version, sha256 = %sha, by, "function changed");
            live.records.push_front(DeployRecord {
                time_ms: started,
                function: name.clone(),
                action: if version == 0 { "delete" } else { action },
                version,
                by: by.to_string(),
            });
        }
        live.records.truncate(MAX_DEPLOY_RECORDS);
        live.doc = plan.doc;
        live.manifest = plan.manifest;
        live.functions = functions;
        live.traffic = traffic;
        live.cron = cron;
        if let Some(node) = self.node.get().and_then(Weak::upgrade) {
            node.replace(self.parts_of(live));
        }
        prune(&self.dir, live);
    }

    /// Runs one API change on `live` after claiming `function`.
    async fn api_change(
        &self,
        function: &str,
        by: &str,
        action: &'static str,
        expect_version: Option<u64>,
        change: impl FnOnce(&Live) -> Result<(toml::Table, Option<Component>), DeployError>,
    ) -> Result<Deployed, DeployError> {
        let started = Instant::now();
        let _busy = self.claim(&[function.to_string()])?;
        let mut live = self.live.lock().await;
        let current = live.functions.get(function).map_or(0, |v| v.number);
        if let Some(expected) = expect_version
            && expected != current
        {
            return Err(DeployError::Conflict(format!(
                "`{function}` is at version {current}, not {expected}"
            )));
        }
        let (doc, component) = change(&live)?;
        let text = toml::to_string(&doc).map_err(|e| internal("writing the manifest failed", e))?;
        let manifest = Manifest::from_str_at(&text, &live.manifest.path).map_err(|e| {
            DeployError::Invalid(match e {
                // Line numbers would point into a document the client never
                // saw; the key says where.
                ignis_config::ConfigError::Invalid { key, message, .. } => {
                    format!("{key}: {message}")
                }
                e => e.to_string(),
            })
        })?;
        let mut components = BTreeMap::new();
        if let Some(c) = component {
            components.insert(function.to_string(), c);
        }
        let plan = self
            .plan(&live, doc, keep_fixed(manifest, &live.manifest), components)
            .await?;
        let changed = !plan.changed.is_empty();
        let version = plan
            .functions
            .get(function)
            .map(|v| (v.number, v.sha256.clone()));
        if changed {
            self.commit(&mut live, plan, action, by);
        } else {
            tracing::info!(target: "ignis::deploy", function, action, by, "deploy of the version already serving: nothing changed");
        }
        if action == "rollback"
            && changed
            && let Some(stack) = live.previous.get_mut(function)
        {
            stack.pop();
        }
        let (version, sha256) = version.unwrap_or((0, String::new()));
        Ok(Deployed {
            function: function.to_string(),
            action,
            version,
            sha256,
            changed,
            took_ms: started.elapsed().as_millis() as u64,
        })
    }
}

impl Deployer for Deployments {
    fn deploy(&self, request: DeployRequest) -> Change<'_> {
        Box::pin(async move {
            let DeployRequest {
                function,
                config,
                component,
                expect_version,
                by,
            } = request;
            let mut table: toml::Table = config.parse().map_err(|e: toml::de::Error| {
                DeployError::Invalid(format!("config: {}", e.to_string().trim()))
            })?;
            // The upload is the component; the node fills in its path.
            table.remove("component");
            table.remove("build");
            let sha = hex_sha256(&component);
            let stored = store(&self.dir, &sha, &component)
                .map_err(|e| internal("storing the component failed", e))?;
            table.insert(
                "component".into(),
                toml::Value::String(stored.to_string_lossy().into_owned()),
            );
            let name = function.clone();
            self.api_change(&function, &by, "deploy", expect_version, move |live| {
                let mut doc = live.doc.clone();
                functions_table(&mut doc).insert(name, toml::Value::Table(table));
                Ok((doc, Some(Component::Bytes(component))))
            })
            .await
        })
    }

    fn rollback(&self, function: String, expect_version: Option<u64>, by: String) -> Change<'_> {
        Box::pin(async move {
            let name = function.clone();
            self.api_change(&function, &by, "rollback", expect_version, move |live| {
                let Some(v) = live.previous.get(&name).and_then(|p| p.last()).cloned() else {
                    return Err(DeployError::Conflict(format!(
                        "`{name}` has no earlier version to roll back to"
                    )));
                };
                let mut table = match &v.section {
                    toml::Value::Table(t) => t.clone(),
                    _ => toml::Table::new(),
                };
                table.remove("build");
                table.insert(
                    "component".into(),
                    toml::Value::String(v.stored.to_string_lossy().into_owned()),
                );
                let mut doc = live.doc.clone();
                functions_table(&mut doc).insert(name, toml::Value::Table(table));
                Ok((doc, Some(Component::Version(v))))
            })
            .await
        })
    }

    fn delete(&self, function: String, by: String) -> Change<'_> {
        Box::pin(async move {
            let name = function.clone();
            self.api_change(&function, &by, "delete", None, move |live| {
                if !live.functions.contains_key(&name) {
                    return Err(DeployError::NotFound(format!("no function `{name}`")));
                }
                let mut doc = live.doc.clone();
                functions_table(&mut doc).remove(&name);
                Ok((doc, None))
            })
            .await
        })
    }
}

/// `manifest` with the sections a change may not touch taken from
/// `serving` (they are equal in the file; this keeps what the command line
/// and environment overrode, such as the listen addresses and the admin
/// token).
fn keep_fixed(mut manifest: Manifest, serving: &Manifest) -> Manifest {
    manifest.server = serving.server.clone();
    manifest.storage = serving.storage.clone();
    manifest.backends = serving.backends.clone();
    manifest.tenants = serving.tenants.clone();
    manifest.tls = serving.tls.clone();
    manifest.upstreams = serving.upstreams.clone();
    manifest.admin = serving.admin.clone();
    manifest.actors = serving.actors.clone();
    manifest
}

/// The manifest document's `functions` table (created if missing).
fn functions_table(doc: &mut toml::Table) -> &mut toml::Table {
    let entry = doc
        .entry("functions")
        .or_insert_with(|| toml::Value::Table(toml::Table::new()));
    if !entry.is_table() {
        *entry = toml::Value::Table(toml::Table::new());
    }
    entry.as_table_mut().expect("just made a table")
}

/// Function `name`'s table in `doc`.
fn section(doc: &toml::Table, name: &str) -> Option<toml::Value> {
    doc.get("functions")?.get(name).cloned()
}

/// This process's directory of stored components, `deploys/PID`, made
/// empty; the directories of processes that are gone are deleted (several
/// nodes may share one cache directory, each prunes only its own).
fn deploy_dir(root: &Path) -> std::io::Result<PathBuf> {
    std::fs::create_dir_all(root)?;
    #[cfg(target_os = "linux")]
    for entry in std::fs::read_dir(root)?.flatten() {
        let gone = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
            .is_some_and(|pid| !Path::new(&format!("/proc/{pid}")).exists());
        if gone {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
    let dir = root.join(std::process::id().to_string());
    // A directory named by our pid was left by a process that had it before.
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// Writes `bytes` to `dir/SHA.wasm` unless it is there (write, then rename:
/// a reader never sees half a file).
fn store(dir: &Path, sha256: &str, bytes: &[u8]) -> std::io::Result<PathBuf> {
    let path = dir.join(format!("{sha256}.wasm"));
    if path.exists() {
        return Ok(path);
    }
    let tmp = dir.join(format!(".{sha256}.{}.tmp", std::process::id()));
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, &path)?;
    Ok(path)
}

/// Deletes the stored components no version names.
fn prune(dir: &Path, live: &Live) {
    let keep: BTreeSet<PathBuf> = live
        .functions
        .values()
        .chain(live.previous.values().flatten())
        .map(|v| v.stored.clone())
        .collect();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.extension().is_some_and(|e| e == "wasm") && !keep.contains(&path) {
            let _ = std::fs::remove_file(&path);
        }
    }
}
