//! The `ignis` binary: check, serve, up, compile cache across restarts,
//! graceful shutdown, guest log capture.

use std::path::Path;
use std::process::Child;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::harness::*;

fn check(manifest: &Path) -> (bool, String, String) {
    let out = ignis().arg("check").arg(manifest).output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn a_bad_log_format_is_refused_naming_the_choices() {
    let out = ignis()
        .args(["--log-format", "xml", "check", "ignis.toml"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--log-format") && err.contains("text") && err.contains("json"),
        "{err}"
    );
    let out = ignis()
        .args(["check", "ignis.toml"])
        .env("IGNIS_LOG_FORMAT", "yaml")
        .output()
        .unwrap();
    assert!(!out.status.success(), "the environment is checked too");
}

#[test]
fn config_errors_name_file_line_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(
        dir.path(),
        "ignis.toml",
        "[functions.hello]\ncomponent = \"hello.wasm\"\n\nmax_concurrency = \"lots\"\n",
    );
    let (ok, _, err) = check(&path);
    assert!(!ok);
    assert!(err.contains(&format!("{}:4:", path.display())), "{err}");
    assert!(err.contains("functions.hello.max_concurrency"), "{err}");
}

/// Hand-assembled component binaries (no text-format dependency).
fn component_importing(name: &str) -> Vec<u8> {
    let mut inst = vec![
        0x42, 0x02, 0x01, 0x40, 0x00, 0x01, 0x00, 0x04, 0x00, 0x01, b'f', 0x01, 0x00,
    ];
    let mut types = vec![0x01];
    types.append(&mut inst);
    let mut import = vec![0x01, 0x00, name.len() as u8];
    import.extend_from_slice(name.as_bytes());
    import.extend_from_slice(&[0x05, 0x00]);
    let mut out = b"\0asm\x0d\x00\x01\x00".to_vec();
    out.extend_from_slice(&[0x07, types.len() as u8]);
    out.extend_from_slice(&types);
    out.extend_from_slice(&[0x0a, import.len() as u8]);
    out.extend_from_slice(&import);
    out
}

#[test]
fn bad_components_are_startup_errors_naming_function_file_and_import() {
    let dir = tempfile::tempdir().unwrap();
    let cases: [(&str, Vec<u8>, &str); 4] = [
        (
            "missing-import",
            component_importing("acme:nope/thing@1.0.0"),
            "acme:nope/thing@1.0.0",
        ),
        (
            "wrong-world",
            b"\0asm\x0d\x00\x01\x00".to_vec(),
            "wasi:http/incoming-handler",
        ),
        (
            "garbage",
            b"definitely not wasm".to_vec(),
            "not a valid WebAssembly component",
        ),
        ("absent", Vec::new(), "cannot read"),
    ];
    for (name, bytes, expected) in cases {
        let wasm = dir.path().join(format!("{name}.wasm"));
        if name != "absent" {
            std::fs::write(&wasm, bytes).unwrap();
        }
        let manifest = write(
            dir.path(),
            &format!("{name}.toml"),
            &format!(
                "[server]\ncache_dir = \"cache\"\n[functions.{name}]\ncomponent = \"{name}.wasm\"\n"
            ),
        );
        let (ok, _, err) = check(&manifest);
        assert!(!ok, "{name}");
        assert!(err.contains(&format!("function `{name}`")), "{name}: {err}");
        assert!(err.contains(&format!("{name}.wasm")), "{name}: {err}");
        assert!(err.contains(expected), "{name}: {err}");
    }
}

/// Each kind of guest is linked with only what it may import, so a wrong
/// import is a startup error naming it. Before the per-interface host
/// state, both linkers carried every interface: a function importing
/// `ignis:actor/storage` loaded and failed at call time, and an actor class
/// importing `wasi:keyvalue` got an empty store list.
#[test]
fn capabilities_are_checked_at_startup_by_kind_of_guest() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        // The counter actor, deployed as a function: storage is for actors.
        (
            "as-function",
            format!("[functions.counter]\ncomponent = \"{}\"\n", wasm("counter")),
            "function `counter`",
            "ignis:actor/storage",
        ),
        // The key-value function, deployed as an actor class.
        (
            "as-actor",
            format!("[actors.kv]\ncomponent = \"{}\"\n", wasm("kv")),
            "function `kv`",
            "wasi:keyvalue/",
        ),
    ];
    for (name, body, owner, import) in cases {
        let manifest = write(
            dir.path(),
            &format!("{name}.toml"),
            &format!(
                "[server]\ncache_dir = \"{}\"\n[storage]\npath = \"{name}.db\"\n{body}",
                shared_cache()
            ),
        );
        let (ok, _, err) = check(&manifest);
        assert!(!ok, "{name}");
        assert!(err.contains(owner), "{name}: {err}");
        assert!(err.contains(import), "{name}: {err}");
    }
    // The same components where they belong load.
    let manifest = write(
        dir.path(),
        "right.toml",
        &format!(
            "[server]\ncache_dir = \"{}\"\n[storage]\npath = \"right.db\"\n[actors.counter]\ncomponent = \"{}\"\n[functions.kv]\ncomponent = \"{}\"\nkey_value_stores = [\"default\"]\n",
            shared_cache(),
            wasm("counter"),
            wasm("kv")
        ),
    );
    let (ok, out, err) = check(&manifest);
    assert!(ok, "{out}{err}");
}

#[test]
fn reuse_on_a_02_component_is_a_startup_warning_naming_the_function() {
    let dir = tempfile::tempdir().unwrap();
    let manifest = write(
        dir.path(),
        "ignis.toml",
        &format!(
            "[server]\ncache_dir = \"{}\"\n[functions.kept]\ncomponent = \"{}\"\nreuse = true\n[functions.plain]\ncomponent = \"{}\"\n[functions.p3]\ncomponent = \"{}\"\n",
            shared_cache(),
            wasm("limits"),
            wasm("limits"),
            wasm("limits_p3"),
        ),
    );
    let (ok, out, err) = check(&manifest);
    assert!(ok, "{out}{err}");
    let err = strip_ansi(&err);
    let warnings: Vec<&str> = err
        .lines()
        .filter(|l| l.contains("reuse is on for a wasi:http 0.2 component"))
        .collect();
    // Only the 0.2 function that opted in: the 0.3 one reuses by default
    // (the standard allows it), the plain 0.2 one does not reuse.
    assert_eq!(warnings.len(), 1, "{err}");
    assert!(warnings[0].contains("kept"), "{err}");
}

#[test]
fn concurrent_reuse_on_a_02_component_is_a_startup_error_naming_the_function() {
    let dir = tempfile::tempdir().unwrap();
    let shared_with = |guest: &str| {
        write(
            dir.path(),
            "ignis.toml",
            &format!(
                "[server]\ncache_dir = \"{}\"\n[functions.shared]\ncomponent = \"{}\"\nreuse = {{ max_concurrent = 4 }}\n",
                shared_cache(),
                wasm(guest),
            ),
        )
    };
    let (ok, out, err) = check(&shared_with("limits"));
    assert!(!ok, "{out}{err}");
    assert!(err.contains("shared"), "{err}");
    assert!(
        err.contains("max_concurrent = 4 needs a wasi:http 0.3 component"),
        "{err}"
    );
    // The same on a 0.3 component loads.
    let (ok, out, err) = check(&shared_with("limits_p3"));
    assert!(ok, "{out}{err}");
}

#[test]
fn restart_reuses_the_compile_cache() {
    let dir = tempfile::tempdir().unwrap();
    let manifest = write(
        dir.path(),
        "ignis.toml",
        &format!(
            "[server]\ncache_dir = \"cache\"\n[functions.hello]\ncomponent = \"{}\"\n[functions.echo]\ncomponent = \"{}\"\n",
            wasm("hello"),
            wasm("echo")
        ),
    );
    let (ok, out, err) = check(&manifest);
    assert!(ok, "{err}");
    assert!(out.contains("2 compiled, 0 from cache"), "{out}");
    let (ok, out, err) = check(&manifest);
    assert!(ok, "{err}");
    assert!(
        out.contains("0 compiled, 2 from cache"),
        "second start recompiled: {out}"
    );
    assert!(
        out.contains("function `hello` (tenant hello, cache Hit)"),
        "{out}"
    );
}

fn sigterm(child: &Child) {
    signal(child, "TERM");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_finishes_in_flight_requests_and_guest_logs_are_captured_and_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let manifest = write(
        dir.path(),
        "ignis.toml",
        &format!(
            "[server]\ncache_dir = \"{}\"\nshutdown_grace = \"30s\"\n[functions.limits]\ncomponent = \"{}\"\n[[routes]]\npath = \"/...\"\nfunction = \"limits\"\n",
            shared_cache(),
            wasm("limits")
        ),
    );
    let mut proc = spawn(&["serve", manifest.to_str().unwrap()]);
    let c = client();
    let r = get(&c, &format!("http://{}/log?lines=5000", proc.addr)).await;
    assert_eq!((r.status, r.text().as_str()), (200, "printed 5000 lines\n"));

    // A streaming request in flight when SIGTERM arrives.
    let mut conn = tokio::net::TcpStream::connect(proc.addr).await.unwrap();
    conn.write_all(b"GET /drip?n=50 HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut first = [0u8; 16];
    conn.read_exact(&mut first).await.unwrap();
    assert!(first.starts_with(b"HTTP/1.1 200"));
    sigterm(&proc.child);
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), conn.read_to_end(&mut rest))
        .await
        .unwrap()
        .unwrap();
    let rest = String::from_utf8_lossy(&rest);
    assert!(
        rest.contains("drip 0\n") && rest.contains("drip 49\n"),
        "in-flight response was cut: {rest}"
    );

    let status = tokio::task::spawn_blocking(move || proc.child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "exit status {status}");
    let logs = proc.stderr.join().unwrap();
    assert!(logs.contains("SIGTERM received"), "{logs}");
    assert!(logs.contains("guest log line 0 of 5000"), "{logs}");
    assert!(
        logs.contains("dropped_bytes"),
        "log capture should be bounded"
    );
    assert!(
        !logs.contains("guest log line 4999 of 5000"),
        "log capture should be bounded"
    );
    // After shutdown nothing listens.
    assert!(tokio::net::TcpStream::connect(proc.addr).await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn up_builds_rust_guests_and_serves_them() {
    let _builds = BUILDS.lock().await;
    guests(); // the examples workspace is built once already; `up` reuses it
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "ignis.toml",
        &format!(
            "[server]\ncache_dir = \"{}\"\n[functions.hello]\nbuild = \"{}\"\n[[routes]]\npath = \"/hello\"\nfunction = \"hello\"\n",
            shared_cache(),
            repo().join("examples/hello").display()
        ),
    );
    let mut proc = spawn(&["up", dir.path().to_str().unwrap()]);
    let r = get(&client(), &format!("http://{}/hello", proc.addr)).await;
    assert_eq!((r.status, r.text().as_str()), (200, "Hello from Ignis!\n"));
    sigterm(&proc.child);
    let status = tokio::task::spawn_blocking(move || proc.child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success());

    // `serve` refuses sources it would have to build.
    let out = ignis()
        .arg("serve")
        .arg(dir.path().join("ignis.toml"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("use `ignis up`"));
}

#[test]
fn build_commands_run_in_their_workdir_skip_when_up_to_date_and_name_failures() {
    let _builds = BUILDS.blocking_lock();
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("src")).unwrap();
    write(&dir.path().join("src"), "app.txt", "v1");
    // A "toolchain" that copies a real component into place, and counts
    // its runs, so skipped builds can be told apart.
    let manifest = write(
        dir.path(),
        "ok.toml",
        &format!(
            "[server]\ncache_dir = \"{}\"\n[functions.app]\nbuild = {{ command = \"echo run >> runs.log && cp '{}' out/app.wasm\", output = \"out/app.wasm\", workdir = \"src\", watch = [\"app.txt\"] }}\n",
            shared_cache(),
            wasm("hello"),
        ),
    );
    std::fs::create_dir(dir.path().join("src/out")).unwrap();
    let build = |m: &Path| {
        let out = ignis().arg("check").arg("--build").arg(m).output().unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let runs = || {
        std::fs::read_to_string(dir.path().join("src/runs.log"))
            .unwrap_or_default()
            .lines()
            .count()
    };
    let (ok, err) = build(&manifest);
    assert!(ok, "{err}");
    assert_eq!(runs(), 1, "the command ran in `workdir`");
    // Output newer than every watched file: not run again.
    let (ok, err) = build(&manifest);
    assert!(ok, "{err}");
    assert_eq!(runs(), 1, "{err}");
    // A watched file changed (newer than the output): run again.
    let later = std::fs::metadata(dir.path().join("src/out/app.wasm"))
        .unwrap()
        .modified()
        .unwrap()
        + Duration::from_secs(5);
    std::fs::File::options()
        .write(true)
        .open(dir.path().join("src/app.txt"))
        .unwrap()
        .set_modified(later)
        .unwrap();
    let (ok, err) = build(&manifest);
    assert!(ok, "{err}");
    assert_eq!(runs(), 2, "{err}");

    // A failing command: the error names the function, the command, its
    // exit status and the end of its stderr.
    let broken = write(
        dir.path(),
        "broken.toml",
        "[functions.broken]\nbuild = { command = \"echo compiling >&2; echo 'app.js:3: unexpected token' >&2; exit 3\", output = \"never.wasm\" }\n",
    );
    let (ok, err) = build(&broken);
    assert!(!ok);
    let err = strip_ansi(&err);
    assert!(err.contains("function `broken`"), "{err}");
    assert!(err.contains("exit 3"), "{err}");
    assert!(err.contains("exit status: 3"), "{err}");
    assert!(err.contains("app.js:3: unexpected token"), "{err}");
    // Succeeds but writes nothing: said so.
    let silent = write(
        dir.path(),
        "silent.toml",
        "[functions.silent]\nbuild = { command = \"true\", output = \"nothing.wasm\" }\n",
    );
    let (ok, err) = build(&silent);
    assert!(!ok);
    assert!(strip_ansi(&err).contains("wrote no"), "{err}");
    // `serve` does not build.
    let out = ignis().arg("serve").arg(&manifest).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("use `ignis up`"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bundled_examples_serve_bindings_and_actors() {
    let _builds = BUILDS.lock().await;
    guests(); // built once already; `up` reuses the build
    language_guests(); // likewise: `up` skips builds whose output is newer than their sources
    let mut proc = spawn(&["up", repo().join("examples").to_str().unwrap()]);
    let base = format!("http://{}", proc.addr);
    let c = client();
    // The examples' state persists in examples/.ignis across runs: compare
    // with what is there, not with fixed numbers.
    let r = get(&c, &format!("{base}/visits")).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(
        r.text().starts_with("Welcome to Ignis! You are visitor #"),
        "{}",
        r.text()
    );
    let r = get(&c, &format!("{base}/kv/set?key=readme&value=hello")).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        get(&c, &format!("{base}/kv/get?key=readme")).await.text(),
        "hello"
    );
    let first: u64 = post(&c, &format!("{base}/counter/readme/incr"), "")
        .await
        .text()
        .parse()
        .unwrap();
    let r = get(&c, &format!("{base}/bump?id=readme")).await;
    assert_eq!(r.text(), format!("counter readme is now {}", first + 1));
    // The JavaScript and Python examples, built by their build commands.
    for (lang, name) in [("js", "JavaScript"), ("py", "Python")] {
        let r = get(&c, &format!("{base}/hello-{lang}")).await;
        assert_eq!(r.text(), format!("Hello from Ignis, in {name}!\n"));
        let r = get(&c, &format!("{base}/kv-{lang}/visit")).await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert!(
            r.text().starts_with("Welcome to Ignis! You are visitor #")
                && r.text().ends_with(&format!("({name}).\n")),
            "{}",
            r.text()
        );
    }
    sigterm(&proc.child);
    let status = tokio::task::spawn_blocking(move || proc.child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success());
}

/// A database that cannot be reached at start: the node exits with an
/// error naming the database, without its password.
#[test]
fn an_unreachable_database_stops_the_start_naming_it_without_the_password() {
    let dir = tempfile::tempdir().unwrap();
    // Port 1 on loopback: nothing listens there.
    let manifest = hello_manifest(
        dir.path(),
        "key_value_stores = [\"default\"]",
        "[storage]\ndatabase = \"postgres://ignis:pw-s3cret@127.0.0.1:1/orders\"\n",
    );
    let out = ignis()
        .args(["serve", "--listen", "127.0.0.1:0"])
        .arg(&manifest)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("storage.database") && err.contains("postgres://ignis@127.0.0.1:1/orders"),
        "{err}"
    );
    assert!(!err.contains("s3cret"), "the password leaked: {err}");
    // The environment variable is checked like the file.
    let out = ignis()
        .args(["serve", "--listen", "127.0.0.1:0"])
        .arg(&manifest)
        .env("IGNIS_DATABASE_URL", "mysql://db/x")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("IGNIS_DATABASE_URL") && err.contains("postgres://"),
        "{err}"
    );
}

/// A benchmark peer's `env` value `$NAME` must name a variable that is set:
/// refused before anything starts, naming the peer and the variable.
#[test]
fn a_bench_peer_env_naming_an_unset_variable_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let scenario = write(
        dir.path(),
        "s.toml",
        "description = \"d\"\nseconds = 1\nwarmup = 0\n\
         [[peers]]\nname = \"pg\"\nkind = \"ignis\"\napp = \"app\"\n\
         env = { IGNIS_DATABASE_URL = \"$IGNIS_TEST_NEVER_SET_VARIABLE\" }\n\
         [[loads]]\nname = \"l\"\npath = \"/\"\nconnections = 1\n\
         [[phases]]\nname = \"p\"\nloads = [\"l\"]\n",
    );
    let out = ignis()
        .arg("bench")
        .arg(&scenario)
        .env_remove("IGNIS_TEST_NEVER_SET_VARIABLE")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("peer `pg`") && err.contains("IGNIS_TEST_NEVER_SET_VARIABLE is not set"),
        "{err}"
    );
}

/// `ignis deploy` naming a unit its manifest lacks is refused before
/// anything is sent (the admin address is a closed port), naming the
/// manifest and the unit, with and without `--component`.
#[test]
fn deploy_naming_a_unit_the_manifest_lacks_is_refused_before_sending() {
    let dir = tempfile::tempdir().unwrap();
    let manifest = hello_manifest(dir.path(), "", "");
    let deploy = |extra: &[&str]| {
        let out = ignis()
            .args([
                "deploy",
                "nosuch",
                "--admin",
                "http://127.0.0.1:1",
                "--manifest",
            ])
            .arg(&manifest)
            .args(extra)
            .env("IGNIS_ADMIN_TOKEN", "t".repeat(32))
            .output()
            .unwrap();
        assert!(!out.status.success());
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let hello = wasm("hello");
    let err = deploy(&["--component", &hello]);
    assert!(
        err.contains("has no [functions.nosuch] or [actors.nosuch]")
            && err.contains(&manifest.display().to_string()),
        "{err}"
    );
    let err = deploy(&[]);
    assert!(
        err.contains("has no function or actor class `nosuch`"),
        "{err}"
    );
}
