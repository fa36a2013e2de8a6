//! The metrics recorder of the `pool+metrics ×N` modes (`LOAD_METRICS=1`, with
//! `--features metrics`): a Prometheus recorder behind a switch, installed once for the
//! process. The switch is on only while a `pool+metrics` mode builds and runs its pool; the
//! pools of the other modes, built while it is off, get no-op handles — so within one run
//! `pool ×N` measures the feature compiled in with no recorder and `pool+metrics ×N` the same
//! pool recording into Prometheus' registry.
//!
//! `LOAD_RECORDER` picks how the recorder keeps the histograms: `summary` (the exporter's
//! default: each sample goes into a rolling quantile sketch) or `a66` (Prometheus histograms
//! with gRFC A66's bucket bounds, `tonic_pool::metrics::LATENCY_BUCKETS` and `SIZE_BUCKETS`,
//! as gRPC's own default views keep them).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;

use metrics::{Counter, Gauge, Histogram, Key, KeyName, Metadata, Recorder, SharedString, Unit};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusRecorder};

struct Switch {
    on: AtomicBool,
    inner: PrometheusRecorder,
}

static SWITCH: OnceLock<&'static Switch> = OnceLock::new();

/// How often the recorder's upkeep drains its samples (see [`install`]).
const UPKEEP_EVERY: std::time::Duration = std::time::Duration::from_millis(250);

/// Installs the switched recorder (once), its histograms as `LOAD_RECORDER` says; it starts
/// off.
pub(crate) fn install() -> Result<(), String> {
    if SWITCH.get().is_some() {
        return Ok(());
    }
    let builder = match std::env::var("LOAD_RECORDER").as_deref() {
        Err(_) | Ok("summary") => PrometheusBuilder::new(),
        Ok("a66") => PrometheusBuilder::new()
            .set_buckets_for_metric(
                Matcher::Suffix("duration".into()),
                tonic_pool::metrics::LATENCY_BUCKETS,
            )
            .and_then(|b| {
                b.set_buckets_for_metric(
                    Matcher::Suffix("message_size".into()),
                    tonic_pool::metrics::SIZE_BUCKETS,
                )
            })
            .map_err(|e| format!("recorder buckets: {e}"))?,
        Ok(other) => return Err(format!("LOAD_RECORDER={other:?}: expected summary or a66")),
    };
    let switch: &'static Switch = Box::leak(Box::new(Switch {
        on: AtomicBool::new(false),
        inner: builder.build_recorder(),
    }));
    // Upkeep, as `PrometheusBuilder::install_recorder` runs it for an application: the
    // histograms' samples are drained into their summaries or buckets. Without it the samples would
    // pile up for the whole run and the client would not pay the draining, which an
    // application pays. The work is per sample, whatever the interval: a short one here
    // (the exporter's default is 5 s) so that a window of a second or two pays for its own.
    let handle = switch.inner.handle();
    std::thread::Builder::new()
        .name("load-client-upkeep".into())
        .spawn(move || loop {
            std::thread::sleep(UPKEEP_EVERY);
            handle.run_upkeep();
        })
        .map_err(|e| format!("recorder upkeep thread: {e}"))?;
    metrics::set_global_recorder(switch).map_err(|e| format!("metrics recorder: {e}"))?;
    let _ = SWITCH.set(switch);
    Ok(())
}

/// Turns recording on (for the pools built from now on) or off.
pub(crate) fn set(on: bool) {
    if let Some(switch) = SWITCH.get() {
        switch.on.store(on, Ordering::SeqCst);
    }
}

impl Recorder for Switch {
    fn describe_counter(&self, key: KeyName, unit: Option<Unit>, description: SharedString) {
        self.inner.describe_counter(key, unit, description);
    }

    fn describe_gauge(&self, key: KeyName, unit: Option<Unit>, description: SharedString) {
        self.inner.describe_gauge(key, unit, description);
    }

    fn describe_histogram(&self, key: KeyName, unit: Option<Unit>, description: SharedString) {
        self.inner.describe_histogram(key, unit, description);
    }

    fn register_counter(&self, key: &Key, metadata: &Metadata<'_>) -> Counter {
        if self.on.load(Ordering::SeqCst) {
            self.inner.register_counter(key, metadata)
        } else {
            Counter::noop()
        }
    }

    fn register_gauge(&self, key: &Key, metadata: &Metadata<'_>) -> Gauge {
        if self.on.load(Ordering::SeqCst) {
            self.inner.register_gauge(key, metadata)
        } else {
            Gauge::noop()
        }
    }

    fn register_histogram(&self, key: &Key, metadata: &Metadata<'_>) -> Histogram {
        if self.on.load(Ordering::SeqCst) {
            self.inner.register_histogram(key, metadata)
        } else {
            Histogram::noop()
        }
    }
}
