//! Code generated from `proto/` at build time (see `build.rs`); never committed.

#![allow(
    clippy::all,
    clippy::pedantic,
    missing_docs,
    missing_debug_implementations
)]

/// `sluice.v1`: Broker and Admin.
pub mod v1 {
    tonic::include_proto!("sluice.v1");
}

/// `broker`: the seed design's API, served unchanged.
pub mod seed {
    tonic::include_proto!("broker");
}

/// `sluice.cluster.v1`: Raft's messages between nodes (the cluster port only).
pub mod cluster {
    tonic::include_proto!("sluice.cluster.v1");
}

/// The encoded descriptors of the client port's proto files, served by the reflection service.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/sluice_descriptor.bin"));

/// The protobuf codec of every service and client: prost's, except that a body that does not
/// decode is `INVALID_ARGUMENT` (malformed input) rather than prost's `INTERNAL`, and that a
/// message is encoded into a buffer reserved for its whole length at once (prost's encoder
/// grows it as it writes: a replication request or a read of many batches was copied again
/// at every doubling).
pub mod codec {
    use std::marker::PhantomData;

    use tonic::Status;
    use tonic::codec::{
        BufferSettings, Codec as TonicCodec, DecodeBuf, Decoder, EncodeBuf, Encoder,
    };
    use tonic_prost::{ProstCodec, ProstDecoder, ProstEncoder};

    #[derive(Debug, Clone)]
    pub struct Codec<T, U>(PhantomData<(T, U)>);

    impl<T, U> Default for Codec<T, U> {
        fn default() -> Self {
            Codec(PhantomData)
        }
    }

    impl<T, U> TonicCodec for Codec<T, U>
    where
        T: prost::Message + Send + 'static,
        U: prost::Message + Default + Send + 'static,
    {
        type Encode = T;
        type Decode = U;
        type Encoder = Reserving<T>;
        type Decoder = MalformedIsInvalid<U>;

        fn encoder(&mut self) -> Self::Encoder {
            Reserving(ProstCodec::<T, U>::default().encoder())
        }

        fn decoder(&mut self) -> Self::Decoder {
            MalformedIsInvalid(ProstCodec::<T, U>::default().decoder())
        }
    }

    #[derive(Debug)]
    pub struct Reserving<T>(ProstEncoder<T>);

    impl<T: prost::Message> Encoder for Reserving<T> {
        type Item = T;
        type Error = Status;

        fn encode(&mut self, item: T, buf: &mut EncodeBuf<'_>) -> Result<(), Status> {
            buf.reserve(item.encoded_len());
            item.encode(buf)
                .map_err(|e| Status::internal(format!("cannot encode a message: {e}")))
        }

        fn buffer_settings(&self) -> BufferSettings {
            self.0.buffer_settings()
        }
    }

    #[derive(Debug)]
    pub struct MalformedIsInvalid<U>(ProstDecoder<U>);

    impl<U: prost::Message + Default> Decoder for MalformedIsInvalid<U> {
        type Item = U;
        type Error = Status;

        fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
            self.0.decode(buf).map_err(|s| {
                Status::invalid_argument(format!("malformed request: {}", s.message()))
            })
        }

        fn buffer_settings(&self) -> BufferSettings {
            self.0.buffer_settings()
        }
    }
}
