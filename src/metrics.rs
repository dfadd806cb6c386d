//! Counters and histograms the hot paths update with one relaxed atomic add each; nothing here
//! allocates or locks after construction. They are read only when `/metrics` is scraped (see
//! `server::http`), which is where names, labels and units are given.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

/// Upper bounds of the duration buckets, in nanoseconds (50 µs to 2.5 s).
const DURATION_BOUNDS_NS: [u64; 15] = [
    50_000,
    100_000,
    250_000,
    500_000,
    1_000_000,
    2_500_000,
    5_000_000,
    10_000_000,
    25_000_000,
    50_000_000,
    100_000_000,
    250_000_000,
    500_000_000,
    1_000_000_000,
    2_500_000_000,
];

/// Upper bounds of the count buckets (1 to 16384, powers of two).
const COUNT_BOUNDS: [u64; 15] = [
    1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384,
];

/// A fixed-bucket histogram of integer observations (nanoseconds or counts). One bucket more
/// than bounds: the last is `+Inf`.
#[derive(Debug)]
pub struct Histogram {
    bounds: &'static [u64],
    buckets: [AtomicU64; 16],
    sum: AtomicU64,
}

/// A histogram read at one moment; snapshots of several histograms with the same bounds add up.
#[derive(Debug, Clone, PartialEq)]
pub struct HistogramSnapshot {
    pub bounds: &'static [u64],
    /// Observations per bucket (not cumulative); the last is `+Inf`.
    pub buckets: [u64; 16],
    pub sum: u64,
}

impl Histogram {
    /// Durations from 50 µs to 2.5 s.
    pub fn durations() -> Histogram {
        Histogram::with_bounds(&DURATION_BOUNDS_NS)
    }

    /// Counts from 1 to 16384.
    pub fn counts() -> Histogram {
        Histogram::with_bounds(&COUNT_BOUNDS)
    }

    fn with_bounds(bounds: &'static [u64]) -> Histogram {
        Histogram {
            bounds,
            buckets: Default::default(),
            sum: AtomicU64::new(0),
        }
    }

    pub fn observe(&self, value: u64) {
        let i = self.bounds.partition_point(|&b| b < value);
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        self.sum.fetch_add(value, Ordering::Relaxed);
    }

    pub fn observe_duration(&self, d: Duration) {
        self.observe(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
    }

    pub fn snapshot(&self) -> HistogramSnapshot {
        let mut buckets = [0; 16];
        for (b, a) in buckets.iter_mut().zip(&self.buckets) {
            *b = a.load(Ordering::Relaxed);
        }
        HistogramSnapshot {
            bounds: self.bounds,
            buckets,
            sum: self.sum.load(Ordering::Relaxed),
        }
    }
}

impl HistogramSnapshot {
    pub fn empty_like(h: &Histogram) -> HistogramSnapshot {
        HistogramSnapshot {
            bounds: h.bounds,
            buckets: [0; 16],
            sum: 0,
        }
    }

    pub fn add(&mut self, other: &HistogramSnapshot) {
        for (a, b) in self.buckets.iter_mut().zip(&other.buckets) {
            *a += b;
        }
        self.sum += other.sum;
    }

    pub fn count(&self) -> u64 {
        self.buckets.iter().sum()
    }

    /// Cumulative `(upper bound, count)` pairs with bounds multiplied by `scale`, ending with
    /// `+Inf`: what the exposition format wants.
    pub fn cumulative(&self, scale: f64) -> Vec<(f64, u64)> {
        let mut total = 0;
        let mut out = Vec::with_capacity(self.bounds.len() + 1);
        for (i, n) in self.buckets.iter().take(self.bounds.len() + 1).enumerate() {
            total += n;
            let bound = self
                .bounds
                .get(i)
                .map_or(f64::INFINITY, |&b| b as f64 * scale);
            out.push((bound, total));
        }
        out
    }

    /// The smallest bucket bound (times `scale`) at or below which `q` of the observations
    /// fall; `None` without observations. An upper estimate, as Prometheus' own.
    pub fn quantile(&self, q: f64, scale: f64) -> Option<f64> {
        let count = self.count();
        if count == 0 {
            return None;
        }
        let rank = (q * count as f64).ceil() as u64;
        self.cumulative(scale)
            .into_iter()
            .find(|&(_, c)| c >= rank.max(1))
            .map(|(b, _)| b)
    }
}

/// Every gRPC method the server knows, by path; anything else is counted as `other`.
pub const METHODS: [&str; 20] = [
    "/sluice.v1.Broker/Send",
    "/sluice.v1.Broker/Subscribe",
    "/sluice.v1.Broker/Ack",
    "/sluice.v1.Broker/Nack",
    "/sluice.v1.Admin/CreateTopic",
    "/sluice.v1.Admin/DeleteTopic",
    "/sluice.v1.Admin/ListTopics",
    "/sluice.v1.Admin/DescribeTopic",
    "/sluice.v1.Admin/ListGroups",
    "/sluice.v1.Admin/DescribeGroup",
    "/sluice.v1.Admin/ResetGroup",
    "/sluice.v1.Admin/DeleteGroup",
    "/sluice.v1.Admin/Compact",
    "/broker.Broker/Send",
    "/broker.Broker/Subscribe",
    "/grpc.health.v1.Health/Check",
    "/grpc.health.v1.Health/Watch",
    "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
    "other",
];

const OTHER_METHOD: usize = METHODS.len() - 1;

/// gRPC status codes 0 (OK) to 16 (UNAUTHENTICATED).
pub const STATUS_CODES: usize = 17;

/// The index of a request path in [`METHODS`].
pub fn method_index(path: &str) -> usize {
    METHODS[..OTHER_METHOD]
        .iter()
        .position(|m| *m == path)
        .unwrap_or(OTHER_METHOD)
}

/// The broker-wide counters and gauges (per-partition ones live with their partitions and
/// consumer groups).
#[derive(Debug)]
pub struct Metrics {
    /// Finished gRPC calls by method and status code.
    requests: [[AtomicU64; STATUS_CODES]; METHODS.len()],
    pub connections: AtomicI64,
    pub subscriptions: AtomicI64,
    /// Records handed to subscription streams (plain and group, both APIs).
    pub delivered: AtomicU64,
    /// From a Send's arrival to its answer, for Sends whose messages were all stored durably.
    pub send_durable: Histogram,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            requests: std::array::from_fn(|_| std::array::from_fn(|_| AtomicU64::new(0))),
            connections: AtomicI64::new(0),
            subscriptions: AtomicI64::new(0),
            delivered: AtomicU64::new(0),
            send_durable: Histogram::durations(),
        }
    }
}

impl Metrics {
    /// Counts one finished call; codes past 16 count as UNKNOWN (2).
    pub fn request_done(&self, method: usize, code: i32) {
        let code = usize::try_from(code)
            .ok()
            .filter(|&c| c < STATUS_CODES)
            .unwrap_or(2);
        if let Some(row) = self.requests.get(method) {
            row[code].fetch_add(1, Ordering::Relaxed);
        }
    }

    pub fn delivered(&self, records: usize) {
        self.delivered.fetch_add(records as u64, Ordering::Relaxed);
    }

    fn gauge(&self, g: Gauge) -> &AtomicI64 {
        match g {
            Gauge::Connections => &self.connections,
            Gauge::Subscriptions => &self.subscriptions,
        }
    }

    /// Non-zero `(method, code, count)` triples.
    pub fn requests(&self) -> Vec<(&'static str, usize, u64)> {
        let mut out = Vec::new();
        for (m, row) in self.requests.iter().enumerate() {
            for (code, n) in row.iter().enumerate() {
                let n = n.load(Ordering::Relaxed);
                if n > 0 {
                    out.push((METHODS[m], code, n));
                }
            }
        }
        out
    }
}

/// A gauge [`Raised`] can hold up.
#[derive(Debug, Clone, Copy)]
pub enum Gauge {
    Connections,
    Subscriptions,
}

/// Keeps a gauge raised by one while it lives.
#[derive(Debug)]
pub struct Raised {
    metrics: Arc<Metrics>,
    gauge: Gauge,
}

impl Raised {
    pub fn new(metrics: Arc<Metrics>, gauge: Gauge) -> Raised {
        metrics.gauge(gauge).fetch_add(1, Ordering::Relaxed);
        Raised { metrics, gauge }
    }
}

impl Drop for Raised {
    fn drop(&mut self) {
        self.metrics
            .gauge(self.gauge)
            .fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn observations_land_in_the_first_bucket_whose_bound_holds_them() {
        let h = Histogram::counts();
        for v in [0, 1, 2, 3, 16384, 16385, 1 << 40] {
            h.observe(v);
        }
        let s = h.snapshot();
        let c = s.cumulative(1.0);
        assert_eq!(c[0], (1.0, 2)); // 0 and 1
        assert_eq!(c[1], (2.0, 3));
        assert_eq!(c[2], (4.0, 4));
        assert_eq!(c[14], (16384.0, 5));
        assert_eq!(c[15].1, 7);
        assert!(c[15].0.is_infinite());
        assert_eq!(s.sum, 1 + 2 + 3 + 16384 + 16385 + (1 << 40));
        assert_eq!(s.quantile(0.5, 1.0), Some(4.0));
        assert_eq!(s.quantile(1.0, 1.0), Some(f64::INFINITY));
    }

    #[test]
    fn snapshots_add_up_and_durations_scale_to_seconds() {
        let a = Histogram::durations();
        let b = Histogram::durations();
        a.observe_duration(Duration::from_micros(40));
        b.observe_duration(Duration::from_millis(3));
        let mut s = HistogramSnapshot::empty_like(&a);
        s.add(&a.snapshot());
        s.add(&b.snapshot());
        assert_eq!(s.count(), 2);
        let c = s.cumulative(1e-9);
        assert_eq!(c[0], (50e-6, 1));
        assert_eq!(c[6], (5e-3, 2));
        assert_eq!(s.quantile(0.99, 1e-9), Some(5e-3));
        assert_eq!(HistogramSnapshot::empty_like(&a).quantile(0.5, 1.0), None);
    }

    #[test]
    fn every_known_method_has_its_own_row_and_the_rest_share_other() {
        for (i, m) in METHODS[..OTHER_METHOD].iter().enumerate() {
            assert_eq!(method_index(m), i, "{m}");
        }
        assert_eq!(method_index("/x.Y/Z"), OTHER_METHOD);
        let m = Metrics::default();
        m.request_done(0, 0);
        m.request_done(0, 0);
        m.request_done(0, 99);
        assert_eq!(m.requests(), vec![(METHODS[0], 0, 2), (METHODS[0], 2, 1)]);
    }
}
