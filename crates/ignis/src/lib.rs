//! The `ignis` command's building blocks: building guest crates, loading a
//! manifest's functions into the runtime and serving them.
//!
//! The binary (`src/main.rs`) is only argument parsing around these.

pub mod admin_client;
pub mod app;
pub mod bench;
pub mod cluster;
pub mod cluster_cli;
pub mod deploy;
pub mod guest_build;
pub mod logging;
pub mod new;
pub mod otel;
