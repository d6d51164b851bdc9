//! quantbench's host-side library: everything between `bench.toml` and
//! the plots, for every kind of job, along one pipeline. Its folders are
//! the stages, each importing only the ones listed before it:
//!
//! - `builds`: what an agent is made from (this repository at a commit, a
//!   llama.cpp source) and building it, cached by content;
//! - `fleet`: reaching boards (targets, SSH and host keys, file mirroring,
//!   board locks and storage, labgrid, emulated boards);
//! - `runs`: config -> jobs -> session -> every board at once -> run.json;
//! - `results`: run directories read back, rendered, compared, indexed,
//!   published and pruned.
//!
//! On top, `pipeline` runs the stages in order and `bisect` runs A/B
//! sessions over a range of commits; beneath everything, `shell` (quoting).
//! A fresh machine's packages and paths are the `bootstrap` crate, which
//! the launcher (`cargo xtask`) uses before this library is compiled.
//!
//! What crosses the wire to the agent (job specs, rows, progress, probe)
//! is the `wire` crate; GGML is `kernels`, linked only into the agent, so
//! the CLI compiles without cmake or a C++ compiler (it links the system's
//! OpenSSL and SQLite, which the launcher installs first).

pub mod bisect;
pub mod builds;
pub mod fleet;
pub mod pipeline;
pub mod results;
pub mod runs;
pub mod shell;
