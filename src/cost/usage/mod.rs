//! The token usage an OpenAI-compatible upstream reports in its response.
//!
//! A token rule is charged an **estimate** before the request runs; the real cost is in the
//! response: the `usage` object of a JSON body, or of one event of a `text/event-stream`
//! body. [`UsageParser`] finds it **incrementally**: it is fed each body chunk as it streams
//! past (the body itself passes through untouched, the parser only observes) and asked for the
//! result at the end of the body with [`UsageParser::finish`].
//!
//! | framing | body | where the usage is |
//! |---|---|---|
//! | [`Framing::Json`] | one JSON object (chat / completions / embeddings / responses) | `usage`, or `response.usage` |
//! | [`Framing::Sse`] | server-sent events, each `data:` a JSON object, ended by `data: [DONE]` | the **last** non-null `usage` (or `response.usage`) of any event |
//!
//! Both the Chat Completions names (`prompt_tokens`, `completion_tokens`, `total_tokens`) and
//! the Responses API names (`input_tokens`, `output_tokens`, `total_tokens`) are read; see
//! [`Usage`] for the exact rules.
//!
//! # Memory and cost
//!
//! The parser never holds more than `max_buffer_bytes` of the body
//! ([`DEFAULT_MAX_BUFFER_BYTES`] is a good default). What it holds is read with serde_json
//! into the few members that say the usage; every other member is skipped
//! (`serde::de::IgnoredAny`: checked as JSON, not built).
//!
//! * **JSON**: the object is buffered until its closing brace, found by following its
//!   brackets and strings; the object is then deserialized once, and must be valid JSON as a
//!   whole. A first chunk that holds the whole valid object (the usual answer) is
//!   deserialized in place, without that search. Bytes after the object are not looked at. A body larger than the bound is given
//!   up on: nothing more is buffered and [`UsageParser::finish`] answers `None` (the caller
//!   keeps its estimate).
//! * **SSE**: the body is split into lines at `\n`, `\r` and `\r\n` (a `memchr` search);
//!   only the `data` of the current event is buffered, and other fields and comments are
//!   skipped without buffering. An event whose data is larger than the bound is dropped
//!   (everything up to its blank line is discarded) and the rest of the stream is still
//!   read. An event is deserialized only when its data has a `"usage"` key followed by an
//!   object (`"usage": {`), so the `"usage": null` of ordinary streaming chunks costs a byte
//!   search, not a parse.
//!
//! A top-level member name spelled with escapes (`"\u0075sage"`) is not recognised.
//!
//! The parser never panics, whatever the bytes (invalid UTF-8 included) and wherever the chunk
//! boundaries fall; the result doesn't depend on how the body is split into chunks.
//!
//! # Examples
//!
//! ```
//! use tower_llm_ratelimit::cost::usage::{Framing, Usage, UsageParser, DEFAULT_MAX_BUFFER_BYTES};
//!
//! // A streamed chat completion with `stream_options: {"include_usage": true}`,
//! // arriving in chunks that split an event anywhere.
//! let framing = Framing::from_content_type("text/event-stream; charset=utf-8").unwrap();
//! let mut parser = UsageParser::new(framing, DEFAULT_MAX_BUFFER_BYTES);
//! parser.feed(b"data: {\"choices\":[{\"delta\":{\"content\":\"Hi\"}}],\"usage\":null}\n\n");
//! parser.feed(b"data: {\"choices\":[],\"usage\":{\"prompt_tokens\":9,\"compl");
//! parser.feed(b"etion_tokens\":3,\"total_tokens\":12}}\n\ndata: [DONE]\n\n");
//! assert!(parser.is_done());
//! assert_eq!(
//!     parser.finish(),
//!     Some(Usage { input_tokens: 9, output_tokens: 3, total_tokens: 12 }),
//! );
//!
//! // A non-streaming embeddings response: no completion tokens.
//! let mut parser = UsageParser::new(Framing::Json, DEFAULT_MAX_BUFFER_BYTES);
//! parser.feed(br#"{"object":"list","data":[],"usage":{"prompt_tokens":8,"total_tokens":8}}"#);
//! assert_eq!(
//!     parser.finish(),
//!     Some(Usage { input_tokens: 8, output_tokens: 0, total_tokens: 8 }),
//! );
//! ```

mod document;
mod json;
mod sse;
#[cfg(test)]
mod tests;

use std::fmt;

use self::json::JsonState;
use self::sse::SseState;

/// A suggested bound for [`UsageParser::new`]: 4 MiB.
pub const DEFAULT_MAX_BUFFER_BYTES: usize = 4 * 1024 * 1024;

/// Token usage reported by the upstream.
///
/// Read from a `usage` object (or `response.usage`, the Responses API's streaming
/// `response.completed` event):
///
/// * `input_tokens`: `prompt_tokens`, else `input_tokens`;
/// * `output_tokens`: `completion_tokens`, else `output_tokens`; 0 when absent (embeddings);
/// * `total_tokens`: `total_tokens`; `input_tokens + output_tokens` when absent.
///
/// A field that is `null` counts as absent. A `usage` with none of these fields, or with a
/// value that isn't a non-negative integer (a string, a negative or fractional number), is
/// treated as no usage at all.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Usage {
    /// Tokens of the prompt (`prompt_tokens` / `input_tokens`).
    pub input_tokens: u64,
    /// Tokens generated (`completion_tokens` / `output_tokens`).
    pub output_tokens: u64,
    /// All tokens billed (`total_tokens`, else input + output).
    pub total_tokens: u64,
}

/// How the response body is framed; chosen from its `content-type` with
/// [`Framing::from_content_type`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Framing {
    /// The whole body is one JSON object (`application/json`, `application/*+json`).
    Json,
    /// Server-sent events (`text/event-stream`), each event's data a JSON object.
    Sse,
}
impl Framing {
    /// The framing of a body with this `content-type` (a `&str`, a `&[u8]` or an
    /// [`http::HeaderValue`]): `text/event-stream` is [`Framing::Sse`]; `application/json` and
    /// any `+json` type (`application/vnd.foo+json`) are [`Framing::Json`]; anything else is
    /// `None` (no usage to look for).
    ///
    /// Parameters (`; charset=utf-8`), surrounding whitespace and letter case are ignored.
    ///
    /// ```
    /// use http::HeaderValue;
    /// use tower_llm_ratelimit::cost::usage::Framing;
    ///
    /// assert_eq!(Framing::from_content_type("text/event-stream"), Some(Framing::Sse));
    /// let json = HeaderValue::from_static("application/json; charset=utf-8");
    /// assert_eq!(Framing::from_content_type(&json), Some(Framing::Json));
    /// assert_eq!(Framing::from_content_type("text/plain"), None);
    /// ```
    pub fn from_content_type(content_type: impl AsRef<[u8]>) -> Option<Self> {
        let value = content_type.as_ref();
        let essence = match value.iter().position(|&b| b == b';') {
            Some(semi) => &value[..semi],
            None => value,
        }
        .trim_ascii();
        let slash = essence.iter().position(|&b| b == b'/')?;
        let (kind, subtype) = (&essence[..slash], &essence[slash + 1..]);
        if kind.is_empty() || subtype.is_empty() {
            return None;
        }
        if kind.eq_ignore_ascii_case(b"text") && subtype.eq_ignore_ascii_case(b"event-stream") {
            return Some(Self::Sse);
        }
        let json_suffix =
            subtype.len() > 5 && subtype[subtype.len() - 5..].eq_ignore_ascii_case(b"+json");
        if (kind.eq_ignore_ascii_case(b"application") && subtype.eq_ignore_ascii_case(b"json"))
            || json_suffix
        {
            return Some(Self::Json);
        }
        None
    }
}

/// Finds the [`Usage`] in a response body fed to it chunk by chunk.
///
/// Pure and synchronous: no I/O, no clock. See the [module docs](self) for the framings,
/// the memory bound and what is read.
pub struct UsageParser {
    max: usize,
    usage: Option<Usage>,
    done: bool,
    state: State,
}

enum State {
    Json(JsonState),
    Sse(SseState),
}

impl fmt::Debug for UsageParser {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (framing, buffered) = match &self.state {
            State::Json(s) => (Framing::Json, s.buffered()),
            State::Sse(s) => (Framing::Sse, s.buffered()),
        };
        f.debug_struct("UsageParser")
            .field("framing", &framing)
            .field("max_buffer_bytes", &self.max)
            .field("buffered", &buffered)
            .field("usage", &self.usage)
            .field("done", &self.done)
            .finish()
    }
}

impl UsageParser {
    /// A parser for a body with this framing, buffering at most `max_buffer_bytes` of it
    /// ([`DEFAULT_MAX_BUFFER_BYTES`] is a good default).
    pub fn new(framing: Framing, max_buffer_bytes: usize) -> Self {
        let state = match framing {
            Framing::Json => State::Json(JsonState::default()),
            Framing::Sse => State::Sse(SseState::default()),
        };
        Self {
            max: max_buffer_bytes,
            usage: None,
            done: false,
            state,
        }
    }

    /// Observes the next chunk of the body.
    ///
    /// Never panics and never buffers more than `max_buffer_bytes`; does nothing once
    /// [`is_done`](Self::is_done).
    pub fn feed(&mut self, chunk: &[u8]) {
        if self.done || chunk.is_empty() {
            return;
        }
        match &mut self.state {
            State::Json(s) => {
                if let Some(outcome) = s.feed(chunk, self.max) {
                    self.usage = outcome;
                    self.done = true;
                }
            }
            State::Sse(s) => {
                s.feed(chunk, self.max, &mut self.usage, &mut self.done);
            }
        }
    }

    /// The usage found, at the end of the body; `None` if there was none.
    ///
    /// JSON: `None` unless a complete object was seen, within the bound, with a valid
    /// `usage`. SSE: the last valid non-null usage of a dispatched event; an event not
    /// ended by a blank line before the end of the body is discarded, as the SSE rules say.
    /// Releases the parser's buffers; calling it again answers the same.
    pub fn finish(&mut self) -> Option<Usage> {
        match &mut self.state {
            State::Json(s) => {
                if !self.done {
                    // The body ended inside the object (or before it): not valid JSON.
                    self.done = true;
                    self.usage = None;
                }
                s.release();
            }
            State::Sse(s) => {
                s.release();
            }
        }
        self.usage
    }

    /// Whether more input can no longer change the result: SSE saw `data: [DONE]`; JSON saw
    /// the end of the object, or gave up (the body isn't an object, or is over the bound).
    pub fn is_done(&self) -> bool {
        self.done
    }
}

/// Appends `bytes` to `buf` unless that would take it over `max` bytes (then `false`, and
/// `buf` is unchanged). Never lets the capacity grow past `max` either.
fn push_bounded(buf: &mut Vec<u8>, bytes: &[u8], max: usize) -> bool {
    let Some(needed) = buf.len().checked_add(bytes.len()) else {
        return false;
    };
    if needed > max {
        return false;
    }
    if needed > buf.capacity() {
        let target = needed.max(buf.capacity().saturating_mul(2)).min(max);
        buf.reserve_exact(target - buf.len());
    }
    buf.extend_from_slice(bytes);
    true
}
