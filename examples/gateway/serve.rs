//! Accepting and serving the clients' connections, bounded: HTTP/1.1 with a deadline for
//! each request's headers, at most `max_connections` connections at once, and a graceful
//! shutdown.
//!
//! - A client that takes longer than `header_timeout_secs` to send a request's headers
//!   (a slow-headers attack, or an idle keep-alive connection: the clock runs while the
//!   gateway waits for the next request) is disconnected without an answer.
//! - At `max_connections`, the gateway stops accepting: further connections wait in the
//!   operating system's listen queue (they are not refused) and are served as soon as a
//!   connection closes. The request body's own deadline (`body_timeout_secs`, a 408) is in
//!   `proxy::gate`, the upstream's (`timeout_secs`, `stream_idle_timeout_secs`) in the proxy.
//! - On shutdown the listener closes at once (new connections are refused); connections in
//!   flight finish their current request, then close.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};

/// The bounds of client connections.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    pub(crate) header_timeout: Duration,
    pub(crate) max_connections: usize,
}

/// Serves `router` on `listener` until `shutdown` resolves, then waits for the connections
/// in flight to finish.
pub(crate) async fn serve(
    listener: TcpListener,
    router: Router,
    limits: Limits,
    shutdown: impl Future<Output = ()>,
) {
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    // `stop` tells every connection to finish; each holds a `running` receiver, so the
    // sender sees it closed when the last connection is gone.
    let (stop_tx, stop_rx) = watch::channel(());
    let (running_tx, running_rx) = watch::channel(());
    tokio::pin!(shutdown);
    loop {
        let slot = tokio::select! {
            () = &mut shutdown => break,
            slot = Arc::clone(&slots).acquire_owned() => match slot {
                Ok(s) => s,
                Err(_) => break, // never closed
            },
        };
        let stream = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of file descriptors, most likely: give connections time to close
                    // instead of spinning on the error.
                    tracing::warn!(error = %e, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let service = TowerToHyperService::new(router.clone());
        let mut stop = stop_rx.clone();
        let running = running_rx.clone();
        tokio::spawn(async move {
            let mut builder = http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(limits.header_timeout);
            let conn = builder.serve_connection(TokioIo::new(stream), service);
            tokio::pin!(conn);
            let result = tokio::select! {
                r = conn.as_mut() => r,
                _ = stop.changed() => {
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            };
            if let Err(e) = result {
                tracing::debug!(error = %e, "connection closed with an error");
            }
            drop(running);
            drop(slot);
        });
    }
    drop(listener);
    let _ = stop_tx.send(());
    drop(running_rx);
    running_tx.closed().await;
}
