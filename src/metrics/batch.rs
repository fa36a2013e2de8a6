//! Per-thread batches of a pool's per-call samples, so that the threads making calls do not
//! share the recorder's cache lines call by call.
//!
//! A recorder such as `metrics-exporter-prometheus` keeps one atomic bucket per histogram
//! and one atomic count per counter. When every call records straight into them, each
//! sample is an atomic read-modify-write on a line the last call — likely on another core —
//! wrote: with two threads making calls that nearly doubles what the samples cost
//! (`benches/RESULTS.md` section 22b), and more cores make it worse. Here a call's samples go
//! to its thread's shard (a short lock nobody else wants) and reach the recorder in runs of
//! [`BATCH`], one thread at a time: the recorder's lines then stay in one core's cache for a
//! whole run.
//!
//! Nothing waits long and nothing is lost: a shard is flushed by the thread that fills it,
//! and the first sample into an empty shard since the last [`Batches::flush_all`] tells its
//! caller to ask for a flush of everything within [`FLUSH_AFTER`] (the parent's
//! `flusher`, a thread of its own: no timer is kept in the application's runtime, where a
//! pending one would cost every park of every worker a clock read).
//! [`Pool::snapshot`](crate::Pool::snapshot), the pool's close and the pool's end flush
//! everything, so the snapshot and the metrics agree.
//!
//! A shard also keeps counters that are added to without its lock, one atomic add each on
//! the shard's own cache line (the parent counts its attempts' starts so: a start is then no
//! sample, and an attempt takes the batch's lock once, at its end). A flush of a shard's batch
//! may take the counters it wants with it ([`Counts`]: the parent takes the starts of the
//! methods whose ends it records, so that a recorder mostly sees a start before its end);
//! [`Batches::flush_all`] takes the rest — so they too arrive within [`FLUSH_AFTER`], for the
//! first count since the last flush asks for one, as the first sample into an empty shard
//! does.
//!
//! This module only keeps the shards and decides when a batch goes; what its samples and
//! counters mean is the parent's.

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::OnceLock;
use std::time::Duration;

use parking_lot::Mutex;

/// Samples a shard holds before the thread that adds the last one flushes it.
pub(crate) const BATCH: usize = 64;

/// How long a sample may wait in a shard that is not filling up.
pub(crate) const FLUSH_AFTER: Duration = Duration::from_secs(1);

/// The most shards a pool has (threads beyond share them, correctly, under their lock).
const MAX_SHARDS: usize = 64;

/// Each thread's shard number, handed out in turn as threads first record: a runtime's
/// worker threads, which live long, get shards of their own.
static NEXT_THREAD: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    /// This thread's number once it has recorded (`usize::MAX` before): a constant-initialized
    /// cell without a destructor, so reading it is a plain thread-local load, with no lazy
    /// state to check and nothing to tear down.
    static THREAD: Cell<usize> = const { Cell::new(usize::MAX) };
}

/// This thread's number (see [`NEXT_THREAD`]).
#[inline]
fn thread_number() -> usize {
    THREAD.with(|number| match number.get() {
        usize::MAX => {
            // (Never `usize::MAX` again: the top bit is cleared.)
            let n = NEXT_THREAD.fetch_add(1, Ordering::Relaxed) & (usize::MAX >> 1);
            number.set(n);
            n
        }
        n => n,
    })
}

/// One shard on a cache line of its own, so that two threads' shards do not share one.
#[derive(Debug)]
#[repr(align(128))]
struct Shard<T> {
    batch: Mutex<Vec<T>>,
    /// Its counters, allocated at its first count (not for every shard).
    counts: OnceLock<Box<[AtomicU64]>>,
}

impl<T> Default for Shard<T> {
    fn default() -> Self {
        Self {
            batch: Mutex::new(Vec::new()),
            counts: OnceLock::new(),
        }
    }
}

impl<T> Shard<T> {
    fn counts(&self) -> Counts<'_> {
        Counts(self.counts.get().map_or(&[], |counts| &counts[..]))
    }
}

/// A shard's counters, as a flush of its batch gets them: it takes those it wants.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Counts<'a>(&'a [AtomicU64]);

impl Counts<'_> {
    /// What counter `counter` counted since it was last taken (0: nothing, or no such
    /// counter), zeroing it.
    #[inline]
    pub(crate) fn take(self, counter: usize) -> u64 {
        match self.0.get(counter) {
            // Sequentially consistent: see `Batches::count`. A load first: most counters are
            // zero, and a load does not take the line.
            Some(count) if count.load(Ordering::SeqCst) != 0 => count.swap(0, Ordering::SeqCst),
            _ => 0,
        }
    }
}

/// The shards of one pool's samples and counts.
#[derive(Debug)]
pub(crate) struct Batches<T> {
    shards: Box<[Shard<T>]>,
    /// How many counters a shard has.
    counters: usize,
    /// Set by the first sample into an empty shard or the first count since the last flush
    /// (whose caller then asks for a flush), cleared by [`Batches::flush_all`].
    pending: AtomicBool,
}

impl<T> Batches<T> {
    /// Shards for eight times the machine's parallelism (a power of two, at most
    /// [`MAX_SHARDS`]). Threads take shard numbers in the order they first record, and every
    /// thread that records takes one — a runtime's workers, its blocking threads, the
    /// application's own — so two busy workers share a shard only if their numbers are a
    /// multiple of the shard count apart: many shards (a cache line each, their buffers
    /// allocated at first use) make that rare.
    ///
    /// Each shard has `counters` counters (see [`Batches::count`]).
    pub(crate) fn new(counters: usize) -> Self {
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        Self::with_shards((threads * 8).next_power_of_two().min(MAX_SHARDS), counters)
    }

    fn with_shards(n: usize, counters: usize) -> Self {
        debug_assert!(n.is_power_of_two());
        Self {
            shards: (0..n).map(|_| Shard::default()).collect(),
            counters,
            pending: AtomicBool::new(false),
        }
    }

    /// This thread's shard.
    #[inline]
    fn shard(&self) -> &Shard<T> {
        &self.shards[thread_number() & (self.shards.len() - 1)]
    }

    /// Adds `sample` to this thread's shard; a full shard goes to `flush` at once, on this
    /// thread, with the shard's counters. Returns whether the caller must ask for a
    /// [`Batches::flush_all`] within [`FLUSH_AFTER`]: true for the first sample left behind
    /// since the last one (once, not for every sample).
    #[inline]
    #[must_use]
    pub(crate) fn push(&self, sample: T, flush: impl FnOnce(&[T], Counts<'_>)) -> bool {
        let shard = self.shard();
        let mut batch = shard.batch.lock();
        let mut ask = false;
        if batch.is_empty() {
            // Room for a whole batch (allocated at the shard's first sample; a no-op after).
            batch.reserve_exact(BATCH);
            // The first sample since this shard was last flushed: a flush must come, unless
            // one was already asked for.
            ask = self.ask();
        }
        batch.push(sample);
        if batch.len() >= BATCH {
            flush(&batch, shard.counts());
            batch.clear();
        }
        ask
    }

    /// Adds one to counter `counter` (below the `counters` given to [`Batches::new`]) of this
    /// thread's shard, without its lock. Returns whether the caller must ask for a
    /// [`Batches::flush_all`] within [`FLUSH_AFTER`], as [`Batches::push`] does.
    #[inline]
    #[must_use]
    pub(crate) fn count(&self, counter: usize) -> bool {
        let shard = self.shard();
        let counts = match shard.counts.get() {
            Some(counts) => counts,
            None => self.allocate_counts(shard),
        };
        // Sequentially consistent, as are the flag's accesses here and in `flush_all`: if
        // this add comes after `flush_all` took the counter, the load below comes after
        // `flush_all` cleared the flag, and sees it cleared (or set again by a later ask).
        // On x86 these are the instructions relaxed ones would be.
        counts[counter].fetch_add(1, Ordering::SeqCst);
        self.ask()
    }

    #[cold]
    fn allocate_counts<'a>(&self, shard: &'a Shard<T>) -> &'a [AtomicU64] {
        shard
            .counts
            .get_or_init(|| (0..self.counters).map(|_| AtomicU64::new(0)).collect())
    }

    /// Whether this caller is the one to ask for a flush: the first since the last one.
    #[inline]
    fn ask(&self) -> bool {
        !self.pending.load(Ordering::SeqCst) && !self.pending.swap(true, Ordering::SeqCst)
    }

    /// Hands every shard's batch to `flush` with the shard's counters, and empties it; then
    /// the shard's counters that are still not zero to `counted` (the counter and what it
    /// counted since it was last taken), zeroing them.
    pub(crate) fn flush_all(
        &self,
        mut flush: impl FnMut(&[T], Counts<'_>),
        mut counted: impl FnMut(usize, u64),
    ) {
        // Cleared first: a sample added or a count made while the shards are flushed asks
        // again (sequentially consistent: see `count`).
        self.pending.store(false, Ordering::SeqCst);
        for shard in self.shards.iter() {
            let counts = shard.counts();
            {
                let mut batch = shard.batch.lock();
                if !batch.is_empty() {
                    flush(&batch, counts);
                    batch.clear();
                }
            }
            for counter in 0..counts.0.len() {
                match counts.take(counter) {
                    0 => {}
                    n => counted(counter, n),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::{Batches, BATCH};

    /// A thread's samples reach the flush in runs of [`BATCH`], in order; `flush_all` hands
    /// over the rest; no sample is lost or repeated, from one thread or several sharing a
    /// shard.
    #[test]
    fn samples_reach_the_flush_in_batches_without_loss() {
        let batches = Arc::new(Batches::<u32>::with_shards(2, 0));
        let seen = Arc::new(parking_lot::Mutex::new(Vec::new()));
        let threads: Vec<_> = (0..4u32)
            .map(|t| {
                let (batches, seen) = (batches.clone(), seen.clone());
                std::thread::spawn(move || {
                    for i in 0..1_000u32 {
                        let _ = batches.push(t * 10_000 + i, |run, _| {
                            assert_eq!(
                                run.len(),
                                BATCH,
                                "a flush on the calling thread is a full batch"
                            );
                            seen.lock().extend_from_slice(run);
                        });
                    }
                })
            })
            .collect();
        for thread in threads {
            thread.join().expect("recording thread");
        }
        let flushed_while_recording = seen.lock().len();
        assert_eq!(flushed_while_recording % BATCH, 0);
        batches.flush_all(|rest, _| seen.lock().extend_from_slice(rest), |_, _| {});
        let mut seen = std::mem::take(&mut *seen.lock());
        assert_eq!(seen.len(), 4_000, "every sample, once");
        // Each thread's own samples keep their order.
        for t in 0..4u32 {
            let own: Vec<u32> = seen.iter().copied().filter(|s| s / 10_000 == t).collect();
            assert!(own.windows(2).all(|w| w[0] < w[1]), "thread {t} in order");
        }
        seen.sort_unstable();
        seen.dedup();
        assert_eq!(seen.len(), 4_000);
        // Flushed: nothing left.
        batches.flush_all(
            |rest, _| panic!("{} samples left after a flush", rest.len()),
            |_, _| {},
        );
    }

    /// A flush is asked for by the first sample after a flush, not by every sample, and
    /// again after the next flush.
    #[test]
    fn a_flush_is_asked_for_once_per_flush() {
        let batches = Batches::<u32>::with_shards(1, 0);
        assert!(
            batches.push(1, |_, _| unreachable!()),
            "the first sample asks"
        );
        assert!(
            !batches.push(2, |_, _| unreachable!()),
            "the second does not ask again"
        );
        batches.flush_all(|run, _| assert_eq!(run, &[1, 2]), |_, _| {});
        assert!(
            batches.push(3, |_, _| unreachable!()),
            "the first sample after a flush asks"
        );
    }

    /// Counts made by threads sharing shards, while another thread flushes over and over,
    /// all reach `flush_all`, each once, under their counters.
    #[test]
    fn counts_reach_the_flush_without_loss() {
        let batches = Arc::new(Batches::<u32>::with_shards(2, 3));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let totals = Arc::new(parking_lot::Mutex::new([0u64; 3]));
        let flusher = {
            let (batches, stop, totals) = (batches.clone(), stop.clone(), totals.clone());
            std::thread::spawn(move || {
                // Bounded: the counting threads end long before.
                for _ in 0..1_000_000 {
                    batches.flush_all(|_, _| {}, |counter, n| totals.lock()[counter] += n);
                    if stop.load(std::sync::atomic::Ordering::Acquire) {
                        break;
                    }
                    std::thread::yield_now();
                }
            })
        };
        let threads: Vec<_> = (0..4usize)
            .map(|t| {
                let batches = batches.clone();
                std::thread::spawn(move || {
                    for i in 0..10_000usize {
                        let _ = batches.count((t + i) % 3);
                    }
                })
            })
            .collect();
        for thread in threads {
            thread.join().expect("counting thread");
        }
        stop.store(true, std::sync::atomic::Ordering::Release);
        flusher.join().expect("flushing thread");
        batches.flush_all(|_, _| {}, |counter, n| totals.lock()[counter] += n);
        let totals = *totals.lock();
        assert_eq!(
            totals.iter().sum::<u64>(),
            40_000,
            "every count, once: {totals:?}"
        );
        // Thread t counts counter (t + i) % 3: 10 000 = 3 334 + 3 333 + 3 333, turned by t.
        let mut expected = [0u64; 3];
        for t in 0..4usize {
            for i in 0..10_000usize {
                expected[(t + i) % 3] += 1;
            }
        }
        assert_eq!(totals, expected);
        batches.flush_all(
            |_, _| {},
            |counter, n| panic!("counter {counter}: {n} left after a flush"),
        );
    }

    /// A count asks for a flush as a sample does: the first since the last flush, once.
    #[test]
    fn a_count_asks_for_a_flush_once_per_flush() {
        let batches = Batches::<u32>::with_shards(1, 2);
        assert!(batches.count(1), "the first count asks");
        assert!(!batches.count(0), "the second does not ask again");
        assert!(!batches.push(7, |_, _| unreachable!()), "nor a sample");
        let mut counted = Vec::new();
        batches.flush_all(
            |run, _| assert_eq!(run, &[7]),
            |counter, n| counted.push((counter, n)),
        );
        assert_eq!(counted, [(0, 1), (1, 1)]);
        assert!(batches.count(0), "the first count after a flush asks");
    }

    /// A flush of a full batch gets its shard's counters and takes the ones it wants (the
    /// counts so far, zeroed); `flush_all` hands over the others, and what was counted after.
    #[test]
    fn a_full_batch_takes_the_counters_it_wants() {
        let batches = Batches::<u32>::with_shards(1, 3);
        for _ in 0..5 {
            let _ = batches.count(1);
        }
        let _ = batches.count(2);
        let mut took = None;
        for i in 0..BATCH as u32 {
            let _ = batches.push(i, |run, counts| {
                assert_eq!(run.len(), BATCH);
                took = Some((
                    counts.take(1),
                    counts.take(1),
                    counts.take(0),
                    counts.take(9),
                ));
            });
        }
        assert_eq!(
            took,
            Some((5, 0, 0, 0)),
            "counter 1's five, once; none of 0; no 9"
        );
        let _ = batches.count(1);
        let mut counted = Vec::new();
        batches.flush_all(
            |_, _| unreachable!("the batch was flushed full"),
            |counter, n| counted.push((counter, n)),
        );
        assert_eq!(counted, [(1, 1), (2, 1)]);
    }
}
