//! `sluice produce`: each line of standard input (or all of it, raw) as a message, sent in
//! batches of up to 1,000 while the next lines are read.

use std::io::Write;

use bytes::Bytes;
use tokio::io::AsyncBufReadExt;
use tokio::sync::mpsc;

use crate::proto::v1 as pb;
use crate::proto::v1::broker_client::BrokerClient;

use super::args::{InputFormat, ProduceArgs};
use super::connection::{Link, broker_client, link};
use super::error::CliError;
use super::lines;

/// Most lines sent in one request by `produce`.
const PRODUCE_BATCH: usize = 1000;

pub async fn produce(args: ProduceArgs) -> Result<(), CliError> {
    let mut client = broker_client(link(&args.broker).await?);
    let headers = args
        .headers
        .iter()
        .map(|h| lines::parse_header(h))
        .collect::<Result<Vec<_>, _>>()?;
    if args.format == InputFormat::Raw {
        let mut value = Vec::new();
        tokio::io::AsyncReadExt::read_to_end(&mut tokio::io::stdin(), &mut value).await?;
        let mut message = pb::Message {
            key: args.key.clone().map(Bytes::from),
            value: Some(Bytes::from(value)),
            headers,
            partition: args.partition,
            id: args.id.clone().map(Bytes::from),
        };
        if args.id_from_key {
            message.id = message.key.clone();
        }
        return send_lines(&mut client, &args, vec![message]).await;
    }
    // Lines are read on their own task so that a burst on stdin becomes one request, while a line
    // typed by hand is sent at once.
    let (tx, mut rx) = mpsc::channel::<std::io::Result<String>>(PRODUCE_BATCH);
    tokio::spawn(async move {
        let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
        loop {
            match lines.next_line().await {
                Ok(Some(line)) => {
                    if tx.send(Ok(line)).await.is_err() {
                        return;
                    }
                }
                Ok(None) => return,
                Err(e) => {
                    let _ = tx.send(Err(e)).await;
                    return;
                }
            }
        }
    });
    let key = args.key.clone().map(Bytes::from);
    if args.id.is_some() {
        // One id names one message: all of the input is read before anything is sent.
        let mut lines = Vec::new();
        while let Some(line) = rx.recv().await {
            lines.push(line?);
        }
        if lines.len() != 1 {
            return Err(CliError::Usage(format!(
                "--id names one message and the input has {} lines; nothing was sent (for many, \
                 use --id-from-key or ids in --format json)",
                lines.len()
            )));
        }
        let mut m = line_message(lines.remove(0), &args, &key, &headers)?;
        m.id = args.id.clone().map(Bytes::from);
        return send_lines(&mut client, &args, vec![m]).await;
    }
    while let Some(first) = rx.recv().await {
        let mut batch = vec![first?];
        while batch.len() < PRODUCE_BATCH {
            match rx.try_recv() {
                Ok(line) => batch.push(line?),
                Err(_) => break,
            }
        }
        let mut messages = Vec::with_capacity(batch.len());
        for line in batch {
            let m = line_message(line, &args, &key, &headers)?;
            messages.push(m);
        }
        send_lines(&mut client, &args, messages).await?;
    }
    Ok(())
}

/// A line of input as a message, with the command's key, headers, partition and
/// `--id-from-key`.
fn line_message(
    line: String,
    args: &ProduceArgs,
    key: &Option<Bytes>,
    headers: &[pb::Header],
) -> Result<pb::Message, CliError> {
    let mut m = match args.format {
        InputFormat::Json => lines::json_message(&line)?,
        _ => lines::text_message(line, args.key_separator.as_deref()),
    };
    if m.key.is_none() {
        m.key = key.clone();
    }
    m.headers.extend(headers.iter().cloned());
    if args.partition.is_some() {
        m.partition = args.partition;
    }
    if args.id_from_key {
        m.id = m.key.clone();
    }
    Ok(m)
}

async fn send_lines(
    client: &mut BrokerClient<Link>,
    args: &ProduceArgs,
    messages: Vec<pb::Message>,
) -> Result<(), CliError> {
    let response = client
        .send(pb::SendRequest {
            topic: args.topic.clone(),
            messages,
        })
        .await?
        .into_inner();
    if args.verbose {
        let mut stdout = std::io::stdout().lock();
        for p in response.positions {
            let note = match (p.duplicate, p.removed) {
                (false, _) => "",
                (true, false) => " duplicate",
                (true, true) => " duplicate (the original is no longer held)",
            };
            writeln!(
                stdout,
                "partition {} offset {}{note}",
                p.partition, p.offset
            )?;
        }
    }
    Ok(())
}
