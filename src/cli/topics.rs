//! `sluice topics`: create, list, describe and delete topics.

use std::io::Write;

use crate::proto::v1 as pb;
use crate::proto::v1::admin_client::AdminClient;

use super::args::TopicsCommand;
use super::connection::link;
use super::error::CliError;

pub async fn topics(cmd: TopicsCommand) -> Result<(), CliError> {
    let mut stdout = std::io::stdout().lock();
    match cmd {
        TopicsCommand::Create {
            broker,
            name,
            partitions,
            compact,
            retention_ms,
            retention_bytes,
            segment_bytes,
            dedup_window_ms,
            replication_factor,
        } => {
            let mut client = AdminClient::new(link(&broker).await?);
            let cleanup_policy = if compact {
                pb::CleanupPolicy::Compact
            } else {
                pb::CleanupPolicy::Delete
            };
            client
                .create_topic(pb::CreateTopicRequest {
                    name: name.clone(),
                    settings: Some(pb::TopicSettings {
                        partitions: partitions.unwrap_or(0),
                        retention_ms,
                        retention_bytes,
                        cleanup_policy: cleanup_policy as i32,
                        segment_bytes,
                        dedup_window_ms,
                        replication_factor,
                    }),
                })
                .await?;
            writeln!(stdout, "created topic {name}")?;
        }
        TopicsCommand::List { broker } => {
            let mut client = AdminClient::new(link(&broker).await?);
            let list = client
                .list_topics(pb::ListTopicsRequest {})
                .await?
                .into_inner();
            for t in list.topics {
                let s = t.settings.unwrap_or_default();
                writeln!(
                    stdout,
                    "{}\tpartitions={}\tcleanup={}",
                    t.name,
                    s.partitions,
                    cleanup_name(s.cleanup_policy)
                )?;
            }
        }
        TopicsCommand::Describe { broker, name } => {
            let mut client = AdminClient::new(link(&broker).await?);
            let d = client
                .describe_topic(pb::DescribeTopicRequest { name })
                .await?
                .into_inner();
            stdout.write_all(describe_topic_text(&d).as_bytes())?;
        }
        TopicsCommand::Delete { broker, name } => {
            let mut client = AdminClient::new(link(&broker).await?);
            client
                .delete_topic(pb::DeleteTopicRequest { name: name.clone() })
                .await?;
            writeln!(stdout, "deleted topic {name}")?;
        }
    }
    Ok(())
}

/// `topics describe`: settings, then a row per partition with the bytes retention holds back for
/// a consumer group that has not acknowledged them, and that group.
fn describe_topic_text(d: &pb::DescribeTopicResponse) -> String {
    let s = d.settings.unwrap_or_default();
    let opt = |v: Option<u64>| v.map_or_else(|| "none".to_string(), |v| v.to_string());
    let mut out = format!(
        "topic {}\n  partitions={} cleanup={} retention_ms={} retention_bytes={} segment_bytes={} \
         dedup_window_ms={}",
        d.name,
        s.partitions,
        cleanup_name(s.cleanup_policy),
        opt(s.retention_ms),
        opt(s.retention_bytes),
        s.segment_bytes
            .map_or_else(|| "default".to_string(), |v| v.to_string()),
        s.dedup_window_ms.unwrap_or(0),
    );
    if let Some(factor) = s.replication_factor {
        out += &format!(" replication_factor={factor}");
    }
    out += "\n";
    let cluster = d.partitions.iter().any(|p| !p.replicas.is_empty());
    out += "  partition\tfirst\tnext\tbytes\tsegments\theld_back\theld_by";
    out += if cluster {
        "\tleader\treplicas\n"
    } else {
        "\n"
    };
    for p in &d.partitions {
        out += &format!(
            "  {}\t{}\t{}\t{}\t{}\t{}\t{}",
            p.partition,
            p.first_offset,
            p.next_offset,
            p.size_bytes,
            p.segments,
            p.retention_held_bytes,
            if p.retention_held_by.is_empty() {
                "-"
            } else {
                &p.retention_held_by
            }
        );
        if cluster {
            let replicas: Vec<String> = p.replicas.iter().map(u64::to_string).collect();
            let leader = p
                .leader
                .map_or_else(|| "none".to_string(), |l| l.to_string());
            out += &format!("\t{leader}\t{}", replicas.join(","));
        }
        out += "\n";
    }
    if let Some(i) = &d.dedup {
        out += &format!(
            "  ids: duplicates_answered={} in_memory={} on_disk={} index_files={} \
             index_disk_bytes={} index_memory_bytes={}\n",
            i.duplicates,
            i.ids_in_memory,
            i.ids_on_disk,
            i.index_files,
            i.index_disk_bytes,
            i.index_memory_bytes
        );
    }
    out
}

fn cleanup_name(policy: i32) -> &'static str {
    match pb::CleanupPolicy::try_from(policy) {
        Ok(pb::CleanupPolicy::Compact) => "compact",
        _ => "delete",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topics_describe_shows_what_retention_holds_back_and_for_which_group() {
        let d = pb::DescribeTopicResponse {
            name: "epro".into(),
            settings: Some(pb::TopicSettings {
                partitions: 2,
                retention_ms: Some(1000),
                ..pb::TopicSettings::default()
            }),
            partitions: vec![
                pb::PartitionInfo {
                    partition: 0,
                    next_offset: 10,
                    retention_held_bytes: 4096,
                    retention_held_by: "edc-import".into(),
                    ..pb::PartitionInfo::default()
                },
                pb::PartitionInfo {
                    partition: 1,
                    ..pb::PartitionInfo::default()
                },
            ],
            dedup: Some(pb::DedupInfo {
                duplicates: 3,
                ids_on_disk: 65536,
                ..pb::DedupInfo::default()
            }),
        };
        let text = describe_topic_text(&d);
        let rows: Vec<&str> = text.lines().skip(3).take(2).collect();
        assert_eq!(
            rows,
            [
                "  0\t0\t10\t0\t0\t4096\tedc-import",
                "  1\t0\t0\t0\t0\t0\t-"
            ]
        );
        assert!(
            text.contains("ids: duplicates_answered=3 in_memory=0 on_disk=65536"),
            "{text}"
        );
        assert!(text.contains("retention_ms=1000"), "{text}");
    }
}
