//! Refusals (failed authentications, permission denials) go into `_audit` without letting a
//! client that keeps failing write the trail at its own pace.
//!
//! Refusals are counted per source: the client's IP address (not its port: a client that
//! reconnects is the same source) and the principal it was taken for. In each window of
//! [`WINDOW`] a source's first refusal of each kind (decision, RPC, resource, answer) is
//! recorded at once, up to [`AT_ONCE`] kinds; every further one, a repeat or a kind past that
//! limit, is only counted, and one summary record per source (the count, and the first
//! refusal not recorded) follows when the window ends. So a source adds at most
//! `AT_ONCE + 1` records per window, however fast it fails; sources beyond [`SOURCES`] at once
//! share one. A source refused more than [`AT_ONCE`] times beyond those recorded in a window
//! has each further refusal answered only after [`SLOWED`]: it is slowed down, the calls of
//! everyone else are not.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::audit::{AuditEvent, AuditTrail, Decision};
use super::error::Result;

/// How long a source's refusals are summarised together.
pub const WINDOW: Duration = Duration::from_secs(10);

/// Kinds of refusal of one source recorded at once per window; as many repeats go unslowed.
pub const AT_ONCE: usize = 32;

/// How long a source refused more than `AT_ONCE` times past those recorded waits for each
/// further answer, within the window.
pub const SLOWED: Duration = Duration::from_millis(250);

/// Sources followed at once; refusals of any other share one summary.
pub const SOURCES: usize = 4096;

/// Who is refused: IP address and principal (`*` for the shared overflow source).
type Source = (String, String);

/// A kind of refusal: decision, RPC, resource, the answer.
type Kind = (Option<Decision>, String, String, String);

#[derive(Debug)]
struct Window {
    start: Instant,
    recorded: HashSet<Kind>,
    /// Refusals counted but not recorded, and the first of them.
    unrecorded: u64,
    example: Option<AuditEvent>,
}

/// What to do about one refusal: the records to write now (a summary of the window before
/// may come first), and how long to wait before answering.
#[derive(Debug, Default)]
pub struct Verdict {
    pub record: Vec<AuditEvent>,
    pub delay: Duration,
}

/// Refusals into the audit trail: each recorded, or counted into a summary, as due.
#[derive(Debug)]
pub struct RefusalLog {
    trail: Arc<AuditTrail>,
    refusals: Refusals,
}

impl RefusalLog {
    pub fn new(trail: Arc<AuditTrail>) -> RefusalLog {
        RefusalLog {
            trail,
            refusals: Refusals::default(),
        }
    }

    /// Counts a refusal (a failed authentication or a denial): records it, or a summary, if
    /// due; returns how long to wait before answering it.
    pub async fn record(&self, event: AuditEvent) -> Result<Duration> {
        let verdict = self.refusals.refused(event, Instant::now());
        for e in verdict.record {
            self.trail.record(e).await?;
        }
        Ok(verdict.delay)
    }

    /// Records the summaries of the windows that have ended (`all`: of every window, at a
    /// stop).
    pub async fn summarise(&self, all: bool) -> Result<()> {
        let summaries = if all {
            self.refusals.all()
        } else {
            self.refusals.ended(Instant::now())
        };
        for e in summaries {
            self.trail.record(e).await?;
        }
        Ok(())
    }
}

/// The refusals of the current windows.
#[derive(Debug, Default)]
pub struct Refusals {
    windows: std::sync::Mutex<HashMap<Source, Window>>,
}

impl Refusals {
    /// Counts `event`, a refusal, at `now`.
    pub fn refused(&self, event: AuditEvent, now: Instant) -> Verdict {
        let mut windows = self.windows.lock().unwrap_or_else(|p| p.into_inner());
        let mut verdict = Verdict::default();
        let mut source = (ip_of(&event.peer), event.principal.clone());
        if !windows.contains_key(&source) && windows.len() >= SOURCES {
            verdict.record.extend(ended(&mut windows, now));
            if windows.len() >= SOURCES {
                source = ("*".into(), "*".into());
            }
        }
        let window = windows.entry(source).or_insert_with(|| Window {
            start: now,
            recorded: HashSet::new(),
            unrecorded: 0,
            example: None,
        });
        if now.duration_since(window.start) >= WINDOW {
            verdict.record.extend(summary(window));
            *window = Window {
                start: now,
                recorded: HashSet::new(),
                unrecorded: 0,
                example: None,
            };
        }
        let kind = (
            event.decision,
            event.rpc.clone(),
            event.resource.clone(),
            event.outcome.clone(),
        );
        if window.recorded.len() < AT_ONCE && window.recorded.insert(kind) {
            verdict.record.push(event);
        } else {
            window.unrecorded += 1;
            window.example.get_or_insert(event);
            if window.unrecorded > AT_ONCE as u64 {
                verdict.delay = SLOWED;
            }
        }
        verdict
    }

    /// The summaries of the windows ended by `now`, which are forgotten.
    pub fn ended(&self, now: Instant) -> Vec<AuditEvent> {
        let mut windows = self.windows.lock().unwrap_or_else(|p| p.into_inner());
        ended(&mut windows, now)
    }

    /// The summaries of every window, ended or not (at a stop), which are forgotten.
    pub fn all(&self) -> Vec<AuditEvent> {
        let mut windows = self.windows.lock().unwrap_or_else(|p| p.into_inner());
        windows
            .drain()
            .filter_map(|(_, mut w)| summary(&mut w))
            .collect()
    }
}

fn ended(windows: &mut HashMap<Source, Window>, now: Instant) -> Vec<AuditEvent> {
    let mut summaries = Vec::new();
    windows.retain(|_, w| {
        if now.duration_since(w.start) < WINDOW {
            return true;
        }
        summaries.extend(summary(w));
        false
    });
    summaries
}

/// The record of a window's refusals that were counted only, if any.
fn summary(window: &mut Window) -> Option<AuditEvent> {
    let mut event = window.example.take()?;
    let n = window.unrecorded;
    event.outcome = format!(
        "{} (and {} more refusals of this source not recorded one by one within {} s; this is \
         the first of them)",
        event.outcome,
        n - 1,
        WINDOW.as_secs()
    );
    event.peer = ip_of(&event.peer);
    Some(event.count("refusals", n))
}

/// The IP address of `peer` (`ip:port`, or `[ip]:port`), or `peer` as it is.
fn ip_of(peer: &str) -> String {
    match peer.parse::<std::net::SocketAddr>() {
        Ok(addr) => addr.ip().to_string(),
        Err(_) => peer.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refusal(peer: &str, rpc: &str) -> AuditEvent {
        AuditEvent {
            principal: "anonymous".into(),
            peer: peer.into(),
            rpc: rpc.into(),
            decision: Some(Decision::Unauthenticated),
            outcome: "UNAUTHENTICATED: bad token".into(),
            ..AuditEvent::default()
        }
    }

    #[test]
    fn a_source_failing_fast_adds_a_bounded_number_of_records_and_is_slowed_down() {
        let r = Refusals::default();
        let t0 = Instant::now();
        let (mut records, mut slowed) = (Vec::new(), 0);
        // 20,000 refusals in one window, over new connections (ports) and 40 RPCs.
        for i in 0..20_000u64 {
            let peer = format!("10.0.0.7:{}", 1000 + i % 5000);
            let v = r.refused(refusal(&peer, &format!("rpc{}", i % 40)), t0);
            records.extend(v.record);
            slowed += usize::from(v.delay == SLOWED);
        }
        assert_eq!(
            records.len(),
            AT_ONCE,
            "one record per kind, up to the limit"
        );
        assert_eq!(
            slowed,
            20_000 - 2 * AT_ONCE,
            "slowed once past its allowance"
        );
        // The window ends: one summary counting every refusal not recorded.
        let summaries = r.ended(t0 + WINDOW);
        assert_eq!(summaries.len(), 1);
        assert_eq!(summaries[0].counts["refusals"], 20_000 - AT_ONCE as u64);
        assert_eq!(summaries[0].peer, "10.0.0.7");
        assert!(
            r.ended(t0 + WINDOW * 2).is_empty(),
            "forgotten once summarised"
        );
    }

    #[test]
    fn each_source_and_each_new_window_is_recorded_at_once() {
        let r = Refusals::default();
        let t0 = Instant::now();
        for peer in ["10.0.0.1:5", "10.0.0.2:5", "[::1]:5"] {
            assert_eq!(r.refused(refusal(peer, "a"), t0).record.len(), 1, "{peer}");
        }
        // The same refusal again: counted; in the next window: recorded again, after the
        // summary of the one before.
        assert!(r.refused(refusal("10.0.0.1:6", "a"), t0).record.is_empty());
        let next = r.refused(refusal("10.0.0.1:7", "a"), t0 + WINDOW);
        assert_eq!(next.record.len(), 2);
        assert_eq!(next.record[0].counts["refusals"], 1);
        assert_eq!(next.delay, Duration::ZERO);
        // A window with nothing counted ends without a summary.
        assert!(r.ended(t0 + WINDOW * 3).is_empty());
    }

    #[test]
    fn sources_past_the_limit_share_one_summary() {
        let r = Refusals::default();
        let t0 = Instant::now();
        let mut records = 0;
        for i in 0..(SOURCES as u64 + 1000) {
            let peer = format!("10.{}.{}.{}:1", i >> 16, (i >> 8) & 255, i & 255);
            for _ in 0..2 {
                records += r.refused(refusal(&peer, "a"), t0).record.len();
            }
        }
        // Each followed source records its first; the shared one records one kind.
        assert_eq!(records, SOURCES + 1);
        let summaries = r.all();
        assert_eq!(summaries.len(), SOURCES + 1);
        let shared: u64 = summaries
            .iter()
            .filter(|s| s.counts["refusals"] > 1)
            .map(|s| s.counts["refusals"])
            .sum();
        assert_eq!(shared, 1000 * 2 - 1);
    }
}
