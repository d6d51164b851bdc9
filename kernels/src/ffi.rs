//! Thin unsafe shims over the GGML symbols this crate uses. Each function
//! states the invariant that makes its call sound.

use crate::GgmlType;
use llama_cpp_sys_2 as sys;

pub(crate) type RawType = sys::ggml_type;

pub(crate) fn raw_type(ty: GgmlType) -> RawType {
    match ty {
        GgmlType::F32 => sys::GGML_TYPE_F32,
        GgmlType::F16 => sys::GGML_TYPE_F16,
        GgmlType::BF16 => sys::GGML_TYPE_BF16,
        GgmlType::Q8_0 => sys::GGML_TYPE_Q8_0,
        GgmlType::Q6K => sys::GGML_TYPE_Q6_K,
        GgmlType::Q5_1 => sys::GGML_TYPE_Q5_1,
        GgmlType::Q5_0 => sys::GGML_TYPE_Q5_0,
        GgmlType::Q5K => sys::GGML_TYPE_Q5_K,
        GgmlType::Q4_1 => sys::GGML_TYPE_Q4_1,
        GgmlType::Q4_0 => sys::GGML_TYPE_Q4_0,
        GgmlType::Q4K => sys::GGML_TYPE_Q4_K,
        GgmlType::IQ4NL => sys::GGML_TYPE_IQ4_NL,
        GgmlType::Q3K => sys::GGML_TYPE_Q3_K,
        GgmlType::Q2K => sys::GGML_TYPE_Q2_K,
        GgmlType::IQ3S => sys::GGML_TYPE_IQ3_S,
        GgmlType::IQ3XXS => sys::GGML_TYPE_IQ3_XXS,
        GgmlType::IQ2S => sys::GGML_TYPE_IQ2_S,
        GgmlType::IQ2XS => sys::GGML_TYPE_IQ2_XS,
        GgmlType::IQ2XXS => sys::GGML_TYPE_IQ2_XXS,
    }
}

/// GGML's name for a raw type (`q8_0`, `q8_K`, `f16`, ...).
pub(crate) fn raw_type_name(raw: RawType) -> String {
    // SAFETY: ggml_type_name returns a static NUL-terminated string for every
    // type value GGML defines; `raw` comes from GGML itself or `raw_type`.
    unsafe { std::ffi::CStr::from_ptr(sys::ggml_type_name(raw)) }
        .to_string_lossy()
        .into_owned()
}

#[cfg(test)]
pub(crate) fn block_size(ty: GgmlType) -> usize {
    // SAFETY: pure lookup in GGML's static type table.
    unsafe { sys::ggml_blck_size(raw_type(ty)) as usize }
}

#[cfg(test)]
pub(crate) fn row_bytes(ty: GgmlType, cols: usize) -> usize {
    // SAFETY: pure arithmetic on GGML's static type table.
    unsafe { sys::ggml_row_size(raw_type(ty), cols as i64) }
}

/// Quantizes `rows` rows of `cols` f32 values from `src` into `dst`, each
/// column's error weighed by `importance` when given.
/// Callers guarantee `src.len() == rows*cols`, `dst.len() == rows*row_bytes`,
/// `importance.len() == cols`, that `cols` is a multiple of the type's
/// block size and an importance for the types that require one.
pub(crate) fn quantize_rows(
    ty: GgmlType,
    src: &[f32],
    dst: &mut [u8],
    rows: usize,
    cols: usize,
    importance: Option<&[f32]>,
) {
    assert_eq!(src.len(), rows * cols);
    assert_eq!(dst.len(), rows * ty.row_bytes(cols));
    assert!(importance.is_none_or(|i| i.len() == cols));
    assert!(importance.is_some() || !ty.requires_importance());
    // SAFETY: lengths checked above (GGML reads `cols` importances, the
    // same for every row); an importance is given where GGML asserts one.
    unsafe {
        sys::ggml_quantize_chunk(
            raw_type(ty),
            src.as_ptr(),
            dst.as_mut_ptr().cast(),
            0,
            rows as i64,
            cols as i64,
            importance.map_or(std::ptr::null(), |i| i.as_ptr()),
        );
    }
}

/// Decodes `rows` rows of `cols` elements with GGML's `to_float`.
pub(crate) fn dequantize_rows(ty: GgmlType, src: &[u8], dst: &mut [f32], rows: usize, cols: usize) {
    assert_eq!(dst.len(), rows * cols);
    assert_eq!(src.len(), rows * ty.row_bytes(cols));
    if ty == GgmlType::F32 {
        // GGML has no to_float for F32: it is already the output format.
        for (out, bytes) in dst.iter_mut().zip(src.chunks_exact(4)) {
            *out = f32::from_ne_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
        }
        return;
    }
    // SAFETY: GGML's type traits are a static table; `to_float` exists for
    // every weight type we list and reads exactly `k` elements' worth of blocks.
    unsafe {
        let traits = sys::ggml_get_type_traits(raw_type(ty));
        let to_float = (*traits)
            .to_float
            .expect("every non-F32 weight type has to_float");
        to_float(src.as_ptr().cast(), dst.as_mut_ptr(), (rows * cols) as i64);
    }
}

/// The type GGML converts activations to before the dot product with `ty`.
pub(crate) fn vec_dot_type(ty: GgmlType) -> String {
    // SAFETY: ggml_get_type_traits_cpu returns a pointer into a static table;
    // ggml_cpu_init (idempotent) fills the fp16 tables the CPU code relies on.
    unsafe {
        sys::ggml_cpu_init();
        raw_type_name((*sys::ggml_get_type_traits_cpu(raw_type(ty))).vec_dot_type)
    }
}

pub(crate) fn cpu_features() -> Vec<&'static str> {
    // SAFETY: these are argument-less queries of compile- and run-time flags.
    let checks: [(&'static str, unsafe extern "C" fn() -> i32); 14] = [
        ("avx", sys::ggml_cpu_has_avx),
        ("avx2", sys::ggml_cpu_has_avx2),
        ("avx_vnni", sys::ggml_cpu_has_avx_vnni),
        ("avx512", sys::ggml_cpu_has_avx512),
        ("avx512_vnni", sys::ggml_cpu_has_avx512_vnni),
        ("f16c", sys::ggml_cpu_has_f16c),
        ("fma", sys::ggml_cpu_has_fma),
        ("neon", sys::ggml_cpu_has_neon),
        ("arm_fma", sys::ggml_cpu_has_arm_fma),
        ("fp16_va", sys::ggml_cpu_has_fp16_va),
        ("dotprod", sys::ggml_cpu_has_dotprod),
        ("i8mm", sys::ggml_cpu_has_matmul_int8),
        ("sve", sys::ggml_cpu_has_sve),
        ("llamafile", sys::ggml_cpu_has_llamafile),
    ];
    checks
        .into_iter()
        .filter(|(_, has)| unsafe { has() } != 0)
        .map(|(name, _)| name)
        .collect()
}
