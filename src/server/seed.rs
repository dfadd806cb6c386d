//! The seed design's `broker.Broker` service, served unchanged beside `sluice.v1`.
//!
//! - `Send` answers `success = true` only once the message is durable; every failure is a gRPC
//!   status, never a silent `false`. Topics are created on first use.
//! - `Subscribe` with a `consumerGroup` joins that group through the same machinery as
//!   `sluice.v1` (competing consumers, starting at the earliest message for a new group). This API
//!   has no Ack, so a message counts as acknowledged once the stream has handed it to the
//!   transport: at-most-once for a consumer that crashes mid-message. `sluice.v1` with Ack is the
//!   at-least-once path. An empty `consumerGroup` is a plain subscription from the latest message.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use crate::broker::groups::{GroupMember, Membership};
use crate::broker::{Broker, DeliveryBatch, Start};
use crate::proto::seed as pb;

use super::access::{Access, caller};
use super::convert::seed_message;
use super::status::to_status;
use super::subscription::{self, ResponseStream, Subscription};
use crate::auth::{Action, Resource};

#[derive(Debug, Clone)]
pub struct SeedService {
    broker: Arc<Broker>,
    access: Access,
    /// Benchmarks only: Send answers at once, storing nothing (`Config::answer_sends_without_storing`).
    floor: bool,
}

impl SeedService {
    pub fn new(broker: Arc<Broker>) -> Self {
        let access = Access::new(Arc::clone(&broker));
        Self {
            broker,
            access,
            floor: false,
        }
    }

    /// Benchmarks only: Send answers at once, storing nothing.
    pub fn answering_sends_without_storing(mut self, on: bool) -> Self {
        self.floor = on;
        self
    }
}

const SEND: &str = "broker.Broker/Send";
const SUBSCRIBE: &str = "broker.Broker/Subscribe";

#[tonic::async_trait]
impl pb::broker_server::Broker for SeedService {
    async fn send(
        &self,
        request: Request<pb::SendRequest>,
    ) -> Result<Response<pb::SendResponse>, Status> {
        if self.floor {
            return Ok(Response::new(pb::SendResponse { success: true }));
        }
        let caller = caller(&request)?;
        let msg = request
            .into_inner()
            .msg
            .ok_or_else(|| Status::invalid_argument("SendRequest.msg is required"))?;
        let a = &self.access;
        a.require(&caller, SEND, Action::Produce, Resource::Topic(&msg.topic))
            .await?;
        let create = a.may_create(&caller, SEND, &msg.topic, true).await?;
        let message = seed_message(msg.payload);
        self.broker
            .send_with(&msg.topic, vec![message], create)
            .await
            .map_err(to_status)?;
        Ok(Response::new(pb::SendResponse { success: true }))
    }

    type SubscribeStream = ResponseStream<pb::SubscribeResponse>;

    async fn subscribe(
        &self,
        request: Request<pb::SubscribeRequest>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        let caller = caller(&request)?;
        let req = request.into_inner();
        let a = &self.access;
        a.require_consume(&caller, SUBSCRIBE, &req.topic, &req.consumer_group)
            .await?;
        let create = a.may_create(&caller, SUBSCRIBE, &req.topic, true).await?;
        self.broker
            .topic_or_create(&req.topic, create)
            .await
            .map_err(to_status)?;
        // The seed API: a plain subscription starts at the end, a group at the beginning.
        let start = if req.consumer_group.is_empty() {
            Start::Latest
        } else {
            Start::Earliest
        };
        let subscription = Subscription {
            topic: &req.topic,
            group: &req.consumer_group,
            partitions: Vec::new(),
            start,
            membership: Membership::default(),
        };
        let (rx, member) = subscription::open(&self.broker, subscription).await?;
        let stream = SeedResponses {
            rx,
            topic: req.topic,
            queue: VecDeque::new(),
            handed: Vec::new(),
            member,
            metrics: Arc::clone(self.broker.metrics()),
        };
        Ok(subscription::respond(&self.broker, stream))
    }
}

/// One message per response; acknowledges what it has handed over (at the latest when it would
/// wait, or when dropped).
struct SeedResponses {
    rx: tokio::sync::mpsc::Receiver<DeliveryBatch>,
    topic: String,
    queue: VecDeque<(pb::SubscribeResponse, (u32, u64))>,
    handed: Vec<(u32, u64)>,
    member: Option<GroupMember>,
    metrics: Arc<crate::metrics::Metrics>,
}

impl SeedResponses {
    fn ack_handed(&mut self) {
        if self.handed.is_empty() {
            return;
        }
        if let Some(m) = &self.member
            && let Err(e) = m.ack_quietly(&self.handed)
        {
            tracing::warn!(error = %e, "seed subscription could not acknowledge");
        }
        self.handed.clear();
    }
}

impl Drop for SeedResponses {
    fn drop(&mut self) {
        self.ack_handed();
    }
}

impl Stream for SeedResponses {
    type Item = Result<pb::SubscribeResponse, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        loop {
            if let Some((response, id)) = self.queue.pop_front() {
                if let Some(m) = &self.member {
                    // A delivery that is no longer this member's does not go out.
                    let mut one = vec![id];
                    m.hand_over(&mut one, |&id| id);
                    if one.is_empty() {
                        continue;
                    }
                }
                self.handed.push(id);
                if self.handed.len() >= 256 {
                    self.ack_handed();
                }
                return Poll::Ready(Some(Ok(response)));
            }
            self.ack_handed();
            match self.rx.poll_recv(cx) {
                Poll::Ready(Some(Ok(batch))) => {
                    if let Some(m) = &self.member {
                        m.poke();
                    }
                    let deliveries = match batch.into_deliveries() {
                        Ok(d) => d,
                        Err(e) => return Poll::Ready(Some(Err(to_status(e)))),
                    };
                    self.metrics.delivered(deliveries.len());
                    for d in deliveries {
                        let response = pb::SubscribeResponse {
                            msg: Some(pb::Message {
                                topic: self.topic.clone(),
                                payload: d.record.value.unwrap_or_default(),
                            }),
                        };
                        self.queue
                            .push_back((response, (d.partition, d.record.offset)));
                    }
                }
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Some(Err(to_status(e)))),
                Poll::Ready(None) => return Poll::Ready(None),
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}
