//! Prometheus metrics, the same way in every daemon: typed counters, gauges and histograms in
//! atomics that the hot path updates without a lock, an [`Exposition`] that renders them in the
//! text format (version 0.0.4) with [`Text`], and the one hardened `/metrics` responder
//! ([`serve_metrics`]).

mod http;
mod text;

pub use http::{CONTENT_TYPE, MAX_CONNECTIONS, REQUEST_TIMEOUT, serve_metrics};
pub use text::Text;

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// What a daemon's metrics registry gives the `/metrics` responder.
pub trait Exposition: Send + Sync + 'static {
    /// The whole exposition text, every family with its `# HELP` and `# TYPE`.
    fn render(&self) -> String;
}

/// A monotonically increasing count.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    /// Adds one.
    pub fn inc(&self) {
        self.add(1);
    }

    /// Adds `n`.
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }

    /// The count now.
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// A value that goes up and down (never below zero).
#[derive(Debug, Default)]
pub struct Gauge(AtomicU64);

impl Gauge {
    /// Sets the value.
    pub fn set(&self, value: u64) {
        self.0.store(value, Ordering::Relaxed);
    }

    /// Adds one.
    pub fn inc(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }

    /// Subtracts one (never below zero).
    pub fn dec(&self) {
        let _ = self
            .0
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| v.checked_sub(1));
    }

    /// The value now.
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// A histogram of durations over fixed bucket bounds (seconds, ascending).
#[derive(Debug)]
pub struct Histogram {
    bounds: &'static [f64],
    /// Observations per bucket, not cumulative; the last one is `+Inf`.
    buckets: Box<[AtomicU64]>,
    sum_nanos: AtomicU64,
    count: AtomicU64,
}

impl Histogram {
    /// An empty histogram over `bounds` (upper bounds in seconds, ascending; `+Inf` is added).
    pub fn new(bounds: &'static [f64]) -> Histogram {
        Histogram {
            bounds,
            buckets: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum_nanos: AtomicU64::new(0),
            count: AtomicU64::new(0),
        }
    }

    /// Records one duration.
    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        let i = self
            .bounds
            .iter()
            .position(|&le| secs <= le)
            .unwrap_or(self.bounds.len());
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        let nanos = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        self.sum_nanos.fetch_add(nanos, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    /// Observations so far.
    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    /// The sum of the observations.
    pub fn sum(&self) -> Duration {
        Duration::from_nanos(self.sum_nanos.load(Ordering::Relaxed))
    }

    /// Writes the family `name` (`_bucket` lines cumulative, ending in `+Inf` = `_count`, then
    /// `_sum` in seconds and `_count`).
    pub fn render(&self, text: &mut Text, name: &str, help: &str) {
        text.header(name, help, "histogram");
        let mut cumulative = 0;
        for (i, bucket) in self.buckets.iter().enumerate() {
            cumulative += bucket.load(Ordering::Relaxed);
            let le = self
                .bounds
                .get(i)
                .map_or_else(|| "+Inf".to_string(), |b| format!("{b}"));
            text.sample(&format!("{name}_bucket"), &[("le", &le)], cumulative);
        }
        let sum = self.sum().as_secs_f64();
        text.line(&format!("{name}_sum"), &[], &format!("{sum}"));
        text.sample(&format!("{name}_count"), &[], cumulative);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative_and_end_in_the_count() {
        static BOUNDS: [f64; 3] = [0.001, 0.01, 0.1];
        let h = Histogram::new(&BOUNDS);
        for ms in [0, 5, 5, 50, 5000] {
            h.observe(Duration::from_millis(ms));
        }
        let mut text = Text::default();
        h.render(&mut text, "x_seconds", "Test.");
        let out = text.finish();
        for line in [
            "x_seconds_bucket{le=\"0.001\"} 1",
            "x_seconds_bucket{le=\"0.01\"} 3",
            "x_seconds_bucket{le=\"0.1\"} 4",
            "x_seconds_bucket{le=\"+Inf\"} 5",
            "x_seconds_sum 5.06",
            "x_seconds_count 5",
        ] {
            assert!(out.lines().any(|l| l == line), "{line} missing from\n{out}");
        }
        assert_eq!(h.count(), 5);
    }

    #[test]
    fn gauges_do_not_go_below_zero() {
        let g = Gauge::default();
        g.dec();
        assert_eq!(g.get(), 0);
        g.inc();
        g.inc();
        g.dec();
        assert_eq!(g.get(), 1);
    }
}
