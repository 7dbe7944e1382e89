//! Admission without a guest: ordering and counts.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use ignis_actors::Admission;
use ignis_runtime::ErrorKind;
use tokio::sync::mpsc;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_requests_get_slots_in_arrival_order() {
    let admission = Arc::new(Admission::new(1, 3, Duration::from_secs(60)));
    let held = admission.admit().await.unwrap();
    let (tx, mut rx) = mpsc::unbounded_channel();
    for i in 0..3u32 {
        let (a, tx) = (admission.clone(), tx.clone());
        tokio::spawn(async move {
            let slot = a.admit().await.unwrap();
            tx.send(i).unwrap();
            drop(slot);
        });
        // The next one arrives only once this one holds its place in line
        // (`queued` counts a request once it is registered for a slot).
        admission
            .stats()
            .wait_until(|s| s.queued.load(Ordering::SeqCst) == u64::from(i) + 1)
            .await;
    }
    // Mailbox full: the fourth is shed at once, with the queue deadline as
    // its Retry-After.
    let shed = admission.admit().await.unwrap_err();
    assert_eq!(shed.kind(), &ErrorKind::Overloaded);
    assert_eq!(
        (shed.status(), shed.retry_after()),
        (503, Some(Duration::from_secs(60)))
    );
    assert_eq!(admission.stats().waiting.load(Ordering::SeqCst), 3);
    drop(held);
    let order: Vec<u32> = [rx.recv().await, rx.recv().await, rx.recv().await]
        .into_iter()
        .map(Option::unwrap)
        .collect();
    assert_eq!(order, [0, 1, 2]);
    assert_eq!(admission.stats().admitted.load(Ordering::SeqCst), 4);
    assert_eq!(admission.stats().queued.load(Ordering::SeqCst), 3);
    assert_eq!(admission.stats().shed_full.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn a_waiter_that_gives_up_leaves_the_mailbox() {
    let admission = Arc::new(Admission::new(1, 1, Duration::from_secs(60)));
    let _held = admission.admit().await.unwrap();
    let a = admission.clone();
    let waiter = tokio::spawn(async move { a.admit().await.map(drop) });
    admission
        .stats()
        .wait_until(|s| s.waiting.load(Ordering::SeqCst) == 1)
        .await;
    // The client goes away: its place in the mailbox is free again.
    waiter.abort();
    admission
        .stats()
        .wait_until(|s| s.waiting.load(Ordering::SeqCst) == 0)
        .await;
    let a = admission.clone();
    let second = tokio::spawn(async move { a.admit().await.map(drop) });
    admission
        .stats()
        .wait_until(|s| s.waiting.load(Ordering::SeqCst) == 1)
        .await;
    assert_eq!(admission.stats().shed_full.load(Ordering::SeqCst), 0);
    second.abort();
}
