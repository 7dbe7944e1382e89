//! The embedded engine: one SQLite database file in WAL mode, one writer
//! thread that commits in groups, and a pool of reader connections.
//!
//! Writes: every write is a job sent to the writer thread. The thread takes
//! all jobs that queued while it was busy, runs each inside its own savepoint
//! of one transaction (a job that fails is rolled back alone), commits with
//! `synchronous = FULL` (the WAL is fsynced before `COMMIT` returns), and only
//! then answers the jobs. Concurrent writers therefore share one fsync: the
//! more of them, the larger the group. A job's answer never precedes its
//! durability.
//!
//! Reads run on the calling thread with a pooled read connection: a point
//! read from the page cache takes microseconds, less than handing it to
//! another thread would. WAL readers never block the writer nor each other.

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use rusqlite::{Connection, OpenFlags, OptionalExtension, params};
use tokio::sync::oneshot;

use crate::{
    ActorBatch, ActorKey, ActorStorage, AlarmChange, Budget, KeyPage, KvBackend, ListFrom,
    ListOptions, Namespace, StoreError, StoreFuture, StoreStats, Versioned, add_to_counter,
};

/// Jobs committed together at most (bounds one transaction's size and the
/// latency of its first job).
const MAX_GROUP: usize = 1024;
/// Idle reader connections kept.
const MAX_IDLE_READERS: usize = 16;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS kv (
    tenant  TEXT NOT NULL,
    store   TEXT NOT NULL,
    key     TEXT NOT NULL,
    value   BLOB NOT NULL,
    version INTEGER NOT NULL,
    PRIMARY KEY (tenant, store, key)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS actor_kv (
    class TEXT NOT NULL,
    id    TEXT NOT NULL,
    key   TEXT NOT NULL,
    value BLOB NOT NULL,
    PRIMARY KEY (class, id, key)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS actor_alarms (
    class TEXT NOT NULL,
    id    TEXT NOT NULL,
    at_ms INTEGER NOT NULL,
    PRIMARY KEY (class, id)
) WITHOUT ROWID;
";

/// State a write job sees besides the connection.
pub(crate) struct WriteCtx {
    next_version: u64,
}

impl WriteCtx {
    fn version(&mut self) -> u64 {
        self.next_version += 1;
        self.next_version
    }
}

trait Job: Send {
    /// Runs inside the group's transaction; an error rolls back this job only.
    fn apply(&mut self, conn: &Connection, cx: &mut WriteCtx) -> Result<(), StoreError>;
    /// Answers the caller once the group's commit is known.
    fn complete(self: Box<Self>, commit: &Result<(), StoreError>);
}

struct ClosureJob<F, R> {
    op: F,
    result: Option<Result<R, StoreError>>,
    reply: oneshot::Sender<Result<R, StoreError>>,
}

impl<F, R> Job for ClosureJob<F, R>
where
    F: FnMut(&Connection, &mut WriteCtx) -> Result<R, StoreError> + Send,
    R: Send,
{
    fn apply(&mut self, conn: &Connection, cx: &mut WriteCtx) -> Result<(), StoreError> {
        let result = (self.op)(conn, cx);
        let failed = result.as_ref().err().cloned();
        self.result = Some(result);
        match failed {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    fn complete(self: Box<Self>, commit: &Result<(), StoreError>) {
        let answer = match (commit, self.result) {
            (Err(e), _) => Err(e.clone()),
            (Ok(()), Some(result)) => result,
            (Ok(()), None) => Err(StoreError::Engine("job was not applied".into())),
        };
        let _ = self.reply.send(answer);
    }
}

struct Shared {
    path: PathBuf,
    readers: Mutex<Vec<Connection>>,
    writer: Mutex<Option<mpsc::Sender<Box<dyn Job>>>>,
    thread: Mutex<Option<JoinHandle<()>>>,
    stats: Arc<StoreStats>,
}

/// The embedded SQLite engine (see the module docs). Cloning shares it.
#[derive(Clone)]
pub struct SqliteStore {
    shared: Arc<Shared>,
}

fn open_connection(path: &Path, flags: OpenFlags) -> Result<Connection, StoreError> {
    let conn = Connection::open_with_flags(path, flags)?;
    conn.busy_timeout(std::time::Duration::from_secs(5))?;
    Ok(conn)
}

impl SqliteStore {
    /// Opens (creating if needed) the database at `path`, with its parent
    /// directories, and starts the writer thread.
    ///
    /// A new database file is created readable and writable by its owner
    /// only (0600; SQLite gives its `-wal` and `-shm` files the same mode),
    /// in a directory created 0700: tenants' data is not other users'.
    pub fn open(path: &Path) -> Result<SqliteStore, StoreError> {
        create_private(path)?;
        let writer = open_connection(path, OpenFlags::default())?;
        // WAL: readers do not block the writer; FULL: the WAL is fsynced at
        // every commit, so a committed write survives a crash or power loss.
        let mode: String = writer.query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(StoreError::Engine(format!(
                "{}: cannot switch to WAL mode (got {mode})",
                path.display()
            )));
        }
        writer.execute_batch("PRAGMA synchronous = FULL;")?;
        writer.execute_batch(SCHEMA)?;
        let last_version: u64 =
            writer.query_row("SELECT COALESCE(MAX(version), 0) FROM kv", [], |r| r.get(0))?;
        let stats = Arc::new(StoreStats::default());
        let (tx, rx) = mpsc::channel::<Box<dyn Job>>();
        let thread_stats = stats.clone();
        let thread = std::thread::Builder::new()
            .name("ignis-store-writer".into())
            .spawn(move || {
                writer_loop(
                    writer,
                    rx,
                    WriteCtx {
                        next_version: last_version,
                    },
                    &thread_stats,
                )
            })
            .map_err(|e| StoreError::Engine(format!("cannot start the writer thread: {e}")))?;
        tracing::info!(path = %path.display(), "key-value store open (SQLite, WAL, synchronous=FULL)");
        Ok(SqliteStore {
            shared: Arc::new(Shared {
                path: path.to_path_buf(),
                readers: Mutex::new(Vec::new()),
                writer: Mutex::new(Some(tx)),
                thread: Mutex::new(Some(thread)),
                stats,
            }),
        })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.shared.path
    }

    /// The engine's counters.
    pub fn stats(&self) -> &Arc<StoreStats> {
        &self.shared.stats
    }

    /// Stops accepting writes, lets the writer commit what it has, and waits
    /// for it. Later writes fail with [`StoreError::Closed`].
    pub fn close(&self) {
        drop(lock(&self.shared.writer).take());
        if let Some(thread) = lock(&self.shared.thread).take() {
            let _ = thread.join();
        }
    }

    /// Runs `op` in the writer's next group transaction; resolves after the
    /// group committed (or failed). `op` may run more than once only if it is
    /// retried by a future version; today it runs exactly once.
    pub(crate) fn write<R, F>(
        &self,
        op: F,
    ) -> impl Future<Output = Result<R, StoreError>> + use<R, F>
    where
        F: FnMut(&Connection, &mut WriteCtx) -> Result<R, StoreError> + Send + 'static,
        R: Send + 'static,
    {
        let (reply, answer) = oneshot::channel();
        let job: Box<dyn Job> = Box::new(ClosureJob {
            op,
            result: None,
            reply,
        });
        let sent = match lock(&self.shared.writer).as_ref() {
            Some(tx) => tx.send(job).is_ok(),
            None => false,
        };
        async move {
            if !sent {
                return Err(StoreError::Closed);
            }
            answer.await.unwrap_or(Err(StoreError::Closed))
        }
    }

    /// Runs `f` with a read connection from the pool, on this thread.
    fn read<R, E: Into<StoreError>>(
        &self,
        f: impl FnOnce(&Connection) -> Result<R, E>,
    ) -> Result<R, StoreError> {
        let pooled = lock(&self.shared.readers).pop();
        let conn = match pooled {
            Some(c) => c,
            None => {
                let c = open_connection(
                    &self.shared.path,
                    OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
                )?;
                c.set_prepared_statement_cache_capacity(32);
                c
            }
        };
        let result = f(&conn).map_err(Into::into);
        let mut idle = lock(&self.shared.readers);
        if idle.len() < MAX_IDLE_READERS {
            idle.push(conn);
        }
        result
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn writer_loop(
    conn: Connection,
    rx: mpsc::Receiver<Box<dyn Job>>,
    mut cx: WriteCtx,
    stats: &StoreStats,
) {
    conn.set_prepared_statement_cache_capacity(64);
    let mut group: Vec<Box<dyn Job>> = Vec::with_capacity(64);
    while let Ok(first) = rx.recv() {
        group.push(first);
        while group.len() < MAX_GROUP {
            match rx.try_recv() {
                Ok(job) => group.push(job),
                Err(_) => break,
            }
        }
        let version_before = cx.next_version;
        let started = std::time::Instant::now();
        let commit = run_group(&conn, &mut group, &mut cx);
        stats.commit_duration.record(started.elapsed());
        if commit.is_err() {
            stats.failed_commits.fetch_add(1, Ordering::Relaxed);
            cx.next_version = version_before.max(cx.next_version);
            tracing::error!(error = ?commit, jobs = group.len(), "key-value commit failed; the writes were not applied");
        } else {
            stats.commits.fetch_add(1, Ordering::Relaxed);
        }
        stats
            .writes
            .fetch_add(group.len() as u64, Ordering::Relaxed);
        for job in group.drain(..) {
            job.complete(&commit);
        }
    }
}

fn run_group(
    conn: &Connection,
    group: &mut [Box<dyn Job>],
    cx: &mut WriteCtx,
) -> Result<(), StoreError> {
    conn.execute_batch("BEGIN IMMEDIATE")?;
    // Per-job savepoints through cached statements: at tens of thousands of
    // jobs per second, re-parsing them was a visible share of the writer.
    let step =
        |sql: &str| -> rusqlite::Result<()> { conn.prepare_cached(sql)?.execute([]).map(drop) };
    for job in group.iter_mut() {
        let applied = step("SAVEPOINT job")
            .map_err(StoreError::from)
            .and_then(|()| job.apply(conn, cx));
        let end = if applied.is_ok() {
            step("RELEASE job")
        } else {
            step("ROLLBACK TO job").and_then(|()| step("RELEASE job"))
        };
        if let Err(e) = end {
            let _ = conn.execute_batch("ROLLBACK");
            return Err(e.into());
        }
    }
    if let Err(e) = conn.execute_batch("COMMIT") {
        let _ = conn.execute_batch("ROLLBACK");
        return Err(e.into());
    }
    Ok(())
}

fn put(
    conn: &Connection,
    cx: &mut WriteCtx,
    ns: &Namespace,
    key: &str,
    value: &[u8],
) -> Result<(), StoreError> {
    conn.prepare_cached(
        "INSERT INTO kv (tenant, store, key, value, version) VALUES (?1, ?2, ?3, ?4, ?5)
         ON CONFLICT (tenant, store, key) DO UPDATE SET value = excluded.value, version = excluded.version",
    )?
    .execute(params![ns.tenant(), ns.store(), key, value, cx.version()])?;
    Ok(())
}

fn remove(conn: &Connection, ns: &Namespace, key: &str) -> Result<(), StoreError> {
    conn.prepare_cached("DELETE FROM kv WHERE tenant = ?1 AND store = ?2 AND key = ?3")?
        .execute(params![ns.tenant(), ns.store(), key])?;
    Ok(())
}

fn current(conn: &Connection, ns: &Namespace, key: &str) -> rusqlite::Result<Option<Versioned>> {
    conn.prepare_cached(
        "SELECT value, version FROM kv WHERE tenant = ?1 AND store = ?2 AND key = ?3",
    )?
    .query_row(params![ns.tenant(), ns.store(), key], |r| {
        Ok(Versioned {
            value: r.get(0)?,
            version: r.get(1)?,
        })
    })
    .optional()
}

impl KvBackend for SqliteStore {
    fn get<'a>(&'a self, ns: &'a Namespace, key: &'a str) -> StoreFuture<'a, Option<Versioned>> {
        Box::pin(async move { self.read(|c| current(c, ns, key)) })
    }

    fn set<'a>(&'a self, ns: &'a Namespace, key: &'a str, value: Vec<u8>) -> StoreFuture<'a, ()> {
        let (ns, key) = (ns.clone(), key.to_string());
        Box::pin(self.write(move |c, cx| put(c, cx, &ns, &key, &value)))
    }

    fn delete<'a>(&'a self, ns: &'a Namespace, key: &'a str) -> StoreFuture<'a, ()> {
        let (ns, key) = (ns.clone(), key.to_string());
        Box::pin(self.write(move |c, _| remove(c, &ns, &key)))
    }

    fn exists<'a>(&'a self, ns: &'a Namespace, key: &'a str) -> StoreFuture<'a, bool> {
        Box::pin(async move {
            self.read(|c| {
                c.prepare_cached("SELECT 1 FROM kv WHERE tenant = ?1 AND store = ?2 AND key = ?3")?
                    .exists(params![ns.tenant(), ns.store(), key])
            })
        })
    }

    fn list_keys<'a>(
        &'a self,
        ns: &'a Namespace,
        from: ListFrom<'a>,
        limit: u32,
    ) -> StoreFuture<'a, KeyPage> {
        Box::pin(async move {
            // One more than asked tells whether another page follows.
            let fetch = i64::from(limit) + 1;
            let keys = self.read(|c| {
                let mut out = Vec::new();
                match from {
                    ListFrom::After(after) => {
                        let mut st = c.prepare_cached(
                            "SELECT key FROM kv WHERE tenant = ?1 AND store = ?2 AND key > ?3
                             ORDER BY key LIMIT ?4",
                        )?;
                        for k in st
                            .query_map(params![ns.tenant(), ns.store(), after, fetch], |r| {
                                r.get(0)
                            })?
                        {
                            out.push(k?);
                        }
                    }
                    ListFrom::Start | ListFrom::Skip(_) => {
                        let skip = match from {
                            ListFrom::Skip(n) => i64::try_from(n).unwrap_or(i64::MAX),
                            _ => 0,
                        };
                        let mut st = c.prepare_cached(
                            "SELECT key FROM kv WHERE tenant = ?1 AND store = ?2
                             ORDER BY key LIMIT ?3 OFFSET ?4",
                        )?;
                        for k in st
                            .query_map(params![ns.tenant(), ns.store(), fetch, skip], |r| {
                                r.get(0)
                            })?
                        {
                            out.push(k?);
                        }
                    }
                }
                Ok::<_, rusqlite::Error>(out)
            })?;
            Ok(KeyPage::from_one_more(keys, limit))
        })
    }

    fn increment<'a>(
        &'a self,
        ns: &'a Namespace,
        key: &'a str,
        delta: i64,
    ) -> StoreFuture<'a, i64> {
        let (ns, key) = (ns.clone(), key.to_string());
        Box::pin(self.write(move |c, cx| {
            let old = current(c, &ns, &key)?;
            let new = add_to_counter(&key, old.as_ref().map(|v| v.value.as_slice()), delta)?;
            put(c, cx, &ns, &key, new.to_string().as_bytes())?;
            Ok(new)
        }))
    }

    fn swap_if<'a>(
        &'a self,
        ns: &'a Namespace,
        key: &'a str,
        expected: Option<u64>,
        value: Vec<u8>,
    ) -> StoreFuture<'a, bool> {
        let (ns, key) = (ns.clone(), key.to_string());
        Box::pin(self.write(move |c, cx| {
            let now = current(c, &ns, &key)?.map(|v| v.version);
            if now != expected {
                return Ok(false);
            }
            put(c, cx, &ns, &key, &value)?;
            Ok(true)
        }))
    }

    fn get_many<'a>(
        &'a self,
        ns: &'a Namespace,
        keys: &'a [String],
        max_bytes: usize,
    ) -> StoreFuture<'a, Vec<Option<Vec<u8>>>> {
        Box::pin(async move {
            self.read(|c| {
                // One read transaction: every value comes from the same snapshot.
                c.execute_batch("BEGIN")?;
                let mut budget = Budget::new(max_bytes, "get-many");
                let values = keys
                    .iter()
                    .map(|k| {
                        let v = current(c, ns, k)?.map(|v| v.value);
                        budget.spend(v.as_ref().map_or(0, Vec::len))?;
                        Ok(v)
                    })
                    .collect::<Result<Vec<_>, StoreError>>();
                // Never return a pooled connection inside a transaction.
                let end = c.execute_batch(if values.is_ok() { "COMMIT" } else { "ROLLBACK" });
                let values = values?;
                end?;
                Ok::<_, StoreError>(values)
            })
        })
    }

    fn set_many<'a>(
        &'a self,
        ns: &'a Namespace,
        entries: Vec<(String, Vec<u8>)>,
    ) -> StoreFuture<'a, ()> {
        let ns = ns.clone();
        Box::pin(self.write(move |c, cx| {
            for (k, v) in &entries {
                put(c, cx, &ns, k, v)?;
            }
            Ok(())
        }))
    }

    fn delete_many<'a>(&'a self, ns: &'a Namespace, keys: Vec<String>) -> StoreFuture<'a, ()> {
        let ns = ns.clone();
        Box::pin(self.write(move |c, _| {
            for k in &keys {
                remove(c, &ns, k)?;
            }
            Ok(())
        }))
    }
}

/// Writes one actor batch (inside the caller's transaction).
fn apply_actor_batch(
    c: &Connection,
    actor: &ActorKey,
    batch: &ActorBatch,
) -> Result<(), StoreError> {
    if batch.fence.is_some() {
        // Leases live in a cluster's database; a node on SQLite has none.
        return Err(StoreError::Engine(
            "a fenced actor commit needs a cluster (PostgreSQL)".into(),
        ));
    }
    for (key, value) in &batch.writes {
        match value {
            Some(v) => {
                c.prepare_cached(
                    "INSERT INTO actor_kv (class, id, key, value) VALUES (?1, ?2, ?3, ?4)
                     ON CONFLICT (class, id, key) DO UPDATE SET value = excluded.value",
                )?
                .execute(params![actor.class(), actor.id(), key, v])?;
            }
            None => {
                c.prepare_cached("DELETE FROM actor_kv WHERE class = ?1 AND id = ?2 AND key = ?3")?
                    .execute(params![actor.class(), actor.id(), key])?;
            }
        }
    }
    match batch.alarm {
        None => {}
        Some(AlarmChange::Set(at)) => {
            c.prepare_cached(
                "INSERT INTO actor_alarms (class, id, at_ms) VALUES (?1, ?2, ?3)
                 ON CONFLICT (class, id) DO UPDATE SET at_ms = excluded.at_ms",
            )?
            .execute(params![actor.class(), actor.id(), at as i64])?;
        }
        Some(AlarmChange::Delete) => {
            c.prepare_cached("DELETE FROM actor_alarms WHERE class = ?1 AND id = ?2")?
                .execute(params![actor.class(), actor.id()])?;
        }
        Some(AlarmChange::Fired(at)) => {
            c.prepare_cached(
                "DELETE FROM actor_alarms WHERE class = ?1 AND id = ?2 AND at_ms = ?3",
            )?
            .execute(params![actor.class(), actor.id(), at as i64])?;
        }
    }
    Ok(())
}

impl ActorStorage for SqliteStore {
    fn actor_get<'a>(
        &'a self,
        actor: &'a ActorKey,
        key: &'a str,
    ) -> StoreFuture<'a, Option<Vec<u8>>> {
        Box::pin(async move {
            self.read(|c| {
                c.prepare_cached(
                    "SELECT value FROM actor_kv WHERE class = ?1 AND id = ?2 AND key = ?3",
                )?
                .query_row(params![actor.class(), actor.id(), key], |r| r.get(0))
                .optional()
            })
        })
    }

    fn actor_list<'a>(
        &'a self,
        actor: &'a ActorKey,
        options: &'a ListOptions,
        max_bytes: usize,
    ) -> StoreFuture<'a, Vec<(String, Vec<u8>)>> {
        Box::pin(async move {
            let (lo, hi) = options.bounds();
            let order = if options.reverse { "DESC" } else { "ASC" };
            let sql = format!(
                "SELECT key, value FROM actor_kv WHERE class = ?1 AND id = ?2
                 AND key >= ?3 AND (?4 IS NULL OR key < ?4) ORDER BY key {order} LIMIT ?5"
            );
            let limit = i64::from(options.limit.unwrap_or(u32::MAX));
            self.read(|c| {
                let mut st = c.prepare_cached(&sql)?;
                let rows = st
                    .query_map(params![actor.class(), actor.id(), lo, hi, limit], |r| {
                        Ok((r.get::<_, String>(0)?, r.get::<_, Vec<u8>>(1)?))
                    })?;
                let mut budget = Budget::new(max_bytes, "list");
                let mut entries = Vec::new();
                for row in rows {
                    let (k, v) = row?;
                    budget.spend(k.len() + v.len())?;
                    entries.push((k, v));
                }
                Ok::<_, StoreError>(entries)
            })
        })
    }

    fn actor_commit<'a>(&'a self, actor: &'a ActorKey, batch: ActorBatch) -> StoreFuture<'a, ()> {
        let actor = actor.clone();
        Box::pin(self.write(move |c, _| apply_actor_batch(c, &actor, &batch)))
    }

    fn actor_commit_many(
        &self,
        batches: Vec<(ActorKey, ActorBatch)>,
    ) -> StoreFuture<'_, Vec<Result<(), StoreError>>> {
        // One writer job: every batch in its own nested savepoint, so one
        // failing batch is rolled back alone and the rest share the commit.
        Box::pin(self.write(move |c, _| {
            let step = |sql: &str| -> rusqlite::Result<()> {
                c.prepare_cached(sql)?.execute([]).map(drop)
            };
            let mut results = Vec::with_capacity(batches.len());
            for (actor, batch) in &batches {
                step("SAVEPOINT actor")?;
                let applied = apply_actor_batch(c, actor, batch);
                if applied.is_ok() {
                    step("RELEASE actor")?;
                } else {
                    step("ROLLBACK TO actor")?;
                    step("RELEASE actor")?;
                }
                results.push(applied);
            }
            Ok(results)
        }))
    }

    fn actor_alarm<'a>(&'a self, actor: &'a ActorKey) -> StoreFuture<'a, Option<u64>> {
        Box::pin(async move {
            self.read(|c| {
                c.prepare_cached("SELECT at_ms FROM actor_alarms WHERE class = ?1 AND id = ?2")?
                    .query_row(params![actor.class(), actor.id()], |r| r.get::<_, i64>(0))
                    .optional()
            })
            .map(|v| v.map(|v| v as u64))
        })
    }

    fn all_alarms(&self) -> StoreFuture<'_, Vec<(ActorKey, u64)>> {
        Box::pin(async move {
            self.read(|c| {
                let mut st = c.prepare_cached("SELECT class, id, at_ms FROM actor_alarms")?;
                let rows = st.query_map([], |r| {
                    Ok((
                        ActorKey::new(r.get::<_, String>(0)?, r.get::<_, String>(1)?),
                        r.get::<_, i64>(2)? as u64,
                    ))
                })?;
                rows.collect()
            })
        })
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        drop(lock(&self.writer).take());
        if let Some(thread) = lock(&self.thread).take() {
            let _ = thread.join();
        }
    }
}

/// Creates `path`'s missing parent directories (0700) and the file itself
/// (0600) if it does not exist yet; an existing file keeps its mode.
fn create_private(path: &Path) -> Result<(), StoreError> {
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    let fail = |what: &Path, e: std::io::Error| {
        StoreError::Engine(format!("cannot create {}: {e}", what.display()))
    };
    if let Some(dir) = path.parent()
        && !dir.as_os_str().is_empty()
    {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| fail(dir, e))?;
    }
    match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
    {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(fail(path, e)),
    }
}
