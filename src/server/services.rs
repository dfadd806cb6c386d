//! The `sluice.v1` services: request validation and translation to and from the broker.

use std::pin::Pin;
use std::sync::Arc;

use std::collections::VecDeque;

use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use crate::broker::{Broker, Delivery, NewMessage, Start};
use crate::proto::v1 as pb;
use crate::storage::topic::CleanupPolicy;
use crate::storage::{Header, TopicConfig};

use super::status::to_status;

#[derive(Debug, Clone)]
pub struct BrokerService {
    broker: Arc<Broker>,
}

impl BrokerService {
    pub fn new(broker: Arc<Broker>) -> Self {
        Self { broker }
    }
}

type DeliveryStream = Pin<Box<dyn Stream<Item = Result<pb::SubscribeResponse, Status>> + Send>>;

fn headers_from_pb(headers: Vec<pb::Header>) -> Vec<Header> {
    headers
        .into_iter()
        .map(|h| Header {
            key: h.key,
            value: h.value,
        })
        .collect()
}

fn delivery_to_pb(topic: &str, d: Delivery) -> pb::Delivery {
    pb::Delivery {
        topic: topic.to_string(),
        partition: d.partition,
        offset: d.record.offset,
        timestamp_ms: d.record.timestamp,
        key: d.record.key,
        value: d.record.value,
        headers: d
            .record
            .headers
            .into_iter()
            .map(|h| pb::Header {
                key: h.key,
                value: h.value,
            })
            .collect(),
        attempt: d.attempt,
        ack_id: d.ack_id,
    }
}

/// The start position of a subscription; absent means earliest.
pub fn start_from_pb(start: Option<pb::StartPosition>) -> Result<Start, Status> {
    use pb::start_position::Kind;
    Ok(match start.and_then(|s| s.kind) {
        None => Start::Earliest,
        Some(Kind::Earliest(true)) => Start::Earliest,
        Some(Kind::Latest(true)) => Start::Latest,
        Some(Kind::Earliest(false) | Kind::Latest(false)) => {
            return Err(Status::invalid_argument(
                "start.earliest and start.latest must be true when set",
            ));
        }
        Some(Kind::Offset(o)) => Start::Offset(o),
        Some(Kind::TimestampMs(t)) => Start::Timestamp(t),
    })
}

#[tonic::async_trait]
impl pb::broker_server::Broker for BrokerService {
    async fn send(
        &self,
        request: Request<pb::SendRequest>,
    ) -> Result<Response<pb::SendResponse>, Status> {
        let req = request.into_inner();
        let messages = req
            .messages
            .into_iter()
            .map(|m| NewMessage {
                key: m.key,
                value: m.value,
                headers: headers_from_pb(m.headers),
                partition: m.partition,
            })
            .collect();
        let positions = self
            .broker
            .send(&req.topic, messages)
            .await
            .map_err(to_status)?;
        Ok(Response::new(pb::SendResponse {
            positions: positions
                .into_iter()
                .map(|(partition, offset)| pb::Position { partition, offset })
                .collect(),
        }))
    }

    type SubscribeStream = DeliveryStream;

    async fn subscribe(
        &self,
        request: Request<pb::SubscribeRequest>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        let req = request.into_inner();
        let start = start_from_pb(req.start)?;
        let rx = self
            .broker
            .subscribe(&req.topic, req.partitions, start)
            .await
            .map_err(to_status)?;
        let stream = Responses {
            rx,
            topic: Arc::from(req.topic.as_str()),
            max_bytes: self.broker.config().delivery_batch_bytes,
            ready: VecDeque::new(),
        };
        Ok(Response::new(Box::pin(stream)))
    }
}

/// A subscription's responses: each run of messages from the broker becomes one or more
/// responses of about `max_bytes` encoded (at least one delivery each), so that no response
/// outgrows what ordinary gRPC clients accept, whatever the size of the stored batches.
struct Responses {
    rx: tokio::sync::mpsc::Receiver<crate::broker::DeliveryBatch>,
    topic: Arc<str>,
    max_bytes: usize,
    ready: VecDeque<Result<pb::SubscribeResponse, Status>>,
}

impl Responses {
    fn split(&mut self, batch: crate::broker::DeliveryBatch) {
        let deliveries = match batch {
            Ok(d) => d,
            Err(e) => return self.ready.push_back(Err(to_status(e))),
        };
        let mut current = Vec::new();
        let mut bytes = 0;
        for d in deliveries.iter() {
            let d = match d {
                Ok(d) => delivery_to_pb(&self.topic, d),
                Err(e) => {
                    self.ready.push_back(Err(to_status(e)));
                    return;
                }
            };
            let size = prost::Message::encoded_len(&d) + 8;
            if !current.is_empty() && bytes + size > self.max_bytes {
                let deliveries = std::mem::take(&mut current);
                self.ready
                    .push_back(Ok(pb::SubscribeResponse { deliveries }));
                bytes = 0;
            }
            bytes += size;
            current.push(d);
        }
        if !current.is_empty() {
            self.ready.push_back(Ok(pb::SubscribeResponse {
                deliveries: current,
            }));
        }
    }
}

impl Stream for Responses {
    type Item = Result<pb::SubscribeResponse, Status>;

    fn poll_next(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        loop {
            if let Some(r) = self.ready.pop_front() {
                return std::task::Poll::Ready(Some(r));
            }
            match self.rx.poll_recv(cx) {
                std::task::Poll::Ready(Some(batch)) => self.split(batch),
                std::task::Poll::Ready(None) => return std::task::Poll::Ready(None),
                std::task::Poll::Pending => return std::task::Poll::Pending,
            }
        }
    }
}

#[derive(Debug, Clone)]
pub struct AdminService {
    broker: Arc<Broker>,
}

impl AdminService {
    pub fn new(broker: Arc<Broker>) -> Self {
        Self { broker }
    }
}

fn settings_to_pb(c: &TopicConfig) -> pb::TopicSettings {
    pb::TopicSettings {
        partitions: c.partitions,
        retention_ms: c.retention_ms,
        retention_bytes: c.retention_bytes,
        cleanup_policy: match c.cleanup_policy {
            CleanupPolicy::Delete => pb::CleanupPolicy::Delete as i32,
            CleanupPolicy::Compact => pb::CleanupPolicy::Compact as i32,
        },
        segment_bytes: c.segment_bytes,
    }
}

fn settings_from_pb(s: Option<pb::TopicSettings>) -> Result<TopicConfig, Status> {
    let s = s.unwrap_or_default();
    let cleanup_policy = match pb::CleanupPolicy::try_from(s.cleanup_policy) {
        Ok(pb::CleanupPolicy::Delete) => CleanupPolicy::Delete,
        Ok(pb::CleanupPolicy::Compact) => CleanupPolicy::Compact,
        Err(_) => {
            return Err(Status::invalid_argument(format!(
                "unknown cleanup policy {}",
                s.cleanup_policy
            )));
        }
    };
    Ok(TopicConfig {
        partitions: s.partitions,
        retention_ms: s.retention_ms,
        retention_bytes: s.retention_bytes,
        cleanup_policy,
        segment_bytes: s.segment_bytes,
        ..TopicConfig::default()
    })
}

#[tonic::async_trait]
impl pb::admin_server::Admin for AdminService {
    async fn create_topic(
        &self,
        request: Request<pb::CreateTopicRequest>,
    ) -> Result<Response<pb::CreateTopicResponse>, Status> {
        let req = request.into_inner();
        let config = settings_from_pb(req.settings)?;
        self.broker
            .create_topic(&req.name, config)
            .await
            .map_err(to_status)?;
        Ok(Response::new(pb::CreateTopicResponse {}))
    }

    async fn delete_topic(
        &self,
        request: Request<pb::DeleteTopicRequest>,
    ) -> Result<Response<pb::DeleteTopicResponse>, Status> {
        let req = request.into_inner();
        self.broker
            .delete_topic(&req.name)
            .await
            .map_err(to_status)?;
        Ok(Response::new(pb::DeleteTopicResponse {}))
    }

    async fn list_topics(
        &self,
        _request: Request<pb::ListTopicsRequest>,
    ) -> Result<Response<pb::ListTopicsResponse>, Status> {
        let topics = self
            .broker
            .list_topics()
            .into_iter()
            .map(|(name, config)| pb::TopicInfo {
                name,
                settings: Some(settings_to_pb(&config)),
            })
            .collect();
        Ok(Response::new(pb::ListTopicsResponse { topics }))
    }

    async fn describe_topic(
        &self,
        request: Request<pb::DescribeTopicRequest>,
    ) -> Result<Response<pb::DescribeTopicResponse>, Status> {
        let req = request.into_inner();
        let d = self.broker.describe_topic(&req.name).map_err(to_status)?;
        Ok(Response::new(pb::DescribeTopicResponse {
            name: d.name,
            settings: Some(settings_to_pb(&d.config)),
            partitions: d
                .partitions
                .into_iter()
                .map(|p| pb::PartitionInfo {
                    partition: p.partition,
                    first_offset: p.first_offset,
                    next_offset: p.next_offset,
                    size_bytes: p.size_bytes,
                    segments: p.segments,
                })
                .collect(),
        }))
    }
}
