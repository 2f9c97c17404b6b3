//! The controllers of one rule, one per bucket key, shared by the layer's requests.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::Duration;

use super::controller::{Change, Controller, Signal};
use super::queue::Queue;
use super::Capacity;
use crate::key::Key;

/// Most buckets a rule keeps a controller for: capacity is meant per model (a handful of
/// keys). A bucket past this runs at the configured initial limit, unadapted, and a warning
/// is logged once.
pub(crate) const MAX_CONTROLLERS: usize = 4096;

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
/// completion rate.
#[derive(Debug)]
pub(crate) struct Cell {
    limit: AtomicU64,
    controller: Mutex<Controller>,
    pub(crate) queue: Arc<Queue>,
    completions: Mutex<Completions>,
}

impl Cell {
    fn new(cfg: &Capacity) -> Self {
        let c = Controller::new(cfg);
        Self {
            limit: AtomicU64::new(c.limit()),
            controller: Mutex::new(c),
            queue: Arc::default(),
            completions: Mutex::default(),
        }
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
        self.queue.release();
    }

    /// How long a refused caller should wait: the waiters ahead of it, and itself, at the
    /// bucket's recent completion rate; 1 s without one; at most 60 s.
    pub(crate) fn retry_after(&self, now: u64) -> Duration {
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
        let ahead = self.queue.len() as f64 + 1.0;
        let secs = ahead * span as f64 / 1e9 / count as f64;
        Duration::from_secs_f64(secs.min(MAX_RETRY.as_secs_f64())).max(MIN_RETRY)
    }

    /// The current limit.
    #[inline]
    pub(crate) fn limit(&self) -> u64 {
        self.limit.load(Ordering::Relaxed)
    }

    /// A request was admitted with `in_flight` slots of this bucket taken.
    pub(crate) fn admitted(&self, in_flight: u64) {
        self.lock().admitted(in_flight);
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
    cells: RwLock<HashMap<Key, Arc<Cell>>>,
    warned_full: std::sync::atomic::AtomicBool,
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
            warned_full: Default::default(),
        }
    }

    /// Shares `old`'s controllers (their learned limits, queues and completion rates) when
    /// its capacity moves the limit as this one does; else keeps none (a changed `min`,
    /// `max` or target starts afresh).
    pub(crate) fn continue_from(&mut self, old: &RuleCapacity) {
        if !self.config.moves_like(&old.config) {
            return;
        }
        let cells = old.cells.read().unwrap_or_else(PoisonError::into_inner);
        *self.cells.get_mut().unwrap_or_else(PoisonError::into_inner) = cells.clone();
    }

    /// The namespace of the own buckets of callers of `tier`.
    pub(crate) fn tier_rule(&self, tier: Option<&str>) -> &Arc<str> {
        tier.and_then(|t| self.tier_rules.iter().find(|(name, _)| &**name == t))
            .map_or(&self.other_tiers, |(_, rule)| rule)
    }

    /// The controller of bucket `key`, made on first use.
    pub(crate) fn cell(&self, key: &Key) -> Arc<Cell> {
        if let Some(c) = self
            .cells
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(key)
        {
            return Arc::clone(c);
        }
        let mut cells = self.cells.write().unwrap_or_else(PoisonError::into_inner);
        if let Some(c) = cells.get(key) {
            return Arc::clone(c);
        }
        let cell = Arc::new(Cell::new(&self.config));
        if cells.len() < MAX_CONTROLLERS {
            cells.insert(key.clone(), Arc::clone(&cell));
        } else if !self.warned_full.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                target: "tower_llm_ratelimit",
                max = MAX_CONTROLLERS,
                "adaptive capacity: too many buckets for one rule; new ones run at the initial limit"
            );
        }
        cell
    }

    /// The current limit of bucket `key`, without making a controller for it.
    pub(crate) fn limit_of(&self, key: &Key) -> u64 {
        let cells = self.cells.read().unwrap_or_else(PoisonError::into_inner);
        cells
            .get(key)
            .map_or(self.config.initial_limit(), |c| c.limit())
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
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(u64::from(std::process::id()));
    format!("{:016x}", h.finish())
}
