//! Building Rust guest crates for `wasm32-wasip2`.
//!
//! `ignis up` builds every function declared with `build = "dir"`:
//! `cargo build --release --target wasm32-wasip2` in that directory, reading
//! the artifact path from cargo's JSON messages (so workspaces and custom
//! target directories just work). The target is installed with
//! `rustup target add wasm32-wasip2` the first time it is missing.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, bail};

/// The guest target.
pub const TARGET: &str = "wasm32-wasip2";

fn cargo() -> String {
    std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_string())
}

/// Installs the `wasm32-wasip2` target with rustup when it is missing.
pub fn ensure_target() -> anyhow::Result<()> {
    let installed = Command::new("rustup")
        .args(["target", "list", "--installed"])
        .output();
    match installed {
        Ok(out) if out.status.success() => {
            if String::from_utf8_lossy(&out.stdout)
                .lines()
                .any(|l| l.trim() == TARGET)
            {
                return Ok(());
            }
            tracing::info!("installing the {TARGET} target with rustup");
            let status = Command::new("rustup")
                .args(["target", "add", TARGET])
                .status()
                .context("running `rustup target add wasm32-wasip2`")?;
            if !status.success() {
                bail!("`rustup target add {TARGET}` failed ({status})");
            }
            Ok(())
        }
        // No rustup: the toolchain may still have the target (distro Rust); cargo will say if not.
        _ => Ok(()),
    }
}

/// Builds the crate in `dir` and returns the path of its `.wasm` component.
pub fn build_crate(dir: &Path) -> anyhow::Result<PathBuf> {
    let manifest = dir.join("Cargo.toml");
    if !manifest.is_file() {
        bail!("{} has no Cargo.toml to build", dir.display());
    }
    let manifest = manifest
        .canonicalize()
        .with_context(|| format!("resolving {}", manifest.display()))?;
    let output = Command::new(cargo())
        .args([
            "build",
            "--release",
            "--target",
            TARGET,
            "--message-format=json-render-diagnostics",
            "--manifest-path",
        ])
        .arg(&manifest)
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("running cargo build for {}", dir.display()))?;
    if !output.status.success() {
        bail!(
            "building {} for {TARGET} failed (see the compiler output above)",
            dir.display()
        );
    }
    let mut found = None;
    for line in String::from_utf8_lossy(&output.stdout).lines() {
        let Ok(msg) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if msg["reason"] != "compiler-artifact" {
            continue;
        }
        let ours = msg["manifest_path"].as_str().map(Path::new) == Some(manifest.as_path());
        if !ours {
            continue;
        }
        if let Some(files) = msg["filenames"].as_array() {
            for f in files.iter().filter_map(|f| f.as_str()) {
                if f.ends_with(".wasm") {
                    found = Some(PathBuf::from(f));
                }
            }
        }
    }
    found.with_context(|| {
        format!(
            "{} built, but produced no .wasm (is it a `crate-type = [\"cdylib\"]` library?)",
            dir.display()
        )
    })
}
