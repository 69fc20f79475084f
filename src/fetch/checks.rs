//! What an answer may be, checked before any of its bytes is kept: pure functions of what the
//! index says (SIZE) and what the server promised (`Body`), unit-tested on their own.

use bytes::Bytes;

use super::transfer::Failure;
use crate::remote::Body;

/// Checks an answer's stated lengths against the index before any byte is kept, and
/// returns where its body will end (exclusive).
pub(super) fn check_answer(size: u64, body: &Body, start: u64) -> Result<u64, Failure> {
    if let Some(total) = body.total_len()
        && total != size
    {
        return Err(Failure::Fatal(format!(
            "server says the file has {total} bytes, index SIZE is {}",
            size
        )));
    }
    let served_end = body.range_end().unwrap_or(size);
    if served_end > size {
        return Err(Failure::Fatal(format!(
            "server sends bytes up to {} of a file whose index SIZE is {}",
            served_end - 1,
            size
        )));
    }
    if let Some(n) = body.announced_len()
        && n != served_end.saturating_sub(start)
    {
        return Err(Failure::Fatal(if body.is_partial() {
            format!(
                "server announces {n} bytes for the range {start}-{}",
                served_end - 1
            )
        } else {
            format!(
                "server announces {} bytes, index SIZE is {}",
                n.saturating_add(start),
                size
            )
        }));
    }
    Ok(served_end)
}

/// After an answer that ended where the server said it would: done if it reached `limit`;
/// else progress (a server that caps its ranges), and the caller asks for the rest at once.
/// An answer of less than 64 KiB that stops short is counted as a failed attempt instead, so a
/// server that answers with tiny ranges fails after the usual retries rather than being
/// asked size/cap times in a row.
pub(super) fn short_answer(start: u64, at: u64, limit: u64) -> Result<bool, Failure> {
    const MIN_ANSWER: u64 = 64 * 1024;
    if at == limit {
        Ok(true)
    } else if at - start < MIN_ANSWER {
        Err(Failure::Retry(format!(
            "server answered with only {} bytes of the range {start}-{}",
            at - start,
            limit - 1
        )))
    } else {
        Ok(false)
    }
}

/// A chunk at `at` that would take a body past `limit`, where we stop reading: cut it there
/// if the server said it would send more (a whole file, or a wider range). A chunk past where
/// the server said it would stop (`served_end`) is the server sending more than it said.
pub(super) fn clip(
    chunk: &mut Bytes,
    at: u64,
    limit: u64,
    served_end: u64,
    size: u64,
) -> Result<(), Failure> {
    if at + chunk.len() as u64 <= limit.min(served_end) {
        return Ok(());
    }
    if served_end > limit {
        chunk.truncate((limit - at) as usize);
        return Ok(());
    }
    Err(overshoot(served_end, size))
}

/// After the last byte of a body that should end at `served_end`: anything more is the server
/// sending more than it said (caught even without a Content-Length). An error at this point
/// is not: every byte wanted is in, and the digests decide.
pub(super) async fn expect_end(body: &mut Body, served_end: u64, size: u64) -> Result<(), Failure> {
    match body.chunk().await {
        Ok(Some(extra)) if !extra.is_empty() => Err(overshoot(served_end, size)),
        _ => Ok(()),
    }
}

fn overshoot(served_end: u64, size: u64) -> Failure {
    Failure::Fatal(if served_end == size {
        format!("server sent more than SIZE ({size} bytes)")
    } else {
        format!(
            "server sent more than the range ending at {}",
            served_end - 1
        )
    })
}
