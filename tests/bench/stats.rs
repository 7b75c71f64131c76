//! Latency percentiles and small report helpers.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// Collected latency samples.
#[derive(Debug, Default, Clone)]
pub(crate) struct Samples(Vec<u64>);

impl Samples {
    pub(crate) fn with_capacity(n: usize) -> Self {
        Self(Vec::with_capacity(n))
    }

    pub(crate) fn push(&mut self, d: Duration) {
        self.0.push(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
    }

    pub(crate) fn extend(&mut self, other: Self) {
        self.0.extend(other.0);
    }

    pub(crate) fn len(&self) -> usize {
        self.0.len()
    }

    /// Percentile `p` (0–100) in microseconds.
    pub(crate) fn percentile_us(&mut self, p: f64) -> f64 {
        if self.0.is_empty() {
            return f64::NAN;
        }
        self.0.sort_unstable();
        let rank = ((p / 100.0) * (self.0.len() - 1) as f64).round() as usize;
        self.0[rank.min(self.0.len() - 1)] as f64 / 1000.0
    }

    /// "p50 x µs, p99 y µs, max z µs (n samples)".
    pub(crate) fn summary(&mut self) -> String {
        format!(
            "p50 {:.1} µs, p90 {:.1} µs, p99 {:.1} µs, max {:.1} µs ({} samples)",
            self.percentile_us(50.0),
            self.percentile_us(90.0),
            self.percentile_us(99.0),
            self.percentile_us(100.0),
            self.len()
        )
    }
}

/// Resident set size of a process in KiB (from /proc).
pub(crate) fn rss_kib(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| anyhow::anyhow!("no VmRSS for {pid}"))
}

/// The soft limit on open files of this process.
pub(crate) fn nofile_limit() -> u64 {
    std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|l| {
            l.lines()
                .find(|l| l.starts_with("Max open files"))
                .and_then(|l| l.split_whitespace().nth(3).and_then(|v| v.parse().ok()))
        })
        .unwrap_or(1024)
}

/// How long a stopped sender waits for the acks still due.
const DRAIN: Duration = Duration::from_secs(10);

/// A sender's sends awaiting their ack, oldest first: the window it keeps full, the
/// send → ack latencies it samples, and the drain once it stops (how late the last acks
/// come, how many never do).
pub(crate) struct Inflight {
    sent: VecDeque<Instant>,
    window: usize,
    acks: Samples,
    drain_max: Duration,
    drain_until: Option<Instant>,
}

impl Inflight {
    pub(crate) fn new(window: usize) -> Self {
        Self {
            sent: VecDeque::with_capacity(window),
            window,
            acks: Samples::default(),
            drain_max: Duration::ZERO,
            drain_until: None,
        }
    }

    /// How many sends to make now (the room in the window; none while stopping), or
    /// `None` when the sender is done: stopped with nothing due, or [`DRAIN`] into the
    /// drain.
    pub(crate) fn room(&mut self, stopping: bool) -> Option<usize> {
        if !stopping {
            return Some(self.window.saturating_sub(self.sent.len()));
        }
        if self.sent.is_empty() {
            return None;
        }
        let until = *self
            .drain_until
            .get_or_insert_with(|| Instant::now() + DRAIN);
        (Instant::now() <= until).then_some(0)
    }

    /// A send went out.
    pub(crate) fn sent(&mut self) {
        self.sent.push_back(Instant::now());
    }

    /// The oldest send was acknowledged: its latency is sampled when `sample`, or counts
    /// toward the drain's lateness once `stopping`.
    pub(crate) fn acked(&mut self, stopping: bool, sample: bool) {
        if let Some(t) = self.sent.pop_front() {
            if stopping {
                self.drain_max = self.drain_max.max(t.elapsed());
            } else if sample {
                self.acks.push(t.elapsed());
            }
        }
    }

    /// (ack samples, sends never acknowledged, the slowest ack after the stop).
    pub(crate) fn finish(self) -> (Samples, u64, Duration) {
        (self.acks, self.sent.len() as u64, self.drain_max)
    }
}

#[cfg(test)]
mod tests {
    use super::Inflight;

    #[test]
    fn a_window_fills_samples_acks_and_drains() {
        let mut w = Inflight::new(3);
        assert_eq!(w.room(false), Some(3));
        w.sent();
        w.sent();
        assert_eq!(w.room(false), Some(1));
        w.acked(false, true); // measured
        w.acked(false, false); // warm-up: not sampled
        assert_eq!(w.room(false), Some(3));
        w.sent();
        w.sent();
        // Stopping: no new sends while acks are due, done once none are.
        assert_eq!(w.room(true), Some(0));
        w.acked(true, true);
        assert_eq!(w.room(true), Some(0));
        let (mut acks, unacked, _late) = w.finish();
        assert_eq!((acks.len(), unacked), (1, 1));
        assert!(acks.percentile_us(50.0).is_finite());
        let mut done = Inflight::new(1);
        assert_eq!(done.room(true), None);
    }
}
