//! The refresh timetable: when each cached key's token is next to be refreshed, in one
//! ordered table, and the one task that sleeps until the earliest entry and hands out the
//! entries come due.
//!
//! A sleeping task per key, with its timer, cost some 630 bytes per cached token, and
//! spawning it on the miss path woke the runtime's other thread on most misses
//! (docs/PERFORMANCE.md). An entry costs a fraction of that, and scheduling one takes a
//! lock and an insertion; the runner is woken only for an entry due before the time it
//! sleeps until.
//!
//! Deadlines are `Moment`s, reached on either clock. The table orders them by when they are
//! due as seen at insertion (the lesser of what either clock says is left, counted on the
//! monotonic clock). A step of the wall clock changes what is left for every entry: the
//! runner sees it at its next look (at least once a `NAP`) and orders every entry again.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

use crate::clock::{Clock, Moment};

/// The longest the runner sleeps without looking: how soon a step of the wall clock is
/// seen (the system clock's sleeps look as often).
const NAP: Duration = Duration::from_secs(60);

/// A wall clock that moved this much more or less than the monotonic one between two looks
/// was stepped.
const STEP: Duration = Duration::from_secs(1);

/// Entries of type `T` due at their moments; each handed to `on_due` once, with its id, on a
/// task of its own (the runner), unless its handle (`Scheduled`) was dropped first.
pub struct Timetable<T> {
    table: Mutex<Table<T>>,
    clock: Arc<dyn Clock>,
    on_due: Box<dyn Fn(u64, T) + Send + Sync>,
    /// Wakes the runner for an entry due before the time it sleeps until. Apart from the
    /// table so that the sleeping runner holds no reference to the table: dropping the
    /// timetable ends it.
    sooner: Arc<Notify>,
}

struct Table<T> {
    due: BTreeMap<(Instant, u64), (Moment, T)>,
    /// Where each entry is in `due`, for its handle to take it out.
    place: HashMap<u64, Instant, foldhash::fast::RandomState>,
    next_id: u64,
    /// What the sleeping runner waits for; `None` while it looks (it looks at the table
    /// before it sleeps again: no need to wake it).
    sleeping_until: Option<Instant>,
    /// The runner's last look, to see a step of the wall clock.
    last_look: Option<Moment>,
    runner: Option<tokio::task::AbortHandle>,
}

impl<T: Send + 'static> fmt::Debug for Timetable<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Timetable")
            .field("entries", &self.len())
            .finish_non_exhaustive()
    }
}

/// An entry's place in its timetable: dropping it takes the entry out, unless it has come
/// due already.
pub struct Scheduled {
    table: Weak<dyn Unschedule>,
    id: u64,
}

impl Scheduled {
    /// Tells this entry from others of the same timetable.
    pub fn id(&self) -> u64 {
        self.id
    }
}

impl fmt::Debug for Scheduled {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Scheduled").field("id", &self.id).finish()
    }
}

impl Drop for Scheduled {
    fn drop(&mut self) {
        if let Some(table) = self.table.upgrade() {
            table.remove(self.id);
        }
    }
}

trait Unschedule: Send + Sync {
    fn remove(&self, id: u64);
}

impl<T: Send + 'static> Unschedule for Timetable<T> {
    fn remove(&self, id: u64) {
        let mut t = self.lock();
        if let Some(at) = t.place.remove(&id) {
            t.due.remove(&(at, id));
        }
    }
}

/// When `deadline` is due, counted on `now`'s monotonic clock.
fn due_at(deadline: Moment, now: Moment) -> Instant {
    now.mono + deadline.until(now)
}

impl<T: Send + 'static> Timetable<T> {
    pub fn new(
        clock: Arc<dyn Clock>,
        on_due: impl Fn(u64, T) + Send + Sync + 'static,
    ) -> Arc<Self> {
        Arc::new(Timetable {
            table: Mutex::new(Table {
                due: BTreeMap::new(),
                place: HashMap::default(),
                next_id: 0,
                sleeping_until: None,
                last_look: None,
                runner: None,
            }),
            clock,
            on_due: Box::new(on_due),
            sooner: Arc::new(Notify::new()),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Table<T>> {
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Entries waiting.
    pub fn len(&self) -> usize {
        self.lock().due.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Hands `item` to `on_due` at `deadline`, unless the handle returned is dropped first.
    /// Starts the runner on the current tokio runtime if none runs.
    pub fn insert(self: &Arc<Self>, deadline: Moment, item: T) -> Scheduled {
        let now = self.clock.moment();
        let at = due_at(deadline, now);
        let mut t = self.lock();
        let id = t.next_id;
        t.next_id += 1;
        t.due.insert((at, id), (deadline, item));
        t.place.insert(id, at);
        if t.runner.as_ref().is_none_or(|r| r.is_finished()) {
            // Not woken for each insertion: it looks at the table when it starts.
            t.sleeping_until = None;
            t.runner = Some(tokio::spawn(run(Arc::downgrade(self))).abort_handle());
        } else if t.sleeping_until.is_some_and(|s| at < s) {
            t.sleeping_until = None;
            self.sooner.notify_one();
        }
        drop(t);
        let table: Weak<dyn Unschedule> = Arc::downgrade(self) as Weak<dyn Unschedule>;
        Scheduled { table, id }
    }

    /// Takes out the entries due at `now`, ordering every entry again first if the wall
    /// clock was stepped since the last look.
    fn take_due(&self, now: Moment) -> Vec<(u64, T)> {
        let mut t = self.lock();
        t.sleeping_until = None;
        if let Some(last) = t.last_look.replace(now) {
            let mono = now.mono.saturating_duration_since(last.mono);
            let stepped = match now.wall.duration_since(last.wall) {
                Ok(wall) => wall.abs_diff(mono) > STEP,
                Err(back) => back.duration() + mono > STEP,
            };
            if stepped {
                let t = &mut *t;
                let entries = std::mem::take(&mut t.due);
                for ((_, id), (deadline, item)) in entries {
                    let at = due_at(deadline, now);
                    t.place.insert(id, at);
                    t.due.insert((at, id), (deadline, item));
                }
            }
        }
        let mut due = Vec::new();
        while let Some(entry) = t.due.first_entry() {
            if !entry.get().0.reached(now) {
                break;
            }
            let ((_, id), (_, item)) = entry.remove_entry();
            t.place.remove(&id);
            due.push((id, item));
        }
        due
    }

    /// What the runner sleeps until after a look at `now`: the first entry, at most a `NAP`.
    fn plan_sleep(&self, now: Moment) -> Moment {
        let mut t = self.lock();
        let nap = now + NAP;
        let until = match t.due.first_key_value() {
            Some((_, (deadline, _))) => deadline.earlier(nap),
            None => nap,
        };
        t.sleeping_until = Some(due_at(until, now));
        until
    }
}

impl<T> Drop for Timetable<T> {
    fn drop(&mut self) {
        let t = self.table.get_mut().unwrap_or_else(|p| p.into_inner());
        if let Some(runner) = t.runner.take() {
            runner.abort();
        }
    }
}

/// The runner: hands out the entries come due, sleeps until the next, for as long as the
/// timetable lives. Holds it only while it looks.
async fn run<T: Send + 'static>(table: Weak<Timetable<T>>) {
    loop {
        let Some(tt) = table.upgrade() else { return };
        let now = tt.clock.moment();
        for (id, item) in tt.take_due(now) {
            (tt.on_due)(id, item);
        }
        let until = tt.plan_sleep(now);
        let sleep = tt.clock.sleep_until(until);
        let sooner = tt.sooner.clone();
        drop(tt);
        tokio::select! {
            () = sleep => {}
            () = sooner.notified() => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;
    use std::sync::Mutex as StdMutex;

    fn table(clock: &ManualClock) -> (Arc<Timetable<u32>>, Arc<StdMutex<Vec<u32>>>) {
        let seen = Arc::new(StdMutex::new(Vec::new()));
        let s = seen.clone();
        let tt = Timetable::new(Arc::new(clock.clone()), move |_, n| {
            s.lock().unwrap().push(n)
        });
        (tt, seen)
    }

    async fn settle() {
        for _ in 0..20 {
            tokio::task::yield_now().await;
        }
    }

    fn secs(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    #[tokio::test]
    async fn entries_come_due_in_order_once_each_and_dropped_ones_never() {
        let clock = ManualClock::new();
        let (tt, seen) = table(&clock);
        let t0 = clock.moment();
        let _a = tt.insert(t0 + secs(30), 30);
        let _b = tt.insert(t0 + secs(10), 10);
        let c = tt.insert(t0 + secs(20), 20);
        let _d = tt.insert(t0 + secs(20), 21);
        settle().await;
        assert!(seen.lock().unwrap().is_empty());
        drop(c);
        assert_eq!(tt.len(), 3);
        clock.advance(secs(10));
        settle().await;
        assert_eq!(*seen.lock().unwrap(), [10]);
        clock.advance(secs(25));
        settle().await;
        assert_eq!(*seen.lock().unwrap(), [10, 21, 30]);
        assert!(tt.is_empty());
        clock.advance(secs(3600));
        settle().await;
        assert_eq!(seen.lock().unwrap().len(), 3);
    }

    #[tokio::test]
    async fn an_entry_due_before_the_runners_sleep_wakes_it() {
        let clock = ManualClock::new();
        let (tt, seen) = table(&clock);
        let t0 = clock.moment();
        let _late = tt.insert(t0 + secs(50), 50);
        settle().await;
        // The runner now sleeps until 50 s; an entry due at 5 s is handed out at 5 s.
        let _soon = tt.insert(t0 + secs(5), 5);
        settle().await;
        clock.advance(secs(5));
        settle().await;
        assert_eq!(*seen.lock().unwrap(), [5]);
    }

    #[tokio::test]
    async fn a_wall_clock_stepped_forward_brings_entries_due_by_it_forward() {
        let clock = ManualClock::new();
        let (tt, seen) = table(&clock);
        let t0 = clock.moment();
        let _a = tt.insert(t0 + secs(300), 1);
        settle().await;
        // The wall clock is stepped 250 s forward (a host resumed from suspend, its
        // monotonic clock stood still): the first entry is due in 50 s by the wall clock.
        clock.set_wall(t0.wall + secs(250));
        // An entry inserted since, due in 100 s, comes after it, not before.
        let _b = tt.insert(clock.moment() + secs(100), 2);
        settle().await;
        clock.advance(secs(50));
        settle().await;
        assert_eq!(*seen.lock().unwrap(), [1]);
        clock.advance(secs(50));
        settle().await;
        assert_eq!(*seen.lock().unwrap(), [1, 2]);
    }

    #[tokio::test]
    async fn a_wall_clock_stepped_back_holds_nothing_back() {
        let clock = ManualClock::new();
        let (tt, seen) = table(&clock);
        let t0 = clock.moment();
        let _a = tt.insert(t0 + secs(100), 1);
        settle().await;
        clock.set_wall(t0.wall - secs(3600));
        clock.advance(secs(100));
        settle().await;
        assert_eq!(*seen.lock().unwrap(), [1]);
    }

    #[tokio::test]
    async fn dropping_the_timetable_ends_its_runner() {
        let clock = ManualClock::new();
        let (tt, _seen) = table(&clock);
        let _a = tt.insert(clock.moment() + secs(100), 1);
        settle().await;
        let alive = || {
            tokio::runtime::Handle::current()
                .metrics()
                .num_alive_tasks()
        };
        assert_eq!(alive(), 1);
        drop(tt);
        settle().await;
        assert_eq!(alive(), 0);
        // A handle outliving its timetable drops quietly.
        drop(_a);
    }
}
