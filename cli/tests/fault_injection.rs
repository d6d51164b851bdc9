//! Faults injected into real runs on the emulated fleet: the board's cable
//! pulled for 20 s, its sshd killed and restarted, 5% of its packets
//! dropped, 200 ms added each way, its work dir's filesystem filling up.
//! Each test asserts what quantbench does and that no finished row is lost:
//! the rows on the host are the cells the agent finished on the board.
//! (The agent SIGKILLed, the host SIGKILLed and resumed, host keys, two runs
//! on one board and a board that never answers are in `remote_fleet.rs`.)
//! Needs root (the testbed); `cargo xtask test` runs as root in CI.

mod common;
use common::fleet::*;
use common::{only_run_dir, text};

use harness::builds::build::workspace_root;
use harness::fleet::testbed::{board_address, board_link, namespace};
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};
use wire::files::read_csv;
use wire::rows::{CellStatus, KernelRow};

/// The rows the agent finished, by the board's own copy of the run.
fn rows_on_board(work: &str, run_dir: &Path) -> Vec<KernelRow> {
    let run_id = run_dir.file_name().unwrap().to_string_lossy().into_owned();
    std::fs::read_dir(format!("{work}/runs"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with(&run_id)
        })
        .flat_map(|p| read_csv::<KernelRow>(&p.join("kernels.csv")).unwrap_or_default())
        .collect()
}

/// Every row the board finished is on the host, unchanged.
fn assert_no_finished_row_lost(work: &str, run_dir: &Path) -> Vec<KernelRow> {
    let host: Vec<KernelRow> = read_csv(&run_dir.join("kernels.csv")).unwrap();
    let board = rows_on_board(work, run_dir);
    assert!(!board.is_empty());
    for row in &board {
        assert!(host.contains(row), "lost: {row:?}");
    }
    host
}

#[test]
fn link_down_for_20_seconds_mid_run_loses_nothing() {
    let _guard = testbed().lock().unwrap_or_else(|e| e.into_inner());
    let dir = config_dir(&[]);
    let (child, work) = start_slow_run_on_sim2(dir.path(), 1);
    let link = board_link(2);
    in_namespace(2, &["ip", "link", "set", "dev", &link, "down"]);
    let unplugged = LinkDown(2);
    let peer = Command::new("ip")
        .args(["link", "show", "qbtb-s2"])
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&peer.stdout).contains("NO-CARRIER"),
        "the host's end sees the cable pulled"
    );
    std::thread::sleep(Duration::from_secs(20));
    drop(unplugged);
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let run_dir = only_run_dir(dir.path());
    assert_every_slow_cell_once(&run_dir);
    assert_no_finished_row_lost(&work, &run_dir);
}

#[test]
fn sshd_killed_and_restarted_mid_run_loses_nothing() {
    let _guard = testbed().lock().unwrap_or_else(|e| e.into_inner());
    let dir = config_dir(&[]);
    let (child, work) = start_slow_run_on_sim2(dir.path(), 1);
    // The listener and every session it forked: the board refuses
    // connections until sshd is back.
    let listener = std::fs::read_to_string(workspace_root().join(".testbed/sim2/sshd.pid"))
        .unwrap()
        .trim()
        .to_string();
    let _ = Command::new("pkill").args(["-P", &listener]).status();
    assert!(Command::new("kill")
        .arg(&listener)
        .status()
        .unwrap()
        .success());
    std::thread::sleep(Duration::from_secs(6));
    let up = Command::new(env!("CARGO_BIN_EXE_quantbench"))
        .args(["testbed", "up", "--boards", "2"])
        .output()
        .unwrap();
    assert!(up.status.success(), "{}", text(&up));
    let out = child.wait_with_output().unwrap();
    let all = text(&out);
    assert!(out.status.success(), "{all}");
    assert!(all.contains("reconnecting"), "{all}");
    let run_dir = only_run_dir(dir.path());
    assert_every_slow_cell_once(&run_dir);
    assert_no_finished_row_lost(&work, &run_dir);
}

/// Removes the loss table even when an assertion fails.
struct LossTable(usize);
impl Drop for LossTable {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "exec", &namespace(self.0)])
            .args(["nft", "delete", "table", "inet", "qbloss"])
            .status();
    }
}

#[test]
fn five_percent_packet_loss_for_a_whole_run_loses_nothing() {
    let _guard = testbed().lock().unwrap_or_else(|e| e.into_inner());
    let dir = config_dir(&[]);
    // Dropped on the board's input hook: a lossy link, not a refusing host
    // (an output-hook drop fails the sender's own calls with EPERM).
    in_namespace(2, &["nft", "add", "table", "inet", "qbloss"]);
    let _loss = LossTable(2);
    in_namespace(
        2,
        &[
            "nft",
            "add chain inet qbloss input { type filter hook input priority 0 ; }",
        ],
    );
    let rule = format!(
        "add rule inet qbloss input iifname {} numgen random mod 100 < 5 counter drop",
        board_link(2)
    );
    in_namespace(2, &["nft", &rule]);
    let out = bench(dir.path(), "sim2", "slow");
    assert!(out.status.success(), "{}", text(&out));
    let run_dir = only_run_dir(dir.path());
    assert_every_slow_cell_once(&run_dir);
    let work = sim_board(2)["work_dir"].as_str().unwrap().to_string();
    assert_no_finished_row_lost(&work, &run_dir);
    // The fault was real: the rule dropped packets of this run.
    let chain = in_namespace(2, &["nft", "list", "chain", "inet", "qbloss", "input"]);
    let dropped: u64 = chain
        .split("packets ")
        .nth(1)
        .and_then(|t| t.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    assert!(dropped > 0, "{chain}");
}

/// Forwards every connection to `target`, delivering each chunk `delay`
/// after it was read, in both directions: a slow link without netem.
/// Returns its port and the bytes it carried.
fn delaying_relay(target: String, delay: Duration) -> (u16, Arc<AtomicU64>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let carried = Arc::new(AtomicU64::new(0));
    let counter = carried.clone();
    std::thread::spawn(move || {
        for client in listener.incoming().flatten() {
            let Ok(board) = TcpStream::connect(&target) else {
                continue;
            };
            for (from, to) in [
                (client.try_clone(), board.try_clone()),
                (board.try_clone(), client.try_clone()),
            ] {
                if let (Ok(from), Ok(to)) = (from, to) {
                    pump(from, to, delay, counter.clone());
                }
            }
        }
    });
    (port, carried)
}

/// One direction of the relay: a reader that stamps chunks and a writer
/// that sends each when its delay is up (so the delay adds latency, not a
/// bandwidth cap).
fn pump(mut from: TcpStream, mut to: TcpStream, delay: Duration, carried: Arc<AtomicU64>) {
    let (send, receive) = mpsc::channel::<(Instant, Vec<u8>)>();
    std::thread::spawn(move || {
        let mut buffer = vec![0u8; 64 * 1024];
        while let Ok(n) = from.read(&mut buffer) {
            if n == 0
                || send
                    .send((Instant::now() + delay, buffer[..n].to_vec()))
                    .is_err()
            {
                break;
            }
        }
    });
    std::thread::spawn(move || {
        for (due, chunk) in receive {
            std::thread::sleep(due.saturating_duration_since(Instant::now()));
            if to.write_all(&chunk).is_err() {
                break;
            }
            carried.fetch_add(chunk.len() as u64, Ordering::Relaxed);
        }
        let _ = to.shutdown(Shutdown::Write);
    });
}

#[test]
fn a_link_with_200_ms_each_way_loses_nothing() {
    let _guard = testbed().lock().unwrap_or_else(|e| e.into_inner());
    let (port, carried) = delaying_relay(
        format!("{}:22", board_address(1)),
        Duration::from_millis(200),
    );
    // sim1's own host key, under the relay's address.
    let key = std::fs::read_to_string(workspace_root().join(".testbed/known_hosts"))
        .unwrap()
        .lines()
        .find(|l| l.starts_with(&format!("{} ", board_address(1))))
        .unwrap()
        .split_once(' ')
        .unwrap()
        .1
        .to_string();
    let keys = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(keys.path(), format!("[127.0.0.1]:{port} {key}\n")).unwrap();
    let known_hosts = keys.path().display().to_string();
    let dir = config_dir(&[("far", &|b| {
        b.insert("host".into(), "127.0.0.1".into());
        b.insert("port".into(), (port as i64).into());
        b.insert("known_hosts".into(), known_hosts.clone().into());
    })]);
    let started = Instant::now();
    let out = bench(dir.path(), "far", "micro");
    let all = text(&out);
    assert!(out.status.success(), "{all}");
    let rows: Vec<KernelRow> = read_csv(&only_run_dir(dir.path()).join("kernels.csv")).unwrap();
    assert_eq!(rows.len(), 3, "{rows:?}");
    // (Q4_K does not fit this shape: `unsupported`, as on any link.)
    assert!(
        rows.iter().all(|r| r.status != CellStatus::Failed),
        "{rows:?}"
    );
    let work = sim_board(1)["work_dir"].as_str().unwrap().to_string();
    assert_no_finished_row_lost(&work, &only_run_dir(dir.path()));
    assert!(
        carried.load(Ordering::Relaxed) > 10_000,
        "through the relay"
    );
    eprintln!(
        "micro matrix over a 400 ms round trip: {:.1} s",
        started.elapsed().as_secs_f64()
    );
}

/// The board's own view of its filesystem: `ip netns exec` gave its sshd a
/// mount namespace of its own, so a filesystem mounted for the board must
/// be mounted there, and the host reads it through the sshd's root.
struct BoardMount {
    sshd_pid: String,
    path: std::path::PathBuf,
}

impl BoardMount {
    fn tmpfs(board: usize, path: &Path, size: &str) -> BoardMount {
        let sshd_pid =
            std::fs::read_to_string(workspace_root().join(format!(".testbed/sim{board}/sshd.pid")))
                .unwrap()
                .trim()
                .to_string();
        let status = Command::new("nsenter")
            .args(["-t", &sshd_pid, "-m", "mount", "-t", "tmpfs", "-o"])
            .arg(format!("size={size}"))
            .arg("tmpfs")
            .arg(path)
            .status()
            .unwrap();
        assert!(status.success());
        BoardMount {
            sshd_pid,
            path: path.to_path_buf(),
        }
    }

    /// `path` on the board, as the host can read it.
    fn seen_from_host(&self, path: &Path) -> String {
        format!("/proc/{}/root{}", self.sshd_pid, path.display())
    }
}

impl Drop for BoardMount {
    fn drop(&mut self) {
        let _ = Command::new("nsenter")
            .args(["-t", &self.sshd_pid, "-m", "umount", "-l"])
            .arg(&self.path)
            .status();
    }
}

#[test]
fn a_work_dir_filling_up_mid_run_keeps_finished_rows_and_names_the_full_disk() {
    let _guard = testbed().lock().unwrap_or_else(|e| e.into_inner());
    let mount_point = tempfile::tempdir().unwrap();
    let mount = BoardMount::tmpfs(1, mount_point.path(), "48m");
    let board_work = mount_point.path().join("work").display().to_string();
    let work = mount.seen_from_host(&mount_point.path().join("work"));
    let dir = config_dir(&[("tiny", &|b| {
        b.insert("work_dir".into(), board_work.clone().into());
    })]);
    let child = start_slow_run(dir.path(), "tiny", &work, 2);
    // Fill the filesystem to the last byte while the agent measures.
    let _ = Command::new("dd")
        .args(["if=/dev/zero", "bs=1M"])
        .arg(format!(
            "of={}",
            mount.seen_from_host(&mount_point.path().join("filler"))
        ))
        .output();
    let out = child.wait_with_output().unwrap();
    let all = text(&out);
    assert!(!out.status.success(), "{all}");
    assert!(all.contains("disk is full"), "{all}");
    let run_dir = only_run_dir(dir.path());
    let rows = assert_no_finished_row_lost(&work, &run_dir);
    let mut ids: Vec<&str> = rows.iter().map(|r| r.cell_id.as_str()).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(
        (rows.len(), ids.len()),
        (6, 6),
        "one row per cell: {rows:?}"
    );
    assert!(
        rows.iter().filter(|r| r.status == CellStatus::Ok).count() >= 2,
        "{rows:?}"
    );
    assert!(
        rows.iter().any(|r| r.status == CellStatus::Failed),
        "{rows:?}"
    );

    // The next run on the full board is refused before it starts, with the
    // board, the path, the need and the free space in one line.
    let again = bench(dir.path(), "tiny", "micro");
    let all = text(&again);
    assert!(!again.status.success(), "{all}");
    assert!(
        all.contains("board tiny: disk full under") && all.contains("MB free; the job needs about"),
        "{all}"
    );
}
