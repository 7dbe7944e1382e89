//! Building guests: Rust crates for `wasm32-wasip2`, and build commands
//! for any other toolchain (componentize-js, componentize-py, ...).
//!
//! `ignis up` builds every function declared with `build = "dir"`:
//! `cargo build --release --target wasm32-wasip2` in that directory, reading
//! the artifact path from cargo's JSON messages (so workspaces and custom
//! target directories just work). The target is installed with
//! `rustup target add wasm32-wasip2` the first time it is missing.
//!
//! `build = { command, output, workdir, watch }` runs `sh -c command` in
//! `workdir` and loads `output`; with `watch` set, a build whose output is
//! newer than every watched file is skipped. The command finds the `ignis`
//! executable in `$IGNIS` (for `$IGNIS wit DIR`, the guest WIT).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, bail};
use ignis_config::BuildCommand;

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

/// Lines of a failed build command's stderr that its error quotes.
const STDERR_TAIL_LINES: usize = 20;

/// Runs a function's or actor class's build command (`sh -c` in its
/// workdir) unless every watched path is older than the output, and
/// returns the output path. A failure names the command, its exit status
/// and the tail of its stderr; the caller adds whose build it was. `ignis`
/// is the executable the command sees as `$IGNIS`.
pub fn run_command(build: &BuildCommand, ignis: &Path) -> anyhow::Result<PathBuf> {
    if up_to_date(build) {
        tracing::info!(output = %build.output.display(), "build skipped: output newer than every watched path");
        return Ok(build.output.clone());
    }
    let output = Command::new("sh")
        .arg("-c")
        .arg(&build.command)
        .current_dir(&build.workdir)
        .env("IGNIS", ignis)
        .stdin(Stdio::null())
        // ignis's stdout carries only what scripts read ("listening on").
        .stdout(std::io::stderr())
        .stderr(Stdio::piped())
        .output()
        .with_context(|| format!("running `{}` in {}", build.command, build.workdir.display()))?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    // Shown as it would have been, then quoted in the error.
    eprint!("{stderr}");
    if !output.status.success() {
        let lines: Vec<&str> = stderr.lines().collect();
        let tail = lines[lines.len().saturating_sub(STDERR_TAIL_LINES)..].join("\n");
        bail!(
            "build command `{}` (in {}) failed ({}); its stderr ends with:\n{tail}",
            build.command,
            build.workdir.display(),
            output.status
        );
    }
    if !build.output.is_file() {
        bail!(
            "build command `{}` succeeded but wrote no {}",
            build.command,
            build.output.display()
        );
    }
    Ok(build.output.clone())
}

/// Whether `output` exists and is newer than every file under the watched
/// paths (none watched: never up to date).
fn up_to_date(build: &BuildCommand) -> bool {
    let Ok(built) = std::fs::metadata(&build.output).and_then(|m| m.modified()) else {
        return false;
    };
    !build.watch.is_empty() && build.watch.iter().all(|p| older_than(p, built))
}

fn older_than(path: &Path, built: std::time::SystemTime) -> bool {
    let Ok(meta) = std::fs::metadata(path) else {
        // A watched path that does not exist: build (the command may say why).
        return false;
    };
    if meta.is_dir() {
        let Ok(entries) = std::fs::read_dir(path) else {
            return false;
        };
        return entries
            .filter_map(Result::ok)
            .all(|e| older_than(&e.path(), built));
    }
    meta.modified().is_ok_and(|m| m < built)
}
