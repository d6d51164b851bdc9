//! Results: what runs left on disk, read back, judged and shown.
//!
//! `run_dir` reads a run directory (or one build's side of an A/B run);
//! `render` writes its summary and plots; `compare` judges two runs (or two
//! builds of one run) cell by cell at the invocation level; `noise` keeps a
//! board's false-alarm table and per-cell noise floors from same-build
//! pairs; `persistence` tells a suspect from a confirmed regression;
//! `history` indexes every run; `report` builds the site; `import` brings
//! stock llama-bench results in beside ours; `retention` decides which runs
//! and cached recipes `prune` may remove.

pub mod compare;
pub mod history;
pub mod import;
pub mod noise;
pub mod persistence;
pub mod render;
pub mod report;
pub mod retention;
pub mod run_dir;
