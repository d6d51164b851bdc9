//! Multiple-choice task files in the layouts llama-perplexity reads, so a
//! user's HellaSwag, WinoGrande or MMLU/ARC/TruthfulQA file works as it
//! is: HellaSwag as JSONL (`{"ctx", "endings", "label"}`, Hugging Face's)
//! or as llama-perplexity's text (`--hellaswag`: six lines a task, the
//! label, the context, four endings), WinoGrande as llama-perplexity's CSV
//! (`--winogrande`: `index,sentence,option1,option2,answer`, the sentence
//! with a `_` where an option goes), and llama-perplexity's binary
//! multiple-choice file (`--multiple-choice`, how llama.cpp publishes
//! MMLU, ARC and TruthfulQA). Each task becomes choices of a prefix and
//! the text scored after it; the agent picks the choice whose scored
//! tokens are most likely on average, as llama-perplexity does.

use std::path::Path;
use thiserror::Error;

/// A task file that cannot be used, with the file and where.
#[derive(Debug, Error)]
#[error("{0}")]
pub struct ChoiceTaskError(String);

/// Which layout a task file is in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TaskFormat {
    HellaSwagJsonl,
    HellaSwagText,
    WinoGrande,
    MultipleChoice,
}

impl TaskFormat {
    pub fn name(self) -> &'static str {
        match self {
            TaskFormat::HellaSwagJsonl => "HellaSwag (JSONL)",
            TaskFormat::HellaSwagText => "HellaSwag (llama-perplexity text)",
            TaskFormat::WinoGrande => "WinoGrande (CSV)",
            TaskFormat::MultipleChoice => "multiple choice (llama-perplexity binary)",
        }
    }
}

/// One choice: the text before what is scored (context, or WinoGrande's
/// sentence up to and with the option) and what is scored after it.
#[derive(Debug, Clone, PartialEq)]
pub struct Choice {
    pub prefix: String,
    pub scored: String,
    /// Whether the scored text's last token counts: llama-perplexity's
    /// WinoGrande leaves it out (the sentence's full stop) when more than
    /// one follows the blank.
    pub score_last_token: bool,
}

/// One task: its choices and the index of the right one.
#[derive(Debug, Clone, PartialEq)]
pub struct ChoiceTask {
    pub choices: Vec<Choice>,
    pub label: usize,
}

impl ChoiceTask {
    /// A task that continues `context` with one of `endings` (HellaSwag,
    /// multiple choice): llama-perplexity scores `context + " " + ending`
    /// after the context.
    fn continuations(context: &str, endings: &[String], label: usize) -> ChoiceTask {
        ChoiceTask {
            choices: endings
                .iter()
                .map(|e| Choice {
                    prefix: context.to_string(),
                    scored: format!(" {}", e.trim()),
                    score_last_token: true,
                })
                .collect(),
            label,
        }
    }
}

/// Standard error of an accuracy `p` over `n` tasks, as llama-perplexity
/// prints it (`sqrt(p(1-p)/(n-1))`); `None` below two tasks.
pub fn accuracy_stderr(p: f64, n: usize) -> Option<f64> {
    (n >= 2).then(|| (p * (1.0 - p) / (n - 1) as f64).max(0.0).sqrt())
}

/// Reads a task file in any of the layouts (told apart by content: JSON
/// lines, a binary count, a `.csv` name, else the text layout); errors
/// name the file and the line or task.
pub fn read_choice_tasks(path: &Path) -> Result<(TaskFormat, Vec<ChoiceTask>), ChoiceTaskError> {
    let bytes =
        std::fs::read(path).map_err(|e| ChoiceTaskError(format!("{}: {e}", path.display())))?;
    let fail = |what: String| ChoiceTaskError(format!("{}: {what}", path.display()));
    let text = std::str::from_utf8(&bytes).ok();
    let (format, tasks) = match text {
        Some(t) if t.trim_start().starts_with('{') => (
            TaskFormat::HellaSwagJsonl,
            hellaswag_jsonl(t).map_err(fail)?,
        ),
        Some(t)
            if path
                .extension()
                .is_some_and(|e| e.eq_ignore_ascii_case("csv")) =>
        {
            (TaskFormat::WinoGrande, winogrande_csv(t).map_err(fail)?)
        }
        Some(t) if !t.contains('\0') => {
            (TaskFormat::HellaSwagText, hellaswag_text(t).map_err(fail)?)
        }
        _ => (
            TaskFormat::MultipleChoice,
            multiple_choice_binary(&bytes).map_err(fail)?,
        ),
    };
    if tasks.is_empty() {
        return Err(fail(format!("no tasks (read as {})", format.name())));
    }
    Ok((format, tasks))
}

fn hellaswag_jsonl(text: &str) -> Result<Vec<ChoiceTask>, String> {
    #[derive(serde::Deserialize)]
    struct Line {
        ctx: String,
        endings: Vec<String>,
        #[serde(deserialize_with = "label_number")]
        label: usize,
    }
    let mut tasks = Vec::new();
    for (i, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let task: Line = serde_json::from_str(line).map_err(|e| {
            format!("line {}: not a HellaSwag task ({e}); expected {{\"ctx\": ..., \"endings\": [...], \"label\": n}}", i + 1)
        })?;
        check_label(task.label, task.endings.len(), &format!("line {}", i + 1))?;
        tasks.push(ChoiceTask::continuations(
            &task.ctx,
            &task.endings,
            task.label,
        ));
    }
    Ok(tasks)
}

fn label_number<'de, D: serde::Deserializer<'de>>(d: D) -> Result<usize, D::Error> {
    use serde::Deserialize;
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Label {
        Number(usize),
        Text(String),
    }
    match Label::deserialize(d)? {
        Label::Number(n) => Ok(n),
        Label::Text(t) => t.trim().parse().map_err(serde::de::Error::custom),
    }
}

fn check_label(label: usize, choices: usize, at: &str) -> Result<(), String> {
    if label >= choices {
        return Err(format!("{at}: label {label} but only {choices} endings"));
    }
    Ok(())
}

/// llama-perplexity's `--hellaswag` text: per task the label, the
/// context and four endings, one a line.
fn hellaswag_text(text: &str) -> Result<Vec<ChoiceTask>, String> {
    let lines: Vec<&str> = text.lines().collect();
    if !lines.len().is_multiple_of(6) {
        return Err(format!(
            "{} lines, not six a task (label, context, four endings) as llama-perplexity's HellaSwag text has; a JSONL file starts with `{{`, a WinoGrande file ends in .csv",
            lines.len()
        ));
    }
    lines
        .chunks(6)
        .enumerate()
        .map(|(i, task)| {
            let at = format!("line {}", i * 6 + 1);
            let label: usize = task[0]
                .trim()
                .parse()
                .map_err(|_| format!("{at}: label `{}` is not a number", task[0].trim()))?;
            let endings: Vec<String> = task[2..].iter().map(|e| e.to_string()).collect();
            check_label(label, endings.len(), &at)?;
            Ok(ChoiceTask::continuations(task[1], &endings, label))
        })
        .collect()
}

/// llama-perplexity's `--winogrande` CSV: `index,sentence,option1,option2,
/// answer` (a quoted sentence may hold commas; a header line is skipped),
/// the answer 1 or 2. Each option is put where the sentence's `_` is and
/// what follows the blank is scored.
fn winogrande_csv(text: &str) -> Result<Vec<ChoiceTask>, String> {
    let mut tasks = Vec::new();
    for (i, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let at = format!("line {}", i + 1);
        let mut commas = Vec::new();
        let mut quoted = false;
        for (p, c) in line.char_indices() {
            match c {
                '"' => quoted = !quoted,
                ',' if !quoted => commas.push(p),
                _ => {}
            }
            if commas.len() == 4 {
                break;
            }
        }
        if commas.len() != 4 {
            return Err(format!(
                "{at}: not `index,sentence,option1,option2,answer` (WinoGrande CSV)"
            ));
        }
        let field = |k: usize| {
            let end = commas.get(k).copied().unwrap_or(line.len());
            let start = if k == 0 { 0 } else { commas[k - 1] + 1 };
            line[start..end].trim_matches('"')
        };
        let answer = line[commas[3] + 1..].trim();
        let label = match answer {
            "1" => 0,
            "2" => 1,
            _ if tasks.is_empty() && i == 0 => continue, // a header line
            _ => return Err(format!("{at}: answer `{answer}` is not 1 or 2")),
        };
        let sentence = field(1);
        let Some((before, after)) = sentence.split_once('_') else {
            return Err(format!(
                "{at}: the sentence has no `_` where an option goes"
            ));
        };
        tasks.push(ChoiceTask {
            choices: [field(2), field(3)]
                .iter()
                .map(|option| Choice {
                    prefix: format!("{before}{option}"),
                    scored: after.to_string(),
                    score_last_token: false,
                })
                .collect(),
            label,
        });
    }
    Ok(tasks)
}

/// llama-perplexity's `--multiple-choice` binary: a u32 count of tasks,
/// a u32 byte offset of each, then each task: the question (u32 length
/// and bytes), its single-answer set (u32 count, that many strings, that
/// many i32 labels, 1 for the right one) and a multiple-answer set in the
/// same layout (not scored, as in llama-perplexity). Little-endian.
fn multiple_choice_binary(bytes: &[u8]) -> Result<Vec<ChoiceTask>, String> {
    struct Reader<'a> {
        bytes: &'a [u8],
        at: usize,
    }
    impl Reader<'_> {
        fn u32(&mut self) -> Result<u32, String> {
            let end = self.at + 4;
            let word = self.bytes.get(self.at..end).ok_or_else(|| {
                format!(
                    "ends at byte {} inside a number: not llama-perplexity's multiple-choice file",
                    self.bytes.len()
                )
            })?;
            self.at = end;
            Ok(u32::from_le_bytes([word[0], word[1], word[2], word[3]]))
        }
        fn string(&mut self) -> Result<String, String> {
            let len = self.u32()? as usize;
            let end = self.at.checked_add(len).filter(|&e| e <= self.bytes.len());
            let end = end.ok_or_else(|| {
                format!(
                    "a string of {len} bytes at byte {} runs past the end",
                    self.at
                )
            })?;
            let text = String::from_utf8_lossy(&self.bytes[self.at..end]).into_owned();
            self.at = end;
            Ok(text)
        }
        fn answers(&mut self) -> Result<(Vec<String>, Vec<u32>), String> {
            let n = self.u32()?;
            // llama-perplexity's own bound.
            if n > 100 {
                return Err(format!("{n} answers to one task (at most 100)"));
            }
            let answers = (0..n)
                .map(|_| self.string())
                .collect::<Result<Vec<_>, _>>()?;
            let labels = (0..n).map(|_| self.u32()).collect::<Result<Vec<_>, _>>()?;
            Ok((answers, labels))
        }
    }
    let mut r = Reader { bytes, at: 0 };
    let n = r.u32()? as usize;
    if n == 0 || n.saturating_mul(4) > bytes.len() {
        return Err(format!(
            "says {n} tasks: not llama-perplexity's multiple-choice file"
        ));
    }
    let offsets = (0..n).map(|_| r.u32()).collect::<Result<Vec<_>, _>>()?;
    let mut tasks = Vec::with_capacity(n);
    for (i, offset) in offsets.into_iter().enumerate() {
        let at = |e: String| format!("task {}: {e}", i + 1);
        r.at = offset as usize;
        let question = r.string().map_err(at)?;
        let (answers, labels) = r.answers().map_err(at)?;
        r.answers().map_err(at)?;
        let label = labels
            .iter()
            .position(|&l| l == 1)
            .ok_or_else(|| at("no answer is labelled right (1)".into()))?;
        tasks.push(ChoiceTask::continuations(&question, &answers, label));
    }
    Ok(tasks)
}

/// A multiple-choice file in llama-perplexity's binary layout, from
/// `(question, answers, index of the right one)` (for tests and fixtures).
pub fn write_multiple_choice_binary(tasks: &[(&str, Vec<&str>, usize)]) -> Vec<u8> {
    let mut body = Vec::new();
    let mut offsets = Vec::new();
    let header = 4 + 4 * tasks.len();
    let put_string = |out: &mut Vec<u8>, s: &str| {
        out.extend((s.len() as u32).to_le_bytes());
        out.extend(s.as_bytes());
    };
    for (question, answers, right) in tasks {
        offsets.push((header + body.len()) as u32);
        put_string(&mut body, question);
        body.extend((answers.len() as u32).to_le_bytes());
        for a in answers {
            put_string(&mut body, a);
        }
        for i in 0..answers.len() {
            body.extend(u32::from(i == *right).to_le_bytes());
        }
        body.extend(0u32.to_le_bytes());
    }
    let mut out = (tasks.len() as u32).to_le_bytes().to_vec();
    for o in offsets {
        out.extend(o.to_le_bytes());
    }
    out.extend(body);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(name: &str, content: &[u8]) -> Result<(TaskFormat, Vec<ChoiceTask>), String> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(name);
        std::fs::write(&path, content).unwrap();
        read_choice_tasks(&path).map_err(|e| e.to_string())
    }

    #[test]
    fn hellaswag_jsonl_accepts_string_labels_and_names_bad_lines() {
        let (format, tasks) = read(
            "mc.jsonl",
            b"{\"ctx\":\"a\",\"endings\":[\"b\",\"c\"],\"label\":\"1\"}\n\n",
        )
        .unwrap();
        assert_eq!(format, TaskFormat::HellaSwagJsonl);
        assert_eq!(tasks[0].label, 1);
        assert_eq!(tasks[0].choices[1].scored, " c");
        let e = read(
            "mc.jsonl",
            b"{\"ctx\":\"a\",\"endings\":[\"b\"],\"label\":0}\n{\"ctx\":1}\n",
        )
        .unwrap_err();
        assert!(e.contains("line 2"), "{e}");
        let e = read(
            "mc.jsonl",
            b"{\"ctx\":\"a\",\"endings\":[\"b\"],\"label\":3}\n",
        )
        .unwrap_err();
        assert!(e.contains("label 3"), "{e}");
    }

    #[test]
    fn llama_perplexity_s_hellaswag_text_is_six_lines_a_task() {
        let (format, tasks) = read("hs.txt", b"2\nThe cat\nsat.\nflew.\nate.\nran.\n").unwrap();
        assert_eq!(format, TaskFormat::HellaSwagText);
        assert_eq!(tasks[0].label, 2);
        assert_eq!(tasks[0].choices[2].prefix, "The cat");
        assert_eq!(tasks[0].choices[2].scored, " ate.");
        let e = read("hs.txt", b"1\nThe cat\nsat.\n").unwrap_err();
        assert!(e.contains("not six a task"), "{e}");
    }

    #[test]
    fn winogrande_csv_puts_each_option_in_the_blank_and_scores_what_follows() {
        let csv = b"index,sentence,option1,option2,answer\n\
            0,\"The trophy, sadly, did not fit in the suitcase because the _ was too big.\",trophy,suitcase,1\n\
            1,Lily gave Tom the ball because _ was kind.,Lily,Tom,2\n";
        let (format, tasks) = read("wg.csv", csv).unwrap();
        assert_eq!(format, TaskFormat::WinoGrande);
        assert_eq!(tasks.len(), 2);
        let first = &tasks[0];
        assert_eq!(first.label, 0);
        assert_eq!(
            first.choices[1].prefix,
            "The trophy, sadly, did not fit in the suitcase because the suitcase"
        );
        assert_eq!(first.choices[1].scored, " was too big.");
        assert_eq!(tasks[1].label, 1);
        let e = read("wg.csv", b"0,no blank here,a,b,1\n").unwrap_err();
        assert!(e.contains("no `_`"), "{e}");
        let e = read("wg.csv", b"0,a _ b,x,y,1\n1,a _ b,x,y,3\n").unwrap_err();
        assert!(e.contains("line 2") && e.contains("not 1 or 2"), "{e}");
    }

    #[test]
    fn the_multiple_choice_binary_round_trips_and_broken_files_say_where() {
        let bytes = write_multiple_choice_binary(&[
            ("Q: 2+2? A:", vec!["4", "5", "22"], 0),
            ("The sky is", vec!["green", "blue"], 1),
        ]);
        let (format, tasks) = read("mmlu.bin", &bytes).unwrap();
        assert_eq!(format, TaskFormat::MultipleChoice);
        assert_eq!(tasks.len(), 2);
        assert_eq!(tasks[1].label, 1);
        assert_eq!(tasks[1].choices[1].scored, " blue");
        assert_eq!(tasks[0].choices.len(), 3);
        let e = read("mmlu.bin", &bytes[..bytes.len() - 9]).unwrap_err();
        assert!(e.contains("task 2"), "{e}");
    }

    #[test]
    fn accuracy_error_is_llama_perplexity_s() {
        assert_eq!(accuracy_stderr(0.5, 1), None);
        let e = accuracy_stderr(0.75, 101).unwrap();
        assert!((e - (0.75f64 * 0.25 / 100.0).sqrt()).abs() < 1e-12);
    }
}
