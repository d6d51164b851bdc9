//! End to end on the emulated Pi 5 fleet: the real CLI cross-builds the real
//! static aarch64 agent, deploys it over SSH to boards in network
//! namespaces (real sshd, qemu-aarch64 -cpu cortex-a76), runs, collects.
//! Needs root (the testbed); `cargo xtask test` runs as root in CI.

mod common;
use common::fleet::*;
use common::{only_run_dir, text, xtask};

use harness::builds::build::{
    build_board_agent, inspect_aarch64_binary, workspace_root, BoardProfile, Builder,
};
use harness::runs::manifest::RunManifest;
use std::path::Path;
use std::process::Command;
use wire::files::read_csv;
use wire::rows::{CellStatus, KernelRow};

#[test]
fn two_emulated_boards_at_once_then_second_run_uploads_nothing() {
    let _guard = testbed().lock().unwrap_or_else(|e| e.into_inner());
    let dir = config_dir(&[]);
    let out = bench(dir.path(), "testbed", "micro");
    assert!(out.status.success(), "{}", text(&out));
    let run_dir = only_run_dir(dir.path());
    let rows: Vec<KernelRow> = read_csv(&run_dir.join("kernels.csv")).unwrap();
    for board in ["sim1", "sim2"] {
        let of_board: Vec<&KernelRow> = rows.iter().filter(|r| r.board == board).collect();
        assert_eq!(of_board.len(), 3, "{board}");
        assert!(
            of_board.iter().all(|r| r.emulated),
            "emulated rows are labelled"
        );
        let q4 = of_board.iter().find(|r| r.ty == "Q4_0").unwrap();
        assert_eq!(q4.status, CellStatus::Ok);
        assert!(q4.kernel_path.starts_with("CPU"), "{q4:?}");
        // Placed in memory as a model load on the board would place it,
        // with the board's own page size recorded.
        assert!(
            q4.weight_placement.starts_with("mmap/") || q4.weight_placement.starts_with("repack/"),
            "{q4:?}"
        );
        assert!(q4.nmse.unwrap() < 0.05);
        let probe =
            std::fs::read_to_string(run_dir.join(format!("boards/{board}/probe.json"))).unwrap();
        assert!(
            probe.contains("\"aarch64\"") && probe.contains("dotprod"),
            "{probe}"
        );
    }
    let svg = std::fs::read_to_string(run_dir.join("plots/speedup_vs_f32.svg")).unwrap();
    assert!(
        svg.contains("EMULATED")
            && svg.contains("sim1 (emulated)")
            && svg.contains("sim2 (emulated)")
    );

    // Same agent again: nothing is uploaded, and the log says so.
    let again = tempfile::tempdir().unwrap();
    std::fs::copy(
        dir.path().join("bench.toml"),
        again.path().join("bench.toml"),
    )
    .unwrap();
    let out = bench(again.path(), "sim1,sim2", "micro");
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("already on the board, nothing uploaded"),
        "{}",
        text(&out)
    );
    let manifest: RunManifest =
        wire::files::read_json(&only_run_dir(again.path()).join("run.json")).unwrap();
    assert!(manifest
        .boards
        .iter()
        .all(|b| b.uploaded_bytes == 0 && b.error.is_none()));
    // The agent's own time reaches the host: its `finished` line is
    // written just before it exits, after the host's last poll.
    assert!(
        manifest.boards.iter().all(|b| b.agent_seconds > 0.0),
        "{:?}",
        manifest
            .boards
            .iter()
            .map(|b| b.agent_seconds)
            .collect::<Vec<_>>()
    );
}

#[test]
fn pi5_agent_is_fully_static_and_uses_dot_product_instructions() {
    let agent = build_board_agent(
        &workspace_root(),
        BoardProfile::Pi5,
        Builder::Cargo,
        &harness::builds::llama_source::vendored(&workspace_root()).unwrap(),
    )
    .unwrap();
    let facts = inspect_aarch64_binary(&agent.path).unwrap();
    assert!(
        facts.needed.is_empty(),
        "dynamic dependencies: {:?}",
        facts.needed
    );
    assert!(!facts.has_interpreter, "names a dynamic loader");
    assert!(
        facts.sdot_count > 50,
        "only {} sdot instructions: not built for a Pi 5",
        facts.sdot_count
    );
}

#[test]
fn failing_board_is_reported_and_does_not_stop_the_other() {
    let _guard = testbed().lock().unwrap_or_else(|e| e.into_inner());
    let dir = config_dir(&[("ghost", &|b| {
        b.insert("host".into(), "10.213.0.99".into());
        // Not the default two minutes of retries for a board that is off.
        b.insert("retry_seconds".into(), 3.into());
    })]);
    let out = bench(dir.path(), "sim1,ghost", "micro");
    assert!(!out.status.success(), "{}", text(&out));
    let all = text(&out);
    assert!(
        all.contains("board ghost") && all.contains("cannot reach 10.213.0.99:22"),
        "{all}"
    );
    let rows: Vec<KernelRow> = read_csv(&only_run_dir(dir.path()).join("kernels.csv")).unwrap();
    assert!(rows
        .iter()
        .filter(|r| r.board == "sim1")
        .all(|r| r.status != CellStatus::Failed));
    assert!(rows
        .iter()
        .filter(|r| r.board == "ghost")
        .all(|r| r.status == CellStatus::Failed));
}

#[test]
fn refused_auth_unknown_and_changed_host_keys_each_get_one_clear_error() {
    let _guard = testbed().lock().unwrap_or_else(|e| e.into_inner());
    let tmp = tempfile::tempdir().unwrap();
    let stranger_key = tmp.path().join("stranger");
    assert!(Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-f"])
        .arg(&stranger_key)
        .status()
        .unwrap()
        .success());
    let empty_known_hosts = tmp.path().join("empty_known_hosts");
    std::fs::write(&empty_known_hosts, "").unwrap();
    let wrong_known_hosts = tmp.path().join("wrong_known_hosts");
    let other_host_key =
        std::fs::read_to_string(workspace_root().join(".testbed/sim2/ssh_host_ed25519_key.pub"))
            .unwrap();
    let fields: Vec<&str> = other_host_key.split_whitespace().take(2).collect();
    std::fs::write(
        &wrong_known_hosts,
        format!("10.213.0.11 {}\n", fields.join(" ")),
    )
    .unwrap();

    let stranger = stranger_key.display().to_string();
    let empty = empty_known_hosts.display().to_string();
    let wrong = wrong_known_hosts.display().to_string();
    let dir = config_dir(&[
        ("noauth", &|b| {
            b.insert("identity".into(), stranger.clone().into());
        }),
        ("newkey", &|b| {
            b.insert("known_hosts".into(), empty.clone().into());
        }),
        ("changedkey", &|b| {
            b.insert("known_hosts".into(), wrong.clone().into());
        }),
    ]);
    // HOME points at an empty folder so the user's own keys and known_hosts
    // (and any ssh-agent) play no part.
    let isolated = |target: &str| {
        Command::new(env!("CARGO_BIN_EXE_quantbench"))
            .current_dir(dir.path())
            .env("HOME", tmp.path())
            .env_remove("SSH_AUTH_SOCK")
            .args(["bench", "--target", target, "--matrix", "micro"])
            .output()
            .unwrap()
    };
    let out = isolated("noauth");
    assert!(!out.status.success());
    assert!(
        text(&out).contains("refused authentication"),
        "{}",
        text(&out)
    );
    let out = isolated("newkey");
    assert!(!out.status.success());
    let all = text(&out);
    assert!(
        all.contains("host key of 10.213.0.11 is unknown (SHA256:")
            && all.contains("--accept-new-host-key"),
        "{all}"
    );
    let out = isolated("changedkey");
    assert!(!out.status.success());
    let all = text(&out);
    assert!(
        all.contains("HAS CHANGED")
            && all.contains("ssh-keygen -R '10.213.0.11'")
            && all.contains("line 1"),
        "{all}"
    );
}

#[test]
fn host_keys_are_pinned_matched_by_type_revocable_and_bad_lines_hide_nothing() {
    let _guard = testbed().lock().unwrap_or_else(|e| e.into_inner());
    let tmp = tempfile::tempdir().unwrap();
    let keygen = |kind: &str, passphrase: &str, path: &Path| {
        assert!(Command::new("ssh-keygen")
            .args(["-q", "-t", kind, "-N", passphrase, "-f"])
            .arg(path)
            .status()
            .unwrap()
            .success());
    };
    let public = |path: &Path| -> String {
        let text = std::fs::read_to_string(path).unwrap();
        text.split_whitespace()
            .take(2)
            .collect::<Vec<_>>()
            .join(" ")
    };
    let sim1_key = public(&workspace_root().join(".testbed/sim1/ssh_host_ed25519_key.pub"));
    let sim2_key = public(&workspace_root().join(".testbed/sim2/ssh_host_ed25519_key.pub"));
    let ecdsa = tmp.path().join("old_ecdsa");
    keygen("ecdsa", "", &ecdsa);
    let locked = tmp.path().join("locked");
    keygen("ed25519", "secret", &locked);
    let file = |name: &str, text: String| {
        let path = tmp.path().join(name);
        std::fs::write(&path, text).unwrap();
        path.display().to_string()
    };
    let pinned = file("pinned", String::new());
    let other_type = file(
        "other_type",
        format!("10.213.0.11 {}\n", public(&ecdsa.with_extension("pub"))),
    );
    let revoked = file(
        "revoked",
        format!("10.213.0.11 {sim1_key}\n@revoked * {sim1_key}\n"),
    );
    let bad_line = file(
        "bad_line",
        format!("this line is not an entry\n10.213.0.11 {sim1_key}\n"),
    );
    let locked_path = locked.display().to_string();
    let with_known_hosts = |path: String| {
        move |b: &mut toml::value::Table| {
            b.insert("known_hosts".into(), path.clone().into());
        }
    };
    let dir = config_dir(&[
        ("pinning", &with_known_hosts(pinned.clone())),
        ("othertype", &with_known_hosts(other_type)),
        ("revokedkey", &with_known_hosts(revoked)),
        ("badline", &with_known_hosts(bad_line)),
        ("lockedkey", &|b| {
            b.insert("identity".into(), locked_path.clone().into());
        }),
    ]);
    let isolated = |target: &str, accept: bool| {
        let mut command = Command::new(env!("CARGO_BIN_EXE_quantbench"));
        command
            .current_dir(dir.path())
            .env("HOME", tmp.path())
            .env_remove("SSH_AUTH_SOCK")
            .args(["bench", "--target", target, "--matrix", "micro"]);
        if accept {
            command.arg("--accept-new-host-key");
        }
        command.output().unwrap()
    };

    // accept-new records the key; the next run, without the flag, is pinned.
    let out = isolated("pinning", true);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("recorded in"), "{}", text(&out));
    let recorded = std::fs::read_to_string(&pinned).unwrap();
    assert_eq!(recorded.trim(), format!("10.213.0.11 {sim1_key}"));
    let out = isolated("pinning", false);
    assert!(out.status.success(), "pinned: {}", text(&out));
    // A pinned key that no longer matches is refused, flag or not.
    std::fs::write(&pinned, format!("10.213.0.11 {sim2_key}\n")).unwrap();
    let out = isolated("pinning", true);
    assert!(!out.status.success());
    assert!(text(&out).contains("HAS CHANGED"), "{}", text(&out));

    // An old key of another type is no key of this type, not a changed one.
    let out = isolated("othertype", false);
    assert!(!out.status.success());
    let all = text(&out);
    assert!(
        all.contains("is unknown") && all.contains("only a ecdsa-sha2-nistp256 key"),
        "{all}"
    );
    assert!(!all.contains("HAS CHANGED"), "{all}");

    let out = isolated("revokedkey", true);
    assert!(!out.status.success());
    assert!(text(&out).contains("REVOKED"), "{}", text(&out));

    let out = isolated("badline", false);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains(":1: not a known_hosts entry"),
        "{}",
        text(&out)
    );

    let out = isolated("lockedkey", false);
    assert!(!out.status.success());
    assert!(
        text(&out).contains("protected by a passphrase") && text(&out).contains("ssh-add"),
        "{}",
        text(&out)
    );
}

#[test]
fn a_board_whose_sshd_serves_no_sftp_is_told_how_to_enable_it() {
    let _guard = testbed().lock().unwrap_or_else(|e| e.into_inner());
    let tmp = tempfile::tempdir().unwrap();
    // A second sshd in sim1's namespace, on port 2222, without the SFTP
    // subsystem line.
    let sim1 = workspace_root().join(".testbed/sim1");
    let pid_file = tmp.path().join("sshd.pid");
    let config: String = std::fs::read_to_string(sim1.join("sshd_config"))
        .unwrap()
        .lines()
        .filter(|l| !l.starts_with("Subsystem"))
        .map(|l| match l.split_whitespace().next() {
            Some("Port") => "Port 2222".to_string(),
            Some("PidFile") => format!("PidFile {}", pid_file.display()),
            _ => l.to_string(),
        })
        .map(|l| l + "\n")
        .collect();
    let config_path = tmp.path().join("sshd_config");
    std::fs::write(&config_path, config).unwrap();
    assert!(Command::new("ip")
        .args(["netns", "exec", "qbtb-sim1", "/usr/sbin/sshd", "-f"])
        .arg(&config_path)
        .arg("-E")
        .arg(tmp.path().join("sshd.log"))
        .status()
        .unwrap()
        .success());
    let host_key = std::fs::read_to_string(sim1.join("ssh_host_ed25519_key.pub")).unwrap();
    let host_key: Vec<&str> = host_key.split_whitespace().take(2).collect();
    let known = tmp.path().join("known_hosts");
    std::fs::write(
        &known,
        format!("[10.213.0.11]:2222 {}\n", host_key.join(" ")),
    )
    .unwrap();
    let known = known.display().to_string();
    let dir = config_dir(&[("nosftp", &|b| {
        b.insert("port".into(), toml::Value::Integer(2222));
        b.insert("known_hosts".into(), known.clone().into());
    })]);
    let out = bench(dir.path(), "nosftp", "micro");
    let pid = std::fs::read_to_string(&pid_file).unwrap_or_default();
    let _ = Command::new("kill").arg(pid.trim()).status();
    assert!(!out.status.success());
    let all = text(&out);
    assert!(
        all.contains("serves no SFTP") && all.contains("Subsystem sftp"),
        "{all}"
    );
}

#[test]
fn a_hung_board_is_stopped_at_its_deadline_without_holding_back_the_other() {
    let _guard = testbed().lock().unwrap_or_else(|e| e.into_inner());
    // An "agent" that never answers: the runner sleeps instead of running it.
    let scripts = tempfile::tempdir().unwrap();
    let hang = scripts.path().join("hang.sh");
    std::fs::write(&hang, "#!/bin/sh\nexec sleep 600\n").unwrap();
    std::fs::set_permissions(&hang, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let hang = hang.display().to_string();
    let dir = config_dir(&[("hung", &|b| {
        b.insert(
            "runner".into(),
            toml::Value::Array(vec![toml::Value::String(hang.clone())]),
        );
    })]);
    let mut config = std::fs::read_to_string(dir.path().join("bench.toml")).unwrap();
    config.push_str(
        "\n[matrices.hang]\ntypes = [\"F32\", \"Q4_0\"]\nshapes = [\"gemma3-1b.attn_kv\"]\nbatches = [1]\nthreads = [1]\nwarmup = 0\nmin_reps = 1\nmin_time_ms = 0\nmax_time_ms = 100\ndeadline_seconds = 10\n",
    );
    std::fs::write(dir.path().join("bench.toml"), config).unwrap();
    let started = std::time::Instant::now();
    let out = bench(dir.path(), "hung,sim2", "hang");
    let all = text(&out);
    assert!(!out.status.success(), "{all}");
    assert!(
        started.elapsed() < std::time::Duration::from_secs(120),
        "{all}"
    );
    let rows: Vec<KernelRow> = read_csv(&only_run_dir(dir.path()).join("kernels.csv")).unwrap();
    let healthy: Vec<&KernelRow> = rows.iter().filter(|r| r.board == "sim2").collect();
    assert_eq!(healthy.len(), 2);
    assert!(
        healthy.iter().all(|r| r.status == CellStatus::Ok),
        "{healthy:?}"
    );
    let hung: Vec<&KernelRow> = rows.iter().filter(|r| r.board == "hung").collect();
    assert_eq!(hung.len(), 2);
    assert!(
        hung.iter()
            .all(|r| r.status == CellStatus::Failed && r.note.contains("deadline of 10 s")),
        "{hung:?}"
    );
    let left = Command::new("pgrep")
        .args(["-f", "sleep 600"])
        .output()
        .unwrap();
    assert!(
        !left.status.success(),
        "the hung agent was stopped on the board"
    );
}

#[test]
fn board_work_dir_is_pruned_to_keep_runs_and_board_clean_does_it_on_demand() {
    let _guard = testbed().lock().unwrap_or_else(|e| e.into_inner());
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    // Last month's leftovers: four runs, three old agent builds, a model no
    // run names and a half-uploaded one.
    for run in ["old-1", "old-2", "old-3", "old-4"] {
        std::fs::create_dir_all(w.join("runs").join(run)).unwrap();
        std::fs::write(w.join("runs").join(run).join("job.json"), "{}").unwrap();
    }
    for agent in ["aaaaaaaaaaa1", "aaaaaaaaaaa2", "aaaaaaaaaaa3"] {
        std::fs::create_dir_all(w.join("agents").join(agent)).unwrap();
        std::fs::write(w.join("agents").join(agent).join("quantbench-agent"), "x").unwrap();
    }
    std::fs::create_dir_all(w.join("models")).unwrap();
    std::fs::write(w.join("models/0123456789ab.gguf"), "unused").unwrap();
    std::fs::write(w.join("models/feedfeedfeed.gguf.part-77"), "half").unwrap();
    assert!(Command::new("sh")
        .arg("-c")
        .arg(format!(
            "cd {} && touch -d '40 days ago' runs/* agents/* && touch -d '30 days ago' runs/old-4",
            w.display()
        ))
        .status()
        .unwrap()
        .success());
    let work_dir = w.display().to_string();
    let dir = config_dir(&[("tidy", &|b| {
        b.insert("work_dir".into(), work_dir.clone().into());
        b.insert("keep_runs".into(), toml::Value::Integer(2));
    })]);
    let out = bench(dir.path(), "tidy", "micro");
    let all = text(&out);
    assert!(out.status.success(), "{all}");
    assert!(
        all.contains("removed 3 run folder(s)") && all.contains("keep_runs = 2"),
        "{all}"
    );
    let names = |sub: &str| -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(w.join(sub))
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    };
    let runs = names("runs");
    assert_eq!(runs.len(), 2, "{runs:?}");
    assert!(runs.contains(&"old-4".to_string()) && runs.iter().any(|r| r.ends_with("-micro")));
    let agents = names("agents");
    assert_eq!(
        agents.len(),
        2,
        "the one in use and the newest other: {agents:?}"
    );
    assert_eq!(
        agents
            .iter()
            .filter(|a| !a.starts_with("aaaaaaaaaaa"))
            .count(),
        1,
        "the agent in use is kept: {agents:?}"
    );
    assert!(names("models").is_empty(), "{:?}", names("models"));
    // On demand, down to one run.
    let out = Command::new(env!("CARGO_BIN_EXE_quantbench"))
        .current_dir(dir.path())
        .args(["board", "clean", "tidy", "--keep", "1"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("tidy: removed 1 run folder(s)"),
        "{}",
        text(&out)
    );
    assert_eq!(names("runs").len(), 1);
}

#[test]
fn wrong_architecture_is_named_before_running() {
    let _guard = testbed().lock().unwrap_or_else(|e| e.into_inner());
    // The testbed boards are x86_64 machines that run aarch64 code through
    // qemu; without the runner the agent cannot execute.
    let dir = config_dir(&[("norunner", &|b| {
        b.insert("runner".into(), toml::Value::Array(Vec::new()));
    })]);
    let out = bench(dir.path(), "norunner", "micro");
    assert!(!out.status.success());
    let all = text(&out);
    assert!(
        all.contains("wrong architecture") && all.contains("x86_64"),
        "{all}"
    );
}

#[test]
fn full_disk_on_the_board_is_named() {
    let _guard = testbed().lock().unwrap_or_else(|e| e.into_inner());
    let tiny = workspace_root().join(".testbed/tinydisk");
    let _ = std::fs::remove_dir_all(&tiny);
    std::fs::create_dir_all(&tiny).unwrap();
    // `ip netns exec` gave the board's sshd its own mount namespace: mount
    // the tiny filesystem there, where the board sees it.
    let sshd_pid =
        std::fs::read_to_string(workspace_root().join(".testbed/sim1/sshd.pid")).unwrap();
    let in_board = |args: &[&str]| {
        Command::new("nsenter")
            .arg(format!("--mount=/proc/{}/ns/mnt", sshd_pid.trim()))
            .args(args)
            .status()
            .unwrap()
    };
    assert!(in_board(&[
        "mount",
        "-t",
        "tmpfs",
        "-o",
        "size=256k",
        "tmpfs",
        tiny.to_str().unwrap()
    ])
    .success());
    let work = tiny.display().to_string();
    let dir = config_dir(&[("tiny", &|b| {
        b.insert("work_dir".into(), work.clone().into());
    })]);
    let out = bench(dir.path(), "tiny", "micro");
    in_board(&["umount", tiny.to_str().unwrap()]);
    assert!(!out.status.success());
    let all = text(&out);
    assert!(all.contains("disk full under"), "{all}");
}

#[test]
fn agent_killed_mid_run_keeps_finished_rows_and_marks_the_cell_failed() {
    let _guard = testbed().lock().unwrap_or_else(|e| e.into_inner());
    let dir = config_dir(&[]);
    let (child, work) = start_slow_run_on_sim2(dir.path(), 2);
    let killed = Command::new("pkill")
        .args(["-9", "-f", &format!("{work}/agents/")])
        .status()
        .unwrap();
    assert!(killed.success());
    let out = child.wait_with_output().unwrap();
    assert!(!out.status.success(), "{}", text(&out));
    let all = text(&out);
    assert!(
        all.contains("agent killed") || all.contains("SIGKILL"),
        "{all}"
    );
    let rows: Vec<KernelRow> = read_csv(&only_run_dir(dir.path()).join("kernels.csv")).unwrap();
    assert_eq!(rows.len(), 6, "one row per cell");
    let ok = rows.iter().filter(|r| r.status == CellStatus::Ok).count();
    assert!(ok >= 2, "finished rows kept: {rows:?}");
    let died = rows
        .iter()
        .filter(|r| r.note.contains("died in this cell"))
        .count();
    assert_eq!(died, 1, "{rows:?}");
}

#[test]
fn missing_cross_toolchain_gets_one_clear_error_with_the_install_command() {
    // A PATH where everything but the aarch64 cross tools is present.
    let bin = tempfile::tempdir().unwrap();
    for dir in std::env::split_paths(&std::env::var_os("PATH").unwrap()) {
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let name = entry.file_name();
            if !name.to_string_lossy().starts_with("aarch64-linux-gnu-")
                && !bin.path().join(&name).exists()
            {
                let _ = std::os::unix::fs::symlink(entry.path(), bin.path().join(&name));
            }
        }
    }
    let dir = config_dir(&[]);
    let out = Command::new(env!("CARGO_BIN_EXE_quantbench"))
        .current_dir(dir.path())
        .env("PATH", bin.path())
        .env("QUANTBENCH_NO_INSTALL", "1")
        .args(["bench", "--target", "pi5.local", "--matrix", "micro"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "{stderr}");
    assert!(
        lines[0].contains("aarch64-linux-gnu-gcc")
            && lines[0].contains("apt-get install -y gcc-aarch64-linux-gnu"),
        "{stderr}"
    );
}

#[test]
fn codebook_formats_run_on_an_emulated_board_with_the_neon_kernel_beside_ggml_types() {
    let _guard = testbed().lock().unwrap_or_else(|e| e.into_inner());
    let dir = config_dir(&[]);
    let mut config = std::fs::read_to_string(dir.path().join("bench.toml")).unwrap();
    // Three tokens: the kernel's multi-token path and a partial group.
    config.push_str(
        "\n[matrices.codebooks]\ntypes = [\"Q4_0\", \"IQ4_NL\", \"Q3_K\", \"SQ4\", \"SQ4+S0.45\", \"SQ3\", \"LUT2\", \"LUT3\"]\nshapes = [\"llama3.2-1b.attn_kv\"]\nbatches = [1, 3]\nthreads = [2]\nwarmup = 1\nmin_reps = 2\nmin_time_ms = 1\nmax_time_ms = 200\n",
    );
    std::fs::write(dir.path().join("bench.toml"), config).unwrap();
    let out = bench(dir.path(), "sim1", "codebooks");
    assert!(out.status.success(), "{}", text(&out));
    let run_dir = only_run_dir(dir.path());
    let rows: Vec<KernelRow> = read_csv(&run_dir.join("kernels.csv")).unwrap();
    assert_eq!(rows.len(), 16, "{rows:?}");
    let row = |ty: &str, n: usize| {
        rows.iter()
            .find(|r| r.ty == ty && r.n == n)
            .unwrap_or_else(|| panic!("{ty} n{n}"))
    };
    for n in [1, 3] {
        for ty in ["SQ4", "SQ4+S0.45", "SQ3"] {
            let r = row(ty, n);
            assert_eq!(r.status, CellStatus::Ok, "{r:?}");
            assert!(r.emulated);
            // The aarch64 NEON kernel ran, with `sdot` (qemu's Cortex-A76
            // has it, as a Pi 5 does), and its output is right: the f64
            // product with the unquantized weights is the reference, so a
            // wrong lookup or scale shows as a large error.
            assert_eq!(
                r.kernel_path, "codebook-neon-sdot-8row+act:int8x32",
                "{r:?}"
            );
            assert!(r.weight_placement.starts_with("heap/"), "{r:?}");
            assert!(r.median_ns.unwrap() > 0.0 && r.weight_gbps.unwrap() > 0.0);
        }
        // Each error is the quantization's, about what the host measures
        // for the same data (a wrong lookup or scale would be 10x more),
        // and SQ4's is below GGML's 4.5-bit types' by a margin the
        // one-token sampling noise cannot close. (SQ3 against Q3_K, and
        // the outliers' gain, are closer: the benchmark prints them.)
        let nmse = |ty: &str| row(ty, n).nmse.unwrap();
        let all: Vec<(&str, f64)> = ["Q4_0", "IQ4_NL", "Q3_K", "SQ4", "SQ4+S0.45", "SQ3"]
            .into_iter()
            .map(|ty| (ty, nmse(ty)))
            .collect();
        assert!(
            nmse("SQ4") < 1.2e-2 && nmse("SQ4+S0.45") < 1.2e-2,
            "n{n}: {all:?}"
        );
        assert!(nmse("SQ3") < 5e-2, "n{n}: {all:?}");
        // The table-lookup kernels on NEON (`tbl`, `sdot`), three tokens through
        // the same tables' buffers; a wrong plane or table is 1 and more.
        for (ty, bound) in [("LUT2", 0.15), ("LUT3", 5e-2)] {
            let r = row(ty, n);
            assert_eq!(r.status, CellStatus::Ok, "{r:?}");
            assert_eq!(
                r.kernel_path, "lut-neon-sdot-16row+act:int8-table4",
                "{r:?}"
            );
            assert!(nmse(ty) < bound, "n{n} {ty}: {all:?}");
        }
        assert!(
            nmse("SQ4") < nmse("Q4_0") && nmse("SQ4") < nmse("IQ4_NL"),
            "n{n}: {all:?}"
        );
    }
    // Sizes as stored: indices, block scales, codebooks, the sparse part.
    let sq4 = row("SQ4", 1);
    assert!((4.3..4.5).contains(&sq4.bits_per_weight), "{sq4:?}");
    let sparse = row("SQ4+S0.45", 1);
    assert!(
        sparse.bits_per_weight > sq4.bits_per_weight + 0.1,
        "{sparse:?}"
    );
    assert_eq!(
        sq4.weight_bytes as f64 * 8.0,
        sq4.bits_per_weight * (sq4.m * sq4.k) as f64
    );
    let summary = std::fs::read_to_string(run_dir.join("summary.md")).unwrap();
    assert!(
        summary.contains("SQ4+S0.45") && summary.contains("SQ3"),
        "{summary}"
    );
}

/// Two llama.cpp sources on one board: both agents deployed side by side
/// (the running one finds the other by its hash), each build's cells
/// measured by its own binary, a verdict for every cell.
#[test]
fn ab_of_two_llama_cpp_sources_on_an_emulated_board_measures_each_with_its_own_agent() {
    let _guard = testbed().lock().unwrap_or_else(|e| e.into_inner());
    let dir = config_dir(&[]);
    let fixtures = workspace_root().join("fixtures");
    let mut config = std::fs::read_to_string(dir.path().join("bench.toml")).unwrap();
    config.push_str(&format!(
        "\n[model_matrices.mq]\nmodels = [{:?}]\nrecipes = [\"f16\", \"q4_0\"]\ntext = {:?}\ngenerate_tokens = 4\nn_prompt = 8\nn_gen = 2\nrepetitions = 1\n",
        fixtures.join("stories260K.gguf").display().to_string(),
        fixtures.join("stories-eval.txt").display().to_string()
    ));
    std::fs::write(dir.path().join("bench.toml"), config).unwrap();
    let out = xtask(
        dir.path(),
        &[
            "ab",
            "default",
            "crate:0.1.140",
            "--target",
            "sim1",
            "--matrix",
            "micro,mq",
            "--no-noise-floors",
        ],
    );
    assert!(out.status.success(), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("llama.cpp: base llama-cpp-sys-2 0.1.161")
            && stdout.contains("-> new crate:0.1.140 tree "),
        "{}",
        text(&out)
    );
    let rows: Vec<KernelRow> = read_csv(&only_run_dir(dir.path()).join("kernels.csv")).unwrap();
    assert_eq!(rows.len(), 6, "{rows:?}");
    let side = |build: &str| -> Vec<&KernelRow> {
        rows.iter()
            .filter(|r| r.cell_id.ends_with(&format!("@{build}")))
            .collect()
    };
    let (base, new) = (side("default"), side("new"));
    assert_eq!((base.len(), new.len()), (3, 3), "{rows:?}");
    assert!(base.iter().all(|r| r.llama_cpp == "vendored"), "{base:?}");
    assert!(
        new.iter()
            .all(|r| r.llama_cpp.starts_with("crate:0.1.140 tree ")),
        "{new:?}"
    );
    assert_ne!(base[0].agent_build, new[0].agent_build);
    for (b, n) in base.iter().zip(&new) {
        assert_eq!(b.status, n.status, "{b:?} {n:?}");
    }
    assert!(base.iter().any(|r| r.status == CellStatus::Ok));
    // A verdict line for every cell of the matrix.
    for cell in ["F32", "Q4_0", "Q4_K"] {
        assert!(
            stdout
                .lines()
                .any(|l| l.contains(&format!("gemma3-1b.attn_kv/{cell}/n1/t1"))),
            "{cell}: {}",
            text(&out)
        );
    }
    // The model matrix: each build's files judged and timed by its own
    // agent on the board; the recipe 0.1.140 cannot make is
    // not-comparable, saying so.
    let models: Vec<wire::rows::ModelRow> =
        read_csv(&only_run_dir(dir.path()).join("models.csv")).unwrap();
    let f16 = |build: &str| {
        models
            .iter()
            .filter(|r| r.recipe == "f16" && r.build == build)
            .collect::<Vec<_>>()
    };
    let (base, new) = (f16("default"), f16("new"));
    assert_eq!((base.len(), new.len()), (2, 2), "{models:?}");
    for (b, n) in base.iter().zip(&new) {
        assert_eq!((b.status, n.status), (CellStatus::Ok, CellStatus::Ok));
        assert!(b.emulated && n.emulated);
        assert_eq!(b.llama_cpp, "vendored");
        assert!(n.llama_cpp.starts_with("crate:0.1.140 tree "), "{n:?}");
        assert_ne!(b.agent_build, n.agent_build);
        assert!(n.ppl.is_some() && n.avg_ns.is_some(), "{n:?}");
    }
    for test in ["pp8", "tg2"] {
        assert!(
            stdout
                .lines()
                .any(|l| l.contains(&format!("stories260K.gguf/f16/{test}/t"))),
            "{test}: {}",
            text(&out)
        );
        assert!(
            stdout.lines().any(|l| l.starts_with("not-comparable")
                && l.contains(&format!("stories260K.gguf/q4_0/{test}/t"))
                && l.contains("new: not made")),
            "{test}: {}",
            text(&out)
        );
    }
}

#[test]
fn model_matrix_runs_on_an_emulated_board() {
    let _guard = testbed().lock().unwrap_or_else(|e| e.into_inner());
    // sim1 as a Pi 5 whose `vcgencmd` is a stand-in (the PMIC's real
    // output format, on a known schedule).
    let stand_in = tempfile::tempdir().unwrap();
    let vcgencmd = pmic_stand_in(stand_in.path());
    let path = vcgencmd.display().to_string();
    let dir = config_dir(&[("sim1", &move |b: &mut toml::value::Table| {
        b.insert("vcgencmd".into(), path.clone().into());
    })]);
    let fixtures = workspace_root().join("fixtures");
    let mut config = std::fs::read_to_string(dir.path().join("bench.toml")).unwrap();
    config.push_str(&format!(
        "\n[model_matrices.mq]\nmodels = [{:?}]\nrecipes = [\"f32\", \"q8_0\", \"q4_0\", \"adaptive\"]\ntext = {:?}\ngenerate_tokens = 12\nn_prompt = 16\nn_gen = 4\nrepetitions = 1\nn_depth = [0, 32]\nflash_attn = [\"on\"]\nidle_seconds = 1\n",
        fixtures.join("stories260K.gguf").display().to_string(),
        fixtures.join("stories-eval.txt").display().to_string()
    ));
    std::fs::write(dir.path().join("bench.toml"), config).unwrap();
    let out = bench(dir.path(), "sim1", "mq");
    assert!(out.status.success(), "{}", text(&out));
    let rows: Vec<wire::rows::ModelRow> =
        read_csv(&only_run_dir(dir.path()).join("models.csv")).unwrap();
    // Energy from the stand-in's rails: idle at 2 W, tests at 6 W; the
    // wall estimate is the published fit of the rails; a third of each
    // token's energy is the idle board's. Emulated, like the times.
    for r in rows.iter().filter(|r| r.status == CellStatus::Ok) {
        assert_eq!(r.power_source, "pi5-pmic", "{r:?}");
        assert!(r.emulated, "{r:?}");
        let (idle, watts) = (r.idle_power_w.unwrap(), r.power_w.unwrap());
        assert!((idle - PMIC_IDLE_W).abs() < 0.01, "idle {idle}: {r:?}");
        assert!((watts - PMIC_BUSY_W).abs() < 0.01, "{watts}: {r:?}");
        let wall = 1.1451 * PMIC_BUSY_W + 0.5879;
        assert!((r.wall_power_w.unwrap() - wall).abs() < 0.01, "{r:?}");
        let (per_token, above) = (r.j_per_token.unwrap(), r.j_per_token_above_idle.unwrap());
        assert!(
            (above / per_token - (PMIC_BUSY_W - PMIC_IDLE_W) / PMIC_BUSY_W).abs() < 0.01,
            "{r:?}"
        );
        assert!(r.power_samples >= 5 && !r.power_few_samples, "{r:?}");
        // An emulator's host says nothing of the board's heat.
        assert!(r.temp_after_c.is_none() && r.throttled.is_none(), "{r:?}");
    }
    // The reference was computed on the host and shipped to the board (an
    // earlier test on this board may have shipped it already), whose agent
    // judged the recipes against it.
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.lines().any(|l| l.starts_with("sim1: ")
            && l.contains("/reference-128-")
            && (l.contains(" uploaded ") || l.ends_with("already on the board"))),
        "{}",
        text(&out)
    );
    let run = only_run_dir(dir.path());
    let log = std::fs::read_to_string(run.join("boards/sim1/jobs/mq-stories260K_gguf/agent.log"))
        .unwrap();
    assert!(log.contains("reference: the host's, "), "{log}");
    let rows: Vec<wire::rows::ModelRow> = read_csv(&run.join("models.csv")).unwrap();
    for recipe in ["f32", "q8_0", "q4_0", "adaptive"] {
        let r = rows
            .iter()
            .find(|r| r.recipe == recipe && r.n_gen > 0)
            .unwrap_or_else(|| panic!("{recipe}"));
        assert!(
            r.emulated && r.board == "sim1" && r.status == CellStatus::Ok,
            "{r:?}"
        );
        assert!(!r.generated_text.is_empty());
    }
    let kld = |recipe: &str| {
        rows.iter()
            .find(|r| r.recipe == recipe)
            .and_then(|r| r.kld_mean)
            .unwrap()
    };
    assert!(kld("q8_0") < kld("q4_0"));
    // The depth and attention settings crossed the wire and came back in
    // the rows: tests on a KV cache already holding 32 tokens.
    for test in ["tg4", "tg4+d32"] {
        let r = rows
            .iter()
            .find(|r| r.recipe == "q4_0" && r.test == test)
            .unwrap_or_else(|| panic!("{test}: {rows:?}"));
        assert_eq!(r.status, CellStatus::Ok, "{r:?}");
        assert_eq!(r.n_depth, if test == "tg4" { 0 } else { 32 });
        assert_eq!(
            (r.flash_attn.as_str(), r.flash_attn_used.as_str()),
            ("on", "on")
        );
    }
    let kv = |test: &str| {
        rows.iter()
            .find(|r| r.recipe == "q4_0" && r.test == test)
            .and_then(|r| r.kv_bytes)
            .unwrap()
    };
    assert!(kv("tg4+d32") > kv("tg4"));
    // Models are content-addressed on the board: a second run uploads none.
    let again = tempfile::tempdir().unwrap();
    std::fs::copy(
        dir.path().join("bench.toml"),
        again.path().join("bench.toml"),
    )
    .unwrap();
    let out = bench(again.path(), "sim1", "mq");
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        !String::from_utf8_lossy(&out.stderr).contains("sim1: uploaded"),
        "{}",
        text(&out)
    );
}

/// The stand-in's schedule: 2 W for the first seconds after its first call
/// (the agent's idle window of 1 s), 6 W from then on.
const PMIC_IDLE_W: f64 = 2.0;
const PMIC_BUSY_W: f64 = 6.0;

/// A `vcgencmd` that prints a Pi 5's `pmic_read_adc` (every rail, the
/// firmware's layout) whose rails sum to the schedule's power: VDD_CORE
/// at 0.8 V carries all of it but 0.5 W on 3V3_SYS.
fn pmic_stand_in(dir: &Path) -> std::path::PathBuf {
    let script = dir.join("vcgencmd");
    let rails = [
        ("3V7_WL_SW", 0, 8, "3.70000000"),
        ("3V3_SYS", 1, 9, "3.30000000"),
        ("1V8_SYS", 2, 10, "1.80000000"),
        ("DDR_VDD2", 3, 11, "1.10000000"),
        ("DDR_VDDQ", 4, 12, "0.60000000"),
        ("1V1_SYS", 5, 13, "1.10000000"),
        ("0V8_SW", 6, 14, "0.80000000"),
        ("VDD_CORE", 7, 15, "0.80000000"),
        ("3V3_DAC", 17, 20, "3.30000000"),
        ("3V3_ADC", 18, 21, "3.30000000"),
        ("0V8_AON", 16, 19, "0.80000000"),
        ("HDMI", 22, 23, "5.10000000"),
    ];
    let mut awk = String::new();
    for (name, a, _, _) in rails {
        let amps = match name {
            "3V3_SYS" => "sys_a",
            "VDD_CORE" => "core_a",
            _ => "0",
        };
        awk.push_str(&format!(
            "printf \"%16s current({a})=%.8fA\\n\", \"{name}_A\", {amps};\n"
        ));
    }
    for (name, _, v, volts) in rails {
        awk.push_str(&format!(
            "printf \"%16s volt({v})={volts}V\\n\", \"{name}_V\";\n"
        ));
    }
    awk.push_str("printf \"%16s volt(24)=5.10000000V\\n%16s volt(25)=0.00000000V\\n\", \"EXT5V_V\", \"BATT_V\";\n");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\n[ \"$1\" = pmic_read_adc ] || {{ echo 'error=1 error_msg=\"Command not registered\"'; exit 0; }}\nstate={state}\nnow=$(date +%s.%N)\n[ -s \"$state\" ] || echo \"$now\" > \"$state\"\nawk -v now=\"$now\" -v start=\"$(cat \"$state\")\" 'BEGIN {{\nwatts = (now - start < 3) ? {PMIC_IDLE_W} : {PMIC_BUSY_W};\nsys_a = 0.5 / 3.3; core_a = (watts - 0.5) / 0.8;\n{awk}}}'\n",
            state = dir.join("first-call").display()
        ),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    script
}

#[test]
fn dropped_connection_mid_run_loses_nothing() {
    let _guard = testbed().lock().unwrap_or_else(|e| e.into_inner());
    let dir = config_dir(&[]);
    let (child, _) = start_slow_run_on_sim2(dir.path(), 1);
    // Kill the board's per-connection sshd processes (children of its
    // listener): the host's session dies, the detached agent does not.
    let listener =
        std::fs::read_to_string(workspace_root().join(".testbed/sim2/sshd.pid")).unwrap();
    assert!(Command::new("pkill")
        .args(["-P", listener.trim()])
        .status()
        .unwrap()
        .success());
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("reconnecting"),
        "{}",
        text(&out)
    );
    let rows: Vec<KernelRow> = read_csv(&only_run_dir(dir.path()).join("kernels.csv")).unwrap();
    assert_eq!(rows.len(), 6);
    assert!(rows.iter().all(|r| r.status == CellStatus::Ok), "{rows:?}");
}

#[test]
fn model_too_large_for_the_board_is_refused_before_upload() {
    let _guard = testbed().lock().unwrap_or_else(|e| e.into_inner());
    let work = tempfile::tempdir().unwrap();
    let work_dir = work.path().display().to_string();
    let dir = config_dir(&[("small", &|b| {
        b.insert("max_memory_mb".into(), toml::Value::Integer(1));
        b.insert("work_dir".into(), work_dir.clone().into());
    })]);
    let fixtures = workspace_root().join("fixtures");
    let mut config = std::fs::read_to_string(dir.path().join("bench.toml")).unwrap();
    config.push_str(&format!(
        "\n[model_matrices.mq]\nmodels = [{:?}]\nrecipes = [\"f32\", \"q8_0\"]\ntext = {:?}\n",
        fixtures.join("stories260K.gguf").display().to_string(),
        fixtures.join("stories-eval.txt").display().to_string()
    ));
    std::fs::write(dir.path().join("bench.toml"), config).unwrap();
    let out = bench(dir.path(), "small", "mq");
    assert!(!out.status.success());
    let all = text(&out);
    assert!(
        all.contains("needs about") && all.contains("max_memory_mb"),
        "{all}"
    );
    assert!(
        !work.path().join("models").exists(),
        "nothing uploaded: {all}"
    );
}

#[test]
fn a_synthetic_model_runs_on_an_emulated_board_and_one_whose_own_memory_is_too_small_refuses_it() {
    let _guard = testbed().lock().unwrap_or_else(|e| e.into_inner());
    // A board that reports 64 MB of memory: its agent runs in a mount
    // namespace whose /proc/meminfo says so (no `max_memory_mb` declared).
    let scripts = tempfile::tempdir().unwrap();
    let meminfo = scripts.path().join("meminfo");
    std::fs::write(
        &meminfo,
        "MemTotal:          65536 kB\nMemFree:           65536 kB\nMemAvailable:      65536 kB\n",
    )
    .unwrap();
    let runner = scripts.path().join("small-board.sh");
    std::fs::write(
        &runner,
        format!(
            "#!/bin/sh\nexec unshare -m sh -c 'mount --bind \"$0\" /proc/meminfo && exec qemu-aarch64 -cpu cortex-a76 \"$@\"' {} \"$@\"\n",
            meminfo.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&runner, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let runner = runner.display().to_string();
    let work = tempfile::tempdir().unwrap();
    let work_dir = work.path().display().to_string();
    let dir = config_dir(&[("small", &|b| {
        b.insert(
            "runner".into(),
            toml::Value::Array(vec![toml::Value::String(runner.clone())]),
        );
        b.insert("work_dir".into(), work_dir.clone().into());
    })]);
    let fixtures = workspace_root().join("fixtures");
    let mut config = std::fs::read_to_string(dir.path().join("bench.toml")).unwrap();
    config.push_str(&format!(
        "\n[model_matrices.syn]\nmodels = [\"synthetic:distilgpt2:1\"]\nrecipes = [\"f32\", \"q4_0\"]\ntext = {:?}\nctx = 32\nprompt = \"The future of artificial intelligence is\"\ngenerate_tokens = 0\nn_prompt = 8\nn_gen = 4\nrepetitions = 1\n",
        fixtures.join("stories-eval.txt").display().to_string()
    ));
    std::fs::write(dir.path().join("bench.toml"), config).unwrap();
    let out = bench(dir.path(), "sim1,small", "syn");
    let all = text(&out);
    assert!(!out.status.success(), "the small board fails: {all}");
    assert!(
        all.contains("needs about") && all.contains("0.067 GB of memory to plan for"),
        "{all}"
    );
    assert!(
        !work.path().join("models").exists(),
        "nothing uploaded to the small board: {all}"
    );
    let rows: Vec<wire::rows::ModelRow> =
        read_csv(&only_run_dir(dir.path()).join("models.csv")).unwrap();
    let emulated: Vec<_> = rows.iter().filter(|r| r.board == "sim1").collect();
    assert_eq!(emulated.len(), 4, "{rows:?}");
    for r in &emulated {
        assert!(
            r.status == CellStatus::Ok && r.synthetic && r.emulated,
            "{r:?}"
        );
        eprintln!(
            "emulated sim1, synthetic distilgpt2 (1 block) {} {}: {:.2} s per token",
            r.recipe,
            r.test,
            1.0 / r.avg_ts.unwrap()
        );
    }
}

fn bench_waiting(dir: &Path, target: &str, matrix: &str, lock_wait: u64) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_quantbench"));
    command.current_dir(dir).args([
        "bench",
        "--target",
        target,
        "--matrix",
        matrix,
        "--lock-wait",
        &lock_wait.to_string(),
    ]);
    command
}

/// Another results folder with the same bench.toml, as a second user has.
fn second_user(dir: &Path) -> tempfile::TempDir {
    let other = tempfile::tempdir().unwrap();
    std::fs::copy(dir.join("bench.toml"), other.path().join("bench.toml")).unwrap();
    other
}

#[test]
fn a_second_run_on_a_busy_board_fails_naming_the_holder_or_waits_its_turn() {
    let _guard = testbed().lock().unwrap_or_else(|e| e.into_inner());
    // A work dir of its own, so the waiting run's model is new to the board
    // and no earlier test's run names it.
    let work = tempfile::tempdir().unwrap();
    let work_dir = work.path().display().to_string();
    let dir = config_dir(&[("busy", &|b| {
        b.insert("work_dir".into(), work_dir.clone().into());
        b.insert("keep_runs".into(), toml::Value::Integer(1));
    })]);
    let fixtures = workspace_root().join("fixtures");
    let mut config = std::fs::read_to_string(dir.path().join("bench.toml")).unwrap();
    config.push_str(&format!(
        "\n[model_matrices.mq1]\nmodels = [{:?}]\nrecipes = [\"q8_0\"]\ntext = {:?}\ngenerate_tokens = 4\nn_prompt = 8\nn_gen = 2\nrepetitions = 1\n",
        fixtures.join("stories260K.gguf").display().to_string(),
        fixtures.join("stories-eval.txt").display().to_string()
    ));
    std::fs::write(dir.path().join("bench.toml"), config).unwrap();
    // The host agent that quantizes recipes, built before the holder starts.
    harness::builds::build::build_host_agent(
        &workspace_root(),
        &harness::builds::llama_source::vendored(&workspace_root()).unwrap(),
    )
    .expect("the host agent builds");
    let slow = start_slow_run(dir.path(), "busy", &work_dir, 1);
    // The impatient run prepares what the patient one needs (quantizing
    // its recipe into the host's cache), so the patient one reaches the
    // board while the holder still measures.
    let impatient = second_user(dir.path());
    let busy = bench_waiting(impatient.path(), "busy", "mq1,micro", 0)
        .output()
        .unwrap();
    let all = text(&busy);
    assert!(!busy.status.success(), "{all}");
    assert!(
        all.contains("busy is busy") && all.contains("-slow") && all.contains("--lock-wait"),
        "{all}"
    );
    // The waiting run has a model and recipe files to upload; the holder
    // prunes the board (keep_runs = 1) when its job ends, while the waiter
    // still waits. Uploaded before the lock, they would be gone.
    let patient = second_user(dir.path());
    let waiter = bench_waiting(patient.path(), "busy", "mq1,micro", 300)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let slow_out = slow.wait_with_output().unwrap();
    assert!(slow_out.status.success(), "{}", text(&slow_out));
    let waited = waiter.wait_with_output().unwrap();
    assert!(waited.status.success(), "{}", text(&waited));
    assert!(text(&waited).contains("busy with"), "{}", text(&waited));
    let models: Vec<wire::rows::ModelRow> =
        read_csv(&only_run_dir(patient.path()).join("models.csv")).unwrap();
    assert!(
        !models.is_empty() && models.iter().all(|r| r.status == CellStatus::Ok),
        "{models:?}"
    );
    // Timings never overlap: the waiting run's first cell ended after the
    // holder's last.
    let holder: Vec<KernelRow> = read_csv(&only_run_dir(dir.path()).join("kernels.csv")).unwrap();
    let second: Vec<KernelRow> =
        read_csv(&only_run_dir(patient.path()).join("kernels.csv")).unwrap();
    let holder_last = holder.iter().map(|r| r.finished_at.clone()).max().unwrap();
    let second_first = models
        .iter()
        .map(|r| r.finished_at.clone())
        .chain(second.iter().map(|r| r.finished_at.clone()))
        .min()
        .unwrap();
    assert!(
        second_first >= holder_last,
        "{second_first} < {holder_last}"
    );
    assert_eq!(second.len(), 3);
    // Q4_K cannot hold K=1152 (unsupported); nothing failed.
    assert!(
        second.iter().all(|r| r.status != CellStatus::Failed),
        "{second:?}"
    );
}

#[test]
fn an_orphaned_agent_keeps_its_board_until_it_ends_then_the_lock_is_taken_over() {
    let _guard = testbed().lock().unwrap_or_else(|e| e.into_inner());
    let dir = config_dir(&[]);
    let (mut host, work) = start_slow_run_on_sim2(dir.path(), 1);
    // The host process dies (a CI job cancelled); its agent goes on.
    host.kill().unwrap();
    host.wait().unwrap();
    let other = second_user(dir.path());
    let busy = bench_waiting(other.path(), "sim2", "micro", 0)
        .output()
        .unwrap();
    assert!(!busy.status.success(), "{}", text(&busy));
    assert!(text(&busy).contains("sim2 is busy"), "{}", text(&busy));
    // Once the orphan ends, its lock is stale and the next run takes it.
    let newest_run = std::fs::read_dir(format!("{work}/runs"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.to_string_lossy().ends_with("-slow"))
        .max_by_key(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok())
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(300);
    while !newest_run.join("exit_code").exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "the orphan never ended"
        );
        std::thread::sleep(std::time::Duration::from_millis(500));
    }
    let after = second_user(dir.path());
    let out = bench_waiting(after.path(), "sim2", "micro", 30)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
}

#[test]
fn truncated_cached_agent_is_detected_deleted_and_uploaded_again() {
    let _guard = testbed().lock().unwrap_or_else(|e| e.into_inner());
    let work = tempfile::tempdir().unwrap();
    let work_dir = work.path().display().to_string();
    let dir = config_dir(&[("fresh", &|b| {
        b.insert("work_dir".into(), work_dir.clone().into());
    })]);
    let first = bench(dir.path(), "fresh", "micro");
    assert!(first.status.success(), "{}", text(&first));
    let agent = std::fs::read_dir(work.path().join("agents"))
        .unwrap()
        .flatten()
        .next()
        .unwrap()
        .path()
        .join("quantbench-agent");
    let intact = std::fs::metadata(&agent).unwrap().len();
    // What a power cut during a copy leaves: the right name, half the bytes.
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(&agent)
        .unwrap();
    file.set_len(intact / 2).unwrap();
    drop(file);

    let second = bench(dir.path(), "fresh", "micro");
    let all = text(&second);
    assert!(second.status.success(), "{all}");
    assert!(all.contains("does not match its SHA-256"), "{all}");
    assert_eq!(
        std::fs::metadata(&agent).unwrap().len(),
        intact,
        "uploaded again"
    );
}

#[test]
fn kernel_cell_too_large_for_the_board_is_unsupported_and_the_rest_runs() {
    let _guard = testbed().lock().unwrap_or_else(|e| e.into_inner());
    let dir = config_dir(&[("small", &|b| {
        b.insert("max_memory_mb".into(), toml::Value::Integer(256));
    })]);
    let mut config = std::fs::read_to_string(dir.path().join("bench.toml")).unwrap();
    // ffn_down of Llama-3-8B needs about 320 MB at Q4_0 (f32 weights alone
    // are 235 MB); the KV projection a few MB.
    config.push_str(
        "\n[matrices.memory]\ntypes = [\"Q4_0\"]\nshapes = [\"llama3-8b.ffn_down\", \"gemma3-1b.attn_kv\"]\nbatches = [1]\nthreads = [1]\nwarmup = 0\nmin_reps = 1\nmin_time_ms = 0\nmax_time_ms = 100\n",
    );
    std::fs::write(dir.path().join("bench.toml"), config).unwrap();
    let out = bench(dir.path(), "small", "memory");
    assert!(out.status.success(), "{}", text(&out));
    let rows: Vec<KernelRow> = read_csv(&only_run_dir(dir.path()).join("kernels.csv")).unwrap();
    assert_eq!(rows.len(), 2, "{rows:?}");
    let big = rows
        .iter()
        .find(|r| r.shape == "llama3-8b.ffn_down")
        .unwrap();
    assert_eq!(big.status, CellStatus::Unsupported, "{big:?}");
    assert!(
        big.note.contains("needs about") && big.note.contains("max_memory_mb allows 256 MB"),
        "{big:?}"
    );
    let small = rows
        .iter()
        .find(|r| r.shape == "gemma3-1b.attn_kv")
        .unwrap();
    assert_eq!(small.status, CellStatus::Ok, "{small:?}");
}

#[test]
fn kernel_and_model_matrices_run_into_one_run_on_two_boards_at_once() {
    let _guard = testbed().lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    // The repository's own matrices; its fixture paths resolve from the
    // workspace.
    std::fs::copy(
        workspace_root().join("bench.toml"),
        dir.path().join("bench.toml"),
    )
    .unwrap();
    let out = bench(dir.path(), "testbed", "smoke,model-quick");
    assert!(out.status.success(), "{}", text(&out));
    let run_dir = only_run_dir(dir.path());
    let kernel_rows: Vec<KernelRow> = read_csv(&run_dir.join("kernels.csv")).unwrap();
    let model_rows: Vec<wire::rows::ModelRow> = read_csv(&run_dir.join("models.csv")).unwrap();
    for board in ["sim1", "sim2"] {
        // smoke: 2 shapes x 4 types x 2 batches x 2 thread counts.
        let kernels = kernel_rows.iter().filter(|r| r.board == board).count();
        assert_eq!(kernels, 32, "{board}");
        for recipe in ["f32", "q8_0", "q4_0", "adaptive"] {
            let row = model_rows
                .iter()
                .find(|r| r.board == board && r.recipe == recipe && r.n_gen > 0)
                .unwrap_or_else(|| panic!("{board} {recipe}"));
            assert!(row.emulated && row.status == CellStatus::Ok, "{row:?}");
        }
        // The kernel job's probe (with the measured bandwidth) is kept.
        let probe: wire::probe::BoardProbe =
            wire::files::read_json(&run_dir.join(format!("boards/{board}/probe.json"))).unwrap();
        assert!(probe.read_bandwidth_gbps.is_some(), "{probe:?}");
    }
    let manifest: RunManifest = wire::files::read_json(&run_dir.join("run.json")).unwrap();
    let kinds: Vec<(&str, &str)> = manifest
        .matrices
        .iter()
        .map(|m| (m.name.as_str(), m.kind.as_str()))
        .collect();
    assert_eq!(kinds, [("smoke", "kernel"), ("model-quick", "model")]);
    assert!(manifest.finished_at.is_some());
    let model_span = |board: &str| {
        let b = manifest.boards.iter().find(|b| b.board == board).unwrap();
        assert!(b.started_at.is_some() && b.finished_at.is_some(), "{b:?}");
        assert_eq!(b.jobs.len(), 2, "{b:?}");
        let job = b.jobs.iter().find(|j| j.kind == "model").unwrap();
        assert!(job.error.is_none() && job.ok == 4, "{job:?}");
        (job.started_at.clone(), job.finished_at.clone())
    };
    let (start1, end1) = model_span("sim1");
    let (start2, end2) = model_span("sim2");
    // Same RFC 3339 format with milliseconds: strings order as times.
    assert!(
        start1 < end2 && start2 < end1,
        "model jobs overlapped: sim1 {start1}..{end1}, sim2 {start2}..{end2}"
    );
    for plot in ["speedup_vs_f32", "model_kld_vs_bits"] {
        assert!(run_dir.join(format!("plots/{plot}.svg")).exists(), "{plot}");
    }
}

#[test]
fn host_killed_mid_run_is_resumed_by_following_its_still_running_agent() {
    let _guard = testbed().lock().unwrap_or_else(|e| e.into_inner());
    let dir = config_dir(&[]);
    let (mut child, _) = start_slow_run_on_sim2(dir.path(), 2);
    // Let the host mirror those rows (it polls twice a second).
    std::thread::sleep(std::time::Duration::from_millis(1500));
    // A resume typed while the run is alive is refused, naming the holder,
    // and changes nothing.
    let early = resume(dir.path());
    let all = text(&early);
    assert!(!early.status.success(), "{all}");
    assert!(
        all.contains("in use by another quantbench process")
            && all.contains(&format!("pid {}", child.id())),
        "{all}"
    );
    child.kill().unwrap(); // SIGKILL: no clean-up of any kind
    child.wait().unwrap();
    let run_dir = only_run_dir(dir.path());
    let before: Vec<KernelRow> = read_csv(&run_dir.join("boards/sim2/jobs/slow/kernels.csv"))
        .expect("rows reached the host's disk before it was killed");
    assert!(!before.is_empty());

    let out = resume(dir.path());
    let all = text(&out);
    assert!(out.status.success(), "{all}");
    assert!(all.contains("still running: following it"), "{all}");
    let rows = assert_every_slow_cell_once(&run_dir);
    // Rows the killed host had were kept as they were.
    for kept in &before {
        assert!(rows.contains(kept), "{kept:?}");
    }
    let manifest: RunManifest = wire::files::read_json(&run_dir.join("run.json")).unwrap();
    assert_eq!(manifest.resumed_at.len(), 1);
    assert!(manifest.finished_at.is_some());
    assert_eq!(manifest.boards[0].ok, 6, "{:?}", manifest.boards);
}

#[test]
fn host_and_agent_killed_then_resume_measures_only_the_cells_without_a_row() {
    let _guard = testbed().lock().unwrap_or_else(|e| e.into_inner());
    let dir = config_dir(&[]);
    let (mut child, work) = start_slow_run_on_sim2(dir.path(), 2);
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(Command::new("pkill")
        .args(["-9", "-f", &format!("{work}/agents/")])
        .status()
        .unwrap()
        .success());
    let run_dir = only_run_dir(dir.path());
    // What the board finished before the agent died, by the board's copy.
    let board_run = std::fs::read_dir(format!("{work}/runs"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with(run_dir.file_name().unwrap().to_str().unwrap())
        })
        .expect("the run's folder on the board");
    let finished: Vec<KernelRow> = read_csv(&board_run.join("kernels.csv")).unwrap();
    assert!((2..6).contains(&finished.len()), "{finished:?}");

    let out = resume(dir.path());
    let all = text(&out);
    assert!(out.status.success(), "{all}");
    // Killed with the agent or not, its shell may end a moment later.
    assert!(
        all.contains("ended with status") || all.contains("still running"),
        "{all}"
    );
    let rows = assert_every_slow_cell_once(&run_dir);
    // The cells finished before were collected, not measured again.
    for done in &finished {
        let now = rows.iter().find(|r| r.cell_id == done.cell_id).unwrap();
        assert_eq!(now, done);
    }
    // Resuming a finished run measures nothing more.
    let again = resume(dir.path());
    assert!(again.status.success(), "{}", text(&again));
    assert_eq!(
        read_csv::<KernelRow>(&run_dir.join("kernels.csv")).unwrap(),
        rows
    );
}

#[test]
fn a_board_run_folder_cleaned_while_the_host_was_down_keeps_the_host_rows_and_measures_the_rest() {
    let _guard = testbed().lock().unwrap_or_else(|e| e.into_inner());
    let dir = config_dir(&[]);
    let (mut child, work) = start_slow_run_on_sim2(dir.path(), 2);
    std::thread::sleep(std::time::Duration::from_millis(1500));
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(Command::new("pkill")
        .args(["-9", "-f", &format!("{work}/agents/")])
        .status()
        .unwrap()
        .success());
    let run_dir = only_run_dir(dir.path());
    let before: Vec<KernelRow> =
        read_csv(&run_dir.join("boards/sim2/jobs/slow/kernels.csv")).unwrap();
    assert!(!before.is_empty());
    // The board's run folder is cleaned (a person, a prune, a reboot of a
    // tmpfs); the resumed run's agent starts there afresh, and its file is
    // shorter than, or spliced differently from, the host's copy.
    let board_run = std::fs::read_dir(format!("{work}/runs"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with(run_dir.file_name().unwrap().to_str().unwrap())
        })
        .expect("the run's folder on the board");
    std::fs::remove_dir_all(&board_run).unwrap();

    let out = resume(dir.path());
    let all = text(&out);
    assert!(out.status.success(), "{all}");
    assert!(
        all.contains("its run folder was cleaned, replaced or re-imaged"),
        "{all}"
    );
    let rows = assert_every_slow_cell_once(&run_dir);
    for kept in &before {
        assert!(rows.contains(kept), "{kept:?}");
    }
}

/// Waits for `child` and returns its exit status and peak resident memory
/// in KiB (its own, from the kernel's accounting).
fn wait_with_peak_memory(child: std::process::Child) -> (i32, i64) {
    let mut status = 0;
    // SAFETY: an all-zero rusage is a valid value to be filled in.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: waits for our own child by pid, with valid out-pointers.
    let pid = unsafe { libc::wait4(child.id() as i32, &mut status, 0, &mut usage) };
    assert_eq!(pid, child.id() as i32);
    (status, usage.ru_maxrss)
}

#[test]
fn a_board_flooding_its_output_is_followed_in_bounded_memory_with_its_reason_cut() {
    let _guard = testbed().lock().unwrap_or_else(|e| e.into_inner());
    // A hostile "agent": 150 MB of progress output and 150 MB of log, each
    // one line, then a failure.
    let work = tempfile::tempdir().unwrap();
    let work_dir = work.path().display().to_string();
    // The board's filesystem is this machine's: the runner script lies in
    // a folder of its own beside the work dir.
    let script_dir = tempfile::tempdir().unwrap();
    let flood = script_dir.path().join("flood.sh");
    std::fs::write(
        &flood,
        "head -c 150000000 /dev/zero | tr '\\0' x\nhead -c 150000000 /dev/zero | tr '\\0' y >&2\nexit 3\n",
    )
    .unwrap();
    let flood = flood.display().to_string();
    let dir = config_dir(&[("flood", &|b| {
        b.insert("work_dir".into(), work_dir.clone().into());
        b.insert(
            "runner".into(),
            toml::Value::Array(
                ["sh", flood.as_str()]
                    .iter()
                    .map(|s| toml::Value::String(s.to_string()))
                    .collect(),
            ),
        );
    })]);
    let child = Command::new(env!("CARGO_BIN_EXE_quantbench"))
        .current_dir(dir.path())
        .args(["bench", "--target", "flood", "--matrix", "micro"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let (status, peak_kib) = wait_with_peak_memory(child);
    assert_ne!(status, 0);
    // Everything the board wrote is on the host's disk, streamed.
    let job = only_run_dir(dir.path()).join("boards/flood/jobs/micro");
    for (file, len) in [("progress.jsonl", 150_000_000), ("agent.log", 150_000_000)] {
        assert_eq!(
            std::fs::metadata(job.join(file)).unwrap().len(),
            len,
            "{file}"
        );
    }
    // Held whole, either flood alone would take 150 MB.
    assert!(peak_kib < 100_000, "peak resident memory {peak_kib} KiB");
    let summary =
        std::fs::read_to_string(only_run_dir(dir.path()).join("summary.md")).unwrap_or_default();
    let manifest: RunManifest =
        wire::files::read_json(&only_run_dir(dir.path()).join("run.json")).unwrap();
    let error = manifest.boards[0].error.clone().unwrap_or_default();
    assert!(
        error.contains("exited with status 3")
            && error.contains("more bytes)")
            && error.len() < 2_000,
        "{error}\n{summary}"
    );
}
