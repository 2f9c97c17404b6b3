//! Accepting and serving the clients' connections, bounded: HTTP/1.1 and cleartext HTTP/2
//! (h2c, prior knowledge: told apart by the HTTP/2 connection preface), a deadline for each
//! HTTP/1 request's headers, at most `max_connections` connections at once, and a graceful
//! shutdown.
//!
//! - Every accepted socket has `TCP_NODELAY` set: hyper writes a response's head and its body
//!   (or each chunk of a stream) separately, and with Nagle's algorithm the second write waits
//!   for the client to acknowledge the first, which a client delays by up to 40 ms. It is read
//!   through `tcp::QuickAck`, so a client that splits its own writes doesn't wait either.
//! - A client has `header_timeout_secs` to send enough of its first bytes to tell HTTP/1 from
//!   HTTP/2, or it is disconnected.
//! - An HTTP/2 connection runs at most [`MAX_STREAMS`] requests at once and is pinged every
//!   [`PING_INTERVAL`]; one whose peer doesn't answer within `header_timeout_secs` is closed.
//!   One with no request in flight for `header_timeout_secs` is closed too (`GOAWAY`), as an
//!   idle HTTP/1 keep-alive connection is: a client answers pings by itself, so an idle
//!   HTTP/2 connection (or one whose request headers never end) would otherwise hold its
//!   `max_connections` slot for good (`idle.rs`).
//! - A client that takes longer than `header_timeout_secs` to send a request's headers
//!   (a slow-headers attack, or an idle keep-alive connection: the clock runs while the
//!   gateway waits for the next request) is disconnected without an answer.
//! - At `max_connections`, the gateway stops accepting: further connections wait in the
//!   operating system's listen queue (they are not refused) and are served as soon as a
//!   connection closes. The request body's own deadline (`body_timeout_secs`, a 408) is in
//!   `proxy::gate`, the upstream's (`timeout_secs`, `stream_idle_timeout_secs`) in the proxy.
//! - Each request is served by the router running when it arrives (read once, without a
//!   lock): a reload (SIGHUP) swaps the router, and requests in flight finish on the one
//!   they started with.
//! - On shutdown the listener closes at once (new connections are refused); connections in
//!   flight finish their current request, then close.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Semaphore};

use crate::idle::{Activity, Tracked};
use crate::tcp::QuickAck;

/// The most requests one HTTP/2 connection runs at once (nginx's default), so that
/// `max_connections` still bounds the work in flight.
pub(crate) const MAX_STREAMS: u32 = 128;

/// How often an idle HTTP/2 connection is pinged, to find peers that went away.
pub(crate) const PING_INTERVAL: Duration = Duration::from_secs(30);

/// What a client opening an HTTP/2 connection with prior knowledge sends first (RFC 9113,
/// section 3.4).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// The bounds of client connections.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    pub(crate) header_timeout: Duration,
    pub(crate) max_connections: usize,
}

/// Serves the router in `router` (as it is when each request arrives) on `listener` until
/// `shutdown` resolves, then waits for the connections in flight to finish.
pub(crate) async fn serve(
    listener: TcpListener,
    router: Arc<ArcSwap<Router>>,
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
        let (stream, peer) = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, addr)) => (stream, addr),
                Err(e) => {
                    // Out of file descriptors, most likely: give connections time to close
                    // instead of spinning on the error.
                    tracing::warn!(error = %e, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        if let Err(e) = stream.set_nodelay(true) {
            tracing::debug!(error = %e, "setting TCP_NODELAY failed");
        }
        let activity = Activity::new();
        let service = {
            let router = Arc::clone(&router);
            let activity = Arc::clone(&activity);
            TowerToHyperService::new(tower::service_fn(
                move |mut req: http::Request<hyper::body::Incoming>| {
                    // The peer's address, for what counts by address (admin-key guesses;
                    // behind a trusted proxy, `access::Proxies` reads the client's).
                    req.extensions_mut()
                        .insert(crate::dashboard::access::Peer(peer.ip()));
                    let in_flight = activity.begin();
                    let answer = tower::ServiceExt::oneshot(Router::clone(&router.load()), req);
                    async move {
                        let res: axum::response::Response = answer.await?;
                        Ok::<_, std::convert::Infallible>(
                            res.map(|b| axum::body::Body::new(Tracked::new(b, in_flight))),
                        )
                    }
                },
            ))
        };
        let mut stop = stop_rx.clone();
        let running = running_rx.clone();
        tokio::spawn(async move {
            match tokio::time::timeout(limits.header_timeout, protocol_known(&stream)).await {
                Ok(Ok(true)) => {}
                // Closed, failed, or too slow to say which protocol it speaks.
                Ok(Ok(false) | Err(_)) | Err(_) => return,
            }
            let mut builder = auto::Builder::new(TokioExecutor::new());
            builder
                .http1()
                .timer(TokioTimer::new())
                .header_read_timeout(limits.header_timeout);
            builder
                .http2()
                .timer(TokioTimer::new())
                .max_concurrent_streams(MAX_STREAMS)
                .keep_alive_interval(PING_INTERVAL)
                .keep_alive_timeout(limits.header_timeout);
            let conn = builder.serve_connection(QuickAck::new(TokioIo::new(stream)), service);
            tokio::pin!(conn);
            let result = loop {
                tokio::select! {
                    r = conn.as_mut() => break r,
                    _ = stop.changed() => {
                        conn.as_mut().graceful_shutdown();
                        break conn.await;
                    }
                    () = tokio::time::sleep(limits.header_timeout) => {
                        if activity.idle_for(limits.header_timeout) {
                            conn.as_mut().graceful_shutdown();
                            break conn.await;
                        }
                    }
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

/// Waits until the client has sent enough to tell HTTP/1 from HTTP/2's preface (hyper-util's
/// detection has no deadline of its own). False when the client closed the connection first.
async fn protocol_known(stream: &TcpStream) -> std::io::Result<bool> {
    let mut first = [0u8; H2_PREFACE.len()];
    loop {
        let n = stream.peek(&mut first).await?;
        if n == 0 {
            return Ok(false);
        }
        if n == first.len() || first[..n] != H2_PREFACE[..n] {
            return Ok(true);
        }
        // Part of the preface so far; `peek` would return at once with the same bytes.
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}
