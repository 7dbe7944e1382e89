//! The storage engines against their contracts. Every case runs twice, on
//! the embedded SQLite engine and on PostgreSQL (a private server started
//! by `ignis_store::testing`, a fresh database per test), so the engines
//! cannot drift apart; engine-specific behaviour (file modes, connection
//! strings, schema versions, several nodes on one database) follows.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use ignis_store::{
    ActorBatch, ActorKey, ActorStorage, AlarmChange, KvBackend, ListFrom, ListOptions, Namespace,
    PgOptions, PgStore, SqliteStore, StoreError, StoreStats,
};

/// What the cases need of an engine besides its contracts.
trait Engine: KvBackend + ActorStorage + Clone {
    fn engine_stats(&self) -> &Arc<StoreStats>;
    fn close_engine(&self);
}

impl Engine for SqliteStore {
    fn engine_stats(&self) -> &Arc<StoreStats> {
        self.stats()
    }
    fn close_engine(&self) {
        self.close()
    }
}

impl Engine for PgStore {
    fn engine_stats(&self) -> &Arc<StoreStats> {
        self.stats()
    }
    fn close_engine(&self) {
        self.close()
    }
}

type Reopen<S> = Box<dyn Fn() -> Pin<Box<dyn Future<Output = S> + Send>> + Send + Sync>;

/// An open engine and how to open its data again.
struct Harness<S> {
    store: S,
    reopen: Reopen<S>,
    _dir: Option<tempfile::TempDir>,
}

fn open_sqlite() -> (tempfile::TempDir, SqliteStore) {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(&dir.path().join("data/ignis.db")).unwrap();
    (dir, store)
}

fn sqlite_harness() -> Harness<SqliteStore> {
    let (dir, store) = open_sqlite();
    let path = store.path().to_path_buf();
    Harness {
        store,
        reopen: Box::new(move || {
            let path = path.clone();
            Box::pin(async move { SqliteStore::open(&path).unwrap() })
        }),
        _dir: Some(dir),
    }
}

/// A fresh database on the private server; `None` when PostgreSQL is not
/// installed and not required (see `ignis_store::testing`).
async fn postgres_harness() -> Option<Harness<PgStore>> {
    let url = ignis_store::testing::shared()?.database();
    let store = PgStore::open(&url, &PgOptions::default()).await.unwrap();
    Some(Harness {
        store,
        reopen: Box::new(move || {
            let url = url.clone();
            Box::pin(async move { PgStore::open(&url, &PgOptions::default()).await.unwrap() })
        }),
        _dir: None,
    })
}

/// Runs each named case on both engines.
macro_rules! on_both_engines {
    ($($case:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    super::$case(super::sqlite_harness()).await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    if let Some(h) = super::postgres_harness().await {
                        super::$case(h).await;
                    }
                }
            )*
        }
    };
}

on_both_engines!(
    set_get_delete_exists,
    namespaces_do_not_share_keys,
    values_survive_reopening,
    concurrent_increments_are_atomic_and_share_commits,
    compare_and_swap_under_contention_loses_nothing,
    a_failing_write_is_rolled_back_alone,
    batches_and_listing,
    writes_after_close_fail_cleanly,
    actor_storage_batches_listing_and_alarms,
    keys_are_compared_bytewise_and_may_hold_any_character,
    counters_agree_on_what_a_number_is,
);

async fn set_get_delete_exists<S: Engine>(h: Harness<S>) {
    let s = &h.store;
    let ns = Namespace::new("t", "default");
    assert_eq!(s.get(&ns, "a").await.unwrap(), None);
    assert!(!s.exists(&ns, "a").await.unwrap());
    s.set(&ns, "a", b"1".to_vec()).await.unwrap();
    let first = s.get(&ns, "a").await.unwrap().unwrap();
    assert_eq!(first.value, b"1");
    assert!(s.exists(&ns, "a").await.unwrap());
    s.set(&ns, "a", b"2".to_vec()).await.unwrap();
    let second = s.get(&ns, "a").await.unwrap().unwrap();
    assert_eq!(second.value, b"2");
    assert!(
        second.version > first.version,
        "every write gets a new version"
    );
    s.delete(&ns, "a").await.unwrap();
    assert_eq!(s.get(&ns, "a").await.unwrap(), None);
    // Deleting a missing key is not an error.
    s.delete(&ns, "a").await.unwrap();
}

async fn namespaces_do_not_share_keys<S: Engine>(h: Harness<S>) {
    let s = &h.store;
    let a = Namespace::new("acme", "default");
    let b = Namespace::new("globex", "default");
    let c = Namespace::new("acme", "sessions");
    s.set(&a, "k", b"acme".to_vec()).await.unwrap();
    assert_eq!(s.get(&b, "k").await.unwrap(), None);
    assert_eq!(s.get(&c, "k").await.unwrap(), None);
    s.set(&b, "k", b"globex".to_vec()).await.unwrap();
    assert_eq!(s.get(&a, "k").await.unwrap().unwrap().value, b"acme");
    let page = s.list_keys(&c, ListFrom::Start, 10).await.unwrap();
    assert!(page.keys.is_empty());
}

async fn values_survive_reopening<S: Engine>(h: Harness<S>) {
    let ns = Namespace::new("t", "s");
    {
        let s = &h.store;
        s.set(&ns, "kept", b"yes".to_vec()).await.unwrap();
        s.increment(&ns, "n", 7).await.unwrap();
        s.close_engine();
    }
    let s = (h.reopen)().await;
    assert_eq!(s.get(&ns, "kept").await.unwrap().unwrap().value, b"yes");
    assert_eq!(s.increment(&ns, "n", 1).await.unwrap(), 8);
    // Versions keep growing across a reopen (compare-and-swap stays sound).
    let before = s.get(&ns, "kept").await.unwrap().unwrap().version;
    s.set(&ns, "kept", b"again".to_vec()).await.unwrap();
    assert!(s.get(&ns, "kept").await.unwrap().unwrap().version > before);
}

async fn concurrent_increments_are_atomic_and_share_commits<S: Engine>(h: Harness<S>) {
    let s = Arc::new(h.store.clone());
    let ns = Namespace::new("t", "s");
    let tasks: Vec<_> = (0..1000)
        .map(|_| {
            let (s, ns) = (s.clone(), ns.clone());
            tokio::spawn(async move { s.increment(&ns, "counter", 1).await.unwrap() })
        })
        .collect();
    let mut seen = Vec::new();
    for t in tasks {
        seen.push(t.await.unwrap());
    }
    seen.sort_unstable();
    // Every increment saw a distinct value: none was lost or applied twice.
    assert_eq!(seen, (1..=1000).collect::<Vec<i64>>());
    assert_eq!(s.get(&ns, "counter").await.unwrap().unwrap().value, b"1000");
    let stats = s.engine_stats();
    let (writes, commits) = (
        stats.writes.load(Ordering::Relaxed),
        stats.commits.load(Ordering::Relaxed),
    );
    assert_eq!(writes, 1000);
    assert!(
        commits < writes,
        "1000 concurrent writes took {commits} commits: no group commit"
    );
}

async fn compare_and_swap_under_contention_loses_nothing<S: Engine>(h: Harness<S>) {
    let s = Arc::new(h.store.clone());
    let ns = Namespace::new("t", "s");
    let workers = 16;
    let per_worker = 25;
    let tasks: Vec<_> = (0..workers)
        .map(|_| {
            let (s, ns) = (s.clone(), ns.clone());
            tokio::spawn(async move {
                let mut retries = 0u32;
                for _ in 0..per_worker {
                    loop {
                        let cur = s.get(&ns, "n").await.unwrap();
                        let (n, version) = match &cur {
                            None => (0u64, None),
                            Some(v) => (
                                std::str::from_utf8(&v.value).unwrap().parse().unwrap(),
                                Some(v.version),
                            ),
                        };
                        let next = (n + 1).to_string().into_bytes();
                        if s.swap_if(&ns, "n", version, next).await.unwrap() {
                            break;
                        }
                        retries += 1;
                    }
                }
                retries
            })
        })
        .collect();
    let mut retries = 0;
    for t in tasks {
        retries += t.await.unwrap();
    }
    let total = s.get(&ns, "n").await.unwrap().unwrap().value;
    assert_eq!(total, (workers * per_worker).to_string().into_bytes());
    // The contention was real: some swaps had to be retried.
    assert!(retries > 0, "no swap ever failed: the test did not contend");
}

async fn a_failing_write_is_rolled_back_alone<S: Engine>(h: Harness<S>) {
    let s = &h.store;
    let ns = Namespace::new("t", "s");
    s.set(&ns, "text", b"not a number".to_vec()).await.unwrap();
    let (bad, good) = tokio::join!(s.increment(&ns, "text", 1), s.set(&ns, "b", b"ok".to_vec()));
    assert!(matches!(bad, Err(StoreError::NotANumber { .. })), "{bad:?}");
    good.unwrap();
    assert_eq!(
        s.get(&ns, "text").await.unwrap().unwrap().value,
        b"not a number"
    );
    assert_eq!(s.get(&ns, "b").await.unwrap().unwrap().value, b"ok");
}

async fn batches_and_listing<S: Engine>(h: Harness<S>) {
    let s = &h.store;
    let ns = Namespace::new("t", "s");
    let entries: Vec<(String, Vec<u8>)> = (0..25)
        .map(|i| (format!("k{i:02}"), vec![i as u8]))
        .collect();
    s.set_many(&ns, entries).await.unwrap();
    let keys = vec!["k03".to_string(), "nope".to_string(), "k24".to_string()];
    assert_eq!(
        s.get_many(&ns, &keys, 2).await.unwrap(),
        vec![Some(vec![3]), None, Some(vec![24])]
    );
    // A key named twice counts twice: the budget stops the read.
    let twice = vec!["k03".to_string(), "k03".to_string(), "k03".to_string()];
    assert!(matches!(
        s.get_many(&ns, &twice, 2).await,
        Err(StoreError::TooLarge(_))
    ));
    // Keyset pages.
    let mut all = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let from = after.as_deref().map_or(ListFrom::Start, ListFrom::After);
        let page = s.list_keys(&ns, from, 10).await.unwrap();
        all.extend(page.keys.iter().cloned());
        if !page.more {
            break;
        }
        after = page.keys.last().cloned();
    }
    assert_eq!(all.len(), 25);
    assert!(all.windows(2).all(|w| w[0] < w[1]));
    // Offset pages.
    let page = s.list_keys(&ns, ListFrom::Skip(20), 10).await.unwrap();
    assert_eq!(page.keys, vec!["k20", "k21", "k22", "k23", "k24"]);
    assert!(!page.more);
    s.delete_many(&ns, vec!["k00".into(), "k01".into()])
        .await
        .unwrap();
    assert_eq!(
        s.list_keys(&ns, ListFrom::Start, 100)
            .await
            .unwrap()
            .keys
            .len(),
        23
    );
}

async fn writes_after_close_fail_cleanly<S: Engine>(h: Harness<S>) {
    let s = &h.store;
    s.close_engine();
    let ns = Namespace::new("t", "s");
    assert_eq!(s.set(&ns, "a", vec![]).await, Err(StoreError::Closed));
}

async fn actor_storage_batches_listing_and_alarms<S: Engine>(h: Harness<S>) {
    let s = &h.store;
    let a = ActorKey::new("room", "a");
    let b = ActorKey::new("room", "b");
    let put = |k: &str| (k.to_string(), Some(k.as_bytes().to_vec()));
    let commits_before = s.engine_stats().commits.load(Ordering::Relaxed);
    let results = s
        .actor_commit_many(vec![
            (
                a.clone(),
                ActorBatch {
                    writes: vec![put("m:1"), put("m:2"), put("m:3"), put("n:1")],
                    alarm: Some(AlarmChange::Set(1_000)),
                    fence: None,
                },
            ),
            (
                b.clone(),
                ActorBatch {
                    writes: vec![put("m:9")],
                    alarm: None,
                    fence: None,
                },
            ),
        ])
        .await
        .unwrap();
    assert_eq!(results, vec![Ok(()), Ok(())]);
    assert_eq!(
        s.engine_stats().commits.load(Ordering::Relaxed),
        commits_before + 1,
        "two actors' batches share one commit"
    );
    // Per-actor key spaces.
    assert_eq!(s.actor_get(&b, "m:1").await.unwrap(), None);
    let keys = |v: Vec<(String, Vec<u8>)>| v.into_iter().map(|(k, _)| k).collect::<Vec<_>>();
    let opts = ListOptions {
        prefix: Some("m:".into()),
        reverse: true,
        limit: Some(2),
        ..Default::default()
    };
    assert_eq!(
        keys(s.actor_list(&a, &opts, 1 << 20).await.unwrap()),
        ["m:3", "m:2"]
    );
    let opts = ListOptions {
        start: Some("m:2".into()),
        end: Some("n:1".into()),
        ..Default::default()
    };
    assert_eq!(
        keys(s.actor_list(&a, &opts, 1 << 20).await.unwrap()),
        ["m:2", "m:3"]
    );
    // Past the byte budget the list fails instead of growing.
    assert!(matches!(
        s.actor_list(&a, &opts, 4).await,
        Err(StoreError::TooLarge(_))
    ));
    // Alarms: set, fired only if unchanged, deleted.
    assert_eq!(s.actor_alarm(&a).await.unwrap(), Some(1_000));
    let fired = |at| ActorBatch {
        writes: vec![],
        alarm: Some(AlarmChange::Fired(at)),
        fence: None,
    };
    s.actor_commit(&a, fired(999)).await.unwrap();
    assert_eq!(
        s.actor_alarm(&a).await.unwrap(),
        Some(1_000),
        "a stale firing keeps the new time"
    );
    assert_eq!(s.all_alarms().await.unwrap(), vec![(a.clone(), 1_000)]);
    s.actor_commit(&a, fired(1_000)).await.unwrap();
    assert_eq!(s.actor_alarm(&a).await.unwrap(), None);
    // Deletes inside a batch.
    s.actor_commit(
        &a,
        ActorBatch {
            writes: vec![("m:1".into(), None)],
            alarm: None,
            fence: None,
        },
    )
    .await
    .unwrap();
    assert_eq!(s.actor_get(&a, "m:1").await.unwrap(), None);
}

async fn counters_agree_on_what_a_number_is<S: Engine>(h: Harness<S>) {
    let s = &h.store;
    let ns = Namespace::new("t", "s");
    assert_eq!(s.increment(&ns, "absent", -3).await.unwrap(), -3);
    for (stored, delta, expected) in [(" 7 ", 1, 8), ("+5", 1, 6), ("-2", -2, -4), ("0009", 1, 10)]
    {
        s.set(&ns, "n", stored.as_bytes().to_vec()).await.unwrap();
        assert_eq!(
            s.increment(&ns, "n", delta).await,
            Ok(expected),
            "{stored:?}"
        );
        assert_eq!(
            s.get(&ns, "n").await.unwrap().unwrap().value,
            expected.to_string().as_bytes()
        );
    }
    let max = i64::MAX.to_string();
    let min = i64::MIN.to_string();
    for (stored, delta, overflow) in [
        (max.as_str(), 1, true),
        (min.as_str(), -1, true),
        (max.as_str(), -1, false),
        ("12abc", 1, false),
        ("", 1, false),
        ("1.5", 1, false),
        ("\u{ff}", 1, false),
    ] {
        s.set(&ns, "n", stored.as_bytes().to_vec()).await.unwrap();
        let result = s.increment(&ns, "n", delta).await;
        match (stored, overflow) {
            (_, true) => assert!(
                matches!(result, Err(StoreError::Overflow { .. })),
                "{stored:?}: {result:?}"
            ),
            (s, false) if s == max => assert_eq!(result, Ok(i64::MAX - 1)),
            _ => assert!(
                matches!(result, Err(StoreError::NotANumber { .. })),
                "{stored:?}: {result:?}"
            ),
        }
        if overflow || stored != max {
            assert_eq!(
                s.get(&ns, "n").await.unwrap().unwrap().value,
                stored.as_bytes(),
                "a refused increment leaves the value as it was"
            );
        }
    }
}

async fn keys_are_compared_bytewise_and_may_hold_any_character<S: Engine>(h: Harness<S>) {
    let s = &h.store;
    let ns = Namespace::new("t", "s");
    // Bytewise (UTF-8) order, whatever a database's collation would say:
    // upper case before lower case, "a" before "a\0b", non-ASCII last.
    let keys = ["b", "a\0b", "Z", "é", "a", "ab"];
    for k in keys {
        s.set(&ns, k, k.as_bytes().to_vec()).await.unwrap();
    }
    let listed = s.list_keys(&ns, ListFrom::Start, 100).await.unwrap().keys;
    let mut expected: Vec<String> = keys.iter().map(|k| k.to_string()).collect();
    expected.sort_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
    assert_eq!(listed, expected);
    assert_eq!(listed[0], "Z");
    assert_eq!(
        s.get(&ns, "a\0b").await.unwrap().unwrap().value,
        b"a\0b",
        "a NUL inside a key is kept"
    );
    let page = s.list_keys(&ns, ListFrom::After("a"), 2).await.unwrap();
    assert_eq!(page.keys, ["a\0b", "ab"]);
    assert!(page.more);
    // Actor keys and ids likewise.
    let actor = ActorKey::new("room", "id\0with nul");
    let writes = ["b", "B", "é", "a\0"]
        .iter()
        .map(|k| (k.to_string(), Some(vec![1])))
        .collect();
    s.actor_commit(
        &actor,
        ActorBatch {
            writes,
            alarm: Some(AlarmChange::Set(5)),
            fence: None,
        },
    )
    .await
    .unwrap();
    let listed: Vec<String> = s
        .actor_list(&actor, &ListOptions::default(), 1 << 20)
        .await
        .unwrap()
        .into_iter()
        .map(|(k, _)| k)
        .collect();
    assert_eq!(listed, ["B", "a\0", "b", "é"]);
    assert_eq!(s.all_alarms().await.unwrap(), vec![(actor, 5)]);
}

/// Tenants' data is readable by the Ignis user only: the database, its
/// WAL and shared-memory files 0600, a directory created for it 0700.
/// Fails on the code before (files followed the umask: 0644 and 0755).
#[tokio::test]
async fn sqlite_store_files_are_private_to_the_owner() {
    use std::os::unix::fs::PermissionsExt;
    let (dir, s) = open_sqlite();
    s.set(&Namespace::new("t", "default"), "k", b"v".to_vec())
        .await
        .unwrap();
    let mode = |name: &str| {
        std::fs::metadata(dir.path().join(name))
            .unwrap()
            .permissions()
            .mode()
            & 0o777
    };
    assert_eq!(mode("data"), 0o700);
    for file in ["data/ignis.db", "data/ignis.db-wal", "data/ignis.db-shm"] {
        assert_eq!(mode(file), 0o600, "{file}");
    }
}

/// A fresh database on the private server and its connection string.
fn postgres_database() -> Option<(&'static ignis_store::testing::TestPostgres, String)> {
    let server = ignis_store::testing::shared()?;
    let url = server.database();
    Some((server, url))
}

fn database_name(url: &str) -> &str {
    url.rsplit("dbname=").next().unwrap()
}

#[tokio::test]
async fn postgres_unreachable_names_the_database_but_never_the_password() {
    // Port 1 on loopback: nothing listens there, the connection is refused.
    let url = "postgres://ignis:s3cret-pw@127.0.0.1:1/orders";
    let e = PgStore::open(url, &PgOptions::default()).await.unwrap_err();
    let text = e.to_string();
    assert!(matches!(e, StoreError::Unavailable(_)), "{e:?}");
    assert!(
        text.contains("postgres://ignis@127.0.0.1:1/orders"),
        "the error names the database: {text}"
    );
    assert!(!text.contains("s3cret"), "the password leaked: {text}");
    // Not a connection string at all.
    let e = PgStore::open("postgres://ignis:pw@host:notaport/x", &PgOptions::default())
        .await
        .unwrap_err();
    assert!(!e.to_string().contains(":pw@"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_migrations_run_once_when_nodes_start_together() {
    let Some((server, url)) = postgres_database() else {
        return;
    };
    let options = PgOptions::default();
    let (a, b) = tokio::join!(PgStore::open(&url, &options), PgStore::open(&url, &options));
    a.unwrap();
    b.unwrap();
    let applied = server.sql(
        database_name(&url),
        "SELECT version FROM ignis_schema ORDER BY version",
    );
    let expected: Vec<String> = (1..=ignis_store::postgres::SCHEMA_VERSION)
        .map(|v| v.to_string())
        .collect();
    assert_eq!(applied.lines().collect::<Vec<_>>(), expected);
}

#[tokio::test]
async fn postgres_a_newer_schema_is_refused_naming_both_versions() {
    let Some((server, url)) = postgres_database() else {
        return;
    };
    PgStore::open(&url, &PgOptions::default()).await.unwrap();
    server.sql(
        database_name(&url),
        "INSERT INTO ignis_schema (version, description) VALUES (99, 'from the future')",
    );
    let e = PgStore::open(&url, &PgOptions::default())
        .await
        .unwrap_err();
    let text = e.to_string();
    assert!(
        text.contains("version 99")
            && text.contains(&format!("up to {}", ignis_store::postgres::SCHEMA_VERSION)),
        "{text}"
    );
}

/// Two nodes on one database: increments and compare-and-swap stay atomic
/// across them (row locks and the shared version sequence), not only
/// inside one node's writer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_two_nodes_on_one_database_lose_no_update() {
    let Some((_, url)) = postgres_database() else {
        return;
    };
    let a = PgStore::open(&url, &PgOptions::default()).await.unwrap();
    let b = PgStore::open(&url, &PgOptions::default()).await.unwrap();
    let ns = Namespace::new("t", "s");
    let tasks: Vec<_> = (0..400)
        .map(|i| {
            let s = if i % 2 == 0 { a.clone() } else { b.clone() };
            let ns = ns.clone();
            tokio::spawn(async move { s.increment(&ns, "hits", 1).await.unwrap() })
        })
        .collect();
    let mut seen = Vec::new();
    for t in tasks {
        seen.push(t.await.unwrap());
    }
    seen.sort_unstable();
    assert_eq!(seen, (1..=400).collect::<Vec<i64>>());
    // Compare-and-swap: a version read on one node and swapped on the
    // other; the loser of a race sees `false`, never a lost update.
    let tasks: Vec<_> = (0..8)
        .map(|w| {
            let s = if w % 2 == 0 { a.clone() } else { b.clone() };
            let ns = ns.clone();
            tokio::spawn(async move {
                for _ in 0..20 {
                    loop {
                        let cur = s.get(&ns, "cas").await.unwrap();
                        let n: u64 = cur.as_ref().map_or(0, |v| {
                            std::str::from_utf8(&v.value).unwrap().parse().unwrap()
                        });
                        let next = (n + 1).to_string().into_bytes();
                        if s.swap_if(&ns, "cas", cur.map(|v| v.version), next)
                            .await
                            .unwrap()
                        {
                            break;
                        }
                    }
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(a.get(&ns, "cas").await.unwrap().unwrap().value, b"160");
}

/// A job the database refuses (a key past PostgreSQL's index entry limit)
/// fails alone: the group is rolled back and its other jobs are committed
/// one by one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_a_job_the_database_refuses_fails_alone() {
    let Some(h) = postgres_harness().await else {
        return;
    };
    let s = &h.store;
    let ns = Namespace::new("t", "s");
    // 10,000 characters that do not compress: past the 2,704-byte btree limit.
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let huge: String = (0..10_000)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            char::from(b'!' + (x % 90) as u8)
        })
        .collect();
    let (bad, good, counted) = tokio::join!(
        s.set(&ns, &huge, b"v".to_vec()),
        s.set(&ns, "fine", b"ok".to_vec()),
        s.increment(&ns, "n", 2)
    );
    assert!(matches!(bad, Err(StoreError::Engine(_))), "{bad:?}");
    good.unwrap();
    assert_eq!(counted.unwrap(), 2);
    assert_eq!(s.get(&ns, "fine").await.unwrap().unwrap().value, b"ok");
    assert_eq!(s.get(&ns, &huge).await.unwrap(), None);
    assert_eq!(s.increment(&ns, "n", 1).await.unwrap(), 3, "applied once");
}

/// Connections the database drops (a restart, a failover, an operator's
/// `pg_terminate_backend`) are replaced by the pool: operations fail with
/// `Unavailable` at most until the dead connections are gone, then succeed,
/// without reopening the store.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_recovers_by_itself_after_its_connections_are_killed() {
    let Some((server, url)) = postgres_database() else {
        return;
    };
    let s = PgStore::open(&url, &PgOptions::default()).await.unwrap();
    let ns = Namespace::new("t", "s");
    s.set(&ns, "before", b"1".to_vec()).await.unwrap();
    let killed = server.sql(
        database_name(&url),
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
         WHERE datname = current_database() AND pid <> pg_backend_pid()",
    );
    assert_ne!(killed, "0", "the store's connections were found and killed");
    let mut failures = 0;
    let written = loop {
        match s.set(&ns, "after", b"2".to_vec()).await {
            Ok(()) => break true,
            Err(StoreError::Unavailable(_)) if failures < 32 => failures += 1,
            Err(e) => panic!("after {failures} failures: {e:?}"),
        }
    };
    assert!(written);
    assert_eq!(
        read_once_back(&s, &ns, "before", &mut failures, 64).await,
        b"1"
    );
    assert_eq!(s.get(&ns, "after").await.unwrap().unwrap().value, b"2");
}

/// `key`'s value, read again until the store answers: `Unavailable` is
/// allowed while the pool replaces dead connections, until `failures`
/// reaches `max`.
async fn read_once_back(
    s: &PgStore,
    ns: &Namespace,
    key: &str,
    failures: &mut u32,
    max: u32,
) -> Vec<u8> {
    loop {
        match s.get(ns, key).await {
            Ok(v) => return v.expect("the key is there").value,
            Err(StoreError::Unavailable(_)) if *failures < max => *failures += 1,
            Err(e) => panic!("after {failures} failures: {e:?}"),
        }
    }
}

/// A statement in flight when the server ends its session (here: its
/// backend terminated by an administrator while it waits on a lock) gets
/// the FATAL error as its answer. That is the database going away
/// (`Unavailable`: a retryable 503 upstream), not a statement the database
/// refused (`Engine`). Fails on the code before the fix, which called every
/// error the server sent an engine error: an actor's read cut this way
/// reached its guest as a plain storage failure and the message ended as a
/// trap (500), seen in
/// `cluster::losing_the_database_fails_actors_with_503_and_recovers_by_itself`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_a_statement_whose_session_is_ended_is_unavailable() {
    let Some((_server, url)) = postgres_database() else {
        return;
    };
    let s = PgStore::open(&url, &PgOptions::default()).await.unwrap();
    let ns = Namespace::new("t", "s");
    s.set(&ns, "k", b"1".to_vec()).await.unwrap();
    // Another session holds the table, so the store's read waits on it.
    let (blocker, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    blocker
        .batch_execute("BEGIN; LOCK TABLE ignis_kv IN ACCESS EXCLUSIVE MODE")
        .await
        .unwrap();
    let read = tokio::spawn({
        let (s, ns) = (s.clone(), ns.clone());
        async move { s.get(&ns, "k").await }
    });
    // The store's backend, once its read waits on the lock.
    let waiting = "FROM pg_stat_activity \
         WHERE datname = current_database() AND wait_event_type = 'Lock'";
    let count = |select: &str| {
        let (blocker, sql) = (&blocker, format!("SELECT {select} {waiting}"));
        async move { blocker.query_one(&sql, &[]).await.unwrap().get::<_, i64>(0) }
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while count("count(*)").await == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the store's read never waited on the lock"
        );
        tokio::task::yield_now().await;
    }
    let ended = count("count(pg_terminate_backend(pid))").await;
    assert_eq!(ended, 1);
    let e = read.await.unwrap().unwrap_err();
    assert!(matches!(e, StoreError::Unavailable(_)), "{e:?}");
    // The lock goes; the pool replaces the ended connection by itself.
    blocker.batch_execute("ROLLBACK").await.unwrap();
    assert_eq!(read_once_back(&s, &ns, "k", &mut 0, 32).await, b"1");
}

/// One node per database serves actors: a second store asking for the node
/// lock is refused, naming the session that holds it. When the holder's
/// session is lost, it writes nothing more (another node may have taken
/// over), and the lock is free for the next node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_the_node_lock_admits_one_node_and_fences_a_lost_one() {
    let Some((server, url)) = postgres_database() else {
        return;
    };
    let locked = PgOptions {
        node_lock: true,
        lock_wait: std::time::Duration::from_millis(300),
        ..PgOptions::default()
    };
    let first = PgStore::open(&url, &locked).await.unwrap();
    let actor = ActorKey::new("room", "a");
    let put = |v: &[u8]| ActorBatch {
        writes: vec![("k".into(), Some(v.to_vec()))],
        alarm: None,
        fence: None,
    };
    first.actor_commit(&actor, put(b"1")).await.unwrap();
    let refused = PgStore::open(&url, &locked).await.unwrap_err().to_string();
    assert!(
        refused.contains("another Ignis node serves actors") && refused.contains("session"),
        "{refused}"
    );
    // Without the lock (key-value only) a second node is welcome.
    PgStore::open(&url, &PgOptions::default()).await.unwrap();
    // The holder's session is killed: the lock goes with it.
    let killed = server.sql(
        database_name(&url),
        "SELECT count(pg_terminate_backend(l.pid)) FROM pg_locks l \
         WHERE l.locktype = 'advisory' AND l.granted AND l.database = \
         (SELECT oid FROM pg_database WHERE datname = current_database())",
    );
    assert_eq!(killed, "1");
    let second = PgStore::open(&url, &locked).await.unwrap();
    // The first write may be the one that finds the session gone (an I/O
    // error); from then on every write says why it is refused.
    let e = first.actor_commit(&actor, put(b"stale")).await.unwrap_err();
    assert!(matches!(e, StoreError::Unavailable(_)), "{e:?}");
    let e = first
        .set(&Namespace::new("t", "s"), "k", b"v".to_vec())
        .await
        .unwrap_err();
    assert!(
        matches!(&e, StoreError::Unavailable(m) if m.contains("lost its database session")),
        "{e:?}"
    );
    second.actor_commit(&actor, put(b"2")).await.unwrap();
    assert_eq!(
        second.actor_get(&actor, "k").await.unwrap(),
        Some(b"2".to_vec())
    );
}

/// Cluster leases and fencing on the database alone: the first live node to
/// ask owns an actor (epoch 1); another node is told who owns it while the
/// owner is a live member; once the owner's membership expires the next
/// node takes the actor over (epoch 2), and from then on the old owner's
/// commits are refused (`Fenced`) while the new owner's land. A batch
/// refused in a group fails alone: the other actor's batch beside it
/// commits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_leases_move_only_from_dead_nodes_and_fence_the_old_owner() {
    use ignis_store::{Fence, Owner};
    use std::time::Duration;
    let Some((_server, url)) = postgres_database() else {
        return;
    };
    let store = PgStore::open(&url, &PgOptions::default()).await.unwrap();
    let actor = ActorKey::new("room", "a\u{0}b");
    let long = Duration::from_secs(60);
    store
        .heartbeat("node-a", "127.0.0.1:1", long)
        .await
        .unwrap();
    store
        .heartbeat("node-b", "127.0.0.1:2", long)
        .await
        .unwrap();
    // A node that never joined owns nothing.
    let e = store.acquire(&actor, "node-x").await.unwrap_err();
    assert!(matches!(e, StoreError::Unavailable(_)), "{e:?}");
    assert_eq!(
        store.acquire(&actor, "node-a").await.unwrap(),
        Owner::Me { epoch: 1 }
    );
    assert_eq!(
        store.acquire(&actor, "node-a").await.unwrap(),
        Owner::Me { epoch: 1 },
        "asking again keeps the epoch"
    );
    assert_eq!(
        store.acquire(&actor, "node-b").await.unwrap(),
        Owner::Node {
            node: "node-a".into(),
            address: "127.0.0.1:1".into()
        }
    );
    let batch = |v: &str, node: &str, epoch: u64| ActorBatch {
        writes: vec![("k".into(), Some(v.as_bytes().to_vec()))],
        alarm: Some(AlarmChange::Set(42)),
        fence: Some(Fence {
            node: node.into(),
            epoch,
        }),
    };
    store
        .actor_commit(&actor, batch("a1", "node-a", 1))
        .await
        .unwrap();
    // node-a's membership expires (a heartbeat with a lease already over).
    store
        .heartbeat("node-a", "127.0.0.1:1", Duration::ZERO)
        .await
        .unwrap();
    assert_eq!(
        store.acquire(&actor, "node-b").await.unwrap(),
        Owner::Me { epoch: 2 }
    );
    // The stale owner's commit, grouped with another actor's good one.
    let other = ActorKey::new("room", "other");
    let results = store
        .actor_commit_many(vec![
            (actor.clone(), batch("stale", "node-a", 1)),
            (
                other.clone(),
                ActorBatch {
                    writes: vec![("k".into(), Some(b"fine".to_vec()))],
                    alarm: None,
                    fence: None,
                },
            ),
        ])
        .await
        .unwrap();
    assert!(
        matches!(&results[0], Err(StoreError::Fenced(m)) if m.contains("node-a")),
        "{results:?}"
    );
    assert!(results[1].is_ok(), "{results:?}");
    assert_eq!(
        store.actor_get(&other, "k").await.unwrap(),
        Some(b"fine".to_vec())
    );
    assert_eq!(
        store.actor_get(&actor, "k").await.unwrap(),
        Some(b"a1".to_vec())
    );
    store
        .actor_commit(&actor, batch("b2", "node-b", 2))
        .await
        .unwrap();
    assert_eq!(
        store.actor_get(&actor, "k").await.unwrap(),
        Some(b"b2".to_vec())
    );
    // The same epoch under another node's name is refused too.
    let e = store
        .actor_commit(&actor, batch("forged", "node-a", 2))
        .await
        .unwrap_err();
    assert!(matches!(e, StoreError::Fenced(_)), "{e:?}");
    assert_eq!(
        store.owner_history(&actor).await.unwrap(),
        [(1, "node-a".to_string()), (2, "node-b".to_string())]
    );
    // The alarm set under epoch 1 is the new owner's to fire.
    let due = store.due_alarms("node-b", u64::MAX, 10).await.unwrap();
    assert_eq!(due, [(actor.clone(), 42)]);
    store
        .heartbeat("node-c", "127.0.0.1:3", long)
        .await
        .unwrap();
    assert!(
        store
            .due_alarms("node-c", u64::MAX, 10)
            .await
            .unwrap()
            .is_empty(),
        "a live owner's alarm is not offered to another node"
    );
    store.leave("node-b").await.unwrap();
    assert_eq!(
        store.due_alarms("node-c", u64::MAX, 10).await.unwrap(),
        [(actor.clone(), 42)],
        "once its owner left, the alarm is offered to the others"
    );
    let members = store.members().await.unwrap();
    let alive: Vec<_> = members.iter().map(|m| (m.node.as_str(), m.alive)).collect();
    assert_eq!(alive, [("node-a", false), ("node-c", true)]);
    // Deploy records: the next number is taken once; the second node to
    // record it is told so and writes nothing.
    use ignis_store::cluster::DeployRow;
    let row = |seq: i64, node: &str| DeployRow {
        seq,
        base: "b".into(),
        document: format!("# by {node}"),
        components: "{}".into(),
        node: node.into(),
        by: "test".into(),
    };
    let blob = vec![("ab".repeat(32), b"wasm".to_vec())];
    assert!(
        store
            .publish_deploy(&row(1, "node-c"), &blob)
            .await
            .unwrap()
    );
    assert!(!store.publish_deploy(&row(1, "node-b"), &[]).await.unwrap());
    assert_eq!(store.latest_deploy().await.unwrap(), Some(row(1, "node-c")));
    assert_eq!(
        store.component(&"ab".repeat(32)).await.unwrap(),
        Some(b"wasm".to_vec())
    );
    // What each node took is reported for `ignis cluster apply`.
    store.report_applied("node-c", 1, None).await.unwrap();
    store
        .report_applied("node-a", 1, Some("refused"))
        .await
        .unwrap();
    let applied: Vec<_> = store
        .members()
        .await
        .unwrap()
        .into_iter()
        .map(|m| (m.node, m.applied_seq, m.applied_error))
        .collect();
    assert_eq!(
        applied,
        [
            ("node-a".to_string(), 1, Some("refused".to_string())),
            ("node-c".to_string(), 1, None)
        ]
    );
    // The token is made once: a second node reads the first one's.
    let token = store.cluster_value("forward_token", "first").await.unwrap();
    assert_eq!(token, "first");
    assert_eq!(
        store
            .cluster_value("forward_token", "second")
            .await
            .unwrap(),
        "first"
    );
}
