//! Static throughput estimates of the kernels' hot loops, from LLVM's
//! machine-code analyzer: where no Pi is attached, the nearest thing to a
//! Cortex-A76 figure. The agent a board runs is disassembled
//! (`llvm-objdump`), each named kernel's innermost loop is found (the
//! largest loop that holds no other), checked against the instructions it
//! must hold (so a compiler that unrolls differently is caught, not
//! silently mis-scaled), and given to `llvm-mca`, whose cycles per
//! iteration over the weights one iteration covers give cycles per 32
//! weights.
//!
//! A model estimate, not a measurement: llvm-mca simulates the core's
//! pipelines with every load hitting L1. It does not model memory
//! bandwidth (which bounds a Pi 5's decode on DRAM-sized matrices), cache
//! misses, the loop's set-up, the activations' quantization or tables, or
//! threads.

use std::collections::HashMap;
use std::path::Path;
use std::process::Command;

#[derive(Debug, thiserror::Error)]
pub enum CyclesError {
    #[error("{tool} could not run ({reason}); it comes with Debian's llvm-19 package: `apt-get install llvm-19`")]
    Tool { tool: String, reason: String },
    #[error("{tool} failed: {stderr}")]
    Failed { tool: String, stderr: String },
    #[error("{binary}: no function `{symbol}` (built without it, or renamed)")]
    Symbol { binary: String, symbol: String },
    #[error("{kernel}: {reason}")]
    Loop { kernel: String, reason: String },
    #[error("{path}: {reason} (give a run folder of a kernel matrix measured on `local`)")]
    Measured { path: String, reason: String },
    #[error("llvm-mca printed no `{0}` line")]
    Parse(&'static str),
    #[error("llvm-mca gives the same cycles for -mcpu={cpu} as for -mcpu={other} on every loop: this LLVM has no scheduling model of its own for {cpu}; install llvm-19 (Debian 12's default LLVM is 14)")]
    SameModel { cpu: String, other: String },
}

/// The model that stands for a Pi 5's Cortex-A76: LLVM (to 19 at least)
/// schedules `-mcpu=cortex-a76` with its Cortex-A57 model (every figure
/// the same, which the command checks and says), while its Neoverse N1
/// model is its own, and the N1 is the Cortex-A76's pipelines in a server
/// core (Arm's "Ares"): the same 4-wide decode, two ASIMD pipes, two load
/// pipes.
pub const A76_MODEL: &str = "neoverse-n1";

/// One kernel's hot loop: where it is and how much work an iteration is.
#[derive(Debug, Clone, Copy)]
pub struct KernelLoop {
    /// What the table calls it.
    pub kernel: &'static str,
    /// The function, demangled, without Rust's hash.
    pub symbol: &'static str,
    /// Weights one iteration of the innermost loop multiplies (rows x
    /// columns), from the source.
    pub weights_per_iteration: usize,
    /// Instructions the loop holds exactly `count` of (any of the
    /// mnemonics), read from the source: how the right loop is known.
    pub signature: (&'static [&'static str], usize),
    /// The kernel-matrix rows that time this loop: their `type` and the
    /// start of their `kernel_path`.
    pub row: (&'static str, &'static str),
}

/// The aarch64 agent's kernels: ours and the GGML loops llama.cpp runs on
/// a Cortex-A76 (with `dotprod`).
pub const AARCH64_LOOPS: &[KernelLoop] = &[
    KernelLoop {
        // One block of 32 columns for 16 rows: 8 tables, two `tbl` each
        // (rows 0-7, 8-15), two `sdot` after each pair of `tbl` (their
        // multipliers the 16-weight scales, gathered by 8 more `tbl`; 2
        // more gather the minimums).
        kernel: "LUT2 (ours, NEON tbl + sdot)",
        symbol: "kernels::lut::simd::neon_sdot::lut2",
        weights_per_iteration: 16 * 32,
        signature: (&["sdot"], 16),
        row: ("LUT2", "lut-neon-sdot"),
    },
    KernelLoop {
        // As LUT2 plus the third plane: 8 more `sdot`.
        kernel: "LUT3 (ours, NEON tbl + sdot)",
        symbol: "kernels::lut::simd::neon_sdot::lut3",
        weights_per_iteration: 16 * 32,
        signature: (&["sdot"], 24),
        row: ("LUT3", "lut-neon-sdot"),
    },
    KernelLoop {
        // One block of 32 columns for 8 rows: each row's indices looked
        // up in its codebook by two `tbl`, then two `sdot` with the
        // activations loaded once for the eight.
        kernel: "SQ4 (ours, NEON tbl + sdot)",
        symbol: "kernels::codebook::groups::simd::sq4_sdot",
        weights_per_iteration: 8 * 32,
        signature: (&["sdot"], 16),
        row: ("SQ4", "codebook-neon-sdot"),
    },
    KernelLoop {
        // As SQ4, the 3-bit indices unpacked by shifts and a bit test.
        kernel: "SQ3 (ours, NEON tbl + sdot)",
        symbol: "kernels::codebook::groups::simd::sq3_sdot",
        weights_per_iteration: 8 * 32,
        signature: (&["sdot"], 16),
        row: ("SQ3", "codebook-neon-sdot"),
    },
    KernelLoop {
        // Without dotprod (a Pi 4): the same `tbl`, then `sadalp`, and
        // four `tbl` gathering the 16-weight scales and minimums for
        // `smlal`.
        kernel: "LUT2 (ours, NEON tbl + sadalp)",
        symbol: "kernels::lut::simd::neon::lut2",
        weights_per_iteration: 16 * 32,
        signature: (&["tbl"], 20),
        row: ("LUT2", "lut-neon-16row"),
    },
    KernelLoop {
        kernel: "LUT3 (ours, NEON tbl + sadalp)",
        symbol: "kernels::lut::simd::neon::lut3",
        weights_per_iteration: 16 * 32,
        signature: (&["tbl"], 32),
        row: ("LUT3", "lut-neon-16row"),
    },
    KernelLoop {
        // `ggml-cpu/arch/arm/quants.c`: two blocks of 32 an iteration,
        // two `sdot` each.
        kernel: "Q4_0 (GGML vec_dot_q4_0_q8_0)",
        symbol: "ggml_vec_dot_q4_0_q8_0",
        weights_per_iteration: 64,
        signature: (&["sdot"], 4),
        row: ("Q4_0", "CPU_Mapped"),
    },
    KernelLoop {
        // `ggml-cpu/arch/arm/repack.cpp`: one block of 4 interleaved rows
        // x 32 columns an iteration, 8 indexed `sdot`.
        kernel: "Q4_0 repacked 4x4 (GGML gemv_q4_0_4x4_q8_0)",
        symbol: "ggml_gemv_q4_0_4x4_q8_0",
        weights_per_iteration: 4 * 32,
        signature: (&["sdot"], 8),
        row: ("Q4_0", "CPU_REPACK"),
    },
];

/// The host agent's (x86-64) kernels, for checking the method against
/// measured times.
pub const X86_LOOPS: &[KernelLoop] = &[
    KernelLoop {
        // One block of 32 columns for 16 rows: 4 loads of two subgroups'
        // plane pairs, two `vpshufb` each.
        kernel: "LUT2 (ours, AVX2 vpshufb)",
        symbol: "kernels::lut::simd::avx2::lut2",
        weights_per_iteration: 16 * 32,
        signature: (&["vpshufb"], 8),
        row: ("LUT2", "lut-avx2"),
    },
    KernelLoop {
        kernel: "LUT3 (ours, AVX2 vpshufb)",
        symbol: "kernels::lut::simd::avx2::lut3",
        weights_per_iteration: 16 * 32,
        signature: (&["vpshufb"], 16),
        row: ("LUT3", "lut-avx2"),
    },
    KernelLoop {
        // One block of 32 columns for 8 rows: each pair of rows' indices
        // looked up in their codebooks by two `vpshufb`.
        kernel: "SQ4 (ours, AVX2 vpshufb)",
        symbol: "kernels::codebook::groups::simd::sq4",
        weights_per_iteration: 8 * 32,
        signature: (&["vpshufb"], 8),
        row: ("SQ4", "codebook-avx2"),
    },
    KernelLoop {
        // As SQ4 plus one `vpshufb` a row spreading its third bits.
        kernel: "SQ3 (ours, AVX2 vpshufb)",
        symbol: "kernels::codebook::groups::simd::sq3",
        weights_per_iteration: 8 * 32,
        signature: (&["vpshufb"], 16),
        row: ("SQ3", "codebook-avx2"),
    },
    KernelLoop {
        // `ggml-cpu/arch/x86/quants.c`: one block of 32 an iteration, one
        // byte multiply-add (AVX-VNNI's where the build has it).
        kernel: "Q4_0 (GGML vec_dot_q4_0_q8_0)",
        symbol: "ggml_vec_dot_q4_0_q8_0",
        weights_per_iteration: 32,
        signature: (&["vpmaddubsw", "vpdpbusd"], 1),
        row: ("Q4_0", "CPU_Mapped"),
    },
];

/// One disassembled instruction.
#[derive(Debug, Clone, PartialEq)]
pub struct Instruction {
    pub address: u64,
    pub mnemonic: String,
    /// Operands as objdump prints them, its comment left out.
    pub operands: String,
    /// Where a branch goes, when objdump resolved it.
    pub target: Option<u64>,
}

/// `llvm-objdump -d --no-show-raw-insn --demangle` of a binary: each
/// function's instructions, by name without Rust's `::h<hash>`.
pub fn parse_objdump(text: &str) -> HashMap<String, Vec<Instruction>> {
    let mut functions: HashMap<String, Vec<Instruction>> = HashMap::new();
    let mut current: Option<String> = None;
    for line in text.lines() {
        if let Some(name) = function_header(line) {
            current = Some(name);
            continue;
        }
        let (Some(name), Some(instruction)) = (&current, parse_instruction(line)) else {
            continue;
        };
        functions.entry(name.clone()).or_default().push(instruction);
    }
    functions
}

fn function_header(line: &str) -> Option<String> {
    let (address, rest) = line.split_once(" <")?;
    if address.is_empty() || !address.chars().all(|c| c.is_ascii_hexdigit()) {
        return None;
    }
    let name = rest.strip_suffix(">:")?;
    Some(strip_rust_hash(name).to_string())
}

fn strip_rust_hash(name: &str) -> &str {
    match name.rsplit_once("::h") {
        Some((base, hash)) if hash.len() == 16 && hash.chars().all(|c| c.is_ascii_hexdigit()) => {
            base
        }
        _ => name,
    }
}

fn parse_instruction(line: &str) -> Option<Instruction> {
    let (address, rest) = line.trim_start().split_once(':')?;
    let address = u64::from_str_radix(address, 16).ok()?;
    let text = rest.trim();
    // Comments: aarch64 `// =0`, x86 `# ymm3 = ...` (aarch64's `#` is an
    // immediate, so only x86's spaced form is one).
    let text = text.split(" //").next().unwrap_or(text);
    let text = text.split(" # ").next().unwrap_or(text).trim();
    if text.is_empty() {
        return None;
    }
    let (mnemonic, operands) = match text.split_once(char::is_whitespace) {
        Some((m, o)) => (m, o.trim()),
        None => (text, ""),
    };
    // `{vex} vpdpbusd ...`: the prefix is not the mnemonic.
    let (mnemonic, operands) = match mnemonic.starts_with('{') {
        true => operands
            .split_once(char::is_whitespace)
            .map(|(m, o)| (m, o.trim()))
            .unwrap_or((operands, "")),
        false => (mnemonic, operands),
    };
    // Only branches have targets: `adrp`/`adr` and literal loads also name
    // an address with its symbol, but go nowhere.
    let branch = is_branch(mnemonic);
    let target = operands
        .split_once("0x")
        .filter(|_| branch)
        .and_then(|(before, hex)| {
            let digits: String = hex.chars().take_while(|c| c.is_ascii_hexdigit()).collect();
            let resolved = hex[digits.len()..].trim_start().starts_with('<');
            (resolved && !before.contains('[') && !before.contains('('))
                .then(|| u64::from_str_radix(&digits, 16).ok())
                .flatten()
        });
    Some(Instruction {
        address,
        mnemonic: mnemonic.to_string(),
        operands: operands.to_string(),
        target,
    })
}

/// Whether `mnemonic` can send control elsewhere (aarch64 or x86-64).
fn is_branch(mnemonic: &str) -> bool {
    matches!(
        mnemonic,
        "b" | "bl" | "br" | "cbz" | "cbnz" | "tbz" | "tbnz" | "jmp" | "call" | "loop"
    ) || mnemonic.starts_with("b.")
        || (mnemonic.starts_with('j') && mnemonic.len() <= 4)
}

/// The function's innermost loops, largest first: each from a backward
/// branch's target to the branch, holding no other such loop.
pub fn innermost_loops(instructions: &[Instruction]) -> Vec<&[Instruction]> {
    let loops: Vec<(usize, usize)> = instructions
        .iter()
        .enumerate()
        .filter_map(|(end, i)| {
            let target = i.target.filter(|&t| t <= i.address)?;
            let start = instructions.iter().position(|j| j.address == target)?;
            Some((start, end))
        })
        .collect();
    let mut innermost: Vec<(usize, usize)> = loops
        .iter()
        .copied()
        .filter(|&(s, e)| {
            !loops
                .iter()
                .any(|&(s2, e2)| (s2, e2) != (s, e) && s <= s2 && e2 <= e)
        })
        .collect();
    innermost.sort_by_key(|&(s, e)| std::cmp::Reverse(e - s));
    innermost
        .iter()
        .map(|&(s, e)| &instructions[s..=e])
        .collect()
}

/// The kernel's hot loop: the largest innermost loop holding exactly the
/// instructions its source says (a tail loop or a scalar fallback holds
/// others).
pub fn hot_loop<'a>(
    spec: &KernelLoop,
    instructions: &'a [Instruction],
) -> Result<&'a [Instruction], CyclesError> {
    let (mnemonics, count) = spec.signature;
    let holds = |body: &[Instruction]| {
        body.iter()
            .filter(|i| mnemonics.contains(&i.mnemonic.as_str()))
            .count()
    };
    let loops = innermost_loops(instructions);
    if let Some(body) = loops.iter().find(|body| holds(body) == count) {
        return Ok(body);
    }
    let found: Vec<String> = loops
        .iter()
        .map(|body| format!("{} ({} instructions)", holds(body), body.len()))
        .collect();
    Err(CyclesError::Loop {
        kernel: spec.kernel.to_string(),
        reason: format!(
            "no innermost loop holds {count} of {mnemonics:?} as the source says (they hold {}): the compiler laid it out otherwise, so the weights an iteration covers are not known (update harness/src/builds/cycles.rs)",
            if found.is_empty() { "no loops".to_string() } else { found.join(", ") }
        ),
    })
}

/// The loop as assembly llvm-mca reads: one label at the top, every
/// branch inside it sent there.
pub fn loop_assembly(body: &[Instruction]) -> String {
    let mut out = String::from(".Lloop:\n");
    for i in body {
        let operands = match i.target {
            Some(_) => {
                // `b.gt 0x659480 <f+0x40>`, `tbnz w0, #3, 0x... <...>`:
                // the address and its name become the label.
                let cut = i.operands.find("0x").unwrap_or(i.operands.len());
                format!("{}.Lloop", &i.operands[..cut])
            }
            None => i.operands.clone(),
        };
        out.push_str(&format!("  {} {}\n", i.mnemonic, operands));
    }
    out
}

/// Cycles per iteration llvm-mca's model of `cpu` gives a loop: total
/// cycles over iterations of its steady-state simulation.
pub fn mca_cycles(mca: &str, triple: &str, cpu: &str, assembly: &str) -> Result<f64, CyclesError> {
    use std::io::Write;
    // The Pi 5 agent's features (`BoardProfile::Pi5`): a model of a CPU
    // without them (the Cortex-A57 compared against) must still read the
    // instructions.
    let features = if triple.starts_with("aarch64") {
        "-mattr=+dotprod,+fullfp16"
    } else {
        "-mattr="
    };
    let mut child = Command::new(mca)
        .args([
            &format!("-mtriple={triple}"),
            &format!("-mcpu={cpu}"),
            features,
            "-iterations=200",
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| CyclesError::Tool {
            tool: mca.to_string(),
            reason: e.to_string(),
        })?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(assembly.as_bytes())
            .map_err(|e| CyclesError::Tool {
                tool: mca.to_string(),
                reason: e.to_string(),
            })?;
    }
    let out = child.wait_with_output().map_err(|e| CyclesError::Tool {
        tool: mca.to_string(),
        reason: e.to_string(),
    })?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        return Err(CyclesError::Failed {
            tool: format!("{mca} -mcpu={cpu}"),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    cycles_per_iteration(&stdout)
}

/// `Total Cycles` over `Iterations` from llvm-mca's summary.
pub fn cycles_per_iteration(report: &str) -> Result<f64, CyclesError> {
    let field = |name: &'static str| -> Result<f64, CyclesError> {
        report
            .lines()
            .find_map(|l| l.trim().strip_prefix(name))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .ok_or(CyclesError::Parse(name))
    };
    Ok(field("Total Cycles:")? / field("Iterations:")?.max(1.0))
}

/// One kernel's estimate under one CPU model.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Estimate {
    pub kernel: String,
    pub cpu: String,
    pub loop_instructions: usize,
    pub weights_per_iteration: usize,
    pub cycles_per_iteration: f64,
    /// The figure compared across kernels.
    pub cycles_per_32_weights: f64,
}

/// The tools: llvm-19's when installed (the first with a Cortex-A76
/// model), else whatever `llvm-objdump`/`llvm-mca` the PATH has (the
/// model check below then says what is wrong).
pub fn tool(name: &str) -> String {
    let versioned = format!("{name}-19");
    match Command::new(&versioned).arg("--version").output() {
        Ok(out) if out.status.success() => versioned,
        _ => name.to_string(),
    }
}

/// Estimates for `loops` in `binary` under each of `cpus`.
pub fn estimate(
    binary: &Path,
    triple: &str,
    loops: &[KernelLoop],
    cpus: &[&str],
) -> Result<Vec<Estimate>, CyclesError> {
    let objdump = tool("llvm-objdump");
    let out = Command::new(&objdump)
        .args(["-d", "--no-show-raw-insn", "--demangle"])
        .arg(binary)
        .output()
        .map_err(|e| CyclesError::Tool {
            tool: objdump.clone(),
            reason: e.to_string(),
        })?;
    if !out.status.success() {
        return Err(CyclesError::Failed {
            tool: objdump,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    let functions = parse_objdump(&String::from_utf8_lossy(&out.stdout));
    let mca = tool("llvm-mca");
    let mut estimates = Vec::new();
    for spec in loops {
        let instructions = functions
            .get(spec.symbol)
            .ok_or_else(|| CyclesError::Symbol {
                binary: binary.display().to_string(),
                symbol: spec.symbol.to_string(),
            })?;
        let body = hot_loop(spec, instructions)?;
        let assembly = loop_assembly(body);
        for &cpu in cpus {
            let cycles = mca_cycles(&mca, triple, cpu, &assembly)?;
            estimates.push(Estimate {
                kernel: spec.kernel.to_string(),
                cpu: cpu.to_string(),
                loop_instructions: body.len(),
                weights_per_iteration: spec.weights_per_iteration,
                cycles_per_iteration: cycles,
                cycles_per_32_weights: cycles * 32.0 / spec.weights_per_iteration as f64,
            });
        }
    }
    Ok(estimates)
}

/// The rows of a run folder's `kernels.csv`, to set measured times beside
/// the estimates.
pub fn measured_rows(run_dir: &Path) -> Result<Vec<wire::rows::KernelRow>, CyclesError> {
    let path = run_dir.join("kernels.csv");
    wire::files::read_csv(&path).map_err(|e| CyclesError::Measured {
        path: path.display().to_string(),
        reason: e.to_string(),
    })
}

/// The estimates as a markdown table, one row per kernel and a column per
/// CPU model; with `measured` (a local run's rows at batch 1 and 1 thread,
/// and the clock in GHz) each kernel's measured cycles per 32 weights
/// beside them, per shape, and the estimate over the measurement.
pub fn table(
    estimates: &[Estimate],
    loops: &[KernelLoop],
    measured: Option<(&[wire::rows::KernelRow], f64)>,
) -> String {
    let mut cpus: Vec<&str> = Vec::new();
    for e in estimates {
        if !cpus.contains(&e.cpu.as_str()) {
            cpus.push(&e.cpu);
        }
    }
    let mut out = String::from("| kernel | loop instructions | weights an iteration |");
    for cpu in &cpus {
        out.push_str(&format!(
            " cycles/iteration ({cpu}) | cycles per 32 weights ({cpu}) |"
        ));
    }
    if measured.is_some() {
        out.push_str(" measured cycles per 32 weights (shape: value) | estimate / measured |");
    }
    out.push('\n');
    let columns = 3 + 2 * cpus.len() + if measured.is_some() { 2 } else { 0 };
    out.push_str(&format!("|{}\n", "---|".repeat(columns)));
    for spec in loops {
        let mine: Vec<&Estimate> = estimates
            .iter()
            .filter(|e| e.kernel == spec.kernel)
            .collect();
        let Some(first) = mine.first() else { continue };
        out.push_str(&format!(
            "| {} | {} | {} |",
            spec.kernel, first.loop_instructions, first.weights_per_iteration
        ));
        for cpu in &cpus {
            match mine.iter().find(|e| e.cpu == *cpu) {
                Some(e) => out.push_str(&format!(
                    " {:.2} | {:.3} |",
                    e.cycles_per_iteration, e.cycles_per_32_weights
                )),
                None => out.push_str(" – | – |"),
            }
        }
        if let Some((rows, ghz)) = measured {
            let figures: Vec<(String, f64)> = rows
                .iter()
                .filter(|r| r.ty == spec.row.0 && r.kernel_path.starts_with(spec.row.1))
                .filter(|r| r.n == 1 && r.threads == 1)
                .filter_map(|r| {
                    let ns = r.median_ns?;
                    Some((r.shape.clone(), ns * ghz / ((r.m * r.k) as f64 / 32.0)))
                })
                .collect();
            let listed: Vec<String> = figures
                .iter()
                .map(|(shape, c)| format!("{shape}: {c:.3}"))
                .collect();
            let ratio: Vec<String> = figures
                .iter()
                .map(|(_, c)| format!("{:.2}", first.cycles_per_32_weights / c))
                .collect();
            out.push_str(&format!(" {} | {} |", listed.join(", "), ratio.join(", ")));
        }
        out.push('\n');
    }
    out
}

/// Refuses a model that is another CPU's under its name: when every
/// kernel costs the same under `cpu` and `other`, `cpu` has no model of
/// its own in this LLVM.
pub fn check_distinct_model(
    estimates: &[Estimate],
    cpu: &str,
    other: &str,
) -> Result<(), CyclesError> {
    let of = |name: &str| -> Vec<f64> {
        estimates
            .iter()
            .filter(|e| e.cpu == name)
            .map(|e| e.cycles_per_iteration)
            .collect()
    };
    let (a, b) = (of(cpu), of(other));
    if !a.is_empty() && a == b {
        return Err(CyclesError::SameModel {
            cpu: cpu.to_string(),
            other: other.to_string(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const AARCH64_DUMP: &str = "
target/quantbench-agent:	file format elf64-littleaarch64

Disassembly of section .text:

0000000000659440 <ggml_vec_dot_q4_0_q8_0>:
  659440:      	cmp	w0, #0x0
  659458:      	b.le	0x6597f0 <ggml_vec_dot_q4_0_q8_0+0x3b0>
  659474:      	mov	w7, #0x0                // =0
  659478:      	adrp	x15, 0x659440 <ggml_vec_dot_q4_0_q8_0>
  659480:      	ldur	q1, [x4, #0x2]
  659484:      	sdot	v1.4s, v19.16b, v24.16b
  659488:      	cbz	w3, 0x659490 <ggml_vec_dot_q4_0_q8_0+0x50>
  65948c:      	sdot	v0.4s, v18.16b, v23.16b
  659490:      	cmp	w8, w6
  659494:      	b.gt	0x659480 <ggml_vec_dot_q4_0_q8_0+0x40>
  659498:      	add	x0, x0, #0x1
  65949c:      	b.ne	0x659474 <ggml_vec_dot_q4_0_q8_0+0x34>
  6594a0:      	ret

00000000006594a4 <kernels::lut::simd::neon::lut2::h4e6e1f737d405b47>:
  6594a4:      	tbl	v0.16b, { v1.16b }, v2.16b
  6594a8:      	b	0x6594a4 <kernels::lut::simd::neon::lut2::h4e6e1f737d405b47>
";

    #[test]
    fn functions_instructions_and_branch_targets_are_read_from_objdump() {
        let functions = parse_objdump(AARCH64_DUMP);
        let dot = &functions["ggml_vec_dot_q4_0_q8_0"];
        assert_eq!(dot.len(), 13);
        assert_eq!(
            dot[2].operands, "w7, #0x0",
            "the `// =0` comment is dropped"
        );
        // `adrp` names an address (here the function's start, which as a
        // target would make a loop) but goes nowhere; nor does a memory
        // operand.
        assert_eq!(dot[3].target, None, "adrp is no branch");
        assert_eq!(dot[4].target, None, "a memory operand is no branch");
        assert_eq!(dot[9].target, Some(0x659480));
        // Rust's hash is dropped from the name.
        assert_eq!(functions["kernels::lut::simd::neon::lut2"].len(), 2);
        let x86 = parse_objdump(
            "00000000004f3d30 <f>:\n  4f3f0c:      \t{vex}\tvpdpbusd\t%ymm0, %ymm4, %ymm2\n  4f3f1a:      \tvfmadd231ps\t%ymm2, %ymm0, %ymm3 # ymm3 = (ymm0 * ymm2) + ymm3\n",
        );
        assert_eq!(x86["f"][0].mnemonic, "vpdpbusd");
        assert_eq!(x86["f"][1].operands, "%ymm2, %ymm0, %ymm3");
    }

    #[test]
    fn the_hot_loop_is_the_innermost_and_its_branches_go_to_its_label() {
        let functions = parse_objdump(AARCH64_DUMP);
        let spec = AARCH64_LOOPS
            .iter()
            .find(|l| l.symbol == "ggml_vec_dot_q4_0_q8_0")
            .unwrap();
        // The fixture's loop holds 2 `sdot`, the real one 4.
        let two = KernelLoop {
            signature: (&["sdot"], 2),
            ..*spec
        };
        let body = hot_loop(&two, &functions["ggml_vec_dot_q4_0_q8_0"]).unwrap();
        // 0x659480..=0x659494, not the outer loop from 0x659474.
        assert_eq!(body.first().unwrap().address, 0x659480);
        assert_eq!(body.len(), 6);
        let assembly = loop_assembly(body);
        assert!(
            assembly.starts_with(".Lloop:\n  ldur q1, [x4, #0x2]\n"),
            "{assembly}"
        );
        assert!(assembly.contains("  cbz w3, .Lloop\n"), "{assembly}");
        assert!(assembly.ends_with("  b.gt .Lloop\n"), "{assembly}");
        // The outer loop holds the inner one, so it is no candidate; a
        // count no innermost loop has is refused, naming what was found.
        let message = hot_loop(spec, &functions["ggml_vec_dot_q4_0_q8_0"])
            .unwrap_err()
            .to_string();
        assert!(
            message.contains("they hold 2 (6 instructions)"),
            "{message}"
        );
        let tiny = innermost_loops(&functions["kernels::lut::simd::neon::lut2"]);
        assert_eq!(tiny.len(), 1);
        assert_eq!(tiny[0].len(), 2);
    }

    #[test]
    fn cycles_come_from_the_summary_and_a_borrowed_model_is_refused() {
        let report = "Iterations:        200\nInstructions:      3400\nTotal Cycles:      1210\nTotal uOps:        3600\n";
        assert!((cycles_per_iteration(report).unwrap() - 6.05).abs() < 1e-9);
        assert!(matches!(
            cycles_per_iteration("Iterations: 5\n"),
            Err(CyclesError::Parse("Total Cycles:"))
        ));
        let estimate = |cpu: &str, cycles: f64| Estimate {
            kernel: "k".into(),
            cpu: cpu.into(),
            loop_instructions: 10,
            weights_per_iteration: 64,
            cycles_per_iteration: cycles,
            cycles_per_32_weights: cycles / 2.0,
        };
        let same = [estimate("cortex-a76", 6.0), estimate("cortex-a57", 6.0)];
        let message = check_distinct_model(&same, "cortex-a76", "cortex-a57")
            .unwrap_err()
            .to_string();
        assert!(message.contains("llvm-19"), "{message}");
        let distinct = [estimate("cortex-a76", 4.0), estimate("cortex-a57", 6.0)];
        assert!(check_distinct_model(&distinct, "cortex-a76", "cortex-a57").is_ok());
    }
}
