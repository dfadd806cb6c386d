//! `sluice consume`: a topic's messages from any position, as text or JSON lines, alone or as
//! a consumer-group member that acks what it printed.

use std::io::Write;

use crate::proto::v1 as pb;

use super::args::{ConsumeArgs, OutputFormat};
use super::connection::{broker_client, link};
use super::error::CliError;
use super::lines::{self, delivery_json};
use super::subscription::{self, Subscription};
use super::time::parse_start;

pub async fn consume(args: ConsumeArgs) -> Result<(), CliError> {
    let start = parse_start(&args.from)?;
    if args.count == Some(0) {
        return Ok(());
    }
    let mut client = broker_client(link(&args.broker).await?);
    let group = args.group.clone().unwrap_or_default();
    let mut printed = 0u64;
    let mut stdout = std::io::stdout().lock();
    // A group member subscribes again when its group moves (a plain subscription's stream
    // ending is the end).
    let mut subscription = Subscription::new(
        client.clone(),
        pb::SubscribeRequest {
            topic: args.topic.clone(),
            partitions: args.partition.clone(),
            start: Some(start),
            group: group.clone(),
            max_in_flight: args.max_in_flight,
            exclusive: false,
            // With a group, the broker assigns this member no more than it will print, so it
            // acks all it printed and then leaves, with nothing more counted against it.
            limit: args.count.unwrap_or(0),
        },
    );
    while let Some(response) = subscription.next().await? {
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
        // A subscription after this one asks for what is left to print.
        if let Some(count) = args.count {
            subscription.request_mut().limit = count - printed;
        }
        // Printed (and flushed): acknowledged.
        if !group.is_empty() && !printed_ids.is_empty() {
            let ack = pb::AckRequest {
                group: group.clone(),
                topic: args.topic.clone(),
                ack_ids: printed_ids,
            };
            subscription::ack(&mut client, ack).await?;
        }
        if args.count.is_some_and(|c| printed >= c) {
            // Leaves the group (the stream dropped) only now, with nothing in flight.
            return Ok(());
        }
    }
    Ok(())
}
