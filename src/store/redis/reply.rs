//! The script's replies, read: integers off the wire ([`decode`]), an acquire's reply checked
//! against the call that asked ([`check_acquire`]), and the checked replies of one request,
//! one per cluster slot, made into one decision ([`decision`]). A reply that doesn't fit its
//! call (a bug, a proxy in the way, a hostile server) is an error: never a panic, never a
//! decision about rules the call didn't name.

use std::time::Duration;

use crate::store::{ChargeState, ChargeStates, Decision, Denial, Placement, Snapshot, StoreError};

/// The script's reply as integers: a string of little-endian doubles (acquire, peek), or an
/// array of integers (settle).
pub(super) fn decode(v: &redis::Value) -> redis::RedisResult<Vec<i64>> {
    match v {
        redis::Value::BulkString(bytes) if bytes.len() % 8 == 0 => Ok(bytes
            .chunks_exact(8)
            .map(|c| {
                let mut b = [0u8; 8];
                b.copy_from_slice(c);
                // `as` saturates, and a NaN reads as 0.
                f64::from_le_bytes(b) as i64
            })
            .collect()),
        redis::Value::Array(items) => items
            .iter()
            .map(|i| match i {
                redis::Value::Int(n) => Ok(*n),
                other => Err(unexpected(other)),
            })
            .collect(),
        other => Err(unexpected(other)),
    }
}

fn unexpected(v: &redis::Value) -> redis::RedisError {
    redis::RedisError::from((
        redis::ErrorKind::Parse,
        "unexpected script reply",
        format!("{v:?}"),
    ))
}

/// Checks an acquire's reply (`limiter.lua`: outcome, retry, then limit, remaining, reset and
/// placement per key) against the number of charges its call sent.
pub(super) fn check_acquire(reply: Vec<i64>, members: usize) -> Result<Vec<i64>, StoreError> {
    // The outcome: -1 admitted, -3 admitted as a free retry, or the index of the denying key.
    let outcome_fits = reply
        .first()
        .is_some_and(|&o| o == -1 || o == -3 || (0..members as i64).contains(&o));
    if reply.len() == 2 + 4 * members && outcome_fits {
        Ok(reply)
    } else {
        Err(StoreError::Backend(format!(
            "unexpected script reply: {} values (outcome {:?}) for {members} keys",
            reply.len(),
            reply.first()
        )))
    }
}

/// A snapshot from the script's microseconds.
pub(super) fn snapshot(limit: i64, remaining: i64, reset_us: i64) -> Snapshot {
    Snapshot {
        limit: limit.max(0) as u64,
        remaining: remaining.max(0) as u64,
        reset_after_nanos: (reset_us.max(0) as u64).saturating_mul(1_000),
    }
}

/// The decision on `n` charges from each call's members (indexes into the charges) and its
/// reply, every reply passed by [`check_acquire`]: admitted when every call admitted;
/// otherwise denied by the charge that waits longest (never, `-2`, beats any wait).
pub(super) fn decision<'a>(
    n: usize,
    replies: impl IntoIterator<Item = (&'a [usize], &'a [i64])>,
) -> Decision {
    let mut states = ChargeStates::filled(n);
    let mut denial: Option<(usize, i64)> = None;
    let mut free_retry = false;
    for (members, reply) in replies {
        for (j, &i) in members.iter().enumerate() {
            let r = &reply[2 + 4 * j..6 + 4 * j];
            states[i] = ChargeState {
                snapshot: snapshot(r[0], r[1], r[2]),
                placement: Placement(r[3].max(0) as u64),
            };
        }
        free_retry |= reply[0] == -3;
        if let Ok(j) = usize::try_from(reply[0]) {
            let index = members[j];
            let retry = reply[1];
            let worse = match denial {
                None => true,
                Some((_, -2)) => false,
                Some((_, prev)) => retry == -2 || retry > prev,
            };
            if worse {
                denial = Some((index, retry));
            }
        }
    }
    Decision {
        denial: denial.map(|(index, retry)| Denial {
            index,
            retry_after: u64::try_from(retry).ok().map(Duration::from_micros),
        }),
        charges: states,
        free_retry: free_retry && denial.is_none(),
    }
}

/// The fuzz targets' way in (built only under `cargo fuzz`, which sets `--cfg fuzzing`): the
/// bytes of RESP replies as they come off the wire, one per call, read into a decision on
/// `n` charges exactly as an acquire reads them. `None` when a reply is refused.
#[cfg(fuzzing)]
pub fn fuzz_acquire_replies(n: usize, calls: &[(&[usize], &[u8])]) -> Option<Decision> {
    let mut replies = Vec::new();
    for (members, bytes) in calls {
        let value = redis::parse_redis_value(bytes).ok()?;
        let reply = decode(&value).ok()?;
        replies.push((*members, check_acquire(reply, members.len()).ok()?));
    }
    Some(decision(n, replies.iter().map(|(m, r)| (*m, r.as_slice()))))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_that_dont_fit_their_call_are_errors() {
        // A denial naming a key past the call's two, a short reply, a stray outcome.
        let mut past = vec![2, 1_000];
        past.extend([10, 5, 0, 0, 10, 5, 0, 0]);
        assert!(check_acquire(past, 2).is_err());
        assert!(check_acquire(vec![-1, -1, 10, 5], 2).is_err());
        let mut stray = vec![-7, -1];
        stray.extend([10, 5, 0, 0]);
        assert!(check_acquire(stray, 1).is_err());
        // An array holding anything but integers.
        let mixed = redis::Value::Array(vec![redis::Value::Int(0), redis::Value::Nil]);
        assert!(decode(&mixed).is_err());
    }

    #[test]
    fn the_longest_wait_denies_across_calls() {
        let a = [0usize, 2];
        let b = [1usize];
        let ra = check_acquire(vec![1, 5_000, 10, 9, 0, 3, 10, 0, 7, 4], 2).unwrap();
        let rb = check_acquire(vec![0, 9_000, 20, 0, 2, 8], 1).unwrap();
        let d = decision(3, [(&a[..], &ra[..]), (&b[..], &rb[..])]);
        let denial = d.denial.unwrap();
        assert_eq!(denial.index, 1);
        assert_eq!(denial.retry_after, Some(Duration::from_micros(9_000)));
        assert_eq!(d.charges[2].placement, Placement(4));
        assert_eq!(d.charges[1].snapshot.limit, 20);
    }
}
