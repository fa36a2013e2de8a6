//! The metrics recorder of the `pool+metrics ×N` modes (`LOAD_METRICS=1`, with
//! `--features metrics`): a Prometheus recorder behind a switch, installed once for the
//! process. The switch is on only while a `pool+metrics` mode builds and runs its pool; the
//! pools of the other modes, built while it is off, get no-op handles — so within one run
//! `pool ×N` measures the feature compiled in with no recorder and `pool+metrics ×N` the same
//! pool recording into Prometheus' registry.
//!
//! `LOAD_RECORDER` picks the recorder and how it keeps the histograms:
//! - `summary`: `metrics-exporter-prometheus` as it comes (each sample is stored, with a
//!   clock read, and the upkeep drains it into a rolling quantile sketch);
//! - `a66`: the same exporter with Prometheus histograms in gRFC A66's bucket bounds
//!   (`tonic_pool::metrics::LATENCY_BUCKETS` and `SIZE_BUCKETS`, as gRPC's own default views
//!   keep them): samples still stored, the upkeep counts them into buckets;
//! - `metrics-prometheus`: the `metrics-prometheus` crate's recorder, whose handles are the
//!   `prometheus` crate's metrics, with the same A66 buckets: a sample is counted into its
//!   bucket where it is recorded (a few atomic adds, no clock, nothing to drain). The
//!   `prometheus` crate takes no dots in names, so this recorder gets the names as a
//!   Prometheus exporter writes them (`grpc.client.attempt.duration` →
//!   `grpc_client_attempt_duration`, `grpc.method` → `grpc_method`), through
//!   `tonic_pool::metrics::Underscored`: renamed when a handle is registered, never per
//!   sample.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;

use metrics::{Counter, Gauge, Histogram, Key, KeyName, Metadata, Recorder, SharedString, Unit};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};

struct Switch {
    on: AtomicBool,
    inner: Box<dyn Recorder + Send + Sync>,
}

static SWITCH: OnceLock<&'static Switch> = OnceLock::new();

/// The registry of the `metrics-prometheus` recorder, for [`check`].
static REGISTRY: OnceLock<prometheus::Registry> = OnceLock::new();

/// How often the recorder's upkeep drains its samples (see [`install`]).
const UPKEEP_EVERY: std::time::Duration = std::time::Duration::from_millis(250);

/// Installs the switched recorder (once), its histograms as `LOAD_RECORDER` says; it starts
/// off.
pub(crate) fn install() -> Result<(), String> {
    if SWITCH.get().is_some() {
        return Ok(());
    }
    let inner: Box<dyn Recorder + Send + Sync> = match std::env::var("LOAD_RECORDER").as_deref() {
        Err(_) | Ok("summary") => exporter(PrometheusBuilder::new())?,
        Ok("a66") => {
            let builder = PrometheusBuilder::new()
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
                .map_err(|e| format!("recorder buckets: {e}"))?;
            exporter(builder)?
        }
        Ok("metrics-prometheus") => prometheus_crate()?,
        Ok(other) => {
            return Err(format!(
                "LOAD_RECORDER={other:?}: expected summary, a66 or metrics-prometheus"
            ))
        }
    };
    let switch: &'static Switch = Box::leak(Box::new(Switch {
        on: AtomicBool::new(false),
        inner,
    }));
    metrics::set_global_recorder(switch).map_err(|e| format!("metrics recorder: {e}"))?;
    let _ = SWITCH.set(switch);
    Ok(())
}

/// `metrics-exporter-prometheus`'s recorder from `builder`, with its upkeep running, as
/// `PrometheusBuilder::install_recorder` runs it for an application: the histograms' samples
/// are drained into their summaries or buckets. Without it the samples would pile up for the
/// whole run and the client would not pay the draining, which an application pays. The work
/// is per sample, whatever the interval: a short one here (the exporter's default is 5 s) so
/// that a window of a second or two pays for its own.
fn exporter(builder: PrometheusBuilder) -> Result<Box<dyn Recorder + Send + Sync>, String> {
    let recorder = builder.build_recorder();
    let handle = recorder.handle();
    std::thread::Builder::new()
        .name("load-client-upkeep".into())
        .spawn(move || loop {
            std::thread::sleep(UPKEEP_EVERY);
            handle.run_upkeep();
        })
        .map_err(|e| format!("recorder upkeep thread: {e}"))?;
    Ok(Box::new(recorder))
}

/// The `metrics-prometheus` crate's recorder over a registry of its own, its four per-call
/// histograms registered beforehand with gRFC A66's buckets (the `prometheus` crate fixes a
/// histogram's buckets when it is made; the recorder would otherwise make them with the
/// crate's defaults).
fn prometheus_crate() -> Result<Box<dyn Recorder + Send + Sync>, String> {
    let registry = REGISTRY.get_or_init(prometheus::Registry::new).clone();
    let recorder = metrics_prometheus::Recorder::builder()
        .with_registry(registry)
        // Loud: a metric it could not take would otherwise be a no-op, and cheap.
        .with_failure_strategy(metrics_prometheus::failure::strategy::Panic)
        .build();
    let labels = ["grpc_method", "grpc_target", "grpc_status"];
    for (name, buckets) in [
        (
            "grpc_client_attempt_duration",
            tonic_pool::metrics::LATENCY_BUCKETS,
        ),
        (
            "grpc_client_call_duration",
            tonic_pool::metrics::LATENCY_BUCKETS,
        ),
        (
            "grpc_client_attempt_sent_total_compressed_message_size",
            tonic_pool::metrics::SIZE_BUCKETS,
        ),
        (
            "grpc_client_attempt_rcvd_total_compressed_message_size",
            tonic_pool::metrics::SIZE_BUCKETS,
        ),
    ] {
        let opts = prometheus::HistogramOpts::new(name, name).buckets(buckets.to_vec());
        let histogram = prometheus::HistogramVec::new(opts, &labels)
            .map_err(|e| format!("histogram {name}: {e}"))?;
        recorder
            .try_register_metric(histogram)
            .map_err(|e| format!("histogram {name}: {e}"))?;
    }
    Ok(Box::new(tonic_pool::metrics::Underscored::new(recorder)))
}

/// After a `pool+metrics` mode: the `metrics-prometheus` recorder holds the calls'
/// durations (the exporters are not read back: their metrics arrive at the upkeep).
pub(crate) fn check() -> Result<(), String> {
    let Some(registry) = REGISTRY.get() else {
        return Ok(());
    };
    let calls: u64 = registry
        .gather()
        .iter()
        .filter(|family| family.name() == "grpc_client_call_duration")
        .flat_map(|family| family.get_metric())
        .map(|metric| metric.get_histogram().get_sample_count())
        .sum();
    if calls == 0 {
        return Err("metrics-prometheus recorder: no grpc_client_call_duration samples".into());
    }
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
