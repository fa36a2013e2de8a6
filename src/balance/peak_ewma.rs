//! PeakEWMA: power of two choices on latency × calls in flight, as tower's `p2c` over its
//! `PeakEwma` load and linkerd's balancer.
//!
//! Each connection keeps an [`RttEstimate`]: the time from a call's pick to its response
//! headers (tower's default `CompleteOnResponse`; for a streaming call the body's length says
//! nothing of the server's speed), updated by tower's rule — a slower response replaces the
//! estimate at once (the *peak*), a faster one moves it by the weight of the time since the
//! last update (`1 - e^(-elapsed/decay)`). Reading it decays it toward zero by the time since
//! that update, so that an idle server whose estimate is high is tried again; unlike tower,
//! reading stores nothing, so picks do not change what a later response weighs and the
//! estimate is two atomics, not a mutex.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use super::picker::{Choice, Pickable, Policy, Ready};
use super::{PEAK_EWMA_DECAY, PEAK_EWMA_DEFAULT_RTT};

/// The process's one clock epoch: the first time anything asked for it.
pub(crate) fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

/// Nanoseconds since [`epoch`] (one epoch per process, so that a time fits in an atomic: the
/// latency estimates, and a call's start, which also stamps its connection's last call).
#[inline]
pub(crate) fn now_ns() -> u64 {
    // Seconds and nanoseconds apart rather than `as_nanos`: no 128-bit arithmetic, on a path
    // every call takes.
    let elapsed = Instant::now().saturating_duration_since(epoch());
    elapsed
        .as_secs()
        .saturating_mul(1_000_000_000)
        .saturating_add(u64::from(elapsed.subsec_nanos()))
}

fn nanos(d: Duration) -> f64 {
    d.as_secs_f64() * 1e9
}

/// A connection's peak-sensitive moving average of its response times, lock-free.
///
/// Two atomics, written one after the other: two responses recorded at the same instant may
/// lose one of them, and a read between the two stores sees the new estimate with the old
/// time (decayed a little more). Both are harmless to an estimate.
#[derive(Debug)]
pub struct RttEstimate {
    /// The estimate at `at_ns`, in nanoseconds, as `f64` bits.
    rtt_ns: AtomicU64,
    /// When it was last updated ([`now_ns`]).
    at_ns: AtomicU64,
}

impl Default for RttEstimate {
    fn default() -> Self {
        Self::starting_at(now_ns(), nanos(PEAK_EWMA_DEFAULT_RTT))
    }
}

impl RttEstimate {
    /// A connection that has not answered yet: the default estimate, as of now.
    pub fn new() -> Self {
        Self::default()
    }

    pub(crate) fn starting_at(now: u64, rtt_ns: f64) -> Self {
        Self {
            rtt_ns: AtomicU64::new(rtt_ns.to_bits()),
            at_ns: AtomicU64::new(now),
        }
    }

    /// Records a response that came `rtt` after its call was picked.
    pub fn observe(&self, rtt: Duration) {
        self.observe_at(now_ns(), nanos(rtt), nanos(PEAK_EWMA_DECAY));
    }

    /// Tower's update rule at `now`.
    fn observe_at(&self, now: u64, rtt_ns: f64, decay_ns: f64) {
        let prior = f64::from_bits(self.rtt_ns.load(Ordering::Relaxed));
        let next = if prior < rtt_ns {
            rtt_ns
        } else {
            let elapsed = now.saturating_sub(self.at_ns.load(Ordering::Relaxed)) as f64;
            let weight = (-elapsed / decay_ns).exp();
            prior * weight + rtt_ns * (1.0 - weight)
        };
        self.rtt_ns.store(next.to_bits(), Ordering::Relaxed);
        self.at_ns.store(now, Ordering::Relaxed);
    }

    /// The estimate at `now`: decayed toward zero since its last update.
    pub(crate) fn estimate_at(&self, now: u64, decay_ns: f64) -> f64 {
        let rtt = f64::from_bits(self.rtt_ns.load(Ordering::Relaxed));
        let elapsed = now.saturating_sub(self.at_ns.load(Ordering::Relaxed)) as f64;
        rtt * (-elapsed / decay_ns).exp()
    }
}

/// Of two different addresses drawn at random, the one with the lower cost — its latency
/// estimate (the mean over its available connections) times its calls in flight + 1; then,
/// of two of its connections, the one with the lower estimate × (calls in flight + 1).
#[derive(Clone, Copy, Debug)]
pub struct PeakEwma {
    decay_ns: f64,
    default_rtt_ns: f64,
}

impl Default for PeakEwma {
    fn default() -> Self {
        Self {
            decay_ns: nanos(PEAK_EWMA_DECAY),
            default_rtt_ns: nanos(PEAK_EWMA_DEFAULT_RTT),
        }
    }
}

impl PeakEwma {
    fn rtt_of<T: Pickable>(&self, entry: &T, now: u64) -> f64 {
        entry.rtt().map_or(self.default_rtt_ns, |rtt| {
            rtt.estimate_at(now, self.decay_ns)
        })
    }
}

impl Policy for PeakEwma {
    #[inline]
    fn pick<'a, T: Pickable>(
        &self,
        ready: &'a Ready<T>,
        _cursor: &AtomicUsize,
    ) -> Option<Choice<'a, T>> {
        let now = now_ns();
        let address_cost = |entries: &[T]| {
            let (count, rtt_sum, in_flight) = entries
                .iter()
                .filter(|e| e.is_available())
                .fold((0usize, 0.0f64, 0usize), |(n, rtt, calls), e| {
                    (n + 1, rtt + self.rtt_of(e, now), calls + e.in_flight())
                });
            (count > 0).then(|| rtt_sum / count as f64 * (in_flight + 1) as f64)
        };
        let entry_cost = |entry: &T| {
            entry
                .is_available()
                .then(|| self.rtt_of(entry, now) * (entry.in_flight() + 1) as f64)
        };
        ready.two_choices(address_cost, entry_cost)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: f64 = 1e6;
    const DECAY: f64 = 10_000.0 * MS;

    /// A slower response replaces the estimate at once; a faster one moves it by the weight
    /// of the time since the last update; reading decays it toward zero without storing.
    #[test]
    fn peaks_at_once_and_decays_with_time() {
        let rtt = RttEstimate::starting_at(0, 30.0 * MS);
        rtt.observe_at(0, 50.0 * MS, DECAY);
        assert_eq!(rtt.estimate_at(0, DECAY), 50.0 * MS);
        // One decay later a 1 ms response has weight 1 - 1/e.
        rtt.observe_at(DECAY as u64, MS, DECAY);
        let expected = 50.0 * MS / std::f64::consts::E + MS * (1.0 - 1.0 / std::f64::consts::E);
        let got = rtt.estimate_at(DECAY as u64, DECAY);
        assert!((got - expected).abs() < 1.0, "{got} vs {expected}");
        // Idle for another decay: read as 1/e of it, twice alike (reading stores nothing).
        let later = 2 * DECAY as u64;
        let read = rtt.estimate_at(later, DECAY);
        assert!((read - expected / std::f64::consts::E).abs() < 1.0);
        assert_eq!(rtt.estimate_at(later, DECAY), read);
    }

    /// Responses at the same instant as the last update weigh nothing unless they are a peak.
    #[test]
    fn same_instant_faster_response_keeps_the_peak() {
        let rtt = RttEstimate::starting_at(5, 20.0 * MS);
        rtt.observe_at(5, MS, DECAY);
        assert_eq!(rtt.estimate_at(5, DECAY), 20.0 * MS);
    }
}
