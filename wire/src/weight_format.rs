//! What a kernel-matrix cell stores its weights in: one of GGML's types
//! (`+imatrix` when quantized with an importance matrix), one of
//! quantbench's own non-uniform codebook formats (`SQ4`, `SQ3`, with
//! `+S<pct>` exact outliers; see `kernels::codebook`), or one of its
//! table-lookup bit-plane formats (`LUT2`, `LUT3`; see `kernels::lut`). All
//! spell themselves in the `types` list of a matrix and in the rows' `type`
//! column, so plots, summaries and comparisons treat them alike.

use crate::ggml_type::{GgmlType, UnknownType};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// Weights per block of a codebook row: each block has its own 8-bit
/// scale, and the kernels take 32 activations at a time.
pub const CODEBOOK_BLOCK: usize = 32;

/// `SQ4`, `SQ3`, `SQ4+S0.45`, `SQ3+S1`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CodebookType {
    /// 3 or 4: index bits, 2^bits centroids per row.
    pub bits: u8,
    /// Percent of weights kept exactly in the sparse part.
    pub outlier_percent: Option<f64>,
}

#[derive(Debug, Clone, thiserror::Error, PartialEq)]
pub enum CodebookSpellingError {
    #[error("`{0}` is not a codebook type: SQ4 or SQ3, optionally +S<percent> of outliers kept exactly (e.g. SQ4+S0.45)")]
    Spelling(String),
    #[error("`{name}`: the outlier percentage {percent} must be in (0, 10] (e.g. SQ4+S0.45)")]
    Percent { name: String, percent: String },
}

impl CodebookType {
    pub fn parse(name: &str) -> Result<CodebookType, CodebookSpellingError> {
        let upper = name.trim().to_ascii_uppercase();
        let (base, sparse) = match upper.split_once('+') {
            Some((b, s)) => (b, Some(s)),
            None => (upper.as_str(), None),
        };
        let bits = match base {
            "SQ4" => 4,
            "SQ3" => 3,
            _ => return Err(CodebookSpellingError::Spelling(name.to_string())),
        };
        let outlier_percent = match sparse {
            None => None,
            Some(s) => {
                let digits = s
                    .strip_prefix('S')
                    .ok_or_else(|| CodebookSpellingError::Spelling(name.to_string()))?;
                let percent: f64 = digits
                    .parse()
                    .map_err(|_| CodebookSpellingError::Spelling(name.to_string()))?;
                if !(percent > 0.0 && percent <= 10.0) {
                    return Err(CodebookSpellingError::Percent {
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

    /// Bytes of one row's dense part: packed indices, one scale byte per
    /// block, the f16 codebook and the f16 row scale.
    pub fn dense_row_bytes(self, cols: usize) -> usize {
        cols * self.bits as usize / 8 + cols / CODEBOOK_BLOCK + 2 * self.centroids() + 2
    }

    /// The sparse part's bytes for `entries` outliers in `rows` rows: f16
    /// value and u16 column (u32 past 65536 columns) each, u32 row offsets.
    pub fn sparse_bytes(self, rows: usize, cols: usize, entries: usize) -> usize {
        if entries == 0 {
            return 0;
        }
        let column_bytes = if cols <= 1 << 16 { 2 } else { 4 };
        entries * (2 + column_bytes) + (rows + 1) * 4
    }

    /// Bytes of a `rows x cols` matrix, the outliers counted as the
    /// percentage asks (the quantizer's count, rounded the same way).
    pub fn matrix_bytes(self, rows: usize, cols: usize) -> usize {
        let entries = self.outlier_count(rows * cols);
        rows * self.dense_row_bytes(cols) + self.sparse_bytes(rows, cols, entries)
    }

    /// How many of `weights` weights the sparse part keeps.
    pub fn outlier_count(self, weights: usize) -> usize {
        self.outlier_percent
            .map_or(0, |p| (weights as f64 * p / 100.0).round() as usize)
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

/// Rows a table-lookup kernel multiplies at once; a matrix's rows are
/// padded (with zero scales) to a multiple of it, and the padding is
/// stored and counted.
pub const LUT_ROW_GROUP: usize = 16;

/// `LUT2`, `LUT3`: uniform 2- or 3-bit codes stored as bit planes for
/// table-lookup kernels (T-MAC's formulation), each block's scale and
/// minimum figures under f16 scale and minimum: LUT2 as Q2_K (blocks of
/// 16, 4-bit figures, an f16 pair per 256 weights), LUT3 blocks of 32
/// with 6-bit figures under an f16 pair per row.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LutType {
    /// 2 or 3.
    pub bits: u8,
}

/// Columns of one block of codes in the kernels' layout (one block of
/// activation tables, one int8 scale).
pub const LUT_CODE_BLOCK: usize = 32;

impl LutType {
    /// `LUT2` or `LUT3` (any case), else `None`.
    pub fn parse(name: &str) -> Option<LutType> {
        match name.trim().to_ascii_uppercase().as_str() {
            "LUT2" => Some(LutType { bits: 2 }),
            "LUT3" => Some(LutType { bits: 3 }),
            _ => None,
        }
    }

    /// Weights per block with its own scale and minimum figures: 16 for
    /// LUT2 (with 32 its output error was 1.3x Q2_K's given the same
    /// importance matrix), 32 for LUT3 (64-weight blocks stored it in
    /// 3.27 bits but with 1.4x Q3_K's error on LLM-like weights).
    pub fn block(self) -> usize {
        if self.bits == 2 {
            16
        } else {
            32
        }
    }

    /// Bits of a block's scale and of its minimum: 4 for LUT2 (Q2_K's
    /// 2.625 bits a weight with its f16 pair per 256), 6 for LUT3 (3.39
    /// bits, under Q3_K's 3.4375; bytes gave 3.52).
    pub fn figure_bits(self) -> u32 {
        if self.bits == 2 {
            4
        } else {
            6
        }
    }

    /// The largest figure: 15 or 63.
    pub fn figure_levels(self) -> u32 {
        (1 << self.figure_bits()) - 1
    }

    /// Weights of a row under one f16 scale and minimum: 256 for LUT2,
    /// the whole row (`cols`) for LUT3.
    pub fn span(self, cols: usize) -> usize {
        if self.bits == 2 {
            256
        } else {
            cols
        }
    }

    /// What a row's length must be a multiple of: the span for LUT2 (as
    /// Q2_K's 256), a block of codes (32) for LUT3.
    pub fn columns_multiple(self) -> usize {
        if self.bits == 2 {
            256
        } else {
            LUT_CODE_BLOCK
        }
    }

    /// Bytes of one block's scales and minimums for a group of
    /// [`LUT_ROW_GROUP`] rows: 16 at 4 bits, 24 at 6.
    pub fn group_figure_bytes(self) -> usize {
        LUT_ROW_GROUP * 2 * self.figure_bits() as usize / 8
    }

    /// Bytes of one group of [`LUT_ROW_GROUP`] rows: the bit planes, the
    /// blocks' scales and minimums, and per span each row's f16 scale and
    /// minimum.
    pub fn group_bytes(self, cols: usize) -> usize {
        LUT_ROW_GROUP * (cols * self.bits as usize / 8 + 4 * cols / self.span(cols))
            + cols / self.block() * self.group_figure_bytes()
    }

    /// Bytes of a `rows x cols` matrix, its rows padded to
    /// [`LUT_ROW_GROUP`].
    pub fn matrix_bytes(self, rows: usize, cols: usize) -> usize {
        rows.div_ceil(LUT_ROW_GROUP) * self.group_bytes(cols)
    }
}

impl fmt::Display for LutType {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "LUT{}", self.bits)
    }
}

/// How a GGML type is spelled with an importance matrix: `Q2_K+imatrix`,
/// as the model matrix spells its recipes.
pub const IMPORTANCE_SUFFIX: &str = "+imatrix";

/// A weight format a kernel-matrix cell measures.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum WeightFormat {
    /// A GGML type, quantized with GGML's own quantizer; with `importance`
    /// (spelled `<TYPE>+imatrix`) weighed by the activations' per-column
    /// mean squares, as `llama-quantize --imatrix` does, the sensitivities
    /// the codebook and LUT quantizers always use.
    Ggml {
        ty: GgmlType,
        importance: bool,
    },
    Codebook(CodebookType),
    Lut(LutType),
}

impl WeightFormat {
    /// Bytes of a `rows x cols` matrix in this format (for codebooks, with
    /// the outlier count the percentage asks for).
    pub fn matrix_bytes(self, rows: usize, cols: usize) -> usize {
        match self {
            WeightFormat::Ggml { ty, .. } => ty.row_bytes(cols) * rows,
            WeightFormat::Codebook(ty) => ty.matrix_bytes(rows, cols),
            WeightFormat::Lut(ty) => ty.matrix_bytes(rows, cols),
        }
    }

    /// Storage cost per weight of a `rows x cols` matrix, everything
    /// counted (scales, codebooks, the sparse part).
    pub fn bits_per_weight(self, rows: usize, cols: usize) -> f64 {
        match self {
            WeightFormat::Ggml { ty, .. } => ty.bits_per_weight(),
            WeightFormat::Codebook(_) | WeightFormat::Lut(_) => {
                self.matrix_bytes(rows, cols) as f64 * 8.0 / (rows * cols).max(1) as f64
            }
        }
    }

    /// Why this format cannot store rows of `cols` elements, if it cannot.
    pub fn unsupported_reason(self, cols: usize) -> Option<String> {
        match self {
            WeightFormat::Ggml { ty, .. } => ty.unsupported_reason(cols),
            WeightFormat::Codebook(ty) => (!cols.is_multiple_of(CODEBOOK_BLOCK)).then(|| {
                format!(
                    "{ty} stores {CODEBOOK_BLOCK}-weight blocks and K={cols} is not a multiple of {CODEBOOK_BLOCK}"
                )
            }),
            WeightFormat::Lut(ty) => (!cols.is_multiple_of(ty.columns_multiple())).then(|| {
                let n = ty.columns_multiple();
                let what = if ty.bits == 2 { "super-blocks" } else { "blocks" };
                format!("{ty} stores {n}-weight {what} and K={cols} is not a multiple of {n}")
            }),
        }
    }
}

impl fmt::Display for WeightFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WeightFormat::Ggml { ty, importance } => {
                ty.fmt(f)?;
                if *importance {
                    f.write_str(IMPORTANCE_SUFFIX)?;
                }
                Ok(())
            }
            WeightFormat::Codebook(ty) => ty.fmt(f),
            WeightFormat::Lut(ty) => ty.fmt(f),
        }
    }
}

impl From<GgmlType> for WeightFormat {
    fn from(ty: GgmlType) -> Self {
        WeightFormat::Ggml {
            ty,
            importance: false,
        }
    }
}

/// A `types` entry that is neither a GGML type nor a codebook spelling.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum UnknownFormat {
    #[error("{0} (any with +imatrix: quantized with an importance matrix), a codebook type (SQ4, SQ3, SQ4+S0.45) or a table-lookup type (LUT2, LUT3)")]
    Ggml(UnknownType),
    #[error(transparent)]
    Codebook(CodebookSpellingError),
    #[error("`{0}` is not a table-lookup type: LUT2 or LUT3")]
    Lut(String),
    #[error("{0} cannot be quantized without an importance matrix (GGML asserts): spell it {0}+imatrix, quantized with the activations' per-column mean squares as llama-quantize --imatrix does")]
    NeedsImportance(GgmlType),
}

impl FromStr for WeightFormat {
    type Err = UnknownFormat;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.trim().to_ascii_uppercase().starts_with("SQ") {
            return CodebookType::parse(s)
                .map(WeightFormat::Codebook)
                .map_err(UnknownFormat::Codebook);
        }
        if s.trim().to_ascii_uppercase().starts_with("LUT") {
            return LutType::parse(s)
                .map(WeightFormat::Lut)
                .ok_or_else(|| UnknownFormat::Lut(s.to_string()));
        }
        let trimmed = s.trim();
        let lower = trimmed.to_ascii_lowercase();
        let (name, importance) = match lower.strip_suffix(IMPORTANCE_SUFFIX) {
            Some(base) => (&trimmed[..base.len()], true),
            None => (trimmed, false),
        };
        let ty = name.parse::<GgmlType>().map_err(UnknownFormat::Ggml)?;
        if ty.requires_importance() && !importance {
            return Err(UnknownFormat::NeedsImportance(ty));
        }
        Ok(WeightFormat::Ggml { ty, importance })
    }
}

impl TryFrom<String> for WeightFormat {
    type Error = UnknownFormat;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<WeightFormat> for String {
    fn from(f: WeightFormat) -> String {
        f.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ggml_and_codebook_spellings_parse_and_round_trip() {
        for name in [
            "Q4_0",
            "IQ4_NL",
            "SQ4",
            "SQ3",
            "SQ4+S0.45",
            "SQ3+S1",
            "LUT2",
            "LUT3",
            "Q2_K+imatrix",
            "IQ2_XXS+imatrix",
            "IQ3_S",
        ] {
            let format: WeightFormat = name.parse().unwrap();
            assert_eq!(format.to_string(), name);
            let json = serde_json::to_string(&format).unwrap();
            assert_eq!(serde_json::from_str::<WeightFormat>(&json).unwrap(), format);
        }
        assert_eq!(
            "iq2_xxs+IMATRIX".parse::<WeightFormat>().unwrap(),
            WeightFormat::Ggml {
                ty: GgmlType::IQ2XXS,
                importance: true
            }
        );
        assert_eq!(
            "sq4+s0.45".parse::<WeightFormat>().unwrap(),
            WeightFormat::Codebook(CodebookType {
                bits: 4,
                outlier_percent: Some(0.45)
            })
        );
    }

    #[test]
    fn lut_sizes_count_the_planes_the_block_figures_and_the_padded_rows() {
        let lut2 = WeightFormat::Lut(LutType { bits: 2 });
        let lut3 = WeightFormat::Lut(LutType { bits: 3 });
        // 2048 columns: 512 bytes of planes, 128 blocks of a byte, 8
        // spans of 4 bytes.
        assert_eq!(lut2.matrix_bytes(16, 2048), 16 * (512 + 128 + 32));
        // LUT3: 768 bytes of planes, 64 blocks of 12 bits, 4.
        assert_eq!(lut3.matrix_bytes(16, 2048), 16 * (768 + 96 + 4));
        assert_eq!(lut2.bits_per_weight(2048, 2048), 2.625);
        assert_eq!(
            lut2.bits_per_weight(2048, 2048),
            GgmlType::Q2K.bits_per_weight()
        );
        assert!((lut3.bits_per_weight(2048, 2048) - 3.3906).abs() < 1e-3);
        assert!(lut3.bits_per_weight(2048, 2048) < GgmlType::Q3K.bits_per_weight());
        // 17 rows take two groups of 16.
        assert_eq!(lut2.matrix_bytes(17, 2048), 2 * lut2.matrix_bytes(16, 2048));
        assert!(lut3
            .unsupported_reason(80)
            .unwrap()
            .contains("32-weight blocks"));
        assert_eq!(lut3.unsupported_reason(96), None);
        assert!(lut2
            .unsupported_reason(2048 + 32)
            .unwrap()
            .contains("256-weight super-blocks"));
        assert_eq!(lut2.unsupported_reason(2048 + 256), None);
    }

    #[test]
    fn bad_spellings_name_the_value_and_what_is_allowed() {
        for (bad, says) in [
            ("SQ5", "SQ4 or SQ3"),
            ("SQ4+0.45", "+S<percent>"),
            ("SQ4+Sx", "SQ4 or SQ3"),
            ("SQ4+S0", "(0, 10]"),
            ("SQ4+S12", "(0, 10]"),
            ("Q4_X", "SQ4+S0.45"),
            ("Q4_X", "LUT2, LUT3"),
            ("LUT4", "LUT2 or LUT3"),
            ("IQ2_XS", "IQ2_XS+imatrix"),
            ("Q2_K+imatrx", "unknown GGML type"),
        ] {
            let message = bad.parse::<WeightFormat>().unwrap_err().to_string();
            assert!(message.contains(bad) && message.contains(says), "{message}");
        }
    }

    #[test]
    fn codebook_sizes_count_indices_scales_codebooks_and_outliers() {
        let sq4: WeightFormat = "SQ4".parse().unwrap();
        // 2048 columns: 1024 index bytes, 64 scale bytes, 32 codebook bytes,
        // 2 row-scale bytes.
        assert_eq!(sq4.matrix_bytes(1, 2048), 1024 + 64 + 32 + 2);
        let bits = sq4.bits_per_weight(2048, 2048);
        assert!((4.3..4.5).contains(&bits), "{bits}");
        let sparse: WeightFormat = "SQ4+S0.45".parse().unwrap();
        let entries = (2048.0 * 2048.0 * 0.0045f64).round() as usize;
        assert_eq!(
            sparse.matrix_bytes(2048, 2048),
            sq4.matrix_bytes(2048, 2048) + entries * 4 + 2049 * 4
        );
        let sq3: WeightFormat = "SQ3".parse().unwrap();
        assert!(sq3.bits_per_weight(2048, 8192) < GgmlType::Q3K.bits_per_weight());
        assert!(sq3
            .unsupported_reason(100)
            .unwrap()
            .contains("multiple of 32"));
    }
}
