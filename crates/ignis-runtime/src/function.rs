//! One deployed function and the life of one request inside it.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::Frame;
use http_body_util::BodyExt;
use http_body_util::combinators::UnsyncBoxBody;
use ignis_config::{FunctionConfig, Limits};
use tokio::sync::{Notify, OwnedSemaphorePermit, oneshot};
use tokio::time::Instant;
use wasmtime::Store;
use wasmtime::component::ResourceTable;
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};
use wasmtime_wasi_config::{WasiConfig, WasiConfigVariables};
use wasmtime_wasi_http::p2::bindings::ProxyPre;
use wasmtime_wasi_http::p2::bindings::http::types::Scheme;
use wasmtime_wasi_http::p2::body::HyperOutgoingBody;
use wasmtime_wasi_http::p3::bindings::ServicePre;
use wasmtime_wasi_http::{
    RequestOptions, WasiBody, WasiHttpCtx, WasiHttpCtxView, WasiHttpHooks, WasiHttpView,
};

use crate::Runtime;
use crate::actor::{ActorHost, CallerSlot};
use crate::cache::CacheOutcome;
use crate::engine::Platform;
use crate::error::GuestError;
use crate::kv::KvAccess;
use crate::limits::{CpuBudget, CpuExceeded, MemoryLimiter};
use crate::outbound::{Outbound, OutboundPolicy};
use crate::sched::SliceQueue;
use crate::stdio::LogCapture;
use crate::ticker::StoreLease;

/// Boxed error of response bodies.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The response body type: streamed from the guest as it writes.
pub type Body = UnsyncBoxBody<Bytes, BoxError>;

/// Per-request facts the edge passes in.
#[derive(Debug, Clone, Copy)]
pub struct RequestMeta {
    /// Unique id of the request (logged, and shown in error bodies).
    pub request_id: u64,
    /// Whether the request arrived over TLS.
    pub https: bool,
}

impl RequestMeta {
    /// A plain-HTTP request with this id.
    pub fn new(request_id: u64) -> Self {
        RequestMeta {
            request_id,
            https: false,
        }
    }
}

/// Store data for one request.
pub struct Host {
    wasi: WasiCtx,
    http: WasiHttpCtx,
    table: ResourceTable,
    limiter: MemoryLimiter,
    hooks: Hooks,
    kv: Arc<KvAccess>,
    config: Arc<WasiConfigVariables>,
    request_id: u64,
    actor: Option<Box<ActorHost>>,
    caller: CallerSlot,
    /// Keeps the epoch ticker running while this store exists.
    _ticker: StoreLease,
}

/// The parts of the host state the `ignis:actor` bindings use.
pub(crate) struct HostParts<'a> {
    pub(crate) actor: Option<&'a mut ActorHost>,
    pub(crate) caller: &'a CallerSlot,
}

impl Host {
    /// Host state for a durable actor's activation: no key-value stores,
    /// no config, no outbound HTTP; `ignis:actor` storage and alarms.
    pub(crate) fn for_actor(
        class: Arc<str>,
        env: &[(String, String)],
        memory_bytes: u64,
        platform: &Platform,
        actor: ActorHost,
        ticker: StoreLease,
    ) -> Host {
        let mut wasi = WasiCtx::builder();
        wasi.envs(env)
            .stdout(LogCapture::new(class.clone(), 0, "stdout"))
            .stderr(LogCapture::new(class.clone(), 0, "stderr"))
            .allow_tcp(false)
            .allow_udp(false);
        Host {
            wasi: wasi.build(),
            http: WasiHttpCtx::new(),
            table: ResourceTable::new(),
            limiter: MemoryLimiter::new(memory_bytes),
            hooks: Hooks {
                outbound: Arc::new(Outbound::new(OutboundPolicy::default(), Vec::new())),
                sent: 0,
                max_sent: 0,
                function: class.clone(),
                request_id: 0,
            },
            kv: Arc::new(KvAccess::new(None, class, "", &[], platform.kv_limits)),
            config: Arc::new(WasiConfigVariables::new()),
            request_id: 0,
            actor: Some(Box::new(actor)),
            caller: platform.actor_caller.clone(),
            _ticker: ticker,
        }
    }

    pub(crate) fn limiter_mut(&mut self) -> &mut MemoryLimiter {
        &mut self.limiter
    }

    pub(crate) fn memory_denied(&self) -> bool {
        self.limiter.denied
    }

    /// The actor state (only called on actor hosts).
    pub(crate) fn actor_mut(&mut self) -> &mut ActorHost {
        self.actor
            .as_deref_mut()
            .expect("actor host state on an actor activation")
    }

    pub(crate) fn actor_parts(&mut self) -> HostParts<'_> {
        HostParts {
            actor: self.actor.as_deref_mut(),
            caller: &self.caller,
        }
    }

    /// What the key-value bindings need: the function's access, the
    /// resource table and the request id.
    pub(crate) fn kv_parts(&mut self) -> (&KvAccess, &mut ResourceTable, u64) {
        (&self.kv, &mut self.table, self.request_id)
    }

    /// The `wasi:config` view.
    pub(crate) fn config(&mut self) -> WasiConfig<'_> {
        WasiConfig::from(&*self.config)
    }
}

struct Hooks {
    outbound: Arc<Outbound>,
    /// Outbound requests this guest request sent, and how many it may.
    sent: u32,
    max_sent: u32,
    function: Arc<str>,
    request_id: u64,
}

type IoFuture = Box<dyn Future<Output = Result<(), wasmtime_wasi_http::Error>> + Send>;

impl WasiHttpHooks for Hooks {
    fn send_request(
        &mut self,
        request: http::Request<WasiBody>,
        options: Option<RequestOptions>,
        _fut: IoFuture,
    ) -> Box<
        dyn Future<Output = wasmtime_wasi_http::Result<(http::Response<WasiBody>, IoFuture)>>
            + Send,
    > {
        if self.sent >= self.max_sent {
            tracing::warn!(function = %self.function, request_id = self.request_id, limit = self.max_sent, "outbound request denied: max_outbound_requests reached for this request");
            return Box::new(async { Err(wasmtime_wasi_http::Error::HttpRequestDenied) });
        }
        self.sent += 1;
        let outbound = self.outbound.clone();
        Box::new(async move {
            let response = outbound.send(request, options).await?;
            // The pool owns the connection task; nothing extra to drive here.
            Ok((response, Box::new(async { Ok(()) }) as IoFuture))
        })
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
            hooks: &mut self.hooks,
        }
    }
}

/// Counters for one function. `active` is the number of live instances.
#[derive(Debug, Default)]
pub struct FunctionStats {
    /// Requests received.
    pub requests: AtomicU64,
    /// Instances alive now.
    pub active: AtomicU64,
    /// Guest traps (including memory-limit traps).
    pub traps: AtomicU64,
    /// Requests stopped for memory.
    pub memory_kills: AtomicU64,
    /// Requests stopped at the CPU budget.
    pub cpu_kills: AtomicU64,
    /// Requests stopped at the wall deadline.
    pub wall_kills: AtomicU64,
    /// Requests whose client went away before the guest finished.
    pub cancelled: AtomicU64,
    /// Requests whose guest outlived its first slice and moved to the fair scheduler.
    pub demoted: AtomicU64,
    /// Requests started directly in the fair scheduler because the function's
    /// recent requests were CPU hogs.
    pub started_pooled: AtomicU64,
    /// CPU time used by all requests, in nanoseconds.
    pub cpu_nanos: AtomicU64,
    /// Moving average of "this request used more than half a slice of CPU",
    /// in 1/1024ths (see `Function::handle`).
    hog_score: AtomicU64,
    changed: Notify,
}

/// Weight of one request in the hog score's moving average: 1/8.
const HOG_STEP: u64 = 128;
/// Above this score (half of recent requests were hogs) new requests skip
/// the connection task and start in the fair scheduler.
const HOG_THRESHOLD: u64 = 512;

impl FunctionStats {
    /// Records one request's CPU time and updates the hog score.
    fn record_cpu(&self, used: Duration, hog_above: Duration) {
        self.cpu_nanos
            .fetch_add(used.as_nanos() as u64, Ordering::Relaxed);
        let hog = used >= hog_above;
        let _ = self
            .hog_score
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |s| {
                Some(s - s / 8 + if hog { HOG_STEP } else { 0 })
            });
    }

    /// Whether recent requests were mostly CPU hogs.
    pub fn mostly_hogs(&self) -> bool {
        self.hog_score.load(Ordering::Relaxed) > HOG_THRESHOLD
    }

    /// Waits until no instance of the function is alive.
    pub async fn wait_idle(&self) {
        self.wait_until(|s| s.active.load(Ordering::SeqCst) == 0)
            .await;
    }

    /// Waits until `check` holds; re-checked each time an instance starts or ends.
    pub async fn wait_until(&self, check: impl Fn(&Self) -> bool) {
        wait_on(&self.changed, || check(self)).await;
    }
}

/// Waits until `check` holds, re-checking it each time `changed` is
/// notified (with `notify_waiters`). Registers before checking, so a change
/// between the check and the wait is not missed.
pub async fn wait_on(changed: &Notify, check: impl Fn() -> bool) {
    loop {
        let notified = changed.notified();
        if check() {
            return;
        }
        notified.await;
    }
}

/// Keeps `active` right however the guest task ends (completion, abort, panic).
struct ActiveGuard(Arc<FunctionStats>);

impl ActiveGuard {
    fn new(stats: Arc<FunctionStats>) -> Self {
        stats.active.fetch_add(1, Ordering::SeqCst);
        stats.changed.notify_waiters();
        ActiveGuard(stats)
    }
}

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::SeqCst);
        self.0.changed.notify_waiters();
    }
}

/// The guest's response body. It also drives the guest: the guest runs
/// inside the connection's task (no spawn, no cross-thread wake-ups), and
/// each poll of the body first lets the guest make progress, then takes the
/// next frame it produced. Dropping the body before its end drops the guest,
/// which cancels it and frees its instance.
struct DrivingBody {
    inner: HyperOutgoingBody,
    guest: Option<GuestFuture>,
    /// Dropped when the body is complete (or dropped): tells a WASI 0.3
    /// guest's event loop that nobody reads the body any more.
    done: Option<oneshot::Sender<()>>,
}

type GuestFuture = Pin<Box<dyn Future<Output = Outcome> + Send>>;

impl http_body::Body for DrivingBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if let Some(guest) = self.guest.as_mut()
            && guest.as_mut().poll(cx).is_ready()
        {
            self.guest = None;
        }
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(None) = polled {
            self.done = None;
        }
        if let Poll::Ready(None) = polled
            && let Some(guest) = self.guest.take()
        {
            // The body is complete but the guest is still running (work after
            // the response): let it finish on its own, bounded by its deadlines.
            tokio::spawn(guest);
        }
        polled.map_err(Into::into)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// Counts a cancellation when the guest future is dropped before it finished.
struct CancelGuard {
    stats: Arc<FunctionStats>,
    finished: bool,
}

impl Drop for CancelGuard {
    fn drop(&mut self) {
        if !self.finished {
            self.stats.cancelled.fetch_add(1, Ordering::Relaxed);
        }
    }
}

enum Outcome {
    Done,
    Trap(wasmtime::Error),
    Memory,
    Cpu,
    Wall,
}

/// A prepared component, by the `wasi:http` world it exports.
#[derive(Clone)]
pub(crate) enum Pre {
    /// `wasi:http/proxy` 0.2.x (`incoming-handler`).
    P2(ProxyPre<Host>),
    /// `wasi:http/service` 0.3.x (`handler`).
    P3(ServicePre<Host>),
}

impl Pre {
    fn engine(&self) -> &wasmtime::Engine {
        match self {
            Pre::P2(pre) => pre.instance_pre().engine(),
            Pre::P3(pre) => pre.instance_pre().engine(),
        }
    }
}

/// A deployed function: a prepared component, its limits and its state.
pub struct Function {
    /// The engines and the epoch ticker (kept alive while the function exists).
    runtime: Arc<Runtime>,
    name: Arc<str>,
    tenant: String,
    pre: Pre,
    limits: Limits,
    env: Vec<(String, String)>,
    outbound: Arc<Outbound>,
    queue: Option<Arc<dyn SliceQueue>>,
    demote_after: Duration,
    stats: Arc<FunctionStats>,
    cache_outcome: CacheOutcome,
    kv: Arc<KvAccess>,
    config: Arc<WasiConfigVariables>,
    max_outbound_requests: u32,
    caller: CallerSlot,
}

impl Function {
    pub(crate) fn new(
        runtime: Arc<Runtime>,
        config: &FunctionConfig,
        pre: Pre,
        cache_outcome: CacheOutcome,
        platform: &Platform,
    ) -> anyhow::Result<Arc<Function>> {
        let name: Arc<str> = config.name.as_str().into();
        let queue = runtime.scheduler().map(|s| s.tenant_queue(&config.tenant));
        // A guest still running after half a slice of CPU in the caller's
        // task is a CPU hog: the rest of it goes to the fair scheduler.
        let demote_after = runtime.settings().epoch_tick / 2;
        Ok(Arc::new(Function {
            runtime,
            queue,
            demote_after,
            kv: Arc::new(KvAccess::new(
                platform.kv.clone(),
                name.clone(),
                &config.tenant,
                &config.key_value_stores,
                platform.kv_limits,
            )),
            config: Arc::new(
                config
                    .config
                    .iter()
                    .map(|(k, v)| (k.as_str(), v.value.as_str()))
                    .collect(),
            ),
            name,
            tenant: config.tenant.clone(),
            pre,
            limits: config.limits.clone(),
            env: config
                .env
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            outbound: Arc::new(Outbound::new(
                OutboundPolicy::new(&config.allowed_outbound_hosts),
                config
                    .backends
                    .iter()
                    .filter_map(|b| platform.backends.get(b).cloned())
                    .collect(),
            )),
            max_outbound_requests: config.max_outbound_requests,
            caller: platform.actor_caller.clone(),
            stats: Arc::new(FunctionStats::default()),
            cache_outcome,
        }))
    }

    /// The function's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The owning tenant.
    pub fn tenant(&self) -> &str {
        &self.tenant
    }

    /// Its limits.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Its counters.
    pub fn stats(&self) -> &Arc<FunctionStats> {
        &self.stats
    }

    /// Whether the component came from the compile cache.
    pub fn cache_outcome(&self) -> CacheOutcome {
        self.cache_outcome
    }

    /// The runtime the function runs on.
    pub fn runtime(&self) -> &Arc<Runtime> {
        &self.runtime
    }

    /// Outbound TCP connections opened by this function's pool so far.
    pub fn outbound_connections(&self) -> u64 {
        self.outbound.connections_opened()
    }

    fn new_store(&self, request_id: u64) -> Store<Host> {
        let mut wasi = WasiCtx::builder();
        wasi.envs(&self.env)
            .stdout(LogCapture::new(self.name.clone(), request_id, "stdout"))
            .stderr(LogCapture::new(self.name.clone(), request_id, "stderr"))
            .allow_tcp(false)
            .allow_udp(false);
        let host = Host {
            wasi: wasi.build(),
            http: WasiHttpCtx::new(),
            table: ResourceTable::new(),
            limiter: MemoryLimiter::new(self.limits.memory_bytes),
            hooks: Hooks {
                outbound: self.outbound.clone(),
                sent: 0,
                max_sent: self.max_outbound_requests,
                function: self.name.clone(),
                request_id,
            },
            kv: self.kv.clone(),
            config: self.config.clone(),
            request_id,
            actor: None,
            caller: self.caller.clone(),
            _ticker: self.runtime.store_lease(),
        };
        let mut store = Store::new(self.pre.engine(), host);
        store.limiter(|h| &mut h.limiter);
        // Yield to tokio at every epoch tick: CPU-bound guests are time-sliced.
        store.set_epoch_deadline(1);
        store.epoch_deadline_async_yield_and_update(1);
        store
    }

    /// Creates a store and instantiates the component, then drops both: the
    /// fixed per-request cost without the guest's own work (for benchmarks).
    #[doc(hidden)]
    pub async fn instantiate_only(&self) -> Result<(), GuestError> {
        let mut store = self.new_store(0);
        let instantiated = match &self.pre {
            Pre::P2(pre) => pre.instantiate_async(&mut store).await.map(drop),
            Pre::P3(pre) => pre.instantiate_async(&mut store).await.map(drop),
        };
        instantiated.map_err(|e| GuestError::Internal(format!("{e:#}")))
    }

    /// Runs one request in a fresh instance. The response is returned as soon
    /// as the guest sets it; its body streams while the guest writes it.
    ///
    /// Admission is the caller's job (`ignis-actors` caps concurrency and
    /// sheds); `slot`, if any, is held until the instance is freed.
    ///
    /// Dropping the returned future (or the response body before its end)
    /// cancels the guest and frees its instance.
    pub async fn handle<B>(
        &self,
        request: http::Request<B>,
        meta: RequestMeta,
        slot: Option<OwnedSemaphorePermit>,
    ) -> Result<http::Response<Body>, GuestError>
    where
        B: http_body::Body<Data = Bytes> + Send + 'static,
        B::Error: Into<wasmtime_wasi_http::Error>,
    {
        self.stats.requests.fetch_add(1, Ordering::Relaxed);
        let deadline = Instant::now() + self.limits.wall_time;
        let mut store = self.new_store(meta.request_id);
        let (tx, rx) = oneshot::channel::<Sent>();
        let (done_tx, done_rx) = oneshot::channel::<()>();
        let run: GuestRun = match &self.pre {
            Pre::P2(pre) => {
                let scheme = if meta.https {
                    Scheme::Https
                } else {
                    Scheme::Http
                };
                let mut http = store.data_mut().http();
                let req = http
                    .new_incoming_request(scheme, request)
                    .map_err(|e| GuestError::Internal(format!("{e:#}")))?;
                let out = http
                    .new_response_outparam_from_callback(move |sent| {
                        let _ = tx.send(sent.map_err(|code| format!("{code:?}")));
                    })
                    .map_err(|e| GuestError::Internal(format!("{e:#}")))?;
                drop(done_rx);
                Box::pin(run_p2(pre.clone(), store, req, out))
            }
            Pre::P3(pre) => {
                let (req, request_io) = wasmtime_wasi_http::p3::Request::from_http(
                    store.data_mut().http().hooks,
                    request,
                );
                Box::pin(run_p3(pre.clone(), store, req, request_io, tx, done_rx))
            }
        };
        let guest: GuestFuture = Box::pin(run_task(
            run,
            TaskContext {
                slot,
                demote_after: self.demote_after,
                active: ActiveGuard::new(self.stats.clone()),
                deadline,
                cpu_budget: self.limits.cpu_time,
                name: self.name.clone(),
                request_id: meta.request_id,
            },
        ));
        // CPU hogs go to the fair scheduler: after half a slice of CPU in
        // this task, or at once if the function's recent requests mostly did.
        let mut guest: GuestFuture = match &self.queue {
            Some(queue) => {
                let state = if self.stats.mostly_hogs() {
                    self.stats.started_pooled.fetch_add(1, Ordering::Relaxed);
                    SlicedState::Pooled(spawn_pooled(queue, guest))
                } else {
                    SlicedState::Inline(guest)
                };
                Box::pin(Sliced {
                    state,
                    used: Duration::ZERO,
                    demote_after: self.demote_after,
                    queue: queue.clone(),
                    stats: self.stats.clone(),
                })
            }
            None => guest,
        };
        let mut rx = rx;
        // Drive the guest in this task until it sets the response or ends.
        // If this future is dropped (client gone), the guest is dropped with it.
        let first = std::future::poll_fn(|cx| {
            if let Poll::Ready(sent) = Pin::new(&mut rx).poll(cx) {
                return Poll::Ready(First::Sent(sent));
            }
            guest.as_mut().poll(cx).map(First::Ended)
        })
        .await;
        let (sent, guest) = match first {
            First::Sent(sent) => (sent, Some(guest)),
            First::Ended(outcome) => match rx.try_recv() {
                // Responded, then finished: the body may still hold data.
                Ok(sent) => (Ok(sent), None),
                Err(_) => return Err(outcome.into_error()),
            },
        };
        match sent {
            Ok(Ok(response)) => Ok(response.map(|inner| {
                DrivingBody {
                    inner,
                    guest,
                    done: Some(done_tx),
                }
                .boxed_unsync()
            })),
            Ok(Err(code)) => Err(GuestError::GuestErrorCode(code)),
            // The guest dropped its response-outparam without using it: wait for it to end.
            Err(_) => match guest {
                Some(guest) => Err(guest.await.into_error()),
                None => Err(GuestError::NoResponse),
            },
        }
    }
}

/// What the guest answered: a response, or the `wasi:http` error code it gave instead.
type Sent = Result<http::Response<WasiBody>, String>;

enum First {
    Sent(Result<Sent, oneshot::error::RecvError>),
    Ended(Outcome),
}

impl Outcome {
    fn into_error(self) -> GuestError {
        match self {
            Outcome::Done => GuestError::NoResponse,
            Outcome::Trap(e) => GuestError::Trap(format!("{e:?}")),
            Outcome::Memory => GuestError::MemoryLimit,
            Outcome::Cpu => GuestError::CpuLimit,
            Outcome::Wall => GuestError::WallLimit,
        }
    }
}

struct TaskContext {
    slot: Option<OwnedSemaphorePermit>,
    demote_after: Duration,
    active: ActiveGuard,
    deadline: Instant,
    cpu_budget: Duration,
    name: Arc<str>,
    request_id: u64,
}

/// A guest run: the result and whether the memory limiter refused growth.
type GuestRun = Pin<Box<dyn Future<Output = (wasmtime::Result<()>, bool)> + Send>>;

async fn run_p2(
    pre: ProxyPre<Host>,
    mut store: Store<Host>,
    req: wasmtime::component::Resource<wasmtime_wasi_http::p2::types::HostIncomingRequest>,
    out: wasmtime::component::Resource<wasmtime_wasi_http::p2::types::HostResponseOutparam>,
) -> (wasmtime::Result<()>, bool) {
    let result = async {
        let proxy = pre.instantiate_async(&mut store).await?;
        proxy
            .wasi_http_incoming_handler()
            .call_handle(&mut store, req, out)
            .await
    }
    .await;
    let denied = store.data().limiter.denied;
    (result, denied)
}

/// WASI 0.3: the guest returns its response from `handle`; its body is a
/// stream that the store's event loop feeds, so the loop keeps running until
/// the response body is complete (`done`).
async fn run_p3(
    pre: ServicePre<Host>,
    mut store: Store<Host>,
    req: wasmtime_wasi_http::p3::Request,
    request_io: impl Future<Output = Result<(), wasmtime_wasi_http::Error>> + Send + 'static,
    tx: oneshot::Sender<Sent>,
    done: oneshot::Receiver<()>,
) -> (wasmtime::Result<()>, bool) {
    let result = async {
        let service = pre.instantiate_async(&mut store).await?;
        store
            .run_concurrent(async move |accessor| {
                match service.handle(accessor, req).await? {
                    Ok(response) => {
                        let response = accessor
                            .with(|mut store| response.into_http(&mut store, request_io))?;
                        let _ = tx.send(Ok(response));
                        // Keep the event loop alive while the body streams.
                        let _ = done.await;
                    }
                    Err(code) => {
                        let _ = tx.send(Err(format!("{code:?}")));
                    }
                }
                wasmtime::Result::<()>::Ok(())
            })
            .await?
    }
    .await;
    let denied = store.data().limiter.denied;
    (result, denied)
}

async fn run_task(run: GuestRun, cx: TaskContext) -> Outcome {
    let mut cancel = CancelGuard {
        stats: cx.active.0.clone(),
        finished: false,
    };
    let outcome = match tokio::time::timeout_at(
        cx.deadline,
        CpuBudget::new(run, cx.cpu_budget, |used| {
            cx.active.0.record_cpu(used, cx.demote_after)
        }),
    )
    .await
    {
        Err(_) => Outcome::Wall,
        Ok(Err(CpuExceeded)) => Outcome::Cpu,
        Ok(Ok((Ok(()), _))) => Outcome::Done,
        Ok(Ok((Err(_), true))) => Outcome::Memory,
        Ok(Ok((Err(e), false))) => Outcome::Trap(e),
    };
    let stats = &cx.active.0;
    match &outcome {
        Outcome::Done => {}
        Outcome::Trap(e) => {
            stats.traps.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(function = %cx.name, request_id = cx.request_id, error = ?e, "guest trapped");
        }
        Outcome::Memory => {
            stats.traps.fetch_add(1, Ordering::Relaxed);
            stats.memory_kills.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(function = %cx.name, request_id = cx.request_id, "guest stopped: memory limit exceeded");
        }
        Outcome::Cpu => {
            stats.cpu_kills.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(function = %cx.name, request_id = cx.request_id, budget = ?cx.cpu_budget, "guest stopped: cpu time limit exceeded");
        }
        Outcome::Wall => {
            stats.wall_kills.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(function = %cx.name, request_id = cx.request_id, "guest stopped: wall time limit exceeded");
        }
    }
    cancel.finished = true;
    drop(cx.slot);
    outcome
}

/// A guest that runs in the caller's task (the connection's) until it has
/// used `demote_after` of CPU without finishing; from then on it runs as a
/// task of its tenant's queue in the fair scheduler. Short requests never
/// leave the connection's task; CPU hogs stop competing with it.
///
/// Dropping it cancels the guest wherever it runs (dropping an
/// `async_task::Task` cancels its future).
struct Sliced {
    state: SlicedState,
    used: Duration,
    demote_after: Duration,
    queue: Arc<dyn SliceQueue>,
    stats: Arc<FunctionStats>,
}

enum SlicedState {
    Inline(GuestFuture),
    Pooled(async_task::Task<Outcome>),
    Moving,
}

impl Future for Sliced {
    type Output = Outcome;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Outcome> {
        let this = &mut *self;
        if let SlicedState::Inline(guest) = &mut this.state {
            let start = std::time::Instant::now();
            if let Poll::Ready(outcome) = guest.as_mut().poll(cx) {
                return Poll::Ready(outcome);
            }
            this.used += start.elapsed();
            if this.used < this.demote_after {
                return Poll::Pending;
            }
            let SlicedState::Inline(guest) =
                std::mem::replace(&mut this.state, SlicedState::Moving)
            else {
                unreachable!("state checked above");
            };
            this.stats.demoted.fetch_add(1, Ordering::Relaxed);
            this.state = SlicedState::Pooled(spawn_pooled(&this.queue, guest));
        }
        match &mut this.state {
            SlicedState::Pooled(task) => Pin::new(task).poll(cx),
            _ => unreachable!("a guest is inline or pooled between polls"),
        }
    }
}

/// Makes `guest` a task of `queue` and schedules its first slice.
fn spawn_pooled(queue: &Arc<dyn SliceQueue>, guest: GuestFuture) -> async_task::Task<Outcome> {
    let queue = queue.clone();
    let (runnable, task) = async_task::spawn(guest, move |r| queue.schedule(r));
    runnable.schedule();
    task
}
