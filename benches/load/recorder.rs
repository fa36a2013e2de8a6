//! The metrics recorder of the `pool+metrics ×N` modes (`LOAD_METRICS=1`, with
//! `--features metrics`): a Prometheus recorder behind a switch, installed once for the
//! process. The switch is on only while a `pool+metrics` mode builds and runs its pool; the
//! pools of the other modes, built while it is off, get no-op handles — so within one run
//! `pool ×N` measures the feature compiled in with no recorder and `pool+metrics ×N` the same
//! pool recording into Prometheus' registry.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;

use metrics::{Counter, Gauge, Histogram, Key, KeyName, Metadata, Recorder, SharedString, Unit};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusRecorder};

struct Switch {
    on: AtomicBool,
    inner: PrometheusRecorder,
}

static SWITCH: OnceLock<&'static Switch> = OnceLock::new();

/// Installs the switched recorder (once); it starts off.
pub(crate) fn install() -> Result<(), String> {
    if SWITCH.get().is_some() {
        return Ok(());
    }
    let switch: &'static Switch = Box::leak(Box::new(Switch {
        on: AtomicBool::new(false),
        inner: PrometheusBuilder::new().build_recorder(),
    }));
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
