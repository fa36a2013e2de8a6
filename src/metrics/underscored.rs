//! [`Underscored`]: the pool's metrics for a recorder that takes no dots in names.
//!
//! gRPC's metric names and label keys are dotted (`grpc.client.attempt.duration`,
//! `grpc.method`), as OpenTelemetry writes them. `metrics-exporter-prometheus` turns the dots
//! into underscores itself; a recorder built on the `prometheus` crate (`metrics-prometheus`)
//! rejects them instead — and by default it panics on that in debug builds and silently
//! records nothing in release builds. Wrapped in [`Underscored`], such a recorder gets the
//! names as a Prometheus exporter writes them.

use ::metrics::{
    Counter, Gauge, Histogram, Key, KeyName, Label, Metadata, Recorder, SharedString, Unit,
};

/// A [`Recorder`] that hands `R` every metric with `_` for `.` in its name and in its label
/// keys: `grpc.client.attempt.duration{grpc.method=…}` reaches `R` as
/// `grpc_client_attempt_duration{grpc_method=…}`. Label values are kept as they are.
///
/// For a recorder that takes no dots, such as `metrics-prometheus`'s, whose histograms count
/// a sample into its bucket where it is recorded (the cheapest Prometheus recorder for the
/// pool's per-call histograms; see [the module docs](crate::metrics#choosing-a-prometheus-recorder)).
/// `metrics-exporter-prometheus` renames by itself and needs no wrapper.
///
/// Names are rewritten when a handle is registered, which the pool does once per metric and
/// label set; the handle returned is `R`'s own, so recording through it costs what `R`
/// costs.
///
/// ```
/// use tonic_pool::metrics::Underscored;
///
/// let recorder = Underscored::new(metrics_prometheus::Recorder::builder().build());
/// let registry = recorder.inner().registry().clone();
/// metrics::with_local_recorder(&recorder, || {
///     metrics::counter!("grpc.client.attempt.started", "grpc.method" => "echo.Echo/Unary")
///         .increment(1);
/// });
/// let text = prometheus::TextEncoder::new().encode_to_string(&registry.gather())?;
/// assert!(text.contains(r#"grpc_client_attempt_started{grpc_method="echo.Echo/Unary"} 1"#));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Clone, Debug, Default)]
pub struct Underscored<R>(R);

impl<R> Underscored<R> {
    /// `inner`, handed names with `_` for `.`.
    pub fn new(inner: R) -> Self {
        Self(inner)
    }

    /// The recorder the metrics go to.
    pub fn inner(&self) -> &R {
        &self.0
    }

    /// The recorder the metrics go to, unwrapped.
    pub fn into_inner(self) -> R {
        self.0
    }
}

/// `name` with `_` for `.`.
fn underscored(name: &str) -> String {
    name.replace('.', "_")
}

fn underscored_name(name: &KeyName) -> KeyName {
    KeyName::from(underscored(name.as_str()))
}

fn underscored_key(key: &Key) -> Key {
    let labels: Vec<Label> = key
        .labels()
        .map(|label| Label::new(underscored(label.key()), label.value().to_owned()))
        .collect();
    Key::from_parts(underscored(key.name()), labels)
}

impl<R: Recorder> Recorder for Underscored<R> {
    fn describe_counter(&self, key: KeyName, unit: Option<Unit>, description: SharedString) {
        self.0
            .describe_counter(underscored_name(&key), unit, description);
    }

    fn describe_gauge(&self, key: KeyName, unit: Option<Unit>, description: SharedString) {
        self.0
            .describe_gauge(underscored_name(&key), unit, description);
    }

    fn describe_histogram(&self, key: KeyName, unit: Option<Unit>, description: SharedString) {
        self.0
            .describe_histogram(underscored_name(&key), unit, description);
    }

    fn register_counter(&self, key: &Key, metadata: &Metadata<'_>) -> Counter {
        self.0.register_counter(&underscored_key(key), metadata)
    }

    fn register_gauge(&self, key: &Key, metadata: &Metadata<'_>) -> Gauge {
        self.0.register_gauge(&underscored_key(key), metadata)
    }

    fn register_histogram(&self, key: &Key, metadata: &Metadata<'_>) -> Histogram {
        self.0.register_histogram(&underscored_key(key), metadata)
    }
}

#[cfg(test)]
mod tests {
    use metrics_util::debugging::{DebugValue, DebuggingRecorder};
    use metrics_util::{CompositeKey, MetricKind};

    use super::Underscored;

    /// Names and label keys reach the inner recorder with `_` for `.`; label values, units
    /// and descriptions as they were; the handle records into the inner recorder.
    #[test]
    fn names_and_label_keys_get_underscores() {
        let inner = DebuggingRecorder::new();
        let snapshotter = inner.snapshotter();
        let recorder = Underscored::new(inner);
        metrics::with_local_recorder(&recorder, || {
            metrics::describe_histogram!(
                "grpc.client.call.duration",
                metrics::Unit::Seconds,
                "calls"
            );
            metrics::histogram!(
                "grpc.client.call.duration",
                "grpc.method" => "a.B/C",
                "grpc.status" => "OK"
            )
            .record(0.5);
            metrics::counter!("plain").increment(2);
        });
        let mut seen: Vec<(CompositeKey, Option<metrics::Unit>, DebugValue)> = snapshotter
            .snapshot()
            .into_vec()
            .into_iter()
            .map(|(key, unit, _, value)| (key, unit, value))
            .collect();
        seen.sort_by(|a, b| a.0.key().name().cmp(b.0.key().name()));
        let [(call, call_unit, call_value), (plain, _, plain_value)] = &seen[..] else {
            panic!("two metrics: {seen:?}");
        };
        assert_eq!(call.kind(), MetricKind::Histogram);
        assert_eq!(call.key().name(), "grpc_client_call_duration");
        let labels: Vec<(&str, &str)> = call.key().labels().map(|l| (l.key(), l.value())).collect();
        assert_eq!(labels, [("grpc_method", "a.B/C"), ("grpc_status", "OK")]);
        assert_eq!(*call_unit, Some(metrics::Unit::Seconds));
        assert!(
            matches!(call_value, DebugValue::Histogram(v) if v.len() == 1 && *v[0] == 0.5),
            "{call_value:?}"
        );
        assert_eq!(plain.key().name(), "plain");
        assert_eq!(*plain_value, DebugValue::Counter(2));
    }
}
