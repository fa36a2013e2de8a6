//! The process's flusher: one thread that sends to the recorder, within
//! [`FLUSH_AFTER`](super::batch::FLUSH_AFTER), what the pools' recording threads left in
//! their batches.
//!
//! Under load a thread flushes its own batch every few dozen calls, and only a thread that
//! went quiet leaves samples behind; something must come for them without a call. That is a
//! timer, and it must not be one of the application's runtime: a pending tokio timer — which
//! under load is always, since some thread always has a batch begun — makes every park of
//! every runtime worker read the clock and walk the timer wheel (`benches/RESULTS.md`
//! section 26). This thread sleeps on a condition variable while no pool has asked, and
//! otherwise wakes once per [`FLUSH_AFTER`](super::batch::FLUSH_AFTER) for all the pools
//! that asked: a wake-up a second under load, none when idle.
//!
//! It holds pools weakly: a pool dropped before its flush is not kept (its own drop flushed
//! it). If the thread cannot be started, pools flush at their snapshots, close and drop only.

use std::sync::{OnceLock, Weak};

use parking_lot::{Condvar, Mutex};

use super::batch::FLUSH_AFTER;
use super::PoolMetrics;

/// The pools that asked for a flush since the thread last flushed.
#[derive(Debug, Default)]
struct Flusher {
    asked: Mutex<Vec<Weak<PoolMetrics>>>,
    wake: Condvar,
}

/// The flusher, its thread started on first use; `None` if the thread could not start.
fn flusher() -> Option<&'static Flusher> {
    static FLUSHER: OnceLock<Option<&'static Flusher>> = OnceLock::new();
    *FLUSHER.get_or_init(|| {
        let flusher: &'static Flusher = Box::leak(Box::default());
        std::thread::Builder::new()
            .name("tonic-pool-metrics".into())
            .spawn(move || flusher.run())
            .ok()
            .map(|_| flusher)
    })
}

/// Asks for `pool`'s batches to be flushed within
/// [`FLUSH_AFTER`](super::batch::FLUSH_AFTER).
pub(super) fn ask(pool: Weak<PoolMetrics>) {
    if let Some(flusher) = flusher() {
        flusher.asked.lock().push(pool);
        flusher.wake.notify_one();
    }
}

impl Flusher {
    fn run(&self) {
        loop {
            {
                let mut asked = self.asked.lock();
                while asked.is_empty() {
                    self.wake.wait(&mut asked);
                }
            }
            // The first ask of a round waits at most this long; later ones less.
            std::thread::sleep(FLUSH_AFTER);
            let due = std::mem::take(&mut *self.asked.lock());
            // (A pool whose last other reference went meanwhile is dropped here, after its
            // flush: its drop flushes again, finding nothing.)
            for pool in due.iter().filter_map(Weak::upgrade) {
                pool.flush();
            }
        }
    }
}
