//! quantbench's host-side library: everything between `bench.toml` and
//! the plots, for every kind of job, along one pipeline:
//!
//! - `config` (bench.toml, with `catalog` for shapes, `recipes` for
//!   model recipe names and `synthetic` for models made on the host) -> `jobs` (job kinds: `kernel`, `model`; `matrix`
//!   expands a kernel matrix) -> `session` (target, boards, set-up, agent
//!   `build`s, each from a llama.cpp `llama_source`, run id; `budget` fits `--budget`) -> `run` (every board at once; `deploy` for boards
//!   over SSH via `transport`, whose host keys `known_hosts` checks; boards of a
//!   labgrid farm by `farm`, which takes places through `labgrid`; one run at a time per board by
//!   `board_lock`, work dirs pruned by `board_storage`) -> `manifest` (run.json) -> `render`
//!   (summary, plots);
//! - after a run: `run_dir` (a run directory read back, or one build's side
//!   of an A/B run), `compare` (two runs cell by cell, verdicts at the
//!   invocation level), `bisect` (A/B sessions over a llama.cpp checkout's
//!   commits), `persistence`
//!   (suspect or confirmed: a regression seen twice), `noise`
//!   (same-build pairs: a board's false-alarm table and per-cell noise
//!   floors), `history` (the index of every run), `report` (the site);
//! - around it: `boards` (targets), `setup` (a fresh machine), `testbed`
//!   (emulated boards), `shell` (quoting), `pipeline` (the stages in order).
//!
//! What crosses the wire to the agent (job specs, rows, progress, probe)
//! is the `wire` crate; GGML is `kernels`, linked only into the agent, so
//! `cargo xtask` builds on a machine without a C toolchain and can install
//! one.

pub mod bisect;
pub mod board_lock;
pub mod board_storage;
pub mod boards;
pub mod budget;
pub mod build;
pub mod catalog;
pub mod compare;
pub mod config;
pub mod deploy;
pub mod farm;
pub mod history;
pub mod import;
pub mod jobs;
pub mod known_hosts;
pub mod labgrid;
pub mod llama_source;
pub mod manifest;
pub mod matrix;
pub mod mirror;
pub mod noise;
pub mod persistence;
pub mod pipeline;
pub mod quantbench_revision;
pub mod recipes;
pub mod render;
pub mod report;
pub mod retention;
pub mod run;
pub mod run_dir;
pub mod run_owner;
pub mod session;
pub mod setup;
pub mod shell;
pub mod source_tree;
pub mod synthetic;
pub mod testbed;
pub mod transport;
