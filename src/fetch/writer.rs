//! The blocking half of a transfer: writes chunks into the partial file, hashes them, and
//! publishes progress to readers only after hashing; at the end checks SIZE and every digest.
//! Writes make room in the cache when its disk is full.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use tokio::sync::{mpsc, watch};

use super::State;
use super::segment::Segments;
use crate::cache::Store;
use crate::verify::{Digests, Verifier};

/// The blocking half of a transfer: appends chunks, hashes them, publishes progress, and at
/// the end checks SIZE and every digest. Runs across all attempts of one transfer.
pub(super) fn write_and_verify(
    mut rx: mpsc::Receiver<Bytes>,
    file: &File,
    size: u64,
    digests: &Digests,
    tx: &watch::Sender<State>,
    store: &Store,
    parts: &OnceLock<Arc<Segments>>,
) -> Result<(), String> {
    let mut verifier = Verifier::new(digests);
    let mut have = 0u64;
    while let Some(chunk) = rx.blocking_recv() {
        let len = chunk.len() as u64;
        if have.checked_add(len).is_none_or(|end| end > size) {
            return Err(format!("server sent more than SIZE ({size} bytes)"));
        }
        write_making_room(file, &chunk, have, store)?;
        verifier.update(&chunk);
        have += len;
        tx.send_replace(State::Receiving(have));
    }
    if let Some(segs) = parts.get()
        && have == segs.start()
    {
        follow_parts(segs, file, &mut verifier, &mut have, tx)?;
    }
    if have != size {
        return Err(format!("truncated: got {have} of {size} bytes"));
    }
    verifier.finish(digests)
}

/// After the head: hashes each part in file order as its fetcher fills it, reading it back
/// from the page cache, and only then publishes its bytes to readers.
fn follow_parts(
    segs: &Segments,
    file: &File,
    verifier: &mut Verifier,
    have: &mut u64,
    tx: &watch::Sender<State>,
) -> Result<(), String> {
    const PIECE: u64 = 1 << 20;
    for (i, &(from, to)) in segs.spans().iter().enumerate() {
        let mut done = 0;
        while done < to - from {
            let filled = segs.wait_beyond(i, done)?;
            while done < filled {
                let mut buf = vec![0u8; (filled - done).min(PIECE) as usize];
                file.read_exact_at(&mut buf, from + done)
                    .map_err(|e| format!("reading back cache file: {e}"))?;
                done += buf.len() as u64;
                verifier.update(&Bytes::from(buf));
                *have = from + done;
                tx.send_replace(State::Receiving(*have));
            }
        }
    }
    Ok(())
}

/// Writes at `offset`; when the cache's disk is full, evicts unpinned entries one by one and
/// tries again, and only gives up when nothing is left to evict.
pub(crate) fn write_making_room(
    file: &File,
    data: &[u8],
    offset: u64,
    store: &Store,
) -> Result<(), String> {
    loop {
        match file.write_all_at(data, offset) {
            Ok(()) => return Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => {
                if !store.evict_one() {
                    return Err("cache disk full and nothing left to evict".into());
                }
            }
            Err(e) => return Err(format!("writing cache file: {e}")),
        }
    }
}
