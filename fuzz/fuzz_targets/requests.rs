//! Every gRPC request of both APIs (sluice.v1 Broker and Admin, the seed API), as bytes on the
//! wire, to a broker running in this process on a loopback port (one for the whole run, so
//! what earlier inputs created — topics, groups, deliveries — shapes later ones). The first byte
//! picks the RPC; the rest is the request's protobuf body. What must hold: each call succeeds
//! or answers a documented status (never INTERNAL, UNKNOWN or DATA_LOSS, which would mean the
//! broker failed rather than the request), and the broker keeps serving: a valid Send after
//! each input is acknowledged.
#![no_main]

use std::time::Duration;

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
    let Some((&pick, body)) = data.split_first() else {
        return;
    };
    let (path, streams) = RPCS[pick as usize % RPCS.len()];
    let h = sluice_fuzz::broker();
    h.rt.block_on(async {
        let code = call(&h.channel, path, streams, Bytes::copy_from_slice(body)).await;
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
