//! Tracing that follows a connection: a subscriber layer records every event of the pool with
//! the fields of the spans around it, and the test reads where and at which level each
//! event came.

use crate::support;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};

use support::common::{builder, client, echo, static_target, wait_all_ready, wait_endpoint, WAIT};
use support::{loopback, TestServer};
use tonic_pool::ConnectivityState;
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::Layer;

type Fields = BTreeMap<String, String>;

/// One event as the layer saw it.
#[derive(Clone, Debug)]
struct Recorded {
    level: Level,
    message: String,
    fields: Fields,
    /// The spans around it, outermost first: name and fields.
    scope: Vec<(String, Fields)>,
}

impl Recorded {
    fn span(&self, name: &str) -> Option<&Fields> {
        self.scope.iter().find(|(n, _)| n == name).map(|(_, f)| f)
    }
}

#[derive(Default)]
struct FieldMap(Fields);

impl Visit for FieldMap {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.0.insert(field.name().to_owned(), format!("{value:?}"));
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().to_owned(), value.to_owned());
    }
}

/// The fields a span was created with, kept in its extensions.
struct SpanFields(Fields);

/// Records every event with its span scope.
#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<Recorded>>>);

impl Capture {
    fn events(&self) -> Vec<Recorded> {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

impl<S: Subscriber + for<'a> LookupSpan<'a>> Layer<S> for Capture {
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        let mut fields = FieldMap::default();
        attrs.record(&mut fields);
        if let Some(span) = ctx.span(id) {
            span.extensions_mut().insert(SpanFields(fields.0));
        }
    }

    fn on_event(&self, event: &Event<'_>, ctx: Context<'_, S>) {
        let mut fields = FieldMap::default();
        event.record(&mut fields);
        let message = fields.0.remove("message").unwrap_or_default();
        let scope = ctx
            .event_scope(event)
            .map(|scope| {
                scope
                    .from_root()
                    .map(|span| {
                        let fields = span
                            .extensions()
                            .get::<SpanFields>()
                            .map(|f| f.0.clone())
                            .unwrap_or_default();
                        (span.name().to_owned(), fields)
                    })
                    .collect()
            })
            .unwrap_or_default();
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(Recorded {
                level: *event.metadata().level(),
                message,
                fields: fields.0,
                scope,
            });
    }
}

/// A connection's GOAWAY, its reconnect and its Ready again are events inside its own
/// `conn{addr, id}` span, itself inside the pool's `tonic_pool{target}`, with neither the
/// address, the id nor the target repeated on the event; connection state changes are at
/// DEBUG and the pool's at INFO; calls on a Ready pool log nothing above TRACE.
///
/// The subscriber is this thread's default and the test runs on a current-thread runtime,
/// so every task of the pool reports to it and no other test's pool does.
#[tokio::test]
async fn connection_events_carry_their_span() {
    let capture = Capture::default();
    let subscriber = tracing_subscriber::registry().with(capture.clone().with_filter(
        tracing_subscriber::filter::Targets::new().with_target("tonic_pool", Level::TRACE),
    ));
    let _default = tracing::subscriber::set_default(subscriber);

    let mut server = TestServer::start(loopback(2));
    let target = static_target(&[&server]);
    let addr = server.addr();
    let pool = builder(&target).build().unwrap();
    wait_all_ready(&pool, 1).await;
    let id = pool.snapshot().endpoints[0].connections[0].id;

    // Calls on a Ready pool: nothing above TRACE.
    let before_calls = capture.events().len();
    let mut client = client(&pool);
    for i in 0..5 {
        client.unary(echo(&format!("{i}"))).await.expect("call ok");
    }
    let during_calls: Vec<Recorded> = capture.events().split_off(before_calls);
    assert!(
        during_calls.iter().all(|e| e.level == Level::TRACE),
        "per-call events only at TRACE: {during_calls:#?}"
    );

    // GOAWAY, reconnects while the server is down, Ready again after its restart.
    assert!(server.graceful_stop(WAIT).await);
    wait_endpoint(&pool, addr, ConnectivityState::TransientFailure).await;
    server.restart();
    wait_all_ready(&pool, 1).await;
    pool.close().await.unwrap();

    let events = capture.events();
    let transitions: Vec<&Recorded> = events
        .iter()
        .filter(|e| e.message == "connection state")
        .collect();
    let step = |to: &str, reason: Option<&str>, after: usize| -> usize {
        let at = transitions
            .iter()
            .skip(after)
            .position(|e| {
                e.fields.get("to").map(String::as_str) == Some(to)
                    && reason.is_none_or(|r| e.fields.get("reason").map(String::as_str) == Some(r))
            })
            .unwrap_or_else(|| {
                panic!("no transition to {to} ({reason:?}) after #{after}: {transitions:#?}")
            });
        after + at
    };
    let goaway = step("IDLE", Some("GOAWAY from server"), 0);
    let reconnect = step("CONNECTING", None, goaway);
    let ready = step("READY", None, reconnect);
    for event in [
        transitions[goaway],
        transitions[reconnect],
        transitions[ready],
    ] {
        assert_eq!(event.level, Level::DEBUG, "{event:#?}");
        let conn = event
            .span("conn")
            .unwrap_or_else(|| panic!("in its connection's span: {event:#?}"));
        assert_eq!(conn.get("addr"), Some(&addr.to_string()));
        assert_eq!(conn.get("id"), Some(&id.to_string()));
        let pool_span = event.span("tonic_pool").expect("inside the pool's span");
        assert_eq!(pool_span.get("target"), Some(&target));
        assert_eq!(
            event.scope[0].0, "tonic_pool",
            "the pool's span is the outermost"
        );
        for repeated in ["addr", "conn", "id", "target"] {
            assert!(
                !event.fields.contains_key(repeated),
                "{repeated} repeated: {event:#?}"
            );
        }
    }
    // Every event of the connection's tasks carries its span; pool-level changes are INFO.
    let pool_states: Vec<&Recorded> = events
        .iter()
        .filter(|e| e.message == "pool state")
        .collect();
    assert!(pool_states.len() >= 3, "{pool_states:#?}");
    assert!(pool_states.iter().all(|e| e.level == Level::INFO));
    assert!(events
        .iter()
        .filter(|e| e.message == "connection state")
        .all(|e| e.span("conn").is_some()));
}
