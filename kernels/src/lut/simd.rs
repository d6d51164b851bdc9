//! The table-lookup kernels: one group of 16 rows against one token's
//! tables, in integer sums per block of 32 columns and an f32 epilogue per
//! block (times the table's scale; LUT3 also times its scale bytes, LUT2
//! multiplied its 16-weight scales into the integer sums), LUT2's folded
//! into its rows' f16 scales per span of 256. The scalar reference does
//! the same integer arithmetic, so every kernel agrees with it to f32
//! rounding.

use super::{from_f16, LutType, TokenTables, CODE_BLOCK, LUT2_BLOCKS_PER_SPAN};
use super::{LUT2_SLOT_ROWS, ROWS, SUBGROUP};

/// One group of 16 rows: its codes, figures and span figures.
pub(crate) struct Group<'a> {
    pub codes: &'a [u8],
    /// LUT2: per block of 32 codes, byte `2k + h` the scale (low nibble)
    /// and minimum (high) of slot `k`'s half `h`. LUT3: every block's 16
    /// scale bytes.
    pub scales: &'a [u8],
    /// LUT2: `scales` again. LUT3: every block's 16 minimum bytes.
    pub mins: &'a [u8],
    /// Per span: the 16 rows' f16 scales, then minimums, in slot order.
    pub spans: &'a [u16],
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Kernel {
    Scalar,
    #[cfg(target_arch = "x86_64")]
    Avx2,
    #[cfg(target_arch = "aarch64")]
    Neon,
    /// NEON with `sdot` (Armv8.2 dotprod: a Pi 5, not a Pi 4).
    #[cfg(target_arch = "aarch64")]
    NeonSdot,
}

impl Kernel {
    /// Every kernel this CPU runs, the reference first (for the tests).
    #[cfg(test)]
    pub fn available() -> Vec<Kernel> {
        let mut all = vec![Kernel::Scalar];
        #[cfg(target_arch = "aarch64")]
        all.push(Kernel::Neon);
        let fastest = Kernel::detect();
        if !all.contains(&fastest) {
            all.push(fastest);
        }
        all
    }

    /// The fastest kernel this CPU runs.
    pub fn detect() -> Kernel {
        #[cfg(target_arch = "x86_64")]
        if is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("f16c")
        {
            return Kernel::Avx2;
        }
        #[cfg(target_arch = "aarch64")]
        if std::arch::is_aarch64_feature_detected!("dotprod") {
            return Kernel::NeonSdot;
        }
        #[cfg(target_arch = "aarch64")]
        if std::arch::is_aarch64_feature_detected!("neon") {
            return Kernel::Neon;
        }
        Kernel::Scalar
    }

    pub fn path(self) -> &'static str {
        match self {
            Kernel::Scalar => "lut-scalar-16row+act:int8-table4",
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2 => "lut-avx2-16row+act:int8-table4",
            #[cfg(target_arch = "aarch64")]
            Kernel::Neon => "lut-neon-16row+act:int8-table4",
            #[cfg(target_arch = "aarch64")]
            Kernel::NeonSdot => "lut-neon-sdot-16row+act:int8-table4",
        }
    }

    /// Per row of `group` (row order), its dot product with the token
    /// but for the minimums' term (`dots`), and that term (`offsets`):
    /// the row's value is `dots - offsets`. LUT2's kernels sum the term
    /// in integers beside the dot (per block a multiply-add of the
    /// minimum nibbles with the tables' activation sums); LUT3's is summed
    /// apart, in plain code the compiler vectorizes: in its kernels the
    /// accumulators and widening cost registers the hot loop needs (the
    /// NEON loop spilled to the stack).
    pub fn group_dot(
        self,
        ty: LutType,
        group: &Group,
        token: &TokenTables,
        dots: &mut [f32; ROWS],
        offsets: &mut [f32; ROWS],
    ) {
        let blocks = token.scales.len();
        let block_bytes = ROWS * CODE_BLOCK * ty.bits as usize / 8;
        let spans = if ty.bits == 2 {
            blocks / LUT2_BLOCKS_PER_SPAN
        } else {
            1
        };
        assert!(ty.bits == 3 || blocks.is_multiple_of(LUT2_BLOCKS_PER_SPAN));
        assert!(group.codes.len() >= blocks * block_bytes);
        // LUT2: a byte per 16 weights and row (both figures); LUT3: a
        // scale byte per 32 (the minimums apart).
        let figure_bytes = if ty.bits == 2 { 2 * ROWS } else { ROWS };
        assert!(group.scales.len() >= blocks * figure_bytes);
        assert!(group.mins.len() >= blocks * ROWS);
        assert!(group.spans.len() >= spans * 2 * ROWS);
        assert!(token.tables.len() >= blocks * CODE_BLOCK / SUBGROUP * 16);
        assert!(token.sums.len() >= 2 * blocks && token.table_sums.len() >= 2 * blocks);
        if ty.bits == 3 {
            lut3_minimums(group, token, offsets);
        }
        match self {
            Kernel::Scalar => match ty.bits {
                2 => scalar_lut2(group, token, dots, offsets),
                _ => scalar_lut3(group, token, dots),
            },
            // SAFETY: `detect` found the features; the lengths are
            // checked above, and the kernels read within them.
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2 => unsafe {
                match ty.bits {
                    2 => avx2::lut2(group, token, dots, offsets),
                    _ => avx2::lut3(group, token, dots),
                }
            },
            #[cfg(target_arch = "aarch64")]
            Kernel::Neon => unsafe {
                match ty.bits {
                    2 => neon::lut2(group, token, dots, offsets),
                    _ => neon::lut3(group, token, dots),
                }
            },
            #[cfg(target_arch = "aarch64")]
            Kernel::NeonSdot => unsafe {
                match ty.bits {
                    2 => neon_sdot::lut2(group, token, dots, offsets),
                    _ => neon_sdot::lut3(group, token, dots),
                }
            },
        }
        if ty.bits == 3 {
            // One span, the row: its f16 scale (slots are rows).
            for (d, &scale) in dots.iter_mut().zip(group.spans) {
                *d *= from_f16(scale);
            }
        }
    }
}

/// LUT3's minimums' term: per row its f16 minimum times the sum over
/// blocks of their minimum figure times the block's activations' sum.
fn lut3_minimums(group: &Group, token: &TokenTables, offsets: &mut [f32; ROWS]) {
    // Summed in a local with iterators: indexing (a bounds check a
    // block) made the compiler store `offsets` every block and not
    // vectorize, which took as long as the kernel.
    let mut sums = [0f32; ROWS];
    for (mins, halves) in group
        .mins
        .chunks_exact(ROWS)
        .zip(token.sums.chunks_exact(2))
        .take(token.scales.len())
    {
        let sum = halves[0] + halves[1];
        for (s, &m) in sums.iter_mut().zip(mins) {
            *s += m as f32 * sum;
        }
    }
    // One span, the row (slots are rows).
    for ((o, s), &minimum) in offsets
        .iter_mut()
        .zip(sums)
        .zip(&group.spans[ROWS..2 * ROWS])
    {
        *o = s * from_f16(minimum);
    }
}

/// Row `r`'s integer sum of plane pairs `i` (two subgroups each) of a
/// block of `codes` against its `tables`.
fn plane_pairs(codes: &[u8], tables: &[i8], r: usize, pairs: std::ops::Range<usize>) -> i32 {
    let table = |sub: usize, n: u8| tables[sub * 16 + n as usize] as i32;
    let mut sum = 0;
    for i in pairs {
        for plane in 0..2 {
            let byte = codes[32 * i + 2 * r + plane];
            sum += (table(2 * i, byte & 15) + table(2 * i + 1, byte >> 4)) << plane;
        }
    }
    sum
}

/// LUT2's reference: per block each slot's two 16-weight halves' integer
/// sums times their scale nibbles, and the halves' activation sums (in
/// table units) times their minimum nibbles, each times the table scale;
/// per span of 256 times the rows' f16 scales and minimums.
fn scalar_lut2(
    group: &Group,
    token: &TokenTables,
    dots: &mut [f32; ROWS],
    offsets: &mut [f32; ROWS],
) {
    let block_bytes = ROWS * CODE_BLOCK * 2 / 8;
    let subgroups = CODE_BLOCK / SUBGROUP;
    let (mut total, mut span) = ([[0f32; ROWS]; 2], [[0f32; ROWS]; 2]);
    for b in 0..token.scales.len() {
        let codes = &group.codes[b * block_bytes..(b + 1) * block_bytes];
        let tables = &token.tables[b * subgroups * 16..(b + 1) * subgroups * 16];
        let figures = &group.scales[b * 2 * ROWS..(b + 1) * 2 * ROWS];
        let activations = &token.table_sums[2 * b..2 * b + 2];
        for (k, &r) in LUT2_SLOT_ROWS.iter().enumerate() {
            let (mut dot, mut minimum) = (0i32, 0i32);
            for h in 0..2 {
                let figure = figures[2 * k + h];
                dot += plane_pairs(codes, tables, r, 2 * h..2 * h + 2) * (figure & 15) as i32;
                minimum += activations[h] as i32 * (figure >> 4) as i32;
            }
            span[0][k] += dot as f32 * token.scales[b];
            span[1][k] += minimum as f32 * token.scales[b];
        }
        if b % LUT2_BLOCKS_PER_SPAN == LUT2_BLOCKS_PER_SPAN - 1 {
            let figures = &group.spans[b / LUT2_BLOCKS_PER_SPAN * 2 * ROWS..];
            for (term, (total, span)) in total.iter_mut().zip(&mut span).enumerate() {
                for k in 0..ROWS {
                    total[k] += from_f16(figures[term * ROWS + k]) * span[k];
                }
                *span = [0.0; ROWS];
            }
        }
    }
    for (k, &r) in LUT2_SLOT_ROWS.iter().enumerate() {
        dots[r] = total[0][k];
        offsets[r] = total[1][k];
    }
}

/// LUT3's reference: each row's integer sum per block from the planes,
/// then the same epilogue as the vector kernels (the row's f16 scale is
/// the caller's).
fn scalar_lut3(group: &Group, token: &TokenTables, dots: &mut [f32; ROWS]) {
    let subgroups = CODE_BLOCK / SUBGROUP;
    let block_bytes = ROWS * CODE_BLOCK * 3 / 8;
    *dots = [0.0; ROWS];
    for b in 0..token.scales.len() {
        let codes = &group.codes[b * block_bytes..(b + 1) * block_bytes];
        let tables = &token.tables[b * subgroups * 16..(b + 1) * subgroups * 16];
        let table = |sub: usize, n: u8| tables[sub * 16 + n as usize] as i32;
        for r in 0..ROWS {
            let mut sum = plane_pairs(codes, tables, r, 0..subgroups / 2);
            let plane2 = &codes[16 * subgroups..];
            for i in 0..subgroups / 4 {
                for e in 0..2 {
                    let byte = plane2[32 * i + 2 * r + e];
                    sum += (table(4 * i + e, byte & 15) + table(4 * i + 2 + e, byte >> 4)) << 2;
                }
            }
            let scale = group.scales[b * ROWS + r] as f32;
            dots[r] += sum as f32 * scale * token.scales[b];
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{Group, TokenTables, LUT2_BLOCKS_PER_SPAN, LUT2_SLOT_ROWS, ROWS};
    use std::arch::x86_64::*;

    // One symbol per format, never inlined, so `harness::builds::cycles`
    // finds each hot loop by name in the agent's binary.
    /// # Safety
    /// The target features are available; `group` and `token` hold the
    /// blocks `token.scales` counts (`Kernel::group_dot` checks).
    #[inline(never)]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn lut2(
        group: &Group,
        token: &TokenTables,
        dots: &mut [f32; ROWS],
        offsets: &mut [f32; ROWS],
    ) {
        let low = _mm256_set1_epi8(0x0F);
        let low_half = _mm_set1_epi8(0x0F);
        // Unsigned multipliers of `vpmaddubsw`: plane 0 by 1, plane 1 by 2.
        let planes01 = _mm256_set1_epi16(0x0201);
        let table = |t: *const i8, sub: usize| {
            _mm256_broadcastsi128_si256(_mm_loadu_si128(t.add(16 * sub) as *const __m128i))
        };
        // Slots 0-7, 8-15 (rows 0-3 and 8-11, 4-7 and 12-15): the dot
        // product's and the minimums' sums, the span's and the total.
        let zero = _mm256_setzero_ps();
        let (mut total, mut span) = ([zero; 2], [zero; 2]);
        let (mut total_min, mut span_min) = ([zero; 2], [zero; 2]);
        for b in 0..token.scales.len() {
            let codes = group.codes.as_ptr().add(b * 128);
            let t = token.tables.as_ptr().add(b * 8 * 16);
            // Each 16-weight half's int16 sums, rows 0-7 | 8-15.
            let mut halves = [_mm256_setzero_si256(); 2];
            for i in 0..4 {
                let x = _mm256_loadu_si256(codes.add(32 * i) as *const __m256i);
                let lo = _mm256_and_si256(x, low);
                let hi = _mm256_and_si256(_mm256_srli_epi16(x, 4), low);
                let a = _mm256_shuffle_epi8(table(t, 2 * i), lo);
                let c = _mm256_shuffle_epi8(table(t, 2 * i + 1), hi);
                let sum = &mut halves[i / 2];
                *sum = _mm256_add_epi16(*sum, _mm256_maddubs_epi16(planes01, a));
                *sum = _mm256_add_epi16(*sum, _mm256_maddubs_epi16(planes01, c));
            }
            // Each row's two halves side by side, times their scale
            // nibbles (stored in this order) and added: int32 per slot;
            // the minimum nibbles times the halves' activation sums.
            let figures = group.scales.as_ptr().add(b * 2 * ROWS) as *const __m128i;
            let raw = [_mm_loadu_si128(figures), _mm_loadu_si128(figures.add(1))];
            let scales = |v: __m128i| _mm256_cvtepu8_epi16(_mm_and_si128(v, low_half));
            let mins =
                |v: __m128i| _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16(v, 4), low_half));
            let activations = token.table_sums.as_ptr().add(2 * b);
            let activations = _mm256_set1_epi32(
                (*activations as u16 as i32) | ((*activations.add(1) as i32) << 16),
            );
            let sums = [
                _mm256_madd_epi16(_mm256_unpacklo_epi16(halves[0], halves[1]), scales(raw[0])),
                _mm256_madd_epi16(_mm256_unpackhi_epi16(halves[0], halves[1]), scales(raw[1])),
            ];
            let table_scale = _mm256_set1_ps(token.scales[b]);
            for h in 0..2 {
                let minimums = _mm256_madd_epi16(mins(raw[h]), activations);
                span[h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums[h]), table_scale, span[h]);
                span_min[h] =
                    _mm256_fmadd_ps(_mm256_cvtepi32_ps(minimums), table_scale, span_min[h]);
            }
            if b % LUT2_BLOCKS_PER_SPAN == LUT2_BLOCKS_PER_SPAN - 1 {
                let figures = group
                    .spans
                    .as_ptr()
                    .add(b / LUT2_BLOCKS_PER_SPAN * 2 * ROWS);
                let f16 =
                    |at: usize| _mm256_cvtph_ps(_mm_loadu_si128(figures.add(at) as *const __m128i));
                for h in 0..2 {
                    total[h] = _mm256_fmadd_ps(f16(8 * h), span[h], total[h]);
                    total_min[h] = _mm256_fmadd_ps(f16(ROWS + 8 * h), span_min[h], total_min[h]);
                    span[h] = zero;
                    span_min[h] = zero;
                }
            }
        }
        let (mut slots, mut slots_min) = ([0f32; ROWS], [0f32; ROWS]);
        for h in 0..2 {
            _mm256_storeu_ps(slots.as_mut_ptr().add(8 * h), total[h]);
            _mm256_storeu_ps(slots_min.as_mut_ptr().add(8 * h), total_min[h]);
        }
        for (k, &r) in LUT2_SLOT_ROWS.iter().enumerate() {
            dots[r] = slots[k];
            offsets[r] = slots_min[k];
        }
    }

    /// LUT3: the two planes as LUT2's were read, and the third plane.
    ///
    /// # Safety
    /// AVX2 and FMA are available; `group` and `token` hold the blocks
    /// `token.scales` counts (checked by the caller).
    #[inline(never)]
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn lut3(group: &Group, token: &TokenTables, dots: &mut [f32; ROWS]) {
        // Subgroups of 4 a block of 32; two planes' bytes, then the third's.
        const S: usize = 8;
        let block_bytes = 16 * S + 8 * S;
        let low = _mm256_set1_epi8(0x0F);
        // Unsigned multipliers of `vpmaddubsw`: plane 0 by 1, plane 1 by 2.
        let planes01 = _mm256_set1_epi16(0x0201);
        let ones = _mm256_set1_epi8(1);
        // Indices with the top bit set read as zero: the third plane's
        // odd bytes out of the even bytes' table, and the other way.
        let odd_out = _mm256_set1_epi16(0x8000u16 as i16);
        let even_out = _mm256_set1_epi16(0x0080);
        let mut dot = [_mm256_setzero_ps(); 2];
        let table = |t: *const i8, sub: usize| {
            _mm256_broadcastsi128_si256(_mm_loadu_si128(t.add(16 * sub) as *const __m128i))
        };
        for b in 0..token.scales.len() {
            let codes = group.codes.as_ptr().add(b * block_bytes);
            let t = token.tables.as_ptr().add(b * S * 16);
            let mut sum = _mm256_setzero_si256();
            for i in 0..S / 2 {
                let x = _mm256_loadu_si256(codes.add(32 * i) as *const __m256i);
                let lo = _mm256_and_si256(x, low);
                let hi = _mm256_and_si256(_mm256_srli_epi16(x, 4), low);
                let a = _mm256_shuffle_epi8(table(t, 2 * i), lo);
                let c = _mm256_shuffle_epi8(table(t, 2 * i + 1), hi);
                sum = _mm256_add_epi16(sum, _mm256_maddubs_epi16(planes01, a));
                sum = _mm256_add_epi16(sum, _mm256_maddubs_epi16(planes01, c));
            }
            {
                // The third plane.
                let mut third = _mm256_setzero_si256();
                for i in 0..S / 4 {
                    let x = _mm256_loadu_si256(codes.add(16 * S + 32 * i) as *const __m256i);
                    let lo = _mm256_and_si256(x, low);
                    let hi = _mm256_and_si256(_mm256_srli_epi16(x, 4), low);
                    let pick = |n: __m256i, sub: usize| {
                        _mm256_or_si256(
                            _mm256_shuffle_epi8(table(t, sub), _mm256_or_si256(n, odd_out)),
                            _mm256_shuffle_epi8(table(t, sub + 1), _mm256_or_si256(n, even_out)),
                        )
                    };
                    third = _mm256_add_epi16(third, _mm256_maddubs_epi16(ones, pick(lo, 4 * i)));
                    third =
                        _mm256_add_epi16(third, _mm256_maddubs_epi16(ones, pick(hi, 4 * i + 2)));
                }
                sum = _mm256_add_epi16(sum, _mm256_slli_epi16(third, 2));
            }
            let halves = [
                _mm256_cvtepi16_epi32(_mm256_castsi256_si128(sum)),
                _mm256_cvtepi16_epi32(_mm256_extracti128_si256(sum, 1)),
            ];
            let scales = _mm_loadu_si128(group.scales.as_ptr().add(b * ROWS) as *const __m128i);
            let table_scale = _mm256_set1_ps(token.scales[b]);
            for h in 0..2 {
                let bytes = |v: __m128i| {
                    _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(if h == 0 {
                        v
                    } else {
                        _mm_srli_si128(v, 8)
                    }))
                };
                let scaled = _mm256_mul_ps(_mm256_cvtepi32_ps(halves[h]), bytes(scales));
                dot[h] = _mm256_fmadd_ps(scaled, table_scale, dot[h]);
            }
        }
        for (h, lanes) in dot.iter().enumerate() {
            _mm256_storeu_ps(dots.as_mut_ptr().add(8 * h), *lanes);
        }
    }
}

#[cfg(target_arch = "aarch64")]
mod neon {
    use super::{Group, TokenTables, LUT2_BLOCKS_PER_SPAN, LUT2_SLOT_ROWS, ROWS};
    use std::arch::aarch64::*;

    // One symbol per format, never inlined, so `harness::builds::cycles`
    // finds each hot loop by name in the agent's binary.
    /// # Safety
    /// The target features are available; `group` and `token` hold the
    /// blocks `token.scales` counts (`Kernel::group_dot` checks).
    #[inline(never)]
    #[target_feature(enable = "neon")]
    pub unsafe fn lut2(
        group: &Group,
        token: &TokenTables,
        dots: &mut [f32; ROWS],
        offsets: &mut [f32; ROWS],
    ) {
        let low = vdupq_n_u8(0x0F);
        let odd = vreinterpretq_s8_u16(vdupq_n_u16(0xFF00));
        let index = [
            vld1q_u8(ROW_FIGURES[0].as_ptr()),
            vld1q_u8(ROW_FIGURES[1].as_ptr()),
        ];
        let mut lut2 = Lut2Sums::new();
        for b in 0..token.scales.len() {
            let codes = group.codes.as_ptr().add(b * 128);
            let t = token.tables.as_ptr().add(b * 8 * 16);
            let table = |sub: usize| vld1q_s8(t.add(16 * sub));
            let figures = lut2_nibbles(group, b, false);
            // Rows 0-3, 4-7, 8-11, 12-15.
            let mut sums = [vdupq_n_s32(0); 4];
            for (h, index) in index.iter().enumerate() {
                // The half's int16 sums, rows 0-7 and 8-15.
                let mut half = [vdupq_n_s16(0); 2];
                for i in 2 * h..2 * h + 2 {
                    let (t0, t1) = (table(2 * i), table(2 * i + 1));
                    for (k, lanes) in half.iter_mut().enumerate() {
                        let x = vld1q_u8(codes.add(32 * i + 16 * k));
                        let a = vqtbl1q_s8(t0, vandq_u8(x, low));
                        let c = vqtbl1q_s8(t1, vshrq_n_u8(x, 4));
                        *lanes = vpadalq_s8(*lanes, a);
                        *lanes = vpadalq_s8(*lanes, c);
                        *lanes = vpadalq_s8(*lanes, vandq_s8(a, odd));
                        *lanes = vpadalq_s8(*lanes, vandq_s8(c, odd));
                    }
                }
                // Each row's scale nibble, rows in order, widened.
                let scales = vqtbl2q_u8(figures, *index);
                let lo = vreinterpretq_s16_u16(vmovl_u8(vget_low_u8(scales)));
                let hi = vreinterpretq_s16_u16(vmovl_high_u8(scales));
                sums[0] = vmlal_s16(sums[0], vget_low_s16(half[0]), vget_low_s16(lo));
                sums[1] = vmlal_high_s16(sums[1], half[0], lo);
                sums[2] = vmlal_s16(sums[2], vget_low_s16(half[1]), vget_low_s16(hi));
                sums[3] = vmlal_high_s16(sums[3], half[1], hi);
            }
            lut2.add_block(group, token, b, sums);
        }
        lut2.store(dots, offsets);
    }

    /// As the AVX2 kernel: `tbl` looks 16 bytes up, `sadalp` adds byte
    /// pairs (a row's two planes, or its two subgroups of the third plane)
    /// into int16 lanes, and plane 1's second copy comes from its bytes
    /// alone.
    ///
    /// # Safety
    /// NEON is available; `group` and `token` hold the blocks
    /// `token.scales` counts (checked by the caller).
    #[inline(never)]
    #[target_feature(enable = "neon")]
    pub unsafe fn lut3(group: &Group, token: &TokenTables, dots: &mut [f32; ROWS]) {
        // Subgroups of 4 a block of 32; two planes' bytes, then the third's.
        const S: usize = 8;
        let block_bytes = 16 * S + 8 * S;
        let low = vdupq_n_u8(0x0F);
        let odd = vreinterpretq_s8_u16(vdupq_n_u16(0xFF00));
        let odd_out = vreinterpretq_u8_u16(vdupq_n_u16(0x8000));
        let even_out = vreinterpretq_u8_u16(vdupq_n_u16(0x0080));
        let mut dot = [vdupq_n_f32(0.0); 4];
        for b in 0..token.scales.len() {
            let codes = group.codes.as_ptr().add(b * block_bytes);
            let t = token.tables.as_ptr().add(b * S * 16);
            let table = |sub: usize| vld1q_s8(t.add(16 * sub));
            let mut sum = [vdupq_n_s16(0); 2];
            for i in 0..S / 2 {
                let (t0, t1) = (table(2 * i), table(2 * i + 1));
                for (h, lanes) in sum.iter_mut().enumerate() {
                    let x = vld1q_u8(codes.add(32 * i + 16 * h));
                    let a = vqtbl1q_s8(t0, vandq_u8(x, low));
                    let c = vqtbl1q_s8(t1, vshrq_n_u8(x, 4));
                    // Both planes once, then plane 1 again: 1 x p0 + 2 x p1.
                    *lanes = vpadalq_s8(*lanes, a);
                    *lanes = vpadalq_s8(*lanes, c);
                    *lanes = vpadalq_s8(*lanes, vandq_s8(a, odd));
                    *lanes = vpadalq_s8(*lanes, vandq_s8(c, odd));
                }
            }
            {
                // The third plane.
                let mut third = [vdupq_n_s16(0); 2];
                for i in 0..S / 4 {
                    let pick = |n: uint8x16_t, sub: usize| {
                        vorrq_s8(
                            vqtbl1q_s8(table(sub), vorrq_u8(n, odd_out)),
                            vqtbl1q_s8(table(sub + 1), vorrq_u8(n, even_out)),
                        )
                    };
                    for (h, lanes) in third.iter_mut().enumerate() {
                        let x = vld1q_u8(codes.add(16 * S + 32 * i + 16 * h));
                        *lanes = vpadalq_s8(*lanes, pick(vandq_u8(x, low), 4 * i));
                        *lanes = vpadalq_s8(*lanes, pick(vshrq_n_u8(x, 4), 4 * i + 2));
                    }
                }
                for h in 0..2 {
                    sum[h] = vaddq_s16(sum[h], vshlq_n_s16(third[h], 2));
                }
            }
            let sums = [
                vcvtq_f32_s32(vmovl_s16(vget_low_s16(sum[0]))),
                vcvtq_f32_s32(vmovl_high_s16(sum[0])),
                vcvtq_f32_s32(vmovl_s16(vget_low_s16(sum[1]))),
                vcvtq_f32_s32(vmovl_high_s16(sum[1])),
            ];
            add_block(
                &mut dot,
                sums,
                group.scales.as_ptr().add(b * ROWS),
                token.scales[b],
            );
        }
        store(&dot, dots);
    }

    /// One block's epilogue, for both NEON kernels: each row's integer sum
    /// (as f32; rows 0-3, 4-7, 8-11, 12-15) times its scale byte (16 at
    /// `scales`) and the block's table scale, added into `dot`.
    ///
    /// # Safety
    /// NEON is available and `scales` has 16 bytes.
    #[inline]
    #[target_feature(enable = "neon")]
    pub(super) unsafe fn add_block(
        dot: &mut [float32x4_t; 4],
        sums: [float32x4_t; 4],
        scales: *const u8,
        table_scale: f32,
    ) {
        let bytes = vld1q_u8(scales);
        let (lo, hi) = (vmovl_u8(vget_low_u8(bytes)), vmovl_high_u8(bytes));
        let scales = [
            vcvtq_f32_u32(vmovl_u16(vget_low_u16(lo))),
            vcvtq_f32_u32(vmovl_high_u16(lo)),
            vcvtq_f32_u32(vmovl_u16(vget_low_u16(hi))),
            vcvtq_f32_u32(vmovl_high_u16(hi)),
        ];
        let table_scale = vdupq_n_f32(table_scale);
        for ((d, s), scale) in dot.iter_mut().zip(sums).zip(scales) {
            *d = vfmaq_f32(*d, vmulq_f32(s, scale), table_scale);
        }
    }

    /// Where row `r`'s scale nibble of half `h` is among a block's 32
    /// LUT2 figure bytes (`2 slot + h`), rows in order.
    const fn row_figures(h: usize) -> [u8; 16] {
        let mut out = [0u8; 16];
        let mut r = 0;
        while r < 16 {
            out[r] = (2 * LUT2_SLOT_ROWS[r] + h) as u8;
            r += 1;
        }
        out
    }

    const ROW_FIGURES: [[u8; 16]; 2] = [row_figures(0), row_figures(1)];

    /// The slots of rows 0-3, 4-7, 8-11, 12-15 start at these.
    const QUAD_SLOTS: [usize; 4] = [0, 8, 4, 12];

    /// Both NEON LUT2 kernels' epilogue: per block the minimums' integer
    /// sums, and both terms times the table scale; per span times the
    /// rows' f16 scales and minimums. Rows 0-3, 4-7, 8-11, 12-15.
    pub(super) struct Lut2Sums {
        span: [float32x4_t; 4],
        total: [float32x4_t; 4],
        span_min: [float32x4_t; 4],
        total_min: [float32x4_t; 4],
    }

    impl Lut2Sums {
        /// # Safety
        /// NEON is available.
        #[inline]
        #[target_feature(enable = "neon")]
        pub(super) unsafe fn new() -> Lut2Sums {
            let zero = [vdupq_n_f32(0.0); 4];
            Lut2Sums {
                span: zero,
                total: zero,
                span_min: zero,
                total_min: zero,
            }
        }

        /// Block `b`'s dot products (`dots`, integer) and minimums.
        ///
        /// # Safety
        /// NEON is available; `group` and `token` hold block `b` and its
        /// span (checked by `group_dot`).
        #[inline]
        #[target_feature(enable = "neon")]
        pub(super) unsafe fn add_block(
            &mut self,
            group: &Group,
            token: &TokenTables,
            b: usize,
            dots: [int32x4_t; 4],
        ) {
            // Each row's minimum nibble of each half, rows in order, times
            // the half's activation sum in table units.
            let high = lut2_nibbles(group, b, true);
            let mut minimums = [vdupq_n_s32(0); 4];
            for (h, index) in ROW_FIGURES.iter().enumerate() {
                let m = vqtbl2q_u8(high, vld1q_u8(index.as_ptr()));
                let lo = vreinterpretq_s16_u16(vmovl_u8(vget_low_u8(m)));
                let hi = vreinterpretq_s16_u16(vmovl_high_u8(m));
                let a = token.table_sums[2 * b + h];
                minimums[0] = vmlal_n_s16(minimums[0], vget_low_s16(lo), a);
                minimums[1] = vmlal_high_n_s16(minimums[1], lo, a);
                minimums[2] = vmlal_n_s16(minimums[2], vget_low_s16(hi), a);
                minimums[3] = vmlal_high_n_s16(minimums[3], hi, a);
            }
            let table_scale = vdupq_n_f32(token.scales[b]);
            for q in 0..4 {
                self.span[q] = vfmaq_f32(self.span[q], vcvtq_f32_s32(dots[q]), table_scale);
                self.span_min[q] =
                    vfmaq_f32(self.span_min[q], vcvtq_f32_s32(minimums[q]), table_scale);
            }
            if b % LUT2_BLOCKS_PER_SPAN == LUT2_BLOCKS_PER_SPAN - 1 {
                let figures = group
                    .spans
                    .as_ptr()
                    .add(b / LUT2_BLOCKS_PER_SPAN * 2 * ROWS);
                for (q, &slot) in QUAD_SLOTS.iter().enumerate() {
                    let d = f16x4(figures.add(slot));
                    let dmin = f16x4(figures.add(ROWS + slot));
                    self.total[q] = vfmaq_f32(self.total[q], d, self.span[q]);
                    self.total_min[q] = vfmaq_f32(self.total_min[q], dmin, self.span_min[q]);
                    self.span[q] = vdupq_n_f32(0.0);
                    self.span_min[q] = vdupq_n_f32(0.0);
                }
            }
        }

        /// # Safety
        /// NEON is available.
        #[inline]
        #[target_feature(enable = "neon")]
        pub(super) unsafe fn store(&self, dots: &mut [f32; ROWS], offsets: &mut [f32; ROWS]) {
            store(&self.total, dots);
            store(&self.total_min, offsets);
        }
    }

    /// Block `b`'s 32 LUT2 figure bytes' scale nibbles (low), or their
    /// minimum nibbles (`high`), as bytes: a `tbl` table.
    ///
    /// # Safety
    /// NEON is available and `group` holds block `b`.
    #[inline]
    #[target_feature(enable = "neon")]
    pub(super) unsafe fn lut2_nibbles(group: &Group, b: usize, high: bool) -> uint8x16x2_t {
        let raw = group.scales.as_ptr().add(b * 2 * ROWS);
        let nibbles = |v: uint8x16_t| {
            if high {
                vshrq_n_u8(v, 4)
            } else {
                vandq_u8(v, vdupq_n_u8(0x0F))
            }
        };
        uint8x16x2_t(nibbles(vld1q_u8(raw)), nibbles(vld1q_u8(raw.add(16))))
    }

    /// 4 f16 at `at` as f32.
    ///
    /// # Safety
    /// NEON is available and `at` has 4 values.
    #[inline]
    #[target_feature(enable = "neon")]
    unsafe fn f16x4(at: *const u16) -> float32x4_t {
        let half = vld1_u16(at);
        let out: float32x4_t;
        // `fcvtl` (f16 to f32, base Armv8): Rust's f16 vectors are
        // unstable.
        std::arch::asm!(
            "fcvtl {out:v}.4s, {half:v}.4h",
            out = out(vreg) out,
            half = in(vreg) half,
            options(pure, nomem, nostack)
        );
        out
    }

    /// The 16 rows' figures into `dots`.
    ///
    /// # Safety
    /// NEON is available.
    #[inline]
    #[target_feature(enable = "neon")]
    pub(super) unsafe fn store(dot: &[float32x4_t; 4], dots: &mut [f32; ROWS]) {
        for (q, lanes) in dot.iter().enumerate() {
            vst1q_f32(dots.as_mut_ptr().add(4 * q), *lanes);
        }
    }
}

#[cfg(target_arch = "aarch64")]
mod neon_sdot {
    use super::neon::{add_block, lut2_nibbles, store, Lut2Sums};
    use super::{Group, TokenTables, LUT2_SLOT_ROWS, ROWS};
    use std::arch::aarch64::*;

    /// # Safety
    /// The target features are available; `group` and `token` hold the
    /// blocks `token.scales` counts (`Kernel::group_dot` checks).
    #[inline(never)]
    #[target_feature(enable = "neon,dotprod")]
    pub unsafe fn lut2(
        group: &Group,
        token: &TokenTables,
        dots: &mut [f32; ROWS],
        offsets: &mut [f32; ROWS],
    ) {
        let low = vdupq_n_u8(0x0F);
        // Shifts of the multipliers' bytes: (s, s, 2s, 2s) a row.
        let doubling = vreinterpretq_s8_u32(vdupq_n_u32(0x0101_0000));
        let index = |h: usize, q: usize| vld1q_u8(QUAD_FIGURES[h][q].as_ptr());
        let mut lut2 = Lut2Sums::new();
        for b in 0..token.scales.len() {
            let codes = group.codes.as_ptr().add(b * 128);
            let t = token.tables.as_ptr().add(b * 8 * 16);
            let table = |sub: usize| vld1q_s8(t.add(16 * sub));
            let figures = lut2_nibbles(group, b, false);
            // Rows 0-3, 4-7, 8-11, 12-15.
            let mut sum = [vdupq_n_s32(0); 4];
            for h in 0..2 {
                // The half's `sdot` multipliers for rows 0-3, 4-7, 8-11,
                // 12-15 (written out: `array::from_fn` left a loop).
                let multiplier = |q: usize| {
                    vshlq_s8(
                        vreinterpretq_s8_u8(vqtbl2q_u8(figures, index(h, q))),
                        doubling,
                    )
                };
                let m = [multiplier(0), multiplier(1), multiplier(2), multiplier(3)];
                for i in 2 * h..2 * h + 2 {
                    let (t0, t1) = (table(2 * i), table(2 * i + 1));
                    for k in 0..2 {
                        let x = vld1q_u8(codes.add(32 * i + 16 * k));
                        let a = vqtbl1q_s8(t0, vandq_u8(x, low));
                        let c = vqtbl1q_s8(t1, vshrq_n_u8(x, 4));
                        sum[2 * k] = sdot(sum[2 * k], vzip1q_s8(a, c), m[2 * k]);
                        sum[2 * k + 1] = sdot(sum[2 * k + 1], vzip2q_s8(a, c), m[2 * k + 1]);
                    }
                }
            }
            lut2.add_block(group, token, b, sum);
        }
        lut2.store(dots, offsets);
    }

    /// Where each byte of half `h`'s multipliers for rows `4q..4q + 4`
    /// comes from among a block's 32 LUT2 figure bytes (`2 slot + h`,
    /// four bytes a row).
    const fn quad_figures(h: usize, q: usize) -> [u8; 16] {
        let mut out = [0u8; 16];
        let mut i = 0;
        while i < 16 {
            out[i] = (2 * LUT2_SLOT_ROWS[4 * q + i / 4] + h) as u8;
            i += 1;
        }
        out
    }

    const QUAD_FIGURES: [[[u8; 16]; 4]; 2] = [
        [
            quad_figures(0, 0),
            quad_figures(0, 1),
            quad_figures(0, 2),
            quad_figures(0, 3),
        ],
        [
            quad_figures(1, 0),
            quad_figures(1, 1),
            quad_figures(1, 2),
            quad_figures(1, 3),
        ],
    ];

    /// `sdot` of `a` with `b` into `acc` (Rust's `vdotq_s32` is unstable).
    #[inline]
    #[target_feature(enable = "neon,dotprod")]
    unsafe fn sdot(acc: int32x4_t, a: int8x16_t, b: int8x16_t) -> int32x4_t {
        let mut out = acc;
        std::arch::asm!(
            "sdot {out:v}.4s, {a:v}.16b, {b:v}.16b",
            out = inout(vreg) out,
            a = in(vreg) a,
            b = in(vreg) b,
            options(pure, nomem, nostack)
        );
        out
    }

    /// The same layout as the other kernels, added otherwise: the two
    /// subgroups' lookups of 8 rows (each row's plane 0 and plane 1 side
    /// by side) are zipped so each 4 bytes are one row's (`g` p0, `g'`
    /// p0, `g` p1, `g'` p1), and one `sdot` with bytes (1, 1, 2, 2) adds
    /// them into the row's int32 lane: 8 instructions per 64 weights
    /// where `sadalp` needs 11, and the sums need no widening.
    ///
    /// # Safety
    /// NEON and dotprod are available; `group` and `token` hold the
    /// blocks `token.scales` counts (checked by the caller).
    #[inline(never)]
    #[target_feature(enable = "neon,dotprod")]
    pub unsafe fn lut3(group: &Group, token: &TokenTables, dots: &mut [f32; ROWS]) {
        // Subgroups of 4 a block of 32; two planes' bytes, then the third's.
        const S: usize = 8;
        let block_bytes = 16 * S + 8 * S;
        let low = vdupq_n_u8(0x0F);
        let planes01 = vreinterpretq_s8_u32(vdupq_n_u32(0x0202_0101));
        let fours = vdupq_n_s8(4);
        let odd_out = vreinterpretq_u8_u16(vdupq_n_u16(0x8000));
        let even_out = vreinterpretq_u8_u16(vdupq_n_u16(0x0080));
        let mut dot = [vdupq_n_f32(0.0); 4];
        for b in 0..token.scales.len() {
            let codes = group.codes.as_ptr().add(b * block_bytes);
            let t = token.tables.as_ptr().add(b * S * 16);
            let table = |sub: usize| vld1q_s8(t.add(16 * sub));
            // Rows 0-3, 4-7, 8-11, 12-15.
            let mut sum = [vdupq_n_s32(0); 4];
            for i in 0..S / 2 {
                let (t0, t1) = (table(2 * i), table(2 * i + 1));
                for h in 0..2 {
                    let x = vld1q_u8(codes.add(32 * i + 16 * h));
                    let a = vqtbl1q_s8(t0, vandq_u8(x, low));
                    let c = vqtbl1q_s8(t1, vshrq_n_u8(x, 4));
                    sum[2 * h] = sdot(sum[2 * h], vzip1q_s8(a, c), planes01);
                    sum[2 * h + 1] = sdot(sum[2 * h + 1], vzip2q_s8(a, c), planes01);
                }
            }
            {
                // The third plane.
                for i in 0..S / 4 {
                    let pick = |n: uint8x16_t, sub: usize| {
                        vorrq_s8(
                            vqtbl1q_s8(table(sub), vorrq_u8(n, odd_out)),
                            vqtbl1q_s8(table(sub + 1), vorrq_u8(n, even_out)),
                        )
                    };
                    for h in 0..2 {
                        let x = vld1q_u8(codes.add(16 * S + 32 * i + 16 * h));
                        let lo = pick(vandq_u8(x, low), 4 * i);
                        let hi = pick(vshrq_n_u8(x, 4), 4 * i + 2);
                        sum[2 * h] = sdot(sum[2 * h], vzip1q_s8(lo, hi), fours);
                        sum[2 * h + 1] = sdot(sum[2 * h + 1], vzip2q_s8(lo, hi), fours);
                    }
                }
            }
            let sums = sum.map(|lanes| vcvtq_f32_s32(lanes));
            add_block(
                &mut dot,
                sums,
                group.scales.as_ptr().add(b * ROWS),
                token.scales[b],
            );
        }
        store(&dot, dots);
    }
}
