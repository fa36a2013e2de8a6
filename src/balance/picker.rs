//! The picker: an immutable snapshot of the Ready connections, grouped by address, with the
//! policy that picks among them.
//!
//! A [`Picker`] holds the connections that were Ready when it was built ([`Ready`]: one
//! list, address-major, with each address's range) and its [`Policy`]. The registry builds a
//! new one whenever the Ready set changes and publishes it behind a generation number;
//! [`Pool`](crate::Pool) handles cache the `Arc` and only reload it when the generation moves.
//! A pick therefore takes no lock and allocates nothing: round robin is one relaxed
//! `fetch_add` on the shared cursor and an index, the two-choice policies two random draws
//! and a few atomic loads — O(1) in the number of addresses.
//!
//! Between two publications a connection can die. Each entry can say whether it is still
//! usable ([`Pickable::is_available`], for the pool a single atomic load), and a pick that
//! lands on a dead or full entry walks on ([`Ready::take_or_walk`]), so a connection that
//! failed is never handed out even before the registry has republished.

// `pub` (not `pub(crate)`) so that the benches can reach it through `__bench`.
#![allow(unreachable_pub)]

use std::sync::atomic::AtomicUsize;

use super::{Balance, LeastRequest, PeakEwma, PickFirst, RoundRobin, RttEstimate};

/// An entry of a picker.
pub trait Pickable {
    /// Whether the entry can take a call right now.
    fn is_available(&self) -> bool;

    /// Whether the entry has room for one more call without queueing (for HTTP/2: fewer calls
    /// in flight than the server's `MAX_CONCURRENT_STREAMS`). Defaults to always.
    fn has_capacity(&self) -> bool {
        true
    }

    /// Calls in flight on the entry, for [`Balance::LeastRequest`] and
    /// [`Balance::PeakEwma`]. Defaults to none.
    fn in_flight(&self) -> usize {
        0
    }

    /// The entry's response-time estimate, for [`Balance::PeakEwma`]; `None` counts as the
    /// default estimate of a connection that has not answered yet.
    fn rtt(&self) -> Option<&RttEstimate> {
        None
    }
}

/// A pick: the entry, and whether every available entry it could go to was full (a sign
/// that the pool should open more connections).
pub type Choice<'a, T> = (&'a T, bool);

/// A balancing policy: which entry of a snapshot a call goes to.
///
/// Every policy picks an address first and one of its connections second, and hands the
/// index it chose to [`Ready::take_or_walk`], which steps over an entry that died or filled
/// up since the snapshot was built (pick first, which must not leave its address for a full
/// connection, walks that address's range only).
pub trait Policy {
    /// Picks an entry, or `None` when none is available. `cursor` is shared by every pick of
    /// a pool (round robin's turn); policies that draw at random ignore it.
    fn pick<'a, T: Pickable>(
        &self,
        ready: &'a Ready<T>,
        cursor: &AtomicUsize,
    ) -> Option<Choice<'a, T>>;
}

/// One address's connections: `entries[start..start + len]`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Group {
    pub(crate) start: usize,
    pub(crate) len: usize,
}

/// The Ready connections of a snapshot, address-major, in the endpoint set's order.
#[derive(Debug)]
pub struct Ready<T> {
    entries: Box<[T]>,
    groups: Box<[Group]>,
    /// How round robin goes through the entries (see [`RoundRobin`]).
    turns: Turns,
}

/// Round robin's way through a snapshot: every address in turn, and each address's visits
/// through its connections in turn.
#[derive(Debug)]
pub(crate) enum Turns {
    /// One address, or one connection per address: the entries one by one already are.
    Flat,
    /// A precomputed turn of entry indices: address by address, rounds of them until every
    /// address's visits came back to its first connection (as many rounds as the least
    /// common multiple of the connection counts).
    Table(Box<[u32]>),
    /// A turn too long to precompute ([`MAX_TURN`]): computed per pick.
    Computed,
}

/// The longest precomputed turn, in entries (4 bytes each).
const MAX_TURN: usize = 4096;

impl Turns {
    fn plan(groups: &[Group], entries: usize) -> Self {
        if groups.len() <= 1 || groups.len() == entries {
            return Self::Flat;
        }
        let mut rounds = 1usize;
        for group in groups {
            rounds = rounds / gcd(rounds, group.len) * group.len;
            if rounds.saturating_mul(groups.len()) > MAX_TURN.max(entries) {
                return Self::Computed;
            }
        }
        let table = (0..rounds)
            .flat_map(|round| groups.iter().map(move |g| (g.start + round % g.len) as u32))
            .collect();
        Self::Table(table)
    }
}

fn gcd(mut a: usize, mut b: usize) -> usize {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

impl<T> Default for Ready<T> {
    fn default() -> Self {
        Self {
            entries: Box::new([]),
            groups: Box::new([]),
            turns: Turns::Flat,
        }
    }
}

impl<T: Pickable> Ready<T> {
    /// The entries of each address, in order; addresses without an entry are left out.
    pub fn new(addresses: impl IntoIterator<Item = Vec<T>>) -> Self {
        let mut entries = Vec::new();
        let mut groups = Vec::new();
        for address in addresses {
            if address.is_empty() {
                continue;
            }
            groups.push(Group {
                start: entries.len(),
                len: address.len(),
            });
            entries.extend(address);
        }
        let turns = Turns::plan(&groups, entries.len());
        Self {
            entries: entries.into_boxed_slice(),
            groups: groups.into_boxed_slice(),
            turns,
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

    pub(crate) fn entries(&self) -> &[T] {
        &self.entries
    }

    pub(crate) fn groups(&self) -> &[Group] {
        &self.groups
    }

    pub(crate) fn group(&self, g: usize) -> &[T] {
        let Group { start, len } = self.groups[g];
        &self.entries[start..start + len]
    }

    /// How round robin goes through it.
    pub(crate) fn turns(&self) -> &Turns {
        &self.turns
    }

    /// The entry at `index` if it is available and has room; else the next one that is (in
    /// list order, wrapping), else the first available one, reported as all full.
    #[inline]
    pub fn take_or_walk(&self, index: usize) -> Option<Choice<'_, T>> {
        let first = &self.entries[index];
        if first.is_available() && first.has_capacity() {
            return Some((first, false));
        }
        // Rare: a connection died since this snapshot was published, or is full.
        self.walk(index, 0..self.len(), |_| false)
    }

    /// From `index`, over the entries at `range` (wrapping inside it), the first available
    /// one with room that `skip` does not reject; else the first available one, reported as
    /// all full.
    pub(crate) fn walk(
        &self,
        index: usize,
        range: std::ops::Range<usize>,
        skip: impl Fn(&T) -> bool,
    ) -> Option<Choice<'_, T>> {
        let n = range.len();
        let offset = index - range.start;
        let mut fallback = None;
        for i in 0..n {
            let entry = &self.entries[range.start + (offset + i) % n];
            if entry.is_available() && !skip(entry) {
                if entry.has_capacity() {
                    return Some((entry, false));
                }
                fallback.get_or_insert(entry);
            }
        }
        fallback.map(|entry| (entry, true))
    }

    /// Power of two choices, at both levels: of two different addresses drawn at random,
    /// the one whose `address_cost` is lower (the first drawn on a tie); then the same
    /// between two of its entries by `entry_cost`. A cost of `None` (nothing available)
    /// loses to any other.
    #[inline]
    pub(crate) fn two_choices<C: PartialOrd>(
        &self,
        address_cost: impl Fn(&[T]) -> Option<C>,
        entry_cost: impl Fn(&T) -> Option<C>,
    ) -> Option<Choice<'_, T>> {
        let address = match self.groups.len() {
            0 => return None,
            1 => 0,
            n => {
                let (a, b) = super::rng::two_distinct(n);
                match lower(address_cost(self.group(a)), address_cost(self.group(b))) {
                    Some(false) => a,
                    Some(true) => b,
                    None => return self.take_or_walk(self.groups[a].start),
                }
            }
        };
        let Group { start, len } = self.groups[address];
        let index = if len == 1 {
            start
        } else {
            let (a, b) = super::rng::two_distinct(len);
            let cost = |i: usize| entry_cost(&self.entries[start + i]);
            match lower(cost(a), cost(b)) {
                Some(true) => start + b,
                _ => start + a,
            }
        };
        self.take_or_walk(index)
    }
}

/// Whether the second cost wins (`Some(true)`), the first (`Some(false)`: lower or equal),
/// or neither is there (`None`).
#[inline]
fn lower<C: PartialOrd>(first: Option<C>, second: Option<C>) -> Option<bool> {
    match (first, second) {
        (Some(first), Some(second)) => Some(second < first),
        (Some(_), None) => Some(false),
        (None, Some(_)) => Some(true),
        (None, None) => None,
    }
}

/// The policy a picker was built with; a `match` rather than a trait object, so that each
/// policy's pick is inlined.
#[derive(Debug, Clone, Copy)]
enum Chosen {
    RoundRobin(RoundRobin),
    LeastRequest(LeastRequest),
    PeakEwma(PeakEwma),
    PickFirst(PickFirst),
}

/// An immutable snapshot of the Ready connections and the policy that picks among them.
#[derive(Debug)]
pub struct Picker<T> {
    ready: Ready<T>,
    policy: Chosen,
}

impl<T> Default for Picker<T> {
    fn default() -> Self {
        Self {
            ready: Ready::default(),
            policy: Chosen::RoundRobin(RoundRobin),
        }
    }
}

impl<T: Pickable> Picker<T> {
    /// A round-robin picker over these entries, each its own address (tests and benches).
    #[cfg(any(test, feature = "bench-internals"))]
    pub fn new(entries: Vec<T>) -> Self {
        Self::build(Balance::RoundRobin, entries.into_iter().map(|e| vec![e]))
    }

    /// A picker with `balance` over the entries of each address, in order (for
    /// [`Balance::PickFirst`], the order it prefers).
    pub fn build(balance: Balance, addresses: impl IntoIterator<Item = Vec<T>>) -> Self {
        let policy = match balance {
            Balance::RoundRobin => Chosen::RoundRobin(RoundRobin),
            Balance::LeastRequest => Chosen::LeastRequest(LeastRequest),
            Balance::PeakEwma => Chosen::PeakEwma(PeakEwma::default()),
            Balance::PickFirst => Chosen::PickFirst(PickFirst),
        };
        Self {
            ready: Ready::new(addresses),
            policy,
        }
    }

    /// How many entries it holds.
    pub fn len(&self) -> usize {
        self.ready.len()
    }

    /// Every entry it holds, address by address (tests look at what a picker offers).
    #[cfg(test)]
    pub(crate) fn entries(&self) -> &[T] {
        self.ready.entries()
    }

    /// Whether it holds no entry.
    #[cfg(any(test, feature = "bench-internals"))]
    pub fn is_empty(&self) -> bool {
        self.ready.is_empty()
    }

    /// How many consecutive cursor values round robin needs to hand out every entry at
    /// least once (for tests that look at every entry).
    #[cfg(test)]
    pub(crate) fn round_robin_cycle(&self) -> usize {
        match self.ready.turns() {
            Turns::Flat => self.len(),
            Turns::Table(table) => table.len(),
            Turns::Computed => {
                let longest = self.ready.groups().iter().map(|g| g.len).max();
                self.ready.groups().len() * longest.unwrap_or(0)
            }
        }
    }

    /// Picks an available entry, or `None` when there is none.
    ///
    /// Entries with room are preferred; when every available entry is full, an available
    /// one is returned anyway (HTTP/2 queues the call until a stream frees up).
    #[inline]
    #[cfg_attr(not(any(test, feature = "bench-internals")), allow(dead_code))]
    pub fn pick(&self, cursor: &AtomicUsize) -> Option<&T> {
        self.pick_reporting(cursor).map(|(entry, _)| entry)
    }

    /// Like [`pick`](Self::pick), and says whether every available entry was full (a sign
    /// that the pool should open more connections).
    ///
    /// The cursor is shared by every pick of a pool so that concurrent callers interleave and
    /// every connection gets its turn.
    #[inline]
    pub fn pick_reporting(&self, cursor: &AtomicUsize) -> Option<Choice<'_, T>> {
        match &self.policy {
            Chosen::RoundRobin(policy) => policy.pick(&self.ready, cursor),
            Chosen::LeastRequest(policy) => policy.pick(&self.ready, cursor),
            Chosen::PeakEwma(policy) => policy.pick(&self.ready, cursor),
            Chosen::PickFirst(policy) => policy.pick(&self.ready, cursor),
        }
    }

    /// Like [`pick_reporting`](Self::pick_reporting), passing over the entries `avoid`
    /// rejects unless no other is available (a retry after a connection refused the call).
    pub fn pick_avoiding(
        &self,
        cursor: &AtomicUsize,
        avoid: impl Fn(&T) -> bool,
    ) -> Option<Choice<'_, T>> {
        let picked = self.pick_reporting(cursor)?;
        if !avoid(picked.0) {
            return Some(picked);
        }
        let index = self
            .ready
            .entries()
            .iter()
            .position(|e| std::ptr::eq(e, picked.0))
            .unwrap_or(0);
        self.ready
            .walk(index, 0..self.len(), avoid)
            .or(Some(picked))
    }
}
#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashMap;
    use std::sync::Arc;

    #[derive(Debug, Clone, Default)]
    struct Entry {
        id: usize,
        up: bool,
        full: bool,
        load: usize,
        rtt: Option<Arc<RttEstimate>>,
    }

    impl Pickable for Entry {
        fn is_available(&self) -> bool {
            self.up
        }

        fn has_capacity(&self) -> bool {
            !self.full
        }

        fn in_flight(&self) -> usize {
            self.load
        }

        fn rtt(&self) -> Option<&RttEstimate> {
            self.rtt.as_deref()
        }
    }

    fn entry(id: usize, up: bool, full: bool) -> Entry {
        Entry {
            id,
            up,
            full,
            ..Entry::default()
        }
    }

    /// Addresses with these connection counts, all up; ids count up address-major.
    fn addresses(counts: &[usize]) -> Vec<Vec<Entry>> {
        let mut id = 0;
        counts
            .iter()
            .map(|&n| {
                (0..n)
                    .map(|_| {
                        id += 1;
                        entry(id - 1, true, false)
                    })
                    .collect()
            })
            .collect()
    }

    /// Picks `n` times; returns the picks per entry id.
    fn tally(p: &Picker<Entry>, n: usize) -> HashMap<usize, usize> {
        let cursor = AtomicUsize::new(0);
        let mut counts = HashMap::new();
        for _ in 0..n {
            let id = p.pick(&cursor).expect("an entry").id;
            *counts.entry(id).or_default() += 1;
        }
        counts
    }

    const ALL: [Balance; 4] = [
        Balance::RoundRobin,
        Balance::LeastRequest,
        Balance::PeakEwma,
        Balance::PickFirst,
    ];

    /// Every policy but pick first (which stays on its address: see
    /// `pick_first_follows_the_order`) prefers an entry with room, and reports all full when
    /// none has room.
    #[test]
    fn prefers_entries_with_room_and_reports_all_full() {
        for balance in [
            Balance::RoundRobin,
            Balance::LeastRequest,
            Balance::PeakEwma,
        ] {
            let p = Picker::build(
                balance,
                [vec![entry(0, true, true)], vec![entry(1, true, false)]],
            );
            let cursor = AtomicUsize::new(0);
            for _ in 0..8 {
                assert_eq!(
                    p.pick_reporting(&cursor).map(|(e, f)| (e.id, f)),
                    Some((1, false)),
                    "{balance:?}"
                );
            }
            let all_full = Picker::build(
                balance,
                [vec![entry(0, true, true)], vec![entry(1, false, false)]],
            );
            assert_eq!(
                all_full.pick_reporting(&cursor).map(|(e, f)| (e.id, f)),
                Some((0, true)),
                "{balance:?}"
            );
        }
    }

    /// No policy picks from an empty picker.
    #[test]
    fn empty_picks_nothing() {
        for balance in ALL {
            let p: Picker<Entry> = Picker::build(balance, []);
            assert!(p.pick(&AtomicUsize::new(0)).is_none());
        }
        let p: Picker<Entry> = Picker::default();
        assert!(p.pick(&AtomicUsize::new(0)).is_none());
    }

    /// No policy hands out an entry that is not available, and none is picked when none is.
    #[test]
    fn skips_dead_entries() {
        for balance in ALL {
            let p = Picker::build(
                balance,
                [
                    vec![entry(0, false, false), entry(1, false, false)],
                    vec![entry(2, true, false), entry(3, false, false)],
                    vec![entry(4, false, false)],
                ],
            );
            let cursor = AtomicUsize::new(0);
            for _ in 0..50 {
                assert_eq!(p.pick(&cursor).unwrap().id, 2, "{balance:?}");
            }
            let all_dead = Picker::build(balance, [vec![entry(0, false, false)]]);
            assert!(all_dead.pick(&cursor).is_none(), "{balance:?}");
        }
    }

    #[test]
    fn cursor_wraps_around_usize() {
        for counts in [&[1, 1, 1][..], &[4, 1, 2]] {
            let p = Picker::build(Balance::RoundRobin, addresses(counts));
            let cursor = AtomicUsize::new(usize::MAX);
            assert!(p.pick(&cursor).is_some());
            assert!(p.pick(&cursor).is_some());
        }
    }

    /// Round robin gives each address the same share whatever its connection count (4, 1
    /// and 2 here), and within an address each connection the same share of it.
    #[test]
    fn round_robin_shares_are_per_address() {
        let p = Picker::build(Balance::RoundRobin, addresses(&[4, 1, 2]));
        let counts = tally(&p, 3 * 4 * 100);
        let per_address = |ids: std::ops::Range<usize>| ids.map(|id| counts[&id]).sum::<usize>();
        assert_eq!(per_address(0..4), 400, "{counts:?}");
        assert_eq!(per_address(4..5), 400, "{counts:?}");
        assert_eq!(per_address(5..7), 400, "{counts:?}");
        assert!((0..4).all(|id| counts[&id] == 100), "{counts:?}");
        assert!((5..7).all(|id| counts[&id] == 200), "{counts:?}");
    }

    /// Connection counts whose turn is too long to precompute (the least common multiple of
    /// 13 primes) are computed per pick, with the same shares.
    #[test]
    fn round_robin_long_turns_are_computed() {
        let counts = [2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41];
        let p = Picker::build(Balance::RoundRobin, addresses(&counts));
        assert!(matches!(p.ready.turns(), Turns::Computed));
        let table = Picker::build(Balance::RoundRobin, addresses(&[4, 1, 2]));
        assert!(matches!(table.ready.turns(), Turns::Table(t) if t.len() == 12));
        let picks = counts.len() * 41 * 3;
        let tallied = tally(&p, picks);
        let mut first = 0;
        for &n in &counts {
            let share: usize = (first..first + n).map(|id| tallied[&id]).sum();
            assert_eq!(share, 41 * 3, "address at {first}");
            first += n;
        }
    }

    /// The random policies give addresses of 4, 1 and 2 connections about the same share when
    /// nothing is in flight (ties go to a random draw). 3 000 picks, ±200 is over 7 standard
    /// deviations: not a flaky bound.
    #[test]
    fn two_choice_shares_are_per_address() {
        for balance in [Balance::LeastRequest, Balance::PeakEwma] {
            let p = Picker::build(balance, addresses(&[4, 1, 2]));
            let counts = tally(&p, 3_000);
            let per_address = |ids: std::ops::Range<usize>| {
                ids.map(|id| counts.get(&id).copied().unwrap_or(0))
                    .sum::<usize>()
            };
            for ids in [0..4, 4..5, 5..7] {
                let share = per_address(ids.clone());
                assert!(
                    (800..=1200).contains(&share),
                    "{balance:?} {ids:?}: {counts:?}"
                );
            }
        }
    }

    /// Least request never sends a call to the address with the most calls in flight when
    /// the others have fewer (the two draws are distinct), and inside an address prefers its
    /// less loaded connection.
    #[test]
    fn least_request_prefers_the_less_loaded() {
        let mut busy = addresses(&[1, 1, 1]);
        busy[0][0].load = 10;
        busy[1][0].load = 1;
        let p = Picker::build(Balance::LeastRequest, busy);
        let counts = tally(&p, 1_000);
        assert_eq!(counts.get(&0), None, "{counts:?}");
        // Address 1 wins only against address 0 (a third of the draws), address 2 always.
        assert!(counts[&2] > counts[&1], "{counts:?}");

        let mut one_address = addresses(&[2]);
        one_address[0][0].load = 5;
        let p = Picker::build(Balance::LeastRequest, one_address);
        assert_eq!(tally(&p, 100).get(&0), None);

        // The load of an address is the sum over its connections: four connections with
        // two calls each weigh more than one connection with five.
        let mut spread = addresses(&[4, 1]);
        for conn in &mut spread[0] {
            conn.load = 2;
        }
        spread[1][0].load = 5;
        let p = Picker::build(Balance::LeastRequest, spread);
        assert_eq!(tally(&p, 100).get(&4), Some(&100));
    }

    /// PeakEWMA steers away from the address whose latency estimate is high even when it has
    /// fewer calls in flight, until the others' load outweighs the difference.
    #[test]
    fn peak_ewma_prefers_the_faster() {
        let estimate = |ms: f64| {
            Some(Arc::new(RttEstimate::starting_at(
                super::super::now_ns(),
                ms * 1e6,
            )))
        };
        let mut servers = addresses(&[1, 1, 1]);
        servers[0][0].rtt = estimate(20.0);
        servers[1][0].rtt = estimate(1.0);
        servers[1][0].load = 3;
        servers[2][0].rtt = estimate(1.0);
        servers[2][0].load = 3;
        let p = Picker::build(Balance::PeakEwma, servers.clone());
        // 20 ms × 1 against 1 ms × 4: the slow one never wins.
        assert_eq!(tally(&p, 1_000).get(&0), None);
        // 20 ms × 1 against 1 ms × 31: now it does.
        servers[1][0].load = 30;
        servers.truncate(2);
        let p = Picker::build(Balance::PeakEwma, servers);
        assert_eq!(tally(&p, 100).get(&0), Some(&100));
    }

    /// Pick first sends every call to the first address with an available connection,
    /// spread over its connections, fails over in order and comes back.
    #[test]
    fn pick_first_follows_the_order() {
        let mut servers = addresses(&[2, 1, 1]);
        let p = Picker::build(Balance::PickFirst, servers.clone());
        assert_eq!(tally(&p, 100), HashMap::from([(0, 50), (1, 50)]));
        servers[0][0].up = false;
        servers[0][1].up = false;
        let p = Picker::build(Balance::PickFirst, servers.clone());
        assert_eq!(tally(&p, 10), HashMap::from([(2, 10)]));
        servers[1][0].up = false;
        let p = Picker::build(Balance::PickFirst, servers.clone());
        assert_eq!(tally(&p, 10), HashMap::from([(3, 10)]));
        servers[0][1].up = true;
        let p = Picker::build(Balance::PickFirst, servers.clone());
        assert_eq!(tally(&p, 10), HashMap::from([(1, 10)]));
        // Full connections of the first address keep the calls (reported full: it grows).
        servers[0][1].full = true;
        let p = Picker::build(Balance::PickFirst, servers);
        assert_eq!(
            p.pick_reporting(&AtomicUsize::new(0))
                .map(|(e, f)| (e.id, f)),
            Some((1, true))
        );
    }

    /// A retry that avoids one connection gets another whenever there is one, whatever the
    /// policy, and the avoided one only when it is the last.
    #[test]
    fn avoiding_one_connection() {
        for balance in ALL {
            let p = Picker::build(balance, addresses(&[1, 1]));
            let cursor = AtomicUsize::new(0);
            for _ in 0..20 {
                let (e, _) = p.pick_avoiding(&cursor, |e| e.id == 0).unwrap();
                assert_eq!(e.id, 1, "{balance:?}");
            }
            let only = Picker::build(balance, addresses(&[1]));
            assert_eq!(only.pick_avoiding(&cursor, |e| e.id == 0).unwrap().0.id, 0);
        }
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
                    ups.iter().enumerate().map(|(id, &up)| entry(id, up, false)).collect(),
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

        /// With any connection counts per address, any run of consecutive round-robin picks
        /// (from any cursor not about to wrap) gives every address the same number of picks
        /// ±1, and each connection the same share of its address's ±1.
        #[test]
        fn round_robin_is_fair_per_address(
            counts in proptest::collection::vec(1usize..6, 1..8),
            picks in 0usize..400,
            start in 0usize..1_000_000,
        ) {
            let p = Picker::build(Balance::RoundRobin, addresses(&counts));
            let cursor = AtomicUsize::new(start);
            let mut per_entry: HashMap<usize, usize> = HashMap::new();
            for _ in 0..picks {
                *per_entry.entry(p.pick(&cursor).unwrap().id).or_default() += 1;
            }
            let mut first = 0;
            let mut per_address = Vec::new();
            for &n in &counts {
                let shares: Vec<usize> =
                    (first..first + n).map(|id| per_entry.get(&id).copied().unwrap_or(0)).collect();
                let (lo, hi) = (shares.iter().min().unwrap(), shares.iter().max().unwrap());
                prop_assert!(hi - lo <= 1, "address at {first}: {shares:?}");
                per_address.push(shares.iter().sum::<usize>());
                first += n;
            }
            let (lo, hi) = (per_address.iter().min().unwrap(), per_address.iter().max().unwrap());
            prop_assert!(hi - lo <= 1, "{per_address:?}");
        }
    }
}
