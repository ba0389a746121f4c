//! Prometheus metrics, the same way in every daemon: a daemon keeps its counters, gauges and
//! histograms as [`prometheus_client`] metrics (atomics the hot path updates without a lock;
//! a histogram takes one short uncontended lock), registers every family once in a
//! [`prometheus_client::registry::Registry`], wraps that in a [`MetricsRegistry`] and hands it
//! to the one hardened `/metrics` responder ([`serve_metrics`]).
//!
//! The exposition is prometheus-client's encoding of the registry in the Prometheus text
//! format, version 0.0.4 ([`CONTENT_TYPE`]), which every Prometheus scrapes. Not OpenMetrics
//! (prometheus-client's other text encoder): OpenMetrics names a counter's family without
//! `_total`, so colo-blockd's gauge `colo_blockd_nbd_connections` and its counter
//! `colo_blockd_nbd_connections_total` would be two families of one name, which OpenMetrics
//! forbids.

mod http;

pub use http::{MAX_CONNECTIONS, REQUEST_TIMEOUT, serve_metrics};

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::prometheus_text;
use prometheus_client::registry::Registry;

/// A gauge of a size, a count or an epoch: `u64`, so every value is exact (prometheus-client's
/// default gauge is an `i64`).
pub type Gauge = prometheus_client::metrics::gauge::Gauge<u64, AtomicU64>;

/// The content type of the exposition: the Prometheus text format, version 0.0.4.
pub const CONTENT_TYPE: &str = prometheus_text::CONTENT_TYPE;

/// A daemon's complete metrics registry, every family registered, as the `/metrics`
/// responder serves it. The metrics in it are shared handles: the daemon keeps clones and
/// updates them; encoding reads them.
#[derive(Debug, Default)]
pub struct MetricsRegistry {
    registry: Registry,
}

impl MetricsRegistry {
    /// Wraps a registry whose families are all registered.
    pub fn new(registry: Registry) -> MetricsRegistry {
        MetricsRegistry { registry }
    }

    /// The registry.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// The exposition text ([`CONTENT_TYPE`]): every family with its `# HELP` and `# TYPE`.
    pub fn encode(&self) -> String {
        let mut text = String::new();
        // Writing into a String cannot fail, and neither does encoding classic metrics.
        if let Err(err) = prometheus_text::encode(&mut text, &self.registry) {
            tracing::error!(%err, "could not encode the metrics registry");
        }
        text
    }
}

impl From<Registry> for MetricsRegistry {
    fn from(registry: Registry) -> MetricsRegistry {
        MetricsRegistry::new(registry)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use prometheus_client::metrics::counter::Counter;
    use prometheus_client::metrics::family::Family;
    use prometheus_client::metrics::histogram::Histogram;

    #[test]
    fn histogram_buckets_are_cumulative_and_end_in_the_count() {
        let h = Histogram::new([0.001, 0.01, 0.1]);
        let mut registry = Registry::default();
        registry.register("x_seconds", "Test", h.clone());
        for ms in [0, 5, 5, 50, 5000] {
            h.observe(std::time::Duration::from_millis(ms).as_secs_f64());
        }
        let out = MetricsRegistry::new(registry).encode();
        for line in [
            "# HELP x_seconds Test.",
            "# TYPE x_seconds histogram",
            "x_seconds_bucket{le=\"0.001\"} 1",
            "x_seconds_bucket{le=\"0.01\"} 3",
            "x_seconds_bucket{le=\"0.1\"} 4",
            "x_seconds_bucket{le=\"+Inf\"} 5",
            "x_seconds_sum 5.06",
            "x_seconds_count 5",
        ] {
            assert!(out.lines().any(|l| l == line), "{line} missing from\n{out}");
        }
    }

    #[test]
    fn counters_get_total_and_labels_are_escaped() {
        let family = Family::<Vec<(&'static str, String)>, Counter>::default();
        let mut registry = Registry::default();
        registry.register("m", "a\\b\nc", family.clone());
        family
            .get_or_create(&vec![
                ("export", "x\"y\\z\nw".to_owned()),
                ("k", "v".into()),
            ])
            .inc_by(7);
        assert_eq!(
            MetricsRegistry::new(registry).encode(),
            "# HELP m_total a\\\\b\\nc.\n# TYPE m_total counter\n\
             m_total{export=\"x\\\"y\\\\z\\nw\",k=\"v\"} 7\n"
        );
    }
}
