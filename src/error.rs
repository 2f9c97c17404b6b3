//! Configuration errors, reported once by [`crate::RateLimitLayerBuilder::build`].

use std::fmt;
use std::time::Duration;

/// What is wrong with a layer's configuration. Every variant names the rule (and tier) at
/// fault.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum BuildError {
    /// The layer has no rule.
    NoRules,
    /// A rule's name is empty, or not printable ASCII, or contains `"` or `\` (names appear
    /// in headers as structured-field strings).
    InvalidRuleName {
        /// The name.
        rule: String,
    },
    /// Two rules share a name.
    DuplicateRule {
        /// The name.
        rule: String,
    },
    /// A quota's limit is 0.
    ZeroLimit {
        /// The rule.
        rule: String,
        /// The tier, or `None` for the base quota.
        tier: Option<String>,
    },
    /// A quota's window is 0 (or shorter than a nanosecond).
    ZeroWindow {
        /// The rule.
        rule: String,
        /// The tier, or `None` for the base quota.
        tier: Option<String>,
    },
    /// A burst on a quota whose algorithm is not GCRA, or a burst of 0.
    InvalidBurst {
        /// The rule.
        rule: String,
        /// The tier, or `None` for the base quota.
        tier: Option<String>,
        /// Why.
        reason: &'static str,
    },
    /// A tier's quota differs from the rule's base quota in something tiers must share.
    TierMismatch {
        /// The rule.
        rule: String,
        /// The tier.
        tier: String,
        /// What differs, and how.
        reason: String,
    },
    /// A rule lists the same tier twice.
    DuplicateTier {
        /// The rule.
        rule: String,
        /// The tier.
        tier: String,
    },
    /// A rule's key extractor is misconfigured (bad header name, bad CIDR).
    InvalidKey {
        /// The rule.
        rule: String,
        /// What the extractor reported.
        reason: String,
    },
    /// A header name given to the layer (e.g. the idempotency header) is not valid.
    InvalidHeaderName {
        /// The name given.
        name: String,
    },
    /// A rule's [`crate::capacity::Capacity`] is misconfigured, or set on a rule that is
    /// not a concurrency rule.
    InvalidCapacity {
        /// The rule.
        rule: String,
        /// What is wrong.
        reason: String,
    },
    /// A token rule, but no [`crate::cost::CostEstimator`] to estimate tokens with.
    MissingCostEstimator {
        /// The rule.
        rule: String,
    },
    /// A replica id ([`crate::RateLimitLayerBuilder::replica_id`]) that is empty or contains
    /// `@`: adaptive buckets are keyed `{key}@{replica}`, so `m@r2` on replica `r1` and `m`
    /// on replica `r2@r1` would share one.
    InvalidReplicaId {
        /// The id.
        id: String,
    },
}

fn tier_of(tier: &Option<String>) -> String {
    match tier {
        Some(t) => format!(" (tier `{t}`)"),
        None => String::new(),
    }
}

impl fmt::Display for BuildError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BuildError::NoRules => f.write_str("a rate-limit layer needs at least one rule"),
            BuildError::InvalidRuleName { rule } => write!(
                f,
                "rule name {rule:?} must be non-empty printable ASCII without '\"' or '\\'"
            ),
            BuildError::DuplicateRule { rule } => {
                write!(f, "two rules are named `{rule}`; rule names must be unique")
            }
            BuildError::ZeroLimit { rule, tier } => {
                write!(
                    f,
                    "limit must be > 0, got 0 for rule `{rule}`{}",
                    tier_of(tier)
                )
            }
            BuildError::ZeroWindow { rule, tier } => write!(
                f,
                "window must be > 0, got {:?} for rule `{rule}`{}",
                Duration::ZERO,
                tier_of(tier)
            ),
            BuildError::InvalidBurst { rule, tier, reason } => {
                write!(
                    f,
                    "invalid burst for rule `{rule}`{}: {reason}",
                    tier_of(tier)
                )
            }
            BuildError::TierMismatch { rule, tier, reason } => {
                write!(f, "tier `{tier}` of rule `{rule}`: {reason}")
            }
            BuildError::DuplicateTier { rule, tier } => {
                write!(f, "rule `{rule}` lists tier `{tier}` twice")
            }
            BuildError::InvalidKey { rule, reason } => {
                write!(f, "key of rule `{rule}`: {reason}")
            }
            BuildError::InvalidHeaderName { name } => {
                write!(f, "{name:?} is not a valid header name")
            }
            BuildError::InvalidCapacity { rule, reason } => {
                write!(f, "capacity of rule `{rule}`: {reason}")
            }
            BuildError::MissingCostEstimator { rule } => write!(
                f,
                "rule `{rule}` counts tokens but the layer has no cost estimator; \
                 set one with `.cost(..)`"
            ),
            BuildError::InvalidReplicaId { id } => write!(
                f,
                "replica id must be non-empty and without `@`, got {id:?}"
            ),
        }
    }
}

impl std::error::Error for BuildError {}
