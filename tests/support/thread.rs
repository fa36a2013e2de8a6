//! The scaffolding every test server shares: a thread of its own with a current-thread tokio
//! runtime, and a bounded wait for the server to report that it listens.

use std::future::Future;
use std::io;
use std::sync::mpsc::{sync_channel, SyncSender};
use std::thread::JoinHandle;
use std::time::Duration;

/// How long a server thread may take to start listening.
pub const START_TIMEOUT: Duration = Duration::from_secs(10);

/// What a server reports once it listens (or why it could not).
pub type Started<T> = SyncSender<io::Result<T>>;

/// Runs `serve` on a new thread named `name`, on a current-thread runtime that is dropped (with
/// every task and socket on it) when `serve` returns; then `on_exit` runs on that thread.
/// Waits at most [`START_TIMEOUT`] for `serve` to report through its [`Started`] sender.
/// If the thread is late, the receiver is dropped, so the thread's report fails and it exits.
pub fn start<T, F, Fut>(
    name: String,
    serve: F,
    on_exit: impl FnOnce() + Send + 'static,
) -> io::Result<(JoinHandle<()>, T)>
where
    T: Send + 'static,
    F: FnOnce(Started<T>) -> Fut + Send + 'static,
    Fut: Future<Output = ()>,
{
    let (started, report) = sync_channel::<io::Result<T>>(1);
    let thread = std::thread::Builder::new()
        .name(name.clone())
        .spawn(move || {
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(runtime) => runtime,
                Err(err) => {
                    let _ = started.send(Err(err));
                    return;
                }
            };
            runtime.block_on(serve(started));
            drop(runtime);
            on_exit();
        })?;
    match report.recv_timeout(START_TIMEOUT) {
        Ok(Ok(value)) => Ok((thread, value)),
        Ok(Err(err)) => {
            let _ = thread.join();
            Err(err)
        }
        Err(_) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("{name} did not start in time"),
        )),
    }
}
