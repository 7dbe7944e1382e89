//! The SQLite engine against the `KvBackend` contract.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use ignis_store::{KvBackend, ListFrom, Namespace, SqliteStore, StoreError};

fn open() -> (tempfile::TempDir, SqliteStore) {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(&dir.path().join("data/ignis.db")).unwrap();
    (dir, store)
}

#[tokio::test]
async fn set_get_delete_exists() {
    let (_dir, s) = open();
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

#[tokio::test]
async fn namespaces_do_not_share_keys() {
    let (_dir, s) = open();
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

#[tokio::test]
async fn values_survive_reopening() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ignis.db");
    let ns = Namespace::new("t", "s");
    {
        let s = SqliteStore::open(&path).unwrap();
        s.set(&ns, "kept", b"yes".to_vec()).await.unwrap();
        s.increment(&ns, "n", 7).await.unwrap();
        s.close();
    }
    let s = SqliteStore::open(&path).unwrap();
    assert_eq!(s.get(&ns, "kept").await.unwrap().unwrap().value, b"yes");
    assert_eq!(s.increment(&ns, "n", 1).await.unwrap(), 8);
    // Versions keep growing across a reopen (compare-and-swap stays sound).
    let before = s.get(&ns, "kept").await.unwrap().unwrap().version;
    s.set(&ns, "kept", b"again".to_vec()).await.unwrap();
    assert!(s.get(&ns, "kept").await.unwrap().unwrap().version > before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_increments_are_atomic_and_share_commits() {
    let (_dir, s) = open();
    let s = Arc::new(s);
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
    let stats = s.stats();
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compare_and_swap_under_contention_loses_nothing() {
    let (_dir, s) = open();
    let s = Arc::new(s);
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

#[tokio::test]
async fn a_failing_write_is_rolled_back_alone() {
    let (_dir, s) = open();
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

#[tokio::test]
async fn batches_and_listing() {
    let (_dir, s) = open();
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

#[tokio::test]
async fn writes_after_close_fail_cleanly() {
    let (_dir, s) = open();
    s.close();
    let ns = Namespace::new("t", "s");
    assert_eq!(s.set(&ns, "a", vec![]).await, Err(StoreError::Closed));
}

#[tokio::test]
async fn actor_storage_batches_listing_and_alarms() {
    use ignis_store::{ActorBatch, ActorKey, ActorStorage, AlarmChange, ListOptions};
    let (_dir, s) = open();
    let a = ActorKey::new("room", "a");
    let b = ActorKey::new("room", "b");
    let put = |k: &str| (k.to_string(), Some(k.as_bytes().to_vec()));
    let commits_before = s.stats().commits.load(Ordering::Relaxed);
    let results = s
        .actor_commit_many(vec![
            (
                a.clone(),
                ActorBatch {
                    writes: vec![put("m:1"), put("m:2"), put("m:3"), put("n:1")],
                    alarm: Some(AlarmChange::Set(1_000)),
                },
            ),
            (
                b.clone(),
                ActorBatch {
                    writes: vec![put("m:9")],
                    alarm: None,
                },
            ),
        ])
        .await
        .unwrap();
    assert_eq!(results, vec![Ok(()), Ok(())]);
    assert_eq!(
        s.stats().commits.load(Ordering::Relaxed),
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
        },
    )
    .await
    .unwrap();
    assert_eq!(s.actor_get(&a, "m:1").await.unwrap(), None);
}

/// Tenants' data is readable by the Ignis user only: the database, its
/// WAL and shared-memory files 0600, a directory created for it 0700.
/// Fails on the code before (files followed the umask: 0644 and 0755).
#[tokio::test]
async fn store_files_are_private_to_the_owner() {
    use std::os::unix::fs::PermissionsExt;
    let (dir, s) = open();
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
