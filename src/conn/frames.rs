//! A byte-stream wrapper that watches the HTTP/2 frames the server sends.
//!
//! h2 hides two facts the pool's state machine needs: *when the server's SETTINGS arrived*
//! (gRPC only calls a connection Ready once the server has spoken HTTP/2 — a black-holed peer
//! that accepts TCP but says nothing must never be Ready) and *that a GOAWAY arrived, with which
//! code and debug data* (a graceful GOAWAY sends the connection to Idle, `ENHANCE_YOUR_CALM` with
//! `too_many_pings` means our keepalive is too eager). Rather than patching h2, the pool reads
//! the frame headers as they pass: each read walks the 9-byte headers and skips payloads by
//! length, so the cost is a few instructions per frame, not per byte. It wraps the stream the
//! connector returns — with TLS, the decrypted stream above the TLS session — so it always sees
//! plaintext frames.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use parking_lot::Mutex;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::watch;
use tokio::time::Instant;

const FRAME_HEADER_LEN: usize = 9;
const TYPE_SETTINGS: u8 = 0x4;
const TYPE_GOAWAY: u8 = 0x7;
const FLAG_ACK: u8 = 0x1;
/// How many payload bytes are kept of a GOAWAY (its ids and enough debug data for
/// `too_many_pings`) or a PING (8 bytes).
const PAYLOAD_CAP: usize = 192;
/// How many payload bytes are kept of a SETTINGS frame: all of it, up to the largest frame the
/// client accepts (`SETTINGS_MAX_FRAME_SIZE`, 16 KiB by default; h2 fails a larger frame).
/// A server may list many parameters, and `MAX_CONCURRENT_STREAMS` may come last.
const SETTINGS_PAYLOAD_CAP: usize = 16 * 1024;
/// SETTINGS parameter `SETTINGS_MAX_CONCURRENT_STREAMS`.
const SETTINGS_MAX_CONCURRENT_STREAMS: u16 = 0x3;

/// HTTP/2 error code `NO_ERROR`.
pub(crate) const NO_ERROR: u32 = 0x0;
/// HTTP/2 error code `ENHANCE_YOUR_CALM`.
pub(crate) const ENHANCE_YOUR_CALM: u32 = 0xb;

/// A GOAWAY frame received from the server.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct GoAway {
    pub(crate) last_stream_id: u32,
    pub(crate) error_code: u32,
    pub(crate) debug_data: Vec<u8>,
}

impl GoAway {
    /// A GOAWAY that only asks us to move on (max connection age, graceful shutdown).
    pub(crate) fn is_graceful(&self) -> bool {
        self.error_code == NO_ERROR
    }

    /// gRFC A8: the server thinks we ping too often.
    pub(crate) fn is_too_many_pings(&self) -> bool {
        self.error_code == ENHANCE_YOUR_CALM && self.debug_data == b"too_many_pings"
    }
}

/// What the watcher has seen so far on one connection.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct FrameSignals {
    /// The server's first SETTINGS frame arrived.
    pub(crate) settings: bool,
    /// The first GOAWAY, if one arrived.
    pub(crate) goaway: Option<GoAway>,
}

/// The head of one HTTP/2 frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct FrameHead {
    pub(crate) kind: u8,
    pub(crate) flags: u8,
    pub(crate) stream_id: u32,
}

const TYPE_DATA: u8 = 0x0;
const TYPE_HEADERS: u8 = 0x1;
const TYPE_RST_STREAM: u8 = 0x3;
const TYPE_PING: u8 = 0x6;
/// The last-stream-id of the first, announcing GOAWAY of a graceful shutdown.
const MAX_STREAM_ID: u32 = 0x7fff_ffff;
const FLAG_END_STREAM: u8 = 0x1;
/// The client connection preface, which precedes the client's first frame.
const CLIENT_PREFACE_LEN: usize = 24;

/// Walks frame headers in a byte stream split arbitrarily into reads or writes, skipping
/// payloads by length (only GOAWAY payloads are kept, capped). Separate from the I/O so it can
/// be tested on plain bytes.
#[derive(Debug, Default)]
pub(crate) struct FrameWalker {
    /// Bytes still to skip before the first frame (the client preface, outbound).
    skip: usize,
    header: [u8; FRAME_HEADER_LEN],
    header_len: usize,
    /// Payload bytes of the current frame still to pass.
    remaining: usize,
    current: Option<FrameHead>,
    /// The payload being kept (GOAWAY only).
    payload: Option<Vec<u8>>,
}

impl FrameWalker {
    /// A walker for what the client writes: the preface first, then frames.
    pub(crate) fn outbound() -> Self {
        Self {
            skip: CLIENT_PREFACE_LEN,
            ..Self::default()
        }
    }

    /// Feeds bytes; calls `on_frame` once per complete frame with its head and kept payload
    /// (empty unless GOAWAY, PING or SETTINGS).
    pub(crate) fn feed(&mut self, mut bytes: &[u8], mut on_frame: impl FnMut(FrameHead, &[u8])) {
        if self.skip > 0 {
            let take = self.skip.min(bytes.len());
            self.skip -= take;
            bytes = &bytes[take..];
        }
        while !bytes.is_empty() {
            if let Some(head) = self.current {
                let take = self.remaining.min(bytes.len());
                if let Some(payload) = &mut self.payload {
                    let cap = if head.kind == TYPE_SETTINGS {
                        SETTINGS_PAYLOAD_CAP
                    } else {
                        PAYLOAD_CAP
                    };
                    let room = cap.saturating_sub(payload.len());
                    payload.extend_from_slice(&bytes[..take.min(room)]);
                }
                self.remaining -= take;
                bytes = &bytes[take..];
                if self.remaining == 0 {
                    self.current = None;
                    let payload = self.payload.take().unwrap_or_default();
                    on_frame(head, &payload);
                }
                continue;
            }
            let take = (FRAME_HEADER_LEN - self.header_len).min(bytes.len());
            self.header[self.header_len..self.header_len + take].copy_from_slice(&bytes[..take]);
            self.header_len += take;
            bytes = &bytes[take..];
            if self.header_len < FRAME_HEADER_LEN {
                break;
            }
            self.header_len = 0;
            let h = &self.header;
            let len = u32::from_be_bytes([0, h[0], h[1], h[2]]) as usize;
            let head = FrameHead {
                kind: h[3],
                flags: h[4],
                stream_id: u32::from_be_bytes([h[5], h[6], h[7], h[8]]) & 0x7fff_ffff,
            };
            if len == 0 {
                on_frame(head, &[]);
                continue;
            }
            self.remaining = len;
            self.current = Some(head);
            self.payload = matches!(head.kind, TYPE_GOAWAY | TYPE_PING | TYPE_SETTINGS)
                .then(|| Vec::with_capacity(8));
        }
    }
}

/// Parses a GOAWAY payload.
fn parse_goaway(payload: &[u8]) -> Option<GoAway> {
    if payload.len() < 8 {
        // Malformed; h2 fails the connection itself.
        return None;
    }
    Some(GoAway {
        last_stream_id: u32::from_be_bytes([payload[0], payload[1], payload[2], payload[3]])
            & 0x7fff_ffff,
        error_code: u32::from_be_bytes([payload[4], payload[5], payload[6], payload[7]]),
        debug_data: payload[8..].to_vec(),
    })
}

/// The streams of one connection as seen on the wire, to tell after a GOAWAY whether the
/// streams it broke can have been processed.
///
/// A server shuts down gracefully in two steps: GOAWAY with the largest stream id, a PING,
/// and — once our ack of that PING arrives — a final GOAWAY naming the last stream it took.
/// So a stream is provably unprocessed if its id is above a GOAWAY's last stream id, or if
/// its HEADERS went out after our ack of the shutdown PING (stream ids go out in increasing
/// order, so that is "its id is above the highest id written before the ack").
#[derive(Debug, Default)]
pub(crate) struct StreamLedger {
    /// Client streams whose HEADERS went out and that the server has not ended or reset.
    /// A `Vec` rather than a set: it holds a handful of ids (the calls in flight on one
    /// connection) and keeps its capacity, so a call costs no allocation here.
    open: Vec<u32>,
    /// The highest client stream id written so far.
    max_written: u32,
    /// The lowest last-stream-id of the server's GOAWAYs.
    goaway_last: Option<u32>,
    /// The payload of the server's PING that followed its announcing GOAWAY.
    shutdown_ping: Option<Vec<u8>>,
    /// The highest stream id written before we acked the shutdown PING.
    cutoff: Option<u32>,
}

impl StreamLedger {
    fn on_inbound(&mut self, head: FrameHead, payload: &[u8], goaway: Option<&GoAway>) {
        match head.kind {
            TYPE_DATA | TYPE_HEADERS if head.flags & FLAG_END_STREAM != 0 => {
                self.close(head.stream_id);
            }
            TYPE_RST_STREAM => {
                self.close(head.stream_id);
            }
            TYPE_GOAWAY => {
                if let Some(g) = goaway {
                    let last = self
                        .goaway_last
                        .map_or(g.last_stream_id, |l| l.min(g.last_stream_id));
                    self.goaway_last = Some(last);
                }
            }
            TYPE_PING
                if head.flags & FLAG_ACK == 0
                    && self.goaway_last == Some(MAX_STREAM_ID)
                    && self.shutdown_ping.is_none() =>
            {
                self.shutdown_ping = Some(payload.to_vec());
            }
            _ => {}
        }
    }

    fn on_outbound(&mut self, head: FrameHead, payload: &[u8]) {
        match head.kind {
            // The first HEADERS of a client stream opens it: stream ids only grow, so a HEADERS
            // above the highest written id is a new stream (trailers repeat an older id).
            TYPE_HEADERS if head.stream_id % 2 == 1 && head.stream_id > self.max_written => {
                self.max_written = head.stream_id;
                self.open.push(head.stream_id);
            }
            TYPE_RST_STREAM => {
                self.close(head.stream_id);
            }
            TYPE_PING
                if head.flags & FLAG_ACK != 0
                    && self.cutoff.is_none()
                    && self.shutdown_ping.as_deref() == Some(payload) =>
            {
                self.cutoff = Some(self.max_written);
            }
            _ => {}
        }
    }

    fn close(&mut self, id: u32) {
        if let Some(i) = self.open.iter().position(|open| *open == id) {
            self.open.swap_remove(i);
        }
    }

    /// After a GOAWAY, no stream still open can have been processed by the server (gRFC A6's
    /// condition for a transparent retry).
    ///
    /// The shutdown-PING cutoff only stands in for the final GOAWAY while that has not come:
    /// once the server names its last stream (any GOAWAY below the maximum id), that id alone
    /// decides, since the server may have taken streams that went out after our PING ack.
    pub(crate) fn only_unprocessed_open(&self) -> bool {
        self.unprocessed_above()
            .is_some_and(|above| self.open.iter().all(|id| *id > above))
    }

    /// The stream id above which no stream can have been processed: the last stream id of the
    /// server's final GOAWAY, or — while only the announcing GOAWAY(2^31-1) has come — the
    /// highest stream written before our ack of the shutdown PING. `None` before a GOAWAY.
    fn unprocessed_above(&self) -> Option<u32> {
        match self.goaway_last? {
            MAX_STREAM_ID => self.cutoff,
            last => Some(last),
        }
    }
}

/// The server's `SETTINGS_MAX_CONCURRENT_STREAMS` for one connection, readable by the picker.
///
/// The server may change it at any time with a new SETTINGS frame; the reader updates it as
/// frames pass, so a pick always sees the current limit with one atomic load.
#[derive(Debug)]
pub(crate) struct PeerLimits {
    max_concurrent_streams: std::sync::atomic::AtomicU32,
}

impl Default for PeerLimits {
    fn default() -> Self {
        Self {
            max_concurrent_streams: std::sync::atomic::AtomicU32::new(u32::MAX),
        }
    }
}

impl PeerLimits {
    /// The current limit (`u32::MAX` when the server set none).
    #[inline]
    pub(crate) fn max_concurrent_streams(&self) -> u32 {
        self.max_concurrent_streams.load(Ordering::Relaxed)
    }

    fn apply_settings(&self, payload: &[u8]) {
        for entry in payload.chunks_exact(6) {
            let id = u16::from_be_bytes([entry[0], entry[1]]);
            if id == SETTINGS_MAX_CONCURRENT_STREAMS {
                let value = u32::from_be_bytes([entry[2], entry[3], entry[4], entry[5]]);
                self.max_concurrent_streams.store(value, Ordering::Relaxed);
            }
        }
    }
}

/// Closes a connection from outside, even while its driver task still serves calls.
///
/// A retired connection stays alive until its last stream ends, which is what lets calls
/// finish after a GOAWAY. When the pool must cut calls (close timeout, drain timeout, pool
/// dropped), it kills the byte stream instead: every read and write fails from then on, h2
/// fails the connection, and each call on it ends with an error.
#[derive(Debug, Default)]
pub(crate) struct KillSwitch {
    killed: AtomicBool,
    reader: Mutex<Option<Waker>>,
}

impl KillSwitch {
    pub(crate) fn kill(&self) {
        self.killed.store(true, Ordering::Release);
        if let Some(waker) = self.reader.lock().take() {
            waker.wake();
        }
    }

    fn check(&self) -> io::Result<()> {
        if self.killed.load(Ordering::Acquire) {
            Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "connection closed by the pool",
            ))
        } else {
            Ok(())
        }
    }
}

/// What happened to a connection's byte stream, for classifying the calls it broke.
///
/// h2 closes a connection by itself once it received a GOAWAY and has no *active* stream —
/// but streams still waiting to open (their HEADERS not yet written) are not counted as
/// active, and they fail with the same `BrokenPipe` error as streams cut by a dying server.
/// They never reached the server: the server's last GOAWAY named a stream id below theirs
/// (their HEADERS, if written at all, went out after our ack of the server's GOAWAY PING).
/// So a call that failed on a connection that *we* shut down cleanly after a graceful GOAWAY,
/// before the server closed it or failed, is safe to send again; one cut by the server's
/// close is not (the server may have processed it).
///
/// Besides, each broken stream is judged on its own id: a stream whose HEADERS never went out
/// (above the highest id written) never left the client, and one above the server's last
/// stream id (or our shutdown-PING cutoff) never reached its application — whatever else was
/// open on the connection. A server that closes its socket right after its final GOAWAY can
/// make the client lose the bytes still in flight (the GOAWAY, responses), so a connection-wide
/// verdict would wrongly keep a safe call from going again.
#[derive(Debug)]
pub(crate) struct ConnFate {
    flags: std::sync::atomic::AtomicU8,
    /// The highest client stream id written when the byte stream ended.
    max_written: std::sync::atomic::AtomicU32,
    /// [`StreamLedger::unprocessed_above`] when the byte stream ended; `u32::MAX` for none.
    unprocessed_above: std::sync::atomic::AtomicU32,
}

impl Default for ConnFate {
    fn default() -> Self {
        Self {
            flags: Default::default(),
            max_written: std::sync::atomic::AtomicU32::new(u32::MAX),
            unprocessed_above: std::sync::atomic::AtomicU32::new(u32::MAX),
        }
    }
}

const FATE_GRACEFUL_GOAWAY: u8 = 1;
const FATE_READ_ENDED: u8 = 2;
const FATE_LOCAL_SHUTDOWN: u8 = 4;
/// When the byte stream ended, every stream still open was above a GOAWAY's last stream id.
const FATE_ONLY_UNPROCESSED_OPEN: u8 = 8;
/// A write or flush failed (the peer is gone).
const FATE_WRITE_FAILED: u8 = 16;
/// A GOAWAY (any) arrived.
const FATE_GOAWAY: u8 = 32;

impl ConnFate {
    fn set(&self, flag: u8) {
        self.flags.fetch_or(flag, Ordering::AcqRel);
    }

    /// The byte stream ended (EOF, error, or our shutdown): record what the ledger says,
    /// before h2 fails the streams that remain.
    fn ended(&self, flag: u8, ledger: &StreamLedger) {
        let mut flags = flag;
        if ledger.only_unprocessed_open() {
            flags |= FATE_ONLY_UNPROCESSED_OPEN;
        }
        // Stored before the flags: a reader that sees the end sees the ids too.
        self.max_written
            .fetch_min(ledger.max_written, Ordering::AcqRel);
        self.unprocessed_above.fetch_min(
            ledger.unprocessed_above().unwrap_or(u32::MAX),
            Ordering::AcqRel,
        );
        self.flags.fetch_or(flags, Ordering::AcqRel);
    }

    /// Whether the server sent a GOAWAY. Set by the reader the moment the frame arrives — before
    /// the slot hears of it — so that picks stop sending calls there at once: a call sent after
    /// the server's GOAWAY may be above its last stream id, and such a call may be retried
    /// only once (gRFC A6).
    #[inline]
    pub(crate) fn goaway_received(&self) -> bool {
        self.flags.load(Ordering::Acquire) & FATE_GOAWAY != 0
    }

    /// The raw flags, for logs.
    pub(crate) fn bits(&self) -> u8 {
        self.flags.load(Ordering::Acquire)
    }

    /// Whether the streams this connection broke provably never reached the server's
    /// application: either we closed the connection cleanly after the server's graceful
    /// GOAWAY before the server closed or broke it (h2 only does that with no active stream,
    /// so what broke was still waiting to open), or when it ended every stream still open on
    /// the wire was above the GOAWAY's last stream id.
    pub(crate) fn broken_streams_unprocessed(&self) -> bool {
        let flags = self.flags.load(Ordering::Acquire);
        let closed_by_us = flags & FATE_GRACEFUL_GOAWAY != 0
            && flags & FATE_LOCAL_SHUTDOWN != 0
            && flags & FATE_READ_ENDED == 0;
        closed_by_us || flags & FATE_ONLY_UNPROCESSED_OPEN != 0
    }

    /// Whether the stream `id`, broken when this connection's byte stream ended, provably
    /// never reached the server's application: by the connection-wide verdict above, or on its
    /// own id — its HEADERS never went out, or it is above the last stream the server took.
    pub(crate) fn stream_unprocessed(&self, id: u32) -> bool {
        if self.broken_streams_unprocessed() {
            return true;
        }
        let ended = self.flags.load(Ordering::Acquire)
            & (FATE_READ_ENDED | FATE_WRITE_FAILED | FATE_LOCAL_SHUTDOWN)
            != 0;
        ended
            && (id > self.max_written.load(Ordering::Acquire)
                || id > self.unprocessed_above.load(Ordering::Acquire))
    }
}

/// What a read brought that the watch must hear about (rarely anything: SETTINGS, GOAWAY).
#[derive(Debug, Default)]
pub(crate) struct Observed {
    settings: bool,
    goaway: Option<GoAway>,
}

impl Observed {
    fn is_empty(&self) -> bool {
        !self.settings && self.goaway.is_none()
    }

    /// Applies to the watched signals; returns whether they changed.
    fn apply(self, signals: &mut FrameSignals) -> bool {
        let mut changed = false;
        if self.settings && !signals.settings {
            signals.settings = true;
            changed = true;
        }
        if signals.goaway.is_none() && self.goaway.is_some() {
            signals.goaway = self.goaway;
            changed = true;
        }
        changed
    }
}

/// Everything the pool learns from one connection's bytes, in both directions. Separate from
/// the I/O, so that the tests and the fuzz target run exactly what [`FrameWatch`] runs.
#[derive(Debug)]
pub(crate) struct Wire {
    inbound: FrameWalker,
    outbound: FrameWalker,
    ledger: StreamLedger,
    fate: Arc<ConnFate>,
    limits: Arc<PeerLimits>,
}

impl Wire {
    fn new(fate: Arc<ConnFate>, limits: Arc<PeerLimits>) -> Self {
        Self {
            inbound: FrameWalker::default(),
            outbound: FrameWalker::outbound(),
            ledger: StreamLedger::default(),
            fate,
            limits,
        }
    }

    /// Bytes the server sent: updates the ledger, the limits and the fate without any lock;
    /// returns what the watch must hear about.
    fn read(&mut self, bytes: &[u8]) -> Observed {
        let (ledger, fate, limits) = (&mut self.ledger, &self.fate, &self.limits);
        let mut observed = Observed::default();
        self.inbound.feed(bytes, |head, payload| {
            if head.kind == TYPE_SETTINGS && head.flags & FLAG_ACK == 0 {
                limits.apply_settings(payload);
                observed.settings = true;
            }
            let goaway = (head.kind == TYPE_GOAWAY)
                .then(|| parse_goaway(payload))
                .flatten();
            ledger.on_inbound(head, payload, goaway.as_ref());
            if let Some(g) = goaway {
                fate.set(if g.is_graceful() {
                    FATE_GOAWAY | FATE_GRACEFUL_GOAWAY
                } else {
                    FATE_GOAWAY
                });
                observed.goaway.get_or_insert(g);
            }
        });
        observed
    }

    /// Bytes we sent.
    fn wrote(&mut self, bytes: &[u8]) {
        let ledger = &mut self.ledger;
        self.outbound
            .feed(bytes, |head, payload| ledger.on_outbound(head, payload));
    }

    /// The byte stream ended in the way `flag` says.
    fn ended(&self, flag: u8) {
        self.fate.ended(flag, &self.ledger);
    }
}

/// When bytes were last read from a connection, for keepalive.
#[derive(Debug)]
pub(crate) struct ReadActivity {
    base: Instant,
    /// Milliseconds after `base` of the last read.
    last_read_ms: AtomicU64,
}

impl ReadActivity {
    pub(crate) fn new() -> Self {
        Self {
            base: Instant::now(),
            last_read_ms: AtomicU64::new(0),
        }
    }

    #[inline]
    pub(crate) fn touch(&self) {
        let ms = Instant::now()
            .saturating_duration_since(self.base)
            .as_millis() as u64;
        self.last_read_ms.store(ms, Ordering::Relaxed);
    }

    pub(crate) fn last_read(&self) -> Instant {
        self.base + Duration::from_millis(self.last_read_ms.load(Ordering::Relaxed))
    }
}

/// The I/O wrapper: reads and writes pass through a [`Wire`], signals go out through a
/// watch, and a [`KillSwitch`] can end it.
#[derive(Debug)]
pub(crate) struct FrameWatch<T> {
    io: T,
    wire: Wire,
    signals: watch::Sender<FrameSignals>,
    kill: Arc<KillSwitch>,
    /// Set when keepalive is on: every read is timestamped for it.
    activity: Option<Arc<ReadActivity>>,
}

/// The handles the pool keeps on a [`FrameWatch`]ed stream.
#[derive(Debug)]
pub(crate) struct Watched {
    pub(crate) signals: watch::Receiver<FrameSignals>,
    pub(crate) kill: Arc<KillSwitch>,
    pub(crate) fate: Arc<ConnFate>,
    pub(crate) limits: Arc<PeerLimits>,
}

impl<T> FrameWatch<T> {
    pub(crate) fn new(io: T, activity: Option<Arc<ReadActivity>>) -> (Self, Watched) {
        let (tx, rx) = watch::channel(FrameSignals::default());
        let kill = Arc::new(KillSwitch::default());
        let fate = Arc::new(ConnFate::default());
        let limits = Arc::new(PeerLimits::default());
        (
            Self {
                io,
                wire: Wire::new(fate.clone(), limits.clone()),
                signals: tx,
                kill: kill.clone(),
                activity,
            },
            Watched {
                signals: rx,
                kill,
                fate,
                limits,
            },
        )
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for FrameWatch<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.kill.check()?;
        {
            // Remember who reads, so that kill() can wake a read parked on the socket.
            let mut reader = this.kill.reader.lock();
            if !reader.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                *reader = Some(cx.waker().clone());
            }
        }
        let before = buf.filled().len();
        let res = Pin::new(&mut this.io).poll_read(cx, buf);
        match &res {
            Poll::Ready(Ok(())) => {
                let new = &buf.filled()[before..];
                if new.is_empty() {
                    this.wire.ended(FATE_READ_ENDED);
                } else {
                    if let Some(activity) = &this.activity {
                        activity.touch();
                    }
                    // Only SETTINGS and GOAWAY (rare) take the watch's lock.
                    let observed = this.wire.read(new);
                    if !observed.is_empty() {
                        this.signals
                            .send_if_modified(|signals| observed.apply(signals));
                    }
                }
            }
            Poll::Ready(Err(_)) => this.wire.ended(FATE_READ_ENDED),
            Poll::Pending => {}
        }
        res
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for FrameWatch<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.kill.check()?;
        let this = self.get_mut();
        let res = Pin::new(&mut this.io).poll_write(cx, buf);
        match &res {
            Poll::Ready(Ok(n)) => this.wire.wrote(&buf[..*n]),
            Poll::Ready(Err(_)) => this.wire.ended(FATE_WRITE_FAILED),
            Poll::Pending => {}
        }
        res
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let res = Pin::new(&mut this.io).poll_flush(cx);
        if let Poll::Ready(Err(_)) = res {
            this.wire.ended(FATE_WRITE_FAILED);
        }
        res
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.wire.ended(FATE_LOCAL_SHUTDOWN);
        Pin::new(&mut this.io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.kill.check()?;
        let this = self.get_mut();
        let res = Pin::new(&mut this.io).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Err(_)) = res {
            this.wire.ended(FATE_WRITE_FAILED);
        }
        if let Poll::Ready(Ok(mut n)) = res {
            for buf in bufs {
                if n == 0 {
                    break;
                }
                let take = n.min(buf.len());
                this.wire.wrote(&buf[..take]);
                n -= take;
            }
        }
        res
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

/// Drives a [`Wire`] over arbitrary bytes in both directions (fuzzing and tests).
#[cfg(any(test, fuzzing))]
pub(crate) fn fuzz_feed(data: &[u8]) {
    let split = data.first().map_or(0, |b| *b as usize) % (data.len() + 1);
    let (a, b) = data.split_at(split);
    let mut wire = Wire::new(Arc::default(), Arc::default());
    let mut signals = FrameSignals::default();
    for chunk in a.chunks(7).chain(b.chunks(13)) {
        wire.read(chunk).apply(&mut signals);
        wire.wrote(chunk);
    }
    wire.ended(FATE_READ_ENDED);
    let _ = wire.fate.broken_streams_unprocessed();
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn frame(kind: u8, flags: u8, payload: &[u8]) -> Vec<u8> {
        let len = payload.len() as u32;
        let mut f = vec![
            (len >> 16) as u8,
            (len >> 8) as u8,
            len as u8,
            kind,
            flags,
            0,
            0,
            0,
            0,
        ];
        f.extend_from_slice(payload);
        f
    }

    fn goaway_payload(last: u32, code: u32, debug: &[u8]) -> Vec<u8> {
        let mut p = last.to_be_bytes().to_vec();
        p.extend_from_slice(&code.to_be_bytes());
        p.extend_from_slice(debug);
        p
    }

    fn stream() -> Vec<u8> {
        let mut bytes = frame(TYPE_SETTINGS, 0, &[0, 3, 0, 0, 0, 100]);
        bytes.extend(frame(TYPE_SETTINGS, FLAG_ACK, &[]));
        bytes.extend(frame(0x0, 0, &[7u8; 300])); // DATA
        bytes.extend(frame(0x6, 0, &[1u8; 8])); // PING
        bytes.extend(frame(
            TYPE_GOAWAY,
            0,
            &goaway_payload(5, ENHANCE_YOUR_CALM, b"too_many_pings"),
        ));
        bytes
    }

    fn wire() -> Wire {
        Wire::new(Arc::default(), Arc::default())
    }

    /// Runs the inbound side over bytes split at `cuts`, as `FrameWatch::poll_read` does.
    fn inbound(bytes: &[u8], cuts: &[usize]) -> (FrameSignals, Wire) {
        let mut wire = wire();
        let mut signals = FrameSignals::default();
        let mut start = 0;
        for &cut in cuts.iter().chain([bytes.len()].iter()) {
            let cut = cut.clamp(start, bytes.len());
            wire.read(&bytes[start..cut]).apply(&mut signals);
            start = cut;
        }
        (signals, wire)
    }

    #[test]
    fn sees_settings_and_goaway() {
        let (signals, _) = inbound(&stream(), &[]);
        assert!(signals.settings);
        let goaway = signals.goaway.unwrap();
        assert_eq!(goaway.last_stream_id, 5);
        assert!(goaway.is_too_many_pings());
        assert!(!goaway.is_graceful());
    }

    #[test]
    fn reads_max_concurrent_streams() {
        let limits = PeerLimits::default();
        assert_eq!(limits.max_concurrent_streams(), u32::MAX);
        // INITIAL_WINDOW_SIZE then MAX_CONCURRENT_STREAMS = 100.
        limits.apply_settings(&[0, 4, 0, 1, 0, 0, 0, 3, 0, 0, 0, 100]);
        assert_eq!(limits.max_concurrent_streams(), 100);
        // And through the wire, from a SETTINGS frame split across reads.
        let (_, wire) = inbound(&stream(), &[3, 11]);
        assert_eq!(wire.limits.max_concurrent_streams(), 100);
    }

    #[test]
    fn silence_is_not_settings() {
        let (signals, _) = inbound(&[0, 0], &[]);
        assert!(!signals.settings);
    }

    fn headers(stream: u32, flags: u8) -> Vec<u8> {
        let mut f = frame(TYPE_HEADERS, flags, &[0; 3]);
        f[5..9].copy_from_slice(&stream.to_be_bytes());
        f
    }

    /// The ledger: streams opened by the client, ended by the server; after a GOAWAY, only
    /// streams above its last stream id may remain for a retry to be safe.
    #[test]
    fn ledger_tells_unprocessed_streams() {
        let mut wire = wire();
        let mut bytes = vec![0u8; CLIENT_PREFACE_LEN];
        for id in [1, 3, 5] {
            bytes.extend(headers(id, 0x4));
        }
        wire.wrote(&bytes);
        assert!(!wire.ledger.only_unprocessed_open(), "no GOAWAY yet");
        let mut reply = headers(1, 0x5);
        reply.extend(frame(TYPE_GOAWAY, 0, &goaway_payload(3, NO_ERROR, b"")));
        wire.read(&reply);
        assert!(
            !wire.ledger.only_unprocessed_open(),
            "stream 3 may have been processed"
        );
        wire.read(&headers(3, 0x5));
        assert!(
            wire.ledger.only_unprocessed_open(),
            "only stream 5 (> 3) is left"
        );
        // What the call path asks when the connection then ends.
        wire.ended(FATE_READ_ENDED);
        assert!(wire.fate.broken_streams_unprocessed());
    }

    /// Graceful shutdown in two steps: streams written after our ack of the shutdown PING
    /// are unprocessed even before the final GOAWAY arrives.
    #[test]
    fn ledger_uses_the_shutdown_ping() {
        let mut wire = wire();
        let mut bytes = vec![0u8; CLIENT_PREFACE_LEN];
        bytes.extend(headers(1, 0x4));
        wire.wrote(&bytes);
        let mut inbound = frame(
            TYPE_GOAWAY,
            0,
            &goaway_payload(MAX_STREAM_ID, NO_ERROR, b""),
        );
        inbound.extend(frame(TYPE_PING, 0, &[9; 8]));
        wire.read(&inbound);
        assert!(
            !wire.ledger.only_unprocessed_open(),
            "stream 1 went out before the ack"
        );
        let mut later = frame(TYPE_PING, FLAG_ACK, &[9; 8]);
        later.extend(headers(3, 0x4));
        wire.wrote(&later);
        // The server ends stream 1; stream 3 went out after the ack.
        wire.read(&headers(1, 0x5));
        assert!(wire.ledger.only_unprocessed_open());
    }

    /// A graceful shutdown up to our ack: `before` is written (one HEADERS per id), the
    /// server's GOAWAY(2^31-1) and PING are read, then our PING ack and `after` are written.
    fn acked_shutdown_ping(before: &[u32], after: &[u32]) -> Wire {
        let mut wire = wire();
        let mut bytes = vec![0u8; CLIENT_PREFACE_LEN];
        for id in before {
            bytes.extend(headers(*id, 0x4));
        }
        wire.wrote(&bytes);
        let mut inbound = frame(
            TYPE_GOAWAY,
            0,
            &goaway_payload(MAX_STREAM_ID, NO_ERROR, b""),
        );
        // A PING after the announcing GOAWAY (a keepalive, or the shutdown PING).
        inbound.extend(frame(TYPE_PING, 0, &[9; 8]));
        wire.read(&inbound);
        let mut later = frame(TYPE_PING, FLAG_ACK, &[9; 8]);
        for id in after {
            later.extend(headers(*id, 0x4));
        }
        wire.wrote(&later);
        wire
    }

    /// A final GOAWAY that names a stream written after our ack of the shutdown PING overrides
    /// the cutoff: the server took that stream, so it is not safe to send again.
    #[test]
    fn the_final_goaway_overrides_the_shutdown_ping_cutoff() {
        let mut wire = acked_shutdown_ping(&[], &[1]);
        assert!(
            wire.ledger.only_unprocessed_open(),
            "before the final GOAWAY, stream 1 (after the ack) counts as unprocessed"
        );
        wire.read(&frame(TYPE_GOAWAY, 0, &goaway_payload(1, NO_ERROR, b"")));
        assert!(
            !wire.ledger.only_unprocessed_open(),
            "the final GOAWAY says stream 1 was taken"
        );
        wire.ended(FATE_READ_ENDED);
        assert!(!wire.fate.broken_streams_unprocessed());
    }

    /// Each broken stream is judged on its own id: the server closed its socket after its
    /// announcing GOAWAY and our PING ack, with stream 1 (sent before the ack) still open, so
    /// the connection-wide verdict is "maybe processed" — yet stream 3, sent after the ack, and
    /// stream 5, never written, provably did not reach the server's application.
    #[test]
    fn broken_streams_are_judged_by_their_own_ids() {
        let wire = acked_shutdown_ping(&[1], &[3]);
        // The server's close makes our next write fail; its final GOAWAY was lost.
        wire.ended(FATE_WRITE_FAILED);
        assert!(!wire.fate.broken_streams_unprocessed());
        assert!(!wire.fate.stream_unprocessed(1), "sent before the ack");
        assert!(wire.fate.stream_unprocessed(3), "sent after the ack");
        assert!(wire.fate.stream_unprocessed(5), "never written");
    }

    /// A SETTINGS frame with many parameters (past the 192 bytes kept of other frames) still
    /// yields MAX_CONCURRENT_STREAMS when it comes last.
    #[test]
    fn a_long_settings_frame_still_yields_the_stream_limit() {
        let mut payload = Vec::new();
        for _ in 0..40 {
            payload.extend_from_slice(&[0, 4, 0, 1, 0, 0]); // INITIAL_WINDOW_SIZE, repeated
        }
        payload.extend_from_slice(&[0, 3, 0, 0, 0, 7]);
        assert!(payload.len() > PAYLOAD_CAP);
        let (signals, wire) = inbound(&frame(TYPE_SETTINGS, 0, &payload), &[5, 100, 200]);
        assert!(signals.settings);
        assert_eq!(wire.limits.max_concurrent_streams(), 7);
    }

    proptest! {
        /// Arbitrary bytes never make the readers panic (the fuzz target, as a property).
        #[test]
        fn arbitrary_bytes_do_not_panic(data in proptest::collection::vec(any::<u8>(), 0..2048)) {
            fuzz_feed(&data);
        }

        /// However the bytes are split into reads, the parser sees the same frames.
        #[test]
        fn split_reads_do_not_matter(cuts in proptest::collection::vec(0usize..400, 0..20)) {
            let bytes = stream();
            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c % bytes.len()).collect();
            cuts.sort_unstable();
            let (signals, _) = inbound(&bytes, &cuts);
            prop_assert!(signals.settings);
            prop_assert_eq!(signals.goaway.map(|g| g.last_stream_id), Some(5));
        }
    }
}
