//! Adaptive flow control: growing a connection's HTTP/2 windows with its measured
//! bandwidth-delay product (BDP), as hyper does for `http2_adaptive_window` (its
//! `proto/h2/ping.rs`) and grpc-go for its dynamic window. h2 has no such thing itself.
//!
//! A fixed window caps a connection at `window / round trip`: 64 KiB over a 50 ms WAN link is
//! 1.3 MB/s, whatever the link can do. The estimate:
//!
//! 1. once a sample is due, the first DATA frame that arrives starts it: a PING goes out and
//!    the DATA bytes read from then on are counted;
//! 2. when the PING's ack arrives, the bytes counted over its round trip are one sample of
//!    the BDP;
//! 3. if the sample is a new bandwidth maximum and at least 2/3 of the current window, the
//!    window was the limit: it doubles (to twice the sample, at most 16 MiB) — the driver
//!    announces it as `SETTINGS_INITIAL_WINDOW_SIZE` and grows the connection window;
//! 4. samples are spaced by a delay that halves while the window grows and quadruples (up to
//!    ~10 s) while it is stable, so that a settled connection pings rarely.
//!
//! PINGs go out only while data arrives, never on a quiet connection (servers count PINGs
//! without data against the client, gRFC A8). h2 allows one PING of ours in flight per
//! connection, and keepalive uses PINGs too: the driver owns the one [`h2::PingPong`] and
//! lets a PING serve both (see `driver.rs`).
//!
//! Here: the [`Estimator`] (pure arithmetic over samples), the [`Sample`] the byte stream and
//! the driver share, and [`DataCounter`], the byte-stream wrapper that reports the DATA
//! frames it reads. It sits under the frame watcher, so it sees plaintext frames too.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::Notify;

/// HTTP/2's default window, where an adaptive connection starts (as hyper's does).
pub(crate) const INITIAL_WINDOW: u32 = 65_535;
/// The largest window the estimate grows to; beyond it TCP's own flow control is the limit.
const WINDOW_LIMIT: u32 = 16 * 1024 * 1024;
/// The spacing of samples while the window grows fastest.
const FIRST_SAMPLE_DELAY: Duration = Duration::from_millis(100);
/// Samples stop spacing out once they are this far apart.
const MAX_SAMPLE_DELAY: Duration = Duration::from_secs(10);

/// hyper's BDP arithmetic: running RTT, best bandwidth, current window, spacing of samples.
#[derive(Debug)]
pub(crate) struct Estimator {
    window: u32,
    max_bandwidth: f64,
    /// Smoothed round trip, in seconds (0 before the first sample).
    rtt: f64,
    delay: Duration,
    stable: u32,
}

impl Estimator {
    /// An estimate that starts from `window`.
    pub(crate) fn new(window: u32) -> Self {
        Self {
            window,
            max_bandwidth: 0.0,
            rtt: 0.0,
            delay: FIRST_SAMPLE_DELAY,
            stable: 0,
        }
    }

    /// How long to wait after a sample before the next one may start.
    pub(crate) fn delay(&self) -> Duration {
        self.delay
    }

    /// Takes one sample: `bytes` of DATA read during a PING's round trip `rtt`. Returns the
    /// new window when it grows.
    pub(crate) fn sample(&mut self, bytes: usize, rtt: Duration) -> Option<u32> {
        if self.window == WINDOW_LIMIT {
            self.stabilize();
            return None;
        }
        let rtt = rtt.as_secs_f64();
        if self.rtt == 0.0 {
            self.rtt = rtt;
        } else {
            // A moving average that weighs the new sample 1/8, as TCP's SRTT does.
            self.rtt += (rtt - self.rtt) * 0.125;
        }
        // hyper's margin: a PING ack waits behind the data sent before it.
        let bandwidth = bytes as f64 / (self.rtt * 1.5);
        if bandwidth < self.max_bandwidth {
            self.stabilize();
            return None;
        }
        self.max_bandwidth = bandwidth;
        if bytes >= self.window as usize * 2 / 3 {
            // The window was full within one round trip: it was the limit.
            self.window = u32::try_from(bytes.saturating_mul(2))
                .unwrap_or(WINDOW_LIMIT)
                .min(WINDOW_LIMIT);
            self.stable = 0;
            self.delay /= 2;
            Some(self.window)
        } else {
            self.stabilize();
            None
        }
    }

    /// Two samples in a row without growth: space the samples out.
    fn stabilize(&mut self) {
        if self.delay < MAX_SAMPLE_DELAY {
            self.stable += 1;
            if self.stable >= 2 {
                self.delay *= 4;
                self.stable = 0;
            }
        }
    }
}

/// One sample in the making, shared by the byte stream (which counts DATA) and the driver
/// (which arms it, sends the PING and reads the count when the ack comes).
#[derive(Debug, Default)]
pub(crate) struct Sample {
    /// Whether DATA is being counted (a sample is due or under way).
    armed: AtomicBool,
    bytes: AtomicUsize,
    /// Woken by DATA while armed: the driver sends the sample's PING.
    data: Notify,
}

impl Sample {
    /// Counts a DATA frame's payload, if a sample is due or under way.
    pub(crate) fn record_data(&self, len: usize) {
        if self.armed.load(Ordering::Acquire) {
            self.bytes.fetch_add(len, Ordering::AcqRel);
            self.data.notify_one();
        }
    }

    /// Starts counting: a sample is due.
    pub(crate) fn arm(&self) {
        self.bytes.store(0, Ordering::Release);
        self.armed.store(true, Ordering::Release);
    }

    pub(crate) fn is_armed(&self) -> bool {
        self.armed.load(Ordering::Acquire)
    }

    /// Waits until DATA has been counted since the sample was armed.
    ///
    /// # Cancel safety
    /// Cancel safe: the count stays, and a wake-up that comes meanwhile is kept.
    pub(crate) async fn data_counted(&self) {
        loop {
            if self.bytes.load(Ordering::Acquire) > 0 {
                return;
            }
            self.data.notified().await;
        }
    }

    /// Ends the sample: stops counting, returns the bytes counted.
    pub(crate) fn take(&self) -> usize {
        self.armed.store(false, Ordering::Release);
        self.bytes.swap(0, Ordering::AcqRel)
    }
}

const FRAME_HEADER_LEN: usize = 9;
const TYPE_DATA: u8 = 0x0;

/// Wraps the connection's byte stream and reports the length of every inbound DATA frame to
/// the [`Sample`]. It walks the 9-byte frame headers and skips payloads by length, like the
/// frame watcher: a few instructions per frame.
#[derive(Debug)]
pub(crate) struct DataCounter<T> {
    io: T,
    sample: Arc<Sample>,
    header: [u8; FRAME_HEADER_LEN],
    header_len: usize,
    /// Payload bytes of the current frame still to pass.
    remaining: usize,
}

impl<T> DataCounter<T> {
    pub(crate) fn new(io: T, sample: Arc<Sample>) -> Self {
        Self {
            io,
            sample,
            header: [0; FRAME_HEADER_LEN],
            header_len: 0,
            remaining: 0,
        }
    }

    /// Walks bytes the server sent (a client reads no preface: frames from the first byte).
    fn feed(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            if self.remaining > 0 {
                let skip = self.remaining.min(bytes.len());
                self.remaining -= skip;
                bytes = &bytes[skip..];
                continue;
            }
            let take = (FRAME_HEADER_LEN - self.header_len).min(bytes.len());
            self.header[self.header_len..self.header_len + take].copy_from_slice(&bytes[..take]);
            self.header_len += take;
            bytes = &bytes[take..];
            if self.header_len == FRAME_HEADER_LEN {
                self.header_len = 0;
                let len = u32::from_be_bytes([0, self.header[0], self.header[1], self.header[2]])
                    as usize;
                if self.header[3] == TYPE_DATA {
                    self.sample.record_data(len);
                }
                self.remaining = len;
            }
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for DataCounter<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.io).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = polled {
            let this = &mut *self;
            this.feed(&buf.filled()[before..]);
        }
        polled
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for DataCounter<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RTT: Duration = Duration::from_millis(50);

    /// A window filled within one round trip doubles, sample after sample, up to 16 MiB and
    /// no further.
    #[test]
    fn a_full_window_doubles_up_to_the_limit() {
        let mut estimate = Estimator::new(INITIAL_WINDOW);
        let mut window = INITIAL_WINDOW;
        let mut grown = Vec::new();
        for _ in 0..20 {
            if let Some(next) = estimate.sample(window as usize, RTT) {
                grown.push(next);
                window = next;
            }
        }
        assert_eq!(grown[0], 2 * INITIAL_WINDOW);
        assert!(grown.windows(2).all(|w| w[1] > w[0]), "{grown:?}");
        assert_eq!(*grown.last().unwrap(), WINDOW_LIMIT);
        assert_eq!(estimate.sample(WINDOW_LIMIT as usize, RTT), None);
    }

    /// Less than 2/3 of the window in a round trip means the window was not the limit: it
    /// stays, and samples space out (×4 every two stable samples, until ~10 s).
    #[test]
    fn a_window_not_filled_stays_and_samples_space_out() {
        let mut estimate = Estimator::new(INITIAL_WINDOW);
        let little = INITIAL_WINDOW as usize / 2;
        let mut delays = Vec::new();
        for _ in 0..12 {
            assert_eq!(estimate.sample(little, RTT), None);
            delays.push(estimate.delay());
        }
        assert_eq!(delays[1], FIRST_SAMPLE_DELAY * 4);
        assert_eq!(delays[3], FIRST_SAMPLE_DELAY * 16);
        assert!(delays.iter().all(|d| *d <= MAX_SAMPLE_DELAY * 4));
        assert_eq!(delays[10], delays[11], "spacing settles");
    }

    /// A sample slower than the best bandwidth seen does not grow the window, even if it
    /// filled it.
    #[test]
    fn a_slower_sample_does_not_grow_the_window() {
        let mut estimate = Estimator::new(INITIAL_WINDOW);
        assert!(estimate.sample(INITIAL_WINDOW as usize, RTT).is_some());
        // The same bytes over a round trip ten times longer: far less bandwidth.
        assert_eq!(estimate.sample(INITIAL_WINDOW as usize, RTT * 80), None);
    }

    fn frame(kind: u8, payload_len: usize) -> Vec<u8> {
        let len = (payload_len as u32).to_be_bytes();
        let mut f = vec![len[1], len[2], len[3], kind, 0, 0, 0, 0, 1];
        f.extend(std::iter::repeat_n(7u8, payload_len));
        f
    }

    /// Only DATA payloads are counted, only while armed, whatever the read boundaries.
    #[tokio::test]
    async fn counts_data_payloads_across_split_reads() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut wire = frame(0x4, 12); // SETTINGS
        wire.extend(frame(TYPE_DATA, 1000));
        wire.extend(frame(0x1, 30)); // HEADERS
        wire.extend(frame(TYPE_DATA, 300));
        let sample = Arc::new(Sample::default());
        let (client, mut server) = tokio::io::duplex(64);
        let mut counter = DataCounter::new(client, sample.clone());
        let write = tokio::spawn(async move {
            // Unarmed: the first copy is not counted.
            server.write_all(&wire).await.unwrap();
            server.write_all(&wire).await.unwrap();
        });
        let mut buf = vec![0u8; 2 * (4 * 9 + 1342)];
        let first = buf.len() / 2;
        counter.read_exact(&mut buf[..first]).await.unwrap();
        assert_eq!(sample.take(), 0);
        sample.arm();
        counter.read_exact(&mut buf[first..]).await.unwrap();
        write.await.unwrap();
        sample.data_counted().await;
        assert_eq!(sample.take(), 1300);
    }
}
