//! Consumer groups on a cluster, checked from outside: members connected to different nodes
//! share a topic while the node leading the group is killed, paused and cut off; every member
//! reconnects through any running node when its stream ends. The checker asserts what a single
//! node promises: every message acknowledged exactly once (an ack the group forgot would let
//! the message be delivered and acknowledged a second time: the second ack would apply), no
//! delivery past `max_deliveries`, and each message that is always nacked dead-lettered exactly
//! once.

use super::*;

/// Messages sent; every `POISON`-th is nacked at every delivery (dead-lettered at the limit).
const MESSAGES: u64 = 600;
const POISON: u64 = 10;
const MAX_DELIVERIES: u32 = 3;
const GROUP: &str = "etl";

fn poison(value: &str) -> bool {
    value
        .strip_prefix("m-")
        .and_then(|n| n.parse::<u64>().ok())
        .is_some_and(|n| n % POISON == 0)
}

/// What the members saw.
#[derive(Debug, Default)]
pub(super) struct GroupHistory {
    /// Every delivery received: (value, attempt).
    pub(super) delivered: Vec<(String, u32)>,
    /// Per value, how many of its acks applied (answered `acked`).
    pub(super) acked: BTreeMap<String, u32>,
    /// Values with an ack whose outcome is unknown (it failed through every node tried: it
    /// may have applied, and a retry would then be answered `not_in_flight`).
    pub(super) uncertain: BTreeSet<String>,
    /// Every ack's outcome, per value, in order (what a failing run shows).
    pub(super) outcomes: BTreeMap<String, Vec<String>>,
}

impl GroupHistory {
    /// Values acknowledged, or maybe acknowledged.
    pub(super) fn settled(&self) -> usize {
        let mut all: BTreeSet<&String> = self.acked.keys().collect();
        all.extend(&self.uncertain);
        all.len()
    }
}

/// The first running node from `first` on, round the ring.
fn running(addrs: &Mutex<Vec<Option<String>>>, first: usize) -> Option<String> {
    let addrs = addrs.lock().unwrap();
    let n = addrs.len();
    (0..n).find_map(|k| addrs[(first + k) % n].clone())
}

/// One member: subscribes through node `k` (or the next running one), acks each delivery
/// (nacks the poison ones) through the same node (the next ones when that fails), and
/// subscribes again, through the next running node, whenever its stream ends; until `done`.
async fn member(
    topic: &'static str,
    k: usize,
    addrs: Arc<Mutex<Vec<Option<String>>>>,
    history: Arc<Mutex<GroupHistory>>,
    mut done: watch::Receiver<bool>,
) {
    let mut turn = k;
    while !*done.borrow() {
        turn += 1;
        let Some(addr) = running(&addrs, turn) else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let Ok(channel) = connect(&addr).await else {
            continue;
        };
        let mut client = BrokerClient::new(channel);
        let subscribed = client
            .subscribe(pb::SubscribeRequest {
                topic: topic.into(),
                group: GROUP.into(),
                max_in_flight: 8,
                ..pb::SubscribeRequest::default()
            })
            .await;
        let Ok(stream) = subscribed else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let mut stream = stream.into_inner();
        loop {
            let next = tokio::select! {
                m = stream.message() => m,
                _ = done.changed() => return,
            };
            let Ok(Some(response)) = next else {
                break;
            };
            for d in response.deliveries {
                let value =
                    String::from_utf8_lossy(d.value.as_deref().unwrap_or_default()).to_string();
                history
                    .lock()
                    .unwrap()
                    .delivered
                    .push((value.clone(), d.attempt));
                settle(topic, &addrs, turn, &value, d.ack_id, &history).await;
            }
        }
    }
}

/// Members running [`member`], the `k`-th subscribing through node `k` first.
pub(super) struct Members {
    done: watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Members {
    /// `n` members of the group on `topic`, recording into `history`.
    pub(super) fn spawn(
        topic: &'static str,
        n: usize,
        addrs: &Arc<Mutex<Vec<Option<String>>>>,
        history: &Arc<Mutex<GroupHistory>>,
    ) -> Members {
        let (done, stopped) = watch::channel(false);
        let tasks = (0..n)
            .map(|k| {
                let (addrs, history) = (Arc::clone(addrs), Arc::clone(history));
                tokio::spawn(member(topic, k, addrs, history, stopped.clone()))
            })
            .collect();
        Members { done, tasks }
    }

    /// Stops every member (each returns at once) and returns what they saw.
    pub(super) async fn stop(self, history: &Mutex<GroupHistory>) -> GroupHistory {
        self.done.send_replace(true);
        for task in self.tasks {
            task.await.unwrap();
        }
        std::mem::take(&mut *history.lock().unwrap())
    }

    /// Waits until the members have acknowledged every id the producers had acknowledged
    /// (`sent`), stops them, and checks that none was missed and no ack applied twice (a second
    /// one would mean the group forgot the first and delivered it again). What they saw.
    pub(super) async fn acked_every_id_once(
        self,
        history: &Mutex<GroupHistory>,
        sent: &super::IdHistory,
    ) -> GroupHistory {
        let everything = tokio::time::timeout(DEADLINE, async {
            loop {
                let settled = {
                    let c = history.lock().unwrap();
                    sent.acked
                        .keys()
                        .all(|id| c.acked.contains_key(id) || c.uncertain.contains(id))
                };
                if settled {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
        .await;
        let consumed = self.stop(history).await;
        let unsettled: Vec<&String> = sent
            .acked
            .keys()
            .filter(|id| !consumed.acked.contains_key(*id) && !consumed.uncertain.contains(*id))
            .take(5)
            .collect();
        assert!(
            everything.is_ok(),
            "acknowledged Sends the group never acknowledged: {unsettled:?} ({} acked)",
            consumed.acked.len()
        );
        let twice: Vec<_> = consumed.acked.iter().filter(|(_, n)| **n > 1).collect();
        assert!(
            twice.is_empty(),
            "acks that applied twice (forgotten): {twice:?}"
        );
        consumed
    }
}

/// Acks (nacks a poison message) through the first running node from `first`, trying the
/// next ones while it fails; records an ack that applied.
async fn settle(
    topic: &str,
    addrs: &Mutex<Vec<Option<String>>>,
    first: usize,
    value: &str,
    ack_id: String,
    history: &Mutex<GroupHistory>,
) {
    for k in 0..6 {
        let Some(addr) = running(addrs, first + k) else {
            return;
        };
        let Ok(channel) = connect(&addr).await else {
            continue;
        };
        let mut client = BrokerClient::new(channel);
        if poison(value) {
            let nacked = client
                .nack(pb::NackRequest {
                    group: GROUP.into(),
                    topic: topic.into(),
                    ack_ids: vec![ack_id.clone()],
                    delay_ms: 0,
                })
                .await;
            if nacked.is_ok() {
                return;
            }
        } else {
            let acked = client
                .ack(pb::AckRequest {
                    group: GROUP.into(),
                    topic: topic.into(),
                    ack_ids: vec![ack_id.clone()],
                })
                .await;
            let said = match &acked {
                Ok(a) => format!("{addr}: {:?}", a.get_ref()),
                Err(e) => format!("{addr}: {} {}", e.code(), e.message()),
            };
            history
                .lock()
                .unwrap()
                .outcomes
                .entry(value.to_string())
                .or_default()
                .push(said);
            if let Ok(a) = acked {
                if !a.into_inner().acked.is_empty() {
                    *history
                        .lock()
                        .unwrap()
                        .acked
                        .entry(value.to_string())
                        .or_default() += 1;
                }
                return;
            }
            // It may have applied before it failed: known only as maybe acknowledged.
            history.lock().unwrap().uncertain.insert(value.to_string());
        }
    }
}

/// The index of the node leading the consumer group, as node `ask` reports it, once one is.
async fn group_leader(cluster: &TestCluster, ask: usize) -> usize {
    let found = tokio::time::timeout(DEADLINE, async {
        loop {
            if let Some(l) = leader_of(cluster, ask, GROUP) {
                return l;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    found.expect("the consumer group has a leader")
}

/// The index of the node leading consumer group `group` on [`TOPIC`], as node `ask` reports it
/// now (`None`: no leader, or no such group yet).
fn leader_of(cluster: &TestCluster, ask: usize, group: &str) -> Option<usize> {
    let (_, status, _) = cluster_status(&cluster.addr(ask));
    let leader = status["consumer_groups"].as_array().and_then(|groups| {
        groups
            .iter()
            .find(|g| g["group"] == group && g["topic"] == TOPIC)
            .and_then(|g| g["leader"].as_u64())
    });
    leader.map(|l| l as usize - 1)
}

/// The dead letters in `<TOPIC>.dlq`, read through node `i`: their source values.
async fn dead_letters(cluster: &TestCluster, i: usize) -> Vec<String> {
    let Ok(channel) = connect(&cluster.addr(i)).await else {
        return Vec::new();
    };
    let mut client = BrokerClient::new(channel);
    let dlq = format!("{TOPIC}.dlq");
    let Ok(d) = describe_topic(&cluster.addr(i), &dlq).await else {
        return Vec::new();
    };
    let end = d.partitions[0].next_offset;
    if end == 0 {
        return Vec::new();
    }
    let mut out = Vec::new();
    let Ok(stream) = client
        .subscribe(pb::SubscribeRequest {
            topic: dlq,
            start: Some(pb::StartPosition {
                kind: Some(pb::start_position::Kind::Earliest(true)),
            }),
            limit: end,
            ..pb::SubscribeRequest::default()
        })
        .await
    else {
        return Vec::new();
    };
    let mut stream = stream.into_inner();
    while let Ok(Some(r)) = stream.message().await {
        for d in r.deliveries {
            let value = String::from_utf8_lossy(d.value.as_deref().unwrap_or_default()).to_string();
            out.push(value);
        }
    }
    out
}

async fn describe_topic(addr: &str, name: &str) -> Result<pb::DescribeTopicResponse, String> {
    let channel = connect(addr).await.map_err(|e| e.to_string())?;
    AdminClient::new(channel)
        .describe_topic(pb::DescribeTopicRequest { name: name.into() })
        .await
        .map(|r| r.into_inner())
        .map_err(|e| e.to_string())
}

/// Waits until `n` acks applied (or `DEADLINE`), saying which step stalled.
pub(super) async fn acked_at_least(history: &Mutex<GroupHistory>, n: usize, what: &str) {
    let reached = tokio::time::timeout(DEADLINE, async {
        while history.lock().unwrap().settled() < n {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    let history = history.lock().unwrap();
    let missing: Vec<String> = (0..MESSAGES)
        .map(|i| format!("m-{i}"))
        .filter(|v| !poison(v) && !history.acked.contains_key(v) && !history.uncertain.contains(v))
        .take(5)
        .collect();
    assert!(
        reached.is_ok(),
        "{what}: only {} messages acknowledged; not {missing:?}",
        history.settled()
    );
}

#[test]
fn a_group_of_four_members_over_three_nodes_consumes_through_kills_pauses_and_cuts_of_its_leader() {
    let runtime = busy_runtime();
    runtime.block_on(async {
        let max = MAX_DELIVERIES.to_string();
        // A delivery the faults cut short (its member's node killed or cut off) comes back
        // after the ack timeout: shorter than the default, so the run stays short.
        let mut cluster = TestCluster::start_with(&[
            ("SLUICE_GROUPS_MAX_DELIVERIES", &max),
            ("SLUICE_GROUPS_ACK_TIMEOUT_MS", "5000"),
        ]);
        create_topic(connect(&cluster.addr(0)).await.unwrap(), TOPIC, PARTITIONS).await;
        // CLUSTER_ROUNDS=N runs the faults N times (1 in CI; docs/benchmarks.md records a
        // longer run) over N times the messages.
        let rounds = cluster_rounds() as usize;
        let messages = MESSAGES * rounds as u64;
        let mut client = BrokerClient::new(connect(&cluster.addr(0)).await.unwrap());
        for chunk in (0..messages).collect::<Vec<_>>().chunks(50) {
            client
                .send(pb::SendRequest {
                    topic: TOPIC.into(),
                    messages: chunk
                        .iter()
                        .map(|i| pb::Message {
                            value: Some(format!("m-{i}").into_bytes().into()),
                            ..pb::Message::default()
                        })
                        .collect(),
                })
                .await
                .unwrap();
        }
        let history = Arc::new(Mutex::new(GroupHistory::default()));
        let members = Members::spawn(TOPIC, 4, &cluster.addrs, &history);
        // Each fault lasts until another share of the messages is acknowledged (a sixth each
        // in one round; the last sixth after the faults).
        let good = (messages - messages / POISON) as usize;
        let share = good / (3 * rounds + 3);
        acked_at_least(&history, share, "before any fault").await;
        let mut ask = 0;
        for round in 0..rounds {
            let shares = |k: usize| (3 * round + k) * share;
            // Killed: another node leads the group from its log; the killed one comes back.
            let leader = group_leader(&cluster, ask).await;
            cluster.kill(leader);
            acked_at_least(&history, shares(2), "with the group's leader killed").await;
            cluster.restart(leader);

            // Paused past the election timeout, then resumed: it finds a newer term.
            let leader = group_leader(&cluster, (leader + 1) % 3).await;
            cluster.signal(leader, "STOP");
            tokio::time::sleep(Duration::from_secs(3)).await; // the fault's length, not a wait for state
            cluster.signal(leader, "CONT");
            acked_at_least(&history, shares(3), "after the leader's pause").await;

            // Cut off from the other nodes (clients still reach it): the others elect a leader.
            let leader = group_leader(&cluster, (leader + 1) % 3).await;
            cluster.links.isolate(leader, true);
            acked_at_least(&history, shares(4), "with the leader cut off").await;
            cluster.links.isolate(leader, false);
            ask = (leader + 1) % 3;
        }

        // Every message ends acknowledged or dead-lettered (a message whose deliveries were
        // cut short by the faults `max_deliveries` times is dead-lettered too).
        let all: BTreeSet<String> = (0..messages).map(|i| format!("m-{i}")).collect();
        let mut dead = Vec::new();
        let everything = tokio::time::timeout(DEADLINE, async {
            loop {
                dead = dead_letters(&cluster, 0).await;
                let mut done: BTreeSet<String> = dead.iter().cloned().collect();
                {
                    let h = history.lock().unwrap();
                    done.extend(h.acked.keys().cloned());
                    done.extend(h.uncertain.iter().cloned());
                }
                if done.is_superset(&all) {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
        .await;
        let history = members.stop(&history).await;
        let mut open: Vec<&String> = all
            .iter()
            .filter(|v| {
                !history.acked.contains_key(*v)
                    && !history.uncertain.contains(*v)
                    && !dead.contains(v)
            })
            .collect();
        open.truncate(5);
        let seen: Vec<&(String, u32)> = history
            .delivered
            .iter()
            .filter(|(v, _)| open.contains(&v))
            .collect();
        let outcomes: Vec<_> = open.iter().map(|v| history.outcomes.get(*v)).collect();
        assert!(
            everything.is_ok(),
            "not every message was acknowledged or dead-lettered: {open:?}; their deliveries \
             {seen:?}; their acks {outcomes:?}"
        );

        // Every message delivered; acknowledged (none twice) or dead-lettered, never both; no
        // poison message acknowledged.
        let twice: Vec<_> = history.acked.iter().filter(|(_, n)| **n > 1).collect();
        assert!(
            twice.is_empty(),
            "acks that applied twice (forgotten): {twice:?}"
        );
        let delivered: BTreeSet<&String> = history.delivered.iter().map(|(v, _)| v).collect();
        let lost: Vec<&String> = all.iter().filter(|v| !delivered.contains(v)).collect();
        assert!(lost.is_empty(), "never delivered: {lost:?}");
        let dead_set: BTreeSet<&String> = dead.iter().collect();
        let both: Vec<&String> = history
            .acked
            .keys()
            .filter(|v| dead_set.contains(v))
            .collect();
        assert!(both.is_empty(), "acknowledged and dead-lettered: {both:?}");
        let acked_poison: Vec<&String> = history.acked.keys().filter(|v| poison(v)).collect();
        assert!(
            acked_poison.is_empty(),
            "nacked but acknowledged: {acked_poison:?}"
        );
        // No delivery past the limit.
        let over: Vec<_> = history
            .delivered
            .iter()
            .filter(|(_, attempt)| *attempt == 0 || *attempt > MAX_DELIVERIES)
            .collect();
        assert!(over.is_empty(), "deliveries past max_deliveries: {over:?}");
        // Each dead letter once, the same on every node; every poison message among them.
        let mut want = dead.clone();
        want.sort();
        let mut once = want.clone();
        once.dedup();
        assert_eq!(once, want, "dead letters copied twice");
        let undead: Vec<&String> = all
            .iter()
            .filter(|v| poison(v) && !dead_set.contains(v))
            .collect();
        assert!(
            undead.is_empty(),
            "poison messages not dead-lettered: {undead:?}"
        );
        for i in 0..3 {
            // Read once the node holds as many as were dead-lettered (a node that was down or
            // cut off catches up).
            let mut dead = Vec::new();
            let _ = tokio::time::timeout(DEADLINE, async {
                loop {
                    dead = dead_letters(&cluster, i).await;
                    if dead.len() >= want.len() {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            })
            .await;
            dead.sort();
            assert_eq!(dead, want, "the dead letters read through node {}", i + 1);
        }
    });
}

/// Sends `m-0` … `m-<n-1>` through `addr`, in one request, round the topic's `partitions`.
async fn send_values(addr: &str, n: u64, partitions: u32) {
    let mut producer = BrokerClient::new(connect(addr).await.unwrap());
    producer
        .send(pb::SendRequest {
            topic: TOPIC.into(),
            messages: (0..n)
                .map(|i| pb::Message {
                    value: Some(format!("m-{i}").into()),
                    partition: Some((i % u64::from(partitions)) as u32),
                    ..pb::Message::default()
                })
                .collect(),
        })
        .await
        .unwrap();
}

/// The next `n` deliveries of `stream` (at most [`DEADLINE`] for each).
async fn next_deliveries(
    stream: &mut tonic::Streaming<pb::SubscribeResponse>,
    n: usize,
) -> Vec<pb::Delivery> {
    let mut got = Vec::new();
    while got.len() < n {
        let next = tokio::time::timeout(DEADLINE, stream.message()).await;
        got.extend(next.expect("a delivery").unwrap().unwrap().deliveries);
    }
    got
}

/// DescribeGroup of the group through node `i`: its one topic's description.
async fn describe_group(
    cluster: &TestCluster,
    i: usize,
) -> Result<pb::GroupTopicState, tonic::Status> {
    let mut admin = AdminClient::new(connect(&cluster.addr(i)).await.unwrap());
    let d = admin
        .describe_group(pb::DescribeGroupRequest {
            group: GROUP.into(),
        })
        .await?
        .into_inner();
    assert_eq!(d.topics.len(), 1, "{d:?}");
    Ok(d.topics.into_iter().next().unwrap())
}

/// Until every node describes the group with `members` members and committed offset
/// `committed` (a member's leaving is seen a moment after its stream ends).
async fn described_everywhere(cluster: &TestCluster, members: usize, committed: u64) {
    let agreed = tokio::time::timeout(DEADLINE, async {
        loop {
            let mut seen = Vec::new();
            for i in 0..3 {
                let d = describe_group(cluster, i).await;
                seen.push(d.map(|d| (d.members.len(), d.partitions[0].committed_offset)));
            }
            if seen
                .iter()
                .all(|s| s.as_ref().ok() == Some(&(members, committed)))
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    agreed
        .await
        .unwrap_or_else(|_| panic!("every node describes {members} members at {committed}"));
}

/// An admin's calls on a consumer group through any node act on the node leading it: Describe
/// shows the leader's members and positions through every node; Reset and Delete are refused
/// (changing nothing) while a member is connected through any node; a Reset is committed (the
/// next leader resumes there after the leader is killed); a Delete removes the group from every
/// node, and the same name then starts afresh.
#[test]
fn describe_reset_and_delete_of_a_group_through_any_node_act_at_its_leader() {
    let runtime = runtime();
    runtime.block_on(async {
        let mut cluster = TestCluster::start();
        create_topic(connect(&cluster.addr(0)).await.unwrap(), TOPIC, 1).await;
        send_values(&cluster.addr(0), 10, 1).await;
        let mut member = joined(&cluster.addr(0), 8).await;
        let got = next_deliveries(&mut member, 8).await;
        let mut client = BrokerClient::new(connect(&cluster.addr(0)).await.unwrap());
        let acked = client
            .ack(pb::AckRequest {
                group: GROUP.into(),
                topic: TOPIC.into(),
                ack_ids: got[..3].iter().map(|d| d.ack_id.clone()).collect(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(acked.acked.len(), 3, "{acked:?}");
        described_everywhere(&cluster, 1, 3).await;
        // DescribeTopic weighs what the topic's groups still need (retention keeps it): the
        // group's position comes from its leader, through every node.
        for i in 0..3 {
            let d = describe_topic(&cluster.addr(i), TOPIC).await;
            assert!(d.is_ok(), "DescribeTopic through node {}: {d:?}", i + 1);
        }

        let leader = group_leader(&cluster, 0).await;
        let elsewhere = (leader + 1) % 3;
        let mut admin = AdminClient::new(connect(&cluster.addr(elsewhere)).await.unwrap());
        let reset = |force| pb::ResetGroupRequest {
            group: GROUP.into(),
            topic: TOPIC.into(),
            to: Some(pb::StartPosition {
                kind: Some(pb::start_position::Kind::Offset(7)),
            }),
            force,
            ..pb::ResetGroupRequest::default()
        };
        precondition(admin.reset_group(reset(false)).await, "members connected");
        precondition(
            admin
                .delete_group(pb::DeleteGroupRequest {
                    group: GROUP.into(),
                })
                .await,
            "members connected",
        );
        described_everywhere(&cluster, 1, 3).await;

        drop(member);
        described_everywhere(&cluster, 0, 3).await;
        admin.reset_group(reset(false)).await.unwrap();
        described_everywhere(&cluster, 0, 7).await;
        // Committed: the next leader resumes from the reset position.
        cluster.kill(leader);
        let mut member = joined(&cluster.addr(elsewhere), 8).await;
        let after = next_deliveries(&mut member, 3).await;
        let offsets: Vec<u64> = after.iter().map(|d| d.offset).collect();
        assert_eq!(offsets, [7, 8, 9], "after the reset and a failover");
        drop(member);
        cluster.restart(leader);
        described_everywhere(&cluster, 0, 7).await;

        admin
            .delete_group(pb::DeleteGroupRequest {
                group: GROUP.into(),
            })
            .await
            .unwrap();
        let gone = tokio::time::timeout(DEADLINE, async {
            loop {
                let mut left = 0;
                for i in 0..3 {
                    let mut admin = AdminClient::new(connect(&cluster.addr(i)).await.unwrap());
                    let listed = admin
                        .list_groups(pb::ListGroupsRequest {})
                        .await
                        .unwrap()
                        .into_inner();
                    left += listed.groups.iter().filter(|g| g.name == GROUP).count();
                }
                if left == 0 {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
        gone.await.expect("the group is gone from every node");
        for i in 0..3 {
            let d = describe_group(&cluster, i).await;
            assert!(
                d.as_ref().is_err_and(|s| s.code() == tonic::Code::NotFound),
                "{d:?}"
            );
        }
        // The name starts afresh: a new group, from the earliest message.
        let mut member = joined(&cluster.addr(leader), 8).await;
        let again = next_deliveries(&mut member, 1).await;
        assert_eq!((again[0].offset, again[0].attempt), (0, 1), "{again:?}");
    });
}

/// Joins the group on the topic through `addr` with `max_in_flight`, if that node takes it now.
async fn join(addr: &str, max_in_flight: u32) -> Option<tonic::Streaming<pb::SubscribeResponse>> {
    let mut client = BrokerClient::new(connect(addr).await.ok()?);
    let stream = client
        .subscribe(pb::SubscribeRequest {
            topic: TOPIC.into(),
            group: GROUP.into(),
            max_in_flight,
            ..pb::SubscribeRequest::default()
        })
        .await
        .ok()?;
    Some(stream.into_inner())
}

/// [`join`], again until the group runs on a leader (the topic reaches every node's catalog
/// first; after a failover, an election comes first).
async fn joined(addr: &str, max_in_flight: u32) -> tonic::Streaming<pb::SubscribeResponse> {
    let joined = tokio::time::timeout(DEADLINE, async {
        loop {
            if let Some(stream) = join(addr, max_in_flight).await {
                return stream;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    joined.await.expect("the group runs on a leader")
}

/// A Nack's delay is replicated: after the node leading the group is killed, the next leader
/// delivers the nacked messages again no sooner than the delay asked (a lower bound: no machine
/// is too slow for it), and the one still in flight at once.
#[test]
fn a_nack_delay_holds_when_the_groups_leader_is_killed() {
    // Long enough that the group runs on its next leader before it ends (an election and a
    // subscription through a relay, a few seconds here), so that the order is seen.
    const DELAY: Duration = Duration::from_secs(15);
    let runtime = runtime();
    runtime.block_on(async {
        let mut cluster = TestCluster::start();
        create_topic(connect(&cluster.addr(0)).await.unwrap(), TOPIC, 1).await;
        send_values(&cluster.addr(0), 3, 1).await;
        let mut stream = joined(&cluster.addr(0), 8).await;
        let mut client = BrokerClient::new(connect(&cluster.addr(0)).await.unwrap());
        let mut got = Vec::new();
        while got.len() < 3 {
            got.extend(stream.message().await.unwrap().unwrap().deliveries);
        }
        let before_nack = std::time::Instant::now();
        let nacked = client
            .nack(pb::NackRequest {
                group: GROUP.into(),
                topic: TOPIC.into(),
                ack_ids: got[..2].iter().map(|d| d.ack_id.clone()).collect(),
                delay_ms: DELAY.as_millis() as u64,
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(nacked.nacked.len(), 2, "{nacked:?}");
        drop(stream);
        let leader = group_leader(&cluster, 0).await;
        cluster.kill(leader);
        let other = (leader + 1) % 3;
        // Subscribed again through a running node once a new leader runs the group.
        let mut again = joined(&cluster.addr(other), 8).await;
        let resubscribed = before_nack.elapsed();
        assert!(
            resubscribed < DELAY,
            "the group's next leader took {resubscribed:?}: longer than the test's delay"
        );
        let offsets = |ds: &[pb::Delivery]| ds.iter().map(|d| d.offset).collect::<Vec<_>>();
        let mut redelivered = Vec::new();
        while redelivered.len() < 3 {
            let next = tokio::time::timeout(DEADLINE, again.message()).await;
            let deliveries = next.expect("redelivered").unwrap().unwrap().deliveries;
            for d in deliveries {
                redelivered.push((d, before_nack.elapsed()));
            }
        }
        let (first, _) = &redelivered[0];
        let seen: Vec<_> = redelivered.iter().map(|(d, t)| (d.offset, *t)).collect();
        assert_eq!(
            first.offset, got[2].offset,
            "the one not nacked first: {seen:?}"
        );
        for (d, waited) in &redelivered[1..] {
            assert!(offsets(&got[..2]).contains(&d.offset), "{d:?}");
            assert!(
                *waited >= DELAY,
                "nacked with a {DELAY:?} delay, offset {} delivered again after {waited:?}",
                d.offset
            );
        }
    });
}

/// How a delivery is failed in [`no_message_is_handed_out_more_than_max_deliveries_through_leader_changes`].
#[derive(Debug, Clone, Copy)]
enum Failure {
    Nack,
    Leave,
    AckTimeout,
    /// `kill -9` of the node leading the group, then a restart of it.
    KillLeader,
    /// `SIGTERM` of the node leading the group (it hands over first), then a restart of it.
    StopLeader,
}

/// The cluster variant of `tests/delivery_limit.rs`: `max_deliveries` holds whatever fails a
/// delivery, changes of the group's leader among the random steps (killed or stopped, then
/// started again), with members joining through random nodes: no message is handed out more
/// than `MAX_DELIVERIES` times, attempt numbers only grow, and each message, failed every
/// time, is dead-lettered exactly once. `CLUSTER_DELIVERY_SEEDS=n` runs n interleavings (CI: 1).
#[test]
fn no_message_is_handed_out_more_than_max_deliveries_through_leader_changes() {
    const MESSAGES: u64 = 12;
    let seeds: u64 = std::env::var("CLUSTER_DELIVERY_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1);
    let runtime = runtime();
    runtime.block_on(async {
        for seed in 1..=seeds {
            let max = MAX_DELIVERIES.to_string();
            let mut cluster = TestCluster::start_with(&[
                ("SLUICE_GROUPS_MAX_DELIVERIES", &max),
                ("SLUICE_GROUPS_ACK_TIMEOUT_MS", "1000"),
            ]);
            create_topic(connect(&cluster.addr(0)).await.unwrap(), TOPIC, 2).await;
            send_values(&cluster.addr(0), MESSAGES, 2).await;
            let mut rng = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15);
            let mut below = |n: u64| {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                rng % n
            };
            // Every handing a client saw: (partition, offset) → attempts, in order.
            let mut seen: BTreeMap<(u32, u64), Vec<u32>> = BTreeMap::new();
            let mut trace = Vec::new();
            let mut finished = false;
            for _step in 0..150 {
                let failure = match below(8) {
                    0 | 1 => Failure::Nack,
                    2 | 3 => Failure::Leave,
                    4 | 5 => Failure::AckTimeout,
                    6 => Failure::KillLeader,
                    _ => Failure::StopLeader,
                };
                let through = below(3) as usize;
                trace.push((failure, through));
                let max_in_flight = 1 + below(3) as u32;
                let mut stream = joined(&cluster.addr(through), max_in_flight).await;
                // The next delivery, unless every message is settled (dead-lettered). (The
                // end is the group leader's copy of the partition, which a node just started
                // may not have caught up yet.)
                let done = async {
                    loop {
                        if let Some(d) = describe_group(&cluster, through)
                            .await
                            .map_err(|s| {
                                // Or not started on that node yet (it learns groups from the
                                // metadata log).
                                let learning = s.code() == tonic::Code::NotFound;
                                assert!(super::common::not_yet(&s) || learning, "{s:?}");
                            })
                            .ok()
                            && d.partitions.iter().all(|p| {
                                p.end_offset == MESSAGES / 2 && p.committed_offset == p.end_offset
                            })
                        {
                            return;
                        }
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                };
                let next = tokio::select! {
                    m = stream.message() => m,
                    () = done => {
                        finished = true;
                        break;
                    }
                };
                // The stream ended (the group's leader changed): join again.
                let Ok(Some(response)) = next else { continue };
                let mut got = response.deliveries;
                if matches!(failure, Failure::AckTimeout)
                    && got.iter().any(|d| d.attempt < MAX_DELIVERIES)
                    && let Ok(Ok(Some(again))) =
                        tokio::time::timeout(DEADLINE, stream.message()).await
                {
                    // Not acked: it comes back after the timeout (to this member, the only one).
                    got.extend(again.deliveries);
                }
                for d in &got {
                    seen.entry((d.partition, d.offset))
                        .or_default()
                        .push(d.attempt);
                }
                match failure {
                    Failure::Nack => {
                        let channel = connect(&cluster.addr(through)).await.unwrap();
                        // An outcome not known (the leader changed mid-call) is a failure too.
                        let _ = BrokerClient::new(channel)
                            .nack(pb::NackRequest {
                                group: GROUP.into(),
                                topic: TOPIC.into(),
                                ack_ids: got.iter().map(|d| d.ack_id.clone()).collect(),
                                delay_ms: 0,
                            })
                            .await;
                        drop(stream);
                    }
                    Failure::Leave | Failure::AckTimeout => drop(stream),
                    Failure::KillLeader | Failure::StopLeader => {
                        drop(stream);
                        let leader = group_leader(&cluster, through).await;
                        if matches!(failure, Failure::KillLeader) {
                            cluster.kill(leader);
                        } else {
                            cluster.stop(leader);
                        }
                        cluster.restart(leader);
                    }
                }
            }
            let context = format!("seed {seed}, steps (failure, node) {trace:?}, seen {seen:?}");
            assert!(finished, "not every message was settled: {context}");
            for (id, attempts) in &seen {
                assert!(
                    attempts.windows(2).all(|w| w[0] < w[1])
                        && attempts.iter().all(|&a| a <= MAX_DELIVERIES),
                    "{id:?} was handed out as {attempts:?}; {context}"
                );
            }
            // (A message may never reach a client: on a cluster an attempt counts when the
            // group assigns it, and a member's buffer is lost with the member's stream.)
            // Each message failed every time: dead-lettered exactly once.
            let dead = tokio::time::timeout(DEADLINE, async {
                loop {
                    let d = dead_letters(&cluster, 0).await;
                    if d.len() as u64 >= MESSAGES {
                        return d;
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            })
            .await
            .unwrap_or_else(|_| panic!("every message reached the dead-letter topic: {context}"));
            let mut dead = dead;
            dead.sort();
            let mut want: Vec<String> = (0..MESSAGES).map(|i| format!("m-{i}")).collect();
            want.sort();
            assert_eq!(dead, want, "{context}");
        }
    });
}

/// A new group's first Subscribe is taken at once through any node, the one its election chose
/// included (that node once sent it to the others, none of which led it, until the deadline):
/// six new groups, two through each node, each answered on the first try with the first message.
#[test]
fn a_new_groups_first_subscribe_is_taken_through_any_node() {
    let runtime = runtime();
    runtime.block_on(async {
        let cluster = TestCluster::start();
        create_topic(connect(&cluster.addr(0)).await.unwrap(), TOPIC, 1).await;
        send_values(&cluster.addr(0), 1, 1).await;
        for i in 0..3 {
            readable_up_to(&cluster.addr(i), 1, "the message").await;
        }
        for k in 0..6 {
            let i = k % 3;
            let mut client = BrokerClient::new(connect(&cluster.addr(i)).await.unwrap());
            let group = format!("first-{k}");
            let stream = client
                .subscribe(pb::SubscribeRequest {
                    topic: TOPIC.into(),
                    group: group.clone(),
                    max_in_flight: 1,
                    ..pb::SubscribeRequest::default()
                })
                .await;
            let mut stream = match stream {
                Ok(s) => s.into_inner(),
                Err(e) => panic!("group {group} through node {}: {e:?}", i + 1),
            };
            let got = next_deliveries(&mut stream, 1).await;
            assert_eq!(got[0].offset, 0, "{group}");
        }
    });
}

/// A consumer group runs on the node its members are connected to, so that its deliveries and
/// acks do not cross the cluster port: a new group on the node its first member subscribed
/// through (one through each node), and a group whose members all connect to another node
/// moves there while they consume; the move ends their streams (`UNAVAILABLE`, subscribe
/// again), and loses and re-acknowledges nothing: each of the 300 messages acked exactly once,
/// none delivered again after its ack applied.
#[test]
fn a_group_runs_on_the_node_its_members_are_connected_to() {
    const N: u64 = 300;
    let runtime = runtime();
    runtime.block_on(async {
        let cluster = cluster_holding(N).await;
        let subscribe = |addr: String, group: String| async move {
            let mut client = BrokerClient::new(connect(&addr).await.ok()?);
            let request = pb::SubscribeRequest {
                topic: TOPIC.into(),
                group,
                max_in_flight: 16,
                ..pb::SubscribeRequest::default()
            };
            Some(client.subscribe(request).await.ok()?.into_inner())
        };
        // New groups, one through each node; the member of `home-0` stays on node 1.
        let mut first = None;
        for i in 0..3 {
            let group = format!("home-{i}");
            let mut stream = subscribe(cluster.addr(i), group.clone()).await.unwrap();
            next_deliveries(&mut stream, 1).await;
            until_led_by(&cluster, &group, i).await;
            if i == 0 {
                first = Some(stream);
            }
        }

        // `home-0`'s member moves to node 3 and consumes there, acking through node 3.
        drop(first);
        let through = cluster.addr(2);
        let mut acked: BTreeMap<String, u32> = BTreeMap::new();
        let mut after_ack = Vec::new();
        let mut streams_ended = 0;
        // Until every message is acknowledged and the group has moved (its stream ended).
        let consumed = tokio::time::timeout(DEADLINE, async {
            while (acked.len() as u64) < N || streams_ended == 0 {
                let Some(mut stream) = subscribe(through.clone(), "home-0".into()).await else {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                };
                let mut client = BrokerClient::new(connect(&through).await.unwrap());
                while let Ok(Some(response)) = stream.message().await {
                    for d in response.deliveries {
                        let value = d.value.as_deref().unwrap_or_default();
                        let value = String::from_utf8_lossy(value).into_owned();
                        if acked.contains_key(&value) {
                            after_ack.push(value.clone());
                        }
                        let answer = client
                            .ack(pb::AckRequest {
                                group: "home-0".into(),
                                topic: TOPIC.into(),
                                ack_ids: vec![d.ack_id],
                            })
                            .await;
                        if answer.is_ok_and(|a| !a.into_inner().acked.is_empty()) {
                            *acked.entry(value).or_default() += 1;
                        }
                    }
                    if acked.len() as u64 == N && streams_ended > 0 {
                        break;
                    }
                }
                streams_ended += 1;
            }
        });
        consumed
            .await
            .unwrap_or_else(|_| panic!("{} of {N} acknowledged", acked.len()));
        until_led_by(&cluster, "home-0", 2).await;
        assert_eq!(
            after_ack,
            Vec::<String>::new(),
            "delivered again after their ack"
        );
        let twice: Vec<_> = acked.iter().filter(|&(_, &n)| n > 1).collect();
        assert!(twice.is_empty(), "acknowledged twice: {twice:?}");
        let expected: BTreeSet<String> = (0..N).map(|i| format!("m-{i}")).collect();
        assert_eq!(acked.keys().cloned().collect::<BTreeSet<_>>(), expected);
    });
}

/// `sluice consume --group` follows its group when it moves: a member through node 3 of a
/// group led by node 1 is moved there mid-run (its stream ends `UNAVAILABLE`), subscribes
/// again and prints every message once, in one run that exits 0. Half the messages are sent
/// only once the group has moved, so the run spans the move whatever the machine's speed.
#[test]
fn sluice_consume_follows_its_group_when_it_moves() {
    const N: u64 = 600;
    let runtime = runtime();
    runtime.block_on(async {
        let cluster = cluster_holding(N / 2).await;
        // The group, made through node 1, is led there; its first member leaves.
        let mut client = BrokerClient::new(connect(&cluster.addr(0)).await.unwrap());
        let mut first = client
            .subscribe(pb::SubscribeRequest {
                topic: TOPIC.into(),
                group: "cli".into(),
                max_in_flight: 1,
                ..pb::SubscribeRequest::default()
            })
            .await
            .unwrap()
            .into_inner();
        next_deliveries(&mut first, 1).await;
        drop(first);
        assert_eq!(leader_of(&cluster, 0, "cli"), Some(0));

        let (addr, count) = (cluster.addr(2), N.to_string());
        let run = tokio::task::spawn_blocking(move || {
            common::server::cli(
                &[
                    "consume", "--topic", TOPIC, "--group", "cli", "--count", &count, "--broker",
                    &addr,
                ],
                "",
            )
        });
        until_led_by(&cluster, "cli", 2).await;
        let mut producer = BrokerClient::new(connect(&cluster.addr(0)).await.unwrap());
        producer
            .send(pb::SendRequest {
                topic: TOPIC.into(),
                messages: (N / 2..N)
                    .map(|i| pb::Message {
                        value: Some(format!("m-{i}").into()),
                        ..pb::Message::default()
                    })
                    .collect(),
            })
            .await
            .unwrap();
        let out = run.await.unwrap();
        common::server::assert_succeeded(&out, "sluice consume --group through node 3: ");
        let printed: Vec<String> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_string)
            .collect();
        let unique: BTreeSet<&String> = printed.iter().collect();
        assert_eq!(printed.len(), unique.len(), "printed twice");
        let expected: BTreeSet<String> = (0..N).map(|i| format!("m-{i}")).collect();
        assert_eq!(
            unique.into_iter().cloned().collect::<BTreeSet<_>>(),
            expected
        );
    });
}

/// A three-node cluster whose [`TOPIC`] (one partition) holds `m-0` … `m-<n-1>`, readable
/// through every node.
async fn cluster_holding(n: u64) -> TestCluster {
    let cluster = TestCluster::start();
    create_topic(connect(&cluster.addr(0)).await.unwrap(), TOPIC, 1).await;
    send_values(&cluster.addr(0), n, 1).await;
    for i in 0..3 {
        readable_up_to(&cluster.addr(i), n, "the messages").await;
    }
    cluster
}

/// Waits until node `i` reports that it leads consumer group `group` on [`TOPIC`].
async fn until_led_by(cluster: &TestCluster, group: &str, i: usize) {
    let led = tokio::time::timeout(DEADLINE, async {
        while leader_of(cluster, i, group) != Some(i) {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    led.await
        .unwrap_or_else(|_| panic!("{group} is not led by node {} (its member's)", i + 1));
}

/// A group led by a node that holds no replica of its partition reads the partition from the
/// nodes that do, redeliveries included: every message nacked comes back once, with its own
/// value and its attempt counted on, when the redeliveries span several reads (scattered
/// offsets, more bytes than one read takes) and every other offset between them is acked.
#[test]
fn a_group_led_by_a_node_holding_no_replica_delivers_every_nacked_message_again_whole() {
    const MESSAGES: usize = 600;
    runtime().block_on(async {
        let cluster = TestCluster::start();
        AdminClient::new(connect(&cluster.addr(0)).await.unwrap())
            .create_topic(pb::CreateTopicRequest {
                name: TOPIC.into(),
                settings: Some(pb::TopicSettings {
                    partitions: 1,
                    replication_factor: Some(2),
                    ..pb::TopicSettings::default()
                }),
            })
            .await
            .unwrap();
        let replicas = describe(&cluster.addr(0)).await.unwrap().partitions[0]
            .replicas
            .clone();
        let outside = (0..3)
            .find(|&i| !replicas.contains(&(i as u64 + 1)))
            .expect("one node of three holds no replica");
        // 1 KB each: the redeliveries below take more than one read of 256 KiB.
        let value = |i: usize| format!("m-{i}-{}", "x".repeat(1000));
        let mut producer = BrokerClient::new(connect(&cluster.addr(0)).await.unwrap());
        for chunk in (0..MESSAGES).collect::<Vec<_>>().chunks(100) {
            producer
                .send(pb::SendRequest {
                    topic: TOPIC.into(),
                    messages: chunk
                        .iter()
                        .map(|&i| pb::Message {
                            value: Some(value(i).into()),
                            ..pb::Message::default()
                        })
                        .collect(),
                })
                .await
                .unwrap();
        }
        // Formed, and led, by the node the first member subscribed through.
        let mut member = joined(&cluster.addr(outside), MESSAGES as u32).await;
        assert_eq!(group_leader(&cluster, outside).await, outside);
        let first = next_deliveries(&mut member, MESSAGES).await;
        let values: BTreeMap<u64, String> = first
            .iter()
            .map(|d| (d.offset, String::from_utf8_lossy(d.value()).to_string()))
            .collect();
        assert_eq!(values.len(), MESSAGES);
        // Two of every three nacked, the third acked.
        let (nacked, acked): (Vec<_>, Vec<_>) = first.iter().partition(|d| d.offset % 3 != 0);
        let ids = |ds: &[&pb::Delivery]| ds.iter().map(|d| d.ack_id.clone()).collect();
        let mut client = BrokerClient::new(connect(&cluster.addr(outside)).await.unwrap());
        let answer = client
            .ack(pb::AckRequest {
                group: GROUP.into(),
                topic: TOPIC.into(),
                ack_ids: ids(&acked),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(answer.acked.len(), acked.len());
        let answer = client
            .nack(pb::NackRequest {
                group: GROUP.into(),
                topic: TOPIC.into(),
                ack_ids: ids(&nacked),
                delay_ms: 0,
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(answer.nacked.len(), nacked.len());
        let nacked_at = std::time::Instant::now();
        let again = next_deliveries(&mut member, nacked.len()).await;
        eprintln!(
            "{} redeliveries read from the partition's nodes in {:?}",
            again.len(),
            nacked_at.elapsed()
        );
        let mut seen = BTreeSet::new();
        for d in &again {
            assert!(
                seen.insert(d.offset),
                "offset {} delivered again twice",
                d.offset
            );
            assert!(d.offset % 3 != 0, "offset {} was acked", d.offset);
            assert_eq!(d.attempt, 2, "offset {}", d.offset);
            assert_eq!(
                String::from_utf8_lossy(d.value()),
                values[&d.offset],
                "offset {}",
                d.offset
            );
        }
        assert_eq!(seen.len(), nacked.len());
    });
}
