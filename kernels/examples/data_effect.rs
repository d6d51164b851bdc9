//! Why a quantized GEMV's time moves with the synthetic data, and whether
//! where the weights sit has anything to do with it.
//!
//!     cargo run --release -p kernels --example data_effect [-- --rounds 3]
//!
//! Prints, for a DRAM-sized and a cache-sized shape, one thread, batch 1:
//! 1. uniform vs llm-like weights under each placement: `heap` (the kernel
//!    matrix before placement existed, llama.cpp's `--no-mmap`), `mmap`
//!    (llama.cpp's default load: a mapped file read in place) and `repack`
//!    (the CPU backend's repack buffer), best median of interleaved rounds;
//! 2. the switch: the same quantized blocks with only their f16 block scales
//!    exchanged (uniform codes carrying llm-like scales, llm-like codes with
//!    every scale set to one value), each against uniform and llm-like
//!    activations, with how many distinct scale values the weights have and
//!    how many 64-byte lines of GGML's 256 KiB f16-to-f32 table they touch.
//!
//! A benchmark, not a test: read the numbers, they are not asserted.

mod common;

use kernels::weights::{activations, weights, Distribution};
use kernels::{quantize, GgmlType, LoadMode, MatMul, QuantizedMatrix, StagedMatrix};
use std::collections::BTreeSet;

const SHAPES: [(&str, usize, usize); 2] = [
    ("llama3-8b.ffn_down", 4096, 14336),
    ("llama3.2-1b.attn_q", 2048, 2048),
];
const TYPES: [GgmlType; 3] = [GgmlType::Q8_0, GgmlType::Q4K, GgmlType::Q4_0];
const SEED: u64 = 42;

#[derive(Clone, Copy)]
enum Placement {
    Heap,
    Mmap,
    Repack,
}

impl Placement {
    fn name(self) -> &'static str {
        match self {
            Placement::Heap => "heap (before)",
            Placement::Mmap => "mmap (after)",
            Placement::Repack => "repack",
        }
    }
}

fn main() {
    let rounds = std::env::args()
        .skip_while(|a| a != "--rounds")
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or(2usize);
    let scratch = std::env::temp_dir();
    println!(
        "GGML converts f16 block scales with: {}",
        if cfg!(target_arch = "x86_64") {
            "a lookup in ggml_table_f32_f16 (256 KiB), as on every x86 build"
        } else if cfg!(target_arch = "aarch64") {
            "the fp16 conversion instruction (no table)"
        } else {
            "see ggml-cpu/simd-mappings.h"
        }
    );
    println!("one thread, batch 1, best median of {rounds} interleaved rounds of 30 repetitions\n");
    println!(
        "{:<20} {:<6} {:<14} {:>12} {:>12} {:>9}  placement",
        "shape", "type", "placement", "uniform us", "llm-like us", "llm/unif"
    );
    let mut switch_rows = Vec::new();
    for (shape, m, k) in SHAPES {
        let uniform_w = weights(Distribution::Uniform, m, k, SEED);
        let llm_w = weights(Distribution::LlmLike, m, k, SEED);
        // Each distribution with its own activations, as in the kernel
        // matrix: activations are quantized to blocks with f16 scales too.
        let uniform_x = activations(Distribution::Uniform, 1, k, SEED);
        let llm_x = activations(Distribution::LlmLike, 1, k, SEED);
        for ty in TYPES {
            let uniform_q = quantize(ty, m, k, &uniform_w).expect("quantize uniform");
            let llm_q = quantize(ty, m, k, &llm_w).expect("quantize llm-like");
            for placement in [Placement::Heap, Placement::Mmap, Placement::Repack] {
                let (mode, repack) = match placement {
                    Placement::Heap => (LoadMode::NoMmap, false),
                    Placement::Mmap => (LoadMode::Mmap, false),
                    Placement::Repack => (LoadMode::Mmap, true),
                };
                let contenders = [
                    (uniform_q.clone(), &uniform_x[..]),
                    (llm_q.clone(), &llm_x[..]),
                ];
                let (times, placed) = time_interleaved(&contenders, mode, repack, rounds, &scratch);
                if matches!(placement, Placement::Repack) && !placed[0].starts_with("repack") {
                    println!(
                        "{shape:<20} {:<6} {:<14} (no repack layout for this type here)",
                        ty.to_string(),
                        placement.name()
                    );
                    continue;
                }
                println!(
                    "{shape:<20} {:<6} {:<14} {:>12.0} {:>12.0} {:>9.2}  {}",
                    ty.to_string(),
                    placement.name(),
                    times[0],
                    times[1],
                    times[1] / times[0],
                    placed[1]
                );
            }
            if let Some(offsets) = scale_offsets(ty) {
                let mut uniform_codes_llm_scales = uniform_q.clone();
                copy_scales(&llm_q, &mut uniform_codes_llm_scales, offsets);
                let mut llm_codes_one_scale = llm_q.clone();
                flatten_scales(&mut llm_codes_one_scale, offsets);
                let variants = [
                    ("uniform codes, uniform scales", uniform_q),
                    ("uniform codes, llm-like scales", uniform_codes_llm_scales),
                    ("llm-like codes, llm-like scales", llm_q),
                    ("llm-like codes, one scale", llm_codes_one_scale),
                ];
                // Every variant with both kinds of activations: their block
                // scales go through the same table.
                let contenders: Vec<(QuantizedMatrix, &[f32])> = variants
                    .iter()
                    .flat_map(|(_, q)| [(q.clone(), &uniform_x[..]), (q.clone(), &llm_x[..])])
                    .collect();
                let (times, _) =
                    time_interleaved(&contenders, LoadMode::Mmap, false, rounds, &scratch);
                for ((label, q), t) in variants.iter().zip(times.chunks(2)) {
                    let (distinct, lines) = scale_footprint(q, offsets);
                    switch_rows.push(format!(
                        "{shape:<20} {:<6} {label:<32} {:>9.0} {:>9.0} {distinct:>8} {lines:>8}",
                        ty.to_string(),
                        t[0],
                        t[1]
                    ));
                }
            }
        }
    }
    println!(
        "\nThe switch: same blocks, only the f16 scales exchanged (mmap placement, median us)\n"
    );
    println!(
        "{:<20} {:<6} {:<32} {:>9} {:>9} {:>8} {:>8}",
        "shape", "type", "weights", "x unif", "x llm", "scales", "lines"
    );
    for row in switch_rows {
        println!("{row}");
    }
}

/// Times each contender's GEMV in turn, `rounds` times, and keeps each one's
/// best median; also returns where each one's weights were placed.
fn time_interleaved(
    contenders: &[(QuantizedMatrix, &[f32])],
    mode: LoadMode,
    repack: bool,
    rounds: usize,
    scratch: &std::path::Path,
) -> (Vec<f64>, Vec<String>) {
    let mut best = vec![f64::INFINITY; contenders.len()];
    let mut placed = vec![String::new(); contenders.len()];
    for _ in 0..rounds {
        for (i, (q, x)) in contenders.iter().enumerate() {
            let staged = StagedMatrix::stage(q.clone(), mode, scratch).expect("stage");
            let mut mm = MatMul::new(&staged, 1, 1, repack).expect("matmul");
            mm.set_activations(x).expect("activations");
            best[i] = best[i].min(common::median_gemv_us(&mut mm));
            placed[i] = mm.placement();
        }
    }
    (best, placed)
}

/// Block size in bytes and the byte offsets of the f16 scales in a block.
fn scale_offsets(ty: GgmlType) -> Option<(usize, &'static [usize])> {
    match ty {
        GgmlType::Q8_0 => Some((34, &[0])),
        GgmlType::Q4_0 => Some((18, &[0])),
        // d and dmin of the 256-weight super-block; the 6-bit sub-block
        // scales are integers, decoded without the table.
        GgmlType::Q4K => Some((144, &[0, 2])),
        _ => None,
    }
}

fn copy_scales(
    from: &QuantizedMatrix,
    to: &mut QuantizedMatrix,
    (block, offsets): (usize, &[usize]),
) {
    let source = from.raw().to_vec();
    for (dst, src) in to.raw_mut().chunks_mut(block).zip(source.chunks(block)) {
        for &o in offsets {
            dst[o..o + 2].copy_from_slice(&src[o..o + 2]);
        }
    }
}

fn flatten_scales(q: &mut QuantizedMatrix, (block, offsets): (usize, &[usize])) {
    let first = q.raw()[..block].to_vec();
    for dst in q.raw_mut().chunks_mut(block) {
        for &o in offsets {
            dst[o..o + 2].copy_from_slice(&first[o..o + 2]);
        }
    }
}

/// Distinct f16 scale values, and the 64-byte lines of a 65536-entry f32
/// table (16 entries per line) they index.
fn scale_footprint(q: &QuantizedMatrix, (block, offsets): (usize, &[usize])) -> (usize, usize) {
    let mut values = BTreeSet::new();
    for b in q.raw().chunks(block) {
        for &o in offsets {
            values.insert(u16::from_le_bytes([b[o], b[o + 1]]));
        }
    }
    let lines: BTreeSet<u16> = values.iter().map(|v| v / 16).collect();
    (values.len(), lines.len())
}
