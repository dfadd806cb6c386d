//! The client subcommands: produce, consume, topics.

use std::io::Write;
use std::time::Duration;

use base64::Engine;
use bytes::Bytes;
use tokio::io::AsyncBufReadExt;
use tokio::sync::mpsc;
use tonic::Status;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use crate::proto::v1 as pb;
use crate::proto::v1::admin_client::AdminClient;
use crate::proto::v1::broker_client::BrokerClient;

use super::{
    BrokerArg, CliError, ConsumeArgs, Credentials, GroupsCommand, InputFormat, OutputFormat,
    ProduceArgs, TopicsCommand, lines,
};

/// Most lines sent in one request by `produce`.
const PRODUCE_BATCH: usize = 1000;
/// Largest response a client accepts.
const MAX_RESPONSE: usize = 64 << 20;

/// A connection to a broker that sends the caller's bearer token with every call.
pub type Link = InterceptedService<Channel, Bearer>;

/// Adds `authorization: Bearer <token>` to every call, when there is a token.
#[derive(Debug, Clone)]
pub struct Bearer(Option<MetadataValue<Ascii>>);

impl Interceptor for Bearer {
    fn call(&mut self, mut request: tonic::Request<()>) -> Result<tonic::Request<()>, Status> {
        if let Some(v) = &self.0 {
            request.metadata_mut().insert("authorization", v.clone());
        }
        Ok(request)
    }
}

/// Connects to a broker at `broker.broker` with its credentials.
pub async fn link(broker: &BrokerArg) -> Result<Link, CliError> {
    link_with(&broker.broker, &broker.credentials).await
}

/// [`link`] to an address with credentials.
pub async fn link_with(addr: &str, credentials: &Credentials) -> Result<Link, CliError> {
    Ok(InterceptedService::new(
        channel(addr, credentials).await?,
        bearer(credentials.token.as_deref())?,
    ))
}

/// The `authorization` value for a token; an empty one (`SLUICE_TOKEN=`) is no token.
fn bearer(token: Option<&str>) -> Result<Bearer, CliError> {
    match token.map(str::trim).filter(|t| !t.is_empty()) {
        None => Ok(Bearer(None)),
        Some(t) => Ok(Bearer(Some(format!("Bearer {t}").parse().map_err(
            |_| CliError::Usage("--token holds characters a header cannot carry".into()),
        )?))),
    }
}

/// Connects to a broker (`host:port` or a URL) without credentials, over plaintext unless the
/// address is `https://`.
pub async fn connect(addr: &str) -> Result<Channel, CliError> {
    channel(addr, &Credentials::default()).await
}

/// Connects to a broker (`host:port` or a URL; `https://` or any TLS file means TLS).
pub async fn channel(addr: &str, credentials: &Credentials) -> Result<Channel, CliError> {
    let c = credentials;
    let tls = addr.starts_with("https://") || c.tls_ca.is_some() || c.tls_cert.is_some();
    let url = match addr.split_once("://") {
        Some(("http", _)) if tls => {
            return Err(CliError::Usage(format!(
                "{addr}: TLS options need an https:// address (or host:port)"
            )));
        }
        Some(_) => addr.to_string(),
        None if tls => format!("https://{addr}"),
        None => format!("http://{addr}"),
    };
    let mut endpoint = Endpoint::from_shared(url).map_err(|source| CliError::Connect {
        addr: addr.to_string(),
        source,
    })?;
    if tls {
        endpoint = endpoint
            .tls_config(client_tls(c)?)
            .map_err(|source| CliError::Connect {
                addr: addr.to_string(),
                source,
            })?;
    }
    endpoint
        .connect_timeout(Duration::from_secs(5))
        .tcp_nodelay(true)
        .initial_stream_window_size(Some(4 << 20))
        .initial_connection_window_size(Some(8 << 20))
        // A subscription's responses are up to `delivery_batch_bytes` (256 KiB): one frame each.
        .max_frame_size(1 << 20)
        .connect()
        .await
        .map_err(|source| CliError::Connect {
            addr: addr.to_string(),
            source,
        })
}

fn client_tls(c: &Credentials) -> Result<ClientTlsConfig, CliError> {
    let read = |p: &std::path::Path| {
        std::fs::read(p).map_err(|e| CliError::Usage(format!("cannot read {}: {e}", p.display())))
    };
    let mut tls = ClientTlsConfig::new();
    tls = match &c.tls_ca {
        Some(ca) => tls.ca_certificate(Certificate::from_pem(read(ca)?)),
        None => tls.with_native_roots(),
    };
    if let (Some(cert), Some(key)) = (&c.tls_cert, &c.tls_key) {
        tls = tls.identity(Identity::from_pem(read(cert)?, read(key)?));
    }
    if let Some(d) = &c.tls_domain {
        tls = tls.domain_name(d.clone());
    }
    Ok(tls)
}

pub fn broker_client(channel: Link) -> BrokerClient<Link> {
    BrokerClient::new(channel)
        .max_decoding_message_size(MAX_RESPONSE)
        .max_encoding_message_size(MAX_RESPONSE)
}

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

/// A time as milliseconds since the epoch: RFC 3339 with any offset
/// (`2026-11-28T10:00:00+01:00`, `…Z`; a space for the `T` and no offset, meaning UTC, are
/// accepted too), or a time ago (`-15m`, `-2h`, `-1d`, `-90s`).
pub fn parse_time_ms(s: &str) -> Result<i64, String> {
    let since_epoch = |t: std::time::SystemTime| {
        t.duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i64)
    };
    if let Some(ago) = s.strip_prefix('-') {
        let d = humantime::parse_duration(ago).map_err(|e| e.to_string())?;
        return Ok(since_epoch(std::time::SystemTime::now()) - d.as_millis() as i64);
    }
    use time::format_description::well_known::Rfc3339;
    match time::OffsetDateTime::parse(s, &Rfc3339) {
        Ok(t) => Ok((t.unix_timestamp_nanos() / 1_000_000) as i64),
        Err(strict) => humantime::parse_rfc3339_weak(s)
            .map(since_epoch)
            .map_err(|_| strict.to_string()),
    }
}

/// `--from`: earliest, latest, an offset, an RFC 3339 time or a time ago.
pub fn parse_start(from: &str) -> Result<pb::StartPosition, CliError> {
    use pb::start_position::Kind;
    let kind = match from {
        "earliest" => Kind::Earliest(true),
        "latest" => Kind::Latest(true),
        s if s.bytes().all(|b| b.is_ascii_digit()) => Kind::Offset(
            s.parse()
                .map_err(|e| CliError::Usage(format!("bad offset {s:?}: {e}")))?,
        ),
        s => Kind::TimestampMs(parse_time_ms(s).map_err(|e| {
            CliError::Usage(format!(
                "--from {s:?} is not earliest, latest, an offset, an RFC 3339 time or a time \
                 ago like -15m: {e}"
            ))
        })?),
    };
    Ok(pb::StartPosition { kind: Some(kind) })
}

fn text_or_base64(b: &[u8]) -> (&'static str, serde_json::Value) {
    match std::str::from_utf8(b) {
        Ok(s) => ("", serde_json::Value::String(s.to_string())),
        Err(_) => (
            "_base64",
            serde_json::Value::String(base64::engine::general_purpose::STANDARD.encode(b)),
        ),
    }
}

/// One delivery as a JSON object: text fields as text, other bytes as `<field>_base64`.
pub fn delivery_json(d: &pb::Delivery) -> serde_json::Value {
    let mut o = serde_json::Map::new();
    o.insert("topic".into(), d.topic.clone().into());
    o.insert("partition".into(), d.partition.into());
    o.insert("offset".into(), d.offset.into());
    o.insert("timestamp_ms".into(), d.timestamp_ms.into());
    let time = std::time::UNIX_EPOCH + Duration::from_millis(d.timestamp_ms.max(0) as u64);
    o.insert(
        "time".into(),
        humantime::format_rfc3339_millis(time).to_string().into(),
    );
    for (name, field) in [("key", &d.key), ("value", &d.value)] {
        match field {
            None => {
                o.insert(name.into(), serde_json::Value::Null);
            }
            Some(b) => {
                let (suffix, v) = text_or_base64(b);
                o.insert(format!("{name}{suffix}"), v);
            }
        }
    }
    let headers: serde_json::Map<String, serde_json::Value> = d
        .headers
        .iter()
        .map(|h| {
            let (_, v) = text_or_base64(&h.value);
            (h.key.clone(), v)
        })
        .collect();
    o.insert("headers".into(), headers.into());
    if let Some(id) = &d.id {
        let (suffix, v) = text_or_base64(id);
        o.insert(format!("id{suffix}"), v);
    }
    if !d.ack_id.is_empty() {
        o.insert("attempt".into(), d.attempt.into());
    }
    serde_json::Value::Object(o)
}

pub async fn consume(args: ConsumeArgs) -> Result<(), CliError> {
    let start = parse_start(&args.from)?;
    if args.count == Some(0) {
        return Ok(());
    }
    let mut client = broker_client(link(&args.broker).await?);
    let group = args.group.clone().unwrap_or_default();
    let mut stream = client
        .subscribe(pb::SubscribeRequest {
            topic: args.topic.clone(),
            partitions: args.partition.clone(),
            start: Some(start),
            group: group.clone(),
            max_in_flight: args.max_in_flight,
            exclusive: false,
            // With a group, the broker assigns this member no more than it will print, so it
            // acks all it printed and then leaves, with nothing more counted against it.
            limit: args.count.unwrap_or(0),
        })
        .await?
        .into_inner();
    let mut printed = 0u64;
    let mut stdout = std::io::stdout().lock();
    while let Some(response) = stream.message().await? {
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
        // Printed (and flushed): acknowledged.
        let ack = (!group.is_empty() && !printed_ids.is_empty()).then(|| pb::AckRequest {
            group: group.clone(),
            topic: args.topic.clone(),
            ack_ids: printed_ids,
        });
        if let Some(ack) = ack {
            client.ack(ack).await?;
        }
        if args.count.is_some_and(|c| printed >= c) {
            // Leaves the group (the stream dropped) only now, with nothing in flight.
            return Ok(());
        }
    }
    Ok(())
}

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
         dedup_window_ms={}\n",
        d.name,
        s.partitions,
        cleanup_name(s.cleanup_policy),
        opt(s.retention_ms),
        opt(s.retention_bytes),
        s.segment_bytes
            .map_or_else(|| "default".to_string(), |v| v.to_string()),
        s.dedup_window_ms.unwrap_or(0),
    );
    out += "  partition\tfirst\tnext\tbytes\tsegments\theld_back\theld_by\n";
    for p in &d.partitions {
        out += &format!(
            "  {}\t{}\t{}\t{}\t{}\t{}\t{}\n",
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
    fn an_empty_token_sends_no_authorization_and_a_real_one_is_sent_as_bearer() {
        for none in [None, Some(""), Some("  ")] {
            assert!(bearer(none).unwrap().0.is_none(), "{none:?}");
        }
        let b = bearer(Some(" abc ")).unwrap().0.unwrap();
        assert_eq!(b.to_str().unwrap(), "Bearer abc");
        assert!(bearer(Some("a\nb")).is_err());
    }

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

    #[test]
    fn times_take_any_rfc3339_offset_and_relative_forms() {
        let at = |s: &str| parse_time_ms(s).unwrap();
        // 2026-11-28T09:00:00Z
        let nine_utc = 1_795_856_400_000;
        let cases = [
            ("2026-11-28T09:00:00Z", nine_utc),
            ("2026-11-28T10:00:00+01:00", nine_utc),
            ("2026-11-28T04:30:00-04:30", nine_utc),
            ("2026-11-28T09:00:00.250Z", nine_utc + 250),
            ("2026-11-28 09:00:00", nine_utc),
        ];
        for (s, want) in cases {
            assert_eq!(at(s), want, "{s}");
        }
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as i64;
        for (s, ago) in [("-15m", 900_000), ("-2h", 7_200_000), ("-1d", 86_400_000)] {
            let t = at(s);
            assert!(
                (now - ago - 5_000..=now - ago + 5_000).contains(&t),
                "{s}: {t}"
            );
        }
        for bad in ["yesterday", "-", "-5 parsecs", "2026-13-01T00:00:00Z"] {
            assert!(parse_time_ms(bad).is_err(), "{bad}");
            assert!(parse_start(bad).is_err(), "{bad}");
        }
    }
}
