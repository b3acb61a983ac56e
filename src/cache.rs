//! The token cache: one slot per (tenant, normalised scopes) in a bounded moka cache.
//! A slot holds the current token, the failure state of its refresh, and the single
//! in-flight fetch that every concurrent miss joins (one upstream exchange per key).
//! Watchers (`WatchToken`) subscribe to a slot's state.

use std::borrow::Borrow;
use std::collections::HashMap;
use std::fmt;
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use arc_swap::ArcSwap;
use futures::FutureExt;
use futures::future::{BoxFuture, Shared};
use tokio::sync::watch;

use crate::clock::{Clock, Moment};
use crate::sensitive::{Fingerprint, Sensitive};
use crate::timetable::Scheduled;

/// Cache key: configured tenant name and normalised scopes.
#[derive(Debug, Clone)]
pub struct Key {
    pub tenant: Arc<str>,
    pub scopes: Arc<[String]>,
}

/// A key's contents as a lookup sees them, whether owned (`Key`) or borrowed from a request
/// (`KeyRef`). moka finds entries through `Borrow`, so a cache hit builds no `Key`: no
/// allocation, and no write to the tenant name's reference count, which every request for
/// the tenant would share.
pub trait KeyView: Send + Sync {
    fn tenant(&self) -> &str;
    fn scopes(&self) -> &[String];
}

/// A key borrowed from a request.
#[derive(Debug, Clone, Copy)]
pub struct KeyRef<'a> {
    pub tenant: &'a str,
    pub scopes: &'a [String],
}

impl KeyView for Key {
    fn tenant(&self) -> &str {
        &self.tenant
    }
    fn scopes(&self) -> &[String] {
        &self.scopes
    }
}

impl KeyView for KeyRef<'_> {
    fn tenant(&self) -> &str {
        self.tenant
    }
    fn scopes(&self) -> &[String] {
        self.scopes
    }
}

// One hash and one equality for owned and borrowed keys alike, as `Borrow` requires.
impl Hash for dyn KeyView + '_ {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.tenant().hash(state);
        self.scopes().hash(state);
    }
}

impl PartialEq for dyn KeyView + '_ {
    fn eq(&self, other: &Self) -> bool {
        self.tenant() == other.tenant() && self.scopes() == other.scopes()
    }
}

impl Eq for dyn KeyView + '_ {}

impl Hash for Key {
    fn hash<H: Hasher>(&self, state: &mut H) {
        (self as &dyn KeyView).hash(state);
    }
}

impl PartialEq for Key {
    fn eq(&self, other: &Self) -> bool {
        (self as &dyn KeyView) == (other as &dyn KeyView)
    }
}

impl Eq for Key {}

impl<'a> Borrow<dyn KeyView + 'a> for Key {
    fn borrow(&self) -> &(dyn KeyView + 'a) {
        self
    }
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.tenant, self.scopes.join(" "))
    }
}

/// A token as cached. `Debug` shows only its fingerprint.
#[derive(Debug, Clone)]
pub struct CachedToken {
    pub access_token: Sensitive,
    /// `access_token.fingerprint()`, computed once: logs and audit records use it per request.
    pub fingerprint: Fingerprint,
    pub token_type: &'static str,
    /// Its end, and when to refresh it, on both clocks: the issuer's lifetime counted from
    /// when the request was sent.
    pub expires: Moment,
    pub refresh: Moment,
    /// Whole seconds of validity Entra issued it with (`expires_in`): the most a token for
    /// its key can be expected to have, so a minimum validity above it is refused without a
    /// fetch. Four bytes, where a
    /// `Duration` would take sixteen in every cached token.
    pub issued_validity: u32,
    pub tenant_id: Arc<str>,
    pub client_id: Arc<str>,
    pub scopes: Arc<[String]>,
}

impl CachedToken {
    /// Remaining validity at `now` (zero once expired).
    pub fn remaining(&self, now: Moment) -> Duration {
        self.expires.until(now)
    }

    /// The validity Entra issued it with (whole seconds).
    pub fn issued_validity(&self) -> Duration {
        Duration::from_secs(u64::from(self.issued_validity))
    }
}

/// What watchers see of a slot.
#[derive(Debug, Clone, Default)]
pub struct SlotState {
    pub token: Option<Arc<CachedToken>>,
    /// Set while the key's refresh fails (the first fetch, or one once the token's refresh
    /// is due; not a forced or early one before it); cleared by the next success.
    pub failure: Option<String>,
    /// Whether `failure` is one that asking again may clear (an outage, throttling, an open
    /// breaker) rather than a refusal of the configuration: callers that asked for no
    /// minimum validity are then served the token down to the safety margin.
    pub failure_transient: bool,
}

/// The shared result of one in-flight fetch.
pub type FlightResult<E> = Result<Arc<CachedToken>, Arc<E>>;
type Flight<E> = Shared<BoxFuture<'static, FlightResult<E>>>;
/// A fetch under way and the claims it carries (by their canonical JSON), if any.
type Carrying<E> = (Flight<E>, Option<Arc<str>>);

/// One cache entry.
pub struct Slot<E> {
    /// For watchers, who wait for changes.
    state: watch::Sender<SlotState>,
    /// The same state for requests, who only read it: loading it writes nothing shared,
    /// where borrowing the watch takes its lock and cloning the token counts a reference,
    /// each a write to a cache line every request on every core touches.
    current: ArcSwap<SlotState>,
    /// The fetch under way, and the claims it carries (a caller's claims challenge, by
    /// its canonical JSON), if any.
    inflight: Mutex<Option<Carrying<E>>>,
    last_forced: Mutex<Option<Moment>>,
    /// A failure answered from memory until its time: a persistent one (configuration), or
    /// a transient one held off for a short while (`Remembered::persistent`).
    negative: Mutex<Option<Remembered<E>>>,
    /// Whether a task is retrying the fetch of this slot's first token for its watchers.
    retrying: AtomicBool,
    /// How many times the cache took this slot in, less how many times it let it go (the
    /// eviction listener counts those). Counted both ways, so that a late notice of an
    /// eviction cannot cancel a later insertion: positive while the cache holds the slot.
    cached: AtomicI32,
    /// How the slot's current token is refreshed: ended when a newer token's refresh is
    /// scheduled (a forced refresh, an early fetch), and when the slot is dropped, rather
    /// than left waiting until a refresh time that no longer matters.
    refresh: Mutex<Refresh>,
}

/// How a slot's current token is refreshed.
#[derive(Debug, Default)]
pub enum Refresh {
    #[default]
    Not,
    /// Its entry in the refresh timetable, taken out when this is dropped.
    Scheduled(Scheduled),
    /// The task refreshing it, its refresh come due (retrying, while it fails).
    Running(tokio::task::AbortHandle),
}

impl Refresh {
    /// Ends the refresh: its entry taken out of the timetable, or its task aborted.
    fn end(self) {
        if let Refresh::Running(task) = self {
            task.abort();
        }
    }
}

impl<E> Drop for Slot<E> {
    fn drop(&mut self) {
        let refresh = self.refresh.get_mut().unwrap_or_else(|p| p.into_inner());
        std::mem::take(refresh).end();
    }
}

impl<E> fmt::Debug for Slot<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Slot").finish_non_exhaustive()
    }
}

/// A failed fetch remembered for a key: callers get it, without a fetch, until `until`.
#[derive(Debug)]
pub struct Remembered<E> {
    pub until: Moment,
    pub error: Arc<E>,
    /// A problem of configuration (kept `negative_ttl`), rather than an outage or
    /// throttling held off for its `Retry-After` or a short floor. Only a persistent one
    /// holds back the key's background retries, which have their own backoff.
    pub persistent: bool,
}

/// Whether a caller started a fetch or joined one already under way.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Joined {
    Leader,
    Follower,
}

impl<E: Send + Sync + 'static> Slot<E> {
    fn new() -> Self {
        Slot {
            state: watch::channel(SlotState::default()).0,
            current: ArcSwap::default(),
            inflight: Mutex::new(None),
            last_forced: Mutex::new(None),
            negative: Mutex::new(None),
            retrying: AtomicBool::new(false),
            cached: AtomicI32::new(0),
            refresh: Mutex::new(Refresh::Not),
        }
    }

    /// Makes the timetable entry `schedule()` inserts the slot's refresh, ending the one it
    /// replaces. Inserted under the slot's refresh lock: an entry come due at once (a fetch
    /// stalled past its refresh floor, a wall clock stepped) is handed out only once the slot
    /// holds it, else its chain would find another refresh there, end, and leave the slot
    /// holding an entry already taken out: the key never refreshed ahead again.
    pub fn schedule_refresh(&self, schedule: impl FnOnce() -> Scheduled) {
        let old = {
            let mut refresh = self.refresh.lock().unwrap_or_else(|p| p.into_inner());
            std::mem::replace(&mut *refresh, Refresh::Scheduled(schedule()))
        };
        old.end();
    }

    /// Makes `task` the slot's refresh if the slot's refresh is still the timetable's entry
    /// `id` (come due); `false` if it was replaced meanwhile (a newer token's), for the
    /// caller to abort `task`.
    pub fn run_refresh(&self, id: u64, task: tokio::task::AbortHandle) -> bool {
        let mut refresh = self.refresh.lock().unwrap_or_else(|p| p.into_inner());
        if !matches!(&*refresh, Refresh::Scheduled(s) if s.id() == id) {
            return false;
        }
        *refresh = Refresh::Running(task);
        true
    }

    /// Counts the cache taking the slot in; returns it, for the cache to hold.
    ///
    /// Called from moka's `get_with` initialiser, so the count comes before moka puts the
    /// entry in its map. Harmless: every insertion, and `keep`'s reading of the count, is
    /// made under `TokenCache::watched`'s lock, so nothing reads the count between the two.
    /// Only a lookup dropped in between (its caller gone, or a refresh task aborted, while
    /// moka waits for its key lock) leaves a slot counted that the cache does not hold; it
    /// errs upward only, so no live chain ends for it. That slot was a new one (dropped
    /// with the lookup) or a watched one being put back: while watched it is the key's
    /// whatever the count, and once not, `watched` lets go of it, so its chain lives only
    /// while a request still holds it, may then refresh it once more if the key has another
    /// slot (`keep` asks for the key, not this slot: a lookup would count as a read), and is
    /// aborted when the slot is dropped. Not provoked in a test: it needs moka's key lock
    /// contended at the moment the lookup is dropped.
    fn taken_in(self: Arc<Self>) -> Arc<Self> {
        self.cached.fetch_add(1, Ordering::AcqRel);
        self
    }

    /// Whether the cache holds this slot, as far as its eviction notices have come.
    fn cached(&self) -> bool {
        self.cached.load(Ordering::Acquire) > 0
    }

    /// The current state, to read and let go (not to hold across an `await`).
    pub fn current(&self) -> arc_swap::Guard<Arc<SlotState>> {
        self.current.load()
    }

    pub fn subscribe(&self) -> watch::Receiver<SlotState> {
        self.state.subscribe()
    }

    /// Records a new token (and clears the failure) or, ending at `now`, a failure of the
    /// key's refresh (keeping the old token). A failure counts as the refresh's only when
    /// there is no token or its refresh is due: one made before (a forced refresh, an early
    /// fetch for a caller's minimum validity) says nothing about the scheduled refresh, and
    /// leaves a healthy token healthy.
    /// Watchers are woken by a new token and by the first failure of a run, not by each
    /// failed retry after it (an outage would otherwise wake them at every retry), and by a
    /// failure of the other kind (transient or for good) than the run's last: the failure's
    /// text is updated for the next message all the same.
    pub fn publish(&self, result: &FlightResult<E>, now: Moment)
    where
        E: fmt::Display + Transient,
    {
        self.state.send_if_modified(|s| {
            let changed = match result {
                Ok(t) => {
                    s.token = Some(t.clone());
                    s.failure = None;
                    s.failure_transient = false;
                    true
                }
                Err(e) if s.token.as_ref().is_none_or(|t| t.refresh.reached(now)) => {
                    let transient = e.is_transient();
                    // An outage turning into a refusal for good (or back) is news: the
                    // key is remembered rather than retried, and callers are served
                    // differently (`Broker::serves_through_outage`).
                    let other_kind = s.failure.is_some() && s.failure_transient != transient;
                    s.failure_transient = transient;
                    s.failure.replace(e.to_string()).is_none() || other_kind
                }
                Err(_) => false,
            };
            // Under the watch's lock, so both copies change in the same order.
            self.current.store(Arc::new(s.clone()));
            changed
        });
    }

    /// The remembered failure (persistent, or transient and held off), if still in force
    /// at `now`, with the time it is still in force.
    pub fn negative(&self, now: Moment) -> Option<(Arc<E>, Duration)> {
        let n = self.negative.lock().unwrap_or_else(|p| p.into_inner());
        n.as_ref()
            .filter(|r| !r.until.reached(now))
            .map(|r| (r.error.clone(), r.until.until(now)))
    }

    /// Until when the remembered persistent failure is in force, if it still is at `now`.
    pub fn negative_until(&self, now: Moment) -> Option<Moment> {
        let n = self.negative.lock().unwrap_or_else(|p| p.into_inner());
        n.as_ref()
            .filter(|r| r.persistent && !r.until.reached(now))
            .map(|r| r.until)
    }

    /// Publishes the remembered persistent failure, if one is in force at `now` and no fetch
    /// is under way, as the key's refresh's (`publish`): for a refresh come due while it
    /// waits out a refusal remembered before (a forced refresh's), so that its watchers and
    /// callers are told it is refused instead of the token running out unannounced.
    pub fn publish_remembered(&self, now: Moment)
    where
        E: fmt::Display + Transient,
    {
        let inflight = self.inflight.lock().unwrap_or_else(|p| p.into_inner());
        let remembered = self
            .negative
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .filter(|r| r.persistent && !r.until.reached(now))
            .map(|r| r.error.clone());
        if inflight.is_none()
            && let Some(e) = remembered
        {
            self.publish(&Err(e), now);
        }
    }

    /// Forgets the remembered failure if it is persistent (a held transient one stays);
    /// whether one was still in force at `now`.
    pub fn forget_persistent(&self, now: Moment) -> bool {
        let mut n = self.negative.lock().unwrap_or_else(|p| p.into_inner());
        match n.take_if(|r| r.persistent) {
            Some(r) => !r.until.reached(now),
            None => false,
        }
    }

    /// Whether anyone watches this slot (`WatchToken`).
    pub fn watched(&self) -> bool {
        self.state.receiver_count() > 0
    }

    /// Makes the caller the one task retrying this slot's first fetch; `false` if there is
    /// one already.
    pub fn claim_retry(&self) -> bool {
        self.retrying
            .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }

    /// Ends the claim taken by `claim_retry`.
    pub fn release_retry(&self) {
        self.retrying.store(false, Ordering::Release);
    }

    /// Remembers `remembered` unless `forgotten_since()` (remembered failures were forgotten
    /// while its fetch was under way), asked under the lock `forget_persistent` takes. The
    /// forgetting says so before it takes the lock: either the entry is set first and then
    /// forgotten, or the question sees it.
    pub fn remember_unless(
        &self,
        remembered: Remembered<E>,
        forgotten_since: impl FnOnce() -> bool,
    ) {
        let mut n = self.negative.lock().unwrap_or_else(|p| p.into_inner());
        if !forgotten_since() {
            *n = Some(remembered);
        }
    }

    pub fn set_negative(&self, remembered: Option<Remembered<E>>) {
        *self.negative.lock().unwrap_or_else(|p| p.into_inner()) = remembered;
    }

    /// Honours a forced refresh at most once per `interval`.
    pub fn allow_forced(&self, now: Moment, interval: Duration) -> bool {
        let mut last = self.last_forced.lock().unwrap_or_else(|p| p.into_inner());
        match *last {
            Some(t) if t.since(now) < interval => false,
            _ => {
                *last = Some(now);
                true
            }
        }
    }

    /// The fetch under way, to join, if there is one.
    pub fn flight(&self) -> Option<Flight<E>> {
        self.flight_carrying().map(|(f, _)| f)
    }

    /// The fetch under way, if there is one, with the claims it carries.
    pub fn flight_carrying(&self) -> Option<Carrying<E>> {
        self.inflight
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Joins the fetch under way, or starts `start()` as the one fetch for this slot.
    /// The fetch runs in its own task, so a caller that gives up does not cancel it for
    /// the others, and its result is published before any waiter sees it.
    pub fn fetch<F>(self: &Arc<Self>, clock: Arc<dyn Clock>, start: F) -> (Joined, Flight<E>)
    where
        F: FnOnce() -> BoxFuture<'static, FlightResult<E>>,
        E: fmt::Display + FromJoin + Transient,
    {
        let (joined, flight, _) = self.fetch_carrying(clock, None, start);
        (joined, flight)
    }

    /// `fetch`, for a fetch that carries `claims` (a caller's claims challenge): joining
    /// one under way, whatever it carries, or starting `start()` known by `claims`. Returns
    /// what the flight returned carries, so a caller can tell that it joined a fetch
    /// carrying claims other than its own (or its own not sent), whose failure may not be
    /// its answer.
    pub fn fetch_carrying<F>(
        self: &Arc<Self>,
        clock: Arc<dyn Clock>,
        claims: Option<Arc<str>>,
        start: F,
    ) -> (Joined, Flight<E>, Option<Arc<str>>)
    where
        F: FnOnce() -> BoxFuture<'static, FlightResult<E>>,
        E: fmt::Display + FromJoin + Transient,
    {
        let inflight = self.inflight.lock().unwrap_or_else(|p| p.into_inner());
        self.fetch_locked(inflight, clock, claims, start)
    }

    /// `fetch_carrying`, for a caller that decided to fetch on the state `seen` (from
    /// `current`, still held): `None`, starting nothing, if a fetch has ended since, its
    /// result published (the state is another), for the caller to look again. A caller that
    /// looked just before a fetch published and asks just after it ended would otherwise
    /// start a second fetch for a result already out. A fetch under way is joined.
    pub fn fetch_unless_moved<F>(
        self: &Arc<Self>,
        clock: Arc<dyn Clock>,
        claims: Option<Arc<str>>,
        seen: &SlotState,
        start: F,
    ) -> Option<(Joined, Flight<E>, Option<Arc<str>>)>
    where
        F: FnOnce() -> BoxFuture<'static, FlightResult<E>>,
        E: fmt::Display + FromJoin + Transient,
    {
        let inflight = self.inflight.lock().unwrap_or_else(|p| p.into_inner());
        // A fetch publishes (storing a new state) and ends under this lock.
        if inflight.is_none() && !std::ptr::eq(&**self.current.load(), seen) {
            return None;
        }
        Some(self.fetch_locked(inflight, clock, claims, start))
    }

    fn fetch_locked<F>(
        self: &Arc<Self>,
        mut inflight: std::sync::MutexGuard<'_, Option<Carrying<E>>>,
        clock: Arc<dyn Clock>,
        claims: Option<Arc<str>>,
        start: F,
    ) -> (Joined, Flight<E>, Option<Arc<str>>)
    where
        F: FnOnce() -> BoxFuture<'static, FlightResult<E>>,
        E: fmt::Display + FromJoin + Transient,
    {
        if let Some((f, carries)) = inflight.as_ref() {
            return (Joined::Follower, f.clone(), carries.clone());
        }
        let work = start();
        let mut done = EndFlight(Arc::downgrade(self));
        // A fetch carrying a caller's claims answers that caller: its failure (perhaps those
        // claims refused) is not the key's, for its callers and watchers to be told of.
        let publishes_failure = claims.is_none();
        let spawning = Spawning::enter();
        let task = tokio::spawn(async move {
            let result = work.await;
            if let Some(slot) = done.0.upgrade() {
                // Published and ended under the flight's lock: a fetch found under way has
                // not published yet. Ended after its result was published, a flight could be
                // joined for a result already out: a refresh joining it took the token it
                // was to replace for a new one, and the key was never refreshed again.
                let mut inflight = slot.inflight.lock().unwrap_or_else(|p| p.into_inner());
                if result.is_ok() || publishes_failure {
                    slot.publish(&result, clock.moment());
                }
                *inflight = None;
                drop(inflight);
                done.0 = Weak::new();
            }
            // Should the fetch panic, the unwinding drops `done`, which ends the flight.
            drop(done);
            result
        });
        drop(spawning);
        let flight: Flight<E> = async move {
            match task.await {
                Ok(r) => r,
                // The task ends early only if the fetch panicked or the runtime is shutting
                // down; its waiters get an error, and the next caller starts a new flight.
                Err(e) => Err(Arc::new(E::from_join(e))),
            }
        }
        .boxed()
        .shared();
        *inflight = Some((flight.clone(), claims.clone()));
        (Joined::Leader, flight, claims)
    }
}

/// Clears a slot's flight when dropped: when the fetch task ends, whether it returned or
/// panicked, so that no caller joins a flight that is over.
struct EndFlight<E>(Weak<Slot<E>>);

impl<E> Drop for EndFlight<E> {
    fn drop(&mut self) {
        // Dropped inside `fetch`'s own spawn (a runtime that has shut down drops the task at
        // once, on the spawning thread), the slot's lock is this thread's: taking it again
        // would deadlock. The flight then stays, failed; the runtime is going away anyway.
        if SPAWNING.with(std::cell::Cell::get) {
            return;
        }
        if let Some(slot) = self.0.upgrade() {
            *slot.inflight.lock().unwrap_or_else(|p| p.into_inner()) = None;
        }
    }
}

thread_local! {
    /// Set while this thread spawns a flight's task, holding the slot's lock.
    static SPAWNING: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Marks this thread as spawning a flight's task until dropped.
struct Spawning;

impl Spawning {
    fn enter() -> Spawning {
        SPAWNING.with(|s| s.set(true));
        Spawning
    }
}

impl Drop for Spawning {
    fn drop(&mut self) {
        SPAWNING.with(|s| s.set(false));
    }
}

/// Errors that can stand for a fetch task that died.
pub trait FromJoin {
    fn from_join(e: tokio::task::JoinError) -> Self;
}

/// Errors that tell a failure asking again may clear from one it will not.
pub trait Transient {
    /// An outage, throttling, an open breaker: not a refusal of the configuration, nor a bug.
    fn is_transient(&self) -> bool;
}

/// Bounded map of slots. Idle slots are evicted; a slot's token validity is checked on read.
///
/// Hashed with foldhash (seeded per process), not SipHash: a key reaches the cache only once
/// the policy has granted its tenant and every one of its scopes, exactly, so the keys that
/// can exist are combinations of what the operator configured, and no caller can choose keys
/// that collide. (The development identity's `*` grants are the exception, on loopback.)
///
/// One slot per key: every slot the cache takes in is taken in under the `watched` lock
/// (a request's miss, a watcher's subscription, a watched slot put back), so that while a
/// key has a slot kept for its watchers, the cache holds that slot or none. Requests and
/// watchers therefore always share one slot, and a key has one refresh chain.
pub struct TokenCache<E> {
    slots: moka::future::Cache<Key, Arc<Slot<E>>, foldhash::fast::RandomState>,
    /// The slots that have watchers, held here too: a key only watched is never read by a
    /// request, so the cache would evict it once idle (or under size pressure), ending its
    /// refreshes and its watchers' streams. A lookup that misses `slots` finds a watched slot
    /// here and puts it back; `keep` lets go of it once nobody watches. An async lock: slots
    /// are taken into the cache while it is held. Requests that hit never take it.
    watched: tokio::sync::Mutex<HashMap<Key, Arc<Slot<E>>, foldhash::fast::RandomState>>,
}

impl<E> fmt::Debug for TokenCache<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenCache")
            .field("entries", &self.slots.entry_count())
            .finish()
    }
}

impl<E: Send + Sync + 'static> TokenCache<E> {
    pub fn new(max_entries: u64, idle: Duration) -> Self {
        TokenCache {
            slots: moka::future::Cache::builder()
                .max_capacity(max_entries)
                // Least recently used goes first, and every slot is taken in. moka's default
                // (TinyLFU) turns a new key away while the cache is full of keys read more
                // often: its slot was dropped at the next housekeeping, so each of its
                // requests fetched anew, its fetches under way were not joined, and its
                // failures were not held. A key's fetch is paid by the time its slot is
                // judged, and a token cached is what spares the upstream.
                .eviction_policy(moka::policy::EvictionPolicy::lru())
                .time_to_idle(idle)
                .eviction_listener(|_, slot: Arc<Slot<E>>, _| {
                    slot.cached.fetch_sub(1, Ordering::AcqRel);
                })
                .build_with_hasher(foldhash::fast::RandomState::default()),
            watched: tokio::sync::Mutex::default(),
        }
    }

    /// The key's slot; when there is none, the one kept for the key's watchers, or else an
    /// empty one under `owned()` (the key's owned form, which shares the tenant's name with
    /// the configuration).
    pub async fn slot(&self, key: &dyn KeyView, owned: impl FnOnce() -> Key) -> Arc<Slot<E>> {
        if let Some(slot) = self.slots.get(key).await {
            return slot;
        }
        let owned = owned();
        debug_assert!(
            &owned as &dyn KeyView == key,
            "the owned key is another key"
        );
        let watched = self.watched.lock().await;
        let kept = watched.get(&owned).cloned();
        self.slots
            .get_with(owned, async {
                kept.unwrap_or_else(|| Arc::new(Slot::new())).taken_in()
            })
            .await
    }

    /// Subscribes to the key's slot (the one requests find), and keeps it for as long as it
    /// has watchers, even if the cache evicts it. Returns the slot too.
    pub async fn watch(&self, key: &Key) -> (watch::Receiver<SlotState>, Arc<Slot<E>>) {
        let mut watched = self.watched.lock().await;
        let kept = match watched.get(key) {
            Some(kept) => kept.clone(),
            None => {
                let slot = self
                    .slots
                    .get_with_by_ref(key, async { Arc::new(Slot::new()).taken_in() })
                    .await;
                watched.insert(key.clone(), slot.clone());
                slot
            }
        };
        // Under the lock: `keep` asks under it whether the slot is watched.
        (kept.subscribe(), kept)
    }

    /// For the tasks that keep `slot` (its refresh chain, a watched key's first fetch), at
    /// each turn: whether `slot` is still the key's. A watched slot is: it is read (so the
    /// cache does not count it idle) or, if evicted, put back. One nobody watches any more
    /// is let go, to be evicted like any other, and is the key's while the cache holds it:
    /// once evicted, the key's next request makes a new slot, and this one's tasks end.
    pub async fn keep(&self, key: &Key, slot: &Arc<Slot<E>>) -> bool {
        let mut watched = self.watched.lock().await;
        // Asked under the lock: `watch` subscribes under it.
        if slot.watched() {
            self.slots
                .get_with_by_ref(key, async { slot.clone().taken_in() })
                .await;
            return true;
        }
        if watched.get(key).is_some_and(|w| Arc::ptr_eq(w, slot)) {
            watched.remove(key);
        }
        // `contains_key` too: an entry idle past its time is gone for lookups at once, but
        // its eviction is noticed only at the cache's next housekeeping (and neither
        // question counts as a read).
        slot.cached() && self.slots.contains_key(key)
    }

    /// Forgets the remembered persistent failure of every slot, those held for their
    /// watchers included; how many were in force at `now`.
    pub async fn forget_persistent(&self, now: Moment) -> usize {
        let watched: Vec<_> = self.watched.lock().await.values().cloned().collect();
        // A slot both cached and watched is counted once: the second look finds nothing.
        self.slots
            .iter()
            .map(|(_, slot)| slot)
            .chain(watched)
            .filter(|slot| slot.forget_persistent(now))
            .count()
    }

    /// The number of slots held for their watchers.
    pub async fn watched_count(&self) -> usize {
        self.watched.lock().await.len()
    }

    /// Drops `key` from the cache, as eviction does (tests).
    pub async fn evict(&self, key: &Key) {
        self.slots.invalidate(key).await;
        self.slots.run_pending_tasks().await;
    }

    /// Runs the cache's housekeeping (admissions, evictions) now, as it runs on its own
    /// every few hundred milliseconds (tests).
    pub async fn housekeeping(&self) {
        self.slots.run_pending_tasks().await;
    }

    pub async fn existing(&self, key: &Key) -> Option<Arc<Slot<E>>> {
        self.slots.get(key).await
    }

    pub fn entry_count(&self) -> u64 {
        self.slots.entry_count()
    }

    /// Every slot, for periodic jobs (metrics, pre-warm checks).
    pub fn iter(&self) -> impl Iterator<Item = (Arc<Key>, Arc<Slot<E>>)> + '_ {
        self.slots.iter()
    }
}

#[cfg(test)]
mod tests {
    use std::hash::BuildHasher;

    use super::*;

    fn key(tenant: &str, scopes: &[&str]) -> Key {
        Key {
            tenant: tenant.into(),
            scopes: scopes.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_entry_come_due_as_it_is_scheduled_starts_its_chain() {
        let clock = crate::clock::ManualClock::new();
        let slot: Arc<Slot<String>> = Arc::new(Slot::new());
        let (tell, mut told) = tokio::sync::mpsc::unbounded_channel();
        let on_due = {
            let slot = slot.clone();
            move |id, ()| {
                let chain = tokio::spawn(std::future::pending::<()>());
                let _ = tell.send(slot.run_refresh(id, chain.abort_handle()));
            }
        };
        let table = crate::timetable::Timetable::new(Arc::new(clock.clone()), on_due);
        // Due at once, and the scheduling thread stalls after the insertion (the runner, on
        // the other thread, hands the entry out meanwhile): its chain still starts.
        slot.schedule_refresh(|| {
            let entry = table.insert(clock.moment(), ());
            std::thread::sleep(Duration::from_millis(50));
            entry
        });
        assert!(told.recv().await.unwrap(), "the chain found its own entry");
        assert!(matches!(
            &*slot.refresh.lock().unwrap(),
            Refresh::Running(_)
        ));
    }

    #[tokio::test]
    async fn an_entry_come_due_after_a_newer_tokens_was_scheduled_leaves_the_newer_one() {
        let clock = crate::clock::ManualClock::new();
        let table =
            crate::timetable::Timetable::new(std::sync::Arc::new(clock.clone()), |_, ()| {});
        let slot: Slot<String> = Slot::new();
        let t = clock.moment() + Duration::from_secs(60);
        let mut old_id = None;
        slot.schedule_refresh(|| {
            let old = table.insert(t, ());
            old_id = Some(old.id());
            old
        });
        let old_id = old_id.unwrap();
        // The old token's entry came due (taken out), and a newer token's was scheduled
        // before the old one's chain started.
        slot.schedule_refresh(|| table.insert(t, ()));
        let chain = tokio::spawn(std::future::pending::<()>());
        assert!(!slot.run_refresh(old_id, chain.abort_handle()));
        assert!(
            matches!(&*slot.refresh.lock().unwrap(), Refresh::Scheduled(s) if s.id() != old_id)
        );
        assert_eq!(table.len(), 1, "the newer token's entry is kept");
        // Its own chain takes over; its entry is out of the table.
        let new_id = match &*slot.refresh.lock().unwrap() {
            Refresh::Scheduled(s) => s.id(),
            other => panic!("{other:?}"),
        };
        assert!(slot.run_refresh(new_id, chain.abort_handle()));
        assert!(table.is_empty());
        // A newer token's refresh ends the running chain.
        slot.schedule_refresh(|| table.insert(t, ()));
        assert!(chain.await.unwrap_err().is_cancelled());
    }

    #[test]
    fn owned_and_borrowed_keys_hash_and_compare_alike() {
        let hasher = std::collections::hash_map::RandomState::new();
        let owned = key("contoso", &["https://graph.microsoft.com/.default"]);
        let scopes = vec!["https://graph.microsoft.com/.default".to_owned()];
        let borrowed = KeyRef {
            tenant: "contoso",
            scopes: &scopes,
        };
        assert_eq!(
            hasher.hash_one(&owned),
            hasher.hash_one(&borrowed as &dyn KeyView)
        );
        let owned_view: &dyn KeyView = owned.borrow();
        assert!(owned_view == &borrowed as &dyn KeyView);
    }

    #[tokio::test]
    async fn the_cache_holds_at_most_its_configured_number_of_keys() {
        let cache: TokenCache<String> = TokenCache::new(10, Duration::from_secs(3600));
        for i in 0..100 {
            find(&cache, &format!("tenant-{i}"), &["s"]).await;
        }
        cache.slots.run_pending_tasks().await;
        assert!(
            cache.entry_count() <= 10,
            "{} keys held",
            cache.entry_count()
        );
    }

    /// The slot a request for `tenant` and `scopes` finds (made if there is none).
    async fn find(cache: &TokenCache<String>, tenant: &str, scopes: &[&str]) -> Arc<Slot<String>> {
        let scopes: Vec<String> = scopes.iter().map(|s| s.to_string()).collect();
        let view = KeyRef {
            tenant,
            scopes: &scopes,
        };
        cache
            .slot(&view, || Key {
                tenant: tenant.into(),
                scopes: scopes.as_slice().into(),
            })
            .await
    }

    impl FromJoin for String {
        fn from_join(e: tokio::task::JoinError) -> Self {
            format!("fetch task ended: {e}")
        }
    }

    /// A failure is transient unless it says it was refused.
    impl Transient for String {
        fn is_transient(&self) -> bool {
            !self.contains("refused")
        }
    }

    fn now() -> Moment {
        crate::clock::SystemClock.moment()
    }

    fn token() -> Arc<CachedToken> {
        let now = crate::clock::SystemClock.moment();
        let access_token = Sensitive::new(String::from("t"));
        Arc::new(CachedToken {
            fingerprint: access_token.fingerprint(),
            access_token,
            token_type: "Bearer",
            expires: now + Duration::from_secs(3600),
            refresh: now + Duration::from_secs(1800),
            issued_validity: 3600,
            tenant_id: "t".into(),
            client_id: "c".into(),
            scopes: Arc::new([]),
        })
    }

    #[tokio::test]
    async fn a_fetch_that_panics_ends_its_flight_and_the_next_caller_starts_another() {
        let slot: Arc<Slot<String>> = Arc::new(Slot::new());
        let (joined, flight) = slot.fetch(Arc::new(crate::clock::SystemClock), || {
            async { panic!("the fetch fails hard") }.boxed()
        });
        assert_eq!(joined, Joined::Leader);
        let e = flight.await.unwrap_err();
        assert!(e.contains("panic"), "{e}");
        let (joined, flight) = slot.fetch(Arc::new(crate::clock::SystemClock), || {
            async { Ok(token()) }.boxed()
        });
        assert_eq!(joined, Joined::Leader, "a new flight, not the finished one");
        assert!(flight.await.is_ok());
        assert!(slot.current().token.is_some());
    }

    #[tokio::test]
    async fn a_fetch_decided_on_a_state_since_replaced_is_not_started() {
        let slot: Arc<Slot<String>> = Arc::new(Slot::new());
        let clock: Arc<dyn Clock> = Arc::new(crate::clock::SystemClock);
        let seen = slot.current();
        // Another caller's fetch ends, its token published, after this one looked.
        let (_, flight) = slot.fetch(clock.clone(), || async { Ok(token()) }.boxed());
        flight.await.unwrap();
        let started =
            slot.fetch_unless_moved(clock.clone(), None, &seen, || async { Ok(token()) }.boxed());
        assert!(started.is_none(), "a second fetch for a result already out");
        // On the state as it is now, it starts; and a fetch under way is joined.
        let now = slot.current();
        let gate = Arc::new(tokio::sync::Notify::new());
        let open = gate.clone();
        let (joined, flight, _) = slot
            .fetch_unless_moved(clock.clone(), None, &now, move || {
                async move {
                    open.notified().await;
                    Ok(token())
                }
                .boxed()
            })
            .expect("started");
        assert_eq!(joined, Joined::Leader);
        let (joined, _, _) = slot
            .fetch_unless_moved(clock.clone(), None, &seen, || async { Ok(token()) }.boxed())
            .expect("joined");
        assert_eq!(joined, Joined::Follower);
        gate.notify_one();
        flight.await.unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_flight_is_over_once_its_result_is_published() {
        // Whoever sees the published result finds no flight to join: a refresh joining one
        // already published takes the token it was to replace for a new one.
        for _ in 0..500 {
            let slot: Arc<Slot<String>> = Arc::new(Slot::new());
            let rx = slot.subscribe();
            // A thread of its own, looking as soon as the result is out.
            let watcher = {
                let slot = slot.clone();
                std::thread::spawn(move || {
                    while !rx.has_changed().unwrap() {
                        std::hint::spin_loop();
                    }
                    slot.flight().is_none()
                })
            };
            let (_, flight) = slot.fetch(Arc::new(crate::clock::SystemClock), || {
                async { Ok(token()) }.boxed()
            });
            flight.await.unwrap();
            assert!(
                watcher.join().unwrap(),
                "a published flight could still be joined"
            );
        }
    }

    #[test]
    fn watchers_are_woken_by_a_new_token_and_a_refreshs_first_failure_only() {
        let slot: Slot<String> = Slot::new();
        let mut rx = slot.subscribe();
        let fail = |e: &str| Err(Arc::new(e.to_owned()));
        slot.publish(&Ok(token()), now());
        assert!(rx.has_changed().unwrap());
        rx.borrow_and_update();
        // Before the token's refresh is due (a forced refresh failing): no news either.
        slot.publish(&fail("refused"), now());
        assert!(!rx.has_changed().unwrap());
        assert!(slot.current().failure.is_none(), "the token stays healthy");
        let due = now() + Duration::from_secs(1800);
        slot.publish(&fail("down"), due);
        assert!(rx.has_changed().unwrap());
        rx.borrow_and_update();
        slot.publish(&fail("still down"), due);
        assert!(
            !rx.has_changed().unwrap(),
            "a retry failing again is no news"
        );
        // The text is current for requests and for the next message.
        assert_eq!(slot.current().failure.as_deref(), Some("still down"));
        assert_eq!(rx.borrow().failure.as_deref(), Some("still down"));
        assert!(slot.current().failure_transient);
        // An outage turning into a refusal for good is news (the key is now remembered,
        // not retried), and the other way round; another refusal is not.
        slot.publish(&fail("refused"), due);
        assert!(
            !slot.current().failure_transient,
            "the latest failure's kind"
        );
        assert!(
            rx.has_changed().unwrap(),
            "a failure of another kind is news"
        );
        rx.borrow_and_update();
        slot.publish(&fail("refused"), due);
        assert!(!rx.has_changed().unwrap(), "the same kind again is no news");
        slot.publish(&fail("down"), due);
        assert!(rx.has_changed().unwrap(), "back to an outage is news");
        rx.borrow_and_update();
        slot.publish(&Ok(token()), now());
        assert!(rx.has_changed().unwrap());
        assert!(rx.borrow_and_update().failure.is_none());
        assert!(!slot.current().failure_transient);
    }

    #[test]
    fn a_flight_started_on_a_runtime_that_has_shut_down_fails_instead_of_hanging() {
        // tokio drops a task spawned on a closed runtime at once, on the spawning thread:
        // its end-of-flight guard then runs inside `fetch`. Checked on a thread of its own,
        // so that a regression fails the test instead of hanging it.
        let (tell, told) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .build()
                .unwrap();
            let handle = rt.handle().clone();
            drop(rt);
            let _inside = handle.enter();
            let slot: Arc<Slot<String>> = Arc::new(Slot::new());
            let (_, flight) = slot.fetch(Arc::new(crate::clock::SystemClock), || {
                async { Ok(token()) }.boxed()
            });
            let r = futures::executor::block_on(flight);
            let _ = tell.send(r.map(drop));
        });
        let r = told
            .recv_timeout(Duration::from_secs(30))
            .expect("fetch returned");
        assert!(r.is_err(), "the flight never ran");
    }

    #[tokio::test]
    async fn watchers_and_requests_share_one_slot_per_key_across_evictions() {
        let cache: TokenCache<String> = TokenCache::new(100, Duration::from_secs(60));
        let k = key("t", &["s"]);
        // The cache evicted a request's slot and a later request made a new one: a watcher
        // follows the new one, which requests find.
        let first = cache.slot(&k, || k.clone()).await;
        cache.evict(&k).await;
        assert!(!first.cached());
        let second = cache.slot(&k, || k.clone()).await;
        assert!(!Arc::ptr_eq(&first, &second));
        let (rx, kept) = cache.watch(&k).await;
        assert!(Arc::ptr_eq(&kept, &second));
        // Evicted while watched: a request's miss finds the watched slot again, and so does
        // a later watcher.
        cache.evict(&k).await;
        assert!(!second.cached());
        assert!(Arc::ptr_eq(&cache.slot(&k, || k.clone()).await, &second));
        assert!(second.cached());
        cache.evict(&k).await;
        let (_later, kept) = cache.watch(&k).await;
        assert!(Arc::ptr_eq(&kept, &second));
        drop((kept, second));
        // The cache lets go of it: the watchers' streams go on.
        cache.evict(&k).await;
        assert!(rx.has_changed().is_ok(), "its slot is still kept");
    }

    #[tokio::test]
    async fn keep_says_whether_a_slot_is_still_its_keys() {
        let cache: TokenCache<String> = TokenCache::new(100, Duration::from_secs(60));
        let k = key("t", &["s"]);
        let slot = cache.slot(&k, || k.clone()).await;
        assert!(cache.keep(&k, &slot).await);
        // Evicted while a request held it: its tasks end.
        cache.evict(&k).await;
        assert!(!cache.keep(&k, &slot).await);
        let new = cache.slot(&k, || k.clone()).await;
        assert!(!cache.keep(&k, &slot).await, "replaced");
        assert!(cache.keep(&k, &new).await);
        // Watched, a slot is the key's even once evicted, and is put back.
        let (rx, watched) = cache.watch(&k).await;
        assert!(Arc::ptr_eq(&watched, &new));
        cache.evict(&k).await;
        assert!(cache.keep(&k, &new).await);
        let cached = cache.existing(&k).await.expect("put back");
        assert!(Arc::ptr_eq(&cached, &new));
        // Nobody watches any more: let go of, and the key's while the cache holds it.
        drop(rx);
        assert!(cache.keep(&k, &new).await);
        assert_eq!(cache.watched_count().await, 0);
        cache.evict(&k).await;
        assert!(!cache.keep(&k, &new).await);
    }

    #[tokio::test]
    async fn a_slot_idle_past_its_time_is_not_its_keys_before_housekeeping_notices() {
        // moka's idle expiry runs on its own clock: a short idle time, waited for.
        let cache: TokenCache<String> = TokenCache::new(100, Duration::from_millis(20));
        let k = key("t", &["s"]);
        let slot = cache.slot(&k, || k.clone()).await;
        assert!(cache.keep(&k, &slot).await);
        std::thread::sleep(Duration::from_millis(100));
        assert!(!cache.keep(&k, &slot).await, "expired for lookups");
    }

    #[tokio::test]
    async fn a_borrowed_key_finds_its_own_slot_and_no_other() {
        let cache: TokenCache<String> = TokenCache::new(100, Duration::from_secs(60));
        let owned = key("ab", &["c"]);
        let slot = cache.slot(&owned, || owned.clone()).await;
        assert!(Arc::ptr_eq(&slot, &find(&cache, "ab", &["c"]).await));
        // The same characters split differently, and another scope order, are other keys.
        assert!(!Arc::ptr_eq(&slot, &find(&cache, "a", &["bc"]).await));
        let owned = key("ab", &["c", "d"]);
        let two = cache.slot(&owned, || owned.clone()).await;
        assert!(!Arc::ptr_eq(&two, &find(&cache, "ab", &["d", "c"]).await));
        assert!(Arc::ptr_eq(&two, &find(&cache, "ab", &["c", "d"]).await));
    }
}
