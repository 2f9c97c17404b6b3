//! [`ResponseFuture`]: the future of a [`crate::RateLimit`] call.

use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use http::Response;
use http_body_util::Full;
use pin_project_lite::pin_project;

use crate::body::ResponseBody;
use crate::headers::RateHeaders;
use crate::settle::Settle;

/// What follows a decision taken asynchronously.
pub(crate) enum Next<F> {
    Reject(Response<Full<Bytes>>),
    Call(F, RateHeaders, Option<Box<Settle>>),
}

type Deciding<F> = Pin<Box<dyn Future<Output = Next<F>> + Send>>;

pin_project! {
    /// The response future of [`crate::RateLimit`]: the inner service's future (whose
    /// response gets the rate-limit headers), a rejection, or, with a store that does I/O,
    /// the decision still under way.
    pub struct ResponseFuture<F> {
        #[pin]
        state: State<F>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<F> {
        Deciding { fut: Deciding<F> },
        Inner { #[pin] fut: F, headers: Option<RateHeaders>, settle: Option<Box<Settle>> },
        Rejected { response: Option<Response<Full<Bytes>>> },
    }
}

impl<F> ResponseFuture<F> {
    pub(crate) fn inner(fut: F, headers: RateHeaders, mut settle: Option<Box<Settle>>) -> Self {
        if let Some(s) = &mut settle {
            s.sent();
        }
        Self {
            state: State::Inner {
                fut,
                headers: Some(headers),
                settle,
            },
        }
    }

    pub(crate) fn rejected(response: Response<Full<Bytes>>) -> Self {
        Self {
            state: State::Rejected {
                response: Some(response),
            },
        }
    }

    pub(crate) fn deciding(fut: Deciding<F>) -> Self {
        Self {
            state: State::Deciding { fut },
        }
    }
}

impl<F> std::fmt::Debug for ResponseFuture<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self.state {
            State::Deciding { .. } => "ResponseFuture::Deciding",
            State::Inner { .. } => "ResponseFuture::Inner",
            State::Rejected { .. } => "ResponseFuture::Rejected",
        })
    }
}

impl<F, B, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Response<B>, E>>,
{
    type Output = Result<Response<ResponseBody<B>>, E>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        loop {
            let mut this = self.as_mut().project();
            match this.state.as_mut().project() {
                StateProj::Deciding { fut } => match ready!(fut.as_mut().poll(cx)) {
                    Next::Reject(response) => this.state.set(State::Rejected {
                        response: Some(response),
                    }),
                    Next::Call(fut, headers, mut settle) => {
                        if let Some(s) = &mut settle {
                            s.sent();
                        }
                        this.state.set(State::Inner {
                            fut,
                            headers: Some(headers),
                            settle,
                        });
                    }
                },
                StateProj::Inner {
                    fut,
                    headers,
                    settle,
                } => {
                    let mut response = match ready!(fut.poll(cx)) {
                        Ok(r) => r,
                        Err(e) => {
                            if let Some(mut s) = settle.take() {
                                s.on_error();
                            }
                            return Poll::Ready(Err(e));
                        }
                    };
                    if let Some(h) = headers.take() {
                        h.write_to(response.headers_mut());
                    }
                    if let Some(mut s) = settle.take() {
                        if s.on_response(
                            response.status(),
                            response.headers(),
                            response.extensions(),
                        ) {
                            return Poll::Ready(Ok(response.map(|b| ResponseBody::settling(b, s))));
                        }
                        if let Some(recorded) = s.take_recorded() {
                            return Poll::Ready(Ok(
                                response.map(|b| ResponseBody::held(b, recorded))
                            ));
                        }
                    }
                    return Poll::Ready(Ok(response.map(ResponseBody::inner)));
                }
                StateProj::Rejected { response } => {
                    let response = response
                        .take()
                        .expect("ResponseFuture polled after completion");
                    return Poll::Ready(Ok(response.map(ResponseBody::rejection)));
                }
            }
        }
    }
}
