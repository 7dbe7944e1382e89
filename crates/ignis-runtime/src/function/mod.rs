//! One deployed function and the life of one request inside it.
//!
//! The request runs in an instance ([`p2`] or [`p3`] by the world the
//! component exports), fresh or kept from an earlier request of the same
//! function ([`reuse`]), under the guest-run core ([`crate::guest`]),
//! inside the caller's task until it has used half a slice of CPU, then on
//! its tenant's queue in the fair scheduler.

mod p2;
mod p3;
mod reuse;
mod shared;

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::Frame;
use http_body_util::BodyExt;
use http_body_util::combinators::UnsyncBoxBody;
use ignis_config::{FunctionConfig, Limits};
use tokio::sync::{OwnedSemaphorePermit, oneshot};
use tokio::time::Instant;
use wasmtime::Store;
use wasmtime_wasi_http::WasiBody;
use wasmtime_wasi_http::p2::bindings::ProxyPre;
use wasmtime_wasi_http::p2::body::HyperOutgoingBody;
use wasmtime_wasi_http::p3::bindings::ServicePre;

use crate::RequestId;
use crate::bindings::actor::{CallerId, CallerSlot, ClientState};
use crate::bindings::config::ConfigState;
use crate::bindings::http::{OutboundGrant, OutboundHooks};
use crate::bindings::keyvalue::{KvAccess, KvState};
use crate::cache::CacheOutcome;
use crate::error::{BoxError, Error, ErrorKind};
use crate::guest::{GuestStats, RunLimits, route_bucket, run_limited};
use crate::host::{Base, Host, new_store};
use crate::outbound::{Outbound, OutboundPolicy};
use crate::sched::SliceQueue;
use crate::shared::Shared;
use reuse::{InstancePool, Kept};
use shared::SharedPool;

/// The response body type: streamed from the guest as it writes.
pub type Body = UnsyncBoxBody<Bytes, BoxError>;

/// Per-request facts the edge passes in.
#[derive(Debug, Clone, Copy)]
pub struct RequestMeta {
    /// Unique id of the request (logged, and shown in error bodies).
    pub request_id: RequestId,
    /// Whether the request arrived over TLS.
    pub https: bool,
}

impl RequestMeta {
    /// A plain-HTTP request with this id.
    pub fn new(request_id: RequestId) -> Self {
        RequestMeta {
            request_id,
            https: false,
        }
    }
}

/// Keeps `active` right however the guest task ends (completion, abort, panic).
struct ActiveGuard(Arc<GuestStats>);

impl ActiveGuard {
    fn new(stats: Arc<GuestStats>) -> Self {
        stats.active.fetch_add(1, Ordering::SeqCst);
        stats.notify();
        ActiveGuard(stats)
    }
}

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::SeqCst);
        self.0.notify();
    }
}

/// The guest's response body. It also drives the guest: the guest runs
/// inside the connection's task (no spawn, no cross-thread wake-ups), and
/// each poll of the body first lets the guest make progress, then takes the
/// next frame it produced. Dropping the body before its end drops the guest,
/// which cancels it and frees its instance.
///
/// Once the head is out, hyper polls the body only when the client can
/// take data (an h2 stream with a zero window, or a full socket, is not
/// polled at all), so a guest driven only by these polls would stop, and
/// keep its instance, for as long as a client chooses not to read. The
/// first time a poll returns with the guest still running, the guest moves
/// to a shared cell and a watchdog task drops it at its wall deadline,
/// polled or not. Guests that finish within the first poll (most short
/// responses) never arm a watchdog.
///
/// A frame that leaves the guest still running is not returned at once:
/// the guest runs again and the next frame is taken ahead (kept for the
/// next poll). A WASI 0.3 guest runs until its body is read to the end
/// (it waits for `done`), so without the look-ahead every 0.3 response,
/// however short, armed a watchdog: a spawned task, a timer and a
/// worker's wake-up per request, about a quarter of a reused 0.3 hello's
/// cost (docs/perf/2026-12-01-reuse-path.md). With it, a body that is
/// complete by then ends in the same poll and the guest with it.
struct DrivingBody {
    inner: HyperOutgoingBody,
    /// The frame taken ahead (`Some(None)`: the body's end), returned by
    /// the next poll.
    peeked: Option<Option<Result<Frame<Bytes>, BoxError>>>,
    guest: Guest,
    /// The request's wall deadline (the watchdog's alarm).
    deadline: Instant,
    /// Who logs a failure that happens after the response head went out.
    owner: Arc<str>,
    request_id: RequestId,
    /// Dropped when the body is complete (or dropped): tells a WASI 0.3
    /// guest's event loop that nobody reads the body any more.
    done: Option<oneshot::Sender<()>>,
    /// The guest failed after its head went out (seen here, or said by a
    /// 0.3 guest run before its store closed the body's stream): an end of
    /// the body that follows is a cut, not a complete body.
    cut: Arc<AtomicBool>,
    /// Marked cancelled when the body is dropped with its guest still
    /// running (the client left mid-body), before the guest can see the
    /// stream close.
    ending: Arc<Ending>,
}

/// A request's guest, wrapped in its limits: how it ended.
type GuestFuture = Pin<Box<dyn Future<Output = Result<(), Error>> + Send>>;

/// Where a running guest lives once its response head is out.
enum Guest {
    /// Finished (or handed to a task of its own).
    None,
    /// Owned by the body: nobody else can reach it.
    Owned(GuestFuture),
    /// Shared with the watchdog, which empties the cell at the deadline.
    Watched {
        cell: Arc<Mutex<Option<GuestFuture>>>,
        watchdog: tokio::task::AbortHandle,
    },
}

impl Drop for DrivingBody {
    fn drop(&mut self) {
        if !matches!(self.guest, Guest::None) {
            self.ending.cancel();
        }
        if let Guest::Watched { watchdog, .. } = &self.guest {
            watchdog.abort();
        }
    }
}

impl DrivingBody {
    /// Polls the guest (wherever it lives); `Ready` with how it ended.
    fn poll_guest(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        match &mut self.guest {
            Guest::None => Poll::Pending,
            Guest::Owned(guest) => guest.as_mut().poll(cx),
            Guest::Watched { cell, .. } => {
                let mut slot = cell.lock().unwrap_or_else(|p| p.into_inner());
                match slot.as_mut() {
                    // The watchdog dropped it at the deadline (and logged it).
                    None => Poll::Ready(Ok(())),
                    Some(guest) => {
                        let polled = guest.as_mut().poll(cx);
                        if polled.is_ready() {
                            *slot = None;
                        }
                        polled
                    }
                }
            }
        }
    }

    /// Lets the guest run; if it ended, clears its slot (stopping a
    /// watchdog) and logs how it failed, if it did: the head is out, so the
    /// client only sees the body end early, and this is the one place that
    /// sees the cause.
    fn drive_guest(&mut self, cx: &mut Context<'_>) {
        if let Poll::Ready(ended) = self.poll_guest(cx) {
            drop(self.take_guest());
            if let Err(e) = ended {
                e.log(&self.owner, self.request_id);
                self.cut.store(true, Ordering::SeqCst);
            }
        }
    }

    /// Takes the guest out, wherever it lives, to run it elsewhere.
    fn take_guest(&mut self) -> Option<GuestFuture> {
        match std::mem::replace(&mut self.guest, Guest::None) {
            Guest::None => None,
            Guest::Owned(guest) => Some(guest),
            Guest::Watched { cell, watchdog } => {
                watchdog.abort();
                cell.lock().unwrap_or_else(|p| p.into_inner()).take()
            }
        }
    }

    /// The guest is still running and the body goes back to hyper, which
    /// may not poll it again for as long as the client likes: from now on a
    /// watchdog enforces the wall deadline.
    fn arm_watchdog(&mut self) {
        let Guest::Owned(_) = &self.guest else {
            return;
        };
        let Guest::Owned(guest) = std::mem::replace(&mut self.guest, Guest::None) else {
            unreachable!("checked above");
        };
        let cell = Arc::new(Mutex::new(Some(guest)));
        let (watched, owner, request_id) = (cell.clone(), self.owner.clone(), self.request_id);
        let deadline = self.deadline;
        let watchdog = tokio::spawn(async move {
            tokio::time::sleep_until(deadline).await;
            let guest = watched.lock().unwrap_or_else(|p| p.into_inner()).take();
            if let Some(guest) = guest {
                // Dropped outside the lock: this frees the instance.
                drop(guest);
                Error::new(ErrorKind::WallLimit)
                    .context("the response was not read before the wall deadline")
                    .log(&owner, request_id);
            }
        })
        .abort_handle();
        self.guest = Guest::Watched { cell, watchdog };
    }
}

impl http_body::Body for DrivingBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        let polled = match this.peeked.take() {
            Some(peeked) => Poll::Ready(peeked),
            None => {
                this.drive_guest(cx);
                this.poll_inner(cx)
            }
        };
        match &polled {
            Poll::Ready(Some(_)) => this.look_ahead(cx),
            Poll::Pending => this.arm_watchdog(),
            Poll::Ready(None) => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        match &self.peeked {
            Some(peeked) => peeked.is_none(),
            None => self.inner.is_end_stream(),
        }
    }

    fn size_hint(&self) -> http_body::SizeHint {
        let peeked = match &self.peeked {
            Some(None) => return http_body::SizeHint::with_exact(0),
            Some(Some(Ok(frame))) => frame.data_ref().map_or(0, |d| d.len() as u64),
            _ => 0,
        };
        let inner = self.inner.size_hint();
        let mut hint = http_body::SizeHint::new();
        hint.set_lower(inner.lower().saturating_add(peeked));
        if let Some(upper) = inner.upper() {
            hint.set_upper(upper.saturating_add(peeked));
        }
        hint
    }
}

impl DrivingBody {
    /// The next frame of the guest's body; at its end, the guest is told
    /// (`done`) and given one more poll to end (see [`Self::end_body`]).
    fn poll_inner(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let polled = http_body::Body::poll_frame(Pin::new(&mut self.inner), cx);
        if let Poll::Ready(None) = polled {
            if self.cut.load(Ordering::SeqCst) {
                // Cut short by the guest's failure (logged once, in drive_guest).
                return Poll::Ready(Some(Err(cut_body())));
            }
            self.end_body(cx);
        }
        polled.map_err(Into::into)
    }

    /// A frame is about to go out: if the guest is still running, let it
    /// run and take the next frame ahead; if that is not there yet, the
    /// body goes back to hyper with the guest running: arm the watchdog.
    fn look_ahead(&mut self, cx: &mut Context<'_>) {
        if matches!(self.guest, Guest::None) {
            return;
        }
        self.drive_guest(cx);
        if let Poll::Ready(next) = self.poll_inner(cx) {
            self.peeked = Some(next);
        }
        self.arm_watchdog();
    }

    /// The body is complete. A 0.3 guest waits for `done`, and most guests
    /// end right after their body: one more poll lets them end here, so a
    /// kept instance is back in its pool before the client sees the end of
    /// the body (its next request on the connection reuses it).
    fn end_body(&mut self, cx: &mut Context<'_>) {
        self.done = None;
        self.drive_guest(cx);
        if let Some(guest) = self.take_guest() {
            // The body is complete but the guest is still running (work
            // after the response): let it finish on its own, bounded by
            // its deadlines.
            let (owner, request_id) = (self.owner.clone(), self.request_id);
            tokio::spawn(async move {
                if let Err(e) = guest.await {
                    e.log(&owner, request_id);
                }
            });
        }
    }
}

/// The error that ends a response body its guest (or its instance) failed
/// to complete: the client must never take a cut body for a whole one.
fn cut_body() -> BoxError {
    Box::new(
        Error::new(ErrorKind::Trap(None)).context("the guest failed while the response streamed"),
    )
}

/// How a request's guest ended, decided once: it finished, or it was
/// cancelled (its future dropped first, or its client left mid-body).
/// Whoever decides first wins, so a guest that notices its client's
/// closed stream in the same instant it is cancelled is counted once, as
/// cancelled: the body marks the cancellation before it lets go of the
/// stream the guest writes to.
struct Ending {
    stats: Arc<GuestStats>,
    state: std::sync::atomic::AtomicU8,
}

impl Ending {
    const RUNNING: u8 = 0;
    const FINISHED: u8 = 1;
    const CANCELLED: u8 = 2;

    fn new(stats: Arc<GuestStats>) -> Arc<Self> {
        Arc::new(Ending {
            stats,
            state: std::sync::atomic::AtomicU8::new(Self::RUNNING),
        })
    }

    fn decide(&self, to: u8) -> bool {
        self.state
            .compare_exchange(Self::RUNNING, to, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok()
    }

    fn finish(&self) {
        self.decide(Self::FINISHED);
    }

    /// Counts a cancellation unless the guest already finished.
    fn cancel(&self) {
        if self.decide(Self::CANCELLED) {
            self.stats.cancelled.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Cancels the request's ending when the guest future is dropped before it
/// finished.
struct CancelGuard(Arc<Ending>);

impl Drop for CancelGuard {
    fn drop(&mut self) {
        self.0.cancel();
    }
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

/// A deployed function: a prepared component, its limits and the state
/// its bindings share across requests.
pub struct Function {
    /// The platform services and the epoch ticker (kept running while the
    /// function exists).
    shared: Arc<Shared>,
    name: Arc<str>,
    tenant: String,
    pre: Pre,
    limits: Limits,
    env: Vec<(String, String)>,
    outbound: Arc<Outbound>,
    grant: Arc<OutboundGrant>,
    queue: Option<Arc<dyn SliceQueue>>,
    demote_after: Duration,
    stats: Arc<GuestStats>,
    cache_outcome: CacheOutcome,
    kv: Arc<KvAccess>,
    /// Whether the function declares any key-value store.
    kv_declared: bool,
    config: ConfigState,
    caller: CallerSlot,
    /// Who this function is when it calls an actor.
    caller_id: CallerId,
    /// Idle instances for the next requests (`None`: a fresh instance per
    /// request, or shared instances).
    pool: Option<Arc<InstancePool>>,
    /// Instances serving several requests at once (`reuse.max_concurrent`
    /// above 1, WASI 0.3 only).
    shared_pool: Option<Arc<SharedPool>>,
}

impl Function {
    pub(crate) fn new(
        shared: Arc<Shared>,
        config: &FunctionConfig,
        pre: Pre,
        cache_outcome: CacheOutcome,
    ) -> Arc<Function> {
        let platform = &shared.platform;
        let name: Arc<str> = config.name.as_str().into();
        let queue = shared
            .scheduler
            .as_ref()
            .map(|s| s.tenant_queue(&config.tenant));
        // A guest still running after half a slice of CPU in the caller's
        // task is a CPU hog: the rest of it goes to the fair scheduler.
        let demote_after = shared.epoch_tick / 2;
        let tenant_outbound = platform.tenant_outbound.get(&config.tenant);
        let outbound = Arc::new(Outbound::new(
            OutboundPolicy::new(&config.allowed_outbound_hosts),
            tenant_outbound,
            config
                .backends
                .iter()
                .filter_map(|b| platform.backends.get(b).cloned())
                .collect(),
            config
                .upstreams
                .iter()
                .filter_map(|u| Some((u.clone(), platform.upstreams.get(u)?.clone())))
                .collect(),
        ));
        let caller_id = CallerId {
            tenant: config.tenant.as_str().into(),
            name: name.clone(),
        };
        let stats = Arc::new(GuestStats::default());
        let reuse = config
            .reuse
            .resolve(matches!(pre, Pre::P3(_)), config.limits.max_concurrency);
        if let (Some(reuse), Pre::P2(_)) = (reuse, &pre) {
            tracing::warn!(
                function = %name,
                max_requests = reuse.max_requests,
                "reuse is on for a wasi:http 0.2 component: consecutive requests of this function share the instance's memory (globals, caches), see docs/configuration.md"
            );
        }
        let (pool, shared_pool) = match (reuse, &pre) {
            (Some(reuse), Pre::P3(service)) if reuse.max_concurrent > 1 => (
                None,
                Some(SharedPool::new(
                    reuse,
                    service.clone(),
                    shared.clone(),
                    queue.clone(),
                    stats.clone(),
                    config.limits.cpu_time,
                    demote_after,
                )),
            ),
            (Some(reuse), _) => (Some(InstancePool::new(reuse, stats.clone())), None),
            (None, _) => (None, None),
        };
        Arc::new(Function {
            pool,
            shared_pool,
            queue,
            demote_after,
            kv_declared: !config.key_value_stores.is_empty(),
            kv: Arc::new(KvAccess::new(
                platform.kv.clone(),
                name.clone(),
                &config.tenant,
                &config.key_value_stores,
                platform.kv_limits,
            )),
            config: ConfigState::new(
                config
                    .config
                    .iter()
                    .map(|(k, v)| (k.as_str(), v.value.as_str())),
            ),
            grant: Arc::new(OutboundGrant::new(
                outbound.clone(),
                config.max_outbound_requests,
            )),
            outbound,
            name,
            tenant: config.tenant.clone(),
            pre,
            limits: config.limits.clone(),
            env: config
                .env
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            caller: platform.actor_caller.clone(),
            caller_id,
            shared: shared.clone(),
            stats,
            cache_outcome,
        })
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
    pub fn stats(&self) -> &Arc<GuestStats> {
        &self.stats
    }

    /// Whether the component came from the compile cache.
    pub fn cache_outcome(&self) -> CacheOutcome {
        self.cache_outcome
    }

    /// Key-value calls so far, by operation (empty if the function
    /// declares no store).
    pub fn kv_op_counts(&self) -> Vec<crate::bindings::keyvalue::OpCount> {
        if self.kv_declared {
            self.kv.op_counts()
        } else {
            Vec::new()
        }
    }

    /// Outbound TCP connections opened by this function's pool so far.
    pub fn outbound_connections(&self) -> u64 {
        self.outbound.connections_opened()
    }

    fn new_store(&self, request_id: RequestId) -> Store<Host> {
        let base = Base {
            owner: self.name.clone(),
            request_id,
            env: &self.env,
            memory_bytes: self.limits.memory_bytes,
            ticker: self.shared.store_lease(),
            stats: self.stats.clone(),
        };
        let host = Host::for_function(
            base,
            OutboundHooks::new(Some(self.grant.clone()), self.name.clone(), request_id),
            KvState::new(self.kv.clone(), request_id),
            self.config.clone(),
            ClientState::new(
                self.caller.clone(),
                self.caller_id.clone(),
                None,
                request_id,
            ),
        );
        new_store(self.pre.engine(), host)
    }

    /// Creates a store and instantiates the component, then drops both: the
    /// fixed per-request cost without the guest's own work (for benchmarks).
    #[doc(hidden)]
    pub async fn instantiate_only(&self) -> Result<(), Error> {
        let mut store = self.new_store(RequestId::new());
        let instantiated = match &self.pre {
            Pre::P2(pre) => pre.instantiate_async(&mut store).await.map(drop),
            Pre::P3(pre) => pre.instantiate_async(&mut store).await.map(drop),
        };
        instantiated.map_err(Error::internal)
    }

    /// Runs one request in an instance (fresh, or kept from an earlier
    /// request if the function reuses instances). The response is returned
    /// as soon as the guest sets it; its body streams while the guest writes
    /// it.
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
    ) -> Result<http::Response<Body>, Error>
    where
        B: http_body::Body<Data = Bytes> + Send + 'static,
        B::Error: Into<wasmtime_wasi_http::Error>,
    {
        self.stats.requests.fetch_add(1, Ordering::Relaxed);
        let route = route_bucket(request.uri().path());
        let limits = RunLimits {
            deadline: Instant::now() + self.limits.wall_time,
            cpu: self.limits.cpu_time,
            hog_above: self.demote_after,
            route: Some(route),
        };
        if let Some(shared) = &self.shared_pool {
            return shared
                .handle(
                    || self.new_store(meta.request_id),
                    request,
                    meta.request_id,
                    limits.deadline,
                    slot,
                    ActiveGuard::new(self.stats.clone()),
                )
                .await;
        }
        let reused = self
            .pool
            .as_ref()
            .and_then(|p| p.take(meta.request_id, || self.shared.store_lease()));
        let kept = match reused {
            Some(kept) => kept,
            None => {
                self.stats.fresh_instances.fetch_add(1, Ordering::Relaxed);
                Kept::fresh(self.new_store(meta.request_id))
            }
        };
        let (tx, rx) = oneshot::channel::<Sent>();
        let (done_tx, done_rx) = oneshot::channel::<()>();
        let cut = Arc::new(AtomicBool::new(false));
        let ending = Ending::new(self.stats.clone());
        let run: GuestRun = match &self.pre {
            Pre::P2(pre) => p2::start(pre, kept, request, meta.https, tx, self.stats.clone())?,
            Pre::P3(pre) => p3::start(
                pre,
                kept,
                request,
                tx,
                done_rx,
                cut.clone(),
                self.stats.clone(),
            ),
        };
        let guest: GuestFuture = Box::pin(run_task(
            run,
            TaskContext {
                slot,
                active: ActiveGuard::new(self.stats.clone()),
                limits,
                pool: self.pool.clone(),
                ending: ending.clone(),
            },
        ));
        // CPU hogs go to the fair scheduler: after half a slice of CPU in
        // this task, or at once if recent requests of the same route mostly
        // did (decided per route: a cheap route of a function whose other
        // routes are hogs still starts here).
        let mut guest: GuestFuture = match &self.queue {
            Some(queue) => {
                let state = if self.stats.route_mostly_hogs(route) {
                    self.stats.started_pooled.fetch_add(1, Ordering::Relaxed);
                    SlicedState::Pooled(spawn_pooled(queue, guest, Duration::ZERO))
                } else {
                    SlicedState::Inline(guest)
                };
                Box::pin(Sliced {
                    state,
                    used: Duration::ZERO,
                    demote_after: self.demote_after,
                    long_polls: None,
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
            First::Ended(ended) => match rx.try_recv() {
                // Responded, then finished: the body may still hold data.
                Ok(sent) => {
                    if let Err(e) = ended {
                        e.log(&self.name, meta.request_id);
                    }
                    (Ok(sent), None)
                }
                Err(_) => return Err(ended.err().unwrap_or_else(no_response)),
            },
        };
        match sent {
            Ok(Ok(response)) => Ok(response.map(|inner| {
                DrivingBody {
                    inner,
                    peeked: None,
                    guest: guest.map_or(Guest::None, Guest::Owned),
                    deadline: limits.deadline,
                    owner: self.name.clone(),
                    request_id: meta.request_id,
                    done: Some(done_tx),
                    cut,
                    ending,
                }
                .boxed_unsync()
            })),
            Ok(Err(code)) => Err(Error::new(ErrorKind::GuestErrorCode(code))),
            // The guest dropped its response-outparam without using it: wait for it to end.
            Err(_) => match guest {
                Some(guest) => Err(guest.await.err().unwrap_or_else(no_response)),
                None => Err(no_response()),
            },
        }
    }
}

/// What the guest answered: a response, or the `wasi:http` error code it gave instead.
type Sent = Result<http::Response<WasiBody>, String>;

enum First {
    Sent(Result<Sent, oneshot::error::RecvError>),
    Ended(Result<(), Error>),
}

fn no_response() -> Error {
    Error::new(ErrorKind::NoResponse)
}

struct TaskContext {
    slot: Option<OwnedSemaphorePermit>,
    active: ActiveGuard,
    limits: RunLimits,
    pool: Option<Arc<InstancePool>>,
    ending: Arc<Ending>,
}

/// A guest run: the store and instance back (if the guest ended well) and
/// whether the memory limiter refused growth.
type GuestRun = Pin<Box<dyn Future<Output = (wasmtime::Result<Kept>, bool)> + Send>>;

/// The guest under its limits; when it ends well its instance goes back to
/// the function's pool (if it reuses instances), then the request's slot
/// is freed; counts a cancellation if it is dropped first (the store and
/// instance are dropped with it).
async fn run_task(run: GuestRun, cx: TaskContext) -> Result<(), Error> {
    let stats = &cx.active.0;
    let _cancel = CancelGuard(cx.ending.clone());
    let outcome = run_limited(run, cx.limits, stats).await;
    cx.ending.finish();
    let ended = outcome.into_result().map(|kept| {
        if let Some(pool) = &cx.pool {
            pool.give_back(kept);
        }
    });
    drop(cx.slot);
    ended
}

/// A guest that runs in the caller's task (the connection's) until it has
/// used `demote_after` of CPU without finishing; from then on it runs as a
/// task of its tenant's queue in the fair scheduler. Short requests never
/// leave the connection's task; CPU hogs stop competing with it.
///
/// Dropping it cancels the guest wherever it runs (dropping an
/// `async_task::Task` cancels its future).
pub(super) struct Sliced {
    state: SlicedState,
    used: Duration,
    demote_after: Duration,
    /// `Some`: judged by each poll instead of the sum, counting long polls
    /// in a row (a shared instance's event loop, which serves many requests
    /// in its life: it is a hog when its polls run guest code that long,
    /// not when its requests add up).
    long_polls: Option<u32>,
    queue: Arc<dyn SliceQueue>,
    stats: Arc<GuestStats>,
}

impl Sliced {
    /// `guest` on the caller's executor until two polls of it in a row take
    /// `demote_after` of the thread's CPU time each, then on `queue`.
    pub(super) fn each_poll(
        guest: GuestFuture,
        demote_after: Duration,
        queue: Arc<dyn SliceQueue>,
        stats: Arc<GuestStats>,
    ) -> Sliced {
        Sliced {
            state: SlicedState::Inline(guest),
            used: Duration::ZERO,
            demote_after,
            long_polls: Some(0),
            queue,
            stats,
        }
    }
}

enum SlicedState {
    Inline(GuestFuture),
    Pooled(async_task::Task<Result<(), Error>>),
    Moving,
}

impl Future for Sliced {
    type Output = Result<(), Error>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = &mut *self;
        if let SlicedState::Inline(guest) = &mut this.state {
            // A shared instance's loop is timed in its thread's CPU time: on
            // a loaded machine a poll often lasts half a tick of wall time
            // because the thread was preempted, and a loop moved for that
            // would stay on the fair scheduler for good. A request's run is
            // timed on the wall clock (cheaper; it moves once and then ends).
            let start = match this.long_polls {
                Some(_) => crate::sched::CpuInstant::Thread(crate::sched::thread_cpu_time()),
                None => crate::sched::CpuInstant::Wall(std::time::Instant::now()),
            };
            if let Poll::Ready(outcome) = guest.as_mut().poll(cx) {
                return Poll::Ready(outcome);
            }
            let elapsed = start.elapsed();
            this.used += elapsed;
            let hog = match &mut this.long_polls {
                None => this.used >= this.demote_after,
                // Two long polls in a row: not one burst (an instantiation,
                // many requests' work arriving at once) but guest code that
                // keeps running.
                Some(long) => {
                    *long = if elapsed >= this.demote_after {
                        *long + 1
                    } else {
                        0
                    };
                    *long >= 2
                }
            };
            if !hog {
                return Poll::Pending;
            }
            let SlicedState::Inline(guest) =
                std::mem::replace(&mut this.state, SlicedState::Moving)
            else {
                unreachable!("state checked above");
            };
            this.stats.demoted.fetch_add(1, Ordering::Relaxed);
            this.state = SlicedState::Pooled(spawn_pooled(&this.queue, guest, this.used));
        }
        match &mut this.state {
            SlicedState::Pooled(task) => Pin::new(task).poll(cx),
            _ => unreachable!("a guest is inline or pooled between polls"),
        }
    }
}

/// Makes `guest`, which has used `used` CPU so far, a task of `queue` and
/// schedules its first slice. Each slice is queued with the CPU the guest
/// has attained (the queue serves the least-served first).
fn spawn_pooled(
    queue: &Arc<dyn SliceQueue>,
    guest: GuestFuture,
    used: Duration,
) -> async_task::Task<Result<(), Error>> {
    let queue = queue.clone();
    let attained = Arc::new(AtomicU64::new(used.as_nanos() as u64));
    let counted = Attained {
        inner: guest,
        attained: attained.clone(),
    };
    let (runnable, task) = async_task::spawn(counted, move |r| {
        queue.schedule(r, Duration::from_nanos(attained.load(Ordering::Relaxed)))
    });
    runnable.schedule();
    task
}

/// A pooled guest that adds the CPU each poll takes to `attained`.
struct Attained {
    inner: GuestFuture,
    attained: Arc<AtomicU64>,
}

impl Future for Attained {
    type Output = Result<(), Error>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let start = crate::sched::CpuInstant::now();
        let polled = self.inner.as_mut().poll(cx);
        let used = start.elapsed().as_nanos() as u64;
        self.attained.fetch_add(used, Ordering::Relaxed);
        polled
    }
}
