//! The admin listener: `/healthz`, `/readyz`, Prometheus `/metrics`
//! ([`metrics`]), `/v1/stats` ([`stats`]) and the live dashboard
//! (`/dashboard`), on its own address (loopback by default), behind a
//! bearer token.
//!
//! Invariants:
//! - No token configured, no listener: [`AdminServer::bind`] returns `None`
//!   and the caller logs that the admin API is off. There is no
//!   unauthenticated mode.
//! - Every request must carry `Authorization: Bearer TOKEN`; otherwise
//!   401 with `WWW-Authenticate: Bearer` and nothing else happens. The one
//!   exception is the dashboard's three static files (a page, its script
//!   and its style sheet), which hold no data: a browser cannot send a
//!   header when it opens a page, so the page asks for the token (or reads
//!   it from the URL fragment, which is never sent) and sends it with each
//!   `/v1/stats` request. They are served with a strict
//!   Content-Security-Policy (same origin only, no inline script). The check hashes both sides (SHA-256) and compares the
//!   digests in constant time, so neither the token's bytes nor its length
//!   leak through timing. Refusals are counted and logged at most once a
//!   second (a flood of bad tokens cannot flood the log).
//! - The listener is bounded like the public one, with smaller numbers: at
//!   most [`MAX_CONNECTIONS`] connections (past it a new one is closed at
//!   once), heads of at most [`MAX_HEAD_BYTES`] (431 past it), a head must
//!   arrive within `server.header_read_timeout`, and a connection lives at
//!   most [`CONNECTION_LIFETIME`] (a client that stops reading a large
//!   `/metrics` answer cannot hold its slot). Only the change endpoints
//!   ([`deploy`]) read a request body, bounded in size and time; a change
//!   request is exempt from the connection lifetime (a compile may outlast
//!   it).
//! - Error bodies are short fixed texts; nothing internal is echoed.

pub mod deploy;
pub mod listing;
pub mod logs;
pub mod metrics;
pub mod stats;

/// The endpoints that need the token, each answering `GET` (and `HEAD`).
/// The OpenAPI document describes exactly these and the dashboard's files
/// (a test holds the two together).
pub const ENDPOINTS: [&str; 7] = [
    "/healthz",
    "/readyz",
    "/metrics",
    "/v1/stats",
    "/v1/functions",
    "/v1/logs",
    "/v1/openapi.json",
];

/// The endpoints that change what the node runs ([`deploy`]), with their
/// methods; they need the token too. The OpenAPI document describes them.
pub const CHANGE_ENDPOINTS: [(&str, &[&str]); 4] = [
    ("/v1/functions/{name}", &["put", "delete"]),
    ("/v1/functions/{name}/rollback", &["post"]),
    ("/v1/actors/{name}", &["put"]),
    ("/v1/actors/{name}/rollback", &["post"]),
];

/// A response body: whole, or the log stream.
type AdminBody = http_body_util::Either<Full<Bytes>, logs::LogStream>;

/// The OpenAPI 3.1 document of this API (`GET /v1/openapi.json`).
pub const OPENAPI: &str = include_str!("openapi.json");
/// The dashboard's files (path, content type, content): static, without data (what they show comes from
/// `/v1/stats`, which needs the token).
pub const DASHBOARD: [(&str, &str, &str); 3] = [
    (
        "/dashboard",
        "text/html; charset=utf-8",
        include_str!("dashboard/index.html"),
    ),
    (
        "/dashboard.js",
        "text/javascript; charset=utf-8",
        include_str!("dashboard/dashboard.js"),
    ),
    (
        "/dashboard.css",
        "text/css; charset=utf-8",
        include_str!("dashboard/dashboard.css"),
    ),
];
use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use ignis_actors::cron::CronTriggers;
use ignis_actors::{ActorDirectory, FunctionGate};
use ignis_config::AdminConfig;
use ignis_edge::Upstream;
use ignis_edge::observe::Traffic;
use ignis_runtime::Function;
use ignis_store::StoreStats;
use logs::LogTap;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

/// Most connections the admin listener holds at once.
pub const MAX_CONNECTIONS: usize = 64;
/// Largest request head accepted, in bytes.
pub const MAX_HEAD_BYTES: usize = 16 * 1024;
/// Longest an admin connection stays open.
pub const CONNECTION_LIFETIME: Duration = Duration::from_secs(60);

/// What the admin listener reports on ([`NodeParts`], swapped whole by a
/// deploy), whether the node is ready, and who deploys.
pub struct Node {
    parts: ArcSwap<NodeParts>,
    started: SystemTime,
    ready: AtomicBool,
    deployer: Option<Arc<dyn deploy::Deployer>>,
}

/// The node's functions, actors, upstreams, routes and counters.
pub struct NodeParts {
    /// Functions and their admission gates, by name.
    pub functions: BTreeMap<String, (Arc<Function>, Arc<FunctionGate>)>,
    /// The durable actor directory, if the manifest has actor classes.
    pub directory: Option<Arc<ActorDirectory>>,
    /// Upstreams by name.
    pub upstreams: BTreeMap<String, Arc<Upstream>>,
    /// The edge's per-target counters.
    pub traffic: Arc<Traffic>,
    /// Tenants' scheduling weights (tenants not listed weigh 1).
    pub weights: BTreeMap<String, u32>,
    /// The cron triggers.
    pub cron: Arc<CronTriggers>,
    /// The embedded store's counters, if it is open.
    pub storage: Option<Arc<StoreStats>>,
    /// The routes, in manifest order.
    pub routes: Vec<ignis_config::RouteConfig>,
    /// Each function's version, by name.
    pub versions: BTreeMap<String, deploy::VersionInfo>,
    /// Each actor class's version, by name.
    pub actor_versions: BTreeMap<String, deploy::VersionInfo>,
    /// Recent changes, newest first (at most [`MAX_DEPLOY_RECORDS`]).
    pub deploys: Vec<deploy::DeployRecord>,
}

/// Most changes [`NodeParts::deploys`] remembers.
pub const MAX_DEPLOY_RECORDS: usize = 50;

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let parts = self.parts();
        f.debug_struct("Node")
            .field("functions", &parts.functions.keys().collect::<Vec<_>>())
            .field("upstreams", &parts.upstreams.keys().collect::<Vec<_>>())
            .field("ready", &self.is_ready())
            .finish_non_exhaustive()
    }
}

impl Node {
    /// A node view, not ready until [`Node::set_ready`]; with a
    /// `deployer`, the API's deploy, rollback and delete endpoints work
    /// (without one they answer 501).
    pub fn new(parts: NodeParts, deployer: Option<Arc<dyn deploy::Deployer>>) -> Arc<Node> {
        Arc::new(Node {
            parts: ArcSwap::from_pointee(parts),
            started: SystemTime::now(),
            ready: AtomicBool::new(false),
            deployer,
        })
    }

    /// What the node runs now (one deploy's worth: read it once per answer).
    pub fn parts(&self) -> Arc<NodeParts> {
        self.parts.load_full()
    }

    /// Replaces what the node runs (a deploy swapped it in).
    pub fn replace(&self, parts: NodeParts) {
        self.parts.store(Arc::new(parts));
    }

    /// Marks the node ready (its listeners are bound) or not (it drains).
    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::SeqCst);
    }

    /// Whether `/readyz` answers 200.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::SeqCst)
    }

    pub(crate) fn started_unix_seconds(&self) -> f64 {
        self.started
            .duration_since(UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64())
    }
}

/// Errors binding the admin listener.
#[derive(Debug, thiserror::Error)]
#[error("admin listener on {addr}: {source}")]
pub struct BindError {
    addr: SocketAddr,
    source: std::io::Error,
}

/// The bound admin listener.
pub struct AdminServer {
    listener: TcpListener,
    local_addr: SocketAddr,
    shared: Arc<Shared>,
}

struct Shared {
    node: Arc<Node>,
    token_digest: [u8; 32],
    header_read_timeout: Duration,
    refused: AtomicU64,
    /// Seconds since the Unix epoch of the last refusal logged.
    last_refusal_logged: AtomicU64,
}

impl AdminServer {
    /// Binds `config.listen` if a token is configured; `Ok(None)` without
    /// one (the admin API is off).
    pub async fn bind(
        config: &AdminConfig,
        header_read_timeout: Duration,
        node: Arc<Node>,
    ) -> Result<Option<AdminServer>, BindError> {
        let Some(token) = &config.token else {
            return Ok(None);
        };
        let addr = config.listen;
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| BindError { addr, source })?;
        let local_addr = listener
            .local_addr()
            .map_err(|source| BindError { addr, source })?;
        Ok(Some(AdminServer {
            listener,
            local_addr,
            shared: Arc::new(Shared {
                node,
                token_digest: digest(token.expose()),
                header_read_timeout,
                refused: AtomicU64::new(0),
                last_refusal_logged: AtomicU64::new(0),
            }),
        }))
    }

    /// The bound address.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Serves until `shutdown` resolves; open connections are dropped then.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
        let mut shutdown = std::pin::pin!(shutdown);
        let mut tasks = tokio::task::JoinSet::new();
        loop {
            let (stream, peer) = tokio::select! {
                accepted = self.listener.accept() => match accepted {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::warn!(error = %e, "admin: accept failed");
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        continue;
                    }
                },
                () = &mut shutdown => break,
            };
            // Reap finished connection tasks so the set stays small.
            while tasks.try_join_next().is_some() {}
            let Ok(slot) = slots.clone().try_acquire_owned() else {
                tracing::debug!(%peer, "admin: connection refused, {MAX_CONNECTIONS} open");
                continue;
            };
            let shared = self.shared.clone();
            let head_timeout = shared.header_read_timeout;
            tasks.spawn(async move {
                // A connection that streams the log lives as long as its
                // follower; any other is cut at CONNECTION_LIFETIME.
                let streaming = Arc::new(AtomicBool::new(false));
                let flag = streaming.clone();
                let service = hyper::service::service_fn(move |req| {
                    let (shared, flag) = (shared.clone(), flag.clone());
                    async move {
                        if is_change(&req) {
                            // A deploy may compile for longer than the
                            // connection lifetime; its body has its own
                            // deadline.
                            flag.store(true, Ordering::SeqCst);
                            return Ok::<_, Infallible>(
                                shared
                                    .change(req, peer)
                                    .await
                                    .map(http_body_util::Either::Left),
                            );
                        }
                        let resp = shared.answer(&req, peer);
                        if matches!(resp.body(), http_body_util::Either::Right(_)) {
                            flag.store(true, Ordering::SeqCst);
                        }
                        Ok::<_, Infallible>(resp)
                    }
                });
                let conn = hyper::server::conn::http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(head_timeout)
                    .max_buf_size(MAX_HEAD_BYTES)
                    .serve_connection(TokioIo::new(stream), service);
                let mut conn = std::pin::pin!(conn);
                tokio::select! {
                    _ = &mut conn => {}
                    () = tokio::time::sleep(CONNECTION_LIFETIME) => {
                        if streaming.load(Ordering::SeqCst) {
                            let _ = conn.await;
                        }
                    }
                }
                drop(slot);
            });
        }
        tasks.shutdown().await;
    }
}

fn digest(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

/// Whether `req` asks to change a function or an actor class (deploy,
/// rollback, delete).
fn is_change<B>(req: &Request<B>) -> bool {
    let path = req.uri().path();
    (path.starts_with("/v1/functions/") || path.starts_with("/v1/actors/"))
        && req.method() != Method::GET
        && req.method() != Method::HEAD
}

impl Shared {
    /// The answer to a deploy, rollback or delete ([`deploy`]).
    async fn change(&self, req: Request<Incoming>, peer: SocketAddr) -> Response<Full<Bytes>> {
        use deploy::{DeployBody, DeployError, DeployRequest, RollbackBody};
        if !self.authorized(&req) {
            return self.unauthorized(peer);
        }
        let path = req.uri().path();
        let (kind, rest) = if let Some(rest) = path.strip_prefix("/v1/functions/") {
            (deploy::UnitKind::Function, rest)
        } else if let Some(rest) = path.strip_prefix("/v1/actors/") {
            (deploy::UnitKind::Actor, rest)
        } else {
            return text(StatusCode::NOT_FOUND, "no such admin endpoint\n");
        };
        let (name, rollback) = match rest.split_once('/') {
            None => (rest.to_string(), false),
            Some((name, "rollback")) => (name.to_string(), true),
            Some(_) => return text(StatusCode::NOT_FOUND, "no such admin endpoint\n"),
        };
        if !ignis_config::valid_name(&name) {
            return text(StatusCode::NOT_FOUND, "no such function or actor class\n");
        }
        let allowed = match (rollback, kind) {
            (true, _) => "POST",
            (false, deploy::UnitKind::Function) => "PUT, DELETE",
            (false, deploy::UnitKind::Actor) => "PUT",
        };
        let method = req.method().clone();
        let fits = match (rollback, &method) {
            (true, &Method::POST) => true,
            (false, m) => {
                m == Method::PUT || (m == Method::DELETE && kind == deploy::UnitKind::Function)
            }
            _ => false,
        };
        if !fits {
            let mut resp = text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed here\n");
            resp.headers_mut()
                .insert(header::ALLOW, HeaderValue::from_static(allowed));
            return resp;
        }
        let Some(deployer) = self.node.deployer.clone() else {
            return text(
                StatusCode::NOT_IMPLEMENTED,
                "this node cannot deploy (no deployer)\n",
            );
        };
        let by = match deploy::user_name(req.headers()) {
            Some(user) => format!("api {peer} ({user})"),
            None => format!("api {peer}"),
        };
        let body = match read_body(req).await {
            Ok(b) => b,
            Err(resp) => return resp,
        };
        let work: deploy::Change<'static> = if method == Method::DELETE {
            Box::pin(async move { deployer.delete(name, by).await })
        } else if rollback {
            let parsed: Result<RollbackBody, _> = if body.is_empty() {
                Ok(RollbackBody::default())
            } else {
                serde_json::from_slice(&body)
            };
            let Ok(parsed) = parsed else {
                return text(
                    StatusCode::BAD_REQUEST,
                    "the body is not a rollback request (JSON: {\"expect_version\": N})\n",
                );
            };
            Box::pin(async move {
                deployer
                    .rollback(kind, name, parsed.expect_version, by)
                    .await
            })
        } else {
            let parsed: DeployBody = match serde_json::from_slice(&body) {
                Ok(p) => p,
                Err(e) => {
                    return error_json(
                        StatusCode::BAD_REQUEST,
                        &format!("the body is not a deploy request: {e}"),
                    );
                }
            };
            use base64::Engine as _;
            let Ok(component) =
                base64::engine::general_purpose::STANDARD.decode(parsed.component.as_bytes())
            else {
                return error_json(
                    StatusCode::BAD_REQUEST,
                    "`component` is not base64 (standard alphabet, padded)",
                );
            };
            let request = DeployRequest {
                kind,
                name,
                config: parsed.config,
                component,
                expect_version: parsed.expect_version,
                by,
            };
            Box::pin(async move { deployer.deploy(request).await })
        };
        // The change runs to its end even if this connection goes away.
        match tokio::spawn(work).await {
            Ok(Ok(done)) => json(serde_json::to_vec(&done)),
            Ok(Err(e)) => error_json(e.status(), &e.to_string()),
            Err(e) => {
                tracing::error!(error = %e, "admin: a change task failed");
                let e = DeployError::Internal("the change failed; see the node's log".into());
                error_json(e.status(), &e.to_string())
            }
        }
    }

    fn unauthorized(&self, peer: SocketAddr) -> Response<Full<Bytes>> {
        self.refused(peer);
        let mut resp = text(
            StatusCode::UNAUTHORIZED,
            "a valid bearer token is required\n",
        );
        resp.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer realm=\"ignis-admin\""),
        );
        resp
    }

    /// The answer to one admin request.
    fn answer(&self, req: &Request<Incoming>, peer: SocketAddr) -> Response<AdminBody> {
        let get = req.method() == Method::GET || req.method() == Method::HEAD;
        if req.uri().path() == "/v1/logs" && get && self.authorized(req) {
            let Some(stream) = LogTap::global().follow() else {
                return text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "too many log followers; try again later\n",
                )
                .map(http_body_util::Either::Left);
            };
            let mut resp = Response::new(http_body_util::Either::Right(stream));
            resp.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; charset=utf-8"),
            );
            resp.headers_mut()
                .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
            return resp;
        }
        self.answer_whole(req, peer)
            .map(http_body_util::Either::Left)
    }

    /// Every answer but the log stream.
    fn answer_whole(&self, req: &Request<Incoming>, peer: SocketAddr) -> Response<Full<Bytes>> {
        if let Some((_, content_type, body)) = DASHBOARD
            .iter()
            .find(|(path, _, _)| *path == req.uri().path())
            && (req.method() == Method::GET || req.method() == Method::HEAD)
        {
            let mut resp = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
            let headers = resp.headers_mut();
            headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
            headers.insert(
                header::CONTENT_SECURITY_POLICY,
                HeaderValue::from_static(
                    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
                ),
            );
            headers.insert(
                header::X_CONTENT_TYPE_OPTIONS,
                HeaderValue::from_static("nosniff"),
            );
            headers.insert(
                header::REFERRER_POLICY,
                HeaderValue::from_static("no-referrer"),
            );
            return resp;
        }
        if !self.authorized(req) {
            return self.unauthorized(peer);
        }
        let path = req.uri().path();
        if !ENDPOINTS.contains(&path) {
            return text(StatusCode::NOT_FOUND, "no such admin endpoint\n");
        }
        if req.method() != Method::GET && req.method() != Method::HEAD {
            let mut resp = text(StatusCode::METHOD_NOT_ALLOWED, "use GET\n");
            resp.headers_mut()
                .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
            return resp;
        }
        match path {
            "/healthz" => text(StatusCode::OK, "ok\n"),
            "/readyz" if self.node.is_ready() => text(StatusCode::OK, "ready\n"),
            "/readyz" => text(StatusCode::SERVICE_UNAVAILABLE, "not ready\n"),
            "/v1/stats" => json(serde_json::to_vec(&stats::read(&self.node))),
            "/v1/functions" => json(serde_json::to_vec(&listing::read(&self.node))),
            "/v1/openapi.json" => json(Ok(OPENAPI.as_bytes().to_vec())),
            "/metrics" => {
                let mut resp = Response::new(Full::new(Bytes::from(metrics::render(&self.node))));
                resp.headers_mut().insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static(
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    ),
                );
                resp
            }
            // Only an authorized GET of the log reaches here, and `answer`
            // streamed it.
            _ => text(StatusCode::INTERNAL_SERVER_ERROR, "unexpected admin path\n"),
        }
    }

    fn authorized<B>(&self, req: &Request<B>) -> bool {
        let mut values = req.headers().get_all(header::AUTHORIZATION).iter();
        let (Some(value), None) = (values.next(), values.next()) else {
            return false;
        };
        let Some(given) = value
            .as_bytes()
            .strip_prefix(b"Bearer ")
            .or_else(|| value.as_bytes().strip_prefix(b"bearer "))
        else {
            return false;
        };
        digest(given).ct_eq(&self.token_digest).into()
    }

    fn refused(&self, peer: SocketAddr) {
        let total = self.refused.fetch_add(1, Ordering::Relaxed) + 1;
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let last = self.last_refusal_logged.load(Ordering::Relaxed);
        if now > last
            && self
                .last_refusal_logged
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            tracing::warn!(%peer, refused_so_far = total, "admin: request without a valid token refused (401)");
        }
    }
}

/// A JSON answer, not to be cached (a document that failed to serialise,
/// which our types cannot, is an empty object).
fn json(body: Result<Vec<u8>, serde_json::Error>) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(
        body.unwrap_or_else(|_| b"{}".to_vec()),
    )));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

/// A change request's body: at most [`deploy::MAX_DEPLOY_BYTES`], within
/// [`deploy::BODY_TIMEOUT`].
async fn read_body(req: Request<Incoming>) -> Result<Bytes, Response<Full<Bytes>>> {
    use http_body_util::BodyExt as _;
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > deploy::MAX_DEPLOY_BYTES as u64) {
        return Err(text(
            StatusCode::PAYLOAD_TOO_LARGE,
            "the request body is too large\n",
        ));
    }
    let limited = http_body_util::Limited::new(req.into_body(), deploy::MAX_DEPLOY_BYTES);
    match tokio::time::timeout(deploy::BODY_TIMEOUT, limited.collect()).await {
        Err(_) => Err(text(
            StatusCode::REQUEST_TIMEOUT,
            "the request body did not arrive in time\n",
        )),
        Ok(Ok(b)) => Ok(b.to_bytes()),
        Ok(Err(e))
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some() =>
        {
            Err(text(
                StatusCode::PAYLOAD_TOO_LARGE,
                "the request body is too large\n",
            ))
        }
        Ok(Err(_)) => Err(text(
            StatusCode::BAD_REQUEST,
            "the request body could not be read\n",
        )),
    }
}

/// `{"error": message}` with `status`.
fn error_json(status: StatusCode, message: &str) -> Response<Full<Bytes>> {
    let mut resp = json(serde_json::to_vec(&serde_json::json!({ "error": message })));
    *resp.status_mut() = status;
    resp
}

fn text(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}
