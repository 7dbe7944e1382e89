//! The engines' costs side by side, in one run: the embedded SQLite engine
//! and PostgreSQL (a private server from `ignis_store::testing`, `fsync` on,
//! `synchronous_commit` on, over a Unix socket) under the same workloads: a
//! point read, one durable write at a time, 64 concurrent writers sharing
//! group commits, and 64 actors committing batches at once.
//!
//! `cargo bench -p ignis-store --bench kv`; compare `kv/sqlite/*` with
//! `kv/postgres/*` (docs/BENCHMARKS.md, "Storage engines").

use std::sync::Arc;

use criterion::{Criterion, criterion_group, criterion_main};
use ignis_store::{
    ActorBatch, ActorKey, ActorStorage, KvBackend, Namespace, PgOptions, PgStore, SqliteStore,
};

/// `tasks` concurrent loops sharing `iters` calls of `op`; the time scaled
/// to `iters` calls.
async fn concurrent<F, Fut>(iters: u64, tasks: u64, op: F) -> std::time::Duration
where
    F: Fn(u64) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let op = Arc::new(op);
    let start = std::time::Instant::now();
    let per = iters.div_ceil(tasks);
    let handles: Vec<_> = (0..tasks)
        .map(|t| {
            let op = op.clone();
            tokio::spawn(async move {
                for _ in 0..per {
                    op(t).await;
                }
            })
        })
        .collect();
    for h in handles {
        h.await.unwrap();
    }
    start.elapsed().mul_f64(iters as f64 / (per * tasks) as f64)
}

fn engine<S: KvBackend + ActorStorage + Clone>(
    c: &mut Criterion,
    rt: &tokio::runtime::Runtime,
    name: &str,
    store: S,
) {
    let store = Arc::new(store);
    let ns = Namespace::new("bench", "default");
    rt.block_on(store.set(&ns, "k", b"value".to_vec())).unwrap();
    let mut g = c.benchmark_group(format!("kv/{name}"));
    g.bench_function("get", |b| {
        b.to_async(rt)
            .iter(|| async { store.get(&ns, "k").await.unwrap() })
    });
    g.sample_size(20);
    g.bench_function("set_durable_one_writer", |b| {
        b.to_async(rt)
            .iter(|| async { store.set(&ns, "k", b"value".to_vec()).await.unwrap() })
    });
    g.bench_function("increment_64_concurrent_writers_per_op", |b| {
        b.to_async(rt).iter_custom(|iters| {
            let (store, ns) = (store.clone(), ns.clone());
            concurrent(iters, 64, move |_| {
                let (store, ns) = (store.clone(), ns.clone());
                async move {
                    store.increment(&ns, "n", 1).await.unwrap();
                }
            })
        })
    });
    g.bench_function("actor_commit_64_actors_per_op", |b| {
        b.to_async(rt).iter_custom(|iters| {
            let store = store.clone();
            concurrent(iters, 64, move |t| {
                let store = store.clone();
                async move {
                    let actor = ActorKey::new("counter", format!("a{t}"));
                    let batch = ActorBatch {
                        writes: vec![("count".into(), Some(b"1".to_vec()))],
                        alarm: None,
                        fence: None,
                    };
                    store.actor_commit(&actor, batch).await.unwrap();
                }
            })
        })
    });
    g.finish();
}

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let sqlite = SqliteStore::open(&dir.path().join("bench.db")).unwrap();
    engine(c, &rt, "sqlite", sqlite);
    match ignis_store::testing::shared() {
        Some(server) => {
            let url = server.database();
            let pg = rt
                .block_on(PgStore::open(&url, &PgOptions::default()))
                .unwrap();
            engine(c, &rt, "postgres", pg);
        }
        None => eprintln!("kv/postgres: skipped (PostgreSQL is not installed)"),
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
