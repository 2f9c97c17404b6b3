//! An idempotent request's identity: the [`IdempotencyKey`] the layer computes from the
//! client's id (the [`crate::RateLimitLayerBuilder::idempotency_header`]), the request and
//! the buckets it is charged to. What a retry is charged is the store's contract (see
//! [Idempotent retries](crate::store#idempotent-retries)).
//!
//! The digest covers the id, the method, the path and query, the body bytes as received
//! (before the layer's `stream_options` rewrite, and not their parse: two bodies that differ
//! by a byte are two requests), and every bucket (rule name and key; an adaptive capacity's
//! without its replica suffix and without its tier's own bucket, so that a retry through
//! another replica, or after a restart, is the same request), each field prefixed by its
//! length so that no two different requests can write the same input. It is SHA-1 (the
//! first 128 bits): the same in every process sharing a Redis, and scoped to the caller's
//! buckets, so a caller can't land on another caller's key (a second preimage); a caller who
//! pays for a SHA-1 collision between two bodies of its own gains at most the free retries of
//! one failed attempt (about 4 ms per MiB of body, 70 µs per 16 KiB,
//! on a loaded 2-core test machine; paid only by requests that carry the header).
//!
//! A request that carries the header and declares its body's length (`content-length`), or
//! has no body, has its body read for this even when no rule needs the body, up to
//! [`crate::RateLimitLayerBuilder::max_inspect_bytes`]. A longer body, one the layer could
//! not read whole, or a body of undeclared length (a stream: gRPC, a chunked upload, never
//! held back for this) gives no key when no rule reads the body: each attempt of such a
//! request is charged as a new one.

use crate::store::IdempotencyKey;

/// The key of a request with client id `id` (the header's value, surrounding whitespace
/// trimmed; `None` when empty), or `None` when the request has no usable id.
/// `buckets` are the request's buckets as (rule name, key), an adaptive capacity's without
/// its replica suffix and without its tier's own bucket: a retry through another replica is
/// the same request.
pub(crate) fn key<'a>(
    id: &[u8],
    method: &http::Method,
    uri: &http::Uri,
    body: &[u8],
    buckets: impl Iterator<Item = (&'a str, &'a [u8])>,
) -> Option<IdempotencyKey> {
    let id = id.trim_ascii();
    if id.is_empty() {
        return None;
    }
    let mut digest = sha1_smol::Sha1::new();
    let mut field = |bytes: &[u8]| {
        digest.update(&(bytes.len() as u64).to_le_bytes());
        digest.update(bytes);
    };
    field(id);
    field(method.as_str().as_bytes());
    field(uri.path_and_query().map_or("", |p| p.as_str()).as_bytes());
    field(body);
    for (rule, key) in buckets {
        field(rule.as_bytes());
        field(key);
    }
    let full = digest.digest().bytes();
    let mut out = [0; 16];
    out.copy_from_slice(&full[..16]);
    Some(IdempotencyKey::from_bytes(out))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::BucketKey;

    #[test]
    fn every_part_of_the_request_changes_the_key() {
        let get = http::Method::GET;
        let post = http::Method::POST;
        let uri: http::Uri = "/v1/chat/completions".parse().unwrap();
        let other_uri: http::Uri = "/v1/chat/completions?x=1".parse().unwrap();
        let alice = BucketKey::new("rpm", "alice");
        let bob = BucketKey::new("rpm", "bob");
        let k = |id: &[u8], m: &http::Method, u: &http::Uri, body: &[u8], b: &BucketKey| {
            key(
                id,
                m,
                u,
                body,
                std::iter::once((b.rule(), b.key().as_bytes())),
            )
        };
        let base = k(b"id-1", &post, &uri, b"{}", &alice).unwrap();
        assert_eq!(k(b" id-1 ", &post, &uri, b"{}", &alice), Some(base));
        for other in [
            k(b"id-2", &post, &uri, b"{}", &alice),
            k(b"id-1", &get, &uri, b"{}", &alice),
            k(b"id-1", &post, &other_uri, b"{}", &alice),
            k(b"id-1", &post, &uri, b"{ }", &alice),
            k(b"id-1", &post, &uri, b"{}", &bob),
            key(b"id-1", &post, &uri, b"{}", std::iter::empty()),
        ] {
            assert_ne!(other, Some(base));
        }
        // Fields are length-prefixed: moving a byte from one field to the next is another key.
        assert_ne!(
            key(b"ab", &post, &uri, b"c", std::iter::empty()),
            key(b"a", &post, &uri, b"bc", std::iter::empty())
        );
        assert_eq!(k(b"  ", &post, &uri, b"{}", &alice), None);
    }
}
