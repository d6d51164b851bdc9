//! quantbench's host-side library. It owns the data flow from a config to
//! plots: `config` (bench.toml) -> `matrix` (cells, job spec) -> `build`
//! (the agent binary) -> `run` (drives an agent, collects rows) -> `results`
//! (CSV and JSON files) -> `stats` -> `plot` and `summary`. It also defines
//! the wire types the on-board agent shares (`matrix::JobSpec`,
//! `results::KernelRow`, `probe::BoardProbe`, `progress::ProgressEvent`).
//! It does not link GGML (so `cargo xtask` builds on a machine without a C
//! toolchain and can install one): GGML is `kernels`, run inside the agent.

#[cfg(feature = "remote")]
pub mod bench;
pub mod boards;
pub mod build;
pub mod config;
#[cfg(feature = "remote")]
pub mod deploy;
pub mod ggml_type;
pub mod matrix;
#[cfg(feature = "remote")]
pub mod model_bench;
pub mod models;
#[cfg(feature = "plot")]
pub mod plot;
pub mod probe;
pub mod progress;
pub mod results;
pub mod run;
pub mod setup;
pub mod shell;
pub mod stats;
pub mod summary;
#[cfg(feature = "remote")]
pub mod testbed;
#[cfg(feature = "remote")]
pub mod transport;

/// Current UTC time as RFC 3339 with second precision (`2026-11-22T17:00:00Z`).
pub fn utc_now_rfc3339() -> String {
    chrono::Utc::now().format("%Y-%m-%dT%H:%M:%SZ").to_string()
}
