//! A minimal gRPC client for unary calls, straight on one HTTP/2 connection (the `h2` crate),
//! for `sluice-bench`'s load generator.
//!
//! On this project's 2-core machine the load generator shares the cores with the broker, so
//! every microsecond the client spends is taken from the broker being measured. tonic's channel
//! adds a request queue (a tower buffer and its worker task) and hyper's client layers in front
//! of the same `h2` connection; this client calls `h2` from the calling task and does nothing
//! else. It speaks the same wire protocol (length-prefixed protobuf, `grpc-status` trailers) to
//! the same, unchanged server. `sluice-bench produce --client tonic` measures with the full
//! tonic client instead.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use http::uri::Authority;
use http::{HeaderMap, HeaderValue, Method, Request, Uri, header};
use tokio::net::TcpStream;

use sluice::cli::CliError;

/// One HTTP/2 connection; clones share it (each call is its own stream).
#[derive(Clone, Debug)]
pub struct LeanChannel {
    send: h2::client::SendRequest<Bytes>,
    authority: Authority,
}

fn h2_error(e: h2::Error) -> CliError {
    CliError::Usage(format!("HTTP/2: {e}"))
}

impl LeanChannel {
    /// Connects to `host:port` (or `http://host:port`) and runs the connection on its own task.
    pub async fn connect(addr: &str) -> Result<Self, CliError> {
        let host_port = addr.trim_start_matches("http://");
        let authority: Authority = host_port
            .parse()
            .map_err(|e| CliError::Usage(format!("bad address {addr}: {e}")))?;
        let tcp = TcpStream::connect(host_port).await?;
        tcp.set_nodelay(true)?;
        let (send, connection) = h2::client::Builder::new()
            .initial_window_size(4 << 20)
            .initial_connection_window_size(8 << 20)
            .handshake::<_, Bytes>(tcp)
            .await
            .map_err(h2_error)?;
        // The connection's end is seen by the calls on it, which fail with the reason.
        tokio::spawn(async move {
            let _ = connection.await;
        });
        Ok(LeanChannel { send, authority })
    }

    /// Calls the unary method at `path` (`/package.Service/Method`) and decodes its answer.
    pub async fn unary<Q: prost::Message, A: prost::Message + Default>(
        &self,
        path: &str,
        request: &Q,
    ) -> Result<A, CliError> {
        let len = request.encoded_len();
        let mut body = BytesMut::with_capacity(5 + len);
        body.put_u8(0); // not compressed
        body.put_u32(len as u32);
        request
            .encode(&mut body)
            .map_err(|e| CliError::Usage(format!("encode: {e}")))?;
        let uri = Uri::builder()
            .scheme("http")
            .authority(self.authority.clone())
            .path_and_query(path)
            .build()
            .map_err(|e| CliError::Usage(format!("bad method path {path}: {e}")))?;
        let mut head = Request::new(());
        *head.method_mut() = Method::POST;
        *head.uri_mut() = uri;
        let headers = head.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/grpc"),
        );
        headers.insert(header::TE, HeaderValue::from_static("trailers"));

        let mut send = self.send.clone().ready().await.map_err(h2_error)?;
        let (response, mut stream) = send.send_request(head, false).map_err(h2_error)?;
        stream.send_data(body.freeze(), true).map_err(h2_error)?;
        let (parts, mut body) = response.await.map_err(h2_error)?.into_parts();
        // A failed call may answer with headers only ("trailers-only").
        check_status(&parts.headers)?;
        let mut data = BytesMut::new();
        while let Some(chunk) = body.data().await {
            let chunk = chunk.map_err(h2_error)?;
            let _ = body.flow_control().release_capacity(chunk.len());
            data.extend_from_slice(&chunk);
        }
        match body.trailers().await.map_err(h2_error)? {
            Some(trailers) => check_status(&trailers)?,
            None if !parts.headers.contains_key("grpc-status") => {
                return Err(CliError::Usage("answer without grpc-status".into()));
            }
            None => {}
        }
        if data.len() < 5 || data[0] != 0 {
            return Err(CliError::Usage(
                "answer is not one uncompressed message".into(),
            ));
        }
        let mut data = data.freeze();
        data.advance(1);
        let len = data.get_u32() as usize;
        if data.len() != len {
            return Err(CliError::Usage("answer length does not match".into()));
        }
        A::decode(data).map_err(|e| CliError::Usage(format!("decode: {e}")))
    }
}

fn check_status(headers: &HeaderMap) -> Result<(), CliError> {
    match tonic::Status::from_header_map(headers) {
        Some(status) if status.code() != tonic::Code::Ok => Err(status.into()),
        _ => Ok(()),
    }
}
