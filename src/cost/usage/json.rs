//! The JSON framing: one top-level object, buffered to its closing brace, then deserialized.

use super::document::{usage_in, usage_of_leading_object};
use super::{push_bounded, Usage};

#[derive(Default)]
pub(super) struct JsonState {
    /// The object so far, from its opening brace.
    buf: Vec<u8>,
    started: bool,
    /// Nesting depth (objects and arrays) at the scan position.
    depth: usize,
    in_string: bool,
    /// Inside a string, right after a backslash.
    escaped: bool,
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
        let mut part = chunk;
        if !self.started {
            // Leading whitespace (and a byte-order mark's bytes) before the object.
            let start = part
                .iter()
                .position(|&b| !matches!(b, b' ' | b'\t' | b'\n' | b'\r' | 0xEF | 0xBB | 0xBF))?;
            if part[start] != b'{' {
                return Some(None);
            }
            self.started = true;
            part = &part[start..];
            // The usual JSON answer: the whole object in this first chunk, read in place
            // without following its brackets first. Anything else (the object not complete
            // here, or not valid) goes the general way below.
            if part.len() <= max {
                if let Some(usage) = std::str::from_utf8(part)
                    .ok()
                    .and_then(usage_of_leading_object)
                {
                    return Some(usage);
                }
            }
        }
        let end = self.scan(part);
        // Bytes after the object are not looked at (nor counted against the bound).
        let object = &part[..end.unwrap_or(part.len())];
        if end.is_some() && self.buf.is_empty() {
            // The whole object in one chunk (the usual JSON answer): read in place, no copy.
            return Some(if object.len() <= max {
                usage_in(object)
            } else {
                None
            });
        }
        if !push_bounded(&mut self.buf, object, max) {
            self.buf = Vec::new();
            return Some(None);
        }
        end?;
        let buf = std::mem::take(&mut self.buf);
        Some(usage_in(&buf))
    }

    /// Follows the object's brackets and strings through `data`, its next bytes: the offset
    /// after the bracket that closes it, once seen. Whether the object is valid JSON is
    /// serde_json's to say; this only finds where it ends.
    fn scan(&mut self, data: &[u8]) -> Option<usize> {
        let mut i = 0;
        while i < data.len() {
            if self.escaped {
                self.escaped = false;
                i += 1;
            } else if self.in_string {
                let at = memchr::memchr2(b'"', b'\\', &data[i..])?;
                i += at;
                if data[i] == b'"' {
                    self.in_string = false;
                } else {
                    self.escaped = true;
                }
                i += 1;
            } else {
                match data[i] {
                    b'"' => self.in_string = true,
                    b'{' | b'[' => self.depth += 1,
                    b'}' | b']' => {
                        self.depth = self.depth.saturating_sub(1);
                        if self.depth == 0 {
                            return Some(i + 1);
                        }
                    }
                    _ => {}
                }
                i += 1;
            }
        }
        None
    }
}
