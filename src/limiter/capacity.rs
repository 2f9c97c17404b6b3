//! Planning the charges of a rule with a [`Capacity`](crate::capacity::Capacity): this
//! replica's bucket at its controller's current limit, a capacity with tiers' two attempts,
//! and which refusals wait in the bucket's queue.

use std::sync::Arc;
use std::time::Duration;

use super::plan::Planned;
use super::{Limiter, Plan};
use crate::capacity::{replica_key, Adapt, Cell, Feedback, RuleCapacity};
use crate::rule::Quota;
use crate::store::{BucketKey, Decision, StoreError};
use crate::tier::Tier;

/// The two attempts of a charge to a capacity with tiers (see `Capacity::tier`): first the
/// bucket at the saturation threshold and the tier's bucket at the capacity; once refused
/// for saturation, the bucket at the capacity and the tier's bucket at its reserve.
pub(crate) struct Reserve {
    /// The bucket's charge (its index in the plan).
    pub(super) shared: usize,
    /// The tier's charge.
    pub(super) tier: usize,
    pub(super) capacity: u64,
    /// The saturation threshold: `floor(saturation x capacity)`, at least 1.
    pub(super) threshold: u64,
    /// The tier's reserve: `floor(share x capacity)`.
    pub(super) reserved: u64,
    /// The second attempt is under way.
    pub(super) second: bool,
    /// The waiters of a higher priority the first attempt's bucket was made smaller for (0
    /// when that made no difference to its limit).
    pub(super) held: u64,
}

/// Where a refused request waits, and how.
pub(crate) struct Wait<'a> {
    pub(crate) cell: &'a Arc<Cell>,
    /// The bucket (for the observer).
    pub(crate) bucket: &'a BucketKey,
    pub(crate) tier: Option<&'a Tier>,
    pub(crate) level: u8,
    /// The caller's tier, as the capacity names it.
    pub(crate) tier_name: Arc<str>,
    pub(crate) max_wait: Duration,
    pub(crate) max_len: usize,
    /// Refused by the bucket at its whole capacity (not a threshold, not a tier's reserve).
    pub(crate) full: bool,
}

/// `floor(share x capacity)`.
fn share_of(share: f64, capacity: u64) -> u64 {
    (share * capacity as f64).floor() as u64
}

impl Limiter {
    /// The charges of rule `rule` (a capacity) for a caller of `tier`, the first at index
    /// `at` of the plan: this replica's bucket at its current capacity, and with tiers the
    /// tier's own bucket. Notes the bucket's controller for the feedback.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn plan_capacity(
        &self,
        cap: &RuleCapacity,
        rule: usize,
        variant: usize,
        bucket: BucketKey,
        quota: Quota,
        tier: Option<&str>,
        at: usize,
        feedback: &mut Option<Feedback>,
        reserve: &mut Option<Reserve>,
    ) -> impl Iterator<Item = Planned> {
        let now = self.clock.now_nanos();
        let cell = cap.cell(bucket.key(), now);
        let capacity = quota.limit().min(cell.limit());
        let (open, held) = open_to(cap, &cell, capacity, tier);
        let quota = quota.with_limit(open);
        let key = replica_key(bucket.key(), &self.replica);
        feedback
            .get_or_insert_with(|| Feedback {
                started: now,
                cells: Vec::new(),
            })
            .cells
            .push(Adapt {
                rule,
                charge: at,
                cell,
            });
        let planned = |bucket, quota| Planned {
            rule,
            variant,
            bucket,
            quota,
            amount: 1,
        };
        let mut tier_charge = None;
        let mut first_quota = quota;
        // The gateway's per-model rules each sort by tier, and a request meets one of them;
        // should several charge one request, the first sorts it and the others charge it at
        // their capacity (a plan has one reserve attempt).
        if cap.config.has_tiers() && reserve.is_none() {
            let share = cap.config.priority_of(tier).map_or(0.0, |p| p.share);
            let threshold = share_of(cap.config.saturation, capacity).clamp(1, open);
            *reserve = Some(Reserve {
                shared: at,
                tier: at + 1,
                capacity,
                threshold,
                reserved: share_of(share, capacity),
                second: false,
                held: held_at(threshold, open, capacity, held),
            });
            first_quota = quota.with_limit(threshold);
            tier_charge = Some(planned(
                BucketKey::new(
                    Arc::clone(cap.tier_rule(cap.config.place(tier))),
                    key.clone(),
                ),
                quota.with_limit(capacity),
            ));
        }
        std::iter::once(planned(bucket.with_key(key), first_quota)).chain(tier_charge)
    }

    /// After a refusal for saturation, turns `plan` into its second attempt (the tier's
    /// reserve); false when there is none to make.
    pub(crate) fn retry_reserved(
        &self,
        plan: &mut Plan,
        result: &Result<Decision, StoreError>,
    ) -> bool {
        let Some(r) = &mut plan.reserve else {
            return false;
        };
        let refused_for_saturation = matches!(
            result,
            Ok(Decision { denial: Some(d), .. }) if d.index == r.shared
        );
        // A threshold at the capacity: the second attempt would charge the bucket at the
        // same limit that refused the first.
        if r.second || r.reserved == 0 || r.threshold >= r.capacity || !refused_for_saturation {
            return false;
        }
        r.second = true;
        let shared = &mut plan.charges[r.shared];
        shared.quota = shared.quota.with_limit(r.capacity);
        let tier = &mut plan.charges[r.tier];
        tier.quota = tier.quota.with_limit(r.reserved);
        true
    }

    /// The buckets that make a request's idempotency identity, as (rule name, key): an
    /// adaptive bucket's key without its replica suffix, and not the tier's own bucket (a
    /// retry through another replica, or of another tier's reserve, is the same request).
    pub(super) fn identity_buckets<'p>(
        &'p self,
        charges: &'p [Planned],
        feedback: Option<&'p Feedback>,
        reserve: Option<&'p Reserve>,
    ) -> impl Iterator<Item = (&'p str, &'p [u8])> + 'p {
        let suffix = 1 + self.replica.len();
        charges.iter().enumerate().filter_map(move |(i, p)| {
            if reserve.is_some_and(|r| r.tier == i) {
                return None;
            }
            let key = p.bucket.key().as_bytes();
            let adaptive = feedback.is_some_and(|f| f.cells.iter().any(|a| a.charge == i));
            let key = if adaptive {
                // `replica_key` appended `@{replica}`.
                &key[..key.len().saturating_sub(suffix)]
            } else {
                key
            };
            Some((p.bucket.rule(), key))
        })
    }

    /// Whether `plan`'s bucket was made smaller for more waiters above the caller (at
    /// `level`) than wait now: one of them was admitted or left while its answer came back,
    /// and the slot it held back may be free.
    pub(crate) fn held_back_by_gone(&self, plan: &Plan, cell: &Cell, level: u8) -> bool {
        plan.reserve.as_ref().is_some_and(|r| {
            !r.second
                && r.held > 0
                && r.held > u64::try_from(cell.queue.above(level)).unwrap_or(u64::MAX)
        })
    }

    /// Turns `plan` back into its first attempt, at the capacities in force now, for a
    /// waiter trying again: the latency of its answer counts from now, not from its arrival.
    pub(crate) fn retry_from_queue(&self, plan: &mut Plan) {
        let tier = plan.tier.as_ref().map(|t| t.as_str());
        let Some(f) = &mut plan.feedback else {
            return;
        };
        f.started = self.clock.now_nanos();
        for a in &f.cells {
            let Some(cap) = &self.capacity[a.rule] else {
                continue;
            };
            let capacity = self.rules[a.rule]
                .quota_for(tier)
                .limit()
                .min(a.cell.limit());
            let (open, held) = open_to(cap, &a.cell, capacity, tier);
            match &mut plan.reserve {
                Some(r) if r.shared == a.charge => {
                    let share = cap.config.priority_of(tier).map_or(0.0, |p| p.share);
                    let threshold = share_of(cap.config.saturation, capacity).clamp(1, open);
                    *r = Reserve {
                        capacity,
                        threshold,
                        reserved: share_of(share, capacity),
                        second: false,
                        held: held_at(threshold, open, capacity, held),
                        ..*r
                    };
                    let shared = &mut plan.charges[r.shared];
                    shared.quota = shared.quota.with_limit(r.threshold);
                    let own = &mut plan.charges[r.tier];
                    own.quota = own.quota.with_limit(capacity);
                }
                _ => {
                    let charge = &mut plan.charges[a.charge];
                    charge.quota = charge.quota.with_limit(open);
                }
            }
        }
    }

    /// The adaptive bucket of charge `index` of `plan` (the bucket's or its tier's).
    pub(crate) fn capacity_of<'p>(&self, plan: &'p Plan, index: usize) -> Option<&'p Adapt> {
        let tier_of = plan
            .reserve
            .as_ref()
            .filter(|r| r.tier == index)
            .map(|r| r.shared);
        plan.feedback
            .as_ref()?
            .cells
            .iter()
            .find(|a| a.charge == index || Some(a.charge) == tier_of)
    }

    /// Where `plan`, refused as `result` says, waits: when a capacity refused it and the
    /// caller's tier may wait.
    pub(crate) fn queue_for<'p>(
        &self,
        plan: &'p Plan,
        result: &Result<Decision, StoreError>,
    ) -> Option<Wait<'p>> {
        let denial = result.as_ref().ok()?.denial?;
        let adapt = self.capacity_of(plan, denial.index)?;
        let config = &self.capacity[adapt.rule].as_ref()?.config;
        let tier = config.place(plan.tier.as_ref().map(|t| t.as_str()));
        let priority = config.priority_of(tier)?;
        let (tier_name, _) = config
            .tiers
            .iter()
            .find(|(name, _)| Some(&**name) == tier)?;
        let at_capacity = plan
            .reserve
            .as_ref()
            .filter(|r| r.shared == adapt.charge)
            .is_none_or(|r| r.second || r.threshold >= r.capacity);
        Some(Wait {
            full: denial.index == adapt.charge && at_capacity,
            cell: &adapt.cell,
            bucket: &plan.charges.get(adapt.charge)?.bucket,
            tier: plan.tier.as_ref(),
            level: priority.level,
            tier_name: Arc::clone(tier_name),
            max_wait: priority.max_wait?,
            max_len: adapt.cell.queue_len(config.queue_len),
        })
    }
}

/// The slots of a bucket at `capacity` open to a caller of `tier` outside its tier's reserve:
/// one fewer for each caller of a higher priority waiting in its queue, so that a slot
/// released goes to them rather than to a newcomer below them (at least 1: a bucket is never
/// closed to everyone). A tier's reserve stays its own: the second attempt charges the bucket
/// at the whole capacity.
/// The waiters a first attempt at `threshold` was held back for: `above` when the bucket
/// made smaller for them (`open`) is what set its limit, else none.
fn held_at(threshold: u64, open: u64, capacity: u64, above: u64) -> u64 {
    if threshold == open && open < capacity {
        above
    } else {
        0
    }
}

/// Returns the slots and how many waiters it was made smaller for.
fn open_to(cap: &RuleCapacity, cell: &Cell, capacity: u64, tier: Option<&str>) -> (u64, u64) {
    if !cap.config.has_tiers() {
        return (capacity, 0);
    }
    let level = cap.config.priority_of(tier).map_or(0, |p| p.level);
    let above = u64::try_from(cell.queue.above(level)).unwrap_or(u64::MAX);
    (capacity.saturating_sub(above).max(1), above)
}
