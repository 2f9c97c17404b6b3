//! Reading a request body, bounded, before the decision; and handing it on unchanged.
//!
//! Only when a rule's key or the cost estimator reads the body
//! ([`crate::key::KeyExtractor::needs_body`], [`crate::cost::CostEstimator::needs_body`]) does
//! the layer buffer it: at most `max_inspect_bytes`
//! ([`crate::RateLimitLayerBuilder::max_inspect_bytes`], default 1 MiB), parsed as JSON once.
//! The inner service then receives a [`RequestBody`] that yields exactly the bytes (and
//! trailers) the client sent. A request without a body (`GET /v1/models`) costs no tokens. A
//! body over the bound is answered 413, or, under
//! [`BodyPolicy::Fallback`], admitted with the fallback cost and streamed on: the part read
//! is replayed, then the rest follows from the client. A rule keyed by the body
//! ([`crate::key::json_field`]) is never skipped because the body is unusable: it refuses
//! the request as the estimate does, or, under [`BodyPolicy::Fallback`], charges the rule's
//! shared bucket.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use pin_project_lite::pin_project;

/// What the layer does with a body it needs but can't use (over `max_inspect_bytes`, not
/// JSON, unreadable).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BodyPolicy {
    /// Answer 413 (too large) or 400 (not JSON, unreadable) with a JSON body saying what is
    /// wrong, whenever the estimate or a rule's key reads the body. The default.
    #[default]
    Reject,
    /// Admit with the layer's fallback cost
    /// ([`crate::RateLimitLayerBuilder::fallback_cost`]); an answer without `usage` then pays
    /// what streamed when that is more ([`crate::settle::MissingUsage`]), since no
    /// `stream_options` could be added to a body the layer didn't read. A rule keyed by the body charges
    /// its shared bucket ([`crate::rule::MissingKey::Shared`]'s) when its policy is
    /// [`Skip`](crate::rule::MissingKey::Skip) or [`Shared`](crate::rule::MissingKey::Shared),
    /// and refuses the request (413 / 400) when it is
    /// [`Reject`](crate::rule::MissingKey::Reject): the body never lets a request skip a
    /// rule. A body that is JSON but lacks the field follows the rule's `MissingKey`.
    Fallback,
}

pin_project! {
    /// The request body the inner service receives: the client's body untouched when the
    /// layer didn't read it, or the bytes the layer read followed by whatever it didn't.
    pub struct RequestBody<B> {
        #[pin]
        kind: Kind<B>,
    }
}

pin_project! {
    #[project = KindProj]
    enum Kind<B> {
        Original { #[pin] body: B },
        Replay { data: Option<Bytes>, trailers: Option<HeaderMap>, rest: Option<Pin<Box<B>>> },
    }
}

impl<B> RequestBody<B> {
    pub(crate) fn original(body: B) -> Self {
        Self {
            kind: Kind::Original { body },
        }
    }

    /// A body made of bytes already read, then trailers, then (if the read stopped early)
    /// the rest of the original body.
    pub(crate) fn replay(
        data: Bytes,
        trailers: Option<HeaderMap>,
        rest: Option<Pin<Box<B>>>,
    ) -> Self {
        Self {
            kind: Kind::Replay {
                data: (!data.is_empty()).then_some(data),
                trailers,
                rest,
            },
        }
    }
}

impl<B> std::fmt::Debug for RequestBody<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self.kind {
            Kind::Original { .. } => "RequestBody::Original",
            Kind::Replay { .. } => "RequestBody::Replay",
        })
    }
}

impl<B> Body for RequestBody<B>
where
    B: Body<Data = Bytes>,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        match self.project().kind.project() {
            KindProj::Original { body } => body.poll_frame(cx),
            KindProj::Replay {
                data,
                trailers,
                rest,
            } => {
                if let Some(d) = data.take() {
                    return Poll::Ready(Some(Ok(Frame::data(d))));
                }
                if let Some(rest) = rest {
                    return rest.as_mut().poll_frame(cx);
                }
                Poll::Ready(trailers.take().map(|t| Ok(Frame::trailers(t))))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Original { body } => body.is_end_stream(),
            Kind::Replay {
                data,
                trailers,
                rest,
            } => {
                data.is_none()
                    && trailers.is_none()
                    && rest.as_ref().is_none_or(|r| r.is_end_stream())
            }
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Original { body } => body.size_hint(),
            Kind::Replay { data, rest, .. } => {
                let n = data.as_ref().map_or(0, |d| d.len() as u64);
                match rest {
                    None => SizeHint::with_exact(n),
                    Some(r) => {
                        let h = r.size_hint();
                        let mut out = SizeHint::new();
                        out.set_lower(h.lower().saturating_add(n));
                        if let Some(u) = h.upper() {
                            out.set_upper(u.saturating_add(n));
                        }
                        out
                    }
                }
            }
        }
    }
}

/// What reading the body gave.
pub(crate) enum Read<B> {
    /// All of it: the bytes and trailers.
    Complete(Bytes, Option<HeaderMap>),
    /// More than the bound: the part read, and the body to continue from.
    TooLarge(Bytes, Pin<Box<B>>),
    /// The body failed (client gone, protocol error).
    Failed(String),
}

/// Reads `body` up to `max` bytes.
pub(crate) async fn read_bounded<B>(body: B, max: usize) -> Read<B>
where
    B: Body<Data = Bytes>,
    B::Error: std::fmt::Display,
{
    let mut body = Box::pin(body);
    let mut buf = BytesMut::new();
    let mut first: Option<Bytes> = None;
    loop {
        match body.frame().await {
            None => break,
            Some(Err(e)) => return Read::Failed(e.to_string()),
            Some(Ok(frame)) => match frame.into_data() {
                Ok(data) => {
                    let total = buf.len() + first.as_ref().map_or(0, Bytes::len) + data.len();
                    // One chunk (the common case) is kept as it is: no copy.
                    match first.take() {
                        None if buf.is_empty() => first = Some(data),
                        Some(f) => {
                            buf.extend_from_slice(&f);
                            buf.extend_from_slice(&data);
                        }
                        None => buf.extend_from_slice(&data),
                    }
                    if total > max {
                        let read = first.take().unwrap_or_else(|| buf.split().freeze());
                        return Read::TooLarge(read, body);
                    }
                }
                Err(frame) => {
                    let trailers = frame.into_trailers().ok();
                    let data = first.take().unwrap_or_else(|| buf.split().freeze());
                    return Read::Complete(data, trailers);
                }
            },
        }
    }
    Read::Complete(first.unwrap_or_else(|| buf.freeze()), None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, Full};
    use std::collections::VecDeque;
    use std::convert::Infallible;

    /// A body that yields the given chunks, one frame each.
    struct Chunks(VecDeque<Bytes>);

    impl Body for Chunks {
        type Data = Bytes;
        type Error = Infallible;
        fn poll_frame(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
            Poll::Ready(self.0.pop_front().map(|b| Ok(Frame::data(b))))
        }
    }

    fn chunks(parts: &[&'static str]) -> Chunks {
        Chunks(
            parts
                .iter()
                .map(|p| Bytes::from_static(p.as_bytes()))
                .collect(),
        )
    }

    #[tokio::test]
    async fn complete_bodies_round_trip() {
        let Read::Complete(data, None) = read_bounded(chunks(&["ab", "cd", "e"]), 10).await else {
            panic!("expected complete");
        };
        assert_eq!(data, "abcde");
        let body = RequestBody::<Full<Bytes>>::replay(data, None, None);
        assert_eq!(body.collect().await.unwrap().to_bytes(), "abcde");
        let Read::Complete(one, None) = read_bounded(chunks(&["single"]), 10).await else {
            panic!("expected complete");
        };
        assert_eq!(one, "single");
    }

    #[tokio::test]
    async fn oversized_bodies_replay_then_continue() {
        let Read::TooLarge(read, rest) = read_bounded(chunks(&["abc", "def", "ghi"]), 4).await
        else {
            panic!("expected too large");
        };
        assert_eq!(read, "abcdef");
        let body = RequestBody::replay(read, None, Some(rest));
        assert_eq!(body.collect().await.unwrap().to_bytes(), "abcdefghi");
    }
}
