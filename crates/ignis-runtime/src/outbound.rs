//! Outbound HTTP from guests: an allowlist per function and a pooled client.
//!
//! Rules, checked for every request a guest sends:
//! 1. The host (and port) must match an entry of the function's
//!    `allowed_outbound_hosts`: `api.example.com` (any port),
//!    `api.example.com:8443`, `*.example.com`, or `*`. Nothing listed means
//!    nothing allowed. A miss is `HTTP-request-denied` for the guest.
//! 2. The addresses the host resolves to must be public unless the address
//!    itself is listed (`127.0.0.1:8080`): loopback, private (RFC 1918,
//!    ULA), link-local (the cloud metadata address), CGNAT, benchmarking,
//!    reserved, unspecified, multicast, and the IPv6 forms that embed an
//!    IPv4 address (NAT64, 6to4, Teredo, IPv4-compatible, IPv4-mapped) are
//!    refused with `destination-IP-prohibited`. An exactly listed *name*
//!    gets no exception: a tenant that points its own domain at
//!    169.254.169.254 or 127.0.0.1 is refused. The check runs on the
//!    resolved addresses, inside the connector, so a DNS answer cannot
//!    smuggle a private address past the list.
//! 3. Resolving and connecting share one deadline (10 s), across every
//!    address the name resolves to: a slow DNS server or a list of
//!    blackholed addresses cannot hold a guest longer than that.
//! 4. Connections are pooled per function and reused across requests
//!    (HTTP/1.1 keep-alive), and TLS verifies certificates against the web PKI
//!    roots.
//! 5. Named backends (`[backends.NAME]`, listed in a function's `backends`)
//!    are reached as `http://NAME/...` or by their own URL. Each has its own
//!    pool (`pool_size` idle connections kept), response timeout and TLS
//!    setting (`tls_verify`, on by default), shared by every function that
//!    lists it. The operator wrote the address, so it may be private.
//! 6. One guest request may send at most `max_outbound_requests`; past
//!    that, `HTTP-request-denied`.
//! 7. A tenant's functions share a budget ([`TenantOutbound`]): at most
//!    `max_outbound_connections` open connections through their allowlist
//!    pools (idle keep-alive ones included; past it a new one fails at once
//!    with `connection-limit-reached`) and `max_dns_lookups` lookups in
//!    flight (more wait, inside the connect deadline). One tenant cannot
//!    take the node's sockets or its resolver.

use crate::RequestId;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::Uri;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::rt::{TokioExecutor, TokioIo};
use ignis_config::BackendConfig;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use wasmtime_wasi_http::{Error as HttpError, RequestOptions, WasiBody};

#[derive(Debug, Clone, PartialEq, Eq)]
enum HostPattern {
    Any,
    Exact(String),
    Suffix(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Rule {
    host: HostPattern,
    port: Option<u16>,
}

/// What the allowlist says about a host and port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Not listed.
    Denied,
    /// Listed by a wildcard.
    PublicOnly,
    /// Listed by exact name. Its addresses must still be public unless
    /// the address itself is listed ([`OutboundPolicy::lists_address`]).
    Explicit,
}

/// A function's outbound allowlist.
#[derive(Debug, Clone, Default)]
pub struct OutboundPolicy {
    rules: Vec<Rule>,
}

impl OutboundPolicy {
    /// Builds the policy from manifest entries (already lower-cased).
    pub fn new(entries: &[String]) -> Self {
        let rules = entries
            .iter()
            .map(|e| {
                let (host, port) = split_host_port(e);
                let host = if host == "*" {
                    HostPattern::Any
                } else if let Some(suffix) = host.strip_prefix("*.") {
                    HostPattern::Suffix(format!(".{suffix}"))
                } else {
                    HostPattern::Exact(host.to_string())
                };
                Rule { host, port }
            })
            .collect();
        OutboundPolicy { rules }
    }

    /// Whether the address `ip` (with `port`) is itself listed: only then
    /// may a guest reach it when it is not public.
    pub fn lists_address(&self, ip: IpAddr, port: u16) -> bool {
        self.rules.iter().any(|rule| {
            rule.port.is_none_or(|p| p == port)
                && matches!(&rule.host, HostPattern::Exact(h) if h.parse::<IpAddr>() == Ok(ip))
        })
    }

    /// Checks a host (lower-case, brackets stripped for IPv6) and port.
    pub fn check(&self, host: &str, port: u16) -> Decision {
        let mut best = Decision::Denied;
        for rule in &self.rules {
            if rule.port.is_some_and(|p| p != port) {
                continue;
            }
            match &rule.host {
                HostPattern::Exact(h) if h == host => return Decision::Explicit,
                HostPattern::Suffix(s) if host.ends_with(s.as_str()) => best = Decision::PublicOnly,
                HostPattern::Any => best = Decision::PublicOnly,
                _ => {}
            }
        }
        best
    }
}

fn split_host_port(s: &str) -> (&str, Option<u16>) {
    if let Some(rest) = s.strip_prefix('[') {
        // [v6]:port
        if let Some((h, p)) = rest.split_once(']') {
            return (h, p.strip_prefix(':').and_then(|p| p.parse().ok()));
        }
    }
    match s.rsplit_once(':') {
        Some((h, p)) if !h.contains(':') => match p.parse() {
            Ok(port) => (h, Some(port)),
            Err(_) => (s, None),
        },
        _ => (s, None),
    }
}

/// Whether an address is on the public internet (see the module docs for
/// what is not).
pub fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            !(v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_broadcast()
                || v4.is_multicast()
                || v4.is_documentation()
                || o[0] == 0
                // 100.64.0.0/10: carrier-grade NAT.
                || (o[0] == 100 && (o[1] & 0xc0) == 64)
                // 192.0.0.0/24: IETF protocol assignments.
                || (o[0] == 192 && o[1] == 0 && o[2] == 0)
                // 198.18.0.0/15: benchmarking.
                || (o[0] == 198 && (o[1] & 0xfe) == 18)
                // 240.0.0.0/4: reserved.
                || o[0] >= 240)
        }
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_public(IpAddr::V4(v4));
            }
            let seg = v6.segments();
            !(v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                // ::/96: IPv4-compatible.
                || seg[..6] == [0; 6]
                // fc00::/7: unique local.
                || (seg[0] & 0xfe00) == 0xfc00
                // fe80::/10: link-local; fec0::/10: site-local.
                || (seg[0] & 0xffc0) == 0xfe80
                || (seg[0] & 0xffc0) == 0xfec0
                // 64:ff9b::/96 and 64:ff9b:1::/48: NAT64.
                || (seg[0] == 0x64 && seg[1] == 0xff9b)
                // 2002::/16: 6to4.
                || seg[0] == 0x2002
                // 2001::/32: Teredo; 2001:db8::/32: documentation.
                || (seg[0] == 0x2001 && (seg[1] == 0 || seg[1] == 0xdb8))
                // 100::/64: discard.
                || (seg[0] == 0x100 && seg[1..4] == [0; 3]))
        }
    }
}

/// Connector errors, found again in the client's error chain to give the
/// guest the right `error-code`.
#[derive(Debug, thiserror::Error)]
enum ConnectError {
    #[error("destination address {0} is not allowed")]
    Prohibited(IpAddr),
    #[error("dns lookup failed: {0}")]
    Dns(io::Error),
    #[error("connect failed: {0}")]
    Connect(io::Error),
    #[error("connect timed out")]
    Timeout,
    #[error("tls handshake failed: {0}")]
    Tls(io::Error),
    #[error("invalid uri")]
    Uri,
    #[error("the tenant's max_outbound_connections are all open")]
    TenantLimit,
}

trait Io: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Io for T {}

/// A plain or TLS connection to an origin.
pub struct Stream {
    io: Box<dyn Io>,
    /// The tenant's connection slot, released when the connection closes.
    _slot: Option<OwnedSemaphorePermit>,
}

impl AsyncRead for Stream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut *self.io).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.io).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.io).poll_shutdown(cx)
    }
}

impl Connection for Stream {
    fn connected(&self) -> Connected {
        Connected::new()
    }
}

/// Every tenant's outbound budget, one per tenant whichever way its
/// functions arrived: the manifest's `[tenants.NAME]` settings, or the
/// defaults for a tenant first seen later (a function a deploy adds). The
/// map grows only with tenants the operator's manifest or deploys name.
#[derive(Debug, Default)]
pub struct TenantBudgets {
    budgets: std::sync::Mutex<std::collections::BTreeMap<String, Arc<TenantOutbound>>>,
}

impl TenantBudgets {
    /// Budgets for the tenants `configured` sets; others get the defaults
    /// when first asked for.
    pub fn new<'a>(
        configured: impl IntoIterator<Item = (&'a String, &'a ignis_config::TenantConfig)>,
    ) -> TenantBudgets {
        TenantBudgets {
            budgets: std::sync::Mutex::new(
                configured
                    .into_iter()
                    .map(|(name, c)| (name.clone(), Arc::new(TenantOutbound::new(c))))
                    .collect(),
            ),
        }
    }

    /// `tenant`'s budget.
    pub fn get(&self, tenant: &str) -> Arc<TenantOutbound> {
        self.budgets
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(tenant.to_string())
            .or_insert_with(|| Arc::new(TenantOutbound::new(&Default::default())))
            .clone()
    }
}

/// One tenant's outbound budget, shared by all its functions.
#[derive(Debug)]
pub struct TenantOutbound {
    connections: Arc<Semaphore>,
    dns: Semaphore,
}

impl TenantOutbound {
    /// The budget `config` sets.
    pub fn new(config: &ignis_config::TenantConfig) -> Self {
        TenantOutbound {
            connections: Arc::new(Semaphore::new(config.max_outbound_connections as usize)),
            dns: Semaphore::new(config.max_dns_lookups as usize),
        }
    }
}

/// Resolves, applies the address policy, connects, and wraps in TLS for https.
#[derive(Clone)]
pub struct Connector {
    /// The tenant's budget (`None` for operator-named backends).
    tenant: Option<Arc<TenantOutbound>>,
    policy: Arc<OutboundPolicy>,
    tls: tokio_rustls::TlsConnector,
    /// One deadline for resolving and connecting, across all addresses.
    connect_timeout: Duration,
    connections: Arc<AtomicU64>,
    /// A backend the operator named: any address it resolves to is allowed.
    operator_named: bool,
}

impl tower_service::Service<Uri> for Connector {
    type Response = TokioIo<Stream>;
    type Error = ConnectErrorBox;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            this.connect(uri)
                .await
                .map_err(|e| ConnectErrorBox(Box::new(e)))
        })
    }
}

/// The boxed connection error (its type stays private; callers see a std error).
#[derive(Debug)]
pub struct ConnectErrorBox(Box<ConnectError>);

impl std::fmt::Display for ConnectErrorBox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl std::error::Error for ConnectErrorBox {}

impl Connector {
    async fn connect(&self, uri: Uri) -> Result<TokioIo<Stream>, ConnectError> {
        let https = uri.scheme() == Some(&http::uri::Scheme::HTTPS);
        let host = uri.host().ok_or(ConnectError::Uri)?;
        let host = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_ascii_lowercase();
        let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
        let deadline = tokio::time::Instant::now() + self.connect_timeout;
        // The tenant's connection budget, taken before anything else and
        // held by the connection until it closes.
        let permit = match &self.tenant {
            Some(t) => Some(
                t.connections
                    .clone()
                    .try_acquire_owned()
                    .map_err(|_| ConnectError::TenantLimit)?,
            ),
            None => None,
        };
        let addrs: Vec<SocketAddr> = match host.parse::<IpAddr>() {
            Ok(ip) => vec![SocketAddr::new(ip, port)],
            Err(_) => {
                let lookup = async {
                    let _slot = match &self.tenant {
                        Some(t) => Some(t.dns.acquire().await),
                        None => None,
                    };
                    tokio::net::lookup_host((host.as_str(), port)).await
                };
                tokio::time::timeout_at(deadline, lookup)
                    .await
                    .map_err(|_| ConnectError::Timeout)?
                    .map_err(ConnectError::Dns)?
                    .collect()
            }
        };
        let mut last = None;
        for addr in addrs {
            let allowed = self.operator_named
                || is_public(addr.ip())
                || self.policy.lists_address(addr.ip(), port);
            if !allowed {
                last = Some(ConnectError::Prohibited(addr.ip()));
                continue;
            }
            match tokio::time::timeout_at(deadline, TcpStream::connect(addr)).await {
                Err(_) => {
                    last = Some(ConnectError::Timeout);
                    break;
                }
                Ok(Err(e)) => last = Some(ConnectError::Connect(e)),
                Ok(Ok(tcp)) => {
                    let _ = tcp.set_nodelay(true);
                    self.connections.fetch_add(1, Ordering::Relaxed);
                    let stream = if https {
                        let name = rustls::pki_types::ServerName::try_from(host.clone())
                            .map_err(|_| ConnectError::Uri)?;
                        Stream {
                            io: Box::new(
                                self.tls
                                    .connect(name, tcp)
                                    .await
                                    .map_err(ConnectError::Tls)?,
                            ),
                            _slot: permit,
                        }
                    } else {
                        Stream {
                            io: Box::new(tcp),
                            _slot: permit,
                        }
                    };
                    return Ok(TokioIo::new(stream));
                }
            }
        }
        Err(last.unwrap_or_else(|| ConnectError::Dns(io::Error::other("no addresses"))))
    }
}

/// A function's outbound side: its policy and its connection pool.
pub struct Outbound {
    policy: Arc<OutboundPolicy>,
    client: PooledClient,
    connections: Arc<AtomicU64>,
    backends: Vec<Arc<Backend>>,
    upstreams: Vec<(String, Arc<dyn UpstreamClient>)>,
}

/// What a guest request to an upstream (`http://NAME/...`) resolves to.
pub type UpstreamFuture =
    Pin<Box<dyn Future<Output = Result<http::Response<WasiBody>, HttpError>> + Send>>;

/// An upstream of the edge (`[upstreams.NAME]`) as a guest reaches it: the
/// edge implements it, so its balancing, health and retries apply to guest
/// calls too. The runtime only names the contract.
pub trait UpstreamClient: Send + Sync {
    /// Sends the guest's `request` (made while serving `request_id`).
    fn send(&self, request: http::Request<WasiBody>, request_id: RequestId) -> UpstreamFuture;
}

/// The TLS client settings: web PKI roots, or (for a backend with
/// `tls_verify = false`) any certificate, still checking the handshake
/// signatures.
fn tls_config(verify: bool) -> rustls::ClientConfig {
    client_tls(verify, None)
}

/// TLS client settings for an origin the operator named: certificates
/// verified against `roots` (the web PKI when `None`), or, with `verify`
/// false, any certificate (handshake signatures still checked). TLS 1.2
/// and 1.3 with rustls's safe defaults.
pub fn client_tls(verify: bool, roots: Option<rustls::RootCertStore>) -> rustls::ClientConfig {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .expect("ring supports the default protocol versions");
    if verify {
        let roots = roots.unwrap_or_else(|| rustls::RootCertStore {
            roots: webpki_roots::TLS_SERVER_ROOTS.into(),
        });
        builder.with_root_certificates(roots).with_no_client_auth()
    } else {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyCertificate(provider)))
            .with_no_client_auth()
    }
}

/// Accepts any server certificate (only for backends configured with
/// `tls_verify = false`); handshake signatures are still verified.
#[derive(Debug)]
struct AnyCertificate(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &rustls::pki_types::CertificateDer<'_>,
        _intermediates: &[rustls::pki_types::CertificateDer<'_>],
        _server_name: &rustls::pki_types::ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

type PooledClient = Client<Connector, WasiBody>;

fn pooled_client(
    policy: Arc<OutboundPolicy>,
    tenant: Option<Arc<TenantOutbound>>,
    tls: rustls::ClientConfig,
    connect_timeout: Duration,
    idle_per_host: usize,
) -> (PooledClient, Arc<AtomicU64>) {
    let connections = Arc::new(AtomicU64::new(0));
    let operator_named = tenant.is_none();
    let connector = Connector {
        tenant,
        policy,
        tls: tokio_rustls::TlsConnector::from(Arc::new(tls)),
        connect_timeout,
        connections: connections.clone(),
        operator_named,
    };
    let client = Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(30))
        .pool_max_idle_per_host(idle_per_host)
        .build(connector);
    (client, connections)
}

/// A named origin from the manifest (`[backends.NAME]`): its own pool
/// (shared by every function that lists it), TLS setting and timeout. A
/// guest reaches it as `http://NAME/...` or by the backend's own URL; the
/// operator named the address, so private addresses are allowed.
pub struct Backend {
    config: BackendConfig,
    authority: http::uri::Authority,
    scheme: http::uri::Scheme,
    client: PooledClient,
    connections: Arc<AtomicU64>,
}

impl Backend {
    /// The backend's client and pool.
    pub fn new(config: &BackendConfig) -> Self {
        let exact = if config.host.contains(':') {
            format!("[{}]:{}", config.host, config.port)
        } else {
            format!("{}:{}", config.host, config.port)
        };
        let policy = Arc::new(OutboundPolicy::new(std::slice::from_ref(&exact)));
        let (client, connections) = pooled_client(
            policy,
            None,
            tls_config(config.tls_verify),
            config.timeout.min(Duration::from_secs(10)),
            config.pool_size,
        );
        Backend {
            authority: exact.parse().expect("validated host and port"),
            scheme: if config.scheme == "https" {
                http::uri::Scheme::HTTPS
            } else {
                http::uri::Scheme::HTTP
            },
            config: config.clone(),
            client,
            connections,
        }
    }

    /// The backend's name.
    pub fn name(&self) -> &str {
        &self.config.name
    }

    /// TCP connections opened to it so far.
    pub fn connections_opened(&self) -> u64 {
        self.connections.load(Ordering::Relaxed)
    }

    /// Whether a guest request for `host`, `port` means this backend.
    fn matches(&self, host: &str, port: Option<u16>, https: bool) -> bool {
        if port.is_none() && host == self.config.name.to_ascii_lowercase() {
            return true;
        }
        let port = port.unwrap_or(if https { 443 } else { 80 });
        host == self.config.host
            && port == self.config.port
            && https == (self.config.scheme == "https")
    }

    async fn send(
        &self,
        mut request: http::Request<WasiBody>,
    ) -> Result<http::Response<WasiBody>, HttpError> {
        let mut parts = request.uri().clone().into_parts();
        parts.scheme = Some(self.scheme.clone());
        parts.authority = Some(self.authority.clone());
        if parts.path_and_query.is_none() {
            parts.path_and_query = Some(http::uri::PathAndQuery::from_static("/"));
        }
        *request.uri_mut() =
            http::Uri::from_parts(parts).map_err(|_| HttpError::HttpRequestUriInvalid)?;
        // The client sets Host from the rewritten URI.
        request.headers_mut().remove(http::header::HOST);
        match tokio::time::timeout(self.config.timeout, self.client.request(request)).await {
            Err(_) => {
                tracing::warn!(backend = %self.config.name, timeout = ?self.config.timeout, "outbound request to backend timed out");
                Err(HttpError::HttpResponseTimeout)
            }
            Ok(Ok(r)) => Ok(r.map(|b| b.map_err(HttpError::from).boxed_unsync())),
            Ok(Err(e)) => Err(map_client_error(&e)),
        }
    }
}

impl Outbound {
    /// A pooled client that enforces `policy`, and the named `backends`
    /// the function may call.
    pub fn new(
        policy: OutboundPolicy,
        tenant: Arc<TenantOutbound>,
        backends: Vec<Arc<Backend>>,
        upstreams: Vec<(String, Arc<dyn UpstreamClient>)>,
    ) -> Self {
        let policy = Arc::new(policy);
        let (client, connections) = pooled_client(
            policy.clone(),
            Some(tenant),
            tls_config(true),
            Duration::from_secs(10),
            32,
        );
        Outbound {
            policy,
            client,
            connections,
            backends,
            upstreams,
        }
    }

    /// TCP connections opened so far by the allowlist pool (to see pooling
    /// work; backends count their own).
    pub fn connections_opened(&self) -> u64 {
        self.connections.load(Ordering::Relaxed)
    }

    /// Sends a guest's request (made while serving `request_id`) to an
    /// upstream or a backend named by its host, or to an allowed host.
    /// A request to a backend (the operator's own service) gets
    /// `x-request-id` and `traceparent` unless the guest set them (an
    /// upstream sets its own); one to any other host goes as the guest
    /// wrote it.
    pub async fn send(
        &self,
        mut request: http::Request<WasiBody>,
        options: Option<RequestOptions>,
        request_id: RequestId,
    ) -> Result<http::Response<WasiBody>, HttpError> {
        let uri = request.uri();
        let host = uri
            .host()
            .ok_or(HttpError::HttpRequestUriInvalid)?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_ascii_lowercase();
        let https = uri.scheme() == Some(&http::uri::Scheme::HTTPS);
        if uri.port().is_none()
            && let Some((_, upstream)) = self.upstreams.iter().find(|(name, _)| *name == host)
        {
            return upstream.send(request, request_id).await;
        }
        if let Some(backend) = self
            .backends
            .iter()
            .find(|b| b.matches(&host, uri.port_u16(), https))
        {
            tag(&mut request, request_id);
            return backend.send(request).await;
        }
        let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
        match self.policy.check(&host, port) {
            Decision::Denied => {
                tracing::warn!(host = %host, port, "outbound request denied: host not in allowed_outbound_hosts nor a listed backend");
                return Err(HttpError::HttpRequestDenied);
            }
            Decision::PublicOnly | Decision::Explicit => {}
        }
        let first_byte = options
            .and_then(|o| o.first_byte_timeout)
            .unwrap_or(Duration::from_secs(60));
        let response = match tokio::time::timeout(first_byte, self.client.request(request)).await {
            Err(_) => return Err(HttpError::ConnectionReadTimeout),
            Ok(Ok(r)) => r,
            Ok(Err(e)) => return Err(map_client_error(&e)),
        };
        Ok(response.map(|b| b.map_err(HttpError::from).boxed_unsync()))
    }
}

/// Adds the request's id and trace context to a guest's request, where
/// the guest did not set them.
fn tag(request: &mut http::Request<WasiBody>, request_id: RequestId) {
    let headers = request.headers_mut();
    if !headers.contains_key(&crate::X_REQUEST_ID) {
        headers.insert(crate::X_REQUEST_ID, request_id.header());
    }
    if !headers.contains_key(&crate::TRACEPARENT) {
        headers.insert(crate::TRACEPARENT, request_id.traceparent());
    }
}

fn map_client_error(e: &hyper_util::client::legacy::Error) -> HttpError {
    let mut source: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(e);
    while let Some(s) = source {
        if let Some(ConnectErrorBox(inner)) = s.downcast_ref::<ConnectErrorBox>() {
            tracing::warn!(error = %inner, "outbound connection failed");
            return match **inner {
                ConnectError::Prohibited(_) => HttpError::DestinationIpProhibited,
                ConnectError::Dns(_) => HttpError::DnsError {
                    rcode: None,
                    info_code: None,
                },
                ConnectError::Connect(_) => HttpError::ConnectionRefused,
                ConnectError::Timeout => HttpError::ConnectionTimeout,
                ConnectError::Tls(_) => HttpError::TlsProtocolError,
                ConnectError::Uri => HttpError::HttpRequestUriInvalid,
                ConnectError::TenantLimit => HttpError::ConnectionLimitReached,
            };
        }
        source = s.source();
    }
    tracing::warn!(error = %e, "outbound request failed");
    HttpError::HttpProtocolError
}

/// Reads a full body (test and tooling helper).
pub async fn collect(body: WasiBody) -> Result<Bytes, HttpError> {
    Ok(body.collect().await?.to_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tenant without `[tenants.NAME]` (say one a deploy adds) has one
    /// budget for all its functions. Before `TenantBudgets`, each of its
    /// functions made its own default budget, so a tenant could multiply
    /// its outbound connections by deploying more functions.
    #[test]
    fn every_function_of_a_tenant_shares_one_budget() {
        let mut configured = std::collections::BTreeMap::new();
        configured.insert(
            "acme".to_string(),
            ignis_config::TenantConfig {
                max_outbound_connections: 3,
                ..Default::default()
            },
        );
        let budgets = TenantBudgets::new(&configured);
        let (a, b) = (budgets.get("newco"), budgets.get("newco"));
        assert!(Arc::ptr_eq(&a, &b), "one budget per tenant");
        assert!(!Arc::ptr_eq(&a, &budgets.get("other")));
        assert_eq!(budgets.get("acme").connections.available_permits(), 3);
        assert_eq!(
            a.connections.available_permits(),
            ignis_config::TenantConfig::default().max_outbound_connections as usize
        );
    }

    fn connector(tenant: &Arc<TenantOutbound>) -> Connector {
        Connector {
            tenant: Some(tenant.clone()),
            policy: Arc::new(OutboundPolicy::new(&["localhost".to_string()])),
            tls: tokio_rustls::TlsConnector::from(Arc::new(tls_config(true))),
            connect_timeout: Duration::from_millis(300),
            connections: Arc::default(),
            operator_named: false,
        }
    }

    #[tokio::test]
    async fn a_tenants_lookups_and_connections_are_budgeted() {
        let config = ignis_config::TenantConfig {
            max_dns_lookups: 1,
            max_outbound_connections: 1,
            ..Default::default()
        };
        let tenant = Arc::new(TenantOutbound::new(&config));
        let connector = connector(&tenant);
        let uri: Uri = "http://localhost:9/".parse().unwrap();
        // Its one lookup slot is taken: the next lookup waits, and gives up
        // at the connect deadline.
        let lookup = tenant.dns.acquire().await.unwrap();
        let e = connector.connect(uri.clone()).await.err().unwrap();
        assert!(matches!(e, ConnectError::Timeout), "{e}");
        drop(lookup);
        // Free again: the name resolves (to loopback, which is refused).
        let e = connector.connect(uri.clone()).await.err().unwrap();
        assert!(matches!(e, ConnectError::Prohibited(_)), "{e}");
        // Its one connection is open: the next fails at once.
        let open = tenant.connections.clone().try_acquire_owned().unwrap();
        let e = connector.connect(uri).await.err().unwrap();
        assert!(matches!(e, ConnectError::TenantLimit), "{e}");
        drop(open);
    }

    #[test]
    fn policy_matches_hosts_and_ports() {
        let p = OutboundPolicy::new(&[
            "api.example.com".into(),
            "*.cdn.net".into(),
            "localhost:8081".into(),
        ]);
        assert_eq!(p.check("api.example.com", 443), Decision::Explicit);
        assert_eq!(p.check("img.cdn.net", 80), Decision::PublicOnly);
        assert_eq!(p.check("cdn.net", 80), Decision::Denied);
        assert_eq!(p.check("localhost", 8081), Decision::Explicit);
        assert_eq!(p.check("localhost", 8082), Decision::Denied);
        assert_eq!(p.check("evil.com", 443), Decision::Denied);
        assert_eq!(
            OutboundPolicy::new(&[]).check("a.com", 80),
            Decision::Denied
        );
        assert_eq!(
            OutboundPolicy::new(&["*".into()]).check("a.com", 80),
            Decision::PublicOnly
        );
    }

    #[test]
    fn private_addresses_are_not_public() {
        for ip in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "::1",
            "fe80::1",
            "fd00::1",
            "::ffff:127.0.0.1",
            // Added with the SSRF review: each fails on the list before it.
            "64:ff9b::7f00:1",
            "64:ff9b:1::a9fe:a9fe",
            "2002:7f00:1::1",
            "::7f00:1",
            "fec0::1",
            "2001:0:4136:e378::1",
            "2001:db8::1",
            "198.18.0.1",
            "198.19.255.255",
            "240.0.0.1",
            "255.255.255.254",
            "192.0.0.170",
        ] {
            assert!(!is_public(ip.parse().unwrap()), "{ip}");
        }
        for ip in [
            "93.184.216.34",
            "1.1.1.1",
            "2606:4700::1111",
            "198.20.0.1",
            "192.0.1.1",
            "2001:4860::8888",
        ] {
            assert!(is_public(ip.parse().unwrap()), "{ip}");
        }
    }

    #[test]
    fn only_a_listed_address_is_an_exception() {
        let p = OutboundPolicy::new(&[
            "localhost:8081".into(),
            "127.0.0.1:9000".into(),
            "10.0.0.5".into(),
        ]);
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        // A listed name is not a listed address.
        assert!(!p.lists_address(ip("127.0.0.1"), 8081));
        assert!(p.lists_address(ip("127.0.0.1"), 9000));
        assert!(!p.lists_address(ip("127.0.0.1"), 9001));
        assert!(p.lists_address(ip("10.0.0.5"), 443));
        assert!(!p.lists_address(ip("10.0.0.6"), 443));
    }
}
