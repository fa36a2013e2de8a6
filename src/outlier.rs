//! Outlier detection (gRFC A50): addresses whose calls fail much more than their peers' are
//! ejected — taken out of picking — for a while, then given back.
//!
//! Every [`OutlierDetection::interval`] the worker asks the registry to evaluate: for each
//! address in the address set it takes the calls that ended since the last interval (the
//! deltas of the endpoint's always-on counters, so the call path pays nothing more), runs the
//! pure [`evaluate`] below, and republishes the picker if an address was ejected or given
//! back. An ejected address is left out of the picker the registry builds, so picks stay
//! lock-free and see ejection the moment the new picker is published; its connections stay
//! open, its calls in flight finish.
//!
//! What counts (A50 leaves the classification to the implementation; gRPC counts every
//! non-`OK` status as a failure):
//!
//! | class of [`CallCounts`] | counts as |
//! |---|---|
//! | `succeeded` (`OK`) | success |
//! | `unavailable` (`UNAVAILABLE`), `errors` (every other status: `INTERNAL`, `UNKNOWN`, `NOT_FOUND`, …) | failure |
//! | `cancelled` (`CANCELLED`, `DEADLINE_EXCEEDED`, dropped by the caller) | neither: the caller gave up, which says nothing about the server |
//! | `retried` (transparently retried elsewhere) | neither: the call never reached the application |
//!
//! One interval, as A50 gives it:
//!
//! 1. Success rate (if configured): if fewer than `minimum_hosts` addresses had at least
//!    `request_volume` calls, stop. Otherwise take those addresses' success rates, their mean
//!    and (population) standard deviation; each address whose rate is below
//!    `mean - stdev * stdev_factor` is ejected with probability `enforcement_percentage`.
//! 2. Failure percentage (if configured): the same volume gate; each address whose failure
//!    percentage is above `threshold` is ejected with probability `enforcement_percentage`.
//! 3. Before each ejection: if the ejected addresses are already `max_ejection_percent` of
//!    the address set or more, stop — checked before, so one address can always be ejected
//!    (unless the percent is 0).
//! 4. An ejection raises the address's multiplier by one; each interval an address is not
//!    ejected lowers it by one (down to 0). An ejected address comes back once
//!    `min(base_ejection_time * multiplier, max(base_ejection_time, max_ejection_time))` has
//!    passed since its ejection.
//!
//! Ejection only removes an address from picking. If every address with a Ready connection
//! is ejected anyway (possible with `max_ejection_percent` at 100), gRPC would fail every call
//! with no pickable address; this pool instead picks among the ejected ones as if none were:
//! an outlier is better than no server at all. Addresses already ejected are not evaluated
//! again (they get no new calls, so their few counts would say little).

use std::time::{Duration, Instant};

use crate::state::CallCounts;

/// Outlier detection settings (gRFC A50), for
/// [`PoolBuilder::outlier_detection`](crate::PoolBuilder::outlier_detection).
///
/// The default is A50's: evaluated every 10 s; an address is ejected for 30 s times the
/// number of times it was ejected (lowered by one each interval it is not), at most
/// 300 s; at most 10 % of the addresses ejected at once (checked before each ejection, so one
/// address can always be ejected); success-rate ejection on with its defaults,
/// failure-percentage ejection off until set.
///
/// ```
/// use std::time::Duration;
/// use tonic_pool::{FailurePercentageEjection, OutlierDetection};
///
/// let detection = OutlierDetection::default()
///     .interval(Duration::from_secs(5))
///     .failure_percentage(Some(FailurePercentageEjection::default().threshold(50)));
/// # let _ = detection;
/// ```
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct OutlierDetection {
    /// How often addresses are evaluated (default 10 s).
    pub interval: Duration,
    /// How long an address is ejected, times the number of its ejections (default 30 s).
    pub base_ejection_time: Duration,
    /// The longest ejection (default 300 s; never below `base_ejection_time`).
    pub max_ejection_time: Duration,
    /// The most addresses ejected at once, in percent of the address set (default 10).
    pub max_ejection_percent: u32,
    /// Success-rate ejection (default on, with its defaults).
    pub success_rate: Option<SuccessRateEjection>,
    /// Failure-percentage ejection (default off).
    pub failure_percentage: Option<FailurePercentageEjection>,
}

impl Default for OutlierDetection {
    fn default() -> Self {
        Self {
            interval: Duration::from_secs(10),
            base_ejection_time: Duration::from_secs(30),
            max_ejection_time: Duration::from_secs(300),
            max_ejection_percent: 10,
            success_rate: Some(SuccessRateEjection::default()),
            failure_percentage: None,
        }
    }
}

impl OutlierDetection {
    /// How often addresses are evaluated; must be greater than zero.
    pub fn interval(mut self, interval: Duration) -> Self {
        self.interval = interval;
        self
    }

    /// How long an address is ejected, times the number of its ejections.
    pub fn base_ejection_time(mut self, time: Duration) -> Self {
        self.base_ejection_time = time;
        self
    }

    /// The longest ejection (`base_ejection_time` if that is longer).
    pub fn max_ejection_time(mut self, time: Duration) -> Self {
        self.max_ejection_time = time;
        self
    }

    /// The most addresses ejected at once, in percent of the address set (0..=100).
    pub fn max_ejection_percent(mut self, percent: u32) -> Self {
        self.max_ejection_percent = percent;
        self
    }

    /// Success-rate ejection, or `None` for none.
    pub fn success_rate(mut self, ejection: Option<SuccessRateEjection>) -> Self {
        self.success_rate = ejection;
        self
    }

    /// Failure-percentage ejection, or `None` for none.
    pub fn failure_percentage(mut self, ejection: Option<FailurePercentageEjection>) -> Self {
        self.failure_percentage = ejection;
        self
    }

    /// Checks the settings; the error names the one that is wrong.
    pub(crate) fn validate(&self) -> Result<(), String> {
        if self.interval.is_zero() {
            return Err("outlier_detection: interval must be greater than zero".into());
        }
        let mut percents = vec![("max_ejection_percent", self.max_ejection_percent)];
        if let Some(s) = &self.success_rate {
            if !s.stdev_factor.is_finite() || s.stdev_factor < 0.0 {
                return Err(format!(
                    "outlier_detection: success_rate.stdev_factor must be a finite number >= 0, got {}",
                    s.stdev_factor
                ));
            }
            percents.push((
                "success_rate.enforcement_percentage",
                s.enforcement_percentage,
            ));
        }
        if let Some(f) = &self.failure_percentage {
            percents.push(("failure_percentage.threshold", f.threshold));
            percents.push((
                "failure_percentage.enforcement_percentage",
                f.enforcement_percentage,
            ));
        }
        for (name, percent) in percents {
            if percent > 100 {
                return Err(format!(
                    "outlier_detection: {name} is a percentage (0..=100), got {percent}"
                ));
            }
        }
        Ok(())
    }

    /// How long an address ejected for the `multiplier`-th time stays out.
    fn ejection_time(&self, multiplier: u32) -> Duration {
        self.base_ejection_time
            .saturating_mul(multiplier)
            .min(self.base_ejection_time.max(self.max_ejection_time))
    }
}

/// Success-rate ejection (gRFC A50): an address whose success rate is more than
/// `stdev_factor` standard deviations below the mean of its peers' is ejected.
///
/// The default is A50's: factor 1.9, enforced always (100 %), evaluated only when at least 5
/// addresses had at least 100 calls in the interval.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct SuccessRateEjection {
    /// How many standard deviations below the mean is an outlier (default 1.9; A50's
    /// configuration writes it times 1000, 1900).
    pub stdev_factor: f64,
    /// The chance, in percent, that an outlier found is ejected (default 100).
    pub enforcement_percentage: u32,
    /// The fewest addresses with enough calls for the evaluation to run (default 5).
    pub minimum_hosts: u32,
    /// The fewest calls in the interval for an address to be counted (default 100).
    pub request_volume: u32,
}

impl Default for SuccessRateEjection {
    fn default() -> Self {
        Self {
            stdev_factor: 1.9,
            enforcement_percentage: 100,
            minimum_hosts: 5,
            request_volume: 100,
        }
    }
}

impl SuccessRateEjection {
    /// How many standard deviations below the mean is an outlier.
    pub fn stdev_factor(mut self, factor: f64) -> Self {
        self.stdev_factor = factor;
        self
    }

    /// The chance, in percent (0..=100), that an outlier found is ejected.
    pub fn enforcement_percentage(mut self, percent: u32) -> Self {
        self.enforcement_percentage = percent;
        self
    }

    /// The fewest addresses with enough calls for the evaluation to run.
    pub fn minimum_hosts(mut self, hosts: u32) -> Self {
        self.minimum_hosts = hosts;
        self
    }

    /// The fewest calls in the interval for an address to be counted.
    pub fn request_volume(mut self, calls: u32) -> Self {
        self.request_volume = calls;
        self
    }
}

/// Failure-percentage ejection (gRFC A50): an address whose calls failed more than
/// `threshold` percent of the time in the interval is ejected.
///
/// The default is A50's: threshold 85 %, enforced always (100 %), evaluated only when at
/// least 5 addresses had at least 50 calls in the interval.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct FailurePercentageEjection {
    /// The failure percentage above which an address is ejected (default 85).
    pub threshold: u32,
    /// The chance, in percent, that an outlier found is ejected (default 100).
    pub enforcement_percentage: u32,
    /// The fewest addresses with enough calls for the evaluation to run (default 5).
    pub minimum_hosts: u32,
    /// The fewest calls in the interval for an address to be counted (default 50).
    pub request_volume: u32,
}

impl Default for FailurePercentageEjection {
    fn default() -> Self {
        Self {
            threshold: 85,
            enforcement_percentage: 100,
            minimum_hosts: 5,
            request_volume: 50,
        }
    }
}

impl FailurePercentageEjection {
    /// The failure percentage (0..=100) above which an address is ejected.
    pub fn threshold(mut self, percent: u32) -> Self {
        self.threshold = percent;
        self
    }

    /// The chance, in percent (0..=100), that an outlier found is ejected.
    pub fn enforcement_percentage(mut self, percent: u32) -> Self {
        self.enforcement_percentage = percent;
        self
    }

    /// The fewest addresses with enough calls for the evaluation to run.
    pub fn minimum_hosts(mut self, hosts: u32) -> Self {
        self.minimum_hosts = hosts;
        self
    }

    /// The fewest calls in the interval for an address to be counted.
    pub fn request_volume(mut self, calls: u32) -> Self {
        self.request_volume = calls;
        self
    }
}

/// Calls that ended, as outlier detection counts them (see the module docs).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Tally {
    pub(crate) successes: u64,
    pub(crate) failures: u64,
}

impl Tally {
    pub(crate) fn of(calls: &CallCounts) -> Self {
        Self {
            successes: calls.succeeded,
            failures: calls.unavailable + calls.errors,
        }
    }

    /// The calls counted since `earlier` (counters only grow).
    fn since(self, earlier: Self) -> Self {
        Self {
            successes: self.successes.saturating_sub(earlier.successes),
            failures: self.failures.saturating_sub(earlier.failures),
        }
    }

    fn volume(self) -> u64 {
        self.successes + self.failures
    }

    fn success_rate(self) -> f64 {
        self.successes as f64 / self.volume().max(1) as f64
    }
}

/// What the pool keeps about one address for outlier detection.
#[derive(Clone, Debug, Default)]
pub(crate) struct AddressOutliers {
    /// When it was ejected, while it is.
    pub(crate) ejected_at: Option<Instant>,
    /// A50's ejection time multiplier.
    multiplier: u32,
    /// How many times it was ejected.
    pub(crate) ejections: u64,
    /// Its counts at the end of the last interval.
    seen: Tally,
    /// Its calls during the interval being evaluated.
    interval: Tally,
}

impl AddressOutliers {
    pub(crate) fn is_ejected(&self) -> bool {
        self.ejected_at.is_some()
    }

    /// Starts an evaluation: `total` is everything counted so far for the address.
    pub(crate) fn end_interval(&mut self, total: Tally) {
        self.interval = total.since(self.seen);
        self.seen = total;
    }
}

/// Which check ejected an address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Reason {
    SuccessRate,
    FailurePercentage,
}

impl Reason {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::SuccessRate => "success_rate",
            Self::FailurePercentage => "failure_percentage",
        }
    }
}

/// What one evaluation changed, by index into the addresses it was given.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Change {
    Ejected {
        index: usize,
        reason: Reason,
        /// The address's success rate over the interval, 0..=1.
        success_rate: f64,
        /// The calls it was judged on.
        volume: u64,
        /// How long it stays out.
        duration: Duration,
    },
    Returned {
        index: usize,
    },
}

/// One interval of A50 over `addresses` (the address set, each with its interval's calls set
/// by [`AddressOutliers::end_interval`]); `roll` gives a uniform number in 0..100 for the
/// enforcement percentages. Returns what changed.
pub(crate) fn evaluate(
    config: &OutlierDetection,
    now: Instant,
    addresses: &mut [&mut AddressOutliers],
    roll: &mut dyn FnMut() -> u32,
) -> Vec<Change> {
    let mut changes = Vec::new();
    let total = addresses.len();
    let mut ejected = addresses.iter().filter(|a| a.is_ejected()).count();
    let mut eject = |index: usize, a: &mut AddressOutliers, reason: Reason, ejected: &mut usize| {
        a.ejected_at = Some(now);
        a.multiplier = a.multiplier.saturating_add(1);
        a.ejections += 1;
        *ejected += 1;
        changes.push(Change::Ejected {
            index,
            reason,
            success_rate: a.interval.success_rate(),
            volume: a.interval.volume(),
            duration: config.ejection_time(a.multiplier),
        });
    };
    // Checked before each ejection: one address can always be ejected.
    let room = |ejected: usize| {
        (ejected as u64) * 100 < u64::from(config.max_ejection_percent) * total as u64
    };

    if let Some(sr) = &config.success_rate {
        let counted = |a: &AddressOutliers| {
            !a.is_ejected() && a.interval.volume() >= u64::from(sr.request_volume)
        };
        let rates: Vec<f64> = addresses
            .iter()
            .filter(|a| counted(a))
            .map(|a| a.interval.success_rate())
            .collect();
        if !rates.is_empty() && rates.len() >= sr.minimum_hosts as usize {
            let n = rates.len() as f64;
            let mean = rates.iter().sum::<f64>() / n;
            let variance = rates.iter().map(|r| (r - mean).powi(2)).sum::<f64>() / n;
            let floor = mean - variance.sqrt() * sr.stdev_factor;
            for (index, a) in addresses.iter_mut().enumerate() {
                if !counted(a) {
                    continue;
                }
                if !room(ejected) {
                    break;
                }
                if a.interval.success_rate() < floor && roll() < sr.enforcement_percentage {
                    eject(index, a, Reason::SuccessRate, &mut ejected);
                }
            }
        }
    }

    if let Some(fp) = &config.failure_percentage {
        let counted = |a: &AddressOutliers| {
            !a.is_ejected() && a.interval.volume() >= u64::from(fp.request_volume)
        };
        let hosts = addresses.iter().filter(|a| counted(a)).count();
        if hosts > 0 && hosts >= fp.minimum_hosts as usize {
            for (index, a) in addresses.iter_mut().enumerate() {
                if !counted(a) {
                    continue;
                }
                if !room(ejected) {
                    break;
                }
                let failed_percent =
                    a.interval.failures as f64 * 100.0 / a.interval.volume() as f64;
                if failed_percent > f64::from(fp.threshold) && roll() < fp.enforcement_percentage {
                    eject(index, a, Reason::FailurePercentage, &mut ejected);
                }
            }
        }
    }

    for (index, a) in addresses.iter_mut().enumerate() {
        match a.ejected_at {
            None => a.multiplier = a.multiplier.saturating_sub(1),
            Some(at) if now >= at + config.ejection_time(a.multiplier) => {
                a.ejected_at = None;
                changes.push(Change::Returned { index });
            }
            Some(_) => {}
        }
    }
    changes
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECOND: Duration = Duration::from_secs(1);

    fn tally(successes: u64, failures: u64) -> Tally {
        Tally {
            successes,
            failures,
        }
    }

    /// Addresses whose interval had these (successes, failures).
    fn addresses(counts: &[(u64, u64)]) -> Vec<AddressOutliers> {
        counts
            .iter()
            .map(|&(s, f)| {
                let mut a = AddressOutliers::default();
                a.end_interval(tally(s, f));
                a
            })
            .collect()
    }

    fn run(
        config: &OutlierDetection,
        now: Instant,
        addresses: &mut [AddressOutliers],
    ) -> Vec<Change> {
        let mut refs: Vec<&mut AddressOutliers> = addresses.iter_mut().collect();
        evaluate(config, now, &mut refs, &mut || 0)
    }

    fn ejected(changes: &[Change]) -> Vec<(usize, Reason)> {
        changes
            .iter()
            .filter_map(|c| match c {
                Change::Ejected { index, reason, .. } => Some((*index, *reason)),
                Change::Returned { .. } => None,
            })
            .collect()
    }

    fn lenient(sr: SuccessRateEjection) -> OutlierDetection {
        OutlierDetection::default()
            .max_ejection_percent(100)
            .success_rate(Some(sr.request_volume(10)))
    }

    /// The defaults are A50's numbers.
    #[test]
    fn defaults_are_a50s() {
        let d = OutlierDetection::default();
        assert_eq!(d.interval, 10 * SECOND);
        assert_eq!(d.base_ejection_time, 30 * SECOND);
        assert_eq!(d.max_ejection_time, 300 * SECOND);
        assert_eq!(d.max_ejection_percent, 10);
        assert_eq!(d.success_rate, Some(SuccessRateEjection::default()));
        assert_eq!(d.failure_percentage, None);
        let sr = SuccessRateEjection::default();
        assert_eq!(
            (
                sr.stdev_factor,
                sr.enforcement_percentage,
                sr.minimum_hosts,
                sr.request_volume
            ),
            (1.9, 100, 5, 100)
        );
        let fp = FailurePercentageEjection::default();
        assert_eq!(
            (
                fp.threshold,
                fp.enforcement_percentage,
                fp.minimum_hosts,
                fp.request_volume
            ),
            (85, 100, 5, 50)
        );
        assert_eq!(d.validate(), Ok(()));
    }

    /// Out-of-range settings are refused with the setting's name.
    #[test]
    fn validation_names_the_setting() {
        let zero = OutlierDetection::default().interval(Duration::ZERO);
        assert!(zero.validate().unwrap_err().contains("interval"));
        let percent = OutlierDetection::default().max_ejection_percent(101);
        assert!(percent
            .validate()
            .unwrap_err()
            .contains("max_ejection_percent"));
        let threshold = OutlierDetection::default()
            .failure_percentage(Some(FailurePercentageEjection::default().threshold(150)));
        assert!(threshold
            .validate()
            .unwrap_err()
            .contains("failure_percentage.threshold"));
        let enforcement = OutlierDetection::default().success_rate(Some(
            SuccessRateEjection::default().enforcement_percentage(200),
        ));
        assert!(enforcement
            .validate()
            .unwrap_err()
            .contains("success_rate.enforcement_percentage"));
        let factor = OutlierDetection::default()
            .success_rate(Some(SuccessRateEjection::default().stdev_factor(f64::NAN)));
        assert!(factor.validate().unwrap_err().contains("stdev_factor"));
    }

    /// One failing address among five good ones is ejected by success rate; the good ones
    /// are not.
    #[test]
    fn success_rate_ejects_the_outlier() {
        let config = lenient(SuccessRateEjection::default());
        let mut a = addresses(&[(100, 0), (100, 0), (0, 100), (100, 0), (100, 0), (99, 1)]);
        let changes = run(&config, Instant::now(), &mut a);
        assert_eq!(ejected(&changes), vec![(2, Reason::SuccessRate)]);
        assert!(a[2].is_ejected() && a[2].ejections == 1);
        match &changes[0] {
            Change::Ejected {
                success_rate,
                volume,
                duration,
                ..
            } => {
                assert_eq!(*success_rate, 0.0);
                assert_eq!(*volume, 100);
                assert_eq!(*duration, 30 * SECOND);
            }
            other => panic!("{other:?}"),
        }
    }

    /// The threshold is mean - stdev * factor: rates 1, 1, 1, 1, 0.5 have mean 0.9 and
    /// stdev 0.2, so 0.5 is ejected with factor 1.9 (floor 0.52) but not with 2.1 (0.48).
    #[test]
    fn success_rate_threshold_is_mean_minus_stdev_times_factor() {
        let counts = [(10, 0), (10, 0), (10, 0), (10, 0), (5, 5)];
        let mut a = addresses(&counts);
        let strict = lenient(SuccessRateEjection::default());
        assert_eq!(
            ejected(&run(&strict, Instant::now(), &mut a)),
            vec![(4, Reason::SuccessRate)]
        );
        let mut a = addresses(&counts);
        let loose = lenient(SuccessRateEjection::default().stdev_factor(2.1));
        assert!(ejected(&run(&loose, Instant::now(), &mut a)).is_empty());
    }

    /// Below minimum hosts (addresses with request volume) nothing is evaluated.
    #[test]
    fn too_few_hosts_or_calls_eject_nothing() {
        let config = lenient(SuccessRateEjection::default());
        // Only four addresses have 10 calls.
        let mut a = addresses(&[(10, 0), (10, 0), (10, 0), (0, 10), (5, 4)]);
        assert!(run(&config, Instant::now(), &mut a).is_empty());
        let fp = OutlierDetection::default()
            .max_ejection_percent(100)
            .success_rate(None)
            .failure_percentage(Some(
                FailurePercentageEjection::default().request_volume(10),
            ));
        let mut a = addresses(&[(10, 0), (10, 0), (10, 0), (0, 10), (5, 4)]);
        assert!(run(&fp, Instant::now(), &mut a).is_empty());
    }

    /// Failure percentage ejects every address above the threshold (strictly), when set.
    #[test]
    fn failure_percentage_ejects_above_threshold() {
        let config = OutlierDetection::default()
            .max_ejection_percent(100)
            .success_rate(None)
            .failure_percentage(Some(
                FailurePercentageEjection::default()
                    .threshold(50)
                    .request_volume(10),
            ));
        let mut a = addresses(&[(10, 0), (4, 6), (5, 5), (0, 10), (10, 0)]);
        let changes = run(&config, Instant::now(), &mut a);
        assert_eq!(
            ejected(&changes),
            vec![
                (1, Reason::FailurePercentage),
                (3, Reason::FailurePercentage)
            ]
        );
    }

    /// Max ejection percent is checked before each ejection: with 10 % of 6 addresses, one is
    /// ejected, not the three that fail; one already ejected leaves room for none.
    #[test]
    fn max_ejection_percent_bounds_ejections() {
        let config = OutlierDetection::default()
            .success_rate(None)
            .failure_percentage(Some(
                FailurePercentageEjection::default()
                    .threshold(50)
                    .request_volume(10),
            ));
        let mut a = addresses(&[(0, 10), (0, 10), (0, 10), (10, 0), (10, 0), (10, 0)]);
        let now = Instant::now();
        assert_eq!(
            ejected(&run(&config, now, &mut a)),
            vec![(0, Reason::FailurePercentage)]
        );
        // The same calls again: two more fail, but one is already out.
        for (address, (s, f)) in
            a.iter_mut()
                .zip([(0, 10), (0, 10), (0, 10), (10, 0), (10, 0), (10, 0)])
        {
            let seen = address.seen;
            address.end_interval(tally(seen.successes + s, seen.failures + f));
        }
        assert!(ejected(&run(&config, now + SECOND, &mut a)).is_empty());
        // At 0 % nothing is ever ejected.
        let none = config.clone().max_ejection_percent(0);
        let mut a = addresses(&[(0, 10), (0, 10), (10, 0), (10, 0), (10, 0)]);
        assert!(run(&none, now, &mut a).is_empty());
    }

    /// Enforcement percentage: an outlier is ejected only when the roll is below it.
    #[test]
    fn enforcement_percentage_is_a_chance() {
        let config = lenient(SuccessRateEjection::default().enforcement_percentage(30));
        let counts = [(10, 0), (10, 0), (10, 0), (10, 0), (0, 10)];
        let mut a = addresses(&counts);
        let mut refs: Vec<&mut AddressOutliers> = a.iter_mut().collect();
        assert!(evaluate(&config, Instant::now(), &mut refs, &mut || 30).is_empty());
        let mut a = addresses(&counts);
        let mut refs: Vec<&mut AddressOutliers> = a.iter_mut().collect();
        assert_eq!(
            ejected(&evaluate(&config, Instant::now(), &mut refs, &mut || 29)).len(),
            1
        );
    }

    /// An ejected address returns after base time × multiplier (capped at the max), and the
    /// multiplier goes down one per interval it is not ejected.
    #[test]
    fn ejection_time_grows_with_multiplier_and_decays() {
        let config = lenient(SuccessRateEjection::default())
            .base_ejection_time(10 * SECOND)
            .max_ejection_time(25 * SECOND);
        let t0 = Instant::now();
        let failing = [(10, 0), (10, 0), (10, 0), (10, 0), (0, 10)];
        let mut a = addresses(&failing);
        assert_eq!(ejected(&run(&config, t0, &mut a)).len(), 1);
        // Quiet intervals: no counts, nothing evaluated; back after 10 s.
        let quiet = |a: &mut Vec<AddressOutliers>| {
            for address in a.iter_mut() {
                let seen = address.seen;
                address.end_interval(seen);
            }
        };
        quiet(&mut a);
        assert!(run(&config, t0 + 9 * SECOND, &mut a).is_empty());
        quiet(&mut a);
        assert_eq!(
            run(&config, t0 + 10 * SECOND, &mut a),
            vec![Change::Returned { index: 4 }]
        );
        assert_eq!(a[4].multiplier, 1);
        // Ejected again at once: multiplier 2, 20 s.
        let again = |a: &mut Vec<AddressOutliers>| {
            for (address, (s, f)) in a.iter_mut().zip(failing) {
                let seen = address.seen;
                address.end_interval(tally(seen.successes + s, seen.failures + f));
            }
        };
        again(&mut a);
        let t1 = t0 + 11 * SECOND;
        match &run(&config, t1, &mut a)[..] {
            [Change::Ejected {
                index: 4, duration, ..
            }] => assert_eq!(*duration, 20 * SECOND),
            other => panic!("{other:?}"),
        }
        quiet(&mut a);
        assert!(run(&config, t1 + 19 * SECOND, &mut a).is_empty());
        quiet(&mut a);
        assert_eq!(run(&config, t1 + 20 * SECOND, &mut a).len(), 1);
        // Multiplier 2 still (not lowered in the interval it returned); one ejection more
        // would be 30 s, capped at 25 s.
        again(&mut a);
        let t2 = t1 + 21 * SECOND;
        match &run(&config, t2, &mut a)[..] {
            [Change::Ejected { duration, .. }] => assert_eq!(*duration, 25 * SECOND),
            other => panic!("{other:?}"),
        }
        // After it returns, quiet intervals lower the multiplier to 0.
        quiet(&mut a);
        assert_eq!(run(&config, t2 + 25 * SECOND, &mut a).len(), 1);
        for i in 0..5 {
            quiet(&mut a);
            run(&config, t2 + (26 + i) * SECOND, &mut a);
        }
        assert_eq!(a[4].multiplier, 0);
    }

    /// Cancelled and retried calls count neither way; other non-OK statuses are failures.
    #[test]
    fn what_counts_as_failure() {
        let calls = CallCounts {
            started: 10,
            succeeded: 3,
            cancelled: 2,
            unavailable: 2,
            errors: 1,
            retried: 2,
        };
        assert_eq!(Tally::of(&calls), tally(3, 3));
    }
}
