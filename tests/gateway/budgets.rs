//! Budgets that reset on the calendar (`daily_cost`, `monthly_tokens`): the real gateway in
//! front of the test upstream admits requests until what the period spent plus the next
//! request's reservation would pass the budget, then answers 429 naming the budget, with a
//! `Retry-After` of the time until the next UTC midnight or 1st of the month; `/v1/ratelimit`
//! shows the budget with its reset time.
//!
//! The expected reset is computed here from the system clock by counting days (not by the
//! crate's arithmetic), with a few seconds of slack for the time the requests take. The reset
//! itself (a new period admitting again) is the library's tests' business, with a manual
//! clock.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use super::support;
use super::{call, chat, client, rule_state, start_upstream, test_config, Gateway, TempConfig};

/// Two tiers whose budgets are small: `tight-month` runs out of its monthly tokens first,
/// `tight-day` of its daily spend (the test model's prices are 1 per token: spend = tokens).
fn config(upstream: &str) -> String {
    let tiers = "\
[tiers.tight-month]
monthly_tokens = 100
daily_cost = 100000

[tiers.tight-day]
daily_cost = 60
monthly_tokens = 100000

[keys]
month-a = { user = \"mona\", tier = \"tight-month\" }
day-a = { user = \"dan\", tier = \"tight-day\" }
";
    let base = test_config(upstream, "");
    assert!(base.contains("\n[keys]\n"));
    base.replacen("[keys]\n", tiers, 1)
}

fn leap(y: u64) -> bool {
    (y.is_multiple_of(4) && !y.is_multiple_of(100)) || y.is_multiple_of(400)
}

fn month_days(y: u64, m: u64) -> u64 {
    [31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31][m as usize - 1] + u64::from(m == 2 && leap(y))
}

/// Unix seconds of the next UTC midnight and of the next 1st of the month after `now`
/// (seconds), by counting years and months from 1970.
fn next_boundaries(now: u64) -> (u64, u64) {
    let midnight = (now / 86_400 + 1) * 86_400;
    let (mut y, mut m, mut start) = (1970, 1, 0);
    loop {
        let len = month_days(y, m) * 86_400;
        if start + len > now {
            return (midnight, start + len);
        }
        start += len;
        (y, m) = if m == 12 { (y + 1, 1) } else { (y, m + 1) };
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("the clock is after 1970")
        .as_secs()
}

/// `"... used 88, requested 18. ..."` -> (88, 18).
fn used_and_requested(message: &str) -> (u64, u64) {
    let number_after = |label: &str| -> u64 {
        let rest = &message[message
            .find(label)
            .unwrap_or_else(|| panic!("no `{label}` in {message:?}"))
            + label.len()..];
        rest.chars()
            .take_while(char::is_ascii_digit)
            .collect::<String>()
            .parse()
            .unwrap_or_else(|_| panic!("no number after `{label}` in {message:?}"))
    };
    (number_after("used "), number_after("requested "))
}

/// Whether `got` seconds is within a few seconds of the wait until `boundary(t)` for some
/// `t` in `[before, after]` (a boundary crossed while the test ran moves it by a period).
fn near_wait(got: u64, before: u64, after: u64, boundary: impl Fn(u64) -> u64) -> bool {
    [before, after].iter().any(|&t| {
        let want = boundary(t) - t;
        got + 3 >= want.saturating_sub(after - before) && got <= want + 3
    })
}

/// Sends requests as `key` until one is refused (at most 30); returns how many passed and
/// the refusal, checking each admitted request's tokens settle to its real usage.
async fn spend_until_refused(
    c: &super::HttpClient,
    gw: &Gateway,
    key: &str,
    rule: &str,
) -> (usize, super::Answer) {
    let mut used = 0;
    for admitted in 0..30 {
        let a = call(
            c,
            "POST",
            &gw.url("/v1/chat/completions"),
            Some(key),
            Some(&chat("test-model", "one two three four five", 10)),
        )
        .await;
        if a.status == 429 {
            return (admitted, a);
        }
        assert_eq!(a.status, 200, "{:?}", String::from_utf8_lossy(&a.body));
        // The budget settles to the upstream's usage (5 prompt + 10 completion tokens).
        let total = a.json()["usage"]["total_tokens"].as_u64().unwrap();
        assert_eq!(total, 15);
        used += total;
        let deadline = Instant::now() + support::WAIT;
        loop {
            let state = rule_state(c, gw, key, rule).await;
            if state["used"] == used {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{rule}: {state}, want used {used}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    panic!("{key}: 30 requests admitted under a budget of about 100 tokens");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn budgets_refuse_until_the_next_utc_midnight_or_first_of_the_month() {
    let (up, _) = start_upstream().await;
    let cfg = TempConfig::new(&config(&up.url()));
    let gw = Gateway::start(&["--config", cfg.path()]);
    let c = client();

    for (key, rule, limit, period, boundary) in [
        (
            "month-a",
            "user-monthly-tokens",
            100,
            "month",
            (|t| next_boundaries(t).1) as fn(u64) -> u64,
        ),
        (
            "day-a",
            "user-daily-cost",
            60,
            "day",
            (|t| next_boundaries(t).0) as fn(u64) -> u64,
        ),
    ] {
        let before = unix_now();
        let (admitted, refused) = spend_until_refused(&c, &gw, key, rule).await;
        let after = unix_now();
        assert!(admitted >= 1, "{key}: the first request fits the budget");

        // 429, naming the budget and its period; refused because spent + reserved would
        // pass the budget, never earlier.
        let e = &refused.json()["error"];
        assert_eq!(e["code"], "rate_limit_exceeded", "{e}");
        let message = e["message"].as_str().unwrap();
        assert!(message.contains(&format!("`{rule}`")), "{message}");
        assert!(
            message.contains(&format!("per UTC calendar {period}")),
            "{message}"
        );
        let (used, requested) = used_and_requested(message);
        assert_eq!(used, 15 * admitted as u64, "{message}");
        assert!(used <= limit && used + requested > limit, "{message}");

        // Retry-After: until the next UTC midnight / 1st of the month.
        let retry: u64 = refused.header("retry-after").parse().unwrap();
        assert!(
            near_wait(retry, before, after, boundary),
            "{key}: Retry-After {retry}s, the {period} ends in {}s",
            boundary(after) - after
        );

        // /v1/ratelimit: the budget, what it used, and when it resets.
        let state = rule_state(&c, &gw, key, rule).await;
        assert_eq!(state["kind"], "budget", "{state}");
        assert_eq!(state["period"], period, "{state}");
        assert_eq!(state["limit"], limit, "{state}");
        assert_eq!(state["used"], used, "{state}");
        assert_eq!(state["remaining"], limit - used, "{state}");
        let now = unix_now();
        let reset = state["reset_seconds"].as_u64().unwrap();
        assert!(near_wait(reset, before, now, boundary), "{state}");
        let at = state["resets_at"].as_str().unwrap();
        let want = |t: u64| {
            humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(boundary(t)))
                .to_string()
        };
        assert!(
            at == want(before) || at == want(now),
            "{state}: want {}",
            want(now)
        );
        // Midnight and the 1st are 00:00:00 UTC.
        assert!(at.ends_with("T00:00:00Z"), "{at}");
        if period == "month" {
            assert!(at[..at.find('T').unwrap()].ends_with("-01"), "{at}");
        }
    }
    // A rule the other tier has as well is still there, untouched by the other's spend.
    let other = rule_state(&c, &gw, "day-a", "user-monthly-tokens").await;
    assert_eq!(other["period"], "month", "{other}");
    assert_eq!(other["limit"], 100_000, "{other}");
}

#[test]
fn next_boundaries_by_counting_days() {
    // 2028-02-29 12:00 UTC: midnight starts Mar 1, which is also the next 1st.
    let leap_noon = 1_835_395_200 + 43_200;
    assert_eq!(next_boundaries(leap_noon), (1_835_481_600, 1_835_481_600));
    // 2027-12-31 23:59:59 UTC -> 2028-01-01.
    assert_eq!(
        next_boundaries(1_830_297_599),
        (1_830_297_600, 1_830_297_600)
    );
    // 2028-01-01 00:00:00 itself belongs to January.
    assert_eq!(
        next_boundaries(1_830_297_600).1,
        1_830_297_600 + 31 * 86_400
    );
}
