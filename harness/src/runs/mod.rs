//! The run: from `bench.toml` to rows on disk, the same stages for every
//! kind of job.
//!
//! `config` (bench.toml; `catalog` for shapes, `recipes` for model recipes
//! and their cache, `synthetic` for models made on the host) -> `jobs` (the
//! job kinds, `kernel` and `model`; `matrix` expands a kernel matrix) ->
//! `session` (target, boards, set-up, agent builds, run id; `budget` fits
//! `--budget`) -> `run` (every board at once: `deploy` is the SSH runner,
//! `farm` the labgrid one) -> `manifest` (run.json). `run_owner` keeps one
//! host process per run directory; `steps` numbers the stages for whoever
//! watches.

pub mod budget;
pub mod catalog;
pub mod config;
pub mod deploy;
pub mod farm;
pub mod jobs;
pub mod manifest;
pub mod matrix;
pub mod recipes;
pub mod run;
pub mod run_owner;
pub mod session;
pub mod steps;
pub mod synthetic;
