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
//!   followed (strings are skipped with a SIMD search for their closing quote); then only the
//!   top-level `usage` (or `response`) member is parsed, not the whole document: the rest of
//!   the body is checked for balance, not for full JSON validity. A member name spelled with
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

use std::fmt;
use std::sync::LazyLock;

use crate::json::Json;

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
            State::Json(s) => (Framing::Json, s.buf.len()),
            State::Sse(s) => (Framing::Sse, s.data.len()),
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
                s.buf = Vec::new();
            }
            State::Sse(s) => {
                s.data = Vec::new();
                s.poisoned = false;
                s.line = Line::Start;
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
// JSON

/// A top-level member name being read, kept only while it could still be `usage` or
/// `response` (a name may be split across chunks).
#[derive(Default)]
struct KeyName {
    reading: bool,
    len: usize,
    bytes: [u8; 8],
}

impl KeyName {
    fn start(&mut self) {
        *self = Self {
            reading: true,
            ..Self::default()
        };
    }

    /// More of the name (escapes included as written: an escaped name matches nothing).
    fn push_partial(&mut self, part: &[u8]) {
        if !self.reading || self.len > self.bytes.len() {
            return;
        }
        let end = self.len.saturating_add(part.len());
        match self.bytes.get_mut(self.len..end) {
            Some(dst) => {
                dst.copy_from_slice(part);
                self.len = end;
            }
            // Longer than any name we want.
            None => self.len = usize::MAX,
        }
    }

    /// The complete name, if it was short enough to be one we want.
    fn take(&mut self) -> Option<&[u8]> {
        let reading = std::mem::take(&mut self.reading);
        (reading && self.len <= self.bytes.len()).then(|| &self.bytes[..self.len])
    }
}

/// Which top-level member a value belongs to.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Member {
    Usage,
    Response,
}

#[derive(Default)]
struct JsonState {
    /// The object so far, from its opening brace.
    buf: Vec<u8>,
    started: bool,
    /// Nesting depth (objects and arrays) at the scan position.
    depth: usize,
    in_string: bool,
    escaped: bool,
    /// At depth 1, the next string is a member name.
    expect_key: bool,
    /// The top-level member name being read, if any.
    key: KeyName,
    /// The value being read is this member's, starting at this offset (at its `:`).
    member: Option<(Member, usize)>,
    /// Where the last `usage` and `response` values are in `buf` (duplicates: the last).
    usage: Option<(usize, usize)>,
    response: Option<(usize, usize)>,
}

impl JsonState {
    /// `Some(outcome)` once the parser is done: the object ended (parsed) or was given up on.
    fn feed(&mut self, chunk: &[u8], max: usize) -> Option<Option<Usage>> {
        let mut i = 0;
        if !self.started {
            // Leading whitespace (and a byte-order mark's bytes) before the object.
            while i < chunk.len()
                && matches!(chunk[i], b' ' | b'\t' | b'\n' | b'\r' | 0xEF | 0xBB | 0xBF)
            {
                i += 1;
            }
            if i == chunk.len() {
                return None;
            }
            if chunk[i] != b'{' {
                return Some(None);
            }
            self.started = true;
        }
        let part = &chunk[i..];
        let end = self.scan(part, self.buf.len());
        if let (Some(end), true) = (end, self.buf.is_empty()) {
            // The whole object in one chunk (the usual JSON answer): read in place, no copy.
            return Some((end <= max).then(|| self.usage_of(&part[..end])).flatten());
        }
        // Bytes after the object are not looked at (nor counted against the bound).
        if !push_bounded(&mut self.buf, &part[..end.unwrap_or(part.len())], max) {
            self.buf = Vec::new();
            return Some(None);
        }
        end?;
        let buf = std::mem::take(&mut self.buf);
        Some(self.usage_of(&buf))
    }

    /// Scans the next `data` of the body, which starts at offset `base` of the object: the
    /// end of the object within `data` (after its closing brace) once seen. Strings are
    /// skipped with a SIMD search for their end; only the structure between them is walked
    /// byte by byte.
    fn scan(&mut self, data: &[u8], base: usize) -> Option<usize> {
        let mut i = 0;
        let len = data.len();
        while i < len {
            if self.in_string {
                if self.escaped {
                    self.escaped = false;
                    i += 1;
                    continue;
                }
                let Some(at) = crate::json::find_quote_or_backslash(&data[i..]) else {
                    self.key.push_partial(&data[i..]);
                    return None;
                };
                if data[i + at] == b'\\' {
                    self.key.push_partial(&data[i..i + at + 1]);
                    self.escaped = true;
                    i += at + 1;
                    continue;
                }
                // The closing quote.
                self.key.push_partial(&data[i..i + at]);
                i += at;
                self.in_string = false;
                if let Some(name) = self.key.take() {
                    let member = match name {
                        b"usage" => Some(Member::Usage),
                        b"response" => Some(Member::Response),
                        _ => None,
                    };
                    self.member = member.map(|m| (m, base + i + 1));
                }
                i += 1;
                continue;
            }
            match data[i] {
                b'"' => {
                    self.in_string = true;
                    if self.depth == 1 && self.expect_key {
                        self.expect_key = false;
                        self.key.start();
                    }
                }
                b'{' | b'[' => {
                    self.depth += 1;
                    if self.depth == 1 {
                        self.expect_key = true;
                    }
                }
                b'}' | b']' => {
                    if self.depth == 1 {
                        self.end_member(base + i);
                    }
                    self.depth = self.depth.saturating_sub(1);
                    if self.depth == 0 {
                        return Some(i + 1);
                    }
                }
                b',' if self.depth == 1 => {
                    self.end_member(base + i);
                    self.expect_key = true;
                }
                _ => {}
            }
            i += 1;
        }
        None
    }

    /// A top-level value ended at `at` (its `,` or the object's `}`).
    fn end_member(&mut self, at: usize) {
        match self.member.take() {
            Some((Member::Usage, start)) => self.usage = Some((start, at)),
            Some((Member::Response, start)) => self.response = Some((start, at)),
            None => {}
        }
    }

    /// The usage of the complete object in `buf`: its non-null `usage`, else its
    /// `response`'s non-null `usage`. Only those two values are parsed.
    fn usage_of(&self, buf: &[u8]) -> Option<Usage> {
        let value = |(start, end): (usize, usize)| {
            // From the `:` after the name to the `,` or `}` after the value.
            let v = buf[start..end].trim_ascii_start();
            Json::parse(v.strip_prefix(b":").unwrap_or(v)).ok()
        };
        if let Some(span) = self.usage {
            match value(span)? {
                Json::Null => {}
                usage => return usage_of(&usage),
            }
        }
        match value(self.response?)?.get("usage") {
            None | Some(Json::Null) => None,
            Some(usage) => usage_of(usage),
        }
    }
}

// ---------------------------------------------------------------------------------------
// SSE

/// Where the parser is within the current line.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Line {
    /// Nothing read on this line yet.
    Start,
    /// Reading the field name; `matched` bytes of it equal the start of `data`.
    Name { matched: usize },
    /// In the value of a `data` field; `at_start` while the optional space may come next.
    Data { at_start: bool },
    /// A comment, another field, or an unwanted rest of line: skip to the line end.
    Skip,
}

struct SseState {
    /// Bytes of a leading byte-order mark matched so far; `None` once past the stream start.
    bom: Option<usize>,
    /// The previous byte was `\r`: a `\n` right after it ends nothing.
    after_cr: bool,
    line: Line,
    /// The data buffer of the current event.
    data: Vec<u8>,
    /// The current event's data went over the bound: drop the event at its dispatch.
    poisoned: bool,
    /// The event's only data line so far, left in place in the chunk being read (offsets
    /// into it) instead of copied to `data`: a one-line event dispatched within its chunk,
    /// the usual case, is never copied. Copied to `data` when a second line comes, or when
    /// the chunk ends first.
    pending: Option<(usize, usize)>,
}

impl Default for SseState {
    fn default() -> Self {
        Self {
            bom: Some(0),
            after_cr: false,
            line: Line::Start,
            data: Vec::new(),
            poisoned: false,
            pending: None,
        }
    }
}

const BOM: &[u8; 3] = b"\xEF\xBB\xBF";
const DATA: &[u8; 4] = b"data";

impl SseState {
    fn feed(&mut self, mut chunk: &[u8], max: usize, usage: &mut Option<Usage>, done: &mut bool) {
        if let Some(matched) = self.bom {
            // Strip one leading U+FEFF, which may itself be split across chunks.
            let mut m = matched;
            while m < BOM.len() && !chunk.is_empty() && chunk[0] == BOM[m] {
                m += 1;
                chunk = &chunk[1..];
            }
            if m == BOM.len() {
                self.bom = None;
            } else if chunk.is_empty() {
                self.bom = Some(m);
                return;
            } else {
                // Not a BOM after all: the bytes held back are ordinary input.
                self.bom = None;
                self.lines(&BOM[..m], max, usage, done);
                if *done {
                    return;
                }
            }
        }
        if self.after_cr {
            // The `\n` of a `\r\n` split between chunks.
            self.after_cr = false;
            if chunk.first() == Some(&b'\n') {
                chunk = &chunk[1..];
            }
        }
        // The usual chunk: whole one-line events, from an event's start.
        if self.line == Line::Start
            && self.pending.is_none()
            && self.data.is_empty()
            && !self.poisoned
        {
            while let Some(len) = self.whole_event(chunk, max, usage, done) {
                chunk = &chunk[len..];
                if chunk.is_empty() || *done || self.after_cr {
                    return;
                }
            }
        }
        if !chunk.is_empty() {
            self.lines(chunk, max, usage, done);
        }
    }

    fn lines(&mut self, chunk: &[u8], max: usize, usage: &mut Option<Usage>, done: &mut bool) {
        let mut i = 0;
        while i < chunk.len() && !*done {
            if self.after_cr {
                self.after_cr = false;
                if chunk[i] == b'\n' {
                    i += 1;
                    continue;
                }
            }
            match self.line {
                Line::Data { at_start } => {
                    if at_start {
                        self.line = Line::Data { at_start: false };
                        if chunk[i] == b' ' {
                            i += 1;
                            continue;
                        }
                    }
                    let rest = &chunk[i..];
                    let eol = SEARCH.eol(rest);
                    let value = &rest[..eol.unwrap_or(rest.len())];
                    // A second data line: the first one joins the buffer.
                    self.materialize(chunk, max);
                    if eol.is_some() && self.data.is_empty() && !self.poisoned {
                        // The line and its newline, as `data` would hold them.
                        if value.len() < max {
                            self.pending = Some((i, i + value.len()));
                        } else {
                            self.poison();
                        }
                    } else if !self.poisoned && !push_bounded(&mut self.data, value, max) {
                        self.poison();
                    }
                    i += value.len();
                    if eol.is_some() {
                        self.end_line(chunk, chunk[i], max, usage, done);
                        i += 1;
                    }
                }
                Line::Skip => {
                    let rest = &chunk[i..];
                    match SEARCH.eol(rest) {
                        Some(eol) => {
                            i += eol;
                            self.end_line(chunk, chunk[i], max, usage, done);
                            i += 1;
                        }
                        None => i = chunk.len(),
                    }
                }
                // The usual line, `data:` whole in this chunk: straight to its value.
                Line::Start if chunk[i..].starts_with(b"data:") => {
                    if self.pending.is_none() && self.data.is_empty() && !self.poisoned {
                        if let Some(len) = self.whole_event(&chunk[i..], max, usage, done) {
                            i += len;
                            continue;
                        }
                    }
                    self.line = Line::Data { at_start: true };
                    i += DATA.len() + 1;
                }
                Line::Start | Line::Name { .. } => {
                    let b = chunk[i];
                    i += 1;
                    if b == b'\n' || b == b'\r' {
                        self.end_line(chunk, b, max, usage, done);
                        continue;
                    }
                    let matched = match self.line {
                        Line::Name { matched } => matched,
                        _ if b == b':' => {
                            // A comment.
                            self.line = Line::Skip;
                            continue;
                        }
                        _ => 0,
                    };
                    self.line = if b == b':' {
                        if matched == DATA.len() {
                            Line::Data { at_start: true }
                        } else {
                            Line::Skip
                        }
                    } else if matched < DATA.len() && b == DATA[matched] {
                        Line::Name {
                            matched: matched + 1,
                        }
                    } else {
                        // Some other field (`event`, `id`, `retry`, ...): ignored.
                        Line::Skip
                    };
                }
            }
        }
        // The chunk ends before the event: keep its line.
        self.materialize(chunk, max);
    }

    /// The usual event, one `data:` line then a blank line, whole at the start of `chunk`
    /// (an event's start: nothing of it read yet): dispatched straight from the chunk, with
    /// no line-by-line walk. The bytes it took, or `None` (nothing done) if the event isn't
    /// that simple or doesn't end within the chunk.
    #[inline(always)]
    fn whole_event(
        &mut self,
        chunk: &[u8],
        max: usize,
        usage: &mut Option<Usage>,
        done: &mut bool,
    ) -> Option<usize> {
        let rest = chunk.strip_prefix(b"data:")?;
        let (skipped, rest) = match rest.split_first() {
            Some((&b' ', value)) => (DATA.len() + 2, value),
            _ => (DATA.len() + 1, rest),
        };
        let eol = SEARCH.eol(rest)?;
        // The data line's end (`\r\n` is one), then a blank line.
        let mut next = eol + 1;
        if rest[eol] == b'\r' && *rest.get(next)? == b'\n' {
            next += 1;
        }
        match *rest.get(next)? {
            b'\n' => {}
            b'\r' => match rest.get(next + 1) {
                Some(&b'\n') => next += 1,
                Some(_) => {}
                None => self.after_cr = true,
            },
            _ => return None,
        }
        let value = &rest[..eol];
        // As `data` would hold it, with its newline: over the bound, the event is dropped.
        if value.len() < max {
            Self::dispatch_data(value, usage, done);
        }
        Some(skipped + next + 1)
    }

    /// The line ended with `eol` (`\n` or `\r`).
    fn end_line(
        &mut self,
        chunk: &[u8],
        eol: u8,
        max: usize,
        usage: &mut Option<Usage>,
        done: &mut bool,
    ) {
        self.after_cr = eol == b'\r';
        match std::mem::replace(&mut self.line, Line::Start) {
            Line::Start => self.dispatch(chunk, usage, done),
            // `data` alone on its line is a data field with an empty value.
            Line::Name { matched } if matched == DATA.len() => {
                self.materialize(chunk, max);
                self.push_newline(max);
            }
            // A pending line's newline is implied.
            Line::Data { .. } if self.pending.is_some() => {}
            Line::Data { .. } => self.push_newline(max),
            Line::Name { .. } | Line::Skip => {}
        }
    }

    /// Copies the pending line (and its newline) of `chunk` to `data`.
    fn materialize(&mut self, chunk: &[u8], max: usize) {
        if let Some((start, end)) = self.pending.take() {
            if !push_bounded(&mut self.data, &chunk[start..end], max) {
                self.poison();
            }
            self.push_newline(max);
        }
    }

    fn push_newline(&mut self, max: usize) {
        if !self.poisoned && !push_bounded(&mut self.data, b"\n", max) {
            self.poison();
        }
    }

    fn poison(&mut self) {
        self.poisoned = true;
        self.pending = None;
        self.data = Vec::new();
    }

    /// A blank line: the event is complete.
    fn dispatch(&mut self, chunk: &[u8], usage: &mut Option<Usage>, done: &mut bool) {
        if self.poisoned {
            self.poisoned = false;
            return;
        }
        let data = match self.pending.take() {
            Some((start, end)) => &chunk[start..end],
            None if self.data.is_empty() => return,
            None => {
                self.data.pop(); // the `\n` every data line ends with
                &self.data[..]
            }
        };
        Self::dispatch_data(data, usage, done);
        if *done || self.data.capacity() > RETAINED_CAPACITY {
            self.data = Vec::new();
        } else {
            self.data.clear();
        }
    }

    /// An event's data (without its last newline).
    #[inline(always)]
    fn dispatch_data(data: &[u8], usage: &mut Option<Usage>, done: &mut bool) {
        // (A JSON object starts with `{`: no need to trim it.)
        if data.first() != Some(&b'{') && data.trim_ascii() == b"[DONE]" {
            *done = true;
            return;
        }
        if has_usage_object(data) {
            if let Some(found) = usage_in(data) {
                *usage = Some(found);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// Shared

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
    // The value of the first of `names` present and non-null: `Some(None)` if none is,
    // `None` if it isn't a non-negative integer.
    let count = |names: &[&str]| -> Option<Option<u64>> {
        let Some(value) = names
            .iter()
            .find_map(|name| usage.get(name).filter(|v| !matches!(v, Json::Null)))
        else {
            return Some(None);
        };
        let Json::Number(n) = value else {
            return None;
        };
        if let Some(n) = n.as_u64() {
            return Some(Some(n));
        }
        // `12.0` is a count too; `-1`, `1.5` and `1e30` are not. (`u64::MAX as f64` rounds
        // up to 2^64, the first value out of range.)
        let f = n.as_f64()?;
        (f.is_finite() && f >= 0.0 && f.fract() == 0.0 && f < u64::MAX as f64)
            .then_some(Some(f as u64))
    };
    let input = count(&["prompt_tokens", "input_tokens"])?;
    let output = count(&["completion_tokens", "output_tokens"])?;
    let total = count(&["total_tokens"])?;
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

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const MAX: usize = DEFAULT_MAX_BUFFER_BYTES;

    fn usage(input: u64, output: u64, total: u64) -> Usage {
        Usage {
            input_tokens: input,
            output_tokens: output,
            total_tokens: total,
        }
    }

    /// Feeds `body` in the given chunks; returns `(finish, is_done)`.
    fn run<'a>(
        framing: Framing,
        max: usize,
        chunks: impl IntoIterator<Item = &'a [u8]>,
    ) -> (Option<Usage>, bool) {
        let mut p = UsageParser::new(framing, max);
        for chunk in chunks {
            p.feed(chunk);
        }
        let done = p.is_done();
        let result = p.finish();
        assert_eq!(p.finish(), result, "finish is idempotent");
        (result, done)
    }

    fn whole(framing: Framing, body: &[u8]) -> Option<Usage> {
        run(framing, MAX, [body]).0
    }

    /// Asserts that every split in two, and byte-by-byte feeding, give `expected`.
    fn assert_every_split(framing: Framing, max: usize, body: &[u8], expected: Option<Usage>) {
        let (whole, whole_done) = run(framing, max, [body]);
        assert_eq!(whole, expected, "whole body");
        for split in 0..=body.len() {
            let (a, b) = body.split_at(split);
            assert_eq!(
                run(framing, max, [a, b]),
                (whole, whole_done),
                "split at {split}"
            );
        }
        assert_eq!(
            run(framing, max, body.chunks(1)),
            (whole, whole_done),
            "byte by byte"
        );
    }

    const CHAT_STREAM: &str = concat!(
        "data: {\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\"}}],\"usage\":null}\n\n",
        "data: {\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hello\"}}],\"usage\":null}\n\n",
        "data: {\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}],\"usage\":null}\n\n",
        "data: {\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"choices\":[],\"usage\":{\"prompt_tokens\":19,\"completion_tokens\":10,\"total_tokens\":29}}\n\n",
        "data: [DONE]\n\n",
    );

    // ----- content type

    #[test]
    fn framing_from_content_type() {
        use http::HeaderValue;
        let cases: &[(&str, Option<Framing>)] = &[
            ("text/event-stream", Some(Framing::Sse)),
            ("Text/Event-Stream; charset=utf-8", Some(Framing::Sse)),
            ("  text/event-stream  ", Some(Framing::Sse)),
            ("application/json", Some(Framing::Json)),
            ("application/json;charset=UTF-8", Some(Framing::Json)),
            ("APPLICATION/JSON", Some(Framing::Json)),
            ("application/problem+json", Some(Framing::Json)),
            ("application/vnd.api+JSON; q=1", Some(Framing::Json)),
            ("text/plain", None),
            ("application/x-ndjson", None),
            ("application/jsonl", None),
            ("+json", None),
            ("application/+json", None),
            ("", None),
            ("json", None),
        ];
        for (ct, expected) in cases {
            assert_eq!(Framing::from_content_type(ct), *expected, "{ct:?}");
            assert_eq!(
                Framing::from_content_type(HeaderValue::from_str(ct).unwrap()),
                *expected,
                "{ct:?} as a header"
            );
        }
        assert_eq!(Framing::from_content_type(b"\xFF/\xFE"), None);
    }

    // ----- JSON

    #[test]
    fn json_chat_completion() {
        let body = br#"{"id":"chatcmpl-1","object":"chat.completion","choices":[{"index":0,"message":{"role":"assistant","content":"Hi { \" } ]"},"finish_reason":"stop"}],"usage":{"prompt_tokens":12,"completion_tokens":5,"total_tokens":17,"prompt_tokens_details":{"cached_tokens":0}}}"#;
        assert_every_split(Framing::Json, MAX, body, Some(usage(12, 5, 17)));
        let (_, done) = run(Framing::Json, MAX, [&body[..]]);
        assert!(done);
    }

    #[test]
    fn json_embeddings_have_no_completion_tokens() {
        let body = br#"{"object":"list","data":[{"object":"embedding","index":0,"embedding":[0.1,-0.2]}],"model":"text-embedding-3-small","usage":{"prompt_tokens":8,"total_tokens":8}}"#;
        assert_eq!(whole(Framing::Json, body), Some(usage(8, 0, 8)));
    }

    #[test]
    fn json_responses_api() {
        let body = br#"{"id":"resp_1","object":"response","status":"completed","output":[{"type":"message","content":[{"type":"output_text","text":"usage"}]}],"usage":{"input_tokens":36,"input_tokens_details":{"cached_tokens":0},"output_tokens":87,"output_tokens_details":{"reasoning_tokens":0},"total_tokens":123}}"#;
        assert_every_split(Framing::Json, MAX, body, Some(usage(36, 87, 123)));
    }

    #[test]
    fn json_response_usage_nested() {
        let body = br#"{"type":"response.completed","response":{"id":"resp_1","usage":{"input_tokens":3,"output_tokens":4}}}"#;
        assert_eq!(whole(Framing::Json, body), Some(usage(3, 4, 7)));
    }

    #[test]
    fn json_total_defaults_to_sum_and_nulls_are_absent() {
        let body = br#"{"usage":{"prompt_tokens":2,"completion_tokens":3}}"#;
        assert_eq!(whole(Framing::Json, body), Some(usage(2, 3, 5)));
        let body = br#"{"usage":{"prompt_tokens":2,"completion_tokens":null,"total_tokens":null}}"#;
        assert_eq!(whole(Framing::Json, body), Some(usage(2, 0, 2)));
        let body = br#"{"usage":{"prompt_tokens":2.0,"completion_tokens":3,"total_tokens":5}}"#;
        assert_eq!(whole(Framing::Json, body), Some(usage(2, 3, 5)));
        let body = br#"{"usage":{"prompt_tokens":18446744073709551615}}"#;
        assert_eq!(
            whole(Framing::Json, body),
            Some(usage(u64::MAX, 0, u64::MAX))
        );
        let body = br#"{"usage":{"prompt_tokens":18446744073709551615,"completion_tokens":1}}"#;
        assert_eq!(
            whole(Framing::Json, body),
            Some(usage(u64::MAX, 1, u64::MAX))
        );
    }

    #[test]
    fn json_invalid_usage_is_none() {
        for body in [
            &br#"{"usage":{"prompt_tokens":-1,"completion_tokens":3}}"#[..],
            br#"{"usage":{"prompt_tokens":"12","completion_tokens":3}}"#,
            br#"{"usage":{"prompt_tokens":1.5}}"#,
            br#"{"usage":{"prompt_tokens":1e30}}"#,
            br#"{"usage":{"prompt_tokens":1,"total_tokens":true}}"#,
            br#"{"usage":{}}"#,
            br#"{"usage":{"cached":3}}"#,
            br#"{"usage":"lots"}"#,
            br#"{"usage":[1,2]}"#,
            br#"{"usage":null}"#,
            br#"{"usage":null,"response":{"usage":null}}"#,
            br#"{"choices":[]}"#,
            br#"{"message":"the \"usage\": {\"prompt_tokens\":1} is in a string"}"#,
            br#"[{"usage":{"prompt_tokens":1}}]"#,
            br#"{"usage":{"prompt_tokens":1}"#, // unterminated
            br#"{"usage":{"prompt_tokens":1}}}"#.split_at(5).0,
            b"",
            b"   ",
            b"not json",
            b"{\"usage\":{\"prompt_tokens\":\"\xFF\"}}", // invalid UTF-8
        ] {
            assert_eq!(
                whole(Framing::Json, body),
                None,
                "{}",
                String::from_utf8_lossy(body)
            );
        }
    }

    #[test]
    fn json_leading_whitespace_bom_and_trailing_bytes() {
        let body = b"\xEF\xBB\xBF \r\n{\"usage\":{\"prompt_tokens\":1,\"completion_tokens\":2}}\n";
        assert_every_split(Framing::Json, MAX, body, Some(usage(1, 2, 3)));
        // Bytes after the object are not looked at.
        let body = br#"{"usage":{"prompt_tokens":1}} garbage {"usage":{"prompt_tokens":9}}"#;
        assert_eq!(whole(Framing::Json, body), Some(usage(1, 0, 1)));
    }

    #[test]
    fn json_only_top_level_members_count() {
        // Nested `usage` members and strings that look like names are not the usage.
        for body in [
            &br#"{"metadata":{"usage":{"prompt_tokens":5}}}"#[..],
            br#"{"stop":["usage",{"usage":{"prompt_tokens":5}}]}"#,
            br#"{"usage"  :  null , "response": [{"usage":{"prompt_tokens":5}}]}"#,
            br#"{"us\u0061ge":{"prompt_tokens":5}}"#,
        ] {
            assert_eq!(
                whole(Framing::Json, body),
                None,
                "{}",
                String::from_utf8_lossy(body)
            );
        }
        // The last of duplicate members counts, as in a `serde_json::Value`.
        let body =
            br#"{"usage":{"prompt_tokens":1},"x":[1,{"a":"}"}],"usage" : {"prompt_tokens":2}}"#;
        assert_every_split(Framing::Json, MAX, body, Some(usage(2, 0, 2)));
        let body = br#"{"stop":["usage"],"response":{"id":"r","usage":{"input_tokens":4,"output_tokens":1}}}"#;
        assert_every_split(Framing::Json, MAX, body, Some(usage(4, 1, 5)));
        // Escapes inside strings don't end them.
        let body = br#"{"content":"a \"usage\": {\\\"x","usage":{"total_tokens":7}}"#;
        assert_every_split(Framing::Json, MAX, body, Some(usage(0, 0, 7)));
    }

    #[test]
    fn json_oversize_is_none() {
        let body = br#"{"padding":"0123456789","usage":{"prompt_tokens":1,"completion_tokens":2}}"#;
        // Exactly the bound is fine; one byte less gives up.
        assert_every_split(Framing::Json, body.len(), body, Some(usage(1, 2, 3)));
        assert_every_split(Framing::Json, body.len() - 1, body, None);
        let mut p = UsageParser::new(Framing::Json, 16);
        p.feed(&body[..10]);
        assert!(!p.is_done());
        p.feed(&body[10..20]);
        assert!(p.is_done(), "gave up: nothing more to read");
        p.feed(&body[20..]);
        assert_eq!(p.finish(), None);
    }

    #[test]
    fn json_is_done_at_closing_brace() {
        let mut p = UsageParser::new(Framing::Json, MAX);
        p.feed(br#"{"usage":{"prompt_tokens":4,"completion_tokens":1}"#);
        assert!(!p.is_done());
        p.feed(b"}");
        assert!(p.is_done());
        assert_eq!(p.finish(), Some(usage(4, 1, 5)));
    }

    // ----- SSE

    #[test]
    fn sse_usage_in_final_chunk_every_split() {
        assert_every_split(
            Framing::Sse,
            MAX,
            CHAT_STREAM.as_bytes(),
            Some(usage(19, 10, 29)),
        );
        assert!(run(Framing::Sse, MAX, [CHAT_STREAM.as_bytes()]).1);
    }

    #[test]
    fn sse_null_usage_chunks_only_is_none() {
        let body = concat!(
            "data: {\"choices\":[{\"delta\":{\"content\":\"a\"}}],\"usage\":null}\n\n",
            "data: {\"choices\":[{\"delta\":{\"content\":\"b\"}}],\"usage\": null}\n\n",
            "data: [DONE]\n\n",
        );
        assert_every_split(Framing::Sse, MAX, body.as_bytes(), None);
    }

    #[test]
    fn sse_without_usage_is_none() {
        let body = "data: {\"choices\":[{\"delta\":{\"content\":\"usage\"}}]}\n\ndata: [DONE]\n\n";
        assert_eq!(run(Framing::Sse, MAX, [body.as_bytes()]), (None, true));
        assert_eq!(run(Framing::Sse, MAX, [&b""[..]]), (None, false));
    }

    #[test]
    fn sse_last_usage_wins() {
        let body = concat!(
            "data: {\"usage\":{\"prompt_tokens\":1,\"completion_tokens\":1}}\n\n",
            "data: {\"usage\":null}\n\n",
            "data: {\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":6,\"total_tokens\":11}}\n\n",
            "data: {\"usage\":{\"prompt_tokens\":-5}}\n\n", // invalid: ignored
            "data: {\"usage\":null}\n\n",
        );
        assert_every_split(Framing::Sse, MAX, body.as_bytes(), Some(usage(5, 6, 11)));
        assert!(!run(Framing::Sse, MAX, [body.as_bytes()]).1, "no [DONE]");
    }

    #[test]
    fn sse_responses_api_events() {
        let body = concat!(
            "event: response.created\n",
            "data: {\"type\":\"response.created\",\"response\":{\"id\":\"resp_1\",\"status\":\"in_progress\",\"usage\":null}}\n\n",
            "event: response.output_text.delta\n",
            "data: {\"type\":\"response.output_text.delta\",\"delta\":\"Hi\"}\n\n",
            "event: response.completed\n",
            "data: {\"type\":\"response.completed\",\"response\":{\"id\":\"resp_1\",\"status\":\"completed\",\"usage\":{\"input_tokens\":37,\"output_tokens\":11,\"total_tokens\":48}}}\n\n",
        );
        assert_every_split(Framing::Sse, MAX, body.as_bytes(), Some(usage(37, 11, 48)));
    }

    #[test]
    fn sse_crlf_and_cr_line_endings() {
        for eol in ["\r\n", "\r"] {
            let body = CHAT_STREAM.replace('\n', eol);
            assert_every_split(Framing::Sse, MAX, body.as_bytes(), Some(usage(19, 10, 29)));
            assert!(run(Framing::Sse, MAX, [body.as_bytes()]).1, "{eol:?}");
        }
        // Mixed within one stream.
        let body = "data: {\"usage\":null}\r\n\rdata: {\"usage\":{\"prompt_tokens\":2}}\n\r\ndata: [DONE]\r\r";
        assert_every_split(Framing::Sse, MAX, body.as_bytes(), Some(usage(2, 0, 2)));
        assert!(run(Framing::Sse, MAX, [body.as_bytes()]).1);
    }

    #[test]
    fn sse_cr_then_lf_is_one_line_end_not_a_blank_line() {
        // `\r\n` ends one line; were it two, the first data line would be dispatched alone.
        let body = "data: {\"usage\":\r\ndata: {\"prompt_tokens\":3}}\r\n\r\n";
        assert_every_split(Framing::Sse, MAX, body.as_bytes(), Some(usage(3, 0, 3)));
    }

    #[test]
    fn sse_multi_line_data_is_joined_with_newlines() {
        let body = concat!(
            "data: {\"id\":\"x\",\n",
            "data:\"usage\":\n",
            "data:   {\"prompt_tokens\":7,\n",
            "data: \"completion_tokens\":8}}\n",
            "\n",
        );
        assert_every_split(Framing::Sse, MAX, body.as_bytes(), Some(usage(7, 8, 15)));
        // Data lines joined with `\n` inside a string make invalid JSON: no usage.
        let body = "data: {\"a\":\"x\ndata: y\",\"usage\":{\"prompt_tokens\":1}}\n\n";
        assert_eq!(whole(Framing::Sse, body.as_bytes()), None);
    }

    #[test]
    fn sse_done_split_over_lines_and_with_spaces() {
        // `data:` without a space, and `[DONE]` after it.
        assert_eq!(
            run(Framing::Sse, MAX, [&b"data:[DONE]\n\n"[..]]),
            (None, true)
        );
        // Two spaces: the second is part of the value; still recognised.
        assert_eq!(
            run(Framing::Sse, MAX, [&b"data:  [DONE]\n\n"[..]]),
            (None, true)
        );
        // Not dispatched yet: not done.
        assert_eq!(
            run(Framing::Sse, MAX, [&b"data: [DONE]\n"[..]]),
            (None, false)
        );
        assert_eq!(
            run(Framing::Sse, MAX, [&b"data: [DONE]"[..]]),
            (None, false)
        );
        // Not exactly [DONE].
        assert_eq!(
            run(Framing::Sse, MAX, [&b"data: [DONE] now\n\n"[..]]),
            (None, false)
        );
    }

    #[test]
    fn sse_nothing_after_done_counts() {
        let body = "data: {\"usage\":{\"prompt_tokens\":1}}\n\ndata: [DONE]\n\ndata: {\"usage\":{\"prompt_tokens\":2}}\n\n";
        assert_every_split(Framing::Sse, MAX, body.as_bytes(), Some(usage(1, 0, 1)));
        let mut p = UsageParser::new(Framing::Sse, MAX);
        p.feed(b"data: [DONE]\n\n");
        assert!(p.is_done());
        p.feed(b"data: {\"usage\":{\"prompt_tokens\":2}}\n\n");
        assert_eq!(p.finish(), None);
    }

    #[test]
    fn sse_comments_and_other_fields_are_ignored() {
        let body = concat!(
            ": this is a comment with \"usage\": {\"prompt_tokens\":100}\n",
            ":\n",
            "event: message\n",
            "id: 42\n",
            "retry: 1000\n",
            "dat: {\"usage\":{\"prompt_tokens\":100}}\n",
            "datas: {\"usage\":{\"prompt_tokens\":100}}\n",
            "Data: {\"usage\":{\"prompt_tokens\":100}}\n",
            "data: {\"usage\":{\"prompt_tokens\":4,\"completion_tokens\":2}}\n",
            ": trailing comment\n",
            "\n",
            ": keep-alive\n\n",
            "event: ping\n\n",
        );
        assert_every_split(Framing::Sse, MAX, body.as_bytes(), Some(usage(4, 2, 6)));
    }

    #[test]
    fn sse_data_field_without_colon_is_an_empty_line_of_data() {
        // `data` alone adds an empty line: `{...}\n` still parses.
        let body = "data: {\"usage\":{\"prompt_tokens\":4}}\ndata\n\n";
        assert_every_split(Framing::Sse, MAX, body.as_bytes(), Some(usage(4, 0, 4)));
    }

    #[test]
    fn sse_incomplete_final_event_is_discarded() {
        let body = "data: {\"usage\":{\"prompt_tokens\":4}}\n";
        assert_eq!(whole(Framing::Sse, body.as_bytes()), None);
        let body = "data: {\"usage\":{\"prompt_tokens\":4}}";
        assert_eq!(whole(Framing::Sse, body.as_bytes()), None);
    }

    #[test]
    fn sse_leading_bom_is_stripped_once() {
        let body = "\u{feff}data: {\"usage\":{\"prompt_tokens\":4}}\n\n";
        assert_every_split(Framing::Sse, MAX, body.as_bytes(), Some(usage(4, 0, 4)));
        // A second BOM makes the first field name `\u{feff}data`: not data.
        let body = "\u{feff}\u{feff}data: {\"usage\":{\"prompt_tokens\":4}}\n\n";
        assert_every_split(Framing::Sse, MAX, body.as_bytes(), None);
        // A partial BOM is ordinary bytes (here it spoils the field name).
        let body = b"\xEF\xBBdata: {\"usage\":{\"prompt_tokens\":4}}\n\n";
        assert_every_split(Framing::Sse, MAX, body, None);
        let body = b"\xEF\n\ndata: {\"usage\":{\"prompt_tokens\":4}}\n\n";
        assert_every_split(Framing::Sse, MAX, body, Some(usage(4, 0, 4)));
    }

    #[test]
    fn sse_oversize_event_is_skipped_and_the_stream_goes_on() {
        let big = format!(
            "data: {{\"usage\":{{\"prompt_tokens\":999}},\"pad\":\"{}\"}}\n\n",
            "x".repeat(200)
        );
        let small = "data: {\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":1}}\n\n";
        let max = 100;
        assert!(small.len() < max);
        // The big event after the small one doesn't replace it...
        let body = format!("{small}{big}data: [DONE]\n\n");
        assert_every_split(Framing::Sse, max, body.as_bytes(), Some(usage(5, 1, 6)));
        assert!(run(Framing::Sse, max, [body.as_bytes()]).1);
        // ...and doesn't stop a later one being read.
        let body = format!("{big}{small}data: [DONE]\n\n");
        assert_every_split(Framing::Sse, max, body.as_bytes(), Some(usage(5, 1, 6)));
        // With room enough, the big one is read.
        let body = format!("{small}{big}");
        assert_eq!(
            run(Framing::Sse, MAX, [body.as_bytes()]).0,
            Some(usage(999, 0, 999))
        );
    }

    #[test]
    fn sse_oversize_multi_line_event_is_dropped_whole() {
        // Each line fits, the event doesn't: its first line must not be parsed alone.
        let body = "data: {\"usage\":{\"prompt_tokens\":1}}\ndata: \"0123456789012345678901234567890123456789\"\n\n";
        assert_every_split(Framing::Sse, 60, body.as_bytes(), None);
        assert_eq!(
            whole(Framing::Sse, body.as_bytes()),
            None,
            "invalid JSON anyway"
        );
    }

    #[test]
    fn sse_huge_comment_is_not_buffered() {
        let mut p = UsageParser::new(Framing::Sse, 64);
        p.feed(b": ");
        for _ in 0..1000 {
            p.feed(&[b'x'; 1000]);
        }
        p.feed(b"\ndata: {\"usage\":{\"prompt_tokens\":2}}\n\n");
        assert_eq!(p.finish(), Some(usage(2, 0, 2)));
    }

    #[test]
    fn never_buffers_more_than_the_bound() {
        for framing in [Framing::Json, Framing::Sse] {
            let mut p = UsageParser::new(framing, 1000);
            p.feed(b"data: {\"x\":\"");
            for _ in 0..100 {
                p.feed(&[b'y'; 97]);
                let held = match &p.state {
                    State::Json(s) => s.buf.capacity(),
                    State::Sse(s) => s.data.capacity(),
                };
                assert!(held <= 1000, "{framing:?}: {held}");
            }
        }
    }

    #[test]
    fn debug_does_not_dump_the_buffer() {
        let mut p = UsageParser::new(Framing::Json, MAX);
        p.feed(b"{\"secret\":\"hunter2\"");
        let debug = format!("{p:?}");
        assert!(debug.contains("UsageParser"));
        assert!(!debug.contains("hunter2"));
    }

    #[test]
    fn substring_search() {
        assert!(has_usage_object(b"{\"usage\" :\n {}"));
        assert!(has_usage_object(b"\"usage\":null,\"usage\":{"));
        assert!(!has_usage_object(b"{\"usage\":null}"));
        assert!(!has_usage_object(b"{\"usage\":"));
        assert!(!has_usage_object(b"\"usage\""));
        assert!(!has_usage_object(b"\"usages\":{"));
    }

    #[test]
    fn sse_one_line_events_with_every_line_end() {
        // The whole-event path: each line end, the blank line's `\r` at the chunk's end, an
        // event over the bound, `[DONE]` with spaces, and a stream going on after each.
        let usage_event = "data: {\"usage\":{\"prompt_tokens\":3}}";
        for eol in ["\n", "\r\n", "\r"] {
            for blank in ["\n", "\r\n", "\r"] {
                if eol == "\r" && blank == "\n" {
                    continue; // one `\r\n`, not a blank line
                }
                let body = format!(
                    "data: {{\"usage\":null}}{eol}{blank}{usage_event}{eol}{blank}data: {{\"x\":1}}{eol}{blank}"
                );
                assert_every_split(Framing::Sse, MAX, body.as_bytes(), Some(usage(3, 0, 3)));
                let body = format!("{usage_event}{eol}{blank}data:  [DONE] {eol}{blank}");
                assert_every_split(Framing::Sse, MAX, body.as_bytes(), Some(usage(3, 0, 3)));
                assert!(run(Framing::Sse, MAX, [body.as_bytes()]).1);
                // Over the bound (the data and its newline): dropped, and the next is read.
                let max = usage_event.len() - "data: ".len() + 1;
                let big = "data: {\"usage\":{\"prompt_tokens\":30}}";
                let body = format!("{big}{eol}{blank}{usage_event}{eol}{blank}");
                assert_every_split(Framing::Sse, max, body.as_bytes(), Some(usage(3, 0, 3)));
                assert_every_split(Framing::Sse, max - 1, body.as_bytes(), None);
            }
        }
        // One chunk, many events; a `\n` of a `\r\n` left for the next chunk.
        let mut p = UsageParser::new(Framing::Sse, MAX);
        p.feed(b"data: {\"usage\":null}\n\ndata: {\"usage\":{\"prompt_tokens\":1}}\r\n\r");
        p.feed(b"\ndata: {\"usage\":null}\n\n: c\n\ndata: {\"usage\":{\"prompt_tokens\":2}}\n\n");
        assert_eq!(p.finish(), Some(usage(2, 0, 2)));
        // A line over the bound drops its event, even when the next line starts a chunk.
        let mut p = UsageParser::new(Framing::Sse, 40);
        p.feed(b"data: 0123456789012345678901234567890123456789\n");
        p.feed(b"data: {\"usage\":{\"prompt_tokens\":1}}\n\n");
        assert_eq!(p.finish(), None);
        // A data line then another line (not blank): not a one-line event.
        let body = "data: {\"usage\":\ndata: {\"prompt_tokens\":4}}\n\n";
        assert_every_split(Framing::Sse, MAX, body.as_bytes(), Some(usage(4, 0, 4)));
        let body = "data: {\"usage\":{\"prompt_tokens\":4}}\nevent: x\n\n";
        assert_every_split(Framing::Sse, MAX, body.as_bytes(), Some(usage(4, 0, 4)));
    }

    // ----- properties

    /// The SSE rules written plainly, line by line, for the parser to be checked against.
    fn sse_reference(body: &[u8], max: usize) -> (Option<Usage>, bool) {
        let body = body.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(body);
        let mut lines = Vec::new();
        let mut start = 0;
        let mut i = 0;
        while i < body.len() {
            match body[i] {
                b'\n' => {}
                b'\r' if body.get(i + 1) == Some(&b'\n') => {
                    lines.push(&body[start..i]);
                    i += 2;
                    start = i;
                    continue;
                }
                b'\r' => {}
                _ => {
                    i += 1;
                    continue;
                }
            }
            lines.push(&body[start..i]);
            i += 1;
            start = i;
        }
        // (An unterminated last line, or a `\r` waiting for its `\n`, ends nothing.)
        let (mut found, mut data) = (None, Vec::new());
        for line in lines {
            if line.is_empty() {
                if !data.is_empty() && data.len() <= max {
                    data.pop();
                    if data.trim_ascii() == b"[DONE]" {
                        return (found, true);
                    }
                    found = usage_in(&data).or(found);
                }
                data.clear();
                continue;
            }
            let (name, value) = match line.iter().position(|&b| b == b':') {
                Some(colon) => {
                    let value = &line[colon + 1..];
                    (&line[..colon], value.strip_prefix(b" ").unwrap_or(value))
                }
                None => (line, &b""[..]),
            };
            if name == b"data" {
                data.extend_from_slice(value);
                data.push(b'\n');
            }
        }
        (found, false)
    }

    /// `has_usage_object` without the SIMD search or the skipping.
    fn has_usage_object_naive(hay: &[u8]) -> bool {
        (0..hay.len()).any(|i| {
            hay[i..].starts_with(KEY) && {
                let rest = hay[i + KEY.len()..].trim_ascii_start();
                rest.strip_prefix(b":")
                    .is_some_and(|r| r.trim_ascii_start().first() == Some(&b'{'))
            }
        })
    }

    /// Splits `body` at the given points (taken modulo its length).
    fn chunked<'a>(body: &'a [u8], cuts: &[usize]) -> Vec<&'a [u8]> {
        let mut points: Vec<usize> = cuts.iter().map(|c| c % (body.len() + 1)).collect();
        points.sort_unstable();
        let mut chunks = Vec::new();
        let mut from = 0;
        for p in points {
            chunks.push(&body[from..p]);
            from = p;
        }
        chunks.push(&body[from..]);
        chunks
    }

    /// Bytes likely to exercise the parsers: SSE and JSON syntax mixed with noise.
    fn noisy_body() -> impl Strategy<Value = Vec<u8>> {
        let piece = prop_oneof![
            3 => prop::collection::vec(any::<u8>(), 0..8),
            1 => Just(b"data:".to_vec()),
            1 => Just(b"data: ".to_vec()),
            1 => Just(b"data".to_vec()),
            2 => Just(b"\n".to_vec()),
            1 => Just(b"\r".to_vec()),
            1 => Just(b"\r\n".to_vec()),
            1 => Just(b":".to_vec()),
            1 => Just(b"[DONE]".to_vec()),
            1 => Just(b"\xEF\xBB\xBF".to_vec()),
            1 => Just(b"{".to_vec()),
            1 => Just(b"}".to_vec()),
            1 => Just(b"\"".to_vec()),
            1 => Just(b"\\".to_vec()),
            1 => Just(b"\"usage\":".to_vec()),
            1 => Just(b"{\"usage\":{\"prompt_tokens\":1,\"completion_tokens\":2}}".to_vec()),
            1 => Just(b"{\"response\":{\"usage\":{\"input_tokens\":3}}}".to_vec()),
            1 => Just(b"null".to_vec()),
            1 => Just(b"\n\n".to_vec()),
            1 => Just(b"\r\n\r\n".to_vec()),
            1 => Just(b" ".to_vec()),
            1 => Just(b"data: [DONE]\n\n".to_vec()),
            1 => Just(b"data: {\"usage\":null}\n\n".to_vec()),
            1 => Just(b"\"usage\"usage\": {}".to_vec()),
        ];
        prop::collection::vec(piece, 0..40).prop_map(|pieces| pieces.concat())
    }

    fn framing() -> impl Strategy<Value = Framing> {
        prop_oneof![Just(Framing::Json), Just(Framing::Sse)]
    }

    /// A valid stream: `usage: null` chunks, comments and other fields, the usage (in chat or
    /// Responses shape, maybe over several data lines), then maybe `[DONE]`; with random line
    /// endings.
    fn sse_stream() -> impl Strategy<Value = (Vec<u8>, Usage)> {
        (
            any::<u64>(),
            any::<u64>(),
            prop::option::of(any::<u64>()),
            0usize..4,
            any::<bool>(),
            any::<bool>(),
            prop::collection::vec(0usize..3, 32),
            any::<bool>(),
        )
            .prop_map(
                |(input, output, total, nulls, responses, done, eols, multi_line)| {
                    let mut eols = eols.into_iter().cycle();
                    let mut out = Vec::new();
                    let mut line = |out: &mut Vec<u8>, text: &str| {
                        let mut eol = [&b"\n"[..], b"\r\n", b"\r"][eols.next().unwrap_or(0)];
                        // `\r` then a blank line ended by `\n` would be one `\r\n`.
                        if text.is_empty() && eol == b"\n" && out.last() == Some(&b'\r') {
                            eol = b"\r";
                        }
                        out.extend_from_slice(text.as_bytes());
                        out.extend_from_slice(eol);
                    };
                    for i in 0..nulls {
                        if i % 2 == 0 {
                            line(&mut out, ": keep-alive");
                        }
                        line(&mut out, "event: chunk");
                        line(
                            &mut out,
                            &format!(
                                "data: {{\"choices\":[{{\"delta\":{{\"content\":\"t{i}\"}}}}],\"usage\":null}}"
                            ),
                        );
                        line(&mut out, "");
                    }
                    let (input_key, output_key) = if responses {
                        ("input_tokens", "output_tokens")
                    } else {
                        ("prompt_tokens", "completion_tokens")
                    };
                    let total_field = total
                        .map(|t| format!(",\"total_tokens\":{t}"))
                        .unwrap_or_default();
                    let usage_json = format!(
                        "{{\"{input_key}\":{input},\n\"{output_key}\":{output}{total_field}}}"
                    );
                    let event = if responses {
                        format!("{{\"type\":\"response.completed\",\"response\":{{\"usage\":{usage_json}}}}}")
                    } else {
                        format!("{{\"choices\":[],\"usage\":{usage_json}}}")
                    };
                    if multi_line {
                        for part in event.split('\n') {
                            line(&mut out, &format!("data: {part}"));
                        }
                    } else {
                        line(&mut out, &format!("data:{}", event.replace('\n', " ")));
                    }
                    line(&mut out, "");
                    if done {
                        line(&mut out, "data: [DONE]");
                        line(&mut out, "");
                    }
                    let expected = Usage {
                        input_tokens: input,
                        output_tokens: output,
                        total_tokens: total.unwrap_or(input.saturating_add(output)),
                    };
                    (out, expected)
                },
            )
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic_and_chunking_never_matters(
            framing in framing(),
            body in noisy_body(),
            cuts in prop::collection::vec(any::<usize>(), 0..12),
            max in prop_oneof![0usize..64, Just(MAX)],
        ) {
            let whole = run(framing, max, [&body[..]]);
            prop_assert_eq!(run(framing, max, chunked(&body, &cuts)), whole);
            prop_assert_eq!(run(framing, max, body.chunks(1)), whole);
        }

        #[test]
        fn sse_matches_the_reference(
            body in noisy_body(),
            cuts in prop::collection::vec(any::<usize>(), 0..12),
            max in prop_oneof![0usize..64, Just(MAX)],
        ) {
            let expected = sse_reference(&body, max);
            prop_assert_eq!(run(Framing::Sse, max, [&body[..]]), expected);
            prop_assert_eq!(run(Framing::Sse, max, chunked(&body, &cuts)), expected);
        }

        #[test]
        fn sse_streams_match_the_reference(
            (body, _) in sse_stream(),
            cuts in prop::collection::vec(any::<usize>(), 0..16),
        ) {
            let expected = sse_reference(&body, MAX);
            prop_assert_eq!(run(Framing::Sse, MAX, chunked(&body, &cuts)), expected);
        }

        #[test]
        fn usage_object_search_matches_the_naive_one(body in noisy_body()) {
            prop_assert_eq!(has_usage_object(&body), has_usage_object_naive(&body));
        }

        #[test]
        fn random_bytes_never_panic(
            framing in framing(),
            body in prop::collection::vec(any::<u8>(), 0..512),
            cuts in prop::collection::vec(any::<usize>(), 0..12),
        ) {
            let whole = run(framing, MAX, [&body[..]]);
            prop_assert_eq!(run(framing, MAX, chunked(&body, &cuts)), whole);
        }

        #[test]
        fn valid_sse_streams_give_the_same_usage_however_chunked(
            (body, expected) in sse_stream(),
            cuts in prop::collection::vec(any::<usize>(), 0..16),
        ) {
            let (found, _) = run(Framing::Sse, MAX, [&body[..]]);
            prop_assert_eq!(found, Some(expected));
            prop_assert_eq!(run(Framing::Sse, MAX, chunked(&body, &cuts)).0, Some(expected));
            prop_assert_eq!(run(Framing::Sse, MAX, body.chunks(1)).0, Some(expected));
        }

        #[test]
        fn valid_json_bodies_give_the_same_usage_however_chunked(
            input in any::<u64>(),
            output in any::<u64>(),
            total in any::<u64>(),
            pad in "[a-z \\\\\"{}\\[\\]]{0,40}",
            cuts in prop::collection::vec(any::<usize>(), 0..16),
        ) {
            let body = serde_json::json!({
                "id": pad,
                "choices": [{"message": {"content": pad}}],
                "usage": {"prompt_tokens": input, "completion_tokens": output, "total_tokens": total},
            })
            .to_string();
            let expected = Some(usage(input, output, total));
            let whole = run(Framing::Json, MAX, [body.as_bytes()]);
            prop_assert_eq!(whole, (expected, true));
            prop_assert_eq!(run(Framing::Json, MAX, chunked(body.as_bytes(), &cuts)), whole);
        }
    }
}
