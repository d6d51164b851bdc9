//! Does the kernel matrix predict the model? A synthetic model with
//! Llama-3-8B's layer dimensions (2 layers by default), decoded token by
//! token like llama-bench's tg, against the GEMV time of each of its weight
//! matrices measured the way a kernel cell is.
//!
//!     cargo run --release -p kernels --example model_share [-- --layers 2 --threads 1]
//!
//! For each type it prints the measured decode time per token; the sum of
//! the GEMVs of every matrix a token streams (the kernel matrix's prediction);
//! and for `ffn_down` (4096x14336, the DRAM-sized shape of issue 15) its own
//! GEMV beside its share of the measured token time, the share being its
//! bytes over all weight bytes (decode streams every weight once per token).
//! Weights are LLM-like, placed as llama.cpp places them (mmap, repacked
//! where the CPU backend repacks). A benchmark: numbers, not assertions.

mod common;

use kernels::model::LoadedModel;
use kernels::synthetic::{write_llama, LlamaDims, WrittenMatrix};
use kernels::weights::{activations, weights, Distribution};
use kernels::{quantize, GgmlType, LoadMode, MatMul, StagedMatrix};
use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;

const SEED: u64 = 42;
const TOKENS: usize = 16;

fn main() {
    let layers = common::arg("--layers", 2);
    let threads = common::arg("--threads", 1);
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/stories260K.gguf");
    let dims = LlamaDims::LLAMA3_8B.with_layers(layers);
    println!(
        "synthetic llama: Llama-3-8B layers x{layers}, vocab of the fixture tokenizer, \
         {threads} thread(s), tg{TOKENS}, best of 3\n"
    );
    println!(
        "{:<6} {:>9} {:>10} {:>12} {:>8} | {:>12} {:>14} {:>7}",
        "type", "MB", "tg ms/tok", "sum GEMV ms", "ratio", "down GEMV ms", "down share ms", "ratio"
    );
    for ty in [GgmlType::Q8_0, GgmlType::Q4_0, GgmlType::Q4K] {
        let path = std::env::temp_dir().join(format!("qb-model-share-{ty}-{layers}.gguf"));
        let matrices =
            write_llama(&path, &fixture, dims, ty, SEED).expect("write the synthetic model");
        let token_ms = decode_ms_per_token(&path, threads);
        let gemv_ms = gemv_ms_by_shape(&matrices, threads);
        // The embedding is a row lookup, not a GEMV: it streams one row.
        let streamed: Vec<&WrittenMatrix> = matrices
            .iter()
            .filter(|m| m.name != "token_embd.weight")
            .collect();
        let predicted: f64 = streamed.iter().map(|m| gemv_ms[&(m.rows, m.cols)]).sum();
        let total_bytes: usize = streamed.iter().map(|m| m.bytes).sum();
        let down = streamed
            .iter()
            .find(|m| m.name.ends_with("ffn_down.weight"))
            .expect("a layer");
        let down_share = token_ms * down.bytes as f64 / total_bytes as f64;
        let down_gemv = gemv_ms[&(down.rows, down.cols)];
        println!(
            "{:<6} {:>9.0} {:>10.2} {:>12.2} {:>8.2} | {:>12.2} {:>14.2} {:>7.2}",
            ty.to_string(),
            total_bytes as f64 / 1e6,
            token_ms,
            predicted,
            predicted / token_ms,
            down_gemv,
            down_share,
            down_gemv / down_share
        );
        let _ = std::fs::remove_file(&path);
    }
}

/// llama-bench's tg: one token per decode after a one-token prompt; the
/// best of 3 runs of `TOKENS` tokens, per token.
fn decode_ms_per_token(path: &Path, threads: usize) -> f64 {
    let mut model = LoadedModel::load(path, 64, threads).expect("load the synthetic model");
    let mut best = f64::INFINITY;
    for _ in 0..3 {
        model.clear();
        model.decode(&[1], 0, false).expect("decode");
        let start = Instant::now();
        for pos in 1..=TOKENS {
            model.decode(&[2], pos, false).expect("decode");
        }
        best = best.min(start.elapsed().as_secs_f64() * 1e3 / TOKENS as f64);
    }
    best
}

/// One GEMV time (median of 30, ms) per distinct matrix shape, on LLM-like
/// weights placed as the model's are.
fn gemv_ms_by_shape(matrices: &[WrittenMatrix], threads: usize) -> BTreeMap<(usize, usize), f64> {
    let mut out = BTreeMap::new();
    for m in matrices {
        if out.contains_key(&(m.rows, m.cols)) {
            continue;
        }
        let w = weights(Distribution::LlmLike, m.rows, m.cols, SEED);
        let q = quantize(m.ty, m.rows, m.cols, &w).expect("quantize");
        let staged = StagedMatrix::stage(q, LoadMode::Mmap, &std::env::temp_dir()).expect("stage");
        let mut mm = MatMul::new(&staged, 1, threads, true).expect("matmul");
        mm.set_activations(&activations(Distribution::LlmLike, 1, m.cols, SEED))
            .expect("activations");
        out.insert((m.rows, m.cols), common::median_gemv_us(&mut mm) / 1e3);
    }
    out
}
