use super::*;
use crate::error::BuildError;
use crate::key;
use std::time::Duration;

fn build(rules: Vec<Rule>) -> Result<RateLimitLayer, BuildError> {
    RateLimitLayer::builder().rules(rules).build()
}

fn k() -> key::Header {
    key::header("x-api-key")
}

#[test]
fn config_errors_are_typed_and_name_the_rule() {
    assert_eq!(build(vec![]).unwrap_err(), BuildError::NoRules);
    let cases: Vec<(Vec<Rule>, &str)> = vec![
        (
            vec![Rule::new("", k(), Quota::per_minute(1))],
            "rule name \"\"",
        ),
        (
            vec![Rule::new("a\"b", k(), Quota::per_minute(1))],
            "printable ASCII",
        ),
        (
            vec![
                Rule::new("a", k(), Quota::per_minute(1)),
                Rule::new("a", k(), Quota::per_minute(2)),
            ],
            "two rules are named `a`",
        ),
        (
            vec![Rule::new("z", k(), Quota::per_minute(0))],
            "limit must be > 0, got 0 for rule `z`",
        ),
        (
            vec![Rule::new("w", k(), Quota::new(1, Duration::ZERO))],
            "window must be > 0",
        ),
        (
            vec![Rule::new("b", k(), Quota::per_minute(5).burst(3))],
            "only applies to GCRA",
        ),
        (
            vec![Rule::new("b0", k(), Quota::per_minute(5).gcra().burst(0))],
            "burst must be > 0",
        ),
        (
            vec![Rule::new("t", k(), Quota::per_minute(5)).tier("pro", Quota::per_hour(50))],
            "tier `pro` of rule `t`: window",
        ),
        (
            vec![Rule::new("t", k(), Quota::per_minute(5))
                .tier("pro", Quota::per_minute(5).tokens())],
            "counts tokens but the rule counts requests",
        ),
        (
            vec![Rule::new("g", k(), Quota::per_minute(5).gcra())
                .tier("pro", Quota::per_minute(9).gcra())],
            "GCRA tiers share the rule's rate",
        ),
        (
            vec![Rule::new("d", k(), Quota::per_minute(5))
                .tier("pro", Quota::per_minute(6))
                .tier("pro", Quota::per_minute(7))],
            "lists tier `pro` twice",
        ),
        (
            vec![Rule::new(
                "ip",
                key::client_ip().trust_proxy("10.0.0.0/99"),
                Quota::per_minute(5),
            )],
            "key of rule `ip`: invalid proxy address or CIDR",
        ),
        (
            vec![Rule::new("tpm", k(), Quota::per_minute(5).tokens())],
            "no cost estimator",
        ),
    ];
    for (rules, want) in cases {
        let err = build(rules).unwrap_err().to_string();
        assert!(err.contains(want), "{err:?} should contain {want:?}");
    }
    let bad_header = RateLimitLayer::builder()
        .rule(Rule::new("r", k(), Quota::per_minute(1)))
        .idempotency_header("x request id")
        .build()
        .unwrap_err();
    assert!(bad_header.to_string().contains("not a valid header name"));
    // GCRA tiers may differ in burst.
    let ok = Rule::new("g", k(), Quota::per_minute(5).gcra())
        .tier("pro", Quota::per_minute(5).gcra().burst(50));
    assert!(build(vec![ok]).is_ok());
}
