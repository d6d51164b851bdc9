//! Our own kernels' unit tests (`kernels`' codebook and table-lookup
//! tests: every element of the multi-row GEMVs against the scalar
//! references, the widening path against `sdot`) cross-compiled for a Pi 5 as the agent is and run
//! under `qemu-aarch64 -cpu cortex-a76`: the NEON code is otherwise only
//! reached through an emulated board's kernel matrix, which checks an
//! NMSE, not each row.

use std::process::Command;

#[test]
fn codebook_and_table_lookup_kernel_tests_pass_on_an_emulated_cortex_a76() {
    use harness::builds::build::{board_cargo, board_target_dir, workspace_root, BoardProfile};
    let workspace = workspace_root();
    let profile = BoardProfile::Pi5;
    let target_dir = board_target_dir(&workspace, profile);
    // The agent's own build settings, so GGML compiled for the agent is
    // reused (a minute the first time on 2 cores, seconds after).
    let out = board_cargo(&target_dir, profile)
        .unwrap()
        .current_dir(&workspace)
        .args(["test", "--release", "--package", "kernels", "--lib"])
        .args(["--features", "static-stdcxx", "--no-run"])
        .args(["--message-format", "json", "--target"])
        .arg(profile.target_triple())
        .arg("--target-dir")
        .arg(&target_dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let executable = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|m| m["reason"] == "compiler-artifact" && m["target"]["name"] == "kernels")
        .find_map(|m| m["executable"].as_str().map(String::from))
        .expect("the kernels test executable");
    let run = Command::new("qemu-aarch64")
        .args(["-cpu", "cortex-a76", &executable, "codebook", "lut::"])
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&run.stdout);
    assert!(
        run.status.success(),
        "{report}{}",
        String::from_utf8_lossy(&run.stderr)
    );
    // The kernels' own tests ran, the aarch64-only one among them.
    for test in [
        "kernels_match_the_f64_reference_of_the_decoded_matrix ... ok",
        "the_widening_kernel_gives_what_sdot_gives ... ok",
        "lut::tests::every_kernel_agrees_with_the_scalar_reference_and_the_f64_product ... ok",
    ] {
        assert!(report.contains(test), "{report}");
    }
}
