//! Latency histograms that many threads record into without a lock.
//!
//! [`AtomicHistogram`] keeps log-linear buckets of atomic counters: values below 16 ns
//! are exact, above that each power of two is split into 16 buckets, so a bucket spans
//! at most 1/16 of its lower bound. Quantiles are reported at the bucket's midpoint:
//! **the relative error of any quantile is at most 1/32 (3.125 %)**. Values above
//! [`MAX_TRACKED`] (about 18 minutes) are counted in the top bucket and reported as that
//! bound; [`HistogramSnapshot::max`] keeps the exact largest value.
//!
//! [`WindowedHistogram`] adds a sliding window: six slots of ten seconds each, so a
//! window read covers the last 50 to 60 seconds.
//!
//! Hand-written because the hot path must stay at a few atomic adds: `hdrhistogram`
//! needs `&mut` (a lock around it on every request), and the `metrics` crate's
//! histograms keep raw samples until a scrape, which bounds neither memory nor the
//! sliding-window read.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

const SUB_BITS: u32 = 4;
const SUB: u64 = 1 << SUB_BITS;
/// The largest value (in nanoseconds) given its own bucket: 2^40 ns, about 18 minutes.
pub const MAX_TRACKED: u64 = 1 << 40;
const MAX_EXP: u32 = 40;
/// Number of buckets: 16 exact ones, 16 per power of two from 2^4 up to 2^40, and one
/// for everything from 2^40 on.
pub(crate) const BUCKETS: usize = (MAX_EXP - SUB_BITS + 1) as usize * SUB as usize + 1;

/// The bucket of a value in nanoseconds.
#[inline]
pub(crate) fn bucket_of(value: u64) -> usize {
    if value < SUB {
        return value as usize;
    }
    let value = value.min(MAX_TRACKED);
    let exp = 63 - value.leading_zeros();
    let sub = (value >> (exp - SUB_BITS)) & (SUB - 1);
    ((exp - SUB_BITS + 1) as u64 * SUB + sub) as usize
}

/// The smallest value of a bucket, and the first value past it.
pub(crate) fn bucket_bounds(index: usize) -> (u64, u64) {
    let index = index as u64;
    if index < SUB {
        return (index, index + 1);
    }
    let exp = (index / SUB) as u32 + SUB_BITS - 1;
    let sub = index % SUB;
    let width = 1u64 << (exp - SUB_BITS);
    let low = (1u64 << exp) + sub * width;
    (low, low + width)
}

/// A histogram of nanosecond values, recorded lock-free from any thread.
#[derive(Debug)]
pub struct AtomicHistogram {
    buckets: Box<[AtomicU64]>,
    sum: AtomicU64,
    max: AtomicU64,
}

impl Default for AtomicHistogram {
    fn default() -> Self {
        Self::new()
    }
}

impl AtomicHistogram {
    /// An empty histogram (about 5 KiB).
    pub fn new() -> Self {
        Self {
            buckets: (0..BUCKETS).map(|_| AtomicU64::new(0)).collect(),
            sum: AtomicU64::new(0),
            max: AtomicU64::new(0),
        }
    }

    /// Records one value in nanoseconds.
    #[inline]
    pub fn record(&self, nanos: u64) {
        self.buckets[bucket_of(nanos)].fetch_add(1, Ordering::Relaxed);
        self.sum.fetch_add(nanos, Ordering::Relaxed);
        if nanos > self.max.load(Ordering::Relaxed) {
            self.max.fetch_max(nanos, Ordering::Relaxed);
        }
    }

    /// Records one value without adding it to the sum (for window slots, whose sum no
    /// reader asks for: one contended add fewer per request).
    #[inline]
    fn record_no_sum(&self, nanos: u64) {
        self.buckets[bucket_of(nanos)].fetch_add(1, Ordering::Relaxed);
        if nanos > self.max.load(Ordering::Relaxed) {
            self.max.fetch_max(nanos, Ordering::Relaxed);
        }
    }

    /// Records one duration.
    #[inline]
    pub fn record_duration(&self, d: Duration) {
        self.record(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
    }

    fn reset(&self) {
        for b in self.buckets.iter() {
            b.store(0, Ordering::Relaxed);
        }
        self.sum.store(0, Ordering::Relaxed);
        self.max.store(0, Ordering::Relaxed);
    }

    /// Adds this histogram's current counts into `into`.
    pub(crate) fn add_to(&self, into: &mut HistogramSnapshot) {
        for (total, bucket) in into.buckets.iter_mut().zip(self.buckets.iter()) {
            *total += bucket.load(Ordering::Relaxed);
        }
        into.sum = into.sum.saturating_add(self.sum.load(Ordering::Relaxed));
        into.max = into.max.max(self.max.load(Ordering::Relaxed));
    }

    /// A copy of the current counts.
    pub fn snapshot(&self) -> HistogramSnapshot {
        let mut out = HistogramSnapshot::empty();
        self.add_to(&mut out);
        out
    }
}

/// The counts of a histogram at one moment; merge, then ask for quantiles.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HistogramSnapshot {
    buckets: Vec<u64>,
    sum: u64,
    max: u64,
}

impl HistogramSnapshot {
    /// A snapshot with no values.
    pub fn empty() -> Self {
        Self {
            buckets: vec![0; BUCKETS],
            sum: 0,
            max: 0,
        }
    }

    /// How many values.
    pub fn count(&self) -> u64 {
        self.buckets.iter().sum()
    }

    /// The sum of the values, in nanoseconds.
    pub fn sum(&self) -> u64 {
        self.sum
    }

    /// The largest value, exact, in nanoseconds (0 when empty).
    pub fn max(&self) -> u64 {
        self.max
    }

    /// The value at quantile `q` (0.0 to 1.0) in nanoseconds, within 1/32 of the true
    /// value; `None` when empty.
    pub fn quantile(&self, q: f64) -> Option<u64> {
        let count = self.count();
        if count == 0 {
            return None;
        }
        let rank = ((q.clamp(0.0, 1.0) * count as f64).ceil() as u64).clamp(1, count);
        let mut seen = 0;
        for (index, &n) in self.buckets.iter().enumerate() {
            seen += n;
            if seen >= rank {
                let (low, high) = bucket_bounds(index);
                let mid = if high - low <= 1 {
                    low
                } else {
                    low + (high - low) / 2
                };
                // The midpoint can exceed the real largest value in the top bucket.
                return Some(mid.min(self.max));
            }
        }
        Some(self.max)
    }

    /// Counts at or below each bound (nanoseconds), cumulative, as Prometheus buckets
    /// want them. A fine bucket that straddles a bound is counted when its midpoint is at
    /// or below the bound, so each count is exact up to one fine bucket (1/16 of the
    /// bound) around it.
    pub fn cumulative_at(&self, bounds: &[u64]) -> Vec<u64> {
        let mut out = Vec::with_capacity(bounds.len());
        let mut index = 0;
        let mut running = 0u64;
        for &bound in bounds {
            while index < self.buckets.len() {
                let (low, high) = bucket_bounds(index);
                let mid = low + (high - low) / 2;
                if mid > bound {
                    break;
                }
                running += self.buckets[index];
                index += 1;
            }
            out.push(running);
        }
        out
    }

    /// Adds `other` into this one.
    pub fn merge(&mut self, other: &HistogramSnapshot) {
        for (a, b) in self.buckets.iter_mut().zip(&other.buckets) {
            *a += b;
        }
        self.sum = self.sum.saturating_add(other.sum);
        self.max = self.max.max(other.max);
    }
}

/// How long a sliding window is: [`SLOTS`] slots of [`SLOT_SECS`] seconds.
pub const SLOT_SECS: u64 = 10;
/// Slots in the sliding window.
pub const SLOTS: usize = 6;

/// A histogram since start plus a sliding window of the last minute.
#[derive(Debug, Default)]
pub struct WindowedHistogram {
    total: AtomicHistogram,
    slots: [Slot; SLOTS],
}

#[derive(Debug, Default)]
struct Slot {
    /// The ten-second period this slot holds, plus one (0: never used).
    period: AtomicU64,
    histogram: AtomicHistogram,
}

impl WindowedHistogram {
    /// Records `nanos` at `now_secs` (seconds on any monotonic scale shared by the
    /// readers).
    #[inline]
    pub fn record(&self, nanos: u64, now_secs: u64) {
        self.total.record(nanos);
        let period = now_secs / SLOT_SECS;
        let slot = &self.slots[(period % SLOTS as u64) as usize];
        let tag = period + 1;
        let current = slot.period.load(Ordering::Acquire);
        if current != tag {
            // The first writer of a new period clears what the slot held six periods
            // ago. A value recorded by another thread during the clear may be lost:
            // the window is approximate at slot boundaries, the total is exact.
            if current < tag
                && slot
                    .period
                    .compare_exchange(current, tag, Ordering::AcqRel, Ordering::Acquire)
                    .is_ok()
            {
                slot.histogram.reset();
            }
        }
        slot.histogram.record_no_sum(nanos);
    }

    /// Everything since start.
    pub fn total(&self) -> HistogramSnapshot {
        self.total.snapshot()
    }

    /// The slots that belong to the window ending at `now_secs` (its sum is not kept: 0).
    pub fn window(&self, now_secs: u64) -> HistogramSnapshot {
        let period = now_secs / SLOT_SECS;
        let oldest = period.saturating_sub(SLOTS as u64 - 1);
        let mut out = HistogramSnapshot::empty();
        for slot in &self.slots {
            let tag = slot.period.load(Ordering::Acquire);
            if tag > 0 && (oldest..=period).contains(&(tag - 1)) {
                slot.histogram.add_to(&mut out);
            }
        }
        out
    }
}

#[cfg(test)]
mod tests;
