//! Durable actor activations: one long-lived instance per `(class, id)`,
//! and the `ignis:actor` host interfaces (storage, alarms, context, client).
//!
//! The runtime runs one message at a time on an [`Activation`] and hands
//! back the response together with the message's writes as one
//! [`ActorBatch`]; ordering, committing and releasing replies (the gates)
//! are `ignis-actors`' job. Reads inside a message see, newest first: the
//! message's own writes, then batches handed off but not yet durable (the
//! [`Overlay`]), then the store.

use std::collections::{BTreeMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::BodyExt;
use ignis_config::ActorClassConfig;
use ignis_store::{ActorBatch, ActorKey, ActorStorage, AlarmChange, ListOptions};
use wasmtime::Store;
use wasmtime::component::{ComponentExportIndex, HasData, Linker, TypedFunc};
use wasmtime_wasi_http::WasiHttpView;
use wasmtime_wasi_http::p2::bindings::http::types::Scheme;
use wasmtime_wasi_http::p2::bindings::{Proxy, ProxyPre};

use crate::Runtime;
use crate::error::GuestError;
use crate::function::{Host, HostParts};
use crate::limits::{CpuBudget, CpuExceeded};

/// Largest response body an actor may return (it is buffered until the
/// message's writes are durable).
pub const MAX_ACTOR_RESPONSE: usize = 16 << 20;

/// Why a call to an actor failed, as a caller sees it.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ActorCallError {
    /// No class of that name.
    #[error("no actor class named `{0}`")]
    NoSuchClass(String),
    /// The actor is busy past its queue deadline, or its mailbox is full.
    #[error("actor busy: {0}")]
    Busy(String),
    /// The call is not allowed (e.g. an actor calling itself).
    #[error("{0}")]
    Invalid(String),
    /// The message failed (trap, limit, storage failure): the reason.
    #[error("{0}")]
    Failed(String),
}

/// A boxed future of an actor call.
pub type ActorCallFuture =
    Pin<Box<dyn Future<Output = Result<http::Response<Bytes>, ActorCallError>> + Send>>;

/// Sends messages to actors. Implemented by the actor directory
/// (`ignis-actors`), installed into the runtime after it is built.
pub trait ActorCaller: Send + Sync {
    /// Delivers `request` to actor `(class, id)` and resolves with its
    /// (durably committed) reply.
    fn call(&self, class: &str, id: &str, request: http::Request<Bytes>) -> ActorCallFuture;
}

/// Where the actor caller will be, shared by every request's host state.
pub type CallerSlot = Arc<OnceLock<Arc<dyn ActorCaller>>>;

/// Batches an activation handed off that are not durable yet, oldest first.
#[derive(Debug, Default)]
pub struct Overlay {
    batches: VecDeque<(u64, ActorBatch)>,
}

impl Overlay {
    /// Adds the batch of message `seq`.
    pub fn push(&mut self, seq: u64, batch: ActorBatch) {
        self.batches.push_back((seq, batch));
    }

    /// Forgets batches up to and including `seq` (they are durable now).
    pub fn durable_through(&mut self, seq: u64) {
        while self.batches.front().is_some_and(|(s, _)| *s <= seq) {
            self.batches.pop_front();
        }
    }

    /// Whether nothing is pending.
    pub fn is_empty(&self) -> bool {
        self.batches.is_empty()
    }

    /// Forgets everything (the activation is being reset).
    pub fn clear(&mut self) {
        self.batches.clear();
    }

    /// The newest pending value of `key`: `Some(None)` if deleted.
    fn get(&self, key: &str) -> Option<Option<Vec<u8>>> {
        self.batches.iter().rev().find_map(|(_, b)| {
            b.writes
                .iter()
                .rev()
                .find(|(k, _)| k == key)
                .map(|(_, v)| v.clone())
        })
    }

    fn alarm(&self) -> Option<AlarmChange> {
        self.batches.iter().rev().find_map(|(_, b)| b.alarm)
    }

    fn apply_to(&self, entries: &mut BTreeMap<String, Option<Vec<u8>>>, options: &ListOptions) {
        for (_, b) in &self.batches {
            for (k, v) in &b.writes {
                if options.contains(k) {
                    entries.insert(k.clone(), v.clone());
                }
            }
        }
    }
}

/// Writes by key; `None` deletes.
type Writes = BTreeMap<String, Option<Vec<u8>>>;

/// The exported `on-alarm(retry) -> result<_, string>`.
type AlarmFunc = TypedFunc<(u32,), (Result<(), String>,)>;

/// The `ignis:actor` state of one activation.
pub(crate) struct ActorHost {
    key: ActorKey,
    storage: Arc<dyn ActorStorage>,
    overlay: Arc<Mutex<Overlay>>,
    /// This message's writes (the final value per key).
    writes: Writes,
    alarm: Option<AlarmChange>,
    /// State at `begin`, restored by `rollback`.
    txn: Option<(Writes, Option<AlarmChange>)>,
    max_key_bytes: usize,
    max_value_bytes: usize,
    max_writes: usize,
    has_alarm_handler: bool,
}

impl ActorHost {
    fn take_batch(&mut self) -> ActorBatch {
        self.txn = None;
        ActorBatch {
            writes: std::mem::take(&mut self.writes).into_iter().collect(),
            alarm: self.alarm.take(),
        }
    }

    fn discard(&mut self) {
        self.writes.clear();
        self.alarm = None;
        self.txn = None;
    }
}

/// A deployed actor class: a prepared component and its settings.
pub struct ActorClass {
    /// The engines, the platform services and the epoch ticker.
    runtime: Arc<Runtime>,
    name: Arc<str>,
    pre: ProxyPre<Host>,
    alarm_export: Option<ComponentExportIndex>,
    config: ActorClassConfig,
    env: Vec<(String, String)>,
    storage: Arc<dyn ActorStorage>,
}

impl ActorClass {
    pub(crate) fn new(
        runtime: Arc<Runtime>,
        config: &ActorClassConfig,
        pre: ProxyPre<Host>,
        storage: Arc<dyn ActorStorage>,
    ) -> Arc<ActorClass> {
        let component = pre.instance_pre().component();
        let alarm_export = component
            .get_export_index(None, "ignis:actor/alarm-handler@0.1.0")
            .and_then(|iface| component.get_export_index(Some(&iface), "on-alarm"));
        Arc::new(ActorClass {
            runtime,
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

    /// Whether the component exports `ignis:actor/alarm-handler`.
    pub fn has_alarm_handler(&self) -> bool {
        self.alarm_export.is_some()
    }

    /// The storage the class's actors use.
    pub fn storage(&self) -> &Arc<dyn ActorStorage> {
        &self.storage
    }

    /// Instantiates actor `id`. Nothing is loaded from storage: reads go
    /// to the store when the guest makes them.
    pub async fn activate(
        &self,
        id: &str,
        overlay: Arc<Mutex<Overlay>>,
    ) -> Result<Activation, GuestError> {
        let key = ActorKey::new(self.name.clone(), id);
        let actor = ActorHost {
            key,
            storage: self.storage.clone(),
            overlay,
            writes: BTreeMap::new(),
            alarm: None,
            txn: None,
            max_key_bytes: self.config.max_key_bytes,
            max_value_bytes: self.config.max_value_bytes,
            max_writes: self.config.max_writes_per_message,
            has_alarm_handler: self.alarm_export.is_some(),
        };
        let mut store = Store::new(
            self.pre.engine(),
            Host::for_actor(
                self.name.clone(),
                &self.env,
                self.config.limits.memory_bytes,
                self.runtime.platform(),
                actor,
                self.runtime.store_lease(),
            ),
        );
        store.limiter(|h| h.limiter_mut());
        store.set_epoch_deadline(1);
        store.epoch_deadline_async_yield_and_update(1);
        let instance = self
            .pre
            .instance_pre()
            .instantiate_async(&mut store)
            .await
            .map_err(|e| GuestError::Trap(format!("{e:?}")))?;
        let proxy = Proxy::new(&mut store, &instance)
            .map_err(|e| GuestError::Internal(format!("{e:#}")))?;
        let alarm =
            match &self.alarm_export {
                Some(idx) => Some(instance.get_typed_func::<_, _>(&mut store, idx).map_err(
                    |e| {
                        GuestError::Internal(format!(
                            "ignis:actor/alarm-handler.on-alarm has the wrong type: {e:#}"
                        ))
                    },
                )?),
                None => None,
            };
        Ok(Activation {
            store,
            proxy,
            alarm,
            cpu_time: self.config.limits.cpu_time,
            wall_time: self.config.limits.wall_time,
        })
    }
}

/// One live actor instance. Not shareable: messages run on it one at a time.
pub struct Activation {
    store: Store<Host>,
    proxy: Proxy,
    alarm: Option<AlarmFunc>,
    cpu_time: Duration,
    wall_time: Duration,
}

/// Runs `fut` under a message's CPU budget and wall deadline; maps the
/// failure to a guest error.
async fn bounded<T>(
    fut: impl Future<Output = wasmtime::Result<T>> + Send,
    cpu: Duration,
    wall: Duration,
) -> Result<T, GuestError> {
    match tokio::time::timeout(wall, CpuBudget::new(Box::pin(fut), cpu, |_| {})).await {
        Err(_) => Err(GuestError::WallLimit),
        Ok(Err(CpuExceeded)) => Err(GuestError::CpuLimit),
        Ok(Ok(Ok(v))) => Ok(v),
        Ok(Ok(Err(e))) => Err(GuestError::Trap(format!("{e:?}"))),
    }
}

impl Activation {
    /// Runs one message to completion: the guest's response (body buffered)
    /// and everything it wrote. On error the writes are discarded and the
    /// activation must not be used again (the instance may be poisoned).
    pub async fn handle(
        &mut self,
        request: http::Request<Bytes>,
    ) -> Result<(http::Response<Bytes>, ActorBatch), GuestError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let sent = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let sent_flag = sent.clone();
        let request = request.map(|b| {
            http_body_util::Full::new(b).map_err(
                |never: std::convert::Infallible| -> wasmtime_wasi_http::Error { match never {} },
            )
        });
        let mut http = self.store.data_mut().http();
        let req = http
            .new_incoming_request(Scheme::Http, request)
            .map_err(|e| GuestError::Internal(format!("{e:#}")))?;
        let out = http
            .new_response_outparam_from_callback(move |response| {
                sent_flag.store(true, std::sync::atomic::Ordering::SeqCst);
                let _ = tx.send(response);
            })
            .map_err(|e| GuestError::Internal(format!("{e:#}")))?;
        let (cpu, wall) = (self.cpu_time, self.wall_time);
        let result = {
            let proxy = &self.proxy;
            let store = &mut self.store;
            let call = bounded(
                async move {
                    proxy
                        .wasi_http_incoming_handler()
                        .call_handle(&mut *store, req, out)
                        .await
                },
                cpu,
                wall,
            );
            // The body is read while the guest writes it.
            let collect = async move {
                let response = rx.await.map_err(|_| GuestError::NoResponse)?;
                let response =
                    response.map_err(|code| GuestError::GuestErrorCode(format!("{code:?}")))?;
                let (parts, body) = response.into_parts();
                let bytes = http_body_util::Limited::new(body, MAX_ACTOR_RESPONSE)
                    .collect()
                    .await
                    .map_err(|e| {
                        GuestError::Internal(format!("reading the actor's response: {e}"))
                    })?
                    .to_bytes();
                Ok::<_, GuestError>(http::Response::from_parts(parts, bytes))
            };
            tokio::pin!(call, collect);
            tokio::select! {
                biased;
                ran = &mut call => match ran {
                    Err(e) => Err(e),
                    // The guest returned: if it set a response, its body is
                    // complete (or ends short); if not, there is none.
                    Ok(()) if sent.load(std::sync::atomic::Ordering::SeqCst) => collect.await,
                    Ok(()) => Err(GuestError::NoResponse),
                },
                response = &mut collect => match response {
                    Err(e) => Err(e),
                    Ok(response) => call.await.map(|()| response),
                },
            }
        };
        let host = self.store.data_mut();
        match result {
            Ok(response) => Ok((response, host.actor_mut().take_batch())),
            Err(e) => {
                let denied = host.memory_denied();
                host.actor_mut().discard();
                Err(if denied && matches!(e, GuestError::Trap(_)) {
                    GuestError::MemoryLimit
                } else {
                    e
                })
            }
        }
    }

    /// Runs the alarm handler (`retry`: earlier failed attempts) and
    /// returns its writes.
    pub async fn alarm(&mut self, retry: u32) -> Result<ActorBatch, GuestError> {
        let Some(func) = self.alarm else {
            return Err(GuestError::Internal(
                "the class does not export ignis:actor/alarm-handler".into(),
            ));
        };
        let (cpu, wall) = (self.cpu_time, self.wall_time);
        let store = &mut self.store;
        let result = bounded(
            async move { func.call_async(&mut *store, (retry,)).await },
            cpu,
            wall,
        )
        .await;
        match result {
            Ok((Ok(()),)) => Ok(self.store.data_mut().actor_mut().take_batch()),
            Ok((Err(reason),)) => {
                self.store.data_mut().actor_mut().discard();
                Err(GuestError::Internal(format!(
                    "alarm handler failed: {reason}"
                )))
            }
            Err(e) => {
                self.store.data_mut().actor_mut().discard();
                Err(e)
            }
        }
    }
}

// ---- the `ignis:actor` interfaces ----

mod bindings {
    wasmtime::component::bindgen!({
        path: "../../wit",
        world: "ignis:actor/actor-imports",
        imports: { default: async | trappable },
    });
}

use bindings::ignis::actor::{alarms, client, context, storage, types};

struct HasActor;

impl HasData for HasActor {
    type Data<'a> = ActorView<'a>;
}

/// The actor-facing view of a request's host state.
pub(crate) struct ActorView<'a> {
    actor: Option<&'a mut ActorHost>,
    caller: &'a CallerSlot,
}

fn view(host: &mut Host) -> ActorView<'_> {
    let HostParts { actor, caller } = host.actor_parts();
    ActorView { actor, caller }
}

/// Adds `ignis:actor` (storage, alarms, context, client) to `linker`.
pub(crate) fn add_to_linker(linker: &mut Linker<Host>) -> wasmtime::Result<()> {
    bindings::ActorImports::add_to_linker::<Host, HasActor>(linker, view)
}

type R<T> = wasmtime::Result<Result<T, types::Error>>;

fn not_an_actor() -> types::Error {
    types::Error::Invalid("only actors have storage and alarms".into())
}

impl ActorView<'_> {
    fn actor(&mut self) -> Result<&mut ActorHost, types::Error> {
        self.actor.as_deref_mut().ok_or_else(not_an_actor)
    }
}

fn check_key(a: &ActorHost, key: &str) -> Result<(), types::Error> {
    if key.len() > a.max_key_bytes {
        return Err(types::Error::TooLarge(format!(
            "key is {} bytes; the limit is {}",
            key.len(),
            a.max_key_bytes
        )));
    }
    Ok(())
}

fn record_write(
    a: &mut ActorHost,
    key: String,
    value: Option<Vec<u8>>,
) -> Result<(), types::Error> {
    if !a.writes.contains_key(&key) && a.writes.len() >= a.max_writes {
        return Err(types::Error::TooLarge(format!(
            "more than {} keys written in one message",
            a.max_writes
        )));
    }
    a.writes.insert(key, value);
    Ok(())
}

fn storage_error(e: ignis_store::StoreError) -> types::Error {
    types::Error::Storage(e.to_string())
}

impl types::Host for ActorView<'_> {}

impl storage::Host for ActorView<'_> {
    async fn get(&mut self, key: String) -> R<Option<Vec<u8>>> {
        let a = match self.actor() {
            Ok(a) => a,
            Err(e) => return Ok(Err(e)),
        };
        if let Err(e) = check_key(a, &key) {
            return Ok(Err(e));
        }
        if let Some(v) = a.writes.get(&key) {
            return Ok(Ok(v.clone()));
        }
        let pending = a
            .overlay
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&key);
        if let Some(v) = pending {
            return Ok(Ok(v));
        }
        Ok(a.storage
            .actor_get(&a.key, &key)
            .await
            .map_err(storage_error))
    }

    async fn put(&mut self, key: String, value: Vec<u8>) -> R<()> {
        let a = match self.actor() {
            Ok(a) => a,
            Err(e) => return Ok(Err(e)),
        };
        if let Err(e) = check_key(a, &key) {
            return Ok(Err(e));
        }
        if value.len() > a.max_value_bytes {
            return Ok(Err(types::Error::TooLarge(format!(
                "value is {} bytes; the limit is {}",
                value.len(),
                a.max_value_bytes
            ))));
        }
        Ok(record_write(a, key, Some(value)))
    }

    async fn delete(&mut self, key: String) -> R<bool> {
        let existed = match storage::Host::get(self, key.clone()).await? {
            Ok(v) => v.is_some(),
            Err(e) => return Ok(Err(e)),
        };
        let a = self.actor().expect("checked by get");
        Ok(record_write(a, key, None).map(|()| existed))
    }

    async fn list(&mut self, options: storage::ListOptions) -> R<Vec<(String, Vec<u8>)>> {
        let a = match self.actor() {
            Ok(a) => a,
            Err(e) => return Ok(Err(e)),
        };
        let options = ListOptions {
            prefix: options.prefix,
            start: options.start,
            end: options.end,
            limit: options.limit,
            reverse: options.reverse,
        };
        // Stored entries, without the limit (pending deletes may remove
        // some), then the overlay and this message's writes on top.
        let unlimited = ListOptions {
            limit: None,
            ..options.clone()
        };
        let stored = match a.storage.actor_list(&a.key, &unlimited).await {
            Ok(v) => v,
            Err(e) => return Ok(Err(storage_error(e))),
        };
        let mut entries: BTreeMap<String, Option<Vec<u8>>> =
            stored.into_iter().map(|(k, v)| (k, Some(v))).collect();
        a.overlay
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .apply_to(&mut entries, &options);
        for (k, v) in &a.writes {
            if options.contains(k) {
                entries.insert(k.clone(), v.clone());
            }
        }
        let live = entries.into_iter().filter_map(|(k, v)| v.map(|v| (k, v)));
        let limit = options.limit.map_or(usize::MAX, |l| l as usize);
        Ok(Ok(if options.reverse {
            let mut all: Vec<_> = live.collect();
            all.reverse();
            all.truncate(limit);
            all
        } else {
            live.take(limit).collect()
        }))
    }

    async fn begin(&mut self) -> R<()> {
        let a = match self.actor() {
            Ok(a) => a,
            Err(e) => return Ok(Err(e)),
        };
        if a.txn.is_some() {
            return Ok(Err(types::Error::Invalid(
                "a transaction is already open".into(),
            )));
        }
        a.txn = Some((a.writes.clone(), a.alarm));
        Ok(Ok(()))
    }

    async fn commit(&mut self) -> R<()> {
        let a = match self.actor() {
            Ok(a) => a,
            Err(e) => return Ok(Err(e)),
        };
        if a.txn.take().is_none() {
            return Ok(Err(types::Error::Invalid("no transaction is open".into())));
        }
        Ok(Ok(()))
    }

    async fn rollback(&mut self) -> R<()> {
        let a = match self.actor() {
            Ok(a) => a,
            Err(e) => return Ok(Err(e)),
        };
        match a.txn.take() {
            None => Ok(Err(types::Error::Invalid("no transaction is open".into()))),
            Some((writes, alarm)) => {
                a.writes = writes;
                a.alarm = alarm;
                Ok(Ok(()))
            }
        }
    }
}

impl alarms::Host for ActorView<'_> {
    async fn set(&mut self, at_ms: u64) -> R<()> {
        let a = match self.actor() {
            Ok(a) => a,
            Err(e) => return Ok(Err(e)),
        };
        if !a.has_alarm_handler {
            return Ok(Err(types::Error::Invalid(
                "this actor class does not export ignis:actor/alarm-handler".into(),
            )));
        }
        a.alarm = Some(AlarmChange::Set(at_ms));
        Ok(Ok(()))
    }

    async fn get(&mut self) -> R<Option<u64>> {
        let a = match self.actor() {
            Ok(a) => a,
            Err(e) => return Ok(Err(e)),
        };
        let change = a
            .alarm
            .or_else(|| a.overlay.lock().unwrap_or_else(|p| p.into_inner()).alarm());
        match change {
            Some(AlarmChange::Set(at)) => Ok(Ok(Some(at))),
            Some(AlarmChange::Delete) => Ok(Ok(None)),
            // A fired alarm whose removal is not committed yet is gone
            // already; one set again since is what storage says.
            Some(AlarmChange::Fired(fired)) => Ok(a
                .storage
                .actor_alarm(&a.key)
                .await
                .map(|stored| stored.filter(|at| *at != fired))
                .map_err(storage_error)),
            None => Ok(a.storage.actor_alarm(&a.key).await.map_err(storage_error)),
        }
    }

    async fn delete(&mut self) -> R<()> {
        let a = match self.actor() {
            Ok(a) => a,
            Err(e) => return Ok(Err(e)),
        };
        a.alarm = Some(AlarmChange::Delete);
        Ok(Ok(()))
    }
}

impl context::Host for ActorView<'_> {
    async fn class(&mut self) -> wasmtime::Result<String> {
        Ok(self
            .actor
            .as_deref()
            .map_or_else(String::new, |a| a.key.class().to_string()))
    }

    async fn id(&mut self) -> wasmtime::Result<String> {
        Ok(self
            .actor
            .as_deref()
            .map_or_else(String::new, |a| a.key.id().to_string()))
    }
}

impl client::Host for ActorView<'_> {
    async fn call(
        &mut self,
        class: String,
        id: String,
        method: String,
        path: String,
        body: Vec<u8>,
    ) -> R<client::Response> {
        if let Some(a) = self.actor.as_deref()
            && a.key.class() == class
            && a.key.id() == id
        {
            return Ok(Err(types::Error::Invalid(
                "an actor cannot send a message to itself (it would wait for itself)".into(),
            )));
        }
        let Some(caller) = self.caller.get().cloned() else {
            return Ok(Err(types::Error::NoSuchClass(class)));
        };
        let request = match http::Request::builder()
            .method(method.as_str())
            .uri(format!("http://{class}.actor{path}"))
            .body(Bytes::from(body))
        {
            Ok(r) => r,
            Err(e) => return Ok(Err(types::Error::Invalid(format!("bad request: {e}")))),
        };
        Ok(match caller.call(&class, &id, request).await {
            Ok(resp) => {
                let (parts, body) = resp.into_parts();
                Ok(client::Response {
                    status: parts.status.as_u16(),
                    headers: parts
                        .headers
                        .iter()
                        .map(|(k, v)| {
                            (
                                k.to_string(),
                                String::from_utf8_lossy(v.as_bytes()).into_owned(),
                            )
                        })
                        .collect(),
                    body: body.to_vec(),
                })
            }
            Err(ActorCallError::NoSuchClass(c)) => Err(types::Error::NoSuchClass(c)),
            Err(ActorCallError::Busy(m)) | Err(ActorCallError::Failed(m)) => {
                Err(types::Error::Unavailable(m))
            }
            Err(ActorCallError::Invalid(m)) => Err(types::Error::Invalid(m)),
        })
    }
}
