//! The built-in extractors: header, bearer token, global, closure, JSON body field,
//! composite. (The client IP lives in `ip.rs`.)

use std::fmt;

use http::header::{HeaderName, AUTHORIZATION};
use http::StatusCode;

use super::{Key, KeyExtractor, RequestView};
use crate::document::Json;

/// Credential headers whose absence answers 401 rather than 400.
const CREDENTIAL_HEADERS: [&str; 4] = [
    "authorization",
    "proxy-authorization",
    "x-api-key",
    "api-key",
];

/// The value of a request header as the key. See [`header`].
#[derive(Debug, Clone)]
pub struct Header {
    name: Result<HeaderName, String>,
    missing_status: Option<StatusCode>,
}

/// Keys by the value of header `name` (case-insensitive). A bad header name is reported by
/// [`crate::RateLimitLayerBuilder::build`].
pub fn header(name: &str) -> Header {
    Header {
        name: HeaderName::try_from(name).map_err(|_| format!("invalid header name {name:?}")),
        missing_status: None,
    }
}

impl Header {
    /// The status answered when the header is missing (default: 401 for credential headers,
    /// 400 for others).
    pub fn status_when_missing(mut self, status: StatusCode) -> Self {
        self.missing_status = Some(status);
        self
    }
}

impl KeyExtractor for Header {
    #[inline]
    fn extract(&self, req: &RequestView<'_>) -> Option<Key> {
        let value = req.headers().get(self.name.as_ref().ok()?)?.as_bytes();
        let value = value.trim_ascii();
        (!value.is_empty()).then(|| Key::new(value))
    }

    fn describe(&self) -> String {
        match &self.name {
            Ok(n) => format!("header `{n}`"),
            Err(e) => e.clone(),
        }
    }

    fn missing_status(&self) -> StatusCode {
        self.missing_status.unwrap_or_else(|| match &self.name {
            Ok(n) if CREDENTIAL_HEADERS.contains(&n.as_str()) => StatusCode::UNAUTHORIZED,
            _ => StatusCode::BAD_REQUEST,
        })
    }

    fn validate(&self) -> Result<(), String> {
        self.name.as_ref().map(|_| ()).map_err(Clone::clone)
    }
}

/// The token of `Authorization: Bearer <token>`. See [`bearer_token`].
#[derive(Debug, Clone, Copy, Default)]
pub struct BearerToken(());

/// Keys by the bearer token (RFC 6750 section 2.1; the scheme is case-insensitive). Missing
/// (no header, another scheme, empty token) answers 401.
pub fn bearer_token() -> BearerToken {
    BearerToken(())
}

impl KeyExtractor for BearerToken {
    #[inline]
    fn extract(&self, req: &RequestView<'_>) -> Option<Key> {
        let value = req.headers().get(AUTHORIZATION)?.as_bytes();
        let (scheme, token) = value.split_at_checked(6)?;
        if !scheme.eq_ignore_ascii_case(b"bearer") || !token.first()?.is_ascii_whitespace() {
            return None;
        }
        let token = token.trim_ascii();
        (!token.is_empty()).then(|| Key::new(token))
    }

    fn describe(&self) -> String {
        "bearer token".to_owned()
    }

    fn missing_status(&self) -> StatusCode {
        StatusCode::UNAUTHORIZED
    }
}

/// One key for every request. See [`global`].
#[derive(Debug, Clone, Copy, Default)]
pub struct Global(());

/// One bucket for all requests (a model's global TPM, a service-wide RPM).
pub fn global() -> Global {
    Global(())
}

impl KeyExtractor for Global {
    #[inline]
    fn extract(&self, _: &RequestView<'_>) -> Option<Key> {
        Some(Key::new(b"*"))
    }

    fn describe(&self) -> String {
        "global".to_owned()
    }
}

/// A key computed by a closure. See [`from_fn`].
#[derive(Clone)]
pub struct FromFn<F> {
    f: F,
    description: String,
}

/// Keys by what `f` returns (`None` or an empty key: missing).
pub fn from_fn<F, K>(f: F) -> FromFn<F>
where
    F: Fn(&RequestView<'_>) -> Option<K> + Send + Sync + 'static,
    K: Into<Key>,
{
    FromFn {
        f,
        description: "custom key".to_owned(),
    }
}

impl<F> FromFn<F> {
    /// How error messages name this key (default "custom key").
    pub fn describe_as(mut self, description: impl Into<String>) -> Self {
        self.description = description.into();
        self
    }
}

impl<F> fmt::Debug for FromFn<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FromFn")
            .field("description", &self.description)
            .finish_non_exhaustive()
    }
}

impl<F, K> KeyExtractor for FromFn<F>
where
    F: Fn(&RequestView<'_>) -> Option<K> + Send + Sync + 'static,
    K: Into<Key>,
{
    fn extract(&self, req: &RequestView<'_>) -> Option<Key> {
        (self.f)(req).map(Into::into).filter(|k| !k.is_anonymous())
    }

    fn describe(&self) -> String {
        self.description.clone()
    }
}

/// A field of the JSON request body. See [`json_field`].
#[derive(Debug, Clone)]
pub struct JsonField {
    pointer: String,
}

/// Keys by a field of the JSON request body, e.g. `json_field("model")` for per-model
/// limits. `field` is a top-level field name, or a JSON pointer (RFC 6901) when it starts
/// with `/` (`"/metadata/user_id"`). Strings are used as they are, numbers and booleans as
/// written; a missing field, `null`, an object or an array is missing. The layer reads and
/// parses the body once for every rule that needs it (bounded by
/// [`crate::RateLimitLayerBuilder::max_inspect_bytes`]).
pub fn json_field(field: &str) -> JsonField {
    let pointer = if field.starts_with('/') {
        field.to_owned()
    } else {
        // A plain name as a one-step pointer: escape `~` and `/` (RFC 6901 section 3).
        format!("/{}", field.replace('~', "~0").replace('/', "~1"))
    };
    JsonField { pointer }
}

impl KeyExtractor for JsonField {
    fn extract(&self, req: &RequestView<'_>) -> Option<Key> {
        match req.doc()?.pointer(&self.pointer)? {
            Json::String(s) => (!s.is_empty()).then(|| Key::new(s.as_bytes())),
            Json::Number(n) => Some(Key::from(n.to_string())),
            Json::Bool(b) => Some(Key::from(b.to_string())),
            _ => None,
        }
    }

    fn describe(&self) -> String {
        format!("JSON body field `{}`", self.pointer)
    }

    fn needs_body(&self) -> bool {
        true
    }
}

/// Two keys combined. See [`KeyExtractorExt::and`](super::KeyExtractorExt::and).
#[derive(Debug, Clone)]
pub struct Composite<A, B>(A, B);

impl<A, B> Composite<A, B> {
    pub(super) fn new(a: A, b: B) -> Self {
        Self(a, b)
    }
}

impl<A: KeyExtractor, B: KeyExtractor> KeyExtractor for Composite<A, B> {
    fn extract(&self, req: &RequestView<'_>) -> Option<Key> {
        let a = self.0.extract(req)?;
        let b = self.1.extract(req)?;
        // Length-prefixing the first part makes the encoding injective: ("ab", "c") and
        // ("a", "bc") land in different buckets.
        let mut bytes = Vec::with_capacity(a.as_bytes().len() + b.as_bytes().len() + 8);
        bytes.extend_from_slice((a.as_bytes().len() as u64).to_string().as_bytes());
        bytes.push(b':');
        bytes.extend_from_slice(a.as_bytes());
        bytes.extend_from_slice(b.as_bytes());
        Some(Key::from(bytes))
    }

    fn describe(&self) -> String {
        format!("{} x {}", self.0.describe(), self.1.describe())
    }

    fn missing_status(&self) -> StatusCode {
        // The first part is usually the credential; report its status unless only the
        // second can be missing.
        self.0.missing_status()
    }

    fn validate(&self) -> Result<(), String> {
        self.0.validate().and(self.1.validate())
    }

    fn needs_body(&self) -> bool {
        self.0.needs_body() || self.1.needs_body()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::key::KeyExtractorExt;
    use bytes::Bytes;
    use http::Request;

    fn view_of(req: &Request<()>) -> RequestView<'_> {
        RequestView::from_request(req)
    }

    #[test]
    fn header_trims_and_treats_empty_as_missing() {
        let req = Request::builder()
            .header("x-api-key", "  k1 ")
            .body(())
            .unwrap();
        assert_eq!(
            header("X-Api-Key").extract(&view_of(&req)),
            Some(Key::from("k1"))
        );
        let req = Request::builder()
            .header("x-api-key", "  ")
            .body(())
            .unwrap();
        assert_eq!(header("x-api-key").extract(&view_of(&req)), None);
        assert_eq!(
            header("x-api-key").missing_status(),
            StatusCode::UNAUTHORIZED
        );
        assert_eq!(header("x-model").missing_status(), StatusCode::BAD_REQUEST);
        assert!(header("bad name").validate().is_err());
    }

    #[test]
    fn bearer_token_parsing() {
        let cases: [(&str, Option<&str>); 6] = [
            ("Bearer abc", Some("abc")),
            ("bearer   abc  ", Some("abc")),
            ("BEARER\tabc", Some("abc")),
            ("Basic abc", None),
            ("Bearer ", None),
            ("Bearerabc", None),
        ];
        for (value, want) in cases {
            let req = Request::builder()
                .header("authorization", value)
                .body(())
                .unwrap();
            let got = bearer_token().extract(&view_of(&req));
            assert_eq!(got, want.map(Key::from), "{value:?}");
        }
    }

    #[test]
    fn composite_is_injective() {
        let k = |a: &'static str, b: &'static str| {
            let req = Request::builder()
                .header("a", a)
                .header("b", b)
                .body(())
                .unwrap();
            header("a").and(header("b")).extract(&view_of(&req))
        };
        assert_ne!(k("ab", "c"), k("a", "bc"));
        assert_eq!(k("ab", "c"), k("ab", "c"));
        let req = Request::builder().header("a", "x").body(()).unwrap();
        assert_eq!(header("a").and(header("b")).extract(&view_of(&req)), None);
    }

    #[test]
    fn json_fields() {
        let req = Request::new(());
        let body = Bytes::from_static(b"{}");
        let json = serde_json::json!({"model": "gpt-4o", "n": 2, "meta": {"a/b": "x"}, "e": ""});
        let view = view_of(&req).with_body(&body, Some(&json));
        assert_eq!(
            json_field("model").extract(&view),
            Some(Key::from("gpt-4o"))
        );
        assert_eq!(json_field("n").extract(&view), Some(Key::from("2")));
        assert_eq!(
            json_field("/meta/a~1b").extract(&view),
            Some(Key::from("x"))
        );
        assert_eq!(json_field("meta").extract(&view), None);
        assert_eq!(json_field("e").extract(&view), None);
        assert_eq!(json_field("model").extract(&view_of(&req)), None);
        assert!(json_field("model").needs_body());
        assert!(header("a").and(json_field("model")).needs_body());
    }

    #[test]
    fn from_fn_and_global() {
        let req = Request::builder().uri("/v1/x").body(()).unwrap();
        let f = from_fn(|r: &RequestView<'_>| Some(r.uri().path().to_owned()));
        assert_eq!(f.extract(&view_of(&req)), Some(Key::from("/v1/x")));
        let empty = from_fn(|_: &RequestView<'_>| Some(""));
        assert_eq!(empty.extract(&view_of(&req)), None);
        assert!(global().extract(&view_of(&req)).is_some());
    }
}
