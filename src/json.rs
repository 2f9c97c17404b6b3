//! A JSON document borrowed from the request body: what the layer parses a body into, once
//! per request, for the estimators and extractors that read it.
//!
//! Nothing is copied that needn't be: string values stay in the body's bytes as written
//! ([`Str`], decoded only when asked; the token heuristic reads escapes on the fly), member
//! names are decoded (they are short), and objects are flat lists of members instead of trees
//! of nodes. The parser is this module's own: strings (most of an LLM request's bytes) are
//! crossed with a search from escape to escape and checked in one pass for control
//! characters; the body is checked as UTF-8 once, as a whole. It accepts exactly what `serde_json::from_slice` accepts, with
//! the same values and nesting limit (tested against it on generated inputs).
//! [`RequestView::json`](crate::key::RequestView::json) still gives a `serde_json::Value`,
//! parsed from the same bytes the first time it is asked for.

use std::borrow::Cow;
use std::fmt;

use serde_json::{Number, Value};

/// A JSON value whose strings may borrow from the parsed bytes.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Json<'a> {
    Null,
    Bool(bool),
    Number(Number),
    String(Str<'a>),
    Array(Vec<Json<'a>>),
    Object(Object<'a>),
}

/// A JSON object: its members in document order, duplicates kept (lookups see the last, as
/// a `serde_json::Value` would).
#[derive(Debug, Clone, PartialEq, Default)]
pub(crate) struct Object<'a>(Vec<(Cow<'a, str>, Json<'a>)>);

impl<'a> Object<'a> {
    /// The value of member `key` (the last one, if it is repeated).
    pub(crate) fn get(&self, key: &str) -> Option<&Json<'a>> {
        self.0.iter().rev().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    /// The members, without the ones a later duplicate overrides, in document order.
    pub(crate) fn iter(&self) -> impl Iterator<Item = (&str, &Json<'a>)> {
        self.0
            .iter()
            .enumerate()
            .filter(|(i, (k, _))| !self.0[i + 1..].iter().any(|(later, _)| later == k))
            .map(|(_, (k, v))| (&**k, v))
    }

    /// The members sorted by name, without overridden duplicates: the order in which a
    /// `serde_json::Value` (a sorted map) would serialize them.
    pub(crate) fn sorted(&self) -> Vec<(&str, &Json<'a>)> {
        let mut members: Vec<_> = self.iter().collect();
        members.sort_by(|a, b| a.0.cmp(b.0));
        members
    }
}

/// A string value as written in the body: borrowed, checked (valid UTF-8, no control
/// characters, valid escapes), and decoded only when asked. Prompts are most of a request's
/// bytes and often full of escapes (`\n`, `\"` in pasted code or JSON); the estimate reads
/// them through [`Str::feed`] without a decoded copy.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Str<'a> {
    /// The text between the quotes, escapes as written when `escaped`.
    text: &'a str,
    escaped: bool,
}

impl<'a> Str<'a> {
    /// A string without escapes.
    pub(crate) const fn plain(text: &'a str) -> Self {
        Self {
            text,
            escaped: false,
        }
    }

    /// The decoded text (a copy only when the string has escapes).
    pub(crate) fn decoded(&self) -> Cow<'a, str> {
        if !self.escaped {
            return Cow::Borrowed(self.text);
        }
        let mut out = String::with_capacity(self.text.len());
        self.feed(|piece| out.push_str(piece));
        Cow::Owned(out)
    }

    /// Hands the decoded text to `f` in pieces: the runs between escapes, and each escape's
    /// character.
    pub(crate) fn feed(&self, mut f: impl FnMut(&str)) {
        if !self.escaped {
            f(self.text);
            return;
        }
        let mut rest = self.text;
        while let Some(slash) = memchr::memchr(b'\\', rest.as_bytes()) {
            // Escapes are ASCII: these are character boundaries.
            if slash > 0 {
                f(&rest[..slash]);
            }
            let (c, len) = decode_escape(&rest.as_bytes()[slash + 1..]).unwrap_or(('\u{fffd}', 1));
            f(c.encode_utf8(&mut [0; 4]));
            rest = &rest[slash + 1 + len..];
        }
        if !rest.is_empty() {
            f(rest);
        }
    }

    /// Whether the decoded text is empty.
    pub(crate) fn is_empty(&self) -> bool {
        self.text.is_empty()
    }

    /// The text as written (escapes included when `escaped`), and whether it has escapes.
    pub(crate) fn written(&self) -> (&'a str, bool) {
        (self.text, self.escaped)
    }

    /// The length as written, escapes included: at least the decoded length.
    pub(crate) fn written_len(&self) -> usize {
        self.text.len()
    }
}

impl PartialEq for Str<'_> {
    fn eq(&self, other: &Self) -> bool {
        self.decoded() == other.decoded()
    }
}

/// The character of the escape whose backslash precedes `rest`, and how many bytes of
/// `rest` it takes; `None` if it isn't a valid escape (a lone surrogate included).
pub(crate) fn decode_escape(rest: &[u8]) -> Option<(char, usize)> {
    let hex4 = |b: &[u8]| -> Option<u32> {
        let digits = b.get(..4)?;
        digits
            .iter()
            .try_fold(0u32, |n, &d| Some(n * 16 + char::from(d).to_digit(16)?))
    };
    Some(match rest.first()? {
        b'"' => ('"', 1),
        b'\\' => ('\\', 1),
        b'/' => ('/', 1),
        b'b' => ('\u{8}', 1),
        b'f' => ('\u{c}', 1),
        b'n' => ('\n', 1),
        b'r' => ('\r', 1),
        b't' => ('\t', 1),
        b'u' => {
            let hi = hex4(&rest[1..])?;
            if (0xD800..0xDC00).contains(&hi) {
                // A surrogate pair: `\uD83D\uDE00`.
                if rest.get(5..7)? != b"\\u" {
                    return None;
                }
                let lo = hex4(&rest[7..])?;
                if !(0xDC00..0xE000).contains(&lo) {
                    return None;
                }
                (
                    char::from_u32(0x10000 + ((hi - 0xD800) << 10) + (lo - 0xDC00))?,
                    11,
                )
            } else {
                (char::from_u32(hi)?, 5)
            }
        }
        _ => return None,
    })
}

impl<'a> Json<'a> {
    /// Parses `bytes` (one JSON value, whitespace around it allowed): what
    /// `serde_json::from_slice` accepts, into the same value.
    pub(crate) fn parse(bytes: &'a [u8]) -> Result<Self, JsonError> {
        let mut p = Parser {
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
        };
        let v = p.value()?;
        p.skip_ws();
        if p.at < bytes.len() {
            return Err(p.error("trailing characters"));
        }
        Ok(v)
    }

    /// The same document, borrowing the strings of a `serde_json::Value`.
    pub(crate) fn from_value(v: &'a Value) -> Self {
        match v {
            Value::Null => Self::Null,
            Value::Bool(b) => Self::Bool(*b),
            Value::Number(n) => Self::Number(n.clone()),
            Value::String(s) => Self::String(Str::plain(s)),
            Value::Array(items) => Self::Array(items.iter().map(Self::from_value).collect()),
            Value::Object(fields) => Self::Object(Object(
                fields
                    .iter()
                    .map(|(k, v)| (Cow::Borrowed(k.as_str()), Self::from_value(v)))
                    .collect(),
            )),
        }
    }

    /// The value of member `key` of an object.
    pub(crate) fn get(&self, key: &str) -> Option<&Json<'a>> {
        self.as_object()?.get(key)
    }

    pub(crate) fn as_object(&self) -> Option<&Object<'a>> {
        match self {
            Self::Object(o) => Some(o),
            _ => None,
        }
    }

    /// The decoded text of a string (a copy only if it has escapes).
    pub(crate) fn as_str(&self) -> Option<Cow<'a, str>> {
        match self {
            Self::String(s) => Some(s.decoded()),
            _ => None,
        }
    }

    pub(crate) fn as_u64(&self) -> Option<u64> {
        match self {
            Self::Number(n) => n.as_u64(),
            _ => None,
        }
    }

    pub(crate) fn is_u64(&self) -> bool {
        self.as_u64().is_some()
    }

    /// The value at a JSON pointer (RFC 6901), like [`Value::pointer`].
    pub(crate) fn pointer(&self, pointer: &str) -> Option<&Json<'a>> {
        if pointer.is_empty() {
            return Some(self);
        }
        let rest = pointer.strip_prefix('/')?;
        rest.split('/').try_fold(self, |target, token| {
            // Unescaped only when it has an escape: a lookup allocates nothing in the usual case.
            let token: Cow<'_, str> = if token.contains('~') {
                Cow::Owned(token.replace("~1", "/").replace("~0", "~"))
            } else {
                Cow::Borrowed(token)
            };
            match target {
                Self::Object(o) => o.get(&token),
                Self::Array(items) => {
                    // Like `Value::pointer`: a decimal index without a leading `+` or zero.
                    if token.starts_with('+') || (token.starts_with('0') && token.len() != 1) {
                        return None;
                    }
                    items.get(token.parse::<usize>().ok()?)
                }
                _ => None,
            }
        })
    }
}

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
        self.skip_ws();
        if self.peek() == Some(b'}') {
            self.at += 1;
            return Ok(Json::Object(Object(members)));
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
            members.push((key, self.value()?));
            self.skip_ws();
            match self.peek() {
                Some(b',') => self.at += 1,
                Some(b'}') => {
                    self.at += 1;
                    return Ok(Json::Object(Object(members)));
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_like_serde_json_value() {
        let text = br#"{"a":"x","b":[1,-2,3.5,true,null],"c":{"d":"e\"scaped"},"a":"last"}"#;
        let doc = Json::parse(text).unwrap();
        let value: Value = serde_json::from_slice(text).unwrap();
        assert_eq!(doc.get("a").and_then(Json::as_str).as_deref(), Some("last"));
        // Escaped strings are kept as written and decoded on demand; plain ones borrowed.
        let Some(Json::String(d)) = doc.get("c").unwrap().get("d") else {
            panic!("a string")
        };
        assert!(d.escaped);
        assert_eq!(d.decoded(), "e\"scaped");
        let mut pieces = Vec::new();
        d.feed(|p| pieces.push(p.to_owned()));
        assert_eq!(pieces, ["e", "\"", "scaped"]);
        assert!(matches!(
            doc.get("a").and_then(Json::as_str),
            Some(Cow::Borrowed("last"))
        ));
        let emoji = Json::parse(br#""\u00e9t\u00e9 \ud83d\ude00 a\/b\\""#).unwrap();
        assert_eq!(emoji.as_str().as_deref(), Some("été 😀 a/b\\"));
        assert_eq!(Json::from_value(&value).get("b"), doc.get("b"));
        let keys: Vec<_> = doc.as_object().unwrap().iter().map(|(k, _)| k).collect();
        assert_eq!(keys, ["b", "c", "a"]);
        let sorted: Vec<_> = doc
            .as_object()
            .unwrap()
            .sorted()
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        assert_eq!(sorted, ["a", "b", "c"]);
        for p in [
            "/a", "/b/0", "/b/2", "/b/01", "/b/+1", "/b/9", "/c/d", "/x", "a",
        ] {
            let ours = doc.pointer(p).map(to_value);
            assert_eq!(ours.as_ref(), value.pointer(p), "pointer {p}");
        }
        assert!(Json::parse(b"{\"a\":}").is_err());
        assert!(Json::parse(b"[1] x").is_err());
        // serde_json's recursion limit holds.
        let deep = "[".repeat(200) + &"]".repeat(200);
        assert!(Json::parse(deep.as_bytes()).is_err());
    }

    /// The value as a `serde_json::Value` (members inserted in order: the last duplicate
    /// wins, as when serde_json builds its map).
    fn to_value(j: &Json<'_>) -> Value {
        match j {
            Json::Null => Value::Null,
            Json::Bool(b) => Value::Bool(*b),
            Json::Number(n) => Value::Number(n.clone()),
            Json::String(s) => Value::String(s.decoded().into_owned()),
            Json::Array(items) => Value::Array(items.iter().map(to_value).collect()),
            Json::Object(o) => {
                let mut m = serde_json::Map::new();
                for (k, v) in &o.0 {
                    m.insert(k.to_string(), to_value(v));
                }
                Value::Object(m)
            }
        }
    }

    /// Equal, floats within a relative 1e-15 (serde_json's float parsing may round the last
    /// bit differently from the standard library's, which is exact).
    fn same(a: &Value, b: &Value) -> bool {
        match (a, b) {
            (Value::Number(x), Value::Number(y)) if x.is_f64() || y.is_f64() => {
                let (x, y) = (x.as_f64().unwrap(), y.as_f64().unwrap());
                x == y || (x - y).abs() <= x.abs().max(y.abs()) * 1e-15
            }
            (Value::Array(x), Value::Array(y)) => {
                x.len() == y.len() && x.iter().zip(y).all(|(a, b)| same(a, b))
            }
            (Value::Object(x), Value::Object(y)) => {
                x.len() == y.len() && x.iter().all(|(k, v)| y.get(k).is_some_and(|w| same(v, w)))
            }
            _ => a == b,
        }
    }

    fn agree(bytes: &[u8]) {
        let ours = Json::parse(bytes);
        let theirs = serde_json::from_slice::<Value>(bytes);
        match (&ours, &theirs) {
            (Ok(o), Ok(t)) => assert!(
                same(&to_value(o), t),
                "{:?}: {o:?} vs {t:?}",
                String::from_utf8_lossy(bytes)
            ),
            (Err(_), Err(_)) => {}
            _ => panic!(
                "{:?}: ours {ours:?}, serde_json {theirs:?}",
                String::from_utf8_lossy(bytes)
            ),
        }
    }

    #[test]
    fn integers_at_the_u64_boundary() {
        for text in [
            "0",
            "-0",
            "7",
            "1000000000000000000",
            "9999999999999999999",
            "10000000000000000000",
            "18446744073709551615",
            "18446744073709551616",
            "-9223372036854775808",
            "-9223372036854775809",
            "[412, 9, 421]",
            "00",
            "01",
        ] {
            agree(text.as_bytes());
        }
        let n = Json::parse(b"9999999999999999999").unwrap();
        assert_eq!(n.as_u64(), Some(9_999_999_999_999_999_999));
    }

    #[test]
    fn accepts_and_rejects_what_serde_json_does() {
        for text in [
            &b"0"[..],
            b"-0",
            b"01",
            b"1.",
            b".5",
            b"1.5e3",
            b"1E+2",
            b"1e-2",
            b"-",
            b"1e",
            b"18446744073709551615",
            b"18446744073709551616",
            b"-9223372036854775808",
            b"-9223372036854775809",
            b"1e400",
            b"-1e400",
            b"123456789012345678901234567890",
            b"0.1",
            b"2.5e-308",
            b"true",
            b"tru",
            b"nul",
            b"null ",
            b" \t\r\n[]",
            b"[1,]",
            b"[,1]",
            b"{}",
            b"{\"a\":1,}",
            b"{\"a\" 1}",
            b"{1:2}",
            b"{\"a\":1}x",
            b"\"\\u00e9\\ud83d\\ude00\"",
            b"\"\\ud83d\"",
            b"\"\\ude00\"",
            b"\"\\ud83d\\u0041\"",
            b"\"\\x\"",
            b"\"\\u12\"",
            b"\"a\tb\"",
            b"\"\xff\"",
            b"\"\xc3\xa9\"",
            b"\"unterminated",
            b"\"\\",
            b"[\"\\/\\b\\f\"]",
            b"",
            b"  ",
            b"{\"a\":{\"b\":[true,false,null,\"\\\"x\\\"\"]}}",
        ] {
            agree(text);
        }
        for depth in [127, 128, 129] {
            agree(("[".repeat(depth) + &"]".repeat(depth)).as_bytes());
            agree(("{\"a\":".repeat(depth) + "1" + &"}".repeat(depth)).as_bytes());
        }
    }

    proptest::proptest! {
        #[test]
        fn random_json_like_bytes_parse_as_serde_json_does(
            parts in proptest::collection::vec(
                proptest::prop_oneof![
                    proptest::strategy::Just("{".to_owned()),
                    proptest::strategy::Just("}".to_owned()),
                    proptest::strategy::Just("[".to_owned()),
                    proptest::strategy::Just("]".to_owned()),
                    proptest::strategy::Just(",".to_owned()),
                    proptest::strategy::Just(":".to_owned()),
                    proptest::strategy::Just(" ".to_owned()),
                    proptest::strategy::Just("true".to_owned()),
                    proptest::strategy::Just("null".to_owned()),
                    proptest::strategy::Just("\"k\"".to_owned()),
                    "-?[0-9]{1,3}(\\.[0-9]{1,3})?([eE][+-]?[0-9]{1,3})?",
                    "\"([a-z\\\\\"/é]|\\\\u[0-9a-fA-F]{4}){0,6}\"",
                ],
                0..24,
            ),
        ) {
            agree(parts.concat().as_bytes());
        }

        #[test]
        fn values_round_trip(v in arb_value()) {
            let text = serde_json::to_vec(&v).unwrap();
            let parsed = Json::parse(&text).unwrap();
            proptest::prop_assert!(same(&to_value(&parsed), &v));
            let pretty = serde_json::to_vec_pretty(&v).unwrap();
            proptest::prop_assert!(same(&to_value(&Json::parse(&pretty).unwrap()), &v));
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..64)) {
            agree(&bytes);
        }
    }

    fn arb_value() -> impl proptest::strategy::Strategy<Value = Value> {
        use proptest::prelude::*;
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<u64>().prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            (-1e300f64..1e300)
                .prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
            any::<String>().prop_map(Value::String),
        ];
        leaf.prop_recursive(4, 32, 6, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
                proptest::collection::vec((any::<String>(), inner), 0..6)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }
}
