//! The response body: the inner service's, or a small full body for a rejection.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::Full;
use pin_project_lite::pin_project;
use tokio::sync::oneshot;

use crate::settle::Settle;

pin_project! {
    /// The body of a [`crate::RateLimit`] response: the inner service's body (watched when
    /// the request has something to settle, and read for `usage` when it has token rules or
    /// the observer [observes usage](crate::observe::Observer::observes_usage); see
    /// [`crate::settle`]), or the JSON (or empty gRPC) body of a rejection. Works with any
    /// inner body whose data is [`Bytes`]; nothing is buffered. The one delay: the body of a
    /// failed attempt of an idempotent request starts once the store has recorded the
    /// failure (one store round trip, bounded by its call timeout), so that a client's
    /// retry, sent when it has read this answer, finds the record.
    pub struct ResponseBody<B> {
        #[pin]
        kind: Kind<B>,
    }
}

pin_project! {
    #[project = KindProj]
    enum Kind<B> {
        Inner { #[pin] body: B },
        Settling { #[pin] body: B, settle: Box<Settle> },
        Held { #[pin] body: B, recorded: Option<oneshot::Receiver<()>> },
        Rejection { #[pin] body: Full<Bytes> },
    }
}

impl<B> ResponseBody<B> {
    pub(crate) fn inner(body: B) -> Self {
        Self {
            kind: Kind::Inner { body },
        }
    }

    pub(crate) fn settling(body: B, settle: Box<Settle>) -> Self {
        Self {
            kind: Kind::Settling { body, settle },
        }
    }

    /// A failed answer's body, held until `recorded` ends (see `Settle::take_recorded`).
    pub(crate) fn held(body: B, recorded: oneshot::Receiver<()>) -> Self {
        Self {
            kind: Kind::Held {
                body,
                recorded: Some(recorded),
            },
        }
    }

    pub(crate) fn rejection(body: Full<Bytes>) -> Self {
        Self {
            kind: Kind::Rejection { body },
        }
    }
}

impl<B> std::fmt::Debug for ResponseBody<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self.kind {
            Kind::Inner { .. } => "ResponseBody::Inner",
            Kind::Settling { .. } => "ResponseBody::Settling",
            Kind::Held { .. } => "ResponseBody::Held",
            Kind::Rejection { .. } => "ResponseBody::Rejection",
        })
    }
}

impl<B> Body for ResponseBody<B>
where
    B: Body<Data = Bytes>,
{
    type Data = Bytes;
    type Error = B::Error;

    #[inline]
    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        match self.project().kind.project() {
            KindProj::Inner { body } => body.poll_frame(cx),
            KindProj::Settling { body, settle } => {
                let frame = std::task::ready!(body.poll_frame(cx));
                match &frame {
                    Some(Ok(f)) => {
                        if let Some(data) = f.data_ref() {
                            settle.on_data(data);
                        } else if let Some(trailers) = f.trailers_ref() {
                            settle.on_trailers(trailers);
                        }
                    }
                    // The end, or the upstream broke mid-body: settle with what was seen.
                    Some(Err(_)) | None => settle.on_end(),
                }
                Poll::Ready(frame)
            }
            KindProj::Held { body, recorded } => {
                if let Some(r) = recorded {
                    // Done or not (a task that ended without a word), the body goes on.
                    let _ = std::task::ready!(Pin::new(r).poll(cx));
                    *recorded = None;
                }
                body.poll_frame(cx)
            }
            KindProj::Rejection { body } => match body.poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => Poll::Ready(Some(Ok(frame))),
                Poll::Ready(Some(Err(never))) => match never {},
                Poll::Ready(None) => Poll::Ready(None),
                Poll::Pending => Poll::Pending,
            },
        }
    }

    #[inline]
    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Held {
                recorded: Some(_), ..
            } => false,
            Kind::Inner { body } | Kind::Settling { body, .. } | Kind::Held { body, .. } => {
                body.is_end_stream()
            }
            Kind::Rejection { body } => body.is_end_stream(),
        }
    }

    #[inline]
    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Inner { body } | Kind::Settling { body, .. } | Kind::Held { body, .. } => {
                body.size_hint()
            }
            Kind::Rejection { body } => body.size_hint(),
        }
    }
}
