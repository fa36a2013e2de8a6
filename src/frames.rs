//! A byte-stream wrapper that watches the HTTP/2 frames the server sends.
//!
//! hyper hides two facts the pool's state machine needs: *when the server's SETTINGS arrived*
//! (gRPC only calls a connection Ready once the server has spoken HTTP/2 — a black-holed peer
//! that accepts TCP but says nothing must never be Ready) and *that a GOAWAY arrived, with which
//! code and debug data* (a graceful GOAWAY sends the connection to Idle, `ENHANCE_YOUR_CALM` with
//! `too_many_pings` means our keepalive is too eager). Rather than patching hyper, the pool reads
//! the frame headers as they pass: each read walks the 9-byte headers and skips payloads by
//! length, so the cost is a few instructions per frame, not per byte. It sits under TLS (the
//! connector's stream is wrapped), so it sees plaintext frames.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

use parking_lot::Mutex;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::watch;

const FRAME_HEADER_LEN: usize = 9;
const TYPE_SETTINGS: u8 = 0x4;
const TYPE_GOAWAY: u8 = 0x7;
const FLAG_ACK: u8 = 0x1;
/// How much GOAWAY debug data is kept (enough for `too_many_pings`).
const GOAWAY_DEBUG_CAP: usize = 64;

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

/// The frame-header walker, separate from the I/O so it can be tested on plain bytes.
#[derive(Debug, Default)]
pub(crate) struct FrameParser {
    header: [u8; FRAME_HEADER_LEN],
    header_len: usize,
    /// Payload bytes of the current frame still to skip.
    remaining: usize,
    /// Collecting a GOAWAY payload.
    goaway: Option<Vec<u8>>,
    /// Stop looking once both facts are known.
    done: bool,
}

impl FrameParser {
    /// Feeds bytes read from the server; updates `signals`, returning whether they changed.
    pub(crate) fn feed(&mut self, mut bytes: &[u8], signals: &mut FrameSignals) -> bool {
        let mut changed = false;
        while !bytes.is_empty() && !self.done {
            if self.remaining > 0 {
                let take = self.remaining.min(bytes.len());
                if let Some(payload) = &mut self.goaway {
                    let room = (8 + GOAWAY_DEBUG_CAP).saturating_sub(payload.len());
                    payload.extend_from_slice(&bytes[..take.min(room)]);
                }
                self.remaining -= take;
                bytes = &bytes[take..];
                if self.remaining == 0 {
                    changed |= self.finish_frame(signals);
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
            let len = u32::from_be_bytes([0, self.header[0], self.header[1], self.header[2]]);
            let kind = self.header[3];
            let flags = self.header[4];
            self.remaining = len as usize;
            if kind == TYPE_SETTINGS && flags & FLAG_ACK == 0 && !signals.settings {
                signals.settings = true;
                changed = true;
            }
            if kind == TYPE_GOAWAY && signals.goaway.is_none() {
                self.goaway = Some(Vec::with_capacity(8));
            }
            if self.remaining == 0 {
                changed |= self.finish_frame(signals);
            }
        }
        changed
    }

    fn finish_frame(&mut self, signals: &mut FrameSignals) -> bool {
        let Some(payload) = self.goaway.take() else {
            return false;
        };
        if payload.len() < 8 {
            // A malformed GOAWAY; h2 will fail the connection itself.
            return false;
        }
        let last_stream_id =
            u32::from_be_bytes([payload[0], payload[1], payload[2], payload[3]]) & 0x7fff_ffff;
        let error_code = u32::from_be_bytes([payload[4], payload[5], payload[6], payload[7]]);
        signals.goaway = Some(GoAway {
            last_stream_id,
            error_code,
            debug_data: payload[8..].to_vec(),
        });
        self.done = signals.settings;
        true
    }
}

/// Closes a connection from outside, even while hyper's connection task still serves calls.
///
/// hyper keeps an HTTP/2 connection alive until its last stream ends, which is what lets calls
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

/// The I/O wrapper: reads pass through the [`FrameParser`], signals go out through a watch,
/// and a [`KillSwitch`] can end it.
#[derive(Debug)]
pub(crate) struct FrameWatch<T> {
    io: T,
    parser: FrameParser,
    signals: watch::Sender<FrameSignals>,
    kill: Arc<KillSwitch>,
}

impl<T> FrameWatch<T> {
    pub(crate) fn new(io: T) -> (Self, watch::Receiver<FrameSignals>, Arc<KillSwitch>) {
        let (tx, rx) = watch::channel(FrameSignals::default());
        let kill = Arc::new(KillSwitch::default());
        (
            Self {
                io,
                parser: FrameParser::default(),
                signals: tx,
                kill: kill.clone(),
            },
            rx,
            kill,
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
        if let Poll::Ready(Ok(())) = res {
            let new = &buf.filled()[before..];
            if !new.is_empty() && !this.parser.done {
                let parser = &mut this.parser;
                this.signals.send_if_modified(|s| parser.feed(new, s));
            }
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
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.kill.check()?;
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
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

    #[test]
    fn sees_settings_and_goaway() {
        let mut parser = FrameParser::default();
        let mut signals = FrameSignals::default();
        assert!(parser.feed(&stream(), &mut signals));
        assert!(signals.settings);
        let goaway = signals.goaway.unwrap();
        assert_eq!(goaway.last_stream_id, 5);
        assert!(goaway.is_too_many_pings());
        assert!(!goaway.is_graceful());
    }

    #[test]
    fn silence_is_not_settings() {
        let mut parser = FrameParser::default();
        let mut signals = FrameSignals::default();
        assert!(!parser.feed(&[0, 0], &mut signals));
        assert!(!signals.settings);
    }

    proptest! {
        /// However the bytes are split into reads, the parser sees the same frames.
        #[test]
        fn split_reads_do_not_matter(cuts in proptest::collection::vec(0usize..400, 0..20)) {
            let bytes = stream();
            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c % bytes.len()).collect();
            cuts.sort_unstable();
            let mut parser = FrameParser::default();
            let mut signals = FrameSignals::default();
            let mut start = 0;
            for cut in cuts.into_iter().chain([bytes.len()]) {
                parser.feed(&bytes[start..cut.max(start)], &mut signals);
                start = cut.max(start);
            }
            prop_assert!(signals.settings);
            prop_assert_eq!(signals.goaway.map(|g| g.last_stream_id), Some(5));
        }
    }
}
