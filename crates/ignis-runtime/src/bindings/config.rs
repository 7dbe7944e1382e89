//! `wasi:config/store@0.2.0-rc.1`: a function's values from the manifest,
//! the environment and the secrets file, read-only and shared by its
//! requests (docs/bindings.md). The interface itself is
//! `wasmtime-wasi-config`'s; this module owns the state.

use std::sync::Arc;

use wasmtime::component::Linker;
use wasmtime_wasi_config::{WasiConfig, WasiConfigVariables};

/// One function's config values.
#[derive(Clone)]
pub struct ConfigState(Arc<WasiConfigVariables>);

impl ConfigState {
    /// The values of `config` (name → value).
    pub fn new<'a>(values: impl IntoIterator<Item = (&'a str, &'a str)>) -> ConfigState {
        ConfigState(Arc::new(values.into_iter().collect()))
    }

    /// The view `wasmtime-wasi-config` implements the interface on.
    pub fn view(&self) -> WasiConfig<'_> {
        WasiConfig::from(&*self.0)
    }
}

/// Adds `wasi:config/store` to `linker`.
pub fn add_to_linker<T: 'static>(
    linker: &mut Linker<T>,
    get: fn(&mut T) -> WasiConfig<'_>,
) -> wasmtime::Result<()> {
    wasmtime_wasi_config::add_to_linker(linker, get)
}
