//! Splitting kernel work across worker threads.
//!
//! Scoped threads per call: simple and correct; the hand-off costs tens of microseconds, which
//! the Q8_0 work replaces with a persistent pool behind this same interface.

use std::ops::Range;

#[derive(Clone, Copy, Debug)]
pub struct Threads {
    n: usize,
}

/// Below this many multiply-adds a job runs on the calling thread: a spawn costs more.
const MIN_WORK_PER_THREAD: usize = 1 << 18;

impl Threads {
    pub fn new(n: usize) -> Threads {
        Threads { n: n.max(1) }
    }

    /// The CPUs this process may run on.
    pub fn available() -> usize {
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
    }

    pub fn count(&self) -> usize {
        self.n
    }

    /// Calls `f(part, range)` on disjoint sub-ranges covering `0..len`, in parallel when `work`
    /// (about the number of multiply-adds) makes it worth it; `part < self.count()` numbers the
    /// sub-range. Each sub-range starts at a multiple of `align`.
    pub fn for_ranges(&self, len: usize, align: usize, work: usize, f: impl Fn(usize, Range<usize>) + Sync) {
        let parts = self.n.min(work / MIN_WORK_PER_THREAD).min(len.div_ceil(align.max(1))).max(1);
        if parts == 1 {
            f(0, 0..len);
            return;
        }
        let align = align.max(1);
        let blocks = len.div_ceil(align);
        let bounds = |i: usize| (blocks * i / parts * align).min(len);
        std::thread::scope(|s| {
            for i in 1..parts {
                let f = &f;
                s.spawn(move || f(i, bounds(i)..bounds(i + 1)));
            }
            f(0, bounds(0)..bounds(1));
        });
    }
}

/// A raw pointer that worker threads may share because they write disjoint elements.
#[derive(Clone, Copy)]
pub struct SharedMut<T>(*mut T);

// SAFETY: users of SharedMut guarantee that concurrent writers touch disjoint elements and that
// the pointee outlives the scope (it is only created from a `&mut [T]` inside `for_ranges`).
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
            for len in [0, 1, 7, 64, 1000] {
                let seen = Mutex::new(vec![0u32; len]);
                Threads::new(threads).for_ranges(len, 4, usize::MAX, |part, r| {
                    assert!(r.start % 4 == 0 && part < threads);
                    for i in r {
                        seen.lock().unwrap()[i] += 1;
                    }
                });
                assert!(seen.into_inner().unwrap().iter().all(|&c| c == 1), "{threads} {len}");
            }
        }
    }
}
