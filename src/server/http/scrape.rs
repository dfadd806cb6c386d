//! One scrape: everything `/metrics` and the console's overview report, read at one moment from
//! the atomics the hot paths keep, then encoded (OpenMetrics text via `prometheus-client`).
//!
//! A family with no sample (no topic yet, no group) is left out. Label sets are bounded by what
//! exists: `topic` × `partition`, `group` × `topic` × `partition`, and the fixed gRPC
//! `method` × `code` table.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;
use serde_json::{Value, json};

use crate::auth::Resource;
use crate::broker::groups::GroupTopicDescription;
use crate::broker::{Broker, RaftSample};
use crate::metrics::{HistogramSnapshot, Metrics};
use crate::storage::PartitionStats;

/// Histogram bounds in nanoseconds become seconds.
const NANOS: f64 = 1e-9;

/// gRPC status code names, by number.
const CODES: [&str; 17] = [
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
];

#[derive(Debug)]
struct PartitionSample {
    partition: String,
    stats: PartitionStats,
    records: u64,
    bytes: u64,
}

#[derive(Debug)]
struct TopicSample {
    name: String,
    partitions: Vec<PartitionSample>,
    duplicates: Option<u64>,
}

/// What one scrape saw.
#[derive(Debug)]
pub struct Scrape {
    topics: Vec<TopicSample>,
    groups: Vec<GroupTopicDescription>,
    fsync: Option<HistogramSnapshot>,
    commit_records: Option<HistogramSnapshot>,
    metrics: Arc<Metrics>,
    free_bytes: Option<u64>,
    /// Cluster mode: the partition groups this node runs.
    raft: Vec<RaftSample>,
}

impl Scrape {
    /// Reads the broker now; topics and groups `visible` refuses are left out.
    pub async fn gather(broker: &Broker, visible: impl Fn(Resource<'_>) -> bool) -> Scrape {
        let mut fsync: Option<HistogramSnapshot> = None;
        let mut commit_records: Option<HistogramSnapshot> = None;
        let mut topics = Vec::new();
        for t in broker.open_topics() {
            let mut partitions = Vec::new();
            for p in &t.partitions {
                let m = p.log.metrics();
                // Syncs count towards the broker-wide histograms whoever may see the topic.
                add(&mut fsync, m.fsync.snapshot());
                add(&mut commit_records, m.commit_records.snapshot());
                partitions.push(PartitionSample {
                    partition: p.id.to_string(),
                    stats: p.log.stats(),
                    records: m.records.load(Ordering::Relaxed),
                    bytes: m.bytes.load(Ordering::Relaxed),
                });
            }
            if visible(Resource::Topic(&t.name)) {
                topics.push(TopicSample {
                    name: t.name.to_string(),
                    partitions,
                    duplicates: t.dedup.as_ref().map(|d| d.stats().duplicates),
                });
            }
        }
        let groups = broker
            .all_groups()
            .await
            .iter()
            .filter(|g| {
                visible(Resource::Group(&g.group)) && visible(Resource::Topic(&g.topic.name))
            })
            .map(|g| g.describe())
            .collect();
        let mut raft = broker.raft_samples().await;
        raft.retain(|r| visible(Resource::Topic(&r.topic)));
        raft.sort_by(|a, b| (&a.topic, a.partition).cmp(&(&b.topic, b.partition)));
        Scrape {
            topics,
            groups,
            fsync,
            commit_records,
            metrics: Arc::clone(broker.metrics()),
            free_bytes: free_bytes(&broker.settings().data_dir),
            raft,
        }
    }

    /// The OpenMetrics text of this scrape.
    pub fn encode(self) -> Result<String, std::fmt::Error> {
        let mut registry = Registry::default();
        registry.register_collector(Box::new(self));
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &registry)?;
        Ok(out)
    }

    /// Totals for the console's overview.
    pub fn overview(&self) -> Value {
        let parts = self.topics.iter().flat_map(|t| &t.partitions);
        let records_appended: u64 = parts.clone().map(|p| p.records).sum();
        let bytes_appended: u64 = parts.clone().map(|p| p.bytes).sum();
        let disk_bytes: u64 = parts.map(|p| p.stats.size_bytes).sum();
        let m = &self.metrics;
        json!({
            "version": env!("CARGO_PKG_VERSION"),
            "topics": self.topics.len(),
            "groups": self.groups.len(),
            "records_appended": records_appended,
            "bytes_appended": bytes_appended,
            "records_delivered": m.delivered.load(Ordering::Relaxed),
            "disk_bytes": disk_bytes,
            "free_bytes": self.free_bytes,
            "fsync_p99_seconds": self.fsync.as_ref().and_then(|h| h.quantile(0.99, NANOS)),
            "send_p99_seconds": m.send_durable.snapshot().quantile(0.99, NANOS),
            "connections": m.connections.load(Ordering::Relaxed),
            "subscriptions": m.subscriptions.load(Ordering::Relaxed),
            "lag": self.groups.iter().flat_map(|g| &g.partitions).map(|p| p.lag).sum::<u64>(),
            "dead_lettered": self.groups.iter().flat_map(|g| &g.partitions).map(|p| p.dead_lettered).sum::<u64>(),
        })
    }

    fn partitions(&self) -> impl Iterator<Item = ([(&'static str, &str); 2], &PartitionSample)> {
        self.topics.iter().flat_map(|t| {
            t.partitions.iter().map(move |p| {
                (
                    [
                        ("topic", t.name.as_str()),
                        ("partition", p.partition.as_str()),
                    ],
                    p,
                )
            })
        })
    }

    fn group_partitions(
        &self,
    ) -> impl Iterator<
        Item = (
            [(&'static str, String); 3],
            &crate::broker::groups::GroupPartitionDescription,
        ),
    > {
        self.groups.iter().flat_map(|g| {
            g.partitions.iter().map(move |p| {
                (
                    [
                        ("group", g.group.clone()),
                        ("topic", g.topic.clone()),
                        ("partition", p.partition.to_string()),
                    ],
                    p,
                )
            })
        })
    }
}

fn add(total: &mut Option<HistogramSnapshot>, h: HistogramSnapshot) {
    match total {
        Some(t) => t.add(&h),
        None => *total = Some(h),
    }
}

/// Bytes free to unprivileged users on the data directory's file system.
fn free_bytes(dir: &std::path::Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
    let mut s = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: `path` is a NUL-terminated string and `s` is written by statvfs before it is read.
    let rc = unsafe { libc::statvfs(path.as_ptr(), s.as_mut_ptr()) };
    if rc != 0 {
        return None;
    }
    // SAFETY: statvfs returned 0, so it filled `s`.
    let s = unsafe { s.assume_init() };
    #[allow(clippy::unnecessary_cast)] // the field types differ between targets
    Some(s.f_bavail as u64 * s.f_frsize as u64)
}

fn counter(e: MetricEncoder<'_>, v: u64) -> Result<(), std::fmt::Error> {
    ConstCounter::new(v).encode(e)
}

fn gauge(e: MetricEncoder<'_>, v: i64) -> Result<(), std::fmt::Error> {
    ConstGauge::new(v).encode(e)
}

fn histogram(
    mut e: MetricEncoder<'_>,
    h: &HistogramSnapshot,
    scale: f64,
) -> Result<(), std::fmt::Error> {
    e.encode_histogram::<NoLabelSet>(h.sum as f64 * scale, h.count(), &h.cumulative(scale), None)
}

impl Collector for Scrape {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let m = &self.metrics;
        let mut e =
            enc.encode_descriptor("sluice_build", "Sluice version", None, MetricType::Info)?;
        e.encode_info(&[("version", env!("CARGO_PKG_VERSION"))])?;

        // Per topic and partition.
        type Pick = fn(&PartitionSample) -> u64;
        let counters: [(&str, &str, Pick); 2] = [
            (
                "sluice_records_appended",
                "Records appended since the broker started",
                |p| p.records,
            ),
            (
                "sluice_appended_bytes",
                "Bytes appended to the log since the broker started, batch framing included",
                |p| p.bytes,
            ),
        ];
        let any_partition = self.partitions().next().is_some();
        for (name, help, pick) in counters.into_iter().filter(|_| any_partition) {
            let mut e = enc.encode_descriptor(name, help, None, MetricType::Counter)?;
            for (labels, p) in self.partitions() {
                counter(e.encode_family(&labels)?, pick(p))?;
            }
        }
        let gauges: [(&str, &str, Pick); 4] = [
            ("sluice_log_start_offset", "First offset still held", |p| {
                p.stats.log_start
            }),
            (
                "sluice_log_end_offset",
                "Offset the next record will get",
                |p| p.stats.high_water,
            ),
            (
                "sluice_partition_size_bytes",
                "Bytes of the partition's segments on disk",
                |p| p.stats.size_bytes,
            ),
            (
                "sluice_partition_segments",
                "Segments of the partition",
                |p| p.stats.segments as u64,
            ),
        ];
        for (name, help, pick) in gauges.into_iter().filter(|_| any_partition) {
            let mut e = enc.encode_descriptor(name, help, None, MetricType::Gauge)?;
            for (labels, p) in self.partitions() {
                gauge(e.encode_family(&labels)?, pick(p) as i64)?;
            }
        }
        if self.topics.iter().any(|t| t.duplicates.is_some()) {
            let mut e = enc.encode_descriptor(
                "sluice_duplicates",
                "Idempotent Sends answered as duplicates since the broker started",
                None,
                MetricType::Counter,
            )?;
            for t in &self.topics {
                if let Some(d) = t.duplicates {
                    counter(e.encode_family(&[("topic", t.name.as_str())])?, d)?;
                }
            }
        }

        // Durability.
        if let Some(h) = &self.fsync {
            let e = enc.encode_descriptor(
                "sluice_fsync_duration_seconds",
                "Time each fdatasync of a partition log took",
                None,
                MetricType::Histogram,
            )?;
            histogram(e, h, NANOS)?;
        }
        if let Some(h) = &self.commit_records {
            let e = enc.encode_descriptor(
                "sluice_group_commit_records",
                "Records made durable by one sync (the size of a group commit)",
                None,
                MetricType::Histogram,
            )?;
            histogram(e, h, 1.0)?;
        }
        let e = enc.encode_descriptor(
            "sluice_send_duration_seconds",
            "From a Send's arrival to its answer, for Sends that succeeded (time to durable ack)",
            None,
            MetricType::Histogram,
        )?;
        histogram(e, &m.send_durable.snapshot(), NANOS)?;

        // Consumer groups.
        type GPick = fn(&crate::broker::groups::GroupPartitionDescription) -> u64;
        let group_gauges: [(&str, &str, GPick); 3] = [
            (
                "sluice_group_lag",
                "Records between the group's committed offset and the end",
                |p| p.lag,
            ),
            (
                "sluice_group_in_flight",
                "Deliveries out and not yet acknowledged",
                |p| p.in_flight,
            ),
            (
                "sluice_group_pending",
                "Records waiting for redelivery or being dead-lettered",
                |p| p.pending,
            ),
        ];
        let any_group = self.group_partitions().next().is_some();
        for (name, help, pick) in group_gauges.into_iter().filter(|_| any_group) {
            let mut e = enc.encode_descriptor(name, help, None, MetricType::Gauge)?;
            for (labels, p) in self.group_partitions() {
                gauge(e.encode_family(&labels)?, pick(p) as i64)?;
            }
        }
        let group_counters: [(&str, &str, GPick); 3] = [
            (
                "sluice_group_redeliveries",
                "Deliveries after the first, ever",
                |p| p.redeliveries,
            ),
            (
                "sluice_group_ack_timeouts",
                "Deliveries whose ack timeout passed, since the broker started",
                |p| p.ack_timeouts,
            ),
            (
                "sluice_group_dead_letters",
                "Records moved to <topic>.dlq, ever",
                |p| p.dead_lettered,
            ),
        ];
        for (name, help, pick) in group_counters.into_iter().filter(|_| any_group) {
            let mut e = enc.encode_descriptor(name, help, None, MetricType::Counter)?;
            for (labels, p) in self.group_partitions() {
                counter(e.encode_family(&labels)?, pick(p))?;
            }
        }
        if !self.groups.is_empty() {
            let mut e = enc.encode_descriptor(
                "sluice_group_members",
                "Members connected to the group on the topic",
                None,
                MetricType::Gauge,
            )?;
            for g in &self.groups {
                let labels = [("group", g.group.as_str()), ("topic", g.topic.as_str())];
                gauge(e.encode_family(&labels)?, g.members.len() as i64)?;
            }
        }

        self.encode_raft(&mut enc)?;

        // The server.
        let requests = m.requests();
        if !requests.is_empty() {
            let mut e = enc.encode_descriptor(
                "sluice_grpc_requests",
                "Finished gRPC calls by method and status code",
                None,
                MetricType::Counter,
            )?;
            for (method, code, n) in requests {
                let labels = [("method", method), ("code", CODES[code])];
                counter(e.encode_family(&labels)?, n)?;
            }
        }
        let e = enc.encode_descriptor(
            "sluice_records_delivered",
            "Records handed to subscribers and group members",
            None,
            MetricType::Counter,
        )?;
        counter(e, m.delivered.load(Ordering::Relaxed))?;
        let e = enc.encode_descriptor(
            "sluice_log_lines_lost",
            "Log lines that did not reach stderr (a closed log pipe, a full queue)",
            None,
            MetricType::Counter,
        )?;
        counter(e, crate::logging::lines_lost())?;
        let e = enc.encode_descriptor(
            "sluice_connections",
            "Open gRPC connections",
            None,
            MetricType::Gauge,
        )?;
        gauge(e, m.connections.load(Ordering::Relaxed))?;
        let e = enc.encode_descriptor(
            "sluice_subscriptions",
            "Open Subscribe streams (plain and group)",
            None,
            MetricType::Gauge,
        )?;
        gauge(e, m.subscriptions.load(Ordering::Relaxed))?;
        if let Some(free) = self.free_bytes {
            let e = enc.encode_descriptor(
                "sluice_data_dir_free_bytes",
                "Bytes free for the broker on the data directory's file system",
                None,
                MetricType::Gauge,
            )?;
            gauge(e, free as i64)?;
        }
        Ok(())
    }
}

impl Scrape {
    /// Cluster mode: each partition group this node runs.
    fn encode_raft(&self, enc: &mut DescriptorEncoder) -> Result<(), std::fmt::Error> {
        if self.raft.is_empty() {
            return Ok(());
        }
        type RPick = fn(&RaftSample) -> u64;
        let gauges: [(&str, &str, RPick); 6] = [
            (
                "sluice_raft_term",
                "The group's current term as this node knows it",
                |r| r.term,
            ),
            (
                "sluice_raft_leader",
                "1 when this node leads the group",
                |r| u64::from(r.leader),
            ),
            (
                "sluice_raft_has_leader",
                "1 when this node knows a leader of the group",
                |r| u64::from(r.has_leader),
            ),
            (
                "sluice_raft_last_log_index",
                "Index of the last entry in this node's log of the group",
                |r| r.last_log_index,
            ),
            (
                "sluice_raft_commit_index",
                "Highest index known committed (on the leader: held by a majority)",
                |r| r.commit_index,
            ),
            (
                "sluice_raft_applied_index",
                "Highest index this node has applied",
                |r| r.applied_index,
            ),
        ];
        let labels = |r: &RaftSample| {
            [
                ("topic", r.topic.clone()),
                ("partition", r.partition.to_string()),
            ]
        };
        for (name, help, pick) in gauges {
            let mut e = enc.encode_descriptor(name, help, None, MetricType::Gauge)?;
            for r in &self.raft {
                gauge(e.encode_family(&labels(r))?, pick(r) as i64)?;
            }
        }
        let counters: [(&str, &str, RPick); 2] = [
            (
                "sluice_raft_elections",
                "Terms begun since the group started on this node (each election begins one)",
                |r| r.elections,
            ),
            (
                "sluice_raft_snapshot_installs",
                "Snapshots installed from a leader since the group started on this node",
                |r| r.snapshot_installs,
            ),
        ];
        for (name, help, pick) in counters {
            let mut e = enc.encode_descriptor(name, help, None, MetricType::Counter)?;
            for r in &self.raft {
                counter(e.encode_family(&labels(r))?, pick(r))?;
            }
        }
        let followers = || {
            self.raft.iter().flat_map(|r| {
                r.followers.iter().map(move |&(node, entries, seconds)| {
                    let labels = [
                        ("topic", r.topic.clone()),
                        ("partition", r.partition.to_string()),
                        ("follower", node.to_string()),
                    ];
                    (labels, entries, seconds)
                })
            })
        };
        if followers().next().is_some() {
            let mut e = enc.encode_descriptor(
                "sluice_raft_follower_lag_entries",
                "On the group's leader: entries a follower does not hold yet",
                None,
                MetricType::Gauge,
            )?;
            for (labels, entries, _) in followers() {
                gauge(e.encode_family(&labels)?, entries as i64)?;
            }
            let mut e = enc.encode_descriptor(
                "sluice_raft_follower_lag_seconds",
                "On the group's leader: age of the oldest entry a follower does not hold yet (0 when it holds all)",
                None,
                MetricType::Gauge,
            )?;
            for (labels, _, seconds) in followers() {
                ConstGauge::new(seconds).encode(e.encode_family(&labels)?)?;
            }
        }
        Ok(())
    }
}
