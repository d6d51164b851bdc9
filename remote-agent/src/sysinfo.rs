//! Reading the board: CPU, features, memory, clocks, temperature.
//! Every reading is best effort: a file that is missing (containers,
//! emulators, other kernels) gives `None`, never an error.

use std::fs;
use std::path::Path;
use wire::probe::{BoardProbe, ThermalReading, ThrottleState};

pub fn probe(with_bandwidth: bool) -> BoardProbe {
    let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let thermal = thermal_reading();
    BoardProbe {
        arch: std::env::consts::ARCH.to_string(),
        cpu_model: cpu_model(&cpuinfo),
        cpu_features: cpu_features(&cpuinfo),
        ggml_features: kernels::ggml_cpu_features()
            .into_iter()
            .map(str::to_string)
            .collect(),
        cores,
        big_cores: fastest_cores(),
        memory_bytes: meminfo_kib("MemTotal").unwrap_or(0) * 1024,
        // SAFETY: sysconf has no preconditions.
        page_size: unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(0) as u64,
        os: os_name(),
        kernel: kernel_release(),
        cpufreq_governor: read_trimmed("/sys/devices/system/cpu/cpu0/cpufreq/scaling_governor"),
        cpu_freq_mhz: thermal.freq_mhz,
        cpu_max_freq_mhz: read_number("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq")
            .map(|khz| khz / 1000.0),
        temperature_c: thermal.temperature_c,
        read_bandwidth_gbps: with_bandwidth.then(|| crate::bandwidth::read_bandwidth_gbps(cores)),
        power: None,
        agent: wire::probe::AgentIdentity {
            agent_build: agent_build(),
            llama_cpp: kernels::llama_source().to_string(),
        },
    }
}

pub fn thermal_reading() -> ThermalReading {
    ThermalReading {
        temperature_c: read_number("/sys/class/thermal/thermal_zone0/temp").map(|m| m / 1000.0),
        freq_mhz: read_number("/sys/devices/system/cpu/cpu0/cpufreq/scaling_cur_freq")
            .map(|khz| khz / 1000.0),
        governor: read_trimmed("/sys/devices/system/cpu/cpu0/cpufreq/scaling_governor"),
        throttle: throttle_state(),
        fan: fan_state(Path::new("/sys/class")),
    }
}

/// The fan under `class` (`/sys/class`): a hwmon device's `fan1_input`
/// in rpm, else a `pwm-fan` cooling device's level (a Pi 5's active
/// cooler is both).
fn fan_state(class: &Path) -> Option<String> {
    let dirs = |sub: &str| -> Vec<std::path::PathBuf> {
        let mut dirs: Vec<_> = fs::read_dir(class.join(sub))
            .map(|d| d.flatten().map(|e| e.path()).collect())
            .unwrap_or_default();
        dirs.sort();
        dirs
    };
    let read = |path: std::path::PathBuf| -> Option<String> {
        Some(fs::read_to_string(path).ok()?.trim().to_string())
    };
    dirs("hwmon")
        .into_iter()
        .find_map(|d| read(d.join("fan1_input")))
        .map(|rpm| format!("{rpm} rpm"))
        .or_else(|| {
            dirs("thermal").into_iter().find_map(|d| {
                let kind = read(d.join("type"))?;
                kind.contains("fan").then_some(())?;
                Some(format!(
                    "level {}/{}",
                    read(d.join("cur_state"))?,
                    read(d.join("max_state"))?
                ))
            })
        })
}

/// The firmware's throttling bits on a Raspberry Pi (its sysfs file, or
/// `vcgencmd get_throttled`), else CPU 0's thermal throttle event count.
fn throttle_state() -> Option<ThrottleState> {
    if let Some(bits) = pi_throttled_file()
        .and_then(|path| read_trimmed(&path.display().to_string()))
        .and_then(|text| parse_hex(&text))
    {
        return Some(ThrottleState::PiFirmware(bits));
    }
    if let Some(bits) = vcgencmd_throttled() {
        return Some(ThrottleState::PiFirmware(bits));
    }
    let base = "/sys/devices/system/cpu/cpu0/thermal_throttle";
    let core = read_number(&format!("{base}/core_throttle_count"));
    let package = read_number(&format!("{base}/package_throttle_count"));
    match (core, package) {
        (None, None) => None,
        (c, p) => Some(ThrottleState::ThrottleEvents(
            (c.unwrap_or(0.0) + p.unwrap_or(0.0)) as u64,
        )),
    }
}

/// The Raspberry Pi firmware driver's `get_throttled` file, wherever the
/// device tree put it (`/sys/devices/platform/soc/soc:firmware/` on a Pi 4,
/// deeper on a Pi 5); searched once.
fn pi_throttled_file() -> Option<std::path::PathBuf> {
    static FOUND: std::sync::OnceLock<Option<std::path::PathBuf>> = std::sync::OnceLock::new();
    FOUND
        .get_or_init(|| find_file(Path::new("/sys/devices/platform"), "get_throttled", 3))
        .clone()
}

fn find_file(dir: &Path, name: &str, depth: usize) -> Option<std::path::PathBuf> {
    let entries: Vec<_> = fs::read_dir(dir).ok()?.flatten().collect();
    if let Some(hit) = entries.iter().find(|e| e.file_name() == name) {
        return Some(hit.path());
    }
    if depth == 0 {
        return None;
    }
    entries
        .iter()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .find_map(|e| find_file(&e.path(), name, depth - 1))
}

/// `vcgencmd get_throttled` prints `throttled=0x50000`; absent off a Pi.
fn vcgencmd_throttled() -> Option<u32> {
    static PRESENT: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let present = *PRESENT.get_or_init(|| {
        ["/usr/bin/vcgencmd", "/opt/vc/bin/vcgencmd"]
            .iter()
            .any(|p| Path::new(p).exists())
    });
    if !present {
        return None;
    }
    let out = std::process::Command::new("vcgencmd")
        .arg("get_throttled")
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    parse_hex(text.trim().strip_prefix("throttled=")?)
}

fn parse_hex(text: &str) -> Option<u32> {
    let text = text.trim();
    let digits = text.strip_prefix("0x").unwrap_or(text);
    u32::from_str_radix(digits, 16).ok()
}

/// First 12 hex digits of this binary's SHA-256: the same identity the host
/// uses to deploy it, so every row names the exact build that measured it.
pub fn agent_build() -> String {
    let path = std::env::current_exe().unwrap_or_else(|_| "/proc/self/exe".into());
    wire::build_id::content_hash(&path).unwrap_or_else(|_| "unknown".to_string())
}

fn cpu_model(cpuinfo: &str) -> String {
    if let Some(name) = cpuinfo_field(cpuinfo, "model name") {
        return name;
    }
    // Arm kernels give the implementer and part number instead of a name.
    let part = cpuinfo_field(cpuinfo, "CPU part").unwrap_or_default();
    let named = match part.as_str() {
        "0xd03" => "Cortex-A53",
        "0xd08" => "Cortex-A72",
        "0xd0b" => "Cortex-A76",
        "0xd0d" => "Cortex-A77",
        "0xd41" => "Cortex-A78",
        "0xd4b" => "Cortex-A78C",
        "0xd0c" => "Neoverse-N1",
        "0xd40" => "Neoverse-V1",
        "0xd49" => "Neoverse-N2",
        _ => "",
    };
    let board = cpuinfo_field(cpuinfo, "Model").or_else(|| {
        read_trimmed("/proc/device-tree/model").map(|m| m.trim_end_matches('\0').to_string())
    });
    match (named, board) {
        ("", Some(board)) => board,
        ("", None) if !part.is_empty() => format!("Arm CPU part {part}"),
        ("", None) => format!("unknown {} CPU", std::env::consts::ARCH),
        (named, Some(board)) => format!("{named} ({board})"),
        (named, None) => named.to_string(),
    }
}

/// The features that decide GGML's kernel choice. On aarch64 they come from
/// HWCAP (what the kernel, or qemu-user, tells programs), on x86 from
/// /proc/cpuinfo's flags.
fn cpu_features(cpuinfo: &str) -> Vec<String> {
    #[cfg(target_arch = "aarch64")]
    {
        let _ = cpuinfo;
        // SAFETY: getauxval has no preconditions.
        let (hwcap, hwcap2) = unsafe {
            (
                libc::getauxval(libc::AT_HWCAP),
                libc::getauxval(libc::AT_HWCAP2),
            )
        };
        let bits: [(&str, u64, u64); 8] = [
            ("neon", 1 << 1, 0),
            ("fp16", 1 << 9, 0),
            ("asimdhp", 1 << 10, 0),
            ("crc32", 1 << 7, 0),
            ("dotprod", 1 << 20, 0),
            ("sve", 1 << 22, 0),
            ("i8mm", 0, 1 << 13),
            ("bf16", 0, 1 << 14),
        ];
        bits.iter()
            .filter(|(_, h1, h2)| (hwcap & h1) != 0 || (hwcap2 & h2) != 0)
            .map(|(name, _, _)| name.to_string())
            .collect()
    }
    #[cfg(not(target_arch = "aarch64"))]
    {
        const RELEVANT: &[&str] = &[
            "sse3",
            "ssse3",
            "avx",
            "avx2",
            "fma",
            "f16c",
            "avx512f",
            "avx512bw",
            "avx512vl",
            "avx512_vnni",
            "avx512_bf16",
            "avx_vnni",
            "amx_int8",
            "asimd",
            "asimddp",
            "fphp",
            "i8mm",
            "sve",
        ];
        let flags = cpuinfo_field(cpuinfo, "flags")
            .or_else(|| cpuinfo_field(cpuinfo, "Features"))
            .unwrap_or_default();
        RELEVANT
            .iter()
            .filter(|f| flags.split_whitespace().any(|x| x == **f))
            .map(|f| f.to_string())
            .collect()
    }
}

fn cpuinfo_field(cpuinfo: &str, key: &str) -> Option<String> {
    cpuinfo.lines().find_map(|line| {
        let (k, v) = line.split_once(':')?;
        (k.trim() == key).then(|| v.trim().to_string())
    })
}

/// CPU time every other process has used, for telling whether something
/// else ran during a measurement: the sum over `/proc/<pid>/stat` of
/// utime, stime and the reaped children's cutime and cstime, for every
/// process but this one. Each process's figure is the kernel's precise run
/// time in clock ticks, so a neighbour shows however many CPUs the agent
/// keeps busy; the machine-wide `/proc/stat` counters do not serve: they
/// are sampled per CPU at each tick, and with sixteen busy threads their
/// rounding alone reads as a core of "other" use in a 30 ms window (seen on
/// a quiet 16-core host).
#[derive(Debug, Clone, Default)]
pub struct CpuTimes {
    /// Ticks by process id.
    by_pid: std::collections::HashMap<u32, u64>,
}

impl CpuTimes {
    pub fn now() -> Option<CpuTimes> {
        let own = std::process::id();
        let mut by_pid = std::collections::HashMap::new();
        for entry in fs::read_dir("/proc").ok()?.flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            if pid == own {
                continue;
            }
            if let Some(ticks) = fs::read_to_string(entry.path().join("stat"))
                .ok()
                .and_then(|stat| parse_process_ticks(&stat))
            {
                by_pid.insert(pid, ticks);
            }
        }
        Some(CpuTimes { by_pid })
    }

    /// Seconds of CPU other processes used since `before` (a process that
    /// started since counts whole; one that ended and was reaped counts in
    /// its parent's children's time).
    pub fn others_since(&self, before: &CpuTimes) -> f64 {
        let ticks: u64 = self
            .by_pid
            .iter()
            .map(|(pid, now)| now.saturating_sub(before.by_pid.get(pid).copied().unwrap_or(0)))
            .sum();
        // SAFETY: sysconf has no preconditions.
        let ticks_per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
        let ticks_per_second = if ticks_per_second > 0 {
            ticks_per_second as f64
        } else {
            100.0
        };
        // Two ticks are allowed for: the host and the parent agent reading
        // progress, and per-process rounding to whole ticks (one tick in a
        // 30 ms window would read as a third of a core).
        ticks.saturating_sub(2) as f64 / ticks_per_second
    }
}

/// utime + stime + cutime + cstime of one `/proc/<pid>/stat`.
fn parse_process_ticks(stat: &str) -> Option<u64> {
    // The command name (field 2) may hold spaces: fields count from its ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime, stime, cutime, cstime are fields 14-17, the 12th-15th after ')'.
    let field = |i: usize| fields.get(i).and_then(|f| f.parse::<i64>().ok());
    Some((field(11)? + field(12)? + field(13)?.max(0) + field(14)?.max(0)) as u64)
}

/// Bytes free for this user on the file system holding `path`.
pub fn free_disk_bytes(path: &std::path::Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c_path = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
    // SAFETY: statvfs writes into the zeroed struct we own; the path is a
    // valid NUL-terminated string.
    unsafe {
        let mut stat: libc::statvfs = std::mem::zeroed();
        if libc::statvfs(c_path.as_ptr(), &mut stat) != 0 {
            return None;
        }
        Some(stat.f_bavail as u64 * stat.f_frsize as u64)
    }
}

/// The CPUs this process may run on (`Cpus_allowed_list`; every online
/// CPU when the kernel does not say).
pub fn allowed_cpus() -> Vec<usize> {
    let status = fs::read_to_string("/proc/self/status").unwrap_or_default();
    let list = status
        .lines()
        .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
        .map(str::trim)
        .map(str::to_string)
        .or_else(|| read_trimmed("/sys/devices/system/cpu/online"));
    let cpus = list.as_deref().map(parse_cpu_list).unwrap_or_default();
    if cpus.is_empty() {
        let n = std::thread::available_parallelism().map_or(1, |n| n.get());
        (0..n).collect()
    } else {
        cpus
    }
}

/// A kernel CPU list (`0-3,6`).
fn parse_cpu_list(list: &str) -> Vec<usize> {
    let mut cpus = Vec::new();
    for part in list.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (first, last) = part.split_once('-').unwrap_or((part, part));
        if let (Ok(first), Ok(last)) = (first.parse::<usize>(), last.parse::<usize>()) {
            cpus.extend(first..=last);
        }
    }
    cpus
}

/// The fastest of the CPUs this process may run on: see `fastest_in`.
pub fn fastest_cores() -> Vec<usize> {
    fastest_in(Path::new("/sys/devices/system/cpu"), &allowed_cpus())
}

/// The CPUs of `allowed` with the highest `cpu_capacity` (Arm's
/// scheduler's relative speed, 1024 for the biggest core), else the
/// highest `cpufreq/cpuinfo_max_freq`, read under `sys_cpu`
/// (`/sys/devices/system/cpu`); all of `allowed` when neither says.
fn fastest_in(sys_cpu: &Path, allowed: &[usize]) -> Vec<usize> {
    let read = |cpu: usize, file: &str| -> Option<u64> {
        fs::read_to_string(sys_cpu.join(format!("cpu{cpu}")).join(file))
            .ok()?
            .trim()
            .parse()
            .ok()
    };
    for file in ["cpu_capacity", "cpufreq/cpuinfo_max_freq"] {
        let speeds: Vec<(usize, u64)> = allowed
            .iter()
            .filter_map(|&cpu| Some((cpu, read(cpu, file)?)))
            .collect();
        if speeds.len() == allowed.len() && !speeds.is_empty() {
            let top = speeds.iter().map(|(_, s)| *s).max().unwrap_or(0);
            return speeds
                .into_iter()
                .filter(|(_, s)| *s == top)
                .map(|(cpu, _)| cpu)
                .collect();
        }
    }
    allowed.to_vec()
}

/// The board's memory (`MemTotal`), bytes.
pub fn total_memory_bytes() -> Option<u64> {
    meminfo_kib("MemTotal").map(|kib| kib * 1024)
}

/// The memory limit of the cgroup the agent runs in (cgroup v2
/// `memory.max`; `None` when it has none or the kernel does not say).
pub fn cgroup_memory_limit() -> Option<u64> {
    let groups = fs::read_to_string("/proc/self/cgroup").ok()?;
    let path = groups.lines().find_map(|l| l.strip_prefix("0::"))?;
    let limit = fs::read_to_string(format!("/sys/fs/cgroup{}/memory.max", path.trim())).ok()?;
    limit.trim().parse().ok()
}

/// Memory the kernel says a new allocation can get without swapping
/// (`MemAvailable`), in bytes.
pub fn available_memory_bytes() -> Option<u64> {
    meminfo_kib("MemAvailable").map(|kib| kib * 1024)
}

fn meminfo_kib(key: &str) -> Option<u64> {
    wire::probe::meminfo_kib(&fs::read_to_string("/proc/meminfo").ok()?, key)
}

fn os_name() -> String {
    let text = fs::read_to_string("/etc/os-release").unwrap_or_default();
    text.lines()
        .find_map(|l| l.strip_prefix("PRETTY_NAME="))
        .map(|v| v.trim_matches('"').to_string())
        .unwrap_or_else(|| std::env::consts::OS.to_string())
}

fn kernel_release() -> String {
    read_trimmed("/proc/sys/kernel/osrelease").unwrap_or_else(|| "unknown".into())
}

fn read_trimmed(path: &str) -> Option<String> {
    fs::read_to_string(path)
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
}

fn read_number(path: &str) -> Option<f64> {
    read_trimmed(path)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fastest_cores_come_from_capacity_then_max_frequency() {
        let dir = tempfile::tempdir().unwrap();
        let write = |cpu: usize, file: &str, value: &str| {
            let path = dir.path().join(format!("cpu{cpu}")).join(file);
            fs::create_dir_all(path.parent().unwrap()).unwrap();
            fs::write(path, value).unwrap();
        };
        // An RK3588 as its kernel describes it: four A55s, four A76s.
        for cpu in 0..8 {
            write(
                cpu,
                "cpu_capacity",
                if cpu < 4 { "414\n" } else { "1024\n" },
            );
            let khz = if cpu < 4 { "1800000" } else { "2352000" };
            write(cpu, "cpufreq/cpuinfo_max_freq", khz);
        }
        let all: Vec<usize> = (0..8).collect();
        assert_eq!(fastest_in(dir.path(), &all), vec![4, 5, 6, 7]);
        // Restricted to CPUs 2-5 (a cgroup's cpuset), the big ones of those.
        assert_eq!(fastest_in(dir.path(), &[2, 3, 4, 5]), vec![4, 5]);
        // No capacities (x86, older kernels): the highest maximum clock.
        for cpu in 0..8 {
            fs::remove_file(dir.path().join(format!("cpu{cpu}/cpu_capacity"))).unwrap();
        }
        assert_eq!(fastest_in(dir.path(), &all), vec![4, 5, 6, 7]);
        // Nothing to tell them apart (a Pi 5 under qemu-user): all alike.
        let empty = tempfile::tempdir().unwrap();
        assert_eq!(fastest_in(empty.path(), &[0, 1, 2, 3]), vec![0, 1, 2, 3]);
        assert_eq!(parse_cpu_list("0-3,6, 8-9"), vec![0, 1, 2, 3, 6, 8, 9]);
    }

    #[test]
    fn cpu_counters_parse_and_a_busy_neighbour_shows() {
        let own =
            "1234 (quantbench agent) R 1 1234 1234 0 -1 4194304 100 0 0 0 70 30 5 -1 20 0 3 0";
        assert_eq!(parse_process_ticks(own), Some(105));
        // A thread of our own spinning is not a neighbour; another process
        // is. Counted as a neighbour, our spinning would read about one
        // core every time; the host's own processes (a CI machine's, just
        // after other tests) read 0.56 once, so the quietest of three
        // tries is what is judged.
        let own_spin = || {
            let before = CpuTimes::now().unwrap();
            let start = std::time::Instant::now();
            while start.elapsed() < std::time::Duration::from_millis(300) {
                std::hint::spin_loop();
            }
            CpuTimes::now().unwrap().others_since(&before)
        };
        let tries: Vec<f64> = (0..3).map(|_| own_spin()).collect();
        assert!(
            tries.iter().copied().fold(f64::INFINITY, f64::min) < 0.5,
            "{tries:?}"
        );
        let mut hog = std::process::Command::new("sh")
            .args(["-c", "while :; do :; done"])
            .spawn()
            .unwrap();
        let before = CpuTimes::now().unwrap();
        std::thread::sleep(std::time::Duration::from_millis(500));
        let after = CpuTimes::now().unwrap();
        hog.kill().unwrap();
        hog.wait().unwrap();
        assert!(
            after.others_since(&before) > 0.2,
            "{}",
            after.others_since(&before)
        );
    }

    #[test]
    fn the_fan_is_read_as_rpm_else_as_its_cooling_level() {
        let dir = tempfile::tempdir().unwrap();
        let write = |path: &str, value: &str| {
            let path = dir.path().join(path);
            fs::create_dir_all(path.parent().unwrap()).unwrap();
            fs::write(path, value).unwrap();
        };
        assert_eq!(fan_state(dir.path()), None);
        // A Pi 5's active cooler as its kernel shows it.
        write("thermal/cooling_device0/type", "pwm-fan\n");
        write("thermal/cooling_device0/cur_state", "2\n");
        write("thermal/cooling_device0/max_state", "4\n");
        write("thermal/thermal_zone0/type", "cpu-thermal\n");
        assert_eq!(fan_state(dir.path()).as_deref(), Some("level 2/4"));
        write("hwmon/hwmon2/fan1_input", "3100\n");
        assert_eq!(fan_state(dir.path()).as_deref(), Some("3100 rpm"));
    }

    #[test]
    fn firmware_throttle_bits_parse_as_vcgencmd_and_sysfs_print_them() {
        assert_eq!(parse_hex("0x50005"), Some(0x50005));
        assert_eq!(parse_hex("50000\n"), Some(0x50000));
        assert_eq!(parse_hex("throttled"), None);
    }
}
