//! Formatting header values: the one buffer every computed value goes into, and Go
//! duration strings.

use std::time::Duration;

use bytes::Bytes;

/// Where [`write`] puts the values it computes: on the stack, then into one allocation.
pub(super) struct ValueBuf {
    stack: [u8; VALUE_BUF],
    len: usize,
    /// Used instead once the values outgrow the stack buffer (many or long rule names).
    heap: Option<Vec<u8>>,
}

pub(super) const VALUE_BUF: usize = 128;

/// The stack buffer, moved into the response's `Bytes` as its owner.
pub(super) struct StackOwner([u8; VALUE_BUF], usize);

impl AsRef<[u8]> for StackOwner {
    fn as_ref(&self) -> &[u8] {
        &self.0[..self.1]
    }
}

impl ValueBuf {
    #[inline]
    pub(super) fn new() -> Self {
        Self {
            stack: [0; VALUE_BUF],
            len: 0,
            heap: None,
        }
    }

    #[inline]
    pub(super) fn len(&self) -> usize {
        self.heap.as_ref().map_or(self.len, Vec::len)
    }

    #[inline]
    pub(super) fn push(&mut self, bytes: &[u8]) {
        if let Some(heap) = &mut self.heap {
            heap.extend_from_slice(bytes);
        } else if let Some(room) = self.stack.get_mut(self.len..self.len + bytes.len()) {
            room.copy_from_slice(bytes);
            self.len += bytes.len();
        } else {
            let mut heap = Vec::with_capacity(2 * VALUE_BUF + bytes.len());
            heap.extend_from_slice(&self.stack[..self.len]);
            heap.extend_from_slice(bytes);
            self.heap = Some(heap);
        }
    }

    #[inline]
    pub(super) fn push_u64(&mut self, n: u64) {
        self.push(itoa::Buffer::new().format(n).as_bytes());
    }

    pub(super) fn freeze(self) -> Bytes {
        match self.heap {
            Some(heap) => Bytes::from(heap),
            None if self.len == 0 => Bytes::new(),
            None => Bytes::from_owner(StackOwner(self.stack, self.len)),
        }
    }
}

/// A duration as Go's `time.Duration.String()` prints it, rounded to the millisecond (up,
/// so a client waiting that long is never early): `6m0s`, `1.5s`, `12ms`, `0s`.
pub fn go_duration(d: Duration) -> String {
    GoDuration::default().format(d).to_owned()
}

/// [`go_duration`] into a buffer on the stack.
#[derive(Default)]
pub(crate) struct GoDuration {
    buf: [u8; 32],
    len: usize,
}

impl GoDuration {
    #[inline]
    pub(super) fn push(&mut self, bytes: &[u8]) {
        // The longest duration, `u64::MAX` ms, takes 24 bytes (`5124095576030h25m51.615s`).
        let end = (self.len + bytes.len()).min(self.buf.len());
        self.buf[self.len..end].copy_from_slice(&bytes[..end - self.len]);
        self.len = end;
    }

    #[inline]
    pub(super) fn push_u64(&mut self, n: u64) {
        self.push(itoa::Buffer::new().format(n).as_bytes());
    }

    #[inline]
    pub(crate) fn format(&mut self, d: Duration) -> &str {
        self.len = 0;
        // u64 arithmetic (u128 division is a library call); 2^64 ms is 584 million years.
        let ms = u64::try_from(d.as_nanos().div_ceil(1_000_000)).unwrap_or(u64::MAX);
        if ms == 0 {
            self.push(b"0s");
        } else if ms < 1000 {
            self.push_u64(ms);
            self.push(b"ms");
        } else {
            let (h, rest) = (ms / 3_600_000, ms % 3_600_000);
            let (m, rest) = (rest / 60_000, rest % 60_000);
            let (s, frac) = (rest / 1000, rest % 1000);
            if h > 0 {
                self.push_u64(h);
                self.push(b"h");
            }
            if h > 0 || m > 0 {
                self.push_u64(m);
                self.push(b"m");
            }
            self.push_u64(s);
            if frac > 0 {
                let digits = [
                    b'0' + (frac / 100) as u8,
                    b'0' + (frac / 10 % 10) as u8,
                    b'0' + (frac % 10) as u8,
                ];
                let keep = if frac % 100 == 0 {
                    1
                } else if frac % 10 == 0 {
                    2
                } else {
                    3
                };
                self.push(b".");
                self.push(&digits[..keep]);
            }
            self.push(b"s");
        }
        // Only ASCII digits and unit letters were pushed.
        std::str::from_utf8(&self.buf[..self.len]).unwrap_or("0s")
    }
}
