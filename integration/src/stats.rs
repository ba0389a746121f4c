//! Order statistics for the reports (checkpoint pauses, HTTP latencies).

use std::time::Duration;

/// The `q`-quantile (0.0..=1.0) by the nearest-rank method; `None` for no samples.
pub fn quantile(samples: &[Duration], q: f64) -> Option<Duration> {
    if samples.is_empty() {
        return None;
    }
    let mut sorted = samples.to_vec();
    sorted.sort_unstable();
    let rank = (q.clamp(0.0, 1.0) * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.saturating_sub(1).min(sorted.len() - 1)])
}

/// Median (nearest rank).
pub fn median(samples: &[Duration]) -> Option<Duration> {
    quantile(samples, 0.5)
}

/// Milliseconds with one decimal, or "-" when there is nothing to show.
pub fn ms(value: Option<Duration>) -> String {
    value.map_or_else(
        || "-".to_string(),
        |d| format!("{:.1}", d.as_secs_f64() * 1000.0),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn millis(values: &[u64]) -> Vec<Duration> {
        values.iter().copied().map(Duration::from_millis).collect()
    }

    #[test]
    fn quantiles_use_nearest_rank() {
        let s = millis(&[5, 1, 4, 2, 3, 10, 9, 8, 7, 6]);
        assert_eq!(median(&s), Some(Duration::from_millis(5)));
        assert_eq!(quantile(&s, 0.9), Some(Duration::from_millis(9)));
        assert_eq!(quantile(&s, 1.0), Some(Duration::from_millis(10)));
        assert_eq!(quantile(&s, 0.0), Some(Duration::from_millis(1)));
    }

    #[test]
    fn empty_has_no_quantile() {
        assert_eq!(median(&[]), None);
        assert_eq!(ms(None), "-");
        assert_eq!(ms(Some(Duration::from_micros(6260))), "6.3");
    }
}
