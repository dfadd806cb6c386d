//! Heartbeats coalesced per pair of nodes: every partition's group sends its leader's heartbeat
//! to each follower every `heartbeat_ms`, and one gRPC call per heartbeat cost an idle node more
//! than the Raft work itself (100 idle partitions: 7–8 % of a core). A heartbeat that tells the
//! follower nothing new (no entries, no new commit point) waits here up to a quarter of its
//! deadline for the heartbeats of other groups to the same node, and they travel as one
//! `Heartbeats` call; each gets its own answer. Anything else goes at once on its own.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tonic::Status;

use tonic::transport::Channel;

use super::wire;
use crate::proto::cluster as pb;

/// Heartbeats sent in one call at most.
const MAX_BATCH: usize = 512;

/// One heartbeat waiting for its call.
struct Pending {
    request: pb::AppendEntriesRequest,
    /// When its sender stops waiting.
    deadline: Instant,
    reply: oneshot::Sender<Result<pb::AppendEntriesResponse, Status>>,
}

/// The heartbeat queues, one per peer address (each drained by its own task).
#[derive(Debug, Clone, Default)]
pub struct Heartbeats {
    queues: Arc<Mutex<HashMap<String, mpsc::UnboundedSender<Pending>>>>,
}

impl Heartbeats {
    /// Sends `request` (a heartbeat of one group to the node at `addr`, reached through
    /// `channel`; its sender waits at most `ttl`) with the other heartbeats to that node, and
    /// returns its answer.
    pub async fn send(
        &self,
        channel: Channel,
        addr: &str,
        request: pb::AppendEntriesRequest,
        ttl: Duration,
    ) -> Result<pb::AppendEntriesResponse, Status> {
        let (reply, answer) = oneshot::channel();
        let pending = Pending {
            request,
            deadline: Instant::now() + ttl,
            reply,
        };
        self.queue(channel, addr, ttl / 4)
            .send(pending)
            .map_err(|_| Status::cancelled("the node is stopping"))?;
        answer
            .await
            .map_err(|_| Status::cancelled("the node is stopping"))?
    }

    fn queue(
        &self,
        channel: Channel,
        addr: &str,
        window: Duration,
    ) -> mpsc::UnboundedSender<Pending> {
        let mut queues = self.queues.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(q) = queues.get(addr).filter(|q| !q.is_closed()) {
            return q.clone();
        }
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(drain(rx, channel, window));
        queues.insert(addr.to_string(), tx.clone());
        tx
    }
}

/// Sends what the queue holds: a batch once the first heartbeat has waited `window` (or the
/// batch is full), each batch in its own task so a slow peer never holds the next one back.
/// Ends when the queue's last sender is gone.
async fn drain(mut rx: mpsc::UnboundedReceiver<Pending>, channel: Channel, window: Duration) {
    while let Some(first) = rx.recv().await {
        let mut batch = vec![first];
        let until = tokio::time::sleep(window);
        tokio::pin!(until);
        while batch.len() < MAX_BATCH {
            tokio::select! {
                () = &mut until => break,
                next = rx.recv() => match next {
                    Some(p) => batch.push(p),
                    None => break,
                },
            }
        }
        tokio::spawn(send(batch, channel.clone()));
    }
}

async fn send(batch: Vec<Pending>, channel: Channel) {
    let deadline = batch.iter().map(|p| p.deadline).min();
    let timeout = deadline.map_or(Duration::from_secs(1), |d| {
        d.saturating_duration_since(Instant::now())
            .max(Duration::from_millis(1))
    });
    let mut waiting = Vec::with_capacity(batch.len());
    let mut heartbeats = Vec::with_capacity(batch.len());
    for p in batch {
        heartbeats.push(p.request);
        waiting.push(p.reply);
    }
    let mut request = tonic::Request::new(pb::HeartbeatsRequest { heartbeats });
    request.set_timeout(timeout);
    match wire::client(channel).heartbeats(request).await {
        Ok(response) => {
            let mut replies = response.into_inner().replies.into_iter();
            for reply in waiting {
                let outcome = match replies.next().and_then(|r| r.outcome) {
                    Some(pb::heartbeat_reply::Outcome::Response(r)) => Ok(r),
                    Some(pb::heartbeat_reply::Outcome::Refused(r)) => {
                        Err(Status::new(tonic::Code::from(r.code), r.message))
                    }
                    None => Err(Status::internal("the peer answered fewer heartbeats")),
                };
                let _ = reply.send(outcome);
            }
        }
        Err(status) => {
            for reply in waiting {
                let _ = reply.send(Err(status.clone()));
            }
        }
    }
}
