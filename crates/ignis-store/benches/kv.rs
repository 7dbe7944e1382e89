//! The embedded engine's costs: a point read, one durable write at a time
//! (one fsync each), and 64 concurrent writers sharing group commits.

use std::sync::Arc;

use criterion::{Criterion, criterion_group, criterion_main};
use ignis_store::{KvBackend, Namespace, SqliteStore};

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(SqliteStore::open(&dir.path().join("bench.db")).unwrap());
    let ns = Namespace::new("bench", "default");
    rt.block_on(store.set(&ns, "k", b"value".to_vec())).unwrap();

    let mut g = c.benchmark_group("kv");
    g.bench_function("get", |b| {
        b.to_async(&rt)
            .iter(|| async { store.get(&ns, "k").await.unwrap() })
    });
    g.sample_size(20);
    g.bench_function("set_durable_one_writer", |b| {
        b.to_async(&rt)
            .iter(|| async { store.set(&ns, "k", b"value".to_vec()).await.unwrap() })
    });
    g.bench_function("increment_64_concurrent_writers_per_op", |b| {
        b.to_async(&rt).iter_custom(|iters| {
            let (store, ns) = (store.clone(), ns.clone());
            async move {
                let start = std::time::Instant::now();
                let per = iters.div_ceil(64);
                let tasks: Vec<_> = (0..64)
                    .map(|_| {
                        let (store, ns) = (store.clone(), ns.clone());
                        tokio::spawn(async move {
                            for _ in 0..per {
                                store.increment(&ns, "n", 1).await.unwrap();
                            }
                        })
                    })
                    .collect();
                for t in tasks {
                    t.await.unwrap();
                }
                start.elapsed().mul_f64(iters as f64 / (per * 64) as f64)
            }
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
