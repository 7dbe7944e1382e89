//! Shared test harness: builds the example guests once, starts in-process
//! servers from manifest text, and speaks HTTP to them.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use ignis::app::{self, Sources};
use ignis_actors::{ActorDirectory, FunctionGate};
use ignis_config::Manifest;
use ignis_runtime::Function;
use ignis_runtime::sched::FairScheduler;
use tokio::sync::oneshot;

/// The repository root.
pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .unwrap()
}

/// Held by the tests that build guests (cargo, npm, componentize) and by
/// those whose guests are CPU-heavy (JavaScript, Python): a guest that
/// outlasts its first slice runs on the fair scheduler's `SCHED_IDLE`
/// threads, which a compiler running beside it starves; in CI a Python
/// request next to `ignis up` building the examples hit its 30 s wall
/// deadline that way. Taking turns keeps those tests about what they test.
pub static BUILDS: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Builds every example guest once per test run; returns the directory
/// holding the `.wasm` files.
pub fn guests() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        ignis::guest_build::ensure_target().expect("wasm32-wasip2 target");
        let examples = repo().join("examples");
        let status =
            std::process::Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
                .args([
                    "build",
                    "--release",
                    "--target",
                    "wasm32-wasip2",
                    "--manifest-path",
                ])
                .arg(examples.join("Cargo.toml"))
                .status()
                .expect("run cargo");
        assert!(status.success(), "building the example guests failed");
        examples.join("target/wasm32-wasip2/release")
    })
}

/// Builds the JavaScript and Python example guests once per test run, with
/// the build commands examples/ignis.toml gives them (the pinned
/// toolchains of scripts/guest-tools.sh); returns the directory holding
/// their `.wasm` files (`hello-js.wasm`, `kv-py.wasm`, ...).
pub fn language_guests() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let manifest =
            Manifest::load(&repo().join("examples/ignis.toml")).expect("examples manifest");
        for (name, f) in &manifest.functions {
            if let ignis_config::ComponentSource::Command(build) = &f.source {
                ignis::guest_build::run_command(build, Path::new(env!("CARGO_BIN_EXE_ignis")))
                    .unwrap_or_else(|e| panic!("building example `{name}`: {e:#}"));
            }
        }
        repo().join("examples/target/guests")
    })
}

/// Path of a built JavaScript or Python example guest, as a TOML string
/// literal's content.
pub fn language_wasm(name: &str) -> String {
    language_guests()
        .join(format!("{name}.wasm"))
        .display()
        .to_string()
}

/// Path of a built example guest, as a TOML string literal's content.
pub fn wasm(name: &str) -> String {
    guests().join(format!("{name}.wasm")).display().to_string()
}

/// `DIR/ignis.toml` serving the `hello` example at `/hello` with the
/// shared compile cache; `function` goes into its `[functions.hello]`
/// table, `tables` after everything (more tables: `[telemetry]`, ...).
pub fn hello_manifest(dir: &Path, function: &str, tables: &str) -> PathBuf {
    write(
        dir,
        "ignis.toml",
        &format!(
            "[server]\ncache_dir = \"{}\"\n[functions.hello]\ncomponent = \"{}\"\n{function}\n[[routes]]\npath = \"/hello\"\nfunction = \"hello\"\n{tables}",
            shared_cache(),
            wasm("hello")
        ),
    )
}

/// One shared compile cache for the whole test run (each test still gets a
/// fresh engine).
pub fn shared_cache() -> String {
    repo().join("target/ignis-test-cache").display().to_string()
}

/// A server running in this process.
pub struct TestServer {
    pub addr: SocketAddr,
    pub functions: BTreeMap<String, Arc<Function>>,
    pub gates: BTreeMap<String, Arc<FunctionGate>>,
    pub runtime: Arc<ignis_runtime::Runtime>,
    pub scheduler: Arc<FairScheduler>,
    pub directory: Option<Arc<ActorDirectory>>,
    pub edge: Arc<ignis_edge::Edge>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl TestServer {
    /// Starts a server from manifest text (`[server]` is added: port 0 and the shared cache).
    pub async fn start(functions_and_routes: &str) -> TestServer {
        let text = format!(
            "[server]\nlisten = \"127.0.0.1:0\"\ncache_dir = \"{}\"\nheader_read_timeout = \"5s\"\nshutdown_grace = \"5s\"\n{functions_and_routes}",
            shared_cache()
        );
        Self::start_full(&text).await
    }

    /// Starts a server from a complete manifest.
    pub async fn start_full(text: &str) -> TestServer {
        let manifest =
            Manifest::from_str_at(text, &repo().join("test.toml")).expect("test manifest");
        let app = app::load(&manifest, Sources::PrebuiltOnly).expect("load functions");
        let server = ignis_edge::Server::bind(manifest.server.listen, app.edge.clone())
            .await
            .unwrap();
        let addr = server.local_addr();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            server
                .run(async {
                    let _ = stopped.await;
                })
                .await
                .unwrap();
        });
        TestServer {
            addr,
            functions: app.functions,
            gates: app.gates,
            runtime: app.runtime,
            scheduler: app.scheduler,
            directory: app.directory,
            edge: app.edge,
            stop: Some(stop),
            task: Some(task),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn function(&self, name: &str) -> &Arc<Function> {
        &self.functions[name]
    }

    pub fn gate(&self, name: &str) -> &Arc<FunctionGate> {
        &self.gates[name]
    }

    /// Stops accepting and waits for in-flight requests.
    pub async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            task.await.unwrap();
        }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

pub type HttpClient = Client<HttpConnector, Full<Bytes>>;

pub fn client() -> HttpClient {
    Client::builder(TokioExecutor::new()).build_http()
}

/// A response, fully read.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: http::HeaderMap,
    pub body: Bytes,
}

impl Reply {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

pub async fn send(client: &HttpClient, req: http::Request<Full<Bytes>>) -> Reply {
    let resp = tokio::time::timeout(Duration::from_secs(60), client.request(req))
        .await
        .expect("response within 60s")
        .expect("response");
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    Reply {
        status,
        headers,
        body,
    }
}

pub async fn get(client: &HttpClient, url: &str) -> Reply {
    send(
        client,
        http::Request::get(url).body(Full::default()).unwrap(),
    )
    .await
}

pub async fn post(client: &HttpClient, url: &str, body: impl Into<Bytes>) -> Reply {
    send(
        client,
        http::Request::post(url)
            .body(Full::new(body.into()))
            .unwrap(),
    )
    .await
}

/// `workers` clients each POST `url` `each` times in a row; every reply
/// must be 200 with a number in its body. Returns the numbers, asserting
/// that none came back twice (what a lost or doubled update would show).
pub async fn increment_concurrently(
    c: &HttpClient,
    url: &str,
    workers: usize,
    each: usize,
) -> std::collections::BTreeSet<u64> {
    let tasks: Vec<_> = (0..workers)
        .map(|_| {
            let (c, u) = (c.clone(), url.to_string());
            tokio::spawn(async move {
                let mut seen = Vec::new();
                for _ in 0..each {
                    let r = post(&c, &u, "").await;
                    assert_eq!(r.status, 200, "{}", r.text());
                    seen.push(r.text().trim().parse::<u64>().unwrap());
                }
                seen
            })
        })
        .collect();
    let mut all = std::collections::BTreeSet::new();
    for t in tasks {
        for v in t.await.unwrap() {
            assert!(all.insert(v), "two increments returned {v}");
        }
    }
    all
}

/// Waits (bounded) until `check` holds, re-checking whenever the function's
/// instance count changes. Not a sleep: it wakes on the runtime's notifications.
pub async fn wait_idle(f: &Function) {
    tokio::time::timeout(Duration::from_secs(30), f.stats().wait_idle())
        .await
        .expect("function went idle within 30s");
}

/// Sends a GET for `path` on a raw connection and returns the open stream;
/// dropping it disconnects, which cancels the request.
pub async fn hold(server: &TestServer, path: &str) -> tokio::net::TcpStream {
    use tokio::io::AsyncWriteExt;
    let mut s = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nhost: test\r\n\r\n").as_bytes())
        .await
        .unwrap();
    s
}

/// A request that sleeps in the `limits` function (its `/limits/...` route)
/// until its connection is dropped. Returns once it is running: the
/// function's active count is 1.
pub async fn hold_a_running_request(server: &TestServer) -> tokio::net::TcpStream {
    let a = hold(server, "/limits/sleep?ms=600000").await;
    tokio::time::timeout(
        Duration::from_secs(60),
        server
            .function("limits")
            .stats()
            .wait_until(|s| s.active.load(std::sync::atomic::Ordering::SeqCst) == 1),
    )
    .await
    .expect("timed out waiting for the held request to run");
    a
}

/// Sends raw bytes on a fresh connection and returns everything the server
/// answers until it closes the connection (or 10 s pass).
pub async fn raw(addr: SocketAddr, bytes: &[u8]) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(bytes).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

// ---- the `ignis` binary ----

pub fn ignis() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ignis"));
    cmd.env("IGNIS_LOG", "info").env_remove("RUST_BACKTRACE");
    cmd
}

pub fn write(dir: &Path, name: &str, text: &str) -> std::path::PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

/// A running `ignis` process with its address, and its stderr collected.
pub struct Proc {
    pub child: Child,
    pub addr: std::net::SocketAddr,
    pub stderr: std::thread::JoinHandle<String>,
    /// Its stderr so far, line by line as it comes ([`Proc::wait_log`]).
    pub log: Arc<(std::sync::Mutex<String>, std::sync::Condvar)>,
    /// The rest of its stdout, after the first "listening on" line.
    pub stdout: BufReader<std::process::ChildStdout>,
}

impl Proc {
    /// Waits until the process has written a stderr line containing
    /// `needle`; false if it did not within `within` (or its stderr ended).
    pub fn wait_log(&self, needle: &str, within: Duration) -> bool {
        let (text, changed) = &*self.log;
        let deadline = std::time::Instant::now() + within;
        let mut text = text.lock().unwrap();
        while !text.contains(needle) {
            let now = std::time::Instant::now();
            if now >= deadline {
                return false;
            }
            text = changed.wait_timeout(text, deadline - now).unwrap().0;
        }
        true
    }

    /// Reads stdout lines until one starts with `prefix`; returns the rest
    /// of that line.
    pub fn stdout_line(&mut self, prefix: &str) -> String {
        loop {
            let mut line = String::new();
            let n = self.stdout.read_line(&mut line).unwrap();
            assert!(n > 0, "stdout ended before a line starting with {prefix:?}");
            if let Some(rest) = line.trim().strip_prefix(prefix) {
                return rest.to_string();
            }
        }
    }
}

pub fn spawn(args: &[&str]) -> Proc {
    spawn_with(args, &[])
}

/// Like [`spawn`], with extra environment variables.
pub fn spawn_with(args: &[&str], env: &[(&str, &str)]) -> Proc {
    let mut cmd = ignis();
    cmd.envs(env.iter().copied()).args(args);
    spawn_command(cmd)
}

/// Runs `ignis` under a shell with at most `max_files` open file
/// descriptors (`ulimit -n`), with `args`.
pub fn spawn_with_fd_limit(args: &[&str], max_files: u32) -> Proc {
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg(format!("ulimit -n {max_files} && exec \"$0\" \"$@\""))
        .arg(env!("CARGO_BIN_EXE_ignis"))
        .args(args)
        .env("IGNIS_LOG", "info")
        .env_remove("RUST_BACKTRACE");
    spawn_command(cmd)
}

/// Starts `cmd` (an `ignis serve`/`up`) on an ephemeral port and waits
/// for its "listening on" line.
fn spawn_command(mut cmd: Command) -> Proc {
    let mut child = cmd
        .args(["--listen", "127.0.0.1:0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let log = Arc::new((
        std::sync::Mutex::new(String::new()),
        std::sync::Condvar::new(),
    ));
    let lines = log.clone();
    let stderr = std::thread::spawn(move || {
        let mut stderr = BufReader::new(stderr);
        let mut line = String::new();
        while stderr.read_line(&mut line).is_ok_and(|n| n > 0) {
            lines.0.lock().unwrap().push_str(&line);
            lines.1.notify_all();
            line.clear();
        }
        lines.1.notify_all();
        lines.0.lock().unwrap().clone()
    });
    let mut line = String::new();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    stdout.read_line(&mut line).unwrap();
    let addr = line
        .trim()
        .strip_prefix("listening on http://")
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
        .parse()
        .unwrap();
    Proc {
        child,
        addr,
        stderr,
        log,
        stdout,
    }
}

/// `text` without ANSI colour sequences (`ESC [ ... m`), as the log shows
/// on a terminal.
pub fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c == 'm' {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Sends SIGTERM, waits for the process to exit (it finishes in-flight
/// requests and flushes its log) and returns what it wrote to stderr.
/// Tests that read the log use this: lines are written by a background
/// thread, so a `kill -9` may lose the last ones.
pub fn stop(mut proc: Proc) -> String {
    signal(&proc.child, "TERM");
    let exit = proc.child.wait().unwrap();
    assert!(exit.success(), "exit status {exit}");
    proc.stderr.join().unwrap()
}

/// Sends `kill -9`, reaps the process and returns what it wrote to stderr.
pub fn sigkill(mut proc: Proc) -> String {
    signal(&proc.child, "KILL");
    let _ = proc.child.wait();
    proc.stderr.join().unwrap()
}

/// Sends signal `name` (`TERM`, `KILL`, `STOP`, ...) to `child`.
pub fn signal(child: &Child, name: &str) {
    let status = Command::new("kill")
        .args([&format!("-{name}"), &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success(), "kill -{name} failed");
}
