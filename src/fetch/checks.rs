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
                n + start,
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::remote::Chunks;

    struct NoChunks;

    #[async_trait::async_trait]
    impl Chunks for NoChunks {
        async fn next(&mut self) -> Result<Option<Bytes>, crate::remote::TransportError> {
            Ok(None)
        }
    }

    fn whole(skip: u64, announced: Option<u64>) -> Body {
        Body::whole(Box::new(NoChunks), skip, announced)
    }

    fn range(end: u64, total: Option<u64>, announced: Option<u64>) -> Body {
        Body::range(Box::new(NoChunks), end, total, announced)
    }

    fn verdict(r: Result<u64, Failure>) -> Result<u64, String> {
        r.map_err(|f| match f {
            Failure::Fatal(m) => format!("fatal: {m}"),
            Failure::Retry(m) => format!("retry: {m}"),
            Failure::WriterGone => "writer gone".into(),
        })
    }

    #[test]
    fn answers_are_checked_against_size_before_any_byte_is_kept() {
        const SIZE: u64 = 1000;
        // (what the server promised, from byte, expected end or the start of the refusal)
        let cases: Vec<(Body, u64, Result<u64, &str>)> = vec![
            (whole(0, Some(1000)), 0, Ok(1000)),
            (whole(0, None), 0, Ok(1000)),
            (whole(300, Some(1000)), 300, Ok(1000)),
            (
                whole(0, Some(999)),
                0,
                Err("fatal: server announces 999 bytes"),
            ),
            (
                whole(0, Some(1001)),
                0,
                Err("fatal: server announces 1001 bytes"),
            ),
            (range(1000, Some(1000), Some(700)), 300, Ok(1000)),
            (range(500, Some(1000), Some(200)), 300, Ok(500)),
            (range(500, None, None), 300, Ok(500)),
            (
                range(500, Some(999), Some(200)),
                300,
                Err("fatal: server says the file has 999"),
            ),
            (
                range(1001, None, None),
                300,
                Err("fatal: server sends bytes up to 1000"),
            ),
            (
                range(500, Some(1000), Some(300)),
                300,
                Err("fatal: server announces 300 bytes for the range 300-499"),
            ),
        ];
        for (i, (body, from, want)) in cases.into_iter().enumerate() {
            let got = verdict(check_answer(SIZE, &body, from));
            match want {
                Ok(end) => assert_eq!(got, Ok(end), "case {i}"),
                Err(prefix) => assert!(
                    got.as_ref().is_err_and(|m| m.starts_with(prefix)),
                    "case {i}: {got:?}"
                ),
            }
        }
    }

    #[test]
    fn short_answers_are_progress_unless_tiny() {
        assert!(matches!(short_answer(0, 100, 100), Ok(true)));
        assert!(matches!(short_answer(0, 2 << 20, 4 << 20), Ok(false)));
        assert!(matches!(
            short_answer(1 << 20, (1 << 20) + 4096, 4 << 20),
            Err(Failure::Retry(_))
        ));
    }

    #[test]
    fn chunks_past_the_limit_are_cut_or_refused() {
        // A whole file asked for up to 100 (a part): the chunk is cut at the limit.
        let mut c = Bytes::from(vec![0u8; 50]);
        assert!(clip(&mut c, 80, 100, 1000, 1000).is_ok());
        assert_eq!(c.len(), 20);
        // More than the server said it would send: refused.
        let mut c = Bytes::from(vec![0u8; 50]);
        assert!(matches!(
            clip(&mut c, 980, 1000, 1000, 1000),
            Err(Failure::Fatal(m)) if m.contains("more than SIZE")
        ));
        let mut c = Bytes::from(vec![0u8; 50]);
        assert!(matches!(
            clip(&mut c, 480, 500, 500, 1000),
            Err(Failure::Fatal(m)) if m.contains("more than the range ending at 499")
        ));
    }
}
