//! Cluster mode: this node as a member of a cluster sharing one PostgreSQL
//! database (`ignis_store::cluster` holds the tables and their
//! statements; docs/cluster.md the design and its guarantees).
//!
//! - **Membership.** A node id is new at every start. The heartbeat task
//!   renews the node's row every third of the lease. The node counts its
//!   membership valid until `sent + lease - margin`, where `sent` is when
//!   the last successful heartbeat was *sent*: the database set the expiry
//!   from its own `now()`, which is later, so the node stops serving its
//!   actors before any other node may take them over. Past that instant
//!   the session has lapsed ([`Cluster::session`] is `None`: actor messages
//!   get a retryable 503); the next successful heartbeat starts a new
//!   session, and every activation of the old one ends before its next
//!   message.
//! - **Forwarding.** A message for an actor another node owns goes to that
//!   node's internal listener over HTTP/2 (one connection per peer, on the
//!   `h2` crate directly: [`link`] says why), with the cluster token, the actor in
//!   `ignis-forward-actor` and the hop count; the owner answers as its
//!   edge would. The token is made by the first node and kept in the
//!   database (`ignis_cluster`): only nodes that can read the database can
//!   forward, and the internal listener refuses every request without it.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use bytes::Bytes;
use http::{HeaderValue, Request, Response};
use http_body_util::BodyExt;
use ignis_actors::{ActorDirectory, Cluster, ClusterFuture, Forward, Placement};
use ignis_config::ClusterConfig;
use ignis_runtime::{Error, ErrorKind, RequestId};
use ignis_store::{ActorKey, Fence, Owner, PgStore, StoreError};
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, percent_decode_str, utf8_percent_encode};
use tokio::net::TcpListener;

mod link;

use link::{BodyError, LinkError, Peers};

/// The header carrying the cluster token between nodes.
pub const TOKEN_HEADER: &str = "ignis-cluster-token";
/// The header naming the actor: `CLASS/ID`, the id percent-encoded.
pub const ACTOR_HEADER: &str = "ignis-forward-actor";
/// The header counting the hops a forwarded message made.
pub const HOPS_HEADER: &str = "ignis-forward-hops";
/// The header carrying the authority the client asked for (HTTP/2 between
/// nodes puts the owner's address in `:authority`; the actor sees the
/// client's).
pub const HOST_HEADER: &str = "ignis-forward-host";

/// Largest body the internal listener reads: no class takes more (an
/// actor's `max_body` is at most this), and the forwarding node checked
/// the class's own limit already.
const MAX_FORWARD_BODY: usize = 64 << 20;
/// Largest answer a forwarding node reads back.
const MAX_FORWARD_RESPONSE: usize = 64 << 20;
/// Connections the internal listener serves at once; past it, new ones
/// wait in the kernel's backlog.
const MAX_INTERNAL_CONNECTIONS: usize = 1024;
/// Alarms read per poll at most (the earliest first).
const ALARM_POLL_LIMIT: i64 = 10_000;

/// Every byte but ASCII letters, digits and `-._~` is escaped in an id.
const ID_ESCAPE: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

struct Membership {
    /// When the current session ends unless renewed; `None` before the
    /// first heartbeat.
    valid_until: Option<Instant>,
    session: u64,
}

/// This node's side of the cluster (see the module docs).
pub struct ClusterNode {
    store: PgStore,
    id: String,
    address: String,
    lease: Duration,
    token: HeaderValue,
    forward_timeout: Duration,
    membership: Mutex<Membership>,
    peers: Arc<Peers>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl ClusterNode {
    /// Joins the cluster on `store` as a new node reachable at `address`
    /// (its internal listener's advertised `host:port`): registers it and
    /// reads (or makes) the cluster token. Fails if the database refuses.
    pub async fn join(
        store: PgStore,
        address: String,
        config: &ClusterConfig,
    ) -> anyhow::Result<Arc<ClusterNode>> {
        let id = format!("n-{}", &uuid_hex()[..12]);
        let token = store
            .cluster_value("forward_token", &uuid_hex())
            .await
            .context("reading the cluster token")?;
        let token = HeaderValue::from_str(&token).context("the cluster token is not a header")?;
        let node = Arc::new(ClusterNode {
            store,
            id,
            address,
            lease: config.lease,
            token,
            forward_timeout: config.forward_timeout,
            membership: Mutex::new(Membership {
                valid_until: None,
                session: 0,
            }),
            peers: Arc::default(),
        });
        node.beat().await.context("registering this node")?;
        tracing::info!(node = %node.id, address = %node.address, lease = ?node.lease, "joined the cluster");
        Ok(node)
    }

    /// This node's id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The database.
    pub fn store(&self) -> &PgStore {
        &self.store
    }

    /// One heartbeat: renews the membership and, if it had lapsed, starts
    /// a new session.
    async fn beat(&self) -> Result<(), StoreError> {
        let sent = Instant::now();
        self.store
            .heartbeat(&self.id, &self.address, self.lease)
            .await?;
        let margin = (self.lease / 10).min(Duration::from_millis(500));
        let mut m = lock(&self.membership);
        let lapsed = m.valid_until.is_none_or(|t| Instant::now() >= t);
        if lapsed {
            m.session += 1;
            if m.session > 1 {
                tracing::warn!(node = %self.id, session = m.session, "cluster membership renewed after it lapsed; earlier activations end");
            }
        }
        m.valid_until = Some(sent + self.lease - margin);
        Ok(())
    }

    /// Renews the membership every third of the lease until the process
    /// ends; prunes what dead nodes left about once an hour.
    pub fn spawn_heartbeat(self: &Arc<Self>) {
        let node = Arc::downgrade(self);
        let every = self.lease / 3;
        let prune_every = ((3600.0 / every.as_secs_f64()) as u64).max(1);
        tokio::spawn(async move {
            let mut failing = false;
            let mut beats = 0u64;
            loop {
                tokio::time::sleep(every).await;
                let Some(node) = node.upgrade() else { return };
                match node.beat().await {
                    Ok(()) if failing => {
                        failing = false;
                        tracing::info!(node = %node.id, "cluster heartbeat succeeds again");
                    }
                    Ok(()) => {}
                    Err(e) if !failing => {
                        failing = true;
                        tracing::error!(node = %node.id, error = %e, "cluster heartbeat failed; this node stops serving actors when its lease runs out");
                    }
                    Err(_) => {}
                }
                beats += 1;
                if beats.is_multiple_of(prune_every)
                    && let Err(e) = async {
                        node.store.prune().await?;
                        node.store.prune_deploys().await
                    }
                    .await
                {
                    tracing::warn!(error = %e, "pruning the cluster tables failed");
                }
            }
        });
    }

    /// Reports that this node took deploy record `seq` (and why it refused
    /// it, if it did) for `ignis cluster apply`; a failure is logged only
    /// (the change itself stands either way).
    pub async fn report_applied(&self, seq: i64, error: Option<&str>) {
        if let Err(e) = self.store.report_applied(&self.id, seq, error).await {
            tracing::warn!(target: "ignis::deploy", seq, error = %e, "reporting the applied change to the cluster failed");
        }
    }

    /// Leaves the membership (a clean stop): other nodes take this node's
    /// actors at their next message instead of after the lease.
    pub async fn leave(&self) {
        lock(&self.membership).valid_until = None;
        if let Err(e) = self.store.leave(&self.id).await {
            tracing::warn!(error = %e, "leaving the cluster failed; its actors move after the lease");
        }
    }
}

/// A fresh random 32-digit hex string (a v4 UUID's bits).
fn uuid_hex() -> String {
    format!("{:032x}", uuid::Uuid::new_v4().as_u128())
}

fn store_error(e: StoreError) -> Error {
    match e {
        StoreError::Unavailable(_) => {
            Error::unavailable("the cluster database is unavailable; retry").with_source(e)
        }
        e => Error::storage(e).context("placing the actor"),
    }
}

impl Cluster for ClusterNode {
    fn session(&self) -> Option<u64> {
        let m = lock(&self.membership);
        m.valid_until
            .is_some_and(|t| Instant::now() < t)
            .then_some(m.session)
    }

    fn place<'a>(&'a self, key: &'a ActorKey) -> ClusterFuture<'a, Placement> {
        Box::pin(async move {
            match self
                .store
                .acquire(key, &self.id)
                .await
                .map_err(store_error)?
            {
                Owner::Me { epoch } => Ok(Placement::Local(Fence {
                    node: self.id.as_str().into(),
                    epoch,
                })),
                Owner::Node { node, address } => Ok(Placement::Remote { node, address }),
            }
        })
    }

    fn forward(&self, message: Forward) -> ClusterFuture<'static, Response<Bytes>> {
        let peers = self.peers.clone();
        let token = self.token.clone();
        let timeout = self.forward_timeout;
        Box::pin(async move {
            let Forward {
                address,
                key,
                request,
                request_id,
                hops,
            } = message;
            let (mut parts, body) = request.into_parts();
            let host = parts.headers.get(http::header::HOST).cloned().or_else(|| {
                parts
                    .uri
                    .authority()
                    .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
            });
            let path = parts
                .uri
                .path_and_query()
                .map_or("/", |p| p.as_str())
                .to_string();
            parts.uri = format!("http://{address}{path}")
                .parse()
                .map_err(|e| Error::internal(e).context("the owner's address is not usable"))?;
            parts.version = http::Version::HTTP_2;
            let h = &mut parts.headers;
            link::strip_connection_headers(h);
            h.insert(TOKEN_HEADER, token);
            let actor = format!(
                "{}/{}",
                key.class(),
                utf8_percent_encode(key.id(), ID_ESCAPE)
            );
            h.insert(
                ACTOR_HEADER,
                HeaderValue::from_str(&actor).map_err(Error::internal)?,
            );
            h.insert(HOPS_HEADER, HeaderValue::from(hops));
            if let Some(host) = host {
                h.insert(HOST_HEADER, host);
            }
            h.insert(ignis_runtime::X_REQUEST_ID, request_id.header());
            h.insert(ignis_runtime::TRACEPARENT, request_id.traceparent());
            let sent = peers.request(
                &address,
                Request::from_parts(parts, ()),
                body,
                MAX_FORWARD_RESPONSE,
            );
            let mut resp = match tokio::time::timeout(timeout, sent).await {
                Err(_) => {
                    return Err(Error::new(ErrorKind::GatewayTimeout).context(format!(
                        "the actor's owner node did not answer within {timeout:?}"
                    )));
                }
                // Nothing was run: the owner is down or unreachable, and
                // the message can be retried (once its lease expires, another
                // node takes the actor).
                Ok(Err(e @ LinkError::NotSent(_))) => {
                    return Err(Error::unavailable(
                        "the actor's owner node could not be reached; retry",
                    )
                    .with_source(e));
                }
                Ok(Err(LinkError::TooLarge)) => {
                    return Err(Error::new(ErrorKind::BadGateway).context(format!(
                        "the actor's owner node answered with over {MAX_FORWARD_RESPONSE} bytes"
                    )));
                }
                // Sent, then the connection broke: the owner may have run it.
                Ok(Err(e)) => {
                    return Err(Error::new(ErrorKind::BadGateway)
                        .context("the connection to the actor's owner node broke; the message may or may not have run")
                        .with_source(e));
                }
                Ok(Ok(resp)) => resp,
            };
            resp.headers_mut().remove(TOKEN_HEADER);
            Ok(resp)
        })
    }

    fn due_alarms(&self) -> ClusterFuture<'_, Vec<(ActorKey, u64)>> {
        Box::pin(async move {
            let horizon = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default()
                + self.alarm_poll() * 2;
            self.store
                .due_alarms(&self.id, horizon.as_millis() as u64, ALARM_POLL_LIMIT)
                .await
                .map_err(store_error)
        })
    }

    fn alarm_poll(&self) -> Duration {
        self.lease / 2
    }
}

impl ignis_actors::CronClaim for ClusterNode {
    fn claim<'a>(&'a self, name: &'a str, at_ms: i64) -> ClusterFuture<'a, bool> {
        Box::pin(async move {
            self.store
                .claim_cron(name, at_ms, &self.id)
                .await
                .map_err(store_error)
        })
    }
}

/// The internal listener: forwarded actor messages from other nodes.
pub struct InternalListener {
    listener: TcpListener,
    local_addr: SocketAddr,
}

impl InternalListener {
    /// Binds `addr` (`127.0.0.1:0` picks a port).
    pub async fn bind(addr: SocketAddr) -> anyhow::Result<InternalListener> {
        let listener = TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding the cluster listener on {addr} (cluster.listen)"))?;
        let local_addr = listener.local_addr()?;
        Ok(InternalListener {
            listener,
            local_addr,
        })
    }

    /// The bound address.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Serves forwarded messages to `directory` until the task is dropped.
    pub async fn run(self, node: Arc<ClusterNode>, directory: Arc<ActorDirectory>) {
        let slots = Arc::new(tokio::sync::Semaphore::new(MAX_INTERNAL_CONNECTIONS));
        loop {
            let Ok(permit) = slots.clone().acquire_owned().await else {
                return;
            };
            let (stream, _) = match self.listener.accept().await {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "cluster listener accept failed");
                    continue;
                }
            };
            let _ = stream.set_nodelay(true);
            let (node, directory) = (node.clone(), directory.clone());
            tokio::spawn(async move {
                link::serve(stream, |req| serve_forwarded(&node, &directory, req)).await;
                drop(permit);
            });
        }
    }
}

/// One forwarded message: checked, read, handed to the directory, and
/// answered as the edge answers (errors logged here, once).
async fn serve_forwarded(
    node: &ClusterNode,
    directory: &ActorDirectory,
    req: Request<h2::RecvStream>,
) -> Response<Bytes> {
    let id = RequestId::for_request(req.headers(), true);
    match forwarded(node, directory, req, id).await {
        Ok(mut resp) => {
            resp.headers_mut()
                .insert(ignis_runtime::X_REQUEST_ID, id.header());
            resp
        }
        Err((owner, e)) => {
            let (parts, body) = ignis_edge::error_response(&owner, &e, id).into_parts();
            // An error answer is a short body made here; it cannot fail.
            let body = body
                .collect()
                .await
                .map(|b| b.to_bytes())
                .unwrap_or_default();
            Response::from_parts(parts, body)
        }
    }
}

async fn forwarded(
    node: &ClusterNode,
    directory: &ActorDirectory,
    req: Request<h2::RecvStream>,
    id: RequestId,
) -> Result<Response<Bytes>, (String, Error)> {
    let edge = |e: Error| ("cluster".to_string(), e);
    let token_ok = req
        .headers()
        .get(TOKEN_HEADER)
        .is_some_and(|t| constant_time_eq(t.as_bytes(), node.token.as_bytes()));
    if !token_ok {
        return Err(edge(Error::new(ErrorKind::Forbidden).context(
            "the cluster listener takes only messages from nodes of the cluster",
        )));
    }
    let bad = |why: &str| edge(Error::new(ErrorKind::BadRequest).context(why.to_string()));
    let (class, actor_id) = req
        .headers()
        .get(ACTOR_HEADER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once('/'))
        .and_then(|(class, id)| {
            let id = percent_decode_str(id).decode_utf8().ok()?;
            Some((class.to_string(), id.into_owned()))
        })
        .ok_or_else(|| {
            bad("a forwarded message names its actor as CLASS/ID (id percent-encoded)")
        })?;
    let hops = req
        .headers()
        .get(HOPS_HEADER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u32>().ok())
        .ok_or_else(|| bad("a forwarded message counts its hops"))?;
    let (mut parts, mut body) = req.into_parts();
    for name in [TOKEN_HEADER, ACTOR_HEADER, HOPS_HEADER] {
        parts.headers.remove(name);
    }
    // The actor sees the request as the client sent it to the first node:
    // its path and query, and its authority as `Host`.
    let host = parts.headers.remove(HOST_HEADER).or_else(|| {
        parts
            .uri
            .authority()
            .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
    });
    if let Some(host) = host {
        parts.headers.insert(http::header::HOST, host);
    }
    parts.uri = parts
        .uri
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .parse()
        .unwrap_or_default();
    parts.version = http::Version::HTTP_11;
    let owner = format!("actor {class}");
    let body = match link::read_body(&mut body, MAX_FORWARD_BODY).await {
        Ok(b) => b,
        Err(BodyError::TooLarge) => {
            return Err((
                owner,
                Error::new(ErrorKind::BodyTooLarge).context(format!(
                    "a forwarded body is at most {MAX_FORWARD_BODY} bytes"
                )),
            ));
        }
        Err(BodyError::Stream(e)) => {
            return Err((
                owner,
                Error::new(ErrorKind::BadRequest)
                    .context("the forwarded body could not be read")
                    .with_source(e),
            ));
        }
    };
    directory
        .send_forwarded(
            &class,
            &actor_id,
            Request::from_parts(parts, body),
            id,
            hops,
        )
        .await
        .map_err(|e| (owner, e))
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
