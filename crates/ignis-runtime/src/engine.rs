//! The runtime: one engine per WASI generation, the linkers, the compile
//! cache and the epoch ticker; it loads functions and actor classes and
//! hands each the [`Shared`] services they run with.

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use ignis_config::{FunctionConfig, Manifest};
use wasmtime::component::Linker;
use wasmtime::{Config, Enabled, Engine, InstanceAllocationStrategy, PoolingAllocationConfig};
use wasmtime_wasi_http::p2::bindings::ProxyPre;
use wasmtime_wasi_http::p3::bindings::ServicePre;

use crate::actor::ActorClass;
use crate::cache::CompileCache;
use crate::error::LoadError;
use crate::function::{Function, Pre};
use crate::host::{Host, actor_linker, function_linker};
use crate::limits::{MAX_CORE_INSTANCES, MAX_MEMORIES, MAX_TABLES};
use crate::sched::GuestScheduler;
use crate::shared::{Platform, Shared};
use crate::ticker::{IDLE_BEFORE_PARK, Ticker};
use ignis_config::ActorClassConfig;

/// Everything the runtime needs to know before any function loads.
#[derive(Debug, Clone)]
pub struct RuntimeSettings {
    /// Use the pooling allocator (recommended); on failure the runtime falls back to on-demand.
    pub pooling: bool,
    /// Epoch slice: guests yield to the scheduler this often.
    pub epoch_tick: Duration,
    /// Directory for compiled components.
    pub cache_dir: PathBuf,
    /// Instance slots to reserve in the pool (all functions together).
    pub instance_slots: u32,
    /// Slots the functions may use together, across deploys: a deploy that
    /// would take the functions' `max_concurrency` total past it is
    /// refused. The pool holds twice this (plus the activation slots): a
    /// draining version and its successor run side by side.
    pub function_slots: u32,
    /// The largest per-function memory limit (sizes a pool slot).
    pub max_memory_bytes: u64,
    /// Pool slots reserved for durable-actor activations (each live
    /// activation keeps its instance): the actor directory never holds more
    /// live activations than this, so actors cannot take the slots
    /// functions need.
    pub activation_slots: u32,
}

impl RuntimeSettings {
    /// Settings sized from a manifest: two pool slots per function slot
    /// (`server.function_slots`, by default the larger of the functions'
    /// `max_concurrency` sum and 256: room for deploys, and for a draining
    /// version beside its successor), plus the activation slots (the
    /// node's `server.max_activations`, or the classes' `max_activations`
    /// summed if that is smaller), capped at [`MAX_POOL_SLOTS`].
    pub fn from_manifest(m: &Manifest) -> Self {
        let manifest_slots: u64 = m
            .functions
            .values()
            .map(|f| u64::from(f.limits.max_concurrency))
            .sum();
        let function_slots = m.server.function_slots.map_or_else(
            || manifest_slots.max(u64::from(ignis_config::DEFAULT_FUNCTION_SLOTS)),
            u64::from,
        );
        let class_slots: u64 = m
            .actors
            .values()
            .map(|a| u64::from(a.max_activations))
            .sum();
        let activation_slots = class_slots.min(u64::from(m.server.max_activations));
        let wanted = 2 * function_slots + activation_slots;
        if wanted > u64::from(MAX_POOL_SLOTS) {
            tracing::warn!(
                function_slots,
                activation_slots,
                max = MAX_POOL_SLOTS,
                "the manifest asks for more instance slots than the pool holds; functions and actors may wait for slots"
            );
        }
        RuntimeSettings {
            pooling: m.server.pooling,
            epoch_tick: m.server.epoch_tick,
            cache_dir: m.server.cache_dir.clone(),
            instance_slots: wanted.clamp(16, u64::from(MAX_POOL_SLOTS)) as u32,
            function_slots: function_slots as u32,
            max_memory_bytes: m
                .functions
                .values()
                .map(|f| f.limits.memory_bytes)
                .chain(m.actors.values().map(|a| a.limits.memory_bytes))
                .max()
                .unwrap_or(64 << 20),
            activation_slots: activation_slots as u32,
        }
    }
}

/// Most instance slots one pool reserves (address space: each slot reserves
/// its largest memory).
pub const MAX_POOL_SLOTS: u32 = 4000;

/// What a function may import, for load errors.
const FUNCTION_IMPORTS: &str = "WASI 0.2 (and 0.3), wasi:http, wasi:keyvalue, wasi:config and ignis:actor/client; ignis:actor/storage, alarms and context are for actor classes";
/// What an actor class may import, for load errors.
const ACTOR_IMPORTS: &str =
    "WASI 0.2, wasi:http and ignis:actor (storage, alarms, context, client)";

/// Which instance allocator the engine ended up with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AllocatorKind {
    /// Pre-reserved slots, copy-on-write memory images.
    Pooling,
    /// An mmap per instance (the fallback).
    OnDemand,
}

/// The process-wide runtime: one engine per WASI generation, one epoch
/// ticker, a function linker per engine and an actor-class linker on the
/// 0.2 engine (see [`crate::host`] for what each grants).
///
/// `wasi:http` 0.2 components run on an engine without the component-model
/// async ABI: enabling `concurrency_support` costs every call on that engine
/// (it doubled the per-request time of a 0.2 hello, see docs/BENCHMARKS.md).
/// The 0.3 engine, which needs it, is built the first time a 0.3 component
/// loads, so a deployment without one pays nothing for it.
pub struct Runtime {
    p2: EngineSet,
    /// Actor classes: `wasi:http` 0.2 components on the 0.2 engine.
    actors: Linker<Host>,
    p3: Arc<OnceLock<EngineSet>>,
    cache: CompileCache,
    allocator: AllocatorKind,
    settings: RuntimeSettings,
    /// What functions and actor classes share with the runtime.
    shared: Arc<Shared>,
}

/// An engine and the linker that goes with it.
struct EngineSet {
    engine: Engine,
    linker: Linker<Host>,
}

/// Which WASI generation an engine serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Generation {
    P2,
    P3,
}

fn base_config(generation: Generation) -> Config {
    let mut config = Config::new();
    config.epoch_interruption(true);
    config.wasm_component_model(true);
    if generation == Generation::P3 {
        // WASI 0.3 components (`wasi:http/service`) use the async ABI.
        config.wasm_component_model_async(true);
    } else {
        config.wasm_component_model_async(false);
        config.concurrency_support(false);
    }
    // Copy-on-write images make instantiation independent of data-segment size.
    config.memory_init_cow(true);
    config
}

fn pooling_config(settings: &RuntimeSettings) -> PoolingAllocationConfig {
    let slots = settings.instance_slots;
    let mut pool = PoolingAllocationConfig::new();
    pool.total_component_instances(slots)
        // A Rust std component has a handful of core instances (the program
        // plus lowering shims); leave headroom for other toolchains.
        .total_core_instances(slots.saturating_mul(8))
        .total_memories(slots.saturating_mul(2))
        .total_tables(slots.saturating_mul(4))
        .total_stacks(slots)
        .max_memory_size(settings.max_memory_bytes as usize)
        // One component's share of the pool, whatever it is made of (the
        // memory limiter also caps the total bytes of all its memories).
        .max_core_instances_per_component(MAX_CORE_INSTANCES)
        .max_memories_per_component(MAX_MEMORIES)
        .max_tables_per_component(MAX_TABLES)
        .table_elements(TABLE_ELEMENTS)
        // Reused slots are reset with memset instead of madvise up to this
        // size, so the next request does not page-fault its heap back in.
        // With PAGEMAP_SCAN (Linux 6.7+) only the pages the last request
        // dirtied are reset, which makes a generous size cheap.
        .linear_memory_keep_resident(2 << 20)
        .table_keep_resident(64 << 10)
        .pagemap_scan(Enabled::Auto);
    pool
}

/// Elements one table of a pool slot holds (wasmtime's default is 20,000).
const TABLE_ELEMENTS: usize = 20_000;

/// Builds an engine for `generation`: pooling if asked and possible, else
/// on-demand with a log line saying why.
fn build_engine(
    settings: &RuntimeSettings,
    generation: Generation,
) -> anyhow::Result<(Engine, AllocatorKind)> {
    if !settings.pooling {
        return Ok((
            Engine::new(&base_config(generation))?,
            AllocatorKind::OnDemand,
        ));
    }
    let mut config = base_config(generation);
    config.allocation_strategy(InstanceAllocationStrategy::Pooling(pooling_config(
        settings,
    )));
    match Engine::new(&config) {
        Ok(engine) => Ok((engine, AllocatorKind::Pooling)),
        Err(e) => {
            tracing::warn!(
                error = %e,
                slots = settings.instance_slots,
                ?generation,
                "pooling allocator reservation failed; falling back to on-demand instance allocation (slower instantiation)"
            );
            Ok((
                Engine::new(&base_config(generation))?,
                AllocatorKind::OnDemand,
            ))
        }
    }
}

fn build_set(
    settings: &RuntimeSettings,
    generation: Generation,
) -> anyhow::Result<(EngineSet, AllocatorKind)> {
    let (engine, allocator) = build_engine(settings, generation)?;
    let linker = function_linker(&engine, generation == Generation::P3)?;
    tracing::info!(
        ?allocator,
        ?generation,
        slots = settings.instance_slots,
        "wasmtime engine ready"
    );
    Ok((EngineSet { engine, linker }, allocator))
}

impl Runtime {
    /// Builds the WASI 0.2 engine (pooling if asked and possible), starts the
    /// epoch ticker and prepares the linker with WASI p2 and `wasi:http`.
    pub fn new(settings: RuntimeSettings) -> anyhow::Result<Arc<Runtime>> {
        Self::with_scheduler(settings, None)
    }

    /// Like [`Runtime::new`], with a fair scheduler for guests that outlast
    /// their first slice (without one they stay on the caller's executor).
    pub fn with_scheduler(
        settings: RuntimeSettings,
        scheduler: Option<Arc<dyn GuestScheduler>>,
    ) -> anyhow::Result<Arc<Runtime>> {
        Self::with_platform(settings, scheduler, Platform::default())
    }

    /// Like [`Runtime::with_scheduler`], with the services the platform
    /// bindings use (key-value storage).
    pub fn with_platform(
        settings: RuntimeSettings,
        scheduler: Option<Arc<dyn GuestScheduler>>,
        platform: Platform,
    ) -> anyhow::Result<Arc<Runtime>> {
        let (p2, allocator) = build_set(&settings, Generation::P2)?;
        let actors = actor_linker(&p2.engine)?;
        let p3: Arc<OnceLock<EngineSet>> = Arc::new(OnceLock::new());
        let ticker = {
            let (p2, p3) = (p2.engine.clone(), p3.clone());
            Ticker::spawn(settings.epoch_tick, IDLE_BEFORE_PARK, move || {
                p2.increment_epoch();
                if let Some(set) = p3.get() {
                    set.engine.increment_epoch();
                }
            })?
        };
        Ok(Arc::new(Runtime {
            cache: CompileCache::new(settings.cache_dir.clone()),
            p2,
            actors,
            p3,
            allocator,
            shared: Arc::new(Shared {
                platform,
                ticker,
                scheduler,
                epoch_tick: settings.epoch_tick,
            }),
            settings,
        }))
    }

    /// The engine that serves `wasi:http` 0.2 components.
    pub fn engine(&self) -> &Engine {
        &self.p2.engine
    }

    /// Which allocator is in use.
    pub fn allocator(&self) -> AllocatorKind {
        self.allocator
    }

    /// The settings the runtime was built with.
    pub fn settings(&self) -> &RuntimeSettings {
        &self.settings
    }

    /// The compile cache.
    pub fn cache(&self) -> &CompileCache {
        &self.cache
    }

    /// The platform services.
    pub fn platform(&self) -> &Platform {
        &self.shared.platform
    }

    /// Epoch ticks so far. The ticker parks once its ticks have found no
    /// store for a second ([`IDLE_BEFORE_PARK`]), so an idle server does not
    /// tick.
    pub fn epoch_ticks(&self) -> u64 {
        self.shared.ticker.ticks()
    }

    /// Blocks the calling thread until the epoch ticker parks, at most
    /// `timeout`; returns whether it did. For tests and diagnostics.
    pub fn wait_epoch_ticker_parked(&self, timeout: Duration) -> bool {
        self.shared.ticker.wait_parked(timeout)
    }

    /// Loads an actor class's component (a `wasi:http` 0.2 component, which
    /// may export `ignis:actor/alarm-handler`).
    pub fn load_actor_class(
        self: &Arc<Self>,
        config: &ActorClassConfig,
        wasm: &Path,
    ) -> Result<Arc<ActorClass>, LoadError> {
        let name = &config.name;
        let storage =
            self.shared
                .platform
                .actor_storage
                .clone()
                .ok_or_else(|| LoadError::Other {
                    function: name.clone(),
                    reason: "no actor storage is configured".into(),
                })?;
        let (component, outcome) = self.cache.load_or_compile(&self.p2.engine, name, wasm)?;
        let instance_pre =
            self.actors
                .instantiate_pre(&component)
                .map_err(|e| LoadError::MissingImport {
                    function: name.clone(),
                    path: wasm.to_path_buf(),
                    reason: format!("{e:#} (an actor class may import {ACTOR_IMPORTS})"),
                })?;
        let pre = ProxyPre::new(instance_pre).map_err(|e| LoadError::WrongWorld {
            function: name.clone(),
            path: wasm.to_path_buf(),
            reason: format!("{e:#}"),
        })?;
        tracing::info!(actor_class = %name, path = %wasm.display(), cache = ?outcome, "actor class loaded");
        Ok(ActorClass::new(self.shared.clone(), config, pre, storage))
    }

    /// The fair scheduler, if one was installed.
    pub fn scheduler(&self) -> Option<&Arc<dyn GuestScheduler>> {
        self.shared.scheduler.as_ref()
    }

    fn p3(&self) -> anyhow::Result<&EngineSet> {
        if let Some(set) = self.p3.get() {
            return Ok(set);
        }
        let (set, _) = build_set(&self.settings, Generation::P3)?;
        // A concurrent loader may have won the race; either engine is fine.
        Ok(self.p3.get_or_init(|| set))
    }

    /// Loads (from the compile cache, or compiling and caching) the component
    /// at `wasm`, checks its imports and exports, and prepares it for
    /// per-request instantiation.
    ///
    /// A component that validates without the async ABI is a 0.2 candidate
    /// and must export `wasi:http/incoming-handler`; one that needs the async
    /// ABI goes to the 0.3 engine and must export `wasi:http/handler`.
    pub fn load_function(
        self: &Arc<Self>,
        config: &FunctionConfig,
        wasm: &Path,
    ) -> Result<Arc<Function>, LoadError> {
        let name = &config.name;
        let (set, component, outcome) =
            match self.cache.load_or_compile(&self.p2.engine, name, wasm) {
                Ok((component, outcome)) => (&self.p2, component, outcome),
                Err(LoadError::Invalid { .. }) => {
                    let set = self.p3().map_err(|e| LoadError::Other {
                        function: name.clone(),
                        reason: format!("building the WASI 0.3 engine: {e:#}"),
                    })?;
                    let (component, outcome) =
                        self.cache.load_or_compile(&set.engine, name, wasm)?;
                    (set, component, outcome)
                }
                Err(e) => return Err(e),
            };
        let instance_pre =
            set.linker
                .instantiate_pre(&component)
                .map_err(|e| LoadError::MissingImport {
                    function: name.clone(),
                    path: wasm.to_path_buf(),
                    reason: format!("{e:#} (a function may import {FUNCTION_IMPORTS})"),
                })?;
        let pre = if std::ptr::eq(set, &self.p2) {
            ProxyPre::new(instance_pre).map(Pre::P2)
        } else {
            ServicePre::new(instance_pre).map(Pre::P3)
        }
        .map_err(|e| LoadError::WrongWorld {
            function: name.clone(),
            path: wasm.to_path_buf(),
            reason: format!("{e:#}"),
        })?;
        if let (Pre::P2(_), ignis_config::ReuseSetting::On(reuse)) = (&pre, config.reuse)
            && reuse.max_concurrent > 1
        {
            return Err(LoadError::Other {
                function: name.clone(),
                reason: format!(
                    "reuse.max_concurrent = {} needs a wasi:http 0.3 component ({} exports the 0.2 world, whose instances serve one request at a time)",
                    reuse.max_concurrent,
                    wasm.display()
                ),
            });
        }
        tracing::info!(function = %name, path = %wasm.display(), cache = ?outcome, "function loaded");
        Ok(Function::new(self.shared.clone(), config, pre, outcome))
    }
}

#[cfg(test)]
mod tests {
    use wasm_encoder::{
        Component, InstanceSection, MemorySection, MemoryType, Module, ModuleArg, ModuleSection,
    };
    use wasmtime::Store;
    use wasmtime::component::Linker;

    use super::*;
    use crate::limits::MemoryLimiter;

    /// A component of `memories` core modules, each instantiated and each
    /// with one linear memory of `pages` 64 KiB pages.
    fn component_with_memories(memories: u32, pages: u64) -> Vec<u8> {
        let mut module = Module::new();
        let mut section = MemorySection::new();
        section.memory(MemoryType {
            minimum: pages,
            maximum: None,
            memory64: false,
            shared: false,
            page_size_log2: None,
        });
        module.section(&section);
        let mut component = Component::new();
        for _ in 0..memories {
            component.section(&ModuleSection(&module));
        }
        let mut instances = InstanceSection::new();
        for i in 0..memories {
            instances.instantiate(i, std::iter::empty::<(&str, ModuleArg)>());
        }
        component.section(&instances);
        component.finish()
    }

    fn settings(pooling: bool) -> RuntimeSettings {
        RuntimeSettings {
            pooling,
            epoch_tick: Duration::from_millis(1),
            cache_dir: PathBuf::from("unused"),
            instance_slots: 4,
            function_slots: 2,
            max_memory_bytes: 4 << 20,
            activation_slots: 0,
        }
    }

    /// Compiles and instantiates `wasm` under a 4 MiB limit: `Ok` or the
    /// error's text (the pooling allocator refuses a component that can
    /// never fit a slot when it is compiled, that is at load time).
    fn instantiate(pooling: bool, wasm: &[u8]) -> Result<(), String> {
        let (engine, kind) = build_engine(&settings(pooling), Generation::P2).unwrap();
        assert_eq!(kind == AllocatorKind::Pooling, pooling);
        let component =
            wasmtime::component::Component::new(&engine, wasm).map_err(|e| format!("{e:#}"))?;
        let mut store = Store::new(&engine, MemoryLimiter::new(4 << 20));
        store.limiter(|l| l);
        Linker::<MemoryLimiter>::new(&engine)
            .instantiate(&mut store, &component)
            .map(drop)
            .map_err(|e| format!("{e:#}"))
    }

    #[test]
    fn a_component_with_many_memories_gets_its_limit_in_total() {
        // Fails on the code before: each memory was checked on its own, so
        // two 3 MiB memories passed a 4 MiB limit.
        for pooling in [true, false] {
            assert_eq!(
                instantiate(pooling, &component_with_memories(2, 16)),
                Ok(())
            );
            let two_of_3mib = instantiate(pooling, &component_with_memories(2, 48));
            assert!(
                two_of_3mib.is_err(),
                "pooling {pooling}: 6 MiB under a 4 MiB limit"
            );
            // More memories than a component may have, however small.
            let five = instantiate(pooling, &component_with_memories(5, 1));
            assert!(
                five.as_ref().is_err_and(|e| e.contains("memor")),
                "pooling {pooling}: five memories: {five:?}"
            );
        }
    }
}
