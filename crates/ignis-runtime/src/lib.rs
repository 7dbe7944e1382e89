//! The Ignis WebAssembly runtime: one wasmtime [`Engine`](wasmtime::Engine)
//! per WASI generation, components compiled once and cached on disk, a
//! fresh resource-limited instance per request.
//!
//! ```no_run
//! # async fn demo(manifest: ignis_config::Manifest) -> anyhow::Result<()> {
//! use ignis_runtime::{Runtime, RuntimeSettings};
//!
//! let runtime = Runtime::new(RuntimeSettings::from_manifest(&manifest))?;
//! let hello = runtime.load_function(&manifest.functions["hello"], "hello.wasm".as_ref())?;
//! // For each request: a fresh Store, instantiated from the prepared `InstancePre`.
//! let request = http::Request::get("http://localhost/hello")
//!     .body(http_body_util::BodyExt::map_err(
//!         http_body_util::Empty::<bytes::Bytes>::new(),
//!         |never| -> ignis_runtime::HttpError { match never {} },
//!     ))?;
//! let response = hello.handle(request, ignis_runtime::RequestMeta::new(ignis_runtime::RequestId::new()), None).await?;
//! # Ok(()) }
//! ```
//!
//! The pieces, in the order a request meets them:
//! - [`Runtime`] (`engine.rs`): the engines (pooling allocator with
//!   copy-on-write memory images, falling back to on-demand allocation when
//!   the reservation fails), the epoch ticker thread, the linkers and the
//!   [compile cache](cache).
//! - [`host`]: the store data, one optional part per capability, and the
//!   linkers that decide what a function or an actor class may import.
//! - [`bindings`]: one module per interface (outbound HTTP, config,
//!   key-value, `ignis:actor`), each owning its state and linking itself.
//! - [`Function`] (`function/`): one deployed component; [`Function::handle`]
//!   runs one request (`p2.rs`, `p3.rs`), polled in the caller's task until
//!   the response head is set, then by the returned body before each frame.
//!   A guest still running after half an epoch slice of CPU moves to its
//!   tenant's queue in the fair scheduler ([`sched`]).
//! - [`actor`]: actor classes and their long-lived activations.
//! - `guest/`: the one guest-run core: a CPU budget measured while the
//!   guest is polled, a wall deadline, the memory limiter's verdict, turned
//!   into an outcome and counted in [`GuestStats`].
//! - [`Error`]: the one error type from the guest to the response, with its
//!   status table; only the edge turns it into a response and logs it.

pub mod actor;
pub mod bindings;
pub mod cache;
mod engine;
mod error;
mod function;
mod guest;
/// Lock-free duration histograms (kept in `ignis-store`, the lowest crate
/// that records one).
pub use ignis_store::histogram;
pub mod host;
mod limits;
pub mod outbound;
mod request_id;
pub mod sched;
mod shared;
mod stdio;
mod ticker;

pub use engine::{AllocatorKind, MAX_POOL_SLOTS, Runtime, RuntimeSettings};
pub use error::{BoxError, Error, ErrorKind, LoadError, LogLevel};
pub use function::{Body, Function, RequestMeta};
pub use guest::{GuestStats, ROUTE_BUCKETS, route_bucket, wait_on};
pub use request_id::{RequestId, TRACEPARENT, X_REQUEST_ID};
pub use shared::Platform;
pub use ticker::IDLE_BEFORE_PARK;
/// The `wasi:http` host error type (request and response body errors).
pub use wasmtime_wasi_http::Error as HttpError;
/// A body a guest sends or receives over outbound HTTP.
pub use wasmtime_wasi_http::WasiBody as GuestBody;
