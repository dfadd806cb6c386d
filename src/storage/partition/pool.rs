//! The writer pool: a few threads (about one per core) that run group commit for every partition
//! of the process, topic partitions and group state logs alike.
//!
//! A partition with work is *scheduled*: it sits once in the pool's ready queue, or is being
//! served by exactly one thread. Serving a partition means taking every command queued in its
//! inbox, writing them with one vectored write and one sync ([`super::writer`]), and looking
//! again: appends that queued during the sync are the next group commit. When the inbox is empty
//! the partition goes idle and costs nothing: no thread, no wake-up, no buffer. When other
//! partitions are waiting, a busy one goes to the back of the queue after each round, so one hot
//! partition cannot starve the rest. `fsync = "interval"` partitions register a timer here; a due
//! timer schedules its partition for a sync round.
//!
//! Lock order: a partition's inbox, then the pool's queue; never the other way round.

use std::cell::Cell;
use std::cmp::Ordering as CmpOrdering;
use std::collections::{BinaryHeap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::writer::{MAX_GATHER_BYTES, MAX_GATHER_COMMANDS, Writer};
use super::{Command, Shared};

/// A pool of partition writer threads. Dropping it stops its threads once their queue is empty;
/// partitions that outlive it fail their appends with `Closed`.
#[derive(Debug)]
pub struct WriterPool {
    inner: Arc<PoolInner>,
    threads: Vec<JoinHandle<()>>,
}

#[derive(Debug)]
pub(super) struct PoolInner {
    queue: Mutex<Queue>,
    wake: Condvar,
    /// Partitions in the ready queue, readable without the lock (a polling writer checks it).
    ready_len: AtomicUsize,
    /// Threads not asleep: serving, firing timers, or about to sleep.
    awake: AtomicUsize,
    /// A caller is serving a round on its own thread ([`PoolInner::inline_turn`]).
    inline: AtomicBool,
}

#[derive(Debug, Default)]
struct Queue {
    ready: VecDeque<Arc<Shared>>,
    timers: BinaryHeap<Timer>,
    stopping: bool,
    /// Threads waiting on `wake` (a notification with none waiting would be a wasted syscall).
    sleeping: usize,
}

/// A partition's interval-sync deadline.
#[derive(Debug)]
struct Timer {
    at: Instant,
    part: Weak<Shared>,
}

impl PartialEq for Timer {
    fn eq(&self, other: &Self) -> bool {
        self.at == other.at
    }
}
impl Eq for Timer {}
impl PartialOrd for Timer {
    fn partial_cmp(&self, other: &Self) -> Option<CmpOrdering> {
        Some(self.cmp(other))
    }
}
impl Ord for Timer {
    /// Reversed: the heap's top is the earliest deadline.
    fn cmp(&self, other: &Self) -> CmpOrdering {
        other.at.cmp(&self.at)
    }
}

fn lock(m: &Mutex<Queue>) -> MutexGuard<'_, Queue> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

thread_local! {
    /// The partition this thread is serving (its `Shared` address), so that dropping that
    /// partition's handle from one of its own completions does not wait for itself.
    static SERVING: Cell<usize> = const { Cell::new(0) };
}

/// Marks the calling thread as serving a partition until dropped (also when a completion
/// panics).
struct Serving;

impl Serving {
    fn enter(part: &Arc<Shared>) -> Serving {
        SERVING.with(|s| s.set(Arc::as_ptr(part) as usize));
        Serving
    }
}

impl Drop for Serving {
    fn drop(&mut self) {
        SERVING.with(|s| s.set(0));
    }
}

/// Serves `part` on the calling thread, which must have claimed it (set `scheduled`).
pub(super) fn serve_here(pool: &PoolInner, part: &Arc<Shared>, ctx: &mut ThreadCtx) {
    let _serving = Serving::enter(part);
    serve(pool, part, ctx);
}

/// True when the calling thread is serving `part` right now.
pub(super) fn serving(part: &Shared) -> bool {
    SERVING.with(|s| s.get() == part as *const Shared as usize)
}

impl WriterPool {
    /// Starts `threads` writer threads (at least one), named `sluice-writer-<n>`.
    pub fn new(threads: usize) -> std::io::Result<WriterPool> {
        let inner = Arc::new(PoolInner {
            queue: Mutex::new(Queue::default()),
            wake: Condvar::new(),
            ready_len: AtomicUsize::new(0),
            awake: AtomicUsize::new(threads.max(1)),
            inline: AtomicBool::new(false),
        });
        let mut pool = WriterPool {
            inner,
            threads: Vec::new(),
        };
        for n in 0..threads.max(1) {
            let inner = Arc::clone(&pool.inner);
            let handle = std::thread::Builder::new()
                .name(format!("sluice-writer-{n}"))
                .spawn(move || inner.work())?;
            pool.threads.push(handle);
        }
        Ok(pool)
    }

    /// The process's pool, started on first use with one thread per core (or the count given to
    /// [`WriterPool::configure_global`] before that).
    pub fn global() -> std::io::Result<&'static WriterPool> {
        if let Some(p) = GLOBAL.get() {
            return Ok(p);
        }
        let threads = GLOBAL_THREADS.load(Ordering::Relaxed);
        let threads = if threads == 0 {
            std::thread::available_parallelism().map_or(2, |n| n.get())
        } else {
            threads
        };
        let pool = WriterPool::new(threads)?;
        // Two first callers at once: one pool wins, the other stops its threads on drop.
        Ok(GLOBAL.get_or_init(|| pool))
    }

    /// Sets how many threads the process's pool starts (0: one per core). Only has an effect
    /// before the pool's first use; returns whether it did.
    pub fn configure_global(threads: usize) -> bool {
        GLOBAL_THREADS.store(threads, Ordering::Relaxed);
        GLOBAL.get().is_none()
    }

    pub fn threads(&self) -> usize {
        self.threads.len()
    }

    pub(super) fn inner(&self) -> &Arc<PoolInner> {
        &self.inner
    }
}

static GLOBAL: OnceLock<WriterPool> = OnceLock::new();
static GLOBAL_THREADS: AtomicUsize = AtomicUsize::new(0);

impl Drop for WriterPool {
    fn drop(&mut self) {
        lock(&self.inner.queue).stopping = true;
        self.inner.wake.notify_all();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl PoolInner {
    /// Puts a partition at the back of the ready queue. False when the pool has stopped.
    pub(super) fn schedule(&self, part: Arc<Shared>) -> bool {
        let mut q = lock(&self.queue);
        if q.stopping {
            return false;
        }
        q.ready.push_back(part);
        self.ready_len.fetch_add(1, Ordering::Release);
        let sleeping = q.sleeping > 0;
        drop(q);
        if sleeping {
            self.wake.notify_one();
        }
        true
    }

    /// Other partitions are waiting for a thread.
    pub(super) fn others_waiting(&self) -> bool {
        self.ready_len.load(Ordering::Acquire) > 0
    }

    /// The right to serve a round on the caller's own thread: given only while every pool
    /// thread sleeps with nothing queued (the process writes nothing else) and no other caller
    /// holds it, so at most one caller's thread is ever held by a sync this way.
    pub(super) fn inline_turn(&self) -> Option<InlineTurn<'_>> {
        let quiet =
            self.awake.load(Ordering::Acquire) == 0 && self.ready_len.load(Ordering::Acquire) == 0;
        (quiet
            && self
                .inline
                .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
                .is_ok())
        .then_some(InlineTurn(&self.inline))
    }

    /// Asks for `part` to be scheduled for a sync round at `at`.
    pub(super) fn add_timer(&self, at: Instant, part: &Arc<Shared>) {
        let mut q = lock(&self.queue);
        let earliest = q.timers.peek().is_none_or(|t| at < t.at);
        q.timers.push(Timer {
            at,
            part: Arc::downgrade(part),
        });
        drop(q);
        if earliest {
            // A sleeping thread may be waiting for a later deadline.
            self.wake.notify_one();
        }
    }

    /// A writer thread's life: serve ready partitions, fire due timers, sleep.
    fn work(self: Arc<Self>) {
        let mut ctx = ThreadCtx::new();
        let mut q = lock(&self.queue);
        loop {
            if let Some(part) = q.ready.pop_front() {
                self.ready_len.fetch_sub(1, Ordering::Release);
                drop(q);
                serve_here(&self, &part, &mut ctx);
                drop(part);
                q = lock(&self.queue);
                continue;
            }
            let now = Instant::now();
            let mut due = Vec::new();
            while q.timers.peek().is_some_and(|t| t.at <= now) {
                if let Some(t) = q.timers.pop() {
                    due.push(t.part);
                }
            }
            if !due.is_empty() {
                drop(q);
                for part in due.iter().filter_map(Weak::upgrade) {
                    part.tick(&self);
                }
                q = lock(&self.queue);
                continue;
            }
            if q.stopping {
                return;
            }
            q.sleeping += 1;
            self.awake.fetch_sub(1, Ordering::Release);
            q = match q.timers.peek().map(|t| t.at.saturating_duration_since(now)) {
                Some(wait) => {
                    self.wake
                        .wait_timeout(q, wait.max(Duration::from_micros(50)))
                        .unwrap_or_else(|p| p.into_inner())
                        .0
                }
                None => self.wake.wait(q).unwrap_or_else(|p| p.into_inner()),
            };
            self.awake.fetch_add(1, Ordering::Release);
            q.sleeping -= 1;
        }
    }
}

/// See [`PoolInner::inline_turn`]; given back when dropped.
pub(super) struct InlineTurn<'a>(&'a AtomicBool);

impl Drop for InlineTurn<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

/// The calling thread's scheduling priority (see `LogConfig::writer_nice`): a pool thread runs
/// `writer_nice` levels below the broker while it batches, at the broker's own priority while it
/// serves a lone producer (whose Send polls for the answer on a worker thread and must not be
/// able to starve it). Linux only: there `setpriority(PRIO_PROCESS, 0, ..)` acts on the calling
/// thread alone.
#[derive(Debug)]
pub(super) struct Priority {
    base: i32,
    current: i32,
    /// Set after a failure: stop trying.
    broken: bool,
}

impl Priority {
    pub(super) fn of_this_thread() -> Priority {
        match thread_nice() {
            Ok(base) => Priority {
                base,
                current: base,
                broken: false,
            },
            Err(e) => {
                tracing::warn!(error = %e, "could not read the partition writer's priority");
                Priority::unchanged()
            }
        }
    }

    /// For a thread that is not the pool's (a caller closing a partition itself): its priority
    /// is left alone.
    pub(super) fn unchanged() -> Priority {
        Priority {
            base: 0,
            current: 0,
            broken: true,
        }
    }

    /// Runs the thread `lowered_by` levels below the broker (capped at 19).
    pub(super) fn set(&mut self, lowered_by: u8) {
        let nice = (self.base + i32::from(lowered_by)).min(19);
        if self.broken || nice == self.current {
            return;
        }
        match set_thread_nice(nice) {
            Ok(()) => self.current = nice,
            Err(e) => {
                tracing::warn!(error = %e, nice, "could not change the partition writer's priority");
                self.broken = true;
            }
        }
    }
}

#[cfg(target_os = "linux")]
fn thread_nice() -> std::io::Result<i32> {
    // SAFETY: a plain system call on the calling thread; errno is this thread's own, reset
    // first because -1 is also a valid nice value.
    unsafe {
        *libc::__errno_location() = 0;
        let nice = libc::getpriority(libc::PRIO_PROCESS, 0);
        if nice == -1 && *libc::__errno_location() != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(nice)
    }
}

#[cfg(target_os = "linux")]
fn set_thread_nice(nice: i32) -> std::io::Result<()> {
    // SAFETY: a plain system call on the calling thread.
    if unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, nice) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(not(target_os = "linux"))]
fn thread_nice() -> std::io::Result<i32> {
    Ok(0)
}

#[cfg(not(target_os = "linux"))]
fn set_thread_nice(_nice: i32) -> std::io::Result<()> {
    Ok(())
}

/// What a pool thread keeps between the partitions it serves.
#[derive(Debug)]
pub(super) struct ThreadCtx {
    priority: Priority,
}

impl ThreadCtx {
    pub(super) fn new() -> ThreadCtx {
        ThreadCtx {
            priority: Priority::of_this_thread(),
        }
    }

    /// For a thread outside the pool: its priority is never changed.
    pub(super) fn foreign() -> ThreadCtx {
        ThreadCtx {
            priority: Priority::unchanged(),
        }
    }
}

/// Serves one scheduled partition until its inbox is empty or other partitions are waiting.
pub(super) fn serve(pool: &PoolInner, part: &Arc<Shared>, ctx: &mut ThreadCtx) {
    let mut w = part.writer.lock().unwrap_or_else(|p| p.into_inner());
    let spin = part.config.writer_spin();
    loop {
        let (tick, polling) = take_round(part, &mut w, spin);
        ctx.priority
            .set(if polling { 0 } else { part.config.writer_nice });
        w.flush(part);
        w.commit(part, tick);
        w.round_end = Instant::now();
        if polling && let Some(window) = spin {
            // A lone producer's next append usually comes within the window: stay awake for it
            // unless another partition needs this thread.
            while w.round_end.elapsed() < window && !part.wants_writer() && !pool.others_waiting() {
                std::thread::yield_now();
            }
        }
        if !part.more_work(pool, false) {
            arm_timer(pool, part, &mut w);
            return;
        }
    }
}

/// Serves one round of a partition on the calling thread, which claimed it (set `scheduled`)
/// holding an [`InlineTurn`]: the commands queued, written and synced here, their completions
/// called before it returns. What queued meanwhile goes to the pool; the thread never polls
/// and keeps its priority. Its rounds never count toward the writer's lone mode (sending a
/// producer back and forth between the two paths measured slower than either).
pub(super) fn serve_round_here(pool: &PoolInner, part: &Arc<Shared>) {
    let _serving = Serving::enter(part);
    let mut w = part.writer.lock().unwrap_or_else(|p| p.into_inner());
    loop {
        let (tick, _) = take_round(part, &mut w, None);
        w.flush(part);
        w.commit(part, tick);
        w.round_end = Instant::now();
        // Only a pool that has stopped leaves the rest here.
        if !part.more_work(pool, true) {
            arm_timer(pool, part, &mut w);
            break;
        }
    }
}

/// A partition going idle under `fsync = interval` asks for its next sync round.
fn arm_timer(pool: &PoolInner, part: &Arc<Shared>, w: &mut Writer) {
    if !w.timer_pending
        && !w.closed
        && let Some(wait) = w.next_wait(part)
    {
        w.timer_pending = true;
        pool.add_timer(Instant::now() + wait, part);
    }
}

/// A round's first half: takes the queued commands and stages them. Returns whether an
/// interval sync is due and whether the writer now serves a lone producer (with `spin`: two
/// single appends in a row, each within the window of the previous round's end).
fn take_round(part: &Arc<Shared>, w: &mut Writer, spin: Option<Duration>) -> (bool, bool) {
    let idle = w.round_end.elapsed();
    let (cmds, tick) = part.take_commands(MAX_GATHER_COMMANDS);
    let taken = cmds.len();
    for c in cmds {
        match c {
            Command::Append(batch, done, _) if w.closed => {
                drop(batch);
                done(Err(part.closed_error()));
            }
            Command::Append(batch, done, durable) => {
                // After staging: a roll inside `stage` commits, which clears the flag.
                w.stage(part, batch, done);
                w.needs_sync |= durable;
                if w.staged_bytes >= MAX_GATHER_BYTES {
                    w.flush(part);
                }
            }
            Command::Roll(reply) if w.closed => {
                let _ = reply.send(Err(part.closed_error()));
            }
            Command::Roll(reply) => {
                let r = w.roll(part);
                let _ = reply.send(r);
            }
            Command::Close(reply) => {
                let r = if w.closed { Ok(()) } else { w.close(part) };
                w.closed = true;
                let _ = reply.send(r);
            }
        }
    }
    if tick {
        w.timer_pending = false;
    }
    w.lone_rounds = if taken == 1 && spin.is_some_and(|window| idle <= window) {
        w.lone_rounds.saturating_add(1)
    } else {
        0
    };
    // Before the round completes, so its senders see how the writer serves them.
    let polling = w.lone_rounds >= 2 && !w.closed;
    if part.polling.load(Ordering::Relaxed) != polling {
        part.polling.store(polling, Ordering::Relaxed);
    }
    (tick, polling)
}
