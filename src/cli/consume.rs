//! `sluice consume`: a topic's messages from any position, as text or JSON lines, alone or as
//! a consumer-group member that acks what it printed.

use std::io::Write;
use std::time::Duration;

use crate::proto::v1 as pb;

use super::args::{ConsumeArgs, OutputFormat};
use super::connection::{broker_client, link};
use super::error::CliError;
use super::lines::{self, delivery_json};
use super::time::parse_start;

/// How often a group member subscribes again (or retries an ack) in a row without getting
/// anywhere, and how long it waits between tries.
const RETRIES: u32 = 50;
const RETRY: Duration = Duration::from_millis(200);

pub async fn consume(args: ConsumeArgs) -> Result<(), CliError> {
    let start = parse_start(&args.from)?;
    if args.count == Some(0) {
        return Ok(());
    }
    let mut client = broker_client(link(&args.broker).await?);
    let group = args.group.clone().unwrap_or_default();
    let mut printed = 0u64;
    let mut stdout = std::io::stdout().lock();
    let mut failed = 0;
    // A group member's stream ends UNAVAILABLE when its group's leader changes, or on a cluster
    // when the group moves to the node most of its members are on: it subscribes again (a
    // plain subscription's stream ending is the end).
    let retried = |status: &tonic::Status, failed: &mut u32| {
        *failed += 1;
        !group.is_empty() && status.code() == tonic::Code::Unavailable && *failed <= RETRIES
    };
    'subscriptions: loop {
        let subscribed = client
            .subscribe(pb::SubscribeRequest {
                topic: args.topic.clone(),
                partitions: args.partition.clone(),
                start: Some(start),
                group: group.clone(),
                max_in_flight: args.max_in_flight,
                exclusive: false,
                // With a group, the broker assigns this member no more than it will print, so
                // it acks all it printed and then leaves, with nothing more counted against it.
                limit: args.count.map_or(0, |c| c - printed),
            })
            .await;
        let mut stream = match subscribed {
            Ok(s) => s.into_inner(),
            Err(s) if retried(&s, &mut failed) => {
                tokio::time::sleep(RETRY).await;
                continue;
            }
            Err(s) => return Err(s.into()),
        };
        loop {
            let response = match stream.message().await {
                Ok(Some(response)) => response,
                Ok(None) => return Ok(()),
                Err(s) if retried(&s, &mut failed) => continue 'subscriptions,
                Err(s) => return Err(s.into()),
            };
            failed = 0;
            let mut printed_ids = Vec::new();
            for d in response.deliveries {
                if args.count.is_some_and(|c| printed >= c) {
                    break;
                }
                match args.format {
                    OutputFormat::Text => {
                        stdout.write_all(&lines::text_line(
                            &d,
                            args.key_separator.as_deref(),
                            args.print_headers,
                        ))?;
                    }
                    OutputFormat::Json => {
                        writeln!(stdout, "{}", delivery_json(&d))?;
                    }
                }
                printed += 1;
                printed_ids.push(d.ack_id);
            }
            stdout.flush()?;
            // Printed (and flushed): acknowledged. An ack refused as UNAVAILABLE (the group
            // moving) is tried again: its new leader knows the delivery.
            if !group.is_empty() && !printed_ids.is_empty() {
                let ack = pb::AckRequest {
                    group: group.clone(),
                    topic: args.topic.clone(),
                    ack_ids: printed_ids,
                };
                let mut tries = 0;
                loop {
                    match client.ack(ack.clone()).await {
                        Ok(_) => break,
                        Err(s) if retried(&s, &mut tries) => tokio::time::sleep(RETRY).await,
                        Err(s) => return Err(s.into()),
                    }
                }
            }
            if args.count.is_some_and(|c| printed >= c) {
                // Leaves the group (the stream dropped) only now, with nothing in flight.
                return Ok(());
            }
        }
    }
}
