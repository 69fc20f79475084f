//! Parallel ranged parts of one whole transfer.
//!
//! A large package from a server that does byte ranges is fetched over several connections:
//! the transfer's own stream (the head) takes the first part and is hashed as it arrives; each
//! later part is fetched by its own ranged request straight into the partial file. Readers and
//! the digest check still see one file growing from the front: once the head is done, the
//! writer hashes the later parts in order, reading them back from the page cache as they fill,
//! and only then publishes their bytes. So parallel parts change how fast bytes arrive, never
//! which bytes a reader may see before the check, nor how a wrong file fails.
//!
//! Why: one TCP stream is capped by its window on a long path, and many servers and CDNs cap
//! each connection (nginx `limit_rate`); several streams fill the link. Where one stream
//! already fills it (a LAN, loopback) they only cost connections and CPU, so the fetcher splits
//! a transfer only when it runs alone and its first stream turns out slow. `Segments` is the
//! bookkeeping both sides share: the async part fetchers report progress, the blocking writer
//! waits on it.

use std::sync::{Condvar, Mutex};

/// The smallest part worth its own connection. A 16 MiB package is fetched as four parts.
pub const PART_MIN: u64 = 4 << 20;

/// Parts are cut on this boundary (the sparse block size, so nothing straddles pages).
const ALIGN: u64 = 64 * 1024;

#[derive(Debug, Clone, PartialEq)]
enum Progress {
    /// Bytes `start..start+n` of the part are on disk.
    Filled(u64),
    Failed(String),
}

#[derive(Debug)]
struct Inner {
    parts: Vec<Progress>,
    cancelled: bool,
}

/// The parts of a transfer after its head: their spans and how far each has got.
#[derive(Debug)]
pub struct Segments {
    spans: Vec<(u64, u64)>,
    inner: Mutex<Inner>,
    cond: Condvar,
}

impl Segments {
    /// Splits `from..size` into at most `streams` parts of at least `PART_MIN` bytes. Returns
    /// where the head stops and the parts after it, or `None` when one stream is the plan.
    pub fn plan(from: u64, size: u64, streams: usize) -> Option<(u64, Segments)> {
        let rest = size.checked_sub(from)?;
        let n = (rest / PART_MIN).min(streams as u64);
        if n < 2 {
            return None;
        }
        // Checked: SIZE comes from the index, and a hostile one may be near u64::MAX.
        let part = rest.div_ceil(n).checked_next_multiple_of(ALIGN)?;
        let head_end = from.checked_add(part)?;
        let at = |i: u64| part.checked_mul(i).and_then(|o| o.checked_add(from));
        let spans: Vec<(u64, u64)> = (1..n)
            .map(|i| Some((at(i)?, at(i + 1).map_or(size, |e| e.min(size)))))
            .collect::<Option<Vec<_>>>()?
            .into_iter()
            .filter(|(a, b)| a < b)
            .collect();
        if spans.is_empty() {
            return None;
        }
        let inner = Inner {
            parts: vec![Progress::Filled(0); spans.len()],
            cancelled: false,
        };
        Some((
            head_end,
            Segments {
                spans,
                inner: Mutex::new(inner),
                cond: Condvar::new(),
            },
        ))
    }

    /// Where the first part after the head starts (where the head stops).
    pub fn start(&self) -> u64 {
        self.spans[0].0
    }

    /// `(start, end)` of every part, in file order.
    pub fn spans(&self) -> &[(u64, u64)] {
        &self.spans
    }

    /// Part `i` now holds its first `filled` bytes.
    pub fn advance(&self, i: usize, filled: u64) {
        self.set(i, Progress::Filled(filled));
    }

    /// Part `i` gave up; the writer fails the transfer with `reason` when it gets there.
    pub fn fail(&self, i: usize, reason: String) {
        self.set(i, Progress::Failed(reason));
    }

    fn set(&self, i: usize, p: Progress) {
        let mut inner = self.inner.lock().unwrap();
        if !matches!(inner.parts[i], Progress::Failed(_)) {
            inner.parts[i] = p;
        }
        drop(inner);
        self.cond.notify_all();
    }

    /// The transfer is over (failed or abandoned): nobody will fill the parts any more.
    pub fn cancel(&self) {
        self.inner.lock().unwrap().cancelled = true;
        self.cond.notify_all();
    }

    /// The reason of the first part that gave up, if one did: the transfer cannot complete.
    pub fn failure(&self) -> Option<String> {
        self.inner.lock().unwrap().failure().cloned()
    }

    /// Blocks until part `i` holds more than `done` bytes, and says how many it holds; fails
    /// as soon as any part has failed (the file cannot be completed anyway). Never
    /// waits forever: every part fetcher ends (stall timeout, bounded retries) and reports; one
    /// dropped unfinished reports failure (see `PartGuard`); and when the transfer ends for
    /// any reason, dropping its parts cancels them (even ones never started).
    pub fn wait_beyond(&self, i: usize, done: u64) -> Result<u64, String> {
        let mut inner = self.inner.lock().unwrap();
        loop {
            if let Some(reason) = inner.failure() {
                return Err(reason.clone());
            }
            match inner.parts[i] {
                Progress::Filled(n) if n > done => return Ok(n),
                _ if inner.cancelled => return Err("transfer cancelled".into()),
                _ => inner = self.cond.wait(inner).unwrap(),
            }
        }
    }
}

impl Inner {
    fn failure(&self) -> Option<&String> {
        self.parts.iter().find_map(|p| match p {
            Progress::Failed(reason) => Some(reason),
            Progress::Filled(_) => None,
        })
    }
}

/// Held by a part fetcher: if it ends without reporting (a panic, an abort), the part is
/// marked failed, so the writer waiting on it gets an error instead of waiting forever.
pub struct PartGuard<'a> {
    segs: &'a Segments,
    part: usize,
    reported: bool,
}

impl<'a> PartGuard<'a> {
    pub fn new(segs: &'a Segments, part: usize) -> Self {
        PartGuard {
            segs,
            part,
            reported: false,
        }
    }

    pub fn reported(&mut self) {
        self.reported = true;
    }
}

impl Drop for PartGuard<'_> {
    fn drop(&mut self) {
        if !self.reported {
            self.segs.fail(self.part, "part transfer stopped".into());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn a_hostile_size_near_the_top_of_u64_plans_without_overflow() {
        for size in [u64::MAX, u64::MAX - 1, u64::MAX - ALIGN] {
            for from in [0, 1 << 20, size - PART_MIN * 3] {
                if let Some((head, segs)) = Segments::plan(from, size, 16) {
                    assert!(head > from);
                    assert!(segs.spans().iter().all(|(a, b)| a < b && *b <= size));
                }
            }
        }
    }

    #[test]
    fn plans_cover_the_file_once_in_aligned_parts() {
        assert!(
            Segments::plan(0, PART_MIN * 2 - 1, 4).is_none(),
            "too small"
        );
        assert!(Segments::plan(0, 64 << 20, 1).is_none(), "one stream");
        for (from, size, streams) in [
            (0, 16 << 20, 4),
            (0, (256 << 20) + 12345, 4),
            (1 << 20, 9 << 20, 8),
            (0, 8 << 20, 16),
        ] {
            let (head_end, segs) = Segments::plan(from, size, streams).unwrap();
            assert_eq!(head_end % ALIGN, from % ALIGN);
            let mut at = head_end;
            for &(a, b) in segs.spans() {
                assert_eq!(a, at, "no gap, no overlap");
                assert!(b > a);
                at = b;
            }
            assert_eq!(at, size, "covers to the end");
            assert!(segs.spans().len() < streams, "the head counts as a stream");
        }
    }

    #[test]
    fn a_waiting_writer_wakes_for_progress_failure_and_cancel() {
        let (_, segs) = Segments::plan(0, 16 << 20, 4).unwrap();
        let segs = Arc::new(segs);
        let s = segs.clone();
        let t = std::thread::spawn(move || s.wait_beyond(0, 0));
        segs.advance(0, 100);
        assert_eq!(t.join().unwrap(), Ok(100));

        let s = segs.clone();
        let t = std::thread::spawn(move || s.wait_beyond(1, 0));
        drop(PartGuard::new(&segs, 1));
        assert_eq!(t.join().unwrap(), Err("part transfer stopped".into()));
        segs.advance(1, 5);
        assert!(
            segs.wait_beyond(1, 0).is_err(),
            "a failed part stays failed"
        );

        let (_, segs) = Segments::plan(0, 16 << 20, 4).unwrap();
        let segs = Arc::new(segs);
        let s = segs.clone();
        let t = std::thread::spawn(move || s.wait_beyond(2, 0));
        segs.cancel();
        assert_eq!(t.join().unwrap(), Err("transfer cancelled".into()));
    }
}
