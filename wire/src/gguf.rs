//! A pure-Rust check of a GGUF file's header, run before GGML reads it.
//!
//! GGML's own parser trusts sizes it reads (our code then allocates from
//! them) and its typed getters abort the whole process when a key has
//! another type than asked. Models and importance matrices come from
//! users and boards, so every one is checked here first: the magic and
//! version, every count and length against the bytes left in the file
//! (before anything is allocated from it), value and tensor types,
//! dimensions, the alignment, each tensor's data against the file's end,
//! and the types of the keys our code reads. A failure is one line naming
//! the byte where the file went wrong; names from the file are quoted with
//! their control characters escaped (a name holding a newline or a
//! terminal escape cannot break the line or the terminal).

use std::collections::BTreeMap;
use std::io::{BufReader, Read};
use std::path::Path;

/// GGUF value types (gguf.h `gguf_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ValueType {
    U8,
    I8,
    U16,
    I16,
    U32,
    I32,
    F32,
    Bool,
    String,
    Array,
    U64,
    I64,
    F64,
}

impl ValueType {
    fn from_id(id: u32) -> Option<ValueType> {
        use ValueType::*;
        Some(match id {
            0 => U8,
            1 => I8,
            2 => U16,
            3 => I16,
            4 => U32,
            5 => I32,
            6 => F32,
            7 => Bool,
            8 => String,
            9 => Array,
            10 => U64,
            11 => I64,
            12 => F64,
            _ => return None,
        })
    }

    /// Bytes of one value (a string's or array's least: its length field).
    fn min_bytes(self) -> u64 {
        use ValueType::*;
        match self {
            U8 | I8 | Bool => 1,
            U16 | I16 => 2,
            U32 | I32 | F32 => 4,
            U64 | I64 | F64 | String => 8,
            Array => 12,
        }
    }
}

/// A key's type as the file has it (an array with its element type).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyType {
    Scalar(ValueType),
    ArrayOf(ValueType),
}

impl std::fmt::Display for KeyType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            KeyType::Scalar(t) => write!(f, "{t:?}"),
            KeyType::ArrayOf(t) => write!(f, "array of {t:?}"),
        }
    }
}

/// The keys whose types our code (or GGML's loader for us) reads with a
/// typed getter, which aborts on a mismatch.
pub const KEYS_READ: &[(&str, KeyType)] = &[
    ("general.alignment", KeyType::Scalar(ValueType::U32)),
    ("general.architecture", KeyType::Scalar(ValueType::String)),
    ("imatrix.chunk_count", KeyType::Scalar(ValueType::U32)),
    ("imatrix.chunk_size", KeyType::Scalar(ValueType::U32)),
    ("imatrix.datasets", KeyType::ArrayOf(ValueType::String)),
];

/// GGML's largest tensor rank and name length (ggml.h).
const MAX_DIMS: u32 = 4;
const MAX_NAME: u64 = 64;
/// The longest key or string value accepted (a vocabulary entry, a chat
/// template: far below this).
const MAX_STRING: u64 = 1 << 24;

/// (block size in elements, bytes per block) by GGML type id, `None` for
/// ids GGML has retired or never had. `kernels` checks it against the
/// linked GGML (a new llama.cpp with new types fails that test first).
pub fn type_size(id: u32) -> Option<(u64, u64)> {
    Some(match id {
        0 => (1, 4),      // F32
        1 => (1, 2),      // F16
        2 => (32, 18),    // Q4_0
        3 => (32, 20),    // Q4_1
        6 => (32, 22),    // Q5_0
        7 => (32, 24),    // Q5_1
        8 => (32, 34),    // Q8_0
        9 => (32, 36),    // Q8_1
        10 => (256, 84),  // Q2_K
        11 => (256, 110), // Q3_K
        12 => (256, 144), // Q4_K
        13 => (256, 176), // Q5_K
        14 => (256, 210), // Q6_K
        15 => (256, 292), // Q8_K
        16 => (256, 66),  // IQ2_XXS
        17 => (256, 74),  // IQ2_XS
        18 => (256, 98),  // IQ3_XXS
        19 => (256, 50),  // IQ1_S
        20 => (32, 18),   // IQ4_NL
        21 => (256, 110), // IQ3_S
        22 => (256, 82),  // IQ2_S
        23 => (256, 136), // IQ4_XS
        24 => (1, 1),     // I8
        25 => (1, 2),     // I16
        26 => (1, 4),     // I32
        27 => (1, 8),     // I64
        28 => (1, 8),     // F64
        29 => (256, 56),  // IQ1_M
        30 => (1, 2),     // BF16
        34 => (256, 54),  // TQ1_0
        35 => (256, 66),  // TQ2_0
        39 => (32, 17),   // MXFP4
        40 => (64, 36),   // NVFP4
        41 => (128, 18),  // Q1_0
        42 => (64, 18),   // Q2_0
        _ => return None,
    })
}

/// One tensor as the header describes it, checked.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorInfo {
    pub name: String,
    pub dims: Vec<u64>,
    pub type_id: u32,
    /// From the start of the file.
    pub offset: u64,
    pub bytes: u64,
}

/// A checked header.
#[derive(Debug, Clone, PartialEq)]
pub struct Header {
    pub version: u32,
    pub keys: BTreeMap<String, KeyType>,
    pub tensors: Vec<TensorInfo>,
    pub data_offset: u64,
    /// The context the model was trained for (`<arch>.context_length`),
    /// when the file says.
    pub context_length: Option<u64>,
    /// `general.architecture` (`llama`, `bitnet`, ...), when the file says.
    pub architecture: Option<String>,
}

/// Why a file is not a GGUF file GGML can safely read: where, and what.
/// `check` names which check failed (for the fuzzing tests' coverage).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("at byte {offset}: {reason}")]
pub struct GgufError {
    pub offset: u64,
    pub check: &'static str,
    pub reason: String,
}

/// Checks the GGUF file at `path`; a failure is one line naming the file.
pub fn check_file(path: &Path) -> Result<Header, String> {
    let file = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let len = file
        .metadata()
        .map_err(|e| format!("{}: {e}", path.display()))?
        .len();
    check(BufReader::new(file), len).map_err(|e| {
        format!(
            "{}: not a GGUF file GGML can read safely: {e}",
            path.display()
        )
    })
}

/// Checks a GGUF file of `len` bytes read from `source`.
pub fn check(source: impl Read, len: u64) -> Result<Header, GgufError> {
    let mut r = Reader {
        source,
        pos: 0,
        len,
    };
    let mut magic = [0u8; 4];
    r.bytes(&mut magic, "magic")?;
    if &magic != b"GGUF" {
        return Err(r.fail(
            "magic",
            format!(
                "starts with {:?}, not \"GGUF\"",
                String::from_utf8_lossy(&magic)
            ),
        ));
    }
    let version = r.u32("version")?;
    if !(2..=3).contains(&version) {
        return Err(r.fail(
            "version",
            format!("GGUF version {version} (GGML reads 2 and 3)"),
        ));
    }
    let n_tensors = r.u64("tensor count")?;
    let n_kv = r.u64("key count")?;
    // Each key takes at least 13 bytes (an 8-byte name length, a 4-byte
    // type, a 1-byte value), each tensor 24: counts beyond what the file
    // can hold are refused before anything is read for them.
    r.fits(n_kv.saturating_mul(13), "key count", || {
        format!("{n_kv} keys cannot fit")
    })?;
    r.fits(n_tensors.saturating_mul(24), "tensor count", || {
        format!("{n_tensors} tensors cannot fit")
    })?;
    let mut keys = BTreeMap::new();
    let mut alignment = 32u64;
    let mut context_length = None;
    let mut architecture = None;
    for _ in 0..n_kv {
        let key = r.string("key", MAX_STRING)?;
        let ty = r.value_type("value type")?;
        let key_type = if ty == ValueType::Array {
            let element = r.value_type("array element type")?;
            if element == ValueType::Array {
                return Err(r.fail("nested array", format!("key {key:?}: an array of arrays")));
            }
            let n = r.u64("array length")?;
            r.fits(
                n.saturating_mul(element.min_bytes()),
                "array length",
                || format!("key {key:?}: {n} elements cannot fit"),
            )?;
            for _ in 0..n {
                r.value(element)?;
            }
            KeyType::ArrayOf(element)
        } else if key == "general.architecture" && ty == ValueType::String {
            architecture = Some(r.string("architecture", MAX_STRING)?);
            KeyType::Scalar(ty)
        } else {
            let value = r.value(ty)?;
            if key.ends_with(".context_length")
                && matches!(
                    ty,
                    ValueType::U32 | ValueType::U64 | ValueType::I32 | ValueType::I64
                )
            {
                context_length = Some(value);
            }
            if key == "general.alignment" {
                if ty != ValueType::U32 {
                    return Err(r.fail(
                        "key type",
                        format!("key general.alignment is {ty:?}, GGML reads U32"),
                    ));
                }
                if value == 0 || !value.is_power_of_two() {
                    return Err(r.fail(
                        "alignment",
                        format!("alignment {value} is not a power of two"),
                    ));
                }
                alignment = value;
            }
            KeyType::Scalar(ty)
        };
        if keys.insert(key.clone(), key_type).is_some() {
            return Err(r.fail("duplicate key", format!("key {key:?} twice")));
        }
    }
    for (key, expected) in KEYS_READ {
        if let Some(found) = keys.get(*key) {
            if found != expected {
                return Err(r.fail(
                    "key type",
                    format!("key {key} is {found}, but it is read as {expected}"),
                ));
            }
        }
    }
    let mut tensors = Vec::new();
    let mut names = std::collections::BTreeSet::new();
    for _ in 0..n_tensors {
        let name = r.string("tensor name", MAX_NAME - 1)?;
        let n_dims = r.u32("tensor rank")?;
        if n_dims == 0 || n_dims > MAX_DIMS {
            return Err(r.fail(
                "tensor rank",
                format!("tensor {name:?} has {n_dims} dimensions (1 to {MAX_DIMS})"),
            ));
        }
        let mut dims = Vec::new();
        for _ in 0..n_dims {
            let d = r.u64("tensor dimension")?;
            if d > i64::MAX as u64 {
                return Err(r.fail(
                    "tensor dimension",
                    format!("tensor {name:?}: dimension {d} is negative as GGML reads it"),
                ));
            }
            dims.push(d);
        }
        let type_id = r.u32("tensor type")?;
        let Some((block, block_bytes)) = type_size(type_id) else {
            return Err(r.fail(
                "tensor type",
                format!("tensor {name:?} has type {type_id}, which GGML does not have"),
            ));
        };
        let offset = r.u64("tensor offset")?;
        if offset % alignment != 0 {
            return Err(r.fail(
                "tensor offset",
                format!(
                    "tensor {name:?}: offset {offset} is not a multiple of the alignment {alignment}"
                ),
            ));
        }
        if dims[0] % block != 0 {
            return Err(r.fail(
                "tensor shape",
                format!(
                    "tensor {name:?}: {} columns are not whole blocks of {block}",
                    dims[0]
                ),
            ));
        }
        let elements = dims
            .iter()
            .try_fold(1u64, |acc, &d| acc.checked_mul(d))
            .filter(|&n| n <= i64::MAX as u64);
        let bytes = elements.and_then(|n| (n / block).checked_mul(block_bytes));
        let Some(bytes) = bytes else {
            return Err(r.fail(
                "tensor size",
                format!("tensor {name:?}: {dims:?} overflows"),
            ));
        };
        if !names.insert(name.clone()) {
            return Err(r.fail("duplicate tensor", format!("tensor {name:?} twice")));
        }
        tensors.push(TensorInfo {
            name,
            dims,
            type_id,
            offset,
            bytes,
        });
    }
    let data_offset = r.pos.div_ceil(alignment) * alignment;
    for t in &mut tensors {
        let end = data_offset
            .checked_add(t.offset)
            .and_then(|start| start.checked_add(t.bytes));
        match end {
            Some(end) if end <= len => t.offset += data_offset,
            _ => {
                return Err(GgufError {
                    offset: r.pos,
                    check: "tensor data",
                    reason: format!(
                        "tensor {:?}'s {} bytes at data offset {} end past the file's {len} bytes (cut short?)",
                        t.name, t.bytes, t.offset
                    ),
                })
            }
        }
    }
    Ok(Header {
        version,
        keys,
        tensors,
        data_offset,
        context_length,
        architecture,
    })
}

/// Every check [`check`] can fail, by the name its error carries.
pub const CHECKS: &[&str] = &[
    "magic",
    "version",
    "tensor count",
    "key count",
    "key",
    "value type",
    "array element type",
    "nested array",
    "array length",
    "string",
    "key type",
    "alignment",
    "duplicate key",
    "tensor name",
    "tensor rank",
    "tensor dimension",
    "tensor type",
    "tensor offset",
    "tensor shape",
    "tensor size",
    "duplicate tensor",
    "tensor data",
    "value",
];

struct Reader<R> {
    source: R,
    pos: u64,
    len: u64,
}

impl<R: Read> Reader<R> {
    fn fail(&self, check: &'static str, reason: String) -> GgufError {
        GgufError {
            offset: self.pos,
            check,
            reason,
        }
    }

    /// Fails unless `need` more bytes are left in the file.
    fn fits(
        &self,
        need: u64,
        check: &'static str,
        reason: impl FnOnce() -> String,
    ) -> Result<(), GgufError> {
        if need > self.len.saturating_sub(self.pos) {
            return Err(self.fail(
                check,
                format!(
                    "{} in the {} bytes left",
                    reason(),
                    self.len.saturating_sub(self.pos)
                ),
            ));
        }
        Ok(())
    }

    fn bytes(&mut self, out: &mut [u8], what: &'static str) -> Result<(), GgufError> {
        self.fits(out.len() as u64, what, || {
            format!("the file ends inside the {what}")
        })?;
        self.source
            .read_exact(out)
            .map_err(|e| self.fail(what, format!("reading the {what}: {e}")))?;
        self.pos += out.len() as u64;
        Ok(())
    }

    fn u32(&mut self, what: &'static str) -> Result<u32, GgufError> {
        let mut b = [0u8; 4];
        self.bytes(&mut b, what)?;
        Ok(u32::from_le_bytes(b))
    }

    fn u64(&mut self, what: &'static str) -> Result<u64, GgufError> {
        let mut b = [0u8; 8];
        self.bytes(&mut b, what)?;
        Ok(u64::from_le_bytes(b))
    }

    fn value_type(&mut self, what: &'static str) -> Result<ValueType, GgufError> {
        let id = self.u32(what)?;
        ValueType::from_id(id)
            .ok_or_else(|| self.fail(what, format!("{what} {id} is not a GGUF type")))
    }

    fn string(&mut self, what: &'static str, max: u64) -> Result<String, GgufError> {
        let n = self.u64(what)?;
        if n > max {
            return Err(self.fail(what, format!("a {what} of {n} bytes (at most {max})")));
        }
        self.fits(n, what, || format!("a {what} of {n} bytes cannot fit"))?;
        let mut buf = vec![0u8; n as usize];
        self.bytes(&mut buf, what)?;
        String::from_utf8(buf)
            .map_err(|_| self.fail("string", format!("a {what} that is not UTF-8")))
    }

    /// Reads one value; returns it when it is an integer (for the
    /// alignment), else 0.
    fn value(&mut self, ty: ValueType) -> Result<u64, GgufError> {
        use ValueType::*;
        Ok(match ty {
            U8 | I8 => {
                let mut b = [0u8; 1];
                self.bytes(&mut b, "value")?;
                b[0] as u64
            }
            Bool => {
                let mut b = [0u8; 1];
                self.bytes(&mut b, "value")?;
                if b[0] > 1 {
                    return Err(self.fail("value", format!("a bool of {}", b[0])));
                }
                b[0] as u64
            }
            U16 | I16 => {
                let mut b = [0u8; 2];
                self.bytes(&mut b, "value")?;
                u16::from_le_bytes(b) as u64
            }
            U32 | I32 | F32 => self.u32("value")? as u64,
            U64 | I64 | F64 => self.u64("value")?,
            String => {
                self.string("string", MAX_STRING)?;
                0
            }
            Array => return Err(self.fail("nested array", "an array inside an array".into())),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> Vec<u8> {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures");
        std::fs::read(root.join(name)).unwrap()
    }

    #[test]
    fn the_fixture_model_passes_with_every_tensor_inside_the_file() {
        let bytes = fixture("stories260K.gguf");
        let header = check(&bytes[..], bytes.len() as u64).unwrap();
        assert!(!header.tensors.is_empty());
        for t in &header.tensors {
            assert!(t.offset + t.bytes <= bytes.len() as u64, "{t:?}");
        }
        assert!(matches!(
            header.keys.get("general.architecture"),
            Some(KeyType::Scalar(ValueType::String))
        ));
        assert_eq!(header.context_length, Some(2048));
        assert_eq!(header.architecture.as_deref(), Some("llama"));
    }

    #[test]
    fn a_file_cut_short_fails_at_the_tensor_data_in_one_line() {
        let bytes = fixture("stories260K.gguf");
        let cut = &bytes[..bytes.len() - 100];
        let e = check(cut, cut.len() as u64).unwrap_err();
        assert_eq!(e.check, "tensor data", "{e}");
        assert!(e.to_string().contains("cut short"), "{e}");
    }

    #[test]
    fn a_small_file_asking_for_huge_counts_fails_before_allocating() {
        // 4 GiB tensors, 2^62 keys, and a 2^40-byte string: a crafted
        // header of a few dozen bytes.
        let mut b = b"GGUF".to_vec();
        b.extend(3u32.to_le_bytes());
        b.extend(1u64.to_le_bytes());
        b.extend((1u64 << 62).to_le_bytes());
        let e = check(&b[..], b.len() as u64).unwrap_err();
        assert_eq!(e.check, "key count");
        let mut b = b"GGUF".to_vec();
        b.extend(3u32.to_le_bytes());
        b.extend(0u64.to_le_bytes());
        b.extend(1u64.to_le_bytes());
        b.extend((1u64 << 40).to_le_bytes());
        b.extend([0u8; 16]);
        let e = check(&b[..], b.len() as u64).unwrap_err();
        assert_eq!(e.check, "key", "{e}");
    }

    #[test]
    fn a_key_of_another_type_than_read_fails_instead_of_aborting_ggml() {
        let mut b = b"GGUF".to_vec();
        b.extend(3u32.to_le_bytes());
        b.extend(0u64.to_le_bytes());
        b.extend(1u64.to_le_bytes());
        let key = b"imatrix.chunk_count";
        b.extend((key.len() as u64).to_le_bytes());
        b.extend(key);
        b.extend(8u32.to_le_bytes()); // a string where a u32 is read
        b.extend(2u64.to_le_bytes());
        b.extend(b"10");
        let e = check(&b[..], b.len() as u64).unwrap_err();
        assert_eq!(e.check, "key type");
        assert!(e.reason.contains("imatrix.chunk_count is String"), "{e}");
    }

    #[test]
    fn a_name_with_a_newline_or_escape_stays_on_one_quoted_line() {
        // Found by the fuzzer: a tensor name holding a newline broke the
        // one-line error (and could carry terminal escapes).
        let mut b = b"GGUF".to_vec();
        b.extend(3u32.to_le_bytes());
        b.extend(1u64.to_le_bytes());
        b.extend(0u64.to_le_bytes());
        let name = b"w\n\x1b[2J";
        b.extend((name.len() as u64).to_le_bytes());
        b.extend(name);
        b.extend(0u32.to_le_bytes()); // rank 0
        b.extend([0u8; 32]);
        let e = check(&b[..], b.len() as u64).unwrap_err().to_string();
        assert!(!e.contains('\n') && !e.contains('\x1b'), "{e}");
        assert!(e.contains(r#""w\n\u{1b}[2J""#), "{e}");
    }
}
