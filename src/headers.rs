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
//! `t` the seconds until the bucket is back to full, rounded up. `qu` is added for token rules
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

use std::fmt::Write as _;
use std::time::Duration;

use http::header::{HeaderName, HeaderValue, RETRY_AFTER};
use http::HeaderMap;

use crate::algorithm::Snapshot;
use crate::rule::{Algorithm, Quota, Unit};

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

/// One rule's state, as the headers report it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RuleState<'a> {
    pub(crate) rule: &'a str,
    pub(crate) quota: &'a Quota,
    pub(crate) snapshot: Snapshot,
}

/// Which units an OpenAI header family reports.
type UnitGroup = fn(Unit) -> bool;

static RATELIMIT_POLICY: HeaderName = HeaderName::from_static("ratelimit-policy");
static RATELIMIT: HeaderName = HeaderName::from_static("ratelimit");
static RETRY_AFTER_MS: HeaderName = HeaderName::from_static("retry-after-ms");

fn ceil_secs(d: Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

/// Writes the headers for `rules` into `headers`.
pub(crate) fn write(headers: &mut HeaderMap, style: HeaderStyle, rules: &[RuleState<'_>]) {
    if rules.is_empty() {
        return;
    }
    if style.ietf {
        let mut policy = String::with_capacity(48 * rules.len());
        let mut state = String::with_capacity(32 * rules.len());
        for (i, r) in rules.iter().enumerate() {
            if i > 0 {
                policy.push_str(", ");
                state.push_str(", ");
            }
            // Rule names are checked at build time to be printable ASCII without `"` or `\`,
            // so they are valid sf-strings as they are (RFC 9651 section 3.3.3).
            let _ = write!(policy, "\"{}\";q={}", r.rule, r.snapshot.limit);
            if r.quota.algorithm() == Algorithm::Concurrency {
                // The draft's unit for in-flight limits; they have no window.
                policy.push_str(";qu=\"concurrent-requests\"");
            } else {
                let _ = write!(policy, ";w={}", ceil_secs(r.quota.window()).max(1));
                if r.quota.unit() != Unit::Requests {
                    let _ = write!(policy, ";qu=\"{}\"", r.quota.unit());
                }
            }
            let reset = Duration::from_nanos(r.snapshot.reset_after_nanos);
            let _ = write!(
                state,
                "\"{}\";r={};t={}",
                r.rule,
                r.snapshot.remaining,
                ceil_secs(reset)
            );
        }
        insert(headers, RATELIMIT_POLICY.clone(), policy);
        insert(headers, RATELIMIT.clone(), state);
    }
    if style.openai {
        let groups: [(UnitGroup, [&'static str; 3]); 2] = [
            (
                |u| u == Unit::Requests,
                [
                    "x-ratelimit-limit-requests",
                    "x-ratelimit-remaining-requests",
                    "x-ratelimit-reset-requests",
                ],
            ),
            (
                |u| matches!(u, Unit::Tokens | Unit::InputTokens | Unit::OutputTokens),
                [
                    "x-ratelimit-limit-tokens",
                    "x-ratelimit-remaining-tokens",
                    "x-ratelimit-reset-tokens",
                ],
            ),
        ];
        for (in_group, names) in groups {
            let tightest = rules
                .iter()
                .filter(|r| {
                    in_group(r.quota.unit()) && r.quota.algorithm() != Algorithm::Concurrency
                })
                .min_by_key(|r| r.snapshot.remaining);
            if let Some(r) = tightest {
                let s = &r.snapshot;
                headers.insert(HeaderName::from_static(names[0]), s.limit.into());
                headers.insert(HeaderName::from_static(names[1]), s.remaining.into());
                insert(
                    headers,
                    HeaderName::from_static(names[2]),
                    go_duration(Duration::from_nanos(s.reset_after_nanos)),
                );
            }
        }
    }
}

/// Writes `Retry-After` and `retry-after-ms` for a denial.
pub(crate) fn write_retry_after(headers: &mut HeaderMap, retry_after: Duration) {
    headers.insert(RETRY_AFTER, ceil_secs(retry_after).max(1).into());
    let ms = retry_after.as_nanos().div_ceil(1_000_000).max(1);
    headers.insert(
        RETRY_AFTER_MS.clone(),
        HeaderValue::from(u64::try_from(ms).unwrap_or(u64::MAX)),
    );
}

fn insert(headers: &mut HeaderMap, name: HeaderName, value: String) {
    // Every value built here is ASCII digits, letters and sf punctuation.
    if let Ok(v) = HeaderValue::try_from(value) {
        headers.insert(name, v);
    }
}

/// A duration as Go's `time.Duration.String()` prints it, rounded to the millisecond (up,
/// so a client waiting that long is never early): `6m0s`, `1.5s`, `12ms`, `0s`.
pub fn go_duration(d: Duration) -> String {
    let ms = d.as_nanos().div_ceil(1_000_000);
    if ms == 0 {
        return "0s".to_owned();
    }
    if ms < 1000 {
        return format!("{ms}ms");
    }
    let (h, rest) = (ms / 3_600_000, ms % 3_600_000);
    let (m, rest) = (rest / 60_000, rest % 60_000);
    let (s, frac) = (rest / 1000, rest % 1000);
    let mut out = String::with_capacity(16);
    if h > 0 {
        let _ = write!(out, "{h}h");
    }
    if h > 0 || m > 0 {
        let _ = write!(out, "{m}m");
    }
    let _ = write!(out, "{s}");
    if frac > 0 {
        let f = format!("{frac:03}");
        let _ = write!(out, ".{}", f.trim_end_matches('0'));
    }
    out.push('s');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_durations() {
        for (ms, want) in [
            (0, "0s"),
            (1, "1ms"),
            (999, "999ms"),
            (1000, "1s"),
            (1001, "1.001s"),
            (1_500, "1.5s"),
            (60_000, "1m0s"),
            (61_250, "1m1.25s"),
            (3_600_000, "1h0m0s"),
            (3_660_000, "1h1m0s"),
        ] {
            assert_eq!(go_duration(Duration::from_millis(ms)), want);
        }
        assert_eq!(go_duration(Duration::from_nanos(1)), "1ms", "rounds up");
    }

    #[test]
    fn both_styles() {
        let rpm = Quota::per_minute(60);
        let tpm = Quota::per_minute(100_000).tokens();
        let snap = |limit, remaining, reset_s: u64| Snapshot {
            limit,
            remaining,
            reset_after_nanos: reset_s * 1_000_000_000 + 1,
        };
        let rules = [
            RuleState {
                rule: "user-rpm",
                quota: &rpm,
                snapshot: snap(60, 59, 1),
            },
            RuleState {
                rule: "user-tpm",
                quota: &tpm,
                snapshot: snap(100_000, 98_800, 60),
            },
        ];
        let mut h = HeaderMap::new();
        write(&mut h, HeaderStyle::BOTH, &rules);
        assert_eq!(
            h["ratelimit-policy"],
            r#""user-rpm";q=60;w=60, "user-tpm";q=100000;w=60;qu="tokens""#
        );
        assert_eq!(
            h["ratelimit"],
            r#""user-rpm";r=59;t=2, "user-tpm";r=98800;t=61"#
        );
        assert_eq!(h["x-ratelimit-remaining-requests"], "59");
        assert_eq!(h["x-ratelimit-reset-requests"], "1.001s");
        assert_eq!(h["x-ratelimit-limit-tokens"], "100000");
        assert_eq!(h["x-ratelimit-reset-tokens"], "1m0.001s");

        let mut h = HeaderMap::new();
        write(&mut h, HeaderStyle::OPENAI, &rules);
        assert!(!h.contains_key("ratelimit"));
        write_retry_after(&mut h, Duration::from_millis(1));
        assert_eq!(h["retry-after"], "1");
        assert_eq!(h["retry-after-ms"], "1");
    }
}
