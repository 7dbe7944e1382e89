//! A request on a `wasi:http/proxy` 0.2.x component (`incoming-handler`).

use bytes::Bytes;
use tokio::sync::oneshot;
use wasmtime::Store;
use wasmtime_wasi_http::WasiHttpView;
use wasmtime_wasi_http::p2::bindings::ProxyPre;
use wasmtime_wasi_http::p2::bindings::http::types::Scheme;

use super::{GuestRun, Sent};
use crate::error::Error;
use crate::host::Host;

/// Puts `request` and a response outparam into the store's table and
/// returns the guest run: instantiate, then call `handle`. The response
/// goes to `tx` as soon as the guest sets it.
pub(super) fn start<B>(
    pre: &ProxyPre<Host>,
    mut store: Store<Host>,
    request: http::Request<B>,
    https: bool,
    tx: oneshot::Sender<Sent>,
) -> Result<GuestRun, Error>
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<wasmtime_wasi_http::Error>,
{
    let scheme = if https { Scheme::Https } else { Scheme::Http };
    let mut http = store.data_mut().http();
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
            let proxy = pre.instantiate_async(&mut store).await?;
            proxy
                .wasi_http_incoming_handler()
                .call_handle(&mut store, req, out)
                .await
        }
        .await;
        (result, store.data().limiter.denied)
    }))
}
