//! `Packages.gz` first, then `Packages`, as Portage's remote client asks for them
//! (`portage/dbapi/bintree.py`). A 50,000-entry index is ~27 MB plain and a few MB
//! compressed; a fleet re-checking it every TTL feels the difference.
//!
//! Conditional requests go to whichever file answered last (the validators say which). A
//! `Packages.gz` that is missing, refused or does not decompress falls back to `Packages`;
//! an offline binhost does not (the plain file would fail the same way). The decompressed
//! size is bounded like a plain index: a gzip bomb is a hostile index.

use std::future::Future;
use std::io::Read;

use bytes::Bytes;

use super::{ErrorKind, IndexFetch, TransportError, Validators};
use crate::index::MAX_INDEX_BYTES;

pub const COMPRESSED: &str = "Packages.gz";
pub const PLAIN: &str = "Packages";

/// Fetches the index through `fetch(name, validators)`, compressed first.
pub async fn gz_then_plain<F, Fut>(
    since: Option<&Validators>,
    fetch: F,
) -> Result<IndexFetch, TransportError>
where
    F: Fn(&'static str, Option<Validators>) -> Fut,
    Fut: Future<Output = Result<IndexFetch, TransportError>>,
{
    let gz_since = since.filter(|v| v.compressed).cloned();
    let gz = match fetch(COMPRESSED, gz_since).await {
        Ok(IndexFetch::Fresh {
            raw,
            mut validators,
        }) => match tokio::task::spawn_blocking(move || gunzip(&raw)).await {
            Ok(Ok(raw)) => {
                validators.compressed = true;
                return Ok(IndexFetch::Fresh { raw, validators });
            }
            Ok(Err(e)) => e,
            Err(join) => TransportError::fatal(format!("{COMPRESSED}: {join}")),
        },
        Ok(IndexFetch::NotModified) => return Ok(IndexFetch::NotModified),
        Err(e) if e.kind == ErrorKind::Offline => return Err(e),
        Err(e) => e,
    };
    let plain_since = since.filter(|v| !v.compressed).cloned();
    match fetch(PLAIN, plain_since).await {
        Ok(found) => {
            if gz.kind != ErrorKind::NotFound {
                tracing::debug!("{COMPRESSED} unusable ({gz}); using {PLAIN}");
            }
            Ok(found)
        }
        // Neither: the compressed file's failure says more unless it was simply absent.
        Err(e) if e.kind == ErrorKind::NotFound && gz.kind != ErrorKind::NotFound => Err(gz),
        Err(e) => Err(e),
    }
}

/// Decompresses a gzip index, refusing one that would exceed `MAX_INDEX_BYTES`.
pub fn gunzip(raw: &[u8]) -> Result<Bytes, TransportError> {
    let mut out = Vec::new();
    flate2::read::MultiGzDecoder::new(raw)
        .take(MAX_INDEX_BYTES as u64 + 1)
        .read_to_end(&mut out)
        .map_err(|e| TransportError::fatal(format!("{COMPRESSED} does not decompress: {e}")))?;
    if out.len() > MAX_INDEX_BYTES {
        return Err(TransportError::fatal(format!(
            "{COMPRESSED} decompresses to more than {MAX_INDEX_BYTES} bytes"
        )));
    }
    Ok(out.into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::sync::Mutex;

    fn gz(data: &[u8]) -> Bytes {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        e.write_all(data).unwrap();
        e.finish().unwrap().into()
    }

    fn fresh(raw: Bytes, etag: &str) -> Result<IndexFetch, TransportError> {
        Ok(IndexFetch::Fresh {
            raw,
            validators: Validators {
                etag: Some(etag.into()),
                ..Validators::default()
            },
        })
    }

    /// Runs `gz_then_plain` against a scripted server; returns the result and what was asked.
    fn run(
        since: Option<Validators>,
        answer: impl Fn(&str, &Option<Validators>) -> Result<IndexFetch, TransportError>,
    ) -> (Result<IndexFetch, TransportError>, Vec<(String, bool)>) {
        let asked = Mutex::new(Vec::new());
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let r = rt.block_on(gz_then_plain(since.as_ref(), |name, v| {
            asked.lock().unwrap().push((name.to_string(), v.is_some()));
            let r = answer(name, &v);
            async move { r }
        }));
        (r, asked.into_inner().unwrap())
    }

    fn not_found() -> Result<IndexFetch, TransportError> {
        Err(TransportError::new(ErrorKind::NotFound, "404"))
    }

    #[test]
    fn the_compressed_index_is_asked_first_and_served_plain() {
        let (r, asked) = run(None, |_, _| fresh(gz(b"TIMESTAMP: 1\n"), "g"));
        let Ok(IndexFetch::Fresh { raw, validators }) = r else {
            panic!()
        };
        assert_eq!(&raw[..], b"TIMESTAMP: 1\n");
        assert!(validators.compressed);
        assert_eq!(asked, [("Packages.gz".to_string(), false)]);
    }

    #[test]
    fn a_missing_or_broken_gz_falls_back_to_packages() {
        let (r, asked) = run(None, |n, _| match n {
            COMPRESSED => not_found(),
            _ => fresh(Bytes::from_static(b"TIMESTAMP: 2\n"), "p"),
        });
        let Ok(IndexFetch::Fresh { raw, validators }) = r else {
            panic!()
        };
        assert_eq!(&raw[..], b"TIMESTAMP: 2\n");
        assert!(!validators.compressed);
        assert_eq!(asked.len(), 2);
        let (r, _) = run(None, |n, _| match n {
            COMPRESSED => fresh(Bytes::from_static(b"not gzip"), "g"),
            _ => fresh(Bytes::from_static(b"TIMESTAMP: 3\n"), "p"),
        });
        assert!(matches!(r, Ok(IndexFetch::Fresh { raw, .. }) if &raw[..] == b"TIMESTAMP: 3\n"));
    }

    #[test]
    fn validators_go_to_the_file_that_answered() {
        let plain = Validators {
            etag: Some("p".into()),
            ..Validators::default()
        };
        let (_, asked) = run(Some(plain), |n, _| match n {
            COMPRESSED => not_found(),
            _ => Ok(IndexFetch::NotModified),
        });
        assert_eq!(
            asked,
            [
                ("Packages.gz".to_string(), false),
                ("Packages".to_string(), true)
            ]
        );
        let gzv = Validators {
            etag: Some("g".into()),
            compressed: true,
            ..Validators::default()
        };
        let (r, asked) = run(Some(gzv), |_, _| Ok(IndexFetch::NotModified));
        assert!(matches!(r, Ok(IndexFetch::NotModified)));
        assert_eq!(asked, [("Packages.gz".to_string(), true)]);
    }

    #[test]
    fn offline_does_not_fall_back_and_a_gzip_bomb_is_refused() {
        let (r, asked) = run(None, |_, _| {
            Err(TransportError::new(ErrorKind::Offline, "refused"))
        });
        assert_eq!(r.err().unwrap().kind, ErrorKind::Offline);
        assert_eq!(asked.len(), 1);
        // 600 MiB of zeros compress to about 600 KiB.
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        let zeros = vec![0u8; 1 << 20];
        for _ in 0..600 {
            e.write_all(&zeros).unwrap();
        }
        let bomb = e.finish().unwrap();
        let err = gunzip(&bomb).unwrap_err();
        assert!(err.message.contains("more than"), "{err}");
    }
}
