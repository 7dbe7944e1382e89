//! A request on a `wasi:http/service` 0.3 component (`handler`).
//!
//! The guest returns its response from `handle`; its body is a stream that
//! the store's event loop feeds, so the loop keeps running until the
//! response body is complete (`done`).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use bytes::Bytes;
use tokio::sync::oneshot;
use wasmtime_wasi_http::WasiHttpView;
use wasmtime_wasi_http::p3::bindings::ServicePre;

use super::reuse::{Instance, Kept};
use super::{GuestRun, Sent};
use crate::guest::GuestStats;
use crate::host::Host;

/// The guest run: instantiate (unless `kept` holds an instance), call
/// `handle`, send the response to `tx`, and keep the event loop alive until
/// `done` (the body was read or dropped); then the instance goes back.
pub(super) fn start<B>(
    pre: &ServicePre<Host>,
    mut kept: Kept,
    request: http::Request<B>,
    tx: oneshot::Sender<Sent>,
    done: oneshot::Receiver<()>,
    cut: Arc<AtomicBool>,
    stats: Arc<GuestStats>,
) -> GuestRun
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<wasmtime_wasi_http::Error>,
{
    let (req, request_io) =
        wasmtime_wasi_http::p3::Request::from_http(kept.store.data_mut().http().hooks, request);
    let pre = pre.clone();
    Box::pin(async move {
        let result = async {
            if kept.instance.is_none() {
                let started = Instant::now();
                let service = pre.instantiate_async(&mut kept.store).await?;
                stats.instantiation.record(started.elapsed());
                kept.instance = Some(Instance::P3(service));
            }
            let Some(Instance::P3(service)) = &kept.instance else {
                unreachable!("a 0.3 function's instances are 0.3 services");
            };
            kept.store
                .run_concurrent(async move |accessor| {
                    match service.handle(accessor, req).await? {
                        Ok(response) => {
                            let response = accessor
                                .with(|mut store| response.into_http(&mut store, request_io))?;
                            let _ = tx.send(Ok(response));
                            // Keep the event loop alive while the body streams.
                            let _ = done.await;
                        }
                        Err(code) => {
                            let _ = tx.send(Err(format!("{code:?}")));
                        }
                    }
                    wasmtime::Result::<()>::Ok(())
                })
                .await?
        }
        .await;
        let denied = kept.store.data().limiter.denied;
        if result.is_err() {
            // Said before the store goes (closing the body's stream), so
            // the body never takes that close for a complete end.
            cut.store(true, Ordering::SeqCst);
        }
        (result.map(|()| kept), denied)
    })
}
