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
//! This module only keeps the shards and decides when a batch goes; what a batch holds and
//! what its samples mean is the parent's ([`Batch`]; a plain `Vec` is one).

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
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

/// What a shard holds between flushes: samples added one at a time, counted towards
/// [`BATCH`] by [`Batch::len`].
pub(crate) trait Batch: Default {
    /// What is added.
    type Sample;
    /// Adds `sample`.
    fn push(&mut self, sample: Self::Sample);
    /// How full it is: it is flushed at [`BATCH`].
    fn len(&self) -> usize;
    /// Whether it holds nothing.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Empties it, keeping its buffers.
    fn clear(&mut self);
    /// Makes room for a whole batch: called when it is empty, so that a shard's buffers are
    /// allocated at its first sample (not for every shard); nothing once they are there.
    fn reserve(&mut self);
}

impl<T> Batch for Vec<T> {
    type Sample = T;
    fn push(&mut self, sample: T) {
        Vec::push(self, sample);
    }
    fn len(&self) -> usize {
        Vec::len(self)
    }
    fn clear(&mut self) {
        Vec::clear(self);
    }
    fn reserve(&mut self) {
        self.reserve_exact(BATCH);
    }
}

/// One shard on a cache line of its own, so that two threads' shards do not share one.
#[derive(Debug, Default)]
#[repr(align(128))]
struct Shard<B>(Mutex<B>);

/// The shards of one pool's samples.
#[derive(Debug)]
pub(crate) struct Batches<B> {
    shards: Box<[Shard<B>]>,
    /// Set by the first sample into an empty shard (whose caller then asks for a flush),
    /// cleared by [`Batches::flush_all`].
    pending: AtomicBool,
}

impl<B: Batch> Batches<B> {
    /// Shards for eight times the machine's parallelism (a power of two, at most
    /// [`MAX_SHARDS`]). Threads take shard numbers in the order they first record, and every
    /// thread that records takes one — a runtime's workers, its blocking threads, the
    /// application's own — so two busy workers share a shard only if their numbers are a
    /// multiple of the shard count apart: many shards (a cache line each, their buffers
    /// allocated at first use) make that rare.
    pub(crate) fn new() -> Self {
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        Self::with_shards((threads * 8).next_power_of_two().min(MAX_SHARDS))
    }

    fn with_shards(n: usize) -> Self {
        debug_assert!(n.is_power_of_two());
        Self {
            shards: (0..n).map(|_| Shard::default()).collect(),
            pending: AtomicBool::new(false),
        }
    }

    /// Adds `sample` to this thread's shard; a full shard goes to `flush` at once, on this
    /// thread. Returns whether the caller must ask for a [`Batches::flush_all`] within
    /// [`FLUSH_AFTER`]: true for the first sample left behind since the last one (once, not
    /// for every sample).
    #[inline]
    #[must_use]
    pub(crate) fn push(&self, sample: B::Sample, flush: impl FnOnce(&mut B)) -> bool {
        let index = thread_number() & (self.shards.len() - 1);
        let mut batch = self.shards[index].0.lock();
        let mut ask = false;
        if batch.is_empty() {
            batch.reserve();
            // The first sample since this shard was last flushed: a flush must come, unless
            // one was already asked for.
            ask =
                !self.pending.load(Ordering::Relaxed) && !self.pending.swap(true, Ordering::AcqRel);
        }
        batch.push(sample);
        if batch.len() >= BATCH {
            flush(&mut batch);
            batch.clear();
        }
        ask
    }

    /// Hands every shard's batch to `flush` and empties them.
    pub(crate) fn flush_all(&self, mut flush: impl FnMut(&mut B)) {
        // Cleared first: a sample added while the shards are flushed asks again.
        self.pending.store(false, Ordering::Release);
        for shard in self.shards.iter() {
            let mut batch = shard.0.lock();
            if !batch.is_empty() {
                flush(&mut batch);
                batch.clear();
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
        let batches = Arc::new(Batches::<Vec<u32>>::with_shards(2));
        let seen = Arc::new(parking_lot::Mutex::new(Vec::new()));
        let threads: Vec<_> = (0..4u32)
            .map(|t| {
                let (batches, seen) = (batches.clone(), seen.clone());
                std::thread::spawn(move || {
                    for i in 0..1_000u32 {
                        let _ = batches.push(t * 10_000 + i, |run| {
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
        batches.flush_all(|rest| seen.lock().extend_from_slice(rest));
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
        batches.flush_all(|rest| panic!("{} samples left after a flush", rest.len()));
    }

    /// A flush is asked for by the first sample after a flush, not by every sample, and
    /// again after the next flush.
    #[test]
    fn a_flush_is_asked_for_once_per_flush() {
        let batches = Batches::<Vec<u32>>::with_shards(1);
        assert!(batches.push(1, |_| unreachable!()), "the first sample asks");
        assert!(
            !batches.push(2, |_| unreachable!()),
            "the second does not ask again"
        );
        batches.flush_all(|run| assert_eq!(run, &[1, 2]));
        assert!(
            batches.push(3, |_| unreachable!()),
            "the first sample after a flush asks"
        );
    }
}
