//! The metadata group's state: the catalog of topics, each with its settings and the nodes that
//! hold its partitions' replicas. Changed only by applying committed commands, in log order, so
//! every node's catalog is the same at the same entry.
//!
//! A command travels as a proposal holding one record whose value is the command as JSON (the
//! metadata log is a partition log like any other).

use std::collections::BTreeMap;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use super::state_machine::GroupState;
use crate::storage::TopicConfig;
use crate::storage::record::{Batch, Decoded, EncodedBatch, Record};

/// A replicated topic.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CatalogTopic {
    pub config: TopicConfig,
    /// The nodes holding every partition's replicas.
    pub replicas: Vec<u64>,
}

/// Every replicated topic, by name. (Deleting one is not replicated yet: a cluster keeps its
/// topics.)
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Catalog {
    pub topics: BTreeMap<String, CatalogTopic>,
}

/// A change to the catalog, as the metadata leader proposes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Command {
    /// Creates the topic unless it exists (a repeat changes nothing).
    CreateTopic {
        name: String,
        config: TopicConfig,
        replicas: Vec<u64>,
    },
}

impl Command {
    /// The proposal bytes that carry the command.
    pub fn to_proposal(&self, timestamp: i64) -> Result<Vec<u8>, serde_json::Error> {
        let record = Record {
            timestamp,
            value: Some(Bytes::from(serde_json::to_vec(self)?)),
            ..Record::default()
        };
        Ok(EncodedBatch::new(&[record]).as_bytes().to_vec())
    }

    /// The command a proposal carries, or why it carries none.
    pub fn from_proposal(proposal: &[u8]) -> Result<Command, String> {
        let mut encoded = EncodedBatch::from_encoded(proposal.to_vec()).map_err(String::from)?;
        let sealed = Bytes::copy_from_slice(encoded.seal(0));
        let batch = match Batch::decode(&sealed) {
            Decoded::Valid(b) => b,
            Decoded::Torn { .. } => return Err("a torn proposal".into()),
            Decoded::Corrupt(why) => return Err(why.into()),
        };
        let mut records = batch.records();
        let value = match records.next() {
            Some(Ok(r)) => r.value.unwrap_or_default(),
            Some(Err(e)) => return Err(e.to_string()),
            None => return Err("a proposal without a record".into()),
        };
        serde_json::from_slice(&value).map_err(|e| e.to_string())
    }
}

impl GroupState for Catalog {
    const LOG_IS_DATA: bool = false;

    fn apply(&mut self, proposal: &[u8]) {
        let command = match Command::from_proposal(proposal) {
            Ok(c) => c,
            Err(why) => {
                // The same on every node: an entry that is not a command changes nothing.
                tracing::error!(%why, "a metadata entry that is not a command was skipped");
                return;
            }
        };
        match command {
            Command::CreateTopic {
                name,
                config,
                replicas,
            } => {
                self.topics
                    .entry(name)
                    .or_insert(CatalogTopic { config, replicas });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_round_trip_through_proposals_and_apply_in_order() {
        let create = Command::CreateTopic {
            name: "epro".into(),
            config: TopicConfig {
                partitions: 3,
                ..TopicConfig::default()
            },
            replicas: vec![1, 2, 3],
        };
        let bytes = create.to_proposal(1).unwrap();
        assert_eq!(Command::from_proposal(&bytes).unwrap(), create);
        let mut catalog = Catalog::default();
        catalog.apply(&bytes);
        assert_eq!(catalog.topics["epro"].config.partitions, 3);
        // A repeated creation (another node asked too) keeps the first settings.
        let again = Command::CreateTopic {
            name: "epro".into(),
            config: TopicConfig::default(),
            replicas: vec![1, 2, 3],
        };
        catalog.apply(&again.to_proposal(2).unwrap());
        assert_eq!(catalog.topics["epro"].config.partitions, 3);
        // Not a command: nothing changes.
        let before = catalog.clone();
        let other = EncodedBatch::new(&[Record::default()]).as_bytes().to_vec();
        catalog.apply(&other);
        catalog.apply(b"junk");
        assert_eq!(catalog, before);
    }
}
