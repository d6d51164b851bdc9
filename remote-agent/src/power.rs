//! Reading the board's power while it works: finding a source (a meter
//! command the board names, a Pi 5's PMIC through `vcgencmd`, hwmon, RAPL),
//! and a sampling thread beside a timed region that returns what the
//! window cost (`wire::power::EnergyMeasure`). Parsing is `wire::power`'s.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use wire::power::{
    command_watts, hwmon_watts, pi5_wall_watts, pmic_watts, rapl_delta_uj, EnergyMeasure,
    HwmonFile, IdlePower, PowerReport, PowerSettings, SourceCheck, VCGENCMD_PATHS,
};

/// Where hwmon devices and RAPL zones are read (a test mounts its own
/// trees over `/sys/class` in a private mount namespace).
const HWMON_DIR: &str = "/sys/class/hwmon";
const POWERCAP_DIR: &str = "/sys/class/powercap";

/// The most time between readings of a sysfs source (hwmon, RAPL).
const SYSFS_INTERVAL: Duration = Duration::from_millis(20);

/// The longest a measurement is extended past its timed region to gather
/// `MIN_POWER_SAMPLES` readings; a slower source's figure is marked.
pub const MAX_EXTENSION: Duration = Duration::from_secs(10);

#[derive(Debug, Clone)]
enum Source {
    /// `sh -c <command>` prints watts.
    Command(String),
    /// `<vcgencmd> pmic_read_adc`: a Pi 5's rails.
    Pmic(PathBuf),
    /// A hwmon device folder.
    Hwmon(PathBuf),
    /// RAPL package zones: `energy_uj` and its `max_energy_range_uj`.
    Rapl(Vec<(PathBuf, u64)>),
}

/// One reading: a power now, or the counters' energy so far.
enum Reading {
    Watts { watts: f64, wall: Option<f64> },
    Counters(Vec<u64>),
}

/// A board's power source, ready to sample.
#[derive(Debug, Clone)]
pub struct Meter {
    source: Source,
    name: String,
    interval: Duration,
}

impl Meter {
    /// The first usable source of: the board's meter command, `vcgencmd`
    /// with PMIC rails, a hwmon device reporting power, RAPL; with every
    /// source looked for and why each other was not used. On an `emulated`
    /// board hwmon and RAPL are not looked at: under qemu-user the files
    /// are the host's, not the board's.
    pub fn find(settings: &PowerSettings, emulated: bool) -> (Option<Meter>, PowerReport) {
        let interval = Duration::from_millis(settings.interval_ms.max(1));
        let mut checked = Vec::new();
        let mut found = None;
        for kind in ["command", "vcgencmd", "hwmon", "rapl"] {
            if found.is_some() {
                checked.push(SourceCheck {
                    source: kind.into(),
                    unusable: "not looked at: an earlier source is used".into(),
                });
                continue;
            }
            let looked = match kind {
                "command" => command_source(settings),
                "vcgencmd" => pmic_source(settings),
                _ if emulated => Err(format!(
                    "an emulated board: this machine's {kind} would be the host's, not the board's"
                )),
                "hwmon" => hwmon_source(Path::new(HWMON_DIR)),
                _ => rapl_source(Path::new(POWERCAP_DIR)),
            };
            match looked {
                Ok((source, name)) => {
                    // A sysfs file costs a read, not a process: sampled
                    // often, so short windows need no extending.
                    let interval = match source {
                        Source::Hwmon(_) | Source::Rapl(_) => interval.min(SYSFS_INTERVAL),
                        _ => interval,
                    };
                    let meter = Meter {
                        source,
                        name,
                        interval,
                    };
                    // A source that answers once but not twice is no source.
                    match meter.read() {
                        Ok(_) => {
                            checked.push(SourceCheck {
                                source: kind.into(),
                                unusable: String::new(),
                            });
                            found = Some(meter);
                        }
                        Err(why) => checked.push(SourceCheck {
                            source: kind.into(),
                            unusable: why,
                        }),
                    }
                }
                Err(why) => checked.push(SourceCheck {
                    source: kind.into(),
                    unusable: why,
                }),
            }
        }
        let report = PowerReport {
            source: found.as_ref().map(|m: &Meter| m.name.clone()),
            checked,
            idle: None,
        };
        (found, report)
    }

    fn read(&self) -> Result<Reading, String> {
        match &self.source {
            Source::Command(command) => {
                let text = run(Path::new("sh"), &["-c", command])?;
                command_watts(&text)
                    .map(|watts| Reading::Watts { watts, wall: None })
                    .ok_or_else(|| format!("`{command}` printed no watts: `{}`", first_line(&text)))
            }
            Source::Pmic(vcgencmd) => {
                let text = run(vcgencmd, &["pmic_read_adc"])?;
                pmic_watts(&text)
                    .map(|watts| Reading::Watts {
                        watts,
                        wall: Some(pi5_wall_watts(watts)),
                    })
                    .ok_or_else(|| {
                        format!(
                            "{} pmic_read_adc printed no rails (a Pi 4, or firmware without the PMIC command): `{}`",
                            vcgencmd.display(),
                            first_line(&text)
                        )
                    })
            }
            Source::Hwmon(dir) => hwmon_watts(&hwmon_files(dir))
                .map(|watts| Reading::Watts { watts, wall: None })
                .ok_or_else(|| format!("{} reports no power", dir.display())),
            Source::Rapl(zones) => zones
                .iter()
                .map(|(path, _)| read_counter(path))
                .collect::<Result<Vec<u64>, String>>()
                .map(Reading::Counters),
        }
    }

    /// Starts sampling on a thread of its own, beside the caller's work.
    pub fn start(&self) -> Sampling {
        let stop = Arc::new(AtomicBool::new(false));
        let samples = Arc::new(AtomicU32::new(0));
        let failures = Arc::new(AtomicU32::new(0));
        let meter = self.clone();
        let (stop_flag, count, failed) = (stop.clone(), samples.clone(), failures.clone());
        let started = Instant::now();
        let thread = std::thread::spawn(move || {
            let mut tally = Tally::default();
            loop {
                let t = started.elapsed().as_secs_f64();
                match meter.read() {
                    Ok(reading) => {
                        tally.add(&meter, t, reading);
                        count.store(tally.samples, Ordering::Relaxed);
                    }
                    Err(why) => {
                        failed.fetch_add(1, Ordering::Relaxed);
                        warn_once(&meter.name, &why);
                    }
                }
                if stop_flag.load(Ordering::SeqCst) {
                    return tally;
                }
                // Parked until the next reading or a stop (`finish`
                // unparks it for a last reading at the window's end): one
                // wake-up a reading, not a poll beside the timed threads.
                let next = Instant::now() + meter.interval;
                while !stop_flag.load(Ordering::SeqCst) {
                    let now = Instant::now();
                    if now >= next {
                        break;
                    }
                    std::thread::park_timeout(next - now);
                }
            }
        });
        Sampling {
            stop,
            samples,
            failures,
            started,
            thread,
            name: self.name.clone(),
        }
    }

    /// The board's power while the agent does nothing, over `seconds`.
    pub fn idle(&self, seconds: f64) -> Option<IdlePower> {
        let sampling = self.start();
        std::thread::sleep(Duration::from_secs_f64(seconds.max(0.0)));
        let window = sampling.finish(0.0)?;
        (window.seconds > 0.0).then(|| IdlePower {
            watts: window.joules / window.seconds,
            wall_watts: window.wall_joules.map(|j| j / window.seconds),
            samples: window.samples,
            seconds: window.seconds,
        })
    }
}

/// The board's power source for this process and what was looked for,
/// found once, on first use, from the job's settings.
pub fn board_power(
    settings: &PowerSettings,
    emulated: bool,
) -> &'static (Option<Meter>, PowerReport) {
    static FOUND: std::sync::OnceLock<(Option<Meter>, PowerReport)> = std::sync::OnceLock::new();
    FOUND.get_or_init(|| Meter::find(settings, emulated))
}

/// The board's power source for this process (`None`: none).
pub fn board_meter(settings: &PowerSettings, emulated: bool) -> Option<&'static Meter> {
    board_power(settings, emulated).0.as_ref()
}

/// What the sampling thread gathered.
#[derive(Default)]
struct Tally {
    samples: u32,
    watts_sum: f64,
    wall_sum: Option<f64>,
    /// Counters: the last reading, its time, the first reading's time
    /// and the microjoules since.
    last: Option<Vec<u64>>,
    first_t: Option<f64>,
    last_t: f64,
    microjoules: u64,
}

impl Tally {
    fn add(&mut self, meter: &Meter, t: f64, reading: Reading) {
        self.samples += 1;
        self.first_t.get_or_insert(t);
        self.last_t = t;
        match reading {
            Reading::Watts { watts, wall } => {
                self.watts_sum += watts;
                if let Some(w) = wall {
                    *self.wall_sum.get_or_insert(0.0) += w;
                }
            }
            Reading::Counters(now) => {
                if let (Some(before), Source::Rapl(zones)) = (&self.last, &meter.source) {
                    self.microjoules += before
                        .iter()
                        .zip(&now)
                        .zip(zones)
                        .map(|((b, a), (_, range))| rapl_delta_uj(*b, *a, *range))
                        .sum::<u64>();
                }
                self.last = Some(now);
            }
        }
    }
}

/// Says once per process that the power source stopped answering (a
/// window without readings has no energy figure; the agent log says why).
fn warn_once(source: &str, why: &str) {
    static WARNED: AtomicBool = AtomicBool::new(false);
    if !WARNED.swap(true, Ordering::Relaxed) {
        eprintln!("power source {source} failed a reading (such windows keep fewer readings, or none): {why}");
    }
}

/// Failed readings in a window after which it stops being extended: a
/// source that stopped answering must not add 10 s to every test.
const GIVE_UP_FAILURES: u32 = 3;

/// A sampling thread running beside some work.
pub struct Sampling {
    stop: Arc<AtomicBool>,
    samples: Arc<AtomicU32>,
    failures: Arc<AtomicU32>,
    started: Instant,
    thread: std::thread::JoinHandle<Tally>,
    name: String,
}

impl Sampling {
    /// Readings so far.
    pub fn samples(&self) -> u32 {
        self.samples.load(Ordering::Relaxed)
    }

    /// Whether the window has enough readings for a figure, or has been
    /// extended as long as it may be, or its source stopped answering.
    pub fn enough(&self, work_started: Instant) -> bool {
        self.samples() >= wire::power::MIN_POWER_SAMPLES
            || work_started.elapsed() >= MAX_EXTENSION
            || self.failures.load(Ordering::Relaxed) >= GIVE_UP_FAILURES
    }

    /// Runs `more` (one more untimed unit of the work) until the window is
    /// `enough`, then finishes it for the `done` units before and those,
    /// each `per_unit` of work (tokens a repetition, or 1 a call).
    pub fn extend_and_finish<E>(
        self,
        done: usize,
        per_unit: f64,
        mut more: impl FnMut() -> Result<(), E>,
    ) -> Result<Option<EnergyMeasure>, E> {
        let (extension, mut units) = (Instant::now(), done);
        while !self.enough(extension) {
            more()?;
            units += 1;
        }
        Ok(self.finish(units as f64 * per_unit))
    }

    /// Stops sampling (one last reading at the window's end) and returns
    /// what the window cost, for `work` (tokens, calls) done in it; `None`
    /// when the source gave no reading (a counter: fewer than two), which
    /// would read as no energy at all.
    pub fn finish(self, work: f64) -> Option<EnergyMeasure> {
        let window = self.started.elapsed().as_secs_f64();
        self.stop.store(true, Ordering::SeqCst);
        self.thread.thread().unpark();
        let tally = self.thread.join().unwrap_or_default();
        let counter_reads = tally.last.as_ref().map(|_| tally.samples);
        if tally.samples == 0 || counter_reads.is_some_and(|n| n < 2) {
            return None;
        }
        let n = tally.samples as f64;
        let (joules, wall_joules, seconds) = match tally.last {
            // A counter measured exactly from its first read to its last.
            Some(_) => {
                let seconds = tally.last_t - tally.first_t.unwrap_or(tally.last_t);
                (tally.microjoules as f64 / 1e6, None, seconds)
            }
            // A power source: the mean of its samples over the window.
            None => (
                tally.watts_sum / n * window,
                tally.wall_sum.map(|w| w / n * window),
                window,
            ),
        };
        Some(EnergyMeasure {
            source: self.name,
            joules,
            wall_joules,
            seconds,
            samples: tally.samples,
            work,
        })
    }
}

fn first_line(text: &str) -> &str {
    text.lines().next().unwrap_or_default().trim()
}

/// Runs a source's program and returns its stdout; a failure says why.
fn run(program: &Path, args: &[&str]) -> Result<String, String> {
    let out = std::process::Command::new(program)
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|e| format!("cannot run {}: {e}", program.display()))?;
    if !out.status.success() {
        return Err(format!(
            "{} {} failed ({}): {}",
            program.display(),
            args.join(" "),
            out.status,
            first_line(&String::from_utf8_lossy(&out.stderr))
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn command_source(settings: &PowerSettings) -> Result<(Source, String), String> {
    let command = settings
        .power_command
        .clone()
        .ok_or("the board names no power_command")?;
    Ok((Source::Command(command), "command".into()))
}

fn pmic_source(settings: &PowerSettings) -> Result<(Source, String), String> {
    let candidates: Vec<String> = match &settings.vcgencmd {
        Some(path) => vec![path.clone()],
        None => VCGENCMD_PATHS.iter().map(|p| p.to_string()).collect(),
    };
    let path = candidates
        .iter()
        .find(|p| Path::new(p).exists())
        .ok_or_else(|| format!("not found at {}", candidates.join(", ")))?;
    Ok((Source::Pmic(PathBuf::from(path)), "pi5-pmic".into()))
}

/// The files of a hwmon device that `hwmon_watts` reads.
fn hwmon_files(dir: &Path) -> Vec<HwmonFile> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| {
            let file = e.file_name().to_string_lossy().into_owned();
            let stem = file.strip_suffix("_input")?;
            if !["power", "in", "curr"].iter().any(|p| stem.starts_with(p)) {
                return None;
            }
            let value = std::fs::read_to_string(e.path())
                .ok()?
                .trim()
                .parse()
                .ok()?;
            let label = std::fs::read_to_string(dir.join(format!("{stem}_label")))
                .ok()
                .map(|l| l.trim().to_string());
            Some(HwmonFile { file, label, value })
        })
        .collect()
}

fn hwmon_source(root: &Path) -> Result<(Source, String), String> {
    let entries = std::fs::read_dir(root).map_err(|_| format!("no {}", root.display()))?;
    let mut devices: Vec<PathBuf> = entries.flatten().map(|e| e.path()).collect();
    devices.sort();
    devices
        .into_iter()
        .find(|dir| hwmon_watts(&hwmon_files(dir)).is_some())
        .map(|dir| {
            let name = std::fs::read_to_string(dir.join("name"))
                .map(|n| n.trim().to_string())
                .unwrap_or_else(|_| dir.display().to_string());
            (Source::Hwmon(dir), format!("hwmon:{name}"))
        })
        .ok_or_else(|| {
            format!(
                "no device under {} reports power (power*_input, or in*_input with curr*_input)",
                root.display()
            )
        })
}

fn read_counter(path: &Path) -> Result<u64, String> {
    match std::fs::read_to_string(path) {
        Ok(text) => text
            .trim()
            .parse()
            .map_err(|_| format!("{} holds no counter: `{}`", path.display(), text.trim())),
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => Err(format!(
            "{}: permission denied (RAPL's counters are readable by root only since Linux 5.10: run the agent as root, or give read access to energy_uj)",
            path.display()
        )),
        Err(e) => Err(format!("{}: {e}", path.display())),
    }
}

/// RAPL's package zones (`intel-rapl:N`, not their `:N:M` subzones, which
/// the package already counts).
fn rapl_source(root: &Path) -> Result<(Source, String), String> {
    let entries = std::fs::read_dir(root).map_err(|_| format!("no {}", root.display()))?;
    let mut zones: Vec<PathBuf> = entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_prefix("intel-rapl:"))
                .is_some_and(|n| !n.contains(':'))
        })
        .collect();
    zones.sort();
    if zones.is_empty() {
        return Err(format!("no intel-rapl:N zones under {}", root.display()));
    }
    let mut names = Vec::new();
    let mut counters = Vec::new();
    for zone in zones {
        let range = std::fs::read_to_string(zone.join("max_energy_range_uj"))
            .ok()
            .and_then(|t| t.trim().parse().ok())
            .ok_or_else(|| format!("{} has no max_energy_range_uj", zone.display()))?;
        names.push(
            std::fs::read_to_string(zone.join("name"))
                .map(|n| n.trim().to_string())
                .unwrap_or_else(|_| "package".into()),
        );
        counters.push((zone.join("energy_uj"), range));
    }
    Ok((Source::Rapl(counters), format!("rapl:{}", names.join("+"))))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rapl_tree_is_found_its_counter_integrated_across_a_wrap_and_unreadable_said_so() {
        let dir = tempfile::tempdir().unwrap();
        let zone = dir.path().join("intel-rapl:0");
        std::fs::create_dir_all(zone.join("intel-rapl:0:0")).unwrap();
        std::fs::create_dir_all(dir.path().join("intel-rapl-mmio:0")).unwrap();
        std::fs::write(zone.join("name"), "package-0\n").unwrap();
        std::fs::write(zone.join("max_energy_range_uj"), "1000000\n").unwrap();
        std::fs::write(zone.join("energy_uj"), "900000\n").unwrap();
        let (source, name) = rapl_source(dir.path()).unwrap();
        assert_eq!(name, "rapl:package-0");
        let meter = Meter {
            source,
            name,
            interval: Duration::from_millis(5),
        };
        let sampling = meter.start();
        while sampling.samples() < 2 {
            std::thread::sleep(Duration::from_millis(1));
        }
        // 0.3 J later, past the wrap at 1 J.
        std::fs::write(zone.join("energy_uj"), "200000\n").unwrap();
        std::thread::sleep(Duration::from_millis(30));
        let window = sampling.finish(3.0).unwrap();
        assert!((window.joules - 0.3).abs() < 1e-9, "{window:?}");
        assert!(window.samples >= 3);
        assert_eq!(
            read_counter(&dir.path().join("missing")).unwrap_err(),
            format!(
                "{}: No such file or directory (os error 2)",
                dir.path().join("missing").display()
            )
        );
        assert!(rapl_source(&dir.path().join("none"))
            .unwrap_err()
            .starts_with("no "));
    }

    #[test]
    fn sources_are_tried_in_order_and_each_unusable_one_says_why() {
        let dir = tempfile::tempdir().unwrap();
        let meter_script = dir.path().join("meter");
        std::fs::write(&meter_script, "#!/bin/sh\necho 2500 mW\n").unwrap();
        let settings = PowerSettings {
            power_command: Some(format!("sh {}", meter_script.display())),
            vcgencmd: Some(dir.path().join("no-vcgencmd").display().to_string()),
            ..PowerSettings::default()
        };
        let (meter, report) = Meter::find(&settings, false);
        let meter = meter.unwrap();
        assert_eq!(meter.name, "command");
        assert_eq!(report.checked[0].unusable, "");
        assert!(report.checked[1].unusable.starts_with("not looked at"));
        let idle = meter.idle(0.3).unwrap();
        assert!((idle.watts - 2.5).abs() < 1e-9, "{idle:?}");
        assert!(idle.samples >= 2);
        // A command that prints no number, and a vcgencmd that is missing.
        let settings = PowerSettings {
            power_command: Some("echo no meter here".into()),
            ..settings
        };
        let (_, report) = Meter::find(&settings, false);
        assert_eq!(
            report.checked[0].unusable,
            "`echo no meter here` printed no watts: `no meter here`"
        );
        assert!(
            report.checked[1].unusable.starts_with("not found at"),
            "{report:?}"
        );
        // Under qemu-user the machine's sysfs is the host's: not looked at.
        let (_, report) = Meter::find(&PowerSettings::default(), true);
        for source in &report.checked[2..] {
            assert!(
                source
                    .unusable
                    .starts_with("an emulated board: this machine's"),
                "{report:?}"
            );
        }
    }

    #[test]
    fn a_meter_that_stops_answering_ends_its_windows_early_and_gives_no_figure_from_nothing() {
        let dir = tempfile::tempdir().unwrap();
        // A meter that answers twice (the search and one sample), then fails.
        let calls = dir.path().join("calls");
        let script = dir.path().join("meter");
        std::fs::write(
            &script,
            format!(
                "#!/bin/sh\necho x >> {calls}\n[ $(wc -l < {calls}) -le 2 ] || exit 1\necho 3.0\n",
                calls = calls.display()
            ),
        )
        .unwrap();
        let settings = PowerSettings {
            power_command: Some(format!("sh {}", script.display())),
            interval_ms: 10,
            ..PowerSettings::default()
        };
        let meter = Meter::find(&settings, false).0.unwrap();
        let sampling = meter.start();
        let work = Instant::now();
        while !sampling.enough(work) {
            std::thread::sleep(Duration::from_millis(5));
        }
        // Given up after a few failures, long before the 10 s extension.
        assert!(
            work.elapsed() < Duration::from_secs(3),
            "{:?}",
            work.elapsed()
        );
        let window = sampling.finish(10.0).unwrap();
        assert_eq!(
            (window.samples, window.joules > 0.0),
            (1, true),
            "{window:?}"
        );
        // Nothing but failures: no figure, rather than zero joules.
        assert!(meter.start().finish(10.0).is_none());
        assert!(meter.idle(0.05).is_none());
    }
}
