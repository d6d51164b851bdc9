//! The model job the host sends an agent: one model's recipe files (paths
//! on the machine that runs the agent), the evaluation text and tasks, and
//! how to time it.

use crate::kernel_job::ThreadCount;
use crate::model_settings::ContextSettings;
use serde::{Deserialize, Serialize};

/// One recipe's file, ready for the agent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RecipeFile {
    pub recipe: String,
    /// Path on the machine that runs the agent.
    pub path: String,
    /// `tensor:wanted->got` for tensors the quantizer stored in another
    /// type than the recipe asked (e.g. rows not a multiple of the block).
    pub fallbacks: Vec<String>,
    pub file_bytes: u64,
    /// How the recipe was made when that matters to reading its row
    /// (calibration text, method, error reduction); goes into the row's note.
    #[serde(default)]
    pub note: String,
    /// Set when the file holds a scheme llama.cpp cannot run, decoded to
    /// F16 for it (codebook recipes): the scheme's true storage cost per
    /// weight, which the row reports instead of the file's; the row has no
    /// speed or memory figures (the F16 file's would mislead).
    #[serde(default)]
    pub scheme_bits_per_weight: Option<f64>,
    /// Set when the build's quantizer could not make the recipe (an older
    /// llama.cpp that refuses a tensor shape): why, in its words. There is
    /// no file; the agent writes the recipe's row as unsupported with this
    /// note and measures the others.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unmade: Option<String>,
}

impl RecipeFile {
    /// A recipe the build's quantizer refused (see `unmade`).
    pub fn unmade(recipe: &str, reason: String) -> RecipeFile {
        RecipeFile {
            recipe: recipe.to_string(),
            path: String::new(),
            fallbacks: Vec::new(),
            file_bytes: 0,
            note: String::new(),
            scheme_bits_per_weight: None,
            unmade: Some(reason),
        }
    }
}

/// What a codebook recipe did to a model (`quantbench-agent codebook`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CodebookReport {
    /// The format, e.g. `SQ4+S0.45`.
    pub format: String,
    /// Matrices coded, and those left as they were (not a multiple of 32
    /// wide, or not a matrix).
    pub coded: usize,
    pub left: Vec<String>,
    /// Bytes of the scheme: coded matrices as stored, every other tensor
    /// as the file holds it.
    pub scheme_bytes: u64,
    /// Every tensor's elements.
    pub params: u64,
    /// Mean over coded matrices of the weights' NMSE, each weighted by its
    /// input channels' sensitivities.
    pub mean_weighted_nmse: f64,
    /// Matrices that had an importance-matrix entry (the others were
    /// clustered with uniform sensitivities).
    pub with_importance: usize,
    pub seconds: f64,
}

impl CodebookReport {
    pub fn bits_per_weight(&self) -> f64 {
        self.scheme_bytes as f64 * 8.0 / self.params.max(1) as f64
    }
}

/// What GPTQ did to one weight matrix: the relative error of the layer's
/// output on the calibration activations, sum over rows of
/// (w-q)^T H (w-q) / w^T H w, for plain rounding and for GPTQ.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MatrixError {
    pub name: String,
    pub rows: usize,
    pub cols: usize,
    pub error_rtn: f64,
    pub error_gptq: f64,
}

/// Everything an agent needs to run the model matrix for one model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelJob {
    pub run_id: String,
    pub board: String,
    pub emulated: bool,
    pub git_commit: String,
    pub model_name: String,
    /// The unquantized model: the reference for KL divergence and top-1.
    pub base: RecipeFile,
    pub recipes: Vec<RecipeFile>,
    pub threads: Vec<ThreadCount>,
    pub text: String,
    pub ctx: usize,
    pub prompt: String,
    pub generate_tokens: usize,
    pub n_prompt: usize,
    pub n_gen: usize,
    /// Tokens the KV cache holds before each test (llama-bench's `-d`);
    /// empty: 0 only.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub depths: Vec<usize>,
    /// Prompt-then-generation tests (llama-bench's `-pg`): the prompt as a
    /// batch, then the tokens one at a time, timed together (time to an
    /// answer of that length).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pg: Vec<[usize; 2]>,
    /// How each recipe is loaded, one pass of every test per mode
    /// (`load_mode`); empty: mmap only.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub load_modes: Vec<crate::model_settings::ModelLoad>,
    /// Memory the agent may plan a test for on this board (its
    /// `max_memory_mb`); the agent also never plans beyond the board's
    /// own memory or its cgroup's limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_limit_bytes: Option<u64>,
    /// The contexts every test runs in (the matrix's KV-cache types x
    /// flash attention x batches); empty: llama.cpp's defaults only.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub contexts: Vec<ContextSettings>,
    pub repetitions: u32,
    /// Separate processes each recipe's speed is measured in (the first is
    /// the agent's own, which also measures quality; the rest are fresh
    /// children that map the same recipe file), one after another; each
    /// runs `repetitions` of every test. 1 in jobs from before invocations.
    #[serde(default = "one_invocation")]
    pub invocations: u32,
    /// Adaptive repetition: a recipe whose every test is not yet known to
    /// `precision` after `invocations` gets more, one at a time, up to this
    /// many (0 or `invocations`: none).
    #[serde(default)]
    pub max_invocations: u32,
    /// Relative half-width of the 95% interval of a test's time that ends
    /// a recipe's adaptive invocations.
    #[serde(default = "default_precision")]
    pub precision: f64,
    /// The unquantized model's reference on `text` (`wire::reference`),
    /// computed on the host: the agent reads it instead of evaluating
    /// `base` (which is then not on the board at all). `None`: the agent
    /// computes it (A/B jobs, where each build judges with its own).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reference: Option<String>,
    /// Multiple-choice JSONL on the machine that runs the agent.
    #[serde(default)]
    pub multiple_choice: Option<String>,
    /// The model is synthetic (seeded random weights): speed and memory
    /// only, no quality to measure.
    #[serde(default)]
    pub synthetic: bool,
    /// The command the board runs the agent under (an emulator such as
    /// `qemu-aarch64 -cpu cortex-a76`, the board's `runner`): the agent
    /// starts its child processes under it too (under qemu-user a program
    /// cannot start another of its architecture directly).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub runner: Vec<String>,
    /// The builds an A/B job measures (`cargo xtask ab`), base first, each
    /// with the recipe files its own quantizer made; empty: one build, the
    /// running agent, measuring `recipes`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub builds: Vec<ModelJobBuild>,
    /// Where the board's power is read (its boards.toml settings) and how
    /// long its idle power is measured.
    #[serde(default)]
    pub power: crate::power::PowerSettings,
    /// Wait before each test until the board has cooled (real boards only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cooldown: Option<crate::kernel_job::Cooldown>,
    /// Seconds each recipe decodes without pause after its tests, its
    /// speed, clock, temperature and power recorded every
    /// `sustain_interval_seconds` (`sustained.csv`); 0: not.
    #[serde(default)]
    pub sustain_seconds: f64,
    #[serde(default = "default_sustain_interval")]
    pub sustain_interval_seconds: f64,
}

fn default_sustain_interval() -> f64 {
    5.0
}

/// A build an A/B model job measures: its agent, and the files its own
/// quantizer made for the job's recipes, in the order of `recipes` (a
/// recipe it could not make, or lacks a feature for, is `unmade`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelJobBuild {
    #[serde(flatten)]
    pub build: crate::kernel_job::JobBuild,
    pub recipes: Vec<RecipeFile>,
}

/// One timed test of a model job.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelTest {
    /// How the recipe was loaded for it.
    pub load: crate::model_settings::ModelLoad,
    /// Index into `ModelJob::contexts()`.
    pub context: usize,
    /// The CPUs its threads are placed on when the context's own mask
    /// leaves it to the OS and the test asked for the board's fastest
    /// cores (`threads = "big"` on a board with slower ones too).
    pub big_cores_mask: Option<String>,
    pub depth: usize,
    pub threads: usize,
    /// Tokens decoded as a prompt (in batches), then generated one at a
    /// time: pp is (n, 0), tg (0, n), pg both.
    pub n_prompt: usize,
    pub n_gen: usize,
}

impl ModelTest {
    /// `pp512`, `tg128+d4096`, `pp512+tg128`.
    pub fn name(&self) -> String {
        crate::model_settings::test_name(self.n_prompt, self.n_gen, self.depth)
    }

    /// Tokens the test decodes.
    pub fn tokens(&self) -> usize {
        self.n_prompt + self.n_gen
    }

    /// Where its threads run: the context's CPU settings, on the big
    /// cores when it asked for them.
    pub fn cpu(&self, context: &ContextSettings) -> crate::model_settings::CpuSettings {
        let mut cpu = context.cpu.clone();
        if let Some(mask) = &self.big_cores_mask {
            cpu.cpu_mask = mask.clone();
        }
        cpu
    }
}

impl ModelJob {
    /// The contexts the tests run in: the job's, or llama.cpp's defaults.
    pub fn contexts(&self) -> Vec<ContextSettings> {
        if self.contexts.is_empty() {
            vec![ContextSettings::default()]
        } else {
            self.contexts.clone()
        }
    }

    /// The depths the tests run at: the job's, or 0.
    pub fn depths(&self) -> Vec<usize> {
        if self.depths.is_empty() {
            vec![0]
        } else {
            self.depths.clone()
        }
    }

    /// How each recipe is loaded: the job's modes, or mmap.
    pub fn load_modes(&self) -> Vec<crate::model_settings::ModelLoad> {
        if self.load_modes.is_empty() {
            vec![crate::model_settings::ModelLoad::Mmap]
        } else {
            self.load_modes.clone()
        }
    }

    /// Every timed test on a board of `cores` cores whose fastest are
    /// `big_cores` (empty: all alike), in the order the agent runs them and
    /// a `ModelTiming` lists their times: by load mode (the recipe loaded
    /// once for all its tests), context, then depth (the KV cache filled
    /// once for all that run on it), then thread count, pp, tg, then each
    /// prompt-then-generation pair. A thread spec that comes to a test
    /// already listed (`"big"` on a board whose cores are all alike, beside
    /// `"all"`) is listed once.
    pub fn tests(&self, cores: usize, big_cores: &[usize]) -> Vec<ModelTest> {
        let contexts = self.contexts();
        let big_is_fewer = !big_cores.is_empty() && big_cores.len() < cores;
        let mut tests: Vec<ModelTest> = Vec::new();
        for load in self.load_modes() {
            for (context, settings) in contexts.iter().enumerate() {
                for depth in self.depths() {
                    for &spec in &self.threads {
                        let threads = spec.resolve_on(cores, big_cores);
                        let big_cores_mask = (spec == ThreadCount::Big
                            && big_is_fewer
                            && settings.cpu.cpu_mask
                                == crate::model_settings::CpuSettings::default().cpu_mask)
                            .then(|| crate::model_settings::CpuSettings::mask_of(big_cores));
                        let pp_tg = [(self.n_prompt, 0), (0, self.n_gen)];
                        for (n_prompt, n_gen) in pp_tg
                            .into_iter()
                            .chain(self.pg.iter().map(|p| (p[0], p[1])))
                        {
                            let test = ModelTest {
                                load,
                                context,
                                big_cores_mask: big_cores_mask.clone(),
                                depth,
                                threads,
                                n_prompt,
                                n_gen,
                            };
                            if !tests.contains(&test) {
                                tests.push(test);
                            }
                        }
                    }
                }
            }
        }
        tests
    }

    /// The recipe files `build` measures (`None`: the job's own); `None`
    /// for a build the job does not name.
    pub fn recipes_of(&self, build: Option<&str>) -> Option<&[RecipeFile]> {
        match build {
            None => Some(&self.recipes),
            Some(name) => self
                .builds
                .iter()
                .find(|b| b.build.name == name)
                .map(|b| b.recipes.as_slice()),
        }
    }
}

fn default_precision() -> f64 {
    crate::kernel_job::DEFAULT_PRECISION
}

fn one_invocation() -> u32 {
    1
}

/// Share of word trigrams that repeat an earlier one: 0 for varied text,
/// close to 1 for "in in in in ...".
pub fn repetition_score(text: &str) -> f64 {
    let words: Vec<&str> = text.split_whitespace().collect();
    if words.len() < 3 {
        return 0.0;
    }
    let grams: Vec<&[&str]> = words.windows(3).collect();
    let unique: std::collections::HashSet<&[&str]> = grams.iter().copied().collect();
    1.0 - unique.len() as f64 / grams.len() as f64
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model_settings::ModelLoad;

    fn job(threads: &str, load_modes: &str) -> ModelJob {
        serde_json::from_value(serde_json::json!({
            "run_id": "r", "board": "b", "emulated": false, "git_commit": "c",
            "model_name": "m",
            "base": {"recipe": "original", "path": "m.gguf", "fallbacks": [], "file_bytes": 1},
            "recipes": [], "threads": serde_json::from_str::<serde_json::Value>(threads).unwrap(),
            "text": "t", "ctx": 8, "prompt": "p", "generate_tokens": 1,
            "n_prompt": 4, "n_gen": 2, "repetitions": 1,
            "load_modes": serde_json::from_str::<serde_json::Value>(load_modes).unwrap(),
        }))
        .unwrap()
    }

    #[test]
    fn big_threads_run_on_the_fastest_cores_and_load_modes_are_the_outer_pass() {
        // An RK3588: "big" is four threads placed on CPUs 4-7.
        let rk = job("[\"big\", \"all\"]", "[]").tests(8, &[4, 5, 6, 7]);
        assert_eq!(rk.len(), 4);
        assert_eq!(
            (rk[0].threads, rk[0].big_cores_mask.as_deref()),
            (4, Some("0xf0"))
        );
        assert_eq!((rk[2].threads, rk[2].big_cores_mask.as_deref()), (8, None));
        let context = ContextSettings::default();
        assert_eq!(rk[0].cpu(&context).cpu_mask, "0xf0");
        // A mask given in the matrix wins over the big cores'.
        let mut masked = job("[\"big\"]", "[]");
        let mut pinned = ContextSettings::default();
        pinned.cpu.cpu_mask = "0x3".into();
        masked.contexts = vec![pinned];
        assert!(masked.tests(8, &[4, 5, 6, 7])[0].big_cores_mask.is_none());
        // A Pi 5: all cores alike, "big" is "all", listed once.
        let pi = job("[\"big\", \"all\"]", "[]").tests(4, &[0, 1, 2, 3]);
        assert_eq!(pi.len(), 2);
        assert!(pi
            .iter()
            .all(|t| t.threads == 4 && t.big_cores_mask.is_none()));
        // Load modes: every test once per mode, the mode outermost.
        let loads = job("[1]", "[\"no-mmap\", \"mlock\"]").tests(4, &[]);
        let modes: Vec<ModelLoad> = loads.iter().map(|t| t.load).collect();
        assert_eq!(
            modes,
            [
                ModelLoad::NoMmap,
                ModelLoad::NoMmap,
                ModelLoad::Mlock,
                ModelLoad::Mlock
            ]
        );
    }

    #[test]
    fn repetition_score_flags_degenerate_text() {
        assert_eq!(repetition_score("once upon a time there was a girl"), 0.0);
        assert!(repetition_score("in in in in in in in in in in") > 0.8);
    }
}
