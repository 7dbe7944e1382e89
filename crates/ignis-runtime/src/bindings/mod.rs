//! Host bindings, one module per interface. Each owns its state (built once
//! per function or per request), a view over that state for the generated
//! host traits, and a generic `add_to_linker<T>(linker, get)` that never
//! names the store data type: [`crate::host`] decides which guest gets
//! which interface.

pub mod actor;
pub mod config;
pub mod http;
pub mod keyvalue;

/// What a guest is told when the storage engine fails (key-value and actor
/// storage alike); the engine's message, which names files and internals,
/// goes to the log.
pub(crate) const STORAGE_FAILED: &str = "storage error; the details are in the server log";
