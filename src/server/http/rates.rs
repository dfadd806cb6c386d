//! The rate history the console draws as soon as a page loads: every [`INTERVAL`] the
//! broker's running totals (records appended to every topic, records delivered to
//! subscribers), the last 15 minutes of them kept in a ring. Rates are the differences between
//! neighbouring samples, worked out by the page; a restart starts an empty ring.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;

use crate::broker::Broker;

/// Time between two samples.
pub const INTERVAL: Duration = Duration::from_secs(5);
/// Samples kept: 15 minutes.
pub const SAMPLES: usize = 180;

/// One sample of the broker's running totals.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Sample {
    /// When, in ms since the Unix epoch.
    pub t_ms: i64,
    pub appended: u64,
    pub delivered: u64,
}

/// The last [`SAMPLES`] samples, oldest first.
#[derive(Debug, Default)]
pub struct RateHistory {
    ring: Mutex<VecDeque<Sample>>,
}

impl RateHistory {
    /// Takes a sample of `broker` now.
    pub fn sample(&self, broker: &Broker) {
        let appended = broker
            .open_topics()
            .iter()
            .flat_map(|t| t.partitions.iter())
            .map(|p| p.log.metrics().records.load(Ordering::Relaxed))
            .sum();
        let t_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i64);
        self.push(Sample {
            t_ms,
            appended,
            delivered: broker.metrics().delivered.load(Ordering::Relaxed),
        });
    }

    fn push(&self, s: Sample) {
        let mut ring = self.ring.lock().unwrap_or_else(|p| p.into_inner());
        if ring.len() == SAMPLES {
            ring.pop_front();
        }
        ring.push_back(s);
    }

    /// Every sample kept, oldest first.
    pub fn samples(&self) -> Vec<Sample> {
        let ring = self.ring.lock().unwrap_or_else(|p| p.into_inner());
        ring.iter().copied().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ring_keeps_the_newest_fifteen_minutes_oldest_first() {
        let h = RateHistory::default();
        for i in 0..SAMPLES as i64 + 20 {
            h.push(Sample {
                t_ms: i * 5000,
                appended: i as u64,
                delivered: 0,
            });
        }
        let s = h.samples();
        assert_eq!(s.len(), SAMPLES);
        assert_eq!(s[0].t_ms, 20 * 5000);
        assert_eq!(s[SAMPLES - 1].appended, SAMPLES as u64 + 19);
        assert!(s.windows(2).all(|w| w[1].t_ms - w[0].t_ms == 5000));
    }
}
