//! A minimal raw HTTP/2 server that enforces a keepalive policy the strict way: it answers
//! the first PING of a connection with GOAWAY `ENHANCE_YOUR_CALM` / `too_many_pings` (gRFC
//! A8) and closes. tonic's server has no such policy, hence this fake. It speaks just enough
//! HTTP/2 for a client to become Ready: its own SETTINGS first, then SETTINGS acks.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const ENHANCE_YOUR_CALM: u32 = 0xb;

/// A fake server that sends GOAWAY too_many_pings on the first PING.
#[derive(Debug)]
pub struct PingPolicyServer {
    addr: SocketAddr,
    goaways: Arc<AtomicU64>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

impl PingPolicyServer {
    /// Starts the fake on `addr` (port 0 picks one), on its own thread and runtime.
    pub fn start(addr: SocketAddr) -> Self {
        let goaways = Arc::new(AtomicU64::new(0));
        let counter = goaways.clone();
        let (bound_tx, bound_rx) = std::sync::mpsc::channel();
        let (stop, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            runtime.block_on(async move {
                let listener = TcpListener::bind(addr).await.expect("bind fake server");
                bound_tx
                    .send(listener.local_addr().expect("addr"))
                    .expect("report addr");
                let accept = async {
                    while let Ok((mut socket, _)) = listener.accept().await {
                        let counter = counter.clone();
                        tokio::spawn(async move {
                            let _ = serve(&mut socket, &counter).await;
                        });
                    }
                };
                tokio::select! {
                    _ = accept => {}
                    _ = stop_rx => {}
                }
            });
        });
        let addr = bound_rx
            .recv_timeout(Duration::from_secs(10))
            .expect("fake server bound");
        Self {
            addr,
            goaways,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// How many GOAWAY too_many_pings it sent.
    pub fn goaways(&self) -> u64 {
        self.goaways.load(Ordering::Relaxed)
    }
}

impl Drop for PingPolicyServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

async fn serve(socket: &mut tokio::net::TcpStream, goaways: &AtomicU64) -> std::io::Result<()> {
    let mut preface = [0u8; 24];
    socket.read_exact(&mut preface).await?;
    if preface != PREFACE {
        return Ok(());
    }
    socket.write_all(&frame(0x4, 0, 0, &[])).await?;
    // Bounded: a connection lives for at most 1 000 frames.
    for _ in 0..1000 {
        let mut header = [0u8; 9];
        socket.read_exact(&mut header).await?;
        let len = u32::from_be_bytes([0, header[0], header[1], header[2]]) as usize;
        let (kind, flags) = (header[3], header[4]);
        let mut payload = vec![0u8; len];
        socket.read_exact(&mut payload).await?;
        match kind {
            0x4 if flags & 0x1 == 0 => socket.write_all(&frame(0x4, 0x1, 0, &[])).await?,
            0x6 if flags & 0x1 == 0 => {
                let mut goaway = 0u32.to_be_bytes().to_vec();
                goaway.extend_from_slice(&ENHANCE_YOUR_CALM.to_be_bytes());
                goaway.extend_from_slice(b"too_many_pings");
                // Counted before it is written: the client may act on the GOAWAY (and the
                // test check the count) before this task runs again after the write.
                goaways.fetch_add(1, Ordering::Relaxed);
                socket.write_all(&frame(0x7, 0, 0, &goaway)).await?;
                socket.shutdown().await?;
                return Ok(());
            }
            _ => {}
        }
    }
    Ok(())
}
