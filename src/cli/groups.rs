//! `sluice groups`: list, describe, reset and delete consumer groups.

use std::io::Write;

use crate::proto::v1 as pb;
use crate::proto::v1::admin_client::AdminClient;

use super::args::GroupsCommand;
use super::connection::link;
use super::error::CliError;
use super::time::parse_start;

pub async fn groups(cmd: GroupsCommand) -> Result<(), CliError> {
    let mut stdout = std::io::stdout().lock();
    match cmd {
        GroupsCommand::List { broker } => {
            let mut client = AdminClient::new(link(&broker).await?);
            let list = client
                .list_groups(pb::ListGroupsRequest {})
                .await?
                .into_inner();
            for g in list.groups {
                writeln!(stdout, "{}\ttopics={}", g.name, g.topics.join(","))?;
            }
        }
        GroupsCommand::Describe { broker, group } => {
            let mut client = AdminClient::new(link(&broker).await?);
            let d = client
                .describe_group(pb::DescribeGroupRequest { group })
                .await?
                .into_inner();
            writeln!(stdout, "group {}", d.group)?;
            for t in d.topics {
                writeln!(stdout, "  topic {}: {} members", t.topic, t.members.len())?;
                for m in t.members {
                    writeln!(
                        stdout,
                        "    member {}\tin_flight={}/{}\t{}",
                        m.id,
                        m.in_flight,
                        m.max_in_flight,
                        if m.exclusive { "exclusive" } else { "shared" }
                    )?;
                }
                writeln!(
                    stdout,
                    "    partition\tcommitted\tend\tlag\tin_flight\tpending\tredelivered\tdead_lettered"
                )?;
                for p in t.partitions {
                    writeln!(
                        stdout,
                        "    {}\t{}\t{}\t{}\t{}\t{}\t{}\t{}",
                        p.partition,
                        p.committed_offset,
                        p.end_offset,
                        p.lag,
                        p.in_flight,
                        p.pending,
                        p.redeliveries,
                        p.dead_lettered
                    )?;
                    if !p.blocked.is_empty() {
                        writeln!(stdout, "    {}\tBLOCKED: {}", p.partition, p.blocked)?;
                    }
                }
            }
        }
        GroupsCommand::Reset {
            broker,
            group,
            topic,
            to,
            partition,
            force,
        } => {
            let to = parse_start(&to)?;
            let mut client = AdminClient::new(link(&broker).await?);
            client
                .reset_group(pb::ResetGroupRequest {
                    group: group.clone(),
                    topic: topic.clone(),
                    to: Some(to),
                    force,
                    partitions: partition,
                })
                .await?;
            writeln!(stdout, "reset group {group} on {topic}")?;
        }
        GroupsCommand::Delete { broker, group } => {
            let mut client = AdminClient::new(link(&broker).await?);
            client
                .delete_group(pb::DeleteGroupRequest {
                    group: group.clone(),
                })
                .await?;
            writeln!(stdout, "deleted group {group}")?;
        }
    }
    Ok(())
}
