//! The Ignis WebAssembly runtime: one wasmtime [`Engine`](wasmtime::Engine)
//! per process, components compiled once and cached on disk, a fresh
//! resource-limited instance per request.
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
//! let response = hello.handle(request, ignis_runtime::RequestMeta::new(1), None).await?;
//! # Ok(()) }
//! ```
//!
//! The pieces:
//! - [`Runtime`]: the engine (pooling allocator with copy-on-write memory
//!   images, falling back to on-demand allocation when the reservation fails),
//!   the epoch ticker thread, the linker with WASI p2 and `wasi:http`, and the
//!   [compile cache](cache).
//! - [`Function`]: one deployed component with its `ProxyPre`, limits,
//!   environment and outbound policy; [`Function::handle`] runs one request.
//! - [`outbound`]: the allowlist and pooled client behind guest outbound HTTP.
//! - The guest runs inside the caller's task: [`Function::handle`] polls it
//!   until the response head is set, then the returned body polls it before
//!   each frame. Dropping either cancels the guest.
//! - A guest still running after half an epoch slice of CPU moves to its
//!   tenant's queue in the fair scheduler ([`sched`]), if one is installed.
//! - Limits per request: a [`wasmtime::ResourceLimiter`] for memory, epoch
//!   slices that make CPU-bound guests yield back to tokio, a CPU-time budget
//!   measured while the guest is polled, and a wall-clock deadline.

pub mod actor;
pub mod cache;
mod engine;
mod error;
mod function;
pub mod kv;
mod limits;
pub mod outbound;
pub mod sched;
mod stdio;
mod ticker;

pub use engine::{ACTIVATION_SLOTS, AllocatorKind, Platform, Runtime, RuntimeSettings};
pub use error::{GuestError, LoadError};
pub use function::{Body, BoxError, Function, FunctionStats, RequestMeta, wait_on};
pub use ticker::IDLE_BEFORE_PARK;
/// The `wasi:http` host error type (request and response body errors).
pub use wasmtime_wasi_http::Error as HttpError;
