//! The parser behind [`Json::parse`](super::Json::parse), and the byte searches it shares
//! with the estimator and the usage watch.

use std::borrow::Cow;
use std::fmt;

use serde_json::Number;

use super::{decode_escape, Json, Object, Str};

/// Why a body is not JSON: what was expected, and where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct JsonError {
    what: &'static str,
    line: usize,
    column: usize,
}

impl fmt::Display for JsonError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} at line {} column {}",
            self.what, self.line, self.column
        )
    }
}

impl std::error::Error for JsonError {}

/// The error for a raw control character in a string.
const CONTROL: &str = "control character (\\u0000-\\u001F) found while parsing a string";

/// Nesting deeper than this is refused (as serde_json does), so parsing can't exhaust the
/// stack.
const MAX_DEPTH: usize = 127;

/// A JSON parser (RFC 8259) into [`Json`], borrowing every string without escapes. Strings,
/// most of an LLM request's bytes, are skipped with a search for their closing quote and
/// checked for control characters in one pass; the body is validated as UTF-8 once.
struct Parser<'a> {
    bytes: &'a [u8],
    /// `bytes`, when they are UTF-8.
    text: Option<&'a str>,
    /// Whether `bytes` has a control character (a line break, say) anywhere.
    controls: bool,
    at: usize,
    depth: usize,
}

impl<'a> Parser<'a> {
    fn error(&self, what: &'static str) -> JsonError {
        let at = self.at.min(self.bytes.len());
        let before = &self.bytes[..at];
        let line = before.iter().filter(|&&b| b == b'\n').count() + 1;
        let column = at
            - before
                .iter()
                .rposition(|&b| b == b'\n')
                .map_or(0, |p| p + 1)
            + 1;
        JsonError { what, line, column }
    }

    #[inline]
    fn skip_ws(&mut self) {
        while let Some(b' ' | b'\t' | b'\n' | b'\r') = self.bytes.get(self.at) {
            self.at += 1;
        }
    }

    #[inline]
    fn peek(&self) -> Option<u8> {
        self.bytes.get(self.at).copied()
    }

    fn value(&mut self) -> Result<Json<'a>, JsonError> {
        self.skip_ws();
        match self.peek() {
            None => Err(self.error("EOF while parsing a value")),
            Some(b'"') => {
                self.at += 1;
                self.string().map(Json::String)
            }
            Some(b'{') => self.nested(Self::object),
            Some(b'[') => self.nested(Self::array),
            Some(b't') => self.literal(b"true", Json::Bool(true)),
            Some(b'f') => self.literal(b"false", Json::Bool(false)),
            Some(b'n') => self.literal(b"null", Json::Null),
            Some(b'-' | b'0'..=b'9') => self.number(),
            Some(_) => Err(self.error("expected value")),
        }
    }

    fn nested(
        &mut self,
        f: fn(&mut Self) -> Result<Json<'a>, JsonError>,
    ) -> Result<Json<'a>, JsonError> {
        self.depth += 1;
        if self.depth > MAX_DEPTH {
            return Err(self.error("recursion limit exceeded"));
        }
        self.at += 1;
        let v = f(self);
        self.depth -= 1;
        v
    }

    fn literal(&mut self, word: &[u8], v: Json<'a>) -> Result<Json<'a>, JsonError> {
        if self.bytes[self.at..].starts_with(word) {
            self.at += word.len();
            Ok(v)
        } else {
            Err(self.error("expected value"))
        }
    }

    fn array(&mut self) -> Result<Json<'a>, JsonError> {
        let mut items = Vec::new();
        self.skip_ws();
        if self.peek() == Some(b']') {
            self.at += 1;
            return Ok(Json::Array(items));
        }
        loop {
            items.push(self.value()?);
            self.skip_ws();
            match self.peek() {
                Some(b',') => self.at += 1,
                Some(b']') => {
                    self.at += 1;
                    return Ok(Json::Array(items));
                }
                None => return Err(self.error("EOF while parsing a list")),
                Some(_) => return Err(self.error("expected `,` or `]`")),
            }
        }
    }

    fn object(&mut self) -> Result<Json<'a>, JsonError> {
        // A request's top-level object usually has 4-10 members (model, messages, limits,
        // options): room for 8 at once saves the reallocation at the fifth.
        let mut members = if self.depth == 1 {
            Vec::with_capacity(8)
        } else {
            Vec::new()
        };
        self.members(|key, value| members.push((key, value)))?;
        Ok(Json::Object(Object(members)))
    }

    /// The members of an object whose opening brace was consumed, handed to `member` in
    /// document order (duplicates included), through its closing brace.
    #[inline(always)]
    fn members(&mut self, mut member: impl FnMut(Cow<'a, str>, Json<'a>)) -> Result<(), JsonError> {
        self.skip_ws();
        if self.peek() == Some(b'}') {
            self.at += 1;
            return Ok(());
        }
        loop {
            self.skip_ws();
            match self.peek() {
                Some(b'"') => self.at += 1,
                None => return Err(self.error("EOF while parsing an object")),
                Some(_) => return Err(self.error("key must be a string")),
            }
            let key = self.key()?;
            self.skip_ws();
            match self.peek() {
                Some(b':') => self.at += 1,
                None => return Err(self.error("EOF while parsing an object")),
                Some(_) => return Err(self.error("expected `:`")),
            }
            member(key, self.value()?);
            self.skip_ws();
            match self.peek() {
                Some(b',') => self.at += 1,
                Some(b'}') => {
                    self.at += 1;
                    return Ok(());
                }
                None => return Err(self.error("EOF while parsing an object")),
                Some(_) => return Err(self.error("expected `,` or `}`")),
            }
        }
    }

    /// The rest of a string value whose opening quote was consumed, checked but not
    /// decoded: a search hops from escape to escape to the closing quote (in registers over
    /// the next 16 bytes, then SIMD), each escape is checked, and the whole string is checked
    /// in one pass (no control characters; valid UTF-8 if the body as a whole isn't).
    fn string(&mut self) -> Result<Str<'a>, JsonError> {
        let bytes: &'a [u8] = self.bytes;
        let start = self.at;
        let mut escaped = false;
        let mut i = start;
        let end = loop {
            let Some(found) = find_quote_or_backslash(&bytes[i..]) else {
                self.at = bytes.len();
                return Err(self.error("EOF while parsing a string"));
            };
            let at = i + found;
            if bytes[at] == b'"' {
                break at;
            }
            escaped = true;
            let rest = &bytes[at + 1..];
            let len = match rest.first() {
                Some(&e) if ONE_CHAR_ESCAPES[usize::from(e)] => Some(1),
                _ => decode_escape(rest).map(|(_, len)| len),
            };
            match len {
                Some(len) => i = at + 1 + len,
                None => {
                    self.at = at + 1;
                    return Err(self.error(if rest.is_empty() {
                        "EOF while parsing a string"
                    } else {
                        "invalid escape"
                    }));
                }
            }
        };
        let text = self.check_plain(start, end)?;
        self.at = end + 1;
        Ok(Str { text, escaped })
    }

    /// A member name, decoded (names are short; lookups compare decoded names).
    fn key(&mut self) -> Result<Cow<'a, str>, JsonError> {
        Ok(self.string()?.decoded())
    }

    /// `bytes[from..to]` is string text: no control characters, valid UTF-8 (known when the
    /// whole body is).
    #[inline]
    fn check_plain(&mut self, from: usize, to: usize) -> Result<&'a str, JsonError> {
        let text: &'a [u8] = &self.bytes[from..to];
        // Without an early exit, so that it compiles to vector compares.
        if self.controls && text.iter().fold(u8::MAX, |min, &b| min.min(b)) < 0x20 {
            self.at = from + text.iter().position(|&b| b < 0x20).unwrap_or(0);
            return Err(self.error(CONTROL));
        }
        // Between two quotes: on character boundaries.
        if let Some(text) = self.text.and_then(|t| t.get(from..to)) {
            return Ok(text);
        }
        std::str::from_utf8(text).map_err(|e| {
            self.at = from + e.valid_up_to();
            self.error("invalid unicode code point")
        })
    }

    fn number(&mut self) -> Result<Json<'a>, JsonError> {
        let start = self.at;
        let negative = self.peek() == Some(b'-');
        if negative {
            self.at += 1;
        }
        match self.peek() {
            Some(b'0') => self.at += 1,
            Some(b'1'..=b'9') => self.digits(),
            _ => return Err(self.error("invalid number")),
        }
        let mut integer = true;
        if self.peek() == Some(b'.') {
            integer = false;
            self.at += 1;
            if !matches!(self.peek(), Some(b'0'..=b'9')) {
                return Err(self.error("invalid number"));
            }
            self.digits();
        }
        if let Some(b'e' | b'E') = self.peek() {
            integer = false;
            self.at += 1;
            if let Some(b'+' | b'-') = self.peek() {
                self.at += 1;
            }
            if !matches!(self.peek(), Some(b'0'..=b'9')) {
                return Err(self.error("invalid number"));
            }
            self.digits();
        }
        let written = &self.bytes[start..self.at];
        if integer && !negative && written.len() <= 19 {
            // Up to 19 digits always fit a u64 (the usual case: counts, limits, ids).
            let n = written
                .iter()
                .fold(0u64, |n, d| n * 10 + u64::from(d - b'0'));
            return Ok(Json::Number(n.into()));
        }
        // Only ASCII digits, signs, dots and exponents were consumed.
        let text = std::str::from_utf8(written).unwrap_or("");
        if integer {
            // Like serde_json: a u64 if it fits, else an i64, else a float.
            if let Ok(n) = text.parse::<u64>() {
                return Ok(Json::Number(n.into()));
            }
            if let Ok(n) = text.parse::<i64>() {
                return Ok(Json::Number(n.into()));
            }
        }
        match text.parse::<f64>().ok().and_then(Number::from_f64) {
            Some(n) => Ok(Json::Number(n)),
            None => Err(self.error("number out of range")),
        }
    }

    #[inline]
    fn digits(&mut self) {
        while let Some(b'0'..=b'9') = self.peek() {
            self.at += 1;
        }
    }
}

/// Whether a backslash then this byte is a one-character escape (`\n`, `\"`, ...).
static ONE_CHAR_ESCAPES: [bool; 256] = {
    let mut table = [false; 256];
    let mut i = 0;
    while i < 8 {
        table[b"\"\\/bfnrt"[i] as usize] = true;
        i += 1;
    }
    table
};

/// The position of the first quote or backslash in `text`.
#[inline]
pub(crate) fn find_quote_or_backslash(text: &[u8]) -> Option<usize> {
    find_near(
        text,
        |word| has_byte(word, b'"') | has_byte(word, b'\\'),
        |rest| memchr::memchr2(b'"', b'\\', rest),
    )
}

/// The high bit of each byte of `word` equal to `byte`, and maybe of bytes above one (a
/// borrow): the lowest set bit is exact. For bytes below 0x80 only.
#[inline]
pub(crate) fn has_byte(word: u64, byte: u8) -> u64 {
    const LO: u64 = u64::from_le_bytes([0x01; 8]);
    const HI: u64 = u64::from_le_bytes([0x80; 8]);
    let x = word ^ (LO * u64::from(byte));
    x.wrapping_sub(LO) & !word & HI
}

/// The position of the first byte `hits` marks in `text` (see [`has_byte`]). Escapes come
/// every few bytes in pasted code and JSON: the next 16 bytes are tested 8 at a time in
/// registers, and only a longer run goes to `search`, a SIMD search (a call, worth it on long
/// runs).
#[inline]
pub(crate) fn find_near(
    text: &[u8],
    hits: impl Fn(u64) -> u64,
    search: impl FnOnce(&[u8]) -> Option<usize>,
) -> Option<usize> {
    let mut at = 0;
    while at < 16 {
        let Some(word) = text.get(at..at + 8) else {
            break;
        };
        let found = hits(u64::from_le_bytes(word.try_into().unwrap_or_default()));
        if found != 0 {
            return Some(at + (found.trailing_zeros() / 8) as usize);
        }
        at += 8;
    }
    search(&text[at..]).map(|p| at + p)
}

/// [`Json::parse`].
#[inline]
pub(super) fn parse(bytes: &[u8]) -> Result<Json<'_>, JsonError> {
    let mut p = Parser::new(bytes);
    let v = p.value()?;
    p.end()?;
    Ok(v)
}

/// [`Json::parse_members`].
#[inline]
pub(super) fn parse_members<'a>(
    bytes: &'a [u8],
    member: impl FnMut(Cow<'a, str>, Json<'a>),
) -> Result<Option<Json<'a>>, JsonError> {
    let mut p = Parser::new(bytes);
    p.skip_ws();
    let v = if p.peek() == Some(b'{') {
        // As `nested` would: the object is at depth 1.
        p.depth = 1;
        p.at += 1;
        p.members(member)?;
        p.depth = 0;
        None
    } else {
        Some(p.value()?)
    };
    p.end()?;
    Ok(v)
}

impl<'a> Parser<'a> {
    #[inline]
    fn new(bytes: &'a [u8]) -> Self {
        Parser {
            bytes,
            // Checked once for the whole body (a fast loop on ASCII), instead of string by
            // string; a body that isn't UTF-8 (an error, or one in a string) is checked
            // string by string, to report the same error at the same place.
            text: std::str::from_utf8(bytes).ok(),
            // Compact JSON has no control characters at all (not even line breaks): its
            // strings needn't be checked one by one.
            controls: bytes.iter().fold(u8::MAX, |min, &b| min.min(b)) < 0x20,
            at: 0,
            depth: 0,
        }
    }

    /// Nothing but whitespace is left after the value.
    #[inline]
    fn end(&mut self) -> Result<(), JsonError> {
        self.skip_ws();
        if self.at < self.bytes.len() {
            return Err(self.error("trailing characters"));
        }
        Ok(())
    }
}
