//! Tiers (QoS classes such as free / standard / premium): which quota of a rule applies.
//!
//! A layer has at most one [`TierResolver`]; it runs once per request and names the caller's
//! tier. Each rule then applies the quota it lists for that tier ([`crate::Rule::tier`]), or
//! its base quota when the caller has no tier or a tier the rule doesn't list: **callers
//! without a tier get the base quota**, so make the base quota your most restrictive one.
//!
//! | built-in | where the tier comes from |
//! |---|---|
//! | [`extension`] | a [`Tier`] value in the request extensions, set by an auth layer before this one |
//! | [`header`] | a request header; trust it only when a gateway in front sets it and strips it from clients |
//! | [`lookup`] | a table from a key (e.g. the API key) to a tier |
//! | [`from_fn`] | a closure |
//!
//! # Examples
//!
//! ```
//! use http::Request;
//! use tower_llm_ratelimit::key::{self, RequestView};
//! use tower_llm_ratelimit::tier::{self, Tier, TierResolver};
//!
//! let tiers = tier::lookup(key::bearer_token(), [("sk-pro", "pro"), ("sk-free", "free")]);
//! let req = Request::builder().header("authorization", "Bearer sk-pro").body(()).unwrap();
//! assert_eq!(tiers.resolve(&RequestView::from_request(&req)), Some(Tier::new("pro")));
//!
//! let mut req = Request::new(());
//! req.extensions_mut().insert(Tier::new("free"));
//! let from_auth = tier::extension();
//! assert_eq!(from_auth.resolve(&RequestView::from_request(&req)).unwrap().as_str(), "free");
//! ```

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use http::HeaderName;

use crate::key::{Key, KeyExtractor, RequestView};

/// A tier's name. Cheap to clone; also the request-extension type read by [`extension`].
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Tier(Arc<str>);

impl Tier {
    /// The tier named `name`.
    pub fn new(name: impl Into<Arc<str>>) -> Self {
        Self(name.into())
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Tier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Tier({})", self.0)
    }
}

impl fmt::Display for Tier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Names the caller's tier, once per request.
pub trait TierResolver: Send + Sync + 'static {
    /// The tier, or `None` for callers without one (they get each rule's base quota).
    fn resolve(&self, req: &RequestView<'_>) -> Option<Tier>;
}

/// Reads [`Tier`] from the request extensions. See [`extension`].
#[derive(Debug, Clone, Copy, Default)]
pub struct FromExtension(());

/// The tier an earlier layer stored as a [`Tier`] request extension.
pub fn extension() -> FromExtension {
    FromExtension(())
}

impl TierResolver for FromExtension {
    fn resolve(&self, req: &RequestView<'_>) -> Option<Tier> {
        req.extensions().get::<Tier>().cloned()
    }
}

/// Reads the tier from a header. See [`header`].
#[derive(Debug, Clone)]
pub struct FromHeader(HeaderName);

/// The tier named by header `name`. Only safe when a trusted component sets the header and
/// strips it from client requests, otherwise clients choose their own tier.
///
/// # Panics
///
/// If `name` is not a valid header name (a programming error, caught by the first test).
pub fn header(name: &'static str) -> FromHeader {
    FromHeader(HeaderName::from_static(name))
}

impl TierResolver for FromHeader {
    fn resolve(&self, req: &RequestView<'_>) -> Option<Tier> {
        let v = req.headers().get(&self.0)?.to_str().ok()?.trim();
        (!v.is_empty()).then(|| Tier::new(v))
    }
}

/// A table from key to tier. See [`lookup`].
pub struct Lookup {
    key: Box<dyn KeyExtractor>,
    table: HashMap<Key, Tier>,
}

/// The tier of the caller's key in `table` (e.g. API key → tier); keys not in the table have
/// no tier.
pub fn lookup<K, T>(key: impl KeyExtractor, table: impl IntoIterator<Item = (K, T)>) -> Lookup
where
    K: Into<Key>,
    T: Into<Arc<str>>,
{
    Lookup {
        key: Box::new(key),
        table: table
            .into_iter()
            .map(|(k, t)| (k.into(), Tier::new(t)))
            .collect(),
    }
}

impl fmt::Debug for Lookup {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Lookup")
            .field("key", &self.key.describe())
            .field("entries", &self.table.len())
            .finish()
    }
}

impl TierResolver for Lookup {
    fn resolve(&self, req: &RequestView<'_>) -> Option<Tier> {
        self.table.get(&self.key.extract(req)?).cloned()
    }
}

/// A tier computed by a closure. See [`from_fn`].
#[derive(Clone)]
pub struct FromFn<F>(F);

/// The tier `f` names.
pub fn from_fn<F>(f: F) -> FromFn<F>
where
    F: Fn(&RequestView<'_>) -> Option<Tier> + Send + Sync + 'static,
{
    FromFn(f)
}

impl<F> fmt::Debug for FromFn<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("tier::FromFn")
    }
}

impl<F> TierResolver for FromFn<F>
where
    F: Fn(&RequestView<'_>) -> Option<Tier> + Send + Sync + 'static,
{
    fn resolve(&self, req: &RequestView<'_>) -> Option<Tier> {
        (self.0)(req)
    }
}
