//! The cluster port's consumer-group calls, for the groups this node leads: a member another
//! node relays here (`Consume`: its deliveries, each counted as an attempt when the group
//! assigned it) and the acks and nacks it forwards (`Settle`). Errors become statuses here, as
//! for clients; the relaying node passes them on as they are.

use std::pin::Pin;
use std::sync::{Arc, Weak};
use std::time::Duration;

use tokio_stream::StreamExt;
use tonic::Status;

use crate::broker::Error;
use crate::broker::groups::Membership;
use crate::broker::{Broker, relayed_delivery};
use crate::proto::cluster as pb;
use crate::replication::service::{ConsumeStream, GroupHost};
use crate::replication::write::NOT_PROPOSED_METADATA;

use super::status::{status, to_status};

/// Serves `Consume` and `Settle` with the broker's consumer groups.
pub struct LedGroups {
    broker: Weak<Broker>,
}

impl LedGroups {
    pub fn new(broker: &Arc<Broker>) -> LedGroups {
        LedGroups {
            broker: Arc::downgrade(broker),
        }
    }

    fn broker(&self) -> Result<Arc<Broker>, Status> {
        self.broker
            .upgrade()
            .ok_or_else(|| status(tonic::Code::Unavailable, "the broker is shutting down"))
    }
}

type Answer<'a, T> = Pin<Box<dyn Future<Output = Result<T, Status>> + Send + 'a>>;

impl GroupHost for LedGroups {
    fn consume(&self, req: pb::ConsumeRequest) -> Answer<'_, ConsumeStream> {
        Box::pin(async move {
            let broker = self.broker()?;
            let membership = Membership {
                max_in_flight: usize::try_from(req.max_in_flight).unwrap_or(usize::MAX),
                exclusive: req.exclusive,
                limit: req.limit,
            };
            let (member, rx) = broker
                .join_led_group(
                    &req.group,
                    &req.topic,
                    membership,
                    (req.via != 0).then_some(req.via),
                )
                .map_err(to_status)?;
            // The member stays while the stream lives: the relaying node's cancel ends both.
            let stream = tokio_stream::wrappers::ReceiverStream::new(rx).map(move |batch| {
                member.group().poke();
                let mut deliveries = batch.and_then(|b| b.into_deliveries()).map_err(to_status)?;
                member.hand_over(&mut deliveries, |d| (d.partition, d.record.offset));
                Ok(pb::ConsumeResponse {
                    deliveries: deliveries.into_iter().map(relayed_delivery).collect(),
                })
            });
            Ok(Box::pin(stream) as ConsumeStream)
        })
    }

    fn settle(&self, req: pb::SettleRequest) -> Answer<'_, pb::SettleResponse> {
        Box::pin(async move {
            let broker = self.broker()?;
            let nack = req.nack.then(|| Duration::from_millis(req.delay_ms));
            let applied = broker
                .settle_led_group(&req.group, &req.topic, &req.ack_ids, nack)
                .await
                .map_err(|e| match e {
                    // Not led here, and nothing done: the relaying node may ask another.
                    e @ Error::NoLeader { .. } => not_taken(to_status(e)),
                    e => to_status(e),
                })?;
            Ok(pb::SettleResponse { applied })
        })
    }

    fn administer(
        &self,
        req: pb::AdministerGroupRequest,
    ) -> Answer<'_, pb::AdministerGroupResponse> {
        Box::pin(async move {
            let broker = self.broker()?;
            let description = broker
                .administer_led_group(&req.group, &req.topic, req.reset)
                .await
                .map_err(|e| match e {
                    e @ Error::NoLeader { .. } => not_taken(to_status(e)),
                    e => to_status(e),
                })?;
            Ok(pb::AdministerGroupResponse {
                description: description.into(),
            })
        })
    }
}

/// Marks a refusal that did nothing (see `replication::write::NOT_PROPOSED_METADATA`).
fn not_taken(mut status: Status) -> Status {
    status.metadata_mut().insert(
        NOT_PROPOSED_METADATA,
        tonic::metadata::MetadataValue::from_static("1"),
    );
    status
}
