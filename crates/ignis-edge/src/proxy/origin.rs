//! One origin of an upstream: its keep-alive pool, its connector (plain
//! or TLS with SNI and ALPN), its requests in flight and its health.
//!
//! Health has two sources, and an origin takes requests only when both
//! agree: active checks (`GET path` every `interval`; `unhealthy_after`
//! failures in a row mark it down, `healthy_after` successes up again; an
//! origin starts healthy so a fresh node serves before its first check)
//! and passive ejection (`eject_after` failures in a row of real requests
//! — unreachable, reset, timed out — take it out for `eject_for`, then it
//! gets requests again).

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::uri::{Authority, Scheme};
use http::{HeaderValue, Request, Response, Uri, header};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use ignis_config::{HealthCheckConfig, OriginConfig, UpstreamConfig};
use ignis_runtime::BoxError;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::ServerName;

/// A request body on its way to an origin.
pub(crate) type ProxyBody = UnsyncBoxBody<Bytes, BoxError>;

/// A response body on its way from an origin.
pub(crate) type OriginBody = UnsyncBoxBody<Bytes, hyper::Error>;

/// Why an origin gave no response head.
#[derive(Debug)]
pub(crate) enum SendError {
    /// Connecting (or the TLS handshake) failed or timed out.
    Connect(io::Error),
    /// The HTTP/1.1 exchange failed.
    Http(hyper::Error),
    /// hyper-util's pooled client failed (HTTP/2 origins).
    Pooled(hyper_util::client::legacy::Error),
}

impl std::fmt::Display for SendError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SendError::Connect(_) => f.write_str("connecting to the origin failed"),
            SendError::Http(_) => f.write_str("the HTTP exchange with the origin failed"),
            SendError::Pooled(_) => f.write_str("the pooled client failed"),
        }
    }
}

impl std::error::Error for SendError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            SendError::Connect(e) => Some(e),
            SendError::Http(e) => Some(e),
            SendError::Pooled(e) => Some(e),
        }
    }
}

/// An origin and its state.
pub(crate) struct Origin {
    /// `scheme://host:port`: how it is named in logs and on the hash ring.
    pub(crate) url: String,
    pub(crate) scheme: Scheme,
    pub(crate) authority: Authority,
    /// hyper-util's pooled client: HTTP/2 origins, and health checks.
    client: Client<Connector, ProxyBody>,
    /// HTTP/1.1 origins: connections driven by the requests that hold them
    /// (`None` when the upstream speaks HTTP/2).
    h1: Option<Arc<super::pool::Pool>>,
    connector: Connector,
    pub(crate) in_flight: AtomicU64,
    /// Active health: set by the checker.
    healthy: AtomicBool,
    /// The checker's run of equal results (positive: successes).
    streak: std::sync::atomic::AtomicI32,
    /// Passive health: failures of real requests in a row.
    failures: AtomicU32,
    /// Ejected until this many nanoseconds after [`epoch`].
    ejected_until: AtomicU64,
    eject_after: u32,
    eject_for: Duration,
    /// Requests sent and failures seen (for tests and metrics).
    pub(crate) sent: AtomicU64,
    pub(crate) failed: AtomicU64,
}

/// The instant origin timestamps count from.
fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

fn now_nanos() -> u64 {
    epoch().elapsed().as_nanos() as u64
}

impl Origin {
    /// The origin `config` of `upstream`, with the TLS settings `tls`
    /// (built once per upstream).
    pub(crate) fn new(
        config: &OriginConfig,
        upstream: &UpstreamConfig,
        tls: &Arc<rustls::ClientConfig>,
    ) -> Result<Origin, String> {
        let https = config.scheme == "https";
        let url = config.url();
        let authority: Authority = url
            .split_once("://")
            .map(|(_, a)| a)
            .unwrap_or_default()
            .parse()
            .map_err(|e| format!("origin {url}: {e}"))?;
        let tls = if https {
            let name = upstream
                .tls_server_name
                .clone()
                .unwrap_or_else(|| config.host.clone());
            let name = ServerName::try_from(name)
                .map_err(|e| format!("origin {url}: not a TLS server name: {e}"))?;
            Some((tokio_rustls::TlsConnector::from(tls.clone()), name))
        } else {
            None
        };
        let connector = Connector {
            host: config.host.clone(),
            port: config.port,
            tls,
            connect_timeout: upstream.connect_timeout,
        };
        let mut builder = Client::builder(TokioExecutor::new());
        builder
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .pool_idle_timeout(upstream.pool_idle_timeout)
            .pool_max_idle_per_host(upstream.pool_size)
            .http2_only(upstream.http2 && !https);
        Ok(Origin {
            url,
            scheme: if https { Scheme::HTTPS } else { Scheme::HTTP },
            authority,
            client: builder.build(connector.clone()),
            h1: (!upstream.http2)
                .then(|| super::pool::Pool::new(upstream.pool_size, upstream.pool_idle_timeout)),
            connector,
            in_flight: AtomicU64::new(0),
            healthy: AtomicBool::new(true),
            streak: std::sync::atomic::AtomicI32::new(0),
            failures: AtomicU32::new(0),
            ejected_until: AtomicU64::new(0),
            eject_after: upstream.eject_after,
            eject_for: upstream.eject_for,
            sent: AtomicU64::new(0),
            failed: AtomicU64::new(0),
        })
    }

    /// Whether it may take a request now.
    pub(crate) fn usable(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
            && now_nanos() >= self.ejected_until.load(Ordering::Relaxed)
    }

    /// Requests in flight (head sent, response body not finished).
    pub(crate) fn in_flight(&self) -> u64 {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Counts a request in flight until the guard is dropped.
    pub(crate) fn start(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        self.sent.fetch_add(1, Ordering::Relaxed);
        InFlight(self.clone())
    }

    /// Sends `req` (its URI already names this origin) and waits for the
    /// response head. An `upgrade` (WebSocket) goes through the pooled
    /// client, whose connection task completes the upgrade on its own.
    pub(crate) async fn send(
        &self,
        req: Request<ProxyBody>,
        upgrade: bool,
    ) -> Result<Response<OriginBody>, SendError> {
        let Some(pool) = self.h1.as_ref().filter(|_| !upgrade) else {
            return match self.client.request(req).await {
                Ok(resp) => Ok(resp.map(|b| b.boxed_unsync())),
                Err(e) => Err(SendError::Pooled(e)),
            };
        };
        let (mut conn, reused) = match pool.take() {
            Some(conn) => (conn, true),
            None => (self.connect_h1().await?, false),
        };
        let resp = match conn.send(req).await {
            Ok(resp) => resp,
            // A kept connection the origin closed just before the request
            // went out (its idle timeout): the request was not written, so
            // it goes once more on a new connection, whatever its method.
            Err((e, Some(req))) if reused => {
                tracing::debug!(origin = %self.url, error = %e, "kept connection closed before use; reconnecting");
                conn = self.connect_h1().await?;
                conn.send(req).await.map_err(|(e, _)| SendError::Http(e))?
            }
            Err((e, _)) => return Err(SendError::Http(e)),
        };
        let pool = pool.clone();
        Ok(resp.map(|body| super::pool::Driven::new(body, conn, pool).boxed_unsync()))
    }

    /// A new HTTP/1.1 connection (within `connect_timeout`).
    async fn connect_h1(&self) -> Result<super::pool::H1, SendError> {
        let io = self
            .connector
            .clone()
            .connect_timed()
            .await
            .map_err(SendError::Connect)?;
        super::pool::H1::handshake(io)
            .await
            .map_err(SendError::Http)
    }

    /// A real request got an answer: the failure run ends.
    pub(crate) fn succeeded(&self) {
        self.failures.store(0, Ordering::Relaxed);
    }

    /// A real request failed at this origin (unreachable, reset, timed
    /// out): `eject_after` in a row eject it for `eject_for`.
    pub(crate) fn failed(&self, upstream: &str) {
        self.failed.fetch_add(1, Ordering::Relaxed);
        let run = self.failures.fetch_add(1, Ordering::Relaxed) + 1;
        if run >= self.eject_after {
            self.failures.store(0, Ordering::Relaxed);
            let until = now_nanos() + self.eject_for.as_nanos() as u64;
            self.ejected_until.store(until, Ordering::Relaxed);
            tracing::warn!(upstream, origin = %self.url, failures = run, eject_for = ?self.eject_for, "origin ejected");
        }
    }

    /// One active check: `GET path` with `host`, any 2xx or 3xx within
    /// `timeout` is healthy.
    async fn check(&self, config: &HealthCheckConfig, host: &HeaderValue) -> bool {
        let uri = format!("{}://{}{}", self.scheme, self.authority, config.path);
        let Ok(uri) = uri.parse::<Uri>() else {
            return false;
        };
        let mut req = Request::new(Empty::<Bytes>::new().map_err(|n| match n {}).boxed_unsync());
        *req.uri_mut() = uri;
        req.headers_mut().insert(header::HOST, host.clone());
        req.headers_mut().insert(
            header::USER_AGENT,
            HeaderValue::from_static("ignis-health-check"),
        );
        match tokio::time::timeout(config.timeout, self.client.request(req)).await {
            Ok(Ok(resp)) => {
                let ok = resp.status().is_success() || resp.status().is_redirection();
                // Read (a bounded amount of) the body so the connection
                // can go back to the pool.
                let body = http_body_util::Limited::new(resp.into_body(), 64 * 1024).collect();
                let _ = tokio::time::timeout(config.timeout, body).await;
                ok
            }
            _ => false,
        }
    }

    /// Records a check's result; logs when the origin changes state.
    fn record_check(&self, ok: bool, config: &HealthCheckConfig, upstream: &str) {
        let streak = self.streak.load(Ordering::Relaxed);
        let streak = match (ok, streak) {
            (true, s) if s > 0 => s.saturating_add(1),
            (true, _) => 1,
            (false, s) if s < 0 => s.saturating_sub(1),
            (false, _) => -1,
        };
        self.streak.store(streak, Ordering::Relaxed);
        let healthy = self.healthy.load(Ordering::Relaxed);
        if healthy && streak <= -(config.unhealthy_after as i32) {
            self.healthy.store(false, Ordering::Relaxed);
            tracing::warn!(upstream, origin = %self.url, checks = -streak, "origin unhealthy");
        } else if !healthy && streak >= config.healthy_after as i32 {
            self.healthy.store(true, Ordering::Relaxed);
            tracing::info!(upstream, origin = %self.url, checks = streak, "origin healthy again");
        }
    }
}

/// Checks `origin` every `config.interval` while it exists.
pub(crate) async fn check_loop(
    origin: Weak<Origin>,
    config: HealthCheckConfig,
    host: HeaderValue,
    upstream: Arc<str>,
) {
    let mut tick = tokio::time::interval(config.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(origin) = origin.upgrade() else {
            return;
        };
        let ok = origin.check(&config, &host).await;
        origin.record_check(ok, &config, &upstream);
    }
}

/// A request in flight at an origin (for least-requests and bounded loads).
pub(crate) struct InFlight(Arc<Origin>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Connects to one origin: resolves, connects within `connect_timeout`
/// (across every address), and wraps in TLS (SNI, ALPN) for `https`.
#[derive(Clone)]
struct Connector {
    host: String,
    port: u16,
    tls: Option<(tokio_rustls::TlsConnector, ServerName<'static>)>,
    connect_timeout: Duration,
}

impl tower_service::Service<Uri> for Connector {
    type Response = TokioIo<OriginStream>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<Self::Response>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _uri: Uri) -> Self::Future {
        let this = self.clone();
        Box::pin(async move { this.connect_timed().await.map(TokioIo::new) })
    }
}

impl Connector {
    /// Connects within the connect timeout.
    async fn connect_timed(self) -> io::Result<OriginStream> {
        let timeout = self.connect_timeout;
        tokio::time::timeout(timeout, self.connect())
            .await
            .unwrap_or_else(|_| {
                Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("connect timed out after {timeout:?}"),
                ))
            })
    }

    async fn connect(self) -> io::Result<OriginStream> {
        let addrs: Vec<SocketAddr> = match self.host.parse::<std::net::IpAddr>() {
            Ok(ip) => vec![SocketAddr::new(ip, self.port)],
            Err(_) => tokio::net::lookup_host((self.host.as_str(), self.port))
                .await?
                .collect(),
        };
        let mut last = io::Error::new(io::ErrorKind::NotFound, "the host has no addresses");
        for addr in addrs {
            let tcp = match TcpStream::connect(addr).await {
                Ok(tcp) => tcp,
                Err(e) => {
                    last = e;
                    continue;
                }
            };
            let _ = tcp.set_nodelay(true);
            return match &self.tls {
                None => Ok(OriginStream::Plain(tcp)),
                Some((connector, name)) => {
                    let tls = connector.connect(name.clone(), tcp).await?;
                    Ok(OriginStream::Tls(Box::new(tls)))
                }
            };
        }
        Err(last)
    }
}

/// A connection to an origin.
pub(crate) enum OriginStream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl Connection for OriginStream {
    fn connected(&self) -> Connected {
        match self {
            OriginStream::Tls(tls) if tls.get_ref().1.alpn_protocol() == Some(b"h2") => {
                Connected::new().negotiated_h2()
            }
            _ => Connected::new(),
        }
    }
}

impl AsyncRead for OriginStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            OriginStream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            OriginStream::Tls(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for OriginStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            OriginStream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            OriginStream::Tls(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            OriginStream::Plain(s) => Pin::new(s).poll_flush(cx),
            OriginStream::Tls(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            OriginStream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            OriginStream::Tls(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}
