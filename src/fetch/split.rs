//! Parallel ranged parts of one large transfer: when to split (a lone, slow stream of a
//! server that does ranges), and the part fetchers. The writer still hashes the file front to
//! back (see `writer::follow_parts`), so one wrong part fails the whole file.

use std::fs::File;
use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use tokio::sync::mpsc;
use tracing::debug;

use super::Fetcher;
use super::checks::short_answer;
use super::segment::{PartGuard, Segments};
use super::transfer::Failure;
use super::writer::write_making_room;
use crate::index::Package;
use crate::remote::RETRY;

/// The window over which a head's rate is measured while a split is pending: long enough that
/// a time slice lost to a busy CPU (which shows as waiting, since the connection task was not
/// run) does not make a fast stream look slow (at the threshold a window may wait 15 ms),
/// short enough to decide early in a head of at least 4 MiB.
pub(super) const PROBE: u64 = 1 << 20;

/// A head whose every `PROBE` window came at this rate or faster stays one stream. Above it one
/// connection already does what parts are for (a LAN binhost, loopback), while hashing every
/// byte for every digest is the bound on small machines, and parts only add connections to a
/// shared binhost and CPU for reading them back. Below it (a capped connection, a long round
/// trip, a slow link) parts fill what one stream cannot.
pub(super) const SPLIT_BELOW: f64 = 64.0 * 1024.0 * 1024.0;

/// The rate of a head while a split is pending: measured over each `PROBE` bytes from its
/// first chunk on (a server slow to start answering is not a slow stream), as bytes per second
/// spent waiting for the network (time the writer holds us up is a busy CPU, which parts would
/// not help). Every window counts, not just the first: nginx's `limit_rate` lets a first burst
/// through at full speed before it caps. Fed positions and waits by the caller, so the
/// decision is tested with a clock the test controls (issue 11.6).
#[derive(Debug)]
pub(super) struct RateProbe {
    window: Option<(u64, std::time::Duration)>,
    /// `SPLIT_BELOW`, or what a test set.
    below: f64,
}

impl RateProbe {
    pub(super) fn new(below: f64) -> RateProbe {
        RateProbe {
            window: None,
            below,
        }
    }

    /// A chunk arrived: the transfer is at byte `at`, after waiting `waited` for it. `true`
    /// when a window just closed slower than `SPLIT_BELOW`.
    pub(super) fn slow_after(&mut self, at: u64, waited: std::time::Duration) -> bool {
        let Some((from, spent)) = &mut self.window else {
            self.window = Some((at, std::time::Duration::ZERO));
            return false;
        };
        *spent += waited;
        if at.saturating_sub(*from) < PROBE {
            return false;
        }
        let rate = (at - *from) as f64 / spent.as_secs_f64().max(1e-6);
        self.window = Some((at, std::time::Duration::ZERO));
        rate < self.below
    }
}

impl Fetcher {
    /// How this transfer would be split from byte `have` on, if it is worth several streams
    /// and the server has not shown it does ranges oddly.
    ///
    /// Only a transfer running alone is split. Parts help one transfer fill a link that caps
    /// each connection; when other transfers run (a merge-list prefetch, parallel readers),
    /// the link already carries several streams, and splitting each of them only shares the
    /// same bandwidth more finely, delays the front of the file a reader is waiting for, and
    /// costs CPU the install needs (measured: `bench/emerge-shaped.sh` cold went from 1.07x to
    /// 1.11x local when every prefetched package was split). A plan is only a plan: the parts
    /// start at the first `PROBE` window of the head that came slower than `SPLIT_BELOW` (see
    /// `attempt`).
    pub(super) fn plan(&self, pkg: &Package, have: u64) -> Option<(u64, Segments)> {
        if self.streams < 2
            || !self.endpoint(pkg).may_split()
            || self.stats.in_flight.load(Ordering::Relaxed) > 1
        {
            return None;
        }
        Segments::plan(have, pkg.size, self.streams)
    }

    /// Starts a fetcher for each part after the head.
    pub(super) fn start_parts(self: &Arc<Self>, pkg: &Package, segs: Segments, split: &mut Split) {
        let segs = Arc::new(segs);
        debug!(path = %pkg.path, parts = segs.spans().len() + 1, "fetching in parallel parts");
        let _ = split.parts.set(segs.clone());
        for i in 0..segs.spans().len() {
            split.tasks.push(tokio::spawn(self.clone().fetch_part(
                pkg.clone(),
                split.file.clone(),
                segs.clone(),
                i,
            )));
        }
    }

    /// Fetches part `i` of a split transfer into `file`, resuming after transient failures
    /// like the head does; reports progress or failure to the writer through `segs`. Disk
    /// writes run on a blocking thread of their own, as the head's do.
    pub(super) async fn fetch_part(
        self: Arc<Self>,
        pkg: Package,
        file: Arc<File>,
        segs: Arc<Segments>,
        i: usize,
    ) {
        let mut guard = PartGuard::new(&segs, i);
        let (from, to) = segs.spans()[i];
        let (chunks, mut rx) = mpsc::channel::<Bytes>(16);
        let writer = {
            let (segs, store) = (segs.clone(), self.store.clone());
            tokio::task::spawn_blocking(move || {
                let mut written = 0u64;
                while let Some(chunk) = rx.blocking_recv() {
                    write_making_room(&file, &chunk, from + written, &store)?;
                    written += chunk.len() as u64;
                    segs.advance(i, written);
                }
                Ok::<(), String>(())
            })
        };
        let mut got = 0u64;
        let mut attempt = 0;
        let outcome = loop {
            match self.part_attempt(&pkg, (from, to), &chunks, &mut got).await {
                Ok(true) => break Ok(()),
                Ok(false) => {}
                Err(Failure::Retry(e)) if RETRY.backoff(attempt + 1).is_some() => {
                    attempt += 1;
                    debug!(path = %pkg.path, from, to, got, "part interrupted ({e}); retry {attempt}/{}", RETRY.retries);
                    tokio::time::sleep(RETRY.backoff(attempt).unwrap_or_default()).await;
                }
                Err(Failure::Retry(e) | Failure::Fatal(e)) => break Err(e),
                Err(Failure::WriterGone) => break Err("writer stopped".into()),
            }
        };
        drop(chunks);
        // The writer's own error (a full disk) says more than the network side's "stopped".
        let written = match writer.await {
            Ok(r) => r,
            Err(e) => Err(format!("part writer failed: {e}")),
        };
        if let Err(reason) = written.and(outcome) {
            segs.fail(i, format!("bytes {from}-{}: {reason}", to - 1));
        }
        guard.reported();
    }

    /// One request for the rest of a part: `Ok(true)` once all of it went to the part's
    /// writer, `Ok(false)` after a shorter range than asked for (see `attempt`).
    pub(super) async fn part_attempt(
        &self,
        pkg: &Package,
        (from, to): (u64, u64),
        chunks: &mpsc::Sender<Bytes>,
        got: &mut u64,
    ) -> Result<bool, Failure> {
        let start = from + *got;
        let mut body = self
            .endpoint(pkg)
            .transport()
            .open(pkg.remote_path(), start, Some(to))
            .await
            .map_err(|e| Failure::from_open(e, pkg))?;
        let served_end = self.checked(pkg, &body, start)?;
        if !body.is_partial() {
            // Used (the body skips to the part), but it costs the bytes before it.
            self.endpoint(pkg)
                .stop_splitting(&pkg.path, "answered a range request with the whole file");
        } else if served_end != to {
            self.endpoint(pkg)
                .stop_splitting(&pkg.path, "answered a range request with another range");
        }
        let mut at = start;
        let pumped = self
            .pump(
                &mut body,
                &mut at,
                (to, served_end),
                pkg.size,
                chunks,
                |_, _| Ok(()),
            )
            .await;
        // What went to the writer counts, even if the answer then failed: resume after it.
        *got = at - from;
        pumped?;
        short_answer(start, at, to)
    }
}

/// The parts of a transfer, if it was split, and their fetchers: dropping it (the transfer is
/// over) stops them, and any writer still waiting is told so.
pub(super) struct Split {
    pub(super) parts: Arc<OnceLock<Arc<Segments>>>,
    pub(super) file: Arc<File>,
    pub(super) tasks: Vec<tokio::task::JoinHandle<()>>,
    /// The head was fast enough alone: this transfer stays one stream.
    pub(super) decided: bool,
}

impl Split {
    pub(super) fn cancel(&self) {
        if let Some(segs) = self.parts.get() {
            segs.cancel();
        }
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl Drop for Split {
    fn drop(&mut self) {
        self.cancel();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// Feeds `chunks` of `len` bytes, each waited for `wait`; the byte at which a window
    /// closed slow, if any.
    fn first_slow(len: u64, wait: Duration, chunks: u64) -> Option<u64> {
        let mut probe = RateProbe::new(SPLIT_BELOW);
        (1..=chunks)
            .map(|n| n * len)
            .find(|&at| probe.slow_after(at, wait))
    }

    #[test]
    fn the_split_decision_depends_on_time_spent_waiting_not_on_the_wall_clock() {
        let chunk = 64 << 10;
        // 64 KiB every 0.1 ms: 640 MB/s, never slow, however long the test takes.
        assert_eq!(first_slow(chunk, Duration::from_micros(100), 200), None);
        // 64 KiB every 10 ms: 6.5 MB/s, slow once the first full window after the first
        // chunk is in (the first chunk only starts the window).
        assert_eq!(
            first_slow(chunk, Duration::from_millis(10), 200),
            Some(chunk + PROBE)
        );
        // A stall inside one window of an otherwise fast stream: 16 chunks at 0.1 ms and one
        // at 20 ms make 1 MiB in 21.5 ms, under 64 MiB/s: slow.
        let mut probe = RateProbe::new(SPLIT_BELOW);
        assert!(!probe.slow_after(chunk, Duration::ZERO));
        let mut slow = false;
        for n in 2..=17 {
            let wait = if n == 9 {
                Duration::from_millis(20)
            } else {
                Duration::from_micros(100)
            };
            slow |= probe.slow_after(n * chunk, wait);
        }
        assert!(slow);
        // Just at the threshold is not slow.
        let at_threshold = Duration::from_secs_f64(chunk as f64 / SPLIT_BELOW);
        assert_eq!(first_slow(chunk, at_threshold.mul_f64(0.999), 100), None);
    }
}
