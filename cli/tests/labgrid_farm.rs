//! Boards handed out by a real labgrid (the PyPI release set-up installs):
//! a coordinator on loopback, an exporter whose NetworkServices point at
//! the emulated boards, places for them; quantbench takes the places,
//! measures, and gives them back, also when another user holds one, when
//! a board needs a power cycle, and when the host is interrupted.
//! Needs root (the testbed); `cargo xtask test` runs as root in CI.

mod common;
use common::fleet::*;
use common::{only_run_dir, text};

use harness::fleet::testbed::{board_address, board_link};
use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use wire::files::read_csv;
use wire::rows::{CellStatus, KernelRow};

fn venv_bin(program: &str) -> PathBuf {
    let venv = harness::builds::build::workspace_root().join(bootstrap::LABGRID_VENV_DIR);
    let in_venv = venv.join("bin").join(program);
    if in_venv.is_file() {
        in_venv
    } else {
        PathBuf::from(program)
    }
}

/// A coordinator and an exporter of this test's own, stopped on drop.
struct Labgrid {
    dir: tempfile::TempDir,
    coordinator: String,
    processes: Vec<Child>,
}

impl Drop for Labgrid {
    fn drop(&mut self) {
        for child in &mut self.processes {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Labgrid {
    /// Starts a coordinator and an exporter with `exporter_yaml`, and waits
    /// until the exporter's `groups` are registered.
    fn start(exporter_yaml: &str, groups: &[&str]) -> Labgrid {
        bootstrap::ensure(&[bootstrap::Need::Labgrid]).expect("labgrid installs");
        let dir = tempfile::tempdir().unwrap();
        let coordinator = format!("127.0.0.1:{}", free_port());
        let logs = dir.path().to_path_buf();
        let log = move |name: &str| std::fs::File::create(logs.join(name)).unwrap();
        let mut lab = Labgrid {
            coordinator: coordinator.clone(),
            processes: Vec::new(),
            dir,
        };
        lab.processes.push(
            Command::new(venv_bin("labgrid-coordinator"))
                .current_dir(lab.dir.path())
                .args(["-l", &coordinator])
                .stdout(log("coordinator.log"))
                .stderr(log("coordinator.err"))
                .spawn()
                .expect("labgrid-coordinator starts"),
        );
        lab.wait_for("the coordinator", |lab| {
            lab.client(&["places"]).status.success()
        });
        std::fs::write(lab.dir.path().join("exporter.yaml"), exporter_yaml).unwrap();
        lab.processes.push(
            Command::new(venv_bin("labgrid-exporter"))
                .current_dir(lab.dir.path())
                .args(["-c", &coordinator, "-n", "qbexp", "exporter.yaml"])
                .stdout(log("exporter.log"))
                .stderr(log("exporter.err"))
                .spawn()
                .expect("labgrid-exporter starts"),
        );
        lab.wait_for("the exporter's resources", |lab| {
            let out = String::from_utf8_lossy(&lab.client(&["resources"]).stdout).into_owned();
            groups.iter().all(|g| out.contains(&format!("qbexp/{g}/")))
        });
        lab
    }

    fn wait_for(&self, what: &str, ready: impl Fn(&Labgrid) -> bool) {
        let started = Instant::now();
        while !ready(self) {
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "{what} never came up; logs in {}",
                self.dir.path().display()
            );
            std::thread::sleep(Duration::from_millis(300));
        }
    }

    /// `labgrid-client -x <ours> <args>` as this test's default user.
    fn client(&self, args: &[&str]) -> Output {
        self.client_as(None, args)
    }

    /// ... or as `host/user`, another labgrid user.
    fn client_as(&self, user: Option<(&str, &str)>, args: &[&str]) -> Output {
        let mut command = Command::new(venv_bin("labgrid-client"));
        command.args(["-x", &self.coordinator]).args(args);
        if let Some((host, name)) = user {
            command.env("LG_HOSTNAME", host).env("LG_USERNAME", name);
        }
        command.output().expect("labgrid-client runs")
    }

    fn must(&self, args: &[&str]) {
        let out = self.client(args);
        assert!(
            out.status.success(),
            "labgrid-client {args:?}: {}",
            text(&out)
        );
    }

    /// A place matching everything of an exporter group, tagged a Pi 5.
    fn place(&self, place: &str, group: &str) {
        self.must(&["-p", place, "create"]);
        self.must(&["-p", place, "add-match", &format!("qbexp/{group}/*")]);
        self.must(&["-p", place, "set-tags", "board=pi5"]);
    }

    fn holder(&self, place: &str) -> String {
        let out = self.client(&["-p", place, "show"]);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        text.lines()
            .find_map(|l| l.trim().strip_prefix("acquired: "))
            .unwrap_or("?")
            .to_string()
    }
}

/// The exporter group for testbed board `index`: its SSH service.
fn service_group(group: &str, index: usize) -> String {
    let user = sim_board(index)["user"].as_str().unwrap().to_string();
    format!(
        "{group}:\n  NetworkService:\n    address: {}\n    username: {user}\n    port: 22\n",
        board_address(index)
    )
}

/// bench.toml with the micro matrices, the smoke matrix, and boards that
/// borrow testbed boards' keys and runner but come from labgrid places.
fn farm_config(lab: &Labgrid, boards: &[(&str, usize, &str)]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let mut text = MICRO.to_string();
    text.push_str(
        "\n[matrices.smoke]\ntypes = [\"F32\", \"Q8_0\", \"Q4_0\", \"Q4_K\"]\nshapes = [\"gemma3-1b.attn_kv\"]\nbatches = [1, 4]\nthreads = [1, \"all\"]\nwarmup = 1\nmin_reps = 3\nmin_time_ms = 10\nmax_time_ms = 500\n",
    );
    for (name, index, extra) in boards {
        let mut board = sim_board(*index).as_table().unwrap().clone();
        for key in ["host", "user", "port"] {
            board.remove(key);
        }
        let mut wrapper = toml::value::Table::new();
        let mut list = toml::value::Table::new();
        list.insert(name.to_string(), toml::Value::Table(board));
        wrapper.insert("boards".into(), toml::Value::Table(list));
        let table = toml::to_string(&wrapper).unwrap();
        // The labgrid line goes right under the board's header.
        let header = format!("[boards.{name}]\n");
        text.push_str(&table.replacen(
            &header,
            &format!(
                "{header}labgrid = {{ place = \"{name}\", coordinator = \"{}\"{extra} }}\n",
                lab.coordinator
            ),
            1,
        ));
    }
    std::fs::write(dir.path().join("bench.toml"), text).unwrap();
    dir
}

fn run_json(run_dir: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(run_dir.join("run.json")).unwrap()).unwrap()
}

fn board_record<'a>(manifest: &'a serde_json::Value, board: &str) -> &'a serde_json::Value {
    manifest["boards"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["board"] == board)
        .unwrap_or_else(|| panic!("no board {board} in {manifest:#}"))
}

fn rows_of(run_dir: &Path, board: &str) -> Vec<KernelRow> {
    read_csv::<KernelRow>(&run_dir.join("kernels.csv"))
        .unwrap()
        .into_iter()
        .filter(|r| r.board == board)
        .collect()
}

/// Measured, or refused by the type's block size (Q4_K on K=1152): not
/// failed.
fn measured(row: &KernelRow) -> bool {
    row.status != CellStatus::Failed && (row.status == CellStatus::Ok || !row.note.is_empty())
}

fn bench_with(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_quantbench"))
        .current_dir(dir)
        .arg("bench")
        .args(args)
        .output()
        .expect("xtask runs")
}

#[test]
fn two_places_are_taken_measured_and_given_back() {
    let _guard = testbed().lock().unwrap_or_else(|e| e.into_inner());
    let exporter = service_group("pi-one", 1) + &service_group("pi-two", 2);
    let lab = Labgrid::start(&exporter, &["pi-one", "pi-two"]);
    lab.place("qb-farm-a", "pi-one");
    lab.place("qb-farm-b", "pi-two");
    let dir = farm_config(&lab, &[("qb-farm-a", 1, ""), ("qb-farm-b", 2, "")]);
    let out = bench_with(
        dir.path(),
        &[
            "--target",
            "labgrid:qb-farm-a,labgrid:qb-farm-b",
            "--matrix",
            "smoke",
        ],
    );
    assert!(out.status.success(), "{}", text(&out));
    let run_dir = only_run_dir(dir.path());
    let manifest = run_json(&run_dir);
    for (place, index) in [("qb-farm-a", 1), ("qb-farm-b", 2)] {
        let rows = rows_of(&run_dir, place);
        assert_eq!(rows.len(), 16, "every smoke cell of {place}");
        assert!(rows.iter().all(measured), "{rows:?}");
        let record = &board_record(&manifest, place)["labgrid"];
        assert_eq!(record["place"], place, "{record:#}");
        assert_eq!(record["coordinator"], lab.coordinator.as_str());
        assert_eq!(record["tags"]["board"], "pi5");
        assert!(
            record["token"].as_str().is_some_and(|t| t.len() >= 8),
            "the reservation token names the allocation: {record:#}"
        );
        assert!(
            record["reached_at"]
                .as_str()
                .is_some_and(|a| a.contains(&board_address(index))),
            "{record:#}"
        );
        assert!(record["released_at"].is_string(), "{record:#}");
        assert_eq!(lab.holder(place), "None", "{place} is free again");
    }
    let summary = std::fs::read_to_string(run_dir.join("summary.md")).unwrap();
    assert!(
        summary.contains("## Boards from labgrid")
            && summary.contains("- `qb-farm-b`: place `qb-farm-b` on coordinator"),
        "{summary}"
    );
    let reservations = lab.client(&["reservations"]);
    assert!(
        String::from_utf8_lossy(&reservations.stdout)
            .trim()
            .is_empty(),
        "no reservation is left behind: {}",
        text(&reservations)
    );
}

#[test]
fn a_place_another_user_holds_fails_its_board_with_the_holder_while_the_other_measures() {
    let _guard = testbed().lock().unwrap_or_else(|e| e.into_inner());
    let exporter = service_group("pi-one", 1) + &service_group("pi-two", 2);
    let lab = Labgrid::start(&exporter, &["pi-one", "pi-two"]);
    lab.place("qb-free", "pi-one");
    lab.place("qb-taken", "pi-two");
    let alice = Some(("otherlab", "alice"));
    let out = lab.client_as(alice, &["-p", "qb-taken", "acquire"]);
    assert!(out.status.success(), "{}", text(&out));
    let dir = farm_config(&lab, &[("qb-free", 1, ""), ("qb-taken", 2, "")]);
    let out = bench_with(
        dir.path(),
        &[
            "--target",
            "labgrid:qb-free,labgrid:qb-taken",
            "--matrix",
            "micro",
            "--lock-wait",
            "8",
        ],
    );
    assert!(!out.status.success(), "{}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("qb-taken is held by otherlab/alice; waiting up to 8 s"),
        "the run waited for the place: {}",
        text(&out)
    );
    let run_dir = only_run_dir(dir.path());
    let free = rows_of(&run_dir, "qb-free");
    assert_eq!(free.len(), 3);
    assert!(free.iter().all(measured), "{free:?}");
    let taken = rows_of(&run_dir, "qb-taken");
    assert_eq!(taken.len(), 3, "a failed row per cell of the board");
    assert!(taken.iter().all(|r| r.status == CellStatus::Failed));
    let manifest = run_json(&run_dir);
    let error = board_record(&manifest, "qb-taken")["error"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(
        error.contains("held by otherlab/alice") && error.contains("not free after 8 s"),
        "{error}"
    );
    assert_eq!(lab.holder("qb-taken"), "otherlab/alice", "alice keeps it");
    assert_eq!(lab.holder("qb-free"), "None");
    assert!(
        String::from_utf8_lossy(&lab.client(&["reservations"]).stdout)
            .trim()
            .is_empty(),
        "the waiting reservation was cancelled"
    );
}

#[test]
fn bad_farm_input_gets_one_line_each() {
    let _guard = testbed().lock().unwrap_or_else(|e| e.into_inner());
    // pi-power has no NetworkService: only a power port.
    let exporter = service_group("pi-one", 1)
        + "pi-power:\n  NetworkPowerPort:\n    model: simplerest\n    host: 'http://127.0.0.1:9/relay/{index}/{value}'\n    index: 0\n";
    let lab = Labgrid::start(&exporter, &["pi-one", "pi-power"]);
    lab.place("qb-one", "pi-one");
    lab.place("qb-nossh", "pi-power");
    let dir = farm_config(&lab, &[("qb-one", 1, ""), ("qb-nossh", 2, "")]);
    let fails = |args: &[&str], envs: &[(&str, &str)], expect: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_quantbench"))
            .current_dir(dir.path())
            .arg("bench")
            .args(args)
            .envs(envs.iter().copied())
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert!(!out.status.success(), "{}", text(&out));
        let stderr = String::from_utf8_lossy(&out.stderr);
        for part in expect {
            assert!(stderr.contains(part), "`{part}` missing: {}", text(&out));
        }
        stderr.into_owned()
    };
    let unknown = fails(
        &["--target", "labgrid:qb-nope", "--matrix", "micro"],
        &[("LG_COORDINATOR", lab.coordinator.as_str())],
        &["place `qb-nope` does not exist", "qb-nossh, qb-one"],
    );
    assert_eq!(
        unknown.lines().filter(|l| l.starts_with("error")).count(),
        1,
        "{unknown}"
    );
    // A bare place (no board names it) finds its coordinator in LG_COORDINATOR.
    let dead = format!("127.0.0.1:{}", free_port());
    let bare = tempfile::tempdir().unwrap();
    std::fs::write(bare.path().join("bench.toml"), MICRO).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_quantbench"))
        .current_dir(bare.path())
        .args(["bench", "--target", "labgrid:qb-one", "--matrix", "micro"])
        .env("LG_COORDINATOR", &dead)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains(&format!("coordinator {dead} does not answer")),
        "{}",
        text(&out)
    );
    fails(
        &["--target", "labgrid:qb-one", "--matrix", "micro"],
        &[
            ("QUANTBENCH_LABGRID_CLIENT", "/nonexistent/labgrid-client"),
            ("QUANTBENCH_NO_INSTALL", "1"),
        ],
        &["labgrid-client is not installed", "cargo xtask setup"],
    );
    let nossh = fails(
        &["--target", "labgrid:qb-nossh", "--matrix", "micro"],
        &[],
        &["no NetworkService", "NetworkPowerPort"],
    );
    assert!(nossh.contains("add-match"), "says what to do: {nossh}");
    assert_eq!(
        lab.holder("qb-nossh"),
        "None",
        "given back after the failure"
    );
}

/// A power switch at `http://127.0.0.1:<port>/relay/0/<0|1>` (labgrid's
/// `simplerest` model) whose relay is board 2's cable.
struct CableSwitch {
    port: u16,
    switched: Arc<Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
}

impl CableSwitch {
    fn start() -> CableSwitch {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        let switched = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (log, halt) = (switched.clone(), stop.clone());
        std::thread::spawn(move || {
            while !halt.load(Ordering::Relaxed) {
                let Ok((mut stream, _)) = listener.accept() else {
                    std::thread::sleep(Duration::from_millis(50));
                    continue;
                };
                let _ = stream.set_nonblocking(false);
                let mut request = [0u8; 2048];
                let n = stream.read(&mut request).unwrap_or(0);
                let line = String::from_utf8_lossy(&request[..n])
                    .lines()
                    .next()
                    .unwrap_or_default()
                    .to_string();
                let path = line
                    .split_whitespace()
                    .nth(1)
                    .unwrap_or_default()
                    .to_string();
                let state = match path.as_str() {
                    "/relay/0/0" | "/relay/0/1" => {
                        let on = path.ends_with('1');
                        let _ = Command::new("ip")
                            .args(["netns", "exec", &harness::fleet::testbed::namespace(2)])
                            .args(["ip", "link", "set", "dev", &board_link(2)])
                            .arg(if on { "up" } else { "down" })
                            .status();
                        log.lock()
                            .unwrap()
                            .push(if on { "on" } else { "off" }.into());
                        if on {
                            "1"
                        } else {
                            "0"
                        }
                    }
                    _ => {
                        let last = log.lock().unwrap().last().cloned();
                        if last.as_deref() == Some("off") {
                            "0"
                        } else {
                            "1"
                        }
                    }
                };
                let _ = write!(
                    stream,
                    "HTTP/1.1 200 OK\r\nContent-Length: 1\r\nConnection: close\r\n\r\n{state}"
                );
            }
        });
        CableSwitch {
            port,
            switched,
            stop,
        }
    }
}

impl Drop for CableSwitch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

#[test]
fn a_board_that_does_not_answer_is_power_cycled_once_and_measured() {
    let _guard = testbed().lock().unwrap_or_else(|e| e.into_inner());
    let switch = CableSwitch::start();
    let exporter = service_group("pi-two", 2)
        + &format!(
            "  NetworkPowerPort:\n    model: simplerest\n    host: 'http://127.0.0.1:{}/relay/{{index}}/{{value}}'\n    index: 0\n",
            switch.port
        );
    let lab = Labgrid::start(&exporter, &["pi-two"]);
    lab.place("qb-hung", "pi-two");
    let dir = farm_config(
        &lab,
        &[("qb-hung", 2, ", power_cycle = true, boot_seconds = 60")],
    );
    // Short retries: the board is dead, not flaky.
    let config = dir.path().join("bench.toml");
    let text_now = std::fs::read_to_string(&config).unwrap();
    std::fs::write(
        &config,
        text_now.replace("retry_seconds = 120", "retry_seconds = 4"),
    )
    .unwrap();
    // The board hangs: its cable is out until the power comes back.
    in_namespace(2, &["ip", "link", "set", "dev", &board_link(2), "down"]);
    let _cable = LinkDown(2);
    let out = bench_with(
        dir.path(),
        &["--target", "labgrid:qb-hung", "--matrix", "micro"],
    );
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(
        *switch.switched.lock().unwrap(),
        ["off", "on"],
        "one power cycle"
    );
    let run_dir = only_run_dir(dir.path());
    let rows = rows_of(&run_dir, "qb-hung");
    assert_eq!(rows.len(), 3);
    assert!(rows.iter().all(measured), "{rows:?}");
    let manifest = run_json(&run_dir);
    let cycles = board_record(&manifest, "qb-hung")["labgrid"]["power_cycles"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert_eq!(cycles.len(), 1, "{manifest:#}");
    assert!(
        cycles[0]["ssh_after_seconds"].is_number(),
        "{:#}",
        cycles[0]
    );
    assert!(
        cycles[0]["reason"]
            .as_str()
            .unwrap_or_default()
            .contains("gave up after retrying"),
        "{:#}",
        cycles[0]
    );
    assert_eq!(lab.holder("qb-hung"), "None");
}

#[test]
fn an_interrupted_host_gives_its_place_back_and_resume_takes_it_again() {
    let _guard = testbed().lock().unwrap_or_else(|e| e.into_inner());
    let lab = Labgrid::start(&service_group("pi-one", 1), &["pi-one"]);
    lab.place("qb-night", "pi-one");
    let dir = farm_config(&lab, &[("qb-night", 1, "")]);
    let work = sim_board(1)["work_dir"].as_str().unwrap().to_string();
    let child = start_slow_run(dir.path(), "labgrid:qb-night", &work, 1);
    assert_ne!(lab.holder("qb-night"), "None", "taken while it runs");
    let pid = child.id().to_string();
    let status = Command::new("kill").args(["-INT", &pid]).status().unwrap();
    assert!(status.success());
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(130), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("released labgrid place qb-night"),
        "{}",
        text(&out)
    );
    assert_eq!(lab.holder("qb-night"), "None", "given back on Ctrl-C");
    let out = resume(dir.path());
    assert!(out.status.success(), "{}", text(&out));
    let run_dir = only_run_dir(dir.path());
    assert_every_slow_cell_once(&run_dir);
    let manifest = run_json(&run_dir);
    assert_eq!(manifest["resumed_at"].as_array().map(Vec::len), Some(1));
    assert!(board_record(&manifest, "qb-night")["labgrid"]["released_at"].is_string());
    assert_eq!(lab.holder("qb-night"), "None");
}
