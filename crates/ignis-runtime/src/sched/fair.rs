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

struct Tenant {
    weight: u32,
    vtime: VTime,
    /// `Some(key)` while the tenant is in `ready` under `(key, index)`.
    ready_key: Option<VTime>,
    queue: VecDeque<Runnable>,
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
            queue: VecDeque::new(),
            stats: TenantStats {
                weight: weight.max(1),
                ..TenantStats::default()
            },
        });
        self.by_name.insert(name.to_string(), i);
        i
    }

    fn push(&mut self, index: usize, runnable: Runnable) {
        let clock = self.clock;
        let t = &mut self.tenants[index];
        t.queue.push_back(runnable);
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
        let runnable = t.queue.pop_front().expect("a ready tenant has work");
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
    fn schedule(&self, runnable: Runnable) {
        let mut q = self.shared.lock();
        if q.shutdown {
            // Dropping the runnable cancels the guest.
            return;
        }
        q.push(self.index, runnable);
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
                    std::mem::take(&mut t.queue)
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
            while q.tenants[light].queue.len() < 2 {
                q.push(light, runnable());
            }
            while q.tenants[heavy].queue.len() < 2 {
                q.push(heavy, runnable());
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
            q.push(busy, runnable());
            let (i, _r) = q.pop().expect("work");
            q.charge(i, Duration::from_millis(1));
        }
        // `idle` wakes up: it goes first once, then they alternate.
        for _ in 0..4 {
            q.push(idle, runnable());
            q.push(busy, runnable());
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
}
