#!/usr/bin/env bash
# Time to first result of the README's main command, `cargo xtask bench`,
# from a fresh clone on a machine made as bare as it can be without
# Docker: every apt package quantbench's set-up installs is purged (with
# what was installed only for them, and apt's download cache), the
# aarch64 Rust target removed, and cargo gets an empty CARGO_HOME (so
# every crate is downloaded again) and the clone an empty target folder.
# The Rust toolchain itself (rustup's) is kept: it is what a newcomer has.
#
# DESTRUCTIVE to this machine's packages (the run installs them again):
# run it as root on a throwaway machine, on a quiet machine (it times).
#
#   scripts/first-run-on-a-bare-machine.sh --yes-purge-packages [revision]
#
# Prints every output line with the seconds since the start, then the time
# at which each step began; the whole log is kept in the work folder named
# at the end.
set -euo pipefail
if [ "${1:-}" != --yes-purge-packages ]; then
  echo "usage: $0 --yes-purge-packages [revision]  (purges this machine's build packages; read the script first)" >&2
  exit 2
fi
revision=${2:-HEAD}
repo=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d /tmp/quantbench-bare.XXXXXX)

# What `cargo xtask setup` installs (bootstrap's requirement table), the
# libraries the CLI links, and the browser the tests use.
packages="cmake g++ libclang-dev patch gcc-aarch64-linux-gnu g++-aarch64-linux-gnu
  binutils-aarch64-linux-gnu qemu-user openssh-server nftables chromium
  pkg-config libssl-dev libsqlite3-dev zlib1g-dev"
installed=$(for p in $packages; do dpkg-query -W -f='${Status} ${Package}\n' "$p" 2>/dev/null | awk '/ installed/{print $4}' || true; done)
# An emulated board of an earlier run holds the namespace names.
(cd "$repo" && [ -x target/release/quantbench ] && target/release/quantbench testbed down) >/dev/null 2>&1 || true
ip netns list 2>/dev/null | awk '/^qbtb-/{print $1}' | xargs -r -n1 ip netns delete || true
if [ -n "$installed" ]; then
  echo "purging: $(echo $installed)"
  DEBIAN_FRONTEND=noninteractive apt-get purge -y -qq --autoremove $installed >/dev/null
fi
apt-get clean
rustup target remove aarch64-unknown-linux-gnu >/dev/null 2>&1 || true

git clone -q "$repo" "$work/quantbench"
git -C "$work/quantbench" checkout -q "$revision"
export CARGO_HOME="$work/cargo-home"
mkdir -p "$CARGO_HOME"
echo "timing \`cargo xtask bench\` at $(git -C "$work/quantbench" rev-parse --short HEAD) in $work/quantbench (CARGO_HOME $CARGO_HOME), $(nproc) cores"

cd "$work/quantbench"
set +e
python3 - "$work/first-run.log" <<'PY'
import subprocess, sys, time
log = open(sys.argv[1], "w")
start = time.monotonic()
p = subprocess.Popen(["cargo", "xtask", "bench"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
for raw in iter(p.stdout.readline, b""):
    line = f"{time.monotonic() - start:7.1f}  {raw.decode(errors='replace').rstrip()}"
    print(line, flush=True)
    log.write(line + "\n")
rc = p.wait()
log.write(f"{time.monotonic() - start:7.1f}  exit {rc}\n")
sys.exit(rc)
PY
status=$?
set -e
target/release/quantbench testbed down >/dev/null 2>&1 || target/release/xtask testbed down >/dev/null 2>&1 || true

echo
echo "steps (seconds from the start):"
# The first line of each step as the CLI (or, before it, cargo) prints it.
awk '
  /Compiling|Downloaded|Updating/ && !c { print "  " $1 "  cargo: first crate"; c=1 }
  /\[[0-9]+\/[0-9]+\]/ { print "  " $0; next }
  /setup: / && !s[$3]++ { print "  " $0 }
  /Running `/ && !r { print "  " $1 "  cargo: the launcher starts"; r=1 }
  /xtask: compiling/ && !x { print "  " $0; x=1 }
  /: done in / { print "  " $0 }
  /agent for .* built/ { print "  " $0 }
  /^ *[0-9.]+  (board |results:)/ { print "  " $0 }
  / exit / { print "  " $0 }
' "$work/first-run.log"
echo "log: $work/first-run.log"
exit $status
