use super::format::VALUE_BUF;
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
        (3_600_010, "1h0m0.01s"),
        (60_100, "1m0.1s"),
    ] {
        assert_eq!(go_duration(Duration::from_millis(ms)), want);
    }
    assert_eq!(go_duration(Duration::from_nanos(1)), "1ms", "rounds up");
    assert_eq!(
        go_duration(Duration::from_secs(u64::MAX)),
        "5124095576030h25m51.615s"
    );
    assert_eq!(
        go_duration(Duration::MAX),
        "5124095576030h25m51.615s",
        "saturates"
    );
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
    let (rpm_cached, tpm_cached) = (
        QuotaHeaders::new("user-rpm", &rpm),
        QuotaHeaders::new("user-tpm", &tpm),
    );
    let none = JoinedPolicies::default();
    let rules = [
        RuleState {
            rule: "user-rpm",
            quota: &rpm,
            variant: 0,
            snapshot: snap(60, 59, 1),
            cached: &rpm_cached,
        },
        RuleState {
            rule: "user-tpm",
            quota: &tpm,
            variant: 0,
            snapshot: snap(100_000, 98_800, 60),
            cached: &tpm_cached,
        },
    ];
    let h = write(HeaderStyle::BOTH, &none, 2, rules.iter().copied()).into_map();
    assert_eq!(
        h["ratelimit-policy"],
        r#""user-rpm";q=60;w=60, "user-tpm";q=100000;w=60;qu="tokens""#
    );
    assert_eq!(
        h["ratelimit"],
        r#""user-rpm";r=59;t=2, "user-tpm";r=98800;t=61"#
    );
    assert_eq!(h["x-ratelimit-limit-requests"], "60");
    assert_eq!(h["x-ratelimit-remaining-requests"], "59");
    assert_eq!(h["x-ratelimit-reset-requests"], "1.001s");
    assert_eq!(h["x-ratelimit-limit-tokens"], "100000");
    assert_eq!(h["x-ratelimit-reset-tokens"], "1m0.001s");

    // One rule: the policy is the precomputed value.
    let h = write(HeaderStyle::IETF, &none, 2, rules[1..].iter().copied()).into_map();
    assert_eq!(
        h["ratelimit-policy"],
        r#""user-tpm";q=100000;w=60;qu="tokens""#
    );
    assert!(!h.contains_key("x-ratelimit-limit-tokens"));

    // A limit other than the quota's (a store's local fallback share) is reported as is.
    let shared = [RuleState {
        snapshot: snap(20, 19, 1),
        ..rules[0]
    }];
    let h = write(HeaderStyle::BOTH, &none, 2, shared.iter().copied()).into_map();
    assert_eq!(h["ratelimit-policy"], r#""user-rpm";q=20;w=60"#);
    assert_eq!(h["x-ratelimit-limit-requests"], "20");

    // GCRA reports its burst; concurrency its slots.
    let gcra = Quota::per_second(5).gcra().burst(20);
    assert_eq!(QuotaHeaders::new("g", &gcra).limit, 20);
    let slots = Quota::concurrent(3);
    let c = QuotaHeaders::new("c", &slots);
    assert_eq!(&*c.policy_item, br#""c";q=3;qu="concurrent-requests""#);

    let mut h = write(HeaderStyle::OPENAI, &none, 2, rules.iter().copied()).into_map();
    assert!(!h.contains_key("ratelimit"));
    write_retry_after(&mut h, Duration::from_millis(1));
    assert_eq!(h["retry-after"], "1");
    assert_eq!(h["retry-after-ms"], "1");
}

#[test]
fn joined_policies_are_the_joined_items() {
    let (free, pro) = (Quota::per_minute(10), Quota::per_minute(600));
    let tpm = Quota::per_minute(2_000).tokens();
    let quotas = vec![
        vec![
            QuotaHeaders::new("rpm", &free),
            QuotaHeaders::new("rpm", &pro),
        ],
        vec![QuotaHeaders::new("tpm", &tpm)],
    ];
    let joined = JoinedPolicies::new(&quotas, [vec![0, 0], vec![1, 0], vec![0, 0]].into_iter());
    assert_eq!(joined.0.len(), 2, "one per distinct combination");
    assert!(joined.get([1, 0].into_iter()).is_some());
    assert!(joined.get([0, 0].into_iter()).is_some());
    assert!(joined.get([1, 1].into_iter()).is_none(), "no such variant");
    let snap = |limit| Snapshot {
        limit,
        remaining: 1,
        reset_after_nanos: 1,
    };
    let state = |rule, quota, variant, limit| RuleState {
        rule,
        quota,
        variant,
        snapshot: snap(limit),
        cached: &quotas[usize::from(rule == "tpm")][variant],
    };
    let pro_request = [state("rpm", &pro, 1, 600), state("tpm", &tpm, 0, 2_000)];
    let h = write(HeaderStyle::IETF, &joined, 2, pro_request.iter().copied()).into_map();
    assert_eq!(
        h["ratelimit-policy"],
        r#""rpm";q=600;w=60, "tpm";q=2000;w=60;qu="tokens""#
    );
    // The same as joining the items per request.
    let dynamic = write(
        HeaderStyle::IETF,
        &JoinedPolicies::default(),
        2,
        pro_request.iter().copied(),
    )
    .into_map();
    assert_eq!(h, dynamic);
    // A limit other than the quota's is never answered from the cache.
    let shared = [state("rpm", &pro, 1, 300), state("tpm", &tpm, 0, 2_000)];
    let h = write(HeaderStyle::IETF, &joined, 2, shared.iter().copied()).into_map();
    assert_eq!(
        h["ratelimit-policy"],
        r#""rpm";q=300;w=60, "tpm";q=2000;w=60;qu="tokens""#
    );
}

#[test]
fn many_long_rule_names_spill_to_the_heap() {
    let names: Vec<String> = (0..20)
        .map(|i| format!("rule-with-a-long-name-{i}"))
        .collect();
    let quota = Quota::per_minute(1_000_000);
    let cached: Vec<_> = names.iter().map(|n| QuotaHeaders::new(n, &quota)).collect();
    let states: Vec<_> = names
        .iter()
        .zip(&cached)
        .map(|(rule, cached)| RuleState {
            rule,
            quota: &quota,
            variant: 0,
            snapshot: Snapshot {
                limit: 1_000_000,
                remaining: 999_999,
                reset_after_nanos: 60_000_000_000,
            },
            cached,
        })
        .collect();
    let h = write(
        HeaderStyle::BOTH,
        &JoinedPolicies::default(),
        20,
        states.iter().copied(),
    )
    .into_map();
    let state = h["ratelimit"].to_str().unwrap();
    assert!(state.len() > VALUE_BUF, "{}", state.len());
    assert!(state.starts_with(r#""rule-with-a-long-name-0";r=999999;t=60, "#));
    assert!(state.ends_with(r#""rule-with-a-long-name-19";r=999999;t=60"#));
    assert_eq!(h["x-ratelimit-remaining-requests"], "999999");
    assert_eq!(h["x-ratelimit-reset-requests"], "1m0s");
}
