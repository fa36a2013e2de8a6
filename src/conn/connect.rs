//! Opening one connection: the byte stream from the connector, the HTTP/2 handshake with the
//! pool's settings, and the wait for the server's SETTINGS (the moment it is Ready).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use crate::config::Config;
use crate::conn::bdp::{self, DataCounter, Sample};
use crate::conn::driver::{BdpPlan, H2Connection, KeepAlivePlan, PingPlan};
use crate::conn::frames::{FrameWatch, ReadActivity, Watched};
use crate::connector::{BoxedIo, Connect, Destination};
use crate::error::BoxError;
use crate::state::wait_until;

/// How many streams we reset (cancelled calls) h2 remembers per connection, so that the
/// server's late frames for them are ignored rather than counted as the server's protocol
/// errors: 5 s of 3 000 cancellations a second on one connection. It costs memory only while
/// cancellations happen (a few hundred bytes per remembered stream, at most ~8 MB).
const RESET_STREAMS_REMEMBERED: usize = 16 * 1024;
/// How long h2 remembers a stream we reset (late frames take about one round trip).
const RESET_STREAM_MEMORY: Duration = Duration::from_secs(5);

/// What a successful connect hands the slot.
pub(crate) type Connected = (
    h2::client::SendRequest<Bytes>,
    H2Connection,
    Watched,
    PingPlan,
);

/// Opens one connection: byte stream, HTTP/2 handshake, then waits for the server's SETTINGS
/// while driving the connection.
pub(crate) async fn connect(
    config: &Config,
    connector: &dyn Connect,
    dst: &Destination,
    keepalive: Option<Duration>,
) -> Result<Connected, BoxError> {
    let mut io = connector.connect(dst).await?;
    // Adaptive flow control counts the DATA the server sends, below the frame watcher.
    let sample = config.adaptive_window.then(|| Arc::new(Sample::default()));
    if let Some(sample) = &sample {
        io = Box::new(DataCounter::new(io, sample.clone())) as BoxedIo;
    }
    let activity = keepalive.map(|_| Arc::new(ReadActivity::new()));
    let (io, watched) = FrameWatch::new(io, activity.clone());
    // hyper's (and so a tonic `Channel`'s) defaults, for the same behaviour on the wire; an
    // adaptive window starts from HTTP/2's default and grows with the BDP estimate, as
    // hyper's does.
    let (stream_window, connection_window) = if config.adaptive_window {
        (bdp::INITIAL_WINDOW, bdp::INITIAL_WINDOW)
    } else {
        (
            config.initial_stream_window_size.unwrap_or(2 * 1024 * 1024),
            config
                .initial_connection_window_size
                .unwrap_or(5 * 1024 * 1024),
        )
    };
    let mut builder = h2::client::Builder::new();
    builder
        .initial_max_send_streams(100)
        .initial_window_size(stream_window)
        .initial_connection_window_size(connection_window)
        .max_header_list_size(config.max_header_list_size)
        .max_send_buffer_size(1024 * 1024)
        .enable_push(false)
        // Cancelling a call resets its stream; the server's frames already on their way for
        // it arrive after. h2 ignores them only while it remembers the reset (by default 50
        // streams for 1 s); past that it resets the "unknown" stream again and counts that as
        // a protocol error of the peer's, closing the connection (ENHANCE_YOUR_CALM,
        // `too_many_internal_resets`) after 1 024 — under a storm of deadlines that took every
        // connection down every half minute. Remembering more resets for longer keeps ordinary
        // cancellation from counting, while the limit on real protocol errors stays as it is.
        .max_concurrent_reset_streams(RESET_STREAMS_REMEMBERED)
        .reset_stream_duration(RESET_STREAM_MEMORY)
        // h2 charges every small DATA frame to a budget (against a peer that floods tiny
        // frames) and gives the charge back when the frame is read — but not for the late
        // frames of streams we reset, which it discards: under a storm of cancelled calls the
        // budget only drains, and the connection closes with ENHANCE_YOUR_CALM
        // (`too_many_data_frames`) after a few thousand cancellations. What a server can make
        // us buffer stays bounded by the flow-control windows; empty DATA frames keep their
        // own limit.
        .data_frame_budget(usize::MAX);
    if let Some(size) = config.max_frame_size {
        builder.max_frame_size(size);
    }
    #[cfg(test)]
    if let Some(id) = config.initial_stream_id {
        builder.initial_stream_id(id);
    }
    let (send, mut connection) = builder.handshake::<_, Bytes>(io).await?;
    let mut settings_rx = watched.signals.clone();
    let settings = tokio::select! {
        res = &mut connection => match res {
            Ok(()) => None,
            Err(e) => return Err(e.into()),
        },
        seen = wait_until(&mut settings_rx, |s| s.settings) => seen,
    };
    let plan = PingPlan {
        keepalive: keepalive
            .zip(activity)
            .map(|(interval, activity)| KeepAlivePlan {
                interval,
                timeout: config.keep_alive_timeout,
                while_idle: config.keep_alive_while_idle,
                activity,
            }),
        bdp: sample.map(|sample| BdpPlan {
            sample,
            initial_window: bdp::INITIAL_WINDOW,
        }),
    };
    match settings {
        Some(_) => Ok((send, connection, watched, plan)),
        None => Err("connection closed before the server's SETTINGS".into()),
    }
}
