//! The fair guest scheduler: weighted fair queueing of guest slices across
//! tenants, on dedicated threads.
//!
//! Each tenant has a FIFO run queue of guest slices and a virtual time: the
//! CPU time its slices used, divided by its weight. A free worker always runs
//! the next slice of the backlogged tenant with the smallest virtual time, so
//! over any window in which tenants stay backlogged they get CPU in
//! proportion to their weights. A tenant that becomes runnable after being
//! idle starts at the scheduler's virtual clock (the virtual time of the last
//! slice picked): it goes ahead of tenants that have been using the CPU, but
//! banks no credit while idle.
//!
//! Inside a tenant, slices are picked by least attained service: each
//! request's guest carries the CPU it has used so far, and a tenant's queue
//! has [`LEVELS`] levels by that amount (level `floor(log2(ms + 1))`, the
//! last one open-ended). The next slice of a tenant comes from its lowest
//! non-empty level, so a new request starts ahead of requests that have
//! already used a lot of CPU, and a short one finishes in its first slices
//! while long ones share the rest. No request starves: one pick in
//! [`AGING_EVERY`] of a tenant goes to its most-served waiting request, so
//! long requests keep at least that share of their tenant's CPU while short
//! ones keep arriving (and their CPU budget still stops them). Across
//! tenants nothing changes: the tenant is picked by weighted virtual time
//! first.
//!
//! Slices end at the guest's next epoch tick (the runtime makes a running
//! guest yield every tick), so a worker is never held longer than one tick
//! by one guest.
//!
//! The workers run in the kernel's `SCHED_IDLE` class, below the threads
//! that serve connections. Connection threads run short guests and all the
//! I/O; a CPU hog on this scheduler can then not delay accepting, parsing
//! and answering other requests, while it still gets all the CPU they leave
//! idle.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use super::{GuestScheduler, SliceQueue, thread_cpu_time, use_thread_cpu_clock};
use async_task::Runnable;
use tokio::sync::watch;

/// Virtual time unit: nanoseconds of CPU at weight 1.
type VTime = u128;

/// CPU served to one tenant so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TenantStats {
    /// CPU time its slices used on scheduler threads.
    pub cpu: Duration,
    /// Slices run.
    pub slices: u64,
    /// Its weight.
    pub weight: u32,
}

/// Levels of attained service inside a tenant's queue.
pub const LEVELS: usize = 6;
/// One pick in this many of a tenant goes to its most-served waiting
/// request (the starvation guard).
pub const AGING_EVERY: u32 = 8;

/// The level of a request that has used `attained` CPU:
/// `floor(log2(ms + 1))`, capped at the last level.
fn level(attained: Duration) -> usize {
    let ms = attained.as_millis() + 1;
    ((u128::BITS - 1 - ms.leading_zeros()) as usize).min(LEVELS - 1)
}

/// A tenant's waiting slices, by level of attained service.
#[derive(Default)]
struct Levels {
    queues: [VecDeque<Runnable>; LEVELS],
    len: usize,
    picks: u32,
}

impl Levels {
    fn push(&mut self, runnable: Runnable, attained: Duration) {
        self.queues[level(attained)].push_back(runnable);
        self.len += 1;
    }

    /// The lowest level's oldest slice, except every [`AGING_EVERY`]th pick:
    /// the highest level's.
    fn pop(&mut self) -> Option<Runnable> {
        if self.len == 0 {
            return None;
        }
        self.picks = self.picks.wrapping_add(1);
        let runnable = if self.picks.is_multiple_of(AGING_EVERY) {
            self.queues.iter_mut().rev().find_map(VecDeque::pop_front)
        } else {
            self.queues.iter_mut().find_map(VecDeque::pop_front)
        };
        if runnable.is_some() {
            self.len -= 1;
        }
        runnable
    }

    fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn take_all(&mut self) -> Vec<Runnable> {
        self.len = 0;
        self.queues.iter_mut().flat_map(std::mem::take).collect()
    }
}

struct Tenant {
    weight: u32,
    vtime: VTime,
    /// `Some(key)` while the tenant is in `ready` under `(key, index)`.
    ready_key: Option<VTime>,
    queue: Levels,
    stats: TenantStats,
}

struct RunQueue {
    tenants: Vec<Tenant>,
    by_name: HashMap<String, usize>,
    /// Backlogged tenants by virtual time.
    ready: BTreeSet<(VTime, usize)>,
    /// Virtual time of the last slice picked.
    clock: VTime,
    shutdown: bool,
}

impl RunQueue {
    fn tenant(&mut self, name: &str, weight: u32) -> usize {
        if let Some(&i) = self.by_name.get(name) {
            return i;
        }
        let i = self.tenants.len();
        self.tenants.push(Tenant {
            weight: weight.max(1),
            vtime: 0,
            ready_key: None,
            queue: Levels::default(),
            stats: TenantStats {
                weight: weight.max(1),
                ..TenantStats::default()
            },
        });
        self.by_name.insert(name.to_string(), i);
        i
    }

    fn push(&mut self, index: usize, runnable: Runnable, attained: Duration) {
        let clock = self.clock;
        let t = &mut self.tenants[index];
        t.queue.push(runnable, attained);
        if t.ready_key.is_none() {
            t.vtime = t.vtime.max(clock);
            t.ready_key = Some(t.vtime);
            self.ready.insert((t.vtime, index));
        }
    }

    fn pop(&mut self) -> Option<(usize, Runnable)> {
        let &(key, index) = self.ready.first()?;
        self.clock = self.clock.max(key);
        let t = &mut self.tenants[index];
        let runnable = t.queue.pop().expect("a ready tenant has work");
        if t.queue.is_empty() {
            self.ready.remove(&(key, index));
            t.ready_key = None;
        }
        Some((index, runnable))
    }

    fn charge(&mut self, index: usize, used: Duration) {
        let t = &mut self.tenants[index];
        t.vtime += used.as_nanos() / VTime::from(t.weight);
        t.stats.cpu += used;
        t.stats.slices += 1;
        if let Some(key) = t.ready_key {
            self.ready.remove(&(key, index));
            t.ready_key = Some(t.vtime);
            self.ready.insert((t.vtime, index));
        }
    }
}

struct Shared {
    queue: Mutex<RunQueue>,
    work: Condvar,
    weights: BTreeMap<String, u32>,
    /// Bumped after every slice, for observers that wait on the stats.
    slices: watch::Sender<u64>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, RunQueue> {
        // A panic while holding the lock is a logic bug in this module; the
        // queue itself stays consistent, so keep serving.
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The process-wide fair scheduler (see the module docs).
pub struct FairScheduler {
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<()>>,
}

struct TenantQueue {
    shared: Arc<Shared>,
    index: usize,
}

impl SliceQueue for TenantQueue {
    fn schedule(&self, runnable: Runnable, attained: Duration) {
        let mut q = self.shared.lock();
        if q.shutdown {
            // Dropping the runnable cancels the guest.
            return;
        }
        q.push(self.index, runnable, attained);
        drop(q);
        self.shared.work.notify_one();
    }
}

impl FairScheduler {
    /// Starts `threads` workers. Slices run inside `runtime`'s context, so
    /// guests can use its timers and I/O. Tenants not in `weights` weigh 1.
    pub fn new(
        threads: usize,
        weights: BTreeMap<String, u32>,
        runtime: tokio::runtime::Handle,
    ) -> std::io::Result<Arc<FairScheduler>> {
        let shared = Arc::new(Shared {
            queue: Mutex::new(RunQueue {
                tenants: Vec::new(),
                by_name: HashMap::new(),
                ready: BTreeSet::new(),
                clock: 0,
                shutdown: false,
            }),
            work: Condvar::new(),
            weights,
            slices: watch::channel(0).0,
        });
        let mut workers = Vec::with_capacity(threads);
        for i in 0..threads.max(1) {
            let shared = shared.clone();
            let runtime = runtime.clone();
            workers.push(
                std::thread::Builder::new()
                    .name(format!("ignis-guest-{i}"))
                    .spawn(move || worker(&shared, &runtime))?,
            );
        }
        Ok(Arc::new(FairScheduler { shared, workers }))
    }

    /// CPU served to `tenant` so far (`None` if it never had a queue).
    pub fn tenant_stats(&self, tenant: &str) -> Option<TenantStats> {
        let q = self.shared.lock();
        q.by_name.get(tenant).map(|&i| q.tenants[i].stats)
    }

    /// Waits until `check` holds; re-checked after every slice.
    pub async fn wait_until(&self, check: impl Fn(&FairScheduler) -> bool) {
        let mut rx = self.shared.slices.subscribe();
        loop {
            if check(self) {
                return;
            }
            if rx.changed().await.is_err() {
                return;
            }
        }
    }
}

impl GuestScheduler for FairScheduler {
    fn tenant_queue(&self, tenant: &str) -> Arc<dyn SliceQueue> {
        let weight = self.shared.weights.get(tenant).copied().unwrap_or(1);
        let index = self.shared.lock().tenant(tenant, weight);
        Arc::new(TenantQueue {
            shared: self.shared.clone(),
            index,
        })
    }
}

impl Drop for FairScheduler {
    fn drop(&mut self) {
        let pending: Vec<Runnable> = {
            let mut q = self.shared.lock();
            q.shutdown = true;
            q.ready.clear();
            q.tenants
                .iter_mut()
                .flat_map(|t| {
                    t.ready_key = None;
                    t.queue.take_all()
                })
                .collect()
        };
        // Cancel what never ran (outside the lock: dropping a guest may wake others).
        drop(pending);
        self.shared.work.notify_all();
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

fn worker(shared: &Shared, runtime: &tokio::runtime::Handle) {
    let _context = runtime.enter();
    use_thread_cpu_clock();
    lower_priority();
    let mut q = shared.lock();
    loop {
        if q.shutdown {
            return;
        }
        let Some((index, runnable)) = q.pop() else {
            q = shared.work.wait(q).unwrap_or_else(|e| e.into_inner());
            continue;
        };
        drop(q);
        let start = thread_cpu_time();
        runnable.run();
        let used = thread_cpu_time().saturating_sub(start);
        q = shared.lock();
        q.charge(index, used);
        shared.slices.send_modify(|n| *n += 1);
    }
}

/// Puts the calling thread in the kernel's `SCHED_IDLE` class: any normal
/// thread that wakes up (a connection thread with a request to read)
/// preempts it at once, instead of waiting for its time slice to end.
#[allow(unsafe_code)]
fn lower_priority() {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: plain system calls on the calling thread with a valid,
    // initialised `sched_param`; no memory is shared.
    let rc = unsafe {
        let tid = libc::gettid();
        libc::sched_setscheduler(tid, libc::SCHED_IDLE, &param)
    };
    if rc != 0 {
        tracing::warn!(error = %std::io::Error::last_os_error(), "could not move a guest scheduler thread to SCHED_IDLE");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn runnable() -> Runnable {
        let (r, task) = async_task::spawn(async {}, |_| {});
        task.detach();
        r
    }

    fn queue() -> RunQueue {
        RunQueue {
            tenants: Vec::new(),
            by_name: HashMap::new(),
            ready: BTreeSet::new(),
            clock: 0,
            shutdown: false,
        }
    }

    #[test]
    fn picks_the_tenant_with_the_least_weighted_cpu() {
        let mut q = queue();
        let light = q.tenant("light", 1);
        let heavy = q.tenant("heavy", 3);
        let mut picked = BTreeMap::<usize, u32>::new();
        for _ in 0..400 {
            while q.tenants[light].queue.len < 2 {
                q.push(light, runnable(), Duration::ZERO);
            }
            while q.tenants[heavy].queue.len < 2 {
                q.push(heavy, runnable(), Duration::ZERO);
            }
            let (i, _r) = q.pop().expect("work");
            *picked.entry(i).or_default() += 1;
            q.charge(i, Duration::from_millis(1));
        }
        assert_eq!(picked[&light], 100);
        assert_eq!(picked[&heavy], 300);
    }

    #[test]
    fn an_idle_tenant_banks_no_credit() {
        let mut q = queue();
        let busy = q.tenant("busy", 1);
        let idle = q.tenant("idle", 1);
        for _ in 0..100 {
            q.push(busy, runnable(), Duration::ZERO);
            let (i, _r) = q.pop().expect("work");
            q.charge(i, Duration::from_millis(1));
        }
        // `idle` wakes up: it goes first once, then they alternate.
        for _ in 0..4 {
            q.push(idle, runnable(), Duration::ZERO);
            q.push(busy, runnable(), Duration::ZERO);
        }
        let order: Vec<usize> = (0..8)
            .map(|_| {
                let (i, _r) = q.pop().expect("work");
                q.charge(i, Duration::from_millis(1));
                i
            })
            .collect();
        assert_eq!(order[0], idle);
        let idle_runs = order.iter().filter(|&&i| i == idle).count();
        assert_eq!(idle_runs, 4, "order {order:?}");
        assert!(
            order[..4].contains(&busy),
            "idle tenant must not monopolise after waking: {order:?}"
        );
    }

    /// A runnable that records `id` in `ran` when it runs.
    fn tagged(id: u32, ran: &Arc<Mutex<Vec<u32>>>) -> Runnable {
        let ran = ran.clone();
        let (r, task) = async_task::spawn(
            async move {
                ran.lock().unwrap().push(id);
            },
            |_| {},
        );
        task.detach();
        r
    }

    #[test]
    fn levels_grow_with_the_log_of_attained_milliseconds() {
        let ms = Duration::from_millis;
        let levels: Vec<usize> = [0, 1, 2, 3, 6, 7, 14, 15, 30, 31, 10_000]
            .into_iter()
            .map(|m| level(ms(m)))
            .collect();
        assert_eq!(levels, [0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5]);
        assert_eq!(level(Duration::from_micros(999)), 0);
    }

    #[test]
    fn inside_a_tenant_the_least_served_request_goes_first() {
        let mut q = queue();
        let t = q.tenant("t", 1);
        let ran = Arc::new(Mutex::new(Vec::new()));
        // Three long requests (40, 20 and 5 ms served) wait; then a new one
        // (0 ms) and one that has had 2 ms arrive.
        q.push(t, tagged(40, &ran), Duration::from_millis(40));
        q.push(t, tagged(20, &ran), Duration::from_millis(20));
        q.push(t, tagged(5, &ran), Duration::from_millis(5));
        q.push(t, tagged(0, &ran), Duration::ZERO);
        q.push(t, tagged(2, &ran), Duration::from_millis(2));
        for _ in 0..5 {
            let (_, r) = q.pop().expect("work");
            r.run();
        }
        // Least attained first (levels 0, 1, 2, 4, 5), whatever the order
        // they arrived in.
        assert_eq!(*ran.lock().unwrap(), [0, 2, 5, 20, 40]);
        // In one level, arrival order: 40 and 100 ms are both in the last.
        q.push(t, tagged(100, &ran), Duration::from_millis(100));
        q.push(t, tagged(41, &ran), Duration::from_millis(41));
        for _ in 0..2 {
            let (_, r) = q.pop().expect("work");
            r.run();
        }
        assert_eq!(ran.lock().unwrap()[5..], [100, 41]);
    }

    #[test]
    fn a_long_request_gets_one_pick_in_aging_every_while_short_ones_keep_coming() {
        let mut q = queue();
        let t = q.tenant("t", 1);
        let ran = Arc::new(Mutex::new(Vec::new()));
        q.push(t, tagged(1000, &ran), Duration::from_secs(1));
        let mut long_picked_at = None;
        for pick in 1..=AGING_EVERY {
            // A fresh short request is always waiting.
            q.push(t, tagged(0, &ran), Duration::ZERO);
            let (_, r) = q.pop().expect("work");
            r.run();
            if ran.lock().unwrap().last() == Some(&1000) {
                long_picked_at = Some(pick);
                break;
            }
        }
        assert_eq!(long_picked_at, Some(AGING_EVERY));
    }
}
