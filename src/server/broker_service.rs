//! The `sluice.v1.Broker` service: Send, Subscribe, Ack and Nack, each checked against the
//! caller's grants, then answered by the broker.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use crate::auth::{Action, Resource};
use crate::broker::Broker;
use crate::broker::groups::Membership;
use crate::proto::v1 as pb;

use super::access::{Access, caller};
use super::convert::{message_from_pb, position_to_pb, start_from_pb};
use super::status::to_status;
use super::subscription::{self, ResponseStream, Responses, Subscription};

#[derive(Debug, Clone)]
pub struct BrokerService {
    broker: Arc<Broker>,
    access: Access,
    /// Benchmarks only: Send answers at once, storing nothing (`Config::answer_sends_without_storing`).
    floor: bool,
}

impl BrokerService {
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

const SEND: &str = "sluice.v1.Broker/Send";
const SUBSCRIBE: &str = "sluice.v1.Broker/Subscribe";
const ACK: &str = "sluice.v1.Broker/Ack";
const NACK: &str = "sluice.v1.Broker/Nack";

#[tonic::async_trait]
impl pb::broker_server::Broker for BrokerService {
    async fn send(
        &self,
        request: Request<pb::SendRequest>,
    ) -> Result<Response<pb::SendResponse>, Status> {
        if self.floor {
            let count = request.get_ref().messages.len();
            return Ok(Response::new(pb::SendResponse {
                positions: (0..count as u64)
                    .map(|offset| pb::Position {
                        offset,
                        ..pb::Position::default()
                    })
                    .collect(),
            }));
        }
        let caller = caller(&request)?;
        let req = request.into_inner();
        let a = &self.access;
        a.require(&caller, SEND, Action::Produce, Resource::Topic(&req.topic))
            .await?;
        let create = a
            .may_create(
                &caller,
                SEND,
                &req.topic,
                self.broker.settings().auto_create_topics,
            )
            .await?;
        let messages = req.messages.into_iter().map(message_from_pb).collect();
        let positions = self
            .broker
            .send_with(&req.topic, messages, create)
            .await
            .map_err(to_status)?;
        Ok(Response::new(pb::SendResponse {
            positions: positions.into_iter().map(position_to_pb).collect(),
        }))
    }

    type SubscribeStream = ResponseStream<pb::SubscribeResponse>;

    async fn subscribe(
        &self,
        request: Request<pb::SubscribeRequest>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        let caller = caller(&request)?;
        let req = request.into_inner();
        self.access
            .require_consume(&caller, SUBSCRIBE, &req.topic, &req.group)
            .await?;
        let start = start_from_pb(req.start)?;
        let limit = (req.limit > 0).then_some(req.limit);
        if req.group.is_empty() && (req.max_in_flight != 0 || req.exclusive) {
            return Err(Status::invalid_argument(
                "max_in_flight and exclusive only apply to group subscriptions",
            ));
        }
        if !req.group.is_empty() && !req.partitions.is_empty() {
            return Err(Status::invalid_argument(
                "a group member receives from every partition; partitions must be empty",
            ));
        }
        let subscription = Subscription {
            topic: &req.topic,
            group: &req.group,
            partitions: req.partitions,
            start,
            membership: Membership {
                max_in_flight: req.max_in_flight as usize,
                exclusive: req.exclusive,
                limit,
            },
        };
        let (rx, member) = subscription::open(&self.broker, subscription).await?;
        let stream = Responses::new(&self.broker, rx, &req.topic, member, limit);
        Ok(subscription::respond(&self.broker, stream))
    }

    async fn ack(
        &self,
        request: Request<pb::AckRequest>,
    ) -> Result<Response<pb::AckResponse>, Status> {
        let caller = caller(&request)?;
        let req = request.into_inner();
        self.access
            .require_consume(&caller, ACK, &req.topic, &req.group)
            .await?;
        let applied = self
            .broker
            .ack(&req.group, &req.topic, &req.ack_ids)
            .await
            .map_err(to_status)?;
        let (acked, not_in_flight) = split_applied(req.ack_ids, &applied);
        Ok(Response::new(pb::AckResponse {
            acked,
            not_in_flight,
        }))
    }

    async fn nack(
        &self,
        request: Request<pb::NackRequest>,
    ) -> Result<Response<pb::NackResponse>, Status> {
        let caller = caller(&request)?;
        let req = request.into_inner();
        self.access
            .require_consume(&caller, NACK, &req.topic, &req.group)
            .await?;
        let delay = std::time::Duration::from_millis(req.delay_ms);
        let applied = self
            .broker
            .nack(&req.group, &req.topic, &req.ack_ids, delay)
            .await
            .map_err(to_status)?;
        let (nacked, not_in_flight) = split_applied(req.ack_ids, &applied);
        Ok(Response::new(pb::NackResponse {
            nacked,
            not_in_flight,
        }))
    }
}

/// The ids that applied, and those that did not.
fn split_applied(ids: Vec<String>, applied: &[bool]) -> (Vec<String>, Vec<String>) {
    let (yes, no): (Vec<_>, Vec<_>) = ids
        .into_iter()
        .zip(applied.iter().copied())
        .partition(|(_, a)| *a);
    (
        yes.into_iter().map(|(id, _)| id).collect(),
        no.into_iter().map(|(id, _)| id).collect(),
    )
}
