//! Code shared by the benches: the generated `echo.Echo` code and a minimal echo service.
//!
//! It lives in `benches/common/mod.rs` (not `benches/common.rs`) so that cargo does not take
//! it for a bench target of its own.

// Each bench uses only part of this module.
#![allow(dead_code)]

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tonic::{Request, Response, Status, Streaming};

/// Generated code for `tests/support/proto/echo.proto` (package `echo`), shared with the tests.
pub(crate) mod echo {
    #![allow(
        missing_docs,
        missing_debug_implementations,
        unreachable_pub,
        dead_code,
        clippy::all
    )]
    include!("../../tests/support/proto/echo.rs");
}

use echo::echo_server::Echo;
use echo::{EchoReply, EchoRequest, StreamRequest};

/// The value of the environment variable `name` parsed as a `T`, `default` when it is unset,
/// an error naming the variable when it does not parse (the benches' settings).
pub(crate) fn env_var<T: std::str::FromStr>(
    name: &str,
    default: T,
) -> Result<T, Box<dyn std::error::Error + Send + Sync>> {
    match std::env::var(name) {
        Ok(v) => v
            .trim()
            .parse()
            .map_err(|_| format!("{name}={v:?}: bad value").into()),
        Err(_) => Ok(default),
    }
}

/// Median, min and max (NaN-free input assumed; empty gives zeros).
pub(crate) fn stats(values: impl IntoIterator<Item = f64>) -> (f64, f64, f64) {
    let mut v: Vec<f64> = values.into_iter().collect();
    if v.is_empty() {
        return (0.0, 0.0, 0.0);
    }
    v.sort_by(f64::total_cmp);
    let mid = v.len() / 2;
    let median = if v.len() % 2 == 1 {
        v[mid]
    } else {
        (v[mid - 1] + v[mid]) / 2.0
    };
    (median, v[0], v[v.len() - 1])
}

/// The request every bench sends: a 32-byte payload, no message, and the given server sleep.
pub(crate) fn request(sleep_ms: u32) -> EchoRequest {
    EchoRequest {
        payload: vec![0x5a; 32],
        sleep_ms,
        message: String::new(),
    }
}

/// A minimal `echo.Echo`: `Unary` sleeps `sleep_ms` (if any) and echoes the payload back;
/// the streaming methods are not used by the benches and answer `UNIMPLEMENTED`.
#[derive(Debug, Clone, Default)]
pub(crate) struct BenchEcho {
    /// Counts every `Unary` call (read by the load bench's server process).
    pub(crate) requests: Arc<AtomicU64>,
}

type NoStream = tokio_stream::Empty<Result<EchoReply, Status>>;

#[tonic::async_trait]
impl Echo for BenchEcho {
    async fn unary(&self, request: Request<EchoRequest>) -> Result<Response<EchoReply>, Status> {
        self.requests.fetch_add(1, Ordering::Relaxed);
        let req = request.into_inner();
        if req.sleep_ms > 0 {
            tokio::time::sleep(Duration::from_millis(u64::from(req.sleep_ms))).await;
        }
        Ok(Response::new(EchoReply {
            payload: req.payload,
            message: req.message,
            server: String::new(),
            seq: 0,
        }))
    }

    type ServerStreamStream = NoStream;

    async fn server_stream(
        &self,
        _request: Request<StreamRequest>,
    ) -> Result<Response<Self::ServerStreamStream>, Status> {
        Err(Status::unimplemented("not used by the benches"))
    }

    async fn client_stream(
        &self,
        _request: Request<Streaming<EchoRequest>>,
    ) -> Result<Response<EchoReply>, Status> {
        Err(Status::unimplemented("not used by the benches"))
    }

    type BidiStream = NoStream;

    async fn bidi(
        &self,
        _request: Request<Streaming<EchoRequest>>,
    ) -> Result<Response<Self::BidiStream>, Status> {
        Err(Status::unimplemented("not used by the benches"))
    }
}
