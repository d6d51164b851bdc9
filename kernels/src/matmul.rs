//! One weight matrix times a batch of activations on GGML's CPU backend.

use crate::ffi::vec_dot_type;
use crate::placement::{FileMapping, PageState};
use crate::{KernelError, StagedMatrix};
use llama_cpp_sys_2 as sys;
use serde::{Deserialize, Serialize};
use std::ffi::CStr;
use std::fmt;
use std::ptr;
use std::sync::Arc;

/// Which GGML code path a multiplication took.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KernelPath {
    /// GGML buffer type holding the weights: `CPU_REPACK` when GGML
    /// interleaved them for its GEMM/GEMV micro-kernels (what llama.cpp does
    /// at load time whenever the CPU backend offers it), `CPU` otherwise.
    pub weight_buffer: String,
    /// Type activations are converted to before the dot products (`q8_0`,
    /// `q8_K`, `f16`, ...), GGML's `vec_dot_type` of the weight type.
    pub activation_type: String,
}

impl fmt::Display for KernelPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}+act:{}", self.weight_buffer, self.activation_type)
    }
}

/// A ready-to-run `out = W x` for a fixed weight matrix and batch size, with
/// its own CPU backend, thread pool and buffers, so repeated `compute` calls
/// time only the kernel (thread creation and allocation happen once, as in
/// llama.cpp's decode loop).
pub struct MatMul {
    backend: sys::ggml_backend_t,
    threadpool: *mut sys::ggml_threadpool,
    weight_ctx: *mut sys::ggml_context,
    weight_buffer: sys::ggml_backend_buffer_t,
    compute_ctx: *mut sys::ggml_context,
    allocator: sys::ggml_gallocr_t,
    graph: *mut sys::ggml_cgraph,
    activations: *mut sys::ggml_tensor,
    output: *mut sys::ggml_tensor,
    weight_tensor: *mut sys::ggml_tensor,
    /// The file mapping a `CPU_Mapped` weight buffer points into; dropped
    /// after the buffer (field order).
    mapping: Option<Arc<FileMapping>>,
    rows: usize,
    cols: usize,
    tokens: usize,
    path: KernelPath,
}

// SAFETY: every pointer is owned exclusively by this value and GGML keeps no
// thread-affine state in them; moving the whole bundle to another thread is
// fine (it is not Sync: `compute` needs `&mut self`).
unsafe impl Send for MatMul {}

impl MatMul {
    /// Prepares `W (rows x cols) * X (tokens x cols)^T` with `threads` GGML
    /// worker threads. With `repack`, weights go to the CPU backend's
    /// repacking buffer type if it supports this type and shape on this CPU,
    /// as llama.cpp decides at model load; otherwise a mapped matrix is read
    /// in place (llama.cpp's `CPU_Mapped` buffer) and a heap one is copied
    /// into a CPU buffer (llama.cpp with `--no-mmap`).
    pub fn new(
        weights: &StagedMatrix,
        tokens: usize,
        threads: usize,
        repack: bool,
    ) -> Result<Self, KernelError> {
        let mut mm = MatMul {
            backend: ptr::null_mut(),
            threadpool: ptr::null_mut(),
            weight_ctx: ptr::null_mut(),
            weight_buffer: ptr::null_mut(),
            compute_ctx: ptr::null_mut(),
            allocator: ptr::null_mut(),
            graph: ptr::null_mut(),
            activations: ptr::null_mut(),
            output: ptr::null_mut(),
            weight_tensor: ptr::null_mut(),
            mapping: None,
            rows: weights.rows(),
            cols: weights.cols(),
            tokens,
            path: KernelPath {
                weight_buffer: String::new(),
                activation_type: vec_dot_type(weights.ty()),
            },
        };
        // SAFETY: each GGML object is checked for NULL right after creation
        // and stored in `mm`, whose Drop frees whatever was created, in
        // reverse order, on every early return.
        crate::amx::keep_ggml_off_amx();
        unsafe {
            mm.backend = sys::ggml_backend_cpu_init();
            if mm.backend.is_null() {
                return Err(ggml_err("ggml_backend_cpu_init returned NULL"));
            }
            let mut tp_params = sys::ggml_threadpool_params_default(threads as i32);
            mm.threadpool = sys::ggml_threadpool_new(&mut tp_params);
            if mm.threadpool.is_null() {
                return Err(ggml_err("ggml_threadpool_new returned NULL"));
            }
            sys::ggml_backend_cpu_set_n_threads(mm.backend, threads as i32);
            sys::ggml_backend_cpu_set_threadpool(mm.backend, mm.threadpool);

            mm.weight_ctx = sys::ggml_init(sys::ggml_init_params {
                mem_size: sys::ggml_tensor_overhead() * 2,
                mem_buffer: ptr::null_mut(),
                no_alloc: true,
            });
            if mm.weight_ctx.is_null() {
                return Err(ggml_err("ggml_init (weights) returned NULL"));
            }
            let w = sys::ggml_new_tensor_2d(
                mm.weight_ctx,
                crate::ffi::raw_type(weights.ty()),
                mm.cols as i64,
                mm.rows as i64,
            );

            // The graph lives in a no-alloc context; gallocr places the
            // activations and the output in a plain CPU buffer.
            let graph_overhead = sys::ggml_graph_overhead();
            mm.compute_ctx = sys::ggml_init(sys::ggml_init_params {
                mem_size: sys::ggml_tensor_overhead() * 4 + graph_overhead,
                mem_buffer: ptr::null_mut(),
                no_alloc: true,
            });
            if mm.compute_ctx.is_null() {
                return Err(ggml_err("ggml_init (graph) returned NULL"));
            }
            mm.activations = sys::ggml_new_tensor_2d(
                mm.compute_ctx,
                sys::GGML_TYPE_F32,
                mm.cols as i64,
                tokens as i64,
            );
            sys::ggml_set_input(mm.activations);
            mm.output = sys::ggml_mul_mat(mm.compute_ctx, w, mm.activations);
            sys::ggml_set_output(mm.output);

            mm.weight_tensor = w;
            mm.place_weights(w, weights, repack)?;

            mm.graph = sys::ggml_new_graph(mm.compute_ctx);
            sys::ggml_build_forward_expand(mm.graph, mm.output);
            mm.allocator =
                sys::ggml_gallocr_new(sys::ggml_backend_get_default_buffer_type(mm.backend));
            if mm.allocator.is_null() || !sys::ggml_gallocr_alloc_graph(mm.allocator, mm.graph) {
                return Err(ggml_err("could not allocate the compute graph"));
            }
        }
        Ok(mm)
    }

    /// Places the weight tensor: in the repacking buffer type when asked
    /// and supported for this op, else in place in the file mapping, else in
    /// a plain CPU buffer; copies the weights in where they are not in place.
    unsafe fn place_weights(
        &mut self,
        w: *mut sys::ggml_tensor,
        weights: &StagedMatrix,
        repack: bool,
    ) -> Result<(), KernelError> {
        let device = sys::ggml_backend_get_device(self.backend);
        if repack {
            for buft in extra_buffer_types(device) {
                let buffer = sys::ggml_backend_alloc_ctx_tensors_from_buft(self.weight_ctx, buft);
                if buffer.is_null() {
                    continue;
                }
                if sys::ggml_backend_dev_supports_op(device, self.output) {
                    self.weight_buffer = buffer;
                    break;
                }
                // Detach before freeing so the tensor can be placed again.
                sys::ggml_backend_buffer_free(buffer);
                (*w).buffer = ptr::null_mut();
                (*w).data = ptr::null_mut();
            }
        }
        let in_place = match weights.mapping() {
            Some(mapping) if self.weight_buffer.is_null() => Some(mapping),
            _ => None,
        };
        if let Some(mapping) = in_place {
            let buffer = sys::ggml_backend_cpu_buffer_from_ptr(mapping.address(), weights.bytes());
            if buffer.is_null() {
                return Err(ggml_err("ggml_backend_cpu_buffer_from_ptr returned NULL"));
            }
            self.weight_buffer = buffer;
            if sys::ggml_backend_tensor_alloc(buffer, w, mapping.address())
                != sys::GGML_STATUS_SUCCESS
            {
                return Err(ggml_err("could not place the weights in their mapping"));
            }
            self.mapping = Some(mapping);
        } else {
            if self.weight_buffer.is_null() {
                self.weight_buffer = sys::ggml_backend_alloc_ctx_tensors_from_buft(
                    self.weight_ctx,
                    sys::ggml_backend_get_default_buffer_type(self.backend),
                );
                if self.weight_buffer.is_null() {
                    return Err(ggml_err(&format!(
                        "could not allocate {}x{} weights",
                        self.rows, self.cols
                    )));
                }
            }
            sys::ggml_backend_tensor_set(w, weights.raw().as_ptr().cast(), 0, weights.bytes());
        }
        let name = CStr::from_ptr(sys::ggml_backend_buffer_name(self.weight_buffer));
        self.path.weight_buffer = name.to_string_lossy().into_owned();
        Ok(())
    }

    /// Copies `tokens x cols` row-major activations into the graph input.
    pub fn set_activations(&mut self, values: &[f32]) -> Result<(), KernelError> {
        let expected = self.tokens * self.cols;
        if values.len() != expected {
            return Err(KernelError::WrongLength {
                expected,
                got: values.len(),
            });
        }
        // SAFETY: the tensor was allocated by gallocr with exactly
        // tokens*cols f32 elements, checked above.
        unsafe {
            sys::ggml_backend_tensor_set(
                self.activations,
                values.as_ptr().cast(),
                0,
                std::mem::size_of_val(values),
            )
        };
        Ok(())
    }

    /// Runs the multiplication once.
    pub fn compute(&mut self) -> Result<(), KernelError> {
        // SAFETY: backend and graph were fully built in `new`.
        let status = unsafe { sys::ggml_backend_graph_compute(self.backend, self.graph) };
        if status != sys::GGML_STATUS_SUCCESS {
            return Err(ggml_err(&format!(
                "graph compute failed with status {status}"
            )));
        }
        Ok(())
    }

    /// The result, `tokens x rows` row-major (one output row per token).
    pub fn output(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.tokens * self.rows];
        // SAFETY: the output tensor holds exactly rows*tokens f32 values.
        unsafe {
            sys::ggml_backend_tensor_get(
                self.output,
                out.as_mut_ptr().cast(),
                0,
                std::mem::size_of_val(out.as_slice()),
            )
        };
        out
    }

    /// Where the weights sit, for the row: `mmap` (read in place from a
    /// mapped file), `heap` (copied into an anonymous CPU buffer) or
    /// `repack` (one of the CPU backend's extra buffer types), then the pages backing
    /// them, e.g. `mmap/4k` or `heap/4k+thp60%`.
    pub fn placement(&self) -> String {
        let how = if self.mapping.is_some() {
            "mmap"
        } else if self.path.weight_buffer == "CPU" {
            "heap"
        } else {
            "repack"
        };
        // SAFETY: the tensor and its buffer live as long as `self`.
        let address = unsafe { (*self.weight_tensor).data as usize };
        match PageState::of_address(address) {
            Some(pages) => format!("{how}/{pages}"),
            None => format!("{how}/?"),
        }
    }

    pub fn path(&self) -> &KernelPath {
        &self.path
    }
}

impl Drop for MatMul {
    fn drop(&mut self) {
        // SAFETY: each pointer is either NULL or owned by this value alone;
        // freed in reverse order of creation.
        unsafe {
            if !self.allocator.is_null() {
                sys::ggml_gallocr_free(self.allocator);
            }
            if !self.compute_ctx.is_null() {
                sys::ggml_free(self.compute_ctx);
            }
            if !self.weight_buffer.is_null() {
                sys::ggml_backend_buffer_free(self.weight_buffer);
            }
            if !self.weight_ctx.is_null() {
                sys::ggml_free(self.weight_ctx);
            }
            if !self.backend.is_null() {
                sys::ggml_backend_free(self.backend);
            }
            if !self.threadpool.is_null() {
                sys::ggml_threadpool_free(self.threadpool);
            }
        }
    }
}

/// The CPU device's extra buffer types (repacking, AMX, KleidiAI, ...), in
/// the order llama.cpp tries them.
unsafe fn extra_buffer_types(
    device: sys::ggml_backend_dev_t,
) -> Vec<sys::ggml_backend_buffer_type_t> {
    let reg = sys::ggml_backend_dev_backend_reg(device);
    let proc_name = c"ggml_backend_dev_get_extra_bufts";
    let address = sys::ggml_backend_reg_get_proc_address(reg, proc_name.as_ptr());
    if address.is_null() {
        return Vec::new();
    }
    // SAFETY: GGML documents this proc address as having the
    // `ggml_backend_dev_get_extra_bufts_t` signature.
    let get_extra: unsafe extern "C" fn(
        sys::ggml_backend_dev_t,
    ) -> *mut sys::ggml_backend_buffer_type_t = std::mem::transmute(address);
    let mut list = Vec::new();
    let mut cursor = get_extra(device);
    while !cursor.is_null() && !(*cursor).is_null() {
        list.push(*cursor);
        cursor = cursor.add(1);
    }
    list
}

fn ggml_err(msg: &str) -> KernelError {
    KernelError::Ggml(msg.to_string())
}
