//! [`Report`]: what a sweep found, as the binary prints it: the table per N, the SVG plot
//! (hand-written: two polylines over a log2 axis need no plotting crate), the builder line
//! and the recommendation.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::time::Duration;

use super::step::Step;
use super::sweep::KneeKind;
use super::Options;

/// What a sweep measured and recommends.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct Report {
    /// The target measured.
    pub target: String,
    /// Every step, by N.
    pub steps: Vec<Step>,
    /// The recommended `connections_per_endpoint`.
    pub recommended: usize,
    /// How it was chosen.
    pub kind: KneeKind,
    /// Every backend any step reached, when a backend header was given.
    pub backends: Vec<String>,
    /// The largest N the sweep was allowed.
    pub max_connections: usize,
}

/// Milliseconds, for the table and the plot.
fn millis(d: Option<Duration>) -> Option<f64> {
    d.map(|d| d.as_secs_f64() * 1000.0)
}

impl Report {
    pub(super) fn new(
        options: &Options,
        steps: Vec<Step>,
        recommended: usize,
        kind: KneeKind,
    ) -> Self {
        let backends: BTreeSet<String> = steps
            .iter()
            .flat_map(|s| s.backends.keys().cloned())
            .collect();
        Self {
            target: options.target.clone(),
            steps,
            recommended,
            kind,
            backends: backends.into_iter().collect(),
            max_connections: options.max_connections,
        }
    }

    /// The step measured with the recommended N.
    pub fn recommended_step(&self) -> Option<&Step> {
        self.steps
            .iter()
            .find(|s| s.connections == self.recommended)
    }

    /// The table: one row per N with req/s, p50, p99, errors, connections open and, when
    /// backends are known, how many a step reached and its min/max share; the recommended
    /// row is marked.
    pub fn table(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "{:>5} {:>10} {:>9} {:>9} {:>7} {:>6} {:>8} {:>8}",
            "N", "req/s", "p50 ms", "p99 ms", "errors", "conns", "backends", "min/max"
        );
        let cell = |v: Option<f64>| v.map_or_else(|| "-".to_owned(), |v| format!("{v:.2}"));
        for step in &self.steps {
            let (seen, balance) = if self.backends.is_empty() {
                ("-".to_owned(), "-".to_owned())
            } else {
                (
                    step.backends.len().to_string(),
                    cell(step.balance(&self.backends)),
                )
            };
            let mark = if step.connections == self.recommended {
                "  <- recommended"
            } else {
                ""
            };
            let _ = writeln!(
                out,
                "{:>5} {:>10.0} {:>9} {:>9} {:>7} {:>6} {:>8} {:>8}{mark}",
                step.connections,
                step.req_per_sec(),
                cell(millis(step.p50())),
                cell(millis(step.p99())),
                step.error_count(),
                step.connections_open,
                seen,
                balance,
            );
        }
        for step in self.steps.iter().filter(|s| s.error_count() > 0) {
            let codes: Vec<String> = step
                .errors
                .iter()
                .map(|(code, n)| format!("{code} x{n}"))
                .collect();
            let _ = writeln!(
                out,
                "errors at N = {}: {}",
                step.connections,
                codes.join(", ")
            );
        }
        out
    }

    /// Advice that goes with the number: how it was chosen when no N met the whole rule, and
    /// when growth (`max_connections_per_endpoint`) fits better than a fixed N.
    pub fn notes(&self) -> Vec<String> {
        let mut notes = Vec::new();
        if self.kind == KneeKind::BestRate {
            notes.push(
                "note: no N met every condition of the knee rule (the measurements are noisy?); \
                 recommending the balanced N with the most req/s. A longer --step-duration helps."
                    .to_owned(),
            );
        }
        let largest = self.steps.last().map_or(0, |s| s.connections);
        if self.recommended == largest && largest == self.max_connections && largest > 1 {
            notes.push(format!(
                "note: req/s or p99 still improved at the largest N ({largest}): try a larger \
                 --max-connections, or let the pool grow under load with \
                 .max_connections_per_endpoint({})",
                largest * 2
            ));
        }
        if let Some(step) = self.recommended_step() {
            if !self.backends.is_empty() && step.backends.len() < self.backends.len() {
                notes.push(format!(
                    "note: N = {} reached {} of the {} backends seen",
                    step.connections,
                    step.backends.len(),
                    self.backends.len()
                ));
            }
        }
        notes
    }

    /// The builder line to paste into a client.
    pub fn builder_line(&self) -> String {
        format!(
            "Pool::builder({:?}).connections_per_endpoint({}).build()?",
            self.target, self.recommended
        )
    }

    /// The line the binary prints last: `recommended connections_per_endpoint: N`.
    pub fn last_line(&self) -> String {
        format!("recommended connections_per_endpoint: {}", self.recommended)
    }

    /// An SVG plot of req/s (left axis) and p99 (right axis) against N (log2 axis), with
    /// the recommendation marked.
    pub fn plot_svg(&self) -> String {
        const WIDTH: f64 = 720.0;
        const HEIGHT: f64 = 400.0;
        const LEFT: f64 = 70.0;
        const RIGHT: f64 = 70.0;
        const TOP: f64 = 40.0;
        const BOTTOM: f64 = 50.0;
        let plot_w = WIDTH - LEFT - RIGHT;
        let plot_h = HEIGHT - TOP - BOTTOM;

        let largest = self.steps.last().map_or(1, |s| s.connections).max(2);
        let log_span = (largest as f64).log2();
        let x = |n: usize| LEFT + (n as f64).log2() / log_span * plot_w;
        let rate_max = nice_max(self.steps.iter().map(Step::req_per_sec));
        let p99_max = nice_max(self.steps.iter().filter_map(|s| millis(s.p99())));
        let y = |v: f64, max: f64| TOP + plot_h - v / max * plot_h;

        let mut svg = String::new();
        let _ = writeln!(
            svg,
            r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" viewBox="0 0 {WIDTH} {HEIGHT}" font-family="sans-serif" font-size="12">"#
        );
        let _ = writeln!(
            svg,
            r#"<rect width="{WIDTH}" height="{HEIGHT}" fill="white"/>"#
        );
        let _ = writeln!(
            svg,
            r#"<text x="{LEFT}" y="24" font-size="14">{}</text>"#,
            escape(&format!("tonic-pool-tune: {}", self.target))
        );
        // The legend, above the plot so that it never covers a point.
        let _ = writeln!(
            svg,
            r##"<text x="{:.1}" y="24" text-anchor="end"><tspan fill="#1f77b4">&#9679; req/s (left)</tspan>  <tspan fill="#d62728">&#9679; p99 ms (right)</tspan></text>"##,
            LEFT + plot_w
        );
        // Axes and horizontal grid, five divisions of each y axis.
        let _ = writeln!(
            svg,
            r##"<rect x="{LEFT}" y="{TOP}" width="{plot_w}" height="{plot_h}" fill="none" stroke="#444"/>"##
        );
        for i in 0..=5 {
            let fraction = f64::from(i) / 5.0;
            let gy = TOP + plot_h - fraction * plot_h;
            let _ = writeln!(
                svg,
                r##"<line x1="{LEFT}" y1="{gy:.1}" x2="{:.1}" y2="{gy:.1}" stroke="#ddd"/>"##,
                LEFT + plot_w
            );
            let _ = writeln!(
                svg,
                r##"<text x="{:.1}" y="{:.1}" text-anchor="end" fill="#1f77b4">{:.0}</text>"##,
                LEFT - 6.0,
                gy + 4.0,
                rate_max * fraction
            );
            let _ = writeln!(
                svg,
                r##"<text x="{:.1}" y="{:.1}" fill="#d62728">{:.1}</text>"##,
                LEFT + plot_w + 6.0,
                gy + 4.0,
                p99_max * fraction
            );
        }
        // x ticks at every measured N.
        for step in &self.steps {
            let tx = x(step.connections);
            let _ = writeln!(
                svg,
                r##"<line x1="{tx:.1}" y1="{:.1}" x2="{tx:.1}" y2="{:.1}" stroke="#444"/>"##,
                TOP + plot_h,
                TOP + plot_h + 5.0
            );
            let _ = writeln!(
                svg,
                r#"<text x="{tx:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
                TOP + plot_h + 18.0,
                step.connections
            );
        }
        let _ = writeln!(
            svg,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">connections per endpoint (N, log scale)</text>"#,
            LEFT + plot_w / 2.0,
            HEIGHT - 10.0
        );
        let _ = writeln!(
            svg,
            r##"<text transform="translate(18 {:.1}) rotate(-90)" text-anchor="middle" fill="#1f77b4">req/s</text>"##,
            TOP + plot_h / 2.0
        );
        let _ = writeln!(
            svg,
            r##"<text transform="translate({:.1} {:.1}) rotate(90)" text-anchor="middle" fill="#d62728">p99 latency (ms)</text>"##,
            WIDTH - 18.0,
            TOP + plot_h / 2.0
        );
        // The recommendation.
        let kx = x(self.recommended);
        let _ = writeln!(
            svg,
            r##"<line x1="{kx:.1}" y1="{TOP}" x2="{kx:.1}" y2="{:.1}" stroke="#2ca02c" stroke-dasharray="6 4"/>"##,
            TOP + plot_h
        );
        let _ = writeln!(
            svg,
            r##"<text x="{:.1}" y="{:.1}" fill="#2ca02c">recommended N = {}</text>"##,
            kx + 4.0,
            TOP + 14.0,
            self.recommended
        );
        // The two series.
        let rate: Vec<(f64, f64)> = self
            .steps
            .iter()
            .map(|s| (x(s.connections), y(s.req_per_sec(), rate_max)))
            .collect();
        let p99: Vec<(f64, f64)> = self
            .steps
            .iter()
            .filter_map(|s| millis(s.p99()).map(|p| (x(s.connections), y(p, p99_max))))
            .collect();
        series(&mut svg, &rate, "#1f77b4");
        series(&mut svg, &p99, "#d62728");
        svg.push_str("</svg>\n");
        svg
    }
}

/// A polyline with a dot at each point.
fn series(svg: &mut String, points: &[(f64, f64)], color: &str) {
    let path: Vec<String> = points
        .iter()
        .map(|(px, py)| format!("{px:.1},{py:.1}"))
        .collect();
    let _ = writeln!(
        svg,
        r#"<polyline points="{}" fill="none" stroke="{color}" stroke-width="2"/>"#,
        path.join(" ")
    );
    for (px, py) in points {
        let _ = writeln!(
            svg,
            r#"<circle cx="{px:.1}" cy="{py:.1}" r="3.5" fill="{color}"/>"#
        );
    }
}

/// A round top for an axis, at least 10 % above the largest value (and at least 1), so
/// that its five grid lines get round labels.
fn nice_max(values: impl Iterator<Item = f64>) -> f64 {
    let max = values.filter(|v| v.is_finite()).fold(0.0, f64::max);
    let wanted = (max * 1.1).max(1.0);
    let power = 10f64.powf(wanted.log10().floor());
    [1.0, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0, 8.0, 10.0]
        .iter()
        .map(|f| f * power)
        .find(|&top| top >= wanted)
        .unwrap_or(10.0 * power)
}

/// Escapes text for SVG.
fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tune::histogram::Latencies;

    fn report() -> Report {
        let steps = [1usize, 2, 4]
            .iter()
            .map(|&n| {
                let mut latencies = Latencies::default();
                latencies.record(Duration::from_millis(10 / n as u64));
                Step {
                    connections: n,
                    ok: 100 * n as u64,
                    elapsed: Duration::from_secs(1),
                    latencies,
                    connections_open: n,
                    backends: [("b1".to_owned(), 10)].into(),
                    ..Step::default()
                }
            })
            .collect();
        Report::new(
            &Options::new("static:///127.0.0.1:1<&>"),
            steps,
            4,
            KneeKind::Knee,
        )
    }

    /// The table has a header and one row per N, the recommended one marked; the last
    /// line is exactly the contract's; the builder line quotes the target.
    #[test]
    fn table_and_lines() {
        let report = report();
        let table = report.table();
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 4, "{table}");
        assert!(lines[0].contains("req/s") && lines[0].contains("min/max"));
        assert!(lines[3].trim_start().starts_with('4') && lines[3].ends_with("<- recommended"));
        assert!(
            lines[1].contains("100") && lines[1].contains("1.00"),
            "{table}"
        );
        assert_eq!(
            report.last_line(),
            "recommended connections_per_endpoint: 4"
        );
        assert_eq!(
            report.builder_line(),
            r#"Pool::builder("static:///127.0.0.1:1<&>").connections_per_endpoint(4).build()?"#
        );
    }

    /// The plot is one SVG document with both series, a point per N, and escaped text.
    #[test]
    fn plot_is_svg() {
        let svg = report().plot_svg();
        assert!(svg.starts_with("<svg ") && svg.trim_end().ends_with("</svg>"));
        assert_eq!(svg.matches("<polyline").count(), 2);
        assert_eq!(svg.matches("<circle").count(), 6);
        assert!(svg.contains("1:1&lt;&amp;&gt;") && !svg.contains("<&>"));
    }

    /// Axis tops are round and above the data: 1121 req/s gets 1500, 0.4 ms gets 1.
    #[test]
    fn axis_tops_are_round() {
        assert_eq!(nice_max([1121.0].into_iter()), 1500.0);
        assert_eq!(nice_max([509.0, 12.0].into_iter()), 600.0);
        assert_eq!(nice_max([0.4].into_iter()), 1.0);
        assert_eq!(nice_max([95.0].into_iter()), 150.0);
        assert_eq!(nice_max(std::iter::empty()), 1.0);
    }
}
