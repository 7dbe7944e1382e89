//! A request on a `wasi:http/proxy` 0.2.x component (`incoming-handler`).

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use tokio::sync::oneshot;
use wasmtime_wasi_http::WasiHttpView;
use wasmtime_wasi_http::p2::bindings::ProxyPre;
use wasmtime_wasi_http::p2::bindings::http::types::Scheme;

use super::reuse::{Instance, Kept};
use super::{GuestRun, Sent};
use crate::error::Error;
use crate::guest::GuestStats;
use crate::host::Host;

/// Puts `request` and a response outparam into the store's table and
/// returns the guest run: instantiate (unless `kept` holds an instance),
/// then call `handle`. The response goes to `tx` as soon as the guest sets
/// it; the run ends, giving the instance back, when `handle` returns.
pub(super) fn start<B>(
    pre: &ProxyPre<Host>,
    mut kept: Kept,
    request: http::Request<B>,
    https: bool,
    tx: oneshot::Sender<Sent>,
    stats: Arc<GuestStats>,
) -> Result<GuestRun, Error>
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<wasmtime_wasi_http::Error>,
{
    let scheme = if https { Scheme::Https } else { Scheme::Http };
    let mut http = kept.store.data_mut().http();
    let req = http
        .new_incoming_request(scheme, request)
        .map_err(Error::internal)?;
    let out = http
        .new_response_outparam_from_callback(move |sent| {
            let _ = tx.send(sent.map_err(|code| format!("{code:?}")));
        })
        .map_err(Error::internal)?;
    let pre = pre.clone();
    Ok(Box::pin(async move {
        let result = async {
            if kept.instance.is_none() {
                let started = Instant::now();
                let proxy = pre.instantiate_async(&mut kept.store).await?;
                stats.instantiation.record(started.elapsed());
                kept.instance = Some(Instance::P2(proxy));
            }
            let Some(Instance::P2(proxy)) = &kept.instance else {
                unreachable!("a 0.2 function's instances are 0.2 proxies");
            };
            proxy
                .wasi_http_incoming_handler()
                .call_handle(&mut kept.store, req, out)
                .await
        }
        .await;
        let denied = kept.store.data().limiter.denied;
        (result.map(|()| kept), denied)
    }))
}
