//! The reverse proxy: routes with `upstream = "NAME"` go to one of the
//! origins of `[upstreams.NAME]` (docs/proxy.md).
//!
//! Invariants:
//! - Bodies stream both ways with backpressure: nothing is buffered whole.
//!   The request body is cut at `max_body` (413). A body that stops moving
//!   for `body_timeout`, either way, is ended: 408 for a stalled upload, a
//!   cut (never a clean end) for a stalled response.
//! - A request is retried on another origin only when that cannot change
//!   what the origin does: an idempotent method (RFC 9110 9.2.2) without a
//!   body, whose origin failed before sending a response head (refused,
//!   reset, not HTTP). Timeouts are not retried (504): retrying a slow
//!   origin multiplies the load that made it slow. Each request adds
//!   `retry_budget` to a shared budget and each retry takes one whole
//!   retry from it (10 in reserve, at most 100 saved), so retries stay
//!   below `retry_budget` × requests + 100 whatever fails.
//! - Hop-by-hop fields never cross; forwarding headers are believed only
//!   from `server.trusted_proxies` ([`headers`]).
//! - An error is the runtime's one [`Error`] type: 502 when the origin is
//!   unreachable, resets, answers garbage or none is usable, 504 when it
//!   does not answer in time; the client sees the request id, the log the
//!   cause.
//! - WebSocket (HTTP/1.1 `Upgrade: websocket`) is passed through: after the
//!   origin's 101 both connections are joined until either closes or no
//!   byte moves for `websocket_idle_timeout`, at most `max_websockets` at
//!   once per upstream (503 past it; 0 refuses WebSocket).
//! - Health checks belong to their upstream: dropping it (a new
//!   configuration) stops them.

mod balance;
pub(crate) mod headers;
mod origin;
mod pool;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, Uri, Version, header};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use ignis_config::{Balance, HashKey, HostRewrite, IpRange, UpstreamConfig};
use ignis_runtime::{Body, BoxError, Error, ErrorKind, RequestId, TRACEPARENT, X_REQUEST_ID};
use tokio::sync::Semaphore;
use tokio_rustls::rustls;

use balance::{Candidates, Picker, hash64};
pub(crate) use headers::is_websocket;
use origin::{InFlight, Origin, ProxyBody};

/// One origin's state and counters at one moment ([`Upstream::origin_stats`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OriginStats {
    /// Its URL.
    pub url: String,
    /// Whether it takes requests now (healthy and not ejected).
    pub usable: bool,
    /// Requests it is serving now.
    pub in_flight: u64,
    /// Requests sent to it so far.
    pub sent: u64,
    /// Of those, how many failed (unreachable, reset, bad response, timeout).
    pub failed: u64,
}

/// An upstream: its origins, how it picks one, its retry budget.
pub struct Upstream {
    config: UpstreamConfig,
    name: Arc<str>,
    origins: Vec<Arc<Origin>>,
    picker: Picker,
    budget: RetryBudget,
    trusted: Arc<[IpRange]>,
    tunnels: Arc<Semaphore>,
    checks: Vec<tokio::task::AbortHandle>,
    /// Itself, for the futures guests' calls return.
    self_ref: std::sync::Weak<Upstream>,
}

impl Drop for Upstream {
    fn drop(&mut self) {
        for check in &self.checks {
            check.abort();
        }
    }
}

/// Where a request came from.
#[derive(Debug, Clone, Copy)]
pub struct Peer {
    /// The client's socket address (or the last proxy's).
    pub addr: SocketAddr,
    /// Whether it came over TLS.
    pub https: bool,
}

impl Upstream {
    /// Builds the upstream and starts its health checks (on the current
    /// tokio runtime). Fails when its CA file cannot be read.
    pub fn new(config: &UpstreamConfig, trusted: &[IpRange]) -> Result<Arc<Upstream>, String> {
        let roots = match &config.tls_ca {
            None => None,
            Some(path) => Some(load_roots(path)?),
        };
        let mut tls = ignis_runtime::outbound::client_tls(config.tls_verify, roots);
        tls.alpn_protocols = if config.http2 {
            vec![b"h2".to_vec(), b"http/1.1".to_vec()]
        } else {
            vec![b"http/1.1".to_vec()]
        };
        tls.resumption = rustls::client::Resumption::default();
        let tls = Arc::new(tls);
        let origins = config
            .origins
            .iter()
            .map(|o| Origin::new(o, config, &tls).map(Arc::new))
            .collect::<Result<Vec<_>, _>>()?;
        let urls: Vec<String> = origins.iter().map(|o| o.url.clone()).collect();
        let name: Arc<str> = config.name.as_str().into();
        let mut checks = Vec::new();
        if let Some(health) = &config.health {
            for o in &origins {
                let host = match &config.host {
                    HostRewrite::Fixed(h) => HeaderValue::from_str(h),
                    _ => HeaderValue::from_str(o.authority.as_str()),
                }
                .map_err(|e| format!("upstream {}: health check host: {e}", config.name))?;
                let task = tokio::spawn(origin::check_loop(
                    Arc::downgrade(o),
                    health.clone(),
                    host,
                    name.clone(),
                ));
                checks.push(task.abort_handle());
            }
        }
        Ok(Arc::new_cyclic(|self_ref| Upstream {
            self_ref: self_ref.clone(),
            picker: Picker::new(&config.balance, &urls),
            budget: RetryBudget::new(config.retry_budget),
            config: config.clone(),
            name,
            origins,
            trusted: trusted.into(),
            tunnels: Arc::new(Semaphore::new(config.max_websockets as usize)),
            checks,
        }))
    }

    /// The upstream's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Requests sent to each origin so far, by URL (tests and metrics).
    pub fn sent(&self) -> Vec<(String, u64)> {
        self.origins
            .iter()
            .map(|o| (o.url.clone(), o.sent.load(Ordering::Relaxed)))
            .collect()
    }

    /// Each origin's state and counters, in configuration order.
    pub fn origin_stats(&self) -> Vec<OriginStats> {
        self.origins
            .iter()
            .map(|o| OriginStats {
                url: o.url.clone(),
                usable: o.usable(),
                in_flight: o.in_flight.load(Ordering::Relaxed),
                sent: o.sent.load(Ordering::Relaxed),
                failed: o.failed.load(Ordering::Relaxed),
            })
            .collect()
    }

    /// Whether each origin takes requests now, by URL.
    pub fn usable(&self) -> Vec<(String, bool)> {
        self.origins
            .iter()
            .map(|o| (o.url.clone(), o.usable()))
            .collect()
    }

    /// Proxies `req` (request `id`, from `peer`; `None`: a guest's call
    /// through its route's upstream) to one of the origins.
    pub async fn forward<B>(
        &self,
        mut req: Request<B>,
        peer: Option<Peer>,
        id: RequestId,
    ) -> Result<Response<Body>, Error>
    where
        B: http_body::Body<Data = Bytes> + Send + Unpin + 'static,
        B::Error: Into<ignis_runtime::HttpError>,
    {
        let max_body = self.config.max_body_bytes;
        let declared = req
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok());
        if declared.is_some_and(|len| len > max_body) {
            return Err(body_too_large(max_body));
        }
        let client_ip = match peer {
            Some(peer) => headers::client_ip(req.headers(), peer.addr.ip(), &self.trusted),
            // A guest's call: every one comes from this node.
            None => IpAddr::V4(std::net::Ipv4Addr::LOCALHOST),
        };
        let key = match &self.config.balance {
            Balance::Hash { key, .. } => hash_key(&req, key, client_ip),
            _ => None,
        };
        let websocket = peer.is_some() && is_websocket(&req);
        let tunnel = if websocket {
            let Ok(permit) = self.tunnels.clone().try_acquire_owned() else {
                return Err(
                    Error::shed(ErrorKind::Overloaded, std::time::Duration::from_secs(1))
                        .context("too many WebSocket connections through this upstream"),
                );
            };
            Some((hyper::upgrade::on(&mut req), permit))
        } else {
            None
        };
        let host = request_authority(&req).unwrap_or_default();
        let (mut parts, mut incoming) = req.into_parts();
        let mut bodyless = incoming.is_end_stream()
            || (declared == Some(0) && !parts.headers.contains_key(header::TRANSFER_ENCODING));
        // A body that has already ended (a guest's GET whose empty body it
        // finished before sending) counts as none; a frame already there
        // is kept and sent first. Nothing waits here.
        let mut first = None;
        if !bodyless && declared.is_none() && idempotent(&parts.method) {
            let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
            match std::pin::Pin::new(&mut incoming).poll_frame(&mut cx) {
                std::task::Poll::Ready(None) => bodyless = true,
                std::task::Poll::Ready(Some(Ok(frame))) => first = Some(frame),
                std::task::Poll::Ready(Some(Err(e))) => {
                    return Err(Error::new(ErrorKind::BadRequest)
                        .context("the request body could not be read")
                        .with_source(e.into()));
                }
                std::task::Poll::Pending => {}
            }
        }
        let retryable = idempotent(&parts.method) && bodyless && !websocket;
        // Set if the client's body stalled past body_timeout.
        let mut stalled = None;
        let (body, exceeded): (ProxyBody, _) = if bodyless {
            (empty(), None)
        } else {
            let incoming = Prefixed {
                first,
                rest: incoming,
            };
            let incoming = Idle::new(incoming, self.config.body_timeout);
            stalled = Some(incoming.fired.clone());
            let (limited, exceeded) = crate::body::Limited::new(incoming, max_body);
            let limited =
                limited.map_err(|e: ignis_runtime::HttpError| -> BoxError { Box::new(e) });
            (limited.boxed_unsync(), Some(exceeded))
        };
        headers::strip_hop_by_hop(&mut parts.headers, websocket);
        match peer {
            Some(peer) => {
                let hop = headers::Hop {
                    peer: peer.addr,
                    https: peer.https,
                    host: &host,
                    proxies: &self.trusted,
                };
                headers::add_forwarding(&mut parts.headers, &hop, parts.version);
            }
            // A guest's request says what it says; only Via is added.
            None => headers::add_via(&mut parts.headers, parts.version),
        }
        parts.headers.insert(X_REQUEST_ID, id.header());
        if peer.is_some() || !parts.headers.contains_key(&TRACEPARENT) {
            parts.headers.insert(TRACEPARENT, id.traceparent());
        }
        match &self.config.host {
            HostRewrite::Preserve => {
                if let Ok(v) = HeaderValue::from_str(&host) {
                    parts.headers.insert(header::HOST, v);
                }
            }
            HostRewrite::Fixed(h) => {
                if let Ok(v) = HeaderValue::from_str(h) {
                    parts.headers.insert(header::HOST, v);
                }
            }
            // Set per origin below.
            HostRewrite::Origin => {}
        }
        let path = parts
            .uri
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/"));
        self.budget.deposit();
        let mut body = Some(body);
        let mut tried: Vec<usize> = Vec::new();
        loop {
            let usable = Usable {
                origins: &self.origins,
                tried: &tried,
            };
            let Some(i) = self.picker.pick(&usable, key) else {
                let why = if tried.is_empty() {
                    "no origin is usable (all unhealthy or ejected)"
                } else {
                    "the origin failed and no other may be tried"
                };
                return Err(Error::new(ErrorKind::BadGateway).context(why));
            };
            tried.push(i);
            let origin = &self.origins[i];
            let mut uri = http::uri::Parts::default();
            uri.scheme = Some(origin.scheme.clone());
            uri.authority = Some(origin.authority.clone());
            uri.path_and_query = Some(path.clone());
            let uri = Uri::from_parts(uri).map_err(|e| {
                Error::new(ErrorKind::BadRequest)
                    .context("bad request target")
                    .with_source(e)
            })?;
            let mut out = Request::new(body.take().unwrap_or_else(empty));
            *out.method_mut() = parts.method.clone();
            *out.uri_mut() = uri;
            *out.version_mut() = Version::HTTP_11;
            // The last attempt takes the headers; earlier ones copy them.
            let last = !retryable || tried.len() > self.config.retries as usize;
            *out.headers_mut() = if last {
                std::mem::take(&mut parts.headers)
            } else {
                parts.headers.clone()
            };
            if self.config.host == HostRewrite::Origin {
                out.headers_mut().insert(
                    header::HOST,
                    HeaderValue::from_str(origin.authority.as_str())
                        .unwrap_or(HeaderValue::from_static("localhost")),
                );
            }
            let in_flight = origin.start();
            let sent =
                tokio::time::timeout(self.config.response_timeout, origin.send(out, websocket))
                    .await;
            let e = match sent {
                Ok(Ok(resp)) => {
                    origin.succeeded();
                    return self.respond(resp, in_flight, tunnel, id);
                }
                Err(_) => {
                    origin.failed(&self.name);
                    return Err(Error::new(ErrorKind::GatewayTimeout).context(format!(
                        "the origin did not answer within {:?}",
                        self.config.response_timeout
                    )));
                }
                Ok(Err(e)) => e,
            };
            if exceeded.as_ref().is_some_and(|x| x.get()) {
                return Err(body_too_large(max_body));
            }
            if client_body_failed(&e) {
                if stalled.as_ref().is_some_and(|s| s.load(Ordering::Relaxed)) {
                    return Err(Error::new(ErrorKind::RequestTimeout).context(format!(
                        "no request body data for {:?}",
                        self.config.body_timeout
                    )));
                }
                return Err(Error::new(ErrorKind::BadRequest)
                    .context("the request body could not be read")
                    .with_source(e));
            }
            origin.failed(&self.name);
            let may_retry =
                retryable && tried.len() <= self.config.retries as usize && self.budget.withdraw();
            if !may_retry {
                return Err(Error::new(ErrorKind::BadGateway)
                    .context("the origin could not be reached or did not answer")
                    .with_source(format!("{}: {}", origin.url, error_chain(&e))));
            }
            tracing::debug!(upstream = %self.name, origin = %origin.url, error = %error_chain(&e), request_id = %id, "retrying on another origin");
        }
    }

    /// The origin's response, made ours: hop-by-hop fields dropped, `Via`
    /// and the request id added, the origin counted in flight until the
    /// body ends; a 101 joins the two connections.
    fn respond(
        &self,
        mut resp: Response<origin::OriginBody>,
        in_flight: InFlight,
        tunnel: Option<(hyper::upgrade::OnUpgrade, tokio::sync::OwnedSemaphorePermit)>,
        id: RequestId,
    ) -> Result<Response<Body>, Error> {
        let switching = resp.status() == StatusCode::SWITCHING_PROTOCOLS;
        if switching {
            let Some((client, permit)) = tunnel else {
                return Err(Error::new(ErrorKind::BadGateway)
                    .context("the origin switched protocols unasked"));
            };
            let origin = hyper::upgrade::on(&mut resp);
            let name = self.name.clone();
            let idle = self.config.websocket_idle_timeout;
            tokio::spawn(async move {
                let _held = (in_flight, permit);
                match tokio::try_join!(client, origin) {
                    Ok((client, origin)) => {
                        let ended =
                            join_tunnel(TokioIo::new(client), TokioIo::new(origin), idle).await;
                        tracing::debug!(upstream = %name, request_id = %id, ended, "WebSocket closed");
                    }
                    Err(e) => {
                        tracing::debug!(upstream = %name, request_id = %id, error = %e, "WebSocket upgrade failed");
                    }
                }
            });
            let (mut parts, _) = resp.into_parts();
            headers::strip_hop_by_hop(&mut parts.headers, true);
            headers::add_via(&mut parts.headers, parts.version);
            parts.headers.insert(X_REQUEST_ID, id.header());
            parts.version = Version::HTTP_11;
            return Ok(Response::from_parts(parts, empty_body()));
        }
        let (mut parts, body) = resp.into_parts();
        headers::strip_hop_by_hop(&mut parts.headers, false);
        headers::add_via(&mut parts.headers, parts.version);
        parts.headers.insert(X_REQUEST_ID, id.header());
        parts.version = Version::HTTP_11;
        let body = Idle::new(body, self.config.body_timeout)
            .map_err(|e| -> BoxError { Box::new(e) })
            .map_frame(move |frame| {
                // The origin has this request in flight until its body ends.
                let _ = &in_flight;
                frame
            })
            .boxed_unsync();
        Ok(Response::from_parts(parts, body))
    }
}

impl ignis_runtime::outbound::UpstreamClient for Upstream {
    fn send(
        &self,
        request: Request<ignis_runtime::GuestBody>,
        request_id: RequestId,
    ) -> ignis_runtime::outbound::UpstreamFuture {
        use ignis_runtime::HttpError;
        // The upstream outlives the guest's call only through this future,
        // which the guest's store drops with it; the work is all here.
        let this = self.self_ref.upgrade();
        Box::pin(async move {
            let Some(this) = this else {
                return Err(HttpError::DestinationUnavailable);
            };
            match this.forward(request, None, request_id).await {
                Ok(resp) => Ok(resp.map(|b| {
                    b.map_err(|e| HttpError::InternalError(Some(e.to_string())))
                        .boxed_unsync()
                })),
                Err(e) => {
                    // Logged here, once: the guest sees only the code.
                    e.log(&this.name, request_id);
                    Err(match e.kind() {
                        ErrorKind::GatewayTimeout => HttpError::HttpResponseTimeout,
                        ErrorKind::BodyTooLarge => HttpError::HttpRequestBodySize(None),
                        ErrorKind::Overloaded => HttpError::ConnectionLimitReached,
                        _ => HttpError::DestinationUnavailable,
                    })
                }
            }
        })
    }
}

/// Copies bytes both ways between `a` and `b` until either side closes or
/// fails, or nothing moves for `idle`; says which.
async fn join_tunnel<A, B>(a: A, b: B, idle: std::time::Duration) -> &'static str
where
    A: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    B: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (mut ar, mut aw) = tokio::io::split(a);
    let (mut br, mut bw) = tokio::io::split(b);
    let (mut abuf, mut bbuf) = (vec![0u8; 16 * 1024], vec![0u8; 16 * 1024]);
    loop {
        let moved = tokio::time::timeout(idle, async {
            tokio::select! {
                n = ar.read(&mut abuf) => match n {
                    Ok(0) | Err(_) => Err("client closed"),
                    Ok(n) => bw.write_all(&abuf[..n]).await.map_err(|_| "origin closed"),
                },
                n = br.read(&mut bbuf) => match n {
                    Ok(0) | Err(_) => Err("origin closed"),
                    Ok(n) => aw.write_all(&bbuf[..n]).await.map_err(|_| "client closed"),
                },
            }
        })
        .await;
        match moved {
            Ok(Ok(())) => {}
            Ok(Err(why)) => {
                let _ = aw.shutdown().await;
                let _ = bw.shutdown().await;
                return why;
            }
            Err(_) => return "idle",
        }
    }
}

/// A body whose next frame must come within `timeout` of the previous one
/// (or of when the body was made); past it the body ends in an error and
/// `fired` is set. A stalled origin or a trickling client cannot hold a
/// connection for longer than that per frame.
///
/// The timer is made the first time the body has to wait: a response whose
/// frames are there when hyper asks (most small ones) never touches the
/// timer wheel. Each frame notes the time instead (a clock read).
struct Idle<B> {
    inner: B,
    timeout: std::time::Duration,
    /// The last frame (or the body's making): the window starts there.
    since: tokio::time::Instant,
    timer: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
    fired: Arc<std::sync::atomic::AtomicBool>,
}

impl<B> Idle<B> {
    fn new(inner: B, timeout: std::time::Duration) -> Self {
        Idle {
            inner,
            timeout,
            since: tokio::time::Instant::now(),
            timer: None,
            fired: Arc::default(),
        }
    }
}

impl<B> http_body::Body for Idle<B>
where
    B: http_body::Body<Data = Bytes> + Unpin,
    B::Error: Into<ignis_runtime::HttpError>,
{
    type Data = Bytes;
    type Error = ignis_runtime::HttpError;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        match std::pin::Pin::new(&mut this.inner).poll_frame(cx) {
            std::task::Poll::Ready(frame) => {
                this.since = tokio::time::Instant::now();
                std::task::Poll::Ready(frame.map(|f| f.map_err(Into::into)))
            }
            std::task::Poll::Pending => {
                let deadline = this.since + this.timeout;
                let timer = match &mut this.timer {
                    Some(timer) => {
                        if timer.deadline() != deadline {
                            timer.as_mut().reset(deadline);
                        }
                        timer
                    }
                    None => this
                        .timer
                        .insert(Box::pin(tokio::time::sleep_until(deadline))),
                };
                if timer.as_mut().poll(cx).is_ready() {
                    this.fired.store(true, Ordering::Relaxed);
                    let why = format!("no body data for {:?}", this.timeout);
                    tracing::debug!(reason = %why, "body timed out");
                    return std::task::Poll::Ready(Some(Err(
                        ignis_runtime::HttpError::InternalError(Some(why)),
                    )));
                }
                std::task::Poll::Pending
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// A body with one frame read ahead of the rest.
struct Prefixed<B> {
    first: Option<http_body::Frame<Bytes>>,
    rest: B,
}

impl<B: http_body::Body<Data = Bytes> + Unpin> http_body::Body for Prefixed<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, B::Error>>> {
        if let Some(frame) = self.first.take() {
            return std::task::Poll::Ready(Some(Ok(frame)));
        }
        std::pin::Pin::new(&mut self.rest).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.first.is_none() && self.rest.is_end_stream()
    }
}

/// The origins a request may still go to.
struct Usable<'a> {
    origins: &'a [Arc<Origin>],
    tried: &'a [usize],
}

impl Candidates for Usable<'_> {
    fn len(&self) -> usize {
        self.origins.len()
    }

    fn usable(&self, i: usize) -> bool {
        !self.tried.contains(&i) && self.origins[i].usable()
    }

    fn in_flight(&self, i: usize) -> u64 {
        self.origins[i].in_flight()
    }
}

/// Retries allowed across all requests of an upstream, in thousandths:
/// each request adds `ratio`, each retry takes a whole one.
struct RetryBudget {
    per_request: u64,
    milli: AtomicU64,
}

impl RetryBudget {
    const RESERVE: u64 = 10_000;
    const MAX: u64 = 100_000;

    fn new(ratio: f64) -> RetryBudget {
        RetryBudget {
            per_request: (ratio * 1000.0).round() as u64,
            milli: AtomicU64::new(Self::RESERVE),
        }
    }

    fn deposit(&self) {
        let _ = self
            .milli
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |m| {
                Some((m + self.per_request).min(Self::MAX))
            });
    }

    fn withdraw(&self) -> bool {
        self.milli
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |m| {
                m.checked_sub(1000)
            })
            .is_ok()
    }
}

/// Methods whose effect does not depend on how many times they are sent.
fn idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}

/// The value consistent hashing hashes for `req`, if it has one.
fn hash_key<B>(req: &Request<B>, key: &HashKey, client: IpAddr) -> Option<u64> {
    match key {
        HashKey::Header(name) => req.headers().get(name).map(|v| hash64(v.as_bytes())),
        HashKey::Cookie(name) => req
            .headers()
            .get_all(header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(';'))
            .filter_map(|c| c.trim().split_once('='))
            .find(|(k, _)| k == name)
            .map(|(_, v)| hash64(v.as_bytes())),
        HashKey::Path => Some(hash64(req.uri().path().as_bytes())),
        HashKey::ClientIp => Some(hash64(client.to_canonical().to_string().as_bytes())),
    }
}

/// `host[:port]` as the client named it.
fn request_authority<B>(req: &Request<B>) -> Option<String> {
    req.headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .map(str::to_string)
        .or_else(|| req.uri().authority().map(|a| a.to_string()))
}

/// Whether the client's request body (not the origin) failed the request.
fn client_body_failed(e: &origin::SendError) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(e);
    while let Some(s) = source {
        if let Some(h) = s.downcast_ref::<hyper::Error>()
            && h.is_user()
        {
            return true;
        }
        source = s.source();
    }
    false
}

/// `e` and its causes, for the log.
fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

fn body_too_large(max_body: u64) -> Error {
    Error::new(ErrorKind::BodyTooLarge).context(format!("the limit is {max_body} bytes"))
}

fn empty() -> ProxyBody {
    Empty::<Bytes>::new().map_err(|n| match n {}).boxed_unsync()
}

fn empty_body() -> Body {
    Empty::<Bytes>::new().map_err(|n| match n {}).boxed_unsync()
}

/// The roots in the PEM file `path`.
fn load_roots(path: &std::path::Path) -> Result<rustls::RootCertStore, String> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("{}: {e}", path.display()))?;
    let mut roots = rustls::RootCertStore::empty();
    let (added, _) = roots.add_parsable_certificates(certs);
    if added == 0 {
        return Err(format!("{}: no usable CA certificate", path.display()));
    }
    Ok(roots)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_retry_budget_bounds_retries_by_requests() {
        let budget = RetryBudget::new(0.2);
        // The reserve: ten retries with no requests.
        assert_eq!((0..20).filter(|_| budget.withdraw()).count(), 10);
        // Then one retry per five requests.
        for _ in 0..50 {
            budget.deposit();
        }
        assert_eq!((0..20).filter(|_| budget.withdraw()).count(), 10);
        // Savings are capped.
        for _ in 0..100_000 {
            budget.deposit();
        }
        assert_eq!((0..1000).filter(|_| budget.withdraw()).count(), 100);
    }

    #[test]
    fn only_idempotent_methods_are_retryable() {
        for m in ["GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"] {
            assert!(idempotent(&m.parse().unwrap()), "{m}");
        }
        for m in ["POST", "PATCH", "CONNECT"] {
            assert!(!idempotent(&m.parse().unwrap()), "{m}");
        }
    }
}
