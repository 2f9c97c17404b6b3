//! Where bucket state lives, and the contract between the layer and it.
//!
//! The layer turns each request into one [`Charge`] per applicable rule and hands them to
//! [`Store::acquire`] together. The store answers with a [`Decision`]:
//!
//! - **all or nothing**: either every charge is counted, or none is (a denial writes
//!   nothing);
//! - **admitted**: one [`ChargeState`] per charge: the bucket's [`Snapshot`] after the charge
//!   and the [`Placement`] where it landed;
//! - **denied**: the charge that denied ([`Denial::index`], the one that needs the longest
//!   wait when several deny), how long until the request could pass, and a snapshot per
//!   charge (nothing charged).
//!
//! Later, [`Store::settle`] corrects earlier charges to their real amounts ([`Adjustment`]):
//! a refund goes back to the window the charge was counted in (dropped once that window has
//! slid out of view), an extra charge lands now, even past the limit. [`Store::peek`] reads a
//! bucket without charging (status endpoints, dashboards).
//!
//! Every method returns a [`StoreFuture`]: a store that decides synchronously (the
//! [`MemoryStore`]) answers [`StoreFuture::ready`] and costs no allocation and no task
//! switch; a networked store answers with a boxed future.
//!
//! # Idempotent retries
//!
//! The point of an idempotency id ([`crate::RateLimitLayerBuilder::idempotency_header`]) is
//! that a client's retry after a failure is not counted twice; nothing more. The layer
//! turns the id into an [`IdempotencyKey`], a digest scoped to the caller (every bucket the
//! request is charged to: rule names and keys) and to the request (method, path and query,
//! body), acquires with [`Store::acquire_once`], and when the attempt fails calls
//! [`Store::fail_attempt`]. What a repeat with the same id is charged:
//!
//! | earlier attempt with this key | request rules | token rules | concurrency rules |
//! |---|---|---|---|
//! | failed: HTTP >= 400, gRPC error before any response message, inner service error | **free** (the failed attempt counted) | estimate charged, settled to this attempt's usage | a slot of its own, released when it ends |
//! | cut off before its response began (client gone) | **free** | charged and settled as usual | a slot of its own |
//! | succeeded, or its response had begun | charged | charged | a slot of its own |
//! | still in flight | charged | charged | a slot of its own |
//! | none: other body, method, path or query (a new request) | charged | charged | a slot of its own |
//! | none: other rules or keys (another caller, another set of rules) | charged, decided afresh | charged | a slot of its own |
//! | failed, but [`MAX_FREE_RETRIES`] retries were free already | charged | charged | a slot of its own |
//! | forgotten: past the idempotency TTL, or the memory store's id table was full | charged | charged | a slot of its own |
//!
//! So every attempt takes its own concurrency slot and settles its own tokens, and a free
//! retry is still decided (a token or concurrency rule may deny it; a denied retry keeps the
//! mark). A failed attempt that carries an id keeps its request charges even under
//! [`crate::RateLimitLayerBuilder::count_failed_requests`]`(false)`: they are what its free
//! retry stands on, so a request and its retries are counted once, never zero times. A
//! store that remembers nothing (the trait's default methods) charges every attempt.
//!
//! # Examples
//!
//! ```
//! use tower_llm_ratelimit::store::{BucketKey, Charge, MemoryStore, Store};
//! use tower_llm_ratelimit::{clock::ManualClock, Quota};
//!
//! let store = MemoryStore::builder().clock(ManualClock::new()).build();
//! let rpm = Quota::per_minute(2);
//! let tpm = Quota::per_minute(1_000).tokens();
//! let user_rpm = BucketKey::new("user-rpm", "alice");
//! let user_tpm = BucketKey::new("user-tpm", "alice");
//! let charges = |tokens| {
//!     [Charge::new(&user_rpm, &rpm, 1), Charge::new(&user_tpm, &tpm, tokens)]
//! };
//!
//! let d = store.acquire(&charges(600)).now().unwrap().unwrap();
//! assert!(d.is_admitted());
//! // 600 + 600 tokens > 1,000: denied by the token rule, and the request rule is not charged.
//! let d = store.acquire(&charges(600)).now().unwrap().unwrap();
//! assert_eq!(d.denial.unwrap().index, 1);
//! assert_eq!(d.charges[0].snapshot.remaining, 1);
//! ```

mod memory;
#[cfg(feature = "redis")]
#[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
pub mod redis;

pub use self::memory::{MemoryStore, MemoryStoreBuilder};
#[cfg(feature = "redis")]
#[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
pub use self::redis::{RedisFailure, RedisStats, RedisStore, RedisStoreBuilder};

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use smallvec::SmallVec;

pub use crate::algorithm::{Placement, Snapshot};
use crate::key::Key;
use crate::rule::Quota;

/// A bucket's identity: the rule's name (its namespace) and the key extracted from the
/// request.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct BucketKey {
    rule: Arc<str>,
    key: Key,
}

impl BucketKey {
    /// The bucket of `key` under rule `rule`.
    pub fn new(rule: impl Into<Arc<str>>, key: impl Into<Key>) -> Self {
        Self {
            rule: rule.into(),
            key: key.into(),
        }
    }

    /// The rule's name.
    pub fn rule(&self) -> &str {
        &self.rule
    }

    /// The key.
    pub fn key(&self) -> &Key {
        &self.key
    }

    /// The bucket of `key` under the same rule.
    pub(crate) fn with_key(&self, key: Key) -> Self {
        Self {
            rule: Arc::clone(&self.rule),
            key,
        }
    }

    /// Bytes this key holds, counting its rule name as if it weren't shared (an upper bound).
    #[cfg(test)]
    pub(crate) fn held_bytes(&self) -> usize {
        std::mem::size_of::<Self>() + self.key.as_bytes().len() + 16 + self.rule.len()
    }
}

impl fmt::Debug for BucketKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.rule, self.key)
    }
}

/// One rule's charge for one request.
#[derive(Debug, Clone, Copy)]
pub struct Charge<'a> {
    /// The bucket.
    pub bucket: &'a BucketKey,
    /// The quota applied (already resolved for the caller's tier).
    pub quota: &'a Quota,
    /// Units charged: 1 for a request rule, the estimate for a token rule.
    pub amount: u64,
}

impl<'a> Charge<'a> {
    /// A charge of `amount` units to `bucket` under `quota`.
    pub fn new(bucket: &'a BucketKey, quota: &'a Quota, amount: u64) -> Self {
        Self {
            bucket,
            quota,
            amount,
        }
    }

    /// Whether this charge counts a request under a rate (a request rule, not a token rule
    /// nor a concurrency slot): the charges a retry of a failed attempt doesn't pay again
    /// ([`Store::acquire_once`]).
    pub fn is_request_count(&self) -> bool {
        self.quota.unit() == crate::rule::Unit::Requests
            && self.quota.algorithm() != crate::algorithm::Algorithm::Concurrency
    }
}

/// How many retries of one failed request are free on its request rules, one after
/// another (each after a failed attempt): past this, every attempt is charged, so a request
/// that always fails can't be replayed for free without end.
pub const MAX_FREE_RETRIES: u32 = 3;

/// The identity of an idempotent request: a 128-bit digest of the client's id (the layer's
/// [`crate::RateLimitLayerBuilder::idempotency_header`]), the request (method, path and
/// query, body) and the buckets it is charged to (every rule's name and key). A retry must
/// match all of them to be recognised; any other request is a new one.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct IdempotencyKey([u8; 16]);

impl IdempotencyKey {
    /// A key from its 16 bytes (a digest computed by the caller).
    pub fn from_bytes(bytes: [u8; 16]) -> Self {
        Self(bytes)
    }

    /// Its 16 bytes.
    pub fn as_bytes(&self) -> &[u8; 16] {
        &self.0
    }
}

impl fmt::Debug for IdempotencyKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

/// The state of one charge's bucket after a decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ChargeState {
    /// Limit, remaining and time to reset, after the charge if admitted.
    pub snapshot: Snapshot,
    /// Where the charge landed (meaningless on a denial).
    pub placement: Placement,
}

/// Why a request was denied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Denial {
    /// The index of the denying charge in the slice given to [`Store::acquire`].
    pub index: usize,
    /// How long until the request could pass if nothing else were charged; `None` when it
    /// never can (its cost alone exceeds that rule's limit).
    pub retry_after: Option<Duration>,
}

/// The answer of [`Store::acquire`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// `None` when admitted.
    pub denial: Option<Denial>,
    /// One entry per charge, in the order given.
    pub charges: ChargeStates,
    /// True when this admission is a retry of a failed attempt ([`Store::acquire_once`]):
    /// its request charges ([`Charge::is_request_count`]) were not counted now (the failed
    /// attempt counted them), their snapshots are read without charging, and they must not
    /// be settled. Every other charge was counted as usual.
    pub free_retry: bool,
}

impl Decision {
    /// True when every charge was counted.
    pub fn is_admitted(&self) -> bool {
        self.denial.is_none()
    }
}

/// One [`ChargeState`] per charge of a decision: a slice (it derefs to `[ChargeState]`),
/// stored inline for up to two charges (a request rule and a token rule, the usual pair);
/// more take one allocation.
// Kept inline: a `Vec` here costs 36% more instructions per single-rule decision (callgrind,
// one hot key, as `benches/algorithms.rs` hot_key_fixed_clock/gcra: 556 against 408).
#[derive(Clone, PartialEq, Eq)]
pub struct ChargeStates(SmallVec<[ChargeState; 2]>);

impl ChargeStates {
    /// `n` default states, to be filled in by index.
    pub fn filled(n: usize) -> Self {
        Self(smallvec::smallvec![ChargeState::default(); n])
    }

    /// One state.
    pub fn one(state: ChargeState) -> Self {
        Self(smallvec::smallvec![state])
    }
}

impl std::ops::Deref for ChargeStates {
    type Target = [ChargeState];

    #[inline]
    fn deref(&self) -> &[ChargeState] {
        &self.0
    }
}

impl std::ops::DerefMut for ChargeStates {
    #[inline]
    fn deref_mut(&mut self) -> &mut [ChargeState] {
        &mut self.0
    }
}

impl<'a> IntoIterator for &'a ChargeStates {
    type Item = &'a ChargeState;
    type IntoIter = std::slice::Iter<'a, ChargeState>;

    fn into_iter(self) -> Self::IntoIter {
        self.iter()
    }
}

impl From<Vec<ChargeState>> for ChargeStates {
    fn from(v: Vec<ChargeState>) -> Self {
        Self(SmallVec::from_vec(v))
    }
}

impl FromIterator<ChargeState> for ChargeStates {
    fn from_iter<I: IntoIterator<Item = ChargeState>>(iter: I) -> Self {
        Self(iter.into_iter().collect())
    }
}

impl fmt::Debug for ChargeStates {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.iter()).finish()
    }
}

/// Settles one earlier charge to its real amount.
#[derive(Debug, Clone, Copy)]
pub struct Adjustment<'a> {
    /// The bucket charged.
    pub bucket: &'a BucketKey,
    /// The quota it was charged under.
    pub quota: &'a Quota,
    /// Where it landed ([`ChargeState::placement`]).
    pub placement: Placement,
    /// What was charged.
    pub charged: u64,
    /// What it really cost.
    pub actual: u64,
}

/// A store could not decide.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum StoreError {
    /// A store bounded to `max_keys` buckets could not hold this request's. The
    /// [`MemoryStore`] makes room for a new key by evicting its least recently used buckets,
    /// so it answers this only to a request naming more buckets than `max_keys` (each would
    /// evict another of the same request); the Redis store never does (keys expire by TTL).
    /// Kept for stores that refuse rather than evict.
    AtCapacity {
        /// The configured bound.
        max_keys: usize,
    },
    /// Two charges of one acquire named the same bucket.
    DuplicateBucket(String),
    /// The backend could not be reached or answered an error.
    Backend(String),
}

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoreError::AtCapacity { max_keys } => write!(
                f,
                "rate-limit store is full: it holds at most {max_keys} keys and can't make room for this request's"
            ),
            StoreError::DuplicateBucket(b) => {
                write!(f, "two charges of one request name bucket {b}")
            }
            StoreError::Backend(e) => write!(f, "rate-limit store failed: {e}"),
        }
    }
}

impl std::error::Error for StoreError {}

/// The result of a store call: ready now, or a boxed future for stores that do I/O.
#[must_use = "a store future does nothing unless polled or read with `now()`"]
pub enum StoreFuture<T> {
    /// The answer, already computed (taken by the first poll).
    Ready(Option<T>),
    /// An answer still to come.
    Pending(Pin<Box<dyn Future<Output = T> + Send>>),
}

impl<T> StoreFuture<T> {
    /// An answer computed synchronously.
    pub fn ready(value: T) -> Self {
        StoreFuture::Ready(Some(value))
    }

    /// An answer still to come.
    pub fn pending(fut: impl Future<Output = T> + Send + 'static) -> Self {
        StoreFuture::Pending(Box::pin(fut))
    }

    /// The answer if it is already there, otherwise a future of it (boxed already when the
    /// store's answer is pending: nothing is allocated).
    pub(crate) fn into_result(self) -> Result<T, Pin<Box<dyn Future<Output = T> + Send>>>
    where
        T: Send + 'static,
    {
        match self {
            StoreFuture::Ready(Some(v)) => Ok(v),
            StoreFuture::Pending(fut) => Err(fut),
            // Taken already: polling it says so, as polling `self` would.
            taken => Err(Box::pin(taken)),
        }
    }

    /// The answer if it is already there, otherwise the future back.
    pub fn now(self) -> Result<T, Self> {
        match self {
            StoreFuture::Ready(Some(v)) => Ok(v),
            other => Err(other),
        }
    }
}

impl<T> fmt::Debug for StoreFuture<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            StoreFuture::Ready(_) => "StoreFuture::Ready",
            StoreFuture::Pending(_) => "StoreFuture::Pending",
        })
    }
}

// The ready value is moved out, never pinned; the pending future is boxed.
impl<T> Unpin for StoreFuture<T> {}

impl<T> Future for StoreFuture<T> {
    type Output = T;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<T> {
        // `StoreFuture` is Unpin: the pending variant is already boxed.
        match self.get_mut() {
            StoreFuture::Ready(v) => {
                Poll::Ready(v.take().expect("StoreFuture polled after completion"))
            }
            StoreFuture::Pending(f) => f.as_mut().poll(cx),
        }
    }
}

/// Shared state for rate limiting. See the [module docs](self) for the contract.
pub trait Store: Send + Sync + fmt::Debug + 'static {
    /// Checks every charge and counts all of them, or none.
    fn acquire(&self, charges: &[Charge<'_>]) -> StoreFuture<Result<Decision, StoreError>>;

    /// Like [`Store::acquire`], for an attempt of an idempotent request (see
    /// [Idempotent retries](self#idempotent-retries)): when [`Store::fail_attempt`] marked an
    /// earlier attempt with the same `id` as failed, and fewer than [`MAX_FREE_RETRIES`]
    /// retries of it were free already, the request charges ([`Charge::is_request_count`])
    /// are not counted ([`Decision::free_retry`]) and the mark is used up; every other charge
    /// is decided and counted as by `acquire`.
    ///
    /// The default charges every attempt (it calls `acquire`): the safe side for a store that
    /// can't remember ids.
    fn acquire_once(
        &self,
        charges: &[Charge<'_>],
        id: &IdempotencyKey,
    ) -> StoreFuture<Result<Decision, StoreError>> {
        let _ = id;
        self.acquire(charges)
    }

    /// Marks the attempt of `id` (admitted by [`Store::acquire_once`] with `charges`) as
    /// failed (an upstream error, or cut off before its response began), so that the next
    /// attempt with the same id is a free retry; remembered for the store's idempotency TTL.
    /// `charges` name the buckets the attempt was acquired with (a store spreading buckets
    /// over shards keeps the mark beside them).
    ///
    /// The default remembers nothing (every retry is charged).
    fn fail_attempt(
        &self,
        charges: &[Charge<'_>],
        id: &IdempotencyKey,
    ) -> StoreFuture<Result<(), StoreError>> {
        let _ = (charges, id);
        StoreFuture::ready(Ok(()))
    }

    /// Corrects earlier charges to their real amounts.
    fn settle(&self, adjustments: &[Adjustment<'_>]) -> StoreFuture<Result<(), StoreError>>;

    /// A bucket's state under `quota`, charging nothing.
    fn peek(&self, bucket: &BucketKey, quota: &Quota) -> StoreFuture<Result<Snapshot, StoreError>>;
}

impl<S: Store + ?Sized> Store for Arc<S> {
    fn acquire(&self, charges: &[Charge<'_>]) -> StoreFuture<Result<Decision, StoreError>> {
        (**self).acquire(charges)
    }
    fn acquire_once(
        &self,
        charges: &[Charge<'_>],
        id: &IdempotencyKey,
    ) -> StoreFuture<Result<Decision, StoreError>> {
        (**self).acquire_once(charges, id)
    }
    fn fail_attempt(
        &self,
        charges: &[Charge<'_>],
        id: &IdempotencyKey,
    ) -> StoreFuture<Result<(), StoreError>> {
        (**self).fail_attempt(charges, id)
    }
    fn settle(&self, adjustments: &[Adjustment<'_>]) -> StoreFuture<Result<(), StoreError>> {
        (**self).settle(adjustments)
    }
    fn peek(&self, bucket: &BucketKey, quota: &Quota) -> StoreFuture<Result<Snapshot, StoreError>> {
        (**self).peek(bucket, quota)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn charge_states_hold_any_number() {
        for n in 0..5 {
            let states = ChargeStates::filled(n);
            assert_eq!(states.len(), n);
            let v: Vec<_> = (0..n as u64)
                .map(|i| ChargeState {
                    placement: Placement(i),
                    ..ChargeState::default()
                })
                .collect();
            assert_eq!(*ChargeStates::from(v.clone()), v[..]);
        }
    }
}
