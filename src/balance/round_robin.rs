//! Round robin: addresses in turn, then each address's connections in turn.

use std::sync::atomic::{AtomicUsize, Ordering};

use super::picker::{Choice, Pickable, Policy, Ready, Turns};

/// Round robin over addresses, then over that address's connections, from one cursor.
///
/// Cursor value `c` goes to address `c % A` and, there, to connection `(c / A) % len`: each
/// address comes every `A` picks, and its own visits step through its connections, so any
/// run of picks gives every address the same number ±1 whatever its connection count. With
/// one address, or one connection per address, that is the entry at `c % N`; otherwise the
/// snapshot precomputes one whole turn of that sequence (`Turns::Table`, as long as the
/// least common multiple of the counts times `A`, up to a bound) and a pick is one index
/// into it — one division rather than two. Either way a pick is one relaxed `fetch_add`:
/// the cursor orders nothing else, it only has to hand out distinct numbers.
#[derive(Clone, Copy, Debug, Default)]
pub struct RoundRobin;

impl Policy for RoundRobin {
    #[inline]
    fn pick<'a, T: Pickable>(
        &self,
        ready: &'a Ready<T>,
        cursor: &AtomicUsize,
    ) -> Option<Choice<'a, T>> {
        if ready.is_empty() {
            return None;
        }
        let turn = cursor.fetch_add(1, Ordering::Relaxed);
        let index = match ready.turns() {
            Turns::Flat => turn % ready.len(),
            Turns::Table(table) => table[turn % table.len()] as usize,
            Turns::Computed => {
                let groups = ready.groups();
                let group = groups[turn % groups.len()];
                group.start + (turn / groups.len()) % group.len
            }
        };
        ready.take_or_walk(index)
    }
}
