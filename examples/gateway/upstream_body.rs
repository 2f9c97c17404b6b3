//! The upstream's response body as the client gets it: passed through frame by frame, its
//! `usage` read for the metrics, and cut off when the upstream goes quiet for longer than the
//! model's `stream_idle_timeout_secs`.
//!
//! A cut-off body ends with an error, so the client's connection is closed mid-body (an
//! HTTP/1.1 chunked body without its last chunk): the client can tell the answer is
//! incomplete. The body is dropped with the connection, which ends the upstream request and
//! settles the limiter's charges (the concurrency slots are released; the tokens settle as
//! for a response without usage, by default the reservation kept): a stalled upstream can't
//! hold a caller's slots for longer than the timeout.

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
use tower_llm_ratelimit::cost::usage::UsageParser;

use crate::metrics::Metrics;

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

/// The upstream's body, passed through frame by frame; its `usage` goes to the metrics.
///
/// The limiter reads the same `usage` to settle token charges, and its observer sees the
/// settlement (`Observer::on_settle`, labelled with the model), but only for requests it
/// settles: not those admitted by the failure policy while the store is down, not callers
/// without a token limit. The metric must count every answer, so the gateway reads it
/// itself (a few microseconds per answer).
pub(crate) struct Metered {
    inner: Incoming,
    parser: Option<UsageParser>,
    model: Arc<str>,
    metrics: Arc<Metrics>,
    idle_timeout: Duration,
    /// Fires `idle_timeout` after the last frame (or the response headers).
    idle: Pin<Box<Sleep>>,
}

impl Metered {
    pub(crate) fn new(
        inner: Incoming,
        parser: Option<UsageParser>,
        model: Arc<str>,
        metrics: Arc<Metrics>,
        idle_timeout: Duration,
    ) -> Self {
        Self {
            inner,
            parser,
            model,
            metrics,
            idle_timeout,
            idle: Box::pin(tokio::time::sleep(idle_timeout)),
        }
    }

    fn finish(&mut self) {
        if let Some(usage) = self.parser.take().and_then(|mut p| p.finish()) {
            self.metrics
                .settled(&self.model, usage.input_tokens, usage.output_tokens);
        }
    }
}

impl http_body::Body for Metered {
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
                if let (Some(p), Some(data)) = (&mut this.parser, frame.data_ref()) {
                    p.feed(data);
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => {
                this.parser = None;
                Poll::Ready(Some(Err(e.into())))
            }
            Poll::Ready(None) => {
                this.finish();
                Poll::Ready(None)
            }
            Poll::Pending => {
                if this.idle.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
                tracing::warn!(
                    model = %this.model,
                    timeout = ?this.idle_timeout,
                    "the upstream's response went idle; closing it"
                );
                // A partial usage is no usage: the metric counts whole answers.
                this.parser = None;
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

impl Drop for Metered {
    fn drop(&mut self) {
        self.finish();
    }
}
