//! What the edge sees of each request once it has ended: a count by
//! target and status code, a duration histogram, the bytes sent, and (with
//! `server.access_log`) one access-log line.
//!
//! Invariants:
//! - Recording takes no lock: each target's counters are atomics created
//!   when the routing table is built (one set per function, actor class and
//!   upstream of the manifest, plus one for requests no route took), so
//!   nothing a client sends can add a series. Status codes are counted in a
//!   fixed array over 100..=599 (a guest's out-of-range status is refused
//!   before it gets here).
//! - A request ends when its response body has been sent whole, or when
//!   it is dropped (the client left, the connection was closed): the
//!   duration runs from the request's arrival at the edge to that moment,
//!   so a streamed response is timed to its last byte, and a response cut
//!   short is logged with `complete=false`.
//! - A request's id is the `x-request-id` a trusted proxy
//!   (`server.trusted_proxies`) sent, if it is a UUID; else a fresh UUIDv7.
//!   A client's own `x-request-id` is never believed: ids in logs and error
//!   bodies are the node's.
//! - The access line carries the request id, never the query string
//!   (where clients put tokens) or any header value.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use ignis_config::Manifest;
use ignis_runtime::RequestId;
use ignis_runtime::histogram::Histogram;

/// What kind of target served a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    /// A function.
    Function,
    /// A durable actor class.
    Actor,
    /// An upstream (reverse proxy).
    Upstream,
    /// The edge itself: no route, a malformed request, a redirect.
    Edge,
}

impl Kind {
    /// Its label value: `function`, `actor`, `upstream` or `edge`.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Function => "function",
            Kind::Actor => "actor",
            Kind::Upstream => "upstream",
            Kind::Edge => "edge",
        }
    }
}

const FIRST_CODE: u16 = 100;
const CODES: usize = 500;

/// Counters of one target.
#[derive(Debug)]
pub struct TargetTraffic {
    /// What it is.
    pub kind: Kind,
    /// Its name (`-` for the edge).
    pub name: Arc<str>,
    /// Its tenant (`-` for upstreams and the edge).
    pub tenant: Arc<str>,
    codes: Box<[AtomicU64]>,
    /// Request durations, arrival to the end of the response body.
    pub duration: Histogram,
    /// Response body bytes sent.
    pub bytes_sent: AtomicU64,
}

impl TargetTraffic {
    fn new(kind: Kind, name: &str, tenant: &str) -> Arc<TargetTraffic> {
        Arc::new(TargetTraffic {
            kind,
            name: name.into(),
            tenant: tenant.into(),
            codes: (0..CODES).map(|_| AtomicU64::new(0)).collect(),
            duration: Histogram::default(),
            bytes_sent: AtomicU64::new(0),
        })
    }

    /// Requests ended so far, by status code (codes never seen left out).
    pub fn by_code(&self) -> Vec<(u16, u64)> {
        self.codes
            .iter()
            .enumerate()
            .filter_map(|(i, n)| {
                let n = n.load(Ordering::Relaxed);
                (n > 0).then_some((FIRST_CODE + i as u16, n))
            })
            .collect()
    }
}

/// The node's traffic counters, one [`TargetTraffic`] per target.
#[derive(Debug)]
pub struct Traffic {
    targets: BTreeMap<(Kind, String), Arc<TargetTraffic>>,
    edge: Arc<TargetTraffic>,
    access_log: bool,
    trusted_proxies: Arc<[ignis_config::IpRange]>,
}

impl Traffic {
    /// Counters for every function, actor class and upstream of `manifest`.
    pub fn new(manifest: &Manifest) -> Arc<Traffic> {
        Traffic::build(manifest, None)
    }

    /// The counters of `manifest`, the next version of this one's: a target
    /// kept (same kind, name and tenant) keeps its counters, so a deploy
    /// never resets what Prometheus has scraped; a new target starts at
    /// zero; a removed one is dropped (its series end).
    pub fn next(&self, manifest: &Manifest) -> Arc<Traffic> {
        Traffic::build(manifest, Some(self))
    }

    fn build(manifest: &Manifest, previous: Option<&Traffic>) -> Arc<Traffic> {
        let mut targets = BTreeMap::new();
        let mut add = |kind: Kind, name: &str, tenant: &str| {
            let kept = previous
                .and_then(|p| p.targets.get(&(kind, name.to_string())))
                .filter(|t| &*t.tenant == tenant)
                .cloned();
            let t = kept.unwrap_or_else(|| TargetTraffic::new(kind, name, tenant));
            targets.insert((kind, name.to_string()), t);
        };
        for (name, f) in &manifest.functions {
            add(Kind::Function, name, &f.tenant);
        }
        for (name, a) in &manifest.actors {
            add(Kind::Actor, name, &a.tenant);
        }
        for name in manifest.upstreams.keys() {
            add(Kind::Upstream, name, "-");
        }
        Arc::new(Traffic {
            targets,
            edge: previous.map_or_else(
                || TargetTraffic::new(Kind::Edge, "-", "-"),
                |p| p.edge.clone(),
            ),
            access_log: manifest.server.access_log,
            trusted_proxies: manifest.server.trusted_proxies.clone().into(),
        })
    }

    /// The counters of target `(kind, name)`, if the manifest has it.
    pub fn target(&self, kind: Kind, name: &str) -> Option<&Arc<TargetTraffic>> {
        self.targets.get(&(kind, name.to_string()))
    }

    /// The counters of requests the edge answered itself.
    pub fn edge(&self) -> &Arc<TargetTraffic> {
        &self.edge
    }

    /// Every target's counters, the edge's last.
    pub fn all(&self) -> impl Iterator<Item = &Arc<TargetTraffic>> {
        self.targets.values().chain(std::iter::once(&self.edge))
    }

    /// Starts the record of a request that arrived now: its id (the
    /// `x-request-id` of a trusted proxy, else a fresh one) and trace.
    pub(crate) fn begin<B>(&self, req: &http::Request<B>, peer: SocketAddr) -> Exchange {
        let trusted = !self.trusted_proxies.is_empty()
            && crate::proxy::headers::trusted(peer.ip(), &self.trusted_proxies);
        Exchange {
            started: Instant::now(),
            target: self.edge.clone(),
            status: 0,
            id: RequestId::for_request(req.headers(), trusted),
            bytes: 0,
            // Nothing is kept for a line the log filter would drop.
            access: (self.access_log
                && tracing::enabled!(target: "ignis::access", tracing::Level::INFO))
            .then(|| {
                Box::new(Access {
                    peer,
                    method: req.method().clone(),
                    host: req.headers().get(http::header::HOST).cloned(),
                    uri: req.uri().clone(),
                    version: req.version(),
                })
            }),
        }
    }
}

/// What the access line needs of the request.
#[derive(Debug)]
struct Access {
    peer: SocketAddr,
    method: http::Method,
    host: Option<http::HeaderValue>,
    uri: http::Uri,
    version: http::Version,
}

/// One request on its way: recorded when its response ends ([`Exchange::end`]).
#[derive(Debug)]
pub(crate) struct Exchange {
    started: Instant,
    target: Arc<TargetTraffic>,
    status: u16,
    id: RequestId,
    bytes: u64,
    access: Option<Box<Access>>,
}

impl Exchange {
    /// A record counted nowhere that matters (unit tests of bodies).
    #[cfg(test)]
    pub(crate) fn detached() -> Exchange {
        Exchange {
            started: Instant::now(),
            target: TargetTraffic::new(Kind::Edge, "-", "-"),
            status: 0,
            id: RequestId::new(),
            bytes: 0,
            access: None,
        }
    }

    /// Sets who served the request.
    pub(crate) fn served_by(&mut self, target: &Arc<TargetTraffic>) {
        self.target = target.clone();
    }

    /// The request's id.
    pub(crate) fn id(&self) -> RequestId {
        self.id
    }

    /// Sets the response's status.
    pub(crate) fn responded(&mut self, status: http::StatusCode) {
        self.status = status.as_u16();
    }

    /// Counts body bytes sent.
    pub(crate) fn sent(&mut self, bytes: usize) {
        self.bytes += bytes as u64;
    }

    /// Records the request: it ended now, `complete` if its response body
    /// was sent whole.
    pub(crate) fn end(self, complete: bool) {
        let took = self.started.elapsed();
        let t = &self.target;
        if let Some(slot) = self
            .status
            .checked_sub(FIRST_CODE)
            .and_then(|i| t.codes.get(i as usize))
        {
            slot.fetch_add(1, Ordering::Relaxed);
        }
        t.duration.record(took);
        t.bytes_sent.fetch_add(self.bytes, Ordering::Relaxed);
        if let Some(a) = self.access {
            tracing::info!(
                target: "ignis::access",
                request_id = %self.id,
                peer = %a.peer,
                method = %a.method,
                host = a
                    .uri
                    .host()
                    .or_else(|| a.host.as_ref().and_then(|h| h.to_str().ok()))
                    .unwrap_or("-"),
                path = a.uri.path(),
                version = ?a.version,
                kind = t.kind.as_str(),
                name = &*t.name,
                tenant = &*t.tenant,
                status = self.status,
                bytes = self.bytes,
                duration_ms = took.as_secs_f64() * 1000.0,
                complete,
            );
        }
    }
}
