//! Durable actor activations: one long-lived instance per `(class, id)`.
//!
//! The runtime runs one message at a time on an [`Activation`] and hands
//! back the response together with the message's writes as one
//! [`ActorBatch`]; ordering, committing and releasing replies (the gates)
//! are `ignis-actors`' job. Reads inside a message see, newest first: the
//! message's own writes, then batches handed off but not yet durable (the
//! [`Overlay`]), then the store. The `ignis:actor` interfaces themselves
//! are in [`crate::bindings::actor`].

pub use crate::bindings::actor::Overlay;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::BodyExt;
use ignis_config::ActorClassConfig;
use ignis_store::{ActorBatch, ActorKey, ActorStorage};
use tokio::time::Instant;
use wasmtime::Store;
use wasmtime::component::{ComponentExportIndex, TypedFunc};
use wasmtime_wasi_http::WasiHttpView;
use wasmtime_wasi_http::p2::bindings::http::types::Scheme;
use wasmtime_wasi_http::p2::bindings::{Proxy, ProxyPre};

use crate::RequestId;
use crate::bindings::actor::{ActorState, ClientState};
use crate::bindings::http::OutboundHooks;
use crate::error::{Error, ErrorKind};
use crate::guest::{GuestStats, RunLimits, run_limited};
use crate::host::{Base, Host, new_store};
use crate::shared::Shared;

pub use crate::bindings::actor::{ActorCallFuture, ActorCaller, CallerId, CallerSlot};

/// Largest response body an actor may return (it is buffered until the
/// message's writes are durable).
pub const MAX_ACTOR_RESPONSE: usize = 16 << 20;

/// The exported `on-alarm(retry) -> result<_, string>`.
type AlarmFunc = TypedFunc<(u32,), (Result<(), String>,)>;

/// A deployed actor class: a prepared component and its settings.
pub struct ActorClass {
    /// The platform services and the epoch ticker.
    shared: Arc<Shared>,
    name: Arc<str>,
    pre: ProxyPre<Host>,
    alarm_export: Option<ComponentExportIndex>,
    config: ActorClassConfig,
    env: Vec<(String, String)>,
    storage: Arc<dyn ActorStorage>,
    stats: Arc<GuestStats>,
}

impl ActorClass {
    pub(crate) fn new(
        shared: Arc<Shared>,
        config: &ActorClassConfig,
        pre: ProxyPre<Host>,
        storage: Arc<dyn ActorStorage>,
    ) -> Arc<ActorClass> {
        let component = pre.instance_pre().component();
        let alarm_export = component
            .get_export_index(None, "ignis:actor/alarm-handler@0.1.0")
            .and_then(|iface| component.get_export_index(Some(&iface), "on-alarm"));
        Arc::new(ActorClass {
            shared,
            name: config.name.as_str().into(),
            pre,
            alarm_export,
            config: config.clone(),
            env: config
                .env
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            storage,
            stats: Arc::new(GuestStats::default()),
        })
    }

    /// The class name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its settings.
    pub fn config(&self) -> &ActorClassConfig {
        &self.config
    }

    /// Counters of all its activations' runs (messages and alarms): CPU,
    /// traps, limits.
    pub fn stats(&self) -> &Arc<GuestStats> {
        &self.stats
    }

    /// Whether the component exports `ignis:actor/alarm-handler`.
    pub fn has_alarm_handler(&self) -> bool {
        self.alarm_export.is_some()
    }

    /// Bytes of writes one activation may have waiting to be durable before
    /// it stops running messages until its commits catch up: four times
    /// what one message may write (`storage.max_batch_bytes`).
    pub fn max_pending_bytes(&self) -> usize {
        self.shared
            .platform
            .kv_limits
            .max_batch_bytes
            .saturating_mul(4)
    }

    /// The storage the class's actors use.
    pub fn storage(&self) -> &Arc<dyn ActorStorage> {
        &self.storage
    }

    /// Instantiates actor `id` (for request `request_id`). Nothing is
    /// loaded from storage: reads go to the store when the guest makes them.
    pub async fn activate(
        &self,
        id: &str,
        overlay: Arc<Mutex<Overlay>>,
        request_id: RequestId,
    ) -> Result<Activation, Error> {
        let key = ActorKey::new(self.name.clone(), id);
        let limits = &self.config;
        let actor = ActorState::new(
            key.clone(),
            self.storage.clone(),
            overlay,
            crate::bindings::actor::WriteLimits {
                max_key_bytes: limits.max_key_bytes,
                max_value_bytes: limits.max_value_bytes,
                max_writes: limits.max_writes_per_message,
                max_batch_bytes: self.shared.platform.kv_limits.max_batch_bytes,
            },
            self.alarm_export.is_some(),
        );
        let base = Base {
            owner: self.name.clone(),
            request_id,
            env: &self.env,
            memory_bytes: self.config.limits.memory_bytes,
            ticker: self.shared.store_lease(),
            stats: self.stats.clone(),
        };
        let host = Host::for_actor(
            base,
            OutboundHooks::new(None, self.name.clone(), request_id),
            actor,
            ClientState::new(
                self.shared.platform.actor_caller.clone(),
                CallerId {
                    tenant: self.config.tenant.as_str().into(),
                    name: self.name.clone(),
                },
                Some(key),
                request_id,
            ),
        );
        let mut store = new_store(self.pre.engine(), host);
        let instance = self
            .pre
            .instance_pre()
            .instantiate_async(&mut store)
            .await
            .map_err(Error::trap)?;
        let proxy = Proxy::new(&mut store, &instance).map_err(Error::internal)?;
        let alarm =
            match &self.alarm_export {
                Some(idx) => Some(instance.get_typed_func::<_, _>(&mut store, idx).map_err(
                    |e| {
                        Error::internal(e)
                            .context("ignis:actor/alarm-handler.on-alarm has the wrong type")
                    },
                )?),
                None => None,
            };
        Ok(Activation {
            store,
            proxy,
            alarm,
            stats: self.stats.clone(),
            config: self.config.clone(),
        })
    }
}

/// One live actor instance. Not shareable: messages run on it one at a time.
pub struct Activation {
    store: Store<Host>,
    proxy: Proxy,
    alarm: Option<AlarmFunc>,
    stats: Arc<GuestStats>,
    config: ActorClassConfig,
}

impl Activation {
    /// Starts a run: the store takes the message's request id, and the
    /// limits of one message apply from now.
    fn begin(&mut self, request_id: RequestId) -> RunLimits {
        self.store.data_mut().begin_request(request_id);
        self.stats.requests.fetch_add(1, Ordering::Relaxed);
        let limits = &self.config.limits;
        RunLimits {
            deadline: Instant::now() + limits.wall_time,
            cpu: limits.cpu_time,
            // Actors are not moved between executors; nothing is a hog.
            hog_above: limits.cpu_time,
            route: None,
        }
    }

    /// Runs one message to completion: the guest's response (body buffered)
    /// and everything it wrote. On error the writes are discarded and the
    /// activation must not be used again (the instance may be poisoned).
    pub async fn handle(
        &mut self,
        request: http::Request<Bytes>,
        request_id: RequestId,
    ) -> Result<(http::Response<Bytes>, ActorBatch), Error> {
        let limits = self.begin(request_id);
        let (tx, rx) = tokio::sync::oneshot::channel();
        let sent = Arc::new(AtomicBool::new(false));
        let sent_flag = sent.clone();
        let request = request.map(|b| {
            http_body_util::Full::new(b).map_err(
                |never: std::convert::Infallible| -> wasmtime_wasi_http::Error { match never {} },
            )
        });
        let mut http = self.store.data_mut().http();
        let req = http
            .new_incoming_request(Scheme::Http, request)
            .map_err(Error::internal)?;
        let out = http
            .new_response_outparam_from_callback(move |response| {
                sent_flag.store(true, Ordering::SeqCst);
                let _ = tx.send(response);
            })
            .map_err(Error::internal)?;
        let result = {
            let proxy = &self.proxy;
            let store = &mut self.store;
            let call = run_limited(
                async move {
                    let r = proxy
                        .wasi_http_incoming_handler()
                        .call_handle(&mut *store, req, out)
                        .await;
                    (r, store.data().limiter.denied)
                },
                limits,
                &self.stats,
            );
            // The body is read while the guest writes it.
            let collect = async move {
                let response = rx.await.map_err(|_| Error::new(ErrorKind::NoResponse))?;
                let response = response
                    .map_err(|code| Error::new(ErrorKind::GuestErrorCode(format!("{code:?}"))))?;
                let (parts, body) = response.into_parts();
                let bytes = http_body_util::Limited::new(body, MAX_ACTOR_RESPONSE)
                    .collect()
                    .await
                    .map_err(|e| Error::internal(e).context("reading the actor's response"))?
                    .to_bytes();
                Ok::<_, Error>(http::Response::from_parts(parts, bytes))
            };
            tokio::pin!(call, collect);
            tokio::select! {
                biased;
                ran = &mut call => match ran.into_result() {
                    Err(e) => Err(e),
                    // The guest returned: if it set a response, its body is
                    // complete (or ends short); if not, there is none.
                    Ok(()) if sent.load(Ordering::SeqCst) => collect.await,
                    Ok(()) => Err(Error::new(ErrorKind::NoResponse)),
                },
                response = &mut collect => match response {
                    Err(e) => Err(e),
                    Ok(response) => call.await.into_result().map(|()| response),
                },
            }
        };
        self.finish(result)
    }

    /// Runs the alarm handler (`retry`: earlier failed attempts) and
    /// returns its writes.
    pub async fn alarm(&mut self, retry: u32, request_id: RequestId) -> Result<ActorBatch, Error> {
        let Some(func) = self.alarm else {
            return Err(Error::new(ErrorKind::NotFound)
                .context("the class does not export ignis:actor/alarm-handler"));
        };
        let limits = self.begin(request_id);
        let store = &mut self.store;
        let result = run_limited(
            async move {
                let r = func.call_async(&mut *store, (retry,)).await;
                (r, store.data().limiter.denied)
            },
            limits,
            &self.stats,
        )
        .await
        .into_result()
        .and_then(|(handled,)| {
            handled.map_err(|reason| {
                Error::new(ErrorKind::GuestErrorCode(reason)).context("alarm handler failed")
            })
        });
        self.finish(result).map(|((), batch)| batch)
    }

    /// Hands over the message's writes if it succeeded, forgets them if not.
    fn finish<T>(&mut self, result: Result<T, Error>) -> Result<(T, ActorBatch), Error> {
        let host = self.store.data_mut();
        host.end_request();
        let actor = host.actor_mut();
        let unavailable = actor.take_unavailable();
        match result {
            Ok(v) => Ok((v, actor.take_batch())),
            Err(e) => {
                actor.discard();
                // The guest failed after its storage did: the outage is
                // the cause, and the client may retry.
                if unavailable {
                    return Err(
                        Error::unavailable("actor storage unavailable; retry").with_source(e)
                    );
                }
                Err(e)
            }
        }
    }
}
