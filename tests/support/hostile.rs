//! [`HostileServer`]: a scriptable raw HTTP/2 server that sends whatever a test tells it to.
//!
//! The pool must survive servers that break the rules: GOAWAYs with odd stream ids and codes,
//! floods of PING or SETTINGS, flow-control overflow, resets at any point, responses without
//! `:status` or with a foreign content type, frames after the end of a stream, bodies that
//! never end, peers that stop reading, bytes that are not HTTP/2 at all. A real server (tonic,
//! h2) cannot be made to do most of that, so this one writes every frame by hand: a 9-byte
//! header and a payload, header blocks as HPACK literals without indexing or Huffman coding.
//! Nothing is validated on the way out, so a test can send exactly the bytes it means to.
//!
//! Each accepted connection runs the test's *script* — an async closure given a [`Peer`] —
//! on the server's own thread and runtime (started like every test server, see
//! [`super::thread`]). A task per connection reads the client's preface and frames, records
//! every frame in a log the test can inspect ([`HostileServer::frames`],
//! [`HostileServer::wait_until`]) and hands them to the script. It answers the client's
//! SETTINGS with an ack by itself (every script would otherwise have to), and nothing else:
//! the script decides what the server says, when, and whether it reads at all
//! ([`Peer::stop_reading`]). The client's header blocks are not decoded (stream ids and the
//! request body are enough to tell calls apart); [`Peer::expect_request`] returns a request's
//! body so that a script can decode the gRPC message in it.
//!
//! When a script returns, the server closes its side of the connection (TCP FIN) and goes on
//! recording the client's frames until the client closes too (at most 5 s). A script that
//! returns an error (usually: the client closed the connection) just ends; the error is kept
//! in the log for diagnostics. Dropping the server stops its runtime, closing every
//! connection.

use std::collections::VecDeque;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot, watch};

/// The client connection preface.
pub const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Frame types (RFC 9113 §6).
pub mod kind {
    /// DATA.
    pub const DATA: u8 = 0x0;
    /// HEADERS.
    pub const HEADERS: u8 = 0x1;
    /// RST_STREAM.
    pub const RST_STREAM: u8 = 0x3;
    /// SETTINGS.
    pub const SETTINGS: u8 = 0x4;
    /// PING.
    pub const PING: u8 = 0x6;
    /// GOAWAY.
    pub const GOAWAY: u8 = 0x7;
    /// WINDOW_UPDATE.
    pub const WINDOW_UPDATE: u8 = 0x8;
}

/// `END_STREAM` on DATA and HEADERS.
pub const END_STREAM: u8 = 0x1;
/// `ACK` on SETTINGS and PING.
pub const ACK: u8 = 0x1;
/// `END_HEADERS` on HEADERS.
pub const END_HEADERS: u8 = 0x4;

/// HTTP/2 error codes (RFC 9113 §7), for RST_STREAM and GOAWAY.
#[allow(dead_code)] // the whole table, so that a script can name any of them
pub mod code {
    /// NO_ERROR.
    pub const NO_ERROR: u32 = 0x0;
    /// PROTOCOL_ERROR.
    pub const PROTOCOL_ERROR: u32 = 0x1;
    /// INTERNAL_ERROR.
    pub const INTERNAL_ERROR: u32 = 0x2;
    /// FLOW_CONTROL_ERROR.
    pub const FLOW_CONTROL_ERROR: u32 = 0x3;
    /// SETTINGS_TIMEOUT.
    pub const SETTINGS_TIMEOUT: u32 = 0x4;
    /// STREAM_CLOSED.
    pub const STREAM_CLOSED: u32 = 0x5;
    /// FRAME_SIZE_ERROR.
    pub const FRAME_SIZE_ERROR: u32 = 0x6;
    /// REFUSED_STREAM.
    pub const REFUSED_STREAM: u32 = 0x7;
    /// CANCEL.
    pub const CANCEL: u32 = 0x8;
    /// COMPRESSION_ERROR.
    pub const COMPRESSION_ERROR: u32 = 0x9;
    /// CONNECT_ERROR.
    pub const CONNECT_ERROR: u32 = 0xa;
    /// ENHANCE_YOUR_CALM.
    pub const ENHANCE_YOUR_CALM: u32 = 0xb;
    /// INADEQUATE_SECURITY.
    pub const INADEQUATE_SECURITY: u32 = 0xc;
    /// HTTP_1_1_REQUIRED.
    pub const HTTP_1_1_REQUIRED: u32 = 0xd;
}

/// SETTINGS parameters (RFC 9113 §6.5.2).
#[allow(dead_code)] // the whole table, so that a script can name any of them
pub mod setting {
    /// SETTINGS_HEADER_TABLE_SIZE.
    pub const HEADER_TABLE_SIZE: u16 = 0x1;
    /// SETTINGS_MAX_CONCURRENT_STREAMS.
    pub const MAX_CONCURRENT_STREAMS: u16 = 0x3;
    /// SETTINGS_INITIAL_WINDOW_SIZE.
    pub const INITIAL_WINDOW_SIZE: u16 = 0x4;
    /// SETTINGS_MAX_FRAME_SIZE.
    pub const MAX_FRAME_SIZE: u16 = 0x5;
    /// SETTINGS_MAX_HEADER_LIST_SIZE.
    pub const MAX_HEADER_LIST_SIZE: u16 = 0x6;
}

/// The largest stream id, the last-stream-id of a GOAWAY that announces a graceful shutdown.
pub const MAX_STREAM_ID: u32 = 0x7fff_ffff;

/// One frame the client sent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame {
    /// Which accepted connection it came on (0 for the first).
    pub conn: usize,
    /// Its type (see [`kind`]).
    pub kind: u8,
    /// Its flags.
    pub flags: u8,
    /// Its stream id (the reserved bit cleared).
    pub stream: u32,
    /// Its payload.
    pub payload: Vec<u8>,
}

impl Frame {
    /// Whether it is of this type.
    pub fn is(&self, kind: u8) -> bool {
        self.kind == kind
    }

    /// Whether it carries this flag.
    pub fn has(&self, flag: u8) -> bool {
        self.flags & flag != 0
    }

    /// The error code of a RST_STREAM or GOAWAY.
    pub fn error_code(&self) -> Option<u32> {
        let at = match self.kind {
            kind::RST_STREAM => 0,
            kind::GOAWAY => 4,
            _ => return None,
        };
        let bytes = self.payload.get(at..at + 4)?;
        Some(u32::from_be_bytes(bytes.try_into().ok()?))
    }

    /// The parameters of a SETTINGS frame, in order (empty for any other frame).
    pub fn settings(&self) -> Vec<(u16, u32)> {
        if !self.is(kind::SETTINGS) {
            return Vec::new();
        }
        self.payload
            .chunks_exact(6)
            .map(|p| {
                (
                    u16::from_be_bytes([p[0], p[1]]),
                    u32::from_be_bytes([p[2], p[3], p[4], p[5]]),
                )
            })
            .collect()
    }

    /// The value of SETTINGS parameter `id` in this frame, if it is a SETTINGS frame that
    /// carries it.
    pub fn setting(&self, id: u16) -> Option<u32> {
        self.settings()
            .into_iter()
            .rev()
            .find(|(param, _)| *param == id)
            .map(|(_, value)| value)
    }

    /// Whether it is the client's RST_STREAM of `stream` with `code`.
    pub fn is_reset(&self, stream: u32, code: u32) -> bool {
        self.is(kind::RST_STREAM) && self.stream == stream && self.error_code() == Some(code)
    }
}

/// Everything the server saw, as the test reads it.
#[derive(Clone, Debug, Default)]
pub struct Recorded {
    /// Connections accepted so far.
    pub accepted: usize,
    /// Connections whose client side ended (EOF or error), by index.
    pub client_closed: Vec<usize>,
    /// Every frame the clients sent, in the order each connection read them.
    pub frames: Vec<Frame>,
    /// How each script that ended went: `(connection, Ok or the error)`.
    pub scripts: Vec<(usize, Result<(), String>)>,
    /// Connections whose first 24 bytes were not the HTTP/2 client preface.
    pub bad_prefaces: Vec<usize>,
}

impl Recorded {
    /// How many frames match `pred`.
    pub fn count(&self, pred: impl Fn(&Frame) -> bool) -> usize {
        self.frames.iter().filter(|f| pred(f)).count()
    }

    /// The client's GOAWAY frames.
    pub fn goaways(&self) -> Vec<&Frame> {
        self.frames.iter().filter(|f| f.is(kind::GOAWAY)).collect()
    }
}

/// The log shared by the server thread and the test.
#[derive(Debug, Default)]
struct Log {
    recorded: Mutex<Recorded>,
    /// Bumped on every change, to wake [`HostileServer::wait_until`].
    version: watch::Sender<u64>,
}

impl Log {
    fn update(&self, change: impl FnOnce(&mut Recorded)) {
        change(&mut self.lock());
        self.version.send_modify(|v| *v += 1);
    }

    fn lock(&self) -> MutexGuard<'_, Recorded> {
        // A panicking test thread must not poison the server's log.
        self.recorded.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

type Script =
    Arc<dyn Fn(Peer) -> Pin<Box<dyn Future<Output = io::Result<()>> + Send>> + Send + Sync>;

/// A raw HTTP/2 server on its own thread that runs a script per accepted connection; see the
/// [module docs](self).
#[derive(Debug)]
pub struct HostileServer {
    addr: SocketAddr,
    log: Arc<Log>,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl HostileServer {
    /// Starts a server on 127.0.0.1 (any free port) that runs `script` on each connection
    /// it accepts. Panics if it cannot listen.
    pub fn start<S, Fut>(script: S) -> Self
    where
        S: Fn(Peer) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = io::Result<()>> + Send + 'static,
    {
        let script: Script = Arc::new(move |peer| Box::pin(script(peer)));
        let log = Arc::new(Log::default());
        let (stop, stop_rx) = oneshot::channel();
        let server_log = log.clone();
        let (thread, addr) = super::thread::start(
            "hostile-server".to_owned(),
            move |started| serve(script, server_log, started, stop_rx),
            || {},
        )
        .expect("hostile server listens");
        Self {
            addr,
            log,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    /// `static:///<addr>`, the pool target for this server.
    pub fn target(&self) -> String {
        format!("static:///{}", self.addr)
    }

    /// A copy of everything recorded so far.
    pub fn recorded(&self) -> Recorded {
        self.log.lock().clone()
    }

    /// Every frame the clients sent so far.
    pub fn frames(&self) -> Vec<Frame> {
        self.log.lock().frames.clone()
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> usize {
        self.log.lock().accepted
    }

    /// How many frames the clients sent that match `pred`.
    pub fn count(&self, pred: impl Fn(&Frame) -> bool) -> usize {
        self.log.lock().count(pred)
    }

    /// Waits until the record satisfies `done`, at most `timeout`; true if it did.
    pub async fn wait_until(
        &self,
        timeout: Duration,
        mut done: impl FnMut(&Recorded) -> bool,
    ) -> bool {
        let mut version = self.log.version.subscribe();
        let wait = async {
            loop {
                // Seen before looking, so that a change after the look wakes the wait.
                version.borrow_and_update();
                if done(&self.log.lock()) {
                    return;
                }
                if version.changed().await.is_err() {
                    return std::future::pending().await;
                }
            }
        };
        tokio::time::timeout(timeout, wait).await.is_ok()
    }
}

impl Drop for HostileServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The server thread's main future: listen, report, accept until stopped.
async fn serve(
    script: Script,
    log: Arc<Log>,
    started: super::thread::Started<SocketAddr>,
    stop: oneshot::Receiver<()>,
) {
    let bound = async {
        let listener = TcpListener::bind((std::net::Ipv4Addr::LOCALHOST, 0)).await?;
        let addr = listener.local_addr()?;
        io::Result::Ok((listener, addr))
    };
    let listener = match bound.await {
        Ok((listener, addr)) => {
            if started.send(Ok(addr)).is_err() {
                return;
            }
            listener
        }
        Err(err) => {
            let _ = started.send(Err(err));
            return;
        }
    };
    let accept = async {
        // Ends with the runtime (on stop); each test opens a bounded number of connections.
        while let Ok((socket, _)) = listener.accept().await {
            let mut index = 0;
            log.update(|r| {
                index = r.accepted;
                r.accepted += 1;
            });
            tokio::spawn(connection(socket, index, log.clone(), script.clone()));
        }
    };
    tokio::select! {
        _ = accept => {}
        _ = stop => {}
    }
}

/// Runs one connection: a reader task that records and forwards the client's frames, and the
/// script. The connection closes when the script ends.
async fn connection(socket: TcpStream, index: usize, log: Arc<Log>, script: Script) {
    let _ = socket.set_nodelay(true);
    let (read, write) = socket.into_split();
    let writer = Arc::new(tokio::sync::Mutex::new(write));
    let (inbox_tx, inbox) = mpsc::unbounded_channel();
    let (reading, reading_rx) = watch::channel(true);
    let reader = tokio::spawn(read_frames(
        read,
        index,
        log.clone(),
        writer.clone(),
        inbox_tx,
        reading_rx,
    ));
    let peer = Peer {
        index,
        writer: writer.clone(),
        inbox,
        pending: VecDeque::new(),
        max_stream: 0,
        reading,
    };
    let result = script(peer).await;
    log.update(|r| r.scripts.push((index, result.map_err(|e| e.to_string()))));
    // Close our side, but keep recording what the client still sends (its GOAWAY, say)
    // until it closes too, for a bounded time.
    let _ = writer.lock().await.shutdown().await;
    let mut reader = reader;
    if tokio::time::timeout(DRAIN_TIMEOUT, &mut reader)
        .await
        .is_err()
    {
        reader.abort();
    }
}

/// How long a connection whose script ended keeps reading the client's last frames.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// Reads the preface, then frame after frame: records each, acks SETTINGS, hands each to the
/// script. Pauses while the script does not read. Ends at EOF or on an error.
async fn read_frames(
    mut read: OwnedReadHalf,
    index: usize,
    log: Arc<Log>,
    writer: Arc<tokio::sync::Mutex<OwnedWriteHalf>>,
    inbox: mpsc::UnboundedSender<Frame>,
    mut reading: watch::Receiver<bool>,
) {
    let mut preface = [0u8; 24];
    if read.read_exact(&mut preface).await.is_err() {
        log.update(|r| r.client_closed.push(index));
        return;
    }
    if preface != PREFACE {
        log.update(|r| r.bad_prefaces.push(index));
        return;
    }
    loop {
        // Closed once the script ended: from then on, read until the client closes.
        let _ = reading.wait_for(|on| *on).await;
        let mut header = [0u8; 9];
        if read.read_exact(&mut header).await.is_err() {
            break;
        }
        let len = u32::from_be_bytes([0, header[0], header[1], header[2]]) as usize;
        let mut payload = vec![0u8; len];
        if read.read_exact(&mut payload).await.is_err() {
            break;
        }
        let frame = Frame {
            conn: index,
            kind: header[3],
            flags: header[4],
            stream: u32::from_be_bytes([header[5], header[6], header[7], header[8]])
                & MAX_STREAM_ID,
            payload,
        };
        if frame.is(kind::SETTINGS) && !frame.has(ACK) {
            let mut writer = writer.lock().await;
            let _ = writer.write_all(&encode(kind::SETTINGS, ACK, 0, &[])).await;
        }
        log.update(|r| r.frames.push(frame.clone()));
        // The script may have ended, or never read: the log has the frame anyway.
        let _ = inbox.send(frame);
    }
    log.update(|r| r.client_closed.push(index));
}

/// One connection as its script sees it: the client's frames in, any bytes out.
#[derive(Debug)]
pub struct Peer {
    index: usize,
    writer: Arc<tokio::sync::Mutex<OwnedWriteHalf>>,
    inbox: mpsc::UnboundedReceiver<Frame>,
    /// Frames read ahead by [`Peer::expect_request`] for other streams, in order.
    pending: VecDeque<Frame>,
    /// The highest client stream id whose HEADERS the script has seen.
    max_stream: u32,
    reading: watch::Sender<bool>,
}

fn eof() -> io::Error {
    io::Error::new(
        io::ErrorKind::UnexpectedEof,
        "the client closed the connection",
    )
}

impl Peer {
    /// Which accepted connection this is (0 for the first).
    pub fn index(&self) -> usize {
        self.index
    }

    // ---- reading ----

    /// The client's next frame (SETTINGS already acked); `UnexpectedEof` once it closed.
    pub async fn next_frame(&mut self) -> io::Result<Frame> {
        if let Some(frame) = self.pending.pop_front() {
            return Ok(frame);
        }
        self.inbox.recv().await.ok_or_else(eof)
    }

    /// Skips frames until one matches `pred`, and returns it.
    pub async fn expect(&mut self, mut pred: impl FnMut(&Frame) -> bool) -> io::Result<Frame> {
        loop {
            let frame = self.next_frame().await?;
            if pred(&frame) {
                return Ok(frame);
            }
        }
    }

    /// Skips frames until the HEADERS that opens a new stream; returns that frame.
    pub async fn expect_new_stream(&mut self) -> io::Result<Frame> {
        let max = self.max_stream;
        let frame = self
            .expect(|f| f.is(kind::HEADERS) && f.stream > max)
            .await?;
        self.max_stream = frame.stream;
        Ok(frame)
    }

    /// Skips frames until the client opens a new stream; returns its id.
    pub async fn expect_headers(&mut self) -> io::Result<u32> {
        Ok(self.expect_new_stream().await?.stream)
    }

    /// Waits for the next request and its whole body (until the client's `END_STREAM`);
    /// returns the stream id and the body. Frames of other streams read meanwhile stay
    /// queued for later reads. Fails if the client resets the stream first.
    pub async fn expect_request(&mut self) -> io::Result<(u32, Vec<u8>)> {
        let headers = self.expect_new_stream().await?;
        let id = headers.stream;
        let mut body = Vec::new();
        if headers.has(END_STREAM) {
            return Ok((id, body));
        }
        let mut others = VecDeque::new();
        let result = loop {
            let frame = match self.next_frame().await {
                Ok(frame) => frame,
                Err(e) => break Err(e),
            };
            if frame.stream != id {
                others.push_back(frame);
                continue;
            }
            match frame.kind {
                kind::DATA => {
                    body.extend_from_slice(&frame.payload);
                    if frame.has(END_STREAM) {
                        break Ok((id, std::mem::take(&mut body)));
                    }
                }
                kind::HEADERS if frame.has(END_STREAM) => {
                    break Ok((id, std::mem::take(&mut body)))
                }
                kind::RST_STREAM => {
                    break Err(io::Error::other(format!(
                        "the client reset stream {id} with code {:?}",
                        frame.error_code()
                    )))
                }
                _ => {}
            }
        };
        while let Some(frame) = others.pop_back() {
            self.pending.push_front(frame);
        }
        result
    }

    /// Waits for the client's ack of the PING with `data`.
    pub async fn expect_ping_ack(&mut self, data: [u8; 8]) -> io::Result<()> {
        self.expect(|f| f.is(kind::PING) && f.has(ACK) && f.payload == data)
            .await
            .map(drop)
    }

    /// Reads (and discards) frames until the client closes the connection.
    pub async fn read_until_closed(&mut self) {
        while self.next_frame().await.is_ok() {}
    }

    /// Stops reading from the socket: the client's bytes pile up in the kernel's buffers
    /// until its writes block. Frames already read stay readable.
    pub fn stop_reading(&self) {
        self.reading.send_replace(false);
    }

    /// Keeps the connection open, doing nothing more, until the server stops.
    pub async fn hold(&self) -> io::Result<()> {
        std::future::pending().await
    }

    // ---- writing ----

    /// Writes `bytes` as they are: anything at all, HTTP/2 or not.
    pub async fn send_raw(&self, bytes: &[u8]) -> io::Result<()> {
        self.writer.lock().await.write_all(bytes).await
    }

    /// Writes one frame.
    pub async fn send_frame(
        &self,
        kind: u8,
        flags: u8,
        stream: u32,
        payload: &[u8],
    ) -> io::Result<()> {
        self.send_raw(&encode(kind, flags, stream, payload)).await
    }

    /// SETTINGS with these parameters, in this order (any number of them).
    pub async fn send_settings(&self, params: &[(u16, u32)]) -> io::Result<()> {
        self.send_raw(&settings(params)).await
    }

    /// A PING.
    pub async fn send_ping(&self, data: [u8; 8]) -> io::Result<()> {
        self.send_frame(kind::PING, 0, 0, &data).await
    }

    /// A GOAWAY.
    pub async fn send_goaway(&self, last_stream: u32, code: u32, debug: &[u8]) -> io::Result<()> {
        self.send_raw(&goaway(last_stream, code, debug)).await
    }

    /// A RST_STREAM.
    pub async fn send_rst(&self, stream: u32, code: u32) -> io::Result<()> {
        self.send_frame(kind::RST_STREAM, 0, stream, &code.to_be_bytes())
            .await
    }

    /// A WINDOW_UPDATE (stream 0: the connection's window); any increment, even 0 or one
    /// that overflows the window.
    pub async fn send_window_update(&self, stream: u32, increment: u32) -> io::Result<()> {
        self.send_frame(kind::WINDOW_UPDATE, 0, stream, &increment.to_be_bytes())
            .await
    }

    /// One HEADERS frame (`END_HEADERS` set) with these fields, in this order.
    pub async fn send_headers(
        &self,
        stream: u32,
        fields: &[(&str, &str)],
        end_stream: bool,
    ) -> io::Result<()> {
        let flags = END_HEADERS | if end_stream { END_STREAM } else { 0 };
        self.send_frame(kind::HEADERS, flags, stream, &header_block(fields))
            .await
    }

    /// `:status 200` and `content-type application/grpc`.
    pub async fn send_response_headers(&self, stream: u32) -> io::Result<()> {
        self.send_headers(stream, GRPC_RESPONSE, false).await
    }

    /// A DATA frame.
    pub async fn send_data(&self, stream: u32, data: &[u8], end_stream: bool) -> io::Result<()> {
        let flags = if end_stream { END_STREAM } else { 0 };
        self.send_frame(kind::DATA, flags, stream, data).await
    }

    /// One gRPC message (length-prefixed, uncompressed) in a DATA frame.
    pub async fn send_message(&self, stream: u32, message: &[u8]) -> io::Result<()> {
        self.send_data(stream, &grpc_frame(message), false).await
    }

    /// A whole successful response: headers, one message, `grpc-status 0`.
    pub async fn send_ok(&self, stream: u32, message: &[u8]) -> io::Result<()> {
        let mut bytes = encode(
            kind::HEADERS,
            END_HEADERS,
            stream,
            &header_block(GRPC_RESPONSE),
        );
        bytes.extend(encode(kind::DATA, 0, stream, &grpc_frame(message)));
        bytes.extend(encode(
            kind::HEADERS,
            END_HEADERS | END_STREAM,
            stream,
            &header_block(&[("grpc-status", "0")]),
        ));
        self.send_raw(&bytes).await
    }
}

/// The headers of a gRPC response.
pub const GRPC_RESPONSE: &[(&str, &str)] =
    &[(":status", "200"), ("content-type", "application/grpc")];

/// A frame: the 9-byte header (length, type, flags, stream id) and the payload.
pub fn encode(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = (payload.len() as u32).to_be_bytes();
    let mut frame = Vec::with_capacity(9 + payload.len());
    frame.extend_from_slice(&len[1..]);
    frame.push(kind);
    frame.push(flags);
    frame.extend_from_slice(&stream.to_be_bytes());
    frame.extend_from_slice(payload);
    frame
}

/// A SETTINGS frame with these parameters.
pub fn settings(params: &[(u16, u32)]) -> Vec<u8> {
    let payload: Vec<u8> = params
        .iter()
        .flat_map(|(id, value)| id.to_be_bytes().into_iter().chain(value.to_be_bytes()))
        .collect();
    encode(kind::SETTINGS, 0, 0, &payload)
}

/// A GOAWAY frame.
pub fn goaway(last_stream: u32, code: u32, debug: &[u8]) -> Vec<u8> {
    let mut payload = last_stream.to_be_bytes().to_vec();
    payload.extend_from_slice(&code.to_be_bytes());
    payload.extend_from_slice(debug);
    encode(kind::GOAWAY, 0, 0, &payload)
}

/// An HPACK header block of literal fields without indexing, new names, no Huffman coding
/// (RFC 7541 §6.2.2): the one encoding a decoder must take without any table state.
pub fn header_block(fields: &[(&str, &str)]) -> Vec<u8> {
    let mut block = Vec::new();
    for (name, value) in fields {
        block.push(0x00);
        hpack_string(&mut block, name.as_bytes());
        hpack_string(&mut block, value.as_bytes());
    }
    block
}

/// An HPACK string literal: `H = 0`, a 7-bit-prefix length, the bytes.
fn hpack_string(out: &mut Vec<u8>, bytes: &[u8]) {
    let mut len = bytes.len();
    if len < 0x7f {
        out.push(len as u8);
    } else {
        out.push(0x7f);
        len -= 0x7f;
        while len >= 0x80 {
            out.push((len as u8 & 0x7f) | 0x80);
            len >>= 7;
        }
        out.push(len as u8);
    }
    out.extend_from_slice(bytes);
}

/// A gRPC length-prefixed message: uncompressed flag, 4-byte length, the message.
pub fn grpc_frame(message: &[u8]) -> Vec<u8> {
    let mut framed = vec![0];
    framed.extend_from_slice(&(message.len() as u32).to_be_bytes());
    framed.extend_from_slice(message);
    framed
}

/// The message in a request body holding one gRPC length-prefixed message.
pub fn grpc_message(body: &[u8]) -> &[u8] {
    body.get(5..).unwrap_or_default()
}
