//! Starting a child process of the agent (an invocation, another build's
//! agent) the way the board starts the agent itself: under the job's
//! `runner` when it has one. Under qemu-user a guest's `execve` of an
//! aarch64 binary goes to the host kernel, which cannot run it (no
//! binfmt_misc here): the child never started and the round hung until the
//! job's deadline.

use std::path::Path;
use std::process::Command;

/// `exe` as a command, prefixed with `runner` (e.g. `qemu-aarch64 -cpu
/// cortex-a76`) when there is one.
pub fn command(runner: &[String], exe: &Path) -> Command {
    match runner.split_first() {
        Some((program, args)) => {
            let mut command = Command::new(program);
            command.args(args).arg(exe);
            command
        }
        None => Command::new(exe),
    }
}
