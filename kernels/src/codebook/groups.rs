//! The codebook GEMV/GEMM's own layout and kernels: rows interleaved in
//! groups of eight, as GGML repacks Q4_0 (`q4_0_8x8`, `q4_0_4x4`) at load,
//! so each int8 activation block loaded feeds eight rows and the eight
//! rows' block sums are reduced into one vector, converted and scaled by
//! one multiply-add, where a row at a time paid a convert, a scale
//! broadcast and a multiply-add per row and block and a horizontal sum per
//! row. Built once per matrix from the row-major codes (`RowGroups::of`);
//! the row-major form stays the one written to files and decoded.

use super::{packed_block_bytes, CodebookMatrix, QuantizedActivations, BLOCK};

/// Rows interleaved together.
pub(super) const GROUP: usize = 8;

/// The codes of `ceil(rows / 8)` groups; a last group short of eight is
/// padded with rows of zero scales (their outputs are not written).
#[derive(Debug, Clone)]
pub(super) struct RowGroups {
    bits: u8,
    blocks: usize,
    /// Per group, per block: the eight rows' packed indices, row after
    /// row (`8 x 16` bytes for SQ4, `8 x 12` for SQ3).
    packed: Vec<u8>,
    /// Per group, per block: the eight rows' block scales in the order
    /// of the kernel's output lanes (`simd::LANE_ROWS`).
    scales: Vec<u8>,
    /// Per group: the eight rows' 16-byte tables, row after row.
    tables: Vec<u8>,
    /// Per group: the eight rows' table scale times row scale.
    table_scales: Vec<f32>,
    /// Per group, `corrections[correction_start[g]..correction_start[g +
    /// 1]]` are its rows' exact corrections, by column so consecutive ones
    /// mostly go to different rows (no add waits for the one before).
    correction_start: Vec<u32>,
    corrections: Vec<Correction>,
}

/// One exact correction: `value` times activation `column` is added to
/// the group's row `row`.
#[derive(Debug, Clone, Copy)]
struct Correction {
    column: u32,
    row: u32,
    value: f32,
}

impl RowGroups {
    pub(super) fn of(m: &CodebookMatrix) -> RowGroups {
        let blocks = m.cols / BLOCK;
        let step = packed_block_bytes(m.ty.bits);
        let groups = m.rows.div_ceil(GROUP);
        let mut g = RowGroups {
            bits: m.ty.bits,
            blocks,
            packed: Vec::with_capacity(groups * GROUP * blocks * step),
            scales: Vec::with_capacity(groups * GROUP * blocks),
            tables: Vec::with_capacity(groups * GROUP * 16),
            table_scales: Vec::with_capacity(groups * GROUP),
            correction_start: vec![0],
            corrections: Vec::with_capacity(m.sparse.values.len()),
        };
        let row_bytes = blocks * step;
        for first in (0..m.rows).step_by(GROUP) {
            let real = |i: usize| (first + i < m.rows).then_some(first + i);
            for b in 0..blocks {
                for i in 0..GROUP {
                    match real(i) {
                        Some(r) => g.packed.extend_from_slice(
                            &m.indices[r * row_bytes + b * step..r * row_bytes + (b + 1) * step],
                        ),
                        None => g.packed.extend(std::iter::repeat_n(0, step)),
                    }
                }
                for &i in &simd::LANE_ROWS {
                    g.scales
                        .push(real(i).map_or(0, |r| m.block_scales[r * blocks + b]));
                }
            }
            let first_correction = g.corrections.len();
            for (i, r) in (0..GROUP).filter_map(|i| real(i).map(|r| (i, r))) {
                let entries = m.sparse.row_start[r] as usize..m.sparse.row_start[r + 1] as usize;
                g.corrections.extend(entries.map(|e| Correction {
                    column: m.sparse.columns[e],
                    row: i as u32,
                    value: m.sparse.values[e],
                }));
            }
            g.corrections[first_correction..].sort_by_key(|c| (c.column, c.row));
            g.correction_start.push(g.corrections.len() as u32);
            for i in 0..GROUP {
                match real(i) {
                    Some(r) => {
                        g.tables.extend_from_slice(&m.tables[r * 16..(r + 1) * 16]);
                        g.table_scales.push(m.table_scales[r]);
                    }
                    None => {
                        g.tables
                            .extend(std::iter::repeat_n(super::TABLE_OFFSET as u8, 16));
                        g.table_scales.push(0.0);
                    }
                }
            }
        }
        g
    }

    pub(super) fn groups(&self) -> usize {
        self.table_scales.len() / GROUP
    }

    /// `out[t][i]`: token `t0 + t` against row `8 g + i`, for
    /// `out.len()` (at most `MAX_TOKENS_AT_ONCE`) tokens: the codes with
    /// the int8 activations `q`, the exact corrections with the f32
    /// activations `x` (tokens of `blocks x 32`).
    pub(super) fn dot(
        &self,
        g: usize,
        q: &QuantizedActivations,
        x: &[f32],
        t0: usize,
        out: &mut [[f32; GROUP]],
    ) {
        assert_eq!(q.blocks_per_token, self.blocks);
        assert!((t0 + out.len()) * self.blocks * BLOCK <= q.values.len());
        simd::group_dot(&self.view(g), q, t0, out);
        let scales = &self.table_scales[g * GROUP..(g + 1) * GROUP];
        for o in out.iter_mut() {
            for (v, s) in o.iter_mut().zip(scales) {
                *v *= s;
            }
        }
        let corrections = &self.corrections
            [self.correction_start[g] as usize..self.correction_start[g + 1] as usize];
        if corrections.is_empty() {
            return;
        }
        let cols = self.blocks * BLOCK;
        for (t, o) in out.iter_mut().enumerate() {
            let xt = &x[(t0 + t) * cols..(t0 + t + 1) * cols];
            for c in corrections {
                o[c.row as usize % GROUP] += c.value * xt[c.column as usize];
            }
        }
    }

    /// Group `g`'s codes.
    fn view(&self, g: usize) -> GroupView<'_> {
        let step = packed_block_bytes(self.bits);
        GroupView {
            bits: self.bits,
            blocks: self.blocks,
            packed: &self.packed[g * GROUP * self.blocks * step..][..GROUP * self.blocks * step],
            scales: &self.scales[g * GROUP * self.blocks..][..GROUP * self.blocks],
            tables: self.tables[g * GROUP * 16..][..GROUP * 16]
                .try_into()
                .expect("eight tables"),
        }
    }

    /// Which kernel runs here, for the `kernel_path` column.
    pub(super) fn path() -> &'static str {
        simd::path()
    }

    pub(super) fn available() -> bool {
        simd::available()
    }
}

/// One group's codes, with their lengths checked by `RowGroups::dot`.
struct GroupView<'a> {
    bits: u8,
    blocks: usize,
    packed: &'a [u8],
    scales: &'a [u8],
    tables: &'a [u8; GROUP * 16],
}

#[cfg(target_arch = "x86_64")]
mod simd {
    use super::{GroupView, QuantizedActivations, BLOCK, GROUP};
    use crate::codebook::{packed_block_bytes, MAX_TOKENS_AT_ONCE, TABLE_OFFSET};
    use std::arch::x86_64::*;

    /// Rows in the order the kernel's reduction leaves them in its eight
    /// lanes (`vphaddd` works within 128-bit halves).
    pub const LANE_ROWS: [usize; GROUP] = [0, 2, 4, 6, 1, 3, 5, 7];

    pub fn path() -> &'static str {
        "codebook-avx2-8row+act:int8x32"
    }

    pub fn available() -> bool {
        std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma")
    }

    pub fn group_dot(g: &GroupView, q: &QuantizedActivations, t0: usize, out: &mut [[f32; GROUP]]) {
        assert!(available() && out.len() <= MAX_TOKENS_AT_ONCE);
        assert_eq!(
            g.packed.len(),
            g.blocks * GROUP * packed_block_bytes(g.bits)
        );
        // SAFETY: AVX2 and FMA are present (asserted); `RowGroups::dot`
        // checked that the activations cover `t0 + out.len()` tokens of
        // `blocks` blocks and the view's slices cover the group.
        // One instance per token count keeps the accumulators in
        // registers.
        unsafe {
            match (out.len(), g.bits) {
                (1, 4) => sq4(g, q, t0, out),
                (2, 4) => group_dot_avx2::<2, 4>(g, q, t0, out),
                (3, 4) => group_dot_avx2::<3, 4>(g, q, t0, out),
                (_, 4) => group_dot_avx2::<4, 4>(g, q, t0, out),
                (1, _) => sq3(g, q, t0, out),
                (2, _) => group_dot_avx2::<2, 3>(g, q, t0, out),
                (3, _) => group_dot_avx2::<3, 3>(g, q, t0, out),
                (_, _) => group_dot_avx2::<4, 3>(g, q, t0, out),
            }
        }
    }

    // Batch 1 (decode) has one symbol per format, never inlined, so
    // `harness::builds::cycles` finds each hot loop by name in the binary.
    /// # Safety
    /// As [`group_dot_avx2`].
    #[inline(never)]
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn sq4(
        g: &GroupView,
        q: &QuantizedActivations,
        t0: usize,
        out: &mut [[f32; GROUP]],
    ) {
        group_dot_avx2::<1, 4>(g, q, t0, out)
    }

    /// # Safety
    /// As [`group_dot_avx2`].
    #[inline(never)]
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn sq3(
        g: &GroupView,
        q: &QuantizedActivations,
        t0: usize,
        out: &mut [[f32; GROUP]],
    ) {
        group_dot_avx2::<1, 3>(g, q, t0, out)
    }

    /// 32 three-bit indices of one row, in order: the low two bits by one
    /// shift per quarter, the third by a byte spread and a bit test.
    #[inline(always)]
    unsafe fn unpack3(p: *const u8) -> __m256i {
        let low_bits = (p as *const u64).read_unaligned();
        let shifted = _mm256_srlv_epi64(
            _mm256_set1_epi64x(low_bits as i64),
            _mm256_setr_epi64x(0, 2, 4, 6),
        );
        let low = _mm256_and_si256(shifted, _mm256_set1_epi8(3));
        let high_bits = (p.add(8) as *const u32).read_unaligned();
        let spread = _mm256_shuffle_epi8(
            _mm256_set1_epi32(high_bits as i32),
            _mm256_setr_epi8(
                0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3,
                3, 3, 3, 3,
            ),
        );
        let bit = _mm256_set1_epi64x(0x8040_2010_0804_0201u64 as i64);
        let set = _mm256_cmpeq_epi8(_mm256_and_si256(spread, bit), bit);
        _mm256_or_si256(low, _mm256_and_si256(set, _mm256_set1_epi8(4)))
    }

    /// The indices of rows `2p` and `2p + 1`: weights 0-15 of both (row
    /// `2p` in the low half, as their tables are), then weights 16-31.
    #[inline(always)]
    unsafe fn pair_indices<const BITS: u8>(block: *const u8, p: usize) -> (__m256i, __m256i) {
        if BITS == 4 {
            // Byte i of a row's 16 holds weight i low and i + 16 high, so
            // the two rows' 32 bytes give both halves with a mask and a
            // shift.
            let raw = _mm256_loadu_si256(block.add(p * 32) as *const __m256i);
            let nibble = _mm256_set1_epi8(15);
            (
                _mm256_and_si256(raw, nibble),
                _mm256_and_si256(_mm256_srli_epi16(raw, 4), nibble),
            )
        } else {
            let a = unpack3(block.add(2 * p * 12));
            let b = unpack3(block.add((2 * p + 1) * 12));
            (
                _mm256_permute2x128_si256(a, b, 0x20),
                _mm256_permute2x128_si256(a, b, 0x31),
            )
        }
    }

    /// Per block: each pair of rows' indices looked up in their two
    /// tables by one `vpshufb` per 16 weights, multiplied with the
    /// activations (the same 16 in both halves) by
    /// `vpmaddubsw`/`vpmaddwd`, the eight rows' sums reduced by three
    /// `vphaddd` into one vector (`LANE_ROWS`), converted and scaled by
    /// the rows' block scales times the activations' scale at once. The
    /// tables' bytes are the centroids plus 64, unsigned, so `vpmaddubsw`
    /// takes them as they are; the 64 x sum of each block's activations
    /// this adds is taken out at the end, one multiply-add a block.
    ///
    /// # Safety
    /// AVX2 and FMA are available; `g` and `q` as `RowGroups::dot` checks.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn group_dot_avx2<const N: usize, const BITS: u8>(
        g: &GroupView,
        q: &QuantizedActivations,
        t0: usize,
        out: &mut [[f32; GROUP]],
    ) {
        debug_assert_eq!(out.len(), N);
        let tables: [__m256i; GROUP / 2] = std::array::from_fn(|p| {
            _mm256_loadu_si256(g.tables.as_ptr().add(p * 32) as *const __m256i)
        });
        let ones = _mm256_set1_epi16(1);
        let step = GROUP * packed_block_bytes(BITS);
        let (values, scales, offsets) = q.token(t0);
        let (values, scales, offsets) = (values.as_ptr(), scales.as_ptr(), offsets.as_ptr());
        let (value_stride, scale_stride) = (q.blocks_per_token * BLOCK, q.blocks_per_token);
        let mut acc = [_mm256_setzero_ps(); N];
        let mut offset_acc = [_mm256_setzero_ps(); N];
        for b in 0..g.blocks {
            let block = g.packed.as_ptr().add(b * step);
            let looked_up: [(__m256i, __m256i); GROUP / 2] = std::array::from_fn(|p| {
                let (low, high) = pair_indices::<BITS>(block, p);
                (
                    _mm256_shuffle_epi8(tables[p], low),
                    _mm256_shuffle_epi8(tables[p], high),
                )
            });
            let block_scales = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(
                g.scales.as_ptr().add(b * GROUP) as *const __m128i,
            )));
            for t in 0..N {
                let x = values.add(t * value_stride + b * BLOCK);
                let x_low = _mm256_broadcastsi128_si256(_mm_loadu_si128(x as *const __m128i));
                let x_high =
                    _mm256_broadcastsi128_si256(_mm_loadu_si128(x.add(16) as *const __m128i));
                let pair_sums: [__m256i; GROUP / 2] = std::array::from_fn(|p| {
                    let (w_low, w_high) = looked_up[p];
                    _mm256_add_epi32(
                        _mm256_madd_epi16(_mm256_maddubs_epi16(w_low, x_low), ones),
                        _mm256_madd_epi16(_mm256_maddubs_epi16(w_high, x_high), ones),
                    )
                });
                let sums = _mm256_hadd_epi32(
                    _mm256_hadd_epi32(pair_sums[0], pair_sums[1]),
                    _mm256_hadd_epi32(pair_sums[2], pair_sums[3]),
                );
                let at = t * scale_stride + b;
                acc[t] = _mm256_fmadd_ps(
                    _mm256_cvtepi32_ps(sums),
                    _mm256_mul_ps(block_scales, _mm256_set1_ps(*scales.add(at))),
                    acc[t],
                );
                offset_acc[t] = _mm256_fmadd_ps(
                    block_scales,
                    _mm256_set1_ps(*offsets.add(at)),
                    offset_acc[t],
                );
            }
        }
        for t in 0..N {
            let lanes =
                _mm256_fnmadd_ps(_mm256_set1_ps(TABLE_OFFSET as f32), offset_acc[t], acc[t]);
            let mut v = [0f32; GROUP];
            _mm256_storeu_ps(v.as_mut_ptr(), lanes);
            for (lane, &row) in LANE_ROWS.iter().enumerate() {
                out[t][row] = v[lane];
            }
        }
    }
}

#[cfg(target_arch = "aarch64")]
mod simd {
    use super::{GroupView, QuantizedActivations, BLOCK, GROUP};
    use crate::codebook::{packed_block_bytes, MAX_TOKENS_AT_ONCE, TABLE_OFFSET};
    use std::arch::aarch64::*;

    /// Rows in the order of the kernel's two output vectors.
    pub const LANE_ROWS: [usize; GROUP] = [0, 1, 2, 3, 4, 5, 6, 7];

    /// `sdot` (Armv8.2 dot product: a Pi 5's Cortex-A76, not a Pi 4's
    /// A72) sums four int8 products per lane in one instruction.
    fn dotprod() -> bool {
        std::arch::is_aarch64_feature_detected!("dotprod")
    }

    pub fn path() -> &'static str {
        if dotprod() {
            "codebook-neon-sdot-8row+act:int8x32"
        } else {
            "codebook-neon-int8-8row+act:int8x32"
        }
    }

    /// NEON is part of every aarch64 target Rust builds for.
    pub fn available() -> bool {
        true
    }

    pub fn group_dot(g: &GroupView, q: &QuantizedActivations, t0: usize, out: &mut [[f32; GROUP]]) {
        assert!(out.len() <= MAX_TOKENS_AT_ONCE);
        assert_eq!(
            g.packed.len(),
            g.blocks * GROUP * packed_block_bytes(g.bits)
        );
        let dot = dotprod();
        // SAFETY: NEON is baseline on aarch64, `sdot` only where the CPU
        // has it (checked above); `RowGroups::dot` checked that the
        // activations cover `t0 + out.len()` tokens and the view's slices
        // the group.
        unsafe {
            match (g.bits, dot) {
                (4, true) => by_tokens::<4>(g, q, t0, out, true),
                (_, true) => by_tokens::<3>(g, q, t0, out, true),
                (4, false) => by_tokens::<4>(g, q, t0, out, false),
                (_, false) => by_tokens::<3>(g, q, t0, out, false),
            }
        }
    }

    /// One instance per token count and index width keeps the
    /// accumulators in registers and the unpacking out of branches.
    ///
    /// # Safety
    /// As [`group_dot_with`]; `sdot` only where the CPU has it.
    unsafe fn by_tokens<const BITS: u8>(
        g: &GroupView,
        q: &QuantizedActivations,
        t0: usize,
        out: &mut [[f32; GROUP]],
        sdot: bool,
    ) {
        match (out.len(), sdot) {
            (1, true) if BITS == 4 => sq4_sdot(g, q, t0, out),
            (1, true) => sq3_sdot(g, q, t0, out),
            (2, true) => group_dot_sdot::<2, BITS>(g, q, t0, out),
            (3, true) => group_dot_sdot::<3, BITS>(g, q, t0, out),
            (_, true) => group_dot_sdot::<4, BITS>(g, q, t0, out),
            (1, false) => group_dot_neon::<1, BITS>(g, q, t0, out),
            (2, false) => group_dot_neon::<2, BITS>(g, q, t0, out),
            (3, false) => group_dot_neon::<3, BITS>(g, q, t0, out),
            (_, false) => group_dot_neon::<4, BITS>(g, q, t0, out),
        }
    }

    // Batch 1 (decode) with `sdot` has one symbol per format, never
    // inlined, so `harness::builds::cycles` finds each hot loop by name.
    /// # Safety
    /// As [`group_dot_with`]; the CPU has `sdot`.
    #[inline(never)]
    #[target_feature(enable = "neon,dotprod")]
    pub unsafe fn sq4_sdot(
        g: &GroupView,
        q: &QuantizedActivations,
        t0: usize,
        out: &mut [[f32; GROUP]],
    ) {
        group_dot_with::<1, 4>(g, q, t0, out, dot_sdot)
    }

    /// # Safety
    /// As [`group_dot_with`]; the CPU has `sdot`.
    #[inline(never)]
    #[target_feature(enable = "neon,dotprod")]
    pub unsafe fn sq3_sdot(
        g: &GroupView,
        q: &QuantizedActivations,
        t0: usize,
        out: &mut [[f32; GROUP]],
    ) {
        group_dot_with::<1, 3>(g, q, t0, out, dot_sdot)
    }

    /// 32 indices of one row in order, as two vectors of 16 (see
    /// `pack_block`).
    #[inline(always)]
    unsafe fn unpack<const BITS: u8>(p: *const u8) -> (uint8x16_t, uint8x16_t) {
        if BITS == 4 {
            let packed = vld1q_u8(p);
            return (vandq_u8(packed, vdupq_n_u8(15)), vshrq_n_u8::<4>(packed));
        }
        let low = vld1_u8(p);
        let three = vdupq_n_u8(3);
        let q0 = vandq_u8(vcombine_u8(low, vshr_n_u8::<2>(low)), three);
        let q1 = vandq_u8(vcombine_u8(vshr_n_u8::<4>(low), vshr_n_u8::<6>(low)), three);
        let high_bits =
            vreinterpretq_u8_u32(vdupq_n_u32((p.add(8) as *const u32).read_unaligned()));
        const SPREAD: [[u8; 16]; 2] = [
            [0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1],
            [2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3],
        ];
        const BIT: [u8; 16] = [1, 2, 4, 8, 16, 32, 64, 128, 1, 2, 4, 8, 16, 32, 64, 128];
        let bit = vld1q_u8(BIT.as_ptr());
        let four = vdupq_n_u8(4);
        let h0 = vandq_u8(
            vtstq_u8(vqtbl1q_u8(high_bits, vld1q_u8(SPREAD[0].as_ptr())), bit),
            four,
        );
        let h1 = vandq_u8(
            vtstq_u8(vqtbl1q_u8(high_bits, vld1q_u8(SPREAD[1].as_ptr())), bit),
            four,
        );
        (vorrq_u8(q0, h0), vorrq_u8(q1, h1))
    }

    /// Widening multiply-accumulates: a block's 32 products summed into
    /// four int32 lanes.
    #[inline(always)]
    unsafe fn dot_widening(
        w0: int8x16_t,
        w1: int8x16_t,
        x0: int8x16_t,
        x1: int8x16_t,
    ) -> int32x4_t {
        let p0 = vmlal_high_s8(vmull_s8(vget_low_s8(w0), vget_low_s8(x0)), w0, x0);
        let p1 = vmlal_high_s8(vmull_s8(vget_low_s8(w1), vget_low_s8(x1)), w1, x1);
        vpadalq_s16(vpaddlq_s16(p0), p1)
    }

    /// The same with two `sdot`s (written as `asm!`: Rust's `vdotq_s32`
    /// is not stable yet).
    #[inline]
    #[target_feature(enable = "neon,dotprod")]
    unsafe fn dot_sdot(w0: int8x16_t, w1: int8x16_t, x0: int8x16_t, x1: int8x16_t) -> int32x4_t {
        let mut acc = vdupq_n_s32(0);
        std::arch::asm!(
            "sdot {acc:v}.4s, {w0:v}.16b, {x0:v}.16b",
            "sdot {acc:v}.4s, {w1:v}.16b, {x1:v}.16b",
            acc = inout(vreg) acc,
            w0 = in(vreg) w0,
            x0 = in(vreg) x0,
            w1 = in(vreg) w1,
            x1 = in(vreg) x1,
            options(pure, nomem, nostack, preserves_flags)
        );
        acc
    }

    /// Per block: each row's indices looked up in its table by `tbl` (the
    /// tables held signed, less their offset, for the whole group),
    /// multiplied with the activations loaded once for the eight rows
    /// into four int32 lanes by `dot`, the rows' lanes summed pairwise
    /// into two vectors of four rows, converted and scaled by the rows'
    /// block scales times the activations' scale at once.
    #[inline(always)]
    unsafe fn group_dot_with<const N: usize, const BITS: u8>(
        g: &GroupView,
        q: &QuantizedActivations,
        t0: usize,
        out: &mut [[f32; GROUP]],
        dot: unsafe fn(int8x16_t, int8x16_t, int8x16_t, int8x16_t) -> int32x4_t,
    ) {
        debug_assert_eq!(out.len(), N);
        let offset = vdupq_n_u8(TABLE_OFFSET as u8);
        let tables: [int8x16_t; GROUP] = std::array::from_fn(|i| {
            vreinterpretq_s8_u8(vsubq_u8(vld1q_u8(g.tables.as_ptr().add(i * 16)), offset))
        });
        let row_step = packed_block_bytes(BITS);
        let (values, scales, _) = q.token(t0);
        let (values, scales) = (values.as_ptr(), scales.as_ptr());
        let (value_stride, scale_stride) = (q.blocks_per_token * BLOCK, q.blocks_per_token);
        let mut acc = [[vdupq_n_f32(0.0); 2]; N];
        for b in 0..g.blocks {
            let block = g.packed.as_ptr().add(b * GROUP * row_step);
            let lookup = |i: usize| {
                let (i0, i1) = unpack::<BITS>(block.add(i * row_step));
                (vqtbl1q_s8(tables[i], i0), vqtbl1q_s8(tables[i], i1))
            };
            // Written out: `array::from_fn` left the 3-bit rows in a loop
            // of their own (and the block's sums behind a stack round trip).
            let looked_up: [(int8x16_t, int8x16_t); GROUP] = [
                lookup(0),
                lookup(1),
                lookup(2),
                lookup(3),
                lookup(4),
                lookup(5),
                lookup(6),
                lookup(7),
            ];
            let block_scales = vmovl_u8(vld1_u8(g.scales.as_ptr().add(b * GROUP)));
            let block_scales = [
                vcvtq_f32_u32(vmovl_u16(vget_low_u16(block_scales))),
                vcvtq_f32_u32(vmovl_high_u16(block_scales)),
            ];
            for (t, acc) in acc.iter_mut().enumerate() {
                let x = values.add(t * value_stride + b * BLOCK);
                let (x0, x1) = (vld1q_s8(x), vld1q_s8(x.add(16)));
                let sums: [int32x4_t; GROUP] = std::array::from_fn(|i| {
                    let (w0, w1) = looked_up[i];
                    dot(w0, w1, x0, x1)
                });
                let scale = *scales.add(t * scale_stride + b);
                for (half, a) in acc.iter_mut().enumerate() {
                    let s = &sums[half * 4..half * 4 + 4];
                    let rows = vpaddq_s32(vpaddq_s32(s[0], s[1]), vpaddq_s32(s[2], s[3]));
                    *a = vfmaq_f32(
                        *a,
                        vcvtq_f32_s32(rows),
                        vmulq_n_f32(block_scales[half], scale),
                    );
                }
            }
        }
        for (o, a) in out.iter_mut().zip(acc) {
            vst1q_f32(o.as_mut_ptr(), a[0]);
            vst1q_f32(o.as_mut_ptr().add(4), a[1]);
        }
    }

    /// The widening path (a Pi 4's) whatever the CPU has, for the tests
    /// to check it against `sdot`'s on a CPU with both.
    #[cfg(test)]
    pub fn group_dot_widening(
        g: &GroupView,
        q: &QuantizedActivations,
        t0: usize,
        out: &mut [[f32; GROUP]],
    ) {
        assert!(out.len() <= MAX_TOKENS_AT_ONCE);
        assert_eq!(
            g.packed.len(),
            g.blocks * GROUP * packed_block_bytes(g.bits)
        );
        // SAFETY: NEON is baseline on aarch64; lengths as in `group_dot`.
        unsafe {
            match (out.len(), g.bits) {
                (1, 4) => group_dot_neon::<1, 4>(g, q, t0, out),
                (2, 4) => group_dot_neon::<2, 4>(g, q, t0, out),
                (3, 4) => group_dot_neon::<3, 4>(g, q, t0, out),
                (_, 4) => group_dot_neon::<4, 4>(g, q, t0, out),
                (1, _) => group_dot_neon::<1, 3>(g, q, t0, out),
                (2, _) => group_dot_neon::<2, 3>(g, q, t0, out),
                (3, _) => group_dot_neon::<3, 3>(g, q, t0, out),
                (_, _) => group_dot_neon::<4, 3>(g, q, t0, out),
            }
        }
    }

    #[target_feature(enable = "neon")]
    unsafe fn group_dot_neon<const N: usize, const BITS: u8>(
        g: &GroupView,
        q: &QuantizedActivations,
        t0: usize,
        out: &mut [[f32; GROUP]],
    ) {
        group_dot_with::<N, BITS>(g, q, t0, out, dot_widening)
    }

    #[target_feature(enable = "neon,dotprod")]
    unsafe fn group_dot_sdot<const N: usize, const BITS: u8>(
        g: &GroupView,
        q: &QuantizedActivations,
        t0: usize,
        out: &mut [[f32; GROUP]],
    ) {
        group_dot_with::<N, BITS>(g, q, t0, out, dot_sdot)
    }
}

#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
mod simd {
    use super::{GroupView, QuantizedActivations, GROUP};

    pub const LANE_ROWS: [usize; GROUP] = [0, 1, 2, 3, 4, 5, 6, 7];

    pub fn path() -> &'static str {
        "codebook-scalar+act:f32"
    }

    pub fn available() -> bool {
        false
    }

    pub fn group_dot(_: &GroupView, _: &QuantizedActivations, _: usize, _: &mut [[f32; GROUP]]) {
        unreachable!("no integer kernel on this architecture")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codebook::CodebookType;
    use crate::weights::llm_like_weights;

    #[test]
    fn a_short_last_group_is_padded_and_corrections_go_to_their_rows() {
        let (rows, cols) = (11, 64);
        let w = llm_like_weights(rows, cols, 8);
        let ty = CodebookType::parse("SQ4+S5").unwrap();
        let m = CodebookMatrix::quantize(ty, &w, rows, cols, None).unwrap();
        let g = RowGroups::of(&m);
        assert_eq!(g.groups(), 2);
        // Padding rows: zero block scales and table scales, no codes.
        assert!(g.table_scales[11..].iter().all(|&s| s == 0.0));
        let second = &g.scales[GROUP * 2..];
        for (lane, &row) in simd::LANE_ROWS.iter().enumerate() {
            if row >= 3 {
                assert!(second.iter().skip(lane).step_by(GROUP).all(|&s| s == 0));
            }
        }
        // Every correction once, in its group, at its row within it.
        assert_eq!(g.corrections.len(), m.sparse.values.len());
        for (group, span) in g.correction_start.windows(2).enumerate() {
            for c in &g.corrections[span[0] as usize..span[1] as usize] {
                let r = group * GROUP + c.row as usize;
                let entries = m.sparse.row_start[r] as usize..m.sparse.row_start[r + 1] as usize;
                assert!(entries
                    .into_iter()
                    .any(|e| m.sparse.columns[e] == c.column && m.sparse.values[e] == c.value));
            }
        }
    }

    /// On aarch64 the widening kernel (a Pi 4's) gives exactly the sums
    /// `sdot` gives (both in int32, then the same float steps), for both
    /// index widths and every token count.
    #[cfg(target_arch = "aarch64")]
    #[test]
    fn the_widening_kernel_gives_what_sdot_gives() {
        use crate::weights::llm_like_activations;
        let (rows, cols) = (24, 256);
        let w = llm_like_weights(rows, cols, 2);
        let x = llm_like_activations(4, cols, 3);
        let mut q = QuantizedActivations::default();
        q.quantize(&x, cols);
        for name in ["SQ4", "SQ3"] {
            let ty = CodebookType::parse(name).unwrap();
            let g = RowGroups::of(&CodebookMatrix::quantize(ty, &w, rows, cols, None).unwrap());
            for group in 0..g.groups() {
                for n in 1..=4 {
                    let (mut fast, mut widening) = ([[0f32; GROUP]; 4], [[1f32; GROUP]; 4]);
                    simd::group_dot(&g.view(group), &q, 0, &mut fast[..n]);
                    simd::group_dot_widening(&g.view(group), &q, 0, &mut widening[..n]);
                    assert_eq!(fast[..n], widening[..n], "{name} group {group} n{n}");
                }
            }
        }
    }
}
