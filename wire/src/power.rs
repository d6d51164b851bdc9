//! Power and energy: the settings that tell an agent where a board's power
//! can be read, the parsers of each source's output (a Raspberry Pi 5's
//! PMIC rails from `vcgencmd pmic_read_adc`, Linux hwmon files, x86 RAPL
//! counters, a command that prints watts), what the agent measured over a
//! window (`EnergyMeasure`), what it found and idled at (`PowerReport`,
//! `power.json`), and the figures every row derives from them
//! (`EnergyFigures`, computed here and nowhere else).

use serde::{Deserialize, Serialize};

/// Where a board's power can be read, from its entry in boards.toml, and
/// how the agent samples it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PowerSettings {
    /// `vcgencmd` on the board (a Raspberry Pi's firmware tool, whose
    /// `pmic_read_adc` gives a Pi 5's rails); `None`: `/usr/bin/vcgencmd`,
    /// then `/opt/vc/bin/vcgencmd`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vcgencmd: Option<String>,
    /// A command (run by `sh -c` on the board) that prints the board's
    /// power in watts (`4.2`, `4.2 W` or `4200 mW`): an external meter. It
    /// is used before any other source.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub power_command: Option<String>,
    /// Milliseconds between samples (a source slower than this, such as
    /// `vcgencmd` at about 100 ms a call, is sampled as fast as it answers).
    #[serde(default = "default_interval_ms")]
    pub interval_ms: u64,
    /// Seconds the board's idle power is measured before the job (0: not).
    #[serde(default = "default_idle_seconds")]
    pub idle_seconds: f64,
}

impl Default for PowerSettings {
    fn default() -> Self {
        PowerSettings {
            vcgencmd: None,
            power_command: None,
            interval_ms: default_interval_ms(),
            idle_seconds: default_idle_seconds(),
        }
    }
}

fn default_interval_ms() -> u64 {
    100
}

fn default_idle_seconds() -> f64 {
    3.0
}

/// Where `vcgencmd` is looked for when the board does not say.
pub const VCGENCMD_PATHS: [&str; 2] = ["/usr/bin/vcgencmd", "/opt/vc/bin/vcgencmd"];

/// A figure from fewer samples than this is marked `power_few_samples`:
/// the agent extends a measurement until it has them, up to a bound.
pub const MIN_POWER_SAMPLES: u32 = 5;

/// One rail of a Pi 5's PMIC: current and voltage.
#[derive(Debug, Clone, PartialEq)]
pub struct Rail {
    pub name: String,
    pub amps: f64,
    pub volts: f64,
}

/// The rails `vcgencmd pmic_read_adc` reports both current and voltage
/// for, from lines such as `VDD_CORE_A current(7)=10.87674000A` and
/// `VDD_CORE_V volt(15)=0.89745940V` (rails with only a voltage, such as
/// `EXT5V_V`, are left out: their current is not measured).
pub fn pmic_rails(text: &str) -> Vec<Rail> {
    let mut amps = std::collections::BTreeMap::new();
    let mut volts = std::collections::BTreeMap::new();
    for line in text.lines() {
        let Some((label, value)) = line.trim().split_once('=') else {
            continue;
        };
        let mut words = label.split_whitespace();
        let (Some(name), Some(kind)) = (words.next(), words.next()) else {
            continue;
        };
        let number = |unit: char| value.trim().strip_suffix(unit)?.parse::<f64>().ok();
        if kind.starts_with("current(") {
            if let (Some(rail), Some(a)) = (name.strip_suffix("_A"), number('A')) {
                amps.insert(rail.to_string(), a);
            }
        } else if kind.starts_with("volt(") {
            if let (Some(rail), Some(v)) = (name.strip_suffix("_V"), number('V')) {
                volts.insert(rail.to_string(), v);
            }
        }
    }
    amps.into_iter()
        .filter_map(|(name, a)| {
            let v = *volts.get(&name)?;
            Some(Rail {
                name,
                amps: a,
                volts: v,
            })
        })
        .collect()
}

/// The PMIC's rails summed (watts); `None` when the output has none.
pub fn pmic_watts(text: &str) -> Option<f64> {
    let rails = pmic_rails(text);
    (!rails.is_empty()).then(|| rails.iter().map(|r| r.amps * r.volts).sum())
}

/// The power at a Pi 5's USB-C input estimated from its PMIC's rail sum:
/// the rails miss the 5 V loads and the conversion losses. The fit of
/// jfikar/RPi5-power (a USB-C meter against the rails, idle to full load):
/// wall = 1.1451 x rails + 0.5879 W.
pub fn pi5_wall_watts(rail_watts: f64) -> f64 {
    1.1451 * rail_watts + 0.5879
}

/// Watts from a meter command's output: the first number, in watts unless
/// followed by `mW`.
pub fn command_watts(text: &str) -> Option<f64> {
    let text = text.trim();
    let end = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '-' || c == '+' || c == 'e'))
        .unwrap_or(text.len());
    let number: f64 = text[..end].parse().ok()?;
    let unit = text[end..].trim_start();
    let watts = if unit.starts_with("mW") {
        number / 1000.0
    } else {
        number
    };
    (watts.is_finite() && watts >= 0.0).then_some(watts)
}

/// One hwmon channel: its file stem (`power1`, `in1`), label and value.
#[derive(Debug, Clone, PartialEq)]
pub struct HwmonFile {
    /// `power1_input`, `in2_input`, `curr2_input`.
    pub file: String,
    /// The channel's `_label` (`VDD_IN`), when it has one.
    pub label: Option<String>,
    pub value: f64,
}

/// A hwmon device's power in watts: its `power*_input` (microwatts), else
/// the product of each channel's `in*_input` (millivolts) and
/// `curr*_input` (milliamps), as an INA3221 reports them. A channel
/// labelled as the board's input (`VDD_IN`, on a Jetson) is the total and
/// is used alone; otherwise the channels are summed.
pub fn hwmon_watts(files: &[HwmonFile]) -> Option<f64> {
    let channel = |file: &str, prefix: &str| -> Option<String> {
        let rest = file.strip_prefix(prefix)?.strip_suffix("_input")?;
        rest.chars()
            .all(|c| c.is_ascii_digit())
            .then(|| rest.to_string())
    };
    let is_total = |label: &Option<String>| {
        label
            .as_deref()
            .is_some_and(|l| l.eq_ignore_ascii_case("VDD_IN") || l.eq_ignore_ascii_case("total"))
    };
    let pick = |channels: Vec<(bool, f64)>| -> Option<f64> {
        if channels.is_empty() {
            return None;
        }
        match channels.iter().find(|(total, _)| *total) {
            Some((_, w)) => Some(*w),
            None => Some(channels.iter().map(|(_, w)| w).sum()),
        }
    };
    let powers: Vec<(bool, f64)> = files
        .iter()
        .filter(|f| channel(&f.file, "power").is_some())
        .map(|f| (is_total(&f.label), f.value / 1e6))
        .collect();
    if let Some(w) = pick(powers) {
        return Some(w);
    }
    let pairs: Vec<(bool, f64)> = files
        .iter()
        .filter_map(|f| {
            let n = channel(&f.file, "curr")?;
            let volts = files
                .iter()
                .find(|v| channel(&v.file, "in").as_deref() == Some(n.as_str()))?;
            let label = f.label.clone().or_else(|| volts.label.clone());
            Some((is_total(&label), f.value / 1e3 * volts.value / 1e3))
        })
        .collect();
    pick(pairs)
}

/// Microjoules a RAPL counter advanced from `before` to `after`: it counts
/// up to `max_energy_range_uj` and starts again from 0 (read at least once
/// a wrap, which at a package's 100-odd watts is every 40-odd minutes).
pub fn rapl_delta_uj(before: u64, after: u64, max_range_uj: u64) -> u64 {
    if after >= before {
        after - before
    } else {
        max_range_uj.saturating_sub(before) + after
    }
}

/// What a source measured over one window of work: a test's repetitions
/// (model rows) or a cell's timed calls (kernel rows).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EnergyMeasure {
    /// The source's name (`pi5-pmic`, `rapl:package-0`, `hwmon:ina3221`,
    /// `command`).
    pub source: String,
    /// Energy over the window: the source's own measure (a Pi 5's rail
    /// sum) ...
    pub joules: f64,
    /// ... and at the wall, where the source gives an estimate of it
    /// (a Pi 5's PMIC: `pi5_wall_watts`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wall_joules: Option<f64>,
    pub seconds: f64,
    /// Readings the figure rests on (a counter's reads; a power source's
    /// samples).
    pub samples: u32,
    /// The work done in the window: tokens decoded, or kernel calls.
    pub work: f64,
}

/// The board's power before the job, idle.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct IdlePower {
    pub watts: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wall_watts: Option<f64>,
    pub samples: u32,
    pub seconds: f64,
}

/// A source the agent looked for, and why it is not the one used.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SourceCheck {
    /// `command`, `vcgencmd`, `hwmon`, `rapl`.
    pub source: String,
    /// Empty for the source used; else why it was not usable.
    pub unusable: String,
}

/// What a job's agent found of the board's power (`power.json` beside its
/// rows): the source it used, if any, every source it looked for and why
/// each other was not used, and the idle power it measured.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PowerReport {
    /// The name energy columns carry; `None`: no source, columns empty.
    pub source: Option<String>,
    pub checked: Vec<SourceCheck>,
    pub idle: Option<IdlePower>,
}

impl PowerReport {
    /// One line for the summary: the source and idle power, or which
    /// sources were looked for and why each was unusable.
    pub fn describe(&self) -> String {
        match &self.source {
            Some(source) => {
                let idle = self.idle.map_or(String::new(), |i| {
                    format!(
                        ", idle {:.2} W over {:.1} s ({} samples){}",
                        i.watts,
                        i.seconds,
                        i.samples,
                        i.wall_watts
                            .map_or(String::new(), |w| format!(", {w:.2} W at the wall"))
                    )
                });
                format!("power from {source}{idle}")
            }
            None => format!(
                "no power source, energy columns empty: {}",
                self.checked
                    .iter()
                    .map(|c| format!("{}: {}", c.source, c.unusable))
                    .collect::<Vec<_>>()
                    .join("; ")
            ),
        }
    }
}

/// The energy columns of a row, from its windows (every invocation's) and
/// the board's idle power: computed here for model and kernel rows alike.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct EnergyFigures {
    pub source: String,
    pub samples: u32,
    /// Mean power over the windows, W (the source's own measure) ...
    pub watts: Option<f64>,
    /// ... and at the wall, where the source estimates it.
    pub wall_watts: Option<f64>,
    pub idle_watts: Option<f64>,
    /// Joules per unit of work (a token, a kernel call) ...
    pub joules_per_work: Option<f64>,
    /// ... at the wall ...
    pub wall_joules_per_work: Option<f64>,
    /// ... and above the board's idle power (what the work itself cost).
    pub joules_per_work_above_idle: Option<f64>,
    /// Fewer than `MIN_POWER_SAMPLES` readings in some window.
    pub few_samples: bool,
}

impl EnergyFigures {
    pub fn of(windows: &[EnergyMeasure], idle: Option<&IdlePower>) -> EnergyFigures {
        let Some(first) = windows.first() else {
            return EnergyFigures::default();
        };
        let joules: f64 = windows.iter().map(|w| w.joules).sum();
        let seconds: f64 = windows.iter().map(|w| w.seconds).sum();
        let work: f64 = windows.iter().map(|w| w.work).sum();
        let wall: Option<f64> = windows.iter().map(|w| w.wall_joules).sum();
        let per_work = |j: f64| (work > 0.0).then(|| j / work);
        let per_second = |j: f64| (seconds > 0.0).then(|| j / seconds);
        EnergyFigures {
            source: first.source.clone(),
            samples: windows.iter().map(|w| w.samples).sum(),
            watts: per_second(joules),
            wall_watts: wall.and_then(per_second),
            idle_watts: idle.map(|i| i.watts),
            joules_per_work: per_work(joules),
            wall_joules_per_work: wall.and_then(per_work),
            joules_per_work_above_idle: idle
                .and_then(|i| per_work((joules - i.watts * seconds).max(0.0))),
            few_samples: windows.iter().any(|w| w.samples < MIN_POWER_SAMPLES),
        }
    }

    /// Work per joule (tokens per joule).
    pub fn work_per_joule(&self) -> Option<f64> {
        self.joules_per_work.filter(|j| *j > 0.0).map(|j| 1.0 / j)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `vcgencmd pmic_read_adc` on a Raspberry Pi 5, verbatim as a public
    /// Pi monitoring tool quotes it in its source (every rail the
    /// firmware prints, in its order and layout).
    pub const PI5_PMIC: &str = "     3V7_WL_SW_A current(0)=0.05855580A
       3V3_SYS_A current(1)=0.06148359A
       1V8_SYS_A current(2)=0.13272650A
      DDR_VDD2_A current(3)=0.13955800A
      DDR_VDDQ_A current(4)=0.00980400A
       1V1_SYS_A current(5)=0.19811380A
        0V8_SW_A current(6)=0.34157550A
      VDD_CORE_A current(7)=5.03652000A
       3V3_DAC_A current(17)=0.00006105A
       3V3_ADC_A current(18)=0.00054945A
       0V8_AON_A current(16)=0.00531135A
          HDMI_A current(22)=0.02161170A
     3V7_WL_SW_V volt(8)=3.61069200V
       3V3_SYS_V volt(9)=3.29982600V
       1V8_SYS_V volt(10)=1.81684800V
      DDR_VDD2_V volt(11)=1.10109800V
      DDR_VDDQ_V volt(12)=0.60366240V
       1V1_SYS_V volt(13)=1.10292900V
        0V8_SW_V volt(14)=0.80292960V
      VDD_CORE_V volt(15)=0.89369880V
       3V3_DAC_V volt(20)=3.29944700V
       3V3_ADC_V volt(21)=3.30402600V
       0V8_AON_V volt(19)=0.79618980V
          HDMI_V volt(23)=4.92450000V
         EXT5V_V volt(24)=4.92450000V
          BATT_V volt(25)=0.00341880V
";

    #[test]
    fn a_pi5_pmic_reading_sums_its_twelve_rails_and_estimates_the_wall() {
        let rails = pmic_rails(PI5_PMIC);
        assert_eq!(rails.len(), 12, "{rails:?}");
        assert!(rails.iter().all(|r| r.name != "EXT5V" && r.name != "BATT"));
        let core = rails.iter().find(|r| r.name == "VDD_CORE").unwrap();
        assert_eq!((core.amps, core.volts), (5.03652, 0.8936988));
        let watts = pmic_watts(PI5_PMIC).unwrap();
        let by_hand: f64 = rails.iter().map(|r| r.amps * r.volts).sum();
        assert!((watts - by_hand).abs() < 1e-12);
        // The core rail dominates: 4.50 W of 5.92.
        assert!((5.90..5.95).contains(&watts), "{watts}");
        assert!((pi5_wall_watts(watts) - (1.1451 * watts + 0.5879)).abs() < 1e-12);
        // A Pi 4's firmware has no PMIC to read.
        assert_eq!(
            pmic_watts("error=1 error_msg=\"Command not registered\"\n"),
            None
        );
    }

    #[test]
    fn meter_commands_hwmon_channels_and_rapl_wraps_read_as_watts_and_joules() {
        assert_eq!(command_watts("4.25\n"), Some(4.25));
        assert_eq!(command_watts("4.25 W"), Some(4.25));
        assert_eq!(command_watts("4250 mW\n"), Some(4.25));
        assert_eq!(command_watts("no meter"), None);
        assert_eq!(command_watts("-3"), None);
        let file = |file: &str, label: Option<&str>, value: f64| HwmonFile {
            file: file.into(),
            label: label.map(str::to_string),
            value,
        };
        // A power monitor in microwatts.
        assert_eq!(
            hwmon_watts(&[file("power1_input", None, 3_500_000.0)]),
            Some(3.5)
        );
        // A Jetson's INA3221: VDD_IN is the board's input, the others are
        // parts of it; millivolts times milliamps.
        let ina = [
            file("in1_input", Some("VDD_IN"), 5000.0),
            file("curr1_input", Some("VDD_IN"), 900.0),
            file("in2_input", Some("VDD_CPU_GPU_CV"), 5000.0),
            file("curr2_input", Some("VDD_CPU_GPU_CV"), 300.0),
            file("in7_input", None, 1200.0),
        ];
        assert_eq!(hwmon_watts(&ina), Some(4.5));
        // Without a total, channels add up; a voltage without a current is no power.
        assert!((hwmon_watts(&ina[2..]).unwrap() - 1.5).abs() < 1e-12);
        assert_eq!(hwmon_watts(&[file("in0_input", None, 1200.0)]), None);
        assert_eq!(hwmon_watts(&[file("temp1_input", None, 42000.0)]), None);
        // RAPL: 262143328850 uJ is a package's usual range.
        assert_eq!(rapl_delta_uj(1_000, 5_000, 262_143_328_850), 4_000);
        assert_eq!(
            rapl_delta_uj(262_143_328_000, 1_150, 262_143_328_850),
            2_000
        );
    }

    #[test]
    fn figures_come_from_every_window_with_the_idle_power_taken_off() {
        let window = |joules: f64, seconds: f64, samples: u32| EnergyMeasure {
            source: "pi5-pmic".into(),
            joules,
            wall_joules: Some(joules * 1.2),
            seconds,
            samples,
            work: 100.0,
        };
        let idle = IdlePower {
            watts: 2.0,
            wall_watts: None,
            samples: 30,
            seconds: 3.0,
        };
        let f = EnergyFigures::of(&[window(10.0, 2.0, 20), window(14.0, 2.0, 20)], Some(&idle));
        assert_eq!(f.watts, Some(6.0));
        assert_eq!(f.joules_per_work, Some(0.12));
        assert!((f.wall_joules_per_work.unwrap() - 0.144).abs() < 1e-12);
        // 24 J over 4 s, 8 J of it idle: 16 J for 200 tokens.
        assert_eq!(f.joules_per_work_above_idle, Some(0.08));
        assert!((f.work_per_joule().unwrap() - 1.0 / 0.12).abs() < 1e-9);
        assert!(!f.few_samples);
        assert!(EnergyFigures::of(&[window(1.0, 0.1, 2)], None).few_samples);
        assert_eq!(EnergyFigures::of(&[], None), EnergyFigures::default());
        let none = PowerReport {
            source: None,
            checked: vec![SourceCheck {
                source: "rapl".into(),
                unusable: "permission denied".into(),
            }],
            idle: None,
        };
        assert!(none.describe().contains("rapl: permission denied"));
    }
}
