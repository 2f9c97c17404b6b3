//! The upstream's response body as the client gets it: passed through frame by frame, and
//! cut off when the upstream goes quiet for longer than the model's
//! `stream_idle_timeout_secs`.
//!
//! Its `usage` is read by the limiter around the proxy, once, for the token rules and for
//! the metrics together: the metrics' observer asks for the usage of every response
//! (`Observer::observes_usage`), so requests without token rules and those admitted while
//! the store is down are counted too. This body reads none of it.
//!
//! A cut-off body ends with an error, so the client's connection is closed mid-body (an
//! HTTP/1.1 chunked body without its last chunk): the client can tell the answer is
//! incomplete. The body is dropped with the connection, which ends the upstream request and
//! settles the limiter's charges (the concurrency slots are released; the tokens settle as
//! for a response without usage, by default the reservation kept, unless a stream's usage
//! event came before the stall): a stalled upstream can't hold a caller's slots for longer
//! than the timeout.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Bytes;
use http_body::{Frame, SizeHint};
use hyper::body::Incoming;
use tokio::time::{Instant, Sleep};

/// The error a body ends with when its upstream was idle too long.
#[derive(Debug)]
pub(crate) struct IdleTimeout(Duration);

impl fmt::Display for IdleTimeout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "the upstream sent nothing for {:?}", self.0)
    }
}

impl std::error::Error for IdleTimeout {}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The upstream's body, passed through frame by frame, closed when idle too long.
pub(crate) struct UpstreamBody {
    inner: Incoming,
    /// For the log line of a cut-off body.
    model: Arc<str>,
    idle_timeout: Duration,
    /// Fires `idle_timeout` after the last frame (or the response headers).
    idle: Pin<Box<Sleep>>,
}

impl UpstreamBody {
    pub(crate) fn new(inner: Incoming, model: Arc<str>, idle_timeout: Duration) -> Self {
        Self {
            inner,
            model,
            idle_timeout,
            idle: Box::pin(tokio::time::sleep(idle_timeout)),
        }
    }
}

impl http_body::Body for UpstreamBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                this.idle.as_mut().reset(Instant::now() + this.idle_timeout);
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e.into()))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => {
                if this.idle.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
                tracing::warn!(
                    model = %this.model,
                    timeout = ?this.idle_timeout,
                    "the upstream's response went idle; closing it"
                );
                Poll::Ready(Some(Err(IdleTimeout(this.idle_timeout).into())))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
