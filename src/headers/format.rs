//! Formatting header values: numbers and Go duration strings.

use std::time::Duration;

/// Room [`write`](super::write) reserves for the values it computes (a few rules' states);
/// more grows the buffer.
pub(super) const VALUE_BUF: usize = 128;

/// Appends `n` in decimal.
#[inline]
pub(super) fn push_u64(buf: &mut Vec<u8>, n: u64) {
    buf.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
}

/// A duration as Go's `time.Duration.String()` prints it, rounded to the millisecond (up,
/// so a client waiting that long is never early): `6m0s`, `1.5s`, `12ms`, `0s`.
pub fn go_duration(d: Duration) -> String {
    let mut out = Vec::with_capacity(24);
    push_go_duration(&mut out, d);
    // Only ASCII digits and unit letters were pushed.
    String::from_utf8(out).unwrap_or_else(|_| "0s".to_owned())
}

/// Appends [`go_duration`] of `d`.
pub(crate) fn push_go_duration(out: &mut Vec<u8>, d: Duration) {
    // u64 arithmetic (u128 division is a library call); 2^64 ms is 584 million years.
    let ms = u64::try_from(d.as_nanos().div_ceil(1_000_000)).unwrap_or(u64::MAX);
    if ms == 0 {
        out.extend_from_slice(b"0s");
    } else if ms < 1000 {
        push_u64(out, ms);
        out.extend_from_slice(b"ms");
    } else {
        let (h, rest) = (ms / 3_600_000, ms % 3_600_000);
        let (m, rest) = (rest / 60_000, rest % 60_000);
        let (s, frac) = (rest / 1000, rest % 1000);
        if h > 0 {
            push_u64(out, h);
            out.push(b'h');
        }
        if h > 0 || m > 0 {
            push_u64(out, m);
            out.push(b'm');
        }
        push_u64(out, s);
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
            out.push(b'.');
            out.extend_from_slice(&digits[..keep]);
        }
        out.push(b's');
    }
}
