//! A subscription kept the way a consumer-group member must keep it, for every client here
//! (`sluice consume --group`, `sluice-bench consume`): a member's stream that ends
//! `UNAVAILABLE` (its group's leader changed, or on a cluster the group moved to the node most of
//! its members are connected to) is subscribed again, and an ack refused `UNAVAILABLE` is sent
//! again (the group's new leader knows the delivery).

use std::time::Duration;

use tonic::{Code, Status, Streaming};

use crate::proto::v1 as pb;
use crate::proto::v1::broker_client::BrokerClient;

use super::connection::Link;

/// How many times in a row a member subscribes again (or sends an ack again) without getting
/// anywhere before it gives up, and how long it waits before each new try.
pub const RETRIES: u32 = 50;
pub const RETRY: Duration = Duration::from_millis(200);

/// A subscription's responses, across the member's subscriptions.
#[derive(Debug)]
pub struct Subscription {
    client: BrokerClient<Link>,
    request: pb::SubscribeRequest,
    stream: Option<Streaming<pb::SubscribeResponse>>,
    /// Tries in a row that got no response.
    failed: u32,
    resubscribed: u32,
}

impl Subscription {
    /// Subscribes with `request` when first asked for a response.
    pub fn new(client: BrokerClient<Link>, request: pb::SubscribeRequest) -> Subscription {
        Subscription {
            client,
            request,
            stream: None,
            failed: 0,
            resubscribed: 0,
        }
    }

    /// The request every new subscription sends (a member that takes a number of messages
    /// lowers its `limit` as it goes).
    pub fn request_mut(&mut self) -> &mut pb::SubscribeRequest {
        &mut self.request
    }

    /// How many times a group member subscribed again.
    pub fn resubscribed(&self) -> u32 {
        self.resubscribed
    }

    /// The next response, or `None` once the stream ended. A group member whose stream ends
    /// `UNAVAILABLE` subscribes again at once, and one refused `UNAVAILABLE` again after
    /// [`RETRY`]; after [`RETRIES`] such tries in a row without a response, or on any other
    /// error, the error is the answer.
    pub async fn next(&mut self) -> Result<Option<pb::SubscribeResponse>, Status> {
        loop {
            let mut stream = match self.stream.take() {
                Some(stream) => stream,
                None => match self.client.subscribe(self.request.clone()).await {
                    Ok(stream) => stream.into_inner(),
                    Err(status) => {
                        self.again(status)?;
                        tokio::time::sleep(RETRY).await;
                        continue;
                    }
                },
            };
            match stream.message().await {
                Ok(Some(response)) => {
                    self.failed = 0;
                    self.stream = Some(stream);
                    return Ok(Some(response));
                }
                Ok(None) => return Ok(None),
                Err(status) => self.again(status)?,
            }
        }
    }

    /// Whether to subscribe again after `status`: only a group member, only on `UNAVAILABLE`,
    /// only [`RETRIES`] times in a row.
    fn again(&mut self, status: Status) -> Result<(), Status> {
        self.failed += 1;
        if self.request.group.is_empty() || !retried(&status, self.failed) {
            return Err(status);
        }
        self.resubscribed += 1;
        Ok(())
    }
}

/// Whether a call refused with `status` is tried again, as the `tries`-th try in a row.
fn retried(status: &Status, tries: u32) -> bool {
    status.code() == Code::Unavailable && tries <= RETRIES
}

/// Sends a group member's ack, again after [`RETRY`] while it is refused `UNAVAILABLE` (up to
/// [`RETRIES`] times).
pub async fn ack(
    client: &mut BrokerClient<Link>,
    request: pb::AckRequest,
) -> Result<pb::AckResponse, Status> {
    let mut tries = 0;
    loop {
        match client.ack(request.clone()).await {
            Ok(response) => return Ok(response.into_inner()),
            Err(status) => {
                tries += 1;
                if !retried(&status, tries) {
                    return Err(status);
                }
                tokio::time::sleep(RETRY).await;
            }
        }
    }
}
