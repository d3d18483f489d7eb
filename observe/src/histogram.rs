//! Latency histograms cheap enough for the data path.
//!
//! One thread records (the queue thread that owns the histogram), any
//! thread reads. Recording is a bucket search over [`BOUNDS_NS`] and two
//! plain loads and stores: no lock, no read-modify-write instruction, since
//! nobody else writes. Readers take a [`Snapshot`]: its counts may be a
//! sample or two behind, never torn. Snapshots subtract (the last minute of
//! a histogram is `now - minute_ago`), estimate quantiles, and feed the
//! Prometheus histogram of the `metrics` facade off the data path
//! ([`Snapshot::publish_since`]), with the same buckets.

use std::sync::atomic::{AtomicU64, Ordering};

/// Bucket upper bounds, nanoseconds: 10 µs to 60 s in 1-2-5 steps.
pub const BOUNDS_NS: [u64; 22] = [
    10_000,
    20_000,
    50_000,
    100_000,
    200_000,
    500_000,
    1_000_000,
    2_000_000,
    5_000_000,
    10_000_000,
    20_000_000,
    50_000_000,
    100_000_000,
    200_000_000,
    500_000_000,
    1_000_000_000,
    2_000_000_000,
    5_000_000_000,
    10_000_000_000,
    20_000_000_000,
    30_000_000_000,
    60_000_000_000,
];

/// The same bounds in seconds, for the exporter's bucket configuration.
pub fn bounds_seconds() -> Vec<f64> {
    BOUNDS_NS.iter().map(|ns| *ns as f64 / 1e9).collect()
}

const BUCKETS: usize = BOUNDS_NS.len() + 1;

/// A counter with one writer: `add` is a load and a store.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    /// Adds `n`. Only the owning thread may call this (one writer).
    #[inline]
    pub fn add(&self, n: u64) {
        self.0.store(
            self.0.load(Ordering::Relaxed).wrapping_add(n),
            Ordering::Relaxed,
        );
    }

    /// Subtracts `n` (for gauges kept as counters). One writer, as `add`.
    #[inline]
    pub fn sub(&self, n: u64) {
        self.0.store(
            self.0.load(Ordering::Relaxed).wrapping_sub(n),
            Ordering::Relaxed,
        );
    }

    /// Sets the value. One writer, as `add`.
    #[inline]
    pub fn set(&self, n: u64) {
        self.0.store(n, Ordering::Relaxed);
    }

    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// A latency histogram with one writer; see the module docs.
#[derive(Debug, Default)]
pub struct Histogram {
    counts: [Counter; BUCKETS],
    sum_ns: Counter,
}

impl Histogram {
    /// Records one latency. Only the owning thread may call this.
    #[inline]
    pub fn record_ns(&self, ns: u64) {
        let bucket = BOUNDS_NS.partition_point(|bound| *bound < ns);
        self.counts[bucket].add(1);
        self.sum_ns.add(ns);
    }

    pub fn snapshot(&self) -> Snapshot {
        let mut s = Snapshot::default();
        for (to, from) in s.counts.iter_mut().zip(&self.counts) {
            *to = from.get();
        }
        s.sum_ns = self.sum_ns.get();
        s
    }
}

/// A histogram's counts at one moment (or summed over several).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Snapshot {
    pub counts: [u64; BUCKETS],
    pub sum_ns: u64,
}

impl Snapshot {
    pub fn count(&self) -> u64 {
        self.counts.iter().sum()
    }

    /// Adds another histogram's counts (several queues into one figure).
    pub fn merge(&mut self, other: &Snapshot) {
        for (a, b) in self.counts.iter_mut().zip(&other.counts) {
            *a += b;
        }
        self.sum_ns += other.sum_ns;
    }

    /// What was recorded after `earlier`.
    pub fn since(&self, earlier: &Snapshot) -> Snapshot {
        let mut d = Snapshot::default();
        for ((d, now), then) in d.counts.iter_mut().zip(&self.counts).zip(&earlier.counts) {
            *d = now.saturating_sub(*then);
        }
        d.sum_ns = self.sum_ns.saturating_sub(earlier.sum_ns);
        d
    }

    /// The `q` quantile (0..=1) in nanoseconds, interpolated within its
    /// bucket; None without samples. Past the last bound: the last bound.
    pub fn quantile_ns(&self, q: f64) -> Option<u64> {
        let total = self.count();
        if total == 0 {
            return None;
        }
        let rank = (q.clamp(0.0, 1.0) * total as f64).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (i, count) in self.counts.iter().enumerate() {
            if *count == 0 {
                continue;
            }
            if seen + count >= rank {
                let low = if i == 0 { 0 } else { BOUNDS_NS[i - 1] };
                let Some(high) = BOUNDS_NS.get(i) else {
                    return Some(low);
                };
                let within = (rank - seen) as f64 / *count as f64;
                return Some(low + ((high - low) as f64 * within) as u64);
            }
            seen += count;
        }
        None
    }

    /// Records into `histogram` (a Prometheus histogram with the same
    /// buckets) what was recorded since `earlier`: each bucket's samples as
    /// their mean, which lies in that bucket, so counts land exactly and
    /// the sum is kept.
    pub fn publish_since(&self, earlier: &Snapshot, histogram: &metrics::Histogram) {
        let delta = self.since(earlier);
        let total = delta.count();
        if total == 0 {
            return;
        }
        // Per-bucket sums are not kept; spread the exact total sum over the
        // buckets in proportion to their midpoints, then clamp each mean
        // into its bucket.
        let weight: f64 = delta
            .counts
            .iter()
            .enumerate()
            .map(|(i, c)| *c as f64 * midpoint_ns(i))
            .sum();
        let scale = if weight > 0.0 {
            delta.sum_ns as f64 / weight
        } else {
            1.0
        };
        for (i, count) in delta.counts.iter().enumerate() {
            if *count == 0 {
                continue;
            }
            let low = if i == 0 { 0 } else { BOUNDS_NS[i - 1] } as f64;
            let high = BOUNDS_NS.get(i).map_or(f64::MAX, |b| *b as f64);
            let mean_ns = (midpoint_ns(i) * scale).clamp(low + 1.0, high);
            histogram.record_many(mean_ns / 1e9, *count as usize);
        }
    }
}

fn midpoint_ns(bucket: usize) -> f64 {
    let low = if bucket == 0 {
        0
    } else {
        BOUNDS_NS[bucket - 1]
    };
    let high = BOUNDS_NS.get(bucket).copied().unwrap_or(2 * low);
    (low + high) as f64 / 2.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_land_in_their_bucket() {
        let h = Histogram::default();
        h.record_ns(5_000); // below 10 µs
        h.record_ns(10_000); // exactly on a bound: le
        h.record_ns(10_001);
        h.record_ns(61_000_000_000); // past 60 s
        let s = h.snapshot();
        assert_eq!(s.counts[0], 2);
        assert_eq!(s.counts[1], 1);
        assert_eq!(s.counts[BUCKETS - 1], 1);
        assert_eq!(s.count(), 4);
        assert_eq!(s.sum_ns, 5_000 + 10_000 + 10_001 + 61_000_000_000);
    }

    #[test]
    fn quantiles_and_deltas() {
        let h = Histogram::default();
        for _ in 0..90 {
            h.record_ns(150_000); // 100..200 µs
        }
        let before = h.snapshot();
        for _ in 0..10 {
            h.record_ns(3_000_000); // 2..5 ms
        }
        let s = h.snapshot();
        let p50 = s.quantile_ns(0.5).expect("p50");
        assert!((100_000..=200_000).contains(&p50), "{p50}");
        let p99 = s.quantile_ns(0.99).expect("p99");
        assert!((2_000_000..=5_000_000).contains(&p99), "{p99}");
        let d = s.since(&before);
        assert_eq!(d.count(), 10);
        assert_eq!(d.sum_ns, 30_000_000);
        assert_eq!(Snapshot::default().quantile_ns(0.5), None);
        let mut m = d;
        m.merge(&before);
        assert_eq!(m, s);
    }
}
