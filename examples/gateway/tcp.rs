//! TCP settings that keep a small write from waiting ~40 ms for a delayed ACK, on every
//! socket the gateway speaks HTTP on (clients', upstreams', the mock's).
//!
//! Two mechanisms meet in the stall: a sender with Nagle's algorithm on holds a small write
//! while an earlier one is unacknowledged, and a receiver that has recently sent data itself
//! (Linux's "pingpong" mode, entered after one request/response exchange) delays its ACK by
//! up to 40 ms, hoping to piggyback it. An HTTP response whose head and body are separate
//! writes then takes 40 ms more on a keep-alive connection.
//!
//! - The gateway's own writes: `TCP_NODELAY` on every socket (accepted ones in `serve.rs`,
//!   the mock's in `mock.rs`, upstream connections in [`connector`], beneath TLS for
//!   `https://` upstreams: `upstream.rs` wraps this connector).
//! - Its peers' writes: an upstream that writes a response's head and body separately
//!   without `TCP_NODELAY` (Python's `http.server`, many small servers), or a client that
//!   does so with a request, waits for the gateway's ACK. [`QuickAck`] turns Linux's
//!   `TCP_QUICKACK` on before each read (the kernel turns it off again as soon as the socket
//!   sends), which acknowledges what has arrived at once. On other systems it does nothing.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use hyper::rt::{Read, ReadBufCursor, Write};
use hyper_util::client::legacy::connect::{Connected, Connection, HttpConnector};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tower::util::MapResponse;
use tower::ServiceExt;

/// The upstream connector: hyper-util's, with `TCP_NODELAY`, its connections wrapped in
/// [`QuickAck`]. It connects for `https://` URLs too (the TCP beneath the TLS that
/// `upstream.rs` adds).
pub(crate) type Connector = MapResponse<HttpConnector, fn(TokioIo<TcpStream>) -> QuickAck>;

pub(crate) fn connector() -> Connector {
    let mut http = HttpConnector::new();
    http.set_nodelay(true);
    http.enforce_http(false);
    http.map_response(QuickAck::new as fn(TokioIo<TcpStream>) -> QuickAck)
}

/// A TCP connection that acknowledges what it receives without delay (see the module docs).
#[derive(Debug)]
pub(crate) struct QuickAck(TokioIo<TcpStream>);

impl QuickAck {
    pub(crate) fn new(io: TokioIo<TcpStream>) -> Self {
        Self(io)
    }
}

/// Acknowledges at once what has arrived, and what arrives until the socket next sends.
/// Failing costs latency only, so the error is ignored.
#[cfg(any(target_os = "linux", target_os = "android"))]
fn quick_ack(tcp: &TcpStream) {
    let _ = socket2::SockRef::from(tcp).set_tcp_quickack(true);
}

#[cfg(not(any(target_os = "linux", target_os = "android")))]
fn quick_ack(_: &TcpStream) {}

impl Read for QuickAck {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        quick_ack(self.0.inner());
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl Write for QuickAck {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.0.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

impl Connection for QuickAck {
    fn connected(&self) -> Connected {
        self.0.connected()
    }
}
