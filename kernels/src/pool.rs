//! A persistent pool of worker threads for quantbench's own kernels (the
//! codebook GEMM). Spawning threads per call costs 50-100 us, more than a
//! whole small GEMV, so workers stay alive between calls: they spin
//! briefly after a call (back-to-back calls, as in a timing loop or a
//! model's layers, find them awake), then sleep on a condition variable,
//! so an idle pool takes no core from anything else.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How long an idle worker spins before it sleeps.
const SPIN: Duration = Duration::from_micros(300);

/// One call's work: `tasks` calls of `body`, handed out by `next`.
struct Work<'a> {
    tasks: usize,
    body: &'a (dyn Fn(usize) + Sync),
}

struct Shared {
    /// Bumped once per call (and once to stop); workers wait for a change.
    generation: AtomicU64,
    /// The current call's `Work`, valid while `busy_workers > 0`.
    work: AtomicPtr<()>,
    next_task: AtomicUsize,
    busy_workers: AtomicUsize,
    panicked: AtomicBool,
    stop: AtomicBool,
    sleeping: Mutex<()>,
    wake: Condvar,
}

pub struct WorkerPool {
    threads: usize,
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<()>>,
}

impl WorkerPool {
    /// A pool running calls on `threads` threads: the caller and
    /// `threads - 1` workers.
    pub fn new(threads: usize) -> WorkerPool {
        let threads = threads.max(1);
        let shared = Arc::new(Shared {
            generation: AtomicU64::new(0),
            work: AtomicPtr::new(std::ptr::null_mut()),
            next_task: AtomicUsize::new(0),
            busy_workers: AtomicUsize::new(0),
            panicked: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            sleeping: Mutex::new(()),
            wake: Condvar::new(),
        });
        let workers = (1..threads)
            .map(|_| {
                let shared = Arc::clone(&shared);
                std::thread::spawn(move || worker(&shared))
            })
            .collect();
        WorkerPool {
            threads,
            shared,
            workers,
        }
    }

    pub fn threads(&self) -> usize {
        self.threads
    }

    /// Calls `body(task)` for every task in `0..tasks`, spread over the
    /// pool's threads, and returns when all have returned.
    pub fn run(&self, tasks: usize, body: &(dyn Fn(usize) + Sync)) {
        if self.workers.is_empty() || tasks <= 1 {
            (0..tasks).for_each(body);
            return;
        }
        let work = Work { tasks, body };
        let shared = &*self.shared;
        shared.next_task.store(0, Ordering::Relaxed);
        shared
            .busy_workers
            .store(self.workers.len(), Ordering::Relaxed);
        shared
            .work
            .store(&work as *const Work as *mut (), Ordering::Relaxed);
        {
            let _guard = shared.sleeping.lock().unwrap_or_else(|e| e.into_inner());
            shared.generation.fetch_add(1, Ordering::Release);
            shared.wake.notify_all();
        }
        take_tasks(shared, &work);
        // `work` lives on this stack: every worker must be done with it.
        while shared.busy_workers.load(Ordering::Acquire) > 0 {
            std::hint::spin_loop();
        }
        if shared.panicked.swap(false, Ordering::Relaxed) {
            panic!("a worker panicked in a pool task");
        }
    }
}

fn take_tasks(shared: &Shared, work: &Work) {
    loop {
        let task = shared.next_task.fetch_add(1, Ordering::Relaxed);
        if task >= work.tasks {
            return;
        }
        (work.body)(task);
    }
}

fn worker(shared: &Shared) {
    let mut seen = 0u64;
    loop {
        let started = Instant::now();
        let mut spins = 0u32;
        loop {
            let generation = shared.generation.load(Ordering::Acquire);
            if generation != seen {
                seen = generation;
                break;
            }
            spins += 1;
            if !spins.is_multiple_of(64) || started.elapsed() < SPIN {
                std::hint::spin_loop();
                continue;
            }
            let guard = shared.sleeping.lock().unwrap_or_else(|e| e.into_inner());
            if shared.generation.load(Ordering::Acquire) == seen {
                drop(shared.wake.wait(guard));
            }
        }
        if shared.stop.load(Ordering::Acquire) {
            return;
        }
        // SAFETY: `run` stored a pointer to its `Work` before bumping the
        // generation (Release, read above with Acquire) and keeps it alive
        // until this worker decrements `busy_workers`.
        let work = unsafe { &*(shared.work.load(Ordering::Relaxed) as *const Work) };
        if catch_unwind(AssertUnwindSafe(|| take_tasks(shared, work))).is_err() {
            shared.panicked.store(true, Ordering::Relaxed);
        }
        shared.busy_workers.fetch_sub(1, Ordering::Release);
    }
}

impl Drop for WorkerPool {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        {
            let _guard = self
                .shared
                .sleeping
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            self.shared.generation.fetch_add(1, Ordering::Release);
            self.shared.wake.notify_all();
        }
        for worker in self.workers.drain(..) {
            let _ = worker.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_task_runs_once_per_call_across_many_calls() {
        let pool = WorkerPool::new(3);
        for tasks in [0, 1, 2, 7, 100] {
            let counts: Vec<AtomicUsize> = (0..tasks).map(|_| AtomicUsize::new(0)).collect();
            for _ in 0..50 {
                pool.run(tasks, &|t| {
                    counts[t].fetch_add(1, Ordering::Relaxed);
                });
            }
            assert!(counts.iter().all(|c| c.load(Ordering::Relaxed) == 50));
        }
    }

    #[test]
    fn calls_after_the_workers_slept_still_run() {
        let pool = WorkerPool::new(2);
        let done = AtomicUsize::new(0);
        pool.run(4, &|_| {
            done.fetch_add(1, Ordering::Relaxed);
        });
        std::thread::sleep(SPIN * 10);
        pool.run(4, &|_| {
            done.fetch_add(1, Ordering::Relaxed);
        });
        assert_eq!(done.load(Ordering::Relaxed), 8);
    }
}
