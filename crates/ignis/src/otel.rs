//! OpenTelemetry trace export (`[telemetry]`, off by default): one span
//! per request of a sampled trace, posted in batches to an OTLP/HTTP
//! collector as protobuf (`opentelemetry-proto`'s message types, `prost`).
//!
//! Each span is the request as the edge saw it: its trace id and span id
//! are those the node already passes on in `traceparent` (so a guest's or
//! an origin's spans nest under it), its parent is the incoming
//! `traceparent`'s span, and its times are arrival and end of response.
//! The SDK's tracer draws its own span ids, which would break that link,
//! and its batch processor exports off the tokio runtime (a blocking HTTP
//! client); this module is the small part of an exporter Ignis needs.
//!
//! Invariants:
//! - Recording never blocks or allocates past a bound: spans go into a
//!   queue of [`QUEUE`] spans; when it is full (the collector is slow or
//!   down) the span is dropped and counted, and the first drop is logged.
//! - One task sends: batches of at most [`BATCH`] spans, at least once a
//!   second while spans come, each POST bounded by [`EXPORT_TIMEOUT`]. A
//!   failed POST drops its batch (logged at most once a minute); nothing
//!   retries into a pile.
//! - At shutdown what is queued is sent (within [`EXPORT_TIMEOUT`]).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::Full;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use ignis_config::TelemetryConfig;
use ignis_edge::observe::{RequestSpan, SpanSink};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::{AnyValue, InstrumentationScope, KeyValue, any_value};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::{
    ResourceSpans, ScopeSpans, Span, Status, span, status,
};
use prost::Message as _;
use tokio::sync::{mpsc, oneshot};

/// Spans waiting to be sent, at most.
pub const QUEUE: usize = 4096;
/// Spans per POST, at most.
pub const BATCH: usize = 512;
/// Longest one POST may take.
pub const EXPORT_TIMEOUT: Duration = Duration::from_secs(10);

/// The exporter: a [`SpanSink`] for the edge.
#[derive(Debug)]
pub struct OtlpExporter {
    tx: mpsc::Sender<Span>,
    dropped: AtomicU64,
    exported: Arc<AtomicU64>,
    stop: std::sync::Mutex<Option<(oneshot::Sender<()>, tokio::task::JoinHandle<()>)>>,
}

impl OtlpExporter {
    /// Starts the sending task on the current tokio runtime.
    pub fn start(config: &TelemetryConfig) -> anyhow::Result<Arc<OtlpExporter>> {
        let endpoint: http::Uri = config
            .otlp_endpoint
            .parse()
            .map_err(|e| anyhow::anyhow!("telemetry.otlp_endpoint: {e}"))?;
        let (tx, rx) = mpsc::channel(QUEUE);
        let (stop_tx, stop_rx) = oneshot::channel();
        let exported = Arc::new(AtomicU64::new(0));
        let resource = Resource {
            attributes: vec![
                attribute("service.name", &config.service_name),
                attribute("service.version", env!("CARGO_PKG_VERSION")),
            ],
            ..Default::default()
        };
        let task = tokio::spawn(send_loop(rx, stop_rx, endpoint, resource, exported.clone()));
        tracing::info!(endpoint = %config.otlp_endpoint, sample_ratio = config.sample_ratio, "trace export on");
        Ok(Arc::new(OtlpExporter {
            tx,
            dropped: AtomicU64::new(0),
            exported,
            stop: std::sync::Mutex::new(Some((stop_tx, task))),
        }))
    }

    /// Spans sent to the collector so far (accepted with a 2xx).
    pub fn exported(&self) -> u64 {
        self.exported.load(Ordering::Relaxed)
    }

    /// Spans dropped because the queue was full.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Sends what is queued and stops the task.
    pub async fn shutdown(&self) {
        let stop = self.stop.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some((stop, task)) = stop {
            let _ = stop.send(());
            let _ = tokio::time::timeout(EXPORT_TIMEOUT + Duration::from_secs(1), task).await;
        }
    }
}

fn attribute(key: &str, value: &str) -> KeyValue {
    KeyValue {
        key: key.to_string(),
        value: Some(AnyValue {
            value: Some(any_value::Value::StringValue(value.to_string())),
        }),
        ..Default::default()
    }
}

fn int_attribute(key: &str, value: i64) -> KeyValue {
    KeyValue {
        key: key.to_string(),
        value: Some(AnyValue {
            value: Some(any_value::Value::IntValue(value)),
        }),
        ..Default::default()
    }
}

fn unix_nanos(t: std::time::SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

impl SpanSink for OtlpExporter {
    fn record(&self, s: &RequestSpan<'_>) {
        let id = s.id;
        let version = match s.version {
            http::Version::HTTP_10 => "1.0",
            http::Version::HTTP_11 => "1.1",
            http::Version::HTTP_2 => "2",
            http::Version::HTTP_3 => "3",
            _ => "other",
        };
        let mut attributes = vec![
            attribute("http.request.method", s.method.as_str()),
            attribute("url.path", s.path),
            attribute("server.address", s.host),
            attribute("network.protocol.version", version),
            attribute("client.address", &s.peer.ip().to_string()),
            int_attribute("http.response.status_code", i64::from(s.status)),
            int_attribute("http.response.body.size", s.bytes as i64),
            attribute("ignis.request_id", &id.to_string()),
            attribute("ignis.target.kind", s.target.kind.as_str()),
            attribute("ignis.target.name", &s.target.name),
            attribute("ignis.tenant", &s.target.tenant),
        ];
        if !s.complete {
            attributes.push(attribute("ignis.response", "incomplete"));
        }
        let failed = s.status >= 500 || !s.complete;
        let span = Span {
            trace_id: id.trace_id().to_be_bytes().to_vec(),
            span_id: id.span_id().to_be_bytes().to_vec(),
            parent_span_id: id
                .parent_span_id()
                .map_or_else(Vec::new, |p| p.to_be_bytes().to_vec()),
            flags: 1,
            name: format!("{} {}", s.method, s.target.name),
            kind: span::SpanKind::Server as i32,
            start_time_unix_nano: unix_nanos(s.started),
            end_time_unix_nano: unix_nanos(s.started + s.duration),
            attributes,
            status: Some(Status {
                message: String::new(),
                code: if failed {
                    status::StatusCode::Error as i32
                } else {
                    status::StatusCode::Unset as i32
                },
            }),
            ..Default::default()
        };
        if self.tx.try_send(span).is_err() && self.dropped.fetch_add(1, Ordering::Relaxed) == 0 {
            tracing::warn!(
                queue = QUEUE,
                "trace export queue full: spans are dropped (counted) until the collector catches up"
            );
        }
    }
}

/// Collects spans into batches and POSTs them until told to stop; then
/// sends what is left.
async fn send_loop(
    mut rx: mpsc::Receiver<Span>,
    mut stop: oneshot::Receiver<()>,
    endpoint: http::Uri,
    resource: Resource,
    exported: Arc<AtomicU64>,
) {
    let client: Client<HttpConnector, Full<Bytes>> =
        Client::builder(TokioExecutor::new()).build_http();
    let mut last_failure_logged: Option<Instant> = None;
    let mut stopping = false;
    while !stopping {
        let mut batch = Vec::new();
        tokio::select! {
            got = rx.recv() => match got {
                Some(s) => batch.push(s),
                None => stopping = true,
            },
            _ = &mut stop => stopping = true,
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(1);
        while batch.len() < BATCH {
            if stopping {
                match rx.try_recv() {
                    Ok(s) => batch.push(s),
                    Err(_) => break,
                }
                continue;
            }
            tokio::select! {
                got = rx.recv() => match got {
                    Some(s) => batch.push(s),
                    None => { stopping = true; }
                },
                () = tokio::time::sleep_until(deadline) => break,
                _ = &mut stop => stopping = true,
            }
        }
        if batch.is_empty() {
            continue;
        }
        let n = batch.len() as u64;
        let request = ExportTraceServiceRequest {
            resource_spans: vec![ResourceSpans {
                resource: Some(resource.clone()),
                scope_spans: vec![ScopeSpans {
                    scope: Some(InstrumentationScope {
                        name: "ignis".into(),
                        version: env!("CARGO_PKG_VERSION").into(),
                        ..Default::default()
                    }),
                    spans: batch,
                    schema_url: String::new(),
                }],
                schema_url: String::new(),
            }],
        };
        let body = Bytes::from(request.encode_to_vec());
        let post = http::Request::post(endpoint.clone())
            .header(http::header::CONTENT_TYPE, "application/x-protobuf")
            .body(Full::new(body));
        let outcome = match post {
            Ok(req) => match tokio::time::timeout(EXPORT_TIMEOUT, client.request(req)).await {
                Ok(Ok(resp)) if resp.status().is_success() => Ok(()),
                Ok(Ok(resp)) => Err(format!("the collector answered {}", resp.status())),
                Ok(Err(e)) => Err(format!("{e}")),
                Err(_) => Err(format!("no answer within {EXPORT_TIMEOUT:?}")),
            },
            Err(e) => Err(format!("{e}")),
        };
        match outcome {
            Ok(()) => {
                exported.fetch_add(n, Ordering::Relaxed);
            }
            Err(why) => {
                if last_failure_logged.is_none_or(|t| t.elapsed() > Duration::from_secs(60)) {
                    last_failure_logged = Some(Instant::now());
                    tracing::warn!(endpoint = %endpoint, spans = n, error = %why, "trace export failed; the batch is dropped (logged at most once a minute)");
                }
            }
        }
    }
}
