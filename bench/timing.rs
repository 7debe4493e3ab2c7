//! The clock of the benchmarks (each example includes this file with `#[path]`).

use std::time::Instant;

/// Seconds of each of `reps` calls of `f`, fastest first, after 200 ms of warm-up calls (clock
/// ramp-up, the pool's workers awake).
pub fn sorted_times(reps: usize, mut f: impl FnMut()) -> Vec<f64> {
    let warm = Instant::now();
    while warm.elapsed().as_millis() < 200 {
        f();
    }
    let mut s: Vec<f64> = (0..reps)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .collect();
    s.sort_by(f64::total_cmp);
    s
}
