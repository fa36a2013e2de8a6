//! Subsetting: which `k` of the resolved addresses one client connects to.
//!
//! In a fleet of many clients and many servers (1 000 clients × 500 pods behind a headless
//! Service), connecting every client to every server costs each server a connection per
//! client and each client a connection per server, and spreads every client's calls so thin
//! that HTTP/2 batches nothing. With a subset size `k` each client connects to `k` of the
//! addresses, chosen so that the servers share the fleet's connections evenly and a change of
//! the address set moves few of them. Two ways to choose, both pure functions of the
//! client's identity and the address *set* (its order and duplicates do not matter):
//!
//! - **Rendezvous hashing** (gRFC A68 `random_subsetting`, the default): every address gets a
//!   weight, a hash of (the client's seed, the address); the client takes the `k` addresses
//!   of lowest weight. It needs nothing but a seed per client (random by default), and a
//!   change of the set moves the fewest connections possible: an added address displaces
//!   one of a client's `k` only if its weight beats theirs, a removed one is replaced by the
//!   next in line, and no other address of any subset changes. Its balance is that of
//!   chance: each server is in each client's subset with probability `k / n`, so a server's
//!   connection count is Binomial(clients, k / n). With 1 000 clients, 500 servers and
//!   `k = 20` that is 40 ± 6.2 connections per server, and over 500 servers the busiest has
//!   about 2.5 × the connections of the idlest (the simulation in the tests measures
//!   60 / 23). The spread shrinks only as `clients × k / n` grows (a max/min near 1.3 takes
//!   about 500 connections per server: 12 500 such clients measure 570 / 431).
//! - **Deterministic subsetting** (Google's SRE book, "Load Balancing in the Datacenter"):
//!   for clients that know their index in the fleet. Clients are grouped in rounds of
//!   `n / k` (rounded down); each round orders the servers by one shuffle, seeded with the
//!   round's number, and client `i` of the round takes the `i`-th slice of `k`. Within a
//!   complete round every server (but the `n mod k` left over) gets exactly one connection,
//!   so a fleet of whole rounds is perfectly even (1 000 clients, 500 servers, `k = 20`: 40
//!   connections each). The price is churn: a change of `n / k` regroups every client and a
//!   change of the set reorders every round, so most connections move (see the tests'
//!   numbers), where rendezvous hashing moves only the ones it must.
//!
//! The hash is this module's own, so that a client's subset is the same in every process and
//! with every Rust version (not `std`'s `DefaultHasher`, whose algorithm may change): the
//! seed and then the address's words (family, port, IP, IPv6 scope) are folded, each through
//! SplitMix64's output mixer (a bijection of 64-bit words with full avalanche), and the
//! result is mixed once more. A known-answer test pins it. Deterministic subsetting uses the
//! same hash for its shuffle: the round's order is the order of the weights under the
//! round's seed, a uniformly random permutation that every client of the round computes
//! alike from the same set, whatever order the set came in.
//!
//! A leaf: it uses nothing of the crate but the address type. It weighs any [`Key`]: a
//! TCP [`EndpointAddr`] weighs exactly what its `SocketAddr` weighs (the pinned values
//! below hold for both), a Unix path or abstract name is folded in by its bytes.

use std::hash::Hash;
use std::net::SocketAddr;

use crate::addr::EndpointAddr;

/// What subsetting chooses among: an address with a pinned weight (the endpoint address, and
/// the socket address it wraps for TCP, which weighs the same).
pub(crate) trait Key: Clone + Eq + Hash + Ord {
    /// Feeds the address to the weight, word by word.
    fn fold(&self, fold: &mut dyn FnMut(u64));
}

impl Key for SocketAddr {
    fn fold(&self, fold: &mut dyn FnMut(u64)) {
        let port = u64::from(self.port());
        match self {
            SocketAddr::V4(v4) => fold(4 << 56 | port << 32 | u64::from(v4.ip().to_bits())),
            SocketAddr::V6(v6) => {
                let ip = v6.ip().to_bits();
                fold(6 << 56 | port << 32 | u64::from(v6.scope_id()));
                fold((ip >> 64) as u64);
                fold(ip as u64);
            }
        }
    }
}

impl Key for EndpointAddr {
    /// A TCP address weighs what its socket address weighs; a Unix path or abstract name is
    /// a tag (apart from 4 and 6) and its length, then its bytes eight at a time,
    /// little-endian, the last word padded with zeros.
    fn fold(&self, fold: &mut dyn FnMut(u64)) {
        let (tag, bytes): (u64, &[u8]) = match self {
            EndpointAddr::Tcp(addr) => return addr.fold(fold),
            EndpointAddr::Unix(path) => (0x75, path.as_os_str().as_encoded_bytes()),
            EndpointAddr::UnixAbstract(name) => (0x61, name),
        };
        fold(tag << 56 | bytes.len() as u64);
        for chunk in bytes.chunks(8) {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            fold(u64::from_le_bytes(word));
        }
    }
}

/// How a pool chooses its subset of the resolved addresses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Subsetting {
    /// How many addresses to connect to (at least 1).
    pub(crate) size: usize,
    /// Who this client is, which decides its subset.
    pub(crate) identity: Identity,
}

/// A client's identity for subsetting, which also names the algorithm.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Identity {
    /// Rendezvous hashing with this seed.
    Seed(u64),
    /// Deterministic subsetting: this client's index in its fleet.
    ClientIndex(u64),
}

impl Subsetting {
    /// The addresses this client connects to: `size` of `addresses`, or all of them (without
    /// duplicates) when there are no more.
    pub(crate) fn choose<A: Key>(&self, addresses: &[A]) -> Vec<A> {
        match self.identity {
            Identity::Seed(seed) => rendezvous(seed, addresses, self.size),
            Identity::ClientIndex(index) => deterministic(index, addresses, self.size),
        }
    }
}

/// The `k` addresses of lowest weight under `seed` (gRFC A68), lowest first; all of them
/// when there are no more than `k`.
pub(crate) fn rendezvous<A: Key>(seed: u64, addresses: &[A], k: usize) -> Vec<A> {
    let mut ranked = ranked(seed, addresses);
    ranked.truncate(k);
    ranked
}

/// Client `client_index`'s slice of `k` in its round's shuffle (the SRE book's deterministic
/// subsetting); all the addresses when there are no more than `k`.
pub(crate) fn deterministic<A: Key>(client_index: u64, addresses: &[A], k: usize) -> Vec<A> {
    let unique = unique(addresses);
    if unique.len() <= k {
        return unique;
    }
    // At least one, since there are more than `k` addresses.
    let subsets_per_round = (unique.len() / k) as u64;
    let round = client_index / subsets_per_round;
    let slice = (client_index % subsets_per_round) as usize;
    // Every client of the round shuffles alike; rounds get unrelated shuffles. The round's
    // seed is kept apart from the seeds rendezvous clients draw only by being mixed.
    let mut shuffled = ranked(mix(round ^ ROUND_DOMAIN), &unique);
    shuffled.drain(..slice * k);
    shuffled.truncate(k);
    shuffled
}

/// Set apart the seeds of deterministic rounds (any constant would do; this is π's bits).
const ROUND_DOMAIN: u64 = 0x243f_6a88_85a3_08d3;

/// `addresses` without duplicates, ordered by weight under `seed` (ties, which take a 64-bit
/// collision, by address, so that the order never depends on the input's).
fn ranked<A: Key>(seed: u64, addresses: &[A]) -> Vec<A> {
    let mut weighted: Vec<(u64, A)> = unique(addresses)
        .into_iter()
        .map(|addr| (weight(seed, &addr), addr))
        .collect();
    weighted.sort_unstable();
    weighted.into_iter().map(|(_, addr)| addr).collect()
}

/// `addresses` without duplicates, in the order first seen.
fn unique<A: Key>(addresses: &[A]) -> Vec<A> {
    let mut seen = std::collections::HashSet::with_capacity(addresses.len());
    addresses
        .iter()
        .filter(|&addr| seen.insert(addr))
        .cloned()
        .collect()
}

/// The rendezvous weight of `addr` for the client with `seed`: stable across processes,
/// platforms and Rust versions (see the module docs).
pub(crate) fn weight<A: Key>(seed: u64, addr: &A) -> u64 {
    let mut h = mix(seed);
    addr.fold(&mut |word: u64| h = mix(h ^ word));
    mix(h)
}

/// SplitMix64's output function (Steele, Lea and Flood, "Fast splittable pseudorandom number
/// generators", 2014; Stafford's "Mix13" constants) after its increment, so that zero does
/// not map to zero.
fn mix(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    //! The simulation: a fleet of 1 000 clients over 500 servers with `k = 20` (no sockets),
    //! its spread of connections per server and its churn when 10 % of the servers come or
    //! go, for each algorithm. Run with `--nocapture` to see the numbers.

    use super::*;
    use std::collections::{HashMap, HashSet};
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddrV6};

    const CLIENTS: u64 = 1_000;
    const SERVERS: u32 = 500;
    const K: usize = 20;
    /// 10 % of the servers.
    const CHANGED: u32 = SERVERS / 10;

    /// Servers `range` of a fleet: distinct loopback addresses.
    fn servers(range: std::ops::Range<u32>) -> Vec<SocketAddr> {
        range
            .map(|i| {
                let ip = Ipv4Addr::new(127, 1, (i / 250) as u8, (i % 250 + 1) as u8);
                SocketAddr::new(IpAddr::V4(ip), 50051)
            })
            .collect()
    }

    /// Every client's subset; client `c` is `choose(c, …)`.
    fn fleet(
        servers: &[SocketAddr],
        choose: impl Fn(u64, &[SocketAddr]) -> Vec<SocketAddr>,
    ) -> Vec<Vec<SocketAddr>> {
        (0..CLIENTS).map(|client| choose(client, servers)).collect()
    }

    /// Connections per server (servers no client chose included).
    fn load(subsets: &[Vec<SocketAddr>], servers: &[SocketAddr]) -> HashMap<SocketAddr, usize> {
        let mut load: HashMap<SocketAddr, usize> = servers.iter().map(|&a| (a, 0)).collect();
        for addr in subsets.iter().flatten() {
            *load
                .get_mut(addr)
                .expect("a subset holds only the fleet's servers") += 1;
        }
        load
    }

    fn max_min(load: &HashMap<SocketAddr, usize>) -> (usize, usize) {
        let max = load.values().copied().max().expect("servers");
        let min = load.values().copied().min().expect("servers");
        (max, min)
    }

    /// Connections that move from `before` to `after`: each client's new addresses.
    fn moved(before: &[Vec<SocketAddr>], after: &[Vec<SocketAddr>]) -> usize {
        before
            .iter()
            .zip(after)
            .map(|(old, new)| new.iter().filter(|a| !old.contains(a)).count())
            .sum()
    }

    fn by_rendezvous(client: u64, servers: &[SocketAddr]) -> Vec<SocketAddr> {
        rendezvous(client, servers, K)
    }

    fn by_index(client: u64, servers: &[SocketAddr]) -> Vec<SocketAddr> {
        deterministic(client, servers, K)
    }

    /// The hash is fixed: these weights are the same in every process and with every Rust
    /// version, so that a pool's subset (for a given seed) never changes under a rebuild. The
    /// mixer is SplitMix64's: its first output for seed 0 is the published one.
    #[test]
    fn weights_are_pinned() {
        let v4: SocketAddr = "127.0.0.1:50051".parse().unwrap();
        let v6 = SocketAddr::V6(SocketAddrV6::new(Ipv6Addr::LOCALHOST, 50051, 0, 0));
        assert_eq!(weight(0, &v4), 0x7e9c_245a_538b_1f7f);
        assert_eq!(weight(42, &v4), 0x45ba_7261_e010_d8df);
        assert_eq!(weight(42, &v6), 0x7316_ec98_b2b4_844e);
        assert_eq!(
            mix(0),
            0xe220_a839_7b1d_cdaf,
            "SplitMix64's first output for seed 0"
        );
    }

    /// A TCP endpoint address weighs exactly what its socket address weighs (the pinned
    /// values above hold for pools of either); Unix paths and abstract names get weights of
    /// their own, apart from each other for the same bytes, and rendezvous ranks a mixed set
    /// the same whatever its order.
    #[test]
    fn endpoint_addresses_weigh_as_their_socket_addresses() {
        let v4: SocketAddr = "127.0.0.1:50051".parse().unwrap();
        let v6 = SocketAddr::V6(SocketAddrV6::new(Ipv6Addr::LOCALHOST, 50051, 0, 0));
        for seed in [0, 42, u64::MAX] {
            assert_eq!(weight(seed, &EndpointAddr::from(v4)), weight(seed, &v4));
            assert_eq!(weight(seed, &EndpointAddr::from(v6)), weight(seed, &v6));
        }
        let path = EndpointAddr::unix("/run/app.sock");
        let name = EndpointAddr::unix_abstract("/run/app.sock");
        assert_ne!(weight(42, &path), weight(42, &name));
        assert_ne!(
            weight(42, &EndpointAddr::unix("a")),
            weight(42, &EndpointAddr::unix("a\0"))
        );
        let set = [path.clone(), EndpointAddr::from(v4), name.clone()];
        let reversed: Vec<_> = set.iter().rev().cloned().collect();
        assert_eq!(rendezvous(42, &set, 2), rendezvous(42, &reversed, 2));
    }

    /// A subset is a function of the address set: order and duplicates do not change it; it
    /// holds `k` distinct addresses, or all of them when there are fewer; `k` larger than the
    /// set takes the whole set, for both algorithms.
    #[test]
    fn the_subset_depends_on_the_set_only() {
        let all = servers(0..50);
        let mut shuffled = all.clone();
        shuffled.reverse();
        shuffled.extend_from_slice(&all[..10]);
        for client in 0..20 {
            for choose in [by_rendezvous, by_index] {
                let subset = choose(client, &all);
                assert_eq!(subset, choose(client, &shuffled), "client {client}");
                assert_eq!(subset.len(), K);
                assert_eq!(subset.iter().collect::<HashSet<_>>().len(), K);
            }
        }
        let few = servers(0..5);
        let mut twice = few.clone();
        twice.extend_from_slice(&few);
        for subset in [rendezvous(7, &twice, K), deterministic(7, &twice, K)] {
            assert_eq!(subset.iter().collect::<HashSet<_>>(), few.iter().collect());
            assert_eq!(subset.len(), few.len());
        }
        assert!(rendezvous::<SocketAddr>(7, &[], K).is_empty());
        assert!(deterministic::<SocketAddr>(7, &[], K).is_empty());
    }

    proptest::proptest! {
        /// gRFC A68's promise, for any seed, set and `k`: one address added changes a
        /// client's subset at most by that address entering (in place of one member), and one
        /// removed at most by that address leaving (for the next in line).
        #[test]
        fn one_address_moves_at_most_one_connection(
            seed in proptest::prelude::any::<u64>(),
            n in 0u32..60,
            k in 1usize..30,
            which in 0u32..1000,
        ) {
            let set = servers(0..n);
            let subset = rendezvous(seed, &set, k);
            let changes = |after: &[SocketAddr]| {
                let entered: Vec<_> = after.iter().filter(|a| !subset.contains(a)).copied().collect();
                let left: Vec<_> = subset.iter().filter(|a| !after.contains(a)).copied().collect();
                (entered, left)
            };

            let added = servers(n + which..n + which + 1)[0];
            let more: Vec<_> = set.iter().copied().chain([added]).collect();
            let (entered, left) = changes(&rendezvous(seed, &more, k));
            proptest::prop_assert!(entered.is_empty() || entered == [added], "{entered:?}");
            proptest::prop_assert!(left.len() <= entered.len(), "{left:?}");

            if n > 0 {
                let removed = set[(which % n) as usize];
                let fewer: Vec<_> = set.iter().copied().filter(|&a| a != removed).collect();
                let (entered, left) = changes(&rendezvous(seed, &fewer, k));
                proptest::prop_assert!(left.is_empty() || left == [removed], "{left:?}");
                proptest::prop_assert!(entered.len() <= left.len(), "{entered:?}");
            }
        }
    }

    /// Rendezvous hashing balances as chance does, no better and no worse: each server's count
    /// is Binomial(1 000, 20/500), mean 40, variance 38.4. The sample variance over the 500
    /// servers is within 25 % of it (its own standard error is 6 %; a hash whose weights are
    /// correlated across clients, e.g. one that ignores the seed, is far outside), and every
    /// server is within 4.5 standard deviations of the mean. It does not reach the issue's
    /// max/min ≤ 1.3: that takes ~500 connections per server, not 40 (see the module docs).
    #[test]
    fn rendezvous_spreads_as_chance_does() {
        let servers = servers(0..SERVERS);
        let subsets = fleet(&servers, by_rendezvous);
        assert!(subsets.iter().all(|s| s.len() == K));
        let load = load(&subsets, &servers);
        let n = load.len() as f64;
        let mean = load.values().sum::<usize>() as f64 / n;
        assert_eq!(mean, 40.0);
        let variance = load
            .values()
            .map(|&c| (c as f64 - mean).powi(2))
            .sum::<f64>()
            / (n - 1.0);
        let expected = CLIENTS as f64 * (K as f64 / n) * (1.0 - K as f64 / n);
        let (max, min) = max_min(&load);
        println!(
            "rendezvous, {CLIENTS} clients × {SERVERS} servers, k = {K}: max {max}, min {min}, \
             max/min {:.2}, variance {variance:.1} (binomial {expected:.1})",
            max as f64 / min as f64
        );
        assert!(
            (0.75 * expected..=1.25 * expected).contains(&variance),
            "variance {variance}, binomial {expected}"
        );
        let bound = 4.5 * expected.sqrt();
        assert!(
            (max as f64) <= mean + bound && (min as f64) >= mean - bound,
            "{max}/{min}"
        );
    }

    /// Rendezvous hashing moves only what it must. When 10 % of the servers go, exactly
    /// their connections move (each client replaces a removed server by its next in line and
    /// keeps the rest). When 10 % come, every connection that moves goes to a new server (none
    /// moves between old ones), and the count stays within the minimum that gives the new
    /// servers their share (50 × 20 000 / 550) + 10 %.
    #[test]
    fn rendezvous_moves_only_what_it_must() {
        let before_set = servers(0..SERVERS);
        let before = fleet(&before_set, by_rendezvous);
        let before_load = load(&before, &before_set);

        let fewer = servers(0..SERVERS - CHANGED);
        let after = fleet(&fewer, by_rendezvous);
        let on_removed: usize = before_set[fewer.len()..]
            .iter()
            .map(|a| before_load[a])
            .sum();
        let moved_down = moved(&before, &after);
        for (old, new) in before.iter().zip(&after) {
            assert!(old
                .iter()
                .filter(|a| fewer.contains(a))
                .all(|a| new.contains(a)));
        }
        assert_eq!(moved_down, on_removed);

        let more = servers(0..SERVERS + CHANGED);
        let after = fleet(&more, by_rendezvous);
        let new_servers: HashSet<_> = more[before_set.len()..].iter().collect();
        for (old, new) in before.iter().zip(&after) {
            assert!(new
                .iter()
                .filter(|a| !old.contains(a))
                .all(|a| new_servers.contains(a)));
        }
        let moved_up = moved(&before, &after);
        let minimum = CHANGED as f64 * (CLIENTS as usize * K) as f64 / more.len() as f64;
        let (max, min) = max_min(&load(&after, &more));
        println!(
            "rendezvous churn: -10 % servers moves {moved_down} connections (the {on_removed} \
             on removed servers); +10 % moves {moved_up} (minimum {minimum:.0}; then max \
             {max}, min {min})"
        );
        assert!(
            moved_up as f64 <= 1.1 * minimum,
            "{moved_up} > {minimum} + 10 %"
        );
    }

    /// Deterministic subsetting balances exactly: within a round the clients' subsets are
    /// disjoint slices of one shuffle, so 1 000 clients (40 whole rounds of 25) over 500
    /// servers give every server exactly 40 connections, and a partial round adds at most one.
    /// Its churn when 10 % of the servers come or go is printed: most connections move.
    #[test]
    fn deterministic_subsetting_balances_exactly() {
        let set = servers(0..SERVERS);
        let subsets = fleet(&set, by_index);
        let per_round = SERVERS as usize / K;
        for round in subsets.chunks(per_round) {
            let distinct: HashSet<_> = round.iter().flatten().collect();
            assert_eq!(distinct.len(), per_round * K, "a round's slices overlap");
        }
        assert_eq!(max_min(&load(&subsets, &set)), (40, 40));

        let extra: Vec<_> = (CLIENTS..CLIENTS + 10).map(|c| by_index(c, &set)).collect();
        let with_extra: Vec<_> = subsets.iter().chain(&extra).cloned().collect();
        let (max, min) = max_min(&load(&with_extra, &set));
        assert!(max - min <= 1, "{max}/{min}");

        let fewer = servers(0..SERVERS - CHANGED);
        let down = fleet(&fewer, by_index);
        let more = servers(0..SERVERS + CHANGED);
        let up = fleet(&more, by_index);
        let (down_max, down_min) = max_min(&load(&down, &fewer));
        let (up_max, up_min) = max_min(&load(&up, &more));
        println!(
            "deterministic, {CLIENTS} clients × {SERVERS} servers, k = {K}: 40/40; \
             -10 % servers moves {} connections (then {down_max}/{down_min}), +10 % moves {} \
             (then {up_max}/{up_min}), of {}",
            moved(&subsets, &down),
            moved(&subsets, &up),
            CLIENTS as usize * K
        );
    }
}
