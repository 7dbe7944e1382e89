//! Host bindings, one module per interface. Each owns its state (built once
//! per function or per request), a view over that state for the generated
//! host traits, and a generic `add_to_linker<T>(linker, get)` that never
//! names the store data type: [`crate::host`] decides which guest gets
//! which interface.

pub mod actor;
pub mod config;
pub mod http;
pub mod keyvalue;
