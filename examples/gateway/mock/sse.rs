//! The mock's streamed answers: SSE events written to a channel by a task of their own, each
//! token's event after its time, and the response body that reads the channel.
//!
//! The channel holds every event of the stream (a completion's few, at most 16 tokens and a
//! handful of others), so writing never waits for the client: a sequence holds its place for
//! its tokens' time only, and a client that reads slowly or not at all finds the rest of its
//! events waiting for it without keeping the place.
//!
//! The events before the first token (the role chunk) go out with it, as vLLM's do (its
//! first chunk leaves with the first output of the engine): a stream's first byte comes at
//! its time to first token, which grows with the load, so a gateway that times the first
//! byte sees the saturation.

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

/// An SSE response of `events` (and `data: [DONE]` after them if `done`), sent as they are
/// written; the events at the indexes in `tokens` each take a token's time of `seq`, whose
/// place is given back when the last event is written (whether or not the client has read
/// it yet: the channel holds them all) or the client goes away (at once, even mid-token).
pub(super) fn sse(
    events: Vec<(Option<&'static str>, Value)>,
    tokens: Vec<usize>,
    mut seq: Sequence,
    done: bool,
) -> Response {
    // Room for every frame: `try_send` below never finds the channel full. Bounded by the
    // handlers' streams (at most `MAX_COMPLETION` tokens and a few other events).
    let (tx, rx) = mpsc::channel::<Bytes>(events.len() + 1);
    let first_token = tokens.iter().copied().min();
    tokio::spawn(async move {
        // The events before the first token, held until it comes.
        let mut frame = String::new();
        for (i, (event, data)) in events.into_iter().enumerate() {
            if tokens.contains(&i) {
                tokio::select! {
                    () = seq.token() => {}
                    () = tx.closed() => return, // the client went away
                }
            }
            if let Some(e) = event {
                frame.push_str("event: ");
                frame.push_str(e);
                frame.push('\n');
            }
            frame.push_str("data: ");
            frame.push_str(&data.to_string());
            frame.push_str("\n\n");
            if first_token.is_some_and(|t| i < t) {
                continue;
            }
            if tx
                .try_send(Bytes::from(std::mem::take(&mut frame)))
                .is_err()
            {
                return; // the client went away (the channel has room for every frame)
            }
        }
        seq.finish();
        if done {
            let _ = tx.try_send(Bytes::from_static(b"data: [DONE]\n\n"));
        }
    });
    Response::builder()
        .header(header::CONTENT_TYPE, "text/event-stream")
        .header(header::CACHE_CONTROL, "no-cache")
        .body(Body::new(ChannelBody(rx)))
        .expect("valid response")
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use http_body_util::BodyExt;
    use serde_json::json;

    use super::super::capacity::{Capacity, Limits};
    use super::*;

    /// The events before the first token leave with it: nothing of the stream comes before
    /// the first token's time.
    #[tokio::test(start_paused = true)]
    async fn the_first_bytes_of_a_stream_come_with_its_first_token() {
        let c = Capacity::new(
            Duration::from_millis(10),
            Limits {
                capacity: 1,
                queue: 0,
            },
        );
        let seq = c.admit().expect("a place");
        let events = vec![
            (None, json!({ "role": "assistant" })),
            (None, json!({ "token": 0 })),
            (None, json!({ "token": 1 })),
        ];
        let mut body = sse(events, vec![1, 2], seq, true).into_body();
        let early = tokio::time::timeout(Duration::from_millis(9), body.frame()).await;
        assert!(early.is_err(), "a frame before the first token: {early:?}");
        let first = tokio::time::timeout(Duration::from_millis(2), body.frame())
            .await
            .expect("the first token's frame")
            .expect("a frame")
            .expect("data")
            .into_data()
            .expect("data");
        let text = String::from_utf8_lossy(&first);
        assert_eq!(text.matches("data: ").count(), 2, "{text}");
        assert!(
            text.contains("\"role\"") && text.contains("\"token\":0"),
            "{text}"
        );
    }

    /// A client that never reads its stream holds no place once its tokens' time has passed:
    /// the events wait for it in the response, and it can still read them all.
    #[tokio::test(start_paused = true)]
    async fn a_client_that_never_reads_gives_the_place_back_after_its_tokens() {
        let c = Capacity::new(
            Duration::from_millis(10),
            Limits {
                capacity: 1,
                queue: 0,
            },
        );
        let seq = c.admit().expect("a place");
        let mut events: Vec<_> = (0..16).map(|i| (None, json!({ "token": i }))).collect();
        events.push((Some("end"), json!({})));
        let response = sse(events, (0..16).collect(), seq, true);
        // Far beyond the 16 tokens' time (the clock is paused: nothing waits for real).
        tokio::time::sleep(Duration::from_secs(60)).await;
        let s = c.stats();
        assert_eq!(
            (&s["running"], &s["completed"], &s["tokens"]),
            (&json!(0), &json!(1), &json!(16)),
            "{s}"
        );
        assert!(c.admit().is_ok(), "the place is free");
        let body = response
            .into_body()
            .collect()
            .await
            .expect("the body")
            .to_bytes();
        let text = String::from_utf8_lossy(&body);
        assert_eq!(text.matches("data: ").count(), 18, "{text}");
        assert!(text.contains("event: end\n"), "{text}");
        assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
    }
}
