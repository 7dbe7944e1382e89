//! The on-disk compile cache.
//!
//! A compiled component is stored as `<sha256 of the .wasm>-<engine hash>.cwasm`
//! in the cache directory. The engine hash covers the wasmtime version, the
//! target and every setting that changes generated code
//! ([`wasmtime::Engine::precompile_compatibility_hash`]), so a restart with
//! the same engine loads machine code straight from disk (memory-mapped, with
//! copy-on-write data images) instead of recompiling, and any change of
//! settings misses the cache rather than loading incompatible code.
//!
//! Files are written to a temporary name and renamed, so a crash never leaves
//! a half-written entry under a real name. The directory must be writable
//! only by Ignis: loading an entry trusts it as native code.

#![allow(unsafe_code)]

use std::hash::{DefaultHasher, Hash, Hasher};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use sha2::{Digest, Sha256};
use wasmtime::Engine;
use wasmtime::component::Component;

use crate::error::LoadError;

/// Whether a load came from the cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheOutcome {
    /// Loaded precompiled machine code from disk.
    Hit,
    /// Compiled now (and stored for next time).
    Compiled,
}

/// The compile cache; counts hits and compilations.
#[derive(Debug)]
pub struct CompileCache {
    dir: PathBuf,
    hits: AtomicU64,
    compiles: AtomicU64,
}

impl CompileCache {
    /// A cache rooted at `dir` (created on first store).
    pub fn new(dir: PathBuf) -> Self {
        CompileCache {
            dir,
            hits: AtomicU64::new(0),
            compiles: AtomicU64::new(0),
        }
    }

    /// Loads served from the cache so far.
    pub fn hits(&self) -> u64 {
        self.hits.load(Ordering::Relaxed)
    }

    /// Components compiled so far.
    pub fn compiles(&self) -> u64 {
        self.compiles.load(Ordering::Relaxed)
    }

    /// The cache file for `wasm` bytes under `engine`.
    pub fn entry_path(&self, engine: &Engine, wasm: &[u8]) -> PathBuf {
        let digest = Sha256::digest(wasm);
        let mut hex = String::with_capacity(64);
        for b in digest {
            hex.push_str(&format!("{b:02x}"));
        }
        let mut h = DefaultHasher::new();
        engine.precompile_compatibility_hash().hash(&mut h);
        self.dir.join(format!("{hex}-{:016x}.cwasm", h.finish()))
    }

    /// Loads the component at `path`, from the cache when possible.
    pub fn load_or_compile(
        &self,
        engine: &Engine,
        function: &str,
        path: &Path,
    ) -> Result<(Component, CacheOutcome), LoadError> {
        let wasm = std::fs::read(path).map_err(|source| LoadError::Read {
            function: function.to_string(),
            path: path.to_path_buf(),
            source,
        })?;
        let entry = self.entry_path(engine, &wasm);
        if entry.exists() {
            // SAFETY: the entry was written by `Component::serialize` from
            // this cache (its name binds it to the source hash and the
            // engine's compatibility hash, and wasmtime re-checks the header);
            // the cache directory is private to Ignis.
            match unsafe { Component::deserialize_file(engine, &entry) } {
                Ok(component) => {
                    self.hits.fetch_add(1, Ordering::Relaxed);
                    return Ok((component, CacheOutcome::Hit));
                }
                Err(e) => {
                    tracing::warn!(path = %entry.display(), error = %e, "ignoring unusable compile cache entry");
                }
            }
        }
        let component = Component::new(engine, &wasm).map_err(|e| LoadError::Invalid {
            function: function.to_string(),
            path: path.to_path_buf(),
            reason: format!("{e:#}"),
        })?;
        self.compiles.fetch_add(1, Ordering::Relaxed);
        if let Err(e) = self.store(&entry, &component) {
            tracing::warn!(dir = %self.dir.display(), error = %e, "could not write the compile cache; the next start will recompile");
        }
        Ok((component, CacheOutcome::Compiled))
    }

    fn store(&self, entry: &Path, component: &Component) -> anyhow::Result<()> {
        std::fs::create_dir_all(&self.dir)?;
        let bytes = component.serialize()?;
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let unique = NEXT.fetch_add(1, Ordering::Relaxed);
        let tmp = entry.with_extension(format!("tmp.{}.{unique}", std::process::id()));
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, entry)?;
        Ok(())
    }
}
