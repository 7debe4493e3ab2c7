//! Splitting kernel work across a persistent pool of worker threads.
//!
//! A decode step of a 270M model is about 130 small matrix-vector products of a few microseconds
//! each, so the hand-off must cost far less than spawning threads. Workers spin on a generation
//! counter for a short while after each job (a hand-off then costs a cache-line transfer) and
//! sleep on a condition variable when no job comes, so an idle model uses no CPU.

use crate::error::{Error, Result};
use std::cell::UnsafeCell;
use std::marker::PhantomData;
use std::ops::Range;
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::*};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// More worker threads than this only cost memory (each has a scores row) and hand-offs.
pub const MAX_THREADS: usize = 256;

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

    /// The thread count `requested` asks for (`None`: every CPU this process may use), checked.
    pub fn count_for(requested: Option<usize>) -> Result<usize> {
        match requested {
            Some(n) if n == 0 || n > MAX_THREADS => {
                Err(Error::InvalidArgument(format!("threads must be between 1 and {MAX_THREADS}, got {n}")))
            }
            Some(n) => Ok(n),
            None => Ok(Threads::available().min(MAX_THREADS)),
        }
    }

    /// The CPUs this process may run on (its affinity mask and cgroup quota).
    pub fn available() -> usize {
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
    }

    pub fn count(&self) -> usize {
        self.n
    }

    /// How `0..len` is split between the threads: disjoint ranges covering it in order, each
    /// starting at a multiple of `align`, as many as `work` (about the number of multiply-adds)
    /// makes worth it and at most `count()`; one range when the work is small.
    pub fn ranges(&self, len: usize, align: usize, work: usize) -> Vec<Range<usize>> {
        let align = align.max(1);
        let blocks = len.div_ceil(align);
        let parts = self.n.min(work / MIN_WORK_PER_THREAD).min(blocks).max(1);
        let bound = |i: usize| (blocks * i / parts * align).min(len);
        (0..parts).map(|i| bound(i)..bound(i + 1)).collect()
    }

    /// Like [`Threads::ranges`] for items of unequal cost: `0..len` split into consecutive
    /// ranges of about equal total `weight(i)`, as many as `work` makes worth it.
    pub fn ranges_by_weight(&self, len: usize, work: usize, weight: impl Fn(usize) -> usize) -> Vec<Range<usize>> {
        let parts = self.n.min(work / MIN_WORK_PER_THREAD).min(len).max(1);
        if parts == 1 {
            return self.ranges(len, 1, 0);
        }
        let total: usize = (0..len).map(&weight).sum();
        let mut out = Vec::with_capacity(parts);
        let (mut start, mut sum) = (0, 0);
        for i in 0..len {
            sum += weight(i);
            // Close part `k` once its share of the total is reached, leaving an item for each
            // part still to come.
            let k = out.len() + 1;
            if k < parts && sum * parts >= total * k && len - (i + 1) >= parts - k {
                out.push(start..i + 1);
                start = i + 1;
            }
        }
        out.push(start..len);
        out
    }

    /// Calls `f(i, part)` for each of `parts` (at most `count()` of them), in parallel, part `i`
    /// on thread `i`; returns when all are done, and a panic in any is resumed here. The parts
    /// are values the caller made, such as disjoint `&mut` slices from [`split_rows`] or
    /// [`split_columns`]: what each thread may write is checked by the compiler, not by
    /// comments. `f` must not call into the same `Threads` (one job runs at a time: a nested
    /// call would wait for itself).
    pub fn run<P: Send>(&self, parts: Vec<P>, f: impl Fn(usize, P) + Sync) {
        assert!(parts.len() <= self.n, "{} parts for {} threads", parts.len(), self.n);
        let pool = match &self.pool {
            Some(pool) if parts.len() > 1 => pool,
            _ => return parts.into_iter().enumerate().for_each(|(i, p)| f(i, p)),
        };
        if pool.pid != std::process::id() {
            // A fork()ed child (Python's multiprocessing): only the forking thread was copied,
            // the workers are gone; run every part here rather than wait for them forever.
            return parts.into_iter().enumerate().for_each(|(i, p)| f(i, p));
        }
        // Each thread takes its own part; the locks are never contended.
        let slots: Vec<Mutex<Option<P>>> = parts.into_iter().map(|p| Mutex::new(Some(p))).collect();
        pool.run(slots.len(), &|i| {
            let part = slots[i].lock().unwrap_or_else(|e| e.into_inner()).take().expect("each part runs once");
            f(i, part)
        });
    }

    /// Calls `f(part, range)` on the ranges of [`Threads::ranges`], in parallel: for work that
    /// writes nothing shared, or writes through parts made by the caller.
    pub fn for_ranges(&self, len: usize, align: usize, work: usize, f: impl Fn(usize, Range<usize>) + Sync) {
        self.run(self.ranges(len, align, work), f);
    }

    /// Calls `f(rows, chunk)` in parallel on disjoint ranges of rows of `buf`, rows of `row_len`
    /// values (`chunk` is those rows of `buf`): the split of `for_ranges(buf.len() / row_len,
    /// align, work)`.
    pub fn for_rows_mut<T: Send>(
        &self,
        buf: &mut [T],
        row_len: usize,
        align: usize,
        work: usize,
        f: impl Fn(Range<usize>, &mut [T]) + Sync,
    ) {
        let ranges = self.ranges(buf.len() / row_len.max(1), align, work);
        let chunks = split_rows(buf, row_len, &ranges);
        self.run(ranges.into_iter().zip(chunks).collect(), |_, (rows, chunk)| f(rows, chunk));
    }
}

/// The rows `ranges` (consecutive, in order, from row 0) of `buf`, rows of `row_len` values, as
/// disjoint slices.
pub fn split_rows<'a, T>(buf: &'a mut [T], row_len: usize, ranges: &[Range<usize>]) -> Vec<&'a mut [T]> {
    let mut rest = buf;
    let mut out = Vec::with_capacity(ranges.len());
    let mut at = 0;
    for r in ranges {
        assert_eq!(r.start, at, "split_rows: ranges must be consecutive");
        let (chunk, tail) = std::mem::take(&mut rest).split_at_mut(r.len() * row_len);
        out.push(chunk);
        rest = tail;
        at = r.end;
    }
    out
}

/// Columns `cols` of every row of a row-major `(rows, stride)` matrix: one thread's share of a
/// product whose threads split the columns (the weight rows), made by [`split_columns`].
pub struct ColumnsMut<'a, T> {
    ptr: *mut T,
    stride: usize,
    rows: usize,
    cols: Range<usize>,
    _borrow: PhantomData<&'a mut [T]>,
}

// SAFETY: a `ColumnsMut` is a unique borrow of its columns (see `split_columns`), like a `&mut`.
unsafe impl<T: Send> Send for ColumnsMut<'_, T> {}

impl<T> ColumnsMut<'_, T> {
    /// The columns this part owns.
    pub fn cols(&self) -> Range<usize> {
        self.cols.clone()
    }

    /// Row `r`'s values in this part's columns.
    pub fn row(&mut self, r: usize) -> &mut [T] {
        assert!(r < self.rows, "row {r} of {}", self.rows);
        // SAFETY: `split_columns` checked that every row's `cols` lie inside the matrix, and
        // gave these columns to this part alone, which `&mut self` borrows for the slice's life.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.add(r * self.stride + self.cols.start), self.cols.len()) }
    }
}

/// The columns `ranges` (disjoint, in order, inside `0..stride`) of the `(m.len() / stride,
/// stride)` row-major matrix `m`, one part each.
pub fn split_columns<'a, T>(m: &'a mut [T], stride: usize, ranges: &[Range<usize>]) -> Vec<ColumnsMut<'a, T>> {
    let rows = m.len().checked_div(stride).unwrap_or(0);
    let mut end = 0;
    for r in ranges {
        assert!(r.start >= end && r.start <= r.end && r.end <= stride, "split_columns: {r:?} in 0..{stride}");
        end = r.end;
    }
    let ptr = m.as_mut_ptr();
    let part = |cols: &Range<usize>| ColumnsMut { ptr, stride, rows, cols: cols.clone(), _borrow: PhantomData };
    ranges.iter().map(part).collect()
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
