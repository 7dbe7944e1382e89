//! A private PostgreSQL server for tests (feature `testing`).
//!
//! One server per test process, started on first use from Debian's
//! package (`/usr/lib/postgresql/*/bin`, or `IGNIS_PG_BIN`): a fresh data
//! directory in a temporary directory, no TCP listener at all (clients
//! reach it through a Unix socket in that directory, so no port can clash
//! with anything), trust authentication for the socket only, `fsync` on.
//! Each test asks for a database of its own ([`TestPostgres::database`]).
//!
//! The server is started through a small shell watchdog whose standard
//! input is a pipe from the test process: when the test process exits (or
//! is killed), the pipe closes, the watchdog stops the server (fast
//! shutdown) and removes the directory. Readiness is the server's own
//! "ready to accept connections" log line, read from its output, not a
//! timed wait.
//!
//! Running as root (CI containers), `initdb` and `postgres` run as the
//! `postgres` user (through `setpriv`) the package created, since PostgreSQL refuses root.
//!
//! When no server binary is installed, [`shared`] returns `None` after a
//! loud message, unless `IGNIS_REQUIRE_POSTGRES` is set (the project's test
//! script sets it once `scripts/postgres.sh` installed the package), in
//! which case it panics: CI never skips these tests.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, OnceLock};

/// A running private server.
pub struct TestPostgres {
    bin: PathBuf,
    socket_dir: PathBuf,
    databases: AtomicU32,
    /// Closing it stops the server; held for the life of the process.
    _watchdog: Mutex<ChildStdin>,
}

/// The process's server, started on first call; `None` (after a message on
/// stderr) when PostgreSQL is not installed and not required.
pub fn shared() -> Option<&'static TestPostgres> {
    static SERVER: OnceLock<Option<TestPostgres>> = OnceLock::new();
    SERVER
        .get_or_init(|| match find_bin() {
            Some(bin) => Some(TestPostgres::start(bin)),
            None if std::env::var_os("IGNIS_REQUIRE_POSTGRES").is_some() => panic!(
                "IGNIS_REQUIRE_POSTGRES is set but no PostgreSQL server binary was found \
                 (scripts/postgres.sh installs it; IGNIS_PG_BIN names its bin directory)"
            ),
            None => {
                eprintln!(
                    "\n*** SKIPPING the PostgreSQL tests: no PostgreSQL server is installed \
                     (run scripts/postgres.sh) ***\n"
                );
                None
            }
        })
        .as_ref()
}

fn find_bin() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("IGNIS_PG_BIN") {
        return Some(PathBuf::from(dir));
    }
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .flatten()
        .filter_map(|e| {
            let major = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            (bin.join("postgres").exists() && bin.join("initdb").exists()).then_some((major, bin))
        })
        .collect();
    found.sort();
    found.pop().map(|(_, bin)| bin)
}

fn output(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Runs as the `postgres` user when this process is root. `setpriv`
/// changes user and executes the program in place (no process in between
/// that a signal would have to pass through, unlike `su` or `runuser`).
fn as_server_user(root: bool, program: &Path) -> Command {
    if root {
        let mut c = Command::new("setpriv");
        c.args(["--reuid=postgres", "--regid=postgres", "--init-groups"])
            .arg(program);
        c
    } else {
        Command::new(program)
    }
}

impl TestPostgres {
    fn start(bin: PathBuf) -> TestPostgres {
        let dir = tempfile::Builder::new()
            .prefix("ignis-pg-")
            .tempdir()
            .expect("creating the PostgreSQL test directory")
            .keep();
        let root = output(Command::new("id").arg("-u")) == "0";
        if root {
            let uid: u32 = output(Command::new("id").args(["-u", "postgres"]))
                .parse()
                .expect("the postgres user's uid");
            let gid: u32 = output(Command::new("id").args(["-g", "postgres"]))
                .parse()
                .expect("the postgres user's gid");
            std::os::unix::fs::chown(&dir, Some(uid), Some(gid))
                .expect("handing the test directory to the postgres user");
        }
        let data = dir.join("data");
        output(
            as_server_user(root, &bin.join("initdb"))
                .arg("-D")
                .arg(&data)
                .args([
                    "-U",
                    "ignis",
                    "-A",
                    "trust",
                    "-E",
                    "UTF8",
                    "--locale=C",
                    "--no-sync",
                    "--no-instructions",
                ]),
        );
        let server = as_server_user(root, &bin.join("postgres"));
        let server_line = format!(
            "{} {} -D '{}' -k '{}' -c listen_addresses= -c max_connections=400 \
             -c shared_buffers=64MB -c fsync=on",
            server.get_program().to_string_lossy(),
            server
                .get_args()
                .map(|a| format!("'{}'", a.to_string_lossy()))
                .collect::<Vec<_>>()
                .join(" "),
            data.display(),
            dir.display(),
        );
        // The watchdog: the server runs until our end of the pipe closes.
        let script = format!(
            "{server_line} 2>&1 &\npg=$!\nread _ignored\nkill -INT $pg\nwait $pg\nrm -rf '{}'\n",
            dir.display()
        );
        let mut child = Command::new("sh")
            .arg("-c")
            .arg(script)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            // Not the test's stderr: nothing of the server may keep a
            // pipe of the test run open after the test process is gone.
            .stderr(Stdio::null())
            .spawn()
            .expect("starting the PostgreSQL watchdog");
        let stdin = child.stdin.take().expect("watchdog stdin");
        let mut log = BufReader::new(child.stdout.take().expect("watchdog stdout"));
        let mut seen = String::new();
        loop {
            let mut line = String::new();
            let n = log.read_line(&mut line).expect("reading the server's log");
            assert!(n > 0, "PostgreSQL exited before it was ready:\n{seen}");
            seen.push_str(&line);
            if line.contains("ready to accept connections") {
                break;
            }
        }
        // Keep draining its log so the server never blocks on a full pipe.
        std::thread::spawn(move || {
            let mut sink = std::io::sink();
            let _ = std::io::copy(&mut log, &mut sink);
            let _ = sink.flush();
            drop(child);
        });
        TestPostgres {
            bin,
            socket_dir: dir,
            databases: AtomicU32::new(0),
            _watchdog: Mutex::new(stdin),
        }
    }

    /// A connection string for `database` (which need not exist).
    pub fn url(&self, database: &str) -> String {
        format!(
            "host={} user=ignis dbname={database}",
            self.socket_dir.display()
        )
    }

    /// Creates a fresh, empty database and returns its connection string.
    pub fn database(&self) -> String {
        let name = format!(
            "test_{}",
            self.databases.fetch_add(1, Ordering::Relaxed) + 1
        );
        self.sql("postgres", &format!("CREATE DATABASE {name}"));
        self.url(&name)
    }

    /// Runs `sql` in `database` with `psql`; returns its unaligned output.
    pub fn sql(&self, database: &str, sql: &str) -> String {
        output(
            Command::new(self.bin.join("psql"))
                .arg("-h")
                .arg(&self.socket_dir)
                .args([
                    "-U",
                    "ignis",
                    "-d",
                    database,
                    "-XAtq",
                    "-v",
                    "ON_ERROR_STOP=1",
                    "-c",
                    sql,
                ]),
        )
    }
}
