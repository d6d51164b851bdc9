//! Builds: what an agent is made from, and making it.
//!
//! A build is this repository at a commit (`quantbench_revision`: the
//! working tree by default) with a llama.cpp source (`llama_source`: the
//! vendored one, another `llama-cpp-sys-2` version, a checkout at a
//! revision, patches, CMake options, and the header check that refuses a
//! source our FFI cannot use). `source_tree` puts those trees on disk and
//! hashes them; `build` compiles the agent for the host or a board
//! profile, content-addressed and reused by key.

pub mod build;
pub mod cycles;
pub mod llama_source;
pub mod quantbench_revision;
pub mod source_tree;
