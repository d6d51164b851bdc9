//! Property-based fuzzing shared by every crate's fuzz tests (feature
//! `fuzzing`, enabled from dev-dependencies only): inputs made by mutating
//! a seed (our fixtures and the bad inputs issues named), a runner that
//! feeds them to a parser and fails on any panic with the smallest input
//! proptest finds, and a tally of which outcomes the inputs reached, so
//! each target reports its coverage.
//!
//! CI runs a fixed seed; `QUANTBENCH_FUZZ_CASES=100000
//! QUANTBENCH_FUZZ_SEED=<n> cargo test --release -p harness --test fuzz`
//! runs longer, on other inputs.

use proptest::prelude::*;
use proptest::test_runner::{Config, RngAlgorithm, TestCaseError, TestRng, TestRunner};
use std::collections::BTreeMap;
use std::sync::Mutex;

/// One change to a seed.
#[derive(Debug, Clone)]
pub enum Edit {
    /// Flip bit `bit` of the byte at (position modulo length).
    Flip(usize, u8),
    /// Overwrite 8 bytes with a value sizes and counts are made of.
    Word(usize, u64),
    /// Cut the input to (position modulo length) bytes.
    Truncate(usize),
    /// Insert bytes.
    Insert(usize, Vec<u8>),
    /// Copy a run of the input elsewhere (repeats lines, fields, keys).
    Duplicate(usize, usize, usize),
}

/// Values that make sizes, counts and offsets interesting.
fn word() -> impl Strategy<Value = u64> {
    prop_oneof![
        Just(0u64),
        Just(1),
        Just(u64::MAX),
        Just(i64::MAX as u64),
        Just(1 << 31),
        Just(1 << 32),
        Just(1 << 62),
        any::<u64>(),
        0u64..4096,
    ]
}

fn edit(focus: usize) -> impl Strategy<Value = Edit> {
    // Half the edits land in the first `focus` bytes (a header), the rest
    // anywhere.
    let at = prop_oneof![0..focus.max(1), any::<usize>()];
    prop_oneof![
        (at.clone(), 0u8..8).prop_map(|(p, b)| Edit::Flip(p, b)),
        (at.clone(), word()).prop_map(|(p, w)| Edit::Word(p, w)),
        at.clone().prop_map(Edit::Truncate),
        (at.clone(), proptest::collection::vec(any::<u8>(), 1..16))
            .prop_map(|(p, b)| Edit::Insert(p, b)),
        (at.clone(), at, 1usize..64).prop_map(|(from, to, n)| Edit::Duplicate(from, to, n)),
    ]
}

/// Inputs made from one of `seeds` by 1 to 6 edits, mostly within the first
/// `focus` bytes; a seed itself now and then.
pub fn mutated(seeds: Vec<Vec<u8>>, focus: usize) -> impl Strategy<Value = Vec<u8>> {
    let n = seeds.len();
    (0..n, proptest::collection::vec(edit(focus), 0..6))
        .prop_map(move |(i, edits)| apply(&seeds[i], &edits))
}

/// `seed` with `edits` applied in order.
pub fn apply(seed: &[u8], edits: &[Edit]) -> Vec<u8> {
    let mut out = seed.to_vec();
    for e in edits {
        let len = out.len();
        let at = |p: usize| if len == 0 { 0 } else { p % len };
        match e {
            Edit::Flip(p, bit) if len > 0 => out[at(*p)] ^= 1 << bit,
            Edit::Word(p, w) if len >= 8 => {
                let p = at(*p).min(len - 8);
                out[p..p + 8].copy_from_slice(&w.to_le_bytes());
            }
            Edit::Truncate(p) => out.truncate(at(*p)),
            Edit::Insert(p, bytes) => {
                let p = at(*p);
                out.splice(p..p, bytes.iter().copied());
            }
            Edit::Duplicate(from, to, n) if len > 0 => {
                let from = at(*from);
                let piece: Vec<u8> = out[from..(from + n).min(len)].to_vec();
                let to = at(*to);
                out.splice(to..to, piece);
            }
            _ => {}
        }
    }
    out
}

/// How many cases a target runs: `QUANTBENCH_FUZZ_CASES`, else `default`.
pub fn cases(default: u32) -> u32 {
    std::env::var("QUANTBENCH_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Feeds `cases` inputs from `strategy` to `target`, which returns the
/// outcome class it reached (e.g. "ok", or the check that failed). A panic
/// fails the test with the smallest input found. Prints the executions and
/// the share of `known` outcomes reached, and returns the tally.
pub fn run<S: Strategy>(
    name: &str,
    cases: u32,
    strategy: S,
    known: &[&str],
    target: impl Fn(S::Value) -> String,
) -> BTreeMap<String, u64>
where
    S::Value: std::fmt::Debug,
{
    let tally: Mutex<BTreeMap<String, u64>> = Mutex::new(BTreeMap::new());
    // A fixed seed by default, so CI runs the same inputs every time (a
    // red CI is a real find, never luck); QUANTBENCH_FUZZ_SEED explores.
    let seed: u64 = std::env::var("QUANTBENCH_FUZZ_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0x5EED_F00D_0B0A_1234);
    let mut seed_bytes = [0u8; 32];
    seed_bytes[..8].copy_from_slice(&seed.to_le_bytes());
    let mut runner = TestRunner::new_with_rng(
        Config {
            cases,
            failure_persistence: None,
            ..Config::default()
        },
        TestRng::from_seed(RngAlgorithm::ChaCha, &seed_bytes),
    );
    let result = runner.run(&strategy, |input| {
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| target(input)));
        match outcome {
            Ok(class) => {
                *tally
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .entry(class)
                    .or_default() += 1;
                Ok(())
            }
            Err(_) => Err(TestCaseError::fail("the parser panicked")),
        }
    });
    if let Err(e) = result {
        panic!("{name}: {e}");
    }
    let tally = tally.into_inner().unwrap_or_else(|e| e.into_inner());
    let reached = known.iter().filter(|k| tally.contains_key(**k)).count();
    let missed: Vec<&&str> = known.iter().filter(|k| !tally.contains_key(**k)).collect();
    eprintln!(
        "fuzz {name}: {cases} executions (seed {seed}), 0 crashes; outcomes reached {reached} of {} known{}; tally {tally:?}",
        known.len(),
        if missed.is_empty() {
            String::new()
        } else {
            format!(" (not reached: {missed:?})")
        }
    );
    tally
}
