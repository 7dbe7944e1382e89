//! The output gate, one per directory: takes every batch that queued while
//! the previous commit ran, merges each actor's batches (in order) into
//! one, commits them all in one storage call (each actor's part atomic on
//! its own, one fsync), then releases the replies.
//!
//! A batch computed on top of a failed commit fails too: every batch of an
//! epoch up to the actor's `failed_epoch` is answered with an error without
//! being committed ([`partition`]).

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};

use ignis_runtime::{Error, ErrorKind};
use ignis_store::{ActorBatch, ActorKey, AlarmChange, StoreError};
use tokio::sync::mpsc;

use super::{ActorDirectory, ActorState, AlarmCommand, Pending, complete, lock};

/// Queued batches split into those that must fail (their epoch failed
/// already) and the rest, grouped per actor (actors in the order their
/// first committable batch arrived, batches in arrival order).
pub(super) type Partitioned = (Vec<Pending>, Vec<(Arc<ActorState>, Vec<Pending>)>);

pub(super) fn partition(queued: impl IntoIterator<Item = Pending>) -> Partitioned {
    let mut failed = Vec::new();
    let mut actors: Vec<(Arc<ActorState>, Vec<Pending>)> = Vec::new();
    let mut index: HashMap<ActorKey, usize> = HashMap::new();
    for p in queued {
        if p.epoch <= p.actor.failed_epoch.load(Ordering::SeqCst) {
            failed.push(p);
            continue;
        }
        let i = *index.entry(p.actor.key.clone()).or_insert_with(|| {
            actors.push((p.actor.clone(), Vec::new()));
            actors.len() - 1
        });
        actors[i].1.push(p);
    }
    (failed, actors)
}

/// One actor's batches as one: every write in order (the store applies
/// them in order, so the last write of a key wins), and the alarm changes
/// folded in order ([`then`]).
pub(super) fn merge(pending: &[Pending]) -> ActorBatch {
    let mut merged = ActorBatch::default();
    for p in pending {
        merged.writes.extend(p.batch.writes.iter().cloned());
        if let Some(next) = p.batch.alarm {
            merged.alarm = Some(then(merged.alarm, next));
        }
    }
    merged
}

/// The alarm change `earlier` followed by `later`, as one. A firing only
/// removes the alarm it fired: if an earlier message of the group set the
/// alarm to another time, that time stands (taking the firing as the last
/// word lost it for good).
fn then(earlier: Option<AlarmChange>, later: AlarmChange) -> AlarmChange {
    match (earlier, later) {
        (Some(AlarmChange::Set(at)), AlarmChange::Fired(fired)) if at != fired => {
            AlarmChange::Set(at)
        }
        (_, later) => later,
    }
}

/// What the callers of a failed commit get: a retryable 503 when the lease
/// moved or the database is unreachable (nothing was applied, except
/// when the message says the outcome is unknown), else a storage error.
fn commit_error(e: &StoreError) -> Error {
    match e {
        StoreError::Fenced(_) => {
            super::lease_gone("the actor moved to another node; retry").with_source(e.clone())
        }
        StoreError::Unavailable(_) => {
            Error::unavailable("storage unavailable").with_source(e.clone())
        }
        e => Error::storage(e.clone()).context("commit failed"),
    }
}

pub(super) async fn run_committer(
    dir: Weak<ActorDirectory>,
    mut rx: mpsc::UnboundedReceiver<Pending>,
) {
    let mut queued = Vec::new();
    while let Some(first) = rx.recv().await {
        let Some(dir) = dir.upgrade() else { return };
        queued.push(first);
        while let Ok(p) = rx.try_recv() {
            queued.push(p);
        }
        let (failed, actors) = partition(queued.drain(..));
        for p in failed {
            let key = p.actor.key.clone();
            let e = Error::new(ErrorKind::Storage)
                .context("an earlier write of this actor failed to commit");
            complete(&dir, &key, p.request_id, Err(e), p.waiter);
        }
        if actors.is_empty() {
            continue;
        }
        let batches: Vec<(ActorKey, ActorBatch)> = actors
            .iter()
            .map(|(actor, pending)| {
                let mut batch = merge(pending);
                batch.fence = actor.lease.as_ref().map(|l| l.fence.clone());
                (actor.key.clone(), batch)
            })
            .collect();
        let alarms: Vec<Option<AlarmChange>> = batches.iter().map(|(_, b)| b.alarm).collect();
        let results = match dir.storage.actor_commit_many(batches).await {
            Ok(results) => results,
            Err(e) => vec![Err(e); actors.len()],
        };
        dir.stats.bump(&dir.stats.commits);
        for (((actor, pending), result), alarm) in actors.into_iter().zip(results).zip(alarms) {
            let key = actor.key.clone();
            match result {
                Ok(()) => {
                    let last_seq = pending.last().map_or(0, |p| p.seq);
                    lock(&actor.overlay).durable_through(last_seq);
                    match alarm {
                        Some(AlarmChange::Set(at)) => {
                            let _ = dir.alarms.send(AlarmCommand::Set(key.clone(), Some(at)));
                        }
                        Some(AlarmChange::Delete) => {
                            let _ = dir.alarms.send(AlarmCommand::Set(key.clone(), None));
                        }
                        Some(AlarmChange::Fired(_)) | None => {}
                    }
                    for p in pending {
                        complete(&dir, &key, p.request_id, Ok(()), p.waiter);
                    }
                }
                Err(e) => {
                    let fenced = matches!(e, StoreError::Fenced(_));
                    if fenced {
                        dir.stats.bump(&dir.stats.fenced);
                        tracing::warn!(actor = ?key, error = %e, "actor commit refused: the lease moved to another node; the activation ends");
                        actor.fenced.store(true, Ordering::SeqCst);
                    } else {
                        tracing::error!(actor = ?key, error = %e, "actor commit failed; replies become errors and the activation resets");
                    }
                    let epoch = pending.last().map_or(0, |p| p.epoch);
                    actor.failed_epoch.fetch_max(epoch, Ordering::SeqCst);
                    actor.failed.store(true, Ordering::SeqCst);
                    for p in pending {
                        complete(&dir, &key, p.request_id, Err(commit_error(&e)), p.waiter);
                    }
                }
            }
        }
        // Activations waiting for their pending writes to drain look again.
        dir.stats.changed.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicBool, AtomicU64};

    use ignis_runtime::actor::Overlay;

    use super::super::Waiter;
    use super::*;

    fn actor(id: &str, failed_epoch: u64) -> Arc<ActorState> {
        Arc::new(ActorState {
            key: ActorKey::new("c", id),
            overlay: Arc::new(Mutex::new(Overlay::default())),
            failed: AtomicBool::new(false),
            failed_epoch: AtomicU64::new(failed_epoch),
            waiting: AtomicBool::new(false),
            lease: None,
            fenced: AtomicBool::new(false),
        })
    }

    fn pending(
        actor: &Arc<ActorState>,
        epoch: u64,
        seq: u64,
        writes: &[(&str, Option<&str>)],
        alarm: Option<AlarmChange>,
    ) -> Pending {
        Pending {
            actor: actor.clone(),
            epoch,
            batch: ActorBatch {
                writes: writes
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.map(|v| v.as_bytes().to_vec())))
                    .collect(),
                alarm,
                fence: None,
            },
            seq,
            request_id: ignis_runtime::RequestId::new(),
            waiter: Waiter::Alarm { at: 0, retry: 0 },
        }
    }

    #[test]
    fn batches_of_a_failed_epoch_fail_and_later_epochs_commit() {
        let a = actor("a", 1);
        let b = actor("b", 0);
        let queued = vec![
            pending(&a, 1, 1, &[("k", Some("stale"))], None),
            pending(&b, 1, 1, &[("k", Some("b1"))], None),
            pending(&a, 2, 2, &[("k", Some("fresh"))], None),
        ];
        let (failed, actors) = partition(queued);
        assert_eq!(failed.len(), 1);
        assert_eq!((failed[0].actor.key.id(), failed[0].seq), ("a", 1));
        let order: Vec<_> = actors
            .iter()
            .map(|(s, p)| {
                (
                    s.key.id().to_string(),
                    p.iter().map(|p| p.seq).collect::<Vec<_>>(),
                )
            })
            .collect();
        // Actors in the order their first committable batch arrived.
        assert_eq!(
            order,
            [("b".to_string(), vec![1]), ("a".to_string(), vec![2])]
        );
    }

    #[test]
    fn one_actors_batches_merge_in_order_with_the_last_alarm_change() {
        let a = actor("a", 0);
        let queued = vec![
            pending(
                &a,
                1,
                1,
                &[("x", Some("1")), ("y", Some("1"))],
                Some(AlarmChange::Set(10)),
            ),
            pending(&a, 1, 2, &[("x", None)], None),
            pending(&a, 1, 3, &[("y", Some("3"))], Some(AlarmChange::Delete)),
        ];
        let (failed, actors) = partition(queued);
        assert!(failed.is_empty());
        let merged = merge(&actors[0].1);
        let writes: Vec<_> = merged
            .writes
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_deref()))
            .collect();
        assert_eq!(
            writes,
            [
                ("x", Some(&b"1"[..])),
                ("y", Some(&b"1"[..])),
                ("x", None),
                ("y", Some(&b"3"[..]))
            ]
        );
        assert_eq!(merged.alarm, Some(AlarmChange::Delete));
    }

    /// Fails on the code before, where the group's last alarm change won:
    /// a message set the alarm to T2, then the firing of T1 was merged
    /// after it, the commit removed the alarm, and T2 was lost for good.
    #[test]
    fn a_firing_merged_after_a_new_time_keeps_the_new_time() {
        let a = actor("a", 0);
        let merged = |changes: &[AlarmChange]| {
            let queued: Vec<_> = changes
                .iter()
                .enumerate()
                .map(|(i, c)| pending(&a, 1, i as u64 + 1, &[], Some(*c)))
                .collect();
            merge(&partition(queued).1[0].1).alarm
        };
        use AlarmChange::{Delete, Fired, Set};
        assert_eq!(merged(&[Set(2000), Fired(1000)]), Some(Set(2000)));
        // The same time set and fired: it is gone.
        assert_eq!(merged(&[Set(1000), Fired(1000)]), Some(Fired(1000)));
        assert_eq!(merged(&[Fired(1000), Set(2000)]), Some(Set(2000)));
        assert_eq!(merged(&[Set(2000), Delete]), Some(Delete));
        assert_eq!(merged(&[Delete, Fired(1000)]), Some(Fired(1000)));
    }
}
