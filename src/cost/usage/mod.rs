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
//! ([`DEFAULT_MAX_BUFFER_BYTES`] is a good default):
//!
//! * **JSON**: the object is buffered until its closing brace while its structure is
//!   followed: member names at the top level only, a nested value crossed to its matching
//!   close by its brackets alone, strings skipped with a search for their closing quote (in
//!   registers for short ones, SIMD for long ones). Then only the top-level `usage` (or
//!   `response`) member is parsed, not the whole document: the rest of the body is checked
//!   for balance, not for full JSON validity. A `usage` object of the usual shape (plain
//!   names, integer counts) is read without building it. A member name spelled with
//!   escapes (`"\u0075sage"`) is not recognised. A body larger than the bound is given up on:
//!   nothing more is buffered and [`UsageParser::finish`] answers `None` (the caller keeps
//!   its estimate).
//! * **SSE**: only the `data` of the current event is buffered; other fields and comments are
//!   skipped without buffering. An event whose data is larger than the bound is dropped
//!   (everything up to its blank line is discarded) and the rest of the stream is still read.
//!   An event is JSON-parsed only when its data contains a `"usage"` key followed by an object
//!   (`"usage": {`), so the `"usage": null` of ordinary streaming chunks costs a byte search,
//!   not a parse. The usual event, one `data:` line and its blank line whole within a chunk,
//!   is read straight from the chunk: a SIMD search for its line end and one for `"usage"`,
//!   no copy and no byte-by-byte walk; other lines go through the general line parser.
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

mod json;
mod sse;
#[cfg(test)]
mod tests;

use std::fmt;
use std::sync::LazyLock;

use self::json::JsonState;
use self::sse::SseState;
use crate::document::Json;

/// A suggested bound for [`UsageParser::new`]: 4 MiB.
pub const DEFAULT_MAX_BUFFER_BYTES: usize = 4 * 1024 * 1024;

/// A buffer whose capacity grew beyond this is released after use rather than kept for the
/// next event, so a long stream doesn't pin one large event's memory.
const RETAINED_CAPACITY: usize = 64 * 1024;

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

// ---------------------------------------------------------------------------------------
// Shared by both framings

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

const KEY: &[u8] = b"\"usage\"";

/// The SIMD searches of the SSE path, built once: building a searcher costs more than
/// searching a typical event. On x86-64 with AVX2 the searchers are called directly,
/// without the run-time dispatch of `memchr::memchr2` and `memmem` on every call (a
/// noticeable part of the cost of searching an event of a few hundred bytes).
struct Search {
    #[cfg(target_arch = "x86_64")]
    eol: Option<memchr::arch::x86_64::avx2::memchr::Two>,
    #[cfg(target_arch = "x86_64")]
    key: Option<memchr::arch::x86_64::avx2::packedpair::Finder>,
    /// For haystacks too short for `key`, and other targets.
    any_key: memchr::memmem::Finder<'static>,
}

static SEARCH: LazyLock<Search> = LazyLock::new(|| Search {
    #[cfg(target_arch = "x86_64")]
    eol: memchr::arch::x86_64::avx2::memchr::Two::new(b'\n', b'\r'),
    #[cfg(target_arch = "x86_64")]
    key: memchr::arch::x86_64::avx2::packedpair::Finder::new(KEY),
    any_key: memchr::memmem::Finder::new(KEY),
});

impl Search {
    /// The first `\n` or `\r`.
    #[inline]
    fn eol(&self, hay: &[u8]) -> Option<usize> {
        #[cfg(target_arch = "x86_64")]
        if let Some(two) = &self.eol {
            return two.find(hay);
        }
        memchr::memchr2(b'\n', b'\r', hay)
    }

    /// The first `"usage"`.
    #[inline]
    fn key(&self, hay: &[u8]) -> Option<usize> {
        #[cfg(target_arch = "x86_64")]
        if let Some(finder) = &self.key {
            if hay.len() >= finder.min_haystack_len() {
                return finder.find(hay, KEY);
            }
        }
        self.any_key.find(hay)
    }
}

/// Whether `hay` has a `"usage"` key whose value starts as an object: the only bodies worth
/// a JSON parse. (A key spelled with escapes, `"\u0075sage"`, is missed.)
#[inline(always)]
fn has_usage_object(hay: &[u8]) -> bool {
    let search = &*SEARCH;
    let mut from = 0;
    // (The usual `"usage":null}` leaves too little after it for another key.)
    while hay.len() - from >= KEY.len() {
        let Some(at) = search.key(&hay[from..]) else {
            break;
        };
        let key_end = from + at + KEY.len();
        let rest = match hay.get(key_end..key_end + 2) {
            // The compact `"usage":x` of most encoders.
            Some(&[b':', next]) if !next.is_ascii_whitespace() => &hay[key_end + 1..],
            _ => {
                let rest = hay[key_end..].trim_ascii_start();
                match rest.split_first() {
                    Some((&b':', after)) => after.trim_ascii_start(),
                    _ => rest,
                }
            }
        };
        match rest.first() {
            Some(&b'{') => return true,
            None => return false,
            Some(_) => {}
        }
        // The next key can't start in the whitespace and `:` just skipped, only at the byte
        // that broke the pattern, or at the key's closing quote when that byte came right
        // after it (`"usage"usage"`).
        let broke = hay.len() - rest.len();
        from = if broke == key_end { key_end - 1 } else { broke };
    }
    false
}

/// The usage of a JSON document: its non-null `usage`, else its `response`'s non-null
/// `usage`. `None` unless the whole document is valid JSON (duplicate keys: the last one
/// counts, as in a `serde_json::Value`).
#[cold]
#[inline(never)]
fn usage_in(body: &[u8]) -> Option<Usage> {
    let doc = Json::parse(body).ok()?;
    match doc.get("usage") {
        None | Some(Json::Null) => match doc.get("response")?.get("usage") {
            None | Some(Json::Null) => None,
            Some(usage) => usage_of(usage),
        },
        Some(usage) => usage_of(usage),
    }
}

/// The usage a `usage` value says, if it is a valid one (see [`Usage`]).
fn usage_of(usage: &Json<'_>) -> Option<Usage> {
    let usage = usage.as_object()?;
    usage_from(|field| Count::of(usage.get(field.name())))
}

/// The answer for a `usage` value written in `text` (whitespace around it allowed): `None`
/// if it is `null`; else the usage it says if it is valid JSON and a valid usage (as
/// [`Json::parse`] then [`usage_of`] would say); the usual object is read without building
/// it (duplicates: the last counts, as in a `serde_json::Value`).
fn usage_value(text: &[u8]) -> Option<Option<Usage>> {
    if let Some(counts) = plain_counts(text) {
        return Some(usage_from(|field| counts[field as usize]));
    }
    match Json::parse(text) {
        Ok(Json::Object(usage)) => Some(usage_from(|field| Count::of(usage.get(field.name())))),
        Ok(Json::Null) => None,
        // Not JSON, or not an object.
        Err(_) | Ok(_) => Some(None),
    }
}

/// The counts of the usual `usage` object, read without the general parser: an object whose
/// names are printable ASCII without escapes and whose values are unsigned integers of up to
/// 19 digits (no fraction or exponent) or `null`, whitespace allowed between tokens. `None`
/// for anything else (the general parser decides then): when it answers, [`Json::parse`]
/// would accept `text` and give these counts.
fn plain_counts(text: &[u8]) -> Option<[Count; Field::ALL.len()]> {
    let mut counts = [Count::Absent; Field::ALL.len()];
    let mut at = 0;
    let skip_ws = |at: &mut usize| {
        while let Some(b' ' | b'\t' | b'\n' | b'\r') = text.get(*at) {
            *at += 1;
        }
    };
    skip_ws(&mut at);
    if text.get(at) != Some(&b'{') {
        return None;
    }
    at += 1;
    skip_ws(&mut at);
    if text.get(at) == Some(&b'}') {
        at += 1;
    } else {
        loop {
            if text.get(at) != Some(&b'"') {
                return None;
            }
            at += 1;
            let rest = &text[at..];
            let end = self::json::find_quote_or_backslash(rest)?;
            if rest[end] != b'"' {
                return None;
            }
            let name = &rest[..end];
            let field = Field::of(name);
            // (Without an early exit, so that it compiles to vector compares.)
            if field.is_none()
                && !name
                    .iter()
                    .fold(true, |ok, &b| ok & matches!(b, 0x20..=0x7E))
            {
                return None;
            }
            at += end + 1;
            skip_ws(&mut at);
            if text.get(at) != Some(&b':') {
                return None;
            }
            at += 1;
            skip_ws(&mut at);
            let count = match *text.get(at)? {
                b'n' if text[at..].starts_with(b"null") => {
                    at += 4;
                    Count::Absent
                }
                b'0' => {
                    at += 1;
                    Count::Is(0)
                }
                b'1'..=b'9' => {
                    let start = at;
                    let mut n = 0u64;
                    while let Some(&digit @ b'0'..=b'9') = text.get(at) {
                        n = n.wrapping_mul(10).wrapping_add(u64::from(digit - b'0'));
                        at += 1;
                    }
                    // Up to 19 digits always fit.
                    if at - start > 19 {
                        return None;
                    }
                    Count::Is(n)
                }
                _ => return None,
            };
            // A fraction, an exponent or more digits (after a `0`) are the parser's to judge.
            skip_ws(&mut at);
            if let Some(field) = field {
                counts[field as usize] = count;
            }
            match *text.get(at)? {
                b',' => {
                    at += 1;
                    skip_ws(&mut at);
                }
                b'}' => {
                    at += 1;
                    break;
                }
                _ => return None,
            }
        }
    }
    skip_ws(&mut at);
    (at == text.len()).then_some(counts)
}

/// The members of a `usage` object that are read.
#[derive(Clone, Copy)]
enum Field {
    Prompt,
    Input,
    Completion,
    Output,
    Total,
}

impl Field {
    const ALL: [Self; 5] = [
        Self::Prompt,
        Self::Input,
        Self::Completion,
        Self::Output,
        Self::Total,
    ];

    fn name(self) -> &'static str {
        match self {
            Self::Prompt => "prompt_tokens",
            Self::Input => "input_tokens",
            Self::Completion => "completion_tokens",
            Self::Output => "output_tokens",
            Self::Total => "total_tokens",
        }
    }

    /// The field of this (decoded) member name, if it is one that is read.
    fn of(name: &[u8]) -> Option<Self> {
        Some(match name {
            b"prompt_tokens" => Self::Prompt,
            b"input_tokens" => Self::Input,
            b"completion_tokens" => Self::Completion,
            b"output_tokens" => Self::Output,
            b"total_tokens" => Self::Total,
            _ => return None,
        })
    }
}

/// What a member of a `usage` object says as a count.
#[derive(Clone, Copy)]
enum Count {
    /// Missing, or `null`.
    Absent,
    Is(u64),
    /// Not a non-negative integer.
    Invalid,
}

impl Count {
    fn of(value: Option<&Json<'_>>) -> Self {
        let n = match value {
            None | Some(Json::Null) => return Self::Absent,
            Some(Json::Number(n)) => n,
            Some(_) => return Self::Invalid,
        };
        if let Some(n) = n.as_u64() {
            return Self::Is(n);
        }
        // `12.0` is a count too; `-1`, `1.5` and `1e30` are not. (`u64::MAX as f64` rounds
        // up to 2^64, the first value out of range.)
        match n.as_f64() {
            Some(f) if f.is_finite() && f >= 0.0 && f.fract() == 0.0 && f < u64::MAX as f64 => {
                Self::Is(f as u64)
            }
            _ => Self::Invalid,
        }
    }
}

/// The usage of a `usage` object whose member `field` (the last of that name) says
/// `count(field)`, if it is a valid one (see [`Usage`]).
#[inline]
fn usage_from(count: impl Fn(Field) -> Count) -> Option<Usage> {
    // The count of the first of `fields` present and non-null: `Some(None)` if none is,
    // `None` if it isn't a non-negative integer.
    let first = |fields: &[Field]| -> Option<Option<u64>> {
        for &field in fields {
            match count(field) {
                Count::Absent => {}
                Count::Is(n) => return Some(Some(n)),
                Count::Invalid => return None,
            }
        }
        Some(None)
    };
    let input = first(&[Field::Prompt, Field::Input])?;
    let output = first(&[Field::Completion, Field::Output])?;
    let total = first(&[Field::Total])?;
    if input.is_none() && output.is_none() && total.is_none() {
        return None;
    }
    let (input, output) = (input.unwrap_or(0), output.unwrap_or(0));
    Some(Usage {
        input_tokens: input,
        output_tokens: output,
        total_tokens: total.unwrap_or(input.saturating_add(output)),
    })
}
