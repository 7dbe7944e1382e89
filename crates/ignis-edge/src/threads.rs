//! Connection threads: every accepted connection is served, from its TLS
//! handshake to its close, by one of a few threads (one per core), each
//! running its own current-thread tokio runtime. It is the layout nginx
//! gets from its worker processes, and it is why: on the process's
//! multi-thread runtime a worker that found I/O work woke the other, which
//! often found nothing left to steal, on two cores shared with the origin
//! and the load generator. A connection that stays on one thread removes
//! that coordination; measured in docs/perf/2026-12-01-connection-threads.md
//! (against nginx the proxy went from 0.78 / 0.81 / 0.65 of its
//! throughput to 0.88 / 0.87 / 0.87 on HTTP/1.1, TLS and h2; key-value
//! writes 1.14-1.29×; the 0.2 hello 0.94-1.14× across three A B B A runs).
//!
//! Invariants:
//! - Every thread accepts on the listener itself (its own copy of the
//!   descriptor, registered with its own reactor) and serves what it
//!   accepts, unless another thread has fewer connections open
//!   ([`Pool::place`]): then the connection moves there once, at accept.
//!   A first version dealt every connection from one accept loop on the
//!   process runtime, round robin; the hand-off (a wake of the serving
//!   thread, the socket moved between reactors) cost a fifth of the new
//!   connections per second.
//! - A connection, and every task its requests spawn (HTTP/2 streams, a
//!   response's watchdog, origin connections it opens), stays on its
//!   thread to the end. A single busy connection uses one core, as in
//!   nginx.
//! - Work shared by all connections and outliving each of them (actor
//!   activations, commits, health checks, deploys, the guest scheduler)
//!   does not run here; it stays on the process's runtime or its own
//!   threads.
//! - The threads run while a listener runs: each running [`crate::Server`]
//!   holds a lease ([`Threads::lease`]) and drops it after its grace
//!   period. With the last lease the threads' runtimes shut down (which
//!   closes the connections still open) and the threads are joined.
//! - A thread's job queue holds accept loops and connections moved to it;
//!   each of those holds a slot of the node's `max_connections`, so the
//!   queue is bounded by that cap.

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::thread::JoinHandle;

use tokio::sync::mpsc;

type Job = Box<dyn FnOnce() + Send>;

thread_local! {
    /// The index of the connection thread this is, if it is one.
    static CURRENT: std::cell::Cell<Option<usize>> = const { std::cell::Cell::new(None) };
}

/// How many connection threads an edge runs: one per core (read once:
/// `available_parallelism` reads the cgroup's files).
pub(crate) fn count() -> usize {
    static COUNT: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *COUNT.get_or_init(|| std::thread::available_parallelism().map_or(2, |n| n.get()))
}

/// The index of the calling connection thread (`None` on any other
/// thread).
pub(crate) fn current() -> Option<usize> {
    CURRENT.with(|c| c.get())
}

/// One value per connection thread, and one shared by every other thread:
/// for caches of connections (the proxy's origin connections, the
/// cluster's links) kept on the thread whose reactor owns their sockets,
/// since a current-thread runtime polls its reactor only on its own thread.
pub struct PerThread<T> {
    slots: Box<[T]>,
}

impl<T> PerThread<T> {
    /// `make()` for each connection thread and once for the others.
    pub fn new(mut make: impl FnMut() -> T) -> PerThread<T> {
        PerThread {
            slots: (0..=count()).map(|_| make()).collect(),
        }
    }

    /// The slot of `thread` (a connection thread's index, as [`current`]
    /// gives it), or the shared one (`None`).
    pub fn index_of(&self, thread: Option<usize>) -> usize {
        let shared = self.slots.len() - 1;
        thread.map_or(shared, |i| i.min(shared))
    }

    /// The calling thread's slot.
    pub fn index_here(&self) -> usize {
        self.index_of(current())
    }

    /// Every slot, the calling thread's first and then the others in turn.
    pub fn here_first(&self) -> impl Iterator<Item = &T> {
        let here = self.index_here();
        let n = self.slots.len();
        (0..n).map(move |i| &self.slots[(here + i) % n])
    }
}

impl<T> std::ops::Index<usize> for PerThread<T> {
    type Output = T;

    fn index(&self, slot: usize) -> &T {
        &self.slots[slot]
    }
}

/// The connection threads of one edge: started by the first running
/// listener, shared by all of them, ended with the last.
pub(crate) struct Threads {
    count: usize,
    running: Mutex<Weak<Pool>>,
}

impl Threads {
    /// `count` threads (at least one) once a listener runs.
    pub(crate) fn new(count: usize) -> Threads {
        Threads {
            count: count.max(1),
            running: Mutex::new(Weak::new()),
        }
    }

    /// The running threads, started if no listener holds them.
    pub(crate) fn lease(&self) -> std::io::Result<Arc<Pool>> {
        let mut running = self.running.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(pool) = running.upgrade() {
            return Ok(pool);
        }
        let pool = Arc::new(Pool::start(self.count)?);
        *running = Arc::downgrade(&pool);
        Ok(pool)
    }
}

/// Running connection threads.
pub(crate) struct Pool {
    lanes: Vec<mpsc::UnboundedSender<Job>>,
    /// Connections open on each thread.
    open: Arc<[AtomicUsize]>,
    threads: Vec<JoinHandle<()>>,
}

/// One connection counted on its thread; uncounted on drop.
pub(crate) struct Open {
    open: Arc<[AtomicUsize]>,
    thread: usize,
}

impl Drop for Open {
    fn drop(&mut self) {
        self.open[self.thread].fetch_sub(1, Ordering::Relaxed);
    }
}

impl Pool {
    fn start(count: usize) -> std::io::Result<Pool> {
        let mut lanes = Vec::with_capacity(count);
        let mut threads = Vec::with_capacity(count);
        for i in 0..count {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let (tx, mut rx) = mpsc::unbounded_channel::<Job>();
            let thread = std::thread::Builder::new()
                .name(format!("ignis-conn-{i}"))
                .spawn(move || {
                    CURRENT.with(|c| c.set(Some(i)));
                    runtime.block_on(async {
                        while let Some(job) = rx.recv().await {
                            job();
                        }
                    });
                    // Cancels what is left (connections past the grace
                    // period) without waiting for blocking work such as a
                    // name lookup of the proxy's resolver.
                    runtime.shutdown_background();
                })?;
            lanes.push(tx);
            threads.push(thread);
        }
        Ok(Pool {
            lanes,
            open: (0..count).map(|_| AtomicUsize::new(0)).collect(),
            threads,
        })
    }

    /// How many threads serve connections.
    pub(crate) fn len(&self) -> usize {
        self.lanes.len()
    }

    /// The thread to serve a connection accepted on thread `here`: `here`,
    /// unless another has fewer connections open (the first such).
    pub(crate) fn place(&self, here: usize) -> usize {
        let load = |i: usize| self.open[i].load(Ordering::Relaxed);
        let fewest = (0..self.open.len())
            .min_by_key(|&i| load(i))
            .unwrap_or(here);
        match load(fewest) < load(here) {
            true => fewest,
            false => here,
        }
    }

    /// Counts a connection on `thread` until the guard is dropped.
    pub(crate) fn open(&self, thread: usize) -> Open {
        self.open[thread].fetch_add(1, Ordering::Relaxed);
        Open {
            open: self.open.clone(),
            thread,
        }
    }

    /// Runs the future `make` builds as a task on thread `thread` (`make`
    /// runs on that thread, inside its runtime: a socket is registered
    /// with that thread's reactor there).
    pub(crate) fn spawn_on<F>(&self, thread: usize, make: impl FnOnce() -> F + Send + 'static)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let job: Job = Box::new(move || {
            tokio::spawn(make());
        });
        // A thread's receiver lives as long as this pool's sender.
        let _ = self.lanes[thread].send(job);
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        self.lanes.clear();
        let me = std::thread::current().id();
        for thread in self.threads.drain(..) {
            // Never join oneself (the pool is dropped by the accept loop,
            // which does not run on these threads; this is a guard).
            if thread.thread().id() != me {
                let _ = thread.join();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Where futures handed to threads `0..n` of the pool ran.
    fn thread_names(pool: &Pool, on: &[usize]) -> Vec<String> {
        let (tx, rx) = std::sync::mpsc::channel();
        for &thread in on {
            let tx = tx.clone();
            pool.spawn_on(thread, move || async move {
                // A task of that thread's runtime: it can use the runtime.
                tokio::task::yield_now().await;
                assert_eq!(
                    current(),
                    Some(thread),
                    "a connection thread knows its index"
                );
                let name = std::thread::current().name().map(str::to_string);
                let _ = tx.send(name.unwrap_or_default());
            });
        }
        (0..on.len()).map(|_| rx.recv().unwrap()).collect()
    }

    /// A connection thread uses its own slot first, any other thread the
    /// shared one; every slot is visited once.
    #[test]
    fn per_thread_slots_start_with_the_callers() {
        let mut n = 0;
        let slots = Arc::new(PerThread::new(|| {
            n += 1;
            n - 1
        }));
        let shared = count();
        assert_eq!(slots.index_here(), shared, "not a connection thread");
        let order: Vec<usize> = slots.here_first().copied().collect();
        assert_eq!(order[0], shared);
        let mut all = order.clone();
        all.sort();
        assert_eq!(all, (0..=shared).collect::<Vec<_>>());
        assert_eq!(slots.index_of(Some(shared + 5)), shared);

        let threads = Threads::new(count());
        let pool = threads.lease().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        for thread in 0..count() {
            let (tx, slots) = (tx.clone(), slots.clone());
            pool.spawn_on(thread, move || async move {
                let first = slots.here_first().next().copied();
                let _ = tx.send((thread, slots.index_here(), first));
            });
        }
        for _ in 0..count() {
            let (thread, here, first) = rx.recv().unwrap();
            assert_eq!((here, first), (thread, Some(thread)));
        }
    }

    #[test]
    fn work_runs_on_the_thread_it_is_given_to() {
        let threads = Threads::new(3);
        let pool = threads.lease().unwrap();
        assert_eq!(pool.len(), 3);
        assert_eq!(current(), None, "not a connection thread");
        let mut names = thread_names(&pool, &[2, 0, 1, 2]);
        names.sort();
        assert_eq!(
            names,
            [
                "ignis-conn-0",
                "ignis-conn-1",
                "ignis-conn-2",
                "ignis-conn-2"
            ]
        );
    }

    #[test]
    fn a_connection_stays_where_it_was_accepted_unless_another_thread_has_fewer() {
        let threads = Threads::new(3);
        let pool = threads.lease().unwrap();
        // All equal: each thread keeps what it accepts.
        assert_eq!((pool.place(0), pool.place(1), pool.place(2)), (0, 1, 2));
        let a = pool.open(1);
        let b = pool.open(1);
        let c = pool.open(0);
        // Thread 1 holds two, thread 0 one, thread 2 none.
        assert_eq!(pool.place(1), 2, "to the thread with the fewest");
        assert_eq!(pool.place(0), 2);
        assert_eq!(pool.place(2), 2, "kept: no thread has fewer");
        drop((a, b));
        // Thread 0 holds one, the others none.
        assert_eq!(pool.place(0), 1, "the first of the least loaded");
        assert_eq!(pool.place(1), 1);
        drop(c);
        assert_eq!(pool.place(0), 0, "counts go when connections close");
    }

    /// Set when dropped.
    struct Dropped(Arc<std::sync::atomic::AtomicBool>);

    impl Drop for Dropped {
        fn drop(&mut self) {
            self.0.store(true, Ordering::SeqCst);
        }
    }

    #[test]
    fn listeners_share_the_threads_and_the_last_one_ends_them_closing_what_is_left() {
        let threads = Threads::new(2);
        let first = threads.lease().unwrap();
        let second = threads.lease().unwrap();
        assert!(Arc::ptr_eq(&first, &second), "one set of threads per edge");

        // A connection that never ends on its own, started on a thread.
        let dropped = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (started_tx, started_rx) = std::sync::mpsc::channel();
        let guard = Dropped(dropped.clone());
        first.spawn_on(1, move || async move {
            let _guard = guard;
            let _ = started_tx.send(());
            std::future::pending::<()>().await;
        });
        started_rx.recv().unwrap();

        drop(first);
        assert!(
            !dropped.load(Ordering::SeqCst),
            "a listener still runs: its connections stay"
        );
        drop(second);
        // The drop joined the threads: the task is gone by now.
        assert!(
            dropped.load(Ordering::SeqCst),
            "the last lease cancels what is left"
        );

        // A listener started later gets new threads.
        let again = threads.lease().unwrap();
        assert_eq!(thread_names(&again, &[1]), ["ignis-conn-1"]);
    }
}
