//! The board's read memory bandwidth: the ceiling a memory-bound GEMV can
//! reach, against which every cell's weight GB/s is shown.

use std::time::Instant;

/// Buffer far larger than any last-level cache of the boards we target
/// (a Pi 5 has 2 MiB L3), small enough for a 1 GiB board.
const BUFFER_BYTES: usize = 256 << 20;
const SWEEPS: usize = 3;

/// Best-of-`SWEEPS` GB/s (1e9 bytes/s) reading a buffer with `threads` threads.
pub fn read_bandwidth_gbps(threads: usize) -> f64 {
    let words = BUFFER_BYTES / 8;
    // Touch every page first so the sweeps measure reads, not page faults.
    let buffer: Vec<u64> = (0..words as u64).collect();
    let chunk = words.div_ceil(threads.max(1));
    let mut best = f64::MAX;
    for _ in 0..SWEEPS {
        let start = Instant::now();
        let total: u64 = std::thread::scope(|scope| {
            let handles: Vec<_> = buffer
                .chunks(chunk)
                .map(|part| scope.spawn(move || sum_words(part)))
                .collect();
            handles.into_iter().map(|h| h.join().unwrap_or(0)).sum()
        });
        std::hint::black_box(total);
        best = best.min(start.elapsed().as_secs_f64());
    }
    BUFFER_BYTES as f64 / best / 1e9
}

/// Four independent accumulators so the loop is bound by loads, not by
/// the add latency; the compiler vectorises it.
fn sum_words(words: &[u64]) -> u64 {
    let mut acc = [0u64; 4];
    let mut quads = words.chunks_exact(4);
    for q in &mut quads {
        for (a, &w) in acc.iter_mut().zip(q) {
            *a = a.wrapping_add(w);
        }
    }
    let tail: u64 = quads.remainder().iter().fold(0, |a, &w| a.wrapping_add(w));
    acc.iter().fold(tail, |a, &w| a.wrapping_add(w))
}
