//! Embeds the WIT that guests in other languages are built against, so
//! `ignis new` and `ignis wit` can write it anywhere without the source tree:
//!
//! - WASI 0.2 (`wasi:http/proxy` and what it includes) exactly as the
//!   linked `wasmtime-wasi-http` crate ships it, found with `cargo metadata`
//!   (so guests and host always agree on every signature), with the imports
//!   of feature-gated (`@unstable`) interfaces dropped: the WIT parsers inside
//!   componentize-js and componentize-py drop a gated interface but not an
//!   import naming it ("interface not found"), and nothing a guest needs is
//!   gated;
//! - the platform packages of this repository's `wit/` (key-value, config,
//!   actors).
//!
//! Generates `$OUT_DIR/guest_wit.rs`: `FILES`, a list of (path under a
//! `wit/` directory, contents).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("OUT_DIR"));
    let manifest_dir = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("dir"));
    let repo_wit = manifest_dir.join("../../wit");
    println!("cargo::rerun-if-changed=build.rs");
    println!("cargo::rerun-if-changed={}", repo_wit.display());

    let mut files: Vec<(String, String)> = Vec::new();
    let wasi = wasi_http_wit(&manifest_dir).join("deps");
    for entry in sorted(&wasi) {
        let name = entry.file_stem().unwrap().to_string_lossy().into_owned();
        let text = std::fs::read_to_string(&entry).expect("reading WASI WIT");
        files.push((
            format!("deps/wasi-{name}/{name}.wit"),
            drop_unstable_imports(&text),
        ));
    }
    files.push((
        "deps/ignis-platform/ignis.wit".into(),
        read(&repo_wit.join("ignis.wit")),
    ));
    for dir in sorted(&repo_wit.join("deps")) {
        let package = dir.file_name().unwrap().to_string_lossy().into_owned();
        for f in sorted(&dir) {
            let file = f.file_name().unwrap().to_string_lossy().into_owned();
            files.push((format!("deps/{package}/{file}"), read(&f)));
        }
    }

    let mut code = String::from("/// Guest WIT files: (path under `wit/`, contents).\n");
    code.push_str("pub const FILES: &[(&str, &str)] = &[\n");
    for (path, text) in &files {
        writeln!(code, "    ({path:?}, {text:?}),").unwrap();
    }
    code.push_str("];\n");
    std::fs::write(out.join("guest_wit.rs"), code).expect("writing guest_wit.rs");
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

fn sorted(dir: &Path) -> Vec<PathBuf> {
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .map(|e| e.expect("dir entry").path())
        .collect();
    entries.sort();
    entries
}

/// The `wit/` directory of the `wasmtime-wasi-http` package in this build.
fn wasi_http_wit(manifest_dir: &Path) -> PathBuf {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let output = Command::new(cargo)
        .args(["metadata", "--format-version", "1", "--offline"])
        .current_dir(manifest_dir)
        .output()
        .expect("running cargo metadata");
    assert!(
        output.status.success(),
        "cargo metadata failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let metadata: serde_json::Value =
        serde_json::from_slice(&output.stdout).expect("cargo metadata JSON");
    let manifest = metadata["packages"]
        .as_array()
        .expect("packages")
        .iter()
        .find(|p| p["name"] == "wasmtime-wasi-http")
        .and_then(|p| p["manifest_path"].as_str())
        .expect("wasmtime-wasi-http in cargo metadata");
    let wit = Path::new(manifest).parent().unwrap().join("wit");
    println!("cargo::rerun-if-changed={}", wit.display());
    wit
}

/// Drops each `@unstable(...)` gate directly followed by an `import ...;`
/// line, together with that import.
fn drop_unstable_imports(text: &str) -> String {
    let lines: Vec<&str> = text.split('\n').collect();
    let mut keep = Vec::with_capacity(lines.len());
    let mut i = 0;
    while i < lines.len() {
        let gated_import = lines[i].trim_start().starts_with("@unstable(")
            && lines.get(i + 1).is_some_and(|next| {
                let next = next.trim();
                next.starts_with("import ") && next.ends_with(';') && !next.contains('{')
            });
        if gated_import {
            i += 2;
            continue;
        }
        keep.push(lines[i]);
        i += 1;
    }
    keep.join("\n")
}
