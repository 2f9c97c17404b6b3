//! The mock's streamed answers: SSE events written to a channel by a task of their own, each
//! token's event after its time, and the response body that reads the channel.

use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};

use axum::body::{Body, Bytes};
use axum::response::Response;
use http::header;
use http_body::Frame;
use serde_json::Value;
use tokio::sync::mpsc;

use super::capacity::Sequence;

/// A response body fed by a channel, sent chunk by chunk as the producer writes.
struct ChannelBody(mpsc::Receiver<Bytes>);

impl http_body::Body for ChannelBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0.poll_recv(cx).map(|o| o.map(|b| Ok(Frame::data(b))))
    }
}

/// An SSE response of `events`, sent as they are written; the events at the indexes in
/// `tokens` each take a token's time of `seq`, whose place is given back when the last event
/// is written or the client goes away (its place at once, even mid-token).
pub(super) fn sse(
    events: Vec<(Option<&'static str>, Value)>,
    tokens: Vec<usize>,
    mut seq: Sequence,
    done: bool,
) -> Response {
    let (tx, rx) = mpsc::channel::<Bytes>(4);
    tokio::spawn(async move {
        for (i, (event, data)) in events.into_iter().enumerate() {
            if tokens.contains(&i) {
                tokio::select! {
                    () = seq.token() => {}
                    () = tx.closed() => return, // the client went away
                }
            }
            let mut frame = String::new();
            if let Some(e) = event {
                frame.push_str("event: ");
                frame.push_str(e);
                frame.push('\n');
            }
            frame.push_str("data: ");
            frame.push_str(&data.to_string());
            frame.push_str("\n\n");
            if tx.send(Bytes::from(frame)).await.is_err() {
                return; // the client went away
            }
        }
        seq.finish();
        if done {
            let _ = tx.send(Bytes::from_static(b"data: [DONE]\n\n")).await;
        }
    });
    Response::builder()
        .header(header::CONTENT_TYPE, "text/event-stream")
        .header(header::CACHE_CONTROL, "no-cache")
        .body(Body::new(ChannelBody(rx)))
        .expect("valid response")
}
