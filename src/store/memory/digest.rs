//! The memory store holds a bucket key whose key is long as its digest
//! ([`crate::key::digest`]: a keyed 128-bit digest under a secret of the store's).

use std::borrow::Cow;
use std::hash::{BuildHasher, Hasher, RandomState};

use crate::key::digest::KeyDigest as Digest;
use crate::store::BucketKey;

/// Digests the long keys of bucket keys under a random key of the store's.
#[derive(Debug)]
pub(super) struct KeyDigest(Digest);

impl KeyDigest {
    pub(super) fn new() -> Self {
        Self(Digest::new())
    }

    /// Whether `key` is stored as its digest.
    #[inline]
    pub(super) fn is_long(key: &BucketKey) -> bool {
        Digest::is_long(key.key())
    }

    /// The key the store holds for `key`.
    #[inline]
    pub(super) fn stored<'k>(&self, key: &'k BucketKey) -> Cow<'k, BucketKey> {
        match self.0.held(key.key()) {
            Cow::Borrowed(_) => Cow::Borrowed(key),
            Cow::Owned(digest) => Cow::Owned(key.with_key(digest)),
        }
    }
}

/// A seed for the store's sampling, from the same source.
pub(super) fn random_seed() -> u64 {
    RandomState::new().build_hasher().finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::key::digest::MAX_HELD_KEY;

    #[test]
    fn long_keys_become_digests_in_their_rule() {
        let d = KeyDigest::new();
        let short = BucketKey::new("r", vec![b'a'; MAX_HELD_KEY]);
        assert!(matches!(d.stored(&short), Cow::Borrowed(_)));
        let long = BucketKey::new("r", vec![b'a'; MAX_HELD_KEY + 1]);
        let held = d.stored(&long).into_owned();
        assert_eq!(held.key().as_bytes().len(), 16);
        assert_eq!(held.rule(), "r");
        assert_eq!(held, *d.stored(&long), "the same key, the same digest");
    }
}
