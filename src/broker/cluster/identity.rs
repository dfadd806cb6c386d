//! Whose data directory this is, and whether this node may start: a data directory belongs to
//! one node of one cluster (`<data_dir>/cluster/node.json`: the node's id, the founding peers,
//! and the cluster's id once the cluster has one), and a node id is one process.
//!
//! The cluster's id is drawn once, by the first leader of the metadata group, and committed
//! there (`Command::Found`): every node learns it from the metadata log and writes it into its
//! `node.json`. At start a node asks each peer it can reach (its own address included) who it
//! is, and refuses to start when a process already answers as its own id, or when a peer
//! belongs to another cluster than its data directory (two clusters may have been founded on
//! the same addresses: a directory restored onto the wrong machine).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::broker::error::{Error, Result};
use crate::broker::upgrade::IDENTITY_FILE;
use crate::proto::cluster as pb;
use crate::replication::config::Members;
use crate::replication::peers::Peers;
use crate::replication::wire;
use crate::storage::io::replace_file;
use crate::storage::{self, FileIo};

/// This node's place in the cluster, as its data directory remembers it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct Identity {
    node_id: u64,
    peers: BTreeMap<u64, String>,
    /// The cluster's id, once this node has learnt it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) cluster_id: Option<String>,
}

/// Refuses a data directory of another node or cluster; records the identity on the first
/// start in cluster mode. The identity as recorded.
pub(super) fn check_identity(dir: &Path, members: &Members, io: &dyn FileIo) -> Result<Identity> {
    let path: PathBuf = dir.join(IDENTITY_FILE);
    let want = Identity {
        node_id: members.node_id,
        peers: members.peers.clone(),
        cluster_id: None,
    };
    match std::fs::read(&path) {
        Ok(bytes) => {
            let found: Identity = serde_json::from_slice(&bytes).map_err(|e| {
                Error::FailedPrecondition(format!("{} is damaged: {e}", path.display()))
            })?;
            if found.node_id != want.node_id {
                return Err(Error::FailedPrecondition(format!(
                    "this data directory belongs to node {} (says {}), not to node {}: point \
                     each node at its own directory",
                    found.node_id,
                    path.display(),
                    want.node_id
                )));
            }
            // Once the cluster has an id, that id tells clusters apart ([`check_peers`]):
            // `cluster.peers` may then name nodes added since, and leave out removed ones.
            if found.peers != want.peers && found.cluster_id.is_none() {
                return Err(Error::FailedPrecondition(format!(
                    "this data directory belongs to a cluster founded by {:?}, not by \
                     cluster.peers = {:?} (says {}); start it with its founding peers until \
                     the cluster has drawn its id",
                    found.peers,
                    want.peers,
                    path.display()
                )));
            }
            Ok(found)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            storage::io::create_dir_all(io, dir).map_err(|e| storage::Error::io(dir, e))?;
            write_identity(dir, &want, io)?;
            Ok(want)
        }
        Err(e) => Err(storage::Error::io(&path, e).into()),
    }
}

pub(super) fn write_identity(dir: &Path, identity: &Identity, io: &dyn FileIo) -> Result<()> {
    let path = dir.join(IDENTITY_FILE);
    let bytes = serde_json::to_vec_pretty(identity).map_err(|e| Error::Internal(e.to_string()))?;
    replace_file(io, &path, &bytes).map_err(|e| storage::Error::io(&path, e))?;
    Ok(())
}

/// Asks every peer (this node's own address included) who it is, within `deadline`, and
/// refuses to start when a process already answers as this node, or when a peer belongs to
/// another cluster than `cluster_id` (this data directory's, if it knows one). Peers that do
/// not answer are passed over: they may be down.
pub(super) async fn check_peers(
    members: &Members,
    peers: &Peers,
    cluster_id: Option<&str>,
    deadline: Duration,
) -> Result<()> {
    let mut asks = tokio::task::JoinSet::new();
    for (&id, configured) in &members.peers {
        let addr = peers.addr(id, configured);
        let Ok(channel) = peers.channel(&addr) else {
            continue;
        };
        asks.spawn(async move {
            let mut request = tonic::Request::new(pb::StatusRequest {});
            request.set_timeout(deadline);
            let mut client = wire::client(channel);
            let answer = tokio::time::timeout(deadline, client.status(request)).await;
            (id, addr, answer)
        });
    }
    while let Some(asked) = asks.join_next().await {
        let Ok((id, addr, Ok(Ok(answer)))) = asked else {
            continue;
        };
        let answer = answer.into_inner();
        if id == members.node_id && answer.node_id == id {
            return Err(Error::FailedPrecondition(format!(
                "node {id} already runs at {addr}: each node id is one process (is this the \
                 node_id of another node?)"
            )));
        }
        if let Some(mine) = cluster_id
            && !answer.cluster_id.is_empty()
            && answer.cluster_id != mine
        {
            return Err(Error::FailedPrecondition(format!(
                "this data directory belongs to cluster {mine}, but node {id} at {addr} belongs \
                 to cluster {}: this is another cluster's data (restored onto the wrong \
                 machine?)",
                answer.cluster_id
            )));
        }
    }
    Ok(())
}

/// A new cluster id: 128 random bits, in hex.
pub(super) fn new_cluster_id() -> Result<String> {
    let mut bytes = [0u8; 16];
    getrandom::fill(&mut bytes).map_err(|e| Error::Internal(format!("no random bytes: {e}")))?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}
