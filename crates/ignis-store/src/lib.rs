//! Ignis durable storage.
//!
//! [`KvBackend`] is the key-value contract the runtime's `wasi:keyvalue`
//! bindings are written against. It speaks in namespaces (a tenant and one of
//! its store names), string keys and byte values, and it promises:
//!
//! - **Durability at return**: a write's future resolves only after the
//!   write is durable (for [`SqliteStore`]: committed to the write-ahead log
//!   and fsynced). A process killed right after keeps every acknowledged write.
//! - **Read your writes**: a read issued after a write returned sees it.
//! - **Real atomicity**: [`KvBackend::increment`] and [`KvBackend::swap_if`]
//!   are read-modify-write operations that no concurrent writer interleaves
//!   with; a batch write applies all of its entries or none.
//!
//! The contract is async and object safe (`Arc<dyn KvBackend>`) so that a
//! networked engine can implement it with the same guarantees: the
//! embedded engine is [`SqliteStore`], the networked one [`PgStore`]
//! (PostgreSQL; several nodes may share it, see its module docs). Both run
//! the same contract tests (`tests/store.rs`).
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), ignis_store::StoreError> {
//! use ignis_store::{KvBackend, Namespace, SqliteStore};
//!
//! let dir = tempfile::tempdir().unwrap();
//! let store = SqliteStore::open(&dir.path().join("ignis.db"))?;
//! let ns = Namespace::new("acme", "default");
//! store.set(&ns, "greeting", b"hello".to_vec()).await?;
//! assert_eq!(store.get(&ns, "greeting").await?.unwrap().value, b"hello");
//! assert_eq!(store.increment(&ns, "visits", 1).await?, 1);
//! # Ok(()) }
//! ```

pub mod cluster;
pub mod histogram;
pub mod postgres;
mod sqlite;
#[cfg(feature = "testing")]
pub mod testing;

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;

pub use cluster::{Member, Owner};
pub use postgres::{PgOptions, PgStore};
pub use sqlite::SqliteStore;

/// Errors of the storage layer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// `increment` found a value that is not a decimal integer.
    #[error("the value of `{key}` is not an integer")]
    NotANumber {
        /// The key.
        key: String,
    },
    /// `increment` would leave the 64-bit range.
    #[error("incrementing `{key}` overflows a 64-bit integer")]
    Overflow {
        /// The key.
        key: String,
    },
    /// The engine failed (I/O, corruption, disk full). Nothing of the
    /// operation was applied.
    #[error("storage engine error: {0}")]
    Engine(String),
    /// The database cannot be reached (a networked engine: refused, timed
    /// out, connection lost). Nothing was applied, unless the message says
    /// the connection was lost during the commit (then the outcome is
    /// unknown). The pool reconnects by itself.
    #[error("storage unavailable: {0}")]
    Unavailable(String),
    /// A fenced actor commit was refused: the lease it was made under is no
    /// longer the actor's (another node took the actor over). Nothing was
    /// applied; the activation must go, and its caller may retry.
    #[error("actor lease lost: {0}")]
    Fenced(String),
    /// The store is shutting down.
    #[error("the store is closed")]
    Closed,
    /// A read would return more bytes than the caller's budget allows
    /// (the message says which budget; it is safe to show the guest).
    #[error("{0}")]
    TooLarge(String),
}

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> Self {
        StoreError::Engine(e.to_string())
    }
}

/// A boxed future of a storage operation.
pub type StoreFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, StoreError>> + Send + 'a>>;

/// One key space: a tenant's named store. Two tenants that both call a
/// store `default` get two unrelated namespaces.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Namespace {
    tenant: Arc<str>,
    store: Arc<str>,
}

impl Namespace {
    /// The namespace of `tenant`'s store `store`.
    pub fn new(tenant: impl Into<Arc<str>>, store: impl Into<Arc<str>>) -> Self {
        Namespace {
            tenant: tenant.into(),
            store: store.into(),
        }
    }

    /// The owning tenant.
    pub fn tenant(&self) -> &str {
        &self.tenant
    }

    /// The store name, as the guest opens it.
    pub fn store(&self) -> &str {
        &self.store
    }
}

impl fmt::Debug for Namespace {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.tenant, self.store)
    }
}

/// A value and the version it was written at. Versions grow with every
/// write of the store (they are unique across keys), so a version seen once
/// identifies exactly one write: compare-and-swap on the version has no ABA
/// problem while the key exists.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Versioned {
    /// The bytes.
    pub value: Vec<u8>,
    /// The write that produced them.
    pub version: u64,
}

/// One page of a key listing, in key order.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct KeyPage {
    /// The keys.
    pub keys: Vec<String>,
    /// Whether more keys follow the last one.
    pub more: bool,
}

impl KeyPage {
    /// The page of a listing that fetched one key more than `limit` (if
    /// there were that many), which tells whether another page follows.
    pub(crate) fn from_one_more(mut keys: Vec<String>, limit: u32) -> KeyPage {
        let more = keys.len() > limit as usize;
        keys.truncate(limit as usize);
        KeyPage { keys, more }
    }
}

/// Where a key listing starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ListFrom<'a> {
    /// From the first key.
    Start,
    /// After this key (keyset pagination: stable under concurrent writes).
    After(&'a str),
    /// After skipping this many keys (offset pagination, for interfaces
    /// whose cursor is a number).
    Skip(u64),
}

/// The key-value contract. Keys are compared bytewise; values are opaque
/// bytes, except that [`increment`](KvBackend::increment) stores counters as
/// decimal ASCII (as `wasmtime serve`'s in-memory store does), so a counter
/// read with [`get`](KvBackend::get) is readable text.
pub trait KvBackend: Send + Sync + 'static {
    /// The value of `key`, if any.
    fn get<'a>(&'a self, ns: &'a Namespace, key: &'a str) -> StoreFuture<'a, Option<Versioned>>;

    /// Sets `key` to `value`; durable when the future resolves.
    fn set<'a>(&'a self, ns: &'a Namespace, key: &'a str, value: Vec<u8>) -> StoreFuture<'a, ()>;

    /// Deletes `key` (no error if it does not exist).
    fn delete<'a>(&'a self, ns: &'a Namespace, key: &'a str) -> StoreFuture<'a, ()>;

    /// Whether `key` exists.
    fn exists<'a>(&'a self, ns: &'a Namespace, key: &'a str) -> StoreFuture<'a, bool>;

    /// Up to `limit` keys from `from`, in key order.
    fn list_keys<'a>(
        &'a self,
        ns: &'a Namespace,
        from: ListFrom<'a>,
        limit: u32,
    ) -> StoreFuture<'a, KeyPage>;

    /// Atomically adds `delta` to the counter at `key` (absent counts as 0)
    /// and returns the new value.
    fn increment<'a>(&'a self, ns: &'a Namespace, key: &'a str, delta: i64)
    -> StoreFuture<'a, i64>;

    /// Atomically sets `key` to `value` if its current version is
    /// `expected` (`None`: if the key does not exist). Returns whether it did.
    fn swap_if<'a>(
        &'a self,
        ns: &'a Namespace,
        key: &'a str,
        expected: Option<u64>,
        value: Vec<u8>,
    ) -> StoreFuture<'a, bool>;

    /// The values of `keys`, in order, read from one snapshot; fails with
    /// [`StoreError::TooLarge`] once they add up to more than `max_bytes`
    /// (a key named twice counts twice), before reading the rest.
    fn get_many<'a>(
        &'a self,
        ns: &'a Namespace,
        keys: &'a [String],
        max_bytes: usize,
    ) -> StoreFuture<'a, Vec<Option<Vec<u8>>>>;

    /// Sets every entry, all or nothing.
    fn set_many<'a>(
        &'a self,
        ns: &'a Namespace,
        entries: Vec<(String, Vec<u8>)>,
    ) -> StoreFuture<'a, ()>;

    /// Deletes every key, all or nothing.
    fn delete_many<'a>(&'a self, ns: &'a Namespace, keys: Vec<String>) -> StoreFuture<'a, ()>;
}

/// One durable actor: its class and id. Its storage is a key space of its own.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ActorKey {
    class: Arc<str>,
    id: Arc<str>,
}

impl ActorKey {
    /// The actor `id` of `class`.
    pub fn new(class: impl Into<Arc<str>>, id: impl Into<Arc<str>>) -> Self {
        ActorKey {
            class: class.into(),
            id: id.into(),
        }
    }

    /// The class name.
    pub fn class(&self) -> &str {
        &self.class
    }

    /// The id within the class.
    pub fn id(&self) -> &str {
        &self.id
    }
}

impl fmt::Debug for ActorKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.class, self.id)
    }
}

/// Which keys an actor storage listing returns.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ListOptions {
    /// Only keys starting with this.
    pub prefix: Option<String>,
    /// Only keys `>=` this.
    pub start: Option<String>,
    /// Only keys `<` this.
    pub end: Option<String>,
    /// At most this many.
    pub limit: Option<u32>,
    /// Descending key order.
    pub reverse: bool,
}

impl ListOptions {
    /// The half-open key range `[lo, hi)` the options select (`hi = None`:
    /// unbounded).
    pub fn bounds(&self) -> (String, Option<String>) {
        let mut lo = self.start.clone().unwrap_or_default();
        let mut hi = self.end.clone();
        if let Some(p) = &self.prefix {
            if *p > lo {
                lo = p.clone();
            }
            if let Some(after) = prefix_end(p)
                && hi.as_ref().is_none_or(|h| after < *h)
            {
                hi = Some(after);
            }
        }
        (lo, hi)
    }

    /// Whether `key` is selected (ignoring `limit`).
    pub fn contains(&self, key: &str) -> bool {
        let (lo, hi) = self.bounds();
        key >= lo.as_str() && hi.is_none_or(|h| key < h.as_str())
    }
}

/// The smallest string greater than every string starting with `prefix`
/// (`None` if there is none).
fn prefix_end(prefix: &str) -> Option<String> {
    let mut chars: Vec<char> = prefix.chars().collect();
    while let Some(last) = chars.pop() {
        if let Some(next) = char::from_u32(last as u32 + 1) {
            chars.push(next);
            return Some(chars.into_iter().collect());
        }
    }
    None
}

/// A change to an actor's alarm, committed with its storage writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AlarmChange {
    /// Set (or move) the alarm to this time, in ms since the Unix epoch.
    Set(u64),
    /// Remove the alarm.
    Delete,
    /// The alarm set for this time fired and its handler committed: remove
    /// it unless it has been set to another time meanwhile.
    Fired(u64),
}

/// Everything one actor message wrote: committed atomically.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ActorBatch {
    /// Key writes in order; `None` deletes.
    pub writes: Vec<(String, Option<Vec<u8>>)>,
    /// The alarm change, if any.
    pub alarm: Option<AlarmChange>,
    /// In a cluster: the lease this batch was made under. The commit
    /// checks, in its own transaction, that the lease is still the
    /// actor's, and is refused with [`StoreError::Fenced`] otherwise.
    pub fence: Option<Fence>,
}

/// An actor lease: the node that owns the actor and the epoch of that
/// ownership (it grows by one at every change of owner).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fence {
    /// The owning node's id.
    pub node: Arc<str>,
    /// The ownership's epoch.
    pub epoch: u64,
}

impl ActorBatch {
    /// Whether the batch changes nothing.
    pub fn is_empty(&self) -> bool {
        self.writes.is_empty() && self.alarm.is_none()
    }
}

/// Durable actor storage: a key space per actor plus one alarm, changed only
/// by whole batches. [`ActorStorage::actor_commit`] resolves once the batch
/// is durable; concurrent batches (of any actors) share commits.
pub trait ActorStorage: Send + Sync + 'static {
    /// The value of `key` in `actor`'s storage.
    fn actor_get<'a>(
        &'a self,
        actor: &'a ActorKey,
        key: &'a str,
    ) -> StoreFuture<'a, Option<Vec<u8>>>;

    /// Entries selected by `options`, in key order (or reverse); fails
    /// with [`StoreError::TooLarge`] once keys and values add up to more
    /// than `max_bytes`, before reading the rest.
    fn actor_list<'a>(
        &'a self,
        actor: &'a ActorKey,
        options: &'a ListOptions,
        max_bytes: usize,
    ) -> StoreFuture<'a, Vec<(String, Vec<u8>)>>;

    /// Applies `batch` atomically and durably.
    fn actor_commit<'a>(&'a self, actor: &'a ActorKey, batch: ActorBatch) -> StoreFuture<'a, ()>;

    /// Applies several actors' batches durably, each atomically on its own;
    /// one result per batch, in order. An engine that can, commits them
    /// together (one fsync); this default commits them one after another.
    fn actor_commit_many(
        &self,
        batches: Vec<(ActorKey, ActorBatch)>,
    ) -> StoreFuture<'_, Vec<Result<(), StoreError>>> {
        Box::pin(async move {
            let mut results = Vec::with_capacity(batches.len());
            for (actor, batch) in batches {
                results.push(self.actor_commit(&actor, batch).await);
            }
            Ok(results)
        })
    }

    /// The actor's alarm time, if set.
    fn actor_alarm<'a>(&'a self, actor: &'a ActorKey) -> StoreFuture<'a, Option<u64>>;

    /// Every set alarm (read at start to schedule them).
    fn all_alarms(&self) -> StoreFuture<'_, Vec<(ActorKey, u64)>>;
}

/// Counters of the engine, to see group commit at work.
#[derive(Debug, Default)]
pub struct StoreStats {
    /// Write jobs answered (successful or not).
    pub writes: AtomicU64,
    /// Transactions committed (each one fsync of the WAL).
    pub commits: AtomicU64,
    /// Commits that failed (their jobs all got the error).
    pub failed_commits: AtomicU64,
    /// Time from a group's first job taken to its commit known (the jobs'
    /// work, the COMMIT and its fsync), per group.
    pub commit_duration: crate::histogram::Histogram,
}

/// Applies `delta` to a stored counter (decimal ASCII; absent is 0).
pub(crate) fn add_to_counter(
    key: &str,
    current: Option<&[u8]>,
    delta: i64,
) -> Result<i64, StoreError> {
    let current = match current {
        None => 0,
        Some(bytes) => std::str::from_utf8(bytes)
            .ok()
            .and_then(|s| s.trim().parse::<i64>().ok())
            .ok_or_else(|| StoreError::NotANumber {
                key: key.to_string(),
            })?,
    };
    current
        .checked_add(delta)
        .ok_or_else(|| StoreError::Overflow {
            key: key.to_string(),
        })
}

/// Bytes a read may still return before it fails with
/// [`StoreError::TooLarge`].
pub(crate) struct Budget {
    left: usize,
    max: usize,
    call: &'static str,
}

impl Budget {
    pub(crate) fn new(max: usize, call: &'static str) -> Self {
        Budget {
            left: max,
            max,
            call,
        }
    }

    pub(crate) fn spend(&mut self, bytes: usize) -> Result<(), StoreError> {
        match self.left.checked_sub(bytes) {
            Some(left) => {
                self.left = left;
                Ok(())
            }
            None => Err(StoreError::TooLarge(format!(
                "{} would return more than {} bytes",
                self.call, self.max
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn list_bounds_combine_prefix_and_range() {
        let o = ListOptions {
            prefix: Some("msg:".into()),
            ..Default::default()
        };
        assert_eq!(o.bounds(), ("msg:".into(), Some("msg;".into())));
        assert!(o.contains("msg:1") && !o.contains("msh") && !o.contains("msf"));
        let o = ListOptions {
            prefix: Some("a".into()),
            start: Some("ab".into()),
            end: Some("az".into()),
            ..Default::default()
        };
        assert_eq!(o.bounds(), ("ab".into(), Some("az".into())));
        assert!(ListOptions::default().contains(""));
    }

    #[test]
    fn counters_are_decimal_text() {
        assert_eq!(add_to_counter("k", None, 5), Ok(5));
        assert_eq!(add_to_counter("k", Some(b"41"), 1), Ok(42));
        assert_eq!(add_to_counter("k", Some(b"-3"), -4), Ok(-7));
        assert!(matches!(
            add_to_counter("k", Some(b"abc"), 1),
            Err(StoreError::NotANumber { .. })
        ));
        assert!(matches!(
            add_to_counter("k", Some(i64::MAX.to_string().as_bytes()), 1),
            Err(StoreError::Overflow { .. })
        ));
    }
}
