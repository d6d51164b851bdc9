//! The GGML weight types this tool measures, with their storage facts.
//!
//! The block and byte sizes are GGML's (ggml.c `type_traits`); `kernels`
//! checks them against the linked GGML in its tests, so the host side can
//! know them without linking GGML.

use serde::{Deserialize, Serialize};

/// The distribution of a matrix's synthetic weights and activations.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Distribution {
    /// Shaped like trained LLM weights (the default; see kernels/src/weights.rs).
    LlmLike,
    /// Uniform in [-1, 1], as llama.cpp's `test-backend-ops` fills tensors: for
    /// comparing with its figures only. Quantized GEMV runs measurably faster
    /// on it than on realistic weights, so never choose a format by it.
    Uniform,
}
use std::fmt;
use std::str::FromStr;

/// A GGML tensor type that can hold weights. Parsed case-insensitively from
/// GGML's own names (`q4_0`, `Q4_K`, `iq4_nl`, `bf16`, ...).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum GgmlType {
    F32,
    F16,
    BF16,
    Q8_0,
    Q6K,
    Q5_1,
    Q5_0,
    Q5K,
    Q4_1,
    Q4_0,
    Q4K,
    IQ4NL,
    Q3K,
    Q2K,
    IQ3S,
    IQ3XXS,
    IQ2S,
    IQ2XS,
    IQ2XXS,
}

/// Families whose members differ only in bits per weight, fewest first: within
/// one, more bits must never mean more error.
pub const FAMILIES_BY_BITS: &[&[GgmlType]] = &[
    &[GgmlType::Q4_0, GgmlType::Q5_0, GgmlType::Q8_0],
    &[GgmlType::Q4_1, GgmlType::Q5_1],
    &[
        GgmlType::Q2K,
        GgmlType::Q3K,
        GgmlType::Q4K,
        GgmlType::Q5K,
        GgmlType::Q6K,
    ],
    &[
        GgmlType::IQ2XXS,
        GgmlType::IQ2XS,
        GgmlType::IQ2S,
        GgmlType::IQ3XXS,
        GgmlType::IQ3S,
    ],
    &[GgmlType::BF16, GgmlType::F32],
    &[GgmlType::F16, GgmlType::F32],
];

impl GgmlType {
    /// Every type, the i-quants last (colours in plots follow this order).
    pub const ALL: [GgmlType; 19] = [
        GgmlType::F32,
        GgmlType::F16,
        GgmlType::BF16,
        GgmlType::Q8_0,
        GgmlType::Q6K,
        GgmlType::Q5_1,
        GgmlType::Q5_0,
        GgmlType::Q5K,
        GgmlType::Q4_1,
        GgmlType::Q4_0,
        GgmlType::Q4K,
        GgmlType::IQ4NL,
        GgmlType::Q3K,
        GgmlType::Q2K,
        GgmlType::IQ3S,
        GgmlType::IQ3XXS,
        GgmlType::IQ2S,
        GgmlType::IQ2XS,
        GgmlType::IQ2XXS,
    ];

    /// The canonical name, as `llama-quantize` prints it.
    pub fn name(self) -> &'static str {
        match self {
            GgmlType::F32 => "F32",
            GgmlType::F16 => "F16",
            GgmlType::BF16 => "BF16",
            GgmlType::Q8_0 => "Q8_0",
            GgmlType::Q6K => "Q6_K",
            GgmlType::Q5_1 => "Q5_1",
            GgmlType::Q5_0 => "Q5_0",
            GgmlType::Q5K => "Q5_K",
            GgmlType::Q4_1 => "Q4_1",
            GgmlType::Q4_0 => "Q4_0",
            GgmlType::Q4K => "Q4_K",
            GgmlType::IQ4NL => "IQ4_NL",
            GgmlType::Q3K => "Q3_K",
            GgmlType::Q2K => "Q2_K",
            GgmlType::IQ3S => "IQ3_S",
            GgmlType::IQ3XXS => "IQ3_XXS",
            GgmlType::IQ2S => "IQ2_S",
            GgmlType::IQ2XS => "IQ2_XS",
            GgmlType::IQ2XXS => "IQ2_XXS",
        }
    }

    /// Elements per quantization block (1 for float types).
    pub fn block_size(self) -> usize {
        self.layout().0
    }

    /// Bytes of one block.
    pub fn block_bytes(self) -> usize {
        self.layout().1
    }

    /// (elements, bytes) of one block, as in GGML's type traits.
    fn layout(self) -> (usize, usize) {
        match self {
            GgmlType::F32 => (1, 4),
            GgmlType::F16 | GgmlType::BF16 => (1, 2),
            GgmlType::Q8_0 => (32, 34),
            GgmlType::Q6K => (256, 210),
            GgmlType::Q5_1 => (32, 24),
            GgmlType::Q5_0 => (32, 22),
            GgmlType::Q5K => (256, 176),
            GgmlType::Q4_1 => (32, 20),
            GgmlType::Q4_0 | GgmlType::IQ4NL => (32, 18),
            GgmlType::Q4K => (256, 144),
            GgmlType::Q3K => (256, 110),
            GgmlType::Q2K => (256, 84),
            GgmlType::IQ3S => (256, 110),
            GgmlType::IQ3XXS => (256, 98),
            GgmlType::IQ2S => (256, 82),
            GgmlType::IQ2XS => (256, 74),
            GgmlType::IQ2XXS => (256, 66),
        }
    }

    /// Bytes of one row of `cols` elements (`cols` a multiple of the block).
    pub fn row_bytes(self, cols: usize) -> usize {
        cols / self.block_size() * self.block_bytes()
    }

    /// Why this type cannot store rows of `cols` elements, if it cannot.
    pub fn unsupported_reason(self, cols: usize) -> Option<String> {
        let block = self.block_size();
        (!cols.is_multiple_of(block)).then(|| {
            format!(
                "{self} stores {block}-element blocks and K={cols} is not a multiple of {block}"
            )
        })
    }

    /// GGML's quantizer cannot make this type without an importance matrix
    /// (`ggml_quantize_requires_imatrix`: it asserts).
    pub fn requires_importance(self) -> bool {
        matches!(self, GgmlType::IQ2XXS | GgmlType::IQ2XS)
    }

    /// Storage cost per weight, scales included (e.g. 4.5 for Q4_0).
    pub fn bits_per_weight(self) -> f64 {
        let block = self.block_size();
        self.row_bytes(block) as f64 * 8.0 / block as f64
    }

    /// Upper bound on the NMSE of dequantized weights from
    /// `weights::llm_like_weights` (256x1024, seed 42): about 1.5x the value
    /// measured when the bound was set (2026-11, llama-cpp-sys-2 0.1.161;
    /// e.g. Q8_0 5.9e-5, Q4_0 1.47e-2, Q4_K 7.7e-3, Q2_K 1.17e-1), so a
    /// regression in a quantizer or the generator shows.
    pub fn documented_nmse_bound(self) -> f64 {
        match self {
            GgmlType::F32 => 0.0,
            GgmlType::F16 => 1e-7,
            GgmlType::BF16 => 5e-6,
            GgmlType::Q8_0 => 1e-4,
            GgmlType::Q6K => 1e-3,
            GgmlType::Q5_1 => 3e-3,
            GgmlType::Q5_0 => 6e-3,
            GgmlType::Q5K => 3e-3,
            GgmlType::Q4_1 => 1.5e-2,
            GgmlType::Q4_0 => 2.5e-2,
            GgmlType::Q4K => 1.2e-2,
            GgmlType::IQ4NL => 1.5e-2,
            GgmlType::Q3K => 5e-2,
            GgmlType::Q2K => 1.8e-1,
            // Without an importance matrix (a uniform one for IQ2_XS and
            // IQ2_XXS); measured 2026-12: 4.05e-2, 7.06e-2, 1.30e-1,
            // 1.34e-1, 2.01e-1.
            GgmlType::IQ3S => 6e-2,
            GgmlType::IQ3XXS => 1.1e-1,
            GgmlType::IQ2S => 2e-1,
            GgmlType::IQ2XS => 2e-1,
            GgmlType::IQ2XXS => 3e-1,
        }
    }
}

impl fmt::Display for GgmlType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnknownType(pub String);

impl fmt::Display for UnknownType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let known: Vec<&str> = GgmlType::ALL.iter().map(|t| t.name()).collect();
        write!(
            f,
            "unknown GGML type `{}` (known: {})",
            self.0,
            known.join(", ")
        )
    }
}

impl std::error::Error for UnknownType {}

impl FromStr for GgmlType {
    type Err = UnknownType;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        GgmlType::ALL
            .into_iter()
            .find(|t| t.name().eq_ignore_ascii_case(s))
            .ok_or_else(|| UnknownType(s.to_string()))
    }
}

impl TryFrom<String> for GgmlType {
    type Error = UnknownType;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<GgmlType> for String {
    fn from(t: GgmlType) -> String {
        t.name().to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse_case_insensitively_and_round_trip() {
        for ty in GgmlType::ALL {
            assert_eq!(ty.name().to_lowercase().parse::<GgmlType>(), Ok(ty));
        }
        assert!("q4_x"
            .parse::<GgmlType>()
            .unwrap_err()
            .to_string()
            .contains("Q4_0"));
    }

    #[test]
    fn bits_per_weight_match_ggml_layouts() {
        assert_eq!(GgmlType::F32.bits_per_weight(), 32.0);
        assert_eq!(GgmlType::Q8_0.bits_per_weight(), 8.5);
        assert_eq!(GgmlType::Q4_0.bits_per_weight(), 4.5);
        assert_eq!(GgmlType::Q4K.bits_per_weight(), 4.5);
        assert_eq!(GgmlType::Q6K.bits_per_weight(), 6.5625);
        assert_eq!(GgmlType::Q2K.bits_per_weight(), 2.625);
        assert_eq!(GgmlType::Q4K.block_size(), 256);
    }
}
