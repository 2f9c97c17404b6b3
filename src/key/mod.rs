//! Where a rule's bucket key comes from.
//!
//! A [`KeyExtractor`] looks at a request (headers, URI, extensions; see [`RequestView`]) and
//! returns the [`Key`] that picks the bucket: the API key, the bearer token, the client IP,
//! one constant key for a global limit, anything a closure computes, or several of these
//! combined (user x model). When it returns `None`, the rule's
//! [`MissingKey`](crate::MissingKey) policy decides: reject with
//! [`KeyExtractor::missing_status`] and a JSON body naming [`KeyExtractor::describe`], count
//! the request in one shared anonymous bucket, or skip the rule.
//!
//! | built-in | key | missing → |
//! |---|---|---|
//! | [`header`] | the header's value | 401 for `authorization`, `proxy-authorization`, `x-api-key`, `api-key`; 400 otherwise ([`Header::status_when_missing`] overrides) |
//! | [`bearer_token`] | the token of `Authorization: Bearer <token>` | 401 |
//! | [`client_ip`] | the client's IP, from the one forwarding header the trusted proxy writes (`X-Forwarded-For`, or `Forwarded` if configured) only when the peer is a trusted proxy; IPv6 grouped by /64 | 400 |
//! | [`global`] | one constant key | never missing |
//! | [`json_field`] | a field of the JSON body (`model`), read once per request | 400 |
//! | [`from_fn`] | what the closure returns | 400 |
//! | [`KeyExtractorExt::and`] | both keys, length-prefixed so no two pairs collide | the first missing part's |
//!
//! An empty value counts as missing: `x-api-key:` (empty) is no key.
//!
//! # Examples
//!
//! ```
//! use http::Request;
//! use tower_llm_ratelimit::key::{self, KeyExtractor, KeyExtractorExt, RequestView};
//!
//! let req = Request::builder()
//!     .header("authorization", "Bearer sk-123")
//!     .header("x-model", "gpt-4o")
//!     .body(())
//!     .unwrap();
//! let view = RequestView::from_request(&req);
//!
//! assert_eq!(key::bearer_token().extract(&view).unwrap().as_bytes(), b"sk-123");
//! assert!(key::header("x-api-key").extract(&view).is_none());
//!
//! // user x model: one bucket per pair.
//! let per_user_model = key::bearer_token().and(key::header("x-model"));
//! assert!(per_user_model.extract(&view).is_some());
//! assert_eq!(per_user_model.describe(), "bearer token x header `x-model`");
//!
//! // One bucket for everyone (a service-wide or per-model global limit).
//! assert_eq!(key::global().extract(&view).unwrap().as_bytes(), b"*");
//!
//! // Any closure over the request.
//! let by_path = key::from_fn(|req: &RequestView<'_>| Some(req.uri().path().to_owned()));
//! assert_eq!(by_path.extract(&view).unwrap().as_bytes(), b"/");
//! ```

mod builtin;
mod cidr;
pub(crate) mod digest;
mod forwarding;
mod ip;

pub use self::builtin::{
    bearer_token, from_fn, global, header, json_field, BearerToken, Composite, FromFn, Global,
    Header, JsonField,
};
pub use self::forwarding::ForwardingHeader;
pub use self::ip::{client_ip, ClientIp, PeerAddr};

use std::borrow::Cow;
use std::fmt;
use std::sync::Arc;
use std::sync::OnceLock;

use bytes::Bytes;
use http::{Extensions, HeaderMap, Method, Request, StatusCode, Uri};

use crate::document::Json;

/// The part of a bucket's identity that comes from the request. Empty means "anonymous"
/// (see [`crate::MissingKey::Shared`]); extractors never return an empty key.
///
/// Keys of up to 22 bytes (IP addresses, user ids, model names, short API keys, the global
/// key) are stored inline: extracting one allocates nothing. Longer keys live on the heap.
/// Equality, hashing and ordering are those of the bytes, whatever the storage.
#[derive(Clone)]
pub struct Key(Repr);

/// Bytes a [`Key`] holds without a heap allocation (the enum stays 24 bytes).
// Kept: at 1M 20-byte keys a `Box<[u8]>` costs 15% more bytes per GCRA key (89.2 against
// 77.6) and `SmallVec<[u8; 22]>` 11% (86.0) (`cargo bench --bench memory`).
const INLINE_KEY: usize = 22;

#[derive(Clone)]
enum Repr {
    Inline { len: u8, bytes: [u8; INLINE_KEY] },
    Heap(Box<[u8]>),
}

impl Key {
    /// A key from raw bytes.
    #[inline]
    pub fn new(bytes: impl AsRef<[u8]>) -> Self {
        let b = bytes.as_ref();
        if b.len() <= INLINE_KEY {
            let mut bytes = [0; INLINE_KEY];
            bytes[..b.len()].copy_from_slice(b);
            Self(Repr::Inline {
                len: b.len() as u8,
                bytes,
            })
        } else {
            Self(Repr::Heap(b.into()))
        }
    }

    /// The key of the shared anonymous bucket.
    pub fn anonymous() -> Self {
        Self::new([])
    }

    /// True for the anonymous key.
    pub fn is_anonymous(&self) -> bool {
        self.as_bytes().is_empty()
    }

    /// The raw bytes.
    #[inline]
    pub fn as_bytes(&self) -> &[u8] {
        match &self.0 {
            Repr::Inline { len, bytes } => &bytes[..usize::from(*len)],
            Repr::Heap(b) => b,
        }
    }
}

impl PartialEq for Key {
    #[inline]
    fn eq(&self, other: &Self) -> bool {
        self.as_bytes() == other.as_bytes()
    }
}

impl Eq for Key {}

impl std::hash::Hash for Key {
    #[inline]
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.as_bytes().hash(state);
    }
}

impl PartialOrd for Key {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Key {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.as_bytes().cmp(other.as_bytes())
    }
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Key({:?})", String::from_utf8_lossy(self.as_bytes()))
    }
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&String::from_utf8_lossy(self.as_bytes()))
    }
}

impl From<&str> for Key {
    fn from(s: &str) -> Self {
        Self::new(s)
    }
}

impl From<String> for Key {
    fn from(s: String) -> Self {
        s.into_bytes().into()
    }
}

impl From<&[u8]> for Key {
    fn from(b: &[u8]) -> Self {
        Self::new(b)
    }
}

impl From<Vec<u8>> for Key {
    fn from(b: Vec<u8>) -> Self {
        if b.len() <= INLINE_KEY {
            Self::new(b)
        } else {
            Self(Repr::Heap(b.into_boxed_slice()))
        }
    }
}

/// What an extractor may look at: a request's method, URI, headers and extensions, borrowed;
/// and, when some rule or the cost estimator asked for it ([`KeyExtractor::needs_body`],
/// [`crate::cost::CostEstimator::needs_body`]), the buffered body and its JSON parse (done
/// once per request, shared by every rule).
#[derive(Debug, Clone, Copy)]
pub struct RequestView<'a> {
    method: &'a Method,
    uri: &'a Uri,
    headers: &'a HeaderMap,
    extensions: &'a Extensions,
    body: Option<&'a Bytes>,
    json: Option<&'a serde_json::Value>,
    /// The layer's parse of the body (when it read one).
    doc: Option<&'a Json<'a>>,
    /// The body as a `serde_json::Value`, parsed the first time [`Self::json`] asks.
    lazy_json: Option<&'a OnceLock<Option<serde_json::Value>>>,
}

impl<'a> RequestView<'a> {
    /// A view of `req`.
    pub fn from_request<B>(req: &'a Request<B>) -> Self {
        Self {
            method: req.method(),
            uri: req.uri(),
            headers: req.headers(),
            extensions: req.extensions(),
            body: None,
            json: None,
            doc: None,
            lazy_json: None,
        }
    }

    /// A view of request parts.
    pub fn from_parts(parts: &'a http::request::Parts) -> Self {
        Self {
            method: &parts.method,
            uri: &parts.uri,
            headers: &parts.headers,
            extensions: &parts.extensions,
            body: None,
            json: None,
            doc: None,
            lazy_json: None,
        }
    }

    /// The same view with the buffered body and, if it parsed as JSON, its value. With
    /// `json` `None`, the built-in estimators and extractors parse `body` themselves (what
    /// the layer does once per request).
    pub fn with_body(self, body: &'a Bytes, json: Option<&'a serde_json::Value>) -> Self {
        Self {
            body: Some(body),
            json,
            ..self
        }
    }

    /// The view of a body the layer parsed into `doc` (`None`: not JSON).
    pub(crate) fn with_parsed_body(
        self,
        body: &'a Bytes,
        doc: Option<&'a Json<'a>>,
        lazy_json: &'a OnceLock<Option<serde_json::Value>>,
    ) -> Self {
        Self {
            body: Some(body),
            doc,
            lazy_json: Some(lazy_json),
            ..self
        }
    }

    /// The parsed body, borrowed: the layer's parse, else the `serde_json::Value` given to
    /// [`Self::with_body`], viewed as one.
    pub(crate) fn doc(&self) -> Option<Cow<'a, Json<'a>>> {
        if let Some(doc) = self.doc {
            return Some(Cow::Borrowed(doc));
        }
        if let Some(v) = self.json {
            return Some(Cow::Owned(Json::from_value(v)));
        }
        if self.lazy_json.is_some() {
            // The layer found the body isn't JSON.
            return None;
        }
        // A view built with `with_body(bytes, None)`: parse the bytes here.
        Json::parse(self.body?).ok().map(Cow::Owned)
    }

    /// The buffered request body, when the layer inspected it.
    pub fn body(&self) -> Option<&'a Bytes> {
        self.body
    }

    /// The request body parsed as JSON, when the layer inspected it and it is JSON.
    ///
    /// The layer deserializes the body with serde_json into a borrowed document for the
    /// built-in estimators and extractors; this `serde_json::Value` is built the first time it is asked for (once per
    /// request), so only what reads it pays for it.
    pub fn json(&self) -> Option<&'a serde_json::Value> {
        if self.json.is_some() {
            return self.json;
        }
        let (cell, body) = (self.lazy_json?, self.body?);
        // The layer's parse said whether the body is JSON.
        self.doc?;
        cell.get_or_init(|| serde_json::from_slice(body).ok())
            .as_ref()
    }

    /// The method.
    pub fn method(&self) -> &'a Method {
        self.method
    }

    /// The URI.
    pub fn uri(&self) -> &'a Uri {
        self.uri
    }

    /// The headers.
    pub fn headers(&self) -> &'a HeaderMap {
        self.headers
    }

    /// The extensions (connect info, values set by earlier layers such as an auth layer).
    pub fn extensions(&self) -> &'a Extensions {
        self.extensions
    }
}

/// Picks a rule's bucket from a request. See the [module docs](self).
pub trait KeyExtractor: Send + Sync + 'static {
    /// The key, or `None` when the request has none (an empty key also counts as none).
    fn extract(&self, req: &RequestView<'_>) -> Option<Key>;

    /// What the key is, for error messages: "header `x-api-key`".
    fn describe(&self) -> String;

    /// The status of the rejection when the key is missing and the rule's policy is
    /// [`crate::MissingKey::Reject`].
    fn missing_status(&self) -> StatusCode {
        StatusCode::BAD_REQUEST
    }

    /// Checked once by [`crate::RateLimitLayerBuilder::build`]: a problem with the
    /// extractor's own configuration (a bad header name, a bad CIDR).
    fn validate(&self) -> Result<(), String> {
        Ok(())
    }

    /// True when the key comes from the request body ([`RequestView::json`]): the layer then
    /// buffers the body (bounded) before deciding.
    fn needs_body(&self) -> bool {
        false
    }
}

impl<K: KeyExtractor + ?Sized> KeyExtractor for Arc<K> {
    fn extract(&self, req: &RequestView<'_>) -> Option<Key> {
        (**self).extract(req)
    }
    fn describe(&self) -> String {
        (**self).describe()
    }
    fn missing_status(&self) -> StatusCode {
        (**self).missing_status()
    }
    fn validate(&self) -> Result<(), String> {
        (**self).validate()
    }
    fn needs_body(&self) -> bool {
        (**self).needs_body()
    }
}

/// Combinators for every [`KeyExtractor`].
pub trait KeyExtractorExt: KeyExtractor + Sized {
    /// A composite key: one bucket per `(self, other)` pair (e.g. user x model). Missing when
    /// either part is missing.
    fn and<K: KeyExtractor>(self, other: K) -> Composite<Self, K> {
        Composite::new(self, other)
    }
}

impl<K: KeyExtractor> KeyExtractorExt for K {}

/// A view can be held across an `.await` in a `Send` future (a status endpoint does).
const _: () = {
    const fn send_sync<T: Send + Sync>() {}
    send_sync::<RequestView<'static>>();
};

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Inline or on the heap, a key is its bytes: equality, order and hash agree with
        /// them, and every constructor gives the same key.
        #[test]
        fn a_key_is_its_bytes(a in proptest::collection::vec(any::<u8>(), 0..48),
                              b in proptest::collection::vec(any::<u8>(), 0..48)) {
            use std::hash::BuildHasher;
            let (ka, kb) = (Key::new(&a), Key::new(&b));
            prop_assert_eq!(ka.as_bytes(), &a[..]);
            prop_assert_eq!(ka.is_anonymous(), a.is_empty());
            prop_assert_eq!(&Key::from(a.clone()), &ka);
            prop_assert_eq!(&Key::from(&a[..]), &ka);
            prop_assert_eq!(ka == kb, a == b);
            prop_assert_eq!(ka.cmp(&kb), a.cmp(&b));
            let s = std::hash::RandomState::new();
            prop_assert_eq!(s.hash_one(&ka), s.hash_one(&a[..]));
        }
    }

    #[test]
    fn short_keys_are_inline_and_long_ones_on_the_heap() {
        assert!(matches!(Key::new([7; INLINE_KEY]).0, Repr::Inline { .. }));
        assert!(matches!(Key::new([7; INLINE_KEY + 1]).0, Repr::Heap(_)));
        assert!(matches!(
            Key::from(vec![7; INLINE_KEY]).0,
            Repr::Inline { .. }
        ));
        assert_eq!(std::mem::size_of::<Key>(), 24);
        assert_eq!(Key::anonymous(), Key::new(""));
    }
}
