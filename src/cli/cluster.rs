//! `sluice cluster status`: the nodes, the metadata leader, and each partition's leader and
//! replicas, as the asked node gathers them from every node. Exits 1 when a group has no leader.
//! `sluice cluster transfer-leader` and `rebalance`: moving partition leaderships.

use std::fmt::Write as _;
use std::io::Write;

use crate::proto::v1 as pb;
use crate::proto::v1::admin_client::AdminClient;

use super::args::{BrokerArg, OutputFormat};
use super::connection::link;
use super::error::CliError;

pub async fn status(broker: BrokerArg, format: OutputFormat) -> Result<(), CliError> {
    let mut client = AdminClient::new(link(&broker).await?);
    let s = client
        .cluster_status(pb::ClusterStatusRequest {})
        .await?
        .into_inner();
    let out = match format {
        OutputFormat::Text => status_text(&s),
        OutputFormat::Json => format!("{}\n", status_json(&s)),
    };
    std::io::stdout().lock().write_all(out.as_bytes())?;
    match leaderless(&s) {
        None => Ok(()),
        Some(what) => Err(CliError::Unhealthy(format!("no leader: {what}"))),
    }
}

pub async fn transfer_leader(
    broker: BrokerArg,
    topic: String,
    partition: u32,
    to: u64,
) -> Result<(), CliError> {
    let mut client = AdminClient::new(link(&broker).await?);
    let moved = client
        .transfer_leader(pb::TransferLeaderRequest {
            topic: topic.clone(),
            partition,
            to,
        })
        .await?
        .into_inner();
    println!(
        "{topic}/{partition}: leader node {} (term {})",
        moved.leader, moved.term
    );
    Ok(())
}

pub async fn rebalance(broker: BrokerArg, dry_run: bool) -> Result<(), CliError> {
    let mut client = AdminClient::new(link(&broker).await?);
    let r = client
        .rebalance_leaders(pb::RebalanceLeadersRequest { dry_run })
        .await?
        .into_inner();
    let mut out = String::new();
    if r.moves.is_empty() {
        let _ = writeln!(out, "nothing to move");
    }
    for m in &r.moves {
        let outcome = match (m.error.as_str(), dry_run) {
            ("", true) => "would move".to_string(),
            ("", false) => "moved".to_string(),
            (why, _) => format!("not moved: {why}"),
        };
        let _ = writeln!(
            out,
            "{}/{}\t{} -> {}\t{outcome}",
            m.topic, m.partition, m.from, m.to
        );
    }
    for n in &r.leaders {
        let _ = writeln!(out, "node {} leads {}", n.node_id, n.partitions);
    }
    std::io::stdout().lock().write_all(out.as_bytes())?;
    let failed = r.moves.iter().filter(|m| !m.error.is_empty()).count();
    match failed {
        0 => Ok(()),
        n => Err(CliError::Unhealthy(format!("{n} leadership moves failed"))),
    }
}

/// The groups without a leader, named; `None` when every group has one.
fn leaderless(s: &pb::ClusterStatusResponse) -> Option<String> {
    let mut missing: Vec<String> = s
        .partitions
        .iter()
        .filter(|p| p.leader.is_none())
        .map(|p| format!("{}/{}", p.topic, p.partition))
        .chain(
            s.consumer_groups
                .iter()
                .filter(|g| g.leader.is_none())
                .map(|g| format!("consumer group {} on {}", g.group, g.topic)),
        )
        .collect();
    if s.metadata_leader.is_none() {
        missing.insert(0, "the metadata group".into());
    }
    (!missing.is_empty()).then(|| missing.join(", "))
}

fn or_none(id: Option<u64>) -> String {
    id.map_or_else(|| "none".into(), |id| id.to_string())
}

fn status_text(s: &pb::ClusterStatusResponse) -> String {
    let mut out = String::new();
    for n in &s.nodes {
        let state = if n.reachable {
            "reachable".to_string()
        } else {
            format!("unreachable: {}", n.error)
        };
        let _ = writeln!(out, "node {}\t{}\t{state}", n.id, n.address);
    }
    let _ = writeln!(out, "metadata leader: {}", or_none(s.metadata_leader));
    let _ = writeln!(
        out,
        "partition\tleader\tterm\treplicas (entries behind the leader)"
    );
    for p in &s.partitions {
        let _ = writeln!(
            out,
            "{}/{}\t{}\t{}\t{}",
            p.topic,
            p.partition,
            or_none(p.leader),
            p.term,
            replicas_text(&p.replicas)
        );
    }
    if !s.consumer_groups.is_empty() {
        let _ = writeln!(
            out,
            "consumer group\ttopic\tleader\tterm\treplicas (entries behind the leader)"
        );
    }
    for g in &s.consumer_groups {
        let _ = writeln!(
            out,
            "{}\t{}\t{}\t{}\t{}",
            g.group,
            g.topic,
            or_none(g.leader),
            g.term,
            replicas_text(&g.replicas)
        );
    }
    out
}

fn replicas_text(replicas: &[pb::ReplicaStatus]) -> String {
    let replicas: Vec<String> = replicas
        .iter()
        .map(|r| {
            let behind = r.behind.map_or_else(|| "?".into(), |b| b.to_string());
            format!("{}:{behind}{}", r.node_id, if r.leader { "*" } else { "" })
        })
        .collect();
    replicas.join(" ")
}

fn replicas_json(replicas: &[pb::ReplicaStatus]) -> Vec<serde_json::Value> {
    replicas
        .iter()
        .map(|r| {
            serde_json::json!({
                "node_id": r.node_id,
                "leader": r.leader,
                "behind": r.behind,
            })
        })
        .collect()
}

fn status_json(s: &pb::ClusterStatusResponse) -> serde_json::Value {
    serde_json::json!({
        "node_id": s.node_id,
        "nodes": s.nodes.iter().map(|n| serde_json::json!({
            "id": n.id,
            "address": n.address,
            "reachable": n.reachable,
            "error": (!n.reachable).then_some(&n.error),
        })).collect::<Vec<_>>(),
        "metadata_leader": s.metadata_leader,
        "partitions": s.partitions.iter().map(|p| serde_json::json!({
            "topic": p.topic,
            "partition": p.partition,
            "leader": p.leader,
            "term": p.term,
            "replicas": replicas_json(&p.replicas),
        })).collect::<Vec<_>>(),
        "consumer_groups": s.consumer_groups.iter().map(|g| serde_json::json!({
            "group": g.group,
            "topic": g.topic,
            "leader": g.leader,
            "term": g.term,
            "replicas": replicas_json(&g.replicas),
        })).collect::<Vec<_>>(),
    })
}

/// `sluice cluster add-node ID@HOST:PORT`.
pub async fn add_node(broker: BrokerArg, node: &str) -> Result<(), CliError> {
    let (id, address) = crate::replication::config::parse_peer(node)
        .map_err(|e| CliError::Usage(e.replace("cluster.peers entry", "node")))?;
    let mut client = AdminClient::new(link(&broker).await?);
    let request = pb::AddNodeRequest {
        node_id: id,
        address,
    };
    let change = async move { client.add_node(request).await };
    let done = with_progress(&broker, id, change).await?;
    println!("node {id} added: {} groups have it as a voter", done.groups);
    Ok(())
}

/// `sluice cluster remove-node ID`.
pub async fn remove_node(broker: BrokerArg, id: u64) -> Result<(), CliError> {
    let mut client = AdminClient::new(link(&broker).await?);
    let change = async move {
        client
            .remove_node(pb::RemoveNodeRequest { node_id: id })
            .await
    };
    let done = with_progress(&broker, id, change).await?;
    println!(
        "node {id} removed: {} groups changed their voters; its process may stop now",
        done.groups
    );
    Ok(())
}

/// Runs `change`, printing every two seconds meanwhile how many groups have node `id` as a
/// voter (as `cluster status` shows them).
async fn with_progress(
    broker: &BrokerArg,
    id: u64,
    change: impl std::future::Future<
        Output = Result<tonic::Response<pb::ChangeNodesResponse>, tonic::Status>,
    >,
) -> Result<pb::ChangeNodesResponse, CliError> {
    let mut watcher = AdminClient::new(link(broker).await?);
    tokio::pin!(change);
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(2));
    tick.tick().await;
    loop {
        tokio::select! {
            done = &mut change => return Ok(done?.into_inner()),
            _ = tick.tick() => {
                if let Ok(s) = watcher.cluster_status(pb::ClusterStatusRequest {}).await {
                    let s = s.into_inner();
                    let holding = s.partitions.iter().map(|p| &p.replicas)
                        .chain(s.consumer_groups.iter().map(|g| &g.replicas))
                        .filter(|r| r.iter().any(|r| r.node_id == id))
                        .count();
                    let all = s.partitions.len() + s.consumer_groups.len();
                    eprintln!("… {holding} of {all} groups have node {id} as a voter");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn partition(leader: Option<u64>) -> pb::ReplicatedPartition {
        pb::ReplicatedPartition {
            topic: "epro".into(),
            partition: 1,
            leader,
            term: 4,
            replicas: vec![
                pb::ReplicaStatus {
                    node_id: 1,
                    leader: leader == Some(1),
                    behind: Some(0),
                },
                pb::ReplicaStatus {
                    node_id: 2,
                    leader: false,
                    behind: None,
                },
            ],
        }
    }

    fn consumer_group(leader: Option<u64>) -> pb::ReplicatedConsumerGroup {
        let p = partition(leader);
        pb::ReplicatedConsumerGroup {
            group: "etl".into(),
            topic: p.topic,
            leader,
            term: p.term,
            replicas: p.replicas,
        }
    }

    #[test]
    fn a_group_without_a_leader_is_named_and_fails_the_command() {
        let healthy = pb::ClusterStatusResponse {
            node_id: 1,
            nodes: vec![pb::ClusterNode {
                id: 2,
                address: "10.0.0.2:7170".into(),
                reachable: false,
                error: "no answer within 1000 ms".into(),
            }],
            metadata_leader: Some(1),
            partitions: vec![partition(Some(1))],
            consumer_groups: vec![consumer_group(Some(2))],
        };
        assert_eq!(leaderless(&healthy), None);
        let text = status_text(&healthy);
        assert!(
            text.contains("node 2\t10.0.0.2:7170\tunreachable: no answer"),
            "{text}"
        );
        assert!(text.contains("epro/1\t1\t4\t1:0* 2:?"), "{text}");
        assert!(text.contains("etl\tepro\t2\t4\t1:0 2:?"), "{text}");
        let json = status_json(&healthy);
        assert_eq!(
            json["partitions"][0]["replicas"][1]["behind"],
            serde_json::Value::Null
        );
        assert_eq!(json["nodes"][0]["reachable"], false);
        assert_eq!(json["consumer_groups"][0]["group"], "etl");
        assert_eq!(json["consumer_groups"][0]["leader"], 2);

        let mut headless = healthy.clone();
        headless.metadata_leader = None;
        headless.partitions.push(partition(None));
        headless.consumer_groups.push(consumer_group(None));
        assert_eq!(
            leaderless(&headless).as_deref(),
            Some("the metadata group, epro/1, consumer group etl on epro")
        );
    }
}
