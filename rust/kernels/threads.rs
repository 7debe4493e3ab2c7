//! Splitting kernel work across a persistent pool of worker threads.
//!
//! A decode step of a 270M model is about 130 small matrix-vector products of a few microseconds
//! each, so the hand-off must cost far less than spawning threads. Workers spin on a generation
//! counter for a short while after each job (a hand-off then costs a cache-line transfer) and
//! sleep on a condition variable when no job comes, so an idle model uses no CPU.

use std::cell::UnsafeCell;
use std::ops::Range;
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::*};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Below this many multiply-adds per thread a job runs on the calling thread alone.
const MIN_WORK_PER_THREAD: usize = 1 << 14;

/// How long an idle worker polls for the next job before it sleeps.
const SPIN: Duration = Duration::from_micros(500);

/// Busy-wait iterations before a waiting thread starts yielding its CPU at each poll, so that
/// more threads than CPUs (or a busy machine) still make progress.
const PAUSES: u32 = 1 << 10;

/// One poll of a busy wait.
fn backoff(spins: &mut u32) {
    *spins += 1;
    if *spins < PAUSES {
        std::hint::spin_loop();
    } else {
        std::thread::yield_now();
    }
}

/// The calling thread plus `count() - 1` pool workers.
pub struct Threads {
    n: usize,
    pool: Option<Pool>,
}

impl Threads {
    /// `n` threads in all (at least 1): the caller's and `n - 1` workers started now. If the
    /// system refuses to start some, the pool runs with those it got (`count()` says how many).
    pub fn new(n: usize) -> Threads {
        let pool = (n > 1).then(|| Pool::new(n - 1)).filter(|p| !p.workers.is_empty());
        Threads { n: 1 + pool.as_ref().map_or(0, |p| p.workers.len()), pool }
    }

    /// The CPUs this process may run on (its affinity mask and cgroup quota).
    pub fn available() -> usize {
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
    }

    pub fn count(&self) -> usize {
        self.n
    }

    /// Calls `f(part, range)` on disjoint sub-ranges covering `0..len`, in parallel when `work`
    /// (about the number of multiply-adds) makes it worth it; `part < self.count()` numbers the
    /// sub-range. Each sub-range starts at a multiple of `align`. Returns when all are done; a
    /// panic in any part is resumed here. `f` must not call `for_ranges` on the same `Threads`
    /// (one job runs at a time: a nested call would wait for itself).
    pub fn for_ranges(&self, len: usize, align: usize, work: usize, f: impl Fn(usize, Range<usize>) + Sync) {
        let align = align.max(1);
        let blocks = len.div_ceil(align);
        let parts = self.n.min(work / MIN_WORK_PER_THREAD).min(blocks).max(1);
        let pool = match &self.pool {
            Some(pool) if parts > 1 => pool,
            _ => return f(0, 0..len),
        };
        let bounds = |i: usize| (blocks * i / parts * align).min(len);
        if pool.pid != std::process::id() {
            // A fork()ed child (Python's multiprocessing): only the forking thread was copied,
            // the workers are gone; run every part here rather than wait for them forever.
            return (0..parts).for_each(|i| f(i, bounds(i)..bounds(i + 1)));
        }
        pool.run(parts, &|i| f(i, bounds(i)..bounds(i + 1)));
    }
}

/// A job as the workers see it: called with the worker's part number.
type Job<'a> = &'a (dyn Fn(usize) + Sync);

struct Shared {
    /// `generation << 16 | parts`, published in one store so that a worker reads a job's part
    /// count together with its generation: the generation is bumped once per job (and once at
    /// shutdown) and workers wait for it to change; workers `1..parts` run the job, the others
    /// skip it.
    state: AtomicUsize,
    /// The current job, valid while `pending > 0`; lifetime erased (see `Pool::run`).
    job: UnsafeCell<Option<Job<'static>>>,
    /// Workers that have not finished the current job.
    pending: AtomicUsize,
    /// More threads than CPUs: waits yield at once and idle workers sleep right away, since a
    /// spinning thread would take the CPU of one that has work.
    oversubscribed: bool,
    panicked: AtomicBool,
    stop: AtomicBool,
    sleepers: AtomicUsize,
    lock: Mutex<()>,
    wake: Condvar,
}

// SAFETY: `job` is written only by the dispatching thread while no worker reads it (between
// jobs, with `run` serialized by `Pool::dispatch`), and read by workers only after they observe
// the new generation, which is published after the write (SeqCst).
unsafe impl Sync for Shared {}

struct Pool {
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<()>>,
    /// One job at a time, whichever thread calls.
    dispatch: Mutex<()>,
    /// The process that started the workers.
    pid: u32,
}

impl Pool {
    fn new(workers: usize) -> Pool {
        let shared = Arc::new(Shared {
            state: AtomicUsize::new(0),
            job: UnsafeCell::new(None),
            pending: AtomicUsize::new(0),
            oversubscribed: workers + 1 > Threads::available(),
            panicked: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            sleepers: AtomicUsize::new(0),
            lock: Mutex::new(()),
            wake: Condvar::new(),
        });
        // Workers are numbered 1, 2, … without gaps: stop at the first that cannot start.
        let workers = (1..=workers)
            .map_while(|part| {
                let shared = Arc::clone(&shared);
                std::thread::Builder::new().name(format!("gemma_rs-{part}")).spawn(move || worker(&shared, part)).ok()
            })
            .collect();
        Pool { shared, workers, dispatch: Mutex::new(()), pid: std::process::id() }
    }

    /// Runs `job(0)` here and `job(1..parts)` on the first `parts - 1` workers (the others skip
    /// it); returns when all are done.
    fn run(&self, parts: usize, job: Job<'_>) {
        let _one_at_a_time = self.dispatch.lock().unwrap_or_else(|e| e.into_inner());
        let s = &*self.shared;
        let parts = parts.clamp(1, self.workers.len() + 1);
        // SAFETY: no worker reads `job` now (the previous job finished: pending was 0), and this
        // function does not return before every worker is done with it, so erasing the lifetime
        // never lets a worker see a dangling job.
        unsafe { *s.job.get() = Some(std::mem::transmute::<Job<'_>, Job<'static>>(job)) };
        s.pending.store(parts - 1, SeqCst);
        let generation = (s.state.load(SeqCst) >> 16) + 1;
        s.state.store(generation << 16 | parts, SeqCst);
        if s.sleepers.load(SeqCst) > 0 {
            let _g = s.lock.lock().unwrap_or_else(|e| e.into_inner());
            s.wake.notify_all();
        }
        let mine = catch_unwind(AssertUnwindSafe(|| job(0)));
        let mut spins = if s.oversubscribed { PAUSES } else { 0 };
        while s.pending.load(Acquire) != 0 {
            backoff(&mut spins);
        }
        // Read (and clear) the workers' flag first, so that it never outlives this job.
        let worker_panicked = s.panicked.swap(false, SeqCst);
        if let Err(p) = mine {
            resume_unwind(p);
        }
        if worker_panicked {
            panic!("a worker thread panicked");
        }
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        if self.pid != std::process::id() {
            // In a fork()ed child the workers do not exist: nothing to stop or join.
            std::mem::forget(std::mem::take(&mut self.workers));
            return;
        }
        let s = &*self.shared;
        s.stop.store(true, SeqCst);
        s.state.fetch_add(1 << 16, SeqCst);
        {
            let _g = s.lock.lock().unwrap_or_else(|e| e.into_inner());
            s.wake.notify_all();
        }
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

fn worker(s: &Shared, part: usize) {
    let mut seen = 0;
    loop {
        let state = wait_for_job(s, seen);
        seen = state >> 16;
        if s.stop.load(SeqCst) {
            return;
        }
        if part >= state & 0xFFFF {
            continue; // not needed for this job; `run` does not wait for it
        }
        // SAFETY: the generation changed, so `run` stored the job before publishing it and
        // waits for this worker's `pending` decrement before the job goes away.
        let job = unsafe { (*s.job.get()).expect("a job was published") };
        if catch_unwind(AssertUnwindSafe(|| job(part))).is_err() {
            s.panicked.store(true, SeqCst);
        }
        s.pending.fetch_sub(1, Release);
    }
}

/// Spins, then sleeps, until the generation differs from `seen`; returns the new state.
fn wait_for_job(s: &Shared, seen: usize) -> usize {
    let start = Instant::now();
    let spin = if s.oversubscribed { Duration::ZERO } else { SPIN };
    let mut spins = 0u32;
    loop {
        let state = s.state.load(Acquire);
        if state >> 16 != seen {
            return state;
        }
        if spins.is_multiple_of(64) && start.elapsed() >= spin {
            break;
        }
        backoff(&mut spins);
    }
    let mut guard = s.lock.lock().unwrap_or_else(|e| e.into_inner());
    s.sleepers.fetch_add(1, SeqCst);
    // Checked under the lock after announcing the sleep: a job published before this sees
    // `sleepers > 0` and notifies under the same lock, so no wake-up is lost.
    loop {
        let state = s.state.load(SeqCst);
        if state >> 16 != seen {
            s.sleepers.fetch_sub(1, SeqCst);
            return state;
        }
        guard = s.wake.wait(guard).unwrap_or_else(|e| e.into_inner());
    }
}

/// A raw pointer that worker threads may share because they write disjoint elements.
#[derive(Clone, Copy)]
pub struct SharedMut<T>(*mut T);

// SAFETY: users of SharedMut guarantee that concurrent writers touch disjoint elements and that
// the pointee outlives the job (it is only created from a `&mut [T]` around `for_ranges`).
unsafe impl<T: Send> Send for SharedMut<T> {}
unsafe impl<T: Send> Sync for SharedMut<T> {}

impl<T> SharedMut<T> {
    pub fn new(s: &mut [T]) -> Self {
        SharedMut(s.as_mut_ptr())
    }

    /// # Safety
    /// `i` is in bounds of the slice this was made from, and no other thread writes element `i`.
    pub unsafe fn write(self, i: usize, v: T) {
        unsafe { self.0.add(i).write(v) }
    }

    /// # Safety
    /// `start..start + len` is in bounds and no other thread touches it while the slice lives.
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn slice(&self, start: usize, len: usize) -> &mut [T] {
        unsafe { std::slice::from_raw_parts_mut(self.0.add(start), len) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[test]
    fn ranges_cover_everything_once() {
        for threads in 1..5 {
            let pool = Threads::new(threads);
            for len in [0, 1, 7, 64, 1000] {
                let seen = Mutex::new(vec![0u32; len]);
                pool.for_ranges(len, 4, usize::MAX, |part, r| {
                    assert!(r.start % 4 == 0 && part < threads);
                    for i in r {
                        seen.lock().unwrap()[i] += 1;
                    }
                });
                assert!(seen.into_inner().unwrap().iter().all(|&c| c == 1), "{threads} {len}");
            }
        }
    }

    #[test]
    fn many_jobs_in_a_row_and_after_sleeping() {
        let pool = Threads::new(2);
        let total = AtomicUsize::new(0);

        for round in 0..20_000 {
            if round == 10_000 {
                std::thread::sleep(SPIN * 4); // the workers go to sleep; the next job wakes them
            }
            pool.for_ranges(3, 1, usize::MAX, |_, r| {
                total.fetch_add(r.len(), Relaxed);
            });
        }
        assert_eq!(total.load(Relaxed), 60_000);
    }

    #[test]
    fn more_threads_than_cpus_still_finish() {
        let pool = Threads::new(2 * Threads::available() + 1);
        let total = AtomicUsize::new(0);
        for _ in 0..200 {
            pool.for_ranges(100, 1, usize::MAX, |_, r| {
                total.fetch_add(r.len(), Relaxed);
            });
        }
        assert_eq!(total.load(Relaxed), 20_000);
    }

    #[test]
    fn panics_are_resumed_on_the_caller_and_the_next_job_runs_normally() {
        let pool = Threads::new(2);
        // The caller's part, a worker's part, and both (the workers' flag must not outlive it).
        for failing in [[true, false], [false, true], [true, true]] {
            let r = catch_unwind(AssertUnwindSafe(|| {
                pool.for_ranges(2, 1, usize::MAX, |part, _| assert!(!failing[part], "part {part} fails"))
            }));
            assert!(r.is_err(), "{failing:?}");
            let count = AtomicUsize::new(0);
            pool.for_ranges(2, 1, usize::MAX, |_, r| {
                count.fetch_add(r.len(), Relaxed);
            });
            assert_eq!(count.load(Relaxed), 2, "after {failing:?}");
        }
    }

    #[test]
    fn several_callers_share_one_pool() {
        let pool = Threads::new(2);
        std::thread::scope(|sc| {
            for _ in 0..4 {
                sc.spawn(|| {
                    for _ in 0..2000 {
                        let sum = AtomicUsize::new(0);
                        pool.for_ranges(100, 1, usize::MAX, |_, r| {
                            sum.fetch_add(r.sum::<usize>(), Relaxed);
                        });
                        assert_eq!(sum.load(Relaxed), 4950);
                    }
                });
            }
        });
    }
}
