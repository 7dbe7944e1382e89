//! The store data of every guest, and the two linkers that decide what a
//! guest may import.
//!
//! [`Host`] holds each capability as its own part: WASI and `wasi:http`
//! (every guest), the outbound-HTTP grant (functions), key-value and config
//! (functions), actor storage, alarms and context (actors), the actor
//! client (both), the memory limiter and the log capture. Each binding in
//! [`crate::bindings`] owns its state and a view type, and links itself
//! through a getter; this module is the only place that names both the
//! host and a binding.
//!
//! Invariant: a capability's part is `Some` in every store whose linker
//! carries that capability. Functions get [`Linker`]s from
//! [`function_linker`], actor classes from [`actor_linker`], and each
//! store is built by the same kind of guest ([`Host::for_function`],
//! [`Host::for_actor`]). So the getters' `expect`s cannot fire, and a
//! component importing something its kind is not given (a function
//! importing `ignis:actor/storage`, an actor importing `wasi:keyvalue`)
//! fails at load with the import named.

use std::sync::Arc;

use wasmtime::component::{Linker, ResourceTable};
use wasmtime::{Engine, Store};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};
use wasmtime_wasi_http::{WasiHttpCtx, WasiHttpCtxView, WasiHttpView};

use crate::RequestId;
use crate::bindings::actor::{ActorState, ActorView, ClientState, ClientView};
use crate::bindings::config::ConfigState;
use crate::bindings::http::OutboundHooks;
use crate::bindings::keyvalue::{KvState, KvView};
use crate::guest::GuestStats;
use crate::limits::MemoryLimiter;
use crate::stdio::GuestLog;
use crate::ticker::StoreLease;

/// Store data for one guest instance (see the module docs).
pub struct Host {
    wasi: WasiCtx,
    http: WasiHttpCtx,
    table: ResourceTable,
    outbound: OutboundHooks,
    kv: Option<KvState>,
    config: Option<ConfigState>,
    actor: Option<ActorState>,
    client: ClientState,
    pub(crate) limiter: MemoryLimiter,
    log: GuestLog,
    /// Keeps the epoch ticker running while this store runs a guest (an
    /// idle kept instance holds none, so an idle node's ticker parks).
    ticker: Option<StoreLease>,
}

/// What every guest gets, whatever its kind.
pub(crate) struct Base<'a> {
    /// Function or actor class name (tags logs).
    pub(crate) owner: Arc<str>,
    pub(crate) request_id: RequestId,
    pub(crate) env: &'a [(String, String)],
    pub(crate) memory_bytes: u64,
    pub(crate) ticker: StoreLease,
    /// Where the instance's largest memory size is recorded.
    pub(crate) stats: Arc<GuestStats>,
}

/// Live resources (header maps, streams, pollables, buckets, ...) one
/// instance may hold; past it the call that would add one fails (a guest
/// that leaks handles traps instead of growing the host's memory).
pub(crate) const MAX_RESOURCES: usize = 4096;

/// Largest in-memory size of one guest-built header map (wasi:http
/// `fields`), about 32 KiB of headers on the wire. With [`MAX_RESOURCES`]
/// this bounds what header maps can make the host hold for one instance.
pub(crate) const MAX_FIELDS_BYTES: usize = 64 * 1024;

impl Host {
    fn base(base: Base<'_>, outbound: OutboundHooks, client: ClientState) -> Host {
        let log = GuestLog::new(base.owner, base.request_id);
        let mut wasi = WasiCtx::builder();
        wasi.envs(base.env)
            .stdout(log.stdout.clone())
            .stderr(log.stderr.clone())
            .allow_tcp(false)
            .allow_udp(false);
        let mut http = WasiHttpCtx::new();
        http.set_field_size_limit(MAX_FIELDS_BYTES);
        let mut table = ResourceTable::new();
        table.set_max_capacity(MAX_RESOURCES);
        Host {
            wasi: wasi.build(),
            http,
            table,
            outbound,
            kv: None,
            config: None,
            actor: None,
            client,
            limiter: MemoryLimiter::new(base.memory_bytes).recording_into(base.stats),
            log,
            ticker: Some(base.ticker),
        }
    }

    /// A function request's host: outbound HTTP as granted, key-value,
    /// config and the actor client.
    pub(crate) fn for_function(
        base: Base<'_>,
        outbound: OutboundHooks,
        kv: KvState,
        config: ConfigState,
        client: ClientState,
    ) -> Host {
        let mut host = Host::base(base, outbound, client);
        host.kv = Some(kv);
        host.config = Some(config);
        host
    }

    /// An actor activation's host: its storage, alarms and context, and the
    /// actor client. Outbound HTTP is denied (actor classes have no
    /// allowlist).
    pub(crate) fn for_actor(
        base: Base<'_>,
        outbound: OutboundHooks,
        actor: ActorState,
        client: ClientState,
    ) -> Host {
        let mut host = Host::base(base, outbound, client);
        host.actor = Some(actor);
        host
    }

    /// Starts a new request on a kept instance (an actor's next message, a
    /// reused function instance): logs, outbound accounting, key-value and
    /// the actor client carry its id, the log budget and the outbound count
    /// start again, and the memory limiter forgets earlier refusals.
    pub(crate) fn begin_request(&mut self, request_id: RequestId) {
        self.log.begin(request_id);
        self.outbound.begin(request_id);
        self.client.begin(request_id);
        if let Some(kv) = &mut self.kv {
            kv.begin(request_id);
        }
        self.limiter.denied = false;
    }

    /// Ends a request on a kept instance: its output capture is closed (the
    /// partial line logged, dropped bytes reported).
    pub(crate) fn end_request(&mut self) {
        self.log.end();
    }

    /// Lets the store keep the epoch ticker running (`Some`) or not.
    pub(crate) fn set_ticker(&mut self, lease: Option<StoreLease>) {
        self.ticker = lease;
    }

    /// The actor part (only on actor hosts).
    pub(crate) fn actor_mut(&mut self) -> &mut ActorState {
        self.actor
            .as_mut()
            .expect("actor state exists on every actor host")
    }

    fn kv_view(&mut self) -> KvView<'_> {
        KvView::new(
            self.kv
                .as_ref()
                .expect("key-value state exists on every function host"),
            &mut self.table,
        )
    }

    fn actor_view(&mut self) -> ActorView<'_> {
        ActorView::new(self.actor_mut())
    }

    fn client_view(&mut self) -> ClientView<'_> {
        ClientView::new(&self.client)
    }

    fn config_view(&mut self) -> wasmtime_wasi_config::WasiConfig<'_> {
        self.config
            .as_ref()
            .expect("config state exists on every function host")
            .view()
    }
}

impl WasiView for Host {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl WasiHttpView for Host {
    fn http(&mut self) -> WasiHttpCtxView<'_> {
        WasiHttpCtxView {
            ctx: &mut self.http,
            table: &mut self.table,
            hooks: &mut self.outbound,
        }
    }
}

/// A store for `host`: its memory limiter, and an epoch deadline of one
/// tick that yields to the async executor (CPU-bound guests are
/// time-sliced).
pub(crate) fn new_store(engine: &Engine, host: Host) -> Store<Host> {
    let mut store = Store::new(engine, host);
    store.limiter(|h| &mut h.limiter);
    store.set_epoch_deadline(1);
    store.epoch_deadline_async_yield_and_update(1);
    store
}

/// WASI 0.2 and `wasi:http` 0.2: what every guest gets. Language standard
/// libraries import `wasi:cli` 0.2 even in 0.3 components, so the 0.3
/// linker carries it too.
fn base_linker(engine: &Engine) -> wasmtime::Result<Linker<Host>> {
    let mut linker = Linker::new(engine);
    wasmtime_wasi::p2::add_to_linker_async(&mut linker)?;
    wasmtime_wasi_http::p2::add_only_http_to_linker_async(&mut linker)?;
    crate::bindings::actor::add_client_to_linker(&mut linker, Host::client_view)?;
    Ok(linker)
}

/// A function's imports: the base, `wasi:keyvalue` (both drafts),
/// `wasi:config` and `ignis:actor/client`; with `p3`, WASI 0.3 and
/// `wasi:http` 0.3 as well.
pub(crate) fn function_linker(engine: &Engine, p3: bool) -> wasmtime::Result<Linker<Host>> {
    let mut linker = base_linker(engine)?;
    crate::bindings::keyvalue::add_to_linker(&mut linker, Host::kv_view)?;
    crate::bindings::config::add_to_linker(&mut linker, Host::config_view)?;
    if p3 {
        wasmtime_wasi::p3::add_to_linker(&mut linker)?;
        wasmtime_wasi_http::p3::add_to_linker(&mut linker)?;
    }
    Ok(linker)
}

/// An actor class's imports: the base and `ignis:actor` storage, alarms
/// and context.
pub(crate) fn actor_linker(engine: &Engine) -> wasmtime::Result<Linker<Host>> {
    let mut linker = base_linker(engine)?;
    crate::bindings::actor::add_storage_to_linker(&mut linker, Host::actor_view)?;
    Ok(linker)
}
