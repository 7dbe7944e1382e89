//! Picking an origin: round robin, least requests in flight, and
//! consistent hashing with bounded loads.
//!
//! Every policy picks among the *usable* origins (healthy by the active
//! checks, not ejected by passive health, not already tried by this
//! request); none usable is `None` (the caller answers 502 at once).
//!
//! Consistent hashing places each origin on a ring at [`POINTS`] points
//! (hashes of `url#i`); a key goes to the first usable origin clockwise
//! from its hash. Taking an origin out moves only the keys it held (about
//! 1/N of them); the others stay where they were. Bounded loads (Mirrokni,
//! Thorup and Zadimoghaddam, 2016): an origin whose in-flight requests
//! would pass `load_factor` times the average is skipped for the next one
//! on the ring, so one hot key cannot pile every request on one origin.

use std::sync::atomic::{AtomicUsize, Ordering};

use ignis_config::Balance;

/// Points per origin on the hash ring: with 160, the largest share of 4
/// origins is within about 10% of the mean.
pub(crate) const POINTS: usize = 160;

/// What the picker needs to know about each origin, by index.
pub(crate) trait Candidates {
    /// How many origins there are.
    fn len(&self) -> usize;
    /// Whether origin `i` may take this request.
    fn usable(&self, i: usize) -> bool;
    /// Requests in flight at origin `i`.
    fn in_flight(&self, i: usize) -> u64;
}

/// An upstream's policy and its state.
pub(crate) struct Picker {
    policy: Balance,
    next: AtomicUsize,
    /// Sorted `(point, origin)`; empty unless the policy hashes.
    ring: Vec<(u64, usize)>,
}

impl Picker {
    /// The picker for origins named by `urls`, in order.
    pub(crate) fn new(policy: &Balance, urls: &[String]) -> Picker {
        let mut ring = Vec::new();
        if matches!(policy, Balance::Hash { .. }) {
            ring.reserve(urls.len() * POINTS);
            for (i, url) in urls.iter().enumerate() {
                for p in 0..POINTS {
                    ring.push((hash64(format!("{url}#{p}").as_bytes()), i));
                }
            }
            ring.sort_unstable();
        }
        Picker {
            policy: policy.clone(),
            next: AtomicUsize::new(0),
            ring,
        }
    }

    /// The origin for a request whose hash key is `key` (`None`: the
    /// request lacks it, or the policy does not hash).
    pub(crate) fn pick(&self, origins: &impl Candidates, key: Option<u64>) -> Option<usize> {
        let n = origins.len();
        if n == 0 {
            return None;
        }
        match (&self.policy, key) {
            (Balance::Hash { load_factor, .. }, Some(key)) => {
                self.pick_hashed(origins, key, *load_factor)
            }
            (Balance::LeastRequests, _) => {
                // Ties go to the next origin in turn, so an idle upstream
                // still spreads its requests.
                let start = self.next.fetch_add(1, Ordering::Relaxed);
                (0..n)
                    .map(|k| (start + k) % n)
                    .filter(|&i| origins.usable(i))
                    .min_by_key(|&i| origins.in_flight(i))
            }
            // Round robin, and hashing without a key.
            _ => {
                let start = self.next.fetch_add(1, Ordering::Relaxed);
                (0..n).map(|k| (start + k) % n).find(|&i| origins.usable(i))
            }
        }
    }

    fn pick_hashed(&self, origins: &impl Candidates, key: u64, load_factor: f64) -> Option<usize> {
        let usable: Vec<usize> = (0..origins.len()).filter(|&i| origins.usable(i)).collect();
        if usable.is_empty() {
            return None;
        }
        let total: u64 = usable.iter().map(|&i| origins.in_flight(i)).sum();
        // An origin may hold at most this many requests in flight,
        // counting the one being placed.
        let bound = (load_factor * (total + 1) as f64 / usable.len() as f64).ceil() as u64;
        let start = self.ring.partition_point(|&(point, _)| point < key);
        let mut first_usable = None;
        for k in 0..self.ring.len() {
            let (_, i) = self.ring[(start + k) % self.ring.len()];
            if !origins.usable(i) {
                continue;
            }
            first_usable.get_or_insert(i);
            if origins.in_flight(i) < bound {
                return Some(i);
            }
        }
        first_usable
    }
}

/// A 64-bit hash that is the same on every node and every build (FNV-1a,
/// then the splitmix64 finaliser so nearby inputs spread over the ring).
pub(crate) fn hash64(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ignis_config::HashKey;

    struct Fake {
        usable: Vec<bool>,
        in_flight: Vec<u64>,
    }

    impl Fake {
        fn new(n: usize) -> Fake {
            Fake {
                usable: vec![true; n],
                in_flight: vec![0; n],
            }
        }
    }

    impl Candidates for Fake {
        fn len(&self) -> usize {
            self.usable.len()
        }
        fn usable(&self, i: usize) -> bool {
            self.usable[i]
        }
        fn in_flight(&self, i: usize) -> u64 {
            self.in_flight[i]
        }
    }

    fn urls(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("http://10.0.0.{i}:80")).collect()
    }

    fn hashing(load_factor: f64) -> Balance {
        Balance::Hash {
            key: HashKey::Path,
            load_factor,
        }
    }

    #[test]
    fn round_robin_takes_each_usable_origin_in_turn() {
        let picker = Picker::new(&Balance::RoundRobin, &urls(3));
        let mut fake = Fake::new(3);
        let picks: Vec<_> = (0..6).map(|_| picker.pick(&fake, None).unwrap()).collect();
        assert_eq!(picks, [0, 1, 2, 0, 1, 2]);
        fake.usable[1] = false;
        let mut counts = [0; 3];
        for _ in 0..300 {
            counts[picker.pick(&fake, None).unwrap()] += 1;
        }
        assert_eq!(counts[1], 0);
        assert!(counts[0] >= 100 && counts[2] >= 100, "{counts:?}");
        fake.usable = vec![false; 3];
        assert_eq!(picker.pick(&fake, None), None);
    }

    #[test]
    fn least_requests_takes_the_least_loaded_and_spreads_ties() {
        let picker = Picker::new(&Balance::LeastRequests, &urls(3));
        let mut fake = Fake::new(3);
        fake.in_flight = vec![5, 1, 3];
        assert_eq!(picker.pick(&fake, None), Some(1));
        fake.usable[1] = false;
        assert_eq!(picker.pick(&fake, None), Some(2));
        fake.usable[1] = true;
        fake.in_flight = vec![0, 0, 0];
        let mut seen = [false; 3];
        for _ in 0..3 {
            seen[picker.pick(&fake, None).unwrap()] = true;
        }
        assert_eq!(seen, [true; 3]);
    }

    #[test]
    fn hashing_keeps_keys_and_moves_at_most_their_share_when_an_origin_goes() {
        let n = 5;
        let picker = Picker::new(&hashing(1.25), &urls(n));
        let mut fake = Fake::new(n);
        let keys: Vec<u64> = (0..10_000)
            .map(|k| hash64(format!("user-{k}").as_bytes()))
            .collect();
        let before: Vec<usize> = keys
            .iter()
            .map(|&k| picker.pick(&fake, Some(k)).unwrap())
            .collect();
        // Stable: the same key lands on the same origin.
        for (&k, &o) in keys.iter().zip(&before) {
            assert_eq!(picker.pick(&fake, Some(k)), Some(o));
        }
        // Balanced within tolerance.
        let mut counts = vec![0usize; n];
        for &o in &before {
            counts[o] += 1;
        }
        for &c in &counts {
            assert!((1500..=2500).contains(&c), "{counts:?}");
        }
        // Origin 2 goes: only its keys move.
        fake.usable[2] = false;
        let mut moved = 0;
        for (&k, &o) in keys.iter().zip(&before) {
            let now = picker.pick(&fake, Some(k)).unwrap();
            assert_ne!(now, 2);
            if now != o {
                assert_eq!(o, 2, "a key of a remaining origin moved");
                moved += 1;
            }
        }
        assert_eq!(moved, counts[2]);
        assert!(moved <= keys.len() / n + keys.len() / 20, "{moved} moved");
    }

    #[test]
    fn bounded_loads_spill_a_hot_origin_to_the_next_on_the_ring() {
        let picker = Picker::new(&hashing(1.25), &urls(4));
        let mut fake = Fake::new(4);
        let key = hash64(b"hot");
        let home = picker.pick(&fake, Some(key)).unwrap();
        // The home origin holds 10 of 12 in flight: over 1.25 x average.
        fake.in_flight = vec![1; 4];
        fake.in_flight[home] = 10;
        let spilled = picker.pick(&fake, Some(key)).unwrap();
        assert_ne!(spilled, home);
        // Under the bound it stays home.
        fake.in_flight = vec![2; 4];
        assert_eq!(picker.pick(&fake, Some(key)), Some(home));
    }

    #[test]
    fn the_hash_is_stable() {
        // Known answers (computed independently from the FNV-1a and
        // splitmix64 definitions): nodes and builds must agree on the ring.
        assert_eq!(hash64(b""), 0xf52a_15e9_a9b5_e89b);
        assert_eq!(hash64(b"user-1"), 0xc499_b5f8_a721_df58);
    }
}
