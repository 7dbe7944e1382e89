//! Connection threads: every accepted connection is served, from its TLS
//! handshake to its close, by one of a few threads (one per core), each
//! running its own current-thread tokio runtime. It is the layout nginx
//! gets from its worker processes, and it is why: on the process's
//! multi-thread runtime a worker that found I/O work woke the other, which
//! often found nothing left to steal, on two cores shared with the origin
//! and the load generator. One connection per thread removes that
//! coordination; measured in docs/perf/2026-12-01-proxy-path.md (the proxy
//! at 25.5 against 33.4 µs of CPU per request, the function paths 9-19%
//! faster).
//!
//! Invariants:
//! - The listener's accept loop hands each connection, round robin, to one
//!   thread, which serves it and every task its requests spawn (HTTP/2
//!   streams, a response's watchdog, origin connections it opens) to the
//!   end. A single busy connection uses one core, as in nginx.
//! - Work shared by all connections and outliving each of them (actor
//!   activations, commits, health checks, deploys, the guest scheduler)
//!   does not run here; it stays on the process's runtime or its own
//!   threads.
//! - The threads run while a listener runs: each running [`crate::Server`]
//!   holds a lease ([`Threads::lease`]) and drops it after its grace
//!   period. With the last lease the threads' runtimes shut down (which
//!   closes the connections still open) and the threads are joined.
//! - The hand-off queue of a thread holds accepted connections that hold
//!   a slot of the node's `max_connections`, so it is bounded by that cap.

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::thread::JoinHandle;

use tokio::sync::mpsc;

type Job = Box<dyn FnOnce() + Send>;

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
    next: AtomicUsize,
    threads: Vec<JoinHandle<()>>,
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
            next: AtomicUsize::new(0),
            threads,
        })
    }

    /// Runs the future `make` builds as a task on the next thread (`make`
    /// runs on that thread, inside its runtime: a socket is registered with
    /// that thread's reactor there).
    pub(crate) fn spawn<F>(&self, make: impl FnOnce() -> F + Send + 'static)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.lanes.len();
        let job: Job = Box::new(move || {
            tokio::spawn(make());
        });
        // A thread's receiver lives as long as this pool's sender.
        let _ = self.lanes[i].send(job);
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

    /// Where the futures handed to a pool ran.
    fn thread_names(pool: &Pool, jobs: usize) -> Vec<String> {
        let (tx, rx) = std::sync::mpsc::channel();
        for _ in 0..jobs {
            let tx = tx.clone();
            pool.spawn(move || async move {
                // A task of that thread's runtime: it can use the runtime.
                tokio::task::yield_now().await;
                let name = std::thread::current().name().map(str::to_string);
                let _ = tx.send(name.unwrap_or_default());
            });
        }
        let mut names: Vec<String> = (0..jobs).map(|_| rx.recv().unwrap()).collect();
        names.sort();
        names
    }

    #[test]
    fn connections_are_dealt_round_robin_to_the_threads() {
        let threads = Threads::new(3);
        let pool = threads.lease().unwrap();
        assert_eq!(
            thread_names(&pool, 6),
            [
                "ignis-conn-0",
                "ignis-conn-0",
                "ignis-conn-1",
                "ignis-conn-1",
                "ignis-conn-2",
                "ignis-conn-2"
            ]
        );
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
        first.spawn(move || async move {
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
        assert_eq!(thread_names(&again, 2), ["ignis-conn-0", "ignis-conn-1"]);
    }
}
