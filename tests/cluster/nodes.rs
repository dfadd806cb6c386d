//! Changing the cluster's nodes under load: a fourth node added (`sluice cluster add-node`) while
//! 16 producers send ids through random nodes to a topic held by every node, 4 more to a topic
//! held by two nodes of each partition, and a consumer group on each acks; then the first node removed
//! (`remove-node`: the second topic's replicas on it move to another node) and stopped, then
//! the second restarted with its founding configuration: nothing acknowledged lost or stored
//! twice, no ack forgotten, no Send refused by a running node; and what the two commands
//! refuse. Then a failed machine replaced: a node added and the dead one removed while it is
//! down.

use super::*;

/// The topic whose partitions are each on two of the nodes.
const PAIRS: &str = "pairs";

/// The voters of every partition and consumer group as node `addr` reports the cluster.
async fn voters(addr: &str) -> BTreeMap<String, BTreeSet<u64>> {
    let s = AdminClient::new(connect(addr).await.unwrap())
        .cluster_status(pb::ClusterStatusRequest {})
        .await
        .unwrap()
        .into_inner();
    let ids = |r: &[pb::ReplicaStatus]| r.iter().map(|r| r.node_id).collect();
    s.partitions
        .iter()
        .map(|p| (format!("{}/{}", p.topic, p.partition), ids(&p.replicas)))
        .chain(
            s.consumer_groups
                .iter()
                .map(|g| (format!("{}:{}", g.topic, g.group), ids(&g.replicas))),
        )
        .collect()
}

/// Runs `sluice cluster add-node`/`remove-node`, asserting it succeeded; its stdout.
fn change(addr: &str, args: &[&str]) -> String {
    let (code, out, err) = cluster_cli(addr, args);
    assert_eq!(code, 0, "sluice cluster {args:?}: {out}{err}");
    out
}

#[test]
fn a_node_added_and_another_removed_under_load_lose_duplicate_and_refuse_nothing() {
    let runtime = busy_runtime();
    runtime.block_on(async {
        let mut cluster = TestCluster::start_with(&[
            ("SLUICE_HTTP_LISTEN", "127.0.0.1:0"),
            ("SLUICE_GROUPS_ACK_TIMEOUT_MS", "5000"),
        ]);
        let partitions = 3;
        create_id_topic(&cluster, partitions).await;
        AdminClient::new(connect(&cluster.addr(1)).await.unwrap())
            .create_topic(pb::CreateTopicRequest {
                name: PAIRS.into(),
                settings: Some(pb::TopicSettings {
                    partitions,
                    replication_factor: Some(2),
                    dedup_window_ms: Some(3_600_000),
                    ..pb::TopicSettings::default()
                }),
            })
            .await
            .unwrap();
        let producers = IdProducers::spawn(&cluster, TOPIC, 16, 0);
        let pair_producers = IdProducers::spawn(&cluster, PAIRS, 4, 100);
        let consumed = Arc::new(Mutex::new(groups::GroupHistory::default()));
        let members = groups::Members::spawn(TOPIC, 2, &cluster.addrs, &consumed);
        // The same group on the pairs: its Raft group on every node, each partition read from
        // the nodes holding it by the node leading the group.
        let pairs_consumed = Arc::new(Mutex::new(groups::GroupHistory::default()));
        let pair_members = groups::Members::spawn(PAIRS, 2, &cluster.addrs, &pairs_consumed);
        producers.progress(100, "before the changes").await;
        // Both groups exist (their first Subscribe created them) before the voters are looked at.
        groups::acked_at_least(&consumed, 1, "the group on the first topic").await;
        groups::acked_at_least(&pairs_consumed, 1, "the group on the pairs").await;

        // Refused, changing nothing: an id in use, an address in use, a node that does not
        // run, an unknown node to remove.
        let before = voters(&cluster.addr(1)).await;
        let port0 = cluster.cluster_ports[0];
        let refusals: [(&[&str], &str); 4] = [
            (
                &["add-node", "2@127.0.0.1:1"],
                "one of the cluster's nodes already",
            ),
            (
                &["add-node", &format!("7@127.0.0.1:{port0}")],
                "answers as node 1",
            ),
            (&["add-node", "7@127.0.0.1:1"], "does not answer"),
            (&["remove-node", "7"], "not one of the cluster's nodes"),
        ];
        for (args, says) in refusals {
            let (code, out, err) = cluster_cli(&cluster.addr(1), args);
            assert_ne!(code, 0, "{args:?} refused: {out}");
            assert!(err.contains(says), "{args:?}: {err}");
        }
        assert_eq!(
            voters(&cluster.addr(1)).await,
            before,
            "the refusals changed nothing"
        );

        // A fourth node, started to join, added through node 2 while the load runs: every
        // partition of the topic held by every node and the consumer group gain it as a voter;
        // the pairs stay where they are.
        let (four, port, addr) = cluster.start_joining();
        let node = format!("4@127.0.0.1:{port}");
        let said = change(&cluster.addr(1), &["add-node", &node]);
        assert!(said.contains("node 4 added"), "{said}");
        let all: BTreeSet<u64> = [1, 2, 3, 4].into();
        let now = voters(&cluster.addr(2)).await;
        assert!(
            now.len() as u32 > partitions,
            "the group is listed: {now:?}"
        );
        for (group, v) in &now {
            if group.starts_with(&format!("{PAIRS}/")) {
                assert_eq!(Some(v), before.get(group), "{group} after add-node");
            } else {
                assert_eq!(*v, all, "{group} after add-node");
            }
        }
        // Asked again: it is there already, and nothing changes.
        change(&cluster.addr(2), &["add-node", &node]);
        // Clients are sent to it once it is ready (caught up with its groups' leaders).
        cluster.until_ready(four).await;
        cluster.addrs.lock().unwrap()[four] = Some(addr);
        producers.progress(100, "with the fourth node").await;

        pair_producers.progress(20, "with the fourth node").await;

        // Node 1 removed: taken out of the clients' list first, removed through node 3, and
        // stopped once the command returns. Each pair it was in moves to node 4 (the node
        // holding the fewest replicas), which catches up while the pair takes Sends.
        cluster.addrs.lock().unwrap()[0] = None;
        let said = change(&cluster.addr(2), &["remove-node", "1"]);
        assert!(said.contains("node 1 removed"), "{said}");
        let rest: BTreeSet<u64> = [2, 3, 4].into();
        for (group, v) in voters(&cluster.addr(3)).await {
            match before.get(&group) {
                Some(was) if group.starts_with(&format!("{PAIRS}/")) && was.contains(&1) => {
                    let moved: BTreeSet<u64> =
                        was.iter().map(|&n| if n == 1 { 4 } else { n }).collect();
                    assert_eq!(v, moved, "{group} after remove-node");
                }
                Some(was) if group.starts_with(&format!("{PAIRS}/")) => {
                    assert_eq!(&v, was, "{group} stays")
                }
                _ => assert_eq!(v, rest, "{group} after remove-node"),
            }
        }
        cluster.stop(0);
        producers.progress(100, "without the first node").await;
        pair_producers.progress(20, "without the first node").await;
        // The pairs' producers stop before a node of theirs does (a pair with one node down
        // takes no Sends: a majority of two is both).
        let paired = pair_producers.stop().await;
        // A node restarted with the configuration it was founded with (peers 1, 2, 3) learns
        // the added node from its metadata log and catches up.
        cluster.stop(1);
        producers.progress(100, "with node 2 stopped").await;
        cluster.restart_until_ready(1).await;
        producers.progress(100, "with node 2 back").await;

        let history = producers.stop().await;
        // On every remaining node, each id once at its acknowledged position (the pairs' as
        // each node serves them, from its own replica or from its pair's).
        ids_stored_once(&cluster, TOPIC, partitions, &history).await;
        ids_stored_once(&cluster, PAIRS, partitions, &paired).await;
        // Each group acknowledged every acknowledged id, none twice.
        let consumed = members.acked_every_id_once(&consumed, &history).await;
        let pairs_consumed = pair_members
            .acked_every_id_once(&pairs_consumed, &paired)
            .await;
        assert_no_running_node_refused(&[&history, &paired]);

        eprintln!(
            "nodes changed under load: {} acknowledged, the slowest Send {:?}; errors: {:#?}; \
             the group: {} acked; the pairs: {} acknowledged, the slowest {:?}, errors {:#?}, \
             {} acked by their group",
            history.acked.len(),
            history.slowest_ack,
            history.errors,
            consumed.acked.len(),
            paired.acked.len(),
            paired.slowest_ack,
            paired.errors,
            pairs_consumed.acked.len()
        );
    });
}

/// Replacing a failed machine: node 3 killed (`kill -9`; its disk taken as lost), a new node 4
/// added and node 3 removed while it is down, under 8 producers sending ids through random
/// nodes and a consumer group acking: both commands succeed with a node down, every partition
/// and the group end on nodes 1, 2 and 4, node 4 is a voter that counts (node 1 stopped
/// afterwards, nodes 2 and 4 keep taking Sends), and nothing acknowledged is lost or stored
/// twice, no ack forgotten, no Send refused by a running node.
#[test]
fn a_failed_node_is_replaced_while_it_is_down_under_load() {
    let runtime = busy_runtime();
    runtime.block_on(async {
        let mut cluster = TestCluster::start_with(&[
            ("SLUICE_HTTP_LISTEN", "127.0.0.1:0"),
            ("SLUICE_GROUPS_ACK_TIMEOUT_MS", "5000"),
        ]);
        let partitions = 2;
        create_id_topic(&cluster, partitions).await;
        let producers = IdProducers::spawn(&cluster, TOPIC, 8, 0);
        let consumed = Arc::new(Mutex::new(groups::GroupHistory::default()));
        let members = groups::Members::spawn(TOPIC, 2, &cluster.addrs, &consumed);
        producers.progress(100, "before the failure").await;
        groups::acked_at_least(&consumed, 1, "the group").await;

        cluster.kill(2);
        producers.progress(100, "with node 3 down").await;
        let (four, port, addr) = cluster.start_joining();
        let said = change(
            &cluster.addr(0),
            &["add-node", &format!("4@127.0.0.1:{port}")],
        );
        assert!(said.contains("node 4 added"), "{said}");
        cluster.until_ready(four).await;
        cluster.addrs.lock().unwrap()[four] = Some(addr);
        let said = change(&cluster.addr(1), &["remove-node", "3"]);
        assert!(said.contains("node 3 removed"), "{said}");
        let now = voters(&cluster.addr(0)).await;
        assert!(
            now.len() as u32 > partitions,
            "the group is listed: {now:?}"
        );
        let replaced: BTreeSet<u64> = [1, 2, 4].into();
        for (group, v) in &now {
            assert_eq!(*v, replaced, "{group} after the replacement");
        }
        producers
            .progress(100, "with node 4 in node 3's place")
            .await;
        // Node 4 counts: with node 1 stopped, nodes 2 and 4 are the majority.
        cluster.stop(0);
        producers.progress(100, "with node 1 stopped").await;
        cluster.restart_until_ready(0).await;
        producers.progress(100, "with node 1 back").await;

        let history = producers.stop().await;
        ids_stored_once(&cluster, TOPIC, partitions, &history).await;
        let consumed = members.acked_every_id_once(&consumed, &history).await;
        assert_no_running_node_refused(&[&history]);
        eprintln!(
            "a failed node replaced: {} acknowledged, the slowest Send {:?}; errors: {:#?}; \
             the group: {} acked",
            history.acked.len(),
            history.slowest_ack,
            history.errors,
            consumed.acked.len(),
        );
    });
}
