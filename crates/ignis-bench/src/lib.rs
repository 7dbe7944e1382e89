//! Load generation for Ignis benchmarks.
//!
//! [`run`] drives HTTP/1.1 keep-alive connections against one URL, either
//! closed-loop (each connection sends its next request as soon as the last
//! one finished: measures throughput) or open-loop (requests are due at a
//! fixed rate whatever the server does: measures latency). Open-loop latency
//! is taken from each request's *intended* send time, so a server that
//! stalls is charged for every request that should have been sent meanwhile
//! (coordinated-omission correction, as in wrk2). The one exception is the
//! generator's own timer slack: when a connection was idle at the intended
//! time and only the timer woke late, latency counts from the actual send.
//! Open-loop requests due inside the window are counted when they complete,
//! even if that is after the window closes (up to 5 s).
//!
//! Over TLS ([`LoadSpec::tls`]) each connection does a full handshake (no
//! resumption); with [`LoadSpec::h2`] the request loops share
//! [`LoadSpec::h2_connections`] HTTP/2 connections (each loop is one
//! stream at a time); with [`LoadSpec::reconnect`] every request opens,
//! uses and closes its own connection (new connections per second, TLS
//! handshakes included).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use hdrhistogram::Histogram;
use http_body_util::{BodyExt, Empty};
use hyper::client::conn::{http1, http2};
use hyper_util::rt::TokioIo;
use serde::Serialize;
use tokio::net::TcpStream;
use tokio::time::Instant;

pub mod cluster;
pub mod deploy;
pub mod hello;
pub mod plot;
pub mod proxy;
pub mod scenario;

/// Parses an open-loop rate argument (requests per second): a finite
/// number above zero (the load generator divides by it).
pub fn positive_rate(arg: &str) -> Result<f64, String> {
    match arg.parse::<f64>() {
        Ok(rate) if rate.is_finite() && rate > 0.0 => Ok(rate),
        Ok(_) => Err(format!(
            "a rate is requests per second above zero, not {arg}"
        )),
        Err(e) => Err(format!("{arg} is not a number: {e}")),
    }
}

/// What to send.
#[derive(Debug, Clone)]
pub struct LoadSpec {
    /// `host:port` to connect to.
    pub addr: String,
    /// Path and query of every request. `{i:N}` in it is replaced by a
    /// number below N that changes with every request (request k of
    /// connection c gets `(c + k * connections) % N`), to spread requests
    /// over N keys or actors.
    pub path: String,
    /// Keep-alive connections.
    pub connections: usize,
    /// Measured duration.
    pub duration: Duration,
    /// Unmeasured warm-up before it.
    pub warmup: Duration,
    /// `None`: closed loop. `Some(r)`: open loop at `r` requests per second in total.
    pub rate: Option<f64>,
    /// Connect over TLS with these settings (ALPN included), naming
    /// `tls_name` in SNI.
    pub tls: Option<Arc<tokio_rustls::rustls::ClientConfig>>,
    /// The SNI name for TLS.
    pub tls_name: String,
    /// Speak HTTP/2 (over TLS: the config must offer `h2`; plain: h2c by
    /// prior knowledge).
    pub h2: bool,
    /// HTTP/2 connections the request loops share (`connections` loops,
    /// loop `i` on connection `i % h2_connections`).
    pub h2_connections: usize,
    /// A new connection for every request (closed after its response).
    pub reconnect: bool,
}

impl LoadSpec {
    /// Plain HTTP/1.1 keep-alive load of `path` at `addr`.
    pub fn new(addr: &str, path: &str, connections: usize, duration: Duration) -> LoadSpec {
        LoadSpec {
            addr: addr.to_string(),
            path: path.to_string(),
            connections,
            duration,
            warmup: Duration::from_secs(1),
            rate: None,
            tls: None,
            tls_name: "localhost".into(),
            h2: false,
            h2_connections: 1,
            reconnect: false,
        }
    }
}

/// One connection's way of sending a request.
#[derive(Clone)]
enum Sender {
    H1(Arc<tokio::sync::Mutex<http1::SendRequest<Empty<Bytes>>>>),
    H2(http2::SendRequest<Empty<Bytes>>),
}

impl Sender {
    async fn send(&self, req: http::Request<Empty<Bytes>>) -> Result<u16, hyper::Error> {
        let resp = match self {
            Sender::H1(s) => {
                let mut s = s.lock().await;
                s.ready().await?;
                s.send_request(req).await?
            }
            Sender::H2(s) => {
                let mut s = s.clone();
                s.ready().await?;
                s.send_request(req).await?
            }
        };
        let status = resp.status().as_u16();
        resp.into_body().collect().await?;
        Ok(status)
    }
}

trait Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin> Io for T {}

/// Opens one connection as `spec` says.
async fn open(spec: &LoadSpec) -> anyhow::Result<Sender> {
    let stream = TcpStream::connect(&spec.addr).await?;
    stream.set_nodelay(true)?;
    let io: Box<dyn Io> = match &spec.tls {
        None => Box::new(stream),
        Some(config) => {
            let name =
                tokio_rustls::rustls::pki_types::ServerName::try_from(spec.tls_name.clone())?;
            let tls = tokio_rustls::TlsConnector::from(config.clone())
                .connect(name, stream)
                .await?;
            Box::new(tls)
        }
    };
    if spec.h2 {
        let (sender, conn) =
            http2::handshake(hyper_util::rt::TokioExecutor::new(), TokioIo::new(io)).await?;
        tokio::spawn(conn);
        Ok(Sender::H2(sender))
    } else {
        let (sender, conn) = http1::handshake(TokioIo::new(io)).await?;
        tokio::spawn(conn);
        Ok(Sender::H1(Arc::new(tokio::sync::Mutex::new(sender))))
    }
}

/// A request path with an optional `{i:N}` placeholder.
struct PathTemplate {
    before: String,
    modulus: Option<u64>,
    after: String,
}

impl PathTemplate {
    fn parse(path: &str) -> Self {
        if let Some(start) = path.find("{i:")
            && let Some(len) = path[start..].find('}')
            && let Ok(n) = path[start + 3..start + len].parse::<u64>()
            && n > 0
        {
            return PathTemplate {
                before: path[..start].to_string(),
                modulus: Some(n),
                after: path[start + len + 1..].to_string(),
            };
        }
        PathTemplate {
            before: path.to_string(),
            modulus: None,
            after: String::new(),
        }
    }

    fn expand(&self, n: u64) -> String {
        match self.modulus {
            None => self.before.clone(),
            Some(m) => format!("{}{}{}", self.before, n % m, self.after),
        }
    }
}

/// Latency percentiles in microseconds.
#[derive(Debug, Clone, Serialize)]
pub struct Percentiles {
    /// Median.
    pub p50: u64,
    /// 90th.
    pub p90: u64,
    /// 99th.
    pub p99: u64,
    /// 99.9th.
    pub p999: u64,
    /// Maximum.
    pub max: u64,
}

/// Result of one run.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Requests completed in the measured window (any status).
    pub completed: u64,
    /// Completed requests per second.
    pub throughput: f64,
    /// Responses by status code.
    pub statuses: BTreeMap<u16, u64>,
    /// Connection or protocol errors.
    pub io_errors: u64,
    /// Latency in microseconds.
    pub latency_us: Percentiles,
    /// Requests due (open loop) that never completed (5 s after the window).
    pub unfinished: u64,
    /// The latency distribution: `(quantile, microseconds)` points, for plots.
    pub curve: Vec<(f64, u64)>,
}

/// Quantiles sampled into [`Report::curve`].
const CURVE: [f64; 16] = [
    0.0, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99, 0.995, 0.999, 0.9995, 0.9999, 0.99995, 0.99999,
    0.999995, 0.999999, 1.0,
];

struct ConnResult {
    hist: Histogram<u64>,
    statuses: BTreeMap<u16, u64>,
    io_errors: u64,
    unfinished: u64,
}

async fn one_connection(
    spec: LoadSpec,
    index: usize,
    start: Instant,
    measure_from: Instant,
    end: Instant,
    shared: Option<Sender>,
) -> ConnResult {
    let mut r = ConnResult {
        hist: Histogram::new_with_bounds(1, 120_000_000, 3).expect("valid bounds"),
        statuses: BTreeMap::new(),
        io_errors: 0,
        unfinished: 0,
    };
    let mut sender = shared;
    let interval = spec
        .rate
        .map(|rate| Duration::from_secs_f64(spec.connections as f64 / rate));
    // Stagger open-loop connections evenly over one interval.
    let mut due = start
        + interval.map_or(Duration::ZERO, |i| {
            i.mul_f64(index as f64 / spec.connections as f64)
        });
    // When the previous response on this connection arrived.
    let mut previous_done = start;
    let template = PathTemplate::parse(&spec.path);
    let mut sent = 0u64;
    loop {
        if interval.is_some() {
            if due >= end {
                break;
            }
            tokio::time::sleep_until(due).await;
        } else {
            due = Instant::now();
            if due >= end {
                break;
            }
        }
        // Latency clock. Open loop: from the intended send time when the
        // server kept this connection busy past it (coordinated-omission
        // correction); from the actual send time when the connection was free
        // and only our timer woke late (tokio timers have 1 ms granularity,
        // which is the generator's slack, not the server's).
        let clock = if previous_done > due {
            due
        } else {
            Instant::now()
        };
        if sender.is_none() {
            match open(&spec).await {
                Ok(s) => sender = Some(s),
                Err(_) => {
                    r.io_errors += 1;
                    if let Some(i) = interval {
                        due += i;
                    }
                    continue;
                }
            }
        }
        let s = sender.clone().expect("connected");
        let n = index as u64 + sent * spec.connections as u64;
        sent += 1;
        let scheme = if spec.tls.is_some() { "https" } else { "http" };
        let uri: http::Uri = format!("{scheme}://{}{}", spec.addr, template.expand(n))
            .parse()
            .expect("valid uri");
        let mut req = http::Request::get(uri);
        if !spec.h2 {
            req = req.header(http::header::HOST, spec.addr.as_str());
        }
        let req = req.body(Empty::new()).expect("valid request");
        let outcome = tokio::time::timeout_at(end + Duration::from_secs(5), s.send(req)).await;
        if spec.reconnect {
            // Closed with the last handle (the connection task ends).
            sender = None;
        }
        let done = Instant::now();
        previous_done = done;
        let counted = due >= measure_from && (interval.is_some() || done <= end);
        match outcome {
            Ok(Ok(status)) => {
                if counted {
                    *r.statuses.entry(status).or_default() += 1;
                    let us = done.duration_since(clock).as_micros() as u64;
                    r.hist.saturating_record(us.max(1));
                }
            }
            Ok(Err(_)) => {
                r.io_errors += 1;
                sender = None;
            }
            Err(_) => {
                r.unfinished += 1;
                break;
            }
        }
        if let Some(i) = interval {
            due += i;
        }
    }
    // Requests that were due but never sent because the connection fell behind.
    if let Some(i) = interval {
        while due < end {
            if due >= measure_from {
                r.unfinished += 1;
            }
            due += i;
        }
    }
    r
}

/// Runs a load and returns the report.
pub async fn run(spec: &LoadSpec) -> Report {
    let start = Instant::now() + Duration::from_millis(50);
    let measure_from = start + spec.warmup;
    let end = measure_from + spec.duration;
    // HTTP/2 loops share connections opened up front (a failed one is
    // reopened by its loop, privately).
    let mut shared = Vec::new();
    if spec.h2 && !spec.reconnect {
        for _ in 0..spec.h2_connections.max(1) {
            shared.push(open(spec).await.ok());
        }
    }
    let tasks: Vec<_> = (0..spec.connections)
        .map(|i| {
            let conn = shared.get(i % shared.len().max(1)).cloned().flatten();
            tokio::spawn(one_connection(
                spec.clone(),
                i,
                start,
                measure_from,
                end,
                conn,
            ))
        })
        .collect();
    let mut hist = Histogram::<u64>::new_with_bounds(1, 120_000_000, 3).expect("valid bounds");
    let mut statuses = BTreeMap::new();
    let (mut io_errors, mut unfinished) = (0, 0);
    for t in tasks {
        let r = t.await.expect("load task");
        hist.add(&r.hist).expect("same bounds");
        for (k, v) in r.statuses {
            *statuses.entry(k).or_default() += v;
        }
        io_errors += r.io_errors;
        unfinished += r.unfinished;
    }
    let completed = hist.len();
    Report {
        completed,
        throughput: completed as f64 / spec.duration.as_secs_f64(),
        statuses,
        io_errors,
        latency_us: Percentiles {
            p50: hist.value_at_quantile(0.5),
            p90: hist.value_at_quantile(0.9),
            p99: hist.value_at_quantile(0.99),
            p999: hist.value_at_quantile(0.999),
            max: hist.max(),
        },
        unfinished,
        curve: CURVE
            .iter()
            .map(|&q| (q, hist.value_at_quantile(q)))
            .collect(),
    }
}

#[cfg(test)]
mod template_tests {
    use super::{PathTemplate, positive_rate};

    #[test]
    fn rates_are_finite_and_above_zero() {
        assert_eq!(positive_rate("400"), Ok(400.0));
        assert_eq!(positive_rate("2.5"), Ok(2.5));
        for bad in ["0", "-400", "inf", "NaN", "", "400/s"] {
            assert!(positive_rate(bad).is_err(), "{bad:?} was taken as a rate");
        }
    }

    #[test]
    fn placeholder_cycles_below_its_modulus() {
        let t = PathTemplate::parse("/counter/{i:3}/incr");
        let got: Vec<String> = (0..4).map(|n| t.expand(n)).collect();
        assert_eq!(
            got,
            [
                "/counter/0/incr",
                "/counter/1/incr",
                "/counter/2/incr",
                "/counter/0/incr"
            ]
        );
        assert_eq!(PathTemplate::parse("/plain?x=1").expand(7), "/plain?x=1");
    }
}
