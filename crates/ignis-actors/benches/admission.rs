//! What admission costs per request, without a guest:
//! - `admission/admit_release`: a free slot is taken and given back (the
//!   path of every admitted request);
//! - `admission/shed_full`: all slots busy, mailbox full: the 503 decision.
//!
//! `cargo bench -p ignis-actors --bench admission`

use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use ignis_actors::Admission;
use ignis_runtime::ErrorKind;

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let open = Admission::new(64, 256, Duration::from_secs(1));
    c.bench_function("admission/admit_release", |b| {
        b.to_async(&rt)
            .iter(|| async { drop(open.admit().await.unwrap()) })
    });
    let full = Admission::new(1, 0, Duration::from_secs(1));
    let _held = rt.block_on(full.admit()).unwrap();
    c.bench_function("admission/shed_full", |b| {
        b.to_async(&rt).iter(|| async {
            assert!(matches!(full.admit().await, Err(e) if e.kind() == &ErrorKind::Overloaded))
        })
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
