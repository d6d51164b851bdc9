//! The fleet: reaching boards and keeping them safe to share.
//!
//! `boards` resolves `--target` into boards (config, groups, ssh config,
//! `user@host:port`, `labgrid:<place>`); `transport` is SSH, whose host keys
//! `known_hosts` checks; `mirror` follows a board's growing files into the
//! host's copies; `board_lock` lets one run at a time use a board and
//! `board_storage` prunes its work folders; `labgrid` talks to a labgrid
//! coordinator; `testbed` makes emulated boards on this machine. Nothing
//! here knows what a job is: the run (`runs`) drives these.

pub mod board_lock;
pub mod board_storage;
pub mod boards;
pub mod known_hosts;
pub mod labgrid;
pub mod mirror;
pub mod testbed;
pub mod transport;
