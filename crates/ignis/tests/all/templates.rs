//! `ignis new`: every template builds with `ignis up` as written (Rust and
//! actor crates with cargo, JavaScript with `npm ci` + componentize-js,
//! Python with a venv + componentize-py, all at the pins Ignis tests with)
//! and serves; bad names and non-empty directories are refused.

use std::path::Path;

use crate::harness::*;

/// Creates a `kind` project named `name` in `parent`; returns its directory.
fn new_project(parent: &Path, kind: &str, name: &str) -> std::path::PathBuf {
    let dir = parent.join(name);
    let out = ignis().args(["new", kind]).arg(&dir).output().unwrap();
    assert!(
        out.status.success(),
        "ignis new {kind}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The compile cache all tests share (the template's manifest is
    // otherwise used as written).
    let manifest = dir.join("ignis.toml");
    let text = std::fs::read_to_string(&manifest).unwrap();
    assert!(text.contains("[server]\n"), "{text}");
    std::fs::write(
        &manifest,
        text.replace(
            "[server]\n",
            &format!("[server]\ncache_dir = \"{}\"\n", shared_cache()),
        ),
    )
    .unwrap();
    dir
}

/// Runs `ignis up dir` (building the guest) and stops it when dropped.
struct Up(Proc);

impl Up {
    fn start(dir: &Path, env: &[(&str, &str)]) -> Up {
        Up(spawn_with(&["up", dir.to_str().unwrap()], env))
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.0.addr)
    }
}

impl Drop for Up {
    fn drop(&mut self) {
        let _ = self.0.child.kill();
        let _ = self.0.child.wait();
    }
}

/// Rust crates build into the examples' target directory, so the
/// dependencies the examples compiled (same versions: the templates'
/// Cargo.lock is the examples') are not compiled again.
fn rust_env() -> [(&'static str, String); 1] {
    guests();
    [(
        "CARGO_TARGET_DIR",
        repo().join("examples/target").display().to_string(),
    )]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rust_template_builds_and_serves() {
    let _builds = BUILDS.lock().await;
    let parent = tempfile::tempdir().unwrap();
    let dir = new_project(parent.path(), "rust", "hello-rust");
    let [(k, v)] = rust_env();
    let up = Up::start(&dir, &[(k, &v)]);
    let r = get(&client(), &up.url("/some/path?q=1")).await;
    assert_eq!(
        (r.status, r.text().as_str()),
        (200, "Hello from hello-rust! You asked for /some/path?q=1\n")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_actor_template_builds_and_keeps_one_count_per_id() {
    let _builds = BUILDS.lock().await;
    let parent = tempfile::tempdir().unwrap();
    let dir = new_project(parent.path(), "actor", "tally");
    let [(k, v)] = rust_env();
    let up = Up::start(&dir, &[(k, &v)]);
    let c = client();
    for n in 1..=3 {
        let r = post(&c, &up.url("/tally/a/incr"), "").await;
        assert_eq!((r.status, r.text()), (200, format!("a is at {n}\n")));
    }
    let r = get(&c, &up.url("/tally/b/get")).await;
    assert_eq!((r.status, r.text().as_str()), (200, "b is at 0\n"));
    let r = get(&c, &up.url("/tally/a/get")).await;
    assert_eq!((r.status, r.text().as_str()), (200, "a is at 3\n"));
    let r = get(&c, &up.url("/tally/a/incr")).await;
    assert_eq!(r.status, 404, "GET does not count: {}", r.text());
}

/// The JavaScript and Python templates: greeting from config, visits
/// counted in key-value.
async fn serves_greeting_and_counts_visits(kind: &str, name: &str) {
    let parent = tempfile::tempdir().unwrap();
    let dir = new_project(parent.path(), kind, name);
    let up = Up::start(&dir, &[]);
    let c = client();
    for n in 1..=2 {
        let r = get(&c, &up.url("/x?y=1")).await;
        assert_eq!(
            (r.status, r.text()),
            (
                200,
                format!("Hello from {name}! You asked for /x?y=1; visit #{n}.\n")
            )
        );
    }
    // A second `ignis up` finds the output newer than every watched file
    // and does not build again.
    drop(up);
    let wasm = dir.join("app.wasm");
    let built = std::fs::metadata(&wasm).unwrap().modified().unwrap();
    let up = Up::start(&dir, &[]);
    let r = get(&c, &up.url("/")).await;
    assert_eq!(
        (r.status, r.text()),
        (
            200,
            format!("Hello from {name}! You asked for /; visit #3.\n")
        )
    );
    assert_eq!(std::fs::metadata(&wasm).unwrap().modified().unwrap(), built);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_javascript_template_builds_and_serves_with_key_value_and_config() {
    let _builds = BUILDS.lock().await;
    serves_greeting_and_counts_visits("js", "hello-js").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_template_builds_and_serves_with_key_value_and_config() {
    let _builds = BUILDS.lock().await;
    serves_greeting_and_counts_visits("python", "hello-py").await;
}

#[test]
fn new_refuses_bad_names_non_empty_directories_and_unknown_kinds() {
    let parent = tempfile::tempdir().unwrap();
    let refused = |args: &[&str]| {
        let out = ignis().args(args).output().unwrap();
        assert!(!out.status.success(), "{args:?} succeeded");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let at = |name: &str| parent.path().join(name).display().to_string();
    for bad in [
        "Upper",
        "1digit",
        "under_score",
        "trailing-",
        &"a".repeat(65),
    ] {
        let err = refused(&["new", "rust", &at(bad)]);
        assert!(err.contains("cannot name a project"), "{bad}: {err}");
        assert!(!parent.path().join(bad).exists(), "{bad} was created");
    }
    std::fs::create_dir(parent.path().join("taken")).unwrap();
    write(&parent.path().join("taken"), "keep.txt", "mine");
    let err = refused(&["new", "js", &at("taken")]);
    assert!(err.contains("exists and is not empty"), "{err}");
    assert_eq!(
        std::fs::read_dir(parent.path().join("taken"))
            .unwrap()
            .count(),
        1,
        "nothing written into a non-empty directory"
    );
    let err = refused(&["new", "cobol", &at("x")]);
    assert!(err.contains("invalid value 'cobol'"), "{err}");
    // An empty directory is fine.
    std::fs::create_dir(parent.path().join("empty")).unwrap();
    let out = ignis()
        .args(["new", "rust", &at("empty")])
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(parent.path().join("empty/ignis.toml").is_file());
}

#[test]
fn wit_writes_the_packages_guests_build_against() {
    let dir = tempfile::tempdir().unwrap();
    // What was in deps/ before is replaced; files beside it stay.
    std::fs::create_dir_all(dir.path().join("deps/stale")).unwrap();
    write(dir.path(), "world.wit", "package a:b;");
    // A path that is a file is an error naming it.
    let file = write(dir.path(), "not-a-dir", "");
    let out = ignis().arg("wit").arg(&file).output().unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not-a-dir"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = ignis().arg("wit").arg(dir.path()).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!dir.path().join("deps/stale").exists());
    assert!(dir.path().join("world.wit").is_file());
    let http = std::fs::read_to_string(dir.path().join("deps/wasi-http/http.wit")).unwrap();
    assert!(http.contains("package wasi:http@0.2.12;"));
    for package in [
        "ignis-platform",
        "ignis-actor",
        "keyvalue-0.2.0-draft2",
        "config-0.2.0-rc.1",
    ] {
        assert!(dir.path().join("deps").join(package).is_dir(), "{package}");
    }
}
