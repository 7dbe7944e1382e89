//! Outbound `wasi:http/outgoing-handler`: what a guest request may send.
//!
//! `wasmtime-wasi-http` implements the interface; every outgoing request
//! reaches [`OutboundHooks::send_request`]. A function's hooks carry its
//! grant (allowlist and backends, [`Outbound`]) and count the request
//! against `max_outbound_requests`; a guest without a grant (an actor
//! class) gets `HTTP-request-denied` for every request, and the refusal is
//! logged with its name and request id.

use std::sync::Arc;

use wasmtime_wasi_http::{RequestOptions, WasiBody, WasiHttpHooks};

use crate::RequestId;
use crate::outbound::Outbound;

/// Outbound HTTP a function was granted.
pub struct OutboundGrant {
    outbound: Arc<Outbound>,
    max_sent: u32,
}

impl OutboundGrant {
    /// `outbound`'s allowlist and backends, at most `max_sent` requests per
    /// guest request.
    pub fn new(outbound: Arc<Outbound>, max_sent: u32) -> OutboundGrant {
        OutboundGrant { outbound, max_sent }
    }
}

/// The `wasi:http` hooks of one store.
pub struct OutboundHooks {
    grant: Option<Arc<OutboundGrant>>,
    owner: Arc<str>,
    request_id: RequestId,
    /// Outbound requests the current guest request sent.
    sent: u32,
}

impl OutboundHooks {
    /// Hooks for a guest of `owner` with `grant` (`None`: deny everything).
    pub fn new(grant: Option<Arc<OutboundGrant>>, owner: Arc<str>, request_id: RequestId) -> Self {
        OutboundHooks {
            grant,
            owner,
            request_id,
            sent: 0,
        }
    }

    /// A new request on a kept instance: its id, and a fresh count.
    pub(crate) fn begin(&mut self, request_id: RequestId) {
        self.request_id = request_id;
        self.sent = 0;
    }
}

type IoFuture = Box<dyn Future<Output = Result<(), wasmtime_wasi_http::Error>> + Send>;

impl WasiHttpHooks for OutboundHooks {
    fn send_request(
        &mut self,
        request: http::Request<WasiBody>,
        options: Option<RequestOptions>,
        _fut: IoFuture,
    ) -> Box<
        dyn Future<Output = wasmtime_wasi_http::Result<(http::Response<WasiBody>, IoFuture)>>
            + Send,
    > {
        let denied = || Box::new(async { Err(wasmtime_wasi_http::Error::HttpRequestDenied) });
        let Some(grant) = &self.grant else {
            tracing::warn!(owner = %self.owner, request_id = %self.request_id, "outbound request denied: this guest has no outbound HTTP grant");
            return denied();
        };
        if self.sent >= grant.max_sent {
            tracing::warn!(function = %self.owner, request_id = %self.request_id, limit = grant.max_sent, "outbound request denied: max_outbound_requests reached for this request");
            return denied();
        }
        self.sent += 1;
        let outbound = grant.outbound.clone();
        let request_id = self.request_id;
        Box::new(async move {
            let response = outbound.send(request, options, request_id).await?;
            // The pool owns the connection task; nothing extra to drive here.
            Ok((response, Box::new(async { Ok(()) }) as IoFuture))
        })
    }
}
