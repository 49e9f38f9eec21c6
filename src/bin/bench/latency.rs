//! Latency distributions: exact percentiles over every sample (a run holds at most a few tens of
//! thousands, so sorting them all is cheaper and simpler than a histogram).

use std::time::Duration;

#[derive(Debug, Clone)]
pub struct Distribution {
    sorted: Vec<Duration>,
}

impl Distribution {
    pub fn new(mut samples: Vec<Duration>) -> Self {
        samples.sort_unstable();
        Self { sorted: samples }
    }

    /// The sample at or below which `p` percent of the samples fall (nearest rank); zero when
    /// empty.
    pub fn percentile(&self, p: f64) -> Duration {
        if self.sorted.is_empty() {
            return Duration::ZERO;
        }
        let rank = ((p / 100.0) * self.sorted.len() as f64).ceil() as usize;
        self.sorted[rank.clamp(1, self.sorted.len()) - 1]
    }

    pub fn p50(&self) -> Duration {
        self.percentile(50.0)
    }

    pub fn p99(&self) -> Duration {
        self.percentile(99.0)
    }

    pub fn max(&self) -> Duration {
        self.sorted.last().copied().unwrap_or_default()
    }

    /// `p50 / p90 / p99 / p99.9 / max` in milliseconds.
    pub fn summary(&self) -> String {
        format!(
            "p50 {} · p90 {} · p99 {} · p99.9 {} · max {}",
            ms(self.p50()),
            ms(self.percentile(90.0)),
            ms(self.p99()),
            ms(self.percentile(99.9)),
            ms(self.max())
        )
    }
}

/// A duration in milliseconds with a precision that suits its size.
pub fn ms(d: Duration) -> String {
    let ms = d.as_secs_f64() * 1000.0;
    if ms < 10.0 {
        format!("{ms:.2} ms")
    } else if ms < 100.0 {
        format!("{ms:.1} ms")
    } else {
        format!("{ms:.0} ms")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_nearest_rank_over_every_sample() {
        let d = Distribution::new((1..=100).rev().map(Duration::from_millis).collect());
        assert_eq!(d.p50(), Duration::from_millis(50));
        assert_eq!(d.p99(), Duration::from_millis(99));
        assert_eq!(d.percentile(99.9), Duration::from_millis(100));
        assert_eq!(d.max(), Duration::from_millis(100));
        assert_eq!(Distribution::new(Vec::new()).p99(), Duration::ZERO);
    }
}
