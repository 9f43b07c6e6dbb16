use super::*;

/// A deterministic pseudo-random sequence (SplitMix64), so failures reproduce.
fn rng(seed: u64) -> impl FnMut() -> u64 {
    let mut state = seed;
    move || {
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

/// The exact quantile by the same rank rule the histogram uses.
fn exact(sorted: &[u64], q: f64) -> u64 {
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

fn check(name: &str, values: Vec<u64>) {
    let h = AtomicHistogram::new();
    for &v in &values {
        h.record(v);
    }
    let snap = h.snapshot();
    let mut sorted = values;
    sorted.sort_unstable();
    assert_eq!(snap.count(), sorted.len() as u64);
    assert_eq!(snap.max(), *sorted.last().unwrap());
    assert_eq!(snap.sum(), sorted.iter().sum::<u64>());
    for q in [0.0, 0.5, 0.9, 0.95, 0.99, 0.999, 1.0] {
        let want = exact(&sorted, q) as f64;
        let got = snap.quantile(q).unwrap() as f64;
        let error = (got - want).abs() / want.max(1.0);
        assert!(
            error <= 1.0 / 32.0 + 1e-9,
            "{name}: q{q} got {got} want {want} (error {error:.4})"
        );
    }
}

#[test]
fn quantiles_of_known_distributions_are_within_the_stated_error() {
    // Uniform latencies from 1 µs to 100 ms.
    let mut r = rng(1);
    check(
        "uniform",
        (0..100_000).map(|_| 1_000 + r() % 100_000_000).collect(),
    );

    // Exponential-like: most requests fast, a long tail (mean 5 ms).
    let mut r = rng(2);
    check(
        "exponential",
        (0..100_000)
            .map(|_| {
                let u = (r() >> 11) as f64 / (1u64 << 53) as f64;
                (-(1.0 - u).ln() * 5e6) as u64 + 1
            })
            .collect(),
    );

    // Bimodal: cache hits at ~200 µs, misses at ~40 ms.
    let mut r = rng(3);
    check(
        "bimodal",
        (0..50_000)
            .map(|i| {
                if i % 10 == 0 {
                    40_000_000 + r() % 5_000_000
                } else {
                    200_000 + r() % 20_000
                }
            })
            .collect(),
    );

    // Small and exact values.
    check("tiny", (0..16).chain(0..16).collect());
    // One huge value beyond the tracked range keeps its exact max.
    let h = AtomicHistogram::new();
    h.record(MAX_TRACKED * 4);
    assert_eq!(h.snapshot().max(), MAX_TRACKED * 4);
    assert_eq!(
        h.snapshot().quantile(1.0),
        Some(MAX_TRACKED + MAX_TRACKED / 32)
    );
}

#[test]
fn buckets_tile_the_range_without_gaps() {
    let mut expected_low = 0;
    for index in 0..BUCKETS {
        let (low, high) = bucket_bounds(index);
        assert_eq!(low, expected_low, "bucket {index}");
        assert!(high > low);
        assert!(
            (high - low) as f64 <= (low as f64 / 16.0).max(1.0),
            "bucket {index} too wide"
        );
        assert_eq!(bucket_of(low), index);
        assert_eq!(bucket_of(high - 1), index);
        expected_low = high;
    }
    assert_eq!(bucket_of(u64::MAX), bucket_of(MAX_TRACKED));
}

#[test]
fn empty_histograms_have_no_quantiles() {
    assert_eq!(HistogramSnapshot::empty().quantile(0.5), None);
    assert_eq!(HistogramSnapshot::empty().count(), 0);
}

#[test]
fn cumulative_buckets_are_monotonic_and_end_at_the_count() {
    let h = AtomicHistogram::new();
    for v in [500, 900, 2_000_000, 9_000_000_000] {
        h.record(v);
    }
    let bounds = [1_000, 1_000_000, 5_000_000, 10_000_000_000];
    let c = h.snapshot().cumulative_at(&bounds);
    assert_eq!(c, vec![2, 2, 3, 4]);
}

#[test]
fn the_window_forgets_what_is_older_than_a_minute() {
    let w = WindowedHistogram::default();
    w.record(1_000, 0);
    w.record(2_000, 5);
    w.record(3_000, 59);
    assert_eq!(w.window(59).count(), 3, "periods 0 to 5");
    assert_eq!(w.window(60).count(), 1, "period 0 has left the window");
    w.record(4_000, 60);
    let window = w.window(60);
    assert_eq!(
        (window.count(), window.max()),
        (2, 4_000),
        "slot 0 was reused for period 6"
    );
    assert_eq!(w.total().count(), 4, "the total keeps everything");
    assert_eq!(w.window(200).count(), 0, "a long-idle window is empty");
}
