//! The sweep: which N to measure, and the knee rule that picks the recommendation.
//!
//! The coarse pass measures N = 1, 2, 4, … up to `--max-connections` (the maximum itself
//! too). The knee found there lies between two measured values; the refining pass bisects
//! that gap, at most [`MAX_REFINE_STEPS`] more steps, and the knee is then taken again over
//! every step. So a sweep is at most ⌈log2 max⌉ + 1 + 3 steps, each bounded in time.

use std::collections::BTreeSet;
use std::io::Write;

use super::report::Report;
use super::step::{measure, Step};
use super::{Options, TuneError};

/// At most this many steps refine the knee after the coarse pass.
pub const MAX_REFINE_STEPS: usize = 3;
/// A knee's req/s may be this far below the best.
const RATE_TOLERANCE: f64 = 0.05;
/// A knee's p99 may be this far above the best.
const P99_TOLERANCE: f64 = 0.10;
/// A knee's backends must each take at least this share of the busiest one's calls.
const MIN_BALANCE: f64 = 0.8;
/// Steps with more failed calls than this are not candidates.
const MAX_ERROR_RATE: f64 = 0.01;

/// The coarse pass: 1, 2, 4, … below `max`, then `max`.
pub fn coarse_plan(max: usize) -> Vec<usize> {
    let mut plan: Vec<usize> = std::iter::successors(Some(1usize), |n| n.checked_mul(2))
        .take_while(|&n| n < max)
        .collect();
    plan.push(max);
    plan
}

/// The bests a knee is measured against, over every step measured so far.
#[derive(Debug)]
struct Bests {
    rate: f64,
    p99: f64,
    /// Every backend any step reached (empty without a backend header).
    backends: BTreeSet<String>,
}

impl Bests {
    /// The bests over the steps that could be a knee: few errors and, when backends are
    /// known, balanced. An N that leaves backends idle or uneven may well post the best
    /// req/s (fewer, busier connections), but it is not one to recommend, so it must not set
    /// the bar the others are held to.
    fn of(steps: &[Step]) -> Self {
        let mut bests = Self {
            rate: 0.0,
            p99: f64::INFINITY,
            backends: steps
                .iter()
                .flat_map(|s| s.backends.keys().cloned())
                .collect(),
        };
        let candidates: Vec<&Step> = steps
            .iter()
            .filter(|s| s.error_rate() <= MAX_ERROR_RATE && bests.balanced(s))
            .collect();
        bests.rate = candidates
            .iter()
            .map(|s| s.req_per_sec())
            .fold(0.0, f64::max);
        bests.p99 = candidates
            .iter()
            .filter_map(|s| s.p99())
            .map(|p| p.as_secs_f64())
            .fold(f64::INFINITY, f64::min);
        bests
    }

    /// Whether the calls of `step` spread well enough over the known backends (true when
    /// none is known).
    fn balanced(&self, step: &Step) -> bool {
        step.balance(&self.backends)
            .is_none_or(|balance| balance >= MIN_BALANCE)
    }

    /// The knee rule: few errors, req/s within 5 % of the best, p99 within 10 % of the
    /// best, and the backends balanced.
    fn meets(&self, step: &Step) -> bool {
        let p99_ok = step
            .p99()
            .is_some_and(|p| p.as_secs_f64() <= self.p99 * (1.0 + P99_TOLERANCE));
        step.error_rate() <= MAX_ERROR_RATE
            && step.req_per_sec() >= self.rate * (1.0 - RATE_TOLERANCE)
            && p99_ok
            && self.balanced(step)
    }
}

/// How the recommendation was chosen.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum KneeKind {
    /// The smallest N that met every condition of the knee rule.
    Knee,
    /// No N met them all (noisy measurements, most likely): the balanced step with the
    /// most req/s, or failing that the step with the most req/s.
    BestRate,
}

/// The knee of `steps`: the smallest N whose req/s is within 5 % of the best, whose p99 is
/// within 10 % of the best p99 and, when backends are known, whose least-used backend took
/// at least 0.8 of the busiest one's calls; steps with over 1 % failed calls never qualify,
/// and the bests are taken over the steps that could qualify (few errors, balanced).
/// When no step meets every condition, the fallback is named by [`KneeKind::BestRate`].
/// `None` if no step has calls enough to judge.
pub fn knee(steps: &[Step]) -> Option<(usize, KneeKind)> {
    let bests = Bests::of(steps);
    let mut by_n: Vec<&Step> = steps.iter().collect();
    by_n.sort_by_key(|s| s.connections);
    if let Some(step) = by_n.iter().find(|s| bests.meets(s)) {
        return Some((step.connections, KneeKind::Knee));
    }
    let usable = by_n.iter().filter(|s| s.error_rate() <= MAX_ERROR_RATE);
    let best_of = |candidates: Vec<&&Step>| {
        candidates
            .into_iter()
            .max_by(|a, b| a.req_per_sec().total_cmp(&b.req_per_sec()))
            .map(|s| (s.connections, KneeKind::BestRate))
    };
    best_of(usable.clone().filter(|s| bests.balanced(s)).collect())
        .or_else(|| best_of(usable.collect()))
}

/// Runs the whole sweep for `options`, writing progress lines to `progress` (stderr, for the
/// binary), and returns the measured steps and the recommendation.
///
/// Stops at the first step that cannot run or whose calls are refused for good (see
/// [`TuneError`]); each step is bounded in time, and there are at most
/// ⌈log2 max⌉ + 1 + [`MAX_REFINE_STEPS`] of them.
pub async fn run(options: &Options, progress: &mut dyn Write) -> Result<Report, TuneError> {
    let plan = coarse_plan(options.max_connections);
    let most_steps = plan.len() + MAX_REFINE_STEPS;
    let mut steps: Vec<Step> = Vec::with_capacity(most_steps);
    for &n in &plan {
        announce(progress, options, steps.len() + 1, most_steps, n);
        let step = measure(options, n).await?;
        report_step(progress, &step);
        steps.push(step);
    }

    // Refine: bisect the gap below the coarse knee, keeping the rule's verdict at each probe.
    if let Some((coarse_knee, KneeKind::Knee)) = knee(&steps) {
        let below = steps
            .iter()
            .map(|s| s.connections)
            .filter(|&n| n < coarse_knee)
            .max();
        if let Some(mut low) = below {
            let mut high = coarse_knee;
            for _ in 0..MAX_REFINE_STEPS {
                if high - low <= 1 {
                    break;
                }
                let middle = low + (high - low) / 2;
                announce(progress, options, steps.len() + 1, most_steps, middle);
                let step = measure(options, middle).await?;
                report_step(progress, &step);
                steps.push(step);
                let bests = Bests::of(&steps);
                if bests.meets(steps.last().expect("just pushed")) {
                    high = middle;
                } else {
                    low = middle;
                }
            }
        }
    }

    steps.sort_by_key(|s| s.connections);
    let (recommended, kind) = knee(&steps).ok_or_else(|| TuneError::CallFailed {
        status: tonic::Status::unavailable("every step had over 1 % failed calls"),
    })?;
    let _ = writeln!(progress, "[{}] done", "#".repeat(20));
    Ok(Report::new(options, steps, recommended, kind))
}

/// One progress line, with a bar, as step `number` (of at most `most_steps`) starts.
fn announce(
    progress: &mut dyn Write,
    options: &Options,
    number: usize,
    most_steps: usize,
    n: usize,
) {
    let filled = (number - 1) * 20 / most_steps;
    // Progress is best effort: a closed stderr must not stop the measurement.
    let _ = writeln!(
        progress,
        "[{}{}] step {number} (at most {most_steps}): N = {n}, {} calls in flight for {:?}",
        "#".repeat(filled),
        ".".repeat(20 - filled),
        options.concurrency,
        options.step_duration,
    );
}

/// One progress line with a step's headline numbers.
fn report_step(progress: &mut dyn Write, step: &Step) {
    let ms = |d: Option<std::time::Duration>| d.map_or(f64::NAN, |d| d.as_secs_f64() * 1000.0);
    let _ = writeln!(
        progress,
        "    N = {}: {:.0} req/s, p99 {:.2} ms, {} errors",
        step.connections,
        step.req_per_sec(),
        ms(step.p99()),
        step.error_count()
    );
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::tune::histogram::Latencies;

    /// A step of N connections: `rate` calls in one second, every one taking `p99_ms`, spread
    /// over `backends` as given.
    fn step(n: usize, rate: u64, p99_ms: u64, backends: &[(&str, u64)]) -> Step {
        let mut latencies = Latencies::default();
        for _ in 0..rate {
            latencies.record(Duration::from_millis(p99_ms));
        }
        Step {
            connections: n,
            ok: rate,
            elapsed: Duration::from_secs(1),
            latencies,
            connections_open: n,
            backends: backends.iter().map(|(b, n)| (b.to_string(), *n)).collect(),
            ..Step::default()
        }
    }

    /// The coarse pass doubles up to the maximum and ends on it.
    #[test]
    fn coarse_plan_doubles_to_the_max() {
        assert_eq!(coarse_plan(1), [1]);
        assert_eq!(coarse_plan(8), [1, 2, 4, 8]);
        assert_eq!(coarse_plan(32), [1, 2, 4, 8, 16, 32]);
        assert_eq!(coarse_plan(20), [1, 2, 4, 8, 16, 20]);
    }

    /// The knee is the smallest N within 5 % of the best req/s and 10 % of the best p99.
    #[test]
    fn knee_is_the_smallest_n_near_both_bests() {
        let steps = [
            step(1, 400, 80, &[]),
            step(2, 800, 40, &[]),
            step(4, 1560, 21, &[]), // 2.5 % below the best rate, p99 5 % above
            step(8, 1600, 20, &[]),
        ];
        assert_eq!(knee(&steps), Some((4, KneeKind::Knee)));
        // p99 more than 10 % above the best disqualifies it.
        let steps = [step(4, 1600, 23, &[]), step(8, 1600, 20, &[])];
        assert_eq!(knee(&steps), Some((8, KneeKind::Knee)));
        // So does a req/s more than 5 % below the best.
        let steps = [step(4, 1500, 20, &[]), step(8, 1600, 20, &[])];
        assert_eq!(knee(&steps), Some((8, KneeKind::Knee)));
    }

    /// With backends known, a knee must also spread its calls: each backend at least 0.8 of
    /// the busiest, counting backends seen only in other steps as 0.
    #[test]
    fn knee_needs_balanced_backends() {
        let steps = [
            step(1, 1000, 10, &[("a", 1000)]),
            step(2, 1000, 10, &[("a", 500), ("b", 500)]),
            step(3, 1000, 10, &[("a", 334), ("b", 333), ("c", 333)]),
            step(
                4,
                1000,
                10,
                &[("a", 250), ("b", 250), ("c", 250), ("d", 250)],
            ),
            step(
                5,
                1000,
                10,
                &[("a", 400), ("b", 200), ("c", 200), ("d", 200)],
            ),
        ];
        assert_eq!(knee(&steps), Some((4, KneeKind::Knee)));
    }

    /// An unbalanced step does not set the bests either: N = 7 over four backends may post
    /// the best req/s, and must not push the balanced steps out of the knee's 5 %.
    #[test]
    fn unbalanced_steps_do_not_set_the_bests() {
        let even = [("a", 100), ("b", 100), ("c", 100), ("d", 100)];
        let uneven = [("a", 200), ("b", 200), ("c", 200), ("d", 100)];
        let steps = [
            step(4, 400, 180, &even),
            step(7, 720, 130, &uneven),
            step(8, 650, 180, &even),
            step(16, 660, 165, &even),
        ];
        assert_eq!(knee(&steps), Some((8, KneeKind::Knee)));
    }

    /// A step with over 1 % failed calls is never the knee, and does not set the bests.
    #[test]
    fn failing_steps_are_not_candidates() {
        let mut failing = step(2, 2000, 5, &[]);
        failing.errors.insert("Unavailable".into(), 100);
        let steps = [step(1, 1000, 10, &[]), failing, step(4, 1000, 10, &[])];
        assert_eq!(knee(&steps), Some((1, KneeKind::Knee)));
    }

    /// When no step meets every condition, the balanced step with the most req/s is the
    /// fallback; no usable step at all gives no knee.
    #[test]
    fn fallback_is_the_best_rate() {
        // Best rate at N=4 but its p99 is 50 % above N=8's; N=8's rate is 10 % lower.
        let steps = [step(4, 1000, 30, &[]), step(8, 900, 20, &[])];
        assert_eq!(knee(&steps), Some((4, KneeKind::BestRate)));
        let mut failing = step(1, 10, 5, &[]);
        failing.errors.insert("Unavailable".into(), 10);
        assert_eq!(knee(&[failing]), None);
        assert_eq!(knee(&[]), None);
    }
}
