//! Where each node's cluster port is: this node's own configuration (`cluster.peers`).
//!
//! Raft's membership names nodes by id; the address a node uses to reach another is looked up
//! here, so it is each node's own setting (a node may reach a peer through another address than
//! the others do: a NAT, a proxy, the test harness's cuttable links).

use std::collections::BTreeMap;
use std::sync::Arc;

/// Node id → cluster address, as this node reaches it.
#[derive(Debug, Clone, Default)]
pub struct Peers(Arc<BTreeMap<u64, String>>);

impl Peers {
    pub fn new(addresses: BTreeMap<u64, String>) -> Self {
        Peers(Arc::new(addresses))
    }

    /// Node `id`'s cluster address, or `fallback` (what Raft's membership says) when this node's
    /// configuration does not name it.
    pub fn addr(&self, id: u64, fallback: &str) -> String {
        self.0
            .get(&id)
            .cloned()
            .unwrap_or_else(|| fallback.to_string())
    }
}
