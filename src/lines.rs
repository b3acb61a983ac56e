//! Lines written by a thread of their own, in batches: the audit trail's and the log's
//! writer. A request (or any thread) appends its line to a buffer of its thread's shard and
//! goes on; the writer thread swaps each shard's buffer for an empty one every `BATCH_PAUSE`
//! (backing off to `IDLE_PAUSE` when there is nothing) and writes it with one `write(2)`.
//!
//! Nothing wakes the writer per line: waking a sleeping thread costs a futex call and, on a
//! machine with idle cores, an interrupt to one of them, which showed on every cache miss
//! when the log went through a channel to its thread. Nothing is allocated per line and no
//! buffer changes threads per line: a queue of per-line buffers made the writer free memory
//! the request threads had allocated, contending with them in the allocator.
//!
//! When a shard is full (the output stalls: a slow disk, a pipe nobody reads), `WhenFull`
//! decides: the audit trail makes the request wait (records are never lost), the log drops
//! the line and counts it (a request never waits for the log). When the output fails (a full
//! disk), `keep_on_error` decides: the audit trail keeps what was not written and writes it
//! first once the output works (`failure` says why meanwhile, so the API can refuse to serve
//! unaudited), the log counts the lines as lost. An output that neither takes lines nor fails
//! (a pipe whose reader stopped reading, a hung network disk) fails too, once a call into it
//! has not returned for `Options::stall`, until it returns.
//!
//! Lines of one thread keep their order; lines of different threads written in one batch may
//! be out of time order by up to one pause (each line carries its time).

use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::striped::Striped;

/// The writer's pause after a batch: under load, the most a line waits before it is
/// written (plus the write itself).
const BATCH_PAUSE: Duration = Duration::from_millis(5);
/// The longest pause: with nothing to write the pause doubles up to this, so an idle
/// writer wakes ten times a second rather than two hundred, and the first line after a
/// quiet spell waits at most this long.
const IDLE_PAUSE: Duration = Duration::from_millis(100);
/// Capacity a buffer keeps after it is written: a few pauses' worth of lines at full load.
const KEEP_CAPACITY: usize = 64 * 1024;
/// How long a waiting thread sleeps before it looks again, should a wake-up be missed.
const RECHECK: Duration = Duration::from_millis(50);

/// What an append does when its shard already holds `limit` bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WhenFull {
    /// Append, then wait until the writer has taken the shard's buffer, at most
    /// `Options::stall` (not at all while the output is stalled), outside the async
    /// runtime's workers.
    Wait,
    /// Drop the line and count it.
    Drop,
}

/// How a writer behaves.
#[derive(Debug, Clone, Copy)]
pub struct Options {
    /// The writer thread's name.
    pub thread: &'static str,
    /// Bytes a shard holds before `when_full` applies.
    pub limit: usize,
    pub when_full: WhenFull,
    /// What the lines are, for the writer's own error messages ("audit records"); `None`
    /// for the log itself, whose errors would only go back into the failing output.
    pub report_errors_as: Option<&'static str>,
    /// When a write fails: keep what was not written, up to this many bytes, and write it
    /// (before anything newer) once the output works again; beyond it lines are lost and
    /// counted. `None`: lines a failed write did not take are lost and counted at once.
    pub keep_on_error: Option<usize>,
    /// How long one call into the output (a write, a flush) may go without returning before
    /// the output counts as stalled: `failure` says so until the call returns (a pipe nobody
    /// reads, a hung network disk never fail on their own). `None`: never stalled.
    pub stall: Option<Duration>,
}

/// Where the writer thread puts the lines.
pub trait Output: Write + Send {
    /// Called before each batch is written.
    fn before_batch(&mut self) {}
}

impl Output for std::io::Stdout {}
impl Output for std::io::Stderr {}

/// A batched line writer; see the module documentation.
pub struct Lines {
    shared: Arc<Shared>,
    writer: Mutex<Option<std::thread::JoinHandle<()>>>,
}

struct Shared {
    /// A shard per thread, each on a cache line of its own.
    shards: Striped<Mutex<Vec<u8>>>,
    options: Options,
    state: Mutex<WriterState>,
    /// Signalled after every batch the writer has written, and when it stops.
    written: Condvar,
    /// Times an append found its shard full (and waited, or dropped its line).
    full: AtomicU64,
    /// Set while the output fails (lines are waiting for it, or were lost).
    failing: AtomicBool,
    /// The output's last error, while `failing`.
    last_error: Mutex<Option<String>>,
    /// Lines lost because the output failed.
    lost: AtomicU64,
    /// `WhenFull::Wait`: bytes a shard holds (its waits having ended at the stall bound)
    /// beyond which further lines are lost and counted: its share of `keep_on_error`, at
    /// least `limit`. So a stalled output holds at most about `keep_on_error` in the shards
    /// (and as much again kept by the writer).
    shard_cap: usize,
    /// When the writer entered the call into the output it is in now, in nanoseconds since
    /// `epoch` plus one; 0 while it is not in one.
    in_output: AtomicU64,
    epoch: Instant,
}

#[derive(Default)]
struct WriterState {
    /// Flushes asked for so far; the writer answers them in order.
    requested: u64,
    /// Flushes answered: every line appended before the request is out.
    completed: u64,
    /// Set to stop the writer: it drains once more and stops.
    closed: bool,
    /// Set by the writer when it has stopped.
    stopped: bool,
}

impl std::fmt::Debug for Lines {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lines")
            .field("thread", &self.shared.options.thread)
            .finish_non_exhaustive()
    }
}

/// Locks, also after a panic elsewhere: the data is bytes and counters, valid at any point.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Lines {
    pub fn spawn(out: Box<dyn Output>, options: Options) -> std::io::Result<Self> {
        let shards: Striped<Mutex<Vec<u8>>> = Striped::default();
        let shard_cap = options
            .limit
            .max(options.keep_on_error.unwrap_or(0) / shards.iter().count().max(1));
        let shared = Arc::new(Shared {
            shards,
            shard_cap,
            options,
            state: Mutex::new(WriterState::default()),
            written: Condvar::new(),
            full: AtomicU64::new(0),
            failing: AtomicBool::new(false),
            last_error: Mutex::new(None),
            lost: AtomicU64::new(0),
            in_output: AtomicU64::new(0),
            epoch: Instant::now(),
        });
        let s = shared.clone();
        let writer = std::thread::Builder::new()
            .name(options.thread.into())
            .spawn(move || write_batches(&s, out))?;
        Ok(Lines {
            shared,
            writer: Mutex::new(Some(writer)),
        })
    }

    /// Appends one line (or several whole lines) through `write`, which writes into the
    /// calling thread's shard buffer.
    pub fn append(&self, write: impl FnOnce(&mut Vec<u8>)) {
        let shard = self.shared.shards.local();
        let limit = self.shared.options.limit;
        let full = {
            let mut buf = lock(shard);
            match self.shared.options.when_full {
                WhenFull::Drop if buf.len() >= limit => {
                    drop(buf);
                    self.shared.full.fetch_add(1, Ordering::Relaxed);
                    self.wake_writer();
                    return;
                }
                // The output stalls and the shard holds its share of what may be kept. (Only
                // when stalled: an output that is slow but moving makes appenders wait.)
                WhenFull::Wait
                    if buf.len() >= self.shared.shard_cap && self.shared.stalled().is_some() =>
                {
                    let start = buf.len();
                    write(&mut buf);
                    let lost = count_lines(&buf[start..]);
                    buf.truncate(start);
                    drop(buf);
                    self.shared.lost.fetch_add(lost, Ordering::Relaxed);
                    self.wake_writer();
                    return;
                }
                _ => {}
            }
            write(&mut buf);
            buf.len() >= limit
        };
        if full && self.shared.options.when_full == WhenFull::Wait {
            if self.shared.full.fetch_add(1, Ordering::Relaxed) == 0
                && let Some(what) = self.shared.options.report_errors_as
            {
                tracing::warn!(
                    limit_bytes = limit,
                    "the writer of {what} is behind its output; waiting for it (logged once)"
                );
            }
            self.wake_writer();
            // The line is in the buffer already: the wait is back-pressure only, so it ends at
            // the stall bound, and is skipped when the output is known to be stalled.
            if self.shared.stalled().is_none() {
                let deadline = self.shared.options.stall.map(|s| Instant::now() + s);
                off_the_runtime(|| self.wait_until(deadline, |_| lock(shard).len() < limit));
            }
        }
    }

    /// Times an append found its shard full: waits (`WhenFull::Wait`) or dropped lines
    /// (`WhenFull::Drop`).
    pub fn full_count(&self) -> u64 {
        self.shared.full.load(Ordering::Relaxed)
    }

    /// The output's error while it fails (lines wait for it or are lost), or its stall while
    /// a call into it has not returned for longer than `Options::stall`; `None` while it
    /// works. Two atomic loads when it works: requests may ask before each answer.
    pub fn failure(&self) -> Option<String> {
        if self.shared.failing.load(Ordering::Relaxed) {
            return Some(
                lock(&self.shared.last_error)
                    .clone()
                    .unwrap_or_else(|| "the output fails".into()),
            );
        }
        self.shared
            .stalled()
            .map(|for_| format!("the output has accepted nothing for {}", span(for_)))
    }

    /// Lines lost so far because the output failed, or stalled for longer than they could
    /// be kept.
    pub fn lost(&self) -> u64 {
        self.shared.lost.load(Ordering::Relaxed)
    }

    /// Blocks until every line appended before the call is written, is held for an output
    /// that fails, or is lost (or the writer is gone).
    ///
    /// Returns `false` without waiting further once the output is stalled (a write has not
    /// returned for the stall bound): shutdown must not hang on a pipe nobody reads.
    pub fn flush(&self) -> bool {
        let generation = {
            let mut state = lock(&self.shared.state);
            state.requested += 1;
            state.requested
        };
        self.wake_writer();
        self.wait_until(None, |state| {
            state.completed >= generation || self.shared.stalled().is_some()
        });
        lock(&self.shared.state).completed >= generation
    }

    /// Stops the writer after it has written everything appended so far, waiting at most
    /// `bound` for it (`None`: until it is done). Lines appended afterwards are not written.
    /// Returns whether the writer finished in time; if not, it is left to finish on its own
    /// (its output is stalled) and the caller goes on.
    /// With no bound it still stops waiting once the output is stalled.
    pub fn close(&self, bound: Option<Duration>) -> bool {
        lock(&self.shared.state).closed = true;
        self.wake_writer();
        let deadline = bound.map(|b| Instant::now() + b);
        self.wait_until(deadline, |state| {
            state.stopped || self.shared.stalled().is_some()
        });
        let stopped = lock(&self.shared.state).stopped;
        if stopped && let Some(w) = lock(&self.writer).take() {
            let _ = w.join();
        }
        stopped
    }

    /// Bytes in the shards now, and the number of shards.
    #[cfg(test)]
    pub(crate) fn buffered(&self) -> (usize, usize) {
        let n = self.shared.shards.iter().count();
        (self.shared.shards.iter().map(|s| lock(s).len()).sum(), n)
    }

    fn wake_writer(&self) {
        if let Some(w) = &*lock(&self.writer) {
            w.thread().unpark();
        }
    }

    /// Blocks until `done` holds after a batch the writer wrote, the writer is gone, or the
    /// deadline has passed.
    fn wait_until(&self, deadline: Option<Instant>, done: impl Fn(&WriterState) -> bool) {
        let mut state = lock(&self.shared.state);
        while !done(&state) && !state.stopped {
            let wait = match deadline {
                None => RECHECK,
                Some(d) => match d.checked_duration_since(Instant::now()) {
                    Some(left) if !left.is_zero() => left.min(RECHECK),
                    _ => return,
                },
            };
            state = self
                .shared
                .written
                .wait_timeout(state, wait)
                .map_or_else(|p| p.into_inner().0, |(s, _)| s);
        }
    }
}

impl Drop for Lines {
    /// Stops the writer after it has written everything appended, unless a bounded `close`
    /// already gave up on it.
    fn drop(&mut self) {
        if !lock(&self.shared.state).closed {
            self.close(None);
        }
    }
}

impl Shared {
    /// How long the writer has been in its current call into the output, when that is
    /// longer than `Options::stall`.
    fn stalled(&self) -> Option<Duration> {
        let entered = self.in_output.load(Ordering::Relaxed);
        if entered == 0 {
            return None;
        }
        let bound = self.options.stall?;
        let inside = self
            .epoch
            .elapsed()
            .saturating_sub(Duration::from_nanos(entered - 1));
        (inside >= bound).then_some(inside)
    }

    /// Calls into the output, marked as inside it meanwhile (`stalled` reads the mark);
    /// returns what the call returned and how long it took.
    fn watched<R>(&self, call: impl FnOnce() -> R) -> (R, Duration) {
        let start = self.epoch.elapsed();
        let nanos = u64::try_from(start.as_nanos()).unwrap_or(u64::MAX - 1);
        self.in_output.store(nanos + 1, Ordering::Relaxed);
        let r = call();
        self.in_output.store(0, Ordering::Relaxed);
        (r, self.epoch.elapsed().saturating_sub(start))
    }
}

/// Runs `wait` (a blocking wait) so that it does not hold up the async runtime: on a worker
/// of a multi-thread runtime, its other tasks move to another thread meanwhile
/// (`block_in_place`). A current-thread runtime cannot do that (`block_in_place` would
/// panic): there, and off any runtime, `wait` runs as it is.
fn off_the_runtime(wait: impl FnOnce()) {
    match tokio::runtime::Handle::try_current() {
        Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(wait);
        }
        _ => wait(),
    }
}

/// A span for people: whole seconds, or milliseconds below one.
fn span(d: Duration) -> String {
    if d >= Duration::from_secs(1) {
        format!("{} s", d.as_secs())
    } else {
        format!("{} ms", d.as_millis())
    }
}

/// Marks the writer stopped when its thread ends, also by a panic in the output, so no
/// one waits for it in vain.
struct StopOnExit<'a>(&'a Shared);

impl Drop for StopOnExit<'_> {
    fn drop(&mut self) {
        lock(&self.0.state).stopped = true;
        self.0.written.notify_all();
    }
}

/// Writes `buf` whole, or up to an error; what was written is removed from `buf` either way,
/// so a retry goes on where the output stopped (nothing written twice, nothing skipped).
/// Returns the longest any one write took alongside.
fn write_from(
    shared: &Shared,
    out: &mut dyn Output,
    buf: &mut Vec<u8>,
) -> (std::io::Result<()>, Duration) {
    let mut done = 0;
    let mut longest = Duration::ZERO;
    let result = loop {
        if done == buf.len() {
            break Ok(());
        }
        let (written, took) = shared.watched(|| out.write(&buf[done..]));
        longest = longest.max(took);
        match written {
            Ok(0) => break Err(std::io::ErrorKind::WriteZero.into()),
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => break Err(e),
        }
    };
    buf.drain(..done);
    (result, longest)
}

fn count_lines(buf: &[u8]) -> u64 {
    buf.iter().filter(|&&b| b == b'\n').count() as u64
}

/// The writer thread: every pause (or at once when asked), takes each shard's buffer and
/// writes it, then flushes. When the output fails, what it did not take is kept (up to
/// `keep_on_error`) and written first once it works again.
fn write_batches(shared: &Shared, mut out: Box<dyn Output>) {
    let _stop = StopOnExit(shared);
    let keep = shared.options.keep_on_error;
    let mut spare: Vec<u8> = Vec::new();
    let mut pending: Vec<u8> = Vec::new();
    let mut failing = false;
    // Lines were lost in this failure (logged once per failure, counted always).
    let mut losing = false;
    let mut pause = BATCH_PAUSE;
    let mut answered = 0;
    loop {
        // Read before draining: every line appended before these requests is in a shard.
        let (requested, closed) = {
            let state = lock(&shared.state);
            (state.requested, state.closed)
        };
        let mut error: Option<std::io::Error> = None;
        let mut started = false;
        let mut wrote = !pending.is_empty();
        // The longest the output took to return from one call in this batch.
        let mut longest = Duration::ZERO;
        if !pending.is_empty() {
            longest = shared.watched(|| out.before_batch()).1;
            started = true;
            let (result, took) = write_from(shared, &mut *out, &mut pending);
            error = result.err();
            longest = longest.max(took);
        }
        let mut lost = 0;
        for shard in shared.shards.iter() {
            std::mem::swap(&mut *lock(shard), &mut spare);
            if spare.is_empty() {
                continue;
            }
            wrote = true;
            if error.is_none() {
                if !started {
                    longest = longest.max(shared.watched(|| out.before_batch()).1);
                    started = true;
                }
                // One call per shard: its lines stay whole in an O_APPEND file.
                let (result, took) = write_from(shared, &mut *out, &mut spare);
                error = result.err();
                longest = longest.max(took);
            }
            if !spare.is_empty() {
                match keep {
                    Some(cap) if pending.len() + spare.len() <= cap => {
                        pending.extend_from_slice(&spare);
                    }
                    _ => lost += count_lines(&spare),
                }
            }
            spare.clear();
            // A burst must not leave every shard holding a megabyte for good.
            spare.shrink_to(KEEP_CAPACITY);
        }
        if started && error.is_none() {
            let (result, took) = shared.watched(|| out.flush());
            error = result.err();
            longest = longest.max(took);
        }
        if closed && !pending.is_empty() {
            lost += count_lines(&pending);
        }
        if lost > 0 {
            shared.lost.fetch_add(lost, Ordering::Relaxed);
        }
        if pending.is_empty() {
            // What a long failure kept is not held for good.
            pending.shrink_to(KEEP_CAPACITY);
        }
        let now_failing = error.is_some() || !pending.is_empty();
        if let Some(e) = &error {
            *lock(&shared.last_error) = Some(e.to_string());
        }
        shared.failing.store(now_failing, Ordering::Relaxed);
        if let Some(what) = shared.options.report_errors_as {
            match &error {
                None if failing && !now_failing => {
                    tracing::info!(
                        lost_so_far = shared.lost.load(Ordering::Relaxed),
                        "{what} are being written again"
                    );
                }
                // Once per streak: a full disk would otherwise log once per batch.
                Some(e) if !failing => {
                    tracing::error!(error = %e, kept_bytes = pending.len(), "cannot write {what}");
                }
                _ => {}
            }
            if let Some(bound) = shared.options.stall
                && longest >= bound
            {
                tracing::warn!(
                    lost_so_far = shared.lost.load(Ordering::Relaxed),
                    "the output of {what} accepted nothing for {}; it takes them again",
                    span(longest)
                );
            }
            if lost > 0 && (!losing || closed) {
                tracing::error!(
                    lost,
                    "{what} lost: the output failed for longer than they could be kept (all are counted)"
                );
            }
        }
        losing = (losing || lost > 0) && now_failing;
        failing = now_failing;
        // Someone can be waiting only for a flush asked for, or for room in a shard drained.
        if wrote || requested > answered {
            answered = requested;
            lock(&shared.state).completed = requested;
            shared.written.notify_all();
        }
        if closed {
            return;
        }
        pause = if wrote {
            BATCH_PAUSE
        } else {
            (pause * 2).min(IDLE_PAUSE)
        };
        // Lines gather meanwhile; appenders wake the writer only to flush, to make room, or
        // to stop (an unpark before the park makes it return at once).
        std::thread::park_timeout(pause);
    }
}

/// An output that blocks until opened and collects what it is given, for tests.
#[cfg(test)]
pub(crate) mod gated {
    use std::sync::{Arc, Condvar, Mutex};

    #[derive(Default)]
    pub struct Gate {
        open: Mutex<bool>,
        /// Set when the writer first called `write`.
        entered: Mutex<bool>,
        opened: Condvar,
        pub out: Mutex<Vec<u8>>,
    }

    impl Gate {
        /// Blocks until the writer is inside `write` (stuck there while the gate is shut).
        pub fn wait_entered(&self) {
            let mut entered = self.entered.lock().unwrap();
            while !*entered {
                entered = self.opened.wait(entered).unwrap();
            }
        }

        pub fn open(&self) {
            *self.open.lock().unwrap() = true;
            self.opened.notify_all();
        }

        pub fn text(&self) -> String {
            String::from_utf8(self.out.lock().unwrap().clone()).unwrap()
        }
    }

    pub struct Gated(pub Arc<Gate>);

    /// Opens the gate when dropped: a test that fails while the writer is stuck behind it
    /// ends, instead of waiting for that writer when its `Lines` is dropped.
    pub struct OpenOnDrop(pub Arc<Gate>);

    impl Drop for OpenOnDrop {
        fn drop(&mut self) {
            self.0.open();
        }
    }

    impl super::Output for Gated {}

    impl std::io::Write for Gated {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            *self.0.entered.lock().unwrap() = true;
            self.0.opened.notify_all();
            let mut open = self.0.open.lock().unwrap();
            while !*open {
                open = self.0.opened.wait(open).unwrap();
            }
            self.0.out.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::gated::{Gate, Gated, OpenOnDrop};
    use super::*;
    use std::sync::atomic::AtomicBool;

    fn lines(gate: &Arc<Gate>, limit: usize, when_full: WhenFull) -> Arc<Lines> {
        stalling(gate, limit, when_full, None, None)
    }

    fn stalling(
        gate: &Arc<Gate>,
        limit: usize,
        when_full: WhenFull,
        stall: Option<Duration>,
        keep_on_error: Option<usize>,
    ) -> Arc<Lines> {
        Arc::new(
            Lines::spawn(
                Box::new(Gated(gate.clone())),
                Options {
                    thread: "test-lines",
                    limit,
                    when_full,
                    report_errors_as: Some("test lines"),
                    keep_on_error,
                    stall,
                },
            )
            .unwrap(),
        )
    }

    /// Waits (generously) until `w` says its output fails, and says why.
    fn until_failing(w: &Lines) -> String {
        eventually("the stall was never reported", || w.failure().is_some());
        w.failure().unwrap()
    }

    /// Polls `done` until it holds, for at most 30 s; then fails the test with `what`.
    fn eventually(what: &str, mut done: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !done() {
            assert!(Instant::now() < deadline, "{what}");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    #[test]
    fn a_write_that_does_not_return_is_a_failure_until_it_does() {
        let gate = Arc::new(Gate::default());
        let w = stalling(
            &gate,
            1 << 20,
            WhenFull::Wait,
            Some(Duration::from_millis(20)),
            Some(1 << 20),
        );
        let _open = OpenOnDrop(gate.clone());
        assert_eq!(w.failure(), None);
        w.append(|b| line(b, 1));
        w.wake_writer();
        gate.wait_entered();
        // Nothing errs: the writer is stuck in its output, which is a failure of its own.
        let reason = until_failing(&w);
        assert!(reason.contains("accepted nothing for"), "{reason}");
        // Neither a flush nor closing waits for a stalled output (shutdown must end).
        assert!(!w.flush(), "the flush gives up on the stalled output");
        w.append(|b| line(b, 2));
        assert!(!w.close(None), "closing gives up on the stalled output");
        gate.open();
        wait_for_text(&gate, "line 0001\nline 0002\n");
        assert_eq!(w.failure(), None);
    }

    /// Flushes once the writer has come back from the output the test just let go (until
    /// then a flush gives up at once on the stalled output).
    fn flushed(w: &Lines) {
        eventually("the writer never came back from its output", || w.flush());
    }

    /// Waits (bounded) until the output holds `want`: the writer finishes on its own.
    fn wait_for_text(gate: &Gate, want: &str) {
        eventually(&format!("the output never held {want:?}"), || {
            gate.text() == want
        });
    }

    fn line(buf: &mut Vec<u8>, i: usize) {
        writeln!(buf, "line {i:04}").unwrap();
    }

    /// Starts `f` on a thread of its own; the receiver hears when it has returned (it may
    /// block for good, or panic).
    fn started(f: impl FnOnce() + Send + 'static) -> std::sync::mpsc::Receiver<()> {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            f();
            let _ = tx.send(());
        });
        rx
    }

    fn returned(rx: &std::sync::mpsc::Receiver<()>) -> bool {
        rx.recv_timeout(Duration::from_secs(30)).is_ok()
    }

    #[test]
    fn on_a_multi_thread_runtime_appends_waiting_for_a_stalled_output_leave_it_running() {
        let gate = Arc::new(Gate::default());
        // A shard is full at its first line; the stall bound is beyond the test.
        let w = stalling(
            &gate,
            1,
            WhenFull::Wait,
            Some(Duration::from_secs(600)),
            Some(1 << 20),
        );
        w.append(|b| line(b, 0));
        w.wake_writer();
        gate.wait_entered();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .build()
            .unwrap();
        // Declared after the runtime, so dropped before it: a failure ends the waits.
        let _open = OpenOnDrop(gate.clone());
        // As many appending tasks as workers and more: each fills its shard and waits.
        let appenders: Vec<_> = (1..5)
            .map(|i| {
                let w = w.clone();
                rt.spawn(async move { w.append(|b| line(b, i)) })
            })
            .collect();
        let deadline = Instant::now() + Duration::from_secs(30);
        while w.full_count() < 2 {
            assert!(Instant::now() < deadline, "no append waited");
            std::thread::yield_now();
        }
        // Another task still runs: the waits do not hold the runtime's workers.
        let (tx, rx) = std::sync::mpsc::channel();
        rt.spawn(async move {
            tokio::task::yield_now().await;
            let _ = tx.send(());
        });
        let ran = rx.recv_timeout(Duration::from_secs(30)).is_ok();
        gate.open();
        for a in appenders {
            rt.block_on(a).unwrap();
        }
        assert!(
            ran,
            "the runtime stopped while appends waited for the output"
        );
        w.flush();
        assert_eq!(gate.text().lines().count(), 5);
    }

    #[test]
    fn an_append_to_a_full_shard_waits_at_most_the_stall_bound_on_any_thread() {
        let gate = Arc::new(Gate::default());
        let w = stalling(
            &gate,
            1,
            WhenFull::Wait,
            Some(Duration::from_millis(300)),
            Some(1 << 20),
        );
        let _open = OpenOnDrop(gate.clone());
        w.append(|b| line(b, 0));
        w.wake_writer();
        gate.wait_entered();
        // Off any runtime, and on a current-thread runtime (which cannot hand its thread
        // over), both before the stall is noticed: each wait ends, its line in the buffer.
        let off = w.clone();
        let off = started(move || off.append(|b| line(b, 1)));
        let on = w.clone();
        let on = started(move || {
            tokio::runtime::Builder::new_current_thread()
                .build()
                .unwrap()
                .block_on(async move { on.append(|b| line(b, 2)) })
        });
        assert!(returned(&off), "the wait off the runtime did not end");
        assert!(
            returned(&on),
            "the wait on a current-thread runtime did not end"
        );
        assert!(w.failure().is_some());
        gate.open();
        flushed(&w);
        assert_eq!(gate.text().lines().count(), 3);
        assert_eq!(w.failure(), None);
    }

    #[test]
    fn while_the_output_stalls_a_shard_holds_its_share_of_the_kept_bytes_and_loses_the_rest() {
        let gate = Arc::new(Gate::default());
        // Ten-byte lines; a shard is full at one, and 200 bytes may be kept in all.
        let w = stalling(
            &gate,
            10,
            WhenFull::Wait,
            Some(Duration::from_millis(20)),
            Some(200),
        );
        let _open = OpenOnDrop(gate.clone());
        w.append(|b| line(b, 0));
        w.wake_writer();
        gate.wait_entered();
        until_failing(&w);
        for i in 1..101 {
            w.append(|b| line(b, i));
        }
        let (held, shards) = w.buffered();
        let cap = 10.max(200 / shards);
        // Whole lines, up to the first that reached the cap.
        assert!(held < cap + 10, "{held} bytes held, cap {cap}");
        let kept = held as u64 / 10;
        assert_eq!(w.lost(), 100 - kept);
        gate.open();
        flushed(&w);
        let expected: String = (0..=kept).map(|i| format!("line {i:04}\n")).collect();
        assert_eq!(gate.text(), expected);
        assert_eq!(w.failure(), None);
        // With room again, nothing is lost.
        w.append(|b| line(b, 500));
        w.flush();
        assert!(gate.text().ends_with("line 0500\n"));
        assert_eq!(w.lost(), 100 - kept);
    }

    #[test]
    fn a_full_shard_of_a_slow_but_moving_output_waits_and_loses_nothing() {
        let gate = Arc::new(Gate::default());
        // Ten-byte lines; a shard is full at two, and 10 bytes may be kept in all: the
        // smallest share there is. The output is slow, not stalled (60 s).
        let w = stalling(
            &gate,
            16,
            WhenFull::Wait,
            Some(Duration::from_secs(60)),
            Some(10),
        );
        let _open = OpenOnDrop(gate.clone());
        w.append(|b| line(b, 0));
        w.wake_writer();
        gate.wait_entered();
        // More threads than shards, so some share one: a thread appends to a shard another
        // filled (and waits on) past its share.
        let threads = w.buffered().1 + 1;
        let done: Vec<_> = (0..threads)
            .map(|t| {
                let appender = w.clone();
                started(move || {
                    for i in 0..2 {
                        appender.append(|b| line(b, 1 + 2 * t + i));
                    }
                })
            })
            .collect();
        // Every thread's first line appended; a moment more for the second ones (a thread on
        // a shard another has filled waits after its first).
        for _ in 0..3000 {
            if w.buffered().0 as u64 + 10 * w.lost() >= 10 * threads as u64 {
                break;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        std::thread::sleep(Duration::from_millis(100));
        gate.open();
        assert!(done.iter().all(returned));
        flushed(&w);
        assert_eq!(w.lost(), 0, "nothing is lost while the output moves");
        let mut written: Vec<String> = gate.text().lines().map(str::to_owned).collect();
        written.sort();
        let expected: Vec<String> = (0..=2 * threads).map(|i| format!("line {i:04}")).collect();
        assert_eq!(written, expected);
    }

    #[test]
    fn a_full_shard_drops_lines_and_counts_them_without_waiting() {
        let gate = Arc::new(Gate::default());
        // Room for ten 10-byte lines per shard.
        let w = lines(&gate, 100, WhenFull::Drop);
        // The writer takes the first line and is stuck writing it.
        w.append(|b| line(b, 0));
        w.wake_writer();
        gate.wait_entered();
        // So the shard fills at ten lines and the append returns at once for the rest.
        for i in 1..101 {
            w.append(|b| line(b, i));
        }
        assert_eq!(w.full_count(), 90);
        gate.open();
        flushed(&w);
        let text = gate.text();
        let expected: String = (0..11).map(|i| format!("line {i:04}\n")).collect();
        assert_eq!(text, expected);
        // With room again, lines are kept.
        w.append(|b| line(b, 200));
        w.flush();
        assert!(gate.text().ends_with("line 0200\n"));
        assert_eq!(w.full_count(), 90);
    }

    #[test]
    fn close_with_a_bound_returns_while_the_output_is_stalled() {
        let gate = Arc::new(Gate::default());
        let w = lines(&gate, 1 << 20, WhenFull::Drop);
        w.append(|b| line(b, 1));
        // The writer is stuck in its output: the bounded close gives up.
        assert!(!w.close(Some(Duration::from_millis(200))));
        // Once the output moves, the writer writes what it had and stops.
        gate.open();
        assert!(w.close(Some(Duration::from_secs(30))));
        assert_eq!(gate.text(), "line 0001\n");
    }

    /// While `failing` is set, fails each write (after taking 3 bytes of it when `partial`,
    /// as a filling disk writes short); collects what it took.
    struct Flaky {
        failing: Arc<AtomicBool>,
        partial: bool,
        out: Arc<Mutex<Vec<u8>>>,
    }

    impl Output for Flaky {}

    impl Write for Flaky {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            let mut out = self.out.lock().unwrap();
            if self.failing.load(Ordering::SeqCst) {
                if self.partial && buf.len() > 3 {
                    // A short write that stops mid-line, as a filling disk does, then the error.
                    out.extend_from_slice(&buf[..3]);
                    return Ok(3);
                }
                return Err(std::io::Error::from_raw_os_error(28));
            }
            out.extend_from_slice(buf);
            Ok(buf.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn flaky(keep: Option<usize>, partial: bool) -> (Lines, Arc<AtomicBool>, Arc<Mutex<Vec<u8>>>) {
        let failing = Arc::new(AtomicBool::new(true));
        let out = Arc::new(Mutex::new(Vec::new()));
        let w = Lines::spawn(
            Box::new(Flaky {
                failing: failing.clone(),
                partial,
                out: out.clone(),
            }),
            Options {
                thread: "test-flaky",
                limit: 1 << 20,
                when_full: WhenFull::Wait,
                report_errors_as: Some("test lines"),
                keep_on_error: keep,
                stall: None,
            },
        )
        .unwrap();
        (w, failing, out)
    }

    #[test]
    fn lines_a_failing_output_did_not_take_are_kept_and_written_once_it_works() {
        let (w, failing, out) = flaky(Some(1 << 20), true);
        assert_eq!(w.failure(), None);
        for i in 0..50 {
            w.append(|b| line(b, i));
        }
        w.flush();
        let reason = w.failure().expect("failing while the output fails");
        assert!(reason.contains("No space left on device"), "{reason}");
        // Still failing: more lines queue behind the kept ones.
        for i in 50..100 {
            w.append(|b| line(b, i));
        }
        w.flush();
        assert!(w.failure().is_some());
        failing.store(false, Ordering::SeqCst);
        w.flush();
        w.flush();
        assert_eq!(w.failure(), None);
        assert_eq!(w.lost(), 0);
        // Every line once, in order, whole: the short write's bytes were not written twice.
        let expected: String = (0..100).map(|i| format!("line {i:04}\n")).collect();
        assert_eq!(
            String::from_utf8(out.lock().unwrap().clone()).unwrap(),
            expected
        );
    }

    #[test]
    fn past_the_kept_bytes_lines_are_lost_and_counted() {
        // Room to keep two 10-byte lines.
        let (w, failing, out) = flaky(Some(20), false);
        for i in 0..6 {
            w.append(|b| line(b, i));
            w.flush();
        }
        assert!(w.failure().is_some());
        assert_eq!(w.lost(), 4);
        failing.store(false, Ordering::SeqCst);
        w.flush();
        assert_eq!(w.failure(), None);
        // The first two were kept and written; the four that did not fit are counted lost.
        let text = String::from_utf8(out.lock().unwrap().clone()).unwrap();
        assert_eq!(text, "line 0000\nline 0001\n");
    }

    #[test]
    fn closing_writes_everything_appended_before() {
        let gate = Arc::new(Gate::default());
        gate.open();
        let w = lines(&gate, 1 << 20, WhenFull::Wait);
        std::thread::scope(|s| {
            for t in 0..4 {
                let w = &w;
                s.spawn(move || {
                    for i in 0..250 {
                        w.append(|b| line(b, t * 1000 + i));
                    }
                });
            }
        });
        assert!(w.close(None));
        let text = gate.text();
        assert_eq!(text.lines().count(), 1000);
        // Each thread's lines in its order.
        for t in 0..4 {
            let mine: Vec<&str> = text
                .lines()
                .filter(|l| l[5..].parse::<usize>().unwrap() / 1000 == t)
                .collect();
            let mut sorted = mine.clone();
            sorted.sort_unstable();
            assert_eq!(mine, sorted);
        }
    }
}
