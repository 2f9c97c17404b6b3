//! Redis key names and cluster slots.

use std::fmt::Write as _;

use crate::store::{BucketKey, IdempotencyKey};

/// The version of the states' format (see `limiter.lua`), part of every key: versions that
/// store states differently use different keys, so that during a rolling upgrade neither
/// reads (and resets) the other's states. Bump it with any incompatible change of a state or
/// of the idempotency record.
pub(crate) const FORMAT: &str = "v2";

/// `prefix:v2:{hash}:rule` (`v2`: [`FORMAT`]): the caller's key is hashed (SHA-1, first 128
/// bits, hex), so no input can reach another namespace, collide on purpose with another
/// caller's bucket, or make a key longer than 32 bytes; the hash is the cluster hash tag, so
/// every rule keyed by the same caller lands in one slot and is decided by one script call.
/// The rule name is percent-escaped for `{`, `}`, `%` and `:`.
pub(crate) fn bucket_key(prefix: &str, bucket: &BucketKey) -> String {
    let mut out = String::with_capacity(prefix.len() + bucket.rule().len() + 44);
    out.push_str(prefix);
    out.push(':');
    out.push_str(FORMAT);
    out.push_str(":{");
    push_tag(&mut out, bucket.key().as_bytes());
    out.push_str("}:");
    for c in bucket.rule().chars() {
        match c {
            '{' | '}' | '%' | ':' => {
                let _ = write!(out, "%{:02X}", c as u32);
            }
            c => out.push(c),
        }
    }
    out
}

/// `prefix:v2:{tag}:idem:hex`: the record of an idempotent request (see `limiter.lua`), in
/// the slot of `tag_of` (a bucket key: `tag` is its hash tag). `hex` is the request's
/// [`IdempotencyKey`], a digest already.
pub(crate) fn idempotency_key(prefix: &str, tag_of: &str, id: &IdempotencyKey) -> String {
    let tag = tag_of
        .split_once('{')
        .and_then(|(_, rest)| rest.split_once('}'))
        .map_or("", |(t, _)| t);
    let mut out = format!("{prefix}:{FORMAT}:{{{tag}}}:idem:");
    let _ = write!(out, "{id:?}");
    out
}

fn push_tag(out: &mut String, bytes: &[u8]) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let digest = sha1_smol::Sha1::from(bytes).digest().bytes();
    for b in &digest[..16] {
        out.push(char::from(HEX[usize::from(b >> 4)]));
        out.push(char::from(HEX[usize::from(b & 15)]));
    }
}

/// The cluster slot of `key` (Redis Cluster specification, "Keys distribution model"):
/// CRC16-XMODEM of the hash tag (or the whole key) modulo 16384.
pub(crate) fn slot(key: &str) -> u16 {
    let bytes = key.as_bytes();
    let tagged = bytes
        .iter()
        .position(|&b| b == b'{')
        .and_then(|open| {
            let rest = &bytes[open + 1..];
            let close = rest.iter().position(|&b| b == b'}')?;
            (close > 0).then(|| &rest[..close])
        })
        .unwrap_or(bytes);
    crc16(tagged) % 16384
}

fn crc16(bytes: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for &b in bytes {
        crc ^= u16::from(b) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_hashed_escaped_and_tagged() {
        let a = bucket_key("rl", &BucketKey::new("user-rpm", "sk-1"));
        let b = bucket_key("rl", &BucketKey::new("user-tpm", "sk-1"));
        assert!(a.starts_with("rl:v2:{") && a.ends_with("}:user-rpm"), "{a}");
        assert_eq!(slot(&a), slot(&b), "one caller's rules share a slot");
        assert_eq!(a.len(), "rl:v2:{}:user-rpm".len() + 32);
        let weird = bucket_key("rl", &BucketKey::new("a:{b}%", "}{:"));
        assert!(weird.ends_with(":a%3A%7Bb%7D%25"), "{weird}");
        assert_eq!(weird.matches('{').count(), 1);
        let idem = idempotency_key("rl", &a, &IdempotencyKey::from_bytes([0xab; 16]));
        assert!(
            idem.ends_with(&format!(":idem:{}", "ab".repeat(16))),
            "{idem}"
        );
        assert!(idem.starts_with(&a[..a.len() - "user-rpm".len()]), "{idem}");
        assert!(idem.contains("}:idem:"), "{idem}");
        assert_eq!(slot(&idem), slot(&a));
        // The slot is the hash tag's alone: the prefix and the format's version don't move it.
        let tag = &a[a.find('{').unwrap() + 1..a.find('}').unwrap()];
        assert_eq!(slot(&a), crc16(tag.as_bytes()) % 16384);
        assert_eq!(
            slot(&a),
            slot(&bucket_key("other", &BucketKey::new("x", "sk-1")))
        );
    }

    #[test]
    fn slots_match_the_cluster_spec() {
        // Values from the Redis Cluster specification and `CLUSTER KEYSLOT`.
        assert_eq!(crc16(b"123456789"), 0x31C3);
        assert_eq!(slot("foo"), 12182);
        assert_eq!(slot("{user1000}.following"), slot("{user1000}.followers"));
        assert_eq!(slot("foo{}{bar}"), slot("foo{}{bar}"));
        assert_eq!(slot("{}x"), crc16(b"{}x") % 16384);
    }
}
