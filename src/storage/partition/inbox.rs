//! A partition's inbox: the commands waiting for its writer, and the one flag that says whether
//! a pool thread has it (queued or being served). Posting schedules an idle partition; after each
//! round the serving thread either takes more, lets the partition go idle, or puts it back
//! behind the partitions waiting.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::{Arc, MutexGuard};

use super::pool::PoolInner;
use super::{Command, Shared};
use crate::storage::error::Error;

/// Commands waiting for the writer, and whether the partition is scheduled.
#[derive(Default)]
pub(super) struct Inbox {
    pub(super) cmds: VecDeque<Command>,
    /// An interval sync is due.
    pub(super) tick: bool,
    /// In the pool's ready queue or being served: exactly one thread may serve it.
    pub(super) scheduled: bool,
    /// Closed: appends fail at once.
    pub(super) closed: bool,
    /// The handle is gone: timers no longer schedule it.
    pub(super) detached: bool,
    /// Threads waiting on `changed` (for room, or for the partition to go idle).
    pub(super) waiters: usize,
}

impl Shared {
    pub(super) fn inbox(&self) -> MutexGuard<'_, Inbox> {
        self.inbox.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(super) fn closed_error(&self) -> Error {
        Error::Closed {
            path: self.dir.clone(),
        }
    }

    pub(super) fn poisoned_error(&self) -> Option<Error> {
        self.poisoned
            .load(Ordering::Acquire)
            .then(|| Error::Poisoned {
                path: self.dir.clone(),
            })
    }

    /// Queues a command and schedules the partition if it was idle. With `bounded`, waits while
    /// the inbox holds `queue_depth` commands.
    pub(super) fn post(self: &Arc<Self>, cmd: Command, bounded: bool) {
        let mut inbox = self.inbox();
        while bounded && inbox.cmds.len() >= self.config.queue_depth && !inbox.closed {
            // Counted as a waiter: the writer wakes `changed` only when someone waits on it.
            inbox = self.wait_changed(inbox);
        }
        if inbox.closed {
            drop(inbox);
            return self.refuse(cmd);
        }
        inbox.cmds.push_back(cmd);
        if !inbox.scheduled {
            inbox.scheduled = true;
            if !self.pool.schedule(Arc::clone(self)) {
                // The pool has stopped: nothing will serve this partition again.
                inbox.scheduled = false;
                inbox.closed = true;
                let cmds: Vec<Command> = inbox.cmds.drain(..).collect();
                drop(inbox);
                cmds.into_iter().for_each(|c| self.refuse(c));
            }
        }
    }

    /// The inbox, once no thread is serving the partition (nor will until the guard drops).
    pub(super) fn idle_inbox(&self) -> MutexGuard<'_, Inbox> {
        let mut inbox = self.inbox();
        while inbox.scheduled {
            inbox = self.wait_changed(inbox);
        }
        inbox
    }

    /// Waits on `changed`, counted in `waiters` (every wait on it must be: the writer notifies
    /// only when the count is above zero).
    pub(super) fn wait_changed<'a>(
        &self,
        mut inbox: MutexGuard<'a, Inbox>,
    ) -> MutexGuard<'a, Inbox> {
        inbox.waiters += 1;
        let mut inbox = self.changed.wait(inbox).unwrap_or_else(|p| p.into_inner());
        inbox.waiters -= 1;
        inbox
    }

    pub(super) fn refuse(&self, cmd: Command) {
        match cmd {
            Command::Append(_, done, _) => done(Err(self.closed_error())),
            Command::Roll(reply) | Command::Close(reply) => {
                let _ = reply.send(Err(self.closed_error()));
            }
        }
    }

    /// The commands to serve now (at most `max`) and whether an interval sync is due.
    pub(super) fn take_commands(&self, max: usize) -> (Vec<Command>, bool) {
        let mut inbox = self.inbox();
        let n = inbox.cmds.len().min(max);
        let wake = inbox.waiters > 0;
        let cmds: Vec<Command> = inbox.cmds.drain(..n).collect();
        if cmds.iter().any(|c| matches!(c, Command::Close(_))) {
            inbox.closed = true;
        }
        let tick = std::mem::take(&mut inbox.tick);
        drop(inbox);
        if wake {
            self.changed.notify_all();
        }
        (cmds, tick)
    }

    /// Something for the writer to do now: a command, or a dropped handle to let go of.
    pub(super) fn wants_writer(&self) -> bool {
        let inbox = self.inbox();
        !inbox.cmds.is_empty() || inbox.detached
    }

    /// After a round: true to serve another one on this thread. Otherwise the partition is either
    /// idle (nothing queued) or back in the pool's queue behind the partitions waiting there
    /// (with `hand_off`, from a thread outside the pool: whether any wait or not).
    pub(super) fn more_work(self: &Arc<Self>, pool: &PoolInner, hand_off: bool) -> bool {
        let mut inbox = self.inbox();
        if inbox.cmds.is_empty() && !inbox.tick {
            inbox.scheduled = false;
            if inbox.cmds.capacity() > 64 {
                inbox.cmds.shrink_to(16);
            }
            let wake = inbox.waiters > 0;
            drop(inbox);
            if wake {
                self.changed.notify_all();
            }
            return false;
        }
        !((hand_off || pool.others_waiting()) && pool.schedule(Arc::clone(self)))
    }

    /// An interval sync is due (from the pool's timer).
    pub(super) fn tick(self: &Arc<Self>, pool: &PoolInner) {
        let mut inbox = self.inbox();
        if inbox.detached || inbox.closed {
            return;
        }
        inbox.tick = true;
        if !inbox.scheduled {
            inbox.scheduled = pool.schedule(Arc::clone(self));
        }
    }
}
