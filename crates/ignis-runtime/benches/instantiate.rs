//! Per-request cost of a WebAssembly function, without the network:
//! - `instantiate`: a fresh store + instance of the hello component, dropped;
//! - `hello_request`: a whole request through `Function::handle`, body read;
//! - `hello_p3_request/reuse`: the same on the WASI 0.3 hello (`hello-p3`),
//!   whose instances are reused: the per-request cost of the 0.3 call path
//!   (request lifted, `handle` run in the store's event loop, body stream)
//!   without instantiation.
//!
//! `cargo bench -p ignis-runtime --bench instantiate` (builds examples/ first).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use bytes::Bytes;
use criterion::{Criterion, criterion_group, criterion_main};
use http_body_util::{BodyExt, Empty};
use ignis_config::{ComponentSource, FunctionConfig};
use ignis_runtime::{Function, RequestMeta, Runtime, RuntimeSettings};

fn guest_wasm(package: &str) -> PathBuf {
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples");
    let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args([
            "build",
            "--release",
            "--target",
            "wasm32-wasip2",
            "-p",
            package,
            "--manifest-path",
        ])
        .arg(examples.join("Cargo.toml"))
        .status()
        .expect("cargo");
    assert!(status.success());
    examples.join(format!(
        "target/wasm32-wasip2/release/{}.wasm",
        package.replace('-', "_")
    ))
}

fn function(package: &str, pooling: bool, cache: &Path) -> Arc<Function> {
    let wasm = guest_wasm(package);
    let mut config = FunctionConfig::new("hello", "bench", ComponentSource::Wasm(wasm.clone()));
    config.limits.max_concurrency = 1000;
    let runtime = Runtime::new(RuntimeSettings {
        pooling,
        epoch_tick: std::time::Duration::from_millis(1),
        cache_dir: cache.to_path_buf(),
        instance_slots: 1000,
        function_slots: 500,
        activation_slots: 0,
        max_memory_bytes: config.limits.memory_bytes,
    })
    .expect("runtime");
    runtime.load_function(&config, &wasm).expect("load")
}

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let cache = tempfile::tempdir().unwrap();
    for (label, pooling) in [("pooling", true), ("on_demand", false)] {
        let f = function("hello", pooling, cache.path());
        c.bench_function(&format!("instantiate/{label}"), |b| {
            b.to_async(&rt)
                .iter(|| async { f.instantiate_only().await.unwrap() })
        });
        c.bench_function(&format!("hello_request/{label}"), |b| {
            b.to_async(&rt).iter(|| request(&f, b"Hello from Ignis!\n"))
        });
    }
    let f = function("hello-p3", true, cache.path());
    c.bench_function("hello_p3_request/reuse", |b| {
        b.to_async(&rt)
            .iter(|| request(&f, b"Hello from Ignis over WASI 0.3!\n"))
    });
}

async fn request(f: &Function, expected: &[u8]) {
    let req = http::Request::get("http://localhost/hello")
        .body(Empty::<Bytes>::new().map_err(|never| -> ignis_runtime::HttpError { match never {} }))
        .unwrap();
    let resp = f
        .handle(req, RequestMeta::new(ignis_runtime::RequestId::new()), None)
        .await
        .unwrap();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&body[..], expected);
}

criterion_group!(benches, bench);
criterion_main!(benches);
