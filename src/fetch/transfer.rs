//! One whole transfer: from the first request to a verified file (or a failure), resuming
//! after transient failures from the bytes already on disk, with one retry policy
//! (`remote::RETRY`) and one failure classification (`Failure::from_transport`).

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::{mpsc, watch};
use tracing::{debug, info, warn};

use super::checks::{check_answer, clip, expect_end, short_answer};
use super::split::{RateProbe, Split};
use super::writer::write_and_verify;
use super::{Blob, Fetcher, State};
use crate::index::Package;
use crate::remote::{Body, ErrorKind, RETRY, TransportError, chain};

impl Fetcher {
    /// Checks an answer (see `checks::check_answer`) and counts the bytes a whole-file answer
    /// to a resumed request skips: they still crossed the network.
    pub(super) fn checked(&self, pkg: &Package, body: &Body, start: u64) -> Result<u64, Failure> {
        let served_end = check_answer(pkg.size, body, start)?;
        if !body.is_partial() {
            self.stats.bytes_fetched.fetch_add(start, Ordering::Relaxed);
        }
        Ok(served_end)
    }

    pub(super) async fn transfer(
        self: Arc<Self>,
        blob: Arc<Blob>,
        partial: PathBuf,
        file: Arc<File>,
        tx: watch::Sender<State>,
    ) {
        let in_flight = InFlight::new(&self.stats.in_flight);
        let started = Instant::now();
        let pkg = &blob.pkg;
        let adopted = blob.adopted.load(Ordering::Acquire);
        let prefix = blob
            .sparse
            .as_ref()
            .map(|s| (s.file().clone(), adopted))
            .filter(|(_, n)| *n > 0);
        let outcome = self.receive(pkg, file.clone(), &tx, prefix).await;
        // The network part is over: a transfer starting now runs alone (see `plan`).
        drop(in_flight);
        let secs = started.elapsed().as_secs_f64();
        match outcome {
            Ok(()) => {
                // Readers may have the final byte now; keeping the file is a separate matter.
                tx.send_replace(State::Complete);
                let mbps = pkg.size as f64 / 1e6 / secs.max(1e-6);
                info!(path = %pkg.path, bytes = pkg.size, secs = format!("{secs:.2}"), mbps = format!("{mbps:.1}"), "downloaded");
                let store = self.store.clone();
                let key = blob.key.clone();
                let committed = tokio::task::spawn_blocking(move || {
                    let r = store.commit(&key, &partial, &file);
                    if r.is_err() {
                        let _ = std::fs::remove_file(&partial);
                    }
                    r
                })
                .await;
                if let Ok(Err(e)) = committed {
                    warn!(path = %pkg.path, error = %e, "verified download could not be kept in the cache");
                }
            }
            Err(reason) => {
                self.stats.failures.fetch_add(1, Ordering::Relaxed);
                warn!(path = %pkg.path, secs = format!("{secs:.2}"), "download failed: {reason}");
                tx.send_replace(State::Failed(reason.into()));
                // Disk I/O: on the blocking pool, not a runtime worker.
                let _ = tokio::task::spawn_blocking(move || std::fs::remove_file(&partial)).await;
            }
        }
    }

    /// Receives the body into `file`, publishing progress; `Ok` only for a verified file.
    /// Network reads run here; writing and hashing run on a blocking thread, so a 2-core
    /// machine receives and hashes in parallel.
    ///
    /// A transfer that fails for a reason a retry can fix (network error, stall, truncation,
    /// 5xx, 404 while the binhost publishes) is resumed from the bytes already on disk, after a
    /// backoff, at most `RETRIES` times. Resuming (never restarting) matters: readers may
    /// already hold the first bytes, and the digest check must cover exactly the bytes they got.
    ///
    /// `prefix` is a sparse file whose first bytes readers already hold: they are fed to the
    /// writer first (hashed and checked like the rest), and the network resumes after them.
    ///
    /// A large file from a server that does ranges is split (see `segment`): this stream
    /// fetches the head, part fetchers the rest, and the writer hashes the parts in order.
    pub(super) async fn receive(
        self: &Arc<Self>,
        pkg: &Package,
        file: Arc<File>,
        tx: &watch::Sender<State>,
        prefix: Option<(Arc<File>, u64)>,
    ) -> Result<(), String> {
        let (chunks, rx) = mpsc::channel::<Bytes>(16);
        let parts = Arc::new(OnceLock::new());
        let mut split = Split {
            parts: parts.clone(),
            file: file.clone(),
            tasks: Vec::new(),
            decided: false,
        };
        let writer = {
            let (size, digests, tx, store) = (
                pkg.size,
                pkg.digests.for_mode(self.verify),
                tx.clone(),
                self.store.clone(),
            );
            tokio::task::spawn_blocking(move || {
                write_and_verify(rx, &file, size, &digests, &tx, &store, &parts)
            })
        };
        let mut have = 0u64;
        if let Some((sparse, len)) = prefix {
            while have < len {
                // Disk I/O: on the blocking pool, not a runtime worker.
                let (file, at, n) = (sparse.clone(), have, (len - have).min(1 << 20) as usize);
                let buf = tokio::task::spawn_blocking(move || {
                    let mut buf = vec![0u8; n];
                    file.read_exact_at(&mut buf, at).map(|()| buf)
                })
                .await
                .map_err(|e| format!("reading sparse cache file: {e}"))?
                .map_err(|e| format!("reading sparse cache file: {e}"))?;
                have += buf.len() as u64;
                if chunks.send(buf.into()).await.is_err() {
                    break;
                }
            }
        }
        let mut attempt = 0;
        let failure = loop {
            match self
                .attempt(pkg, &chunks, &mut have, attempt > 0, &mut split)
                .await
            {
                Ok(true) | Err(Failure::WriterGone) => break None,
                // A server that caps its ranges: ask for the rest, no backoff.
                Ok(false) => {}
                Err(Failure::Fatal(e)) => break Some(e),
                Err(Failure::Retry(e)) => {
                    attempt += 1;
                    let Some(backoff) = RETRY.backoff(attempt) else {
                        break Some(e);
                    };
                    warn!(path = %pkg.path, have, "transfer interrupted ({e}); retry {attempt}/{} in {backoff:?}", RETRY.retries);
                    tokio::time::sleep(backoff).await;
                }
            }
        };
        drop(chunks);
        if failure.is_some() {
            // The writer must not wait for parts of a transfer that has already failed.
            split.cancel();
        }
        let written = writer
            .await
            .map_err(|e| format!("writer task failed: {e}"))?;
        // Without a network-side failure, the writer's verdict (too many bytes, disk full,
        // digests) is the answer.
        match failure {
            Some(f) => Err(f),
            None => written,
        }
    }

    /// One request, from byte `have` on: `Ok(true)` when the whole file is sent (or the whole
    /// head, once the transfer is split); `Ok(false)` when the server sent a shorter range
    /// than asked for, completely: progress, and the caller asks for the rest.
    pub(super) async fn attempt(
        self: &Arc<Self>,
        pkg: &Package,
        chunks: &mpsc::Sender<Bytes>,
        have: &mut u64,
        retrying: bool,
        split: &mut Split,
    ) -> Result<bool, Failure> {
        // The breaker only stops new transfers: one already under way (or resuming) keeps its
        // bytes and its retries, since a binhost restart is exactly when connects fail.
        let fresh = *have == 0 && !retrying;
        let admission = match fresh {
            true => Some(self.endpoint(pkg).admit().await.map_err(Failure::Fatal)?),
            false => None,
        };
        // Split on the first answer: ask for the head only; a 206 for exactly that range says
        // the server does ranges, and the parts are started if this one stream turns out slow.
        let plan = match split.parts.get() {
            Some(_) => None,
            None if split.decided => None,
            None => self.plan(pkg, *have),
        };
        let head_end = split
            .parts
            .get()
            .map(|p| p.start())
            .or(plan.as_ref().map(|(end, _)| *end));
        let opened = self
            .endpoint(pkg)
            .transport()
            .open(pkg.remote_path(), *have, head_end)
            .await;
        let mut body = match opened {
            Ok(body) => body,
            Err(e) if e.is_offline() => {
                return Err(match admission {
                    Some(a) => Failure::Fatal(self.endpoint(pkg).went_offline(&a, &e)),
                    None => Failure::Retry(e.message),
                });
            }
            Err(e) => {
                self.endpoint(pkg).answered();
                if e.kind == ErrorKind::NotFound {
                    self.endpoint(pkg).not_found(pkg.remote_path());
                }
                return Err(Failure::from_open(e, pkg));
            }
        };
        self.endpoint(pkg).answered();
        // Answered: a probe's waiters may go on while this body streams.
        drop(admission);
        let served_end = self.checked(pkg, &body, *have)?;
        let mut pending = None;
        let limit = match (head_end, plan) {
            (Some(end), Some((_, segs))) if body.range_end() == Some(end) => {
                pending = Some(segs);
                end
            }
            (Some(end), None) => end,
            (Some(_), Some(_)) => {
                if body.is_partial() {
                    self.endpoint(pkg)
                        .stop_splitting(&pkg.path, "answered a range request with another range");
                }
                // One stream: a whole-file answer, or a range that ends elsewhere (the rest
                // comes by resuming).
                pkg.size
            }
            (None, _) => pkg.size,
        };
        let start = *have;
        // While the plan is pending, the first `RateProbe` window slower than `SPLIT_BELOW`
        // starts the parts.
        let mut probe = RateProbe::new(self.split_below);
        let progress = |at: u64, waited: Duration| {
            // A part that gave up means the file cannot be completed: say so now, not after
            // the head is in.
            if let Some(reason) = split.parts.get().and_then(|p| p.failure()) {
                return Err(Failure::Fatal(reason));
            }
            if pending.is_none() {
                return Ok(());
            }
            if probe.slow_after(at, waited)
                && let Some(segs) = pending.take()
            {
                debug!(path = %pkg.path, "one stream is slow: split");
                self.start_parts(pkg, segs, split);
            }
            Ok(())
        };
        self.pump(
            &mut body,
            have,
            (limit, served_end),
            pkg.size,
            chunks,
            progress,
        )
        .await?;
        if pending.is_some() {
            // Fast all along: this transfer stays one stream, and the rest comes next.
            split.decided = true;
        }
        let done = short_answer(start, *have, limit)?;
        Ok(done && (split.parts.get().is_some() || *have == pkg.size))
    }

    /// Moves a body's bytes from `*at` up to `limit` (or where the server said it would stop,
    /// if sooner) into `chunks`, cutting or refusing what runs past (see `clip`); a body that
    /// ends where it said must end there (see `expect_end`). `progress` hears of every chunk
    /// (the new position, and how long the chunk was waited for) and may stop the transfer.
    pub(super) async fn pump(
        &self,
        body: &mut Body,
        at: &mut u64,
        (limit, served_end): (u64, u64),
        size: u64,
        chunks: &mpsc::Sender<Bytes>,
        mut progress: impl FnMut(u64, Duration) -> Result<(), Failure>,
    ) -> Result<(), Failure> {
        while *at < limit.min(served_end) {
            let asked = Instant::now();
            let next = body.chunk().await;
            let waited = asked.elapsed();
            match next {
                Ok(Some(mut chunk)) => {
                    clip(&mut chunk, *at, limit, served_end, size)?;
                    let len = chunk.len() as u64;
                    self.stats.bytes_fetched.fetch_add(len, Ordering::Relaxed);
                    if chunks.send(chunk).await.is_err() {
                        return Err(Failure::WriterGone);
                    }
                    *at += len;
                    progress(*at, waited)?;
                }
                Ok(None) => {
                    return Err(Failure::Retry(format!(
                        "truncated at {} of {} bytes",
                        *at,
                        limit.min(served_end)
                    )));
                }
                Err(e) => return Err(Failure::Retry(chain(&e))),
            }
        }
        if served_end <= limit {
            expect_end(body, served_end, size).await?;
        }
        Ok(())
    }
}

/// Counts a transfer in `status` for exactly as long as it runs, even if it panics.
struct InFlight<'a>(&'a AtomicU64);

impl<'a> InFlight<'a> {
    fn new(counter: &'a AtomicU64) -> Self {
        counter.fetch_add(1, Ordering::Relaxed);
        InFlight(counter)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

pub(super) enum Failure {
    /// The binhost may do better next time.
    Retry(String),
    /// The binhost is wrong about this file: retrying cannot help.
    Fatal(String),
    /// The writer refused more bytes; its own error says why.
    WriterGone,
}

impl Failure {
    /// Like `from_transport`, for a package request: says what the index expected.
    pub(super) fn from_open(e: TransportError, pkg: &Package) -> Failure {
        match Failure::from_transport(e) {
            Failure::Fatal(m) if m.contains("shorter than the range") => Failure::Fatal(format!(
                "{m}: the server's file is shorter than the index SIZE ({} bytes)",
                pkg.size
            )),
            f => f,
        }
    }

    /// What a failed request means for the transfer. A file the server says is not there is
    /// an answer, not a transient fault: the reader gets `EIO` at once, and the caller tells
    /// the endpoint, which hides the file like an absent file of a local PKGDIR (issue 11.5:
    /// retrying a 404 cost 9 requests and 7 s per file, and made emerge's scan fail).
    pub(super) fn from_transport(e: TransportError) -> Failure {
        match e.kind {
            ErrorKind::Retryable | ErrorKind::Offline => Failure::Retry(e.message),
            ErrorKind::Fatal | ErrorKind::NotFound => Failure::Fatal(e.message),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_are_classified_by_the_transport_kind() {
        let f = |kind| Failure::from_transport(TransportError::new(kind, "x"));
        assert!(matches!(f(ErrorKind::Retryable), Failure::Retry(_)));
        assert!(matches!(f(ErrorKind::Offline), Failure::Retry(_)));
        assert!(matches!(f(ErrorKind::Fatal), Failure::Fatal(_)));
    }
}
