//! Long keys are held as digests: a bucket key over [`MAX_HELD_KEY`] bytes (a 64 KiB header
//! value a client chose) is stored and looked up as a 128-bit digest of it, so a key costs
//! the store a bounded number of bytes whatever its length.
//!
//! The digest is std's keyed hash (SipHash-1-3, the one `HashMap` uses to resist HashDoS,
//! already in every Rust program) under a key drawn at random per store, computed twice
//! over the key with a different first byte: 128 bits. Without the store's secret key a
//! caller can't craft two keys with one digest (a collision would merge two callers'
//! buckets); an unkeyed fast hash could be attacked offline, and a cryptographic hash would
//! be a new dependency for a few lines. (The Redis store hashes every key already, see
//! `store::redis::keys`.) A digest is 16 bytes: a plain key of those same 16 bytes would
//! share its bucket, but finding it means predicting the keyed hash.

use std::borrow::Cow;
use std::hash::{BuildHasher, Hasher, RandomState};

use crate::key::Key;
use crate::store::BucketKey;

/// Longest key stored as it is.
pub(super) const MAX_HELD_KEY: usize = 256;

/// Digests long keys under a random key of its own.
#[derive(Debug)]
pub(super) struct KeyDigest(RandomState);

impl KeyDigest {
    pub(super) fn new() -> Self {
        Self(RandomState::new())
    }

    /// Whether `key` is stored as its digest.
    #[inline]
    pub(super) fn is_long(key: &BucketKey) -> bool {
        key.key().as_bytes().len() > MAX_HELD_KEY
    }

    /// The key the store holds for `key`.
    #[inline]
    pub(super) fn stored<'k>(&self, key: &'k BucketKey) -> Cow<'k, BucketKey> {
        if Self::is_long(key) {
            Cow::Owned(self.digest(key))
        } else {
            Cow::Borrowed(key)
        }
    }

    #[cold]
    fn digest(&self, key: &BucketKey) -> BucketKey {
        let half = |domain: u8| {
            let mut h = self.0.build_hasher();
            h.write_u8(domain);
            h.write(key.key().as_bytes());
            h.finish().to_le_bytes()
        };
        let mut digest = [0; 16];
        digest[..8].copy_from_slice(&half(1));
        digest[8..].copy_from_slice(&half(2));
        key.with_key(Key::new(digest))
    }
}

/// A seed for the store's sampling, from the same source.
pub(super) fn random_seed() -> u64 {
    RandomState::new().build_hasher().finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_keys_become_distinct_16_byte_digests() {
        let d = KeyDigest::new();
        let short = BucketKey::new("r", vec![b'a'; MAX_HELD_KEY]);
        assert!(matches!(d.stored(&short), Cow::Borrowed(_)));
        let long = |fill: u8| BucketKey::new("r", vec![fill; MAX_HELD_KEY + 1]);
        let (a, b) = (
            d.stored(&long(b'a')).into_owned(),
            d.stored(&long(b'b')).into_owned(),
        );
        assert_eq!(a.key().as_bytes().len(), 16);
        assert_eq!(a.rule(), "r");
        assert_ne!(a, b);
        assert_eq!(a, *d.stored(&long(b'a')), "the same key, the same digest");
        assert_ne!(a, *KeyDigest::new().stored(&long(b'a')), "keyed per store");
    }
}
