//! [`Latencies`]: a log-linear latency histogram of fixed size, so that a step's memory does
//! not grow with its calls, precise to about 3 % (32 buckets per power of two).
//!
//! Values are microseconds. Below 64 µs every value has its own bucket; above, a value falls in
//! the bucket named by its power of two and its next five bits, as HDR histograms do.

use std::time::Duration;

/// Buckets per power of two above the exact range.
const SUB_BUCKETS: usize = 32;
/// Values (µs) kept exactly, one bucket each.
const EXACT: u64 = 2 * SUB_BUCKETS as u64;
/// The largest power of two kept apart; longer latencies (over 12 days) share the last bucket.
const MAX_SHIFT: usize = 34;
/// Every bucket: the exact ones, then 32 per power of two up to `MAX_SHIFT`.
const BUCKETS: usize = (MAX_SHIFT + 2) * SUB_BUCKETS;

/// A latency histogram of fixed size: 32 buckets per power of two (about 3 % precise),
/// exact below 64 µs, so its memory does not grow with the calls it counts.
#[derive(Clone, Debug)]
pub struct Latencies {
    counts: Box<[u64]>,
    total: u64,
}

impl Default for Latencies {
    fn default() -> Self {
        Self {
            counts: vec![0; BUCKETS].into_boxed_slice(),
            total: 0,
        }
    }
}

/// The bucket of a value in microseconds.
fn index(micros: u64) -> usize {
    if micros < EXACT {
        return micros as usize;
    }
    // The top six bits (32..=63) of the value, and how far they were shifted down.
    let shift = (63 - micros.leading_zeros() as usize) - 5;
    let top = (micros >> shift) as usize;
    ((shift + 1) * SUB_BUCKETS + top - SUB_BUCKETS).min(BUCKETS - 1)
}

/// The middle of a bucket, in microseconds.
fn middle(index: usize) -> u64 {
    if (index as u64) < EXACT {
        return index as u64;
    }
    let shift = index / SUB_BUCKETS - 1;
    let low = ((index % SUB_BUCKETS + SUB_BUCKETS) as u64) << shift;
    low + ((1u64 << shift) >> 1)
}

impl Latencies {
    /// Counts one latency.
    pub fn record(&mut self, latency: Duration) {
        let micros = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
        self.counts[index(micros)] += 1;
        self.total += 1;
    }

    /// Adds every count of `other`.
    pub fn merge(&mut self, other: &Latencies) {
        for (mine, theirs) in self.counts.iter_mut().zip(other.counts.iter()) {
            *mine += theirs;
        }
        self.total += other.total;
    }

    /// How many latencies were recorded.
    pub fn count(&self) -> u64 {
        self.total
    }

    /// The latency below which a fraction `q` (0.0..=1.0) of the calls fell, or `None` if
    /// none was recorded.
    pub fn quantile(&self, q: f64) -> Option<Duration> {
        if self.total == 0 {
            return None;
        }
        // The rank of the wanted call, 1-based: the p99 of 100 calls is the 99th.
        let rank = ((q.clamp(0.0, 1.0) * self.total as f64).ceil() as u64).max(1);
        let mut seen = 0;
        for (bucket, &count) in self.counts.iter().enumerate() {
            seen += count;
            if seen >= rank {
                return Some(Duration::from_micros(middle(bucket)));
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Buckets are contiguous and ordered, and each value's bucket middle is within 3.2 % of it.
    #[test]
    fn buckets_are_ordered_and_close() {
        let mut last = 0;
        for micros in (0..200_000u64).chain([1 << 20, 3 << 30, (1 << 40) - 1]) {
            let bucket = index(micros);
            assert!(bucket >= last && bucket <= last + 1 || micros >= 200_000);
            last = bucket;
            let error = middle(bucket).abs_diff(micros) as f64 / micros.max(1) as f64;
            assert!(
                error <= 0.032,
                "{micros} µs: bucket middle {}",
                middle(bucket)
            );
        }
        assert_eq!(index(u64::MAX), BUCKETS - 1);
    }

    /// Quantiles rank the recorded calls: of 1..=100 ms, p50 is 50 ms and p99 is 99 ms (to
    /// the bucket's precision); an empty histogram has none.
    #[test]
    fn quantiles() {
        let mut latencies = Latencies::default();
        assert_eq!(latencies.quantile(0.5), None);
        let mut other = Latencies::default();
        for ms in 1..=100u64 {
            let half = if ms % 2 == 0 {
                &mut latencies
            } else {
                &mut other
            };
            half.record(Duration::from_millis(ms));
        }
        latencies.merge(&other);
        assert_eq!(latencies.count(), 100);
        let near = |got: Option<Duration>, ms: f64| {
            let got = got.unwrap().as_secs_f64() * 1000.0;
            (got - ms).abs() / ms < 0.032
        };
        assert!(near(latencies.quantile(0.5), 50.0));
        assert!(near(latencies.quantile(0.99), 99.0));
        assert!(near(latencies.quantile(0.0), 1.0));
    }
}
