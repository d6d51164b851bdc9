//! Figures derived from rows, computed here once and used by both the
//! summary tables and the plots: the decode rows (batch 1, most threads),
//! speedups against F32, geometric means, thread scaling, error by type,
//! the measured bandwidth, the model matrix's tokens per second and which
//! recipes are worth shipping (no other is both faster and closer).

use std::collections::{BTreeMap, BTreeSet};
use wire::model_settings::ContextSettings;
use wire::rows::{CellStatus, KernelRow, ModelRow};

/// Rows of each board, boards in name order.
pub fn by_board<T>(rows: &[T], board: impl Fn(&T) -> &str) -> BTreeMap<String, Vec<&T>> {
    let mut out: BTreeMap<String, Vec<&T>> = BTreeMap::new();
    for row in rows {
        out.entry(board(row).to_string()).or_default().push(row);
    }
    out
}

/// Geometric mean of the positive values; `None` when there are none.
pub fn geomean(values: impl Iterator<Item = f64>) -> Option<f64> {
    let logs: Vec<f64> = values.filter(|v| *v > 0.0).map(f64::ln).collect();
    (!logs.is_empty()).then(|| (logs.iter().sum::<f64>() / logs.len() as f64).exp())
}

/// Measured kernel rows at batch 1 (decode), with the most threads
/// measured for each (shape, type).
pub fn decode_rows<'a>(rows: &[&'a KernelRow]) -> Vec<&'a KernelRow> {
    let mut best: BTreeMap<(&str, &str), &KernelRow> = BTreeMap::new();
    for &r in rows
        .iter()
        .filter(|r| r.n == 1 && r.status == CellStatus::Ok && r.median_ns.is_some())
    {
        let key = (r.shape.as_str(), r.ty.as_str());
        if best.get(&key).is_none_or(|b| r.threads > b.threads) {
            best.insert(key, r);
        }
    }
    best.into_values().collect()
}

/// Types with their bits per weight, most bits first.
pub fn types_by_bits(rows: &[&KernelRow]) -> Vec<(String, f64)> {
    let mut types: Vec<(String, f64)> = rows
        .iter()
        .map(|r| (r.ty.clone(), r.bits_per_weight))
        .collect::<BTreeMap<_, _>>()
        .into_iter()
        .collect();
    types.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    types
}

/// F32 decode time over each type's, per (shape, type); empty without F32.
pub fn speedup_vs_f32(decode: &[&KernelRow]) -> BTreeMap<(String, String), f64> {
    let f32_ns: BTreeMap<&str, f64> = decode
        .iter()
        .filter(|r| r.ty == "F32")
        .filter_map(|r| Some((r.shape.as_str(), r.median_ns?)))
        .collect();
    decode
        .iter()
        .filter_map(|r| {
            let base = f32_ns.get(r.shape.as_str())?;
            Some(((r.shape.clone(), r.ty.clone()), base / r.median_ns?))
        })
        .collect()
}

/// A per-(shape, type) figure of the decode rows.
pub fn decode_values(
    decode: &[&KernelRow],
    value: impl Fn(&KernelRow) -> Option<f64>,
) -> BTreeMap<(String, String), f64> {
    decode
        .iter()
        .filter_map(|r| Some(((r.shape.clone(), r.ty.clone()), value(r)?)))
        .collect()
}

/// Per type, GFLOP/s at batch 1 against threads: the geometric mean over
/// the shapes measured at that thread count.
pub fn thread_scaling(rows: &[&KernelRow]) -> BTreeMap<String, Vec<(usize, f64)>> {
    let mut by_type: BTreeMap<String, BTreeMap<usize, Vec<f64>>> = BTreeMap::new();
    for r in rows
        .iter()
        .filter(|r| r.n == 1 && r.status == CellStatus::Ok)
    {
        if let Some(g) = r.gflops {
            by_type
                .entry(r.ty.clone())
                .or_default()
                .entry(r.threads)
                .or_default()
                .push(g);
        }
    }
    by_type
        .into_iter()
        .map(|(ty, points)| {
            let line = points
                .into_iter()
                .filter_map(|(t, values)| Some((t, geomean(values.into_iter())?)))
                .collect();
            (ty, line)
        })
        .collect()
}

/// Per type: bits per weight and the geometric mean of its output NMSE over
/// every measured cell.
pub fn nmse_by_type(rows: &[&KernelRow]) -> Vec<(String, f64, f64)> {
    let mut by_type: BTreeMap<String, (f64, Vec<f64>)> = BTreeMap::new();
    for r in rows {
        if let Some(e) = r.nmse.filter(|e| *e > 0.0) {
            by_type
                .entry(r.ty.clone())
                .or_insert((r.bits_per_weight, Vec::new()))
                .1
                .push(e);
        }
    }
    by_type
        .into_iter()
        .filter_map(|(ty, (bits, errors))| Some((ty, bits, geomean(errors.into_iter())?)))
        .collect()
}

/// The board's measured read bandwidth, recovered from the share each row
/// carries (GB/s).
pub fn measured_bandwidth(rows: &[&KernelRow]) -> Option<f64> {
    rows.iter()
        .find_map(|r| Some(r.weight_gbps? / r.bandwidth_share?))
}

/// The reference types kernel matrices of the run named in `versus`, in
/// their order, each once.
pub fn versus_types(manifest: &crate::runs::manifest::RunManifest) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for m in manifest.matrices.iter().filter(|m| m.kind == "kernel") {
        for v in m.spec["versus"].as_array().into_iter().flatten() {
            if let Some(v) = v.as_str().filter(|v| !out.iter().any(|o| o == v)) {
                out.push(v.to_string());
            }
        }
    }
    out
}

/// One type's time against a reference type's in the same run: the same
/// board, shape, batch, threads and settings.
#[derive(Debug, Clone, PartialEq)]
pub struct VersusFigure {
    pub board: String,
    pub emulated: bool,
    pub shape: String,
    pub n: usize,
    pub threads: usize,
    pub ty: String,
    pub reference: String,
    pub bits_per_weight: f64,
    pub nmse: Option<f64>,
    /// Wall time quantizing the weights took (every core), ms.
    pub quantize_ms: Option<f64>,
    pub time_ns: f64,
    /// This type's time over the reference's, with its 95% interval.
    pub change: wire::stats::ChangeEstimate,
}

/// Every measured cell against each reference type's cell of the same
/// board, shape, batch, threads and settings. Both are measured in every
/// invocation's round (shuffled together), so the run's round effects are
/// taken out of both first (`RunData::round_adjusted_invocations`) and
/// the ratio is `compare`'s: geometric means of invocation medians, the
/// interval Welch's t on their logs widened to a hierarchical bootstrap.
pub fn versus_figures(run: &crate::results::run_dir::RunData) -> Vec<VersusFigure> {
    let references = versus_types(&run.manifest);
    if references.is_empty() {
        return Vec::new();
    }
    let (invocations, _) = run.round_adjusted_invocations();
    let of = |r: &KernelRow| {
        invocations
            .get(&(r.board.clone(), r.cell_id.clone()))
            .filter(|i| r.status == CellStatus::Ok && !i.is_empty())
    };
    let same_cell = |a: &KernelRow, b: &KernelRow| {
        (
            a.board.as_str(),
            a.shape.as_str(),
            a.n,
            a.threads,
            a.settings(),
        ) == (
            b.board.as_str(),
            b.shape.as_str(),
            b.n,
            b.threads,
            b.settings(),
        )
    };
    let mut out = Vec::new();
    for reference in &references {
        for base in run.kernel_rows.iter().filter(|r| &r.ty == reference) {
            let Some(base_invocations) = of(base) else {
                continue;
            };
            for r in run
                .kernel_rows
                .iter()
                .filter(|r| &r.ty != reference && same_cell(r, base))
            {
                let Some(invocations) = of(r) else {
                    continue;
                };
                let (Some(change), Some(time_ns)) = (
                    wire::stats::invocation_change(base_invocations, invocations, 0.95, 2000, 17),
                    wire::stats::geometric_mean(&wire::stats::invocation_medians(invocations)),
                ) else {
                    continue;
                };
                out.push(VersusFigure {
                    board: r.board.clone(),
                    emulated: r.emulated,
                    shape: r.shape.clone(),
                    n: r.n,
                    threads: r.threads,
                    ty: r.ty.clone(),
                    reference: reference.clone(),
                    bits_per_weight: r.bits_per_weight,
                    nmse: r.nmse,
                    quantize_ms: r.quantize_ms,
                    time_ns,
                    change,
                });
            }
        }
    }
    out.sort_by(|a, b| {
        (&a.board, &a.reference, &a.shape, a.n, a.threads, &a.ty).cmp(&(
            &b.board,
            &b.reference,
            &b.shape,
            b.n,
            b.threads,
            &b.ty,
        ))
    });
    out
}

/// One line of the kernel summary: a type's decode figures on one board.
#[derive(Debug, Clone, PartialEq)]
pub struct TypeFigures {
    pub ty: String,
    pub bits_per_weight: f64,
    pub ok: usize,
    pub unsupported: usize,
    pub failed: usize,
    pub speedup_vs_f32: Option<f64>,
    pub gflops: Option<f64>,
    pub weight_gbps: Option<f64>,
    pub bandwidth_share: Option<f64>,
    pub nmse: Option<f64>,
}

/// Per type (most bits first), its cells by status and the geometric means
/// over shapes of its decode figures, for one board's rows.
pub fn type_figures(rows: &[&KernelRow]) -> Vec<TypeFigures> {
    let decode = decode_rows(rows);
    let speedups = speedup_vs_f32(&decode);
    let nmse: BTreeMap<String, f64> = nmse_by_type(rows)
        .into_iter()
        .map(|(ty, _, e)| (ty, e))
        .collect();
    types_by_bits(rows)
        .into_iter()
        .map(|(ty, bits)| {
            let of_type: Vec<&&KernelRow> = rows.iter().filter(|r| r.ty == ty).collect();
            let count = |s| of_type.iter().filter(|r| r.status == s).count();
            let dec: Vec<&&KernelRow> = decode.iter().filter(|r| r.ty == ty).collect();
            TypeFigures {
                ok: count(CellStatus::Ok),
                unsupported: count(CellStatus::Unsupported),
                failed: count(CellStatus::Failed),
                speedup_vs_f32: geomean(
                    speedups
                        .iter()
                        .filter(|((_, t), _)| *t == ty)
                        .map(|(_, v)| *v),
                ),
                gflops: geomean(dec.iter().filter_map(|r| r.gflops)),
                weight_gbps: geomean(dec.iter().filter_map(|r| r.weight_gbps)),
                bandwidth_share: geomean(dec.iter().filter_map(|r| r.bandwidth_share)),
                nmse: nmse.get(&ty).copied(),
                bits_per_weight: bits,
                ty,
            }
        })
        .collect()
}

/// What tells a model row's variant apart in tables and plots: its
/// context's settings where they are not llama.cpp's defaults, its depth,
/// and in an A/B run its build: ` kv=q8_0 fa=on d512@new`; empty for a
/// default row of a one-build run.
pub fn variant_label(r: &ModelRow) -> String {
    let (s, default) = (r.context_settings(), ContextSettings::default());
    let mut label = String::new();
    if s.kv_type != default.kv_type {
        label.push_str(&format!(" kv={}", s.kv_type));
    }
    if s.flash_attn != default.flash_attn {
        label.push_str(&format!(" fa={}", s.flash_attn.name()));
    }
    if (s.n_batch, s.n_ubatch) != (default.n_batch, default.n_ubatch) {
        label.push_str(&format!(" b={}/{}", s.n_batch, s.n_ubatch));
    }
    let (cpu, default_cpu) = (&s.cpu, &default.cpu);
    if cpu.cpu_mask != default_cpu.cpu_mask {
        label.push_str(&format!(" C={}", cpu.cpu_mask));
    }
    if cpu.cpu_strict {
        label.push_str(" strict");
    }
    if cpu.poll != default_cpu.poll {
        label.push_str(&format!(" poll={}", cpu.poll));
    }
    if cpu.priority != default_cpu.priority {
        label.push_str(&format!(" prio={}", cpu.priority.name()));
    }
    if r.load() != wire::model_settings::ModelLoad::Mmap {
        label.push_str(&format!(" load={}", r.load().name()));
    }
    if r.n_depth > 0 {
        label.push_str(&format!(" d{}", r.n_depth));
    }
    if !r.build.is_empty() {
        label.push('@');
        label.push_str(&r.build);
    }
    label
}

/// Model rows as tables and plots show them: each variant of a recipe (a
/// KV-cache type, attention, batch, depth, an A/B run's build) is a recipe
/// of its own, `<recipe><variant_label>`, so variants stand side by side
/// instead of one hiding the other.
pub fn shown_model_rows(rows: &[ModelRow]) -> Vec<ModelRow> {
    rows.iter()
        .map(|r| ModelRow {
            recipe: format!("{}{}", r.recipe, variant_label(r)),
            ..r.clone()
        })
        .collect()
}

/// The f32 recipe a recipe's speedup is taken against: the same variant's
/// (settings, depth and build; see `variant_label`).
pub fn f32_beside(recipe: &str) -> String {
    match recipe.find([' ', '@']) {
        Some(at) => format!("f32{}", &recipe[at..]),
        None => "f32".to_string(),
    }
}

/// The model matrix's figures for one board, at the most threads measured.
pub struct ModelFigures<'a> {
    pub rows: Vec<&'a ModelRow>,
    pub max_threads: usize,
}

impl<'a> ModelFigures<'a> {
    pub fn new(rows: &[&'a ModelRow]) -> Self {
        let max_threads = rows
            .iter()
            .filter(|r| r.status == CellStatus::Ok)
            .map(|r| r.n_threads)
            .max()
            .unwrap_or(0);
        ModelFigures {
            rows: rows.to_vec(),
            max_threads,
        }
    }

    /// The measured generation (tg) rows at the most threads.
    pub fn tg_rows(&self) -> Vec<&'a ModelRow> {
        self.rows_at_most_threads(|r| r.n_gen > 0 && r.n_prompt == 0)
    }

    /// The measured prompt-processing rows (`pp<N>`, any depth) at the
    /// most threads.
    pub fn pp_rows(&self) -> Vec<&'a ModelRow> {
        self.rows_at_most_threads(|r| r.n_prompt > 0 && r.n_gen == 0)
    }

    fn rows_at_most_threads(&self, test: impl Fn(&ModelRow) -> bool) -> Vec<&'a ModelRow> {
        self.rows
            .iter()
            .copied()
            .filter(|r| r.status == CellStatus::Ok && r.n_threads == self.max_threads && test(r))
            .collect()
    }

    /// The recipe chooser: per model (and A/B build), the generation rows
    /// at the default settings and depth 0 that no other recipe of that
    /// model beats on tokens per second, mean KL divergence and memory
    /// together (at least as good on all three, better on one): the Pareto
    /// front, fastest first. Each comes with whether it is on the front; rows without a
    /// KL divergence (synthetic models) are left out.
    pub fn recipe_choices(&self) -> Vec<(&'a ModelRow, bool)> {
        let candidates: Vec<&ModelRow> = self
            .tg_rows()
            .into_iter()
            .filter(|r| {
                r.n_depth == 0
                    && r.settings_key().is_empty()
                    && r.kld_mean.is_some()
                    && r.avg_ts.is_some()
            })
            .collect();
        // Speed, closeness and the memory the board must have (the
        // process's peak, else the weights).
        let figures = |r: &ModelRow| {
            (
                r.avg_ts.unwrap_or(0.0),
                r.kld_mean.unwrap_or(f64::MAX),
                r.peak_rss_bytes.unwrap_or(r.model_size),
            )
        };
        let mut out: Vec<(&ModelRow, bool)> = candidates
            .iter()
            .map(|&r| {
                let (speed, kld, memory) = figures(r);
                let beaten = candidates.iter().any(|&o| {
                    let (o_speed, o_kld, o_memory) = figures(o);
                    o.model_filename == r.model_filename
                        && o.build == r.build
                        && !std::ptr::eq(o, r)
                        && o_speed >= speed
                        && o_kld <= kld
                        && o_memory <= memory
                        && (o_speed > speed || o_kld < kld || o_memory < memory)
                });
                (r, !beaten)
            })
            .collect();
        out.sort_by(|a, b| {
            (&a.0.model_filename, &a.0.build)
                .cmp(&(&b.0.model_filename, &b.0.build))
                .then(b.1.cmp(&a.1))
                .then(figures(b.0).0.total_cmp(&figures(a.0).0))
        });
        out
    }

    /// Tokens per second of (model, recipe) for `pp` or `tg`.
    pub fn tokens_per_second(&self, model: &str, recipe: &str, prompt: bool) -> Option<f64> {
        self.rows
            .iter()
            .find(|r| {
                r.model_filename == model
                    && r.recipe == recipe
                    && r.status == CellStatus::Ok
                    && r.n_threads == self.max_threads
                    && if prompt {
                        r.n_prompt > 0 && r.n_gen == 0
                    } else {
                        r.n_gen > 0 && r.n_prompt == 0
                    }
            })
            .and_then(|r| r.avg_ts)
    }

    /// Generation speed of each (model, recipe) over the model's f32.
    pub fn tg_speedup_vs_f32(&self) -> BTreeMap<(String, String), f64> {
        self.tg_rows()
            .iter()
            .filter_map(|r| {
                let base =
                    self.tokens_per_second(&r.model_filename, &f32_beside(&r.recipe), false)?;
                Some((
                    (r.model_filename.clone(), r.recipe.clone()),
                    r.avg_ts? / base,
                ))
            })
            .collect()
    }

    /// Milliseconds per generated token of each (model, recipe).
    pub fn ms_per_token(&self) -> BTreeMap<(String, String), f64> {
        self.tg_rows()
            .iter()
            .filter_map(|r| {
                Some((
                    (r.model_filename.clone(), r.recipe.clone()),
                    1000.0 / r.avg_ts?,
                ))
            })
            .collect()
    }

    /// Recipes with their bits per weight, most bits first.
    pub fn recipes_by_bits(&self) -> Vec<(String, f64)> {
        let mut recipes: Vec<(String, f64)> = self
            .tg_rows()
            .iter()
            .map(|r| (r.recipe.clone(), r.bits_per_weight))
            .collect::<BTreeMap<_, _>>()
            .into_iter()
            .collect();
        recipes.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        recipes
    }
}

/// Boards whose rows are emulated, of those given.
pub fn emulated_boards<T>(rows: &[T], board: impl Fn(&T) -> (&str, bool)) -> Vec<String> {
    rows.iter()
        .filter_map(|r| {
            let (name, emulated) = board(r);
            emulated.then(|| name.to_string())
        })
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use wire::rows::example_row;

    #[test]
    fn decode_rows_keep_the_most_threads_and_speedup_is_f32_over_type() {
        let mut f32_row = example_row("f");
        f32_row.ty = "F32".into();
        f32_row.bits_per_weight = 32.0;
        f32_row.median_ns = Some(600_000.0);
        let mut q4_t1 = example_row("q1");
        q4_t1.threads = 1;
        q4_t1.median_ns = Some(300_000.0);
        let mut q4 = example_row("q");
        q4.median_ns = Some(150_000.0);
        let rows = [f32_row, q4_t1, q4];
        let refs: Vec<&KernelRow> = rows.iter().collect();
        let decode = decode_rows(&refs);
        assert_eq!(decode.len(), 2);
        let figures = type_figures(&refs);
        assert_eq!(figures[0].ty, "F32");
        assert_eq!(figures[1].ty, "Q4_0");
        assert_eq!(figures[1].speedup_vs_f32, Some(4.0));
        assert_eq!(figures[1].ok, 2);
    }

    /// A measured tg row of `recipe` at `ts` tokens per second and `kld`.
    fn tg_row(recipe: &str, ts: f64, kld: f64) -> ModelRow {
        let job: wire::model_job::ModelJob = serde_json::from_str(
            r#"{"run_id":"r","board":"b","emulated":false,"git_commit":"c","model_name":"m",
            "base":{"recipe":"original","path":"p","fallbacks":[],"file_bytes":1},
            "recipes":[],"threads":["all"],"text":"t","ctx":128,"prompt":"p",
            "generate_tokens":1,"n_prompt":1,"n_gen":1,"repetitions":1}"#,
        )
        .unwrap();
        let mut row = ModelRow::failed(&job, &job.base, &wire::probe::AgentIdentity::default(), "");
        row.status = CellStatus::Ok;
        row.model_filename = "m.gguf".into();
        row.recipe = recipe.into();
        row.test = "tg8".into();
        (row.n_gen, row.n_prompt, row.n_threads) = (8, 0, 2);
        (row.avg_ts, row.kld_mean) = (Some(ts), Some(kld));
        row
    }

    #[test]
    fn the_recipe_chooser_keeps_what_no_other_recipe_beats_on_speed_closeness_and_memory() {
        let mut deep = tg_row("q4_0", 900.0, 0.001);
        deep.n_depth = 512;
        let sized = |recipe, ts, kld, mb: u64| ModelRow {
            peak_rss_bytes: Some(mb * 1_000_000),
            ..tg_row(recipe, ts, kld)
        };
        let rows = [
            sized("f32", 100.0, 0.0, 4000),
            sized("q8_0", 300.0, 0.001, 1100),
            sized("q4_0", 500.0, 0.08, 600),
            sized("awq-q4_0", 480.0, 0.06, 600),
            // Slower than q4_0, farther from the model, larger: beaten.
            sized("q4_1", 450.0, 0.09, 650),
            // As fast as q8_0 and larger but farther: beaten.
            sized("q5_k", 300.0, 0.004, 1200),
            // As fast as q8_0 and farther, but smaller: a choice.
            sized("q6_k", 300.0, 0.004, 850),
            // The slowest and farthest but the smallest: a choice.
            sized("q2_k", 200.0, 0.3, 400),
            // Another workload (depth 512): not a candidate.
            deep,
        ];
        let refs: Vec<&ModelRow> = rows.iter().collect();
        let choices = ModelFigures::new(&refs).recipe_choices();
        let named: Vec<(&str, bool)> = choices
            .iter()
            .map(|(r, front)| (r.recipe.as_str(), *front))
            .collect();
        assert_eq!(
            named,
            [
                ("q4_0", true),
                ("awq-q4_0", true),
                ("q8_0", true),
                ("q6_k", true),
                ("q2_k", true),
                ("f32", true),
                ("q4_1", false),
                ("q5_k", false),
            ]
        );
    }

    #[test]
    fn geomean_skips_non_positive_values() {
        assert_eq!(geomean([2.0, 8.0, 0.0].into_iter()), Some(4.0));
        assert_eq!(geomean(std::iter::empty()), None);
    }
}
