//! Table-lookup formats for 2- and 3-bit weights (`LUT2`, `LUT3`), after
//! T-MAC (Wei et al., "T-MAC: CPU Renaissance via Table Lookup for Low-Bit
//! LLM Deployment on Edge", 2024). A weight is a uniform code `q` in
//! `0..2^bits` with an affine scale and minimum per block:
//! `w = D * s_b * q - M * m_b`, where `s_b` and `m_b` are the block's
//! figures and `D`, `M` f16 values per span of the row. LUT2 has Q2_K's
//! granularity and bits (blocks of 16 with 4-bit figures, an f16 pair per
//! 256 weights: 2.625 bits); LUT3 blocks of 32 with 6-bit figures under
//! the row's f16 pair (3.39 bits, under Q3_K's 3.4375). The quantizer
//! picks each block's scale and minimum by weighted least squares over
//! the input channels' sensitivities (the codebooks' weights).
//!
//! The kernels never decode a weight. The codes are stored as bit planes,
//! and per group of 4 activations the call builds once a 16-entry table of
//! their partial sums (`T[n] = sum of a_j for the bits j set in n`, int8
//! with one scale per block of 32 activations). A row's dot product with
//! those 4 activations is then `T[plane0] + 2 T[plane1] (+ 4 T[plane2])`,
//! each a 4-bit index: one byte shuffle (`vpshufb`, NEON `tbl`) looks up
//! 32 of them at once, so the work per weight is a fraction of an
//! instruction and does not grow with batch-1's single token. LUT2's
//! 16-weight scales multiply the integer sums (`vpmaddwd`, or `sdot`
//! multipliers), so its float epilogue stays one per 32 columns.
//!
//! Layout (the stored form is the kernels' form; no repack): rows in
//! groups of 16 (padded with zero rows), per group and block of 32 codes
//! first the plane pairs, 32 bytes per two subgroups (byte `2r + p` holds
//! plane `p` of row `r`, subgroup `2i` in the low nibble and `2i + 1` in
//! the high one), so `vpmaddubsw` with bytes `(1, 2)` adds the two planes
//! of a row into one int16 lane; then for LUT3 the third plane, 32 bytes
//! per four subgroups (byte `2r + e`: subgroup `4i + e` low, `4i + 2 + e`
//! high), looked up with two tables whose other bytes the shuffle zeroes.
//! The blocks' figures are stored per group apart from the codes. LUT2's
//! as the kernels read them: per block of 32 codes 32 bytes, byte
//! `2k + h` the scale (low nibble) and minimum (high) of the 16-weight
//! half `h` of the row in slot `k` ([`LUT2_SLOT_ROWS`]: the order in which
//! AVX2's `vpunpck`/`vpmaddwd` leave the rows). LUT3's 6-bit figures are
//! packed per block (`pack_figures`) and unpacked to bytes a group at a
//! time, in cache, before the kernels run. Then per group and span the 16
//! rows' f16 scales and minimums, in slot order.

use crate::codebook::{f16_round, SharedOutput, ROWS_PER_TASK};
use crate::pool::WorkerPool;
pub use wire::weight_format::{LutType, LUT_CODE_BLOCK, LUT_ROW_GROUP};

mod simd;

/// Rows the kernels multiply at once.
const ROWS: usize = LUT_ROW_GROUP;
/// Activations per table.
const SUBGROUP: usize = 4;
/// Columns of a block of codes, of tables and of their int8 scale.
const CODE_BLOCK: usize = LUT_CODE_BLOCK;
/// Activations per exact sum (for the minimums' term): LUT2's block.
const SUM_BLOCK: usize = 16;
/// Code blocks per LUT2 span of 256.
const LUT2_BLOCKS_PER_SPAN: usize = 8;

/// The row in each of LUT2's 16 slots: AVX2 interleaves two int16 sums
/// of 16 rows (`vpunpcklwd` within 128-bit lanes) into rows 0-3 and 8-11,
/// then 4-7 and 12-15. Its own inverse.
pub(crate) const LUT2_SLOT_ROWS: [usize; ROWS] =
    [0, 1, 2, 3, 8, 9, 10, 11, 4, 5, 6, 7, 12, 13, 14, 15];

/// The row in each slot of `ty`'s figures.
fn slot_rows(ty: LutType) -> [usize; ROWS] {
    if ty.bits == 2 {
        LUT2_SLOT_ROWS
    } else {
        std::array::from_fn(|k| k)
    }
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum LutError {
    #[error("{rows} x {cols}: {ty} rows need a multiple of {multiple} columns")]
    Shape {
        ty: String,
        rows: usize,
        cols: usize,
        multiple: usize,
    },
    #[error("staged table-lookup matrix {path}: {reason}")]
    Staged {
        path: std::path::PathBuf,
        reason: String,
    },
}

/// A quantized matrix in a table-lookup format (see the module comment
/// for the layout).
#[derive(Debug, Clone, PartialEq)]
pub struct LutMatrix {
    pub ty: LutType,
    pub rows: usize,
    pub cols: usize,
    /// Per group of 16 rows and block of 32 columns: the plane bytes.
    codes: Vec<u8>,
    /// Per group of 16 rows, the rows' scale and minimum figures of every
    /// block (see the module comment).
    block_figures: Vec<u8>,
    /// Per group and span: the 16 rows' f16 scales, then their f16
    /// minimums, in slot order.
    span_figures: Vec<u16>,
}

/// Bytes of one group's block of codes.
fn group_block_bytes(ty: LutType) -> usize {
    ROWS * CODE_BLOCK * ty.bits as usize / 8
}

/// `v` as f16 bits (round to nearest even).
fn to_f16(v: f32) -> u16 {
    // SAFETY: a pure conversion.
    unsafe { llama_cpp_sys_2::ggml_fp32_to_fp16(v) }
}

/// The f16 `bits` as f32, exactly (in Rust: the scalar paths call it per
/// figure, an FFI call each would cost).
pub(crate) fn from_f16(bits: u16) -> f32 {
    let sign = if bits & 0x8000 != 0 { -1f32 } else { 1f32 };
    let exponent = (bits >> 10) & 0x1F;
    let mantissa = (bits & 0x3FF) as u32;
    match exponent {
        0 => sign * mantissa as f32 * f32::from_bits(0x3380_0000), // 2^-24
        31 => f32::from_bits(((bits as u32 & 0x8000) << 16) | 0x7F80_0000 | mantissa << 13),
        _ => f32::from_bits(
            ((bits as u32 & 0x8000) << 16) | (exponent as u32 + 112) << 23 | mantissa << 13,
        ),
    }
}

/// Best `(scale, minimum)` for `w ~ scale * q - minimum`, `q` in
/// `0..=top`, `minimum >= 0`, by weighted least squares over a sweep of
/// starting scales (as GGML's K-quant search does).
fn fit_block(x: &[f32], importance: &[f32], top: f32) -> (f32, f32) {
    let max = x.iter().fold(f32::MIN, |m, &v| m.max(v));
    let min = x.iter().fold(0f32, |m, &v| m.min(v));
    if max - min <= 0.0 {
        return (0.0, -min);
    }
    let mut best = ((max - min) / top, -min, f64::MAX);
    for step in 0..=24 {
        let start = (max - min) / top * (0.6 + 0.025 * step as f32);
        let (mut scale, mut minimum) = (start, -min);
        // Alternate: codes for the scale and minimum, then the least
        // squares scale and minimum for those codes.
        for _ in 0..4 {
            let Some((s, m)) = refit(x, importance, scale, minimum, top) else {
                break;
            };
            (scale, minimum) = (s, m);
            let err = block_error(x, importance, scale, minimum, top);
            if err < best.2 {
                best = (scale, minimum, err);
            }
        }
    }
    (best.0, best.1)
}

/// The weighted least-squares scale and minimum (`>= 0`) for the codes
/// `scale` and `minimum` give, or `None` where no positive scale fits.
fn refit(x: &[f32], importance: &[f32], scale: f32, minimum: f32, top: f32) -> Option<(f32, f32)> {
    {
        let (mut sw, mut sq, mut sqq, mut sx, mut sqx) = (0f64, 0f64, 0f64, 0f64, 0f64);
        for (&v, &w) in x.iter().zip(importance) {
            let q = code(v, scale, minimum, top) as f64;
            let (v, w) = (v as f64, w as f64);
            sw += w;
            sq += w * q;
            sqq += w * q * q;
            sx += w * v;
            sqx += w * q * v;
        }
        let det = sw * sqq - sq * sq;
        if det <= 0.0 {
            return None;
        }
        let mut fitted = (sw * sqx - sq * sx) / det;
        let mut offset = (sx - fitted * sq) / sw;
        if offset > 0.0 {
            offset = 0.0;
            fitted = sqx / sqq;
        }
        (fitted > 0.0).then_some((fitted as f32, -offset as f32))
    }
}

fn code(v: f32, scale: f32, minimum: f32, top: f32) -> u8 {
    if scale > 0.0 {
        ((v + minimum) / scale).round().clamp(0.0, top) as u8
    } else {
        0
    }
}

fn block_error(x: &[f32], importance: &[f32], scale: f32, minimum: f32, top: f32) -> f64 {
    x.iter()
        .zip(importance)
        .map(|(&v, &w)| {
            let q = code(v, scale, minimum, top) as f32;
            w as f64 * ((scale * q - minimum - v) as f64).powi(2)
        })
        .sum()
}

/// The unit `u` for figures `round(v / u)` in `0..=levels` of `values`
/// with the least `sum weights (v - u figure)^2`: the largest value over
/// `levels` is not it where one block's value is far above the rest (the
/// others then get few steps). Tries units down to half of that, each
/// refined by least squares for its figures (as GGML's `make_qp_quants`).
fn figure_unit(values: &[f32], weights: &[f64], levels: i32) -> f32 {
    let max = values.iter().fold(0f32, |m, &v| m.max(v));
    if max <= 0.0 {
        return 0.0;
    }
    let figures = |unit: f32| {
        values
            .iter()
            .map(move |&v| (v / unit).round().clamp(0.0, levels as f32) as f64)
    };
    let error = |unit: f32| -> f64 {
        figures(unit)
            .zip(values)
            .zip(weights)
            .map(|((l, &v), &w)| w * (v as f64 - unit as f64 * l).powi(2))
            .sum()
    };
    let mut best = (max / levels as f32, error(max / levels as f32));
    for step in 1..=25 {
        let start = max / levels as f32 * (1.0 - 0.02 * step as f32);
        // Least squares for the figures this unit gives.
        let (mut vl, mut ll) = (0f64, 0f64);
        for ((l, &v), &w) in figures(start).zip(values).zip(weights) {
            vl += w * v as f64 * l;
            ll += w * l * l;
        }
        for unit in [start, if ll > 0.0 { (vl / ll) as f32 } else { start }] {
            let err = error(unit);
            if unit > 0.0 && err < best.1 {
                best = (unit, err);
            }
        }
    }
    best.0
}

/// One row quantized: per span its f16 scale and minimum, per block a
/// scale and a minimum figure (0..=15 or 0..=63), and one code a weight.
struct QuantizedRow {
    span_scales: Vec<f32>,
    span_mins: Vec<f32>,
    block_scales: Vec<u8>,
    block_mins: Vec<u8>,
    codes: Vec<u8>,
}

fn quantize_row(ty: LutType, row: &[f32], importance: &[f32]) -> QuantizedRow {
    let top = ((1u32 << ty.bits) - 1) as f32;
    let (block, span) = (ty.block(), ty.span(row.len()));
    let levels = ty.figure_levels() as i32;
    let figure = |v: f32, unit: f32| {
        if unit > 0.0 {
            (v / unit).round().clamp(0.0, levels as f32) as i32
        } else {
            0
        }
    };
    let mut out = QuantizedRow {
        span_scales: Vec::with_capacity(row.len() / span),
        span_mins: Vec::with_capacity(row.len() / span),
        block_scales: Vec::with_capacity(row.len() / block),
        block_mins: Vec::with_capacity(row.len() / block),
        codes: Vec::with_capacity(row.len()),
    };
    for (xs, ws) in row.chunks_exact(span).zip(importance.chunks_exact(span)) {
        let fits: Vec<(f32, f32)> = xs
            .chunks_exact(block)
            .zip(ws.chunks_exact(block))
            .map(|(x, w)| fit_block(x, w, top))
            .collect();
        // The span's f16 units of the figures: each chosen for the least
        // error its rounding adds to the weights (a scale's error counts
        // by the block's weighted squared codes, a minimum's by its
        // weights); the f16 rounding may take a step off the top, so the
        // figures clamp.
        let (mut scale_weights, mut min_weights) = (Vec::new(), Vec::new());
        for ((x, w), &(s, m)) in xs
            .chunks_exact(block)
            .zip(ws.chunks_exact(block))
            .zip(&fits)
        {
            let (mut codes2, mut sum) = (0f64, 0f64);
            for (&v, &wi) in x.iter().zip(w) {
                codes2 += wi as f64 * (code(v, s, m, top) as f64).powi(2);
                sum += wi as f64;
            }
            scale_weights.push(codes2);
            min_weights.push(sum);
        }
        let scales: Vec<f32> = fits.iter().map(|f| f.0).collect();
        let mins: Vec<f32> = fits.iter().map(|f| f.1).collect();
        let scale = f16_round(figure_unit(&scales, &scale_weights, levels));
        let minimum = f16_round(figure_unit(&mins, &min_weights, levels));
        out.span_scales.push(scale);
        out.span_mins.push(minimum);
        for ((x, w), &(s, m)) in xs
            .chunks_exact(block)
            .zip(ws.chunks_exact(block))
            .zip(&fits)
        {
            // The rounded figures and their neighbours: the best pair for
            // the block's codes (each rounded alone is not, and 4- and
            // 6-bit steps are coarse).
            let (s0, m0) = (figure(s, scale), figure(m, minimum));
            let mut best = (s0, m0, f64::MAX);
            for sb in (s0 - 1).max(0)..=(s0 + 1).min(levels) {
                for mb in (m0 - 1).max(0)..=(m0 + 1).min(levels) {
                    let err = block_error(x, w, scale * sb as f32, minimum * mb as f32, top);
                    if err < best.2 {
                        best = (sb, mb, err);
                    }
                }
            }
            let (sb, mb) = (best.0 as u8, best.1 as u8);
            out.block_scales.push(sb);
            out.block_mins.push(mb);
            let (s, m) = (scale * sb as f32, minimum * mb as f32);
            out.codes.extend(x.iter().map(|&v| code(v, s, m, top)));
        }
    }
    out
}

/// Low nibbles of 16 bytes.
const NIBBLES: u128 = 0x0F0F_0F0F_0F0F_0F0F_0F0F_0F0F_0F0F_0F0F;

/// One block's 6-bit figures of a group's 16 rows, 24 bytes: byte `r`
/// the low 4 bits of row `r`'s scale (low nibble) and minimum (high
/// nibble), then 4 bytes of the scales' top 2 bits and 4 of the minimums'
/// (byte `i`: rows `i`, `i + 4`, `i + 8`, `i + 12` at bits 0, 2, 4, 6),
/// which `unpack_figures` spreads with word-wide shifts.
fn pack_figures(scales: &[u8], mins: &[u8], out: &mut Vec<u8>) {
    debug_assert_eq!((scales.len(), mins.len()), (ROWS, ROWS));
    out.extend((0..ROWS).map(|r| (scales[r] & 15) | (mins[r] & 15) << 4));
    for figures in [scales, mins] {
        out.extend(
            (0..4).map(|i| (0..4).fold(0u8, |b, k| b | (figures[i + 4 * k] >> 4) << (2 * k))),
        );
    }
}

/// The 16 scales and minimums `pack_figures` stored `packed` from.
fn unpack_figures(packed: &[u8], scales: &mut [u8], mins: &mut [u8]) {
    let word = |at: usize| {
        u32::from_le_bytes([packed[at], packed[at + 1], packed[at + 2], packed[at + 3]])
    };
    // Rows 4k..4k+3's top bits are bits 2k, 2k+1 of the 4 bytes.
    let spread = |top: u32| {
        (0..4).fold(0u128, |v, k| {
            v | (((top >> (2 * k)) & 0x0303_0303) as u128) << (32 * k)
        })
    };
    let mut low = [0u8; ROWS];
    low.copy_from_slice(&packed[..ROWS]);
    let low = u128::from_le_bytes(low);
    let s = (low & NIBBLES) | spread(word(ROWS)) << 4;
    let m = ((low >> 4) & NIBBLES) | spread(word(ROWS + 4)) << 4;
    scales.copy_from_slice(&s.to_le_bytes());
    mins.copy_from_slice(&m.to_le_bytes());
}

/// Where LUT3's 6-bit figures are unpacked for the kernels (one per task,
/// kept across its groups).
type FigureScratch = (Vec<u8>, Vec<u8>);

/// Plane `plane` of the 4 codes of subgroup `sub` of a block of `codes`,
/// as a 4-bit table index (bit `j` from weight `4 sub + j`).
fn nibble(codes: &[u8], sub: usize, plane: usize) -> u8 {
    (0..SUBGROUP).fold(0u8, |n, j| {
        n | (((codes[SUBGROUP * sub + j] >> plane) & 1) << j)
    })
}

impl LutMatrix {
    /// Quantizes the row-major `rows x cols` matrix `w`; `sensitivity` is
    /// one weight per input column (e.g. the mean squared activation of
    /// that channel), uniform when absent. Rows are quantized on every
    /// core; the result does not depend on how many.
    pub fn quantize(
        ty: LutType,
        w: &[f32],
        rows: usize,
        cols: usize,
        sensitivity: Option<&[f32]>,
    ) -> Result<LutMatrix, LutError> {
        if !cols.is_multiple_of(ty.columns_multiple()) || cols == 0 || w.len() != rows * cols {
            return Err(LutError::Shape {
                ty: ty.to_string(),
                rows,
                cols,
                multiple: ty.columns_multiple(),
            });
        }
        let uniform = vec![1f32; cols];
        let importance = sensitivity.filter(|s| s.len() == cols).unwrap_or(&uniform);
        let workers = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
            .clamp(1, rows.max(1));
        let per = rows.div_ceil(workers).max(1);
        let quantized: Vec<QuantizedRow> = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..rows)
                .step_by(per)
                .map(|first| {
                    scope.spawn(move || {
                        (first..(first + per).min(rows))
                            .map(|r| quantize_row(ty, &w[r * cols..(r + 1) * cols], importance))
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            handles
                .into_iter()
                .flat_map(|h| h.join().expect("a quantizer thread panicked"))
                .collect()
        });
        Ok(Self::pack(ty, rows, cols, &quantized))
    }

    /// Interleaves quantized rows into the kernels' layout.
    fn pack(ty: LutType, rows: usize, cols: usize, quantized: &[QuantizedRow]) -> LutMatrix {
        let code_blocks = cols / CODE_BLOCK;
        let (blocks, spans) = (cols / ty.block(), cols / ty.span(cols));
        let subgroups = CODE_BLOCK / SUBGROUP;
        let groups = rows.div_ceil(ROWS);
        let padding = QuantizedRow {
            span_scales: vec![0.0; spans],
            span_mins: vec![0.0; spans],
            block_scales: vec![0; blocks],
            block_mins: vec![0; blocks],
            codes: vec![0; cols],
        };
        let row = |r: usize| quantized.get(r).unwrap_or(&padding);
        let slots = slot_rows(ty);
        let mut m = LutMatrix {
            ty,
            rows,
            cols,
            codes: Vec::with_capacity(groups * code_blocks * group_block_bytes(ty)),
            block_figures: Vec::with_capacity(groups * blocks * ty.group_figure_bytes()),
            span_figures: Vec::with_capacity(groups * spans * 2 * ROWS),
        };
        for g in 0..groups {
            let row = |r: usize| row(g * ROWS + r);
            for b in 0..code_blocks {
                let codes = |r: usize| &row(r).codes[b * CODE_BLOCK..(b + 1) * CODE_BLOCK];
                for i in 0..subgroups / 2 {
                    for r in 0..ROWS {
                        for plane in 0..2 {
                            m.codes.push(
                                nibble(codes(r), 2 * i, plane)
                                    | nibble(codes(r), 2 * i + 1, plane) << 4,
                            );
                        }
                    }
                }
                if ty.bits == 3 {
                    for i in 0..subgroups / 4 {
                        for r in 0..ROWS {
                            for e in 0..2 {
                                m.codes.push(
                                    nibble(codes(r), 4 * i + e, 2)
                                        | nibble(codes(r), 4 * i + 2 + e, 2) << 4,
                                );
                            }
                        }
                    }
                }
            }
            if ty.bits == 2 {
                // Per block of codes, slot by slot, the two halves' nibbles.
                for b in 0..code_blocks {
                    for &r in &slots {
                        for h in 0..2 {
                            let q = row(r);
                            m.block_figures
                                .push(q.block_scales[2 * b + h] | q.block_mins[2 * b + h] << 4);
                        }
                    }
                }
            } else {
                for b in 0..blocks {
                    let scales: Vec<u8> = (0..ROWS).map(|r| row(r).block_scales[b]).collect();
                    let mins: Vec<u8> = (0..ROWS).map(|r| row(r).block_mins[b]).collect();
                    pack_figures(&scales, &mins, &mut m.block_figures);
                }
            }
            for sp in 0..spans {
                m.span_figures
                    .extend(slots.iter().map(|&r| to_f16(row(r).span_scales[sp])));
                m.span_figures
                    .extend(slots.iter().map(|&r| to_f16(row(r).span_mins[sp])));
            }
        }
        m
    }

    fn groups(&self) -> usize {
        self.rows.div_ceil(ROWS)
    }

    /// Blocks of 32 codes in a row.
    fn code_blocks(&self) -> usize {
        self.cols / CODE_BLOCK
    }

    fn spans(&self) -> usize {
        self.cols / self.ty.span(self.cols)
    }

    /// Code of weight `(r, j)`, read back from the planes.
    fn code_at(&self, r: usize, j: usize) -> u8 {
        let subgroups = CODE_BLOCK / SUBGROUP;
        let (b, within) = (j / CODE_BLOCK, j % CODE_BLOCK);
        let (sub, bit) = (within / SUBGROUP, within % SUBGROUP);
        let base = ((r / ROWS) * self.code_blocks() + b) * group_block_bytes(self.ty);
        let row = r % ROWS;
        let mut q = 0u8;
        for plane in 0..2 {
            let byte = self.codes[base + 32 * (sub / 2) + 2 * row + plane];
            let n = if sub % 2 == 0 { byte & 15 } else { byte >> 4 };
            q |= ((n >> bit) & 1) << plane;
        }
        if self.ty.bits == 3 {
            let base = base + 16 * subgroups;
            let byte = self.codes[base + 32 * (sub / 4) + 2 * row + sub % 2];
            let n = if sub % 4 < 2 { byte & 15 } else { byte >> 4 };
            q |= ((n >> bit) & 1) << 2;
        }
        q
    }

    /// Group `g`'s figures as its kernels read them (`Group::scales` and
    /// `mins`): LUT2's bytes where they are stored (both halves of each
    /// byte, so the same slice twice), LUT3's 6-bit ones unpacked into
    /// `scratch`, 16 a block.
    fn group_figures<'a>(
        &'a self,
        g: usize,
        scratch: &'a mut FigureScratch,
    ) -> (&'a [u8], &'a [u8]) {
        let bytes = self.cols / self.ty.block() * self.ty.group_figure_bytes();
        let packed = &self.block_figures[g * bytes..(g + 1) * bytes];
        if self.ty.bits == 2 {
            return (packed, packed);
        }
        let figures = self.code_blocks() * ROWS;
        let (scales, mins) = scratch;
        scales.resize(figures, 0);
        mins.resize(figures, 0);
        for ((p, s), m) in packed
            .chunks_exact(self.ty.group_figure_bytes())
            .zip(scales.chunks_exact_mut(ROWS))
            .zip(mins.chunks_exact_mut(ROWS))
        {
            unpack_figures(p, s, m);
        }
        (scales, mins)
    }

    /// Group `g`'s f16 span figures (per span 16 scales, 16 minimums).
    fn group_spans(&self, g: usize) -> &[u16] {
        let per_group = self.spans() * 2 * ROWS;
        &self.span_figures[g * per_group..(g + 1) * per_group]
    }

    /// The scale and minimum figures of row `r`'s block `block` (of
    /// `ty.block()` weights) out of its group's `group_figures`.
    fn block_figure(&self, figures: (&[u8], &[u8]), r: usize, block: usize) -> (u8, u8) {
        if self.ty.bits == 2 {
            let slot = LUT2_SLOT_ROWS[r % ROWS];
            let byte = figures.0[block / 2 * 2 * ROWS + 2 * slot + block % 2];
            (byte & 15, byte >> 4)
        } else {
            let i = block * ROWS + r % ROWS;
            (figures.0[i], figures.1[i])
        }
    }

    /// The matrix the codes stand for.
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = Vec::with_capacity(self.rows * self.cols);
        let mut scratch = FigureScratch::default();
        let (block, span) = (self.ty.block(), self.ty.span(self.cols));
        let slots = slot_rows(self.ty);
        for g in 0..self.groups() {
            let spans = self.group_spans(g);
            let figures = self.group_figures(g, &mut scratch);
            for r in g * ROWS..((g + 1) * ROWS).min(self.rows) {
                let slot = slots[r % ROWS];
                for j in 0..self.cols {
                    let d = &spans[j / span * 2 * ROWS..];
                    let (s, m) = self.block_figure(figures, r, j / block);
                    let scale = from_f16(d[slot]) * s as f32;
                    let minimum = from_f16(d[ROWS + slot]) * m as f32;
                    out.push(scale * self.code_at(r, j) as f32 - minimum);
                }
            }
        }
        out
    }

    /// An address inside the codes (for where their pages are).
    pub fn codes_address(&self) -> usize {
        self.codes.as_ptr() as usize
    }

    /// Bytes as held, padding rows included (the format's figure).
    pub fn storage_bytes(&self) -> usize {
        self.ty.matrix_bytes(self.rows, self.cols)
    }

    pub fn bits_per_weight(&self) -> f64 {
        self.storage_bytes() as f64 * 8.0 / (self.rows * self.cols) as f64
    }

    /// `y[t][r] = sum_j W[r][j] x[t][j]` for `tokens` activation rows `x`
    /// (row-major, `tokens x cols`), into `y` (`tokens x rows`), groups of
    /// rows split over `pool`'s threads, the tables built into `tables`
    /// (whose buffers a caller keeps from call to call).
    pub fn gemm_reusing(
        &self,
        x: &[f32],
        tokens: usize,
        y: &mut [f32],
        pool: &WorkerPool,
        tables: &mut ActivationTables,
    ) {
        self.gemm_with(x, tokens, y, pool, tables, simd::Kernel::detect());
    }

    pub fn gemm(&self, x: &[f32], tokens: usize, y: &mut [f32], pool: &WorkerPool) {
        self.gemm_reusing(x, tokens, y, pool, &mut ActivationTables::default());
    }

    fn gemm_with(
        &self,
        x: &[f32],
        tokens: usize,
        y: &mut [f32],
        pool: &WorkerPool,
        tables: &mut ActivationTables,
        kernel: simd::Kernel,
    ) {
        assert_eq!(x.len(), tokens * self.cols);
        assert_eq!(y.len(), tokens * self.rows);
        tables.build(x, self.cols);
        let tables = &*tables;
        let out = SharedOutput(y.as_mut_ptr());
        let groups = self.groups();
        let per_task = (ROWS_PER_TASK / ROWS).min(groups.div_ceil(pool.threads()).max(1));
        let code_bytes = self.code_blocks() * group_block_bytes(self.ty);
        pool.run(groups.div_ceil(per_task), &|task| {
            let mut scratch = FigureScratch::default();
            for g in task * per_task..((task + 1) * per_task).min(groups) {
                // LUT3's 6-bit figures unpacked once per group, for every
                // token.
                let (scales, mins) = self.group_figures(g, &mut scratch);
                let group = simd::Group {
                    codes: &self.codes[g * code_bytes..(g + 1) * code_bytes],
                    scales,
                    mins,
                    spans: self.group_spans(g),
                };
                for t in 0..tokens {
                    let (mut dots, mut offsets) = ([0f32; ROWS], [0f32; ROWS]);
                    kernel.group_dot(self.ty, &group, &tables.token(t), &mut dots, &mut offsets);
                    for i in 0..ROWS {
                        let r = g * ROWS + i;
                        if r < self.rows {
                            // SAFETY: tasks own disjoint groups of rows, so
                            // each (token, row) element is written by one
                            // task, and `y` outlives `run`, which waits for
                            // every task.
                            unsafe { out.write(t * self.rows + r, dots[i] - offsets[i]) };
                        }
                    }
                }
            }
        });
    }

    /// How this matrix is multiplied here, for the `kernel_path` column.
    pub fn kernel_path(&self) -> &'static str {
        simd::Kernel::detect().path()
    }

    /// Writes the quantized matrix to `path` (synced), for other processes
    /// of the run to [`LutMatrix::read_file`].
    pub fn write_file(&self, path: &std::path::Path) -> Result<(), LutError> {
        use std::io::Write;
        let mut out = Vec::with_capacity(self.storage_bytes() + 4096);
        out.extend_from_slice(STAGED_MAGIC);
        out.push(self.ty.bits);
        for n in [self.rows, self.cols] {
            out.extend_from_slice(&(n as u64).to_le_bytes());
        }
        for v in [&self.codes, &self.block_figures] {
            out.extend_from_slice(&(v.len() as u64).to_le_bytes());
            out.extend_from_slice(v);
        }
        out.extend_from_slice(&(self.span_figures.len() as u64).to_le_bytes());
        self.span_figures
            .iter()
            .for_each(|x| out.extend_from_slice(&x.to_le_bytes()));
        let staged = |e: std::io::Error| LutError::Staged {
            path: path.to_path_buf(),
            reason: e.to_string(),
        };
        let mut file = std::fs::File::create(path).map_err(staged)?;
        file.write_all(&out)
            .and_then(|_| file.sync_data())
            .map_err(staged)
    }

    /// The matrix [`LutMatrix::write_file`] wrote.
    pub fn read_file(path: &std::path::Path) -> Result<LutMatrix, LutError> {
        let bad = |reason: &str| LutError::Staged {
            path: path.to_path_buf(),
            reason: reason.to_string(),
        };
        let data = std::fs::read(path).map_err(|e| bad(&e.to_string()))?;
        let mut r = Reader { data: &data, at: 0 };
        let truncated = || bad("truncated: written by a run that stopped part-way");
        if r.take(STAGED_MAGIC.len()).ok_or_else(truncated)? != STAGED_MAGIC {
            return Err(bad("not a staged table-lookup matrix"));
        }
        let bits = r.take(1).ok_or_else(truncated)?[0];
        let rows = r.word().ok_or_else(truncated)?;
        let cols = r.word().ok_or_else(truncated)?;
        let codes = r.bytes().ok_or_else(truncated)?;
        let block_figures = r.bytes().ok_or_else(truncated)?;
        let span_figures = r.halves().ok_or_else(truncated)?;
        let ty = LutType { bits };
        if !(bits == 2 || bits == 3) || !cols.is_multiple_of(ty.columns_multiple()) || cols == 0 {
            return Err(bad("not a LUT2 or LUT3 matrix"));
        }
        let m = LutMatrix {
            ty,
            rows,
            cols,
            codes,
            block_figures,
            span_figures,
        };
        let consistent = m.codes.len() == m.groups() * m.code_blocks() * group_block_bytes(ty)
            && m.block_figures.len() == m.groups() * cols / ty.block() * ty.group_figure_bytes()
            && m.span_figures.len() == m.groups() * m.spans() * 2 * ROWS;
        if !consistent {
            return Err(bad("inconsistent sizes"));
        }
        Ok(m)
    }
}

struct Reader<'a> {
    data: &'a [u8],
    at: usize,
}

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Option<&[u8]> {
        let part = self.data.get(self.at..self.at.checked_add(n)?)?;
        self.at += n;
        Some(part)
    }
    fn word(&mut self) -> Option<usize> {
        let bytes: [u8; 8] = self.take(8)?.try_into().ok()?;
        usize::try_from(u64::from_le_bytes(bytes)).ok()
    }
    fn bytes(&mut self) -> Option<Vec<u8>> {
        let n = self.word()?;
        self.take(n).map(<[u8]>::to_vec)
    }
    fn halves(&mut self) -> Option<Vec<u16>> {
        let n = self.word()?;
        let raw = self.take(n.checked_mul(2)?)?;
        Some(
            raw.chunks_exact(2)
                .map(|c| u16::from_le_bytes([c[0], c[1]]))
                .collect(),
        )
    }
}

const STAGED_MAGIC: &[u8; 8] = b"QBLUT003";

/// Per token and block of 32 activations, the int8 tables of each
/// subgroup's 16 partial sums with the block's scale, and per 16
/// activations their sum (for the minimums' term): exact (LUT3's float
/// term) and in the tables' units (LUT2's integer one); the buffers are
/// reused by the next build.
#[derive(Debug, Default)]
pub struct ActivationTables {
    tables: Vec<i8>,
    scales: Vec<f32>,
    sums: Vec<f32>,
    table_sums: Vec<i16>,
    cols: usize,
}

/// `v` rounded to the nearest integer (ties to even), for `|v| < 2^22`:
/// adding 1.5 x 2^23 leaves the integer in the mantissa. `f32::round` is a
/// libm call on baseline x86-64, and a table build rounds 4 values per
/// activation: at batch 1 that was a fifth of a GEMV's time.
fn nearest(v: f32) -> i32 {
    (v + 12_582_912.0).to_bits() as i32 - 0x4B40_0000
}

/// One token's tables, as the kernels read them.
pub(crate) struct TokenTables<'a> {
    /// Per block of 32, 8 tables of 16 entries.
    pub tables: &'a [i8],
    /// Per block of 32.
    pub scales: &'a [f32],
    /// Per 16 activations.
    pub sums: &'a [f32],
    /// Per 16 activations, the sum of their 4 tables' last entries (all
    /// 4 activations): the sum in the tables' units, as the kernels see
    /// the activations.
    pub table_sums: &'a [i16],
}

impl ActivationTables {
    fn build(&mut self, x: &[f32], cols: usize) {
        self.tables.clear();
        self.scales.clear();
        self.sums.clear();
        self.table_sums.clear();
        self.cols = cols;
        let mut entries = [0f32; CODE_BLOCK / SUBGROUP * 16];
        for values in x.chunks_exact(CODE_BLOCK) {
            let mut largest = 0f32;
            for (sub, table) in values
                .chunks_exact(SUBGROUP)
                .zip(entries.chunks_exact_mut(16))
            {
                table[0] = 0.0;
                for n in 1..16usize {
                    table[n] = table[n & (n - 1)] + sub[n.trailing_zeros() as usize];
                }
                let positive: f32 = sub.iter().filter(|v| **v > 0.0).sum();
                let negative: f32 = sub.iter().filter(|v| **v < 0.0).sum();
                largest = largest.max(positive).max(-negative);
            }
            let scale = largest / 127.0;
            let inverse = if scale > 0.0 { 1.0 / scale } else { 0.0 };
            let first = self.tables.len();
            self.tables.extend(
                entries
                    .iter()
                    .map(|v| nearest(v * inverse).clamp(-127, 127) as i8),
            );
            let tables = &self.tables[first..];
            self.table_sums.extend(
                tables
                    .chunks_exact(16 * SUM_BLOCK / SUBGROUP)
                    .map(|half| half.chunks_exact(16).map(|t| t[15] as i16).sum::<i16>()),
            );
            self.scales.push(scale);
            self.sums.extend(
                values
                    .chunks_exact(SUM_BLOCK)
                    .map(|v| v.iter().sum::<f32>()),
            );
        }
    }

    pub(crate) fn token(&self, t: usize) -> TokenTables<'_> {
        let blocks = self.cols / CODE_BLOCK;
        let per_block = CODE_BLOCK / SUBGROUP * 16;
        let sums = self.cols / SUM_BLOCK;
        TokenTables {
            tables: &self.tables[t * blocks * per_block..(t + 1) * blocks * per_block],
            scales: &self.scales[t * blocks..(t + 1) * blocks],
            sums: &self.sums[t * sums..(t + 1) * sums],
            table_sums: &self.table_sums[t * sums..(t + 1) * sums],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::weights::{llm_like_activations, llm_like_weights};

    const LUT2: LutType = LutType { bits: 2 };
    const LUT3: LutType = LutType { bits: 3 };

    #[test]
    fn the_planes_read_back_every_code_and_the_file_round_trips() {
        // 19 rows: a group and a padded one; LUT2 two spans of 256.
        let (rows, cols) = (19, 512);
        let w = llm_like_weights(rows, cols, 2);
        for ty in [LUT2, LUT3] {
            let importance = vec![1f32; cols];
            let quantized: Vec<QuantizedRow> = (0..rows)
                .map(|r| quantize_row(ty, &w[r * cols..(r + 1) * cols], &importance))
                .collect();
            let m = LutMatrix::pack(ty, rows, cols, &quantized);
            for (r, row) in quantized.iter().enumerate() {
                for (j, &q) in row.codes.iter().enumerate() {
                    assert_eq!(m.code_at(r, j), q, "{ty} ({r}, {j})");
                }
            }
            // Every code value occurs (a plane dropped would lose some).
            let top = (1u8 << ty.bits) - 1;
            assert!(quantized.iter().any(|q| q.codes.contains(&top)));
            // Every block's figures and every span's f16 pair read back
            // as the rows' own, in their slots.
            let mut scratch = FigureScratch::default();
            let slots = slot_rows(ty);
            for (r, row) in quantized.iter().enumerate() {
                let figures = m.group_figures(r / ROWS, &mut scratch);
                for b in 0..cols / ty.block() {
                    assert_eq!(
                        m.block_figure(figures, r, b),
                        (row.block_scales[b], row.block_mins[b]),
                        "{ty} row {r} block {b}"
                    );
                }
                let spans = m.group_spans(r / ROWS);
                let slot = slots.iter().position(|&s| s == r % ROWS).unwrap();
                assert_eq!(spans.len(), cols / ty.span(cols) * 2 * ROWS);
                for (sp, pair) in spans.chunks_exact(2 * ROWS).enumerate() {
                    assert_eq!(from_f16(pair[slot]), row.span_scales[sp], "{ty} row {r}");
                    assert_eq!(
                        from_f16(pair[ROWS + slot]),
                        row.span_mins[sp],
                        "{ty} row {r}"
                    );
                }
            }
            // Figures use their whole range.
            let levels = ty.figure_levels() as u8;
            assert!(quantized.iter().any(|q| q.block_scales.contains(&levels)));
            assert_eq!(m, LutMatrix::quantize(ty, &w, rows, cols, None).unwrap());
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("m.bin");
            m.write_file(&path).unwrap();
            assert_eq!(LutMatrix::read_file(&path).unwrap(), m);
            let bytes = std::fs::read(&path).unwrap();
            std::fs::write(&path, &bytes[..bytes.len() - 3]).unwrap();
            let err = LutMatrix::read_file(&path).unwrap_err().to_string();
            assert!(err.contains("truncated"), "{err}");
        }
    }

    /// Every f16 but the NaNs reads as GGML reads it.
    #[test]
    fn f16_figures_read_exactly() {
        for bits in 0..=u16::MAX {
            // SAFETY: a pure conversion.
            let ggml = unsafe { llama_cpp_sys_2::ggml_fp16_to_fp32(bits) };
            if !ggml.is_nan() {
                assert_eq!(from_f16(bits).to_bits(), ggml.to_bits(), "{bits:#06x}");
            }
        }
        assert_eq!(to_f16(1.0), 0x3C00);
    }

    /// Every 6-bit scale and minimum, in every row position, survives
    /// the packing (each nibble and each 2-bit top in its place).
    #[test]
    fn six_bit_figures_pack_and_unpack_for_every_value_and_row() {
        for shift in 0..64u8 {
            let scales: [u8; ROWS] = std::array::from_fn(|r| (r as u8 * 5 + shift) % 64);
            let mins: [u8; ROWS] = std::array::from_fn(|r| (r as u8 * 11 + 3 * shift) % 64);
            let mut packed = Vec::new();
            pack_figures(&scales, &mins, &mut packed);
            assert_eq!(packed.len(), LUT3.group_figure_bytes());
            let (mut s, mut m) = ([0u8; ROWS], [0u8; ROWS]);
            unpack_figures(&packed, &mut s, &mut m);
            assert_eq!((s, m), (scales, mins), "shift {shift}");
        }
    }

    #[test]
    fn every_kernel_agrees_with_the_scalar_reference_and_the_f64_product() {
        // 37 rows: two groups of 16 and a padded one; 3 tokens; LUT2
        // two spans.
        let (rows, cols, tokens) = (37, 512, 3);
        let w = llm_like_weights(rows, cols, 3);
        let x = llm_like_activations(tokens, cols, 4);
        for ty in [LUT2, LUT3] {
            let m = LutMatrix::quantize(ty, &w, rows, cols, None).unwrap();
            let decoded = m.dequantize();
            let pool = WorkerPool::new(1);
            let mut reference = vec![0f32; tokens * rows];
            let mut tables = ActivationTables::default();
            m.gemm_with(
                &x,
                tokens,
                &mut reference,
                &pool,
                &mut tables,
                simd::Kernel::Scalar,
            );
            // Against the decoded matrix: only the int8 tables differ.
            let nmse = crate::weights::output_nmse(&decoded, rows, cols, &x, tokens, &reference);
            assert!(nmse < 2e-3, "{ty}: {nmse}");
            // Every kernel this CPU runs (on aarch64 with dotprod both
            // NEON kernels), and `gemm`'s own choice.
            for kernel in simd::Kernel::available() {
                for threads in [1, 3] {
                    let pool = WorkerPool::new(threads);
                    let mut y = vec![0f32; tokens * rows];
                    m.gemm_with(&x, tokens, &mut y, &pool, &mut tables, kernel);
                    if kernel == simd::Kernel::detect() {
                        let mut chosen = vec![0f32; tokens * rows];
                        m.gemm(&x, tokens, &mut chosen, &pool);
                        assert_eq!(chosen, y);
                    }
                    // The same integer sums: only the f32 epilogue's
                    // rounding (a wrong plane, lane or table shows at 1e-2
                    // and above).
                    for (i, (a, b)) in y.iter().zip(&reference).enumerate() {
                        let magnitude = reference.iter().fold(0f32, |s, v| s.max(v.abs()));
                        assert!(
                            (a - b).abs() <= 1e-5 * magnitude,
                            "{ty} {} threads {threads}, element {i}: {a} vs {b}",
                            kernel.path()
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn tables_hold_each_subsets_sum_rounded_on_the_blocks_scale() {
        assert_eq!(
            [-2.5f32, -1.5, -0.5, 0.5, 1.4, 1.6, 126.7, -127.0].map(nearest),
            [-2, -2, 0, 0, 1, 2, 127, -127]
        );
        let x = llm_like_activations(1, 64, 7);
        let mut tables = ActivationTables::default();
        tables.build(&x, 64);
        let token = tables.token(0);
        for b in 0..2 {
            let scale = token.scales[b];
            let mut largest = 0i32;
            for sub in 0..8 {
                for n in 0..16usize {
                    let exact: f32 = (0..4)
                        .filter(|j| n >> j & 1 == 1)
                        .map(|j| x[32 * b + 4 * sub + j])
                        .sum();
                    let entry = token.tables[(b * 8 + sub) * 16 + n] as i32;
                    assert!((entry as f32 * scale - exact).abs() <= 0.5 * scale * 1.0001);
                    largest = largest.max(entry.abs());
                }
            }
            // The block's scale spends the whole int8 range.
            assert_eq!(largest, 127);
            for half in 0..2 {
                let at = 32 * b + 16 * half;
                let sum: f32 = x[at..at + 16].iter().sum();
                assert!((token.sums[2 * b + half] - sum).abs() < 1e-5);
                // In the tables' units: each subgroup's all-set entry.
                let entries: i16 = (0..4)
                    .map(|sub| token.tables[(b * 8 + 4 * half + sub) * 16 + 15] as i16)
                    .sum();
                assert_eq!(token.table_sums[2 * b + half], entries);
                assert!((entries as f32 * scale - sum).abs() <= 2.0 * scale * 1.0001);
            }
        }
    }

    #[test]
    fn reused_tables_give_what_fresh_ones_do() {
        let (rows, cols) = (16, 256);
        let w = llm_like_weights(rows, cols, 6);
        for ty in [LUT2, LUT3] {
            let m = LutMatrix::quantize(ty, &w, rows, cols, None).unwrap();
            let pool = WorkerPool::new(2);
            let mut kept = ActivationTables::default();
            for (tokens, seed) in [(6, 1), (1, 2), (3, 3)] {
                let x = llm_like_activations(tokens, cols, seed);
                let (mut reused, mut fresh) =
                    (vec![0f32; tokens * rows], vec![0f32; tokens * rows]);
                m.gemm_reusing(&x, tokens, &mut reused, &pool, &mut kept);
                m.gemm(&x, tokens, &mut fresh, &pool);
                assert_eq!(reused, fresh, "{ty} {tokens} tokens");
            }
        }
    }

    #[test]
    fn sizes_are_the_formats_and_bad_shapes_are_refused() {
        let (rows, cols) = (20, 256);
        let w = llm_like_weights(rows, cols, 1);
        for ty in [LUT2, LUT3] {
            let m = LutMatrix::quantize(ty, &w, rows, cols, None).unwrap();
            let format = wire::weight_format::WeightFormat::Lut(ty);
            assert_eq!(m.storage_bytes(), format.matrix_bytes(rows, cols));
            // Held: the planes, the figures (a byte a block of 16 for
            // LUT2, 12 bits a block of 32 for LUT3) and 4 bytes a row and
            // span, for 32 rows (20 padded to two groups of 16).
            let held = m.codes.len() + m.block_figures.len() + 2 * m.span_figures.len();
            assert_eq!(held, m.storage_bytes());
        }
        let err = LutMatrix::quantize(LUT3, &w[..20 * 80], 20, 80, None).unwrap_err();
        assert!(err.to_string().contains("multiple of 32"), "{err}");
        let err = LutMatrix::quantize(LUT2, &w[..10 * 160], 10, 160, None).unwrap_err();
        assert!(err.to_string().contains("multiple of 256"), "{err}");
    }

    /// The goal's quality half: no worse than GGML's type of the same
    /// bits on LLM-like weights, at fewer bits than Q2_K and Q3_K (see
    /// `LutType::figure_bits`).
    #[test]
    fn lut2_and_lut3_err_no_more_than_q2_k_and_q3_k() {
        let (rows, cols) = (64, 1024);
        let w = llm_like_weights(rows, cols, 11);
        let error = |decoded: &[f32]| -> f64 {
            let err: f64 = decoded
                .iter()
                .zip(&w)
                .map(|(a, b)| ((a - b) as f64).powi(2))
                .sum();
            err / w.iter().map(|v| (*v as f64).powi(2)).sum::<f64>()
        };
        for (ty, ggml) in [(LUT2, crate::GgmlType::Q2K), (LUT3, crate::GgmlType::Q3K)] {
            let ours = LutMatrix::quantize(ty, &w, rows, cols, None).unwrap();
            let theirs = crate::quantize(ggml, rows, cols, &w).unwrap().dequantize();
            let (a, b) = (error(&ours.dequantize()), error(&theirs));
            eprintln!(
                "{ty} NMSE {a:.4e} at {:.3} bits, {ggml} {b:.4e}",
                ours.bits_per_weight()
            );
            assert!(ours.bits_per_weight() <= ggml.bits_per_weight());
            assert!(a <= b, "{ty} {a:.4e} vs {ggml} {b:.4e}");
        }
    }

    /// The goal's quality half against GGML given the same importance
    /// matrix: LUT2's error weighed by the importance (what the output
    /// error follows) no more than `Q2_K+imatrix`'s at the same bits.
    /// With 32-weight blocks (the format before) it was 1.3x.
    #[test]
    fn lut2_err_no_more_than_q2_k_given_the_same_importance() {
        let (rows, cols) = (64, 1024);
        let w = llm_like_weights(rows, cols, 12);
        let importance = crate::weights::activation_second_moments(
            crate::weights::Distribution::LlmLike,
            cols,
            13,
        );
        let weighed = |decoded: &[f32]| -> f64 {
            let err: f64 = decoded
                .iter()
                .zip(&w)
                .enumerate()
                .map(|(i, (a, b))| importance[i % cols] as f64 * ((a - b) as f64).powi(2))
                .sum();
            let norm: f64 = w
                .iter()
                .enumerate()
                .map(|(i, v)| importance[i % cols] as f64 * (*v as f64).powi(2))
                .sum();
            err / norm
        };
        let ours = LutMatrix::quantize(LUT2, &w, rows, cols, Some(&importance)).unwrap();
        let theirs =
            crate::quantize_with_importance(crate::GgmlType::Q2K, rows, cols, &w, &importance)
                .unwrap()
                .dequantize();
        let (a, b) = (weighed(&ours.dequantize()), weighed(&theirs));
        eprintln!("LUT2 weighed NMSE {a:.4e}, Q2_K+imatrix {b:.4e}");
        assert!(ours.bits_per_weight() <= crate::GgmlType::Q2K.bits_per_weight());
        assert!(a <= b, "LUT2 {a:.4e} vs Q2_K+imatrix {b:.4e}");
    }
}
