//! The random draws of the two-choice policies: a per-thread xorshift ([`FastRng`]), so a
//! pick takes no lock and shares no cache line with other threads.

use std::cell::RefCell;

use crate::backoff::FastRng;

thread_local! {
    static RNG: RefCell<FastRng> = RefCell::new(FastRng::new(FastRng::random_seed()));
}

/// Two different indices below `n` (`n >= 2`), uniformly.
#[inline]
pub(crate) fn two_distinct(n: usize) -> (usize, usize) {
    debug_assert!(n >= 2);
    RNG.with_borrow_mut(|rng| {
        let first = below(rng.next_u64(), n);
        // Draw among the n - 1 others and step over the first: uniform over the pairs.
        let second = below(rng.next_u64(), n - 1);
        (first, second + usize::from(second >= first))
    })
}

/// `x` scaled into `0..n` by a multiply, not a division (Lemire's method).
#[inline]
fn below(x: u64, n: usize) -> usize {
    ((u128::from(x) * n as u128) >> 64) as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every ordered pair of different indices comes up, and never a pair of equal ones.
    #[test]
    fn draws_cover_every_distinct_pair() {
        let mut seen = [[0u32; 3]; 3];
        for _ in 0..3_000 {
            let (a, b) = two_distinct(3);
            assert_ne!(a, b);
            seen[a][b] += 1;
        }
        for (a, row) in seen.iter().enumerate() {
            for (b, &count) in row.iter().enumerate() {
                assert_eq!(count > 0, a != b, "{seen:?}");
            }
        }
    }
}
