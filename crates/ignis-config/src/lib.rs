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

use std::collections::BTreeMap;
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
    /// Server settings.
    pub server: ServerConfig,
    /// Functions by name, in name order.
    pub functions: BTreeMap<String, FunctionConfig>,
    /// Routes, in file order (matching picks the most specific, not the first).
    pub routes: Vec<RouteConfig>,
    /// Tenants with explicit settings (`[tenants.NAME]`); every other tenant
    /// named by a function gets [`TenantConfig::default`].
    pub tenants: BTreeMap<String, TenantConfig>,
}

/// Scheduling settings of one tenant (`[tenants.NAME]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TenantConfig {
    /// Share of the guest CPU when tenants compete, relative to other
    /// tenants' weights (1..=1000, default 1).
    pub weight: u32,
}

impl Default for TenantConfig {
    fn default() -> Self {
        TenantConfig { weight: 1 }
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
}

/// Where a function's component comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ComponentSource {
    /// A prebuilt `.wasm` component.
    Wasm(PathBuf),
    /// A Rust crate directory built with `cargo build --target wasm32-wasip2 --release`.
    RustCrate(PathBuf),
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
}

/// One route (`[[routes]]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteConfig {
    /// Host pattern: `None` matches any host; `example.com`; `*.example.com`.
    pub host: Option<String>,
    /// Path pattern: exact (`/hello`) or prefix (`/api/...`, `/...`).
    pub path: String,
    /// Target function name.
    pub function: String,
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
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTenant {
    weight: Option<Spanned<u32>>,
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
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFunction {
    component: Option<PathBuf>,
    build: Option<PathBuf>,
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
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRoute {
    host: Option<Spanned<String>>,
    path: Spanned<String>,
    function: Spanned<String>,
}

/// Default listen address when the manifest names none.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8080";

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

    fn manifest(&self, raw: RawManifest) -> Result<Manifest, ConfigError> {
        let server = self.server(raw.server)?;
        let mut functions = BTreeMap::new();
        for (name, f) in raw.functions {
            let span = f.span();
            let func = self.function(&name, span.start, f.into_inner())?;
            functions.insert(name, func);
        }
        let mut routes = Vec::new();
        for (i, r) in raw.routes.into_iter().enumerate() {
            routes.push(self.route(i, r.into_inner(), &functions, &routes)?);
        }
        let mut tenants = BTreeMap::new();
        for (name, t) in raw.tenants {
            let span = t.span();
            let t = t.into_inner();
            let mut tenant = TenantConfig::default();
            if let Some(w) = t.weight {
                if !(1..=1000).contains(w.get_ref()) {
                    return Err(self.err(
                        w.span().start,
                        format!("tenants.{name}.weight"),
                        "must be between 1 and 1000",
                    ));
                }
                tenant.weight = *w.get_ref();
            }
            if !functions.values().any(|f| f.tenant == name) {
                return Err(self.err(
                    span.start,
                    format!("tenants.{name}"),
                    format!("no function belongs to tenant `{name}`"),
                ));
            }
            tenants.insert(name, tenant);
        }
        Ok(Manifest {
            path: self.path.to_path_buf(),
            server,
            functions,
            routes,
            tenants,
        })
    }

    fn server(&self, raw: RawServer) -> Result<ServerConfig, ConfigError> {
        let listen = match raw.listen {
            None => DEFAULT_LISTEN.parse().expect("valid default"),
            Some(s) => s.get_ref().parse().map_err(|e| {
                self.err(
                    s.span().start,
                    "server.listen",
                    format!(
                        "`{}` is not an address like 127.0.0.1:8080: {e}",
                        s.get_ref()
                    ),
                )
            })?,
        };
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
        let max_headers = match raw.max_headers {
            None => 100,
            Some(n) if *n.get_ref() == 0 || *n.get_ref() > 1000 => {
                return Err(self.err(
                    n.span().start,
                    "server.max_headers",
                    "must be between 1 and 1000",
                ));
            }
            Some(n) => *n.get_ref() as usize,
        };
        let guest_threads = match raw.guest_threads {
            None => std::thread::available_parallelism().map_or(2, |n| n.get()),
            Some(n) if *n.get_ref() == 0 || *n.get_ref() > 256 => {
                return Err(self.err(
                    n.span().start,
                    "server.guest_threads",
                    "must be between 1 and 256",
                ));
            }
            Some(n) => *n.get_ref() as usize,
        };
        Ok(ServerConfig {
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
            header_read_timeout: raw
                .header_read_timeout
                .map_or(Duration::from_secs(10), |d| d.duration),
            pooling: raw.pooling.unwrap_or(true),
            guest_threads,
        })
    }

    fn function(
        &self,
        name: &str,
        offset: usize,
        raw: RawFunction,
    ) -> Result<FunctionConfig, ConfigError> {
        let key = |k: &str| format!("functions.{name}.{k}");
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return Err(self.err(
                offset,
                format!("functions.{name}"),
                "function names use letters, digits, '-' and '_'",
            ));
        }
        let source = match (raw.component, raw.build) {
            (Some(c), None) => ComponentSource::Wasm(self.resolve(&c)),
            (None, Some(b)) => ComponentSource::RustCrate(self.resolve(&b)),
            (Some(_), Some(_)) => {
                return Err(self.err(
                    offset,
                    format!("functions.{name}"),
                    "set either `component` or `build`, not both",
                ));
            }
            (None, None) => {
                return Err(self.err(
                    offset,
                    format!("functions.{name}"),
                    "missing `component` (a .wasm file) or `build` (a Rust crate directory)",
                ));
            }
        };
        let mut limits = Limits::default();
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
        ] {
            if let Some(d) = value {
                if d.duration.is_zero() {
                    return Err(self.err(d.span.start, key(field), "must be greater than zero"));
                }
                *slot = d.duration;
            }
        }
        if let Some(c) = raw.max_concurrency {
            if *c.get_ref() == 0 || *c.get_ref() > 10_000 {
                return Err(self.err(
                    c.span().start,
                    key("max_concurrency"),
                    "must be between 1 and 10000",
                ));
            }
            limits.max_concurrency = *c.get_ref();
        }
        if let Some(b) = raw.max_body {
            limits.max_body_bytes = b.bytes;
        }
        if let Some(m) = raw.mailbox {
            if *m.get_ref() > 1_000_000 {
                return Err(self.err(
                    m.span().start,
                    key("mailbox"),
                    "must be between 0 and 1000000",
                ));
            }
            limits.mailbox = *m.get_ref();
        }
        if let Some(d) = raw.queue_timeout {
            if d.duration.is_zero() {
                return Err(self.err(
                    d.span.start,
                    key("queue_timeout"),
                    "must be greater than zero",
                ));
            }
            limits.queue_timeout = d.duration;
        }
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
        Ok(FunctionConfig {
            name: name.to_string(),
            tenant: raw.tenant.unwrap_or_else(|| name.to_string()),
            source,
            limits,
            env: raw.env,
            allowed_outbound_hosts: allowed,
        })
    }

    fn route(
        &self,
        index: usize,
        raw: RawRoute,
        functions: &BTreeMap<String, FunctionConfig>,
        earlier: &[RouteConfig],
    ) -> Result<RouteConfig, ConfigError> {
        let key = |k: &str| format!("routes[{index}].{k}");
        let path = raw.path.get_ref();
        if !path.starts_with('/') {
            return Err(self.err(raw.path.span().start, key("path"), "must start with '/'"));
        }
        if path.contains("...") && !path.ends_with("/...") {
            return Err(self.err(
                raw.path.span().start,
                key("path"),
                "'...' is only allowed as a final segment: `/prefix/...`",
            ));
        }
        if !functions.contains_key(raw.function.get_ref()) {
            return Err(self.err(
                raw.function.span().start,
                key("function"),
                format!("no function named `{}` is declared", raw.function.get_ref()),
            ));
        }
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
            function: raw.function.into_inner(),
        };
        if earlier
            .iter()
            .any(|r| r.host == route.host && r.path == route.path)
        {
            return Err(self.err(
                raw.path.span().start,
                key("path"),
                "another route already has this host and path",
            ));
        }
        Ok(route)
    }
}

impl fmt::Display for ComponentSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ComponentSource::Wasm(p) => write!(f, "{}", p.display()),
            ComponentSource::RustCrate(p) => write!(f, "{} (Rust crate)", p.display()),
        }
    }
}
