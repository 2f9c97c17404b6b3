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

mod parser;
#[cfg(test)]
mod tests;

use std::borrow::Cow;

use serde_json::{Number, Value};

pub(crate) use self::parser::{find_near, find_quote_or_backslash, has_byte, JsonError};

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
        parser::parse(bytes)
    }

    /// Parses `bytes` as [`parse`](Self::parse) does (accepting and refusing the same
    /// documents), without building a top-level object: its members are handed to `member`
    /// in document order, duplicates included, and the answer is `None`. Any other value is
    /// the answer.
    pub(crate) fn parse_members(
        bytes: &'a [u8],
        member: impl FnMut(Cow<'a, str>, Json<'a>),
    ) -> Result<Option<Self>, JsonError> {
        parser::parse_members(bytes, member)
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
