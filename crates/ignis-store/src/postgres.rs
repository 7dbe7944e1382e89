//! The networked engine: PostgreSQL (or an engine that speaks its protocol
//! and SQL), for a node whose state must live outside its own disk and,
//! later, for a cluster of nodes sharing one database.
//!
//! Same contracts as [`SqliteStore`](crate::SqliteStore), kept the same way:
//!
//! - **Group commit.** Every write is a job for one writer task. It takes
//!   every job that queued while it was busy (up to 1,024 jobs or 4,096
//!   statements), runs them in one transaction and answers them only after
//!   `COMMIT` returned: with PostgreSQL's default `synchronous_commit = on`,
//!   the commit record is flushed to its WAL first. Concurrent writers share
//!   one commit.
//! - **Pipelined.** Every job is one statement per key it writes, none of
//!   which needs another's answer, so a group's statements are all sent at
//!   once on one connection (the protocol's pipelining) and the database
//!   runs them in the order sent: a group costs about three round trips
//!   (`BEGIN`, the statements, `COMMIT`), not one per statement. Measured:
//!   64 concurrent incrementers went from 153 µs to 112 µs per
//!   increment (`cargo bench -p ignis-store --bench kv`); what is left is
//!   the server's work per statement (its backend busy about 60% of the
//!   time, the client 37%, the rest waiting on the WAL flush, with groups
//!   of about 33 jobs).
//! - **A job is all or nothing without savepoints.** Checks that can refuse
//!   a job (a counter that is not a number, an overflow, a compare-and-swap
//!   whose version moved) are made inside its one statement (`CASE` and
//!   `WHERE` clauses), so they never abort the transaction. If the database
//!   fails a statement (a deadlock with another node, a constraint, a lost
//!   connection), the whole group is rolled back and every job is run again
//!   in a transaction of its own, so one bad job fails alone.
//! - **Versions** come from one database sequence (`ignis_kv_version`):
//!   unique and growing across keys and across every node on the database,
//!   so compare-and-swap stays sound when several nodes write one key.
//! - **Atomic read-modify-write across nodes.** `increment` is one
//!   `INSERT ... ON CONFLICT DO UPDATE` computing from the row's latest
//!   committed value under its row lock; `swap_if` is one conditional
//!   `INSERT ... ON CONFLICT DO NOTHING` or `UPDATE ... WHERE version = ...`.
//! - **Keys are `bytea`**: bytewise order whatever the database's collation
//!   (a `text` column would sort by locale), and any string a guest sends,
//!   NUL included (which `text` refuses).
//! - **Schema migrations** are numbered and recorded in `ignis_schema`; at
//!   open, under a transaction-scoped advisory lock (two nodes starting at
//!   once do not race), the missing ones are applied in one transaction. A
//!   database whose schema is newer than this build knows is refused, naming
//!   both versions.
//!
//! - **The node lock** ([`PgOptions::node_lock`], taken by a node with
//!   actor classes): a session-level advisory lock held by the writer's own
//!   connection, so a second node serving actors from the same database is
//!   refused at start, naming the session that holds it. Every write goes
//!   through that session: should it be lost (the database restarted, the
//!   network cut), the lock is gone with it and another node may take over
//!   the actors, so this store commits nothing more until it is opened
//!   again. Whatever it committed before precedes whatever the next holder
//!   reads (the next holder can only lock once the session has ended).
//!   Key-value writes are safe from any number of nodes without it.
//!
//! Errors: a statement the database refused is [`StoreError::Engine`]
//! (nothing of the job applied); a database that cannot be reached, or a
//! connection lost before `COMMIT` was sent, is [`StoreError::Unavailable`]
//! (nothing applied), including a session the server ended while a
//! statement was in flight (its FATAL error is that statement's answer).
//! A connection lost *while* `COMMIT` was in flight leaves the outcome
//! unknown to this node: the job fails with [`StoreError::Unavailable`]
//! saying so (the writes may be there). The pool reconnects by itself when
//! the database is back.
//!
//! The connection URL's password is never logged nor put in an error:
//! [`PgStore::target`] is the URL without it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::task::Poll;
use std::time::{Duration, Instant};

use deadpool_postgres::{Manager, ManagerConfig, Object, Pool, PoolError, RecyclingMethod};
use futures_util::StreamExt;
use tokio::sync::{mpsc, oneshot};
use tokio_postgres::types::ToSql;
use tokio_postgres::{NoTls, Row, Statement};

use crate::{
    ActorBatch, ActorKey, ActorStorage, AlarmChange, Budget, KeyPage, KvBackend, ListFrom,
    ListOptions, Namespace, StoreError, StoreFuture, StoreStats, Versioned, add_to_counter,
};

/// Jobs committed together at most.
const MAX_GROUP: usize = 1024;
/// Statements one group sends at most (a batch call counts one per key).
const MAX_GROUP_STATEMENTS: usize = 4096;
/// Jobs waiting for the writer at most; a writer past it waits for room.
const MAX_QUEUED: usize = 16_384;
/// Advisory lock key the migrations run under ("IGNIS" in ASCII).
const MIGRATION_LOCK: i64 = 0x49_47_4e_49_53;
/// Advisory lock key of the node lock ("IGNISN").
const NODE_LOCK: i64 = 0x49_47_4e_49_53_4e;

/// One schema migration: its number, what it does, and its SQL.
struct Migration {
    version: i32,
    description: &'static str,
    sql: &'static str,
}

/// The schema, in order. A migration once released is never edited: a
/// change is a new entry.
const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        description: "key-value, actor storage and alarms",
        sql: "
CREATE TABLE ignis_kv (
    tenant  TEXT   NOT NULL,
    store   TEXT   NOT NULL,
    key     BYTEA  NOT NULL,
    value   BYTEA  NOT NULL,
    version BIGINT NOT NULL,
    PRIMARY KEY (tenant, store, key)
);
CREATE SEQUENCE ignis_kv_version;
CREATE TABLE ignis_actor_kv (
    class TEXT  NOT NULL,
    id    BYTEA NOT NULL,
    key   BYTEA NOT NULL,
    value BYTEA NOT NULL,
    PRIMARY KEY (class, id, key)
);
CREATE TABLE ignis_actor_alarms (
    class TEXT   NOT NULL,
    id    BYTEA  NOT NULL,
    at_ms BIGINT NOT NULL,
    PRIMARY KEY (class, id)
);
",
    },
    Migration {
        version: 2,
        description: "cluster: nodes, actor leases with epochs, fenced commits, shared deployments, cron claims",
        sql: CLUSTER_SCHEMA,
    },
    Migration {
        version: 3,
        description: "cluster: each node reports the deploy record it applied",
        sql: "
ALTER TABLE ignis_nodes ADD COLUMN applied_seq BIGINT NOT NULL DEFAULT 0;
ALTER TABLE ignis_nodes ADD COLUMN applied_error TEXT;
",
    },
];

/// Migration 2: the cluster's tables (see [`crate::postgres`]'s cluster
/// section and docs/cluster.md). `ignis_fence` is the check every fenced
/// actor commit runs first: it takes the lease row `FOR SHARE` (a takeover,
/// which updates the row, waits for the commit) and raises `IG001` if the
/// lease moved, which aborts the transaction.
const CLUSTER_SCHEMA: &str = "
CREATE TABLE ignis_nodes (
    node       TEXT        PRIMARY KEY,
    address    TEXT        NOT NULL,
    started_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    expires_at TIMESTAMPTZ NOT NULL
);
CREATE TABLE ignis_actor_leases (
    class TEXT   NOT NULL,
    id    BYTEA  NOT NULL,
    node  TEXT   NOT NULL,
    epoch BIGINT NOT NULL,
    PRIMARY KEY (class, id)
);
CREATE TABLE ignis_actor_owners (
    class       TEXT        NOT NULL,
    id          BYTEA       NOT NULL,
    epoch       BIGINT      NOT NULL,
    node        TEXT        NOT NULL,
    acquired_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (class, id, epoch)
);
CREATE TABLE ignis_cluster (
    name  TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE ignis_deploys (
    seq        BIGINT      PRIMARY KEY,
    base       TEXT        NOT NULL,
    document   TEXT        NOT NULL,
    components TEXT        NOT NULL,
    node       TEXT        NOT NULL,
    by_whom    TEXT        NOT NULL,
    at         TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE TABLE ignis_components (
    sha256 TEXT  PRIMARY KEY,
    bytes  BYTEA NOT NULL
);
CREATE TABLE ignis_cron_runs (
    trigger TEXT   NOT NULL,
    at_ms   BIGINT NOT NULL,
    node    TEXT   NOT NULL,
    PRIMARY KEY (trigger, at_ms)
);
CREATE FUNCTION ignis_fence(p_class TEXT, p_id BYTEA, p_node TEXT, p_epoch BIGINT)
RETURNS BOOLEAN LANGUAGE plpgsql AS $$
BEGIN
    PERFORM 1 FROM ignis_actor_leases
     WHERE class = p_class AND id = p_id AND node = p_node AND epoch = p_epoch
     FOR SHARE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'the lease of epoch % held by node % is no longer the actor''s',
            p_epoch, p_node USING ERRCODE = 'IG001';
    END IF;
    RETURN true;
END $$;
";

/// The SQLSTATE `ignis_fence` raises.
const FENCED: &str = "IG001";

/// The schema version this build writes and reads.
pub const SCHEMA_VERSION: i32 = MIGRATIONS[MIGRATIONS.len() - 1].version;

/// How a [`PgStore`] connects.
#[derive(Debug, Clone)]
pub struct PgOptions {
    /// Connections at most (readers and the writer share them).
    pub max_connections: usize,
    /// Time allowed to connect, and to wait for a free connection.
    pub connect_timeout: Duration,
    /// Hold the database's node lock: only one store with it may be open on
    /// a database at a time (a node serving actors: one activation per id
    /// needs one node). Every write then goes through the session that
    /// holds the lock; if that session is lost, writes fail until the store
    /// is opened again, since another node may have taken the lock and the
    /// actors meanwhile (see the module docs).
    pub node_lock: bool,
    /// How long opening waits for the node lock (a node killed a moment
    /// ago holds it until the database notices its session ended).
    pub lock_wait: Duration,
}

impl Default for PgOptions {
    fn default() -> Self {
        PgOptions {
            max_connections: 16,
            connect_timeout: Duration::from_secs(5),
            node_lock: false,
            lock_wait: Duration::from_secs(10),
        }
    }
}

/// A key space as the `ignis_kv` columns hold it.
struct Space {
    tenant: String,
    store: String,
}

impl From<&Namespace> for Space {
    fn from(ns: &Namespace) -> Self {
        Space {
            tenant: ns.tenant().to_string(),
            store: ns.store().to_string(),
        }
    }
}

/// One actor's batch as the `ignis_actor_*` columns hold it.
struct ActorRows {
    class: String,
    id: Vec<u8>,
    writes: Vec<(Vec<u8>, Option<Vec<u8>>)>,
    alarm: Option<AlarmChange>,
    /// The alarm change's time, as the `bigint` column holds it.
    at: i64,
    /// The lease the batch was made under: node and epoch.
    fence: Option<(String, i64)>,
}

impl ActorRows {
    fn new(actor: &ActorKey, batch: ActorBatch) -> Self {
        let at = match batch.alarm {
            Some(AlarmChange::Set(at) | AlarmChange::Fired(at)) => millis(at),
            _ => 0,
        };
        ActorRows {
            class: actor.class().to_string(),
            id: actor.id().as_bytes().to_vec(),
            writes: batch
                .writes
                .into_iter()
                .map(|(k, v)| (k.into_bytes(), v))
                .collect(),
            alarm: batch.alarm,
            at,
            fence: batch.fence.map(|f| {
                (
                    f.node.to_string(),
                    i64::try_from(f.epoch).unwrap_or(i64::MAX),
                )
            }),
        }
    }

    fn statements(&self) -> usize {
        self.writes.len() + usize::from(self.alarm.is_some()) + usize::from(self.fence.is_some())
    }
}

/// What one write job does, its keys already as the columns hold them.
enum Op {
    Set(Space, Vec<u8>, Vec<u8>),
    Delete(Space, Vec<u8>),
    /// The key as text too, for the error naming it.
    Increment(Space, String, Vec<u8>, i64),
    /// `None`: only if absent; `Some(version)`: only if at that version.
    SwapIf(Space, Vec<u8>, Option<i64>, Vec<u8>),
    SetMany(Space, Vec<(Vec<u8>, Vec<u8>)>),
    DeleteMany(Space, Vec<Vec<u8>>),
    Actors(Vec<ActorRows>),
}

impl Op {
    /// Statements the job sends.
    fn statements(&self) -> usize {
        match self {
            Op::SetMany(_, entries) => entries.len(),
            Op::DeleteMany(_, keys) => keys.len(),
            Op::Actors(batches) => batches.iter().map(ActorRows::statements).sum(),
            _ => 1,
        }
    }
}

/// What a write job answers.
enum Out {
    Unit,
    Int(i64),
    Bool(bool),
    Many(Vec<Result<(), StoreError>>),
}

struct Job {
    op: Op,
    result: Option<Result<Out, StoreError>>,
    reply: oneshot::Sender<Result<Out, StoreError>>,
}

struct Shared {
    pool: Pool,
    /// How to open a connection of its own (a `LISTEN`er).
    config: tokio_postgres::Config,
    target: String,
    writer: Mutex<Option<mpsc::Sender<Job>>>,
    stats: Arc<StoreStats>,
}

/// The PostgreSQL engine (see the module docs). Cloning shares it.
#[derive(Clone)]
pub struct PgStore {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for PgStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgStore")
            .field("target", &self.shared.target)
            .finish_non_exhaustive()
    }
}

/// `url` without its password, for logs and errors: `postgres://USER@HOST:PORT/DB`.
pub fn redacted_target(config: &tokio_postgres::Config) -> String {
    let user = config.get_user().unwrap_or("");
    let hosts: Vec<String> = config
        .get_hosts()
        .iter()
        .zip(config.get_ports().iter().chain(std::iter::repeat(&5432)))
        .map(|(host, port)| match host {
            tokio_postgres::config::Host::Tcp(h) => format!("{h}:{port}"),
            tokio_postgres::config::Host::Unix(p) => format!("[{}]:{port}", p.display()),
        })
        .collect();
    let at = if user.is_empty() { "" } else { "@" };
    format!(
        "postgres://{user}{at}{}/{}",
        hosts.join(","),
        config.get_dbname().unwrap_or("")
    )
}

impl PgStore {
    /// Connects to the database at `url` (a `postgres://` URL or a
    /// `key=value` connection string), applies missing schema migrations and
    /// starts the writer task on the current tokio runtime.
    ///
    /// Errors name the database without the password.
    pub async fn open(url: &str, options: &PgOptions) -> Result<PgStore, StoreError> {
        let mut config: tokio_postgres::Config = url.parse().map_err(|e| {
            StoreError::Engine(format!(
                "the database URL is not a PostgreSQL connection string: {e}"
            ))
        })?;
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(options.connect_timeout);
        }
        if config.get_application_name().is_none() {
            config.application_name("ignis");
        }
        let target = redacted_target(&config);
        let manager = Manager::from_config(
            config.clone(),
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(options.max_connections.max(2))
            .runtime(deadpool_postgres::Runtime::Tokio1)
            .wait_timeout(Some(options.connect_timeout))
            .create_timeout(Some(options.connect_timeout))
            .recycle_timeout(Some(options.connect_timeout))
            .build()
            .map_err(|e| StoreError::Engine(format!("{target}: {e}")))?;
        let mut client = pool.get().await.map_err(|e| {
            let e = pool_error(e);
            StoreError::Unavailable(format!("cannot connect to {target}: {}", e.message()))
        })?;
        migrate(&mut client, &target).await?;
        let connection = if options.node_lock {
            take_node_lock(&mut client, &target, options.lock_wait).await?;
            WriterConnection::Locked(Some(Box::new(client)))
        } else {
            drop(client);
            WriterConnection::Pooled(pool.clone())
        };
        let stats = Arc::new(StoreStats::default());
        let (tx, rx) = mpsc::channel(MAX_QUEUED);
        tokio::spawn(writer_loop(connection, rx, stats.clone()));
        tracing::info!(database = %target, schema = SCHEMA_VERSION, "store open (PostgreSQL)");
        Ok(PgStore {
            shared: Arc::new(Shared {
                pool,
                config,
                target,
                writer: Mutex::new(Some(tx)),
                stats,
            }),
        })
    }

    /// The connection settings (for a connection outside the pool).
    pub(crate) fn config(&self) -> &tokio_postgres::Config {
        &self.shared.config
    }

    /// The database, without its password.
    pub fn target(&self) -> &str {
        &self.shared.target
    }

    /// The engine's counters.
    pub fn stats(&self) -> &Arc<StoreStats> {
        &self.shared.stats
    }

    /// Stops accepting writes; queued ones are still committed. Later
    /// writes fail with [`StoreError::Closed`].
    pub fn close(&self) {
        drop(lock(&self.shared.writer).take());
    }

    async fn write(&self, op: Op) -> Result<Out, StoreError> {
        let sender = lock(&self.shared.writer).clone();
        let Some(sender) = sender else {
            return Err(StoreError::Closed);
        };
        let (reply, answer) = oneshot::channel();
        let job = Job {
            op,
            result: None,
            reply,
        };
        if sender.send(job).await.is_err() {
            return Err(StoreError::Closed);
        }
        answer.await.unwrap_or(Err(StoreError::Closed))
    }

    pub(crate) async fn reader(&self) -> Result<Object, StoreError> {
        self.shared.pool.get().await.map_err(pool_error)
    }

    /// The rows of `sql` on a pooled connection (its prepared statement
    /// cached there).
    pub(crate) async fn read(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<Row>, StoreError> {
        let c = self.reader().await?;
        let st = c.prepare_cached(sql).await?;
        Ok(c.query(&st, params).await?)
    }

    /// The one row of `sql`, if any (see [`PgStore::read`]).
    pub(crate) async fn read_one(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Option<Row>, StoreError> {
        let c = self.reader().await?;
        let st = c.prepare_cached(sql).await?;
        Ok(c.query_opt(&st, params).await?)
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl StoreError {
    fn message(&self) -> String {
        match self {
            StoreError::Engine(m)
            | StoreError::Unavailable(m)
            | StoreError::TooLarge(m)
            | StoreError::Fenced(m) => m.clone(),
            e => e.to_string(),
        }
    }
}

impl From<tokio_postgres::Error> for StoreError {
    fn from(e: tokio_postgres::Error) -> Self {
        if let Some(db) = e.as_db_error()
            && db.code().code() == FENCED
        {
            return StoreError::Fenced(db.message().to_string());
        }
        if let Some(db) = e.as_db_error() {
            // `e` alone says only "db error": the server's words are in `db`.
            let text = format!("{e}: {db}");
            if session_ended(db) {
                return StoreError::Unavailable(text);
            }
            return StoreError::Engine(text);
        }
        // No answer from the server: the connection is gone or was never
        // made (refused, timed out, closed, an I/O error).
        StoreError::Unavailable(e.to_string())
    }
}

/// Whether the server answered by ending the session rather than by
/// refusing the statement: a FATAL or PANIC error (the backend exits after
/// sending it: terminated by an administrator, the server shutting down or
/// crashed, the database dropped), or a connection exception (SQLSTATE
/// class 08). The statement was cut off with its connection, as when no
/// answer comes at all: unavailable, not an engine error. A statement in
/// flight when its backend is terminated gets the FATAL as its answer;
/// the same connection's next statement would find it closed.
fn session_ended(db: &tokio_postgres::error::DbError) -> bool {
    use tokio_postgres::error::Severity;
    matches!(
        db.parsed_severity(),
        Some(Severity::Fatal | Severity::Panic)
    ) || db.code().code().starts_with("08")
}

fn pool_error(e: PoolError) -> StoreError {
    match e {
        // Making a connection failed, whether the server was unreachable
        // or refused it (down, starting, not accepting connections to the
        // database): unavailable, not an engine error.
        PoolError::Backend(e) => {
            StoreError::Unavailable(format!("cannot connect: {}", StoreError::from(e).message()))
        }
        PoolError::Timeout(_) => {
            StoreError::Unavailable("no database connection within the connect timeout".into())
        }
        PoolError::Closed => StoreError::Closed,
        e => StoreError::Unavailable(e.to_string()),
    }
}

async fn migrate(client: &mut Object, target: &str) -> Result<(), StoreError> {
    let context = |e: tokio_postgres::Error| {
        let e = StoreError::from(e);
        StoreError::Engine(format!("migrating {target}: {}", e.message()))
    };
    let tx = client.transaction().await.map_err(context)?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
        .await
        .map_err(context)?;
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS ignis_schema (
             version     INTEGER PRIMARY KEY,
             description TEXT NOT NULL,
             applied_at  TIMESTAMPTZ NOT NULL DEFAULT now()
         )",
    )
    .await
    .map_err(context)?;
    let current: i32 = tx
        .query_one("SELECT COALESCE(MAX(version), 0) FROM ignis_schema", &[])
        .await
        .map_err(context)?
        .get(0);
    if current > SCHEMA_VERSION {
        return Err(StoreError::Engine(format!(
            "{target}: the database schema is at version {current}, newer than this Ignis \
             knows (up to {SCHEMA_VERSION}): run a release of Ignis that includes migration \
             {current} on this node"
        )));
    }
    for m in MIGRATIONS.iter().filter(|m| m.version > current) {
        tx.batch_execute(m.sql).await.map_err(context)?;
        tx.execute(
            "INSERT INTO ignis_schema (version, description) VALUES ($1, $2)",
            &[&m.version, &m.description],
        )
        .await
        .map_err(context)?;
        tracing::info!(database = %target, version = m.version, description = m.description, "schema migration applied");
    }
    tx.commit().await.map_err(context)
}

/// Takes the node lock on `client`'s session, waiting up to `wait` for a
/// holder to go, or says who holds it.
async fn take_node_lock(
    client: &mut Object,
    target: &str,
    wait: Duration,
) -> Result<(), StoreError> {
    // A session lock taken inside a transaction outlives it; `SET LOCAL`
    // bounds the wait to this transaction.
    let tx = client.transaction().await?;
    tx.batch_execute(&format!(
        "SET LOCAL lock_timeout = {}",
        wait.as_millis().max(1)
    ))
    .await?;
    let taken = match tx
        .execute("SELECT pg_advisory_lock($1)", &[&NODE_LOCK])
        .await
    {
        Ok(_) => true,
        Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::LOCK_NOT_AVAILABLE) => false,
        Err(e) => return Err(e.into()),
    };
    if taken {
        tx.commit().await?;
        return Ok(());
    }
    drop(tx);
    let holder = client
        .query_opt(
            "SELECT a.pid, COALESCE(host(a.client_addr), 'local'), a.application_name
             FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
             WHERE l.locktype = 'advisory' AND l.granted
               AND ((l.classid::bigint << 32) | l.objid::bigint) = $1",
            &[&NODE_LOCK],
        )
        .await?
        .map(|r| {
            format!(
                " (session {} from {}, application `{}`)",
                r.get::<_, i32>(0),
                r.get::<_, String>(1),
                r.get::<_, String>(2)
            )
        })
        .unwrap_or_default();
    Err(StoreError::Engine(format!(
        "another Ignis node serves actors from {target}{holder}: one node per database serves \
         actors (it holds the node lock until it stops)"
    )))
}

/// Where the writer's transactions run.
enum WriterConnection {
    /// Any pooled connection (no node lock).
    Pooled(Pool),
    /// Only the session holding the node lock; `None` once it was lost.
    Locked(Option<Box<Object>>),
}

/// The message of every write after the node lock's session was lost.
const LOCK_LOST: &str = "this node lost its database session and with it the node lock; \
     another node may serve its actors now, so it writes nothing more until it is restarted";

async fn writer_loop(
    mut connection: WriterConnection,
    mut rx: mpsc::Receiver<Job>,
    stats: Arc<StoreStats>,
) {
    use std::sync::atomic::Ordering::Relaxed;
    let mut group: Vec<Job> = Vec::with_capacity(64);
    let mut carried: Option<Job> = None;
    loop {
        let first = match carried.take() {
            Some(job) => job,
            None => match rx.recv().await {
                Some(job) => job,
                None => break,
            },
        };
        let mut statements = first.op.statements();
        group.push(first);
        while group.len() < MAX_GROUP && statements < MAX_GROUP_STATEMENTS {
            match rx.try_recv() {
                Ok(job) if statements + job.op.statements() > MAX_GROUP_STATEMENTS => {
                    carried = Some(job);
                    break;
                }
                Ok(job) => {
                    statements += job.op.statements();
                    group.push(job);
                }
                Err(_) => break,
            }
        }
        let started = Instant::now();
        let outcome = run_group(&mut connection, &mut group).await;
        stats.commit_duration.record(started.elapsed());
        match &outcome {
            Ok(commits) => {
                stats.commits.fetch_add(*commits, Relaxed);
            }
            Err(e) => {
                stats.failed_commits.fetch_add(1, Relaxed);
                tracing::error!(error = %e, jobs = group.len(), "store commit failed; the writes were not applied");
            }
        }
        stats.writes.fetch_add(group.len() as u64, Relaxed);
        for job in group.drain(..) {
            let answer = match (&outcome, job.result) {
                (Err(e), _) => Err(e.clone()),
                (Ok(_), Some(result)) => result,
                (Ok(_), None) => Err(StoreError::Engine("job was not applied".into())),
            };
            let _ = job.reply.send(answer);
        }
    }
}

/// Runs a group in one transaction; if the database fails it, rolls it
/// back and runs each job in a transaction of its own. Returns the number
/// of commits made.
async fn run_group(
    connection: &mut WriterConnection,
    group: &mut [Job],
) -> Result<u64, StoreError> {
    let mut pooled;
    let client = match connection {
        WriterConnection::Pooled(pool) => {
            pooled = pool.get().await.map_err(pool_error)?;
            &mut pooled
        }
        WriterConnection::Locked(slot) => match slot {
            Some(client) if !client.is_closed() => client,
            _ => {
                if slot.take().is_some() {
                    tracing::error!("{LOCK_LOST}");
                }
                return Err(StoreError::Unavailable(LOCK_LOST.into()));
            }
        },
    };
    let failed = match try_group(client, group).await {
        Ok(()) => return Ok(1),
        Err(e) => e,
    };
    if client.is_closed() {
        return Err(failed);
    }
    tracing::warn!(error = %failed, jobs = group.len(), "a group commit failed; running its jobs one by one");
    let mut commits = 0;
    for job in group.iter_mut() {
        let result = match &job.op {
            Op::Actors(batches) => {
                // Each actor's batch on its own, as the contract promises.
                let mut results = Vec::with_capacity(batches.len());
                for batch in batches {
                    let one = alone(client, Single::Actor(batch)).await;
                    commits += u64::from(one.is_ok());
                    results.push(one.map(drop));
                }
                Ok(Out::Many(results))
            }
            op => {
                let one = alone(client, Single::Op(op)).await;
                commits += u64::from(one.is_ok());
                one.and_then(|rows| interpret(op, &rows))
            }
        };
        job.result = Some(result);
    }
    Ok(commits)
}

/// What runs alone after a group failed: a job, or one actor's batch.
enum Single<'a> {
    Op(&'a Op),
    Actor(&'a ActorRows),
}

/// Runs `single` in a transaction of its own, commits, and returns the rows
/// of its calls.
async fn alone(client: &mut Object, single: Single<'_>) -> Result<Vec<Vec<Row>>, StoreError> {
    let tx = client.transaction().await?;
    let statements = Statements::prepare(&tx).await?;
    let mut calls = Vec::new();
    match single {
        Single::Op(op) => op_calls(&statements, op, &mut calls),
        Single::Actor(batch) => actor_calls(&statements, batch, &mut calls),
    }
    let mut rows = Vec::with_capacity(calls.len());
    for result in pipeline(&tx, &calls).await {
        rows.push(result?);
    }
    drop(calls);
    commit(tx).await?;
    Ok(rows)
}

async fn try_group(client: &mut Object, group: &mut [Job]) -> Result<(), StoreError> {
    let tx = client.transaction().await?;
    let statements = Statements::prepare(&tx).await?;
    let mut calls = Vec::new();
    let mut ends = Vec::with_capacity(group.len());
    for job in group.iter() {
        op_calls(&statements, &job.op, &mut calls);
        ends.push(calls.len());
    }
    let mut results = pipeline(&tx, &calls).await.into_iter();
    let mut answers = Vec::with_capacity(group.len());
    let mut rows = Vec::new();
    let mut start = 0;
    for (job, end) in group.iter().zip(ends) {
        rows.clear();
        for result in results.by_ref().take(end - start) {
            // The database failed a statement: the transaction is aborted
            // (dropping it rolls it back).
            rows.push(result?);
        }
        start = end;
        answers.push(interpret(&job.op, &rows));
    }
    drop(calls);
    commit(tx).await?;
    for (job, answer) in group.iter_mut().zip(answers) {
        job.result = Some(answer);
    }
    Ok(())
}

async fn commit(tx: deadpool_postgres::Transaction<'_>) -> Result<(), StoreError> {
    tx.commit().await.map_err(|e| match StoreError::from(e) {
        StoreError::Unavailable(m) => StoreError::Unavailable(format!(
            "the database connection was lost during COMMIT ({m}): the writes may or may not \
             have been applied"
        )),
        e => e,
    })
}

type Tx<'t> = deadpool_postgres::Transaction<'t>;

/// A statement with its parameters, borrowed from the job.
struct Call<'a> {
    statement: &'a Statement,
    params: Vec<&'a (dyn ToSql + Sync)>,
}

/// Sends every call at once (the protocol's pipelining: one connection, no
/// waiting between statements) and collects the answers in order. The
/// database runs them in the order sent.
async fn pipeline(tx: &Tx<'_>, calls: &[Call<'_>]) -> Vec<Result<Vec<Row>, tokio_postgres::Error>> {
    let mut pending: Vec<_> = calls
        .iter()
        .map(|c| Box::pin(tx.query(c.statement, &c.params)))
        .collect();
    let mut done: Vec<Option<Result<Vec<Row>, tokio_postgres::Error>>> =
        (0..calls.len()).map(|_| None).collect();
    // The first pass polls every call once, which sends it; later passes
    // go from the first unanswered one and stop at the first still waiting
    // (answers arrive in order).
    let mut first_pass = true;
    let mut next = 0;
    std::future::poll_fn(|cx| {
        let mut i = next;
        while i < pending.len() {
            if done[i].is_none() {
                match pending[i].as_mut().poll(cx) {
                    Poll::Ready(r) => done[i] = Some(r),
                    Poll::Pending if first_pass => {}
                    Poll::Pending => break,
                }
            }
            i += 1;
        }
        first_pass = false;
        while next < done.len() && done[next].is_some() {
            next += 1;
        }
        if next == done.len() {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    })
    .await;
    done.into_iter().flatten().collect()
}

const PUT: &str = "INSERT INTO ignis_kv (tenant, store, key, value, version)
     VALUES ($1, $2, $3, $4, nextval('ignis_kv_version'))
     ON CONFLICT (tenant, store, key)
     DO UPDATE SET value = excluded.value, version = excluded.version";

/// One statement, no error path: the counter's new value if it was a
/// decimal integer that stays in range (or absent), and its old value
/// either way (to tell why not). The `CASE` keeps the cast from ever
/// seeing text that is not a number (a failed cast would abort the group).
const INCREMENT: &str = r"WITH old AS (
    SELECT value FROM ignis_kv WHERE tenant = $1 AND store = $2 AND key = $3 FOR UPDATE
), new AS (
    INSERT INTO ignis_kv AS t (tenant, store, key, value, version)
    VALUES ($1, $2, $3, convert_to($4::bigint::text, 'UTF8'), nextval('ignis_kv_version'))
    ON CONFLICT (tenant, store, key) DO UPDATE
    SET value = convert_to((convert_from(t.value, 'UTF8')::numeric + $4)::text, 'UTF8'),
        version = excluded.version
    WHERE CASE WHEN encode(t.value, 'escape') ~ '^\s*[+-]?[0-9]+\s*$'
          THEN convert_from(t.value, 'UTF8')::numeric + $4
               BETWEEN -9223372036854775808 AND 9223372036854775807
          ELSE false END
    RETURNING value
)
SELECT (SELECT value FROM new), (SELECT value FROM old)";

/// The writer's statements, prepared once per connection (the pool's
/// statement cache).
struct Statements {
    put: Statement,
    delete: Statement,
    increment: Statement,
    insert_new: Statement,
    update_if: Statement,
    actor_put: Statement,
    actor_delete: Statement,
    alarm_set: Statement,
    alarm_delete: Statement,
    alarm_fired: Statement,
    fence: Statement,
}

impl Statements {
    async fn prepare(tx: &Tx<'_>) -> Result<Statements, tokio_postgres::Error> {
        Ok(Statements {
            put: tx.prepare_cached(PUT).await?,
            delete: tx
                .prepare_cached(
                    "DELETE FROM ignis_kv WHERE tenant = $1 AND store = $2 AND key = $3",
                )
                .await?,
            increment: tx.prepare_cached(INCREMENT).await?,
            insert_new: tx
                .prepare_cached(
                    "INSERT INTO ignis_kv (tenant, store, key, value, version)
                     VALUES ($1, $2, $3, $4, nextval('ignis_kv_version'))
                     ON CONFLICT (tenant, store, key) DO NOTHING RETURNING 1",
                )
                .await?,
            update_if: tx
                .prepare_cached(
                    "UPDATE ignis_kv SET value = $4, version = nextval('ignis_kv_version')
                     WHERE tenant = $1 AND store = $2 AND key = $3 AND version = $5 RETURNING 1",
                )
                .await?,
            actor_put: tx
                .prepare_cached(
                    "INSERT INTO ignis_actor_kv (class, id, key, value) VALUES ($1, $2, $3, $4)
                     ON CONFLICT (class, id, key) DO UPDATE SET value = excluded.value",
                )
                .await?,
            actor_delete: tx
                .prepare_cached(
                    "DELETE FROM ignis_actor_kv WHERE class = $1 AND id = $2 AND key = $3",
                )
                .await?,
            alarm_set: tx
                .prepare_cached(
                    "INSERT INTO ignis_actor_alarms (class, id, at_ms) VALUES ($1, $2, $3)
                     ON CONFLICT (class, id) DO UPDATE SET at_ms = excluded.at_ms",
                )
                .await?,
            alarm_delete: tx
                .prepare_cached("DELETE FROM ignis_actor_alarms WHERE class = $1 AND id = $2")
                .await?,
            alarm_fired: tx
                .prepare_cached(
                    "DELETE FROM ignis_actor_alarms WHERE class = $1 AND id = $2 AND at_ms = $3",
                )
                .await?,
            fence: tx
                .prepare_cached("SELECT ignis_fence($1, $2, $3, $4)")
                .await?,
        })
    }
}

/// The calls a job makes, in order.
fn op_calls<'a>(s: &'a Statements, op: &'a Op, calls: &mut Vec<Call<'a>>) {
    let mut call = |statement: &'a Statement, params: Vec<&'a (dyn ToSql + Sync)>| {
        calls.push(Call { statement, params })
    };
    match op {
        Op::Set(sp, key, value) => call(&s.put, vec![&sp.tenant, &sp.store, key, value]),
        Op::Delete(sp, key) => call(&s.delete, vec![&sp.tenant, &sp.store, key]),
        Op::Increment(sp, _, key, delta) => {
            call(&s.increment, vec![&sp.tenant, &sp.store, key, delta])
        }
        Op::SwapIf(sp, key, None, value) => {
            call(&s.insert_new, vec![&sp.tenant, &sp.store, key, value])
        }
        Op::SwapIf(sp, key, Some(version), value) => call(
            &s.update_if,
            vec![&sp.tenant, &sp.store, key, value, version],
        ),
        Op::SetMany(sp, entries) => {
            for (key, value) in entries {
                call(&s.put, vec![&sp.tenant, &sp.store, key, value]);
            }
        }
        Op::DeleteMany(sp, keys) => {
            for key in keys {
                call(&s.delete, vec![&sp.tenant, &sp.store, key]);
            }
        }
        Op::Actors(batches) => {
            for batch in batches {
                actor_calls(s, batch, calls);
            }
        }
    }
}

fn actor_calls<'a>(s: &'a Statements, b: &'a ActorRows, calls: &mut Vec<Call<'a>>) {
    // First, so that the lease row is locked before any write: a refusal
    // aborts the transaction (the group then runs job by job, and this
    // batch fails alone).
    if let Some((node, epoch)) = &b.fence {
        calls.push(Call {
            statement: &s.fence,
            params: vec![&b.class, &b.id, node, epoch],
        });
    }
    for (key, value) in &b.writes {
        calls.push(match value {
            Some(v) => Call {
                statement: &s.actor_put,
                params: vec![&b.class, &b.id, key, v],
            },
            None => Call {
                statement: &s.actor_delete,
                params: vec![&b.class, &b.id, key],
            },
        });
    }
    let alarm = match b.alarm {
        None => return,
        Some(AlarmChange::Set(_)) => Call {
            statement: &s.alarm_set,
            params: vec![&b.class, &b.id, &b.at],
        },
        Some(AlarmChange::Delete) => Call {
            statement: &s.alarm_delete,
            params: vec![&b.class, &b.id],
        },
        Some(AlarmChange::Fired(_)) => Call {
            statement: &s.alarm_fired,
            params: vec![&b.class, &b.id, &b.at],
        },
    };
    calls.push(alarm);
}

/// A job's answer from the rows of its calls.
fn interpret(op: &Op, rows: &[Vec<Row>]) -> Result<Out, StoreError> {
    Ok(match op {
        Op::Increment(_, key, _, delta) => {
            let row = rows
                .first()
                .and_then(|r| r.first())
                .ok_or_else(|| StoreError::Engine("increment returned no row".into()))?;
            let (new, old): (Option<Vec<u8>>, Option<Vec<u8>>) = (row.get(0), row.get(1));
            match new {
                Some(new) => Out::Int(
                    std::str::from_utf8(&new)
                        .ok()
                        .and_then(|n| n.parse().ok())
                        .ok_or_else(|| StoreError::Engine("increment wrote a non-number".into()))?,
                ),
                // Not applied: say why, as the embedded engine would.
                None => {
                    add_to_counter(key, old.as_deref(), *delta)?;
                    return Err(StoreError::Engine(
                        "increment not applied: the key changed on another node; try again".into(),
                    ));
                }
            }
        }
        Op::SwapIf(..) => Out::Bool(rows.first().is_some_and(|r| r.len() == 1)),
        Op::Actors(batches) => Out::Many(batches.iter().map(|_| Ok(())).collect()),
        Op::Set(..) | Op::Delete(..) | Op::SetMany(..) | Op::DeleteMany(..) => Out::Unit,
    })
}

/// An alarm time as the `bigint` column holds it (times past `i64::MAX` ms,
/// some 292 million years, are clamped).
fn millis(at: u64) -> i64 {
    i64::try_from(at).unwrap_or(i64::MAX)
}

pub(crate) fn key_string(bytes: Vec<u8>) -> Result<String, StoreError> {
    String::from_utf8(bytes).map_err(|_| {
        StoreError::Engine("a stored key is not UTF-8 (written by another program?)".into())
    })
}

fn unexpected<T>(what: &str) -> Result<T, StoreError> {
    Err(StoreError::Engine(format!(
        "unexpected answer from the writer to {what}"
    )))
}

impl KvBackend for PgStore {
    fn get<'a>(&'a self, ns: &'a Namespace, key: &'a str) -> StoreFuture<'a, Option<Versioned>> {
        Box::pin(async move {
            let row = self
                .read_one(
                    "SELECT value, version FROM ignis_kv WHERE tenant = $1 AND store = $2 AND key = $3",
                    &[&ns.tenant(), &ns.store(), &key.as_bytes()],
                )
                .await?;
            Ok(row.map(|r| Versioned {
                value: r.get(0),
                version: r.get::<_, i64>(1) as u64,
            }))
        })
    }

    fn set<'a>(&'a self, ns: &'a Namespace, key: &'a str, value: Vec<u8>) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            match self
                .write(Op::Set(ns.into(), key.as_bytes().to_vec(), value))
                .await?
            {
                Out::Unit => Ok(()),
                _ => unexpected("set"),
            }
        })
    }

    fn delete<'a>(&'a self, ns: &'a Namespace, key: &'a str) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            match self
                .write(Op::Delete(ns.into(), key.as_bytes().to_vec()))
                .await?
            {
                Out::Unit => Ok(()),
                _ => unexpected("delete"),
            }
        })
    }

    fn exists<'a>(&'a self, ns: &'a Namespace, key: &'a str) -> StoreFuture<'a, bool> {
        Box::pin(async move {
            let row = self
                .read_one(
                    "SELECT 1 FROM ignis_kv WHERE tenant = $1 AND store = $2 AND key = $3",
                    &[&ns.tenant(), &ns.store(), &key.as_bytes()],
                )
                .await?;
            Ok(row.is_some())
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
            let rows = match from {
                ListFrom::After(after) => {
                    self.read(
                        "SELECT key FROM ignis_kv WHERE tenant = $1 AND store = $2 AND key > $3
                         ORDER BY key LIMIT $4",
                        &[&ns.tenant(), &ns.store(), &after.as_bytes(), &fetch],
                    )
                    .await?
                }
                ListFrom::Start | ListFrom::Skip(_) => {
                    let skip = match from {
                        ListFrom::Skip(n) => i64::try_from(n).unwrap_or(i64::MAX),
                        _ => 0,
                    };
                    self.read(
                        "SELECT key FROM ignis_kv WHERE tenant = $1 AND store = $2
                         ORDER BY key LIMIT $3 OFFSET $4",
                        &[&ns.tenant(), &ns.store(), &fetch, &skip],
                    )
                    .await?
                }
            };
            let keys = rows
                .into_iter()
                .map(|r| key_string(r.get(0)))
                .collect::<Result<Vec<_>, _>>()?;
            Ok(KeyPage::from_one_more(keys, limit))
        })
    }

    fn increment<'a>(
        &'a self,
        ns: &'a Namespace,
        key: &'a str,
        delta: i64,
    ) -> StoreFuture<'a, i64> {
        Box::pin(async move {
            match self
                .write(Op::Increment(
                    ns.into(),
                    key.into(),
                    key.as_bytes().to_vec(),
                    delta,
                ))
                .await?
            {
                Out::Int(n) => Ok(n),
                _ => unexpected("increment"),
            }
        })
    }

    fn swap_if<'a>(
        &'a self,
        ns: &'a Namespace,
        key: &'a str,
        expected: Option<u64>,
        value: Vec<u8>,
    ) -> StoreFuture<'a, bool> {
        Box::pin(async move {
            // A version past i64 was never written: nothing can match it.
            let expected = match expected.map(i64::try_from) {
                None => None,
                Some(Ok(v)) => Some(v),
                Some(Err(_)) => return Ok(false),
            };
            match self
                .write(Op::SwapIf(
                    ns.into(),
                    key.as_bytes().to_vec(),
                    expected,
                    value,
                ))
                .await?
            {
                Out::Bool(b) => Ok(b),
                _ => unexpected("swap_if"),
            }
        })
    }

    fn get_many<'a>(
        &'a self,
        ns: &'a Namespace,
        keys: &'a [String],
        max_bytes: usize,
    ) -> StoreFuture<'a, Vec<Option<Vec<u8>>>> {
        Box::pin(async move {
            // One statement: every value comes from the same snapshot.
            let wanted: Vec<&[u8]> = keys.iter().map(|k| k.as_bytes()).collect();
            let rows = self
                .read(
                    "SELECT key, value FROM ignis_kv WHERE tenant = $1 AND store = $2 AND key = ANY($3)",
                    &[&ns.tenant(), &ns.store(), &wanted],
                )
                .await?;
            let mut found: HashMap<Vec<u8>, Vec<u8>> = rows
                .into_iter()
                .map(|r| (r.get::<_, Vec<u8>>(0), r.get::<_, Vec<u8>>(1)))
                .collect();
            let mut budget = Budget::new(max_bytes, "get-many");
            let mut values = Vec::with_capacity(keys.len());
            for (i, k) in keys.iter().enumerate() {
                // A key named twice counts (and is returned) twice.
                let named_again = keys[i + 1..].contains(k);
                let v = if named_again {
                    found.get(k.as_bytes()).cloned()
                } else {
                    found.remove(k.as_bytes())
                };
                budget.spend(v.as_ref().map_or(0, Vec::len))?;
                values.push(v);
            }
            Ok(values)
        })
    }

    fn set_many<'a>(
        &'a self,
        ns: &'a Namespace,
        entries: Vec<(String, Vec<u8>)>,
    ) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            match self
                .write(Op::SetMany(
                    ns.into(),
                    entries
                        .into_iter()
                        .map(|(k, v)| (k.into_bytes(), v))
                        .collect(),
                ))
                .await?
            {
                Out::Unit => Ok(()),
                _ => unexpected("set_many"),
            }
        })
    }

    fn delete_many<'a>(&'a self, ns: &'a Namespace, keys: Vec<String>) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            match self
                .write(Op::DeleteMany(
                    ns.into(),
                    keys.into_iter().map(String::into_bytes).collect(),
                ))
                .await?
            {
                Out::Unit => Ok(()),
                _ => unexpected("delete_many"),
            }
        })
    }
}

impl ActorStorage for PgStore {
    fn actor_get<'a>(
        &'a self,
        actor: &'a ActorKey,
        key: &'a str,
    ) -> StoreFuture<'a, Option<Vec<u8>>> {
        Box::pin(async move {
            let row = self
                .read_one(
                    "SELECT value FROM ignis_actor_kv WHERE class = $1 AND id = $2 AND key = $3",
                    &[&actor.class(), &actor.id().as_bytes(), &key.as_bytes()],
                )
                .await?;
            Ok(row.map(|r| r.get(0)))
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
            let sql = if options.reverse {
                "SELECT key, value FROM ignis_actor_kv WHERE class = $1 AND id = $2
                 AND key >= $3 AND ($4::bytea IS NULL OR key < $4) ORDER BY key DESC LIMIT $5"
            } else {
                "SELECT key, value FROM ignis_actor_kv WHERE class = $1 AND id = $2
                 AND key >= $3 AND ($4::bytea IS NULL OR key < $4) ORDER BY key ASC LIMIT $5"
            };
            let limit = i64::from(options.limit.unwrap_or(u32::MAX));
            let c = self.reader().await?;
            let st = c.prepare_cached(sql).await?;
            let (class, id) = (actor.class(), actor.id().as_bytes());
            let hi = hi.as_ref().map(|h| h.as_bytes());
            let params: [&(dyn ToSql + Sync); 5] = [&class, &id, &lo.as_bytes(), &hi, &limit];
            let rows = c.query_raw(&st, params).await?;
            let mut rows = std::pin::pin!(rows);
            let mut budget = Budget::new(max_bytes, "list");
            let mut entries = Vec::new();
            // Rows arrive as they are read; past the budget the rest are
            // never held.
            while let Some(row) = rows.next().await {
                let row = row?;
                let (k, v): (Vec<u8>, Vec<u8>) = (row.get(0), row.get(1));
                budget.spend(k.len() + v.len())?;
                entries.push((key_string(k)?, v));
            }
            Ok(entries)
        })
    }

    fn actor_commit<'a>(&'a self, actor: &'a ActorKey, batch: ActorBatch) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            let mut results = self.actor_commit_many(vec![(actor.clone(), batch)]).await?;
            results.pop().unwrap_or_else(|| unexpected("actor_commit"))
        })
    }

    fn actor_commit_many(
        &self,
        batches: Vec<(ActorKey, ActorBatch)>,
    ) -> StoreFuture<'_, Vec<Result<(), StoreError>>> {
        Box::pin(async move {
            match self
                .write(Op::Actors(
                    batches
                        .into_iter()
                        .map(|(actor, batch)| ActorRows::new(&actor, batch))
                        .collect(),
                ))
                .await?
            {
                Out::Many(results) => Ok(results),
                _ => unexpected("actor_commit_many"),
            }
        })
    }

    fn actor_alarm<'a>(&'a self, actor: &'a ActorKey) -> StoreFuture<'a, Option<u64>> {
        Box::pin(async move {
            let row = self
                .read_one(
                    "SELECT at_ms FROM ignis_actor_alarms WHERE class = $1 AND id = $2",
                    &[&actor.class(), &actor.id().as_bytes()],
                )
                .await?;
            Ok(row.map(|r| r.get::<_, i64>(0) as u64))
        })
    }

    fn all_alarms(&self) -> StoreFuture<'_, Vec<(ActorKey, u64)>> {
        Box::pin(async move {
            let rows = self
                .read("SELECT class, id, at_ms FROM ignis_actor_alarms", &[])
                .await?;
            rows.into_iter()
                .map(|r| {
                    let id = key_string(r.get(1))?;
                    Ok((
                        ActorKey::new(r.get::<_, String>(0), id),
                        r.get::<_, i64>(2) as u64,
                    ))
                })
                .collect()
        })
    }
}
