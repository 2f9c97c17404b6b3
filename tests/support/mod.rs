//! Helpers shared by the integration tests: a server on `127.0.0.1:0` with a bounded
//! shutdown, and a bounded wait. Generic on purpose (no HTTP stack, no crate types): each
//! test brings its own server.
#![allow(dead_code)]

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// How long any single wait in a test may take before the test fails.
pub(crate) const WAIT: Duration = Duration::from_secs(10);

/// Awaits `fut` for at most [`WAIT`]; panics naming `what` when it takes longer.
pub(crate) async fn within<F: Future>(what: &str, fut: F) -> F::Output {
    match tokio::time::timeout(WAIT, fut).await {
        Ok(out) => out,
        Err(_) => panic!("timed out after {WAIT:?}: {what}"),
    }
}

/// Resolves when the test asks its server to stop (or drops the [`TestServer`]).
#[derive(Debug)]
pub(crate) struct Shutdown(oneshot::Receiver<()>);

impl Future for Shutdown {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        Pin::new(&mut self.0).poll(cx).map(|_| ())
    }
}

/// A server task listening on `127.0.0.1:<random port>`.
#[derive(Debug)]
pub(crate) struct TestServer {
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl TestServer {
    /// Where the server listens.
    pub(crate) fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:<port>`.
    pub(crate) fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Signals [`Shutdown`] and waits at most [`WAIT`] for the server task to end; panics
    /// (after aborting the task) when it doesn't, or when the task panicked.
    pub(crate) async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let Some(mut task) = self.task.take() else {
            return;
        };
        match tokio::time::timeout(WAIT, &mut task).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => panic!("server task failed: {e}"),
            Err(_) => {
                task.abort();
                panic!("server did not shut down within {WAIT:?}");
            }
        }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// Binds `127.0.0.1:0` and spawns `serve(listener, shutdown)`; the server must return once
/// `shutdown` resolves.
pub(crate) async fn spawn_server<F, Fut>(serve: F) -> TestServer
where
    F: FnOnce(TcpListener, Shutdown) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind 127.0.0.1:0");
    let addr = listener.local_addr().expect("local address");
    let (stop, rx) = oneshot::channel();
    let task = tokio::spawn(serve(listener, Shutdown(rx)));
    TestServer {
        addr,
        stop: Some(stop),
        task: Some(task),
    }
}

pub(crate) mod redis;
