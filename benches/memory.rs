//! Memory: bytes per idle connection and per call in flight, pool versus tonic `Channel`.
//!
//! ```text
//! cargo bench --bench memory
//! ```
//!
//! Method: the echo server runs in a separate process (this binary re-executed with
//! `TONIC_POOL_MEMORY_SERVER` set), so only the client's memory is measured. The client reads
//! its own anonymous resident memory (`RssAnon` in `/proc/self/status`) before and after
//! opening N connections, and before and after starting M calls that the server holds for
//! 3 s; the difference divided by N or M is the cost of one. RSS counts pages the allocator
//! touched, so it slightly overstates small objects and is only meaningful for large N and M;
//! the pool and the plain `Channel` are measured the same way, in the same run, in fresh
//! processes (each mode re-executes this binary once more), so the ratio is what matters.

mod common;

use std::io::{self, BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::echo::echo_client::EchoClient;
use common::echo::echo_server::EchoServer;
use common::{request, BenchEcho};
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Channel, Endpoint, Server};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

const SERVER_ENV: &str = "TONIC_POOL_MEMORY_SERVER";
const MODE_ENV: &str = "TONIC_POOL_MEMORY_MODE";
const CONNECTIONS: usize = 256;
const CALLS: usize = 2_000;

fn main() -> Result<(), BoxError> {
    if let Ok(addr) = std::env::var(SERVER_ENV) {
        return serve(&addr);
    }
    if let Ok(mode) = std::env::var(MODE_ENV) {
        let addr: SocketAddr = std::env::args().nth(1).ok_or("address")?.parse()?;
        let (per_conn, per_call) = measure(&mode, addr)?;
        println!("{per_conn} {per_call}");
        return Ok(());
    }
    // cargo bench passes `--bench`; nothing else to parse.
    let mut server = spawn_server()?;
    let addr = server.1;
    println!("| mode | bytes per idle connection | bytes per call in flight |");
    println!("|---|---|---|");
    for mode in ["channel", "pool", "channel", "pool"] {
        let out = Command::new(std::env::current_exe()?)
            .env(MODE_ENV, mode)
            .arg(addr.to_string())
            .output()?;
        let text = String::from_utf8_lossy(&out.stdout);
        let mut parts = text.split_whitespace();
        let (conn, call) = (parts.next().unwrap_or("?"), parts.next().unwrap_or("?"));
        println!("| {mode} | {conn} | {call} |");
    }
    server.0.kill()?;
    let _ = server.0.wait();
    Ok(())
}

fn rss_anon() -> Result<usize, BoxError> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    let line = status
        .lines()
        .find(|l| l.starts_with("RssAnon:"))
        .ok_or("no RssAnon")?;
    let kib: usize = line
        .split_whitespace()
        .nth(1)
        .ok_or("RssAnon value")?
        .parse()?;
    Ok(kib * 1024)
}

fn measure(mode: &str, addr: SocketAddr) -> Result<(usize, usize), BoxError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let uri = format!("http://{addr}");
        // Idle connections.
        let before = rss_anon()?;
        let clients: Vec<EchoClient<Channel>>;
        let pool;
        if mode == "pool" {
            pool = Some(
                tonic_pool::Pool::builder(format!("static:///{addr}"))
                    .connections_per_endpoint(CONNECTIONS)
                    .build()?,
            );
            let p = pool.as_ref().expect("pool");
            let ok = p
                .wait_until(Duration::from_secs(30), |s| {
                    s.ready_connections() == CONNECTIONS
                })
                .await;
            if !ok {
                return Err("pool not ready".into());
            }
            clients = Vec::new();
        } else {
            pool = None;
            let mut v = Vec::new();
            for _ in 0..CONNECTIONS {
                v.push(EchoClient::new(
                    Endpoint::from_shared(uri.clone())?.connect().await?,
                ));
            }
            clients = v;
        }
        let per_conn = rss_anon()?.saturating_sub(before) / CONNECTIONS;

        // Calls in flight on one connection (the server holds each for 3 s).
        let before = rss_anon()?;
        let mut calls = Vec::new();
        for i in 0..CALLS {
            if let Some(p) = &pool {
                let mut c = EchoClient::new(p.clone());
                calls.push(tokio::spawn(async move {
                    c.unary(request(3_000)).await.is_ok()
                }));
            } else {
                let mut c = clients[i % CONNECTIONS].clone();
                calls.push(tokio::spawn(async move {
                    c.unary(request(3_000)).await.is_ok()
                }));
            }
        }
        // Let every call reach the server and wait there.
        tokio::time::sleep(Duration::from_millis(1_500)).await;
        let per_call = rss_anon()?.saturating_sub(before) / CALLS;
        for call in calls {
            call.await?;
        }
        drop(clients);
        if let Some(p) = pool {
            p.close().await?;
        }
        Ok((per_conn, per_call))
    })
}

fn spawn_server() -> Result<(Child, SocketAddr), BoxError> {
    let mut child = Command::new(std::env::current_exe()?)
        .env(SERVER_ENV, "127.0.0.2:0")
        .stdout(Stdio::piped())
        .stdin(Stdio::piped())
        .spawn()?;
    let mut out = BufReader::new(child.stdout.take().ok_or("stdout")?);
    let mut line = String::new();
    out.read_line(&mut line)?;
    let addr = line
        .trim()
        .strip_prefix("listening ")
        .ok_or("server line")?
        .parse()?;
    Ok((child, addr))
}

fn serve(addr: &str) -> Result<(), BoxError> {
    let addr: SocketAddr = addr.parse()?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let incoming = TcpIncoming::bind(addr)?.with_nodelay(Some(true));
        {
            let mut out = io::stdout().lock();
            writeln!(out, "listening {}", incoming.local_addr()?)?;
            out.flush()?;
        }
        Server::builder()
            .max_concurrent_streams(Some(u32::MAX))
            .add_service(EchoServer::new(BenchEcho::default()))
            .serve_with_incoming(incoming)
            .await?;
        Ok(())
    })
}
