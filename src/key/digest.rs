//! Long keys held as digests: a key over [`MAX_HELD_KEY`] bytes (a 64 KiB header value a
//! client chose) is held and looked up as a 128-bit digest of it, so a key costs a bounded
//! number of bytes whatever its length. The memory store's buckets and the adaptive
//! capacities' controllers hold keys this way.
//!
//! The digest is std's keyed hash (SipHash-1-3, the one `HashMap` uses to resist HashDoS,
//! already in every Rust program) under a key drawn at random per holder (a store, a rule's capacity), computed twice
//! over the key with a different first byte: 128 bits. Without the store's secret key a
//! caller can't craft two keys with one digest (a collision would merge two callers'
//! buckets); an unkeyed fast hash could be attacked offline, and a cryptographic hash would
//! be a new dependency for a few lines. (The Redis store hashes every key already, see
//! `store::redis::keys`.) A digest is 16 bytes: a plain key of those same 16 bytes would
//! share its bucket, but finding it means predicting the keyed hash.

use std::borrow::Cow;
use std::hash::{BuildHasher, Hasher, RandomState};

use super::Key;

/// Longest key held as it is.
pub(crate) const MAX_HELD_KEY: usize = 256;

/// Digests long keys under a random key of its own; clones digest alike.
#[derive(Debug, Clone)]
pub(crate) struct KeyDigest(RandomState);

impl KeyDigest {
    pub(crate) fn new() -> Self {
        Self(RandomState::new())
    }

    /// Whether `key` is held as its digest.
    #[inline]
    pub(crate) fn is_long(key: &Key) -> bool {
        key.as_bytes().len() > MAX_HELD_KEY
    }

    /// The key held for `key`: itself, or its digest when it is long.
    #[inline]
    pub(crate) fn held<'k>(&self, key: &'k Key) -> Cow<'k, Key> {
        if Self::is_long(key) {
            Cow::Owned(self.digest(key))
        } else {
            Cow::Borrowed(key)
        }
    }

    #[cold]
    fn digest(&self, key: &Key) -> Key {
        let half = |domain: u8| {
            let mut h = self.0.build_hasher();
            h.write_u8(domain);
            h.write(key.as_bytes());
            h.finish().to_le_bytes()
        };
        let mut digest = [0; 16];
        digest[..8].copy_from_slice(&half(1));
        digest[8..].copy_from_slice(&half(2));
        Key::new(digest)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_keys_become_distinct_16_byte_digests() {
        let d = KeyDigest::new();
        let short = Key::new(vec![b'a'; MAX_HELD_KEY]);
        assert!(matches!(d.held(&short), Cow::Borrowed(_)));
        let long = |fill: u8| Key::new(vec![fill; MAX_HELD_KEY + 1]);
        let (a, b) = (
            d.held(&long(b'a')).into_owned(),
            d.held(&long(b'b')).into_owned(),
        );
        assert_eq!(a.as_bytes().len(), 16);
        assert_ne!(a, b);
        assert_eq!(a, *d.held(&long(b'a')), "the same key, the same digest");
        assert_eq!(a, *d.clone().held(&long(b'a')), "a clone digests alike");
        assert_ne!(a, *KeyDigest::new().held(&long(b'a')), "keyed per holder");
    }
}
