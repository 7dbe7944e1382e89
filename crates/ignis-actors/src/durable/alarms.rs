//! Alarm scheduling: one task per directory keeps every actor's next
//! alarm in a time-ordered set and enqueues due ones as messages.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ignis_store::{ActorKey, ActorStorage};
use tokio::sync::mpsc;

use super::{ALARM_FIRST_BACKOFF, ALARM_MAX_ATTEMPTS, ActorDirectory, Cluster};

pub(super) enum AlarmCommand {
    /// Schedule (or move) the actor's alarm; `None` cancels it.
    Set(ActorKey, Option<u64>),
    /// An alarm read from storage: scheduled unless the actor's alarm is
    /// already (a commit's time, or a retry, is newer than the read).
    Known(ActorKey, u64),
    /// A delivery failed: try again after a backoff.
    Retry(ActorKey, u64, u32),
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Fires alarms when due. In memory: a time-ordered set, rebuilt from
/// storage at start; storage is the truth (an alarm is deleted there only
/// by the commit of a successful handler run). In a cluster the set is fed
/// by polling the alarms this node should fire (its actors', and those of
/// actors whose owner died) instead.
pub(super) async fn alarm_loop(
    dir: Weak<ActorDirectory>,
    storage: Arc<dyn ActorStorage>,
    cluster: Option<Arc<dyn Cluster>>,
    requeue: mpsc::UnboundedSender<AlarmCommand>,
    commands: mpsc::UnboundedReceiver<AlarmCommand>,
) {
    if let Some(cluster) = cluster {
        let poll = cluster.alarm_poll();
        let polling = async move {
            loop {
                match cluster.due_alarms().await {
                    Ok(due) => {
                        for (key, at) in due {
                            let _ = requeue.send(AlarmCommand::Known(key, at));
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e.detail(), "cannot read the cluster's due alarms")
                    }
                }
                tokio::time::sleep(poll).await;
            }
        };
        tokio::select! {
            () = polling => {}
            () = schedule(dir, commands) => {}
        }
        return;
    }
    match storage.all_alarms().await {
        Ok(persisted) => {
            if !persisted.is_empty() {
                tracing::info!(
                    alarms = persisted.len(),
                    "scheduling persisted actor alarms"
                );
            }
            for (key, at) in persisted {
                let _ = requeue.send(AlarmCommand::Set(key, Some(at)));
            }
        }
        Err(e) => tracing::error!(error = %e, "cannot load persisted actor alarms"),
    }
    drop(requeue);
    schedule(dir, commands).await;
}

/// The schedule: due alarms go to the directory as messages.
async fn schedule(dir: Weak<ActorDirectory>, mut commands: mpsc::UnboundedReceiver<AlarmCommand>) {
    // (due time, key) -> (the alarm's own time, retry)
    let mut due: BTreeSet<(u64, ActorKey)> = BTreeSet::new();
    let mut by_key: HashMap<ActorKey, (u64, u64, u32)> = HashMap::new();
    loop {
        let next = due.first().map(|(t, _)| *t);
        let sleep = match next {
            Some(t) => Duration::from_millis(t.saturating_sub(now_ms())),
            None => Duration::from_secs(3600),
        };
        tokio::select! {
            cmd = commands.recv() => {
                let Some(cmd) = cmd else { return };
                match cmd {
                    AlarmCommand::Set(key, at) => {
                        if let Some((d, _, _)) = by_key.remove(&key) {
                            due.remove(&(d, key.clone()));
                        }
                        if let Some(at) = at {
                            due.insert((at, key.clone()));
                            by_key.insert(key, (at, at, 0));
                        }
                    }
                    AlarmCommand::Known(key, at) => {
                        if let std::collections::hash_map::Entry::Vacant(slot) = by_key.entry(key.clone()) {
                            due.insert((at, key));
                            slot.insert((at, at, 0));
                        }
                    }
                    AlarmCommand::Retry(key, at, retry) => {
                        if by_key.contains_key(&key) {
                            continue; // set again meanwhile: the new time wins
                        }
                        if retry >= ALARM_MAX_ATTEMPTS {
                            tracing::error!(actor = ?key, attempts = retry, "alarm failed too many times; dropped");
                            continue;
                        }
                        let backoff = ALARM_FIRST_BACKOFF * 2u32.saturating_pow(retry.saturating_sub(1));
                        let when = now_ms() + backoff.as_millis() as u64;
                        due.insert((when, key.clone()));
                        by_key.insert(key, (when, at, retry));
                    }
                }
            }
            () = tokio::time::sleep(sleep) => {
                let now = now_ms();
                let Some(dir) = dir.upgrade() else { return };
                while let Some((t, key)) = due.first().cloned() {
                    if t > now {
                        break;
                    }
                    due.remove(&(t, key.clone()));
                    if let Some((_, at, retry)) = by_key.remove(&key) {
                        dir.deliver_alarm(&key, at, retry);
                    }
                }
            }
        }
    }
}
