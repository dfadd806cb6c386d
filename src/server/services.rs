//! The `sluice.v1` services: request validation and translation to and from the broker.

use std::pin::Pin;
use std::sync::Arc;

use std::collections::VecDeque;

use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use crate::broker::groups::MemberGuard;
use crate::broker::{Broker, Delivery, NewMessage, Start};
use crate::proto::v1 as pb;
use crate::storage::topic::CleanupPolicy;
use crate::storage::{Header, TopicConfig};

use super::access::{Access, caller};
use super::ending::Ending;
use super::status::to_status;
use crate::auth::{Action, Caller, Resource};
use crate::broker::audit::{AuditEvent, Decision};

#[derive(Debug, Clone)]
pub struct BrokerService {
    broker: Arc<Broker>,
    access: Access,
}

impl BrokerService {
    pub fn new(broker: Arc<Broker>) -> Self {
        let access = Access::new(Arc::clone(&broker));
        Self { broker, access }
    }
}

const SEND: &str = "sluice.v1.Broker/Send";
const SUBSCRIBE: &str = "sluice.v1.Broker/Subscribe";
const ACK: &str = "sluice.v1.Broker/Ack";
const NACK: &str = "sluice.v1.Broker/Nack";
const DESCRIBE_GROUP: &str = "sluice.v1.Admin/DescribeGroup";
const RESET_GROUP: &str = "sluice.v1.Admin/ResetGroup";
const DELETE_GROUP: &str = "sluice.v1.Admin/DeleteGroup";
const COMPACT: &str = "sluice.v1.Admin/Compact";
const CREATE_TOPIC: &str = "sluice.v1.Admin/CreateTopic";
const DELETE_TOPIC: &str = "sluice.v1.Admin/DeleteTopic";
const DESCRIBE_TOPIC: &str = "sluice.v1.Admin/DescribeTopic";

type DeliveryStream = Pin<Box<dyn Stream<Item = Result<pb::SubscribeResponse, Status>> + Send>>;

fn headers_from_pb(headers: Vec<pb::Header>) -> Vec<Header> {
    headers
        .into_iter()
        .map(|h| Header {
            key: h.key,
            value: h.value,
        })
        .collect()
}

/// A delivery as the API sends it (also `sluice dump --format json`'s, via `consume`'s JSON).
pub fn delivery_to_pb(topic: &str, d: Delivery) -> pb::Delivery {
    pb::Delivery {
        topic: topic.to_string(),
        partition: d.partition,
        offset: d.record.offset,
        timestamp_ms: d.record.timestamp,
        key: d.record.key,
        value: d.record.value,
        headers: d
            .record
            .headers
            .into_iter()
            .map(|h| pb::Header {
                key: h.key,
                value: h.value,
            })
            .collect(),
        attempt: d.attempt,
        ack_id: d.ack_id,
        id: d.record.id,
    }
}

/// The start position of a subscription; absent means earliest.
pub fn start_from_pb(start: Option<pb::StartPosition>) -> Result<Start, Status> {
    use pb::start_position::Kind;
    Ok(match start.and_then(|s| s.kind) {
        None => Start::Earliest,
        Some(Kind::Earliest(true)) => Start::Earliest,
        Some(Kind::Latest(true)) => Start::Latest,
        Some(Kind::Earliest(false) | Kind::Latest(false)) => {
            return Err(Status::invalid_argument(
                "start.earliest and start.latest must be true when set",
            ));
        }
        Some(Kind::Offset(o)) => Start::Offset(o),
        Some(Kind::TimestampMs(t)) => Start::Timestamp(t),
    })
}

#[tonic::async_trait]
impl pb::broker_server::Broker for BrokerService {
    async fn send(
        &self,
        request: Request<pb::SendRequest>,
    ) -> Result<Response<pb::SendResponse>, Status> {
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
        let messages = req
            .messages
            .into_iter()
            .map(|m| NewMessage {
                key: m.key,
                value: m.value,
                headers: headers_from_pb(m.headers),
                partition: m.partition,
                id: m.id,
            })
            .collect();
        let positions = self
            .broker
            .send_with(&req.topic, messages, create)
            .await
            .map_err(to_status)?;
        Ok(Response::new(pb::SendResponse {
            positions: positions
                .into_iter()
                .map(|p| pb::Position {
                    partition: p.partition,
                    offset: p.offset,
                    duplicate: p.duplicate,
                    removed: p.removed,
                })
                .collect(),
        }))
    }

    type SubscribeStream = DeliveryStream;

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
        let (rx, member) = if req.group.is_empty() {
            if req.max_in_flight != 0 || req.exclusive {
                return Err(Status::invalid_argument(
                    "max_in_flight and exclusive only apply to group subscriptions",
                ));
            }
            let rx = self
                .broker
                .subscribe(&req.topic, req.partitions, start)
                .await
                .map_err(to_status)?;
            (rx, None)
        } else {
            if !req.partitions.is_empty() {
                return Err(Status::invalid_argument(
                    "a group member receives from every partition; partitions must be empty",
                ));
            }
            let (guard, rx) = self
                .broker
                .subscribe_group(
                    &req.topic,
                    &req.group,
                    start,
                    req.max_in_flight as usize,
                    req.exclusive,
                    limit,
                )
                .await
                .map_err(to_status)?;
            (rx, Some(guard))
        };
        let stream = Responses {
            rx,
            topic: Arc::from(req.topic.as_str()),
            max_bytes: self.broker.settings().delivery_batch_bytes,
            ready: VecDeque::new(),
            // A member's limit is the dispatcher's to keep (it stays a member after it).
            left: if member.is_some() { None } else { limit },
            member,
            metrics: Arc::clone(self.broker.metrics()),
        };
        let stop = self.broker.shutdown_token();
        Ok(Response::new(Box::pin(Ending::new(
            stream,
            stop,
            self.broker.metrics(),
        ))))
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

/// A subscription's responses: each run of messages from the broker becomes one or more
/// responses of about `max_bytes` encoded (at least one delivery each), so that no response
/// outgrows what ordinary gRPC clients accept, whatever the size of the stored batches.
struct Responses {
    rx: tokio::sync::mpsc::Receiver<crate::broker::DeliveryBatch>,
    topic: Arc<str>,
    max_bytes: usize,
    ready: VecDeque<Result<pb::SubscribeResponse, Status>>,
    /// Group membership: leaves the group when the stream is dropped.
    member: Option<MemberGuard>,
    /// A plain subscription's deliveries left before it ends (its `limit`).
    left: Option<u64>,
    metrics: Arc<crate::metrics::Metrics>,
}

impl Responses {
    fn split(&mut self, batch: crate::broker::DeliveryBatch) {
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
                        m.group().poke();
                    }
                    self.split(batch);
                }
                std::task::Poll::Ready(None) => return std::task::Poll::Ready(None),
                std::task::Poll::Pending => return std::task::Poll::Pending,
            }
        }
    }
}

#[derive(Debug, Clone)]
pub struct AdminService {
    broker: Arc<Broker>,
    access: Access,
}

impl AdminService {
    pub fn new(broker: Arc<Broker>) -> Self {
        let access = Access::new(Arc::clone(&broker));
        Self { broker, access }
    }

    /// Checks `admin` on `resource`, runs the action, records its outcome, answers.
    async fn admin<T>(
        &self,
        caller: &Caller,
        rpc: &str,
        resource: Resource<'_>,
        before: Option<serde_json::Value>,
        action: impl std::future::Future<Output = Result<T, Status>>,
    ) -> Result<T, Status> {
        self.access
            .require(caller, rpc, Action::Admin, resource)
            .await?;
        let result = action.await;
        let mut event = super::access::event(caller, rpc, resource.to_string(), Decision::Allowed);
        event.before = before;
        if let Resource::Topic(t) = resource
            && result.is_ok()
        {
            event.after = self.broker.topic_settings_json(t);
        }
        self.access.record_admin(event, result).await
    }
}

pub fn compaction_to_pb(m: crate::broker::PartitionMaintenance) -> pb::PartitionCompaction {
    let o = m.outcome;
    pb::PartitionCompaction {
        topic: m.topic,
        partition: m.partition,
        segments_before: o.segments_before as u32,
        bytes_before: o.bytes_before,
        deleted_segments: o.deleted_segments as u32,
        deleted_bytes: o.deleted_bytes,
        held_segments: o.held_segments as u32,
        held_bytes: o.held_bytes,
        held_by: m.held_by.unwrap_or_default(),
        first_offset: o.log_start,
        records_dropped: o.log_start - o.log_start_before
            + m.compaction
                .map_or(0, |c| c.records_before - c.records_after),
        segments_after: m
            .compaction
            .map_or((o.segments_before - o.deleted_segments) as u32, |c| {
                c.segments_after as u32
            }),
        bytes_after: m
            .compaction
            .map_or(o.bytes_before - o.deleted_bytes, |c| c.bytes_after),
    }
}

/// The counts of a compaction's audit record (online and offline alike).
pub fn compaction_counts(event: AuditEvent, report: &[pb::PartitionCompaction]) -> AuditEvent {
    let sum = |f: fn(&pb::PartitionCompaction) -> u64| report.iter().map(f).sum();
    event
        .count("partitions", report.len() as u64)
        .count("deleted_segments", sum(|p| u64::from(p.deleted_segments)))
        .count("deleted_bytes", sum(|p| p.deleted_bytes))
        .count("records_dropped", sum(|p| p.records_dropped))
}

fn settings_to_pb(c: &TopicConfig) -> pb::TopicSettings {
    pb::TopicSettings {
        partitions: c.partitions,
        retention_ms: c.retention_ms,
        retention_bytes: c.retention_bytes,
        cleanup_policy: match c.cleanup_policy {
            CleanupPolicy::Delete => pb::CleanupPolicy::Delete as i32,
            CleanupPolicy::Compact => pb::CleanupPolicy::Compact as i32,
        },
        segment_bytes: c.segment_bytes,
        dedup_window_ms: Some(c.dedup_window_ms),
    }
}

fn settings_from_pb(s: Option<pb::TopicSettings>) -> Result<TopicConfig, Status> {
    let s = s.unwrap_or_default();
    let cleanup_policy = match pb::CleanupPolicy::try_from(s.cleanup_policy) {
        Ok(pb::CleanupPolicy::Delete) => CleanupPolicy::Delete,
        Ok(pb::CleanupPolicy::Compact) => CleanupPolicy::Compact,
        Err(_) => {
            return Err(Status::invalid_argument(format!(
                "unknown cleanup policy {}",
                s.cleanup_policy
            )));
        }
    };
    Ok(TopicConfig {
        partitions: s.partitions,
        retention_ms: s.retention_ms,
        retention_bytes: s.retention_bytes,
        cleanup_policy,
        segment_bytes: s.segment_bytes,
        dedup_window_ms: s
            .dedup_window_ms
            .unwrap_or(TopicConfig::default().dedup_window_ms),
        ..TopicConfig::default()
    })
}

#[tonic::async_trait]
impl pb::admin_server::Admin for AdminService {
    async fn list_groups(
        &self,
        request: Request<pb::ListGroupsRequest>,
    ) -> Result<Response<pb::ListGroupsResponse>, Status> {
        let caller = caller(&request)?;
        let groups = self
            .broker
            .list_groups()
            .map_err(to_status)?
            .into_iter()
            .filter(|(name, _)| caller.allows(Action::Describe, Resource::Group(name)))
            .map(|(name, topics)| pb::GroupInfo { name, topics })
            .collect();
        Ok(Response::new(pb::ListGroupsResponse { groups }))
    }

    async fn describe_group(
        &self,
        request: Request<pb::DescribeGroupRequest>,
    ) -> Result<Response<pb::DescribeGroupResponse>, Status> {
        let caller = caller(&request)?;
        let req = request.into_inner();
        self.access
            .require(
                &caller,
                DESCRIBE_GROUP,
                Action::Describe,
                Resource::Group(&req.group),
            )
            .await?;
        let topics = self
            .broker
            .describe_group(&req.group)
            .await
            .map_err(to_status)?
            .into_iter()
            .map(|t| pb::GroupTopicState {
                topic: t.topic,
                members: t
                    .members
                    .into_iter()
                    .map(|m| pb::GroupMember {
                        id: m.id,
                        in_flight: m.in_flight,
                        max_in_flight: m.max_in_flight,
                        exclusive: m.exclusive,
                    })
                    .collect(),
                partitions: t
                    .partitions
                    .into_iter()
                    .map(|p| pb::GroupPartitionState {
                        partition: p.partition,
                        committed_offset: p.committed,
                        end_offset: p.end,
                        lag: p.lag,
                        in_flight: p.in_flight,
                        pending: p.pending,
                        redeliveries: p.redeliveries,
                        dead_lettered: p.dead_lettered,
                        owner: p.owner,
                        blocked: p.blocked.unwrap_or_default(),
                    })
                    .collect(),
            })
            .collect();
        Ok(Response::new(pb::DescribeGroupResponse {
            group: req.group,
            topics,
        }))
    }

    async fn reset_group(
        &self,
        request: Request<pb::ResetGroupRequest>,
    ) -> Result<Response<pb::ResetGroupResponse>, Status> {
        let caller = caller(&request)?;
        let req = request.into_inner();
        let resource = Resource::Group(&req.group);
        let reset = async {
            if req.to.as_ref().and_then(|t| t.kind.as_ref()).is_none() {
                return Err(Status::invalid_argument("reset needs a position in `to`"));
            }
            let to = start_from_pb(req.to)?;
            self.broker
                .reset_group(&req.group, &req.topic, &req.partitions, to, req.force)
                .await
                .map_err(to_status)
        };
        self.admin(&caller, RESET_GROUP, resource, None, reset)
            .await?;
        Ok(Response::new(pb::ResetGroupResponse {}))
    }

    async fn compact(
        &self,
        request: Request<pb::CompactRequest>,
    ) -> Result<Response<pb::CompactResponse>, Status> {
        let caller = caller(&request)?;
        let req = request.into_inner();
        let topic = (!req.topic.is_empty()).then_some(req.topic.as_str());
        // Every topic it would touch needs `admin` (`describe` for a dry run).
        let action = if req.dry_run {
            Action::Describe
        } else {
            Action::Admin
        };
        let names: Vec<String> = match topic {
            Some(t) => vec![t.to_string()],
            None => self
                .broker
                .list_topics()
                .into_iter()
                .map(|(n, _)| n)
                .collect(),
        };
        for name in &names {
            self.access
                .require(&caller, COMPACT, action, Resource::Topic(name))
                .await?;
        }
        let report = self
            .broker
            .maintain(topic, req.dry_run)
            .await
            .map(|r| r.into_iter().map(compaction_to_pb).collect::<Vec<_>>())
            .map_err(to_status);
        let partitions = if req.dry_run {
            report?
        } else {
            let resource = match topic {
                Some(t) => Resource::Topic(t).to_string(),
                None => "every topic".into(),
            };
            let event = super::access::event(&caller, COMPACT, resource, Decision::Allowed);
            let event = compaction_counts(event, report.as_deref().unwrap_or_default());
            self.access.record_admin(event, report).await?
        };
        Ok(Response::new(pb::CompactResponse { partitions }))
    }

    async fn delete_group(
        &self,
        request: Request<pb::DeleteGroupRequest>,
    ) -> Result<Response<pb::DeleteGroupResponse>, Status> {
        let caller = caller(&request)?;
        let req = request.into_inner();
        let delete = async {
            self.broker
                .delete_group(&req.group)
                .await
                .map_err(to_status)
        };
        self.admin(
            &caller,
            DELETE_GROUP,
            Resource::Group(&req.group),
            None,
            delete,
        )
        .await?;
        Ok(Response::new(pb::DeleteGroupResponse {}))
    }

    async fn create_topic(
        &self,
        request: Request<pb::CreateTopicRequest>,
    ) -> Result<Response<pb::CreateTopicResponse>, Status> {
        let caller = caller(&request)?;
        let req = request.into_inner();
        let create = async {
            let config = settings_from_pb(req.settings)?;
            self.broker
                .create_topic(&req.name, config)
                .await
                .map_err(to_status)
        };
        self.admin(
            &caller,
            CREATE_TOPIC,
            Resource::Topic(&req.name),
            None,
            create,
        )
        .await?;
        Ok(Response::new(pb::CreateTopicResponse {}))
    }

    async fn delete_topic(
        &self,
        request: Request<pb::DeleteTopicRequest>,
    ) -> Result<Response<pb::DeleteTopicResponse>, Status> {
        let caller = caller(&request)?;
        let req = request.into_inner();
        let before = self.broker.topic_settings_json(&req.name);
        let delete = async { self.broker.delete_topic(&req.name).await.map_err(to_status) };
        self.admin(
            &caller,
            DELETE_TOPIC,
            Resource::Topic(&req.name),
            before,
            delete,
        )
        .await?;
        Ok(Response::new(pb::DeleteTopicResponse {}))
    }

    async fn list_topics(
        &self,
        request: Request<pb::ListTopicsRequest>,
    ) -> Result<Response<pb::ListTopicsResponse>, Status> {
        let caller = caller(&request)?;
        let topics = self
            .broker
            .list_topics()
            .into_iter()
            .filter(|(name, _)| caller.allows(Action::Describe, Resource::Topic(name)))
            .map(|(name, config)| pb::TopicInfo {
                name,
                settings: Some(settings_to_pb(&config)),
            })
            .collect();
        Ok(Response::new(pb::ListTopicsResponse { topics }))
    }

    async fn describe_topic(
        &self,
        request: Request<pb::DescribeTopicRequest>,
    ) -> Result<Response<pb::DescribeTopicResponse>, Status> {
        let caller = caller(&request)?;
        let req = request.into_inner();
        self.access
            .require(
                &caller,
                DESCRIBE_TOPIC,
                Action::Describe,
                Resource::Topic(&req.name),
            )
            .await?;
        let d = self
            .broker
            .describe_topic(&req.name)
            .await
            .map_err(to_status)?;
        Ok(Response::new(pb::DescribeTopicResponse {
            name: d.name,
            settings: Some(settings_to_pb(&d.config)),
            partitions: d
                .partitions
                .into_iter()
                .map(|p| pb::PartitionInfo {
                    partition: p.partition,
                    first_offset: p.first_offset,
                    next_offset: p.next_offset,
                    size_bytes: p.size_bytes,
                    segments: p.segments,
                    retention_held_bytes: p.held_bytes,
                    retention_held_by: p.held_by.unwrap_or_default(),
                })
                .collect(),
            dedup: d.ids.map(|i| pb::DedupInfo {
                duplicates: i.duplicates,
                ids_in_memory: i.in_memory,
                ids_on_disk: i.on_disk,
                index_files: i.runs,
                index_disk_bytes: i.disk_bytes,
                index_memory_bytes: i.resident_bytes,
            }),
        }))
    }
}
