//! Whole GGUF models through llama.cpp: quantize with `llama_model_quantize`
//! (per-tensor overrides), load, tokenize, evaluate logits, time prompt
//! processing and generation, generate greedily.

use llama_cpp_sys_2 as sys;
use std::ffi::{CStr, CString};
use std::path::Path;
use std::ptr;
use std::sync::{Mutex, Once};
use thiserror::Error;
pub use wire::model_settings::{ContextSettings, CpuSettings, FlashAttn, ModelLoad, Priority};

#[derive(Debug, Error)]
pub enum ModelError {
    #[error("{path}: not a loadable GGUF model (missing, truncated, or not GGUF); llama.cpp could not load it")]
    Load { path: String },
    #[error("{path}: llama.cpp could not quantize it to recipe `{recipe}`")]
    Quantize { path: String, recipe: String },
    #[error("{0}")]
    Header(String),
    #[error("path {0} is not valid UTF-8 / contains a NUL byte")]
    BadPath(String),
    #[error("llama.cpp: {0}")]
    Llama(String),
    /// A context of these settings cannot run this model (llama.cpp
    /// refused it, or would compute garbage or abort): what the settings'
    /// rows say; the model stays loaded with its previous context.
    #[error("{0}")]
    ContextRefused(String),
}

static BACKEND: Once = Once::new();

fn init_backend() {
    BACKEND.call_once(|| {
        crate::amx::keep_ggml_off_amx();
        // SAFETY: called once, before any other llama.cpp call of this crate.
        unsafe {
            sys::llama_backend_init();
            // llama.cpp's load/quantize chatter would drown the progress lines.
            sys::llama_log_set(Some(quiet_log), ptr::null_mut());
        }
    });
}

/// llama.cpp's log while a context is created: it is where llama.cpp says
/// what `auto` flash attention resolved to and why a context was refused
/// (no API returns either).
static CONTEXT_LOG: Mutex<Option<String>> = Mutex::new(None);

unsafe extern "C" fn quiet_log(
    level: sys::ggml_log_level,
    text: *const std::os::raw::c_char,
    _: *mut std::os::raw::c_void,
) {
    if text.is_null() {
        return;
    }
    let text = CStr::from_ptr(text).to_string_lossy();
    if let Ok(mut captured) = CONTEXT_LOG.lock() {
        if let Some(log) = captured.as_mut() {
            log.push_str(&text);
            return;
        }
    }
    if level == sys::GGML_LOG_LEVEL_ERROR {
        eprint!("{text}");
    }
}

/// Runs `f` with llama.cpp's log collected instead of printed; returns
/// what it said.
fn with_context_log<T>(f: impl FnOnce() -> T) -> (T, String) {
    if let Ok(mut captured) = CONTEXT_LOG.lock() {
        *captured = Some(String::new());
    }
    let value = f();
    let log = CONTEXT_LOG
        .lock()
        .ok()
        .and_then(|mut captured| captured.take())
        .unwrap_or_default();
    (value, log)
}

/// What llama.cpp's log says it did with flash attention (`Flash
/// Attention enabled`, `... was auto, set to disabled`, `enabling
/// flash_attn since it is required for quantized V cache`).
fn flash_attn_in_log(log: &str) -> Option<bool> {
    log.lines().rev().find_map(|line| {
        let lower = line.to_ascii_lowercase();
        if !lower.contains("flash attention") && !lower.contains("enabling flash_attn") {
            return None;
        }
        if lower.contains("disabled") || lower.contains("not supported") {
            Some(false)
        } else if lower.contains("enabled") || lower.contains("enabling") {
            Some(true)
        } else {
            None
        }
    })
}

/// llama.cpp's error lines of a log, joined: why it refused a context.
fn errors_in_log(log: &str) -> String {
    let said: Vec<&str> = log
        .lines()
        .map(str::trim)
        .filter(|l| {
            let lower = l.to_ascii_lowercase();
            lower.contains("requires")
                || lower.contains("does not")
                || lower.contains("failed")
                || lower.contains("error")
                || lower.contains("not supported")
        })
        .collect();
    if said.is_empty() {
        "llama.cpp gave no reason".into()
    } else {
        said.join("; ")
    }
}

pub(crate) fn c_path(path: &Path) -> Result<CString, ModelError> {
    let text = path
        .to_str()
        .ok_or_else(|| ModelError::BadPath(path.display().to_string()))?;
    CString::new(text).map_err(|_| ModelError::BadPath(text.to_string()))
}

/// `path` for GGML to read as GGUF, after the pure-Rust header check
/// (GGML's parser trusts the header's sizes and aborts on a key of an
/// unexpected type).
pub(crate) fn checked_gguf_path(path: &Path) -> Result<CString, ModelError> {
    wire::gguf::check_file(path).map_err(ModelError::Header)?;
    c_path(path)
}

/// A whole-model quantization request.
#[derive(Debug, Clone)]
pub struct QuantizeRequest<'a> {
    /// llama.cpp file type, by `llama-quantize`'s name: `F32`, `F16`,
    /// `Q8_0`, `Q4_0`, `Q4_K_M`, `Q6_K`, ...
    pub ftype: &'a str,
    /// Tensor-name regex -> GGML type name (`q8_0`, `f32`, ...), first match wins.
    pub overrides: &'a [(String, String)],
    pub threads: usize,
    /// Importance per weight (mean squared activation per input column,
    /// see `calibration`): llama.cpp's quantizer then minimises the
    /// importance-weighted error. Empty: uncalibrated.
    pub importance: &'a [(String, Vec<f32>)],
    /// llama-quantize's `--pure`: every matrix the file type's base type,
    /// none of llama.cpp's per-tensor mixes.
    pub pure: bool,
}

/// llama.cpp's file types by `llama-quantize` name. The numbers are
/// llama.h's `llama_ftype` values, which never change meaning (removed
/// types keep their numbers), so every llama.cpp under test compiles this
/// table; one that does not know a type refuses it when quantizing.
pub fn ftype_from_name(name: &str) -> Option<sys::llama_ftype> {
    Some(match name.to_ascii_uppercase().as_str() {
        "F32" => 0,
        "F16" => 1,
        "Q4_0" => 2,
        "Q4_1" => 3,
        "Q8_0" => 7,
        "Q5_0" => 8,
        "Q5_1" => 9,
        "Q2_K" => 10,
        "Q3_K_S" => 11,
        "Q3_K_M" => 12,
        "Q3_K_L" => 13,
        "Q4_K_S" => 14,
        "Q4_K_M" => 15,
        "Q5_K_S" => 16,
        "Q5_K_M" => 17,
        "Q6_K" => 18,
        "IQ2_XXS" => 19,
        "IQ2_XS" => 20,
        "Q2_K_S" => 21,
        "IQ3_XS" => 22,
        "IQ3_XXS" => 23,
        "IQ1_S" => 24,
        "IQ4_NL" => 25,
        "IQ3_S" => 26,
        "IQ3_M" => 27,
        "IQ2_S" => 28,
        "IQ2_M" => 29,
        "IQ4_XS" => 30,
        "IQ1_M" => 31,
        "BF16" => 32,
        "TQ1_0" => 36,
        "TQ2_0" => 37,
        _ => return None,
    } as sys::llama_ftype)
}

/// Sets this process's scheduling priority as llama.cpp's
/// `set_process_priority` does on Linux (`setpriority` to the priority's
/// nice value). Raising it needs CAP_SYS_NICE: refused in one line saying
/// so, and the process keeps the priority it had.
pub fn set_process_priority(priority: Priority) -> Result<(), String> {
    let nice = priority.nice();
    // SAFETY: plain syscalls on this process.
    let (status, current) = unsafe {
        *libc::__errno_location() = 0;
        let current = libc::getpriority(libc::PRIO_PROCESS, 0);
        (libc::setpriority(libc::PRIO_PROCESS, 0, nice), current)
    };
    if status == 0 {
        return Ok(());
    }
    let error = std::io::Error::last_os_error();
    Err(format!(
        "priority {} (nice {nice}) needs CAP_SYS_NICE on this board, which the agent lacks (setpriority: {error}; the process is at nice {current}): run the agent as root or give it the capability (`setcap cap_sys_nice+ep` on quantbench-agent), or leave `priority` at normal",
        priority.name()
    ))
}

/// llama.cpp's load parameters for `load`.
#[cfg(not(llama_lacks_load_mode_enum))]
fn set_load_mode(params: &mut sys::llama_model_params, load: ModelLoad) {
    params.load_mode = match load {
        ModelLoad::Mmap => sys::LLAMA_LOAD_MODE_MMAP,
        ModelLoad::NoMmap => sys::LLAMA_LOAD_MODE_NONE,
        ModelLoad::Mlock => sys::LLAMA_LOAD_MODE_MMAP_MLOCK,
    };
}

/// llama.cpp's load parameters for `load`, on a llama.cpp that sets them
/// as flags.
#[cfg(llama_lacks_load_mode_enum)]
fn set_load_mode(params: &mut sys::llama_model_params, load: ModelLoad) {
    params.use_mmap = load != ModelLoad::NoMmap;
    params.use_mlock = load == ModelLoad::Mlock;
}

/// Why `bytes` of weights cannot be locked in memory by this process
/// (`None`: they can): llama.cpp only warns when `mlock` fails and goes on
/// unlocked, which would make an `mlock` row an `mmap` row in disguise.
/// Locking needs CAP_IPC_LOCK or a memlock limit of at least the file.
pub fn mlock_refusal(bytes: u64) -> Option<String> {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let cap_ipc_lock = 1u64 << 14;
    let effective = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .unwrap_or(0);
    if effective & cap_ipc_lock != 0 {
        return None;
    }
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes the struct it is given.
    if unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut limit) } != 0 {
        return Some(format!(
            "mlock: the memlock limit could not be read ({})",
            std::io::Error::last_os_error()
        ));
    }
    if limit.rlim_cur == libc::RLIM_INFINITY || limit.rlim_cur >= bytes {
        return None;
    }
    // The soft limit may be raised up to the hard one without privilege.
    if limit.rlim_max == libc::RLIM_INFINITY || limit.rlim_max >= bytes {
        let raised = libc::rlimit {
            rlim_cur: limit.rlim_max,
            rlim_max: limit.rlim_max,
        };
        // SAFETY: setrlimit reads the struct it is given.
        if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &raised) } == 0 {
            return None;
        }
    }
    Some(format!(
        "mlock needs {:.1} MB locked but this board lets the agent lock {:.1} MB (memlock limit) and it lacks CAP_IPC_LOCK: raise the limit (`ulimit -l unlimited`, or `memlock` in /etc/security/limits.conf) or run the agent as root, or leave `load_mode` at mmap",
        bytes as f64 / 1e6,
        limit.rlim_max as f64 / 1e6
    ))
}

/// Whether `name` is a tensor type of the linked GGML (`q8_0`, `iq2_xs`;
/// not a file-type mix such as `q4_k_m`).
pub fn is_ggml_type(name: &str) -> bool {
    ggml_type_from_name(name).is_some()
}

fn ggml_type_from_name(name: &str) -> Option<sys::ggml_type> {
    (0..sys::GGML_TYPE_COUNT).find(|&t| {
        // SAFETY: static table lookup for every defined type value.
        let n = unsafe { sys::ggml_type_name(t) };
        !n.is_null()
            && unsafe { CStr::from_ptr(n) }
                .to_string_lossy()
                .eq_ignore_ascii_case(name)
    })
}

/// Quantizes `input` into `output` with llama.cpp's own quantizer.
pub fn quantize_model(
    input: &Path,
    output: &Path,
    request: &QuantizeRequest,
) -> Result<(), ModelError> {
    init_backend();
    let fail = || ModelError::Quantize {
        path: input.display().to_string(),
        recipe: request.ftype.to_string(),
    };
    let ftype = ftype_from_name(request.ftype).ok_or_else(fail)?;
    if let Some(missing) = missing_capability(request) {
        return Err(ModelError::Llama(format!(
            "recipe `{}` needs {missing}, which the llama.cpp this agent was built from ({}) does not have; use a build of llama.cpp that has it (see `[builds]` in docs/builds.md)",
            request.ftype,
            crate::llama_source()
        )));
    }
    let (inp, out) = (checked_gguf_path(input)?, c_path(output)?);
    let overrides = TensorOverrides::new(request, fail)?;
    let importance = ImportanceData::new(request, fail)?;
    // SAFETY: params come from llama.cpp's defaults; the override and
    // importance arrays are NULL-terminated and they and their strings
    // outlive the call.
    let status = unsafe {
        let mut params = sys::llama_model_quantize_default_params();
        params.ftype = ftype;
        params.nthread = request.threads as i32;
        params.pure_ = request.pure;
        overrides.attach(&mut params);
        importance.attach(&mut params);
        sys::llama_model_quantize(inp.as_ptr(), out.as_ptr(), &params)
    };
    if status != 0 {
        return Err(fail());
    }
    Ok(())
}

/// What `request` needs that this build's llama.cpp lacks, if anything.
fn missing_capability(request: &QuantizeRequest) -> Option<&'static str> {
    if !request.overrides.is_empty() && cfg!(llama_lacks_tensor_overrides) {
        return Some("per-tensor type overrides (`llama_model_tensor_override`)");
    }
    if !request.importance.is_empty() && cfg!(llama_lacks_imatrix_data) {
        return Some("importance data in the quantize parameters (`llama_model_imatrix_data`)");
    }
    None
}

/// The NULL-terminated per-tensor type overrides of a request, with the
/// pattern strings they point into.
#[cfg(not(llama_lacks_tensor_overrides))]
struct TensorOverrides {
    _patterns: Vec<CString>,
    entries: Vec<sys::llama_model_tensor_override>,
}

#[cfg(not(llama_lacks_tensor_overrides))]
impl TensorOverrides {
    fn new(request: &QuantizeRequest, fail: impl Fn() -> ModelError) -> Result<Self, ModelError> {
        let patterns: Vec<CString> = request
            .overrides
            .iter()
            .map(|(p, _)| CString::new(p.as_str()).map_err(|_| fail()))
            .collect::<Result<_, _>>()?;
        let mut entries = Vec::new();
        for ((_, ty), pattern) in request.overrides.iter().zip(&patterns) {
            entries.push(sys::llama_model_tensor_override {
                pattern: pattern.as_ptr(),
                type_: ggml_type_from_name(ty).ok_or_else(&fail)?,
            });
        }
        entries.push(sys::llama_model_tensor_override {
            pattern: ptr::null(),
            type_: 0,
        });
        Ok(TensorOverrides {
            _patterns: patterns,
            entries,
        })
    }

    fn attach(&self, params: &mut sys::llama_model_quantize_params) {
        if self.entries.len() > 1 {
            params.tt_overrides = self.entries.as_ptr();
        }
    }
}

/// A llama.cpp without per-tensor overrides: requests that need them were
/// refused by `missing_capability`.
#[cfg(llama_lacks_tensor_overrides)]
struct TensorOverrides;

#[cfg(llama_lacks_tensor_overrides)]
impl TensorOverrides {
    fn new(_: &QuantizeRequest, _: impl Fn() -> ModelError) -> Result<Self, ModelError> {
        Ok(TensorOverrides)
    }

    fn attach(&self, _: &mut sys::llama_model_quantize_params) {}
}

/// The NULL-terminated importance data of a request, with its names.
#[cfg(not(llama_lacks_imatrix_data))]
struct ImportanceData {
    _names: Vec<CString>,
    entries: Vec<sys::llama_model_imatrix_data>,
}

#[cfg(not(llama_lacks_imatrix_data))]
impl ImportanceData {
    fn new(request: &QuantizeRequest, fail: impl Fn() -> ModelError) -> Result<Self, ModelError> {
        let names: Vec<CString> = request
            .importance
            .iter()
            .map(|(name, _)| CString::new(name.as_str()).map_err(|_| fail()))
            .collect::<Result<_, _>>()?;
        let mut entries: Vec<sys::llama_model_imatrix_data> = request
            .importance
            .iter()
            .zip(&names)
            .map(|((_, values), name)| sys::llama_model_imatrix_data {
                name: name.as_ptr(),
                data: values.as_ptr(),
                size: values.len(),
            })
            .collect();
        entries.push(sys::llama_model_imatrix_data {
            name: ptr::null(),
            data: ptr::null(),
            size: 0,
        });
        Ok(ImportanceData {
            _names: names,
            entries,
        })
    }

    fn attach(&self, params: &mut sys::llama_model_quantize_params) {
        if self.entries.len() > 1 {
            params.imatrix = self.entries.as_ptr();
        }
    }
}

/// A llama.cpp without importance data in its parameters: requests that
/// need it were refused by `missing_capability`.
#[cfg(llama_lacks_imatrix_data)]
struct ImportanceData;

#[cfg(llama_lacks_imatrix_data)]
impl ImportanceData {
    fn new(_: &QuantizeRequest, _: impl Fn() -> ModelError) -> Result<Self, ModelError> {
        Ok(ImportanceData)
    }

    fn attach(&self, _: &mut sys::llama_model_quantize_params) {}
}

/// A GGUF file's metadata and tensor table (no tensor data), for reading
/// it; the caller frees it with `gguf_free`.
pub(crate) fn open_gguf_metadata(path: &Path) -> Result<*mut sys::gguf_context, ModelError> {
    let c = checked_gguf_path(path)?;
    // SAFETY: no_alloc reads only the metadata; a NULL result is an error.
    let ctx = unsafe {
        sys::gguf_init_from_file(
            c.as_ptr(),
            sys::gguf_init_params {
                no_alloc: true,
                ctx: ptr::null_mut(),
            },
        )
    };
    if ctx.is_null() {
        return Err(ModelError::Load {
            path: path.display().to_string(),
        });
    }
    Ok(ctx)
}

/// (tensor name, GGML type name) of every tensor in a GGUF file.
pub fn gguf_tensor_types(path: &Path) -> Result<Vec<(String, String)>, ModelError> {
    let ctx = open_gguf_metadata(path)?;
    // SAFETY: ctx is a valid metadata context, freed below.
    unsafe {
        let n = sys::gguf_get_n_tensors(ctx);
        let mut out = Vec::with_capacity(n as usize);
        for i in 0..n {
            let name = CStr::from_ptr(sys::gguf_get_tensor_name(ctx, i))
                .to_string_lossy()
                .into_owned();
            let ty = CStr::from_ptr(sys::ggml_type_name(sys::gguf_get_tensor_type(ctx, i)))
                .to_string_lossy()
                .into_owned();
            out.push((name, ty));
        }
        sys::gguf_free(ctx);
        Ok(out)
    }
}

/// A loaded model with one context for evaluation.
pub struct LoadedModel {
    model: *mut sys::llama_model,
    ctx: *mut sys::llama_context,
    vocab: *const sys::llama_vocab,
    /// GGML's persistent worker pool, attached to the context. Without
    /// one, GGML's CPU backend (built without OpenMP for static agents)
    /// creates and joins its worker threads on every graph computation: a
    /// fixed cost of tens of microseconds per decoded token that stock
    /// llama-bench, which attaches a pool, does not pay.
    threadpool: *mut sys::ggml_threadpool,
    threadpool_threads: usize,
    /// The CPU settings the pool was made with.
    threadpool_cpu: CpuSettings,
    threads: usize,
    n_ctx: usize,
    n_vocab: usize,
    /// Whether the context runs flash attention, as llama.cpp's log said
    /// (`None`: it did not say).
    flash_attn_used: Option<bool>,
    /// The evaluation callback the context was made with, kept for a new
    /// context of the same model.
    observer: sys::ggml_backend_sched_eval_callback,
    observer_data: *mut std::os::raw::c_void,
}

/// The context a model is loaded with: its size and the settings of what
/// runs in it.
#[derive(Debug, Clone, PartialEq)]
pub struct ContextShape {
    /// Tokens per sequence.
    pub n_ctx: usize,
    pub n_seq: usize,
    pub n_batch: usize,
    pub n_ubatch: usize,
    pub settings: ContextSettings,
}

impl ContextShape {
    /// `n_seq` sequences of `n_ctx` tokens each, decoded in batches of up
    /// to all of them and micro-batches of llama.cpp's default 512: how
    /// `llama-perplexity` evaluates (16 chunks of 128 at once with its
    /// default batch of 2048), which fixes the matrix shapes and so the
    /// rounding of every result. The KV cache and attention are
    /// `settings`'.
    pub fn evaluation(n_ctx: usize, n_seq: usize, settings: &ContextSettings) -> ContextShape {
        let total = n_ctx * n_seq.max(1);
        ContextShape {
            n_ctx,
            n_seq: n_seq.max(1),
            n_batch: total,
            n_ubatch: total.min(wire::model_settings::DEFAULT_N_UBATCH),
            settings: settings.clone(),
        }
    }

    /// One sequence of `n_ctx` tokens with `settings`' batches: a timed
    /// test's (llama-bench's).
    pub fn timing(n_ctx: usize, settings: &ContextSettings) -> ContextShape {
        ContextShape {
            n_ctx,
            n_seq: 1,
            n_batch: settings.n_batch,
            n_ubatch: settings.n_ubatch,
            settings: settings.clone(),
        }
    }
}

// SAFETY: the model and context are used from one thread at a time (&mut).
unsafe impl Send for LoadedModel {}

/// One token of a batch.
#[derive(Debug, Clone, Copy)]
pub struct BatchEntry {
    pub token: i32,
    pub pos: usize,
    pub seq: usize,
    /// Whether to return this position's logits.
    pub logits: bool,
}

/// Model facts for the results.
#[derive(Debug, Clone)]
pub struct ModelFacts {
    pub description: String,
    pub size_bytes: u64,
    pub n_params: u64,
    pub n_layer: usize,
}

impl LoadedModel {
    /// Loads `path` (CPU only, mmap) with a context of `n_ctx` tokens and
    /// `threads` threads for both generation and batches.
    pub fn load(path: &Path, n_ctx: usize, threads: usize) -> Result<LoadedModel, ModelError> {
        Self::load_with(path, n_ctx, 1, threads)
    }

    /// Loads with room for `n_seq` sequences of `n_ctx` tokens each, as
    /// `llama-perplexity` evaluates (`ContextShape::evaluation`), with
    /// llama.cpp's default KV cache and attention.
    pub fn load_with(
        path: &Path,
        n_ctx: usize,
        n_seq: usize,
        threads: usize,
    ) -> Result<LoadedModel, ModelError> {
        let shape = ContextShape::evaluation(n_ctx, n_seq, &ContextSettings::default());
        Self::load_shaped(path, &shape, threads)
    }

    /// Loads with a context of `shape`.
    pub fn load_shaped(
        path: &Path,
        shape: &ContextShape,
        threads: usize,
    ) -> Result<LoadedModel, ModelError> {
        Self::load_as(path, shape, threads, ModelLoad::Mmap)
    }

    /// `load_shaped`, the weights loaded as `load` says (mapped, read
    /// into the process's memory, or mapped and locked).
    pub fn load_as(
        path: &Path,
        shape: &ContextShape,
        threads: usize,
        load: ModelLoad,
    ) -> Result<LoadedModel, ModelError> {
        // SAFETY: no evaluation callback.
        unsafe { Self::load_observed_shaped(path, shape, threads, load, None, ptr::null_mut()) }
    }

    /// `load_with`, with GGML's evaluation callback set on the context: it
    /// sees every graph node as it is computed (how `llama-imatrix` reads
    /// activations).
    ///
    /// # Safety
    /// `user_data` must be what `observer` expects and outlive the model.
    pub(crate) unsafe fn load_observed(
        path: &Path,
        n_ctx: usize,
        n_seq: usize,
        threads: usize,
        observer: sys::ggml_backend_sched_eval_callback,
        user_data: *mut std::os::raw::c_void,
    ) -> Result<LoadedModel, ModelError> {
        let shape = ContextShape::evaluation(n_ctx, n_seq, &ContextSettings::default());
        // SAFETY: the caller's guarantee.
        unsafe {
            Self::load_observed_shaped(path, &shape, threads, ModelLoad::Mmap, observer, user_data)
        }
    }

    /// `load_observed` with a context of `shape`.
    ///
    /// # Safety
    /// `user_data` must be what `observer` expects and outlive the model.
    unsafe fn load_observed_shaped(
        path: &Path,
        shape: &ContextShape,
        threads: usize,
        load: ModelLoad,
        observer: sys::ggml_backend_sched_eval_callback,
        user_data: *mut std::os::raw::c_void,
    ) -> Result<LoadedModel, ModelError> {
        init_backend();
        let c = checked_gguf_path(path)?;
        let load_err = || ModelError::Load {
            path: path.display().to_string(),
        };
        // SAFETY: NULL results are checked; ownership moves into the value,
        // whose Drop frees them.
        unsafe {
            let mut mparams = sys::llama_model_default_params();
            mparams.n_gpu_layers = 0;
            set_load_mode(&mut mparams, load);
            let model = sys::llama_model_load_from_file(c.as_ptr(), mparams);
            if model.is_null() {
                return Err(load_err());
            }
            let vocab = sys::llama_model_get_vocab(model);
            let mut loaded = LoadedModel {
                model,
                ctx: ptr::null_mut(),
                vocab,
                threadpool: std::ptr::null_mut(),
                threadpool_threads: 0,
                threadpool_cpu: CpuSettings::default(),
                threads: threads.max(1),
                n_ctx: shape.n_ctx,
                n_vocab: sys::llama_vocab_n_tokens(vocab) as usize,
                flash_attn_used: None,
                observer,
                observer_data: user_data,
            };
            // Drop frees the model if the context cannot be made.
            loaded.recontext(shape)?;
            Ok(loaded)
        }
    }

    /// Replaces the context with a new one of `shape` on the same loaded
    /// weights (a test's KV-cache type, attention and batches); the KV
    /// cache starts empty. A shape llama.cpp refuses (a quantized V cache
    /// without flash attention, a K type whose block does not divide the
    /// head size) is an error in llama.cpp's words.
    pub fn recontext(&mut self, shape: &ContextShape) -> Result<(), ModelError> {
        let s = &shape.settings;
        let type_of = |name: &str| {
            ggml_type_from_name(name).ok_or_else(|| {
                ModelError::Llama(format!("GGML has no type `{name}` for the KV cache"))
            })
        };
        let (type_k, type_v) = (type_of(&s.kv_type.k)?, type_of(&s.kv_type.v)?);
        // llama.cpp checks this for a K cache with flash attention only;
        // without it a quantized cache's per-head views split blocks and
        // GGML aborts the process.
        let head = self.head_size();
        for (which, name, ty) in [("K", &s.kv_type.k, type_k), ("V", &s.kv_type.v, type_v)] {
            // SAFETY: a type GGML named.
            let block = unsafe { sys::ggml_blck_size(ty) }.max(1) as usize;
            if !head.is_multiple_of(block) {
                return Err(ModelError::ContextRefused(format!(
                    "a {which} cache of {name} stores blocks of {block} values, which do not divide this model's attention heads of {head} values: llama.cpp cannot run it (use f16, bf16 or f32 for this model)"
                )));
            }
        }
        // SAFETY: the model is loaded; the new context is made before the
        // old one is freed (a refused one leaves the old in place), and the
        // worker pool, the model's, outlives both.
        unsafe {
            let mut cparams = sys::llama_context_default_params();
            let total = (shape.n_ctx * shape.n_seq.max(1)) as u32;
            cparams.n_ctx = total;
            cparams.n_batch = (shape.n_batch as u32).max(1);
            cparams.n_ubatch = (shape.n_ubatch as u32).max(1);
            cparams.n_seq_max = shape.n_seq.max(1) as u32;
            cparams.n_threads = self.threads as i32;
            cparams.n_threads_batch = self.threads as i32;
            cparams.no_perf = true;
            cparams.cb_eval = self.observer;
            cparams.cb_eval_user_data = self.observer_data;
            cparams.type_k = type_k;
            cparams.type_v = type_v;
            match s.flash_attn {
                FlashAttn::Auto => {}
                FlashAttn::On => cparams.flash_attn_type = sys::LLAMA_FLASH_ATTN_TYPE_ENABLED,
                FlashAttn::Off => cparams.flash_attn_type = sys::LLAMA_FLASH_ATTN_TYPE_DISABLED,
            }
            let model = self.model;
            let (ctx, log) = with_context_log(|| sys::llama_init_from_model(model, cparams));
            if ctx.is_null() {
                return Err(ModelError::ContextRefused(format!(
                    "could not create a context with KV cache {}, flash attention {}, batch {}/{}: {}",
                    s.kv_type,
                    s.flash_attn.name(),
                    shape.n_batch,
                    shape.n_ubatch,
                    errors_in_log(&log)
                )));
            }
            if !self.ctx.is_null() {
                sys::llama_free(self.ctx);
            }
            self.ctx = ctx;
            self.n_ctx = shape.n_ctx;
            self.flash_attn_used = match s.flash_attn {
                FlashAttn::On => Some(true),
                FlashAttn::Off => Some(false),
                FlashAttn::Auto => flash_attn_in_log(&log),
            };
        }
        if self.threadpool.is_null() {
            self.attach_threadpool(self.threads, &CpuSettings::default())
        } else {
            // SAFETY: both are valid; the pool outlives the context.
            unsafe { sys::llama_attach_threadpool(self.ctx, self.threadpool, self.threadpool) };
            Ok(())
        }
    }

    /// Values per attention head (embedding width over heads).
    fn head_size(&self) -> usize {
        // SAFETY: the model is loaded.
        let (embd, heads) = unsafe {
            (
                sys::llama_model_n_embd(self.model),
                sys::llama_model_n_head(self.model),
            )
        };
        (embd.max(1) / heads.max(1)).max(1) as usize
    }

    /// Whether the context runs flash attention (`None`: llama.cpp did
    /// not say what `auto` resolved to).
    pub fn flash_attn_used(&self) -> Option<bool> {
        self.flash_attn_used
    }

    /// Bytes a KV cache of `n_ctx` cells in `kv_type` takes for this
    /// model, before it is made: every layer's K and V rows at llama.cpp's
    /// sizes (a model with sliding-window layers needs less).
    pub fn kv_bytes_needed(
        &self,
        n_ctx: usize,
        kv_type: &wire::model_settings::KvCacheType,
    ) -> u64 {
        // SAFETY: the model is loaded; types come from GGML's own names.
        unsafe {
            let layers = sys::llama_model_n_layer(self.model).max(0) as u64;
            let row = (sys::llama_model_n_head_kv(self.model).max(0) as usize) * self.head_size();
            let bytes = |name: &str| {
                ggml_type_from_name(name)
                    .map_or(row as u64 * 2, |t| sys::ggml_row_size(t, row as i64) as u64)
            };
            n_ctx as u64 * layers * (bytes(&kv_type.k) + bytes(&kv_type.v))
        }
    }

    /// Bytes the KV cache holds for sequence 0 now (llama.cpp's size of
    /// its saved state: the cells' K and V rows of every layer).
    pub fn kv_bytes(&self) -> u64 {
        // SAFETY: ctx is valid.
        unsafe { sys::llama_state_seq_get_size(self.ctx, 0) as u64 }
    }

    /// Forgets sequence 0's tokens from position `pos` on (the KV cache
    /// keeps the first `pos`).
    pub fn forget_from(&mut self, pos: usize) {
        // SAFETY: ctx is valid.
        unsafe {
            sys::llama_memory_seq_rm(sys::llama_get_memory(self.ctx), 0, pos as i32, -1);
        }
    }

    pub fn facts(&self) -> ModelFacts {
        let mut buf = vec![0u8; 256];
        // SAFETY: the buffer is large enough and NUL-terminated by llama.cpp.
        unsafe {
            sys::llama_model_desc(self.model, buf.as_mut_ptr().cast(), buf.len());
            ModelFacts {
                description: CStr::from_ptr(buf.as_ptr().cast())
                    .to_string_lossy()
                    .into_owned(),
                size_bytes: sys::llama_model_size(self.model),
                n_params: sys::llama_model_n_params(self.model),
                n_layer: sys::llama_model_n_layer(self.model).max(0) as usize,
            }
        }
    }

    pub fn n_vocab(&self) -> usize {
        self.n_vocab
    }

    pub fn n_ctx(&self) -> usize {
        self.n_ctx
    }

    pub fn bos(&self) -> i32 {
        // SAFETY: vocab belongs to the loaded model.
        unsafe { sys::llama_vocab_bos(self.vocab) }
    }

    /// Tokenizes `text`, with the model's BOS first when `add_bos`.
    pub fn tokenize(&self, text: &str, add_bos: bool) -> Vec<i32> {
        let bytes = text.as_bytes();
        let mut tokens = vec![0i32; bytes.len() + 8];
        // SAFETY: the buffer holds at least as many tokens as bytes + BOS;
        // a negative result gives the size needed, handled below.
        unsafe {
            let mut n = sys::llama_tokenize(
                self.vocab,
                bytes.as_ptr().cast(),
                bytes.len() as i32,
                tokens.as_mut_ptr(),
                tokens.len() as i32,
                add_bos,
                false,
            );
            if n < 0 {
                tokens.resize((-n) as usize, 0);
                n = sys::llama_tokenize(
                    self.vocab,
                    bytes.as_ptr().cast(),
                    bytes.len() as i32,
                    tokens.as_mut_ptr(),
                    tokens.len() as i32,
                    add_bos,
                    false,
                );
            }
            tokens.truncate(n.max(0) as usize);
        }
        tokens
    }

    pub fn token_text(&self, token: i32) -> String {
        let mut buf = vec![0u8; 64];
        // SAFETY: buffer length passed; a negative result means "too small".
        unsafe {
            let mut n = sys::llama_token_to_piece(
                self.vocab,
                token,
                buf.as_mut_ptr().cast(),
                buf.len() as i32,
                0,
                false,
            );
            if n < 0 {
                buf.resize((-n) as usize, 0);
                n = sys::llama_token_to_piece(
                    self.vocab,
                    token,
                    buf.as_mut_ptr().cast(),
                    buf.len() as i32,
                    0,
                    false,
                );
            }
            String::from_utf8_lossy(&buf[..n.max(0) as usize]).into_owned()
        }
    }

    /// Uses `threads` threads from now on (a larger pool when needed).
    pub fn set_threads(&mut self, threads: usize) -> Result<(), ModelError> {
        self.set_threads_on(threads, &CpuSettings::default())
    }

    /// `set_threads` with GGML's threads placed and scheduled as `cpu`
    /// says (llama-bench's `-C`, `--cpu-strict`, `--poll`, `--prio`): a
    /// pool of exactly `threads` workers made with those parameters, as
    /// llama-bench makes one per test. The default settings keep one pool
    /// of the most threads asked so far.
    pub fn set_threads_on(&mut self, threads: usize, cpu: &CpuSettings) -> Result<(), ModelError> {
        let threads = threads.max(1);
        let remake = if *cpu == CpuSettings::default() {
            self.threadpool_cpu != *cpu || threads > self.threadpool_threads
        } else {
            self.threadpool_cpu != *cpu || threads != self.threadpool_threads
        };
        if remake {
            self.attach_threadpool(threads, cpu)?;
        }
        self.threads = threads;
        // SAFETY: ctx is valid.
        unsafe { sys::llama_set_n_threads(self.ctx, threads as i32, threads as i32) };
        Ok(())
    }

    /// Replaces the context's worker pool with one of `threads` workers
    /// made with `cpu`'s parameters (the defaults are llama-bench's: poll
    /// 50, no CPU mask).
    fn attach_threadpool(&mut self, threads: usize, cpu: &CpuSettings) -> Result<(), ModelError> {
        let threads = threads.max(1);
        let mask = CpuSettings::mask_cpus(&cpu.cpu_mask).map_err(ModelError::Llama)?;
        // SAFETY: ctx is valid; the old pool is detached before it is
        // freed, and the new one outlives its attachment (freed in Drop
        // after the context); mask CPUs are below GGML_MAX_N_THREADS
        // (checked by `mask_cpus`).
        unsafe {
            let mut params = sys::ggml_threadpool_params_default(threads as i32);
            for &c in &mask {
                if let Some(slot) = params.cpumask.get_mut(c) {
                    *slot = true;
                }
            }
            params.strict_cpu = cpu.cpu_strict;
            params.poll = cpu.poll;
            params.prio = cpu.priority.ggml_level() as sys::ggml_sched_priority;
            let pool = sys::ggml_threadpool_new(&mut params);
            if pool.is_null() {
                return Err(ModelError::Llama(
                    "ggml_threadpool_new returned NULL".into(),
                ));
            }
            sys::llama_attach_threadpool(self.ctx, pool, pool);
            if !self.threadpool.is_null() {
                sys::ggml_threadpool_free(self.threadpool);
            }
            self.threadpool = pool;
            self.threadpool_threads = threads;
            self.threadpool_cpu = cpu.clone();
        }
        Ok(())
    }

    /// True when the model wants a BOS token at the start of a sequence.
    pub fn adds_bos(&self) -> bool {
        // SAFETY: vocab belongs to the loaded model.
        unsafe { sys::llama_vocab_get_add_bos(self.vocab) }
    }

    /// Forgets the KV cache (a new sequence starts at position 0).
    pub fn clear(&mut self) {
        // SAFETY: ctx is valid.
        unsafe { sys::llama_memory_clear(sys::llama_get_memory(self.ctx), true) };
    }

    /// Decodes `tokens` at positions `first_pos..`, returning logits for
    /// every token when `all_logits`, else for the last (row-major).
    pub fn decode(
        &mut self,
        tokens: &[i32],
        first_pos: usize,
        all_logits: bool,
    ) -> Result<Vec<f32>, ModelError> {
        let entries: Vec<BatchEntry> = tokens
            .iter()
            .enumerate()
            .map(|(i, &token)| BatchEntry {
                token,
                pos: first_pos + i,
                seq: 0,
                logits: all_logits || i + 1 == tokens.len(),
            })
            .collect();
        self.decode_batch(&entries)
    }

    /// Decodes one batch of tokens from any sequences; returns the logits of
    /// the entries that asked for them, in order (row-major).
    pub fn decode_batch(&mut self, entries: &[BatchEntry]) -> Result<Vec<f32>, ModelError> {
        self.submit(entries)?;
        let mut out = Vec::new();
        for (i, e) in entries.iter().enumerate() {
            if !e.logits {
                continue;
            }
            // SAFETY: llama_decode returned logits for every entry that
            // asked; each row is n_vocab floats.
            unsafe {
                let logits = sys::llama_get_logits_ith(self.ctx, i as i32);
                if logits.is_null() {
                    return Err(ModelError::Llama("no logits returned".into()));
                }
                out.extend_from_slice(std::slice::from_raw_parts(logits, self.n_vocab));
            }
        }
        Ok(out)
    }

    /// Decodes one batch and leaves its logits in llama.cpp (for what the
    /// evaluation callback saw, not the logits).
    pub fn submit(&mut self, entries: &[BatchEntry]) -> Result<(), ModelError> {
        if entries.is_empty() {
            return Ok(());
        }
        // SAFETY: the batch is sized for `entries`, every field written is in
        // bounds, and it is freed after llama_decode copied what it needs.
        unsafe {
            let mut batch = sys::llama_batch_init(entries.len() as i32, 0, 1);
            for (i, e) in entries.iter().enumerate() {
                *batch.token.add(i) = e.token;
                *batch.pos.add(i) = e.pos as i32;
                *batch.n_seq_id.add(i) = 1;
                *(*batch.seq_id.add(i)) = e.seq as i32;
                *batch.logits.add(i) = e.logits as i8;
            }
            batch.n_tokens = entries.len() as i32;
            let status = sys::llama_decode(self.ctx, batch);
            sys::llama_batch_free(batch);
            if status != 0 {
                return Err(ModelError::Llama(format!(
                    "llama_decode failed with {status}"
                )));
            }
            Ok(())
        }
    }
}

impl Drop for LoadedModel {
    fn drop(&mut self) {
        // SAFETY: both were created in `load` and are freed once.
        unsafe {
            if !self.ctx.is_null() {
                sys::llama_free(self.ctx);
            }
            sys::llama_model_free(self.model);
            if !self.threadpool.is_null() {
                sys::ggml_threadpool_free(self.threadpool);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The file-type table is written in llama.h's numbers (so older
    /// llama.cpp trees compile it): they must be the linked llama.h's.
    #[test]
    fn file_type_numbers_are_llama_h_s() {
        for (name, expected) in [
            ("F32", sys::LLAMA_FTYPE_ALL_F32),
            ("F16", sys::LLAMA_FTYPE_MOSTLY_F16),
            ("BF16", sys::LLAMA_FTYPE_MOSTLY_BF16),
            ("Q4_0", sys::LLAMA_FTYPE_MOSTLY_Q4_0),
            ("Q4_1", sys::LLAMA_FTYPE_MOSTLY_Q4_1),
            ("Q8_0", sys::LLAMA_FTYPE_MOSTLY_Q8_0),
            ("Q5_0", sys::LLAMA_FTYPE_MOSTLY_Q5_0),
            ("Q5_1", sys::LLAMA_FTYPE_MOSTLY_Q5_1),
            ("Q2_K", sys::LLAMA_FTYPE_MOSTLY_Q2_K),
            ("Q2_K_S", sys::LLAMA_FTYPE_MOSTLY_Q2_K_S),
            ("Q3_K_S", sys::LLAMA_FTYPE_MOSTLY_Q3_K_S),
            ("Q3_K_M", sys::LLAMA_FTYPE_MOSTLY_Q3_K_M),
            ("Q3_K_L", sys::LLAMA_FTYPE_MOSTLY_Q3_K_L),
            ("Q4_K_S", sys::LLAMA_FTYPE_MOSTLY_Q4_K_S),
            ("Q4_K_M", sys::LLAMA_FTYPE_MOSTLY_Q4_K_M),
            ("Q5_K_S", sys::LLAMA_FTYPE_MOSTLY_Q5_K_S),
            ("Q5_K_M", sys::LLAMA_FTYPE_MOSTLY_Q5_K_M),
            ("Q6_K", sys::LLAMA_FTYPE_MOSTLY_Q6_K),
            ("IQ1_S", sys::LLAMA_FTYPE_MOSTLY_IQ1_S),
            ("IQ1_M", sys::LLAMA_FTYPE_MOSTLY_IQ1_M),
            ("IQ2_XXS", sys::LLAMA_FTYPE_MOSTLY_IQ2_XXS),
            ("IQ2_XS", sys::LLAMA_FTYPE_MOSTLY_IQ2_XS),
            ("IQ2_S", sys::LLAMA_FTYPE_MOSTLY_IQ2_S),
            ("IQ2_M", sys::LLAMA_FTYPE_MOSTLY_IQ2_M),
            ("IQ3_XXS", sys::LLAMA_FTYPE_MOSTLY_IQ3_XXS),
            ("IQ3_XS", sys::LLAMA_FTYPE_MOSTLY_IQ3_XS),
            ("IQ3_S", sys::LLAMA_FTYPE_MOSTLY_IQ3_S),
            ("IQ3_M", sys::LLAMA_FTYPE_MOSTLY_IQ3_M),
            ("IQ4_NL", sys::LLAMA_FTYPE_MOSTLY_IQ4_NL),
            ("IQ4_XS", sys::LLAMA_FTYPE_MOSTLY_IQ4_XS),
            ("TQ1_0", sys::LLAMA_FTYPE_MOSTLY_TQ1_0),
            ("TQ2_0", sys::LLAMA_FTYPE_MOSTLY_TQ2_0),
        ] {
            assert_eq!(ftype_from_name(name), Some(expected), "{name}");
            assert_eq!(ftype_from_name(&name.to_lowercase()), Some(expected));
        }
        assert_eq!(ftype_from_name("Q4_K"), None, "an alias, not a name we use");
        assert!(is_ggml_type("iq2_xs") && is_ggml_type("Q8_0"));
        assert!(!is_ggml_type("q4_k_m") && !is_ggml_type("iq2_m"));
    }
}
