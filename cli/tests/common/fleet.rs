//! The emulated Pi 5 fleet as the end-to-end tests drive it: the testbed
//! brought up once per test binary, board configs derived from its boards,
//! the real CLI run against them.

use super::text;
use harness::builds::build::{build_board_agent, workspace_root, BoardProfile, Builder};
use harness::fleet::testbed::{board_link, namespace};
use std::path::Path;
use std::process::{Command, Output};
use std::sync::{Mutex, OnceLock};
use wire::files::read_csv;
use wire::rows::{CellStatus, KernelRow};

/// A matrix that takes seconds under qemu.
pub const MICRO: &str = r#"
[matrices.micro]
types = ["F32", "Q4_0", "Q4_K"]
shapes = ["gemma3-1b.attn_kv"]
batches = [1]
threads = [1]
warmup = 1
min_reps = 2
min_time_ms = 1
max_time_ms = 200

# Long enough to kill the agent in the middle.
[matrices.slow]
types = ["F32", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"]
shapes = ["llama3.2-1b.attn_kv"]
batches = [1]
threads = [1]
warmup = 1
min_reps = 2
min_time_ms = 1500
max_time_ms = 3000
"#;

/// The testbed is shared by every test here; bring it up once.
pub fn testbed() -> &'static Mutex<()> {
    static TESTBED: OnceLock<Mutex<()>> = OnceLock::new();
    TESTBED.get_or_init(|| {
        let out = Command::new(env!("CARGO_BIN_EXE_quantbench"))
            .args(["testbed", "up", "--boards", "2"])
            .output()
            .expect("xtask runs");
        assert!(
            out.status.success(),
            "testbed up failed (these tests need root):\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        // Build the Pi 5 agent once here, so no test's deadline includes a
        // first cross-build of llama.cpp (minutes on 2 cores).
        build_board_agent(
            &workspace_root(),
            BoardProfile::Pi5,
            Builder::Cargo,
            &harness::builds::llama_source::vendored(&workspace_root())
                .expect("the pinned llama.cpp"),
        )
        .expect("the pi5 agent builds");
        Mutex::new(())
    })
}

pub fn sim_board(index: usize) -> toml::Value {
    let text = std::fs::read_to_string(workspace_root().join(".testbed/boards.toml")).unwrap();
    let file: toml::Value = toml::from_str(&text).unwrap();
    file["boards"][format!("sim{index}")].clone()
}

/// Changes a copy of sim1's board config into a test board.
pub type BoardTweak<'a> = &'a dyn Fn(&mut toml::value::Table);

/// A bench.toml with the micro matrices and extra boards derived from sim1.
pub fn config_dir(extra_boards: &[(&str, BoardTweak)]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let mut text = MICRO.to_string();
    for (name, tweak) in extra_boards {
        let mut board = sim_board(1).as_table().unwrap().clone();
        tweak(&mut board);
        let mut wrapper = toml::value::Table::new();
        let mut boards = toml::value::Table::new();
        boards.insert(name.to_string(), toml::Value::Table(board));
        wrapper.insert("boards".into(), toml::Value::Table(boards));
        text.push_str(&toml::to_string(&wrapper).unwrap());
    }
    std::fs::write(dir.path().join("bench.toml"), text).unwrap();
    dir
}

pub fn bench(dir: &Path, target: &str, matrix: &str) -> Output {
    Command::new(env!("CARGO_BIN_EXE_quantbench"))
        .current_dir(dir)
        .args(["bench", "--target", target, "--matrix", matrix])
        .output()
        .expect("xtask runs")
}

/// Starts `bench --matrix slow` on sim2 and returns once this run has
/// written `rows` rows on the board (older runs' files do not count).
// The child is handed to the caller, which waits for it (clippy does not
// follow a child returned inside a tuple).
#[allow(clippy::zombie_processes)]
pub fn start_slow_run_on_sim2(dir: &Path, rows: usize) -> (std::process::Child, String) {
    let work = sim_board(2)["work_dir"].as_str().unwrap().to_string();
    let child = start_slow_run(dir, "sim2", &work, rows);
    (child, work)
}

/// Starts `bench --matrix slow` on `target`, whose work dir is `work`, and
/// returns once this run has written `rows` rows on the board.
#[allow(clippy::zombie_processes)]
pub fn start_slow_run(dir: &Path, target: &str, work: &str, rows: usize) -> std::process::Child {
    let runs_before: Vec<_> = std::fs::read_dir(format!("{work}/runs"))
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    let mut child = Command::new(env!("CARGO_BIN_EXE_quantbench"))
        .current_dir(dir)
        .args(["bench", "--target", target, "--matrix", "slow"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(300);
    loop {
        if std::time::Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the agent never finished {rows} cells");
        }
        let this_run = std::fs::read_dir(format!("{work}/runs"))
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .find(|p| !runs_before.contains(p));
        let lines = this_run
            .and_then(|run| std::fs::read_to_string(run.join("kernels.csv")).ok())
            .map(|t| t.lines().count())
            .unwrap_or(0);
        if lines > rows {
            return child;
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}

/// `bench --resume latest` in `dir`.
pub fn resume(dir: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_quantbench"))
        .current_dir(dir)
        .args(["bench", "--resume", "latest"])
        .output()
        .expect("xtask runs")
}

/// Every cell of the slow matrix exactly once, each measured; and each
/// cell's repetitions come from one measurement (numbered 0.. once).
pub fn assert_every_slow_cell_once(run_dir: &Path) -> Vec<KernelRow> {
    let rows: Vec<KernelRow> = read_csv(&run_dir.join("kernels.csv")).unwrap();
    let mut ids: Vec<&str> = rows.iter().map(|r| r.cell_id.as_str()).collect();
    ids.sort();
    ids.dedup();
    assert_eq!((rows.len(), ids.len()), (6, 6), "{rows:?}");
    assert!(rows.iter().all(|r| r.status == CellStatus::Ok), "{rows:?}");
    let samples: Vec<wire::rows::SampleRow> = read_csv(&run_dir.join("samples.csv")).unwrap();
    for row in &rows {
        let mut reps: Vec<u32> = samples
            .iter()
            .filter(|s| s.cell_id == row.cell_id)
            .map(|s| s.repetition)
            .collect();
        reps.sort();
        assert_eq!(
            reps,
            (0..reps.len() as u32).collect::<Vec<_>>(),
            "{}: repetitions of one measurement",
            row.cell_id
        );
        assert_eq!(reps.len(), row.repetitions as usize, "{}", row.cell_id);
    }
    rows
}

/// Runs `ip netns exec <board's namespace> <args>`, which must succeed.
pub fn in_namespace(board: usize, args: &[&str]) -> String {
    let out = Command::new("ip")
        .args(["netns", "exec", &namespace(board)])
        .args(args)
        .output()
        .unwrap();
    assert!(out.status.success(), "{args:?}: {}", text(&out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Puts the board's cable back even when an assertion fails.
pub struct LinkDown(pub usize);
impl Drop for LinkDown {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "exec", &namespace(self.0), "ip", "link", "set"])
            .args(["dev", &board_link(self.0), "up"])
            .status();
    }
}
