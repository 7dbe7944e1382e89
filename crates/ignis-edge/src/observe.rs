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
//! - With a [`SpanSink`] (OpenTelemetry export, `[telemetry]`), each
//!   request in a sampled trace is handed to it once, when it ends, with
//!   the same fields as the access line. A trace this node starts is
//!   sampled at `telemetry.sample_ratio` (decided when the request arrives,
//!   so the `traceparent` passed on carries the decision); an incoming
//!   `traceparent`'s flag is followed. Without a sink nothing is sampled
//!   and nothing is kept for it.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

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

/// A request that ended, as a trace exporter sees it.
#[derive(Debug)]
pub struct RequestSpan<'a> {
    /// Its id and trace context (trace id, its span id, the parent's).
    pub id: RequestId,
    /// When it arrived.
    pub started: SystemTime,
    /// Arrival to the end of its response (or to when it was dropped).
    pub duration: Duration,
    /// The client's address.
    pub peer: SocketAddr,
    /// Request method.
    pub method: &'a http::Method,
    /// The host it named (`-` if none).
    pub host: &'a str,
    /// The path, without the query.
    pub path: &'a str,
    /// HTTP version.
    pub version: http::Version,
    /// Who served it.
    pub target: &'a TargetTraffic,
    /// Response status.
    pub status: u16,
    /// Response body bytes sent.
    pub bytes: u64,
    /// Whether the response body was sent whole.
    pub complete: bool,
}

/// Takes each ended request of a sampled trace (an OpenTelemetry
/// exporter). Called on the connection's task: it must not block.
pub trait SpanSink: Send + Sync + std::fmt::Debug {
    /// Records one request.
    fn record(&self, span: &RequestSpan<'_>);
}

/// The node's traffic counters, one [`TargetTraffic`] per target.
#[derive(Debug)]
pub struct Traffic {
    targets: BTreeMap<(Kind, String), Arc<TargetTraffic>>,
    edge: Arc<TargetTraffic>,
    access_log: bool,
    trusted_proxies: Arc<[ignis_config::IpRange]>,
    /// The trace exporter and the share of new traces it records.
    spans: Option<(Arc<dyn SpanSink>, f64)>,
}

impl Traffic {
    /// Counters for every function, actor class and upstream of `manifest`.
    pub fn new(manifest: &Manifest) -> Arc<Traffic> {
        Traffic::build(manifest, None, None)
    }

    /// Like [`Traffic::new`], handing each request of a sampled trace to
    /// `spans` (`telemetry.sample_ratio` of the traces this node starts).
    pub fn with_spans(manifest: &Manifest, spans: Arc<dyn SpanSink>) -> Arc<Traffic> {
        let ratio = manifest.telemetry.as_ref().map_or(1.0, |t| t.sample_ratio);
        Traffic::build(manifest, None, Some((spans, ratio)))
    }

    /// The counters of `manifest`, the next version of this one's: a target
    /// kept (same kind, name and tenant) keeps its counters, so a deploy
    /// never resets what Prometheus has scraped; a new target starts at
    /// zero; a removed one is dropped (its series end).
    pub fn next(&self, manifest: &Manifest) -> Arc<Traffic> {
        Traffic::build(manifest, Some(self), self.spans.clone())
    }

    fn build(
        manifest: &Manifest,
        previous: Option<&Traffic>,
        spans: Option<(Arc<dyn SpanSink>, f64)>,
    ) -> Arc<Traffic> {
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
            spans,
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
        let trusted = crate::proxy::headers::trusted(peer.ip(), &self.trusted_proxies);
        let mut id = RequestId::for_request(req.headers(), trusted);
        let mut spans = None;
        if let Some((sink, ratio)) = &self.spans {
            if !id.continues_trace() {
                id = id.with_sampled(sampled(id.seq(), *ratio));
            }
            if id.sampled() {
                spans = Some(sink.clone());
            }
        }
        // Nothing is kept for a line the log filter would drop.
        let log =
            self.access_log && tracing::enabled!(target: "ignis::access", tracing::Level::INFO);
        let keep = log || spans.is_some();
        Exchange {
            started: Instant::now(),
            target: self.edge.clone(),
            status: 0,
            id,
            bytes: 0,
            log,
            spans,
            access: keep.then(|| {
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

/// Whether a trace started here with request sequence `seq` is sampled
/// at `ratio` (a hash of the sequence: spread evenly, no lock, no RNG).
fn sampled(seq: u64, ratio: f64) -> bool {
    if ratio >= 1.0 {
        return true;
    }
    let mut z = seq.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^= z >> 31;
    (z as f64 / u64::MAX as f64) < ratio
}

/// One request on its way: recorded when its response ends ([`Exchange::end`]).
#[derive(Debug)]
pub(crate) struct Exchange {
    started: Instant,
    target: Arc<TargetTraffic>,
    status: u16,
    id: RequestId,
    bytes: u64,
    /// Whether to write the access line.
    log: bool,
    /// The exporter, if this request's trace is sampled.
    spans: Option<Arc<dyn SpanSink>>,
    /// What the access line and the span need of the request.
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
            log: false,
            spans: None,
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
        let Some(a) = self.access else {
            return;
        };
        let host = a
            .uri
            .host()
            .or_else(|| a.host.as_ref().and_then(|h| h.to_str().ok()))
            .unwrap_or("-");
        if let Some(sink) = &self.spans {
            sink.record(&RequestSpan {
                id: self.id,
                started: SystemTime::now() - took,
                duration: took,
                peer: a.peer,
                method: &a.method,
                host,
                path: a.uri.path(),
                version: a.version,
                target: t,
                status: self.status,
                bytes: self.bytes,
                complete,
            });
        }
        if self.log {
            tracing::info!(
                target: "ignis::access",
                request_id = %self.id,
                peer = %a.peer,
                method = %a.method,
                host,
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
