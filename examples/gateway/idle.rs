//! When a client connection last had work: the requests it has in flight (until their
//! response bodies end) and when the last one ended, so that `serve` can close a connection
//! that has been idle for `header_timeout_secs`.
//!
//! hyper bounds an idle HTTP/1 keep-alive connection by its header timeout, but has no idle
//! bound for HTTP/2: a client answers the connection's pings by itself, so without this an
//! HTTP/2 connection that never sends a request (or never finishes a request's headers)
//! would hold one of the `max_connections` slots for as long as it likes.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::{Body, Bytes};
use http_body::{Frame, SizeHint};
use tokio::time::Instant;

/// One connection's activity.
#[derive(Debug)]
pub(crate) struct Activity {
    start: Instant,
    in_flight: AtomicUsize,
    /// Milliseconds from `start` to the end of the last request.
    last_end_ms: AtomicU64,
}

impl Activity {
    pub(crate) fn new() -> Arc<Self> {
        Arc::new(Self {
            start: Instant::now(),
            in_flight: AtomicUsize::new(0),
            last_end_ms: AtomicU64::new(0),
        })
    }

    /// A request starts; it is in flight until the returned guard is dropped.
    pub(crate) fn begin(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        InFlight(Arc::clone(self))
    }

    /// Whether the connection has had no request in flight for at least `d`.
    pub(crate) fn idle_for(&self, d: Duration) -> bool {
        if self.in_flight.load(Ordering::Acquire) > 0 {
            return false;
        }
        let last = Duration::from_millis(self.last_end_ms.load(Ordering::Acquire));
        self.start.elapsed().saturating_sub(last) >= d
    }
}

/// A request in flight; dropped when its response body ends (or is dropped).
#[derive(Debug)]
pub(crate) struct InFlight(Arc<Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        let ms = u64::try_from(self.0.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.0.last_end_ms.fetch_max(ms, Ordering::AcqRel);
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A response body that keeps its request in flight until it ends: it holds a guard
/// (`InFlight` here; the dashboard's per-model one in the proxy) that ends with it.
pub(crate) struct Tracked<G = InFlight> {
    inner: Body,
    _in_flight: G,
}

impl<G> Tracked<G> {
    pub(crate) fn new(inner: Body, in_flight: G) -> Self {
        Self {
            inner,
            _in_flight: in_flight,
        }
    }
}

impl<G: Send + Unpin + 'static> http_body::Body for Tracked<G> {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
