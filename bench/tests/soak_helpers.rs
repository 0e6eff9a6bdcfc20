//! The soak's pure helpers through the library's public API.

use refleet_bench::soak::{Rng, slope};

#[test]
fn a_steady_rss_leak_is_found_in_kib_per_minute() {
    // One sample a second for 10 minutes, RSS growing 64 KiB/min plus ±2 MiB of alternating noise.
    let pts: Vec<(f64, f64)> = (0..600)
        .map(|s| {
            let min = s as f64 / 60.0;
            let saw = if s % 2 == 0 { 2048.0 } else { -2048.0 };
            (min, 100_000.0 + 64.0 * min + saw)
        })
        .collect();
    let s = slope(&pts).unwrap_or(f64::NAN);
    assert!((s - 64.0).abs() < 5.0, "{s}");
}

#[test]
fn a_seed_replays_the_same_churn() {
    let a: Vec<u64> = (0..5)
        .map({
            let mut r = Rng::new(15);
            move |_| r.next_u64()
        })
        .collect();
    let b: Vec<u64> = (0..5)
        .map({
            let mut r = Rng::new(15);
            move |_| r.next_u64()
        })
        .collect();
    assert_eq!(a, b);
    assert_ne!(
        a,
        (0..5)
            .map({
                let mut r = Rng::new(16);
                move |_| r.next_u64()
            })
            .collect::<Vec<_>>()
    );
}
