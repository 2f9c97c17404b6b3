//! The SSE framing: `data:` lines parsed incrementally, the last valid `usage` kept.

use super::{has_usage_object, push_bounded, usage_in, Usage, RETAINED_CAPACITY, SEARCH};

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

pub(super) struct SseState {
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
    /// Bytes held for the event being read.
    pub(super) fn buffered(&self) -> usize {
        self.data.len()
    }

    /// The buffer's capacity: the memory held.
    #[cfg(test)]
    pub(super) fn held(&self) -> usize {
        self.data.capacity()
    }

    /// Frees the buffer and forgets the incomplete event (the body ended).
    pub(super) fn release(&mut self) {
        self.data = Vec::new();
        self.poisoned = false;
        self.line = Line::Start;
    }

    pub(super) fn feed(
        &mut self,
        mut chunk: &[u8],
        max: usize,
        usage: &mut Option<Usage>,
        done: &mut bool,
    ) {
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
