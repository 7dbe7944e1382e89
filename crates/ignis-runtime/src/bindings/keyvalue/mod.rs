//! `wasi:keyvalue` for guests, in both package versions in use:
//! `0.2.0-draft` (wasmtime, wasmCloud) and `0.2.0-draft2` (Spin). Both reach
//! the same stores through [`ignis_store::KvBackend`].
//!
//! - A function opens only the stores its manifest entry declares
//!   (`key_value_stores`); names are scoped to its tenant, so two tenants'
//!   `default` stores are unrelated. Opening anything else is `no-such-store`.
//!   The empty identifier means `default` (what `wasmtime serve` opens).
//! - Keys, values and batches are checked against the `[storage]` limits;
//!   a violation is the interface's `other` error with the reason. Every
//!   error is also logged with the function and request id; no host error
//!   ever traps the guest.
//! - Writes return once durable; `increment` and the draft2 `cas`/`swap`
//!   are atomic (see `ignis-store`).

use crate::RequestId;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use ignis_store::{KvBackend, ListFrom, Namespace, StoreError, Versioned};
use wasmtime::component::{HasData, Linker, Resource, ResourceTable};

/// Key-value limits (from the manifest's `[storage]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvLimits {
    /// Longest key in bytes.
    pub max_key_bytes: usize,
    /// Largest value in bytes.
    pub max_value_bytes: usize,
    /// Most keys in one batch call.
    pub max_batch_keys: usize,
    /// Most bytes one batch call may carry, keys and values together.
    pub max_batch_bytes: usize,
}

impl Default for KvLimits {
    fn default() -> Self {
        KvLimits {
            max_key_bytes: 1024,
            max_value_bytes: 1 << 20,
            max_batch_keys: 1000,
            max_batch_bytes: 16 << 20,
        }
    }
}

/// Keys returned by one `list-keys` call.
const LIST_PAGE: u32 = 1000;

/// What one function may do with key-value, shared by its requests.
pub struct KvAccess {
    backend: Option<Arc<dyn KvBackend>>,
    function: Arc<str>,
    stores: Vec<Namespace>,
    limits: KvLimits,
    /// Calls by operation ([`KV_OPS`]), and of those how many failed.
    calls: [AtomicU64; KV_OPS.len()],
    failures: [AtomicU64; KV_OPS.len()],
}

/// The key-value operations counted, as both draft packages name them.
pub const KV_OPS: [&str; 11] = [
    "open",
    "get",
    "set",
    "delete",
    "exists",
    "list-keys",
    "get-many",
    "set-many",
    "delete-many",
    "increment",
    "swap",
];

/// One operation's counts ([`KvAccess::op_counts`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpCount {
    /// The operation, one of [`KV_OPS`].
    pub op: &'static str,
    /// Calls.
    pub calls: u64,
    /// Of those, how many failed (any error the guest saw).
    pub failures: u64,
}

impl KvAccess {
    /// Access for `function` of `tenant` to the `declared` stores.
    pub(crate) fn new(
        backend: Option<Arc<dyn KvBackend>>,
        function: Arc<str>,
        tenant: &str,
        declared: &[String],
        limits: KvLimits,
    ) -> Self {
        let tenant: Arc<str> = tenant.into();
        KvAccess {
            backend,
            function,
            stores: declared
                .iter()
                .map(|s| Namespace::new(tenant.clone(), s.as_str()))
                .collect(),
            limits,
            calls: Default::default(),
            failures: Default::default(),
        }
    }

    /// Calls so far, by operation.
    pub fn op_counts(&self) -> Vec<OpCount> {
        KV_OPS
            .iter()
            .enumerate()
            .map(|(i, op)| OpCount {
                op,
                calls: self.calls[i].load(Ordering::Relaxed),
                failures: self.failures[i].load(Ordering::Relaxed),
            })
            .collect()
    }
}

/// An open store, as the guest holds it.
pub struct Bucket {
    ns: Namespace,
}

/// A draft2 compare-and-swap handle: the key and what it held when read.
pub struct Cas {
    ns: Namespace,
    key: String,
    seen: Option<Versioned>,
}

/// Why a key-value call failed, before it is put in a package's error type.
#[derive(Debug)]
enum Fail {
    NoSuchStore,
    /// A limit or a misuse: the reason is the guest's to see.
    Other(String),
    /// The engine failed: logged in full, the guest sees only that storage
    /// failed (engine messages name files and internals).
    Storage(StoreError),
}

impl From<StoreError> for Fail {
    fn from(e: StoreError) -> Self {
        match e {
            // A budget the guest's call ran into: its to see.
            StoreError::TooLarge(why) => Fail::Other(why),
            e => Fail::Storage(e),
        }
    }
}

/// The key-value state of one request: the function's access and the
/// request id its errors are logged with.
pub struct KvState {
    access: Arc<KvAccess>,
    request_id: RequestId,
}

impl KvState {
    /// `access` for request `request_id`.
    pub fn new(access: Arc<KvAccess>, request_id: RequestId) -> KvState {
        KvState { access, request_id }
    }

    /// A new request on a kept instance.
    pub(crate) fn begin(&mut self, request_id: RequestId) {
        self.request_id = request_id;
    }
}

/// The key-value view of one request's store data: its state and the
/// store's resource table (buckets and CAS handles live there).
pub struct KvView<'a> {
    access: &'a KvAccess,
    table: &'a mut ResourceTable,
    request_id: RequestId,
}

impl<'a> KvView<'a> {
    /// The view over `state`, with handles in `table`.
    pub fn new(state: &'a KvState, table: &'a mut ResourceTable) -> KvView<'a> {
        KvView {
            access: &state.access,
            table,
            request_id: state.request_id,
        }
    }
}

struct HasKv;

impl HasData for HasKv {
    type Data<'a> = KvView<'a>;
}

/// Adds both key-value package versions to `linker`.
pub fn add_to_linker<T: Send + 'static>(
    linker: &mut Linker<T>,
    get: fn(&mut T) -> KvView<'_>,
) -> wasmtime::Result<()> {
    draft::bindings::Imports::add_to_linker::<T, HasKv>(linker, get)?;
    draft2::bindings::Imports::add_to_linker::<T, HasKv>(linker, get)?;
    Ok(())
}

impl KvAccess {
    fn backend(&self) -> Result<&Arc<dyn KvBackend>, Fail> {
        self.backend
            .as_ref()
            .ok_or_else(|| Fail::Other("no key-value storage is configured".into()))
    }

    fn check_key(&self, key: &str) -> Result<(), Fail> {
        let max = self.limits.max_key_bytes;
        if key.len() > max {
            return Err(Fail::Other(format!(
                "key is {} bytes; the limit is {max}",
                key.len()
            )));
        }
        Ok(())
    }

    fn check_value(&self, value: &[u8]) -> Result<(), Fail> {
        let max = self.limits.max_value_bytes;
        if value.len() > max {
            return Err(Fail::Other(format!(
                "value is {} bytes; the limit is {max}",
                value.len()
            )));
        }
        Ok(())
    }

    fn check_batch(&self, n: usize) -> Result<(), Fail> {
        let max = self.limits.max_batch_keys;
        if n > max {
            return Err(Fail::Other(format!(
                "batch has {n} keys; the limit is {max}"
            )));
        }
        Ok(())
    }

    /// Logs a failed call (the guest gets the error variant).
    fn logged<T>(&self, request_id: RequestId, op: &str, r: Result<T, Fail>) -> Result<T, Fail> {
        if let Some(i) = KV_OPS.iter().position(|o| *o == op) {
            self.calls[i].fetch_add(1, Ordering::Relaxed);
            if r.is_err() {
                self.failures[i].fetch_add(1, Ordering::Relaxed);
            }
        }
        if let Err(e) = &r {
            match e {
                Fail::NoSuchStore => tracing::warn!(
                    function = %self.function,
                    request_id = %request_id,
                    op,
                    "key-value: store not declared in this function's key_value_stores"
                ),
                Fail::Storage(e) => tracing::warn!(
                    function = %self.function,
                    request_id = %request_id,
                    op,
                    error = %e,
                    "key-value storage failed"
                ),
                Fail::Other(reason) => tracing::warn!(
                    function = %self.function,
                    request_id = %request_id,
                    op,
                    reason = %reason,
                    "key-value call failed"
                ),
            }
        }
        r
    }
}

impl KvView<'_> {
    fn open(&mut self, identifier: &str) -> Result<Resource<Bucket>, Fail> {
        let name = if identifier.is_empty() {
            "default"
        } else {
            identifier
        };
        let Some(ns) = self.access.stores.iter().find(|ns| ns.store() == name) else {
            return Err(Fail::NoSuchStore);
        };
        self.access.backend()?;
        self.table
            .push(Bucket { ns: ns.clone() })
            .map_err(|e| Fail::Other(e.to_string()))
    }

    fn ns(&self, bucket: &Resource<Bucket>) -> wasmtime::Result<Namespace> {
        Ok(self.table.get(bucket)?.ns.clone())
    }

    async fn get(
        &mut self,
        b: &Resource<Bucket>,
        key: &str,
    ) -> wasmtime::Result<Result<Option<Versioned>, Fail>> {
        let (access, rid) = (self.access, self.request_id);
        let ns = self.ns(b)?;
        let r = async {
            access.check_key(key)?;
            Ok(access.backend()?.get(&ns, key).await?)
        }
        .await;
        Ok(access.logged(rid, "get", r))
    }

    async fn set(
        &mut self,
        b: &Resource<Bucket>,
        key: &str,
        value: Vec<u8>,
    ) -> wasmtime::Result<Result<(), Fail>> {
        let (access, rid) = (self.access, self.request_id);
        let ns = self.ns(b)?;
        let r = async {
            access.check_key(key)?;
            access.check_value(&value)?;
            Ok(access.backend()?.set(&ns, key, value).await?)
        }
        .await;
        Ok(access.logged(rid, "set", r))
    }

    async fn delete(
        &mut self,
        b: &Resource<Bucket>,
        key: &str,
    ) -> wasmtime::Result<Result<(), Fail>> {
        let (access, rid) = (self.access, self.request_id);
        let ns = self.ns(b)?;
        let r = async {
            access.check_key(key)?;
            Ok(access.backend()?.delete(&ns, key).await?)
        }
        .await;
        Ok(access.logged(rid, "delete", r))
    }

    async fn exists(
        &mut self,
        b: &Resource<Bucket>,
        key: &str,
    ) -> wasmtime::Result<Result<bool, Fail>> {
        let (access, rid) = (self.access, self.request_id);
        let ns = self.ns(b)?;
        let r = async {
            access.check_key(key)?;
            Ok(access.backend()?.exists(&ns, key).await?)
        }
        .await;
        Ok(access.logged(rid, "exists", r))
    }

    async fn list(
        &mut self,
        b: &Resource<Bucket>,
        from: ListFrom<'_>,
    ) -> wasmtime::Result<Result<ignis_store::KeyPage, Fail>> {
        let (access, rid) = (self.access, self.request_id);
        let ns = self.ns(b)?;
        let r = async { Ok(access.backend()?.list_keys(&ns, from, LIST_PAGE).await?) }.await;
        Ok(access.logged(rid, "list-keys", r))
    }

    async fn increment(
        &mut self,
        b: &Resource<Bucket>,
        key: &str,
        delta: i64,
    ) -> wasmtime::Result<Result<i64, Fail>> {
        let (access, rid) = (self.access, self.request_id);
        let ns = self.ns(b)?;
        let r = async {
            access.check_key(key)?;
            Ok(access.backend()?.increment(&ns, key, delta).await?)
        }
        .await;
        Ok(access.logged(rid, "increment", r))
    }

    async fn get_many(
        &mut self,
        b: &Resource<Bucket>,
        keys: &[String],
    ) -> wasmtime::Result<Result<Vec<Option<Vec<u8>>>, Fail>> {
        let (access, rid) = (self.access, self.request_id);
        let ns = self.ns(b)?;
        let r = async {
            access.check_batch(keys.len())?;
            for k in keys {
                access.check_key(k)?;
            }
            let max_bytes = access.limits.max_batch_bytes;
            Ok(access.backend()?.get_many(&ns, keys, max_bytes).await?)
        }
        .await;
        Ok(access.logged(rid, "get-many", r))
    }

    async fn set_many(
        &mut self,
        b: &Resource<Bucket>,
        entries: Vec<(String, Vec<u8>)>,
    ) -> wasmtime::Result<Result<(), Fail>> {
        let (access, rid) = (self.access, self.request_id);
        let ns = self.ns(b)?;
        let r = async {
            access.check_batch(entries.len())?;
            for (k, v) in &entries {
                access.check_key(k)?;
                access.check_value(v)?;
            }
            let bytes: usize = entries.iter().map(|(k, v)| k.len() + v.len()).sum();
            let max = access.limits.max_batch_bytes;
            if bytes > max {
                return Err(Fail::Other(format!(
                    "batch carries {bytes} bytes; the limit is {max}"
                )));
            }
            Ok(access.backend()?.set_many(&ns, entries).await?)
        }
        .await;
        Ok(access.logged(rid, "set-many", r))
    }

    async fn delete_many(
        &mut self,
        b: &Resource<Bucket>,
        keys: Vec<String>,
    ) -> wasmtime::Result<Result<(), Fail>> {
        let (access, rid) = (self.access, self.request_id);
        let ns = self.ns(b)?;
        let r = async {
            access.check_batch(keys.len())?;
            for k in &keys {
                access.check_key(k)?;
            }
            Ok(access.backend()?.delete_many(&ns, keys).await?)
        }
        .await;
        Ok(access.logged(rid, "delete-many", r))
    }
}

/// The parts of the two package versions' host traits that are the same
/// (the generated types differ, so they are spelled once here and expanded
/// in each version's module).
macro_rules! shared_store_items {
    () => {
        impl From<Fail> for store::Error {
            fn from(f: Fail) -> Self {
                match f {
                    Fail::NoSuchStore => store::Error::NoSuchStore,
                    Fail::Other(s) => store::Error::Other(s),
                    Fail::Storage(_) => store::Error::Other(crate::bindings::STORAGE_FAILED.into()),
                }
            }
        }

        type R<T> = wasmtime::Result<Result<T, store::Error>>;

        fn lift<T>(r: wasmtime::Result<Result<T, Fail>>) -> R<T> {
            r.map(|r| r.map_err(store::Error::from))
        }

        impl store::Host for KvView<'_> {
            async fn open(&mut self, identifier: String) -> R<Resource<Bucket>> {
                let (access, rid) = (self.access, self.request_id);
                let r = self.open(&identifier);
                Ok(access.logged(rid, "open", r).map_err(Into::into))
            }
        }
    };
}

/// `get`, `set`, `delete`, `exists` and `drop` of `store::HostBucket`.
macro_rules! shared_bucket_methods {
    () => {
        async fn get(&mut self, b: Resource<Bucket>, key: String) -> R<Option<Vec<u8>>> {
            lift(
                KvView::get(self, &b, &key)
                    .await
                    .map(|r| r.map(|v| v.map(|v| v.value))),
            )
        }

        async fn set(&mut self, b: Resource<Bucket>, key: String, value: Vec<u8>) -> R<()> {
            lift(KvView::set(self, &b, &key, value).await)
        }

        async fn delete(&mut self, b: Resource<Bucket>, key: String) -> R<()> {
            lift(KvView::delete(self, &b, &key).await)
        }

        async fn exists(&mut self, b: Resource<Bucket>, key: String) -> R<bool> {
            lift(KvView::exists(self, &b, &key).await)
        }

        async fn drop(&mut self, b: Resource<Bucket>) -> wasmtime::Result<()> {
            self.table.delete(b)?;
            Ok(())
        }
    };
}

/// `set-many` and `delete-many` of `batch::Host`.
macro_rules! shared_batch_writes {
    () => {
        async fn set_many(
            &mut self,
            b: Resource<Bucket>,
            key_values: Vec<(String, Vec<u8>)>,
        ) -> R<()> {
            lift(KvView::set_many(self, &b, key_values).await)
        }

        async fn delete_many(&mut self, b: Resource<Bucket>, keys: Vec<String>) -> R<()> {
            lift(KvView::delete_many(self, &b, keys).await)
        }
    };
}

mod draft;
mod draft2;
