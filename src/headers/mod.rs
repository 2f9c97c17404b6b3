//! Rate-limit response headers.
//!
//! Allowed and denied responses carry the state of every rule applied to the request, in one
//! or both of two styles ([`HeaderStyle`], default both):
//!
//! **IETF** (draft-ietf-httpapi-ratelimit-headers-09, structured fields per RFC 9651), one list
//! item per rule, named by the rule:
//!
//! ```text
//! RateLimit-Policy: "user-rpm";q=60;w=60, "user-tpm";q=100000;w=60;qu="tokens"
//! RateLimit: "user-rpm";r=59;t=2, "user-tpm";r=98800;t=61
//! ```
//! `q` is the quota (the burst for GCRA), `w` the window in seconds, `r` the remaining units,
//! `t` the seconds until the bucket is back to full, rounded up (for a calendar budget,
//! [`crate::Quota::per_calendar_day`] and kin: until the period ends, the next UTC midnight
//! or 1st of the month, whatever it holds; its `w` is the period's longest length, 86400 for
//! a day, 2678400 for a month). `qu` is added for token rules
//! (the draft's registered units are requests, bytes and concurrent requests; tokens are this
//! crate's extension, so a client never reads a token quota as requests).
//!
//! **OpenAI** (what OpenAI's API and SDKs use), for the most constrained request rule and the
//! most constrained token rule (tokens, input tokens or output tokens; lowest remaining):
//!
//! ```text
//! x-ratelimit-limit-requests: 60
//! x-ratelimit-remaining-requests: 59
//! x-ratelimit-reset-requests: 2s
//! x-ratelimit-limit-tokens: 100000
//! x-ratelimit-remaining-tokens: 98800
//! x-ratelimit-reset-tokens: 1m1s
//! ```
//! Resets are Go duration strings (`6m0s`, `1s`, `12ms`), to the millisecond.
//!
//! On admitted responses the values are those right after the request's charge: token rules
//! show the remaining capacity with the *estimate* reserved, before the real usage settles it
//! (headers go out before the body; the IETF draft forbids these fields in trailers).
//!
//! Denials add `Retry-After` (RFC 9110 section 10.2.3; whole seconds, rounded up, never 0)
//! and `retry-after-ms` (read first by OpenAI's SDKs).
//!
//! # Examples
//!
//! ```
//! use std::time::Duration;
//! use tower_llm_ratelimit::headers::{go_duration, HeaderStyle};
//! use tower_llm_ratelimit::{key, Quota, RateLimitLayer, Rule};
//!
//! // Only OpenAI-style headers (the default is both styles).
//! let layer = RateLimitLayer::builder()
//!     .rule(Rule::new("rpm", key::global(), Quota::per_minute(60)))
//!     .headers(HeaderStyle::OPENAI)
//!     .build()
//!     .unwrap();
//! # let _ = layer;
//!
//! assert_eq!(go_duration(Duration::from_secs(360)), "6m0s");
//! assert_eq!(go_duration(Duration::from_millis(12)), "12ms");
//! assert_eq!(go_duration(Duration::from_millis(1500)), "1.5s");
//! assert_eq!(go_duration(Duration::from_secs(7322)), "2h2m2s");
//! ```

mod format;
#[cfg(test)]
mod tests;

use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue, RETRY_AFTER};
use http::HeaderMap;

use crate::algorithm::{Algorithm, Snapshot};
use crate::rule::{Quota, Unit};

pub use self::format::go_duration;
use self::format::{push_go_duration, push_u64, VALUE_BUF};

type UnitGroup = fn(Unit) -> bool;

/// Which rate-limit headers responses carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeaderStyle {
    ietf: bool,
    openai: bool,
}

impl HeaderStyle {
    /// `RateLimit-Policy` and `RateLimit` only.
    pub const IETF: Self = Self {
        ietf: true,
        openai: false,
    };
    /// `x-ratelimit-*` only.
    pub const OPENAI: Self = Self {
        ietf: false,
        openai: true,
    };
    /// Both (the default).
    pub const BOTH: Self = Self {
        ietf: true,
        openai: true,
    };
    /// No rate-limit headers (`Retry-After` is still sent on denials).
    pub const NONE: Self = Self {
        ietf: false,
        openai: false,
    };
}

impl Default for HeaderStyle {
    fn default() -> Self {
        Self::BOTH
    }
}

/// What one quota (a rule's base quota, or one of its tiers') says in the headers, computed
/// once when the layer is built: the `RateLimit-Policy` item and the limit, which don't change
/// from request to request.
#[derive(Debug)]
pub(crate) struct QuotaHeaders {
    /// The capacity a snapshot of this quota reports (the burst for GCRA).
    limit: u64,
    /// `"name";q=..;w=..` (and `;qu=..`): this rule's `RateLimit-Policy` item.
    policy_item: Box<[u8]>,
    /// The item alone as a header value: the whole `RateLimit-Policy` of a one-rule request.
    policy: Option<HeaderValue>,
    /// The limit as a header value (`x-ratelimit-limit-*`).
    limit_value: HeaderValue,
    /// `"name";r=`: how this rule's `RateLimit` item starts.
    state_prefix: Box<[u8]>,
}

impl QuotaHeaders {
    pub(crate) fn new(rule: &str, quota: &Quota) -> Self {
        let limit = match quota.algorithm() {
            Algorithm::Gcra => quota.limits().burst,
            _ => quota.limit(),
        };
        let mut item = Vec::with_capacity(rule.len() + 48);
        policy_item(&mut item, rule, quota, limit);
        let mut state_prefix = Vec::with_capacity(rule.len() + 5);
        state_prefix.push(b'"');
        state_prefix.extend_from_slice(rule.as_bytes());
        state_prefix.extend_from_slice(b"\";r=");
        Self {
            limit,
            policy: HeaderValue::from_bytes(&item).ok(),
            policy_item: item.into_boxed_slice(),
            limit_value: HeaderValue::from(limit),
            state_prefix: state_prefix.into_boxed_slice(),
        }
    }
}

/// The joined `RateLimit-Policy` of requests that apply every rule of the layer, computed
/// once per combination of the rules' quotas a tier selects (the base quotas, and each
/// tier's), when the layer is built.
#[derive(Debug, Default)]
pub(crate) struct JoinedPolicies(Vec<(Box<[usize]>, HeaderValue)>);

impl JoinedPolicies {
    /// `quotas[rule][variant]`; `variants` lists, per tier (and for no tier), the variant of
    /// each rule.
    pub(crate) fn new(
        quotas: &[Vec<QuotaHeaders>],
        variants: impl Iterator<Item = Vec<usize>>,
    ) -> Self {
        let mut joined: Vec<(Box<[usize]>, HeaderValue)> = Vec::new();
        if quotas.len() < 2 {
            return Self(joined);
        }
        for v in variants {
            if joined.iter().any(|(have, _)| **have == *v) {
                continue;
            }
            let mut p = Vec::new();
            for (i, (rule, &variant)) in quotas.iter().zip(&v).enumerate() {
                if i > 0 {
                    p.extend_from_slice(b", ");
                }
                p.extend_from_slice(&rule[variant].policy_item);
            }
            if let Ok(value) = HeaderValue::from_bytes(&p) {
                joined.push((v.into_boxed_slice(), value));
            }
        }
        Self(joined)
    }

    fn get(&self, variants: impl Iterator<Item = usize> + Clone) -> Option<&HeaderValue> {
        self.0
            .iter()
            .find(|(v, _)| v.iter().copied().eq(variants.clone()))
            .map(|(_, value)| value)
    }
}

/// One rule's state after a decision, for the headers.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RuleState<'a> {
    pub(crate) rule: &'a str,
    pub(crate) quota: &'a Quota,
    /// Which of the rule's quotas (see `Rule::variant_for`).
    pub(crate) variant: usize,
    pub(crate) snapshot: Snapshot,
    /// The precomputed parts of this rule's quota.
    pub(crate) cached: &'a QuotaHeaders,
}

/// The rate-limit headers of one response, ready to be added to it: built when the request
/// is decided, written into the response's own header map when it comes (no intermediate
/// map, no rehashing).
///
/// The values that don't change between requests are clones of the layer's precomputed
/// ones; the rest are written into one buffer (one allocation for all of them) and handed
/// out as slices of it.
#[derive(Debug, Default)]
pub(crate) struct RateHeaders {
    /// `RateLimit-Policy`, `x-ratelimit-limit-requests`, `x-ratelimit-limit-tokens`.
    fixed: [Option<HeaderValue>; 3],
    /// `RateLimit`, then remaining and reset of requests, then of tokens.
    values: Bytes,
    /// Each value's range in `values`; empty: not sent.
    spans: [(u32, u32); 5],
}

static FIXED_NAMES: [&HeaderName; 3] = [&RATELIMIT_POLICY, &REQUESTS[0], &TOKENS[0]];
static VALUE_NAMES: [&HeaderName; 5] = [
    &RATELIMIT,
    &REQUESTS[1],
    &REQUESTS[2],
    &TOKENS[1],
    &TOKENS[2],
];

impl RateHeaders {
    /// Adds the headers to `map`, replacing any of the same names.
    pub(crate) fn write_to(self, map: &mut HeaderMap) {
        let fixed = self.fixed.iter().filter(|v| v.is_some()).count();
        let values = self.spans.iter().filter(|(a, b)| a < b).count();
        if fixed + values == 0 {
            return;
        }
        map.reserve(fixed + values);
        for (name, value) in FIXED_NAMES.iter().zip(self.fixed) {
            if let Some(value) = value {
                map.insert(*name, value);
            }
        }
        for (name, &(a, b)) in VALUE_NAMES.iter().zip(&self.spans) {
            if a < b {
                // Rule names are checked at build (printable ASCII without `"` or `\`), the
                // rest is digits and Go duration letters: always valid, checked all the same.
                let v = self.values.slice(a as usize..b as usize);
                if let Ok(v) = HeaderValue::from_maybe_shared(v) {
                    map.insert(*name, v);
                }
            }
        }
    }

    /// The headers as a map of their own.
    pub(crate) fn into_map(self) -> HeaderMap {
        let mut map = HeaderMap::with_capacity(10);
        self.write_to(&mut map);
        map
    }
}

static RATELIMIT_POLICY: HeaderName = HeaderName::from_static("ratelimit-policy");
static RATELIMIT: HeaderName = HeaderName::from_static("ratelimit");
static RETRY_AFTER_MS: HeaderName = HeaderName::from_static("retry-after-ms");
static REQUESTS: [HeaderName; 3] = [
    HeaderName::from_static("x-ratelimit-limit-requests"),
    HeaderName::from_static("x-ratelimit-remaining-requests"),
    HeaderName::from_static("x-ratelimit-reset-requests"),
];
static TOKENS: [HeaderName; 3] = [
    HeaderName::from_static("x-ratelimit-limit-tokens"),
    HeaderName::from_static("x-ratelimit-remaining-tokens"),
    HeaderName::from_static("x-ratelimit-reset-tokens"),
];

fn ceil_secs(d: Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

fn ceil_secs_nanos(nanos: u64) -> u64 {
    nanos.div_ceil(1_000_000_000)
}

/// `"name";q=limit;w=window` (and the unit) into `out`.
fn policy_item(out: &mut Vec<u8>, rule: &str, quota: &Quota, limit: u64) {
    out.push(b'"');
    out.extend_from_slice(rule.as_bytes());
    out.extend_from_slice(b"\";q=");
    push_u64(out, limit);
    if quota.algorithm() == Algorithm::Concurrency {
        out.extend_from_slice(b";qu=\"concurrent-requests\"");
    } else {
        out.extend_from_slice(b";w=");
        push_u64(out, ceil_secs(quota.window()).max(1));
        if quota.unit() != Unit::Requests {
            out.extend_from_slice(b";qu=\"");
            out.extend_from_slice(quota.unit().as_str().as_bytes());
            out.push(b'"');
        }
    }
}

/// The headers of the rules applied to a request, in `style`. `rules` is walked more than
/// once (it is an iterator so callers don't collect one). `joined` answers for requests that
/// apply all `rule_count` rules of the layer.
pub(crate) fn write<'a, I>(
    style: HeaderStyle,
    joined: &JoinedPolicies,
    rule_count: usize,
    rules: I,
) -> RateHeaders
where
    I: Iterator<Item = RuleState<'a>> + Clone,
{
    let mut out = RateHeaders::default();
    if !style.ietf && !style.openai {
        return out;
    }
    let count = rules.clone().count();
    if count == 0 {
        return out;
    }
    let mut buf = Vec::with_capacity(VALUE_BUF);
    let mut span = |buf: &mut Vec<u8>, i: usize, start: usize| {
        // Never over 4 GiB in practice (a value that were would not be sent).
        if let (Ok(a), Ok(b)) = (u32::try_from(start), u32::try_from(buf.len())) {
            out.spans[i] = (a, b);
        }
    };
    if style.ietf {
        let as_built = rules.clone().all(|r| r.cached.limit == r.snapshot.limit);
        let policy = match rules.clone().next() {
            Some(r) if count == 1 && as_built => r.cached.policy.clone(),
            _ if count == rule_count && as_built => {
                joined.get(rules.clone().map(|r| r.variant)).cloned()
            }
            _ => None,
        };
        out.fixed[0] = policy.or_else(|| {
            let mut p =
                Vec::with_capacity(rules.clone().map(|r| r.cached.policy_item.len() + 2).sum());
            for (i, r) in rules.clone().enumerate() {
                if i > 0 {
                    p.extend_from_slice(b", ");
                }
                if r.cached.limit == r.snapshot.limit {
                    p.extend_from_slice(&r.cached.policy_item);
                } else {
                    // A limit other than the quota's (a store's local fallback share).
                    policy_item(&mut p, r.rule, r.quota, r.snapshot.limit);
                }
            }
            HeaderValue::from_maybe_shared(Bytes::from(p)).ok()
        });
        let start = buf.len();
        for (i, r) in rules.clone().enumerate() {
            if i > 0 {
                buf.extend_from_slice(b", ");
            }
            buf.extend_from_slice(&r.cached.state_prefix);
            push_u64(&mut buf, r.snapshot.remaining);
            buf.extend_from_slice(b";t=");
            push_u64(&mut buf, ceil_secs_nanos(r.snapshot.reset_after_nanos));
        }
        span(&mut buf, 0, start);
    }
    if style.openai {
        let groups: [UnitGroup; 2] = [
            |u| u == Unit::Requests,
            |u| matches!(u, Unit::Tokens | Unit::InputTokens | Unit::OutputTokens),
        ];
        for (g, in_group) in groups.into_iter().enumerate() {
            let tightest = rules
                .clone()
                .filter(|r| {
                    in_group(r.quota.unit()) && r.quota.algorithm() != Algorithm::Concurrency
                })
                .min_by_key(|r| r.snapshot.remaining);
            if let Some(r) = tightest {
                let s = &r.snapshot;
                out.fixed[1 + g] = Some(if r.cached.limit == s.limit {
                    r.cached.limit_value.clone()
                } else {
                    HeaderValue::from(s.limit)
                });
                let start = buf.len();
                push_u64(&mut buf, s.remaining);
                span(&mut buf, 1 + 2 * g, start);
                let start = buf.len();
                push_go_duration(&mut buf, Duration::from_nanos(s.reset_after_nanos));
                span(&mut buf, 2 + 2 * g, start);
            }
        }
    }
    out.values = Bytes::from(buf);
    out
}

pub(crate) fn write_retry_after(headers: &mut HeaderMap, retry_after: Duration) {
    headers.insert(RETRY_AFTER, ceil_secs(retry_after).max(1).into());
    let ms = retry_after.as_nanos().div_ceil(1_000_000).max(1);
    headers.insert(
        RETRY_AFTER_MS.clone(),
        HeaderValue::from(u64::try_from(ms).unwrap_or(u64::MAX)),
    );
}
