//! Opening a subscription, for both APIs: plain (from a position, in chosen partitions) or as a
//! member of a consumer group; and the `sluice.v1` response stream, which cuts runs of messages
//! into responses of about `delivery_batch_bytes`. Every subscription stream ends with the
//! broker's shutdown ([`Ending`]).

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::Arc;

use tokio::sync::mpsc;
use tokio_stream::Stream;
use tonic::{Response, Status};

use crate::broker::groups::{GroupMember, Membership};
use crate::broker::{Broker, DeliveryBatch, Start};
use crate::proto::v1 as pb;

use super::convert::delivery_to_pb;
use super::ending::Ending;
use super::status::to_status;

/// What a subscription asks for.
#[derive(Debug, Clone)]
pub struct Subscription<'a> {
    pub topic: &'a str,
    /// Empty: a plain subscription.
    pub group: &'a str,
    /// A plain subscription's partitions (all when empty).
    pub partitions: Vec<u32>,
    pub start: Start,
    /// A group member's in-flight limit, mode and delivery limit.
    pub membership: Membership,
}

/// Starts the subscription: its deliveries, and for a group member the guard that makes it
/// leave the group when dropped.
pub async fn open(
    broker: &Broker,
    s: Subscription<'_>,
) -> Result<(mpsc::Receiver<DeliveryBatch>, Option<GroupMember>), Status> {
    if s.group.is_empty() {
        let rx = broker
            .subscribe(s.topic, s.partitions, s.start)
            .await
            .map_err(to_status)?;
        return Ok((rx, None));
    }
    let (guard, rx) = broker
        .subscribe_group(s.topic, s.group, s.start, s.membership)
        .await
        .map_err(to_status)?;
    Ok((rx, Some(guard)))
}

/// A response stream that ends when the broker shuts down.
pub type ResponseStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// Answers a subscription with `stream`, ended by the broker's shutdown.
pub fn respond<T: 'static>(
    broker: &Broker,
    stream: impl Stream<Item = Result<T, Status>> + Send + 'static,
) -> Response<ResponseStream<T>> {
    let stop = broker.shutdown_token();
    Response::new(Box::pin(Ending::new(stream, stop, broker.metrics())))
}

/// A subscription's responses: each run of messages from the broker becomes one or more
/// responses of about `max_bytes` encoded (at least one delivery each), so that no response
/// outgrows what ordinary gRPC clients accept, whatever the size of the stored batches.
pub struct Responses {
    rx: mpsc::Receiver<DeliveryBatch>,
    topic: Arc<str>,
    max_bytes: usize,
    ready: VecDeque<Result<pb::SubscribeResponse, Status>>,
    /// Group membership: leaves the group when the stream is dropped.
    member: Option<GroupMember>,
    /// A plain subscription's deliveries left before it ends (its `limit`).
    left: Option<u64>,
    metrics: Arc<crate::metrics::Metrics>,
}

impl std::fmt::Debug for Responses {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Responses")
            .field("topic", &self.topic)
            .finish_non_exhaustive()
    }
}

impl Responses {
    /// The responses of a subscription to `topic`: `limit` deliveries at most for a plain one
    /// (a member's limit is the dispatcher's to keep: it stays a member after it).
    pub fn new(
        broker: &Broker,
        rx: mpsc::Receiver<DeliveryBatch>,
        topic: &str,
        member: Option<GroupMember>,
        limit: Option<u64>,
    ) -> Responses {
        Responses {
            rx,
            topic: Arc::from(topic),
            max_bytes: broker.settings().delivery_batch_bytes,
            ready: VecDeque::new(),
            left: if member.is_some() { None } else { limit },
            member,
            metrics: Arc::clone(broker.metrics()),
        }
    }

    fn split(&mut self, batch: DeliveryBatch) {
        let deliveries = match batch {
            Ok(d) => d,
            Err(e) => return self.ready.push_back(Err(to_status(e))),
        };
        let mut current = Vec::new();
        let mut bytes = 0;
        let mut deliveries = match deliveries.into_deliveries() {
            Ok(d) => d,
            Err(e) => return self.ready.push_back(Err(to_status(e))),
        };
        if let Some(left) = &mut self.left {
            deliveries.truncate(usize::try_from(*left).unwrap_or(usize::MAX));
            *left -= deliveries.len() as u64;
        }
        self.metrics.delivered(deliveries.len());
        for d in deliveries {
            let d = delivery_to_pb(&self.topic, d);
            let size = prost::Message::encoded_len(&d) + 8;
            if !current.is_empty() && bytes + size > self.max_bytes {
                let deliveries = std::mem::take(&mut current);
                self.ready
                    .push_back(Ok(pb::SubscribeResponse { deliveries }));
                bytes = 0;
            }
            bytes += size;
            current.push(d);
        }
        if !current.is_empty() {
            self.ready.push_back(Ok(pb::SubscribeResponse {
                deliveries: current,
            }));
        }
    }
}

impl Stream for Responses {
    type Item = Result<pb::SubscribeResponse, Status>;

    fn poll_next(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        loop {
            if let Some(r) = self.ready.pop_front() {
                let r = match (r, &self.member) {
                    // Only deliveries still this member's reach the transport; each counts as
                    // an attempt from here.
                    (Ok(mut response), Some(m)) => {
                        m.hand_over(&mut response.deliveries, |d| (d.partition, d.offset));
                        if response.deliveries.is_empty() {
                            continue;
                        }
                        Ok(response)
                    }
                    (r, _) => r,
                };
                return std::task::Poll::Ready(Some(r));
            }
            if self.left == Some(0) {
                // A plain subscription's limit reached: the stream ends.
                return std::task::Poll::Ready(None);
            }
            match self.rx.poll_recv(cx) {
                std::task::Poll::Ready(Some(batch)) => {
                    if let Some(m) = &self.member {
                        m.poke();
                    }
                    self.split(batch);
                }
                std::task::Poll::Ready(None) => return std::task::Poll::Ready(None),
                std::task::Poll::Pending => return std::task::Poll::Pending,
            }
        }
    }
}
