//! The JSON framing: the `usage` member of one top-level object, read as it streams past.

use super::{push_bounded, usage_of, usage_value, Usage};
use crate::document::Json;

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

impl Member {
    /// The member of this name (as written, between its quotes), if it is one we want.
    #[inline]
    fn named(name: &[u8]) -> Option<Self> {
        match name {
            b"usage" => Some(Self::Usage),
            b"response" => Some(Self::Response),
            _ => None,
        }
    }
}

/// What a byte is to [`JsonState::skip_nested`] (outside strings).
#[derive(Clone, Copy)]
enum Nested {
    Other,
    Quote,
    Open,
    Close,
}

static NESTED: [Nested; 256] = {
    let mut table = [Nested::Other; 256];
    table[b'"' as usize] = Nested::Quote;
    table[b'{' as usize] = Nested::Open;
    table[b'[' as usize] = Nested::Open;
    table[b'}' as usize] = Nested::Close;
    table[b']' as usize] = Nested::Close;
    table
};

#[derive(Default)]
pub(super) struct JsonState {
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
    /// Bytes held for the object being read.
    pub(super) fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// The buffer's capacity: the memory held.
    #[cfg(test)]
    pub(super) fn held(&self) -> usize {
        self.buf.capacity()
    }

    /// Frees the buffer (the body ended).
    pub(super) fn release(&mut self) {
        self.buf = Vec::new();
    }

    /// Reads the next chunk: `Some(outcome)` once the parser is done (the object ended and
    /// its usage was read, or it was given up on), `None` while more is needed.
    pub(super) fn feed(&mut self, chunk: &[u8], max: usize) -> Option<Option<Usage>> {
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
    /// end of the object within `data` (after its closing brace) once seen.
    ///
    /// Only the top level is followed member by member (names, `,`); a nested value is
    /// crossed to its matching close by [`skip_nested`](Self::skip_nested), which looks at
    /// brackets and quotes only. Strings are skipped with a search for their end (a quote or
    /// a backslash), in registers for short ones; the structure between them is walked byte
    /// by byte.
    fn scan(&mut self, data: &[u8], base: usize) -> Option<usize> {
        let mut i = 0;
        if self.in_string {
            // A string (a member name, maybe) went on past the last chunk.
            i = self.string_rest(data, 0, base)?;
        }
        if self.depth > 1 {
            i = self.skip_nested(data, i)?;
        }
        // The top level: depth 1 (0 only before the opening brace).
        loop {
            let &byte = data.get(i)?;
            i += 1;
            match byte {
                b'"' => {
                    i = if self.depth == 1 && self.expect_key {
                        self.expect_key = false;
                        self.name(data, i, base)?
                    } else {
                        self.skip_string(data, i)?
                    };
                }
                b'{' | b'[' => {
                    self.depth += 1;
                    if self.depth == 1 {
                        self.expect_key = true;
                    } else {
                        i = self.skip_nested(data, i)?;
                    }
                }
                b'}' | b']' => {
                    if self.depth == 1 {
                        self.end_member(base + i - 1);
                    }
                    self.depth = self.depth.saturating_sub(1);
                    if self.depth == 0 {
                        return Some(i);
                    }
                }
                b',' if self.depth == 1 => {
                    self.end_member(base + i - 1);
                    self.expect_key = true;
                }
                _ => {}
            }
        }
    }

    /// Crosses nested values from `data[i..]` (at depth 2 or more, outside strings): the
    /// offset after the close that brings the depth back to 1, or `None` at the end of
    /// `data` (the depth, and whether it ended in a string, kept for the next chunk).
    #[inline]
    fn skip_nested(&mut self, data: &[u8], mut i: usize) -> Option<usize> {
        let mut depth = self.depth;
        loop {
            let Some(&byte) = data.get(i) else {
                self.depth = depth;
                return None;
            };
            i += 1;
            match NESTED[usize::from(byte)] {
                Nested::Other => {}
                Nested::Quote => match self.skip_string(data, i) {
                    Some(end) => i = end,
                    None => {
                        self.depth = depth;
                        return None;
                    }
                },
                Nested::Open => depth += 1,
                Nested::Close => {
                    depth -= 1;
                    if depth == 1 {
                        self.depth = 1;
                        return Some(i);
                    }
                }
            }
        }
    }

    /// Skips the string (not a member name) whose opening quote is before `data[i]`: the
    /// offset after its closing quote, or `None` at the end of `data` (then inside the
    /// string, maybe right after a backslash).
    #[inline]
    fn skip_string(&mut self, data: &[u8], mut i: usize) -> Option<usize> {
        loop {
            let rest = data.get(i..).unwrap_or_default();
            let Some(at) = find_quote_or_backslash(rest) else {
                self.in_string = true;
                return None;
            };
            i += at;
            if rest[at] == b'"' {
                return Some(i + 1);
            }
            // A backslash: it and the byte it escapes.
            i += 2;
            if i > data.len() {
                self.in_string = true;
                self.escaped = true;
                return None;
            }
        }
    }

    /// Reads the top-level member name whose opening quote is before `data[i]`: the offset
    /// after its closing quote, or `None` at the end of `data` (the name so far kept).
    #[inline]
    fn name(&mut self, data: &[u8], i: usize, base: usize) -> Option<usize> {
        let rest = &data[i..];
        match find_quote_or_backslash(rest) {
            // The usual name: whole in this chunk, without escapes.
            Some(at) if rest[at] == b'"' => {
                self.member = Member::named(&rest[..at]).map(|m| (m, base + i + at + 1));
                Some(i + at + 1)
            }
            _ => {
                self.in_string = true;
                self.key.start();
                self.string_rest(data, i, base)
            }
        }
    }

    /// Goes on with the string `data[i..]` is in (a member name's pieces kept while it
    /// could still be one we want): the offset after its closing quote, or `None` at the end
    /// of `data`.
    fn string_rest(&mut self, data: &[u8], mut i: usize, base: usize) -> Option<usize> {
        let len = data.len();
        while i < len {
            if self.escaped {
                self.escaped = false;
                i += 1;
                continue;
            }
            let Some(at) = find_quote_or_backslash(&data[i..]) else {
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
                self.member = Member::named(name).map(|m| (m, base + i + 1));
            }
            return Some(i + 1);
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
    /// `response`'s non-null `usage`. Only those two values are parsed (and the `usage`
    /// object is not built).
    fn usage_of(&self, buf: &[u8]) -> Option<Usage> {
        // From the `:` after the name to the `,` or `}` after the value.
        let text = |(start, end): (usize, usize)| {
            let v: &[u8] = buf[start..end].trim_ascii_start();
            v.strip_prefix(b":").unwrap_or(v)
        };
        if let Some(span) = self.usage {
            if let Some(answer) = usage_value(text(span)) {
                return answer;
            }
        }
        match Json::parse(text(self.response?)).ok()?.get("usage") {
            None | Some(Json::Null) => None,
            Some(usage) => usage_of(usage),
        }
    }
}

/// The position of the first quote or backslash in `text`.
#[inline]
pub(super) fn find_quote_or_backslash(text: &[u8]) -> Option<usize> {
    find_near(
        text,
        |word| has_byte(word, b'"') | has_byte(word, b'\\'),
        |rest| memchr::memchr2(b'"', b'\\', rest),
    )
}

/// The high bit of each byte of `word` equal to `byte`, and maybe of bytes above one (a
/// borrow): the lowest set bit is exact. For bytes below 0x80 only.
#[inline]
fn has_byte(word: u64, byte: u8) -> u64 {
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
fn find_near(
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
