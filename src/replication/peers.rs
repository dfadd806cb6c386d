//! Where each node's cluster port is: this node's own configuration (`cluster.peers`).
//!
//! Raft's membership names nodes by id; the address a node uses to reach another is looked up
//! here, so it is each node's own setting (a node may reach a peer through another address than
//! the others do: a NAT, a proxy, the test harness's cuttable links).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use tonic::transport::{Channel, ClientTlsConfig, Endpoint};

use super::heartbeats::Heartbeats;
use crate::proto::cluster as pb;

/// How long connecting to a peer may take before the attempt counts as unreachable.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// Node id → cluster address, as this node reaches it; and how (plaintext, or mutual TLS).
/// Clones share one connection per peer address ([`Peers::channel`]).
#[derive(Debug, Clone, Default)]
pub struct Peers {
    addresses: Arc<BTreeMap<u64, String>>,
    /// The cluster's nodes as the catalog records them (nodes added since this node's
    /// configuration was written).
    learned: Arc<RwLock<BTreeMap<u64, String>>>,
    tls: Option<ClientTlsConfig>,
    channels: Arc<Mutex<HashMap<String, Channel>>>,
    heartbeats: Heartbeats,
}

impl Peers {
    pub fn new(addresses: BTreeMap<u64, String>) -> Self {
        Peers {
            addresses: Arc::new(addresses),
            learned: Arc::default(),
            tls: None,
            channels: Arc::default(),
            heartbeats: Heartbeats::default(),
        }
    }

    /// Sends a heartbeat of one group to the peer at `addr` with the other groups' heartbeats
    /// to it ([`Heartbeats`]); its sender waits at most `ttl`.
    pub async fn heartbeat(
        &self,
        addr: &str,
        request: pb::AppendEntriesRequest,
        ttl: Duration,
    ) -> Result<pb::AppendEntriesResponse, tonic::Status> {
        let channel = self.channel(addr).map_err(tonic::Status::unavailable)?;
        self.heartbeats.send(channel, addr, request, ttl).await
    }

    /// The connection to a peer's cluster address (made when first asked, lazily connecting,
    /// reconnecting by itself) that every Raft group's messages to it share: one HTTP/2
    /// connection per pair of nodes, not one per group, however many partitions there are.
    pub fn channel(&self, addr: &str) -> Result<Channel, String> {
        let mut channels = self.channels.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = channels.get(addr) {
            return Ok(c.clone());
        }
        let channel = self.endpoint(addr)?.connect_lazy();
        channels.insert(addr.to_string(), channel.clone());
        Ok(channel)
    }

    /// Reaches every peer over TLS, presenting this node's certificate.
    pub fn with_tls(mut self, tls: ClientTlsConfig) -> Self {
        self.tls = Some(tls);
        self
    }

    /// A lazily connecting endpoint for a peer's cluster address.
    pub fn endpoint(&self, addr: &str) -> Result<Endpoint, String> {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        let endpoint = Endpoint::from_shared(format!("{scheme}://{addr}"))
            .map_err(|e| format!("peer address {addr:?}: {e}"))?
            .connect_timeout(CONNECT_TIMEOUT);
        match &self.tls {
            Some(tls) => endpoint
                .tls_config(tls.clone())
                .map_err(|e| format!("TLS to {addr}: {e}")),
            None => Ok(endpoint),
        }
    }

    /// Node `id`'s cluster address: this node's configuration's, else the catalog's, else
    /// `fallback` (what Raft's membership says).
    pub fn addr(&self, id: u64, fallback: &str) -> String {
        if let Some(addr) = self.addresses.get(&id) {
            return addr.clone();
        }
        let learned = self.learned.read().unwrap_or_else(|p| p.into_inner());
        learned
            .get(&id)
            .cloned()
            .unwrap_or_else(|| fallback.to_string())
    }

    /// Nodes' cluster ports as the catalog (or the metadata log's membership) records them:
    /// each replaces what was known of that node; nodes known before stay known.
    pub fn learn(&self, nodes: &BTreeMap<u64, String>) {
        let known = self.learned.read().unwrap_or_else(|p| p.into_inner());
        if nodes.iter().all(|(id, addr)| known.get(id) == Some(addr)) {
            return;
        }
        drop(known);
        let mut learned = self.learned.write().unwrap_or_else(|p| p.into_inner());
        learned.extend(nodes.iter().map(|(&id, addr)| (id, addr.clone())));
    }
}
