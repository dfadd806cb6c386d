//! The JSON API (`/api/v1/…`): the overview, topics, dead letters and groups, each answer
//! limited to what the caller may `describe`.

use std::collections::HashMap;

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use serde_json::{Value, json};

use super::admission::{Admitted, Refusal};
use super::state::Shared;
use super::{rates, scrape};
use crate::auth::{Action, Resource};
use crate::broker::groups::DLQ_GROUP;

/// The newest dead letters one request may ask for.
const MAX_DEAD_LETTERS: usize = 100;

pub(super) async fn overview(
    a: Admitted,
    State(state): State<Shared>,
) -> Result<Json<Value>, Refusal> {
    let scrape = scrape::Scrape::gather(&a.broker, |r| a.may_describe(r)).await;
    let mut body = scrape.overview();
    body["cluster"] = json!(a.broker.settings().cluster.is_some());
    // The history is of broker-wide totals: shown to a caller who may see every topic.
    let sees_all = a
        .broker
        .open_topics()
        .iter()
        .all(|t| a.may_describe(Resource::Topic(&t.name)));
    body["history"] = if sees_all {
        json!({
            "interval_seconds": rates::INTERVAL.as_secs(),
            "samples": state.rates.samples(),
        })
    } else {
        Value::Null
    };
    Ok(Json(body))
}

/// Cluster mode: the nodes (reachable or not), the metadata leader, and each partition the
/// caller may describe with its leader and how far each replica is behind (what `sluice cluster
/// status` shows). A single node answers as for any call it cannot serve.
pub(super) async fn cluster(a: Admitted) -> Result<Json<Value>, Refusal> {
    let view = a.broker.cluster_status().await?;
    let mut metadata_leader = None;
    let mut partitions = Vec::new();
    for (name, g) in view.groups {
        if name == crate::broker::META_GROUP {
            metadata_leader = g.leader;
            continue;
        }
        let Some((topic, partition)) = crate::replication::catalog::parse_group_name(&name) else {
            continue;
        };
        if !a.may_describe(Resource::Topic(topic)) {
            continue;
        }
        let replicas: Vec<Value> = g
            .replicas
            .iter()
            .map(|(node, behind)| {
                json!({ "node_id": node, "leader": g.leader == Some(*node), "behind": behind })
            })
            .collect();
        partitions.push(json!({
            "topic": topic,
            "partition": partition,
            "leader": g.leader,
            "term": g.term,
            "replicas": replicas,
        }));
    }
    let nodes: Vec<Value> = view
        .nodes
        .iter()
        .map(|n| {
            json!({
                "id": n.id,
                "address": n.address,
                "reachable": n.error.is_none(),
                "error": n.error,
            })
        })
        .collect();
    Ok(Json(json!({
        "node_id": view.node_id,
        "metadata_leader": metadata_leader,
        "nodes": nodes,
        "partitions": partitions,
    })))
}

pub(super) async fn topics(a: Admitted) -> Result<Json<Value>, Refusal> {
    let list: Vec<Value> = a
        .broker
        .open_topics()
        .iter()
        .filter(|t| a.may_describe(Resource::Topic(&t.name)))
        .map(|t| {
            let (mut records, mut bytes, mut appended) = (0, 0, 0);
            for p in &t.partitions {
                let s = p.log.stats();
                records += s.high_water - s.log_start;
                bytes += s.size_bytes;
                appended += p
                    .log
                    .metrics()
                    .records
                    .load(std::sync::atomic::Ordering::Relaxed);
            }
            json!({
                "name": &*t.name,
                "partitions": t.partitions.len(),
                "records": records,
                "size_bytes": bytes,
                "records_appended": appended,
            })
        })
        .collect();
    Ok(Json(json!({ "topics": list })))
}

pub(super) async fn topic(a: Admitted, Path(name): Path<String>) -> Result<Json<Value>, Refusal> {
    a.require(Resource::Topic(&name)).await?;
    let d = a.broker.describe_topic(&name).await?;
    let partitions: Vec<Value> = d
        .partitions
        .iter()
        .map(|p| {
            json!({
                "partition": p.partition,
                "first_offset": p.first_offset,
                "next_offset": p.next_offset,
                "records": p.next_offset - p.first_offset,
                "size_bytes": p.size_bytes,
                "segments": p.segments,
                "held_bytes": p.held_bytes,
                "held_by": p.held_by,
                "leader": p.leader,
                "replicas": p.replicas,
            })
        })
        .collect();
    let groups: Vec<String> = a
        .broker
        .list_groups()?
        .into_iter()
        .filter(|(g, topics)| topics.contains(&name) && a.may_describe(Resource::Group(g)))
        .map(|(g, _)| g)
        .collect();
    let settings = a.broker.topic_settings_json(&name).unwrap_or(Value::Null);
    Ok(Json(json!({
        "name": d.name,
        "settings": settings,
        "partitions": partitions,
        "groups": groups,
        "ids": d.ids.map(|s| json!({
            "duplicates": s.duplicates,
            "in_memory": s.in_memory,
            "on_disk": s.on_disk,
        })),
    })))
}

pub(super) async fn dead_letters(
    a: Admitted,
    Path(name): Path<String>,
    Query(query): Query<HashMap<String, String>>,
) -> Result<Json<Value>, Refusal> {
    a.require(Resource::Topic(&name)).await?;
    // Dead letters show records' keys and headers: reading them is consuming the DLQ.
    let dlq = crate::broker::groups::dlq_topic(&name);
    a.require_to(Action::Consume, Resource::Topic(&dlq)).await?;
    let limit = match query.get("limit") {
        None => 20,
        Some(l) => l
            .parse::<usize>()
            .ok()
            .filter(|n| (1..=MAX_DEAD_LETTERS).contains(n))
            .ok_or_else(|| {
                Refusal::Failed(
                    StatusCode::BAD_REQUEST,
                    format!("limit must be between 1 and {MAX_DEAD_LETTERS}"),
                )
            })?,
    };
    // Only one group's dead letters (`?group=G`): filtered here, not in the browser, so that
    // another group's newer ones do not hide them.
    let group = query.get("group").cloned().filter(|g| !g.is_empty());
    if let Some(g) = &group {
        a.require(Resource::Group(g)).await?;
    }
    // A topic without dead letters has no `.dlq` topic yet: an empty list.
    a.broker.existing_topic(&name)?;
    let records = match a.broker.existing_topic(&dlq) {
        Ok(_) => {
            let wanted = group.clone();
            a.broker
                .newest_records(&dlq, limit, move |r| match &wanted {
                    None => true,
                    Some(g) => r
                        .headers
                        .iter()
                        .any(|h| h.key == DLQ_GROUP && h.value.as_ref() == g.as_bytes()),
                })
                .await?
        }
        Err(_) => Vec::new(),
    };
    let list: Vec<Value> = records
        .iter()
        .map(|(partition, r)| {
            let headers: Vec<Value> = r
                .headers
                .iter()
                .map(|h| json!({"key": h.key, "value": String::from_utf8_lossy(&h.value)}))
                .collect();
            json!({
                "partition": partition,
                "offset": r.offset,
                "timestamp_ms": r.timestamp,
                "key": r.key.as_ref().map(|k| String::from_utf8_lossy(k)),
                "value_bytes": r.value.as_ref().map_or(0, |v| v.len()),
                "headers": headers,
            })
        })
        .collect();
    Ok(Json(json!({ "topic": dlq, "dead_letters": list })))
}

pub(super) async fn groups(a: Admitted) -> Result<Json<Value>, Refusal> {
    let list: Vec<Value> = a
        .broker
        .list_groups()?
        .into_iter()
        .filter(|(g, _)| a.may_describe(Resource::Group(g)))
        .map(|(g, topics)| json!({ "group": g, "topics": topics }))
        .collect();
    Ok(Json(json!({ "groups": list })))
}

pub(super) async fn group(a: Admitted, Path(name): Path<String>) -> Result<Json<Value>, Refusal> {
    a.require(Resource::Group(&name)).await?;
    let described = a.broker.describe_group(&name).await?;
    let topics: Vec<Value> = described
        .iter()
        .filter(|d| a.may_describe(Resource::Topic(&d.topic)))
        .map(|d| {
            let members: Vec<Value> = d
                .members
                .iter()
                .map(|m| {
                    json!({
                        "id": m.id,
                        "in_flight": m.in_flight,
                        "max_in_flight": m.max_in_flight,
                        "exclusive": m.exclusive,
                    })
                })
                .collect();
            let partitions: Vec<Value> = d
                .partitions
                .iter()
                .map(|p| {
                    json!({
                        "partition": p.partition,
                        "committed": p.committed,
                        "end": p.end,
                        "lag": p.lag,
                        "in_flight": p.in_flight,
                        "pending": p.pending,
                        "redeliveries": p.redeliveries,
                        "ack_timeouts": p.ack_timeouts,
                        "dead_lettered": p.dead_lettered,
                        "owner": p.owner,
                        "blocked": p.blocked,
                    })
                })
                .collect();
            json!({
                "topic": d.topic,
                "lag": d.partitions.iter().map(|p| p.lag).sum::<u64>(),
                "dead_lettered": d.partitions.iter().map(|p| p.dead_lettered).sum::<u64>(),
                "members": members,
                "partitions": partitions,
            })
        })
        .collect();
    Ok(Json(json!({ "group": name, "topics": topics })))
}
