//! Every gRPC request of both APIs (sluice.v1 Broker and Admin, the seed API) to a broker
//! running in this process on a loopback port (one for the whole run, so what earlier inputs
//! created — topics, groups, deliveries — shapes later ones). The first byte picks the RPC and
//! how the rest is read: below 0x80, as the request's protobuf body (raw bytes on the wire: the
//! decoder's checks); from 0x80 on, structure-aware, as `arbitrary` choices of a valid request's
//! fields, drawn from values that matter to the broker (a few topic and group names, hostile
//! ones among them, small partition numbers and offsets, the edges of each range, ack ids of
//! real and made-up positions, messages of every size up to over the limit). What must hold:
//! each call succeeds or answers a documented status (never INTERNAL, UNKNOWN or DATA_LOSS,
//! which would mean the broker failed rather than the request), and the broker keeps serving: a
//! valid Send after each input is acknowledged.
#![no_main]

use std::time::Duration;

use arbitrary::{Arbitrary, Unstructured};
use bytes::{Buf, BufMut, Bytes};
use libfuzzer_sys::fuzz_target;
use prost::Message;
use sluice::proto::v1 as pb;
use tonic::Code;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::transport::Channel;

/// (path, streams its answer)
const RPCS: &[(&str, bool)] = &[
    ("/sluice.v1.Broker/Send", false),
    ("/sluice.v1.Broker/Subscribe", true),
    ("/sluice.v1.Broker/Ack", false),
    ("/sluice.v1.Broker/Nack", false),
    ("/sluice.v1.Admin/CreateTopic", false),
    ("/sluice.v1.Admin/DeleteTopic", false),
    ("/sluice.v1.Admin/ListTopics", false),
    ("/sluice.v1.Admin/DescribeTopic", false),
    ("/sluice.v1.Admin/ListGroups", false),
    ("/sluice.v1.Admin/DescribeGroup", false),
    ("/sluice.v1.Admin/ResetGroup", false),
    ("/sluice.v1.Admin/DeleteGroup", false),
    ("/sluice.v1.Admin/Compact", false),
    ("/sluice.v1.Admin/ClusterStatus", false),
    ("/sluice.v1.Admin/TransferLeader", false),
    ("/sluice.v1.Admin/RebalanceLeaders", false),
    ("/broker.Broker/Send", false),
    ("/broker.Broker/Subscribe", true),
    ("/sluice.v1.Admin/AddNode", false),
    ("/sluice.v1.Admin/RemoveNode", false),
];

/// The answer of a call: a status code, or OK.
async fn call(channel: &Channel, path: &'static str, streams: bool, body: Bytes) -> Code {
    let mut grpc = tonic::client::Grpc::new(channel.clone());
    if grpc.ready().await.is_err() {
        return Code::Unavailable;
    }
    let path = http::uri::PathAndQuery::from_static(path);
    let request = tonic::Request::new(body);
    if !streams {
        return match grpc.unary(request, path, RawCodec).await {
            Ok(_) => Code::Ok,
            Err(s) => s.code(),
        };
    }
    match grpc.server_streaming(request, path, RawCodec).await {
        Err(s) => s.code(),
        // The first answer, if it comes at once (a subscription at the tail waits for more).
        Ok(stream) => {
            let mut stream = stream.into_inner();
            match tokio::time::timeout(Duration::from_millis(20), stream.message()).await {
                Ok(Err(s)) => s.code(),
                _ => Code::Ok,
            }
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&pick, rest)) = data.split_first() else {
        return;
    };
    let rpc = (pick & 0x7f) as usize % RPCS.len();
    let (path, streams) = RPCS[rpc];
    let body = match pick & 0x80 {
        0 => Bytes::copy_from_slice(rest),
        _ => match structured(rpc, &mut Unstructured::new(rest)) {
            Ok(body) => body,
            Err(_) => return,
        },
    };
    let h = sluice_fuzz::broker();
    h.rt.block_on(async {
        let code = call(&h.channel, path, streams, body).await;
        assert!(
            !matches!(code, Code::Internal | Code::Unknown | Code::DataLoss),
            "{path} answered {code:?}"
        );
        let canary = pb::SendRequest {
            topic: "canary".into(),
            messages: vec![pb::Message {
                value: Some(b"still serving".to_vec().into()),
                ..pb::Message::default()
            }],
        };
        let code = call(
            &h.channel,
            "/sluice.v1.Broker/Send",
            false,
            Bytes::from(canary.encode_to_vec()),
        )
        .await;
        assert_eq!(
            code,
            Code::Ok,
            "after {path}, a valid Send is not acknowledged"
        );
    });
});

/// Topic and group names: the fuzzing broker's own, a few to create, and hostile ones.
fn name(u: &mut Unstructured) -> arbitrary::Result<String> {
    const NAMES: &[&str] = &[
        "t", "canary", "g", "t.dlq", "_audit", "", "../x", "a/b", ".", "..", "t\0", "é", " t",
    ];
    Ok(match u.int_in_range(0..=9u8)? {
        0 => "x".repeat(u.int_in_range(240..=260usize)?),
        1 => String::arbitrary(u)?,
        _ => (*u.choose(NAMES)?).to_string(),
    })
}

/// A number near where ranges end: small ones mostly, the largest, or any.
fn number(u: &mut Unstructured) -> arbitrary::Result<u64> {
    Ok(match u.int_in_range(0..=7u8)? {
        0 => u64::MAX,
        1 => u64::arbitrary(u)?,
        2 => u64::from(u32::MAX) + u64::from(u.int_in_range(0..=1u8)?),
        _ => u.int_in_range(0..=12u64)?,
    })
}

fn small(u: &mut Unstructured) -> arbitrary::Result<u32> {
    Ok(match u.int_in_range(0..=7u8)? {
        0 => u32::MAX,
        1 => u32::arbitrary(u)?,
        _ => u.int_in_range(0..=4u32)?,
    })
}

/// Bytes of a key, value or id: short mostly, sometimes around the broker's message limit.
fn payload(u: &mut Unstructured) -> arbitrary::Result<Option<Bytes>> {
    Ok(match u.int_in_range(0..=15u8)? {
        0 => None,
        1 => Some(Bytes::from(vec![
            b'v';
            (1 << 20) + u.int_in_range(0..=2usize)? - 1
        ])),
        _ => Some(Bytes::from(Vec::<u8>::arbitrary(u)?)),
    })
}

fn start(u: &mut Unstructured) -> arbitrary::Result<Option<pb::StartPosition>> {
    use pb::start_position::Kind;
    let kind = match u.int_in_range(0..=5u8)? {
        0 => return Ok(None),
        1 => Kind::Earliest(bool::arbitrary(u)?),
        2 => Kind::Latest(bool::arbitrary(u)?),
        3 => Kind::Offset(number(u)?),
        4 => Kind::TimestampMs(i64::arbitrary(u)?),
        _ => Kind::TimestampMs(1_700_000_000_000 + u.int_in_range(0..=1u64 << 40)? as i64),
    };
    Ok(Some(pb::StartPosition { kind: Some(kind) }))
}

/// Ack ids: positions that may be in flight (`<partition>:<offset>`), or any text.
fn ack_ids(u: &mut Unstructured) -> arbitrary::Result<Vec<String>> {
    let n = u.int_in_range(0..=4usize)?;
    (0..n)
        .map(|_| {
            Ok(match u.int_in_range(0..=3u8)? {
                0 => String::arbitrary(u)?,
                _ => format!("{}:{}", small(u)?, number(u)?),
            })
        })
        .collect()
}

/// A list of partitions to choose (empty: all of them).
fn partitions(u: &mut Unstructured) -> arbitrary::Result<Vec<u32>> {
    (0..u.int_in_range(0..=3usize)?).map(|_| small(u)).collect()
}

/// A group name, or none (a plain subscription).
fn name_or_none(u: &mut Unstructured) -> arbitrary::Result<String> {
    match bool::arbitrary(u)? {
        true => name(u),
        false => Ok(String::new()),
    }
}

fn optional(u: &mut Unstructured) -> arbitrary::Result<Option<u64>> {
    Ok(match bool::arbitrary(u)? {
        true => Some(number(u)?),
        false => None,
    })
}

/// A valid request of RPC `rpc` (an index of [`RPCS`]), its fields chosen by `u`.
fn structured(rpc: usize, u: &mut Unstructured) -> arbitrary::Result<Bytes> {
    use sluice::proto::seed;
    let body = match RPCS[rpc].0 {
        "/sluice.v1.Broker/Send" => {
            let n = u.int_in_range(0..=5usize)?;
            let messages = (0..n)
                .map(|_| {
                    let headers = (0..u.int_in_range(0..=2usize)?)
                        .map(|_| {
                            Ok(pb::Header {
                                key: String::arbitrary(u)?,
                                value: Bytes::from(Vec::<u8>::arbitrary(u)?),
                            })
                        })
                        .collect::<arbitrary::Result<_>>()?;
                    Ok(pb::Message {
                        key: payload(u)?,
                        value: payload(u)?,
                        headers,
                        partition: match bool::arbitrary(u)? {
                            true => Some(small(u)?),
                            false => None,
                        },
                        id: payload(u)?,
                    })
                })
                .collect::<arbitrary::Result<_>>()?;
            pb::SendRequest {
                topic: name(u)?,
                messages,
            }
            .encode_to_vec()
        }
        "/sluice.v1.Broker/Subscribe" => pb::SubscribeRequest {
            topic: name(u)?,
            partitions: partitions(u)?,
            start: start(u)?,
            group: name_or_none(u)?,
            max_in_flight: small(u)?,
            exclusive: bool::arbitrary(u)?,
            limit: number(u)?,
        }
        .encode_to_vec(),
        "/sluice.v1.Broker/Ack" => pb::AckRequest {
            group: name(u)?,
            topic: name(u)?,
            ack_ids: ack_ids(u)?,
        }
        .encode_to_vec(),
        "/sluice.v1.Broker/Nack" => pb::NackRequest {
            group: name(u)?,
            topic: name(u)?,
            ack_ids: ack_ids(u)?,
            delay_ms: number(u)?,
        }
        .encode_to_vec(),
        "/sluice.v1.Admin/CreateTopic" => pb::CreateTopicRequest {
            name: name(u)?,
            settings: match bool::arbitrary(u)? {
                false => None,
                true => Some(pb::TopicSettings {
                    partitions: small(u)?,
                    retention_ms: optional(u)?,
                    retention_bytes: optional(u)?,
                    cleanup_policy: i32::from(u.int_in_range(0..=2u8)?),
                    segment_bytes: optional(u)?,
                    dedup_window_ms: optional(u)?,
                    replication_factor: match bool::arbitrary(u)? {
                        true => Some(small(u)?),
                        false => None,
                    },
                }),
            },
        }
        .encode_to_vec(),
        "/sluice.v1.Admin/DeleteTopic" => pb::DeleteTopicRequest { name: name(u)? }.encode_to_vec(),
        "/sluice.v1.Admin/DescribeTopic" => {
            pb::DescribeTopicRequest { name: name(u)? }.encode_to_vec()
        }
        "/sluice.v1.Admin/DescribeGroup" => {
            pb::DescribeGroupRequest { group: name(u)? }.encode_to_vec()
        }
        "/sluice.v1.Admin/ResetGroup" => pb::ResetGroupRequest {
            group: name(u)?,
            topic: name(u)?,
            to: start(u)?,
            force: bool::arbitrary(u)?,
            partitions: partitions(u)?,
        }
        .encode_to_vec(),
        "/sluice.v1.Admin/DeleteGroup" => {
            pb::DeleteGroupRequest { group: name(u)? }.encode_to_vec()
        }
        "/sluice.v1.Admin/Compact" => pb::CompactRequest {
            topic: name(u)?,
            dry_run: bool::arbitrary(u)?,
        }
        .encode_to_vec(),
        "/sluice.v1.Admin/TransferLeader" => pb::TransferLeaderRequest {
            topic: name(u)?,
            partition: small(u)?,
            to: number(u)?,
        }
        .encode_to_vec(),
        "/sluice.v1.Admin/RebalanceLeaders" => pb::RebalanceLeadersRequest {
            dry_run: bool::arbitrary(u)?,
        }
        .encode_to_vec(),
        "/sluice.v1.Admin/AddNode" => pb::AddNodeRequest {
            node_id: number(u)?,
            address: match u.int_in_range(0..=2u8)? {
                0 => String::arbitrary(u)?,
                _ => format!("127.0.0.1:{}", u.int_in_range(0..=2u16)?),
            },
        }
        .encode_to_vec(),
        "/sluice.v1.Admin/RemoveNode" => pb::RemoveNodeRequest {
            node_id: number(u)?,
        }
        .encode_to_vec(),
        "/broker.Broker/Send" => seed::SendRequest {
            msg: match bool::arbitrary(u)? {
                false => None,
                true => Some(seed::Message {
                    topic: name(u)?,
                    payload: payload(u)?.unwrap_or_default(),
                }),
            },
        }
        .encode_to_vec(),
        "/broker.Broker/Subscribe" => seed::SubscribeRequest {
            topic: name(u)?,
            consumer_group: name_or_none(u)?,
        }
        .encode_to_vec(),
        // ListTopics, ListGroups, ClusterStatus: requests without fields.
        _ => Vec::new(),
    };
    Ok(Bytes::from(body))
}

struct RawCodec;
struct RawEncoder;
struct RawDecoder;

impl Encoder for RawEncoder {
    type Item = Bytes;
    type Error = tonic::Status;
    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), tonic::Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for RawDecoder {
    type Item = Bytes;
    type Error = tonic::Status;
    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Bytes>, tonic::Status> {
        Ok(Some(src.copy_to_bytes(src.remaining())))
    }
}

impl Codec for RawCodec {
    type Encode = Bytes;
    type Decode = Bytes;
    type Encoder = RawEncoder;
    type Decoder = RawDecoder;
    fn encoder(&mut self) -> RawEncoder {
        RawEncoder
    }
    fn decoder(&mut self) -> RawDecoder {
        RawDecoder
    }
}
