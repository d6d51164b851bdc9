//! Non-uniform codebook quantization with dense-and-sparse outliers, after
//! SqueezeLLM: each weight row gets its own small codebook (16 centroids
//! for SQ4, 8 for SQ3, stored as f16) found by 1-D k-means weighted by the
//! input channels' sensitivities, and each weight is stored as the index of
//! its centroid. `SQ4+S<pct>` first takes the `pct` percent of weights with
//! the largest sensitivity-weighted magnitude out of the clustering and
//! keeps them exactly, as corrections in a CSR matrix (f16 values, column
//! indices, row offsets). Decoding is a table lookup.
//!
//! Kernels are Rust `std::arch` (AVX2 on x86-64, chosen at run time; a
//! scalar reference elsewhere) rather than C through bindgen: no second
//! compiler in the cross-build, and the one unsafe block per kernel sits
//! beside its safe reference in one file.

use std::fmt;

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum CodebookError {
    #[error("`{0}` is not a codebook type: SQ4 or SQ3, optionally +S<percent> of outliers kept exactly (e.g. SQ4+S0.45)")]
    Spelling(String),
    #[error("`{name}`: the outlier percentage {percent} must be in (0, 10]")]
    Percent { name: String, percent: String },
    #[error("{rows} x {cols}: codebook rows need a multiple of 32 columns")]
    Shape { rows: usize, cols: usize },
}

/// `SQ4`, `SQ3`, `SQ4+S0.45`, `SQ3+S1`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CodebookType {
    /// 3 or 4: index bits, 2^bits centroids per row.
    pub bits: u8,
    /// Percent of weights kept exactly in the sparse part.
    pub outlier_percent: Option<f64>,
}

impl CodebookType {
    pub fn parse(name: &str) -> Result<CodebookType, CodebookError> {
        let upper = name.trim().to_ascii_uppercase();
        let (base, sparse) = match upper.split_once('+') {
            Some((b, s)) => (b, Some(s)),
            None => (upper.as_str(), None),
        };
        let bits = match base {
            "SQ4" => 4,
            "SQ3" => 3,
            _ => return Err(CodebookError::Spelling(name.to_string())),
        };
        let outlier_percent = match sparse {
            None => None,
            Some(s) => {
                let digits = s
                    .strip_prefix('S')
                    .ok_or_else(|| CodebookError::Spelling(name.to_string()))?;
                let percent: f64 = digits
                    .parse()
                    .map_err(|_| CodebookError::Spelling(name.to_string()))?;
                if !(percent > 0.0 && percent <= 10.0) {
                    return Err(CodebookError::Percent {
                        name: name.to_string(),
                        percent: digits.to_string(),
                    });
                }
                Some(percent)
            }
        };
        Ok(CodebookType {
            bits,
            outlier_percent,
        })
    }

    pub fn centroids(self) -> usize {
        1 << self.bits
    }
}

impl fmt::Display for CodebookType {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "SQ{}", self.bits)?;
        if let Some(p) = self.outlier_percent {
            write!(f, "+S{p}")?;
        }
        Ok(())
    }
}

/// Exact corrections: `value` is added to the dense part's weight at
/// (row, column), so dense + sparse reproduces the kept weights.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SparseRows {
    /// `row_start[r]..row_start[r + 1]` are row r's entries.
    pub row_start: Vec<u32>,
    pub columns: Vec<u32>,
    /// f16-representable values.
    pub values: Vec<f32>,
}

/// A quantized matrix: per row a codebook and packed indices, plus the
/// sparse corrections.
#[derive(Debug, Clone)]
pub struct CodebookMatrix {
    pub ty: CodebookType,
    pub rows: usize,
    pub cols: usize,
    /// `rows x 2^bits` centroids, each an f16 value.
    pub codebooks: Vec<f32>,
    /// Row after row, `cols * bits / 8` bytes each (see `pack_row`).
    pub indices: Vec<u8>,
    pub sparse: SparseRows,
    /// For the integer kernel: each row's codebook as int8 (`rows x 16`,
    /// the centroids over the row's `table_scales`, rounded), so a byte
    /// shuffle looks 32 weights up at once.
    int8_tables: Vec<i8>,
    table_scales: Vec<f32>,
}

fn f16_round(v: f32) -> f32 {
    // SAFETY: pure conversions.
    unsafe { llama_cpp_sys_2::ggml_fp16_to_fp32(llama_cpp_sys_2::ggml_fp32_to_fp16(v)) }
}

/// Weighted 1-D k-means of `values` (weights `weights`) into `k`
/// centroids. Lloyd's iterations stop in local optima, and with uneven
/// weights a poor one is common, so it starts from three places and keeps
/// the lowest weighted error: the values' quantiles, their weighted
/// quantiles, and the unweighted solution. Deterministic.
fn weighted_kmeans(values: &[f32], weights: &[f32], k: usize) -> Vec<f32> {
    let mut order: Vec<usize> = (0..values.len()).collect();
    order.sort_by(|&a, &b| values[a].total_cmp(&values[b]));
    let n = order.len();
    let quantiles: Vec<f32> = (0..k)
        .map(|q| values[order[((2 * q + 1) * n / (2 * k)).min(n - 1)]])
        .collect();
    let total: f64 = weights.iter().map(|&w| w as f64).sum::<f64>().max(1e-30);
    let mut weighted_quantiles = Vec::with_capacity(k);
    let mut seen = 0f64;
    for &i in &order {
        seen += weights[i] as f64;
        while weighted_quantiles.len() < k
            && seen >= (weighted_quantiles.len() as f64 + 0.5) / k as f64 * total
        {
            weighted_quantiles.push(values[i]);
        }
    }
    weighted_quantiles.resize(k, values[order[n - 1]]);
    let ones = vec![1f32; n];
    let (unweighted, _) = lloyd(values, &ones, &order, quantiles.clone());
    [quantiles, weighted_quantiles, unweighted]
        .into_iter()
        .map(|start| lloyd(values, weights, &order, start))
        .min_by(|a, b| a.1.total_cmp(&b.1))
        .map(|(c, _)| c)
        .unwrap_or_else(|| vec![0.0; k])
}

/// Lloyd's iterations from `centroids` (at most 100); a centroid left
/// without points moves to the point served worst. Returns the sorted
/// centroids and their weighted squared error.
fn lloyd(
    values: &[f32],
    weights: &[f32],
    order: &[usize],
    mut centroids: Vec<f32>,
) -> (Vec<f32>, f64) {
    let k = centroids.len();
    let n = order.len();
    let mut assigned = vec![0usize; n];
    let mut cost = f64::MAX;
    for _ in 0..100 {
        centroids.sort_by(f32::total_cmp);
        let mut sum = vec![0f64; k];
        let mut mass = vec![0f64; k];
        let mut c = 0usize;
        cost = 0.0;
        for (rank, &i) in order.iter().enumerate() {
            while c + 1 < k && values[i] > (centroids[c] + centroids[c + 1]) / 2.0 {
                c += 1;
            }
            assigned[rank] = c;
            sum[c] += weights[i] as f64 * values[i] as f64;
            mass[c] += weights[i] as f64;
            cost += weights[i] as f64 * ((values[i] - centroids[c]) as f64).powi(2);
        }
        let mut moved = false;
        for c in 0..k {
            let next = if mass[c] > 0.0 {
                (sum[c] / mass[c]) as f32
            } else {
                let served = |r: usize| {
                    let i = order[r];
                    weights[i] * (values[i] - centroids[assigned[r]]).powi(2)
                };
                (0..n)
                    .max_by(|&a, &b| served(a).total_cmp(&served(b)))
                    .map_or(centroids[c], |r| values[order[r]])
            };
            moved |= next != centroids[c];
            centroids[c] = next;
        }
        if !moved {
            break;
        }
    }
    centroids.sort_by(f32::total_cmp);
    (centroids, cost)
}

/// The nearest of the sorted `centroids`.
fn nearest(centroids: &[f32], v: f32) -> usize {
    let mut best = 0;
    for (c, &x) in centroids.iter().enumerate() {
        if (x - v).abs() < (centroids[best] - v).abs() {
            best = c;
        }
    }
    best
}

/// Packs a row's indices. 4 bits: per 32 weights 16 bytes, byte `i`
/// holding weight `i` in its low and weight `i + 16` in its high nibble (a
/// mask and a shift give the 32 indices in order, as GGML's Q4_0 lays out
/// its nibbles). 3 bits: per 8 weights 3 bytes, weight `i` at bits
/// `3i..3i+3` of the little-endian 24-bit word.
fn pack_row(indices: &[u8], bits: u8, out: &mut Vec<u8>) {
    if bits == 4 {
        for group in indices.chunks_exact(32) {
            for i in 0..16 {
                out.push(group[i] | (group[i + 16] << 4));
            }
        }
    } else {
        for group in indices.chunks_exact(8) {
            let word = group
                .iter()
                .enumerate()
                .fold(0u32, |w, (i, &x)| w | ((x as u32) << (3 * i)));
            out.extend_from_slice(&word.to_le_bytes()[..3]);
        }
    }
}

impl CodebookMatrix {
    /// Quantizes the row-major `rows x cols` matrix `w`; `sensitivity` is
    /// one weight per input column (e.g. the mean squared activation of
    /// that channel), uniform when absent.
    pub fn quantize(
        ty: CodebookType,
        w: &[f32],
        rows: usize,
        cols: usize,
        sensitivity: Option<&[f32]>,
    ) -> Result<CodebookMatrix, CodebookError> {
        if !cols.is_multiple_of(32) || w.len() != rows * cols {
            return Err(CodebookError::Shape { rows, cols });
        }
        let uniform = vec![1f32; cols];
        let s = sensitivity.filter(|s| s.len() == cols).unwrap_or(&uniform);
        // Outliers: the largest sensitivity-weighted squared magnitudes of
        // the whole matrix.
        let mut outlier = vec![false; w.len()];
        if let Some(percent) = ty.outlier_percent {
            let count = ((w.len() as f64) * percent / 100.0).round() as usize;
            if count > 0 {
                let score = |i: usize| s[i % cols] * w[i] * w[i];
                let mut order: Vec<usize> = (0..w.len()).collect();
                order.select_nth_unstable_by(count - 1, |&a, &b| score(b).total_cmp(&score(a)));
                for &i in &order[..count] {
                    outlier[i] = true;
                }
            }
        }
        let k = ty.centroids();
        let mut codebooks = Vec::with_capacity(rows * k);
        let mut indices = Vec::with_capacity(rows * cols * ty.bits as usize / 8);
        let mut sparse = SparseRows {
            row_start: vec![0],
            ..Default::default()
        };
        let mut row_indices = vec![0u8; cols];
        for r in 0..rows {
            let row = &w[r * cols..(r + 1) * cols];
            let kept: Vec<usize> = (0..cols).filter(|&j| !outlier[r * cols + j]).collect();
            let values: Vec<f32> = kept.iter().map(|&j| row[j]).collect();
            let weights: Vec<f32> = kept.iter().map(|&j| s[j].max(1e-12)).collect();
            let mut centroids = if values.is_empty() {
                vec![0f32; k]
            } else {
                weighted_kmeans(&values, &weights, k)
            };
            for c in &mut centroids {
                *c = f16_round(*c);
            }
            for j in 0..cols {
                let idx = nearest(&centroids, row[j]);
                row_indices[j] = idx as u8;
                if outlier[r * cols + j] {
                    sparse.columns.push(j as u32);
                    sparse.values.push(f16_round(row[j] - centroids[idx]));
                }
            }
            sparse.row_start.push(sparse.columns.len() as u32);
            pack_row(&row_indices, ty.bits, &mut indices);
            codebooks.extend_from_slice(&centroids);
        }
        let mut int8_tables = Vec::with_capacity(rows * 16);
        let mut table_scales = Vec::with_capacity(rows);
        for book in codebooks.chunks_exact(k) {
            let amax = book.iter().fold(0f32, |m, c| m.max(c.abs()));
            let scale = amax / 127.0;
            let inverse = if scale > 0.0 { 1.0 / scale } else { 0.0 };
            table_scales.push(scale);
            int8_tables.extend(
                book.iter()
                    .map(|c| (c * inverse).round().clamp(-127.0, 127.0) as i8),
            );
            int8_tables.extend(std::iter::repeat_n(0i8, 16 - k));
        }
        Ok(CodebookMatrix {
            ty,
            rows,
            cols,
            codebooks,
            indices,
            sparse,
            int8_tables,
            table_scales,
        })
    }

    fn row_bytes(&self) -> usize {
        self.cols * self.ty.bits as usize / 8
    }

    /// Bytes as stored: packed indices, f16 codebooks, and the CSR part
    /// (f16 values, u16 column indices when the row is at most 65536 wide
    /// else u32, u32 row offsets).
    pub fn storage_bytes(&self) -> usize {
        let column_bytes = if self.cols <= 1 << 16 { 2 } else { 4 };
        let sparse = if self.sparse.values.is_empty() {
            0
        } else {
            self.sparse.values.len() * (2 + column_bytes) + self.sparse.row_start.len() * 4
        };
        self.indices.len() + self.codebooks.len() * 2 + sparse
    }

    pub fn bits_per_weight(&self) -> f64 {
        self.storage_bytes() as f64 * 8.0 / (self.rows * self.cols) as f64
    }

    /// Row `r`'s indices, unpacked.
    fn row_indices(&self, r: usize) -> Vec<u8> {
        let bytes = &self.indices[r * self.row_bytes()..(r + 1) * self.row_bytes()];
        let mut out = Vec::with_capacity(self.cols);
        if self.ty.bits == 4 {
            for group in bytes.chunks_exact(16) {
                out.extend(group.iter().map(|b| b & 15));
                out.extend(group.iter().map(|b| b >> 4));
            }
        } else {
            for group in bytes.chunks_exact(3) {
                let word = u32::from_le_bytes([group[0], group[1], group[2], 0]);
                out.extend((0..8).map(|i| ((word >> (3 * i)) & 7) as u8));
            }
        }
        out
    }

    /// The matrix the codes and corrections stand for.
    pub fn dequantize(&self) -> Vec<f32> {
        let k = self.ty.centroids();
        let mut out = Vec::with_capacity(self.rows * self.cols);
        for r in 0..self.rows {
            let book = &self.codebooks[r * k..(r + 1) * k];
            out.extend(self.row_indices(r).iter().map(|&i| book[i as usize]));
            let row = &mut out[r * self.cols..];
            for e in self.sparse.row_start[r] as usize..self.sparse.row_start[r + 1] as usize {
                row[self.sparse.columns[e] as usize] += self.sparse.values[e];
            }
        }
        out
    }

    /// `y[t][r] = sum_j W[r][j] x[t][j]` for `tokens` activation rows `x`
    /// (row-major, `tokens x cols`), into `y` (`tokens x rows`), rows split
    /// over `threads`. AVX2 when the CPU has it, else the scalar reference.
    pub fn gemm(&self, x: &[f32], tokens: usize, y: &mut [f32], threads: usize) {
        assert_eq!(x.len(), tokens * self.cols);
        assert_eq!(y.len(), tokens * self.rows);
        let integer = self
            .integer_kernel()
            .then(|| quantize_activations(x, self.cols));
        let integer = integer.as_ref();
        let threads = threads.clamp(1, self.rows.max(1));
        let per = self.rows.div_ceil(threads);
        // Each thread fills its rows of a transposed output, then they are
        // placed: outputs of one row for every token sit together.
        let parts: Vec<Vec<f32>> = std::thread::scope(|scope| {
            (0..threads)
                .map(|t| {
                    let rows = t * per..((t + 1) * per).min(self.rows);
                    scope.spawn(move || {
                        let mut out = vec![0f32; rows.len() * tokens];
                        for (slot, r) in rows.enumerate() {
                            let out = &mut out[slot * tokens..(slot + 1) * tokens];
                            match integer {
                                Some(q) => self.row_dot_int8(r, q, x, tokens, out),
                                None => self.row_dot(r, x, tokens, out),
                            }
                        }
                        out
                    })
                })
                .collect::<Vec<_>>()
                .into_iter()
                .map(|h| h.join().unwrap_or_default())
                .collect()
        });
        for (t_index, part) in parts.into_iter().enumerate() {
            for (slot, outs) in part.chunks(tokens.max(1)).enumerate() {
                let r = t_index * per + slot;
                for (t, v) in outs.iter().enumerate() {
                    y[t * self.rows + r] = *v;
                }
            }
        }
    }

    /// Whether the integer kernel runs: SQ4 on a CPU with AVX2. It rounds
    /// the activations to int8 per 32 (as GGML's Q4_0 and IQ4_NL kernels
    /// round them to Q8_0) and each row's centroids to int8.
    pub fn integer_kernel(&self) -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            self.ty.bits == 4
                && std::is_x86_feature_detected!("avx2")
                && std::is_x86_feature_detected!("fma")
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    }

    /// How this matrix is multiplied here, for the `kernel_path` column.
    pub fn kernel_path(&self) -> &'static str {
        #[cfg(target_arch = "x86_64")]
        {
            if self.integer_kernel() {
                return "codebook-avx2-int8+act:int8x32";
            }
            if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
                return "codebook-avx2-f32+act:f32";
            }
        }
        "codebook-scalar+act:f32"
    }

    /// Row `r` with the integer kernel (see `integer_kernel`), then the
    /// sparse corrections in f32.
    fn row_dot_int8(
        &self,
        r: usize,
        q: &QuantizedActivations,
        x: &[f32],
        tokens: usize,
        out: &mut [f32],
    ) {
        #[cfg(target_arch = "x86_64")]
        {
            // SAFETY: only called when `integer_kernel` found AVX2 and FMA;
            // the table has 16 entries, the row `cols / 2` index bytes and
            // the activations `tokens x cols` values.
            unsafe {
                avx2::row_dot_int8(
                    &self.int8_tables[r * 16..(r + 1) * 16],
                    self.table_scales[r],
                    &self.indices[r * self.row_bytes()..(r + 1) * self.row_bytes()],
                    q,
                    self.cols,
                    tokens,
                    out,
                )
            };
            self.add_sparse(r, x, tokens, out);
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = q;
            self.row_dot(r, x, tokens, out);
        }
    }

    /// Row `r` against every token: dense part, then sparse corrections.
    fn row_dot(&self, r: usize, x: &[f32], tokens: usize, out: &mut [f32]) {
        let k = self.ty.centroids();
        let book = &self.codebooks[r * k..(r + 1) * k];
        let bytes = &self.indices[r * self.row_bytes()..(r + 1) * self.row_bytes()];
        #[cfg(target_arch = "x86_64")]
        {
            if self.ty.bits == 3
                && std::is_x86_feature_detected!("avx2")
                && std::is_x86_feature_detected!("fma")
            {
                // SAFETY: the CPU has AVX2 and FMA (checked above); the
                // codebook has 8 entries and the row `cols * 3 / 8` bytes.
                unsafe { avx2::row_dot_3bit(book, bytes, x, self.cols, tokens, out) };
                self.add_sparse(r, x, tokens, out);
                return;
            }
        }
        self.row_dot_reference(r, book, x, tokens, out);
        self.add_sparse(r, x, tokens, out);
    }

    /// The scalar reference of the dense part.
    fn row_dot_reference(&self, r: usize, book: &[f32], x: &[f32], tokens: usize, out: &mut [f32]) {
        let indices = self.row_indices(r);
        for (t, o) in out.iter_mut().enumerate().take(tokens) {
            let xt = &x[t * self.cols..(t + 1) * self.cols];
            *o = indices
                .iter()
                .zip(xt)
                .map(|(&i, &v)| book[i as usize] * v)
                .sum();
        }
    }

    fn add_sparse(&self, r: usize, x: &[f32], tokens: usize, out: &mut [f32]) {
        let (a, b) = (
            self.sparse.row_start[r] as usize,
            self.sparse.row_start[r + 1] as usize,
        );
        for (t, o) in out.iter_mut().enumerate().take(tokens) {
            let xt = &x[t * self.cols..];
            for e in a..b {
                *o += self.sparse.values[e] * xt[self.sparse.columns[e] as usize];
            }
        }
    }
}

/// Activations rounded to int8 per 32 values of each token, one f32 scale
/// per 32.
pub struct QuantizedActivations {
    values: Vec<i8>,
    scales: Vec<f32>,
}

fn quantize_activations(x: &[f32], cols: usize) -> QuantizedActivations {
    let mut values = Vec::with_capacity(x.len());
    let mut scales = Vec::with_capacity(x.len() / 32);
    debug_assert!(cols.is_multiple_of(32));
    for block in x.chunks_exact(32) {
        let amax = block.iter().fold(0f32, |m, v| m.max(v.abs()));
        let scale = amax / 127.0;
        let inverse = if scale > 0.0 { 1.0 / scale } else { 0.0 };
        scales.push(scale);
        values.extend(block.iter().map(|v| (v * inverse).round() as i8));
    }
    QuantizedActivations { values, scales }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    /// Up to this many tokens share one decoded weight vector.
    const TOKENS_AT_ONCE: usize = 4;

    /// The sum of the 8 lanes.
    #[target_feature(enable = "avx2")]
    unsafe fn sum_lanes(a: __m256) -> f32 {
        let sum128 = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
        let sum64 = _mm_add_ps(sum128, _mm_movehl_ps(sum128, sum128));
        let sum32 = _mm_add_ss(sum64, _mm_shuffle_ps(sum64, sum64, 1));
        _mm_cvtss_f32(sum32)
    }

    /// SQ3's dense dot products in f32: per 8 weights, the 3-bit indices
    /// become 8 lanes, `vpermps` looks their centroids up in the row's
    /// 8-entry codebook, then one FMA per token.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn row_dot_3bit(
        book: &[f32],
        bytes: &[u8],
        x: &[f32],
        cols: usize,
        tokens: usize,
        out: &mut [f32],
    ) {
        let table = _mm256_loadu_ps(book.as_ptr());
        let seven = _mm256_set1_epi32(7);
        let shifts = _mm256_setr_epi32(0, 3, 6, 9, 12, 15, 18, 21);
        let mut t0 = 0;
        while t0 < tokens {
            let n = (tokens - t0).min(TOKENS_AT_ONCE);
            let mut acc = [_mm256_setzero_ps(); TOKENS_AT_ONCE];
            let mut fma = |w: __m256, j: usize| {
                for (t, a) in acc.iter_mut().enumerate().take(n) {
                    let xv = _mm256_loadu_ps(x.as_ptr().add((t0 + t) * cols + j));
                    *a = _mm256_fmadd_ps(w, xv, *a);
                }
            };
            for (g, group) in bytes.chunks_exact(3).enumerate() {
                let word = group[0] as i32 | (group[1] as i32) << 8 | (group[2] as i32) << 16;
                let lanes =
                    _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(word), shifts), seven);
                fma(_mm256_permutevar8x32_ps(table, lanes), g * 8);
            }
            for (t, a) in acc.iter().enumerate().take(n) {
                out[t0 + t] = sum_lanes(*a);
            }
            t0 += n;
        }
    }

    /// SQ4 with integers: per 32 weights, the 16 index bytes split into 32
    /// nibbles, `vpshufb` looks them up in the row's int8 table, and
    /// `vpmaddubsw`/`vpmaddwd` multiply them with the int8 activations
    /// (GGML's Q4_0 kernel, with a table lookup in place of "minus 8").
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn row_dot_int8(
        table: &[i8],
        table_scale: f32,
        bytes: &[u8],
        x: &super::QuantizedActivations,
        cols: usize,
        tokens: usize,
        out: &mut [f32],
    ) {
        let table128 = _mm_loadu_si128(table.as_ptr() as *const __m128i);
        let table = _mm256_set_m128i(table128, table128);
        let nibble = _mm_set1_epi8(15);
        let ones = _mm256_set1_epi16(1);
        let blocks = cols / 32;
        let mut t0 = 0;
        while t0 < tokens {
            let n = (tokens - t0).min(TOKENS_AT_ONCE);
            let mut acc = [_mm256_setzero_ps(); TOKENS_AT_ONCE];
            for b in 0..blocks {
                let packed = _mm_loadu_si128(bytes.as_ptr().add(b * 16) as *const __m128i);
                let low = _mm_and_si128(packed, nibble);
                let high = _mm_and_si128(_mm_srli_epi16(packed, 4), nibble);
                let w = _mm256_shuffle_epi8(table, _mm256_set_m128i(high, low));
                let w_abs = _mm256_sign_epi8(w, w);
                for (t, a) in acc.iter_mut().enumerate().take(n) {
                    let token = t0 + t;
                    let xq = _mm256_loadu_si256(
                        x.values.as_ptr().add(token * cols + b * 32) as *const __m256i
                    );
                    let products = _mm256_maddubs_epi16(w_abs, _mm256_sign_epi8(xq, w));
                    let sums = _mm256_cvtepi32_ps(_mm256_madd_epi16(products, ones));
                    let scale = _mm256_set1_ps(x.scales[token * blocks + b]);
                    *a = _mm256_fmadd_ps(sums, scale, *a);
                }
            }
            for (t, a) in acc.iter().enumerate().take(n) {
                out[t0 + t] = sum_lanes(*a) * table_scale;
            }
            t0 += n;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::weights::{llm_like_activations, llm_like_weights};

    #[test]
    fn spellings_parse_and_bad_ones_say_what_is_allowed() {
        assert_eq!(
            CodebookType::parse("sq4+s0.45").unwrap(),
            CodebookType {
                bits: 4,
                outlier_percent: Some(0.45)
            }
        );
        assert_eq!(CodebookType::parse("SQ3").unwrap().centroids(), 8);
        assert_eq!(
            CodebookType::parse("SQ4+S0.45").unwrap().to_string(),
            "SQ4+S0.45"
        );
        let e = CodebookType::parse("SQ5").unwrap_err().to_string();
        assert!(e.contains("`SQ5`") && e.contains("SQ4 or SQ3"), "{e}");
        let e = CodebookType::parse("SQ4+S12").unwrap_err().to_string();
        assert!(e.contains("12") && e.contains("(0, 10]"), "{e}");
        assert!(CodebookType::parse("SQ4+S0").is_err());
        assert!(CodebookType::parse("SQ4+X1").is_err());
    }

    /// NMSE of y = W x against the f64 reference of the original matrix.
    fn output_nmse(
        w: &[f32],
        rows: usize,
        cols: usize,
        x: &[f32],
        tokens: usize,
        y: &[f32],
    ) -> f64 {
        let (mut err, mut energy) = (0f64, 0f64);
        for t in 0..tokens {
            for r in 0..rows {
                let exact: f64 = (0..cols)
                    .map(|j| w[r * cols + j] as f64 * x[t * cols + j] as f64)
                    .sum();
                err += (y[t * rows + r] as f64 - exact).powi(2);
                energy += exact * exact;
            }
        }
        err / energy
    }

    #[test]
    fn kernels_match_the_f64_reference_of_the_decoded_matrix() {
        let (rows, cols, tokens) = (37, 256, 5);
        let w = llm_like_weights(rows, cols, 3);
        let x = llm_like_activations(tokens, cols, 4);
        for name in ["SQ4", "SQ3", "SQ4+S0.45", "SQ3+S1"] {
            let m =
                CodebookMatrix::quantize(CodebookType::parse(name).unwrap(), &w, rows, cols, None)
                    .unwrap();
            let decoded = m.dequantize();
            for threads in [1, 3] {
                let mut y = vec![0f32; tokens * rows];
                m.gemm(&x, tokens, &mut y, threads);
                // Against the decoded matrix: exact up to f32 sums, or (the
                // integer SQ4 kernel) up to int8 activations and tables.
                let nmse = output_nmse(&decoded, rows, cols, &x, tokens, &y);
                let bound = if m.integer_kernel() { 1e-3 } else { 1e-10 };
                assert!(nmse < bound, "{name} {threads} {}: {nmse}", m.kernel_path());
            }
            // And the scalar reference agrees with whatever ran.
            let mut reference = vec![0f32; tokens];
            let k = m.ty.centroids();
            m.row_dot_reference(0, &m.codebooks[..k], &x, tokens, &mut reference);
            m.add_sparse(0, &x, tokens, &mut reference);
            let mut y = vec![0f32; tokens * rows];
            m.gemm(&x, tokens, &mut y, 1);
            let tolerance = if m.integer_kernel() { 1e-2 } else { 1e-5 };
            for t in 0..tokens {
                // Relative to the sum of the terms' magnitudes.
                let magnitude: f32 = x[t * cols..(t + 1) * cols]
                    .iter()
                    .map(|v| v.abs())
                    .sum::<f32>()
                    * m.codebooks[..k].iter().fold(0f32, |a, c| a.max(c.abs()));
                assert!(
                    (reference[t] - y[t * rows]).abs() <= tolerance * magnitude.max(1e-6),
                    "{name} token {t}: {} vs {}",
                    reference[t],
                    y[t * rows]
                );
            }
        }
    }

    #[test]
    fn outliers_are_kept_exactly_and_counted_in_the_size() {
        let (rows, cols) = (64, 512);
        let w = llm_like_weights(rows, cols, 9);
        let plain =
            CodebookMatrix::quantize(CodebookType::parse("SQ4").unwrap(), &w, rows, cols, None)
                .unwrap();
        let sparse = CodebookMatrix::quantize(
            CodebookType::parse("SQ4+S0.45").unwrap(),
            &w,
            rows,
            cols,
            None,
        )
        .unwrap();
        let expected = ((rows * cols) as f64 * 0.0045).round() as usize;
        assert_eq!(sparse.sparse.values.len(), expected);
        // SQ4: 4 bits + 16 f16 centroids per 512 weights.
        assert!((plain.bits_per_weight() - (4.0 + 256.0 / 512.0)).abs() < 1e-9);
        let extra = (expected * 4 + (rows + 1) * 4) as f64 * 8.0 / (rows * cols) as f64;
        assert!((sparse.bits_per_weight() - plain.bits_per_weight() - extra).abs() < 1e-9);
        let decoded = sparse.dequantize();
        for r in 0..rows {
            for e in sparse.sparse.row_start[r]..sparse.sparse.row_start[r + 1] {
                let j = sparse.sparse.columns[e as usize] as usize;
                let exact = w[r * cols + j];
                assert!(
                    (decoded[r * cols + j] - exact).abs() <= exact.abs() * 2e-3,
                    "{r},{j}"
                );
            }
        }
        let err = |m: &CodebookMatrix| -> f64 {
            m.dequantize()
                .iter()
                .zip(&w)
                .map(|(a, b)| ((a - b) as f64).powi(2))
                .sum()
        };
        assert!(
            err(&sparse) < err(&plain),
            "outliers out of the clustering help"
        );
    }

    #[test]
    fn sensitivities_lower_the_error_where_the_activations_are_large() {
        let (rows, cols, tokens) = (32, 256, 64);
        let w = llm_like_weights(rows, cols, 5);
        let x = llm_like_activations(tokens, cols, 6);
        let second_moment: Vec<f32> = (0..cols)
            .map(|j| (0..tokens).map(|t| x[t * cols + j].powi(2)).sum::<f32>() / tokens as f32)
            .collect();
        let ty = CodebookType::parse("SQ3").unwrap();
        let out = |m: &CodebookMatrix| {
            let mut y = vec![0f32; tokens * rows];
            m.gemm(&x, tokens, &mut y, 2);
            output_nmse(&w, rows, cols, &x, tokens, &y)
        };
        let plain = CodebookMatrix::quantize(ty, &w, rows, cols, None).unwrap();
        let weighted = CodebookMatrix::quantize(ty, &w, rows, cols, Some(&second_moment)).unwrap();
        assert!(
            out(&weighted) < out(&plain),
            "{} vs {}",
            out(&weighted),
            out(&plain)
        );
    }

    #[test]
    fn quantization_is_deterministic() {
        let w = llm_like_weights(8, 64, 1);
        let ty = CodebookType::parse("SQ4+S1").unwrap();
        let a = CodebookMatrix::quantize(ty, &w, 8, 64, None).unwrap();
        let b = CodebookMatrix::quantize(ty, &w, 8, 64, None).unwrap();
        assert_eq!(
            (a.codebooks, a.indices, a.sparse),
            (b.codebooks, b.indices, b.sparse)
        );
    }
}
