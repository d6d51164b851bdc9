//! The settings a model test runs under besides its thread count, as
//! llama-bench names them: the KV-cache types (`-ctk`/`-ctv`), flash
//! attention (`-fa`), the batch and micro-batch (`-b`/`-ub`), where and how
//! GGML's threads run (`-C`, `--cpu-strict`, `--poll`, `--prio`) and the
//! depth the KV cache already holds (`-d`). A model matrix multiplies its tests
//! by them, the agent creates each context with them, and a row records
//! them (they are part of its identity: rows under other settings are
//! never judged against each other).

use serde::{Deserialize, Serialize};
use std::fmt;

/// GGML types llama.cpp can hold a KV cache in on the CPU (llama-bench's
/// `-ctk`/`-ctv` choices).
pub const KV_CACHE_TYPES: [&str; 9] = [
    "f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "iq4_nl", "q5_0", "q5_1",
];

/// llama-bench's default batch and micro-batch.
pub const DEFAULT_N_BATCH: usize = 2048;
pub const DEFAULT_N_UBATCH: usize = 512;

/// The K and V cache types: `q8_0` for both, `q8_0/f16` for a `q8_0` K
/// cache and an `f16` V cache.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct KvCacheType {
    pub k: String,
    pub v: String,
}

impl Default for KvCacheType {
    fn default() -> Self {
        KvCacheType {
            k: "f16".into(),
            v: "f16".into(),
        }
    }
}

impl KvCacheType {
    /// `q8_0` or `q8_0/f16`; a type llama.cpp cannot hold a cache in is
    /// refused naming the ones it can.
    pub fn parse(text: &str) -> Result<KvCacheType, String> {
        let (k, v) = text.split_once('/').unwrap_or((text, text));
        let known = |t: &str| {
            let t = t.trim().to_ascii_lowercase();
            if KV_CACHE_TYPES.contains(&t.as_str()) {
                Ok(t)
            } else {
                Err(format!(
                    "kv_type `{text}`: `{t}` is not a KV-cache type llama.cpp has (one of {}; `<k>/<v>` for different K and V types)",
                    KV_CACHE_TYPES.join(", ")
                ))
            }
        };
        Ok(KvCacheType {
            k: known(k)?,
            v: known(v)?,
        })
    }

    /// A quantized V cache: llama.cpp runs it only with flash attention.
    pub fn v_is_quantized(&self) -> bool {
        !matches!(self.v.as_str(), "f32" | "f16" | "bf16")
    }
}

impl fmt::Display for KvCacheType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.k == self.v {
            write!(f, "{}", self.k)
        } else {
            write!(f, "{}/{}", self.k, self.v)
        }
    }
}

impl TryFrom<String> for KvCacheType {
    type Error = String;
    fn try_from(text: String) -> Result<Self, String> {
        KvCacheType::parse(&text)
    }
}

impl From<KvCacheType> for String {
    fn from(kv: KvCacheType) -> String {
        kv.to_string()
    }
}

/// Flash attention: `auto` lets llama.cpp decide (the row records what it
/// decided), `on`, `off`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FlashAttn {
    #[default]
    Auto,
    On,
    Off,
}

impl FlashAttn {
    pub fn name(self) -> &'static str {
        match self {
            FlashAttn::Auto => "auto",
            FlashAttn::On => "on",
            FlashAttn::Off => "off",
        }
    }
}

/// How a recipe's weights are loaded (llama-bench's `-mmp`, and
/// llama.cpp's `--mlock`): mapped from the file (`mmap`, the default: the
/// page cache holds them and the kernel may drop them under pressure),
/// read into memory the process owns (`no-mmap`), or mapped and locked in
/// memory (`mlock`: never paged out; needs a memlock limit of at least the
/// file, or CAP_IPC_LOCK).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ModelLoad {
    #[default]
    Mmap,
    NoMmap,
    Mlock,
}

impl ModelLoad {
    pub fn name(self) -> &'static str {
        match self {
            ModelLoad::Mmap => "mmap",
            ModelLoad::NoMmap => "no-mmap",
            ModelLoad::Mlock => "mlock",
        }
    }

    /// The load mode of a row's `load_mode` column (empty in older rows:
    /// mmap).
    pub fn from_name(name: &str) -> Option<ModelLoad> {
        match name {
            "" | "mmap" => Some(ModelLoad::Mmap),
            "no-mmap" => Some(ModelLoad::NoMmap),
            "mlock" => Some(ModelLoad::Mlock),
            _ => None,
        }
    }
}

/// A model row's settings as part of its identity: its context's
/// (`ContextSettings::key`) and, when not mmap, its load mode
/// (`.../load=no-mmap`); empty at llama-bench's defaults.
pub fn settings_key(context: &ContextSettings, load: ModelLoad) -> String {
    let context = context.key();
    match load {
        ModelLoad::Mmap => context,
        load if context.is_empty() => format!("load={}", load.name()),
        load => format!("{context}/load={}", load.name()),
    }
}

/// llama-bench's `--prio`: the scheduling priority of the process and of
/// GGML's worker threads.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Priority {
    Low,
    #[default]
    Normal,
    Medium,
    High,
    Realtime,
}

impl Priority {
    pub const ALL: [Priority; 5] = [
        Priority::Low,
        Priority::Normal,
        Priority::Medium,
        Priority::High,
        Priority::Realtime,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Priority::Low => "low",
            Priority::Normal => "normal",
            Priority::Medium => "medium",
            Priority::High => "high",
            Priority::Realtime => "realtime",
        }
    }

    /// The process's nice value, as llama.cpp's `set_process_priority`
    /// sets it on Linux.
    pub fn nice(self) -> i32 {
        match self {
            Priority::Low => 5,
            Priority::Normal => 0,
            Priority::Medium => -5,
            Priority::High => -10,
            Priority::Realtime => -20,
        }
    }

    /// GGML's `ggml_sched_priority` (llama-bench's `--prio` number).
    pub fn ggml_level(self) -> i32 {
        match self {
            Priority::Low => -1,
            Priority::Normal => 0,
            Priority::Medium => 1,
            Priority::High => 2,
            Priority::Realtime => 3,
        }
    }
}

/// Where and how GGML's worker threads run: llama-bench's `-C` (a hex CPU
/// mask; `0x0` leaves placement to the OS), `--cpu-strict` (one thread per
/// CPU of the mask), `--poll` (0-100: how long an idle worker spins before
/// sleeping) and `--prio`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct CpuSettings {
    pub cpu_mask: String,
    pub cpu_strict: bool,
    pub poll: u32,
    pub priority: Priority,
}

/// GGML's most CPUs in a mask (`GGML_MAX_N_THREADS`).
pub const MAX_MASK_CPUS: usize = 512;

impl Default for CpuSettings {
    fn default() -> Self {
        CpuSettings {
            cpu_mask: "0x0".into(),
            cpu_strict: false,
            poll: 50,
            priority: Priority::Normal,
        }
    }
}

impl CpuSettings {
    /// The CPUs of a hex mask (`0x0f`, `f0`), lowest bit CPU 0; empty for
    /// `0x0`. A mask that is not hex, or names a CPU past GGML's 512, is
    /// refused.
    pub fn mask_cpus(mask: &str) -> Result<Vec<usize>, String> {
        let digits = mask
            .strip_prefix("0x")
            .or_else(|| mask.strip_prefix("0X"))
            .unwrap_or(mask);
        if digits.is_empty() || !digits.chars().all(|c| c.is_ascii_hexdigit()) {
            return Err(format!(
                "cpu_mask `{mask}` is not a hex CPU mask (`0x0f` is CPUs 0-3, as llama-bench's -C)"
            ));
        }
        let mut cpus = Vec::new();
        for (position, c) in digits.chars().rev().enumerate() {
            let nibble = c.to_digit(16).unwrap_or(0) as usize;
            for bit in 0..4 {
                if nibble & (1 << bit) != 0 {
                    let cpu = position * 4 + bit;
                    if cpu >= MAX_MASK_CPUS {
                        return Err(format!(
                            "cpu_mask `{mask}` names CPU {cpu}; GGML takes CPUs 0-{}",
                            MAX_MASK_CPUS - 1
                        ));
                    }
                    cpus.push(cpu);
                }
            }
        }
        cpus.sort_unstable();
        Ok(cpus)
    }

    /// The hex mask of `cpus` (`[4, 5, 6, 7]` is `0xf0`), as `-C` takes it.
    pub fn mask_of(cpus: &[usize]) -> String {
        let Some(&top) = cpus.iter().max() else {
            return "0x0".into();
        };
        let mut nibbles = vec![0u32; top / 4 + 1];
        for &cpu in cpus {
            nibbles[cpu / 4] |= 1 << (cpu % 4);
        }
        let digits: String = nibbles
            .iter()
            .rev()
            .map(|n| char::from_digit(*n, 16).unwrap_or('0'))
            .collect();
        format!("0x{digits}")
    }

    /// `C=0x3/strict=1/poll=0/prio=high`: the part of a row's identity;
    /// empty at llama-bench's defaults.
    pub fn key(&self) -> String {
        if *self == CpuSettings::default() {
            return String::new();
        }
        format!(
            "C={}/strict={}/poll={}/prio={}",
            self.cpu_mask,
            u8::from(self.cpu_strict),
            self.poll,
            self.priority.name()
        )
    }
}

/// What one context of a model test is created with: one combination of a
/// model matrix's `kv_type`, `flash_attn`, `n_batch`, `n_ubatch` and CPU
/// settings.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ContextSettings {
    pub kv_type: KvCacheType,
    pub flash_attn: FlashAttn,
    pub n_batch: usize,
    pub n_ubatch: usize,
    #[serde(default)]
    pub cpu: CpuSettings,
}

impl Default for ContextSettings {
    fn default() -> Self {
        ContextSettings {
            kv_type: KvCacheType::default(),
            flash_attn: FlashAttn::Auto,
            n_batch: DEFAULT_N_BATCH,
            n_ubatch: DEFAULT_N_UBATCH,
            cpu: CpuSettings::default(),
        }
    }
}

impl ContextSettings {
    /// The settings' part of a row's identity, llama-bench's names:
    /// `ctk=q8_0/ctv=q8_0/fa=on/b=2048/ub=512`; empty at the defaults, so
    /// rows from before these settings existed stay comparable.
    pub fn key(&self) -> String {
        if *self == ContextSettings::default() {
            return String::new();
        }
        let base = format!(
            "ctk={}/ctv={}/fa={}/b={}/ub={}",
            self.kv_type.k,
            self.kv_type.v,
            self.flash_attn.name(),
            self.n_batch,
            self.n_ubatch
        );
        match self.cpu.key() {
            cpu if cpu.is_empty() => base,
            cpu => format!("{base}/{cpu}"),
        }
    }

    /// Whether quality depends on these settings beyond the defaults'
    /// (the batch sizes and CPU settings change only speed).
    pub fn same_quality_as(&self, other: &ContextSettings) -> bool {
        self.kv_type == other.kv_type && self.flash_attn == other.flash_attn
    }
}

/// A test's name, as llama-bench writes it without the spaces: `pp512`,
/// `tg128`, a prompt then generation `pp512+tg128`, and on a KV cache that
/// already holds tokens `tg128+d4096`.
pub fn test_name(n_prompt: usize, n_gen: usize, depth: usize) -> String {
    let test = match (n_prompt, n_gen) {
        (p, 0) => format!("pp{p}"),
        (0, g) => format!("tg{g}"),
        (p, g) => format!("pp{p}+tg{g}"),
    };
    if depth == 0 {
        test
    } else {
        format!("{test}+d{depth}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_masks_parse_as_llama_bench_s_and_settings_key_only_when_set() {
        assert_eq!(CpuSettings::mask_cpus("0x0").unwrap(), Vec::<usize>::new());
        assert_eq!(CpuSettings::mask_cpus("0x0f").unwrap(), vec![0, 1, 2, 3]);
        assert_eq!(CpuSettings::mask_cpus("A0").unwrap(), vec![5, 7]);
        assert!(CpuSettings::mask_cpus("0xg")
            .unwrap_err()
            .contains("not a hex CPU mask"));
        let wide = format!("0x1{}", "0".repeat(128));
        assert!(CpuSettings::mask_cpus(&wide)
            .unwrap_err()
            .contains("CPU 512"));
        let mut settings = ContextSettings::default();
        assert_eq!(settings.key(), "");
        settings.cpu.poll = 0;
        settings.cpu.priority = Priority::High;
        assert_eq!(
            settings.key(),
            "ctk=f16/ctv=f16/fa=auto/b=2048/ub=512/C=0x0/strict=0/poll=0/prio=high"
        );
        assert!(settings.same_quality_as(&ContextSettings::default()));
    }

    #[test]
    fn masks_of_cpu_lists_round_trip_and_load_modes_join_the_key() {
        assert_eq!(CpuSettings::mask_of(&[4, 5, 6, 7]), "0xf0");
        assert_eq!(CpuSettings::mask_of(&[0, 9]), "0x201");
        assert_eq!(CpuSettings::mask_of(&[]), "0x0");
        let cpus = [1, 4, 5, 6, 7, 63];
        assert_eq!(
            CpuSettings::mask_cpus(&CpuSettings::mask_of(&cpus)).unwrap(),
            cpus
        );
        let default = ContextSettings::default();
        assert_eq!(settings_key(&default, ModelLoad::Mmap), "");
        assert_eq!(settings_key(&default, ModelLoad::NoMmap), "load=no-mmap");
        let q8 = ContextSettings {
            kv_type: KvCacheType::parse("q8_0").unwrap(),
            ..ContextSettings::default()
        };
        assert_eq!(
            settings_key(&q8, ModelLoad::Mlock),
            "ctk=q8_0/ctv=q8_0/fa=auto/b=2048/ub=512/load=mlock"
        );
        for load in [ModelLoad::Mmap, ModelLoad::NoMmap, ModelLoad::Mlock] {
            assert_eq!(ModelLoad::from_name(load.name()), Some(load));
        }
        assert_eq!(ModelLoad::from_name(""), Some(ModelLoad::Mmap));
    }

    #[test]
    fn kv_types_parse_one_for_both_or_k_and_v_and_name_what_is_known() {
        let both = KvCacheType::parse("Q8_0").unwrap();
        assert_eq!((both.k.as_str(), both.v.as_str()), ("q8_0", "q8_0"));
        assert_eq!(both.to_string(), "q8_0");
        let split = KvCacheType::parse("q8_0/f16").unwrap();
        assert_eq!(split.to_string(), "q8_0/f16");
        assert!(!split.v_is_quantized());
        assert!(KvCacheType::parse("q4_0").unwrap().v_is_quantized());
        let e = KvCacheType::parse("q4_k").unwrap_err();
        assert!(
            e.contains("`q4_k` is not a KV-cache type") && e.contains("q8_0"),
            "{e}"
        );
        let json: KvCacheType = serde_json::from_str("\"f16/q4_0\"").unwrap();
        assert_eq!(json.v, "q4_0");
        assert!(serde_json::from_str::<KvCacheType>("\"int3\"").is_err());
    }

    #[test]
    fn default_settings_have_no_key_and_others_name_every_setting() {
        assert_eq!(ContextSettings::default().key(), "");
        let q8 = ContextSettings {
            kv_type: KvCacheType::parse("q8_0").unwrap(),
            flash_attn: FlashAttn::On,
            ..ContextSettings::default()
        };
        assert_eq!(q8.key(), "ctk=q8_0/ctv=q8_0/fa=on/b=2048/ub=512");
        let small_batch = ContextSettings {
            n_ubatch: 128,
            ..ContextSettings::default()
        };
        assert!(small_batch.same_quality_as(&ContextSettings::default()));
        assert!(!q8.same_quality_as(&ContextSettings::default()));
        assert_eq!(test_name(512, 0, 0), "pp512");
        assert_eq!(test_name(0, 128, 4096), "tg128+d4096");
        assert_eq!(test_name(512, 128, 0), "pp512+tg128");
    }
}
