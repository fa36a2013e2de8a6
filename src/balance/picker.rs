//! Atomic round-robin over Ready connections.
//!
//! A [`Picker`] is an immutable list of the connections that were Ready when it was built. The
//! registry builds a new one whenever the Ready set changes and publishes it behind a
//! generation number; [`Pool`](crate::Pool) handles cache the `Arc` and only reload it when the
//! generation moves. A pick is therefore one relaxed `fetch_add` on the shared cursor and an
//! index — no lock, no allocation, O(1) in the number of connections.
//!
//! Between two publications a connection can die. Each entry can say whether it is still
//! usable ([`Pickable::is_available`], for the pool a single atomic load), and the picker steps
//! over dead entries, so a connection that failed is never handed out even before the
//! registry has republished.

// `pub` (not `pub(crate)`) so that the benches can reach it through `__bench`.
#![allow(unreachable_pub)]

use std::sync::atomic::{AtomicUsize, Ordering};

/// An entry of a picker.
pub trait Pickable {
    /// Whether the entry can take a call right now.
    fn is_available(&self) -> bool;

    /// Whether the entry has room for one more call without queueing (for HTTP/2: fewer calls
    /// in flight than the server's `MAX_CONCURRENT_STREAMS`). Defaults to always.
    fn has_capacity(&self) -> bool {
        true
    }
}

/// An immutable snapshot of the Ready connections.
#[derive(Debug)]
pub struct Picker<T> {
    entries: Box<[T]>,
}

impl<T> Default for Picker<T> {
    fn default() -> Self {
        Self {
            entries: Box::new([]),
        }
    }
}

impl<T: Pickable> Picker<T> {
    /// A picker over these entries.
    pub fn new(entries: Vec<T>) -> Self {
        Self {
            entries: entries.into_boxed_slice(),
        }
    }

    /// How many entries it holds.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether it holds no entry.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Picks the next available entry after the cursor, or `None` when there is none.
    ///
    /// Entries with room are preferred; when every available entry is full, the next
    /// available one is returned anyway (HTTP/2 queues the call until a stream frees up).
    #[inline]
    #[cfg_attr(not(any(test, feature = "bench-internals")), allow(dead_code))]
    pub fn pick(&self, cursor: &AtomicUsize) -> Option<&T> {
        self.pick_reporting(cursor).map(|(entry, _)| entry)
    }

    /// Like [`pick`](Self::pick), and says whether every available entry was full (a sign
    /// that the pool should open more connections).
    ///
    /// The cursor is shared by every pick of a pool so that concurrent callers interleave and
    /// every connection gets its turn. `Relaxed` is enough: the cursor orders nothing else, it
    /// only has to hand out distinct numbers.
    #[inline]
    pub fn pick_reporting(&self, cursor: &AtomicUsize) -> Option<(&T, bool)> {
        if self.is_empty() {
            return None;
        }
        let n = self.entries.len();
        let start = cursor.fetch_add(1, Ordering::Relaxed) % n;
        let first = &self.entries[start];
        if first.is_available() && first.has_capacity() {
            return Some((first, false));
        }
        // Rare: a connection died since this snapshot was published, or is full. Walk on.
        let mut fallback = first.is_available().then_some(first);
        for i in 1..n {
            let entry = &self.entries[(start + i) % n];
            if entry.is_available() {
                if entry.has_capacity() {
                    return Some((entry, false));
                }
                fallback.get_or_insert(entry);
            }
        }
        fallback.map(|entry| (entry, true))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashMap;

    #[derive(Debug, Clone)]
    struct Entry {
        id: usize,
        up: bool,
        full: bool,
    }

    impl Pickable for Entry {
        fn is_available(&self) -> bool {
            self.up
        }

        fn has_capacity(&self) -> bool {
            !self.full
        }
    }

    #[test]
    fn prefers_entries_with_room_and_reports_all_full() {
        let p = Picker::new(vec![
            Entry {
                id: 0,
                up: true,
                full: true,
            },
            Entry {
                id: 1,
                up: true,
                full: false,
            },
        ]);
        let cursor = AtomicUsize::new(0);
        for _ in 0..4 {
            assert_eq!(
                p.pick_reporting(&cursor).map(|(e, f)| (e.id, f)),
                Some((1, false))
            );
        }
        let all_full = Picker::new(vec![
            Entry {
                id: 0,
                up: true,
                full: true,
            },
            Entry {
                id: 1,
                up: false,
                full: false,
            },
        ]);
        assert_eq!(
            all_full.pick_reporting(&cursor).map(|(e, f)| (e.id, f)),
            Some((0, true))
        );
    }

    #[test]
    fn empty_picks_nothing() {
        let p: Picker<Entry> = Picker::default();
        assert!(p.pick(&AtomicUsize::new(0)).is_none());
    }

    #[test]
    fn skips_dead_entries() {
        let p = Picker::new(vec![
            Entry {
                id: 0,
                up: false,
                full: false,
            },
            Entry {
                id: 1,
                up: true,
                full: false,
            },
            Entry {
                id: 2,
                up: false,
                full: false,
            },
        ]);
        let cursor = AtomicUsize::new(0);
        for _ in 0..10 {
            assert_eq!(p.pick(&cursor).unwrap().id, 1);
        }
        let all_dead = Picker::new(vec![Entry {
            id: 0,
            up: false,
            full: false,
        }]);
        assert!(all_dead.pick(&cursor).is_none());
    }

    #[test]
    fn cursor_wraps_around_usize() {
        let p = Picker::new(
            (0..3)
                .map(|id| Entry {
                    id,
                    up: true,
                    full: false,
                })
                .collect(),
        );
        let cursor = AtomicUsize::new(usize::MAX);
        assert!(p.pick(&cursor).is_some());
        assert!(p.pick(&cursor).is_some());
    }

    proptest! {
        /// Over any sequence of pickers (states changing between rounds of picks), every pick
        /// lands on an available entry, and within one picker every available entry gets
        /// the same number of picks ±1.
        #[test]
        fn round_robin_is_fair(
            rounds in proptest::collection::vec(
                (proptest::collection::vec(any::<bool>(), 1..40), 0usize..500),
                1..10,
            ),
            start in any::<usize>(),
        ) {
            let cursor = AtomicUsize::new(start);
            for (ups, picks) in rounds {
                let p = Picker::new(
                    ups.iter().enumerate().map(|(id, &up)| Entry { id, up, full: false }).collect(),
                );
                let live = ups.iter().filter(|u| **u).count();
                let mut counts: HashMap<usize, usize> = HashMap::new();
                for _ in 0..picks {
                    match p.pick(&cursor) {
                        Some(e) => {
                            prop_assert!(e.up);
                            *counts.entry(e.id).or_default() += 1;
                        }
                        None => prop_assert_eq!(live, 0),
                    }
                }
                if live == ups.len() && picks > 0 {
                    let min = (0..ups.len()).map(|i| counts.get(&i).copied().unwrap_or(0)).min().unwrap();
                    let max = counts.values().copied().max().unwrap_or(0);
                    prop_assert!(max - min <= 1, "{counts:?}");
                }
            }
        }
    }
}
