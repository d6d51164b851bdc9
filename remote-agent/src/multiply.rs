//! What a kernel cell times: one matrix multiplication with its weights in
//! place and its activations set, behind one trait whether GGML runs it
//! (its types) or quantbench's own kernels do (codebooks, table lookups),
//! so the timing loop, the error and the row are the same for every
//! format.

use kernels::codebook::{CodebookMatrix, QuantizedActivations};
use kernels::lut::{ActivationTables, LutMatrix};
use kernels::pool::WorkerPool;
use kernels::{KernelError, MatMul, StagedMatrix};

pub trait Multiply {
    fn compute(&mut self) -> Result<(), KernelError>;
    /// `tokens x rows`, row-major.
    fn output(&self) -> Vec<f32>;
    /// The kernel that ran, for the `kernel_path` column.
    fn kernel_path(&self) -> String;
    /// Where the weights were read from, for `weight_placement`.
    fn weight_placement(&self) -> String;
    /// Least time to warm up for, besides the policy's warm-up calls.
    fn warmup_time(&self) -> std::time::Duration {
        std::time::Duration::ZERO
    }
}

/// A cell's weights, quantized and placed once for every cell of the same
/// shape and format.
pub enum PreparedWeights {
    Ggml(StagedMatrix),
    Codebook(Box<CodebookMatrix>),
    Lut(Box<LutMatrix>),
}

impl PreparedWeights {
    pub fn bytes(&self) -> usize {
        match self {
            PreparedWeights::Ggml(staged) => staged.bytes(),
            PreparedWeights::Codebook(matrix) => matrix.storage_bytes(),
            PreparedWeights::Lut(matrix) => matrix.storage_bytes(),
        }
    }

    /// The exact storage cost where it depends on the data (the sparse
    /// part of a codebook), else `None` (the format's own figure holds).
    pub fn measured_bits_per_weight(&self) -> Option<f64> {
        match self {
            PreparedWeights::Ggml(_) | PreparedWeights::Lut(_) => None,
            PreparedWeights::Codebook(matrix) => Some(matrix.bits_per_weight()),
        }
    }

    /// The multiplication of these weights with `x` (`tokens` rows).
    pub fn multiply<'a>(
        &'a self,
        x: &[f32],
        tokens: usize,
        threads: usize,
        repack: bool,
    ) -> Result<Box<dyn Multiply + 'a>, KernelError> {
        Ok(match self {
            PreparedWeights::Ggml(staged) => {
                let mut matmul = MatMul::new(staged, tokens, threads, repack)?;
                matmul.set_activations(x)?;
                Box::new(GgmlMultiply(matmul))
            }
            PreparedWeights::Codebook(matrix) => {
                Box::new(OwnMultiply::new(matrix.as_ref(), x, tokens, threads))
            }
            PreparedWeights::Lut(matrix) => {
                Box::new(OwnMultiply::new(matrix.as_ref(), x, tokens, threads))
            }
        })
    }
}

struct GgmlMultiply(MatMul);

impl Multiply for GgmlMultiply {
    fn compute(&mut self) -> Result<(), KernelError> {
        self.0.compute()
    }
    fn output(&self) -> Vec<f32> {
        self.0.output()
    }
    fn kernel_path(&self) -> String {
        self.0.path().to_string()
    }
    fn weight_placement(&self) -> String {
        self.0.placement()
    }
}

/// One of quantbench's own formats, as the timing loop calls it.
trait OwnKernel: Sync {
    /// What a call fills before the GEMM (int8 activations, tables),
    /// kept from call to call as a decode loop keeps it.
    type Buffers: Default;
    fn rows(&self) -> usize;
    fn gemm(
        &self,
        x: &[f32],
        tokens: usize,
        y: &mut [f32],
        pool: &WorkerPool,
        buffers: &mut Self::Buffers,
    );
    fn kernel_path(&self) -> &'static str;
    /// An address inside the quantized weights, for their page state.
    fn weights_address(&self) -> usize;
}

impl OwnKernel for CodebookMatrix {
    type Buffers = QuantizedActivations;
    fn rows(&self) -> usize {
        self.rows
    }
    fn gemm(
        &self,
        x: &[f32],
        tokens: usize,
        y: &mut [f32],
        pool: &WorkerPool,
        buffers: &mut Self::Buffers,
    ) {
        self.gemm_reusing(x, tokens, y, pool, buffers)
    }
    fn kernel_path(&self) -> &'static str {
        CodebookMatrix::kernel_path(self)
    }
    fn weights_address(&self) -> usize {
        self.indices.as_ptr() as usize
    }
}

impl OwnKernel for LutMatrix {
    type Buffers = ActivationTables;
    fn rows(&self) -> usize {
        self.rows
    }
    fn gemm(
        &self,
        x: &[f32],
        tokens: usize,
        y: &mut [f32],
        pool: &WorkerPool,
        buffers: &mut Self::Buffers,
    ) {
        self.gemm_reusing(x, tokens, y, pool, buffers)
    }
    fn kernel_path(&self) -> &'static str {
        LutMatrix::kernel_path(self)
    }
    fn weights_address(&self) -> usize {
        self.codes_address()
    }
}

struct OwnMultiply<'a, M: OwnKernel> {
    matrix: &'a M,
    pool: WorkerPool,
    x: Vec<f32>,
    tokens: usize,
    y: Vec<f32>,
    buffers: M::Buffers,
}

impl<'a, M: OwnKernel> OwnMultiply<'a, M> {
    fn new(matrix: &'a M, x: &[f32], tokens: usize, threads: usize) -> Self {
        OwnMultiply {
            matrix,
            pool: WorkerPool::new(threads),
            x: x.to_vec(),
            tokens,
            y: vec![0.0; tokens * matrix.rows()],
            buffers: M::Buffers::default(),
        }
    }
}

impl<M: OwnKernel> Multiply for OwnMultiply<'_, M> {
    fn compute(&mut self) -> Result<(), KernelError> {
        self.matrix.gemm(
            &self.x,
            self.tokens,
            &mut self.y,
            &self.pool,
            &mut self.buffers,
        );
        Ok(())
    }
    fn output(&self) -> Vec<f32> {
        self.y.clone()
    }
    fn kernel_path(&self) -> String {
        self.matrix.kernel_path().to_string()
    }
    fn warmup_time(&self) -> std::time::Duration {
        // The pool's workers slept through the quantization; on a VM their
        // first wake-ups cost hundreds of microseconds each until
        // back-to-back calls keep them spinning.
        std::time::Duration::from_millis(50)
    }
    fn weight_placement(&self) -> String {
        // Quantized in the agent's own memory: no file, no GGML buffer.
        match kernels::PageState::of_address(self.matrix.weights_address()) {
            Some(pages) => format!("heap/{pages}"),
            None => "heap/?".to_string(),
        }
    }
}
