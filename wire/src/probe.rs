//! What a board is: the agent's `probe` output, stored with every run.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BoardProbe {
    /// `aarch64`, `x86_64`, ...
    pub arch: String,
    pub cpu_model: String,
    /// Features that decide which GGML kernels can run, from HWCAP or
    /// /proc/cpuinfo (`dotprod`, `fp16`, `i8mm`, `sve`, `avx2`, ...).
    pub cpu_features: Vec<String>,
    /// Features GGML was compiled with and detected at run time.
    pub ggml_features: Vec<String>,
    pub cores: usize,
    pub memory_bytes: u64,
    pub page_size: u64,
    pub os: String,
    pub kernel: String,
    pub cpufreq_governor: Option<String>,
    pub cpu_freq_mhz: Option<f64>,
    pub cpu_max_freq_mhz: Option<f64>,
    pub temperature_c: Option<f64>,
    /// Read bandwidth with all cores, best of several sweeps over a buffer
    /// far larger than the caches (GB/s, 1e9 bytes). Absent from a quick probe.
    pub read_bandwidth_gbps: Option<f64>,
    /// SHA-256 prefix of the agent binary.
    pub agent_build: String,
}

/// Readings taken before and after each cell (thermal throttling shows here).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct ThermalReading {
    pub temperature_c: Option<f64>,
    pub freq_mhz: Option<f64>,
}
