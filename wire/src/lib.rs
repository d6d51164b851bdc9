//! What crosses the wire between quantbench's host and its on-board agent,
//! and nothing else: the job specs the host sends (`kernel_job`,
//! `model_job`, with the settings a model test runs under in
//! `model_settings` and the multiple-choice task files it names in
//! `choice_tasks`), what one agent process says to another (`child`), the
//! rows the agent returns and their CSV schema (`rows`,
//! written and read by `files`), the progress events it streams
//! (`progress`), the board description (`probe`), the board's power sources' readings and the energy figures derived from them (`power`), the agent's build
//! identity (`build_id`), the GGUF header check run before GGML reads a
//! file (`gguf`), the unquantized model's reference on the evaluation
//! text the host computes for boards (`reference`), GGML's type table (`ggml_type`) and the formats a
//! kernel cell measures (`weight_format`), the statistics
//! both sides compute from raw samples (`stats`) and the synthetic models'
//! architectures and tensor plans both sides size and write (`synthetic`). It links no GGML, no SSH,
//! no plotting: the agent and the host library both depend on it.

pub mod build_id;
pub mod child;
pub mod choice_tasks;
pub mod files;
#[cfg(feature = "fuzzing")]
pub mod fuzzing;
pub mod ggml_type;
pub mod gguf;
pub mod kernel_job;
pub mod model_job;
pub mod model_settings;
pub mod power;
pub mod probe;
pub mod progress;
pub mod reference;
pub mod rows;
pub mod stats;
pub mod synthetic;
pub mod weight_format;

/// Current UTC time as RFC 3339 with second precision (`2026-11-22T17:00:00Z`).
pub fn utc_now_rfc3339() -> String {
    chrono::Utc::now().format("%Y-%m-%dT%H:%M:%SZ").to_string()
}

/// Current UTC time as RFC 3339 with milliseconds, for spans that must be
/// compared with each other (board and job start and end times).
pub fn utc_now_rfc3339_millis() -> String {
    chrono::Utc::now()
        .format("%Y-%m-%dT%H:%M:%S%.3fZ")
        .to_string()
}
