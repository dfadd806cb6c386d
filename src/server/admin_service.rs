//! The `sluice.v1.Admin` service: topics, consumer groups and Compact. Every call is checked
//! for the `admin` grant and recorded, with its outcome, in the audit trail.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use crate::auth::{Action, Caller, Resource};
use crate::broker::Broker;
use crate::broker::META_GROUP;
use crate::broker::audit::{AuditEvent, Decision};
use crate::proto::v1 as pb;
use crate::replication::catalog::{parse_consumer_group_name, parse_group_name};
use crate::replication::status::ClusterView;

use super::access::{Access, caller};
use super::convert::{settings_from_pb, settings_to_pb, start_from_pb};
use super::status::to_status;

const DESCRIBE_GROUP: &str = "sluice.v1.Admin/DescribeGroup";
const RESET_GROUP: &str = "sluice.v1.Admin/ResetGroup";
const DELETE_GROUP: &str = "sluice.v1.Admin/DeleteGroup";
const COMPACT: &str = "sluice.v1.Admin/Compact";
const CREATE_TOPIC: &str = "sluice.v1.Admin/CreateTopic";
const DELETE_TOPIC: &str = "sluice.v1.Admin/DeleteTopic";
const DESCRIBE_TOPIC: &str = "sluice.v1.Admin/DescribeTopic";
const TRANSFER_LEADER: &str = "sluice.v1.Admin/TransferLeader";
const REBALANCE_LEADERS: &str = "sluice.v1.Admin/RebalanceLeaders";
const ADD_NODE: &str = "sluice.v1.Admin/AddNode";
const REMOVE_NODE: &str = "sluice.v1.Admin/RemoveNode";
/// Changing the cluster's nodes moves replicas of every topic, present and future: `admin` on
/// every topic, which only a grant whose pattern matches any name (`*`) gives.
const EVERY_TOPIC: &str = "*";

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

/// A partition's maintenance outcome, as Compact answers it.
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

/// A rebalance as `RebalanceLeaders` answers it.
fn rebalanced_to_pb(r: crate::broker::Rebalanced) -> pb::RebalanceLeadersResponse {
    pb::RebalanceLeadersResponse {
        moves: r
            .moves
            .into_iter()
            .map(|m| pb::LeaderMove {
                topic: m.topic,
                partition: m.partition,
                from: m.from,
                to: m.to,
                error: m.error.unwrap_or_default(),
            })
            .collect(),
        leaders: r
            .leaders
            .into_iter()
            .map(|(node_id, partitions)| pb::NodeLeaders {
                node_id,
                partitions,
            })
            .collect(),
    }
}

/// The cluster as `ClusterStatus` answers it: the partitions of the topics `may_describe`.
fn cluster_status_to_pb(
    view: ClusterView,
    may_describe: impl Fn(&str) -> bool,
) -> pb::ClusterStatusResponse {
    let mut metadata_leader = None;
    let mut partitions = Vec::new();
    let mut consumer_groups = Vec::new();
    for (name, g) in view.groups {
        if name == META_GROUP {
            metadata_leader = g.leader;
            continue;
        }
        let replicas = g
            .replicas
            .into_iter()
            .map(|(node_id, behind)| pb::ReplicaStatus {
                node_id,
                leader: g.leader == Some(node_id),
                behind,
            })
            .collect();
        if let Some((topic, group)) = parse_consumer_group_name(&name) {
            if may_describe(topic) {
                consumer_groups.push(pb::ReplicatedConsumerGroup {
                    group: group.to_string(),
                    topic: topic.to_string(),
                    leader: g.leader,
                    term: g.term,
                    replicas,
                });
            }
            continue;
        }
        let Some((topic, partition)) = parse_group_name(&name) else {
            continue;
        };
        if !may_describe(topic) {
            continue;
        }
        partitions.push(pb::ReplicatedPartition {
            topic: topic.to_string(),
            partition,
            leader: g.leader,
            term: g.term,
            replicas,
        });
    }
    pb::ClusterStatusResponse {
        node_id: view.node_id,
        nodes: view
            .nodes
            .into_iter()
            .map(|n| pb::ClusterNode {
                id: n.id,
                address: n.address,
                reachable: n.error.is_none(),
                error: n.error.unwrap_or_default(),
            })
            .collect(),
        metadata_leader,
        partitions,
        consumer_groups,
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

    async fn cluster_status(
        &self,
        request: Request<pb::ClusterStatusRequest>,
    ) -> Result<Response<pb::ClusterStatusResponse>, Status> {
        let caller = caller(&request)?;
        let view = self.broker.cluster_status().await.map_err(to_status)?;
        Ok(Response::new(cluster_status_to_pb(view, |topic| {
            caller.allows(Action::Describe, Resource::Topic(topic))
        })))
    }

    async fn transfer_leader(
        &self,
        request: Request<pb::TransferLeaderRequest>,
    ) -> Result<Response<pb::TransferLeaderResponse>, Status> {
        let caller = caller(&request)?;
        let req = request.into_inner();
        let transfer = async {
            self.broker
                .transfer_leader(&req.topic, req.partition, req.to)
                .await
                .map_err(to_status)
        };
        let before = serde_json::json!({ "partition": req.partition, "to": req.to });
        let resource = Resource::Topic(&req.topic);
        let (leader, term) = self
            .admin(&caller, TRANSFER_LEADER, resource, Some(before), transfer)
            .await?;
        Ok(Response::new(pb::TransferLeaderResponse { leader, term }))
    }

    async fn rebalance_leaders(
        &self,
        request: Request<pb::RebalanceLeadersRequest>,
    ) -> Result<Response<pb::RebalanceLeadersResponse>, Status> {
        let caller = caller(&request)?;
        let req = request.into_inner();
        // It may move any topic's leaders: `admin` on every topic (`describe` for a dry run).
        let action = if req.dry_run {
            Action::Describe
        } else {
            Action::Admin
        };
        for (name, _) in self.broker.list_topics() {
            self.access
                .require(&caller, REBALANCE_LEADERS, action, Resource::Topic(&name))
                .await?;
        }
        let rebalanced = self
            .broker
            .rebalance_leaders(req.dry_run)
            .await
            .map(rebalanced_to_pb)
            .map_err(to_status);
        if req.dry_run {
            return rebalanced.map(Response::new);
        }
        let event = super::access::event(
            &caller,
            REBALANCE_LEADERS,
            "every topic".into(),
            Decision::Allowed,
        );
        let event = match &rebalanced {
            Ok(r) => event.count("moves", r.moves.len() as u64).count(
                "failed",
                r.moves.iter().filter(|m| !m.error.is_empty()).count() as u64,
            ),
            Err(_) => event,
        };
        self.access
            .record_admin(event, rebalanced)
            .await
            .map(Response::new)
    }

    async fn add_node(
        &self,
        request: Request<pb::AddNodeRequest>,
    ) -> Result<Response<pb::ChangeNodesResponse>, Status> {
        let caller = caller(&request)?;
        let req = request.into_inner();
        let add = async {
            (self.broker)
                .add_node(req.node_id, &req.address)
                .await
                .map_err(to_status)
        };
        let before = serde_json::json!({ "node_id": req.node_id, "address": req.address });
        let resource = Resource::Topic(EVERY_TOPIC);
        let groups = self
            .admin(&caller, ADD_NODE, resource, Some(before), add)
            .await?;
        Ok(Response::new(pb::ChangeNodesResponse {
            groups: groups as u32,
        }))
    }

    async fn remove_node(
        &self,
        request: Request<pb::RemoveNodeRequest>,
    ) -> Result<Response<pb::ChangeNodesResponse>, Status> {
        let caller = caller(&request)?;
        let req = request.into_inner();
        let remove = async {
            (self.broker)
                .remove_node(req.node_id)
                .await
                .map_err(to_status)
        };
        let before = serde_json::json!({ "node_id": req.node_id });
        let resource = Resource::Topic(EVERY_TOPIC);
        let groups = self
            .admin(&caller, REMOVE_NODE, resource, Some(before), remove)
            .await?;
        Ok(Response::new(pb::ChangeNodesResponse {
            groups: groups as u32,
        }))
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
                    leader: p.leader,
                    replicas: p.replicas,
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
