//! `ignis:actor/storage`, `alarms` and `context`: the state of one
//! activation's current message.
//!
//! Reads see, newest first: the message's own writes, then batches handed
//! off but not yet durable (the activation's [`Overlay`]), then the store.
//! Writes stay in the message until it ends; [`ActorState::take_batch`]
//! hands them over as one batch.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use ignis_store::{ActorBatch, ActorKey, ActorStorage, AlarmChange, ListOptions};

use super::R;
use super::generated::ignis::actor::{alarms, context, storage, types};
use super::overlay::{Overlay, Writes, entry_bytes, merge_list};

/// Per-class limits on what one message may write.
#[derive(Debug, Clone, Copy)]
pub(crate) struct WriteLimits {
    pub(crate) max_key_bytes: usize,
    pub(crate) max_value_bytes: usize,
    pub(crate) max_writes: usize,
    /// Most bytes (keys and values) one `list` may return, and one
    /// message may write.
    pub(crate) max_batch_bytes: usize,
}

/// The `ignis:actor` state of one activation.
pub struct ActorState {
    key: ActorKey,
    storage: Arc<dyn ActorStorage>,
    overlay: Arc<Mutex<Overlay>>,
    /// This message's writes (the final value per key).
    writes: Writes,
    /// Bytes (keys and values) in `writes`.
    written: usize,
    alarm: Option<AlarmChange>,
    /// State at `begin`, restored by `rollback`.
    txn: Option<(Writes, Option<AlarmChange>)>,
    limits: WriteLimits,
    has_alarm_handler: bool,
    /// Set when a storage call of this message found the store
    /// unavailable: a failure of the message is then the outage's (503),
    /// whatever the guest made of the error.
    unavailable: AtomicBool,
}

impl ActorState {
    pub(crate) fn new(
        key: ActorKey,
        storage: Arc<dyn ActorStorage>,
        overlay: Arc<Mutex<Overlay>>,
        limits: WriteLimits,
        has_alarm_handler: bool,
    ) -> ActorState {
        ActorState {
            key,
            storage,
            overlay,
            writes: BTreeMap::new(),
            written: 0,
            alarm: None,
            txn: None,
            unavailable: AtomicBool::new(false),
            limits,
            has_alarm_handler,
        }
    }

    /// The storage error a guest sees, noting an unavailable store.
    fn storage_error(&self, e: ignis_store::StoreError) -> types::Error {
        if matches!(e, ignis_store::StoreError::Unavailable(_)) {
            self.unavailable.store(true, Ordering::SeqCst);
        }
        storage_error(e)
    }

    /// Whether a storage call of this message found the store unavailable
    /// (and forgets it for the next message).
    pub(crate) fn take_unavailable(&self) -> bool {
        self.unavailable.swap(false, Ordering::SeqCst)
    }

    /// The message's writes and alarm change, as one batch.
    pub(crate) fn take_batch(&mut self) -> ActorBatch {
        self.txn = None;
        self.written = 0;
        ActorBatch {
            writes: std::mem::take(&mut self.writes).into_iter().collect(),
            alarm: self.alarm.take(),
            fence: None,
        }
    }

    /// Forgets the message's writes (it failed).
    pub(crate) fn discard(&mut self) {
        self.writes.clear();
        self.written = 0;
        self.alarm = None;
        self.txn = None;
    }

    fn overlay(&self) -> std::sync::MutexGuard<'_, Overlay> {
        self.overlay.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Deletes not yet in storage of keys `options` selects.
    fn pending_deletes(&self, options: &ListOptions) -> u32 {
        let pending = self.overlay().deletes_within(&self.writes, options);
        u32::try_from(pending).unwrap_or(u32::MAX)
    }

    fn check_key(&self, key: &str) -> Result<(), types::Error> {
        if key.len() > self.limits.max_key_bytes {
            return Err(types::Error::TooLarge(format!(
                "key is {} bytes; the limit is {}",
                key.len(),
                self.limits.max_key_bytes
            )));
        }
        Ok(())
    }

    fn record_write(&mut self, key: String, value: Option<Vec<u8>>) -> Result<(), types::Error> {
        if !self.writes.contains_key(&key) && self.writes.len() >= self.limits.max_writes {
            return Err(types::Error::TooLarge(format!(
                "more than {} keys written in one message",
                self.limits.max_writes
            )));
        }
        // The batch waits in memory until it is durable: its bytes are
        // bounded like a key-value batch call's.
        let replaced = self
            .writes
            .get(&key)
            .map_or(0, |old| entry_bytes(&key, old));
        let written = self.written - replaced + entry_bytes(&key, &value);
        if written > self.limits.max_batch_bytes {
            return Err(types::Error::TooLarge(format!(
                "one message's writes would carry more than {} bytes",
                self.limits.max_batch_bytes
            )));
        }
        self.written = written;
        self.writes.insert(key, value);
        Ok(())
    }

    async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, types::Error> {
        self.check_key(key)?;
        if let Some(v) = self.writes.get(key) {
            return Ok(v.clone());
        }
        if let Some(v) = self.overlay().get(key) {
            return Ok(v);
        }
        self.storage
            .actor_get(&self.key, key)
            .await
            .map_err(|e| self.storage_error(e))
    }
}

/// The actor-facing view of a store's host state.
pub struct ActorView<'a> {
    state: &'a mut ActorState,
}

impl<'a> ActorView<'a> {
    /// The view over one activation's state.
    pub fn new(state: &'a mut ActorState) -> ActorView<'a> {
        ActorView { state }
    }
}

/// The engine's message names files and internals: it goes to the log,
/// the guest learns only that storage failed.
fn storage_error(e: ignis_store::StoreError) -> types::Error {
    if let ignis_store::StoreError::TooLarge(why) = e {
        return types::Error::TooLarge(why);
    }
    tracing::warn!(error = %e, "actor storage call failed");
    types::Error::Storage(crate::bindings::STORAGE_FAILED.into())
}

fn no_transaction() -> types::Error {
    types::Error::Invalid("no transaction is open".into())
}

impl types::Host for ActorView<'_> {}

impl storage::Host for ActorView<'_> {
    async fn get(&mut self, key: String) -> R<Option<Vec<u8>>> {
        Ok(self.state.get(&key).await)
    }

    async fn put(&mut self, key: String, value: Vec<u8>) -> R<()> {
        let a = &mut *self.state;
        if let Err(e) = a.check_key(&key) {
            return Ok(Err(e));
        }
        if value.len() > a.limits.max_value_bytes {
            return Ok(Err(types::Error::TooLarge(format!(
                "value is {} bytes; the limit is {}",
                value.len(),
                a.limits.max_value_bytes
            ))));
        }
        Ok(a.record_write(key, Some(value)))
    }

    async fn delete(&mut self, key: String) -> R<bool> {
        let existed = match self.state.get(&key).await {
            Ok(v) => v.is_some(),
            Err(e) => return Ok(Err(e)),
        };
        Ok(self.state.record_write(key, None).map(|()| existed))
    }

    async fn list(&mut self, options: storage::ListOptions) -> R<Vec<(String, Vec<u8>)>> {
        let a = &*self.state;
        let options = ListOptions {
            prefix: options.prefix,
            start: options.start,
            end: options.end,
            limit: options.limit,
            reverse: options.reverse,
        };
        // Stored entries: the limit plus one per pending delete (each may
        // hide one stored entry), never more than `max_batch_bytes`; the
        // overlay and this message's writes go on top.
        let widened = ListOptions {
            limit: options
                .limit
                .map(|l| l.saturating_add(a.pending_deletes(&options))),
            ..options.clone()
        };
        let max_bytes = a.limits.max_batch_bytes;
        let stored = match a.storage.actor_list(&a.key, &widened, max_bytes).await {
            Ok(v) => v,
            Err(e) => return Ok(Err(a.storage_error(e))),
        };
        Ok(Ok(merge_list(stored, &a.overlay(), &a.writes, &options)))
    }

    async fn begin(&mut self) -> R<()> {
        let a = &mut *self.state;
        if a.txn.is_some() {
            return Ok(Err(types::Error::Invalid(
                "a transaction is already open".into(),
            )));
        }
        a.txn = Some((a.writes.clone(), a.alarm));
        Ok(Ok(()))
    }

    async fn commit(&mut self) -> R<()> {
        Ok(self.state.txn.take().map(drop).ok_or_else(no_transaction))
    }

    async fn rollback(&mut self) -> R<()> {
        let a = &mut *self.state;
        Ok(match a.txn.take() {
            None => Err(no_transaction()),
            Some((writes, alarm)) => {
                a.written = writes.iter().map(|(k, v)| entry_bytes(k, v)).sum();
                a.writes = writes;
                a.alarm = alarm;
                Ok(())
            }
        })
    }
}

impl alarms::Host for ActorView<'_> {
    async fn set(&mut self, at_ms: u64) -> R<()> {
        let a = &mut *self.state;
        if !a.has_alarm_handler {
            return Ok(Err(types::Error::Invalid(
                "this actor class does not export ignis:actor/alarm-handler".into(),
            )));
        }
        a.alarm = Some(AlarmChange::Set(at_ms));
        Ok(Ok(()))
    }

    async fn get(&mut self) -> R<Option<u64>> {
        let a = &*self.state;
        let change = a.alarm.or_else(|| a.overlay().alarm());
        let stored = || async {
            a.storage
                .actor_alarm(&a.key)
                .await
                .map_err(|e| a.storage_error(e))
        };
        Ok(match change {
            Some(AlarmChange::Set(at)) => Ok(Some(at)),
            Some(AlarmChange::Delete) => Ok(None),
            // A fired alarm whose removal is not committed yet is gone
            // already; one set again since is what storage says.
            Some(AlarmChange::Fired(fired)) => stored().await.map(|s| s.filter(|at| *at != fired)),
            None => stored().await,
        })
    }

    async fn delete(&mut self) -> R<()> {
        self.state.alarm = Some(AlarmChange::Delete);
        Ok(Ok(()))
    }
}

impl context::Host for ActorView<'_> {
    async fn class(&mut self) -> wasmtime::Result<String> {
        Ok(self.state.key.class().to_string())
    }

    async fn id(&mut self) -> wasmtime::Result<String> {
        Ok(self.state.key.id().to_string())
    }
}
