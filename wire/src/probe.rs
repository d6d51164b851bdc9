//! What a board is: the agent's `probe` output, stored with every run.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BoardProbe {
    /// `aarch64`, `x86_64`, ...
    pub arch: String,
    pub cpu_model: String,
    /// Features that decide which GGML kernels can run, from HWCAP or
    /// /proc/cpuinfo (`dotprod`, `fp16`, `i8mm`, `sve`, `avx2`, ...).
    pub cpu_features: Vec<String>,
    /// Features GGML was compiled with and detected at run time.
    pub ggml_features: Vec<String>,
    pub cores: usize,
    /// The fastest CPUs the agent may run on (by `cpu_capacity`, else the
    /// highest `cpuinfo_max_freq`): what `threads = "big"` uses. All of
    /// them on a board whose cores are alike (a Pi 5), the big cores on a
    /// big.LITTLE one (an RK3588's 4-7). Empty in older probes.
    #[serde(default)]
    pub big_cores: Vec<usize>,
    pub memory_bytes: u64,
    pub page_size: u64,
    pub os: String,
    pub kernel: String,
    pub cpufreq_governor: Option<String>,
    pub cpu_freq_mhz: Option<f64>,
    pub cpu_max_freq_mhz: Option<f64>,
    pub temperature_c: Option<f64>,
    /// Read bandwidth with all cores, best of several sweeps over a buffer
    /// far larger than the caches (GB/s, 1e9 bytes). Absent from a quick probe.
    pub read_bandwidth_gbps: Option<f64>,
    /// SHA-256 prefix of the agent binary and the llama.cpp it contains.
    #[serde(flatten)]
    pub agent: AgentIdentity,
}

/// What an agent binary is: its hash and the llama.cpp built into it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct AgentIdentity {
    /// SHA-256 prefix of the agent binary.
    pub agent_build: String,
    /// `kernels::llama_source()`: `vendored` or the build's source label.
    #[serde(default)]
    pub llama_cpp: String,
}

/// Readings taken before and after each cell (thermal throttling shows here).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ThermalReading {
    pub temperature_c: Option<f64>,
    pub freq_mhz: Option<f64>,
    /// CPU 0's cpufreq governor (`performance`, `ondemand`, `schedutil`, ...).
    #[serde(default)]
    pub governor: Option<String>,
    #[serde(default)]
    pub throttle: Option<ThrottleState>,
}

/// What the board says about throttling.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ThrottleState {
    /// A Raspberry Pi firmware's `get_throttled` bits: 0 under-voltage,
    /// 1 ARM frequency capped, 2 currently throttled, 3 soft temperature
    /// limit active; bits 16-19 say the same happened since boot.
    PiFirmware(u32),
    /// Other Linux boards: CPU 0's thermal throttle events so far
    /// (`thermal_throttle/core_throttle_count` + `package_throttle_count`).
    ThrottleEvents(u64),
}

/// `get_throttled` bits that mean "slowed down right now".
const PI_THROTTLED_NOW: u32 = 0xF;
/// `get_throttled` bits that mean "slowed down since boot".
const PI_THROTTLED_SINCE_BOOT: u32 = 0xF_0000;

/// Whether a cell measured between two readings was throttled: `None` when
/// the board does not say. One place decides it for rows, summary, plots
/// and `compare`.
pub fn throttled_between(before: &ThermalReading, after: &ThermalReading) -> Option<bool> {
    match (before.throttle?, after.throttle?) {
        (ThrottleState::PiFirmware(b), ThrottleState::PiFirmware(a)) => {
            Some((b | a) & PI_THROTTLED_NOW != 0 || (a & !b) & PI_THROTTLED_SINCE_BOOT != 0)
        }
        (ThrottleState::ThrottleEvents(b), ThrottleState::ThrottleEvents(a)) => Some(a > b),
        _ => None,
    }
}

/// Whether timings taken between two readings are not to be trusted as a
/// board's steady speed: throttled, or a governor other than
/// `performance` (which moves the clock under the measurement).
pub fn thermally_noisy(before: &ThermalReading, after: &ThermalReading) -> bool {
    let off_performance = [&before.governor, &after.governor]
        .iter()
        .any(|g| g.as_deref().is_some_and(|g| g != "performance"));
    throttled_between(before, after) == Some(true) || off_performance
}

/// A `/proc/meminfo` field in KiB (`key` without its colon, e.g.
/// `MemAvailable`).
pub fn meminfo_kib(meminfo: &str, key: &str) -> Option<u64> {
    meminfo.lines().find_map(|line| {
        let rest = line.strip_prefix(key)?.strip_prefix(':')?;
        rest.split_whitespace().next()?.parse().ok()
    })
}

/// Free bytes for the user from `df -Pk <dir>`'s output (POSIX format:
/// the second line, fourth column, in KiB).
pub fn df_free_bytes(df_output: &str) -> Option<u64> {
    let kib: u64 = df_output
        .lines()
        .nth(1)?
        .split_whitespace()
        .nth(3)?
        .parse()
        .ok()?;
    Some(kib * 1024)
}

#[cfg(test)]
mod tests {
    #[test]
    fn meminfo_and_df_outputs_are_read() {
        let meminfo = "MemTotal:        8000000 kB\nMemAvailable:    6000000 kB\n";
        assert_eq!(meminfo_kib(meminfo, "MemAvailable"), Some(6_000_000));
        assert_eq!(meminfo_kib(meminfo, "MemTotal"), Some(8_000_000));
        assert_eq!(meminfo_kib(meminfo, "Mem"), None);
        let df = "Filesystem 1024-blocks Used Available Capacity Mounted on\n/dev/vda 1000 400 600 40% /\n";
        assert_eq!(df_free_bytes(df), Some(600 * 1024));
        assert_eq!(df_free_bytes("df: /x: No such file"), None);
    }

    use super::*;

    fn reading(governor: &str, throttle: Option<ThrottleState>) -> ThermalReading {
        ThermalReading {
            governor: (!governor.is_empty()).then(|| governor.to_string()),
            throttle,
            ..Default::default()
        }
    }

    #[test]
    fn pi_firmware_bits_mark_throttling_now_or_during_the_cell() {
        let pi = |bits| reading("performance", Some(ThrottleState::PiFirmware(bits)));
        assert_eq!(throttled_between(&pi(0), &pi(0)), Some(false));
        // Soft temperature limit active after the cell.
        assert_eq!(throttled_between(&pi(0), &pi(0x8)), Some(true));
        // Throttled earlier since boot, nothing new: not this cell.
        assert_eq!(throttled_between(&pi(0x40000), &pi(0x40000)), Some(false));
        // Became throttled (sticky bit set) during the cell.
        assert_eq!(throttled_between(&pi(0), &pi(0x40000)), Some(true));
        assert!(!thermally_noisy(&pi(0), &pi(0)));
        assert!(thermally_noisy(&pi(0), &pi(0x4)));
    }

    #[test]
    fn throttle_events_and_governors_decide_noise_and_unknown_stays_unknown() {
        let events = |n| reading("performance", Some(ThrottleState::ThrottleEvents(n)));
        assert_eq!(throttled_between(&events(3), &events(3)), Some(false));
        assert_eq!(throttled_between(&events(3), &events(5)), Some(true));
        let unknown = reading("", None);
        assert_eq!(throttled_between(&unknown, &unknown), None);
        assert!(!thermally_noisy(&unknown, &unknown));
        let ondemand = reading("ondemand", None);
        assert!(thermally_noisy(&ondemand, &ondemand));
    }
}
