//! Injected slowdowns, for measuring what `compare` finds: in a build with
//! the `inject-slowdown` feature (never in a normal agent), the variable
//! `QUANTBENCH_INJECT_SLOWDOWN=<cell id part>:<fraction>` (e.g.
//! `Q4_0:0.10`) makes every timed call of the matching cells spin for that
//! fraction of the call's own time after it, inside the timed region: a
//! real slowdown the timings see, never an edited result.

use crate::multiply::Multiply;

/// `multiply`, slowed when this is a test build and the variable names
/// `cell_id`.
#[cfg(feature = "inject-slowdown")]
pub fn for_cell<'a>(multiply: Box<dyn Multiply + 'a>, cell_id: &str) -> Box<dyn Multiply + 'a> {
    let Ok(spec) = std::env::var("QUANTBENCH_INJECT_SLOWDOWN") else {
        return multiply;
    };
    let Some((part, fraction)) = spec.split_once(':') else {
        return multiply;
    };
    match fraction.parse::<f64>() {
        Ok(fraction) if cell_id.contains(part) && fraction > 0.0 => Box::new(Slowed {
            inner: multiply,
            fraction,
        }),
        _ => multiply,
    }
}

/// `multiply` as it is: a normal build has no slowdown to inject.
#[cfg(not(feature = "inject-slowdown"))]
pub fn for_cell<'a>(multiply: Box<dyn Multiply + 'a>, _cell_id: &str) -> Box<dyn Multiply + 'a> {
    multiply
}

#[cfg(feature = "inject-slowdown")]
struct Slowed<'a> {
    inner: Box<dyn Multiply + 'a>,
    fraction: f64,
}

#[cfg(feature = "inject-slowdown")]
impl Multiply for Slowed<'_> {
    fn compute(&mut self) -> Result<(), kernels::KernelError> {
        let started = std::time::Instant::now();
        self.inner.compute()?;
        let until = started.elapsed().mul_f64(1.0 + self.fraction);
        while started.elapsed() < until {
            std::hint::spin_loop();
        }
        Ok(())
    }
    fn output(&self) -> Vec<f32> {
        self.inner.output()
    }
    fn kernel_path(&self) -> String {
        self.inner.kernel_path()
    }
    fn weight_placement(&self) -> String {
        self.inner.weight_placement()
    }
    fn warmup_time(&self) -> std::time::Duration {
        self.inner.warmup_time()
    }
}
