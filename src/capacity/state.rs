//! The controllers of one rule, one per bucket key, shared by the layer's requests.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hasher, RandomState};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::Duration;

use super::controller::{Change, Controller, Signal};
use super::queue::Queue;
use super::Capacity;
use crate::key::digest::KeyDigest;
#[cfg(test)]
use crate::key::digest::MAX_HELD_KEY;
use crate::key::Key;

/// Most buckets a rule keeps a controller for: capacity is meant per model (a handful of
/// keys), but the key may be a header a client sets. At this bound, idle controllers (no
/// request of theirs in flight or waiting), least recently used first, make room, an
/// eighth of the bound at a time; with none idle, a new bucket runs at the initial limit
/// without a queue (refused at once), and a warning is logged once.
pub(crate) const MAX_CONTROLLERS: usize = 4096;

/// How precisely the last use of a controller is known, for eviction (nanoseconds).
const TOUCH_PRECISION: u64 = 1_000_000_000;

/// The window over which a bucket's completion rate is measured.
const RATE_WINDOW: u64 = 5_000_000_000;
/// Bounds of the `Retry-After` derived from it.
const MIN_RETRY: Duration = Duration::from_secs(1);
const MAX_RETRY: Duration = Duration::from_secs(60);

/// Requests completed in the current window and the one before.
#[derive(Debug, Default)]
struct Completions {
    since: u64,
    current: u64,
    previous: Option<u64>,
}

/// One bucket's controller, its limit readable without the lock, its queue and its
/// completion rate (the queue and the rate shared with the bucket's cell in a layer this one
/// was rebuilt from, if its controller started afresh: see [`RuleCapacity::continue_from`]).
#[derive(Debug)]
pub(crate) struct Cell {
    limit: AtomicU64,
    controller: Mutex<Controller>,
    /// Whether the controller counts releases (after a cut): the only time a release takes
    /// its lock.
    draining: AtomicBool,
    pub(crate) queue: Arc<Queue>,
    completions: Arc<Mutex<Completions>>,
    /// When a request last asked for it (the layer's clock), for eviction.
    used: AtomicU64,
    /// Made at [`MAX_CONTROLLERS`] with none idle: not kept, so nothing would wake its
    /// queue; its waiters are refused at once.
    unkept: bool,
}

impl Cell {
    fn new(cfg: &Capacity, now: u64, unkept: bool) -> Self {
        let c = Controller::new(cfg);
        Self {
            limit: AtomicU64::new(c.limit()),
            controller: Mutex::new(c),
            draining: AtomicBool::new(false),
            queue: Arc::default(),
            completions: Arc::default(),
            used: AtomicU64::new(now),
            unkept,
        }
    }

    /// A controller of `cfg`, starting afresh, for `old`'s bucket: it shares `old`'s queue
    /// and completion rate, which the requests `old` admitted release into.
    fn continuing(cfg: &Capacity, old: &Cell) -> Self {
        let c = Controller::new(cfg);
        Self {
            limit: AtomicU64::new(c.limit()),
            controller: Mutex::new(c),
            draining: AtomicBool::new(false),
            queue: Arc::clone(&old.queue),
            completions: Arc::clone(&old.completions),
            used: AtomicU64::new(old.used.load(Ordering::Relaxed)),
            unkept: false,
        }
    }

    /// How many may wait in its queue, of the configured `max_len`.
    pub(crate) fn queue_len(&self, max_len: usize) -> usize {
        if self.unkept {
            0
        } else {
            max_len
        }
    }

    /// Notes a use at `now`, to the second (a write per request would make every request of
    /// a bucket contend for one cache line).
    fn touch(&self, now: u64) {
        if now.saturating_sub(self.used.load(Ordering::Relaxed)) >= TOUCH_PRECISION {
            self.used.store(now, Ordering::Relaxed);
        }
    }

    /// Nothing holds it but its rule: no request of its bucket in flight or waiting, and no
    /// cell of another layer shares its queue (dropped, its bucket would come back with
    /// another queue, which that layer's releases would not wake).
    fn is_idle(self: &Arc<Self>) -> bool {
        Arc::strong_count(self) == 1 && Arc::strong_count(&self.queue) == 1 && self.queue.len() == 0
    }

    /// A request of this bucket completed at `now` and its slot is back in the store: counts
    /// it, and wakes a waiter.
    pub(crate) fn released(&self, now: u64) {
        {
            let mut c = self
                .completions
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            if now.saturating_sub(c.since) >= RATE_WINDOW {
                c.previous = Some(std::mem::take(&mut c.current));
                c.since = now;
            }
            c.current += 1;
        }
        if self.draining.load(Ordering::Relaxed) {
            let mut c = self.lock();
            c.released(now);
            self.draining.store(c.is_draining(), Ordering::Relaxed);
        }
        self.queue.release();
    }

    /// How long a refused caller of priority `level` should wait: the waiters ahead of it
    /// (of its priority or higher), and itself, at the bucket's recent completion rate; 1 s
    /// without one; at most 60 s.
    pub(crate) fn retry_after(&self, now: u64, level: u8) -> Duration {
        let c = self
            .completions
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let (count, span) = match c.previous {
            Some(p) => (p + c.current, RATE_WINDOW + now.saturating_sub(c.since)),
            None => (c.current, now.saturating_sub(c.since)),
        };
        drop(c);
        if count == 0 || span == 0 {
            return MIN_RETRY;
        }
        let ahead = self.queue.at_or_above(level) as f64 + 1.0;
        let secs = ahead * span as f64 / 1e9 / count as f64;
        Duration::from_secs_f64(secs.min(MAX_RETRY.as_secs_f64())).max(MIN_RETRY)
    }

    /// The current limit.
    #[inline]
    pub(crate) fn limit(&self) -> u64 {
        self.limit.load(Ordering::Relaxed)
    }

    /// A decision on a request saw `in_flight` slots of this bucket taken.
    pub(crate) fn saw_in_flight(&self, in_flight: u64) {
        self.lock().saw_in_flight(in_flight);
    }

    /// Feedback from one response; the change of limit, if any.
    pub(crate) fn sample(
        &self,
        cfg: &Capacity,
        now: u64,
        signal: Signal,
    ) -> Option<(u64, u64, Change)> {
        let mut c = self.lock();
        let changed = c.sample(cfg, now, signal);
        if changed.is_some() {
            self.limit.store(c.limit(), Ordering::Relaxed);
            self.draining.store(c.is_draining(), Ordering::Relaxed);
        }
        drop(c);
        if let Some((old, new, _)) = changed {
            // Room that came without a release: waiters would else sleep past it while the
            // callers below them are held back.
            self.queue.grew(new.saturating_sub(old));
        }
        changed
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Controller> {
        // A panic elsewhere while holding it leaves plain numbers: still usable.
        self.controller
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

/// A rule's capacity configuration and its controllers, one per bucket key.
#[derive(Debug)]
pub(crate) struct RuleCapacity {
    pub(crate) config: Capacity,
    /// The namespaces of the tiers' own buckets, `{rule}#{tier}`, and `{rule}#` for callers
    /// of other tiers or none: a tier's bucket has the same key as the rule's, so that on a
    /// Redis Cluster both share a slot (one script call).
    tier_rules: Vec<(Arc<str>, Arc<str>)>,
    other_tiers: Arc<str>,
    /// Keyed by the held key ([`RuleCapacity::held`]).
    cells: RwLock<HashMap<Key, Arc<Cell>>>,
    /// The secret of the digests of long keys.
    digest: KeyDigest,
    warned_full: AtomicBool,
}

impl RuleCapacity {
    pub(crate) fn new(config: Capacity, rule: &str) -> Self {
        Self {
            tier_rules: config
                .tiers
                .iter()
                .map(|(t, _)| (Arc::clone(t), format!("{rule}#{t}").into()))
                .collect(),
            other_tiers: format!("{rule}#").into(),
            config,
            cells: RwLock::new(HashMap::new()),
            digest: KeyDigest::new(),
            warned_full: AtomicBool::new(false),
        }
    }

    /// Continues `old`'s buckets: shares its controllers (their learned limits, queues and
    /// completion rates) when its capacity moves the limit as this one does; else starts
    /// their controllers afresh (a changed `min`, `max` or target) but still shares their
    /// queues and completion rates, so that the slots `old`'s requests release wake this
    /// rule's waiters and count in its `Retry-After`.
    pub(crate) fn continue_from(&mut self, old: &RuleCapacity) {
        let cells = old.cells.read().unwrap_or_else(PoisonError::into_inner);
        let continued = if self.config.moves_like(&old.config) {
            cells.clone()
        } else {
            cells
                .iter()
                .map(|(k, c)| (k.clone(), Arc::new(Cell::continuing(&self.config, c))))
                .collect()
        };
        *self.cells.get_mut().unwrap_or_else(PoisonError::into_inner) = continued;
        // The cells are keyed by `held`: a long key's digest must stay the same.
        self.digest = old.digest.clone();
    }

    /// The namespace of the own buckets of callers of `tier`.
    pub(crate) fn tier_rule(&self, tier: Option<&str>) -> &Arc<str> {
        tier.and_then(|t| self.tier_rules.iter().find(|(name, _)| &**name == t))
            .map_or(&self.other_tiers, |(_, rule)| rule)
    }

    /// The controller of bucket `key`, made on first use; `now` is the layer's clock.
    pub(crate) fn cell(&self, key: &Key, now: u64) -> Arc<Cell> {
        let held = self.held(key);
        let found = self
            .cells
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&*held)
            .map(Arc::clone);
        if let Some(c) = found {
            c.touch(now);
            return c;
        }
        let mut cells = self.cells.write().unwrap_or_else(PoisonError::into_inner);
        if let Some(c) = cells.get(&*held) {
            c.touch(now);
            return Arc::clone(c);
        }
        if cells.len() >= MAX_CONTROLLERS {
            evict_idle(&mut cells);
        }
        if cells.len() >= MAX_CONTROLLERS {
            if !self.warned_full.swap(true, Ordering::Relaxed) {
                tracing::warn!(
                    target: "tower_llm_ratelimit",
                    max = MAX_CONTROLLERS,
                    "adaptive capacity: too many buckets in use for one rule; new ones run at the initial limit, without a queue"
                );
            }
            return Arc::new(Cell::new(&self.config, now, true));
        }
        let cell = Arc::new(Cell::new(&self.config, now, false));
        cells.insert(held.into_owned(), Arc::clone(&cell));
        cell
    }

    /// The current limit of bucket `key`, without making a controller for it.
    pub(crate) fn limit_of(&self, key: &Key) -> u64 {
        let held = self.held(key);
        let cells = self.cells.read().unwrap_or_else(PoisonError::into_inner);
        cells
            .get(&*held)
            .map_or(self.config.initial_limit(), |c| c.limit())
    }

    /// The key the rule holds for `key`: itself, or the digest of a long key under a secret
    /// of the rule's ([`crate::key::digest`]).
    fn held<'k>(&self, key: &'k Key) -> std::borrow::Cow<'k, Key> {
        self.digest.held(key)
    }

    /// How many controllers the rule keeps now.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.cells
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }
}

/// Makes room at [`MAX_CONTROLLERS`]: drops up to an eighth of them (so that a flood of new
/// keys pays for a sweep once per many keys), idle ones least recently used first. A
/// dropped bucket's controller starts again from the initial limit when it comes back.
fn evict_idle(cells: &mut HashMap<Key, Arc<Cell>>) {
    let mut idle: Vec<(u64, Key)> = cells
        .iter()
        .filter(|(_, c)| c.is_idle())
        .map(|(k, c)| (c.used.load(Ordering::Relaxed), k.clone()))
        .collect();
    let batch = (MAX_CONTROLLERS / 8).min(idle.len());
    if batch == 0 {
        return;
    }
    if batch < idle.len() {
        idle.select_nth_unstable_by_key(batch - 1, |(used, _)| *used);
    }
    for (_, key) in &idle[..batch] {
        cells.remove(key);
    }
}

/// An adaptive charge of a request: which rule, which of the request's charges, and the
/// bucket's controller.
#[derive(Debug)]
pub(crate) struct Adapt {
    pub(crate) rule: usize,
    pub(crate) charge: usize,
    pub(crate) cell: Arc<Cell>,
}

/// What an admitted request reports to its adaptive buckets' controllers once the upstream
/// answers: when it was sent (the layer's clock) and to whom.
#[derive(Debug)]
pub(crate) struct Feedback {
    pub(crate) started: u64,
    pub(crate) cells: Vec<Adapt>,
}

/// The bucket key of `key` for replica `replica`: each replica governs its own share.
pub(crate) fn replica_key(key: &Key, replica: &str) -> Key {
    let mut bytes = Vec::with_capacity(key.as_bytes().len() + 1 + replica.len());
    bytes.extend_from_slice(key.as_bytes());
    bytes.push(b'@');
    bytes.extend_from_slice(replica.as_bytes());
    Key::new(bytes)
}

/// A random replica id (16 hex digits), from the standard library's random hasher keys.
pub(crate) fn random_replica_id() -> String {
    let mut h = RandomState::new().build_hasher();
    h.write_u64(u64::from(std::process::id()));
    format!("{:016x}", h.finish())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule() -> RuleCapacity {
        RuleCapacity::new(Capacity::fixed(4), "model-slots")
    }

    #[test]
    fn a_flood_of_long_keys_holds_a_bounded_number_of_short_keys() {
        let cap = rule();
        let long = |i: usize| Key::new(format!("{i:08}{}", "x".repeat(4 * MAX_HELD_KEY)));
        for i in 0..3 * MAX_CONTROLLERS {
            drop(cap.cell(&long(i), i as u64));
            assert!(cap.len() <= MAX_CONTROLLERS);
        }
        let cells = cap.cells.read().unwrap();
        assert!(cells.keys().all(|k| k.as_bytes().len() <= MAX_HELD_KEY));
        // The same long key finds its controller again; another one doesn't.
        drop(cells);
        let last = cap.cell(&long(3 * MAX_CONTROLLERS - 1), 0);
        assert!(Arc::ptr_eq(
            &last,
            &cap.cell(&long(3 * MAX_CONTROLLERS - 1), 0)
        ));
        assert!(!Arc::ptr_eq(&last, &cap.cell(&long(0), 0)));
    }

    #[test]
    fn only_idle_controllers_make_room_least_recently_used_first() {
        let cap = rule();
        let key = |i: usize| Key::new(format!("k{i}"));
        // The first is in use (a request holds it), the second used late.
        const S: u64 = 1_000_000_000;
        let busy = cap.cell(&key(0), 0);
        for i in 1..MAX_CONTROLLERS {
            drop(cap.cell(&key(i), i as u64 * S));
        }
        let late = MAX_CONTROLLERS as u64 * S;
        drop(cap.cell(&key(1), late));
        let new = cap.cell(&Key::new("new"), late);
        assert!(!new.unkept);
        assert!(Arc::ptr_eq(&busy, &cap.cell(&key(0), late)), "in use: kept");
        let cells = cap.cells.read().unwrap();
        assert!(cells.contains_key(&key(1)), "recently used: kept");
        assert!(
            !cells.contains_key(&key(2)),
            "the least recently used idle one: dropped"
        );
        assert_eq!(cells.len(), MAX_CONTROLLERS - MAX_CONTROLLERS / 8 + 1);
    }

    #[test]
    fn many_threads_flooding_keys_never_evict_a_controller_in_use() {
        let cap = Arc::new(rule());
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let cap = Arc::clone(&cap);
                std::thread::spawn(move || {
                    let mine = Key::new(format!("model-{t}"));
                    let held = cap.cell(&mine, 0);
                    for i in 0..5_000u64 {
                        drop(cap.cell(&Key::new(format!("junk-{t}-{i}")), i));
                        if i % 500 == 0 {
                            assert!(Arc::ptr_eq(&held, &cap.cell(&mine, i)), "evicted in use");
                        }
                    }
                    assert!(cap.len() <= MAX_CONTROLLERS);
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
    }

    /// A rebuilt rule whose capacity moves the limit otherwise starts its controllers
    /// afresh, but shares the queues and completion rates: the old layer's requests in
    /// flight release into them.
    #[test]
    fn a_changed_capacity_keeps_the_queues_and_completion_rates() {
        const S: u64 = 1_000_000_000;
        let old = RuleCapacity::new(Capacity::adaptive(1, 8).initial(6), "model-slots");
        let key = Key::new("m");
        let long = Key::new("x".repeat(2 * MAX_HELD_KEY));
        let cell = old.cell(&key, 0);
        let long_cell = old.cell(&long, 0);
        cell.released(0);
        let mut new = RuleCapacity::new(Capacity::adaptive(1, 4), "model-slots");
        new.continue_from(&old);
        let carried = new.cell(&key, S);
        assert_eq!(carried.limit(), 4, "a fresh controller");
        assert!(Arc::ptr_eq(&carried.queue, &cell.queue));
        assert!(Arc::ptr_eq(&new.cell(&long, S).queue, &long_cell.queue));
        assert_eq!(new.len(), 2);
        // One completion in 4 s, then one more released by the old layer's request.
        assert_eq!(carried.retry_after(4 * S, 0), Duration::from_secs(4));
        cell.released(4 * S);
        assert_eq!(carried.retry_after(4 * S, 0), Duration::from_secs(2));
        // Not evicted while the old layer's cells share their queues.
        drop(carried);
        let idle = |cap: &RuleCapacity| {
            let cells = cap.cells.read().unwrap();
            cells.values().filter(|c| c.is_idle()).count()
        };
        assert_eq!(idle(&new), 0);
        drop((cell, long_cell, old));
        assert_eq!(idle(&new), 2);
    }

    #[test]
    fn with_none_idle_a_new_bucket_gets_no_queue() {
        let cap = rule();
        let held: Vec<_> = (0..MAX_CONTROLLERS)
            .map(|i| cap.cell(&Key::new(format!("k{i}")), 0))
            .collect();
        let extra = cap.cell(&Key::new("extra"), 1);
        assert_eq!(extra.queue_len(64), 0);
        assert_eq!(held[0].queue_len(64), 64);
        assert_eq!(cap.len(), MAX_CONTROLLERS);
    }
}
