//! Runs N hello requests (or bare instantiations) through `Function::handle`
//! in one process, without the network, and prints the time per request.
//!
//! Made for counting instructions with callgrind, which gives the same
//! figure on every run whatever else the machine is doing (criterion's
//! wall-clock figures move by ±30% on the benchmark machines):
//!
//! ```sh
//! cargo build --release --target wasm32-wasip2 --manifest-path examples/Cargo.toml -p hello
//! cargo build --release -p ignis-runtime --example hello_loop
//! valgrind --tool=callgrind --collect-atstart=no --toggle-collect='hello_loop::measured*' \
//!     target/release/examples/hello_loop 3000 request
//! ```
//!
//! Arguments: `N [request|instantiate] [TASKS]`. With `TASKS` > 1 the
//! requests run as that many concurrent tasks on a two-worker runtime (the
//! in-process capacity of two cores); otherwise they run one after another
//! on a current-thread runtime. `HELLO_WASM` overrides the component
//! (default: the release build of `examples/hello`).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use ignis_config::{ComponentSource, FunctionConfig};
use ignis_runtime::{Function, HttpError, RequestMeta, Runtime, RuntimeSettings};

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let n: u32 = args.next().unwrap_or_else(|| "10000".into()).parse()?;
    let instantiate_only = match args.next().as_deref() {
        None | Some("request") => false,
        Some("instantiate") => true,
        Some(other) => anyhow::bail!("unknown mode {other:?}: use request or instantiate"),
    };
    let tasks: u32 = args.next().unwrap_or_else(|| "1".into()).parse()?;
    let wasm = std::env::var_os("HELLO_WASM").map_or_else(
        || {
            PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join("../../examples/target/wasm32-wasip2/release/hello.wasm")
        },
        PathBuf::from,
    );
    anyhow::ensure!(
        wasm.exists(),
        "{} is missing: build it with `cargo build --release --target wasm32-wasip2 --manifest-path examples/Cargo.toml -p hello`",
        wasm.display()
    );
    let cache = tempfile::tempdir()?;
    let mut config = FunctionConfig::new("hello", "bench", ComponentSource::Wasm(wasm.clone()));
    config.limits.max_concurrency = 1000;
    let runtime = Runtime::new(RuntimeSettings {
        pooling: true,
        epoch_tick: std::time::Duration::from_millis(1),
        cache_dir: cache.path().to_path_buf(),
        // As `ignis serve` sizes it for a function with 1,000 concurrent
        // instances. Under valgrind no pool reservation fits (not even 8
        // slots): the runtime falls back to on-demand and the line printed
        // at the end says so.
        instance_slots: 1000,
        function_slots: 500,
        activation_slots: 0,
        max_memory_bytes: config.limits.memory_bytes,
    })?;
    let function = runtime.load_function(&config, &wasm)?;
    let rt = if tasks > 1 {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?
    } else {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
    };
    // Warm the pool's slots and the caches before measuring.
    rt.block_on(run(&function, 200.max(tasks * 8), false, tasks));
    let started = Instant::now();
    measured(&rt, &function, n, instantiate_only, tasks);
    let per = started.elapsed().as_secs_f64() * 1e6 / f64::from(n);
    println!(
        "{n} {} in {tasks} task(s), {:?} allocator: {per:.2} µs each (wall)",
        if instantiate_only {
            "instantiations"
        } else {
            "requests"
        },
        runtime.allocator()
    );
    Ok(())
}

/// The measured part (callgrind's `--toggle-collect` target).
#[inline(never)]
fn measured(
    rt: &tokio::runtime::Runtime,
    function: &Arc<Function>,
    n: u32,
    instantiate_only: bool,
    tasks: u32,
) {
    rt.block_on(run(function, n, instantiate_only, tasks));
}

async fn run(function: &Arc<Function>, n: u32, instantiate_only: bool, tasks: u32) {
    if tasks <= 1 {
        // In the calling thread, so callgrind's toggle sees it.
        for _ in 0..n {
            one(function, instantiate_only).await;
        }
        return;
    }
    let mut handles = Vec::new();
    for t in 0..tasks {
        let function = function.clone();
        // Spread the remainder so exactly `n` run in all.
        let count = n / tasks + u32::from(t < n % tasks);
        handles.push(tokio::spawn(async move {
            for _ in 0..count {
                one(&function, instantiate_only).await;
            }
        }));
    }
    for handle in handles {
        handle.await.expect("task");
    }
}

async fn one(function: &Function, instantiate_only: bool) {
    if instantiate_only {
        function.instantiate_only().await.expect("instantiate");
        return;
    }
    let request = http::Request::get("http://localhost/hello")
        .body(Empty::<Bytes>::new().map_err(|never| -> HttpError { match never {} }))
        .expect("request");
    let response = function
        .handle(
            request,
            RequestMeta::new(ignis_runtime::RequestId::new()),
            None,
        )
        .await
        .expect("response");
    let body = response
        .into_body()
        .collect()
        .await
        .expect("body")
        .to_bytes();
    assert_eq!(&body[..], b"Hello from Ignis!\n");
}
