//! Hot deploy: a new version of a function is compiled, linked and
//! instantiated once beside the one serving, then the routing table, the
//! admin view and the cron triggers swap to it together; requests that
//! arrived before the swap finish on the old version, whose instances,
//! pool slots and compiled code are freed when its last request ends. A
//! new version of an actor class is compiled and linked, then replaces the
//! class in the directory: each live activation finishes the message it
//! runs on the old version and takes its next on a fresh instance of the
//! new one (storage stays; what the old instance held in memory goes).
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
//! - What a reload may change: functions, actor classes (not which classes
//!   exist), routes and cron triggers. Any other section (server, storage,
//!   backends, tenants, TLS, upstreams, admin) needs a restart, and a
//!   reload that changes one is refused whole, naming it.
//! - The pool was sized at start (`server.function_slots`, doubled: a
//!   draining version beside its successor); a change that would take the
//!   functions' `max_concurrency` total past it, or a memory limit past the
//!   pool's slot size, is refused with the number to raise. (Actor
//!   activations have slots of their own, capped by the directory.)
//! - Every version's component is copied into the node's deploy directory
//!   (`cache_dir/deploys/node-HASH`, by manifest path) under its SHA-256,
//!   so a rollback restores the exact bytes even if the file it came from
//!   was rebuilt since. At most [`MAX_PREVIOUS`] earlier versions per unit
//!   are kept; files nothing names are deleted.
//! - A change made through the API is recorded (fsync, rename) before it is
//!   swapped in and answered, with the hash of the manifest file it was
//!   made on: a restart on the same manifest restores it, even after
//!   `kill -9`; a restart on an edited manifest, or a reload, serves the
//!   file and drops the record (the file wins).
//! - In cluster mode the database wins instead: a change is recorded there
//!   (the shared sections only: functions, actors, routes, triggers) before
//!   it is swapped in; every node applies the latest record over its own
//!   file's other sections and reports what it took; a reload of the
//!   node's own file is refused (`ignis cluster apply` records a file for
//!   every node).

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use ignis_actors::cron::{CronTasks, CronTriggers};
use ignis_actors::{ActorDirectory, FunctionGate};
use ignis_admin::deploy::{
    Change, DeployError, DeployRecord, DeployRequest, Deployed, Deployer, UnitKind, VersionInfo,
};
use ignis_admin::{MAX_DEPLOY_RECORDS, Node, NodeParts};
use ignis_config::Manifest;
use ignis_edge::observe::Traffic;
use ignis_edge::{Edge, Upstream};
use ignis_runtime::actor::ActorClass;
use ignis_runtime::{Function, Runtime};
use ignis_store::StoreStats;
use sha2::{Digest, Sha256};

use crate::app::Sources;
use crate::cluster::ClusterNode;

/// The record of changes made through the API, in the deploy directory.
const SAVED: &str = "api-changes.toml";

/// Earlier versions kept per function for rollbacks.
pub const MAX_PREVIOUS: usize = 5;

/// Manifest sections a reload may change; any other needs a restart.
const RELOADABLE: [&str; 4] = ["functions", "actors", "routes", "triggers"];

/// A function or an actor class, by name.
type Unit = (UnitKind, String);

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
    busy: Mutex<BTreeSet<Unit>>,
    live: tokio::sync::Mutex<Live>,
    /// The running cron tasks, while the node serves.
    cron_tasks: Mutex<Option<CronTasks>>,
    /// In cluster mode: changes are recorded in the cluster's database
    /// (instead of the local record) and followed from it.
    cluster: OnceLock<Arc<ClusterNode>>,
}

/// What serves now.
struct Live {
    /// SHA-256 of the manifest file's text as last loaded (API changes are
    /// recorded against it).
    base: String,
    doc: toml::Table,
    manifest: Manifest,
    units: BTreeMap<Unit, Version>,
    /// Rollback stacks, newest last.
    previous: BTreeMap<Unit, Vec<Version>>,
    /// Highest version number given per unit.
    numbers: BTreeMap<Unit, u64>,
    traffic: Arc<Traffic>,
    cron: Arc<CronTriggers>,
    records: VecDeque<DeployRecord>,
    /// In cluster mode, the number of the cluster's last change this node
    /// applied (0: none).
    cluster_seq: i64,
}

/// One version of a function or an actor class.
#[derive(Clone)]
struct Version {
    number: u64,
    sha256: String,
    /// Its manifest table as it was given.
    section: toml::Value,
    /// The copy of its component under `cache_dir/deploys/`.
    stored: PathBuf,
    deployed_ms: u64,
    /// What is loaded (current versions only: an earlier version is kept
    /// as bytes, never loaded).
    loaded: Option<Loaded>,
}

/// A loaded version.
#[derive(Clone)]
enum Loaded {
    Function(Arc<Function>, Arc<FunctionGate>),
    Actor(Arc<ActorClass>),
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
    /// Component paths.
    pub paths: &'a crate::app::ComponentPaths,
    /// Loaded functions and their gates (actor classes come from the
    /// directory).
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

/// Marks units as being changed until dropped.
struct Busy<'a> {
    set: &'a Mutex<BTreeSet<Unit>>,
    units: Vec<Unit>,
}

impl Drop for Busy<'_> {
    fn drop(&mut self) {
        let mut set = self.set.lock().unwrap_or_else(|p| p.into_inner());
        for u in &self.units {
            set.remove(u);
        }
    }
}

/// What a change swaps in, ready to commit.
struct Plan {
    doc: toml::Table,
    manifest: Manifest,
    /// Versions of the new manifest's units (loaded).
    units: BTreeMap<Unit, Version>,
    /// Units whose version changed or that are gone.
    changed: Vec<Unit>,
}

/// Where a unit's component comes from in a change.
enum Component {
    /// Keep the version serving (its table must be the same).
    Resolve,
    /// This stored version (a rollback).
    Version(Version),
    /// These bytes (an upload, or a file a reload read): kept if the table
    /// and the bytes are those serving.
    Bytes(Vec<u8>),
}

impl Deployments {
    /// The deployable state of a node that just loaded `initial`. Copies
    /// each component into `cache_dir/deploys/PID/`.
    pub fn new(initial: Initial<'_>) -> anyhow::Result<Arc<Deployments>> {
        let manifest = initial.manifest;
        let dir = deploy_dir(
            &manifest.server.cache_dir.join("deploys"),
            &manifest.path,
            manifest.cluster.is_some(),
        )
        .map_err(|e| {
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
        let mut loaded: Vec<(Unit, &PathBuf, Loaded)> = Vec::new();
        for (name, (function, gate)) in initial.functions {
            let path = &initial.paths.functions[&name];
            loaded.push((
                (UnitKind::Function, name),
                path,
                Loaded::Function(function, gate),
            ));
        }
        for class in initial.directory.iter().flat_map(|d| d.classes()) {
            let name = class.name().to_string();
            let path = &initial.paths.actors[&name];
            loaded.push(((UnitKind::Actor, name), path, Loaded::Actor(class)));
        }
        let mut units = BTreeMap::new();
        let mut numbers = BTreeMap::new();
        for (unit, path, l) in loaded {
            let bytes = std::fs::read(path)
                .map_err(|e| anyhow::anyhow!("reading {}: {e}", path.display()))?;
            let sha256 = hex_sha256(&bytes);
            let stored = store(&dir, &sha256, &bytes)?;
            numbers.insert(unit.clone(), 1);
            let section = section(&doc, &unit).unwrap_or(toml::Value::Table(Default::default()));
            units.insert(
                unit,
                Version {
                    number: 1,
                    sha256,
                    section,
                    stored,
                    deployed_ms: started,
                    loaded: Some(l),
                },
            );
        }
        let mut live = Live {
            base: hex_sha256(manifest.text.as_bytes()),
            doc,
            manifest: manifest.clone(),
            units,
            previous: BTreeMap::new(),
            numbers,
            traffic: initial.traffic,
            cron: initial.cron,
            records: VecDeque::new(),
            cluster_seq: 0,
        };
        live.records.push_front(DeployRecord {
            time_ms: started,
            kind: None,
            name: "*".into(),
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
            cluster: OnceLock::new(),
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
        let versions = |kind: UnitKind| {
            live.units
                .iter()
                .filter(|((k, _), _)| *k == kind)
                .map(|(unit, v)| {
                    let previous = live
                        .previous
                        .get(unit)
                        .map(|p| p.iter().rev().map(|v| v.number).collect())
                        .unwrap_or_default();
                    (
                        unit.1.clone(),
                        VersionInfo {
                            version: v.number,
                            sha256: v.sha256.clone(),
                            deployed_ms: v.deployed_ms,
                            previous,
                        },
                    )
                })
                .collect()
        };
        NodeParts {
            functions: live
                .units
                .iter()
                .filter_map(|((_, name), v)| match &v.loaded {
                    Some(Loaded::Function(f, g)) => Some((name.clone(), (f.clone(), g.clone()))),
                    _ => None,
                })
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
            versions: versions(UnitKind::Function),
            actor_versions: versions(UnitKind::Actor),
            deploys: live.records.iter().cloned().collect(),
        }
    }

    fn claim(&self, units: &[Unit]) -> Result<Busy<'_>, DeployError> {
        let mut set = self.busy.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((kind, name)) = units.iter().find(|u| set.contains(*u)) {
            return Err(DeployError::Conflict(format!(
                "another change to {} `{name}` is under way; try again when it ends",
                kind.noun()
            )));
        }
        set.extend(units.iter().cloned());
        Ok(Busy {
            set: &self.busy,
            units: units.to_vec(),
        })
    }

    /// Reloads the manifest file (SIGHUP, `--watch`): rebuilds sources if
    /// this node builds them, swaps in what changed. On error nothing
    /// changes; the error names the file, line and key.
    pub async fn reload(&self, by: &str) -> Result<Vec<String>, DeployError> {
        if self.cluster.get().is_some() {
            return Err(DeployError::Invalid(
                "this node is in cluster mode: its functions, actor classes, routes and triggers are the cluster's; record a changed manifest for every node with `ignis cluster apply FILE`".into(),
            ));
        }
        let _busy = self.claim(&[(UnitKind::Function, "*".to_string())])?;
        let mut live = self.live.lock().await;
        let path = live.manifest.path.clone();
        let text = std::fs::read_to_string(&path)
            .map_err(|e| DeployError::Invalid(format!("{}: cannot read: {e}", path.display())))?;
        let changed = self.apply_text(&mut live, &text, "reload", by).await?;
        // The file is what serves now: changes made through the API since
        // the last load are gone, and so is their record.
        live.base = hex_sha256(text.as_bytes());
        self.forget_saved();
        Ok(changed)
    }

    /// Restores the changes made through the API before the process
    /// stopped, if the manifest file is still the one they were made on.
    /// Called once, before the node serves. In cluster mode, applies the
    /// cluster's latest change instead.
    pub async fn restore(&self) {
        if self.cluster.get().is_some() {
            let _busy = self.claim(&[(UnitKind::Function, "*".to_string())]);
            let mut live = self.live.lock().await;
            if let Err(e) = self.catch_up(&mut live).await {
                tracing::error!(target: "ignis::deploy", error = %e, "the cluster's deployments could not be applied; serving the manifest");
            }
            return;
        }
        let Ok(saved) = std::fs::read_to_string(self.dir.join(SAVED)) else {
            return;
        };
        let _busy = self.claim(&[(UnitKind::Function, "*".to_string())]);
        let mut live = self.live.lock().await;
        let parsed: Option<(String, String)> = saved.parse::<toml::Table>().ok().and_then(|t| {
            Some((
                t.get("base_sha256")?.as_str()?.to_string(),
                t.get("document")?.as_str()?.to_string(),
            ))
        });
        let Some((base, document)) = parsed else {
            tracing::warn!(target: "ignis::deploy", file = %self.dir.join(SAVED).display(), "the record of API changes is unreadable; serving the manifest");
            self.forget_saved();
            return;
        };
        if base != live.base {
            tracing::warn!(target: "ignis::deploy", "the manifest changed since the last change made through the API; serving the manifest (the API changes are dropped)");
            self.forget_saved();
            return;
        }
        match self
            .apply_text(&mut live, &document, "restore", "start")
            .await
        {
            Ok(changed) => {
                tracing::info!(target: "ignis::deploy", changed = ?changed, "changes made through the API before the restart are restored");
            }
            Err(e) => {
                tracing::error!(target: "ignis::deploy", error = %e, "the changes made through the API before the restart could not be restored; serving the manifest");
                self.forget_saved();
            }
        }
    }

    /// Deletes the record of API changes (the manifest file wins).
    fn forget_saved(&self) {
        match std::fs::remove_file(self.dir.join(SAVED)) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                tracing::warn!(target: "ignis::deploy", error = %e, "could not delete the record of API changes");
            }
        }
    }

    /// Records `doc` (what serves after an API change) so that a restart on
    /// the same manifest serves it again: written to a temporary file,
    /// synced, renamed over the record, and the directory synced, before
    /// the change is answered.
    fn save(&self, live: &Live, doc: &toml::Table) -> Result<(), DeployError> {
        let document =
            toml::to_string(doc).map_err(|e| internal("writing the manifest failed", e))?;
        let mut record = toml::Table::new();
        record.insert("base_sha256".into(), toml::Value::String(live.base.clone()));
        record.insert("document".into(), toml::Value::String(document));
        let text =
            toml::to_string(&record).map_err(|e| internal("writing the record failed", e))?;
        let tmp = self.dir.join(format!(".{SAVED}.tmp"));
        let write = || -> std::io::Result<()> {
            use std::io::Write as _;
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(text.as_bytes())?;
            f.sync_all()?;
            std::fs::rename(&tmp, self.dir.join(SAVED))?;
            std::fs::File::open(&self.dir)?.sync_all()
        };
        write().map_err(|e| internal("recording the change failed (nothing changed)", e))
    }

    /// Parses `text` as the manifest, builds (or finds) every component and
    /// swaps in what changed. On error nothing changes.
    async fn apply_text(
        &self,
        live: &mut Live,
        text: &str,
        action: &'static str,
        by: &str,
    ) -> Result<Vec<String>, DeployError> {
        let path = live.manifest.path.clone();
        let manifest = ignis_config::Manifest::from_str_at(text, &path)
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
        let all = paths
            .functions
            .iter()
            .map(|(n, p)| ((UnitKind::Function, n.clone()), p))
            .chain(
                paths
                    .actors
                    .iter()
                    .map(|(n, p)| ((UnitKind::Actor, n.clone()), p)),
            );
        for (unit, path) in all {
            let bytes = std::fs::read(path)
                .map_err(|e| DeployError::Invalid(format!("{}: {e}", path.display())))?;
            components.insert(unit, Component::Bytes(bytes));
        }
        let planned = self
            .plan(live, doc, keep_fixed(manifest, &live.manifest), components)
            .await;
        let plan = match planned {
            Ok(plan) => plan,
            Err(e) => {
                prune(&self.dir, live);
                return Err(e);
            }
        };
        let changed = plan
            .changed
            .iter()
            .map(|(k, n)| format!("{} {n}", k.noun()))
            .collect();
        self.commit(live, plan, action, by);
        Ok(changed)
    }

    /// Checks, loads and pre-instantiates everything `manifest` needs
    /// that is not serving already. Changes nothing.
    async fn plan(
        &self,
        live: &Live,
        doc: toml::Table,
        manifest: Manifest,
        mut components: BTreeMap<Unit, Component>,
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
        let memories = manifest
            .functions
            .values()
            .map(|f| (UnitKind::Function, &f.name, f.limits.memory_bytes))
            .chain(
                manifest
                    .actors
                    .values()
                    .map(|a| (UnitKind::Actor, &a.name, a.limits.memory_bytes)),
            );
        for (kind, name, memory) in memories {
            if memory > settings.max_memory_bytes {
                return Err(DeployError::Invalid(format!(
                    "{} `{name}`: memory {memory} bytes is more than this node's pool slots hold ({} bytes, sized at start from the largest memory limit; a larger one needs a restart)",
                    kind.noun(),
                    settings.max_memory_bytes
                )));
            }
        }
        let classes_now: BTreeSet<&String> = live
            .units
            .keys()
            .filter(|(k, _)| *k == UnitKind::Actor)
            .map(|(_, n)| n)
            .collect();
        if manifest.actors.keys().collect::<BTreeSet<_>>() != classes_now {
            return Err(DeployError::Invalid(
                "adding or removing actor classes needs a restart (a change may replace a class, not add or remove one)".into(),
            ));
        }
        let wanted = manifest
            .functions
            .keys()
            .map(|n| (UnitKind::Function, n.clone()))
            .chain(manifest.actors.keys().map(|n| (UnitKind::Actor, n.clone())));
        let mut units = BTreeMap::new();
        let mut changed = Vec::new();
        for unit in wanted {
            let current = live.units.get(&unit);
            let new_section = section(&doc, &unit);
            let component = components.remove(&unit).unwrap_or(Component::Resolve);
            let version = match component {
                Component::Resolve => match current {
                    Some(v) if new_section.as_ref() == Some(&v.section) => v.clone(),
                    _ => {
                        return Err(internal(
                            "a change lost track of a component",
                            format!("{} {}", unit.0.noun(), unit.1),
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
                        _ => Version {
                            number: live.numbers.get(&unit).copied().unwrap_or(0) + 1,
                            stored: store(&self.dir, &sha256, &bytes)
                                .map_err(|e| internal("storing the component failed", e))?,
                            sha256,
                            section: new_section
                                .clone()
                                .unwrap_or_else(|| toml::Value::Table(Default::default())),
                            deployed_ms: 0,
                            loaded: None,
                        },
                    }
                }
                Component::Version(v) => v,
            };
            let version = if version.loaded.is_some() {
                version
            } else {
                let loaded = self.load(&manifest, &unit, &version.stored).await?;
                changed.push(unit.clone());
                Version {
                    loaded: Some(loaded),
                    section: new_section.unwrap_or(version.section),
                    ..version
                }
            };
            units.insert(unit, version);
        }
        changed.extend(
            live.units
                .keys()
                .filter(|u| !units.contains_key(*u))
                .cloned(),
        );
        Ok(Plan {
            doc,
            manifest,
            units,
            changed,
        })
    }

    /// Compiles (or finds in the compile cache) and links the component at
    /// `stored` off the async threads; a function is also instantiated
    /// once (an actor class is instantiated per activation, by id).
    async fn load(
        &self,
        manifest: &Manifest,
        (kind, name): &Unit,
        stored: &Path,
    ) -> Result<Loaded, DeployError> {
        let runtime = self.runtime.clone();
        let stored = stored.to_path_buf();
        match kind {
            UnitKind::Function => {
                let config = manifest.functions[name].clone();
                let function =
                    tokio::task::spawn_blocking(move || runtime.load_function(&config, &stored))
                        .await
                        .map_err(|e| internal("loading the component failed", e))?
                        .map_err(|e| DeployError::Invalid(e.to_string()))?;
                // Instantiated once before it takes traffic: a component
                // that cannot start (its memory does not fit, a start
                // function traps) is refused here.
                function.instantiate_only().await.map_err(|e| {
                    tracing::warn!(target: "ignis::deploy", function = %name, error = ?e, "the new version failed to instantiate");
                    DeployError::Invalid(format!(
                        "function `{name}`: the component failed to instantiate: {e:?}"
                    ))
                })?;
                let gate = FunctionGate::new(function.clone());
                Ok(Loaded::Function(function, gate))
            }
            UnitKind::Actor => {
                let config = manifest.actors[name].clone();
                let class =
                    tokio::task::spawn_blocking(move || runtime.load_actor_class(&config, &stored))
                        .await
                        .map_err(|e| internal("loading the component failed", e))?
                        .map_err(|e| DeployError::Invalid(e.to_string()))?;
                Ok(Loaded::Actor(class))
            }
        }
    }

    /// Swaps `plan` in: routes, cron, actor classes, admin view, then the
    /// records.
    fn commit(&self, live: &mut Live, plan: Plan, action: &'static str, by: &str) {
        let started = now_ms();
        let gates: BTreeMap<String, Arc<FunctionGate>> = plan
            .units
            .iter()
            .filter_map(|((_, n), v)| match &v.loaded {
                Some(Loaded::Function(_, g)) => Some((n.clone(), g.clone())),
                _ => None,
            })
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
        for unit in &plan.changed {
            if let (Some(directory), Some(Loaded::Actor(class))) = (
                &self.directory,
                plan.units.get(unit).and_then(|v| v.loaded.as_ref()),
            ) && let Err(e) = directory.replace_class(class.clone())
            {
                // The plan checked the class exists.
                tracing::error!(target: "ignis::deploy", error = %e, "actor class not replaced");
            }
        }
        {
            let mut tasks = self.cron_tasks.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(old) = tasks.take() {
                old.retire();
                *tasks = Some(cron.start());
            }
        }
        for unit in &plan.changed {
            if let Some(old) = live.units.get(unit) {
                let stack = live.previous.entry(unit.clone()).or_default();
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
        let mut units = plan.units;
        for unit in &plan.changed {
            if let Some(v) = units.get_mut(unit) {
                v.deployed_ms = started;
                let n = live.numbers.entry(unit.clone()).or_default();
                *n = (*n).max(v.number);
            }
            let (version, sha) = units
                .get(unit)
                .map_or((0, ""), |v| (v.number, v.sha256.as_str()));
            let (kind, name) = unit;
            tracing::info!(target: "ignis::deploy", kind = kind.noun(), name = %name, action, version, sha256 = %sha, by, "changed");
            live.records.push_front(DeployRecord {
                time_ms: started,
                kind: Some(*kind),
                name: name.clone(),
                action: if version == 0 { "delete" } else { action },
                version,
                by: by.to_string(),
            });
        }
        live.records.truncate(MAX_DEPLOY_RECORDS);
        live.doc = plan.doc;
        live.manifest = plan.manifest;
        live.units = units;
        live.traffic = traffic;
        live.cron = cron;
        if let Some(node) = self.node.get().and_then(Weak::upgrade) {
            node.replace(self.parts_of(live));
        }
        prune(&self.dir, live);
    }

    /// Runs one API change on `live` after claiming `unit`.
    async fn api_change(
        &self,
        unit: Unit,
        by: &str,
        action: &'static str,
        expect_version: Option<u64>,
        change: impl FnOnce(&Live) -> Result<(toml::Table, Option<Component>), DeployError>,
    ) -> Result<Deployed, DeployError> {
        let started = Instant::now();
        let _busy = self.claim(std::slice::from_ref(&unit))?;
        let mut live = self.live.lock().await;
        // A change is made on the cluster's latest deployments.
        self.catch_up(&mut live).await?;
        let (kind, name) = &unit;
        let current = live.units.get(&unit).map_or(0, |v| v.number);
        if let Some(expected) = expect_version
            && expected != current
        {
            return Err(DeployError::Conflict(format!(
                "{} `{name}` is at version {current}, not {expected}",
                kind.noun()
            )));
        }
        let planned = self.plan_change(&live, &unit, change).await;
        let plan = match planned {
            Ok(plan) => plan,
            Err(e) => {
                // An upload stored for a refused change goes now.
                prune(&self.dir, &live);
                return Err(e);
            }
        };
        let changed = !plan.changed.is_empty();
        let version = plan.units.get(&unit).map(|v| (v.number, v.sha256.clone()));
        if changed {
            // Recorded before it is swapped in and answered: an
            // acknowledged change survives a crash (in cluster mode, in
            // the database, where the other nodes take it from).
            let recorded = match self.cluster.get() {
                Some(node) => self.publish(node, &mut live, &plan, by).await,
                None => self.save(&live, &plan.doc),
            };
            if let Err(e) = recorded {
                prune(&self.dir, &live);
                return Err(e);
            }
            self.commit(&mut live, plan, action, by);
        } else {
            tracing::info!(target: "ignis::deploy", kind = kind.noun(), name = %name, action, by, "deploy of the version already serving: nothing changed");
        }
        if action == "rollback"
            && changed
            && let Some(stack) = live.previous.get_mut(&unit)
        {
            stack.pop();
        }
        let (version, sha256) = version.unwrap_or((0, String::new()));
        Ok(Deployed {
            kind: *kind,
            name: name.clone(),
            action,
            version,
            sha256,
            changed,
            took_ms: started.elapsed().as_millis() as u64,
        })
    }
}

/// How long a node waits for a notification before it looks at the
/// cluster's deploy records anyway (the fallback when `NOTIFY` is lost).
const CLUSTER_POLL: std::time::Duration = std::time::Duration::from_secs(1);

impl Deployments {
    /// Makes this node follow (and record its changes in) the cluster's
    /// deployments.
    pub fn attach_cluster(&self, node: Arc<ClusterNode>) {
        let _ = self.cluster.set(node);
    }

    /// Applies the cluster's changes as they are recorded: woken by
    /// `NOTIFY`, and every [`CLUSTER_POLL`] anyway. Runs until the process
    /// ends; a no-op outside cluster mode.
    pub async fn follow_cluster(self: Arc<Self>) {
        let Some(node) = self.cluster.get().cloned() else {
            return;
        };
        let mut notified = node.store().listen(ignis_store::cluster::DEPLOY_CHANNEL);
        loop {
            let _ = tokio::time::timeout(CLUSTER_POLL, notified.recv()).await;
            // A change under way here catches up first by itself.
            let Ok(_busy) = self.claim(&[(UnitKind::Function, "*".to_string())]) else {
                continue;
            };
            let mut live = self.live.lock().await;
            if let Err(e) = self.catch_up(&mut live).await {
                tracing::warn!(target: "ignis::deploy", error = %e, "following the cluster's deployments");
            }
        }
    }

    /// Applies the cluster's latest change if this node has not.
    async fn catch_up(&self, live: &mut Live) -> Result<(), DeployError> {
        let Some(node) = self.cluster.get() else {
            return Ok(());
        };
        let latest = node.store().latest_deploy().await.map_err(|e| {
            DeployError::Internal(format!("reading the cluster's deployments failed: {e}"))
        })?;
        let Some(row) = latest.filter(|r| r.seq > live.cluster_seq) else {
            return Ok(());
        };
        let seq = row.seq;
        let started = Instant::now();
        let outcome = self.apply_record(node, live, row).await;
        // Seen either way: a change this node cannot apply is logged once,
        // not retried every second, and reported (for `ignis cluster
        // apply`).
        live.cluster_seq = seq;
        let error = outcome.as_ref().err().map(ToString::to_string);
        node.report_applied(seq, error.as_deref()).await;
        match outcome {
            Ok(changed) => {
                tracing::info!(target: "ignis::deploy", seq, changed = ?changed, took_ms = started.elapsed().as_millis() as u64, "applied the cluster's deployments");
                Ok(())
            }
            Err(e) => {
                tracing::error!(target: "ignis::deploy", seq, error = %e, "the cluster's change could not be applied on this node; it serves what it had");
                Err(e)
            }
        }
    }

    /// Applies recorded change `row`: fetches the components it names that
    /// this node lacks, points the document at its own copies, and swaps
    /// in what changed.
    async fn apply_record(
        &self,
        node: &ClusterNode,
        live: &mut Live,
        row: ignis_store::cluster::DeployRow,
    ) -> Result<Vec<String>, DeployError> {
        let recorded: toml::Table = row
            .document
            .parse()
            .map_err(|e| internal("the recorded document is not TOML", e))?;
        // The shared sections come from the record; every other one stays
        // this node's own (listen addresses, storage, tokens).
        let mut doc = live.doc.clone();
        for key in RELOADABLE {
            match recorded.get(key) {
                Some(v) => doc.insert(key.to_string(), v.clone()),
                None => doc.remove(key),
            };
        }
        let components: BTreeMap<String, String> = serde_json::from_str(&row.components)
            .map_err(|e| internal("the recorded components are not JSON", e))?;
        for (key, sha) in components {
            let (table, name) = key
                .split_once('/')
                .ok_or_else(|| internal("a recorded component key is malformed", &key))?;
            if sha.len() != 64 || !sha.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(internal("a recorded component hash is malformed", &key));
            }
            let path = self.dir.join(format!("{sha}.wasm"));
            if !path.exists() {
                let bytes = node
                    .store()
                    .component(&sha)
                    .await
                    .map_err(|e| internal("fetching a component failed", e))?
                    .ok_or_else(|| internal("a recorded component is missing", &key))?;
                if hex_sha256(&bytes) != sha {
                    return Err(internal(
                        "a fetched component does not match its hash",
                        &key,
                    ));
                }
                store(&self.dir, &sha, &bytes)
                    .map_err(|e| internal("storing the component failed", e))?;
            }
            if let Some(section) = doc
                .get_mut(table)
                .and_then(|t| t.get_mut(name))
                .and_then(|s| s.as_table_mut())
            {
                section.insert(
                    "component".into(),
                    toml::Value::String(path.to_string_lossy().into_owned()),
                );
            }
        }
        let text = toml::to_string(&doc).map_err(|e| internal("writing the manifest failed", e))?;
        self.apply_text(
            live,
            &text,
            "cluster",
            &format!("{} on {}", row.by, row.node),
        )
        .await
    }

    /// Records the change `plan` (made on the cluster's change number
    /// `live.cluster_seq`) as the next one, with the components it adds.
    /// Refused if another node recorded that number first.
    async fn publish(
        &self,
        node: &ClusterNode,
        live: &mut Live,
        plan: &Plan,
        by: &str,
    ) -> Result<(), DeployError> {
        let mut components = BTreeMap::new();
        let mut bytes = Vec::new();
        for (unit, v) in &plan.units {
            // Units whose component the API manages (the document names the
            // node's stored copy) travel by hash; the rest are the
            // manifest file's, which every node has.
            let named = section(&plan.doc, unit)
                .and_then(|s| s.get("component")?.as_str().map(str::to_string));
            if named.as_deref() != Some(&*v.stored.to_string_lossy()) {
                continue;
            }
            components.insert(format!("{}/{}", unit.0.table(), unit.1), v.sha256.clone());
            if plan.changed.contains(unit) {
                let b = std::fs::read(&v.stored)
                    .map_err(|e| internal("reading a stored component failed", e))?;
                bytes.push((v.sha256.clone(), b));
            }
        }
        let row = ignis_store::cluster::DeployRow {
            seq: live.cluster_seq + 1,
            base: live.base.clone(),
            document: toml::to_string(&shared_sections(&plan.doc))
                .map_err(|e| internal("writing the manifest failed", e))?,
            components: serde_json::to_string(&components)
                .map_err(|e| internal("writing the components failed", e))?,
            node: node.id().to_string(),
            by: by.to_string(),
        };
        match node.store().publish_deploy(&row, &bytes).await {
            Ok(true) => {
                live.cluster_seq = row.seq;
                // Swapped in right after this returns (nothing there fails).
                node.report_applied(row.seq, None).await;
                Ok(())
            }
            Ok(false) => Err(DeployError::Conflict(
                "another node changed the cluster's deployments meanwhile; try again".into(),
            )),
            Err(e) => Err(internal(
                "recording the change in the cluster's database failed (nothing changed)",
                e,
            )),
        }
    }

    /// Applies `change` to a copy of the document and plans the result.
    async fn plan_change(
        &self,
        live: &Live,
        unit: &Unit,
        change: impl FnOnce(&Live) -> Result<(toml::Table, Option<Component>), DeployError>,
    ) -> Result<Plan, DeployError> {
        let (doc, component) = change(live)?;
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
            components.insert(unit.clone(), c);
        }
        self.plan(live, doc, keep_fixed(manifest, &live.manifest), components)
            .await
    }
}

impl Deployer for Deployments {
    fn deploy(&self, request: DeployRequest) -> Change<'_> {
        Box::pin(async move {
            let DeployRequest {
                kind,
                name,
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
            let unit = (kind, name.clone());
            let dir = &self.dir;
            self.api_change(unit, &by, "deploy", expect_version, move |live| {
                // Stored under the change's lock: a refused upload is
                // deleted before the next change can keep it alive.
                let sha = hex_sha256(&component);
                let stored = store(dir, &sha, &component)
                    .map_err(|e| internal("storing the component failed", e))?;
                table.insert(
                    "component".into(),
                    toml::Value::String(stored.to_string_lossy().into_owned()),
                );
                let mut doc = live.doc.clone();
                unit_table(&mut doc, kind).insert(name, toml::Value::Table(table));
                Ok((doc, Some(Component::Bytes(component))))
            })
            .await
        })
    }

    fn rollback(
        &self,
        kind: UnitKind,
        name: String,
        expect_version: Option<u64>,
        by: String,
    ) -> Change<'_> {
        Box::pin(async move {
            let unit = (kind, name.clone());
            let key = unit.clone();
            self.api_change(unit, &by, "rollback", expect_version, move |live| {
                let Some(v) = live.previous.get(&key).and_then(|p| p.last()).cloned() else {
                    return Err(DeployError::Conflict(format!(
                        "{} `{name}` has no earlier version to roll back to",
                        kind.noun()
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
                unit_table(&mut doc, kind).insert(name, toml::Value::Table(table));
                Ok((doc, Some(Component::Version(v))))
            })
            .await
        })
    }

    fn delete(&self, function: String, by: String) -> Change<'_> {
        Box::pin(async move {
            let unit = (UnitKind::Function, function.clone());
            let key = unit.clone();
            self.api_change(unit, &by, "delete", None, move |live| {
                if !live.units.contains_key(&key) {
                    return Err(DeployError::NotFound(format!("no function `{function}`")));
                }
                let mut doc = live.doc.clone();
                unit_table(&mut doc, UnitKind::Function).remove(&function);
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
    manifest.cluster = serving.cluster.clone();
    manifest
}

/// Records the manifest `text` (its components at `paths`) as the
/// cluster's next change, for `ignis cluster apply`: its shared sections,
/// with every function's and actor class's component by hash (the bytes
/// go into the database; `build` keys go, the component is what runs).
/// Returns the change's number. Refused, with nothing written, if another
/// change took that number first.
pub async fn record_manifest(
    store: &ignis_store::PgStore,
    text: &str,
    paths: &crate::app::ComponentPaths,
    by: &str,
) -> anyhow::Result<i64> {
    use anyhow::Context as _;
    let doc: toml::Table = text.parse().context("the manifest is not TOML")?;
    let mut doc = shared_sections(&doc);
    let mut components = BTreeMap::new();
    let mut blobs = Vec::new();
    let units = paths
        .functions
        .iter()
        .map(|(n, p)| (UnitKind::Function, n, p))
        .chain(paths.actors.iter().map(|(n, p)| (UnitKind::Actor, n, p)));
    for (kind, name, path) in units {
        let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        let sha = hex_sha256(&bytes);
        let section = unit_table(&mut doc, kind)
            .get_mut(name)
            .and_then(|s| s.as_table_mut())
            .with_context(|| format!("the manifest has no table for {} `{name}`", kind.noun()))?;
        section.remove("build");
        section.insert(
            "component".into(),
            toml::Value::String(format!("sha256:{sha}")),
        );
        components.insert(format!("{}/{name}", kind.table()), sha.clone());
        blobs.push((sha, bytes));
    }
    let latest = store
        .latest_deploy()
        .await
        .context("reading the cluster's deployments")?
        .map_or(0, |r| r.seq);
    let row = ignis_store::cluster::DeployRow {
        seq: latest + 1,
        base: hex_sha256(text.as_bytes()),
        document: toml::to_string(&doc).context("writing the manifest")?,
        components: serde_json::to_string(&components).context("writing the components")?,
        node: "ignis cluster apply".into(),
        by: by.to_string(),
    };
    let recorded = store
        .publish_deploy(&row, &blobs)
        .await
        .context("recording the change in the cluster's database (nothing changed)")?;
    anyhow::ensure!(
        recorded,
        "another change was recorded as number {} meanwhile; nothing was recorded: apply again",
        row.seq
    );
    Ok(row.seq)
}

/// The sections of `doc` a cluster shares (what a reload may change);
/// the others are each node's own and never leave it.
fn shared_sections(doc: &toml::Table) -> toml::Table {
    doc.iter()
        .filter(|(k, _)| RELOADABLE.contains(&k.as_str()))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

/// The manifest document's table of `kind` (created if missing).
fn unit_table(doc: &mut toml::Table, kind: UnitKind) -> &mut toml::Table {
    let entry = doc
        .entry(kind.table())
        .or_insert_with(|| toml::Value::Table(toml::Table::new()));
    if !entry.is_table() {
        *entry = toml::Value::Table(toml::Table::new());
    }
    entry.as_table_mut().expect("just made a table")
}

/// Unit `(kind, name)`'s table in `doc`.
fn section(doc: &toml::Table, (kind, name): &Unit) -> Option<toml::Value> {
    doc.get(kind.table())?.get(name).cloned()
}

/// The node's directory of stored components and of the record of API
/// changes: `deploys/` plus a hash of the manifest's path, so nodes on
/// different manifests sharing a cache directory keep apart (one node per
/// manifest and cache directory). Kept across restarts (the record and
/// the components it names must survive one). A node of a cluster keeps
/// its record in the database and may share its manifest and cache with
/// other nodes on the machine: its directory is `deploys/PID`, and those
/// whose process is gone are deleted.
fn deploy_dir(root: &Path, manifest: &Path, per_process: bool) -> std::io::Result<PathBuf> {
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
    if per_process {
        let dir = root.join(std::process::id().to_string());
        std::fs::create_dir_all(&dir)?;
        return Ok(dir);
    }
    let key = std::fs::canonicalize(manifest).unwrap_or_else(|_| manifest.to_path_buf());
    let hash = hex_sha256(key.to_string_lossy().as_bytes());
    let dir = root.join(format!("node-{}", &hash[..16]));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// Writes `bytes` to `dir/SHA.wasm` unless it is there (write, then rename:
/// a reader never sees half a file).
fn store(dir: &Path, sha256: &str, bytes: &[u8]) -> std::io::Result<PathBuf> {
    static TMP: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let path = dir.join(format!("{sha256}.wasm"));
    if path.exists() {
        return Ok(path);
    }
    let n = TMP.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = dir.join(format!(".{sha256}.{}.{n}.tmp", std::process::id()));
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, &path)?;
    Ok(path)
}

/// Deletes the stored components no version names (the serving ones,
/// the rollback stacks, and the record of API changes a restart restores).
fn prune(dir: &Path, live: &Live) {
    let keep: BTreeSet<PathBuf> = live
        .units
        .values()
        .chain(live.previous.values().flatten())
        .map(|v| v.stored.clone())
        .collect();
    let saved = std::fs::read_to_string(dir.join(SAVED)).unwrap_or_default();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let named = keep.contains(&path) || saved.contains(&*path.to_string_lossy());
        if path.extension().is_some_and(|e| e == "wasm") && !named {
            let _ = std::fs::remove_file(&path);
        }
    }
}
