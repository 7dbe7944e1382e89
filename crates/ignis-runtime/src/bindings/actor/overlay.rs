//! Batches an activation handed off that are not durable yet, and how reads
//! see them.

use std::collections::{BTreeMap, VecDeque};

use ignis_store::{ActorBatch, AlarmChange, ListOptions};

/// Writes by key; `None` deletes.
pub(crate) type Writes = BTreeMap<String, Option<Vec<u8>>>;

/// Batches an activation handed off that are not durable yet, oldest first.
#[derive(Debug, Default)]
pub struct Overlay {
    batches: VecDeque<(u64, ActorBatch)>,
    /// Bytes (keys and values) of the pending batches.
    bytes: usize,
}

/// Bytes one write holds in memory until it is durable: its key and value.
pub(crate) fn entry_bytes(key: &str, value: &Option<Vec<u8>>) -> usize {
    key.len() + value.as_ref().map_or(0, Vec::len)
}

fn batch_bytes(batch: &ActorBatch) -> usize {
    batch.writes.iter().map(|(k, v)| entry_bytes(k, v)).sum()
}

impl Overlay {
    /// Adds the batch of message `seq`.
    pub fn push(&mut self, seq: u64, batch: ActorBatch) {
        self.bytes += batch_bytes(&batch);
        self.batches.push_back((seq, batch));
    }

    /// Bytes (keys and values) waiting to be durable.
    pub fn pending_bytes(&self) -> usize {
        self.bytes
    }

    /// Forgets batches up to and including `seq` (they are durable now).
    pub fn durable_through(&mut self, seq: u64) {
        while self.batches.front().is_some_and(|(s, _)| *s <= seq) {
            if let Some((_, batch)) = self.batches.pop_front() {
                self.bytes -= batch_bytes(&batch);
            }
        }
    }

    /// Whether nothing is pending.
    pub fn is_empty(&self) -> bool {
        self.batches.is_empty()
    }

    /// Forgets everything (the activation is being reset).
    pub fn clear(&mut self) {
        self.batches.clear();
        self.bytes = 0;
    }

    /// The newest pending value of `key`: `Some(None)` if deleted.
    pub(crate) fn get(&self, key: &str) -> Option<Option<Vec<u8>>> {
        self.batches.iter().rev().find_map(|(_, b)| {
            b.writes
                .iter()
                .rev()
                .find(|(k, _)| k == key)
                .map(|(_, v)| v.clone())
        })
    }

    /// Pending deletes, here and in `writes`, of keys `options` selects:
    /// each may hide one stored entry from a `list`.
    pub(crate) fn deletes_within(&self, writes: &Writes, options: &ListOptions) -> usize {
        self.batches
            .iter()
            .flat_map(|(_, b)| b.writes.iter().map(|(k, v)| (k, v)))
            .chain(writes.iter())
            .filter(|(k, v)| v.is_none() && options.contains(k))
            .count()
    }

    /// The newest pending alarm change.
    pub(crate) fn alarm(&self) -> Option<AlarmChange> {
        self.batches.iter().rev().find_map(|(_, b)| b.alarm)
    }
}

/// A `list` as the guest sees it: `stored` (the store's entries matching
/// `options`, without its limit), overlaid oldest to newest by the pending
/// batches and then by the message's own `writes`; deletes removed; then
/// ordered, reversed and limited as `options` asks.
pub(crate) fn merge_list(
    stored: Vec<(String, Vec<u8>)>,
    overlay: &Overlay,
    writes: &Writes,
    options: &ListOptions,
) -> Vec<(String, Vec<u8>)> {
    let mut entries: Writes = stored.into_iter().map(|(k, v)| (k, Some(v))).collect();
    let pending = overlay
        .batches
        .iter()
        .flat_map(|(_, b)| b.writes.iter().map(|(k, v)| (k, v)));
    for (k, v) in pending.chain(writes.iter()) {
        if options.contains(k) {
            entries.insert(k.clone(), v.clone());
        }
    }
    let live = entries.into_iter().filter_map(|(k, v)| v.map(|v| (k, v)));
    let limit = options.limit.map_or(usize::MAX, |l| l as usize);
    if options.reverse {
        let mut all: Vec<_> = live.collect();
        all.reverse();
        all.truncate(limit);
        all
    } else {
        live.take(limit).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(writes: &[(&str, Option<&str>)]) -> ActorBatch {
        ActorBatch {
            writes: writes
                .iter()
                .map(|(k, v)| (k.to_string(), v.map(|v| v.as_bytes().to_vec())))
                .collect(),
            alarm: None,
            fence: None,
        }
    }

    fn keys(list: &[(String, Vec<u8>)]) -> Vec<String> {
        list.iter()
            .map(|(k, v)| format!("{k}={}", String::from_utf8_lossy(v)))
            .collect()
    }

    fn stored(pairs: &[(&str, &str)]) -> Vec<(String, Vec<u8>)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.as_bytes().to_vec()))
            .collect()
    }

    #[test]
    fn newer_layers_win_and_deletes_hide_stored_keys() {
        let mut overlay = Overlay::default();
        overlay.push(1, batch(&[("a", Some("1")), ("b", None)]));
        overlay.push(2, batch(&[("a", Some("2")), ("d", Some("new"))]));
        let mut writes = Writes::new();
        writes.insert("d".into(), None);
        writes.insert("e".into(), Some(b"mine".to_vec()));
        let list = merge_list(
            stored(&[("a", "0"), ("b", "0"), ("c", "0")]),
            &overlay,
            &writes,
            &ListOptions::default(),
        );
        assert_eq!(keys(&list), ["a=2", "c=0", "e=mine"]);
    }

    #[test]
    fn limit_applies_after_pending_deletes() {
        // The store returns a, b, c; the pending batch deletes a and b. With
        // the limit applied before the merge the guest would get nothing.
        let mut overlay = Overlay::default();
        overlay.push(1, batch(&[("a", None), ("b", None)]));
        let options = ListOptions {
            limit: Some(1),
            ..ListOptions::default()
        };
        let list = merge_list(
            stored(&[("a", "0"), ("b", "0"), ("c", "0")]),
            &overlay,
            &Writes::new(),
            &options,
        );
        assert_eq!(keys(&list), ["c=0"]);
    }

    #[test]
    fn pending_writes_outside_the_range_are_ignored_and_reverse_limits_from_the_end() {
        let mut overlay = Overlay::default();
        overlay.push(1, batch(&[("p/x", Some("1")), ("q/y", Some("1"))]));
        let options = ListOptions {
            prefix: Some("p/".into()),
            limit: Some(2),
            reverse: true,
            ..ListOptions::default()
        };
        let list = merge_list(
            stored(&[("p/a", "0"), ("p/b", "0")]),
            &overlay,
            &Writes::new(),
            &options,
        );
        assert_eq!(keys(&list), ["p/x=1", "p/b=0"]);
    }

    #[test]
    fn durable_batches_leave_the_overlay_in_order() {
        let mut overlay = Overlay::default();
        overlay.push(1, batch(&[("a", Some("1"))]));
        overlay.push(2, batch(&[("a", Some("2"))]));
        assert_eq!(overlay.get("a"), Some(Some(b"2".to_vec())));
        overlay.durable_through(1);
        assert!(!overlay.is_empty());
        overlay.durable_through(2);
        assert!(overlay.is_empty());
        assert_eq!(overlay.get("a"), None);
    }

    #[test]
    fn pending_bytes_follow_pushes_commits_and_resets() {
        let mut overlay = Overlay::default();
        overlay.push(1, batch(&[("ab", Some("123")), ("c", None)]));
        overlay.push(2, batch(&[("d", Some("4567"))]));
        assert_eq!(overlay.pending_bytes(), 5 + 1 + 5);
        overlay.durable_through(1);
        assert_eq!(overlay.pending_bytes(), 5);
        overlay.push(3, batch(&[("e", Some("x"))]));
        overlay.clear();
        assert_eq!(overlay.pending_bytes(), 0);
    }
}
