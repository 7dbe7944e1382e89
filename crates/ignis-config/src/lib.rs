//! The Ignis manifest, `ignis.toml`.
//!
//! A manifest declares the server settings, the functions (each a
//! `wasi:http` component, prebuilt or built from a Rust source directory)
//! and the routes that map a host and a path to a function.
//!
//! ```
//! let manifest = ignis_config::Manifest::from_str_at(
//!     r#"
//!     [functions.hello]
//!     component = "hello.wasm"
//!     memory = "32MiB"
//!
//!     [[routes]]
//!     path = "/hello"
//!     function = "hello"
//!     "#,
//!     std::path::Path::new("/srv/app/ignis.toml"),
//! )
//! .unwrap();
//! assert_eq!(manifest.functions["hello"].limits.memory_bytes, 32 << 20);
//! ```
//!
//! Parsing is strict: an unknown key, a value of the wrong type or a value out
//! of range is a [`ConfigError`] that names the file, the line, the column and
//! the dotted key (`functions.hello.memory`). The parsed [`Manifest`] is
//! immutable: it flows one way into the runtime and the edge.

mod units;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

pub use units::{ByteSize, HumanDuration};

/// A manifest error that points at the offending spot in the file.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{path}: cannot read manifest: {source}")]
    Io {
        /// The manifest path.
        path: PathBuf,
        /// The underlying I/O error.
        source: std::io::Error,
    },
    /// The file is not valid TOML, has an unknown key or a bad value.
    #[error("{path}:{line}:{column}: {key}: {message}")]
    Invalid {
        /// The manifest path.
        path: PathBuf,
        /// 1-based line of the offending key or value.
        line: usize,
        /// 1-based column.
        column: usize,
        /// Dotted path of the key (`functions.hello.memory`), or `<document>`.
        key: String,
        /// What is wrong.
        message: String,
    },
}

impl ConfigError {
    fn at(
        path: &Path,
        text: &str,
        offset: usize,
        key: impl Into<String>,
        message: impl Into<String>,
    ) -> Self {
        let (line, column) = line_col(text, offset);
        ConfigError::Invalid {
            path: path.to_path_buf(),
            line,
            column,
            key: key.into(),
            message: message.into(),
        }
    }
}

fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let column = before.rfind('\n').map_or(offset, |nl| offset - nl - 1) + 1;
    (line, column)
}

/// The whole manifest, validated.
#[derive(Debug, Clone)]
pub struct Manifest {
    /// Path of the manifest file; relative paths inside it resolve against its directory.
    pub path: PathBuf,
    /// The text it was parsed from (a deploy edits a copy of it).
    pub text: std::sync::Arc<str>,
    /// Server settings.
    pub server: ServerConfig,
    /// Functions by name, in name order.
    pub functions: BTreeMap<String, FunctionConfig>,
    /// Routes, in file order (matching picks the most specific, not the first).
    pub routes: Vec<RouteConfig>,
    /// Tenants with explicit settings (`[tenants.NAME]`); every other tenant
    /// named by a function gets [`TenantConfig::default`].
    pub tenants: BTreeMap<String, TenantConfig>,
    /// The embedded store behind `wasi:keyvalue` (`[storage]`).
    pub storage: StorageConfig,
    /// Named outbound origins (`[backends.NAME]`).
    pub backends: BTreeMap<String, BackendConfig>,
    /// Durable actor classes (`[actors.NAME]`).
    pub actors: BTreeMap<String, ActorClassConfig>,
    /// The HTTPS listener (`[tls]`), if any.
    pub tls: Option<TlsConfig>,
    /// Origins the edge proxies to (`[upstreams.NAME]`).
    pub upstreams: BTreeMap<String, UpstreamConfig>,
    /// The admin listener (`[admin]`; defaults without the section).
    pub admin: AdminConfig,
    /// Cron triggers (`[[triggers.cron]]`), in file order.
    pub cron: Vec<CronTrigger>,
    /// OpenTelemetry trace export (`[telemetry]`); `None`: off.
    pub telemetry: Option<TelemetryConfig>,
    /// Cluster mode (`[cluster]`, or the CLI's `--cluster`); `None`: the
    /// node is alone.
    pub cluster: Option<ClusterConfig>,
}

/// Cluster mode (`[cluster]`): nodes sharing one PostgreSQL database
/// (`cluster.database`, which is the node's `storage.database`), with
/// actors placed by leases and messages forwarded between nodes.
/// docs/cluster.md has the design.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterConfig {
    /// The internal listener other nodes forward actor messages to
    /// (HTTP/2 without TLS, bearer-authenticated; default `127.0.0.1:9903`).
    pub listen: SocketAddr,
    /// The `host:port` other nodes reach the internal listener at (default:
    /// the address it was bound to).
    pub advertise: Option<String>,
    /// How long a node stays a member after its last heartbeat, by the
    /// database's clock (default 5s, between 1s and 60s): the failover time
    /// of its actors.
    pub lease: Duration,
    /// How long a forwarded message may take, the owner's work included
    /// (default 30s, between 1s and 300s).
    pub forward_timeout: Duration,
}

/// The internal listener's default address.
pub const DEFAULT_CLUSTER_LISTEN: &str = "127.0.0.1:9903";

impl ClusterConfig {
    /// The defaults (what `--cluster URL` enables without a `[cluster]`).
    pub fn with_defaults() -> ClusterConfig {
        ClusterConfig {
            listen: DEFAULT_CLUSTER_LISTEN.parse().expect("valid default"),
            advertise: None,
            // Failover takes up to a lease plus the takeover (tens of
            // ms): 4 s keeps it under 5 s; with 5 s one failover in three
            // measured 5.09 s (docs/perf/2026-12-01-cluster-forwarding.md).
            lease: Duration::from_secs(4),
            forward_timeout: Duration::from_secs(30),
        }
    }
}

/// Checks an advertised `host:port`: at most 255 characters, a host and a
/// port, nothing else.
pub fn check_advertise(value: &str) -> Result<(), String> {
    let ok = value.len() <= 255
        && value
            .parse::<http::uri::Authority>()
            .is_ok_and(|a| a.port_u16().is_some_and(|p| p != 0) && !a.as_str().contains('@'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "`{value}` is not a host:port (like 10.0.0.7:9903) of at most 255 characters"
        ))
    }
}

/// OpenTelemetry trace export (`[telemetry]`): one span per request,
/// posted in batches to an OTLP/HTTP collector.
#[derive(Debug, Clone, PartialEq)]
pub struct TelemetryConfig {
    /// Where spans go (OTLP over HTTP, protobuf, plain HTTP), such as
    /// `http://127.0.0.1:4318/v1/traces`.
    pub otlp_endpoint: String,
    /// The spans' `service.name` (default `ignis`).
    pub service_name: String,
    /// The share of the traces this node starts that it records (0..=1,
    /// default 1). A trace whose incoming `traceparent` is sampled is
    /// recorded whatever this says; one marked not sampled never is.
    pub sample_ratio: f64,
}

/// A cron trigger (`[[triggers.cron]]`): a request to a function, or a
/// message to one actor, on a schedule (UTC).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CronTrigger {
    /// Its name (`name`, default `cron-N` with N its index): in logs and
    /// metrics.
    pub name: String,
    /// The cron pattern as written: 5 fields (minute hour day month
    /// weekday), or 6 with seconds first; checked with `croner`.
    pub schedule: String,
    /// Who gets the request.
    pub target: CronTarget,
    /// The request's method (default `POST`).
    pub method: http::Method,
    /// The request's path and query (default `/`).
    pub path: String,
}

/// What a cron trigger calls.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CronTarget {
    /// A function, through its admission gate.
    Function(String),
    /// The actor `(class, id)`.
    Actor {
        /// The class.
        class: String,
        /// The actor id.
        id: String,
    },
}

/// Most cron triggers in one manifest.
pub const MAX_CRON_TRIGGERS: usize = 1000;

/// The admin listener (`[admin]`): health, readiness and metrics, behind a
/// bearer token. Without a token it does not listen at all.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminConfig {
    /// Where it listens (default 127.0.0.1:9901: loopback only).
    pub listen: SocketAddr,
    /// The bearer token every request must carry (`token`, `token_file`,
    /// or the `IGNIS_ADMIN_TOKEN` environment variable applied by the CLI).
    pub token: Option<AdminToken>,
}

/// The admin token: at least [`AdminToken::MIN_LEN`] visible ASCII
/// characters. Its `Debug` never shows it.
#[derive(Clone, PartialEq, Eq)]
pub struct AdminToken(String);

impl AdminToken {
    /// Shortest token accepted: 16 characters.
    pub const MIN_LEN: usize = 16;
    /// Longest token accepted: 512 characters.
    pub const MAX_LEN: usize = 512;

    /// Checks `token` (surrounding whitespace, such as a token file's
    /// final newline, is dropped).
    pub fn new(token: &str) -> Result<AdminToken, String> {
        let token = token.trim();
        if token.len() < Self::MIN_LEN {
            return Err(format!(
                "an admin token needs at least {} characters (it has {})",
                Self::MIN_LEN,
                token.len()
            ));
        }
        if token.len() > Self::MAX_LEN {
            return Err(format!(
                "an admin token has at most {} characters",
                Self::MAX_LEN
            ));
        }
        if !token.bytes().all(|b| b.is_ascii_graphic()) {
            return Err("an admin token is visible ASCII without spaces".into());
        }
        Ok(AdminToken(token.to_string()))
    }

    /// The token's bytes (compare them in constant time).
    pub fn expose(&self) -> &[u8] {
        self.0.as_bytes()
    }
}

impl std::fmt::Debug for AdminToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AdminToken(..)")
    }
}

/// Where the admin listener is, unless `[admin] listen` says otherwise.
pub const DEFAULT_ADMIN_LISTEN: &str = "127.0.0.1:9901";

/// The HTTPS listener (`[tls]`): certificates chosen by SNI.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsConfig {
    /// Where HTTPS listens (default 127.0.0.1:8443).
    pub listen: SocketAddr,
    /// The certificate for clients whose SNI names no configured host (or
    /// that send none), if any (`cert`, `key`).
    pub default: Option<CertFiles>,
    /// Certificates by host name (`[[tls.certificates]]`).
    pub certificates: Vec<HostCert>,
    /// What a handshake naming no configured host gets.
    pub unknown_sni: UnknownSni,
    /// Whether `server.listen` answers every request with a redirect to
    /// HTTPS instead of serving it.
    pub redirect_http: bool,
    /// How often the PEM files are checked for changes (they are reloaded
    /// when one changed; a bad file keeps the old certificates).
    pub reload_interval: Duration,
    /// Longest a TLS handshake may take.
    pub handshake_timeout: Duration,
}

/// A certificate chain and its private key, as PEM files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertFiles {
    /// The chain (leaf first).
    pub cert: PathBuf,
    /// The private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
}

/// A certificate and the host names it serves (exact, or `*.example.com`
/// for any single label below `example.com`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostCert {
    /// Lowercase host names.
    pub hosts: Vec<String>,
    /// The files.
    pub files: CertFiles,
}

/// What a TLS handshake whose SNI names no configured host gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UnknownSni {
    /// The default certificate.
    Default,
    /// A handshake failure.
    Reject,
}

/// A PostgreSQL connection string (`postgres://USER:PASSWORD@HOST:PORT/DB`
/// or `host=... user=... dbname=...`). Its `Debug` never shows it: it may
/// hold a password.
#[derive(Clone, PartialEq, Eq)]
pub struct DatabaseUrl(String);

impl DatabaseUrl {
    /// Longest connection string accepted.
    pub const MAX_LEN: usize = 4096;

    /// Checks the form of `url` (the driver parses it fully when connecting).
    pub fn new(url: &str) -> Result<DatabaseUrl, String> {
        let url = url.trim();
        if url.is_empty() {
            return Err("is empty".into());
        }
        if url.len() > Self::MAX_LEN {
            return Err(format!("is longer than {} bytes", Self::MAX_LEN));
        }
        if url.chars().any(char::is_control) {
            return Err("contains control characters".into());
        }
        let is_url = url.starts_with("postgres://") || url.starts_with("postgresql://");
        if !is_url && !url.contains('=') {
            return Err(
                "must be a postgres:// URL or a key=value connection string (host=... dbname=...)"
                    .into(),
            );
        }
        Ok(DatabaseUrl(url.to_string()))
    }

    /// The connection string, password included: for the driver only.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for DatabaseUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("DatabaseUrl(..)")
    }
}

/// Longest key (key-value, or actor storage) with a PostgreSQL database:
/// its index entries hold at most 2,704 bytes, and the tenant, store,
/// class and id share them.
pub const DATABASE_MAX_KEY_BYTES: usize = 2048;

/// The store and the key-value limits (`[storage]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StorageConfig {
    /// The SQLite database file (default `.ignis/ignis.db` beside the
    /// manifest), unless `database` is set.
    pub path: PathBuf,
    /// A PostgreSQL database instead of the SQLite file (`database`, or the
    /// `IGNIS_DATABASE_URL` environment variable applied by the CLI).
    pub database: Option<DatabaseUrl>,
    /// Longest key, in bytes (default 1 KiB).
    pub max_key_bytes: usize,
    /// Largest value, in bytes (default 1 MiB).
    pub max_value_bytes: usize,
    /// Most keys in one batch call (default 1,000).
    pub max_batch_keys: usize,
    /// Most bytes one batch call (`get-many`, `set-many`) or actor-storage
    /// `list` may carry, keys and values together (default 16 MiB): what a
    /// guest can make the host hold for it in one call.
    pub max_batch_bytes: usize,
}

/// A named outbound origin (`[backends.NAME]`). A guest reaches it as
/// `http://NAME/...` (or by its own URL); the backend's settings apply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendConfig {
    /// The table key.
    pub name: String,
    /// `http` or `https`.
    pub scheme: String,
    /// Host name or address, lower-case, without brackets.
    pub host: String,
    /// Port (the scheme's default when the URL names none).
    pub port: u16,
    /// Time allowed from sending the request to receiving the response head.
    pub timeout: Duration,
    /// Verify the origin's TLS certificate (default true).
    pub tls_verify: bool,
    /// Idle keep-alive connections kept for reuse.
    pub pool_size: usize,
}

/// One `wasi:config` value of a function. Its `Debug` never shows a secret.
#[derive(Clone, PartialEq, Eq)]
pub struct ConfigValue {
    /// The value.
    pub value: String,
    /// Whether it came from the secrets file.
    pub secret: bool,
}

impl fmt::Debug for ConfigValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.secret {
            f.write_str("<secret>")
        } else {
            write!(f, "{:?}", self.value)
        }
    }
}

/// Scheduling settings of one tenant (`[tenants.NAME]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TenantConfig {
    /// Share of the guest CPU when tenants compete, relative to other
    /// tenants' weights (1..=1000, default 1).
    pub weight: u32,
    /// Outbound connections the tenant's functions may hold open at once,
    /// idle keep-alive ones included (default 256); past it a new
    /// connection fails at once with `connection-limit-reached`.
    pub max_outbound_connections: u32,
    /// DNS lookups the tenant's functions may have in flight at once
    /// (default 16); more wait, within the 10 s connect deadline.
    pub max_dns_lookups: u32,
}

impl Default for TenantConfig {
    fn default() -> Self {
        TenantConfig {
            weight: 1,
            max_outbound_connections: 256,
            max_dns_lookups: 16,
        }
    }
}

impl Manifest {
    /// The settings of `tenant` (defaults when it has no `[tenants]` entry).
    pub fn tenant(&self, tenant: &str) -> TenantConfig {
        self.tenants.get(tenant).cloned().unwrap_or_default()
    }
}

/// Listener and process-wide settings (`[server]`).
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Address to listen on.
    pub listen: SocketAddr,
    /// Directory for the compiled-component cache.
    pub cache_dir: PathBuf,
    /// Length of one epoch slice: CPU-bound guests yield to the scheduler at this interval.
    pub epoch_tick: Duration,
    /// How long in-flight requests may run after SIGINT/SIGTERM.
    pub shutdown_grace: Duration,
    /// Largest request head (request line + headers) accepted, in bytes.
    pub max_header_bytes: usize,
    /// Most header fields accepted in one request.
    pub max_headers: usize,
    /// Time allowed to receive a complete request head, counted from the
    /// moment the connection is ready for its next request: it is also how
    /// long an idle keep-alive connection stays open.
    pub header_read_timeout: Duration,
    /// Use the pooling instance allocator (falls back to on-demand if the reservation fails).
    pub pooling: bool,
    /// Threads of the fair guest scheduler, which runs guests that outlast
    /// their first slice (default: one per CPU).
    pub guest_threads: usize,
    /// File of secret values (`name = "value"`), read at load time.
    pub secrets_file: Option<PathBuf>,
    /// Live durable-actor activations on the node, all classes together
    /// (each holds an instance); past it the least recently used idle one
    /// is evicted, or the message is shed with 503.
    pub max_activations: u32,
    /// Instance slots reserved for functions, for the manifest's and for
    /// what deploys add later (`None`: the larger of the functions'
    /// `max_concurrency` sum and [`DEFAULT_FUNCTION_SLOTS`]). The pool
    /// holds twice this: a draining version and its successor run side by
    /// side.
    pub function_slots: Option<u32>,
    /// Open connections the node holds; at the cap, new clients wait in the
    /// listen backlog until one closes.
    pub max_connections: u32,
    /// Open connections one client address (IPv6: one /64) may hold; past
    /// it a new connection is closed at once.
    pub max_connections_per_ip: u32,
    /// A connection with no request in flight for this long is closed
    /// gracefully (HTTP/2 `GOAWAY`; HTTP/1.1 keep-alive connections are also
    /// closed by `header_read_timeout`).
    pub idle_timeout: Duration,
    /// A response whose data has been ready for the client this long without
    /// the client taking any (a zero HTTP/2 window, a socket nobody reads)
    /// has its connection closed.
    pub write_idle_timeout: Duration,
    /// Time allowed to receive the whole request body of an actor route
    /// (408 past it); function routes are bounded by the guest's wall time.
    pub body_read_timeout: Duration,
    /// HTTP/2 limits (`[server.http2]`), for h2c and HTTP/2 over TLS.
    pub http2: Http2Limits,
    /// Peers whose `X-Forwarded-For`, `X-Forwarded-Proto`,
    /// `X-Forwarded-Host` and `Forwarded` headers are believed (other
    /// peers' are replaced): the client address is the last untrusted hop.
    pub trusted_proxies: Vec<IpRange>,
    /// Whether each request is logged, once it has ended, as one line
    /// under the `ignis::access` target (default on).
    pub access_log: bool,
}

/// HTTP/2 limits (`[server.http2]`). The header list is bounded by
/// `server.max_header_bytes`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Http2Limits {
    /// Streams a client may have open at once (SETTINGS_MAX_CONCURRENT_STREAMS);
    /// more are refused (RST_STREAM REFUSED_STREAM).
    pub max_concurrent_streams: u32,
    /// Flow-control window per stream, in bytes.
    pub stream_window: u32,
    /// Flow-control window per connection, in bytes.
    pub connection_window: u32,
    /// Streams the client opened and reset before they were served, at most
    /// (the rapid-reset flood); past it: GOAWAY ENHANCE_YOUR_CALM.
    pub max_pending_resets: u32,
    /// Streams the server reset for the client's protocol errors, at most;
    /// past it: GOAWAY.
    pub max_error_resets: u32,
    /// A PING is sent after this long without a frame from the client ...
    pub keepalive_interval: Duration,
    /// ... and the connection closed if no PONG comes back within this.
    pub keepalive_timeout: Duration,
}

impl Default for Http2Limits {
    fn default() -> Self {
        Http2Limits {
            max_concurrent_streams: 100,
            stream_window: 1 << 20,
            connection_window: 2 << 20,
            max_pending_resets: 20,
            max_error_resets: 1024,
            keepalive_interval: Duration::from_secs(20),
            keepalive_timeout: Duration::from_secs(10),
        }
    }
}

/// Where a function's component comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ComponentSource {
    /// A prebuilt `.wasm` component.
    Wasm(PathBuf),
    /// A Rust crate directory built with `cargo build --target wasm32-wasip2 --release`.
    RustCrate(PathBuf),
    /// Any toolchain: a shell command that writes the component
    /// (`build = { command, output, workdir, watch }`).
    Command(BuildCommand),
}

/// A build command (`build = { command = "...", output = "app.wasm" }`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuildCommand {
    /// Run with `sh -c` in `workdir`.
    pub command: String,
    /// Where the command writes the component (resolved).
    pub output: PathBuf,
    /// Directory the command runs in (resolved; default: the manifest's).
    pub workdir: PathBuf,
    /// Files or directories (resolved against `workdir`) whose change makes
    /// `ignis up` run the command again; when every one of them is older
    /// than `output`, the build is skipped. Empty: always build.
    pub watch: Vec<PathBuf>,
}

/// Per-function resource limits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Largest linear memory (and table) growth allowed, in bytes.
    pub memory_bytes: u64,
    /// CPU time one request may use while the guest runs.
    pub cpu_time: Duration,
    /// Wall-clock time from dispatch to the end of the response.
    pub wall_time: Duration,
    /// Instances of this function alive at once.
    pub max_concurrency: u32,
    /// Largest request body accepted, in bytes.
    pub max_body_bytes: u64,
    /// Requests that may wait for an instance when all `max_concurrency`
    /// are busy; one more is shed at once with 503.
    pub mailbox: u32,
    /// Longest a request may wait in the mailbox before it is shed with 503.
    pub queue_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            memory_bytes: 64 << 20,
            cpu_time: Duration::from_secs(1),
            wall_time: Duration::from_secs(30),
            max_concurrency: 64,
            max_body_bytes: 10 << 20,
            mailbox: 256,
            queue_timeout: Duration::from_secs(1),
        }
    }
}

/// One function (`[functions.NAME]`).
#[derive(Debug, Clone)]
pub struct FunctionConfig {
    /// The function's name (the table key).
    pub name: String,
    /// The tenant that owns it (defaults to the function name).
    pub tenant: String,
    /// Where its component comes from.
    pub source: ComponentSource,
    /// Resource limits.
    pub limits: Limits,
    /// Environment variables visible to the guest (`wasi:cli/environment`).
    pub env: BTreeMap<String, String>,
    /// Hosts the guest may call over outbound HTTP (`host`, `host:port`, `*.domain`, `*`).
    pub allowed_outbound_hosts: Vec<String>,
    /// Named backends the guest may call (keys of [`Manifest::backends`]).
    pub backends: Vec<String>,
    /// Upstreams the guest may call by name (`http://NAME/...`): those its
    /// routes put it in front of.
    pub upstreams: Vec<String>,
    /// Outbound HTTP requests one guest request may send.
    pub max_outbound_requests: u32,
    /// Key-value stores the guest may open (names within its tenant).
    pub key_value_stores: Vec<String>,
    /// `wasi:config/store` values.
    pub config: BTreeMap<String, ConfigValue>,
    /// Whether an instance may serve more than one request (`reuse`).
    pub reuse: ReuseSetting,
}

/// A function's `reuse` key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ReuseSetting {
    /// Not set: WASI 0.3 (`wasi:http/service`) components reuse instances
    /// with [`Reuse::default`]; WASI 0.2 components get a fresh instance per
    /// request.
    #[default]
    ByWorld,
    /// `reuse = false`: a fresh instance for every request.
    Off,
    /// `reuse = true` or `reuse = { ... }`: instances are kept between
    /// requests, whatever the world (for WASI 0.2 components this is an
    /// opt-in to weaker isolation between requests of the function).
    On(Reuse),
}

/// How long a kept instance lives: it serves one request at a time, and is
/// retired after `max_requests` requests, at `max_age` after it was
/// created, or as soon as one of its requests fails (trap, limit,
/// cancellation).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reuse {
    /// Requests one instance serves before it is retired.
    pub max_requests: u32,
    /// Age (since instantiation) past which an instance serves no more.
    pub max_age: Duration,
    /// Idle instances the function keeps at most (each holds its memory).
    /// Kept instances and running requests together never pass
    /// `max_concurrency`: a fresh instance is only made when none is idle.
    pub max_idle: u32,
    /// Requests one instance serves at the same time (wasi:http 0.3 only;
    /// 1: one at a time).
    pub max_concurrent: u32,
}

impl ReuseSetting {
    /// What a function gets: `p3` says whether its component exports
    /// `wasi:http/service` 0.3; `None` is a fresh instance per request.
    pub fn resolve(self, p3: bool, max_concurrency: u32) -> Option<Reuse> {
        match self {
            ReuseSetting::Off => None,
            ReuseSetting::On(reuse) => Some(reuse),
            ReuseSetting::ByWorld if p3 => Some(Reuse::defaults(max_concurrency)),
            ReuseSetting::ByWorld => None,
        }
    }
}

/// Requests a reused instance serves at once unless `reuse.max_concurrent`
/// says otherwise (docs/BENCHMARKS.md, "Concurrent reuse": one at a time
/// keeps a request in its connection's task, the fastest path measured).
pub const DEFAULT_MAX_CONCURRENT: u32 = 1;

impl Reuse {
    /// The defaults for a function admitting `max_concurrency` requests:
    /// as many idle instances as requests may run (measured: capping them
    /// below the load's concurrency halves the gain, docs/BENCHMARKS.md).
    pub fn defaults(max_concurrency: u32) -> Reuse {
        Reuse {
            max_requests: 1000,
            max_age: Duration::from_secs(60),
            max_idle: max_concurrency,
            max_concurrent: DEFAULT_MAX_CONCURRENT,
        }
    }
}

impl FunctionConfig {
    /// A function of `tenant` with default limits and no bindings (for
    /// embedding and benchmarks; manifests go through [`Manifest::load`]).
    pub fn new(name: &str, tenant: &str, source: ComponentSource) -> Self {
        FunctionConfig {
            name: name.to_string(),
            tenant: tenant.to_string(),
            source,
            limits: Limits::default(),
            env: BTreeMap::new(),
            allowed_outbound_hosts: Vec::new(),
            backends: Vec::new(),
            upstreams: Vec::new(),
            max_outbound_requests: 100,
            key_value_stores: Vec::new(),
            config: BTreeMap::new(),
            reuse: ReuseSetting::ByWorld,
        }
    }
}

/// One route (`[[routes]]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteConfig {
    /// Host pattern: `None` matches any host; `example.com`; `*.example.com`.
    pub host: Option<String>,
    /// Path pattern: exact (`/hello`) or prefix (`/api/...`, `/...`); actor
    /// routes have one `{id}` segment (`/rooms/{id}/...`).
    pub path: String,
    /// What serves it.
    pub target: RouteTarget,
    /// For a function route: the upstream the function stands in front
    /// of. The function sees each request first; it reaches the upstream
    /// as `http://NAME/...` (balancing, health checks and retries apply).
    pub upstream: Option<String>,
}

/// The target of a route.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RouteTarget {
    /// A function, by name.
    Function(String),
    /// A durable actor class; the id comes from the path's `{id}` segment.
    Actor(String),
    /// An upstream (`[upstreams.NAME]`): the edge proxies the request to
    /// one of its origins.
    Upstream(String),
}

/// A group of origins the edge proxies to (`[upstreams.NAME]`).
#[derive(Debug, Clone)]
pub struct UpstreamConfig {
    /// The table key.
    pub name: String,
    /// The origins, in the order written.
    pub origins: Vec<OriginConfig>,
    /// How an origin is picked for a request.
    pub balance: Balance,
    /// Speak HTTP/2 to the origins: h2c by prior knowledge to `http://`
    /// origins, offered by ALPN to `https://` ones (which may still pick
    /// HTTP/1.1).
    pub http2: bool,
    /// Time allowed to connect (and finish the TLS handshake): past it the
    /// origin counts as unreachable (502, or another origin).
    pub connect_timeout: Duration,
    /// Time allowed from sending the request to the response head: past
    /// it, 504.
    pub response_timeout: Duration,
    /// Longest wait for the next piece of a body, either way: the client's
    /// request body (past it, 408 or a cut upload) and the origin's
    /// response body (past it, the response ends in an error).
    pub body_timeout: Duration,
    /// Idle keep-alive connections kept per origin.
    pub pool_size: usize,
    /// An idle pooled connection is closed after this long.
    pub pool_idle_timeout: Duration,
    /// What the origin sees as `Host`.
    pub host: HostRewrite,
    /// Verify `https://` origins' certificates (default true).
    pub tls_verify: bool,
    /// The name sent as SNI and verified, instead of the origin's host.
    pub tls_server_name: Option<String>,
    /// PEM file of the roots `https://` origins are verified against,
    /// instead of the web PKI.
    pub tls_ca: Option<PathBuf>,
    /// Largest request body forwarded (413 past it).
    pub max_body_bytes: u64,
    /// Active health checks (`[upstreams.NAME.health]`), if any.
    pub health: Option<HealthCheckConfig>,
    /// Consecutive failures (unreachable, reset, timed out) after which an
    /// origin is ejected (passive health) ...
    pub eject_after: u32,
    /// ... for this long; then it gets requests again.
    pub eject_for: Duration,
    /// Extra attempts on another origin for a request that may be retried
    /// (idempotent method, no body) whose origin failed before answering.
    pub retries: u32,
    /// Retries allowed per request, on average ([`UpstreamConfig::retries`]
    /// is per request; this bounds them across all requests).
    pub retry_budget: f64,
    /// WebSocket connections open through this upstream at once (503 past it).
    pub max_websockets: u32,
    /// A WebSocket connection with no bytes either way for this long is closed.
    pub websocket_idle_timeout: Duration,
}

/// One origin of an upstream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OriginConfig {
    /// `http` or `https`.
    pub scheme: String,
    /// Host name or address, lower-case, without brackets.
    pub host: String,
    /// Port (the scheme's default when the URL names none).
    pub port: u16,
}

impl OriginConfig {
    /// `scheme://host:port`, with brackets around an IPv6 address.
    pub fn url(&self) -> String {
        if self.host.contains(':') {
            format!("{}://[{}]:{}", self.scheme, self.host, self.port)
        } else {
            format!("{}://{}:{}", self.scheme, self.host, self.port)
        }
    }
}

/// How an upstream picks an origin.
#[derive(Debug, Clone, PartialEq)]
pub enum Balance {
    /// Each origin in turn.
    RoundRobin,
    /// The origin with the fewest requests in flight.
    LeastRequests,
    /// Consistent hashing on `key`: a key stays on one origin while that
    /// origin is usable and not loaded past `load_factor` times the
    /// average (bounded loads).
    Hash {
        /// What is hashed.
        key: HashKey,
        /// The bound on an origin's share of in-flight requests, relative
        /// to the average (greater than 1).
        load_factor: f64,
    },
}

/// What consistent hashing hashes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HashKey {
    /// A request header's value (lower-case name).
    Header(String),
    /// A cookie's value.
    Cookie(String),
    /// The request path (without the query).
    Path,
    /// The client's address (after `server.trusted_proxies`).
    ClientIp,
}

/// What the origin sees as `Host`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostRewrite {
    /// The client's `Host` (the default).
    Preserve,
    /// The origin's own host and port.
    Origin,
    /// This value.
    Fixed(String),
}

/// Active health checks of an upstream's origins (`[upstreams.NAME.health]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthCheckConfig {
    /// Path requested with GET; any 2xx or 3xx is healthy.
    pub path: String,
    /// Time between checks of one origin.
    pub interval: Duration,
    /// Time allowed for one check.
    pub timeout: Duration,
    /// Consecutive failed checks that mark an origin unhealthy.
    pub unhealthy_after: u32,
    /// Consecutive good checks that mark it healthy again.
    pub healthy_after: u32,
}

/// An address range (`10.0.0.0/8`, `::1/128`, or one address).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpRange {
    /// The network address.
    pub addr: std::net::IpAddr,
    /// The prefix length.
    pub prefix: u8,
}

impl IpRange {
    /// Whether `ip` is in the range (an IPv4-mapped IPv6 address counts as
    /// its IPv4 address).
    pub fn contains(&self, ip: std::net::IpAddr) -> bool {
        use std::net::IpAddr;
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

impl std::str::FromStr for IpRange {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: std::net::IpAddr = addr
            .parse()
            .map_err(|_| format!("`{addr}` is not an IP address"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) => match p.parse::<u8>() {
                Ok(p) if p <= max => p,
                _ => return Err(format!("`/{p}` is not a prefix length (0 to {max})")),
            },
        };
        Ok(IpRange { addr, prefix })
    }
}

/// A durable actor class (`[actors.NAME]`).
#[derive(Debug, Clone)]
pub struct ActorClassConfig {
    /// The class name (the table key).
    pub name: String,
    /// Where its component comes from.
    pub source: ComponentSource,
    /// Per-message limits: `memory` (per activation), `cpu_time`,
    /// `wall_time`, `max_body`, `mailbox` (messages waiting per actor) and
    /// `queue_timeout` (longest wait before 503); `max_concurrency` is 1.
    pub limits: Limits,
    /// An activation idle this long is evicted (its instance dropped).
    pub idle_timeout: Duration,
    /// Longest storage key, in bytes.
    pub max_key_bytes: usize,
    /// Largest storage value, in bytes.
    pub max_value_bytes: usize,
    /// Most keys written by one message.
    pub max_writes_per_message: usize,
    /// Environment variables visible to the guest.
    pub env: BTreeMap<String, String>,
    /// The tenant that owns the class (defaults to the class name).
    pub tenant: String,
    /// Who else may call it through `ignis:actor/client`: tenant, function
    /// or actor class names. Callers of the class's own tenant always may.
    pub callers: Vec<String>,
    /// Live activations of this class at once; past it the least recently
    /// used idle one is evicted, or the message is shed with 503.
    pub max_activations: u32,
}

impl ActorClassConfig {
    /// Whether a guest named `name` of `tenant` may send this class messages.
    pub fn admits(&self, tenant: &str, name: &str) -> bool {
        self.tenant == tenant || self.callers.iter().any(|c| c == tenant || c == name)
    }
}

// ---- raw, serde-facing shapes ----

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawManifest {
    #[serde(default)]
    server: RawServer,
    #[serde(default)]
    functions: BTreeMap<String, Spanned<RawFunction>>,
    #[serde(default)]
    routes: Vec<Spanned<RawRoute>>,
    #[serde(default)]
    tenants: BTreeMap<String, Spanned<RawTenant>>,
    #[serde(default)]
    storage: RawStorage,
    #[serde(default)]
    backends: BTreeMap<String, Spanned<RawBackend>>,
    #[serde(default)]
    actors: BTreeMap<String, Spanned<RawActor>>,
    tls: Option<Spanned<RawTls>>,
    #[serde(default)]
    upstreams: BTreeMap<String, Spanned<RawUpstream>>,
    admin: Option<Spanned<RawAdmin>>,
    #[serde(default)]
    triggers: RawTriggers,
    telemetry: Option<Spanned<RawTelemetry>>,
    cluster: Option<Spanned<RawCluster>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCluster {
    database: Option<Spanned<String>>,
    listen: Option<Spanned<String>>,
    advertise: Option<Spanned<String>>,
    lease: Option<HumanDuration>,
    forward_timeout: Option<HumanDuration>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTelemetry {
    otlp_endpoint: Option<Spanned<String>>,
    service_name: Option<Spanned<String>>,
    sample_ratio: Option<Spanned<f64>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawTriggers {
    #[serde(default)]
    cron: Vec<Spanned<RawCron>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCron {
    name: Option<Spanned<String>>,
    schedule: Spanned<String>,
    function: Option<String>,
    actor: Option<String>,
    id: Option<Spanned<String>>,
    method: Option<Spanned<String>>,
    path: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUpstream {
    origins: Vec<Spanned<String>>,
    balance: Option<Spanned<String>>,
    hash_key: Option<Spanned<String>>,
    hash_load_factor: Option<Spanned<f64>>,
    http2: Option<bool>,
    connect_timeout: Option<HumanDuration>,
    response_timeout: Option<HumanDuration>,
    body_timeout: Option<HumanDuration>,
    pool_size: Option<Spanned<u32>>,
    pool_idle_timeout: Option<HumanDuration>,
    host: Option<Spanned<String>>,
    tls_verify: Option<bool>,
    tls_server_name: Option<Spanned<String>>,
    tls_ca: Option<PathBuf>,
    max_body: Option<ByteSize>,
    health: Option<Spanned<RawHealth>>,
    eject_after: Option<Spanned<u32>>,
    eject_for: Option<HumanDuration>,
    retries: Option<Spanned<u32>>,
    retry_budget: Option<Spanned<f64>>,
    max_websockets: Option<Spanned<u32>>,
    websocket_idle_timeout: Option<HumanDuration>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHealth {
    path: Option<Spanned<String>>,
    interval: Option<HumanDuration>,
    timeout: Option<HumanDuration>,
    unhealthy_after: Option<Spanned<u32>>,
    healthy_after: Option<Spanned<u32>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTls {
    listen: Option<Spanned<String>>,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
    #[serde(default)]
    certificates: Vec<Spanned<RawHostCert>>,
    unknown_sni: Option<Spanned<String>>,
    redirect_http: Option<bool>,
    reload_interval: Option<HumanDuration>,
    handshake_timeout: Option<HumanDuration>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHostCert {
    hosts: Vec<Spanned<String>>,
    cert: PathBuf,
    key: PathBuf,
}

/// Limit keys functions and actor classes share.
struct SharedLimits {
    memory: Option<ByteSize>,
    cpu_time: Option<HumanDuration>,
    wall_time: Option<HumanDuration>,
    queue_timeout: Option<HumanDuration>,
    max_body: Option<ByteSize>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawActor {
    component: Option<PathBuf>,
    build: Option<Spanned<RawBuild>>,
    memory: Option<ByteSize>,
    cpu_time: Option<HumanDuration>,
    wall_time: Option<HumanDuration>,
    max_body: Option<ByteSize>,
    mailbox: Option<Spanned<u32>>,
    queue_timeout: Option<HumanDuration>,
    idle_timeout: Option<HumanDuration>,
    max_key_bytes: Option<ByteSize>,
    max_value_bytes: Option<ByteSize>,
    max_writes_per_message: Option<Spanned<u32>>,
    #[serde(default)]
    env: BTreeMap<String, String>,
    tenant: Option<Spanned<String>>,
    #[serde(default)]
    callers: Vec<Spanned<String>>,
    max_activations: Option<Spanned<u32>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawStorage {
    path: Option<PathBuf>,
    database: Option<Spanned<String>>,
    max_key_bytes: Option<ByteSize>,
    max_value_bytes: Option<ByteSize>,
    max_batch_keys: Option<Spanned<u32>>,
    max_batch_bytes: Option<ByteSize>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBackend {
    url: Spanned<String>,
    timeout: Option<HumanDuration>,
    tls_verify: Option<bool>,
    pool_size: Option<Spanned<u32>>,
}

#[derive(Deserialize)]
#[serde(
    untagged,
    expecting = "a string, { env = \"VAR\" } or { secret = \"NAME\" }"
)]
enum RawConfigValue {
    Literal(String),
    Env { env: String },
    Secret { secret: String },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTenant {
    weight: Option<Spanned<u32>>,
    max_outbound_connections: Option<Spanned<u32>>,
    max_dns_lookups: Option<Spanned<u32>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawServer {
    listen: Option<Spanned<String>>,
    cache_dir: Option<PathBuf>,
    epoch_tick: Option<HumanDuration>,
    shutdown_grace: Option<HumanDuration>,
    max_header_bytes: Option<ByteSize>,
    max_headers: Option<Spanned<u32>>,
    header_read_timeout: Option<HumanDuration>,
    pooling: Option<bool>,
    guest_threads: Option<Spanned<u32>>,
    secrets_file: Option<PathBuf>,
    max_activations: Option<Spanned<u32>>,
    function_slots: Option<Spanned<u32>>,
    max_connections: Option<Spanned<u32>>,
    max_connections_per_ip: Option<Spanned<u32>>,
    idle_timeout: Option<HumanDuration>,
    write_idle_timeout: Option<HumanDuration>,
    body_read_timeout: Option<HumanDuration>,
    http2: Option<RawHttp2>,
    #[serde(default)]
    trusted_proxies: Vec<Spanned<String>>,
    access_log: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAdmin {
    listen: Option<Spanned<String>>,
    token: Option<Spanned<String>>,
    token_file: Option<Spanned<PathBuf>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHttp2 {
    max_concurrent_streams: Option<Spanned<u32>>,
    stream_window: Option<ByteSize>,
    connection_window: Option<ByteSize>,
    max_pending_resets: Option<Spanned<u32>>,
    max_error_resets: Option<Spanned<u32>>,
    keepalive_interval: Option<HumanDuration>,
    keepalive_timeout: Option<HumanDuration>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFunction {
    component: Option<PathBuf>,
    build: Option<Spanned<RawBuild>>,
    tenant: Option<String>,
    memory: Option<ByteSize>,
    cpu_time: Option<HumanDuration>,
    wall_time: Option<HumanDuration>,
    max_concurrency: Option<Spanned<u32>>,
    max_body: Option<ByteSize>,
    mailbox: Option<Spanned<u32>>,
    queue_timeout: Option<HumanDuration>,
    #[serde(default)]
    env: BTreeMap<String, String>,
    #[serde(default)]
    allowed_outbound_hosts: Vec<Spanned<String>>,
    #[serde(default)]
    backends: Vec<Spanned<String>>,
    max_outbound_requests: Option<Spanned<u32>>,
    #[serde(default)]
    key_value_stores: Vec<Spanned<String>>,
    #[serde(default)]
    config: BTreeMap<String, Spanned<RawConfigValue>>,
    reuse: Option<Spanned<RawReuse>>,
}

/// `build = "crate-dir"` or `build = { command, output, workdir, watch }`.
enum RawBuild {
    Crate(PathBuf),
    Command(RawBuildCommand),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBuildCommand {
    command: String,
    output: PathBuf,
    workdir: Option<PathBuf>,
    #[serde(default)]
    watch: Vec<PathBuf>,
}

impl<'de> Deserialize<'de> for RawBuild {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visit;
        impl<'de> serde::de::Visitor<'de> for Visit {
            type Value = RawBuild;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(
                    "a Rust crate directory, or a table { command, output, workdir, watch }",
                )
            }
            fn visit_str<E>(self, dir: &str) -> Result<RawBuild, E> {
                Ok(RawBuild::Crate(PathBuf::from(dir)))
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, map: A) -> Result<RawBuild, A::Error> {
                RawBuildCommand::deserialize(serde::de::value::MapAccessDeserializer::new(map))
                    .map(RawBuild::Command)
            }
        }
        d.deserialize_any(Visit)
    }
}

/// `reuse = true | false | { max_requests, max_age, max_idle }`.
enum RawReuse {
    Flag(bool),
    Table(RawReuseTable),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawReuseTable {
    max_requests: Option<Spanned<u32>>,
    max_age: Option<HumanDuration>,
    max_idle: Option<Spanned<u32>>,
    max_concurrent: Option<Spanned<u32>>,
}

impl<'de> Deserialize<'de> for RawReuse {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visit;
        impl<'de> serde::de::Visitor<'de> for Visit {
            type Value = RawReuse;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(
                    "true, false or a table { max_requests, max_age, max_idle, max_concurrent }",
                )
            }
            fn visit_bool<E>(self, b: bool) -> Result<RawReuse, E> {
                Ok(RawReuse::Flag(b))
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, map: A) -> Result<RawReuse, A::Error> {
                RawReuseTable::deserialize(serde::de::value::MapAccessDeserializer::new(map))
                    .map(RawReuse::Table)
            }
        }
        d.deserialize_any(Visit)
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRoute {
    host: Option<Spanned<String>>,
    path: Spanned<String>,
    function: Option<Spanned<String>>,
    actor: Option<Spanned<String>>,
    upstream: Option<Spanned<String>>,
}

/// Default floor of `server.function_slots`: room for deploys to add
/// functions to a node started with few.
pub const DEFAULT_FUNCTION_SLOTS: u32 = 256;
/// Largest `server.function_slots` (the pool holds twice this).
pub const MAX_FUNCTION_SLOTS: u32 = 1500;

/// Default of `server.max_activations`: live actor activations on a node.
pub const DEFAULT_NODE_ACTIVATIONS: u32 = 2000;
/// Default of `actors.NAME.max_activations`: live activations of one class.
pub const DEFAULT_CLASS_ACTIVATIONS: u32 = 1000;

/// Default listen address when the manifest names none.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8080";
/// Where `[tls]` listens unless `tls.listen` says otherwise.
pub const DEFAULT_TLS_LISTEN: &str = "127.0.0.1:8443";

impl Manifest {
    /// Reads and validates the manifest at `path`.
    pub fn load(path: &Path) -> Result<Manifest, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_str_at(&text, path)
    }

    /// Parses and validates manifest `text` as if it were read from `path`.
    pub fn from_str_at(text: &str, path: &Path) -> Result<Manifest, ConfigError> {
        let de = toml::Deserializer::parse(text).map_err(|e| {
            ConfigError::at(
                path,
                text,
                e.span().map_or(0, |s| s.start),
                "<document>",
                e.message(),
            )
        })?;
        let raw: RawManifest = serde_path_to_error::deserialize(de).map_err(|e| {
            // `Spanned` fields show up as a private segment in the path; drop it.
            let key = e
                .path()
                .to_string()
                .split('.')
                .filter(|seg| !seg.starts_with("$__serde_spanned"))
                .collect::<Vec<_>>()
                .join(".");
            let inner = e.inner();
            let offset = inner.span().map_or(0, |s| s.start);
            let key = if key == "." {
                "<document>".to_string()
            } else {
                key
            };
            ConfigError::at(path, text, offset, key, inner.message())
        })?;
        Validator { path, text }.manifest(raw)
    }

    /// Directory the manifest lives in; relative paths resolve against it.
    pub fn base_dir(&self) -> &Path {
        self.path.parent().unwrap_or(Path::new("."))
    }
}

struct Validator<'a> {
    path: &'a Path,
    text: &'a str,
}

impl Validator<'_> {
    fn err(
        &self,
        offset: usize,
        key: impl Into<String>,
        message: impl Into<String>,
    ) -> ConfigError {
        ConfigError::at(self.path, self.text, offset, key, message)
    }

    fn resolve(&self, p: &Path) -> PathBuf {
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            self.path.parent().unwrap_or(Path::new(".")).join(p)
        }
    }

    fn manifest(&self, mut raw: RawManifest) -> Result<Manifest, ConfigError> {
        let slots_at = raw.server.function_slots.as_ref().map(|n| n.span().start);
        let server = self.server(raw.server)?;
        let secrets = match &server.secrets_file {
            Some(file) => load_secrets(file)?,
            None => BTreeMap::new(),
        };
        let mut backends = BTreeMap::new();
        for (name, b) in raw.backends {
            let span = b.span();
            let backend = self.backend(&name, span.start, b.into_inner())?;
            backends.insert(name, backend);
        }
        let refs = References {
            secrets: &secrets,
            secrets_file: server.secrets_file.as_deref(),
            backends: &backends,
        };
        let mut functions = BTreeMap::new();
        for (name, f) in raw.functions {
            let span = f.span();
            let func = self.function(&name, span.start, f.into_inner(), &refs)?;
            functions.insert(name, func);
        }
        // Names an actor class's `callers` may list.
        let mut known: std::collections::BTreeSet<String> = functions
            .values()
            .flat_map(|f| [f.name.clone(), f.tenant.clone()])
            .collect();
        for (name, a) in &raw.actors {
            known.insert(name.clone());
            known.insert(
                a.get_ref()
                    .tenant
                    .as_ref()
                    .map_or_else(|| name.clone(), |t| t.get_ref().clone()),
            );
        }
        let mut actors = BTreeMap::new();
        for (name, a) in raw.actors {
            let span = a.span();
            let actor = self.actor(&name, span.start, a.into_inner(), &known)?;
            actors.insert(name, actor);
        }
        let mut upstreams = BTreeMap::new();
        for (name, u) in raw.upstreams {
            let span = u.span();
            let upstream = self.upstream(&name, span.start, u.into_inner())?;
            upstreams.insert(name, upstream);
        }
        let mut routes = Vec::new();
        let mut route_spans = Vec::new();
        for (i, r) in raw.routes.into_iter().enumerate() {
            let span = r.span();
            route_spans.push(span.start);
            let targets = Targets {
                functions: &functions,
                actors: &actors,
                upstreams: &upstreams,
            };
            routes.push(self.route(i, span.start, r.into_inner(), &targets, &routes)?);
        }
        // A function route with an upstream binds the upstream to the
        // function (as a backend reached by the upstream's name).
        for (i, (route, at)) in routes.iter().zip(&route_spans).enumerate() {
            let (RouteTarget::Function(f), Some(u)) = (&route.target, &route.upstream) else {
                continue;
            };
            let function = functions.get_mut(f).expect("route checked its function");
            if function.backends.contains(u) {
                return Err(self.err(
                    *at,
                    format!("routes[{i}].upstream"),
                    format!("function `{f}` also lists a backend named `{u}`"),
                ));
            }
            if !function.upstreams.contains(u) {
                function.upstreams.push(u.clone());
            }
        }
        if let (Some(slots), Some(at)) = (server.function_slots, slots_at) {
            let wanted: u64 = functions
                .values()
                .map(|f| u64::from(f.limits.max_concurrency))
                .sum();
            if u64::from(slots) < wanted {
                return Err(self.err(
                    at,
                    "server.function_slots",
                    format!("{slots} is less than the functions' max_concurrency total ({wanted})"),
                ));
            }
        }
        let mut tenants = BTreeMap::new();
        for (name, t) in raw.tenants {
            let span = t.span();
            let t = t.into_inner();
            let mut tenant = TenantConfig::default();
            tenant.weight = self.count(
                t.weight,
                &format!("tenants.{name}.weight"),
                1..=1000,
                tenant.weight,
            )?;
            tenant.max_outbound_connections = self.count(
                t.max_outbound_connections,
                &format!("tenants.{name}.max_outbound_connections"),
                1..=100_000,
                tenant.max_outbound_connections,
            )?;
            tenant.max_dns_lookups = self.count(
                t.max_dns_lookups,
                &format!("tenants.{name}.max_dns_lookups"),
                1..=10_000,
                tenant.max_dns_lookups,
            )?;
            if !functions.values().any(|f| f.tenant == name)
                && !actors.values().any(|a| a.tenant == name)
            {
                return Err(self.err(
                    span.start,
                    format!("tenants.{name}"),
                    format!("no function or actor class belongs to tenant `{name}`"),
                ));
            }
            tenants.insert(name, tenant);
        }
        // `cluster.database` is the cluster's shared database: it is the
        // node's storage database, named in one place or the other.
        if let Some(db) = raw
            .cluster
            .as_mut()
            .and_then(|c| c.get_mut().database.take())
        {
            DatabaseUrl::new(db.get_ref())
                .map_err(|why| self.err(db.span().start, "cluster.database", why))?;
            if raw.storage.database.is_some() {
                return Err(self.err(
                    db.span().start,
                    "cluster.database",
                    "storage.database is set too: name the database once (the cluster's is the \
                     node's storage)",
                ));
            }
            raw.storage.database = Some(db);
        }
        let database_at = raw.storage.database.as_ref().map(|d| d.span().start);
        let storage = self.storage(raw.storage)?;
        if let Some(at) = database_at
            && let Some(a) = actors
                .values()
                .find(|a| a.max_key_bytes > DATABASE_MAX_KEY_BYTES)
        {
            return Err(self.err(
                at,
                "storage.database",
                format!(
                    "actors.{}.max_key_bytes is {} bytes; with a PostgreSQL database keys can be \
                     at most 2KiB",
                    a.name, a.max_key_bytes
                ),
            ));
        }
        let tls = raw.tls.map(|t| self.tls(t, server.listen)).transpose()?;
        let admin = self.admin(raw.admin, &server, tls.as_ref())?;
        let cron = self.cron(raw.triggers.cron, &functions, &actors)?;
        let telemetry = raw.telemetry.map(|t| self.telemetry(t)).transpose()?;
        let cluster = raw.cluster.map(|c| self.cluster(c)).transpose()?;
        Ok(Manifest {
            telemetry,
            cluster,
            text: self.text.into(),
            tls,
            admin,
            cron,
            upstreams,
            path: self.path.to_path_buf(),
            server,
            functions,
            routes,
            tenants,
            storage,
            backends,
            actors,
        })
    }

    fn source(
        &self,
        table: &str,
        offset: usize,
        component: Option<PathBuf>,
        build: Option<Spanned<RawBuild>>,
    ) -> Result<ComponentSource, ConfigError> {
        match (component, build) {
            (Some(c), None) => Ok(ComponentSource::Wasm(self.resolve(&c))),
            (None, Some(b)) => self.build(table, b),
            (Some(_), Some(_)) => {
                Err(self.err(offset, table, "set either `component` or `build`, not both"))
            }
            (None, None) => Err(self.err(
                offset,
                table,
                "missing `component` (a .wasm file) or `build` (a Rust crate directory, or { command, output })",
            )),
        }
    }

    fn build(&self, table: &str, raw: Spanned<RawBuild>) -> Result<ComponentSource, ConfigError> {
        let at = raw.span().start;
        let key = |k: &str| format!("{table}.build{k}");
        let b = match raw.into_inner() {
            RawBuild::Crate(dir) => return Ok(ComponentSource::RustCrate(self.resolve(&dir))),
            RawBuild::Command(b) => b,
        };
        if b.command.trim().is_empty() {
            return Err(self.err(at, key(".command"), "must not be empty"));
        }
        if b.output.as_os_str().is_empty() {
            return Err(self.err(
                at,
                key(".output"),
                "must name the .wasm file the command writes",
            ));
        }
        let workdir = match &b.workdir {
            Some(w) => self.resolve(w),
            None => self.resolve(Path::new(".")),
        };
        let within = |p: &Path| {
            if p.is_absolute() {
                p.to_path_buf()
            } else {
                workdir.join(p)
            }
        };
        Ok(ComponentSource::Command(BuildCommand {
            command: b.command,
            output: within(&b.output),
            watch: b.watch.iter().map(|w| within(w)).collect(),
            workdir,
        }))
    }

    fn cron(
        &self,
        raw: Vec<Spanned<RawCron>>,
        functions: &BTreeMap<String, FunctionConfig>,
        actors: &BTreeMap<String, ActorClassConfig>,
    ) -> Result<Vec<CronTrigger>, ConfigError> {
        if raw.len() > MAX_CRON_TRIGGERS {
            return Err(self.err(
                raw[MAX_CRON_TRIGGERS].span().start,
                "triggers.cron",
                format!("at most {MAX_CRON_TRIGGERS} cron triggers"),
            ));
        }
        let mut names = BTreeSet::new();
        let mut out = Vec::new();
        for (i, t) in raw.into_iter().enumerate() {
            let at = t.span().start;
            let t = t.into_inner();
            let key = |k: &str| format!("triggers.cron[{i}].{k}");
            let name = match &t.name {
                None => format!("cron-{i}"),
                Some(n) if valid_name(n.get_ref()) => n.get_ref().clone(),
                Some(n) => {
                    return Err(self.err(
                        n.span().start,
                        key("name"),
                        format!(
                            "`{}` is not a name (letters, digits, '-' and '_')",
                            n.get_ref()
                        ),
                    ));
                }
            };
            if !names.insert(name.clone()) {
                let at = t.name.as_ref().map_or(at, |n| n.span().start);
                return Err(self.err(at, key("name"), format!("`{name}` names two triggers")));
            }
            let schedule = t.schedule.get_ref().trim().to_string();
            if let Err(e) = <croner::Cron as std::str::FromStr>::from_str(&schedule) {
                return Err(self.err(
                    t.schedule.span().start,
                    key("schedule"),
                    format!(
                        "`{schedule}` is not a cron schedule ({e}); use 5 fields (minute hour day month weekday) or 6 with seconds first"
                    ),
                ));
            }
            let target = match (t.function, t.actor, t.id) {
                (Some(f), None, None) => {
                    if !functions.contains_key(&f) {
                        return Err(self.err(
                            at,
                            key("function"),
                            format!("no function named `{f}`"),
                        ));
                    }
                    CronTarget::Function(f)
                }
                (None, Some(class), Some(id)) => {
                    if !actors.contains_key(&class) {
                        return Err(self.err(
                            at,
                            key("actor"),
                            format!("no actor class named `{class}`"),
                        ));
                    }
                    let ok = !id.get_ref().is_empty()
                        && id.get_ref().len() <= 256
                        && id
                            .get_ref()
                            .bytes()
                            .all(|b| b.is_ascii_graphic() && b != b'/');
                    if !ok {
                        return Err(self.err(
                            id.span().start,
                            key("id"),
                            "an actor id is 1..256 visible ASCII characters without '/'",
                        ));
                    }
                    CronTarget::Actor {
                        class,
                        id: id.into_inner(),
                    }
                }
                (None, Some(_), None) => {
                    return Err(self.err(at, key("id"), "an actor trigger needs the actor's `id`"));
                }
                _ => {
                    return Err(self.err(
                        at,
                        format!("triggers.cron[{i}]"),
                        "set `function`, or `actor` and `id`",
                    ));
                }
            };
            let method = match &t.method {
                None => http::Method::POST,
                Some(m) => http::Method::from_bytes(m.get_ref().as_bytes())
                    .ok()
                    .filter(|m| m.as_str().bytes().all(|b| b.is_ascii_uppercase()))
                    .ok_or_else(|| {
                        self.err(
                            m.span().start,
                            key("method"),
                            format!("`{}` is not an HTTP method (GET, POST, ...)", m.get_ref()),
                        )
                    })?,
            };
            let path = match &t.path {
                None => "/".to_string(),
                Some(p) => {
                    let ok = p.get_ref().starts_with('/')
                        && p.get_ref().len() <= 2048
                        && p.get_ref().parse::<http::uri::PathAndQuery>().is_ok();
                    if !ok {
                        return Err(self.err(
                            p.span().start,
                            key("path"),
                            format!("`{}` is not a path starting with '/'", p.get_ref()),
                        ));
                    }
                    p.get_ref().clone()
                }
            };
            out.push(CronTrigger {
                name,
                schedule,
                target,
                method,
                path,
            });
        }
        Ok(out)
    }

    fn cluster(&self, raw: Spanned<RawCluster>) -> Result<ClusterConfig, ConfigError> {
        let raw = raw.into_inner();
        let defaults = ClusterConfig::with_defaults();
        let advertise = match raw.advertise {
            None => None,
            Some(a) => {
                check_advertise(a.get_ref())
                    .map_err(|why| self.err(a.span().start, "cluster.advertise", why))?;
                Some(a.into_inner())
            }
        };
        Ok(ClusterConfig {
            listen: self.address(raw.listen, "cluster.listen", DEFAULT_CLUSTER_LISTEN)?,
            advertise,
            lease: self.duration(
                raw.lease,
                "cluster.lease",
                Duration::from_secs(1)..=Duration::from_secs(60),
                defaults.lease,
            )?,
            forward_timeout: self.duration(
                raw.forward_timeout,
                "cluster.forward_timeout",
                Duration::from_secs(1)..=Duration::from_secs(300),
                defaults.forward_timeout,
            )?,
        })
    }

    fn telemetry(&self, raw: Spanned<RawTelemetry>) -> Result<TelemetryConfig, ConfigError> {
        let at = raw.span().start;
        let raw = raw.into_inner();
        let Some(endpoint) = raw.otlp_endpoint else {
            return Err(self.err(
                at,
                "telemetry.otlp_endpoint",
                "missing: the collector's OTLP/HTTP traces URL, like http://127.0.0.1:4318/v1/traces",
            ));
        };
        let uri = endpoint.get_ref().parse::<http::Uri>().ok();
        let usable = endpoint.get_ref().len() <= 2048
            && uri
                .as_ref()
                .is_some_and(|u| u.scheme_str() == Some("http") && u.authority().is_some());
        if !usable {
            return Err(self.err(
                endpoint.span().start,
                "telemetry.otlp_endpoint",
                "must be an http:// URL of at most 2048 characters (for TLS, run the collector's agent beside the node)",
            ));
        }
        let service_name = match raw.service_name {
            None => "ignis".to_string(),
            Some(name) => {
                let ok = !name.get_ref().is_empty()
                    && name.get_ref().len() <= 128
                    && name.get_ref().bytes().all(|b| b.is_ascii_graphic());
                if !ok {
                    return Err(self.err(
                        name.span().start,
                        "telemetry.service_name",
                        "1..128 visible ASCII characters",
                    ));
                }
                name.into_inner()
            }
        };
        let sample_ratio = match raw.sample_ratio {
            None => 1.0,
            Some(r) if (0.0..=1.0).contains(r.get_ref()) => *r.get_ref(),
            Some(r) => {
                return Err(self.err(
                    r.span().start,
                    "telemetry.sample_ratio",
                    "must be between 0 and 1",
                ));
            }
        };
        Ok(TelemetryConfig {
            otlp_endpoint: endpoint.into_inner(),
            service_name,
            sample_ratio,
        })
    }

    fn admin(
        &self,
        raw: Option<Spanned<RawAdmin>>,
        server: &ServerConfig,
        tls: Option<&TlsConfig>,
    ) -> Result<AdminConfig, ConfigError> {
        let Some(raw) = raw else {
            return Ok(AdminConfig {
                listen: DEFAULT_ADMIN_LISTEN.parse().expect("valid default"),
                token: None,
            });
        };
        let at = raw.span().start;
        let raw = raw.into_inner();
        let listen_at = raw.listen.as_ref().map_or(at, |s| s.span().start);
        let listen = self.address(raw.listen, "admin.listen", DEFAULT_ADMIN_LISTEN)?;
        let taken = listen == server.listen || tls.is_some_and(|t| t.listen == listen);
        if taken && listen.port() != 0 {
            return Err(self.err(
                listen_at,
                "admin.listen",
                "must differ from server.listen and tls.listen",
            ));
        }
        let token = match (raw.token, raw.token_file) {
            (Some(_), Some(file)) => {
                return Err(self.err(
                    file.span().start,
                    "admin.token_file",
                    "set `token` or `token_file`, not both",
                ));
            }
            (None, None) => None,
            (Some(token), None) => Some(
                AdminToken::new(token.get_ref())
                    .map_err(|why| self.err(token.span().start, "admin.token", why))?,
            ),
            (None, Some(file)) => {
                let path = self.resolve(file.get_ref());
                let text = std::fs::read_to_string(&path).map_err(|e| {
                    self.err(
                        file.span().start,
                        "admin.token_file",
                        format!("cannot read {}: {e}", path.display()),
                    )
                })?;
                Some(AdminToken::new(&text).map_err(|why| {
                    self.err(
                        file.span().start,
                        "admin.token_file",
                        format!("{}: {why}", path.display()),
                    )
                })?)
            }
        };
        Ok(AdminConfig { listen, token })
    }

    fn tls(&self, raw: Spanned<RawTls>, http: SocketAddr) -> Result<TlsConfig, ConfigError> {
        let at = raw.span().start;
        let raw = raw.into_inner();
        let listen_at = raw.listen.as_ref().map_or(at, |s| s.span().start);
        let listen = self.address(raw.listen, "tls.listen", DEFAULT_TLS_LISTEN)?;
        if listen == http && listen.port() != 0 {
            return Err(self.err(listen_at, "tls.listen", "must differ from server.listen"));
        }
        let default = match (raw.cert, raw.key) {
            (None, None) => None,
            (Some(cert), Some(key)) => Some(CertFiles {
                cert: self.resolve(&cert),
                key: self.resolve(&key),
            }),
            (Some(_), None) => return Err(self.err(at, "tls.key", "`cert` is set without `key`")),
            (None, Some(_)) => return Err(self.err(at, "tls.cert", "`key` is set without `cert`")),
        };
        let mut seen = BTreeSet::new();
        let mut certificates = Vec::new();
        for (i, entry) in raw.certificates.into_iter().enumerate() {
            let key = format!("tls.certificates[{i}].hosts");
            let entry_at = entry.span().start;
            let entry = entry.into_inner();
            if entry.hosts.is_empty() {
                return Err(self.err(entry_at, key, "list at least one host name"));
            }
            let mut hosts = Vec::new();
            for host in entry.hosts {
                let name = host.get_ref().to_ascii_lowercase();
                if !valid_tls_host(&name) {
                    return Err(self.err(
                        host.span().start,
                        key,
                        format!(
                            "`{}` is not a host name (`example.com`, or `*.example.com` for one label below it)",
                            host.get_ref()
                        ),
                    ));
                }
                if !seen.insert(name.clone()) {
                    return Err(self.err(
                        host.span().start,
                        key,
                        format!("`{name}` is listed twice"),
                    ));
                }
                hosts.push(name);
            }
            certificates.push(HostCert {
                hosts,
                files: CertFiles {
                    cert: self.resolve(&entry.cert),
                    key: self.resolve(&entry.key),
                },
            });
        }
        if default.is_none() && certificates.is_empty() {
            return Err(self.err(
                at,
                "tls",
                "no certificate: set `cert` and `key`, or add [[tls.certificates]]",
            ));
        }
        let unknown_sni = match raw.unknown_sni {
            None if default.is_some() => UnknownSni::Default,
            None => UnknownSni::Reject,
            Some(v) => match v.get_ref().as_str() {
                "reject" => UnknownSni::Reject,
                "default" if default.is_some() => UnknownSni::Default,
                "default" => {
                    return Err(self.err(
                        v.span().start,
                        "tls.unknown_sni",
                        "`default` needs a default certificate (`cert` and `key`)",
                    ));
                }
                other => {
                    return Err(self.err(
                        v.span().start,
                        "tls.unknown_sni",
                        format!("`{other}` is not `default` or `reject`"),
                    ));
                }
            },
        };
        Ok(TlsConfig {
            listen,
            default,
            certificates,
            unknown_sni,
            redirect_http: raw.redirect_http.unwrap_or(false),
            reload_interval: self.duration(
                raw.reload_interval,
                "tls.reload_interval",
                Duration::from_millis(100)..=Duration::from_secs(3600),
                Duration::from_secs(5),
            )?,
            handshake_timeout: self.duration(
                raw.handshake_timeout,
                "tls.handshake_timeout",
                Duration::from_millis(100)..=Duration::from_secs(60),
                Duration::from_secs(10),
            )?,
        })
    }

    /// A socket address, or `default` (itself an example of the form) when
    /// the key is absent.
    fn address(
        &self,
        value: Option<Spanned<String>>,
        key: &str,
        default: &str,
    ) -> Result<SocketAddr, ConfigError> {
        match value {
            None => Ok(default.parse().expect("valid default")),
            Some(s) => s.get_ref().parse().map_err(|e| {
                self.err(
                    s.span().start,
                    key,
                    format!("`{}` is not an address like {default}: {e}", s.get_ref()),
                )
            }),
        }
    }

    /// A whole number in `range`, or `default` when the key is absent.
    fn count(
        &self,
        value: Option<Spanned<u32>>,
        key: &str,
        range: std::ops::RangeInclusive<u32>,
        default: u32,
    ) -> Result<u32, ConfigError> {
        match value {
            None => Ok(default),
            Some(n) if range.contains(n.get_ref()) => Ok(*n.get_ref()),
            Some(n) => Err(self.err(
                n.span().start,
                key,
                format!("must be between {} and {}", range.start(), range.end()),
            )),
        }
    }

    /// A duration in `range`, or `default` when the key is absent.
    fn duration(
        &self,
        value: Option<HumanDuration>,
        key: &str,
        range: std::ops::RangeInclusive<Duration>,
        default: Duration,
    ) -> Result<Duration, ConfigError> {
        match value {
            None => Ok(default),
            Some(d) if range.contains(&d.duration) => Ok(d.duration),
            Some(d) => Err(self.err(
                d.span.start,
                key,
                format!("must be between {:?} and {:?}", range.start(), range.end()),
            )),
        }
    }

    /// The limits functions and actor classes share.
    fn shared_limits(
        &self,
        key: &dyn Fn(&str) -> String,
        limits: &mut Limits,
        raw: SharedLimits,
    ) -> Result<(), ConfigError> {
        if let Some(m) = raw.memory {
            if !(64 * 1024..=4 << 30).contains(&m.bytes) {
                return Err(self.err(
                    m.span.start,
                    key("memory"),
                    "must be between 64KiB and 4GiB",
                ));
            }
            limits.memory_bytes = m.bytes;
        }
        for (field, value, slot) in [
            ("cpu_time", raw.cpu_time, &mut limits.cpu_time),
            ("wall_time", raw.wall_time, &mut limits.wall_time),
            (
                "queue_timeout",
                raw.queue_timeout,
                &mut limits.queue_timeout,
            ),
        ] {
            if let Some(d) = value {
                if d.duration.is_zero() {
                    return Err(self.err(d.span.start, key(field), "must be greater than zero"));
                }
                *slot = d.duration;
            }
        }
        if let Some(b) = raw.max_body {
            limits.max_body_bytes = b.bytes;
        }
        Ok(())
    }

    fn actor(
        &self,
        name: &str,
        offset: usize,
        raw: RawActor,
        known: &std::collections::BTreeSet<String>,
    ) -> Result<ActorClassConfig, ConfigError> {
        let table = format!("actors.{name}");
        let key = |k: &str| format!("actors.{name}.{k}");
        if !valid_name(name) {
            return Err(self.err(
                offset,
                &table,
                "actor class names use letters, digits, '-' and '_'",
            ));
        }
        let source = self.source(&table, offset, raw.component, raw.build)?;
        let mut limits = Limits {
            max_concurrency: 1,
            queue_timeout: Duration::from_secs(5),
            ..Limits::default()
        };
        self.shared_limits(
            &key,
            &mut limits,
            SharedLimits {
                memory: raw.memory,
                cpu_time: raw.cpu_time,
                wall_time: raw.wall_time,
                queue_timeout: raw.queue_timeout,
                max_body: raw.max_body,
            },
        )?;
        limits.mailbox = self.count(raw.mailbox, &key("mailbox"), 1..=1_000_000, limits.mailbox)?;
        let idle_timeout = match raw.idle_timeout {
            None => Duration::from_secs(30),
            Some(d) if d.duration.is_zero() => {
                return Err(self.err(
                    d.span.start,
                    key("idle_timeout"),
                    "must be greater than zero",
                ));
            }
            Some(d) => d.duration,
        };
        let mut sizes = [
            (2048usize, "max_key_bytes"),
            (128 * 1024, "max_value_bytes"),
        ];
        for ((slot, field), value) in sizes
            .iter_mut()
            .zip([raw.max_key_bytes, raw.max_value_bytes])
        {
            if let Some(b) = value {
                if !(1..=16 << 20).contains(&b.bytes) {
                    return Err(self.err(b.span.start, key(field), "must be between 1B and 16MiB"));
                }
                *slot = b.bytes as usize;
            }
        }
        let max_writes_per_message = self.count(
            raw.max_writes_per_message,
            &key("max_writes_per_message"),
            1..=1_000_000,
            1000,
        )? as usize;
        let tenant = match raw.tenant {
            None => name.to_string(),
            Some(t) if valid_name(t.get_ref()) => t.into_inner(),
            Some(t) => {
                return Err(self.err(
                    t.span().start,
                    key("tenant"),
                    "tenant names use letters, digits, '-' and '_'",
                ));
            }
        };
        let mut callers = Vec::new();
        for c in raw.callers {
            if !valid_name(c.get_ref()) {
                return Err(self.err(
                    c.span().start,
                    key("callers"),
                    format!(
                        "`{}` is not a tenant, function or actor class name (letters, digits, '-' and '_')",
                        c.get_ref()
                    ),
                ));
            }
            if !known.contains(c.get_ref()) {
                return Err(self.err(
                    c.span().start,
                    key("callers"),
                    format!(
                        "`{}` names no tenant, function or actor class of this manifest",
                        c.get_ref()
                    ),
                ));
            }
            callers.push(c.into_inner());
        }
        let max_activations = self.count(
            raw.max_activations,
            &key("max_activations"),
            1..=100_000,
            DEFAULT_CLASS_ACTIVATIONS,
        )?;
        Ok(ActorClassConfig {
            name: name.to_string(),
            source,
            limits,
            idle_timeout,
            max_key_bytes: sizes[0].0,
            max_value_bytes: sizes[1].0,
            max_writes_per_message,
            env: raw.env,
            tenant,
            callers,
            max_activations,
        })
    }

    fn storage(&self, raw: RawStorage) -> Result<StorageConfig, ConfigError> {
        let mut storage = StorageConfig {
            path: raw.path.map_or_else(
                || self.resolve(Path::new(".ignis/ignis.db")),
                |p| self.resolve(&p),
            ),
            database: None,
            max_key_bytes: 1024,
            max_value_bytes: 1 << 20,
            max_batch_keys: 1000,
            max_batch_bytes: 16 << 20,
        };
        let database_at = raw.database.as_ref().map(|d| d.span().start);
        if let Some(url) = raw.database {
            storage.database = Some(
                DatabaseUrl::new(url.get_ref())
                    .map_err(|why| self.err(url.span().start, "storage.database", why))?,
            );
        }
        if let Some(b) = raw.max_key_bytes {
            if !(1..=64 * 1024).contains(&b.bytes) {
                return Err(self.err(
                    b.span.start,
                    "storage.max_key_bytes",
                    "must be between 1B and 64KiB",
                ));
            }
            storage.max_key_bytes = b.bytes as usize;
            if database_at.is_some() && storage.max_key_bytes > DATABASE_MAX_KEY_BYTES {
                return Err(self.err(
                    b.span.start,
                    "storage.max_key_bytes",
                    "can be at most 2KiB with a PostgreSQL database (`storage.database`)",
                ));
            }
        }
        if let Some(b) = raw.max_value_bytes {
            if !(1..=64 << 20).contains(&b.bytes) {
                return Err(self.err(
                    b.span.start,
                    "storage.max_value_bytes",
                    "must be between 1B and 64MiB",
                ));
            }
            storage.max_value_bytes = b.bytes as usize;
        }
        if let Some(b) = raw.max_batch_bytes {
            if !(1024..=1 << 30).contains(&b.bytes) {
                return Err(self.err(
                    b.span.start,
                    "storage.max_batch_bytes",
                    "must be between 1KiB and 1GiB",
                ));
            }
            storage.max_batch_bytes = b.bytes as usize;
        }
        storage.max_batch_keys = self.count(
            raw.max_batch_keys,
            "storage.max_batch_keys",
            1..=100_000,
            1000,
        )? as usize;
        Ok(storage)
    }

    fn backend(
        &self,
        name: &str,
        offset: usize,
        raw: RawBackend,
    ) -> Result<BackendConfig, ConfigError> {
        let key = |k: &str| format!("backends.{name}.{k}");
        if !valid_name(name) {
            return Err(self.err(
                offset,
                format!("backends.{name}"),
                "backend names use letters, digits, '-' and '_'",
            ));
        }
        let (scheme, host, port) = self.origin_url(&raw.url, &key("url"))?;
        let timeout = match raw.timeout {
            None => Duration::from_secs(30),
            Some(d) if d.duration.is_zero() => {
                return Err(self.err(d.span.start, key("timeout"), "must be greater than zero"));
            }
            Some(d) => d.duration,
        };
        let pool_size = self.count(raw.pool_size, &key("pool_size"), 1..=10_000, 32)? as usize;
        Ok(BackendConfig {
            name: name.to_string(),
            scheme,
            host,
            port,
            timeout,
            tls_verify: raw.tls_verify.unwrap_or(true),
            pool_size,
        })
    }

    /// `http[s]://host[:port]` (nothing else): scheme, lower-case host
    /// without brackets, port.
    fn origin_url(
        &self,
        raw: &Spanned<String>,
        key: &str,
    ) -> Result<(String, String, u16), ConfigError> {
        let url = raw.get_ref().trim();
        let bad_url = |why: &str| {
            self.err(
                raw.span().start,
                key,
                format!("`{url}` is not an origin URL like https://origin.example[:port]: {why}"),
            )
        };
        let (scheme, rest) = url
            .split_once("://")
            .ok_or_else(|| bad_url("missing scheme"))?;
        let scheme = scheme.to_ascii_lowercase();
        let default_port = match scheme.as_str() {
            "http" => 80,
            "https" => 443,
            _ => return Err(bad_url("the scheme must be http or https")),
        };
        let authority = rest.strip_suffix('/').unwrap_or(rest);
        if authority.is_empty() || authority.contains(['/', '?', '#', '@']) {
            return Err(bad_url("only scheme, host and port are allowed"));
        }
        let (host, port) = match authority.rsplit_once(':') {
            Some((h, p)) if !h.contains(':') || h.ends_with(']') => {
                let port = p.parse::<u16>().map_err(|_| bad_url("bad port"))?;
                (h, port)
            }
            _ => (authority, default_port),
        };
        let host = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_ascii_lowercase();
        if host.is_empty() || host.contains(|c: char| c.is_whitespace() || c.is_control()) {
            return Err(bad_url("missing or malformed host"));
        }
        if port == 0 {
            return Err(bad_url("port 0"));
        }
        Ok((scheme, host, port))
    }

    fn upstream(
        &self,
        name: &str,
        offset: usize,
        raw: RawUpstream,
    ) -> Result<UpstreamConfig, ConfigError> {
        let key = |k: &str| format!("upstreams.{name}.{k}");
        if !valid_name(name) {
            return Err(self.err(
                offset,
                format!("upstreams.{name}"),
                "upstream names use letters, digits, '-' and '_'",
            ));
        }
        if raw.origins.is_empty() {
            return Err(self.err(offset, key("origins"), "list at least one origin URL"));
        }
        if raw.origins.len() > 1000 {
            return Err(self.err(offset, key("origins"), "at most 1000 origins"));
        }
        let mut origins: Vec<OriginConfig> = Vec::new();
        for o in &raw.origins {
            let (scheme, host, port) = self.origin_url(o, &key("origins"))?;
            let origin = OriginConfig { scheme, host, port };
            if origins.contains(&origin) {
                return Err(self.err(
                    o.span().start,
                    key("origins"),
                    format!("`{}` is listed twice", origin.url()),
                ));
            }
            origins.push(origin);
        }
        let hash_key = match &raw.hash_key {
            None => None,
            Some(k) => {
                let v = k.get_ref().trim();
                let parsed = match v.split_once(':') {
                    Some(("header", h)) if valid_header_name(h) => {
                        Some(HashKey::Header(h.to_ascii_lowercase()))
                    }
                    Some(("cookie", c)) if valid_name(c) => Some(HashKey::Cookie(c.to_string())),
                    None if v == "path" => Some(HashKey::Path),
                    None if v == "client-ip" => Some(HashKey::ClientIp),
                    _ => None,
                };
                Some(parsed.ok_or_else(|| {
                    self.err(
                        k.span().start,
                        key("hash_key"),
                        format!(
                            "`{v}` is not a hash key: `header:NAME`, `cookie:NAME`, `path` or `client-ip`"
                        ),
                    )
                })?)
            }
        };
        let balance = match raw
            .balance
            .as_ref()
            .map(|b| (b.get_ref().as_str(), b.span().start))
        {
            None | Some(("round-robin", _)) => Balance::RoundRobin,
            Some(("least-requests", _)) => Balance::LeastRequests,
            Some(("hash", at)) => {
                let Some(key_) = hash_key.clone() else {
                    return Err(self.err(
                        at,
                        key("hash_key"),
                        "`balance = \"hash\"` needs `hash_key`",
                    ));
                };
                let load_factor = match &raw.hash_load_factor {
                    None => 1.25,
                    Some(f) if (1.01..=100.0).contains(f.get_ref()) => *f.get_ref(),
                    Some(f) => {
                        return Err(self.err(
                            f.span().start,
                            key("hash_load_factor"),
                            "must be between 1.01 and 100",
                        ));
                    }
                };
                Balance::Hash {
                    key: key_,
                    load_factor,
                }
            }
            Some((other, at)) => {
                return Err(self.err(
                    at,
                    key("balance"),
                    format!("`{other}` is not a policy: `round-robin`, `least-requests` or `hash`"),
                ));
            }
        };
        if !matches!(balance, Balance::Hash { .. })
            && let Some(k) = raw
                .hash_key
                .as_ref()
                .map(|k| k.span().start)
                .or(raw.hash_load_factor.as_ref().map(|f| f.span().start))
        {
            return Err(self.err(k, key("balance"), "hash settings need `balance = \"hash\"`"));
        }
        let host = match &raw.host {
            None => HostRewrite::Preserve,
            Some(h) => match h.get_ref().as_str() {
                "preserve" => HostRewrite::Preserve,
                "origin" => HostRewrite::Origin,
                v if !v.is_empty()
                    && v.len() <= 255
                    && v.chars().all(|c| {
                        c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | ':' | '[' | ']')
                    }) =>
                {
                    HostRewrite::Fixed(v.to_ascii_lowercase())
                }
                v => {
                    return Err(self.err(
                        h.span().start,
                        key("host"),
                        format!("`{v}` is not `preserve`, `origin` or a host[:port]"),
                    ));
                }
            },
        };
        let tls_server_name = match &raw.tls_server_name {
            None => None,
            Some(n)
                if valid_tls_host(&n.get_ref().to_ascii_lowercase())
                    && !n.get_ref().starts_with('*') =>
            {
                Some(n.get_ref().to_ascii_lowercase())
            }
            Some(n) => {
                return Err(self.err(
                    n.span().start,
                    key("tls_server_name"),
                    format!("`{}` is not a host name", n.get_ref()),
                ));
            }
        };
        let health = match raw.health {
            None => None,
            Some(h) => {
                let at = h.span().start;
                let h = h.into_inner();
                let hkey = |k: &str| format!("upstreams.{name}.health.{k}");
                let path = match h.path {
                    None => "/".to_string(),
                    Some(p)
                        if p.get_ref().starts_with('/')
                            && p.get_ref().len() <= 1024
                            && p.get_ref()
                                .bytes()
                                .all(|b| b.is_ascii_graphic() && b != b'#') =>
                    {
                        p.into_inner()
                    }
                    Some(p) => {
                        return Err(self.err(
                            p.span().start,
                            hkey("path"),
                            "must be a path like /healthz",
                        ));
                    }
                };
                let interval = self.duration(
                    h.interval,
                    &hkey("interval"),
                    Duration::from_millis(100)..=Duration::from_secs(3600),
                    Duration::from_secs(5),
                )?;
                let timeout = self.duration(
                    h.timeout,
                    &hkey("timeout"),
                    Duration::from_millis(10)..=Duration::from_secs(60),
                    Duration::from_secs(2),
                )?;
                if timeout > interval {
                    return Err(self.err(at, hkey("timeout"), "must not exceed `interval`"));
                }
                Some(HealthCheckConfig {
                    path,
                    interval,
                    timeout,
                    unhealthy_after: self.count(
                        h.unhealthy_after,
                        &hkey("unhealthy_after"),
                        1..=100,
                        3,
                    )?,
                    healthy_after: self.count(
                        h.healthy_after,
                        &hkey("healthy_after"),
                        1..=100,
                        2,
                    )?,
                })
            }
        };
        let max_body_bytes = match raw.max_body {
            None => 100 << 20,
            Some(b) if b.bytes == 0 => {
                return Err(self.err(b.span.start, key("max_body"), "must be greater than zero"));
            }
            Some(b) => b.bytes,
        };
        let retry_budget = match &raw.retry_budget {
            None => 0.2,
            Some(f) if (0.0..=1.0).contains(f.get_ref()) => *f.get_ref(),
            Some(f) => {
                return Err(self.err(
                    f.span().start,
                    key("retry_budget"),
                    "must be between 0 and 1",
                ));
            }
        };
        Ok(UpstreamConfig {
            name: name.to_string(),
            origins,
            balance,
            http2: raw.http2.unwrap_or(false),
            connect_timeout: self.duration(
                raw.connect_timeout,
                &key("connect_timeout"),
                Duration::from_millis(10)..=Duration::from_secs(60),
                Duration::from_secs(2),
            )?,
            response_timeout: self.duration(
                raw.response_timeout,
                &key("response_timeout"),
                Duration::from_millis(10)..=Duration::from_secs(3600),
                Duration::from_secs(30),
            )?,
            body_timeout: self.duration(
                raw.body_timeout,
                &key("body_timeout"),
                Duration::from_millis(10)..=Duration::from_secs(3600),
                Duration::from_secs(60),
            )?,
            pool_size: self.count(raw.pool_size, &key("pool_size"), 0..=10_000, 64)? as usize,
            pool_idle_timeout: self.duration(
                raw.pool_idle_timeout,
                &key("pool_idle_timeout"),
                Duration::from_secs(1)..=Duration::from_secs(3600),
                Duration::from_secs(60),
            )?,
            host,
            tls_verify: raw.tls_verify.unwrap_or(true),
            tls_server_name,
            tls_ca: raw.tls_ca.map(|p| self.resolve(&p)),
            max_body_bytes,
            health,
            eject_after: self.count(raw.eject_after, &key("eject_after"), 1..=1000, 5)?,
            eject_for: self.duration(
                raw.eject_for,
                &key("eject_for"),
                Duration::from_millis(100)..=Duration::from_secs(3600),
                Duration::from_secs(10),
            )?,
            retries: self.count(raw.retries, &key("retries"), 0..=10, 1)?,
            retry_budget,
            max_websockets: self.count(
                raw.max_websockets,
                &key("max_websockets"),
                0..=1_000_000,
                10_000,
            )?,
            websocket_idle_timeout: self.duration(
                raw.websocket_idle_timeout,
                &key("websocket_idle_timeout"),
                Duration::from_secs(1)..=Duration::from_secs(24 * 3600),
                Duration::from_secs(300),
            )?,
        })
    }

    fn server(&self, raw: RawServer) -> Result<ServerConfig, ConfigError> {
        let listen = self.address(raw.listen, "server.listen", DEFAULT_LISTEN)?;
        if let Some(d) = &raw.epoch_tick
            && (d.duration < Duration::from_micros(100) || d.duration > Duration::from_millis(100))
        {
            return Err(self.err(
                d.span.start,
                "server.epoch_tick",
                "must be between 100us and 100ms",
            ));
        }
        let epoch_tick = raw
            .epoch_tick
            .map_or(Duration::from_millis(1), |d| d.duration);
        let max_header_bytes = match raw.max_header_bytes {
            None => 16 * 1024,
            Some(b) if !(8192..=1 << 20).contains(&b.bytes) => {
                return Err(self.err(
                    b.span.start,
                    "server.max_header_bytes",
                    "must be between 8KiB and 1MiB",
                ));
            }
            Some(b) => b.bytes as usize,
        };
        let max_headers =
            self.count(raw.max_headers, "server.max_headers", 1..=1000, 100)? as usize;
        let cpus = std::thread::available_parallelism().map_or(2, |n| n.get());
        let guest_threads = self.count(
            raw.guest_threads,
            "server.guest_threads",
            1..=256,
            cpus as u32,
        )? as usize;
        let mut trusted_proxies = Vec::new();
        for r in &raw.trusted_proxies {
            let range = r.get_ref().trim().parse::<IpRange>().map_err(|why| {
                self.err(
                    r.span().start,
                    "server.trusted_proxies",
                    format!("{why} (want an address or a range like 10.0.0.0/8)"),
                )
            })?;
            trusted_proxies.push(range);
        }
        if trusted_proxies.len() > 1000 {
            return Err(self.err(0, "server.trusted_proxies", "at most 1000 ranges"));
        }
        Ok(ServerConfig {
            trusted_proxies,
            access_log: raw.access_log.unwrap_or(true),
            listen,
            cache_dir: raw.cache_dir.map_or_else(
                || self.resolve(Path::new(".ignis/cache")),
                |p| self.resolve(&p),
            ),
            epoch_tick,
            shutdown_grace: raw
                .shutdown_grace
                .map_or(Duration::from_secs(10), |d| d.duration),
            max_header_bytes,
            max_headers,
            header_read_timeout: self.duration(
                raw.header_read_timeout,
                "server.header_read_timeout",
                Duration::from_millis(100)..=Duration::from_secs(3600),
                Duration::from_secs(10),
            )?,
            pooling: raw.pooling.unwrap_or(true),
            function_slots: raw
                .function_slots
                .map(|n| self.count(Some(n), "server.function_slots", 1..=MAX_FUNCTION_SLOTS, 1))
                .transpose()?,
            guest_threads,
            secrets_file: raw.secrets_file.map(|p| self.resolve(&p)),
            max_activations: self.count(
                raw.max_activations,
                "server.max_activations",
                1..=100_000,
                DEFAULT_NODE_ACTIVATIONS,
            )?,
            max_connections: self.count(
                raw.max_connections,
                "server.max_connections",
                1..=1_000_000,
                10_000,
            )?,
            max_connections_per_ip: self.count(
                raw.max_connections_per_ip,
                "server.max_connections_per_ip",
                1..=1_000_000,
                1_000,
            )?,
            idle_timeout: self.duration(
                raw.idle_timeout,
                "server.idle_timeout",
                Duration::from_secs(1)..=Duration::from_secs(24 * 3600),
                Duration::from_secs(120),
            )?,
            write_idle_timeout: self.duration(
                raw.write_idle_timeout,
                "server.write_idle_timeout",
                Duration::from_secs(1)..=Duration::from_secs(3600),
                Duration::from_secs(30),
            )?,
            body_read_timeout: self.duration(
                raw.body_read_timeout,
                "server.body_read_timeout",
                Duration::from_millis(100)..=Duration::from_secs(3600),
                Duration::from_secs(30),
            )?,
            http2: match raw.http2 {
                None => Http2Limits::default(),
                Some(h) => self.http2(h)?,
            },
        })
    }

    fn http2(&self, raw: RawHttp2) -> Result<Http2Limits, ConfigError> {
        let d = Http2Limits::default();
        let window = |value: Option<ByteSize>, key: &str, max: u64, default: u32| match value {
            None => Ok(default),
            Some(b) if (65_535..=max).contains(&b.bytes) => Ok(b.bytes as u32),
            Some(b) => Err(self.err(
                b.span.start,
                key,
                format!("must be between 65535B and {}MiB", max >> 20),
            )),
        };
        Ok(Http2Limits {
            max_concurrent_streams: self.count(
                raw.max_concurrent_streams,
                "server.http2.max_concurrent_streams",
                1..=10_000,
                d.max_concurrent_streams,
            )?,
            stream_window: window(
                raw.stream_window,
                "server.http2.stream_window",
                16 << 20,
                d.stream_window,
            )?,
            connection_window: window(
                raw.connection_window,
                "server.http2.connection_window",
                64 << 20,
                d.connection_window,
            )?,
            max_pending_resets: self.count(
                raw.max_pending_resets,
                "server.http2.max_pending_resets",
                1..=10_000,
                d.max_pending_resets,
            )?,
            max_error_resets: self.count(
                raw.max_error_resets,
                "server.http2.max_error_resets",
                1..=100_000,
                d.max_error_resets,
            )?,
            keepalive_interval: self.duration(
                raw.keepalive_interval,
                "server.http2.keepalive_interval",
                Duration::from_secs(1)..=Duration::from_secs(3600),
                d.keepalive_interval,
            )?,
            keepalive_timeout: self.duration(
                raw.keepalive_timeout,
                "server.http2.keepalive_timeout",
                Duration::from_secs(1)..=Duration::from_secs(3600),
                d.keepalive_timeout,
            )?,
        })
    }

    fn function(
        &self,
        name: &str,
        offset: usize,
        raw: RawFunction,
        refs: &References<'_>,
    ) -> Result<FunctionConfig, ConfigError> {
        let key = |k: &str| format!("functions.{name}.{k}");
        if !valid_name(name) {
            return Err(self.err(
                offset,
                format!("functions.{name}"),
                "function names use letters, digits, '-' and '_'",
            ));
        }
        let source = self.source(
            &format!("functions.{name}"),
            offset,
            raw.component,
            raw.build,
        )?;
        let mut limits = Limits::default();
        self.shared_limits(
            &key,
            &mut limits,
            SharedLimits {
                memory: raw.memory,
                cpu_time: raw.cpu_time,
                wall_time: raw.wall_time,
                queue_timeout: raw.queue_timeout,
                max_body: raw.max_body,
            },
        )?;
        limits.max_concurrency = self.count(
            raw.max_concurrency,
            &key("max_concurrency"),
            1..=10_000,
            limits.max_concurrency,
        )?;
        limits.mailbox = self.count(raw.mailbox, &key("mailbox"), 0..=1_000_000, limits.mailbox)?;
        let mut allowed = Vec::new();
        for h in raw.allowed_outbound_hosts {
            let v = h.get_ref().trim().to_ascii_lowercase();
            if v.is_empty() || v.contains('/') || v.contains("://") {
                return Err(self.err(
                    h.span().start,
                    key("allowed_outbound_hosts"),
                    format!(
                        "`{}` is not a host pattern (host, host:port, *.domain or *)",
                        h.get_ref()
                    ),
                ));
            }
            allowed.push(v);
        }
        let mut backends = Vec::new();
        for b in raw.backends {
            if !refs.backends.contains_key(b.get_ref()) {
                return Err(self.err(
                    b.span().start,
                    key("backends"),
                    format!("no backend named `{}` is declared", b.get_ref()),
                ));
            }
            backends.push(b.into_inner());
        }
        let max_outbound_requests = self.count(
            raw.max_outbound_requests,
            &key("max_outbound_requests"),
            0..=10_000,
            100,
        )?;
        let mut stores: Vec<String> = Vec::new();
        for st in raw.key_value_stores {
            let v = st.get_ref();
            if v.is_empty()
                || v.len() > 128
                || !v
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':'))
            {
                return Err(self.err(
                    st.span().start,
                    key("key_value_stores"),
                    format!("`{v}` is not a store name (letters, digits, '-', '_', '.', ':'; at most 128)"),
                ));
            }
            if stores.contains(v) {
                return Err(self.err(
                    st.span().start,
                    key("key_value_stores"),
                    format!("store `{v}` is listed twice"),
                ));
            }
            stores.push(st.into_inner());
        }
        let mut config = BTreeMap::new();
        for (k, v) in raw.config {
            let at = v.span().start;
            let ckey = format!("functions.{name}.config.{k}");
            let value = match v.into_inner() {
                RawConfigValue::Literal(value) => ConfigValue {
                    value,
                    secret: false,
                },
                RawConfigValue::Env { env } => ConfigValue {
                    value: std::env::var(&env).map_err(|_| {
                        self.err(
                            at,
                            ckey.clone(),
                            format!("environment variable `{env}` is not set (or not UTF-8)"),
                        )
                    })?,
                    secret: false,
                },
                RawConfigValue::Secret { secret } => {
                    let Some(file) = refs.secrets_file else {
                        return Err(self.err(at, ckey, "a secret needs `server.secrets_file`"));
                    };
                    let value = refs.secrets.get(&secret).ok_or_else(|| {
                        self.err(
                            at,
                            ckey.clone(),
                            format!("secret `{secret}` is not in {}", file.display()),
                        )
                    })?;
                    ConfigValue {
                        value: value.clone(),
                        secret: true,
                    }
                }
            };
            config.insert(k, value);
        }
        let reuse = self.reuse(raw.reuse, &key, limits.max_concurrency)?;
        Ok(FunctionConfig {
            name: name.to_string(),
            tenant: raw.tenant.unwrap_or_else(|| name.to_string()),
            source,
            limits,
            env: raw.env,
            allowed_outbound_hosts: allowed,
            backends,
            upstreams: Vec::new(),
            max_outbound_requests,
            key_value_stores: stores,
            config,
            reuse,
        })
    }

    fn reuse(
        &self,
        raw: Option<Spanned<RawReuse>>,
        key: &dyn Fn(&str) -> String,
        max_concurrency: u32,
    ) -> Result<ReuseSetting, ConfigError> {
        let Some(raw) = raw else {
            return Ok(ReuseSetting::ByWorld);
        };
        let table = match raw.into_inner() {
            RawReuse::Flag(false) => return Ok(ReuseSetting::Off),
            RawReuse::Flag(true) => RawReuseTable {
                max_requests: None,
                max_age: None,
                max_idle: None,
                max_concurrent: None,
            },
            RawReuse::Table(t) => t,
        };
        let defaults = Reuse::defaults(max_concurrency);
        let max_idle = match table.max_idle {
            Some(n) if *n.get_ref() > max_concurrency => {
                return Err(self.err(
                    n.span().start,
                    key("reuse.max_idle"),
                    format!("must be at most max_concurrency ({max_concurrency})"),
                ));
            }
            other => self.count(other, &key("reuse.max_idle"), 1..=10_000, defaults.max_idle)?,
        };
        Ok(ReuseSetting::On(Reuse {
            max_requests: self.count(
                table.max_requests,
                &key("reuse.max_requests"),
                1..=1_000_000,
                defaults.max_requests,
            )?,
            max_age: self.duration(
                table.max_age,
                &key("reuse.max_age"),
                Duration::from_secs(1)..=Duration::from_secs(86_400),
                defaults.max_age,
            )?,
            max_idle,
            max_concurrent: self.count(
                table.max_concurrent,
                &key("reuse.max_concurrent"),
                1..=1000,
                defaults.max_concurrent,
            )?,
        }))
    }

    fn route(
        &self,
        index: usize,
        offset: usize,
        raw: RawRoute,
        targets: &Targets<'_>,
        earlier: &[RouteConfig],
    ) -> Result<RouteConfig, ConfigError> {
        let (functions, actors) = (targets.functions, targets.actors);
        let key = |k: &str| format!("routes[{index}].{k}");
        let path = raw.path.get_ref();
        let path_at = raw.path.span().start;
        if !path.starts_with('/') {
            return Err(self.err(path_at, key("path"), "must start with '/'"));
        }
        if path.contains("...") && !path.ends_with("/...") {
            return Err(self.err(
                path_at,
                key("path"),
                "'...' is only allowed as a final segment: `/prefix/...`",
            ));
        }
        // An upstream the route names must exist.
        let upstream = |u: &Spanned<String>| {
            if targets.upstreams.contains_key(u.get_ref()) {
                Ok(())
            } else {
                Err(self.err(
                    u.span().start,
                    key("upstream"),
                    format!("no upstream named `{}` is declared", u.get_ref()),
                ))
            }
        };
        // Only actor routes have an `{id}` segment.
        let no_id = || {
            if path.contains('{') || path.contains('}') {
                Err(self.err(path_at, key("path"), "`{id}` segments are for actor routes"))
            } else {
                Ok(())
            }
        };
        let mut bound = None;
        let target = match (raw.function, raw.actor, raw.upstream) {
            (None, None, Some(u)) => {
                upstream(&u)?;
                no_id()?;
                RouteTarget::Upstream(u.into_inner())
            }
            (Some(f), None, u) => {
                if let Some(u) = &u {
                    upstream(u)?;
                }
                bound = u.map(Spanned::into_inner);
                if !functions.contains_key(f.get_ref()) {
                    return Err(self.err(
                        f.span().start,
                        key("function"),
                        format!("no function named `{}` is declared", f.get_ref()),
                    ));
                }
                no_id()?;
                RouteTarget::Function(f.into_inner())
            }
            (None, Some(a), None) => {
                if !actors.contains_key(a.get_ref()) {
                    return Err(self.err(
                        a.span().start,
                        key("actor"),
                        format!("no actor class named `{}` is declared", a.get_ref()),
                    ));
                }
                let base = path.strip_suffix("/...").unwrap_or(path);
                let ok = base.matches("{id}").count() == 1
                    && base.ends_with("/{id}")
                    && base.matches('{').count() == 1
                    && base.matches('}').count() == 1;
                if !ok {
                    return Err(self.err(
                        path_at,
                        key("path"),
                        "actor routes look like `/prefix/{id}` or `/prefix/{id}/...`",
                    ));
                }
                RouteTarget::Actor(a.into_inner())
            }
            _ => {
                return Err(self.err(
                    offset,
                    format!("routes[{index}]"),
                    "set one of `function` (optionally with `upstream`), `actor` or `upstream`",
                ));
            }
        };
        let host = match raw.host {
            None => None,
            Some(h) => {
                let v = h.get_ref().trim().to_ascii_lowercase();
                let bare = v.strip_prefix("*.").unwrap_or(&v);
                if bare.is_empty() || bare.contains('*') || bare.contains('/') {
                    return Err(self.err(
                        h.span().start,
                        key("host"),
                        "host patterns are `example.com` or `*.example.com`",
                    ));
                }
                Some(v)
            }
        };
        let route = RouteConfig {
            host,
            path: path.clone(),
            target,
            upstream: bound,
        };
        if earlier
            .iter()
            .any(|r| r.host == route.host && r.path == route.path)
        {
            return Err(self.err(
                path_at,
                key("path"),
                "another route already has this host and path",
            ));
        }
        Ok(route)
    }
}

/// What routes may name.
struct Targets<'a> {
    functions: &'a BTreeMap<String, FunctionConfig>,
    actors: &'a BTreeMap<String, ActorClassConfig>,
    upstreams: &'a BTreeMap<String, UpstreamConfig>,
}

/// What a function's settings may refer to elsewhere in the deployment.
struct References<'a> {
    secrets: &'a BTreeMap<String, String>,
    secrets_file: Option<&'a Path>,
    backends: &'a BTreeMap<String, BackendConfig>,
}

/// An exact host name (`example.com`) or a wildcard for one label below
/// one (`*.example.com`), lowercase, as SNI carries them.
pub fn valid_tls_host(name: &str) -> bool {
    let exact = name.strip_prefix("*.").unwrap_or(name);
    let labels: Vec<&str> = exact.split('.').collect();
    exact.len() <= 253
        && (exact.len() == name.len() || labels.len() >= 2)
        && labels.iter().all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        })
}

/// An HTTP field name (RFC 9110 `token`).
fn valid_header_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 256
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// Whether `name` may name a function, actor class, upstream or tenant:
/// letters, digits, '-' and '_'.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

/// Reads the secrets file: a TOML table of `name = "value"` strings. Errors
/// name the file, the line and the secret's name, never a value.
fn load_secrets(path: &Path) -> Result<BTreeMap<String, String>, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let table: toml::Table = toml::from_str(&text).map_err(|e| {
        ConfigError::at(
            path,
            &text,
            e.span().map_or(0, |s| s.start),
            "<secrets>",
            e.message(),
        )
    })?;
    let mut secrets = BTreeMap::new();
    for (name, value) in table {
        match value {
            toml::Value::String(v) => {
                secrets.insert(name, v);
            }
            _ => {
                let offset = text.find(name.as_str()).unwrap_or(0);
                return Err(ConfigError::at(
                    path,
                    &text,
                    offset,
                    name,
                    "secret values must be strings",
                ));
            }
        }
    }
    Ok(secrets)
}

impl fmt::Display for ComponentSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ComponentSource::Wasm(p) => write!(f, "{}", p.display()),
            ComponentSource::RustCrate(p) => write!(f, "{} (Rust crate)", p.display()),
            ComponentSource::Command(b) => {
                write!(f, "{} (built by `{}`)", b.output.display(), b.command)
            }
        }
    }
}
