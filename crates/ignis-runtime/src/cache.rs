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
//! a half-written entry under a real name. Loading an entry trusts it as
//! native code, so the directory is created 0700 and entries 0600, and an
//! entry (or a directory) that another user owns or that group or others
//! may write is refused with a warning and compiled again: a tampered
//! `.cwasm` would run as the host.

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
        if entry.exists()
            && let Err(why) = private_to_us(&self.dir).and_then(|()| private_to_us(&entry))
        {
            tracing::warn!(path = %entry.display(), reason = %why, "refusing a compile cache entry that is not private to this user; compiling instead");
        } else if entry.exists() {
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
        use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.dir)?;
        let bytes = component.serialize()?;
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let unique = NEXT.fetch_add(1, Ordering::Relaxed);
        let tmp = entry.with_extension(format!("tmp.{}.{unique}", std::process::id()));
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(&bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, entry)?;
        Ok(())
    }
}

/// Whether `path` is owned by this process's user and not writable by group
/// or others; the reason if not.
fn private_to_us(path: &Path) -> Result<(), String> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(path).map_err(|e| format!("{}: {e}", path.display()))?;
    // SAFETY: geteuid has no preconditions and cannot fail.
    let me = unsafe { libc::geteuid() };
    if meta.uid() != me {
        return Err(format!(
            "{} is owned by uid {}, not {me}",
            path.display(),
            meta.uid()
        ));
    }
    if meta.mode() & 0o022 != 0 {
        return Err(format!(
            "{} is writable by group or others (mode {:o})",
            path.display(),
            meta.mode() & 0o777
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn engine() -> Engine {
        let mut config = wasmtime::Config::new();
        config.wasm_component_model(true);
        Engine::new(&config).unwrap()
    }

    /// The smallest component: no imports, no exports.
    const EMPTY: &[u8] = b"\0asm\x0d\x00\x01\x00";

    #[test]
    fn entries_are_private_and_tampered_ones_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let cache = CompileCache::new(dir.path().join("cache"));
        let wasm = dir.path().join("empty.wasm");
        std::fs::write(&wasm, EMPTY).unwrap();
        let engine = engine();
        let (_, outcome) = cache.load_or_compile(&engine, "f", &wasm).unwrap();
        assert_eq!(outcome, CacheOutcome::Compiled);
        let entry = cache.entry_path(&engine, EMPTY);
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&dir.path().join("cache")), 0o700);
        assert_eq!(mode(&entry), 0o600);
        let (_, outcome) = cache.load_or_compile(&engine, "f", &wasm).unwrap();
        assert_eq!(outcome, CacheOutcome::Hit);
        // Group- or world-writable: someone else could have replaced the
        // native code. Fails on the code before, which loaded it.
        std::fs::set_permissions(&entry, std::fs::Permissions::from_mode(0o666)).unwrap();
        let (_, outcome) = cache.load_or_compile(&engine, "f", &wasm).unwrap();
        assert_eq!(outcome, CacheOutcome::Compiled);
        // Compiling again replaced it with a private entry.
        assert_eq!(mode(&entry), 0o600);
        std::fs::set_permissions(
            dir.path().join("cache"),
            std::fs::Permissions::from_mode(0o777),
        )
        .unwrap();
        let (_, outcome) = cache.load_or_compile(&engine, "f", &wasm).unwrap();
        assert_eq!(outcome, CacheOutcome::Compiled);
    }
}
