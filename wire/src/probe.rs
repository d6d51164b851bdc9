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
    /// The board's power source as a model job's agent found it, with the
    /// sources it looked for and the idle power it measured; absent from
    /// kernel jobs' and older probes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub power: Option<crate::power::PowerReport>,
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
    /// The fan: `3100 rpm` (hwmon `fan1_input`) or `level 2/4` (a
    /// `pwm-fan` cooling device, as on a Pi 5's active cooler).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fan: Option<String>,
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

/// Whether the board's supply was too low between two readings (a Pi's
/// firmware bit 0 now, or bit 16 newly set); `None` when it does not say.
pub fn under_voltage_between(before: &ThermalReading, after: &ThermalReading) -> Option<bool> {
    match (before.throttle?, after.throttle?) {
        (ThrottleState::PiFirmware(b), ThrottleState::PiFirmware(a)) => {
            Some((b | a) & 0x1 != 0 || (a & !b) & 0x1_0000 != 0)
        }
        _ => None,
    }
}

/// The heat columns of a row measured in several windows (a model test's
/// invocations), each with its readings before and after: temperatures and
/// clocks from the first window's start to the last one's end, flags if
/// any window raised them. Computed here for every model row.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct HeatFigures {
    pub temp_before_c: Option<f64>,
    pub temp_after_c: Option<f64>,
    pub freq_before_mhz: Option<f64>,
    pub freq_after_mhz: Option<f64>,
    pub governor: String,
    pub fan: String,
    pub throttled: Option<bool>,
    pub under_voltage: Option<bool>,
    pub thermal_noisy: bool,
}

impl HeatFigures {
    pub fn over(windows: &[(&ThermalReading, &ThermalReading)]) -> HeatFigures {
        let (Some((first, _)), Some((_, last))) = (windows.first(), windows.last()) else {
            return HeatFigures::default();
        };
        let any = |f: fn(&ThermalReading, &ThermalReading) -> Option<bool>| {
            windows
                .iter()
                .filter_map(|(b, a)| f(b, a))
                .reduce(|x, y| x || y)
        };
        HeatFigures {
            temp_before_c: first.temperature_c,
            temp_after_c: last.temperature_c,
            freq_before_mhz: first.freq_mhz,
            freq_after_mhz: last.freq_mhz,
            governor: first.governor.clone().unwrap_or_default(),
            fan: last.fan.clone().unwrap_or_default(),
            throttled: any(throttled_between),
            under_voltage: any(under_voltage_between),
            thermal_noisy: windows.iter().any(|(b, a)| thermally_noisy(b, a)),
        }
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
        // Under-voltage now, or newly since boot; old news is not this cell's.
        assert_eq!(under_voltage_between(&pi(0), &pi(0x1)), Some(true));
        assert_eq!(
            under_voltage_between(&pi(0x10000), &pi(0x10000)),
            Some(false)
        );
        assert_eq!(under_voltage_between(&pi(0), &pi(0x10000)), Some(true));
        // Two invocations of a model test: the second throttled.
        let hot = |t: f64, bits| ThermalReading {
            temperature_c: Some(t),
            ..pi(bits)
        };
        let (a, b, c, d) = (hot(50.0, 0), hot(70.0, 0), hot(71.0, 0), hot(82.0, 0x8));
        let heat = HeatFigures::over(&[(&a, &b), (&c, &d)]);
        assert_eq!(
            (heat.temp_before_c, heat.temp_after_c),
            (Some(50.0), Some(82.0))
        );
        assert_eq!(heat.throttled, Some(true));
        assert_eq!(heat.under_voltage, Some(false));
        assert!(heat.thermal_noisy);
        assert_eq!(HeatFigures::over(&[]), HeatFigures::default());
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
