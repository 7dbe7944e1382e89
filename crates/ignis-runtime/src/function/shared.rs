//! Instances that serve several requests of one WASI 0.3 function at the
//! same time (`reuse = { max_concurrent = N }`, N > 1).
//!
//! Each such instance has a worker: a task that owns the store, runs its
//! event loop (`run_concurrent`) and starts one `handle` call per request
//! it is given; the response goes back to the request's own task, whose
//! body the loop keeps feeding until it is read or dropped.
//!
//! A worker starts on the runtime of the request that made it (the
//! connections' tokio runtime) and moves to its tenant's fair-scheduler
//! queue once two polls of its loop in a row have each taken half an epoch
//! tick of its thread's CPU time (it runs guest code that long: a CPU
//! hog), for the rest of its life. Started on the fair scheduler instead,
//! every request crossed to its threads and back, two thread wake-ups per
//! request: a third of serial reuse's throughput on the 0.3 hello, 0.87 of
//! it on the connections' runtime (docs/BENCHMARKS.md, "Concurrent reuse").
//!
//! Before it hands a response over, the worker reads the start of its body
//! ahead: what the guest writes within [`AHEAD_TURNS`] turns of the loop,
//! up to the end, at most [`AHEAD_FRAMES`] frames and [`AHEAD_BYTES`] bytes
//! (host memory outside the guest's limit). A small body then leaves with
//! its head in one write (one `writev` per request instead of two: 0.95 of
//! serial reuse's throughput), and a body that takes longer streams as
//! before: its head goes out after those turns, never held until the body
//! is complete.
//!
//! Invariants:
//! - A request joins an instance only if it serves fewer than
//!   `max_concurrent` requests, was given fewer than `max_requests`, is
//!   younger than `max_age` and is not retiring. Among those, one whose
//!   event loop is not running guest code (not inside a poll of its loop
//!   that has lasted over 500 µs: its requests wait on I/O) takes it, the
//!   fullest first; if every such instance is running guest code, a new one is
//!   made instead (so CPU-bound requests spread over instances and threads,
//!   and only waiting ones share). Every instance serves at least one
//!   admitted request or is idle, so instances never outnumber
//!   `max_concurrency`, as with serial reuse.
//! - Limits stay per request where they can be told apart: each request has
//!   its own wall deadline; CPU time of the event loop is charged to every
//!   request in flight while it ran (an upper bound of each one's own use:
//!   the engine cannot say which request's code ran). A request past its
//!   deadline or budget fails alone (504/503 as for a fresh instance), and
//!   its instance takes no more requests; once every request it holds has
//!   ended or failed, the instance is dropped at once, which also stops a
//!   guest that never yields. Memory is per instance.
//! - A trap kills the instance: every request it was serving that has no
//!   response yet fails with the trap's error (500 with its request id);
//!   responses already streaming end in an error (a body's end counts as
//!   complete only once the worker says its request ended well). The next
//!   request gets another instance.
//! - A request whose client goes away before its answer is cancelled: its
//!   slot ends at once and its instance retires.
//! - A worker's task belongs to its pool: when the function goes, its
//!   instances go, and a worker holds nothing whose drop could join the
//!   scheduler thread it runs on.
//! - Instances are never shared across functions (the pool belongs to one
//!   function), let alone tenants. Within one instance, concurrent requests
//!   share its host state: guest output is logged under the request that
//!   opened the busy period, and the outbound-request count is per busy
//!   period (docs/configuration.md, "Instance reuse").

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use http_body::Frame;
use ignis_config::Reuse;
use tokio::sync::{OwnedSemaphorePermit, mpsc, oneshot};
use tokio::time::Instant;
use wasmtime::Store;
use wasmtime::component::Accessor;
use wasmtime_wasi_http::WasiBody;
use wasmtime_wasi_http::p3::bindings::{Service, ServicePre};

use super::{Body, GuestFuture};
use crate::RequestId;
use crate::bindings::http::OutboundHooks;
use crate::error::{BoxError, Error, ErrorKind};
use crate::guest::{GuestStats, Outcome};
use crate::host::Host;
use crate::sched::{CpuInstant, SliceQueue};
use crate::shared::Shared;
use crate::ticker::Ticker;

/// What a request gets back from its worker: the guest's response with
/// the start of its body taken ahead, or the error code it gave instead.
type Answer = Result<Result<(http::Response<WasiBody>, Ahead), String>, Error>;

/// The start of a response body, read by the worker before it hands the
/// response over: what the guest wrote before the loop had to wait, and
/// whether that was the whole body. A small body then goes out with its
/// head in one write, as on an instance of one's own (the request's task
/// would otherwise find nothing yet, send the head alone, and wait for
/// the worker again for the rest).
#[derive(Default)]
struct Ahead {
    frames: std::collections::VecDeque<Result<Frame<Bytes>, BoxError>>,
    /// The stream ended after `frames`.
    end: bool,
}

/// How many turns of its loop the worker gives a guest to write the start
/// of its body before it hands the response over with whatever is there.
/// Measured on the 0.3 hello under load: with 16, a quarter of its bodies
/// were not complete yet; with 64, all were. A body that takes longer
/// costs those turns once (each runs whatever guest code is ready).
const AHEAD_TURNS: u32 = 64;

/// At most this many frames and this many bytes are taken ahead (a guest
/// that writes fast must not make the host buffer its body).
const AHEAD_FRAMES: usize = 16;
const AHEAD_BYTES: usize = 64 * 1024;

/// Reads what `body` has now, giving the loop [`AHEAD_TURNS`] turns to
/// produce more, up to its end, an error, or the frame and byte bounds.
async fn take_ahead(body: &mut WasiBody) -> Ahead {
    let mut ahead = Ahead::default();
    let (mut turns, mut bytes) = (0, 0);
    std::future::poll_fn(|cx| {
        loop {
            if ahead.frames.len() >= AHEAD_FRAMES || bytes >= AHEAD_BYTES {
                return Poll::Ready(());
            }
            match http_body::Body::poll_frame(Pin::new(&mut *body), cx) {
                Poll::Ready(Some(Ok(frame))) => {
                    bytes += frame.data_ref().map_or(0, Bytes::len);
                    ahead.frames.push_back(Ok(frame));
                }
                Poll::Ready(Some(Err(e))) => {
                    ahead.frames.push_back(Err(e.into()));
                    return Poll::Ready(());
                }
                Poll::Ready(None) => {
                    ahead.end = true;
                    return Poll::Ready(());
                }
                Poll::Pending if turns < AHEAD_TURNS => {
                    // Back to the loop, which runs the guest, then here.
                    turns += 1;
                    cx.waker().wake_by_ref();
                    return Poll::Pending;
                }
                Poll::Pending => return Poll::Ready(()),
            }
        }
    })
    .await;
    ahead
}

/// Feeds a request's body to the guest (`Request::from_http`'s second half).
type RequestIo = Pin<Box<dyn Future<Output = Result<(), wasmtime_wasi_http::Error>> + Send>>;

/// A request given to a worker.
struct Job {
    request_id: RequestId,
    request: wasmtime_wasi_http::p3::Request,
    request_io: RequestIo,
}

/// What the worker and the watch around it know about one request, from
/// the moment it is given to the moment it ends (then it leaves the map).
struct Slot {
    /// Where its answer goes (taken when answered or failed).
    tx: Option<oneshot::Sender<Answer>>,
    /// Tells the guest's loop the response body was read or dropped.
    done: Option<oneshot::Receiver<()>>,
    deadline: Instant,
    /// The worker's CPU total when the request started (`None` until the
    /// first poll after it was given).
    cpu_start: Option<Duration>,
    /// Its admission slot, freed when it ends (with the slot).
    _permit: Option<OwnedSemaphorePermit>,
    /// Counts it as active until it ends.
    _active: super::ActiveGuard,
    /// Told how it ended (`true`: its guest finished with it normally), so
    /// its body can tell a complete end from a cut.
    finished: Option<oneshot::Sender<bool>>,
}

/// The state a worker shares with its pool.
struct WorkerState {
    /// Requests given and not yet ended.
    load: AtomicU32,
    /// Requests given, ever.
    given: AtomicU32,
    /// Takes no more requests (a request failed, or the pool dropped it).
    retiring: AtomicBool,
    /// When the poll of its event loop in progress started ([`nanos`]; 0:
    /// not polling).
    poll_started: AtomicU64,
    /// The worker ended (its instance is gone).
    gone: AtomicBool,
    born: std::time::Instant,
    slots: Mutex<HashMap<u64, Slot>>,
    /// Wakes the worker when a request ends from outside (its deadline
    /// passed on the request's side, its body was dropped): it may have
    /// nothing left to serve.
    waker: Mutex<Option<std::task::Waker>>,
}

/// A poll this long means the instance is running guest code (not just
/// moving I/O along): a new request goes to another instance.
const BUSY: Duration = Duration::from_micros(500);

/// Nanoseconds since the first call (a monotonic clock as a number).
fn nanos() -> u64 {
    static ORIGIN: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    ORIGIN
        .get_or_init(std::time::Instant::now)
        .elapsed()
        .as_nanos() as u64
        + 1
}

impl WorkerState {
    /// Takes no more requests; the worker ends once the ones it has ended.
    fn retire(&self) {
        self.retiring.store(true, Ordering::SeqCst);
        self.wake();
    }

    fn wake(&self) {
        let waker = self.waker.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(waker) = waker {
            waker.wake();
        }
    }

    /// In a poll of its loop that has lasted over [`BUSY`]: running guest
    /// code now (between polls its requests wait on I/O).
    fn busy(&self) -> bool {
        let started = self.poll_started.load(Ordering::SeqCst);
        started != 0 && nanos().saturating_sub(started) > BUSY.as_nanos() as u64
    }

    fn slots(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Slot>> {
        self.slots.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Ends `request_id`'s slot (`well`: its guest finished with it
    /// normally), answering `answer` if it had no answer yet.
    /// Only the first call for a request does anything.
    fn end(&self, key: u64, well: bool, answer: impl FnOnce() -> Answer) {
        let Some(slot) = self.slots().remove(&key) else {
            return;
        };
        if let Some(finished) = slot.finished {
            let _ = finished.send(well);
        }
        if let Some(tx) = slot.tx {
            let _ = tx.send(answer());
        }
        // Its permit, guard and `done` go with it.
        self.load.fetch_sub(1, Ordering::SeqCst);
        self.wake();
    }
}

/// A worker as its pool sees it.
struct Worker {
    state: Arc<WorkerState>,
    tx: mpsc::UnboundedSender<Job>,
    /// Dropping it (the function is gone) cancels the worker, which drops
    /// the instance: no worker outlives its function.
    _task: WorkerTask,
}

/// A worker's task, cancelled when dropped.
enum WorkerTask {
    /// On the tenant's fair-scheduler queue (dropping the task cancels it).
    Pooled {
        _task: async_task::Task<Result<(), Error>>,
    },
    /// On tokio (no scheduler).
    Tokio(tokio::task::AbortHandle),
}

impl Drop for WorkerTask {
    fn drop(&mut self) {
        if let WorkerTask::Tokio(handle) = self {
            handle.abort();
        }
    }
}

/// The shared instances of one function.
pub(super) struct SharedPool {
    policy: Reuse,
    pre: ServicePre<Host>,
    shared: Arc<Shared>,
    queue: Option<Arc<dyn SliceQueue>>,
    stats: Arc<GuestStats>,
    cpu_budget: Duration,
    /// Two polls of a worker's loop in a row this long (thread CPU time)
    /// move it to the fair scheduler.
    demote_after: Duration,
    workers: Mutex<Vec<Worker>>,
}

impl SharedPool {
    pub(super) fn new(
        policy: Reuse,
        pre: ServicePre<Host>,
        shared: Arc<Shared>,
        queue: Option<Arc<dyn SliceQueue>>,
        stats: Arc<GuestStats>,
        cpu_budget: Duration,
        demote_after: Duration,
    ) -> Arc<SharedPool> {
        let pool = Arc::new(SharedPool {
            policy,
            pre,
            shared,
            queue,
            stats,
            cpu_budget,
            demote_after,
            workers: Mutex::new(Vec::new()),
        });
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(super::reuse::sweep_every(
                Arc::downgrade(&pool),
                policy.max_age / 4,
                SharedPool::sweep,
            ));
        }
        pool
    }

    fn workers(&self) -> std::sync::MutexGuard<'_, Vec<Worker>> {
        self.workers.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn open(&self, w: &WorkerState) -> bool {
        !w.retiring.load(Ordering::SeqCst)
            && !w.gone.load(Ordering::SeqCst)
            && w.given.load(Ordering::SeqCst) < self.policy.max_requests
            && w.born.elapsed() < self.policy.max_age
    }

    /// Runs `request` on a shared instance (joining one, or starting one);
    /// the answer comes back when the guest responds, fails, or the
    /// request's limits stop it.
    pub(super) async fn handle<B>(
        self: &Arc<Self>,
        make_store: impl FnOnce() -> Store<Host>,
        request: http::Request<B>,
        request_id: RequestId,
        deadline: Instant,
        permit: Option<OwnedSemaphorePermit>,
        active: super::ActiveGuard,
    ) -> Result<http::Response<Body>, Error>
    where
        B: http_body::Body<Data = Bytes> + Send + 'static,
        B::Error: Into<wasmtime_wasi_http::Error>,
    {
        // The conversion consults the hooks only for forbidden headers,
        // which Ignis's hooks leave at wasmtime's defaults.
        let mut hooks = OutboundHooks::new(None, "".into(), request_id);
        let (request, request_io) = wasmtime_wasi_http::p3::Request::from_http(&mut hooks, request);
        let request_io: RequestIo = Box::pin(request_io);
        let (tx, rx) = oneshot::channel::<Answer>();
        let (done_tx, done_rx) = oneshot::channel::<()>();
        let (finished_tx, finished_rx) = oneshot::channel::<bool>();
        let slot = Slot {
            finished: Some(finished_tx),
            tx: Some(tx),
            done: Some(done_rx),
            deadline,
            cpu_start: None,
            _permit: permit,
            _active: active,
        };
        let (worker, fresh) = self.place(make_store);
        let state = worker.state.clone();
        if fresh {
            self.stats.fresh_instances.fetch_add(1, Ordering::Relaxed);
        } else {
            self.stats.reused.fetch_add(1, Ordering::Relaxed);
        }
        state.slots().insert(request_id.seq(), slot);
        // A worker that ended after it was chosen ends its slots after
        // marking itself gone: one of the two sees the other.
        if state.gone.load(Ordering::SeqCst)
            || worker
                .tx
                .send(Job {
                    request_id,
                    request,
                    request_io,
                })
                .is_err()
        {
            state.end(request_id.seq(), false, || {
                Err(Error::new(ErrorKind::NoResponse).context("the shared instance ended"))
            });
        }
        drop(worker);
        // Until the answer is here, dropping this future (the client went
        // away) cancels the request: it ends and its instance retires, as a
        // cancelled request retires a kept instance.
        let mut pending = Cancel {
            stats: self.stats.clone(),
            state: state.clone(),
            request_id,
            armed: true,
        };
        let answer = match tokio::time::timeout_at(deadline, rx).await {
            Ok(Ok(answer)) => answer,
            Ok(Err(_)) => Err(Error::new(ErrorKind::NoResponse)),
            Err(_) => {
                // The worker fails it too (at the same deadline); whichever
                // comes first, the request ends here, and the instance, with
                // a guest still running for nobody, takes no more.
                state.retire();
                state.end(request_id.seq(), false, || {
                    Err(Error::new(ErrorKind::WallLimit))
                });
                Err(Error::new(ErrorKind::WallLimit))
            }
        };
        pending.armed = false;
        drop(pending);
        match answer? {
            Ok((response, ahead)) => Ok(response.map(|inner| {
                http_body_util::BodyExt::boxed_unsync(SharedBody {
                    inner,
                    ahead,
                    ended: false,
                    finished: finished_rx,
                    done: Some(done_tx),
                    deadline: Box::pin(tokio::time::sleep_until(deadline)),
                    state,
                    request_id,
                })
            })),
            Err(code) => Err(Error::new(ErrorKind::GuestErrorCode(code))),
        }
    }

    /// The worker this request goes to (`true`: a new one).
    fn place(self: &Arc<Self>, make_store: impl FnOnce() -> Store<Host>) -> (WorkerRef, bool) {
        let mut workers = self.workers();
        workers.retain(|w| !w.state.gone.load(Ordering::SeqCst));
        let max = self.policy.max_concurrent;
        let candidate = workers
            .iter()
            .filter(|w| self.open(&w.state) && w.state.load.load(Ordering::SeqCst) < max)
            .filter(|w| {
                // Idle, or moving I/O along: an instance running guest code
                // would hold this request back; another instance (on another
                // thread) serves it sooner.
                w.state.load.load(Ordering::SeqCst) == 0 || !w.state.busy()
            })
            // The fullest first: requests gather on few instances.
            .max_by_key(|w| w.state.load.load(Ordering::SeqCst));
        if let Some(w) = candidate {
            w.state.load.fetch_add(1, Ordering::SeqCst);
            w.state.given.fetch_add(1, Ordering::SeqCst);
            return (
                WorkerRef {
                    state: w.state.clone(),
                    tx: w.tx.clone(),
                },
                false,
            );
        }
        // Idle instances past max_idle, and those that will take nothing
        // more, retire (their workers end once their requests do, then
        // leave the list).
        let mut idle = 0;
        for w in workers.iter() {
            let s = &w.state;
            let keep = self.open(s)
                && (s.load.load(Ordering::SeqCst) > 0 || {
                    idle += 1;
                    idle <= self.policy.max_idle
                });
            if !keep {
                s.retire();
            }
        }
        let state = Arc::new(WorkerState {
            load: AtomicU32::new(1),
            given: AtomicU32::new(1),
            retiring: AtomicBool::new(false),
            poll_started: AtomicU64::new(0),
            gone: AtomicBool::new(false),
            born: std::time::Instant::now(),
            slots: Mutex::new(HashMap::new()),
            waker: Mutex::new(None),
        });
        let (tx, rx) = mpsc::unbounded_channel();
        let store = make_store();
        let run: GuestFuture = Box::pin(run_worker(
            WorkerSetup {
                pre: self.pre.clone(),
                ticker: self.shared.ticker.clone(),
                stats: self.stats.clone(),
                cpu_budget: self.cpu_budget,
                max_requests: self.policy.max_requests,
            },
            store,
            rx,
            state.clone(),
        ));
        let task = match (&self.queue, tokio::runtime::Handle::try_current()) {
            // On the caller's runtime while its polls are short (moving I/O
            // along, short guest runs), on the fair scheduler once two in a
            // row are not: each hand-off between the fair scheduler's threads and
            // the connections' cost two thread wake-ups per request.
            (Some(queue), Ok(runtime)) => WorkerTask::Tokio(
                runtime
                    .spawn(super::Sliced::each_poll(
                        run,
                        self.demote_after,
                        queue.clone(),
                        self.stats.clone(),
                    ))
                    .abort_handle(),
            ),
            (Some(queue), Err(_)) => WorkerTask::Pooled {
                _task: super::spawn_pooled(queue, run, Duration::ZERO),
            },
            (None, _) => WorkerTask::Tokio(tokio::spawn(run).abort_handle()),
        };
        workers.push(Worker {
            state: state.clone(),
            tx: tx.clone(),
            _task: task,
        });
        self.count_idle(&workers);
        (WorkerRef { state, tx }, true)
    }

    fn count_idle(&self, workers: &[Worker]) {
        let idle = workers
            .iter()
            .filter(|w| w.state.load.load(Ordering::SeqCst) == 0)
            .count();
        self.stats
            .idle_instances
            .store(idle as u64, Ordering::Relaxed);
    }

    /// Retires workers that aged (idle ones end at once); forgets ended ones.
    fn sweep(&self) {
        let mut workers = self.workers();
        workers.retain(|w| !w.state.gone.load(Ordering::SeqCst));
        for w in workers.iter() {
            if w.state.born.elapsed() >= self.policy.max_age {
                w.state.retire();
            }
        }
        self.count_idle(&workers);
    }
}

struct WorkerRef {
    state: Arc<WorkerState>,
    tx: mpsc::UnboundedSender<Job>,
}

/// Cancels a request whose answer has not come when it is dropped armed.
struct Cancel {
    stats: Arc<GuestStats>,
    state: Arc<WorkerState>,
    request_id: RequestId,
    armed: bool,
}

impl Drop for Cancel {
    fn drop(&mut self) {
        if self.armed {
            self.stats.cancelled.fetch_add(1, Ordering::Relaxed);
            self.state.retire();
            self.state.end(self.request_id.seq(), false, || {
                Err(Error::new(ErrorKind::NoResponse).context("cancelled"))
            });
        }
    }
}

/// The body of a response from a shared instance: ends the request in its
/// worker when complete or dropped, and is cut at the request's deadline.
struct SharedBody {
    inner: WasiBody,
    /// Returned before `inner` is polled again.
    ahead: Ahead,
    /// The guest's stream ended; waiting to hear how its request ended.
    ended: bool,
    finished: oneshot::Receiver<bool>,
    done: Option<oneshot::Sender<()>>,
    deadline: Pin<Box<tokio::time::Sleep>>,
    state: Arc<WorkerState>,
    request_id: RequestId,
}

impl Drop for SharedBody {
    fn drop(&mut self) {
        self.done = None;
        self.state
            .end(self.request_id.seq(), false, || Ok(Err(String::new())));
    }
}

impl http_body::Body for SharedBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if self.deadline.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Some(Err(Box::new(
                Error::new(ErrorKind::WallLimit)
                    .context("the response was not complete before the wall deadline"),
            ))));
        }
        if let Some(frame) = self.ahead.frames.pop_front() {
            return Poll::Ready(Some(frame));
        }
        if !self.ended {
            let polled = if self.ahead.end {
                Poll::Ready(None)
            } else {
                Pin::new(&mut self.inner).poll_frame(cx).map_err(Into::into)
            };
            if !matches!(polled, Poll::Ready(None)) {
                return polled;
            }
            // The stream ended: complete only if the guest then finished
            // its request normally (a dying instance ends its streams too).
            self.ended = true;
            self.done = None;
        }
        match Pin::new(&mut self.finished).poll(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Ok(true)) => Poll::Ready(None),
            Poll::Ready(_) => Poll::Ready(Some(Err(super::cut_body()))),
        }
    }

    fn size_hint(&self) -> http_body::SizeHint {
        let ahead: u64 = self
            .ahead
            .frames
            .iter()
            .filter_map(|f| f.as_ref().ok()?.data_ref())
            .map(|d| d.len() as u64)
            .sum();
        if self.ahead.end {
            return http_body::SizeHint::with_exact(ahead);
        }
        let inner = self.inner.size_hint();
        let mut hint = http_body::SizeHint::new();
        hint.set_lower(inner.lower() + ahead);
        if let Some(upper) = inner.upper() {
            hint.set_upper(upper + ahead);
        }
        hint
    }
}

/// What a worker needs of its pool (not the pool itself: the pool owns the
/// worker's task; and not [`Shared`]: a worker may end on a scheduler
/// thread, which must not drop the last hold on the scheduler it runs in).
struct WorkerSetup {
    pre: ServicePre<Host>,
    ticker: Arc<Ticker>,
    stats: Arc<GuestStats>,
    cpu_budget: Duration,
    max_requests: u32,
}

/// One shared instance: instantiates, then serves the requests it is given
/// until it retires (or its pool goes) and they have all ended; checks every
/// request's deadline and CPU budget after each poll of its loop.
async fn run_worker(
    setup: WorkerSetup,
    mut store: Store<Host>,
    rx: mpsc::UnboundedReceiver<Job>,
    state: Arc<WorkerState>,
) -> Result<(), Error> {
    let WorkerSetup {
        pre,
        ticker,
        stats,
        cpu_budget: budget,
        max_requests,
    } = setup;
    let inner_state = state.clone();
    let instantiation = stats.clone();
    let mut guest: Pin<Box<dyn Future<Output = (wasmtime::Result<()>, bool)> + Send + '_>> =
        Box::pin(async move {
            let result = async {
                let started = std::time::Instant::now();
                let service = pre.instantiate_async(&mut store).await?;
                instantiation.instantiation.record(started.elapsed());
                store
                    .run_concurrent(async |accessor| {
                        serve(accessor, &service, rx, &inner_state, &ticker).await
                    })
                    .await?
            }
            .await;
            let denied = store.data().limiter.denied;
            (result, denied)
        });
    let mut cpu = Duration::ZERO;
    let ended = std::future::poll_fn(|cx| {
        *state.waker.lock().unwrap_or_else(|p| p.into_inner()) = Some(cx.waker().clone());
        let started = nanos();
        state.poll_started.store(started, Ordering::SeqCst);
        let start = CpuInstant::now();
        let polled = guest.as_mut().poll(cx);
        cpu += start.elapsed();
        state.poll_started.store(0, Ordering::SeqCst);
        if let Poll::Ready(ended) = polled {
            return Poll::Ready(Some(ended));
        }
        // Deadlines and budgets, per request. A deadline that passes while
        // the loop waits is seen by the request's own task, which ends the
        // request and wakes this one (no timer here).
        let now = Instant::now();
        let mut failed = Vec::new();
        let mut open = 0;
        {
            let mut slots = state.slots();
            for (id, slot) in slots.iter_mut() {
                // Given during the poll that just ended, if not set yet.
                let cpu_start = *slot.cpu_start.get_or_insert(cpu);
                if now >= slot.deadline {
                    failed.push((*id, ErrorKind::WallLimit));
                } else if cpu.saturating_sub(cpu_start) > budget {
                    failed.push((*id, ErrorKind::CpuLimit));
                } else {
                    open += 1;
                }
            }
        }
        if !failed.is_empty() {
            state.retiring.store(true, Ordering::SeqCst);
            for (id, kind) in failed {
                let outcome: Outcome<()> = match kind {
                    ErrorKind::CpuLimit => Outcome::Cpu,
                    _ => Outcome::Wall,
                };
                stats.record_outcome(&outcome);
                state.end(id, false, || Err(Error::new(kind)));
            }
        }
        let spent = state.given.load(Ordering::SeqCst) >= max_requests;
        if open == 0
            && (state.retiring.load(Ordering::SeqCst) || spent)
            && state.load.load(Ordering::SeqCst) == 0
        {
            // Nothing left to serve: drop the instance now, even if some
            // guest code (a failed request's) would run on.
            return Poll::Ready(None);
        }
        Poll::Pending
    })
    .await;
    stats.record_cpu(cpu, Duration::MAX, None);
    state.retiring.store(true, Ordering::SeqCst);
    let failure = match ended {
        Some((Err(e), denied)) => {
            let outcome: Outcome<()> = if denied {
                Outcome::Memory
            } else {
                Outcome::Trap(e)
            };
            stats.record_outcome(&outcome);
            outcome.into_result().err()
        }
        _ => None,
    };
    drop(guest);
    state.gone.store(true, Ordering::SeqCst);
    // Whatever is left has no instance any more.
    let ids: Vec<u64> = state.slots().keys().copied().collect();
    for id in ids {
        state.end(id, false, || {
            Err(failure.as_ref().map_or_else(
                || Error::new(ErrorKind::NoResponse).context("the shared instance ended"),
                |e| Error::new(e.kind().clone()),
            ))
        });
    }
    match failure {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// The event loop's side: starts a `handle` call per job, answers each,
/// and returns once the pool stopped giving jobs and all have ended.
async fn serve(
    accessor: &Accessor<Host>,
    service: &Service,
    mut rx: mpsc::UnboundedReceiver<Job>,
    state: &Arc<WorkerState>,
    ticker: &Arc<Ticker>,
) -> wasmtime::Result<()> {
    let mut inflight = FuturesUnordered::new();
    let mut accepting = true;
    loop {
        tokio::select! {
            biased;
            Some(ended) = inflight.next(), if !inflight.is_empty() => {
                let (id, result): (u64, wasmtime::Result<()>) = ended;
                result?;
                state.end(id, true, || Ok(Err(String::new())));
                if inflight.is_empty() {
                    accessor.with(|mut store| {
                        let host = store.data_mut();
                        host.end_request();
                        host.set_ticker(None);
                    });
                }
            }
            job = rx.recv(), if accepting => match job {
                None => accepting = false,
                Some(job) => {
                    let done = state.slots().get_mut(&job.request_id.seq()).and_then(|s| s.done.take());
                    let Some(done) = done else {
                        // It ended before it started (deadline, cancelled).
                        continue;
                    };
                    if inflight.is_empty() {
                        accessor.with(|mut store| {
                            let host = store.data_mut();
                            host.set_ticker(Some(ticker.lease()));
                            host.begin_request(job.request_id);
                        });
                    }
                    inflight.push(run_job(accessor, service, job, done, state.clone()));
                }
            },
            else => {}
        }
        if !accepting && inflight.is_empty() {
            return Ok(());
        }
    }
}

/// One request on the shared instance: its `handle` call, then (with a
/// response) the body streams until the request's side says it is done.
async fn run_job(
    accessor: &Accessor<Host>,
    service: &Service,
    job: Job,
    done: oneshot::Receiver<()>,
    state: Arc<WorkerState>,
) -> (u64, wasmtime::Result<()>) {
    let id = job.request_id.seq();
    let result = async {
        match service.handle(accessor, job.request).await? {
            Ok(response) => {
                let response =
                    accessor.with(|mut store| response.into_http(&mut store, job.request_io))?;
                let (parts, mut body) = response.into_parts();
                let ahead = take_ahead(&mut body).await;
                let response = (http::Response::from_parts(parts, body), ahead);
                let sent = {
                    let mut slots = state.slots();
                    slots
                        .get_mut(&id)
                        .and_then(|s| s.tx.take())
                        .map(|tx| tx.send(Ok(Ok(response))).is_ok())
                };
                if sent == Some(true) {
                    // Keep the stream fed until the body is read or dropped.
                    let _ = done.await;
                }
            }
            Err(code) => {
                let tx = state.slots().get_mut(&id).and_then(|s| s.tx.take());
                if let Some(tx) = tx {
                    let _ = tx.send(Ok(Err(format!("{code:?}"))));
                }
            }
        }
        wasmtime::Result::<()>::Ok(())
    }
    .await;
    (id, result)
}
