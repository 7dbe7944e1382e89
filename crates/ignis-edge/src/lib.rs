//! The Ignis HTTP front: listeners that speak HTTP/1.1 and HTTP/2 (h2c by
//! prior knowledge on plain HTTP; over TLS with certificates chosen by SNI,
//! HTTP/2 or HTTP/1.1 by ALPN: [`tls`]), route each request by host and path to a function's
//! admission gate (`ignis-actors`) or to a durable actor (`/rooms/{id}/...`
//! routes: the request goes to the actor directory with its body read,
//! bounded by the class's `max_body`).
//!
//! The edge is the one place where an [`ignis_runtime::Error`] becomes a
//! response ([`error_response`]): its status from the runtime's status
//! table, `Retry-After` for shed requests, a body with the client-safe
//! message and the request id, and one log line with the full cause.
//!
//! ```no_run
//! # async fn demo(manifest: ignis_config::Manifest, gates: std::collections::BTreeMap<String, std::sync::Arc<ignis_actors::FunctionGate>>) -> anyhow::Result<()> {
//! let upstreams = ignis_edge::Edge::upstreams(&manifest)?;
//! let traffic = ignis_edge::observe::Traffic::new(&manifest);
//! let edge = ignis_edge::Edge::new(&manifest, &gates, None, &upstreams, &traffic)?;
//! let server = ignis_edge::Server::bind(manifest.server.listen, edge).await?;
//! println!("listening on {}", server.local_addr());
//! server.run(async { let _ = tokio::signal::ctrl_c().await; }).await?;
//! # Ok(()) }
//! ```
//!
//! Request limits: the request head is capped in bytes and in header count
//! (431 past either), the body is capped per function (413, at once from
//! `Content-Length` or as soon as a streamed body crosses the cap), malformed
//! requests get 400 from hyper, unknown routes 404. The time to receive a
//! request head is bounded (`header_read_timeout`), which also closes idle
//! keep-alive connections. Connections are capped node-wide and per client
//! address, and each is watched for a first request, idleness and a client
//! that stops taking its response (`conn`). Shutdown stops accepting, lets
//! in-flight requests finish within the grace period, then closes what is
//! left. With `[tls] redirect_http = true` the plain listener answers
//! every request with a 308 to the same URL over HTTPS instead.

mod body;
mod conn;
mod framing;
pub mod observe;
pub mod proxy;
mod routing;
mod threads;
pub mod tls;

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use ignis_actors::{ActorDirectory, FunctionGate};
use ignis_config::RouteTarget;
use ignis_config::{Manifest, ServerConfig};
use ignis_runtime::{Body, Error, ErrorKind, RequestId, RequestMeta, TRACEPARENT, X_REQUEST_ID};
use observe::{Exchange, Kind, TargetTraffic, Traffic};
use tokio::net::TcpListener;

pub use proxy::{OriginStats, Peer, Upstream};
pub use routing::Router;
pub use threads::PerThread;

/// Routing table plus the limits every request is held to.
///
/// The routing table and the counters it records into are one [`Table`]
/// behind an `ArcSwap`: a deploy builds the next table beside the live one
/// and swaps it in one store ([`Edge::swap`]). Each request loads the table
/// once, when it arrives, and keeps that `Arc` to its end, so a request
/// that began on the old table finishes on the old version's gate, and the
/// old version is freed when its last request lets go.
pub struct Edge {
    table: ArcSwap<Table>,
    directory: Option<Arc<ActorDirectory>>,
    server: ServerConfig,
    upstreams: BTreeMap<String, Arc<Upstream>>,
    /// The threads that serve accepted connections ([`threads`]).
    threads: threads::Threads,
}

/// What a deploy replaces: the routes and the counters they record into.
struct Table {
    router: Router<Target>,
    traffic: Arc<Traffic>,
}

/// Errors building or running the edge.
#[derive(Debug, thiserror::Error)]
pub enum EdgeError {
    /// The routing table refers to a function that is not loaded.
    #[error("routing: {0}")]
    Routing(String),
    /// The TLS configuration was refused.
    #[error("tls: {0}")]
    Tls(String),
    /// An upstream could not be set up (its CA file, an origin's name).
    #[error("upstream: {0}")]
    Upstream(String),
    /// Binding or accepting failed.
    #[error("listener on {addr}: {source}")]
    Listen {
        /// The address.
        addr: SocketAddr,
        /// The I/O error.
        source: std::io::Error,
    },
}

/// What a route leads to, with its traffic counters.
enum Target {
    Function(Arc<FunctionGate>, Arc<TargetTraffic>),
    Actor(String, Arc<TargetTraffic>),
    Upstream(Arc<Upstream>, Arc<TargetTraffic>),
}

impl Edge {
    /// Builds the routing table from the manifest, the functions' gates,
    /// (if the manifest has actor classes) the durable actor directory and
    /// the upstreams ([`Edge::upstreams`] builds them); requests are
    /// counted into `traffic` (built from the same manifest).
    pub fn new(
        manifest: &Manifest,
        gates: &BTreeMap<String, Arc<FunctionGate>>,
        directory: Option<Arc<ActorDirectory>>,
        upstreams: &BTreeMap<String, Arc<Upstream>>,
        traffic: &Arc<Traffic>,
    ) -> Result<Arc<Edge>, EdgeError> {
        let table = Table::new(manifest, gates, directory.as_ref(), upstreams, traffic)?;
        Ok(Arc::new(Edge {
            table: ArcSwap::from_pointee(table),
            directory,
            server: manifest.server.clone(),
            upstreams: upstreams.clone(),
            threads: threads::Threads::new(threads::count()),
        }))
    }

    /// Builds the routing table of `manifest` (the next version of the one
    /// serving: same server settings, upstreams and actor directory) and
    /// swaps it in. Requests that arrived before keep the old table.
    pub fn swap(
        &self,
        manifest: &Manifest,
        gates: &BTreeMap<String, Arc<FunctionGate>>,
        traffic: &Arc<Traffic>,
    ) -> Result<(), EdgeError> {
        let table = Table::new(
            manifest,
            gates,
            self.directory.as_ref(),
            &self.upstreams,
            traffic,
        )?;
        self.table.store(Arc::new(table));
        Ok(())
    }

    /// The traffic counters requests are recorded into now.
    pub fn traffic(&self) -> Arc<Traffic> {
        self.table.load().traffic.clone()
    }

    /// The manifest's upstreams, with their health checks started (on the
    /// current tokio runtime). Built before the functions, which may reach
    /// them ([`ignis_runtime::outbound::UpstreamClient`]).
    pub fn upstreams(manifest: &Manifest) -> Result<BTreeMap<String, Arc<Upstream>>, EdgeError> {
        manifest
            .upstreams
            .iter()
            .map(|(name, config)| {
                Upstream::new(config, &manifest.server.trusted_proxies)
                    .map(|u| (name.clone(), u))
                    .map_err(EdgeError::Upstream)
            })
            .collect()
    }

    /// The upstream named `name` (tests and metrics).
    pub fn upstream(&self, name: &str) -> Option<&Arc<Upstream>> {
        self.upstreams.get(name)
    }

    /// Handles one request from `peer`, noting in `exchange` who served
    /// it; never fails (every error is a response).
    async fn handle(
        &self,
        table: &Table,
        req: Request<Incoming>,
        peer: Peer,
        exchange: &mut Exchange,
    ) -> Response<Body> {
        let https = peer.https;
        let id = exchange.id();
        let host = request_host(&req).unwrap_or("");
        if req.uri().authority().is_none() && !req.headers().contains_key(header::HOST) {
            // HTTP/1.0 without Host: nothing to route by, and `wasi:http`
            // needs an authority. Refused here, before any guest or actor.
            let e = Error::new(ErrorKind::BadRequest).context("a Host header is required");
            return error_response("edge", &e, id);
        }
        if let Some(problem) = ambiguous_framing(&req) {
            // Never guessed at: a front end that read this request
            // differently could smuggle a second request past routing.
            let e = Error::new(ErrorKind::BadRequest).context(problem);
            let mut resp = error_response("edge", &e, id);
            resp.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
            return resp;
        }
        let gate = match table.router.route(host, req.uri().path()) {
            None => {
                let e = Error::new(ErrorKind::NotFound).context("no route for this host and path");
                return error_response("edge", &e, id);
            }
            Some((target, actor_id)) => match &**target {
                Target::Function(gate, traffic) => {
                    exchange.served_by(traffic);
                    gate.clone()
                }
                Target::Upstream(upstream, traffic) => {
                    exchange.served_by(traffic);
                    return match upstream.forward(req, Some(peer), id).await {
                        Ok(resp) => resp,
                        Err(e) => error_response(upstream.name(), &e, id),
                    };
                }
                Target::Actor(class, traffic) => {
                    exchange.served_by(traffic);
                    // Owned: the id borrows the request, which goes on.
                    let actor_id = actor_id.unwrap_or_default().to_string();
                    return match self.to_actor(class, &actor_id, req, id).await {
                        Ok(resp) => resp,
                        Err(e) => {
                            let e = e.context(format!("actor {class}/{actor_id}"));
                            error_response(class, &e, id)
                        }
                    };
                }
            },
        };
        let function = gate.function().name();
        let max_body = gate.function().limits().max_body_bytes;
        let declared = req
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|len| len > max_body) {
            return error_response(function, &body_too_large(max_body), id);
        }
        let (mut parts, incoming) = req.into_parts();
        tag(&mut parts.headers, id);
        let (limited, exceeded) = body::Limited::new(incoming, max_body);
        let req = Request::from_parts(parts, limited);
        let meta = RequestMeta {
            request_id: id,
            https,
        };
        match gate.call(req, meta).await {
            Ok(mut resp) => {
                resp.headers_mut().insert(X_REQUEST_ID, id.header());
                resp
            }
            // The guest failed because its body stream was cut at the limit.
            Err(_) if exceeded.get() => error_response(function, &body_too_large(max_body), id),
            Err(e) => error_response(function, &e, id),
        }
    }

    /// A request for durable actor `(class, actor_id)`: the body is read
    /// (bounded by the class's `max_body`), the reply comes back whole.
    async fn to_actor(
        &self,
        class: &str,
        actor_id: &str,
        req: Request<Incoming>,
        id: RequestId,
    ) -> Result<Response<Body>, Error> {
        let Some(directory) = &self.directory else {
            return Err(Error::new(ErrorKind::NotFound).context("no actors are deployed"));
        };
        let max_body = directory
            .class(class)
            .map_or(0, |c| c.config().limits.max_body_bytes);
        let (mut parts, incoming) = req.into_parts();
        tag(&mut parts.headers, id);
        let read = http_body_util::Limited::new(incoming, max_body as usize).collect();
        let Ok(read) = tokio::time::timeout(self.server.body_read_timeout, read).await else {
            return Err(Error::new(ErrorKind::RequestTimeout).context(format!(
                "the request body did not arrive within {:?}",
                self.server.body_read_timeout
            )));
        };
        let body = match read {
            Ok(b) => b.to_bytes(),
            Err(e)
                if e.downcast_ref::<http_body_util::LengthLimitError>()
                    .is_some() =>
            {
                return Err(body_too_large(max_body));
            }
            Err(e) => {
                return Err(Error::new(ErrorKind::BadRequest)
                    .context("the request body could not be read")
                    .with_source(e));
            }
        };
        let resp = directory
            .send(class, actor_id, Request::from_parts(parts, body), id, None)
            .await?;
        let mut resp = resp.map(|b| Full::new(b).map_err(|never| match never {}).boxed_unsync());
        resp.headers_mut().insert(X_REQUEST_ID, id.header());
        Ok(resp)
    }
}

impl Table {
    fn new(
        manifest: &Manifest,
        gates: &BTreeMap<String, Arc<FunctionGate>>,
        directory: Option<&Arc<ActorDirectory>>,
        upstreams: &BTreeMap<String, Arc<Upstream>>,
        traffic: &Arc<Traffic>,
    ) -> Result<Table, EdgeError> {
        let counters = |kind, name: &str| {
            traffic.target(kind, name).cloned().ok_or_else(|| {
                EdgeError::Routing(format!(
                    "no traffic counters for {} `{name}`",
                    kind.as_str()
                ))
            })
        };
        let mut missing = None;
        let router = Router::new(&manifest.routes, |target| {
            let built = match target {
                RouteTarget::Upstream(name) => upstreams.get(name).cloned().map(|u| {
                    counters(Kind::Upstream, name).map(|t| Arc::new(Target::Upstream(u, t)))
                }),
                RouteTarget::Function(name) => gates.get(name).cloned().map(|g| {
                    counters(Kind::Function, name).map(|t| Arc::new(Target::Function(g, t)))
                }),
                RouteTarget::Actor(class) => directory.and_then(|d| d.class(class)).map(|_| {
                    counters(Kind::Actor, class).map(|t| Arc::new(Target::Actor(class.clone(), t)))
                }),
            };
            match built {
                Some(Ok(t)) => Some(t),
                Some(Err(e)) => {
                    missing = Some(e);
                    None
                }
                None => None,
            }
        })
        .map_err(EdgeError::Routing);
        if let Some(e) = missing {
            return Err(e);
        }
        Ok(Table {
            router: router?,
            traffic: traffic.clone(),
        })
    }
}

/// Why a request's framing or target is ambiguous, if it is: what hyper
/// accepts but a front end or origin could read another way (RFC 9112
/// sections 3.2 and 6). Such a request gets 400 and its connection is closed.
fn ambiguous_framing<B>(req: &Request<B>) -> Option<&'static str> {
    let headers = req.headers();
    let lengths = headers.get_all(header::CONTENT_LENGTH).iter().count();
    let codings: Vec<&HeaderValue> = headers.get_all(header::TRANSFER_ENCODING).iter().collect();
    if lengths > 1 {
        return Some("more than one Content-Length");
    }
    if !codings.is_empty() {
        if lengths > 0 {
            return Some("both Content-Length and Transfer-Encoding");
        }
        let only_chunked = codings.len() == 1
            && codings[0]
                .to_str()
                .is_ok_and(|v| v.trim().eq_ignore_ascii_case("chunked"));
        if !only_chunked {
            return Some("a Transfer-Encoding other than one `chunked`");
        }
    }
    let mut hosts = headers.get_all(header::HOST).iter();
    let host = hosts.next();
    if hosts.next().is_some() {
        return Some("more than one Host");
    }
    if let (Some(target), Some(host)) = (req.uri().host(), host) {
        let same = host
            .to_str()
            .is_ok_and(|h| strip_port(h).eq_ignore_ascii_case(target.trim_matches(['[', ']'])));
        if !same {
            return Some("the request target's host differs from Host");
        }
    }
    None
}

/// Gives a guest the request's id and trace context as headers
/// (`x-request-id`, `traceparent`), replacing what the client sent.
fn tag(headers: &mut http::HeaderMap, id: RequestId) {
    headers.insert(X_REQUEST_ID, id.header());
    headers.insert(TRACEPARENT, id.traceparent());
}

fn body_too_large(max_body: u64) -> Error {
    Error::new(ErrorKind::BodyTooLarge).context(format!("the limit is {max_body} bytes"))
}

/// The host a request names: its target's authority, else its Host header
/// (without the port).
fn request_host<B>(req: &Request<B>) -> Option<&str> {
    req.uri().host().or_else(|| {
        req.headers()
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .map(strip_port)
    })
}

fn strip_port(host: &str) -> &str {
    if host.starts_with('[') {
        return host.split_once(']').map_or(host, |(h, _)| &h[1..]);
    }
    host.rsplit_once(':').map_or(host, |(h, _)| h)
}

fn plain(status: StatusCode, id: RequestId, text: String) -> Response<Body> {
    let mut resp = Response::new(
        Full::new(Bytes::from(text))
            .map_err(|never| match never {})
            .boxed_unsync(),
    );
    *resp.status_mut() = status;
    let headers = resp.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    headers.insert(X_REQUEST_ID, id.header());
    resp
}

/// The response for `e`, which happened in `owner` (a function, an actor
/// class, or the edge itself) while serving request `id`: its status, the
/// client-safe message with the request id, `Retry-After` if it was shed.
/// Logs the error, with its full cause: the one place errors are logged.
pub fn error_response(owner: &str, e: &Error, id: RequestId) -> Response<Body> {
    e.log(owner, id);
    let status = StatusCode::from_u16(e.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut resp = plain(
        status,
        id,
        format!("{} ({owner}, request id {id})\n", e.public()),
    );
    if let Some(after) = e.retry_after() {
        resp.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(after.as_secs()));
    }
    resp
}

/// A bound listener, ready to serve an [`Edge`].
pub struct Server {
    listener: TcpListener,
    local_addr: SocketAddr,
    edge: Arc<Edge>,
    mode: Mode,
}

/// What a listener speaks.
#[derive(Clone)]
enum Mode {
    /// Plain HTTP/1.1 and h2c, served by the edge.
    Plain,
    /// TLS (HTTP/1.1 and HTTP/2 by ALPN), served by the edge.
    Tls {
        acceptor: tokio_rustls::TlsAcceptor,
        handshake_timeout: Duration,
    },
    /// Plain HTTP answering every request with a redirect to HTTPS on
    /// this port.
    Redirect { https_port: u16 },
}

/// The redirect to `https://HOST[:PORT]/path?query` for a request that
/// came over plain HTTP (308: the method and body are kept); 400 without a
/// usable host.
fn redirect_response(req: &Request<Incoming>, https_port: u16, id: RequestId) -> Response<Body> {
    let host = request_host(req).filter(|h| {
        !h.is_empty()
            && h.len() <= 253
            && h.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | ':'))
    });
    let Some(host) = host else {
        let e = Error::new(ErrorKind::BadRequest).context("a valid Host header is required");
        return error_response("edge", &e, id);
    };
    let host = if host.contains(':') {
        format!("[{host}]")
    } else {
        host.to_string()
    };
    let port = if https_port == 443 {
        String::new()
    } else {
        format!(":{https_port}")
    };
    let path = req.uri().path_and_query().map_or("/", |p| p.as_str());
    let location = format!("https://{host}{port}{path}");
    let mut resp = plain(
        StatusCode::PERMANENT_REDIRECT,
        id,
        format!("moved to {location}\n"),
    );
    match HeaderValue::from_str(&location) {
        Ok(v) => {
            resp.headers_mut().insert(header::LOCATION, v);
            resp
        }
        Err(_) => {
            let e = Error::new(ErrorKind::BadRequest)
                .context("the request target cannot be redirected");
            error_response("edge", &e, id)
        }
    }
}

impl Server {
    /// Binds `addr` (use port 0 for an ephemeral port).
    pub async fn bind(addr: SocketAddr, edge: Arc<Edge>) -> Result<Server, EdgeError> {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| EdgeError::Listen { addr, source })?;
        let local_addr = listener
            .local_addr()
            .map_err(|source| EdgeError::Listen { addr, source })?;
        Ok(Server {
            listener,
            local_addr,
            edge,
            mode: Mode::Plain,
        })
    }

    /// Binds `addr` for HTTPS with the certificates of `certs` (HTTP/1.1 and
    /// HTTP/2 by ALPN; each handshake bounded by the configured timeout).
    pub async fn bind_tls(
        addr: SocketAddr,
        edge: Arc<Edge>,
        certs: &Arc<tls::CertStore>,
    ) -> Result<Server, EdgeError> {
        let config = certs
            .server_config()
            .map_err(|e| EdgeError::Tls(e.to_string()))?;
        let mut server = Self::bind(addr, edge).await?;
        server.mode = Mode::Tls {
            acceptor: tokio_rustls::TlsAcceptor::from(config),
            handshake_timeout: certs.handshake_timeout(),
        };
        Ok(server)
    }

    /// Makes this (plain) listener answer every request with a redirect to
    /// HTTPS on `https_port` instead of serving it.
    pub fn redirect_to_https(mut self, https_port: u16) -> Server {
        self.mode = Mode::Redirect { https_port };
        self
    }

    /// The bound address.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    fn builder(config: &ServerConfig) -> auto::Builder<TokioExecutor> {
        let mut builder = auto::Builder::new(TokioExecutor::new());
        builder
            .http1()
            .timer(TokioTimer::new())
            .keep_alive(true)
            .max_buf_size(config.max_header_bytes.max(8192))
            .max_headers(config.max_headers)
            .header_read_timeout(config.header_read_timeout);
        let h2 = &config.http2;
        builder
            .http2()
            .timer(TokioTimer::new())
            .max_header_list_size(config.max_header_bytes as u32)
            .max_concurrent_streams(h2.max_concurrent_streams)
            .initial_stream_window_size(h2.stream_window)
            .initial_connection_window_size(h2.connection_window)
            .max_pending_accept_reset_streams(h2.max_pending_resets as usize)
            .max_local_error_reset_streams(h2.max_error_resets as usize)
            .keep_alive_interval(Some(h2.keepalive_interval))
            .keep_alive_timeout(h2.keepalive_timeout);
        builder
    }

    /// Serves until `shutdown` resolves, then stops accepting and gives
    /// in-flight requests `shutdown_grace` to finish.
    ///
    /// Every connection thread ([`threads`]) accepts on the listener itself
    /// and serves what it accepts, unless another thread has fewer
    /// connections open: then the connection is handed to that one, so
    /// keep-alive connections spread evenly however they arrive.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<(), EdgeError> {
        let (addr, grace) = (self.local_addr, self.edge.server.shutdown_grace);
        let failed = |source| EdgeError::Listen { addr, source };
        let threads = self.edge.threads.lease().map_err(failed)?;
        let listener = self.listener.into_std().map_err(failed)?;
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let caps = conn::Caps::new(&self.edge.server);
        let (running, mut accepting) = tokio::sync::mpsc::channel::<()>(1);
        let acceptor = Arc::new(Acceptor {
            mode: self.mode,
            builder: Self::builder(&self.edge.server),
            limits: conn::WatchLimits::new(&self.edge.server),
            edge: self.edge,
            caps: caps.clone(),
            threads: Arc::downgrade(&threads),
            stop: stop_rx,
            failed_accepts: AtomicU64::new(0),
        });
        for here in 0..threads.len() {
            let listener = listener.try_clone().map_err(failed)?;
            let (acceptor, running) = (acceptor.clone(), running.clone());
            threads.spawn_on(here, move || async move {
                acceptor.accept_loop(here, listener).await;
                drop(running);
            });
        }
        drop((listener, running, acceptor));
        shutdown.await;
        let _ = stop_tx.send(true);
        // Every accept loop has let go of its copy of the listener: nothing
        // listens any more.
        let _ = accepting.recv().await;
        tracing::info!(
            ?grace,
            "shutting down: no longer accepting; waiting for in-flight requests"
        );
        match tokio::time::timeout(grace, caps.all_closed()).await {
            Ok(()) => tracing::info!("all connections closed"),
            Err(_) => tracing::warn!("grace period over; closing remaining connections"),
        }
        // The last listener to stop ends the connection threads, closing
        // what is left on them.
        drop(threads);
        Ok(())
    }
}

/// Resolves once the listener is told to stop (or its run was dropped).
async fn stopped(stop: &mut tokio::sync::watch::Receiver<bool>) {
    let _ = stop.wait_for(|stop| *stop).await;
}

/// What every accept loop of one listener shares.
struct Acceptor {
    mode: Mode,
    edge: Arc<Edge>,
    builder: auto::Builder<TokioExecutor>,
    limits: conn::WatchLimits,
    caps: Arc<conn::Caps>,
    /// Weak: connections hold the acceptor, and must not keep the threads
    /// (and so themselves) alive past the listener's grace period.
    threads: std::sync::Weak<threads::Pool>,
    stop: tokio::sync::watch::Receiver<bool>,
    /// Accepts failed since the last that worked, on any thread.
    failed_accepts: AtomicU64,
}

impl Acceptor {
    /// Accepts on connection thread `here` until told to stop.
    async fn accept_loop(self: Arc<Self>, here: usize, listener: std::net::TcpListener) {
        let listener = match TcpListener::from_std(listener) {
            Ok(listener) => listener,
            Err(e) => {
                tracing::error!(error = %e, thread = here, "a connection thread cannot accept");
                return;
            }
        };
        let mut stop = self.stop.clone();
        loop {
            // At the node's cap, wait for a connection to close: new clients
            // wait in the listen backlog instead of taking descriptors.
            let permit = tokio::select! {
                permit = self.caps.reserve() => permit,
                () = stopped(&mut stop) => break,
            };
            let (stream, peer) = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok(conn) => {
                        if self.failed_accepts.load(Ordering::Relaxed) > 0 {
                            let failed_accepts = self.failed_accepts.swap(0, Ordering::Relaxed);
                            if failed_accepts > 0 {
                                tracing::warn!(failed_accepts, "accepting connections again");
                            }
                        }
                        conn
                    }
                    Err(e) => {
                        // Out of file descriptors and the like: back off and
                        // keep serving. One line per outage (counted over
                        // all threads), not per retry.
                        if self.failed_accepts.fetch_add(1, Ordering::Relaxed) == 0 {
                            tracing::warn!(error = %e, "accept failed; retrying every 10 ms");
                        }
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        continue;
                    }
                },
                () = stopped(&mut stop) => break,
            };
            let Some(slot) = self.caps.admit(peer.ip(), permit) else {
                tracing::debug!(%peer, "connection refused: max_connections_per_ip reached");
                continue;
            };
            let _ = stream.set_nodelay(true);
            // Only gone if the listener's run was dropped without a stop.
            let Some(threads) = self.threads.upgrade() else {
                break;
            };
            let there = threads.place(here);
            if there == here {
                let load = threads.open(here);
                tokio::spawn(self.clone().serve((stream, peer), slot, load));
                continue;
            }
            // Moved to the other thread: deregistered from this thread's
            // reactor here, registered with that thread's there.
            let stream = match stream.into_std() {
                Ok(stream) => stream,
                Err(e) => {
                    tracing::debug!(%peer, error = %e, "accepted connection lost");
                    continue;
                }
            };
            let (me, load) = (self.clone(), threads.open(there));
            threads.spawn_on(there, move || async move {
                match tokio::net::TcpStream::from_std(stream) {
                    Ok(stream) => me.serve((stream, peer), slot, load).await,
                    Err(e) => tracing::debug!(%peer, error = %e, "accepted connection lost"),
                }
            });
        }
    }

    async fn serve(
        self: Arc<Self>,
        conn: (tokio::net::TcpStream, SocketAddr),
        slot: conn::Slot,
        _load: threads::Open,
    ) {
        serve_connection(
            conn,
            &self.mode,
            self.edge.clone(),
            &self.builder,
            conn::Watch::new(self.limits),
            self.stop.clone(),
            slot,
        )
        .await;
    }
}

/// One accepted connection: the TLS handshake first (bounded), then HTTP
/// under its [`conn::Watch`].
async fn serve_connection(
    (stream, peer): (tokio::net::TcpStream, SocketAddr),
    mode: &Mode,
    edge: Arc<Edge>,
    builder: &auto::Builder<TokioExecutor>,
    watch: Arc<conn::Watch>,
    stop: tokio::sync::watch::Receiver<bool>,
    slot: conn::Slot,
) {
    let (redirect, https) = match mode {
        Mode::Plain => (None, false),
        Mode::Tls { .. } => (None, true),
        Mode::Redirect { https_port } => (Some(*https_port), false),
    };
    let head_limit = edge.server.max_header_bytes.max(8192);
    let watched = watch.clone();
    let service = hyper::service::service_fn(move |req| {
        let in_flight = watched.request();
        let (edge, watched) = (edge.clone(), watched.clone());
        async move {
            // One table for the whole request (a deploy swaps the next).
            let table = edge.table.load_full();
            let mut exchange = table.traffic.begin(&req, peer);
            let resp = match redirect {
                Some(port) => redirect_response(&req, port, exchange.id()),
                None => {
                    edge.handle(&table, req, Peer { addr: peer, https }, &mut exchange)
                        .await
                }
            };
            exchange.responded(resp.status());
            Ok::<_, Infallible>(resp.map(|body| watched.track(body, in_flight, exchange)))
        }
    });
    match mode {
        Mode::Tls {
            acceptor,
            handshake_timeout,
        } => {
            let tls = match tokio::time::timeout(*handshake_timeout, acceptor.accept(stream)).await
            {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => {
                    tracing::debug!(error = %e, "TLS handshake failed");
                    return;
                }
                Err(_) => {
                    tracing::debug!(?handshake_timeout, "TLS handshake timed out");
                    return;
                }
            };
            // HTTP/1 heads are checked before hyper reads them (framing.rs);
            // an HTTP/2 connection has no such framing.
            let io = if tls.get_ref().1.alpn_protocol() == Some(b"h2") {
                framing::Framed::off(tls)
            } else {
                framing::Framed::new(tls, head_limit)
            };
            let conn = builder
                .serve_connection_with_upgrades(TokioIo::new(io), service)
                .into_owned();
            serve_watched(conn, watch, stop, slot).await;
        }
        Mode::Plain | Mode::Redirect { .. } => {
            let io = framing::Framed::new(stream, head_limit);
            let conn = builder
                .serve_connection_with_upgrades(TokioIo::new(io), service)
                .into_owned();
            serve_watched(conn, watch, stop, slot).await;
        }
    }
}

/// Drives one connection under its [`conn::Watch`]: closed when the watch
/// says so, drained when the server shuts down. `slot` (its share of the
/// connection caps) is released when it ends.
async fn serve_watched<C>(
    conn: C,
    watch: Arc<conn::Watch>,
    mut stop: tokio::sync::watch::Receiver<bool>,
    slot: conn::Slot,
) where
    C: Future<Output = Result<(), Box<dyn std::error::Error + Send + Sync>>> + Drains,
{
    let mut conn = std::pin::pin!(conn);
    let mut draining = false;
    let mut next = watch.verdict(tokio::time::Instant::now());
    loop {
        let wake = match next {
            conn::Verdict::Wait(at) => at,
            conn::Verdict::Drain => {
                if !draining {
                    tracing::debug!("connection idle: closing gracefully");
                    conn.as_mut().drain();
                    draining = true;
                }
                tokio::time::Instant::now() + Duration::from_secs(1)
            }
            conn::Verdict::Close(why) => {
                tracing::debug!(reason = why, "connection closed");
                break;
            }
        };
        tokio::select! {
            ended = conn.as_mut() => {
                if let Err(e) = ended {
                    tracing::debug!(error = %e, "connection ended with an error");
                }
                break;
            }
            changed = stop.changed(), if !draining => {
                if changed.is_err() || *stop.borrow() {
                    conn.as_mut().drain();
                    draining = true;
                }
                continue;
            }
            () = tokio::time::sleep_until(wake) => {}
        }
        next = watch.verdict(tokio::time::Instant::now());
    }
    drop(slot);
}

/// A connection that can be asked to finish its requests and close.
trait Drains {
    fn drain(self: std::pin::Pin<&mut Self>);
}

impl<I, S, E, B> Drains for hyper_util::server::conn::auto::UpgradeableConnection<'static, I, S, E>
where
    S: hyper::service::HttpService<Incoming, ResBody = B>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    I: hyper::rt::Read + hyper::rt::Write + Unpin,
    B: http_body::Body + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    E: hyper_util::server::conn::auto::HttpServerConnExec<S::Future, B>,
{
    fn drain(self: std::pin::Pin<&mut Self>) {
        self.graceful_shutdown();
    }
}
