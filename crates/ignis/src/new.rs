//! `ignis new` (project templates), `ignis wit` (the guest WIT) and
//! `ignis cert` (a self-signed certificate for local HTTPS).
//!
//! Templates live in `crates/ignis/templates/` and are compiled into the
//! binary, as is the WIT that guests in other languages are built against
//! (see `build.rs`), so a project can be created anywhere, without the
//! Ignis source tree. Their pins are the ones this repository tests with:
//! Rust crates resolve from `examples/Cargo.lock`, componentize-js from
//! `tools/js/package-lock.json`, componentize-py from
//! `tools/py/requirements.txt`, and the WIT is the one this binary links.
//!
//! Invariants: `ignis new` never writes into an existing non-empty
//! directory, and every project it writes serves with `ignis up` as is
//! (tested end to end for every kind).

use std::path::Path;

use anyhow::{Context, bail};

mod wit {
    include!(concat!(env!("OUT_DIR"), "/guest_wit.rs"));
}

/// The kinds of project `ignis new` creates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Kind {
    /// A `wasi:http` function in Rust.
    Rust,
    /// A `wasi:http` function in JavaScript (componentize-js), with
    /// key-value and config.
    Js,
    /// A `wasi:http` function in Python (componentize-py), with key-value
    /// and config.
    Python,
    /// A durable actor class in Rust (storage and alarms).
    Actor,
}

const NAME: &str = "{{name}}";

/// A file of a template: its path in the project, and its text with
/// `{{name}}` where the project's name goes.
type File = (&'static str, &'static str);

const RUST: &[File] = &[
    ("Cargo.toml", include_str!("../templates/rust/Cargo.toml")),
    ("src/lib.rs", include_str!("../templates/rust/src/lib.rs")),
    ("ignis.toml", include_str!("../templates/rust/ignis.toml")),
    (".gitignore", include_str!("../templates/rust/gitignore")),
    ("Cargo.lock", CARGO_LOCK),
];

const ACTOR: &[File] = &[
    ("Cargo.toml", include_str!("../templates/actor/Cargo.toml")),
    ("src/lib.rs", include_str!("../templates/actor/src/lib.rs")),
    ("ignis.toml", include_str!("../templates/actor/ignis.toml")),
    (".gitignore", include_str!("../templates/actor/gitignore")),
    ("Cargo.lock", CARGO_LOCK),
];

const JS: &[File] = &[
    ("app.js", include_str!("../templates/js/app.js")),
    ("ignis.toml", include_str!("../templates/js/ignis.toml")),
    ("wit/world.wit", include_str!("../templates/world.wit")),
    (".gitignore", include_str!("../templates/js/gitignore")),
];

const PYTHON: &[File] = &[
    ("app.py", include_str!("../templates/python/app.py")),
    ("ignis.toml", include_str!("../templates/python/ignis.toml")),
    ("wit/world.wit", include_str!("../templates/world.wit")),
    (".gitignore", include_str!("../templates/python/gitignore")),
];

/// The versions the examples build with; cargo drops the entries a new
/// crate does not use and keeps the versions of those it does.
const CARGO_LOCK: &str = include_str!("../../../examples/Cargo.lock");
const JS_PACKAGE: &str = include_str!("../../../tools/js/package.json");
const JS_LOCK: &str = include_str!("../../../tools/js/package-lock.json");
const JS_TOOLS_NAME: &str = "\"name\": \"ignis-guest-tools-js\"";
const PY_REQUIREMENTS: &str = include_str!("../../../tools/py/requirements.txt");

/// Whether `name` can name a project, a crate, a package and a function:
/// lowercase ASCII letters, digits and `-`, starting with a letter, at
/// most 64 bytes.
pub fn valid_name(name: &str) -> bool {
    name.len() <= 64
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !name.ends_with('-')
}

/// Creates a project of `kind` in `dir` (which must not exist, or be
/// empty), named after the directory's last component.
pub fn create(kind: Kind, dir: &Path) -> anyhow::Result<()> {
    let name = dir
        .file_name()
        .and_then(|n| n.to_str())
        .with_context(|| format!("{} does not end in a name", dir.display()))?;
    if !valid_name(name) {
        bail!(
            "`{name}` cannot name a project: use lowercase letters, digits and `-`, starting with a letter (at most 64)"
        );
    }
    if std::fs::read_dir(dir).is_ok_and(|mut d| d.next().is_some()) {
        bail!("{} exists and is not empty", dir.display());
    }
    let mut files: Vec<(String, String)> = match kind {
        Kind::Rust => RUST,
        Kind::Actor => ACTOR,
        Kind::Js => JS,
        Kind::Python => PYTHON,
    }
    .iter()
    .map(|(path, text)| (path.to_string(), text.replace(NAME, name)))
    .collect();
    let tools_name = format!("\"name\": \"{name}\"");
    match kind {
        Kind::Rust => {}
        Kind::Actor => files.push((
            "wit/actor.wit".into(),
            wit_file("deps/ignis-actor/actor.wit"),
        )),
        Kind::Js => {
            files.push((
                "package.json".into(),
                JS_PACKAGE.replace(JS_TOOLS_NAME, &tools_name).replace(
                    "The JavaScript guest toolchain Ignis builds its examples and tests with (installed by scripts/guest-tools.sh into target/guest-tools/js).",
                    "An Ignis function in JavaScript, built with componentize-js (versions as Ignis tests them).",
                ),
            ));
            files.push((
                "package-lock.json".into(),
                JS_LOCK.replace(JS_TOOLS_NAME, &tools_name),
            ));
            files.extend(deps());
        }
        Kind::Python => {
            let pins: String = PY_REQUIREMENTS
                .lines()
                .filter(|l| !l.starts_with('#'))
                .map(|l| format!("{l}\n"))
                .collect();
            files.push((
                "requirements.txt".into(),
                format!("# The Python guest toolchain, pinned as Ignis tests it.\n{pins}"),
            ));
            files.extend(deps());
        }
    }
    for (path, text) in &files {
        let path = dir.join(path);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("creating {}", parent.display()))?;
        }
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

fn wit_file(path: &str) -> String {
    wit::FILES
        .iter()
        .find(|(p, _)| *p == path)
        .map(|(_, text)| text.to_string())
        .unwrap_or_else(|| panic!("{path} is embedded by build.rs"))
}

/// The WIT packages a guest's world may name, as `wit/deps/...` files.
fn deps() -> impl Iterator<Item = (String, String)> {
    wit::FILES
        .iter()
        .map(|(path, text)| (format!("wit/{path}"), text.to_string()))
}

/// Writes the guest WIT packages (`deps/...`: WASI 0.2 as this binary links
/// it, Ignis's platform packages) under `dir`, replacing what was there.
pub fn write_wit(dir: &Path) -> anyhow::Result<()> {
    let deps = dir.join("deps");
    match std::fs::remove_dir_all(&deps) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("removing {}", deps.display())),
    }
    for (path, text) in wit::FILES {
        let path = dir.join(path);
        std::fs::create_dir_all(path.parent().expect("a file in deps/"))
            .with_context(|| format!("creating {}", path.display()))?;
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

/// Writes a self-signed certificate for `hosts` and its private key to
/// `out/cert.pem` and `out/key.pem` (the key readable by its owner only);
/// returns their paths.
pub fn self_signed(
    hosts: &[String],
    out: &Path,
) -> anyhow::Result<(std::path::PathBuf, std::path::PathBuf)> {
    for host in hosts {
        let usable = host.parse::<std::net::IpAddr>().is_ok()
            || ignis_config::valid_tls_host(&host.to_ascii_lowercase());
        if !usable {
            bail!(
                "`{host}` is neither an IP address nor a host name (`example.com`, `*.example.com`)"
            );
        }
    }
    let certified = rcgen::generate_simple_self_signed(hosts.to_vec())
        .context("generating a self-signed certificate")?;
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let (cert, key) = (out.join("cert.pem"), out.join("key.pem"));
    std::fs::write(&cert, certified.cert.pem())
        .with_context(|| format!("writing {}", cert.display()))?;
    {
        use std::io::Write as _;
        use std::os::unix::fs::OpenOptionsExt as _;
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&key)
            .with_context(|| format!("writing {}", key.display()))?;
        file.write_all(certified.signing_key.serialize_pem().as_bytes())
            .with_context(|| format!("writing {}", key.display()))?;
    }
    Ok((cert, key))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for ok in ["a", "hello", "my-app2"] {
            assert!(valid_name(ok), "{ok}");
        }
        let long = "a".repeat(65);
        for bad in [
            "", "Hello", "1app", "-a", "a-", "a_b", "a.b", "../x", "a b", &long,
        ] {
            assert!(!valid_name(bad), "{bad}");
        }
    }

    #[test]
    fn the_embedded_wit_has_wasi_http_without_gated_imports_and_the_platform() {
        let http = wit_file("deps/wasi-http/http.wit");
        assert!(http.contains("package wasi:http@0.2.12;"));
        assert!(wit_file("deps/ignis-platform/ignis.wit").contains("package ignis:platform"));
        assert!(wit_file("deps/ignis-actor/actor.wit").contains("package ignis:actor"));
        let cli = wit_file("deps/wasi-cli/cli.wit");
        assert!(
            !cli.contains("import wasi:clocks/timezone"),
            "gated import kept"
        );
        // Only the gated import went: the rest of the world is there.
        assert!(cli.contains("import wasi:clocks/wall-clock@0.2.12;"));
    }

    #[test]
    fn the_js_template_pins_what_the_tools_pin() {
        assert!(JS_PACKAGE.contains(JS_TOOLS_NAME));
        assert_eq!(JS_LOCK.matches(JS_TOOLS_NAME).count(), 2);
    }
}
