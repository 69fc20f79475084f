//! Transports: how bytes come from a binhost.
//!
//! `Remote` is the one seam between the filesystem and the network: it fetches the index (with
//! conditional-request validators) and opens a package as a stream of chunks. HTTP(S) goes
//! through reqwest with certificate checks on and the system's CA store; `file://` reads a
//! binhost directory on local or NFS storage. SSH would be a third variant.
//!
//! A transport never decides whether bytes are *right*; it reports what the server said. The
//! fetcher checks sizes and digests. It does bound what it can: connect and stall timeouts,
//! a redirect limit, and an index size limit.

use std::path::PathBuf;
use std::time::Duration;

use bytes::Bytes;
use reqwest::{StatusCode, Url, header};
use tokio::io::AsyncReadExt;

use crate::index::{MAX_INDEX_BYTES, Validators};

#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
    #[error("unsupported URL {0:?}: use http://, https:// or file:///path")]
    BadUrl(String),
    #[error("{url}: server answered {status}")]
    Status { url: String, status: StatusCode },
    #[error("{url}: {source}")]
    Http {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{url}: asked to resume, got Content-Range {range:?}")]
    BadRange { url: String, range: String },
    #[error("{0}: index larger than {MAX_INDEX_BYTES} bytes")]
    IndexTooLarge(String),
}

impl RemoteError {
    /// The binhost could not be reached at all (refused, unroutable, connect timeout, DNS).
    pub fn is_connect(&self) -> bool {
        match self {
            RemoteError::Http { source, .. } => source.is_connect(),
            _ => false,
        }
    }
}

#[derive(Debug)]
pub enum IndexFetch {
    NotModified,
    Fresh { raw: Bytes, validators: Validators },
}

/// Settings for transports, from the validated config.
#[derive(Debug, Clone)]
pub struct RemoteOptions {
    pub connect_timeout: Duration,
    /// A transfer that delivers nothing for this long is cut.
    pub stall_timeout: Duration,
}

#[derive(Debug, Clone)]
pub enum Remote {
    Http {
        base: Url,
        client: reqwest::Client,
    },
    File {
        base: PathBuf,
        /// A read that takes longer (a hung NFS server) fails instead of blocking a reader.
        stall: Duration,
    },
}

impl Remote {
    pub fn new(url: &str, opts: &RemoteOptions) -> Result<Remote, RemoteError> {
        let bad = || RemoteError::BadUrl(url.to_string());
        let parsed = Url::parse(url).map_err(|_| bad())?;
        match parsed.scheme() {
            "http" | "https" if parsed.host_str().is_some() => {
                let client = reqwest::Client::builder()
                    .user_agent(concat!("binpkgfs/", env!("CARGO_PKG_VERSION")))
                    .connect_timeout(opts.connect_timeout)
                    .read_timeout(opts.stall_timeout)
                    .redirect(reqwest::redirect::Policy::limited(8))
                    .build()
                    .map_err(|source| RemoteError::Http {
                        url: url.to_string(),
                        source,
                    })?;
                let mut base = parsed;
                if !base.path().ends_with('/') {
                    base.set_path(&format!("{}/", base.path()));
                }
                Ok(Remote::Http { base, client })
            }
            "file" if parsed.host_str().unwrap_or("").is_empty() => {
                let base = parsed.to_file_path().map_err(|_| bad())?;
                Ok(Remote::File {
                    base,
                    stall: opts.stall_timeout,
                })
            }
            _ => Err(bad()),
        }
    }

    fn http_url(base: &Url, path: &str) -> Url {
        let mut url = base.clone();
        {
            // path_segments_mut percent-encodes each component (`+`, `#`, `?` are legal in PATH).
            let mut segs = url.path_segments_mut().expect("http URLs have a path");
            segs.pop_if_empty();
            segs.extend(path.split('/'));
        }
        url
    }

    /// Fetches `Packages`, or reports that it has not changed since `since`.
    pub async fn fetch_index(&self, since: Option<&Validators>) -> Result<IndexFetch, RemoteError> {
        match self {
            Remote::Http { base, client } => {
                let url = Self::http_url(base, "Packages");
                let mut req = client.get(url.clone());
                if let Some(v) = since {
                    if let Some(etag) = &v.etag {
                        req = req.header(header::IF_NONE_MATCH, etag);
                    }
                    if let Some(lm) = &v.last_modified {
                        req = req.header(header::IF_MODIFIED_SINCE, lm);
                    }
                }
                let http_err = |source| RemoteError::Http {
                    url: url.to_string(),
                    source,
                };
                let mut resp = req.send().await.map_err(http_err)?;
                if resp.status() == StatusCode::NOT_MODIFIED && since.is_some() {
                    return Ok(IndexFetch::NotModified);
                }
                if resp.status() != StatusCode::OK {
                    return Err(RemoteError::Status {
                        url: url.to_string(),
                        status: resp.status(),
                    });
                }
                let header_str = |name| {
                    resp.headers()
                        .get(name)
                        .and_then(|v: &header::HeaderValue| v.to_str().ok())
                        .map(str::to_string)
                };
                let validators = Validators {
                    etag: header_str(header::ETAG),
                    last_modified: header_str(header::LAST_MODIFIED),
                };
                let mut raw = Vec::new();
                while let Some(chunk) = resp.chunk().await.map_err(http_err)? {
                    if raw.len() + chunk.len() > MAX_INDEX_BYTES {
                        return Err(RemoteError::IndexTooLarge(url.to_string()));
                    }
                    raw.extend_from_slice(&chunk);
                }
                Ok(IndexFetch::Fresh {
                    raw: raw.into(),
                    validators,
                })
            }
            Remote::File { base, .. } => {
                let path = base.join("Packages");
                let io_err = |source| RemoteError::Io {
                    path: path.display().to_string(),
                    source,
                };
                let meta = tokio::fs::metadata(&path).await.map_err(io_err)?;
                if meta.len() > MAX_INDEX_BYTES as u64 {
                    return Err(RemoteError::IndexTooLarge(path.display().to_string()));
                }
                let stamp = {
                    use std::os::unix::fs::MetadataExt;
                    format!("{}.{}:{}", meta.mtime(), meta.mtime_nsec(), meta.len())
                };
                if since.and_then(|v| v.etag.as_deref()) == Some(stamp.as_str()) {
                    return Ok(IndexFetch::NotModified);
                }
                let raw = tokio::fs::read(&path).await.map_err(io_err)?;
                Ok(IndexFetch::Fresh {
                    raw: raw.into(),
                    validators: Validators {
                        etag: Some(stamp),
                        last_modified: None,
                    },
                })
            }
        }
    }

    /// Starts reading one package file at byte `from` (a resumed transfer, or a part of a
    /// split one), asking for bytes up to `to` if given, else to the end. A server that
    /// ignores the Range request and sends the whole file (`!is_partial()`) is handled: the
    /// body skips `from` bytes, so the caller always receives bytes from `from` on, and stops
    /// reading where it wants to.
    pub async fn open(&self, path: &str, from: u64, to: Option<u64>) -> Result<Body, RemoteError> {
        match self {
            Remote::Http { base, client } => {
                let url = Self::http_url(base, path);
                let mut req = client.get(url.clone());
                let last = to.map(|t| t.saturating_sub(1).to_string());
                if from > 0 || last.is_some() {
                    let last = last.as_deref().unwrap_or("");
                    req = req.header(header::RANGE, format!("bytes={from}-{last}"));
                }
                let resp = req.send().await.map_err(|source| RemoteError::Http {
                    url: url.to_string(),
                    source,
                })?;
                let (skip, range) = match resp.status() {
                    StatusCode::OK => (from, None),
                    StatusCode::PARTIAL_CONTENT if from > 0 || to.is_some() => {
                        let header = resp
                            .headers()
                            .get(header::CONTENT_RANGE)
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or("");
                        // It must start where we asked; it may end elsewhere (a server that
                        // caps ranges): the caller decides what to do with that.
                        match parse_content_range(header) {
                            Some((start, end, total)) if start == from => (0, Some((end, total))),
                            _ => {
                                return Err(RemoteError::BadRange {
                                    url: url.to_string(),
                                    range: header.to_string(),
                                });
                            }
                        }
                    }
                    status => {
                        return Err(RemoteError::Status {
                            url: url.to_string(),
                            status,
                        });
                    }
                };
                Ok(Body {
                    name: url.to_string(),
                    skip,
                    range,
                    inner: BodyInner::Http(resp),
                })
            }
            Remote::File { base, stall } => {
                let full = base.join(path);
                let name = full.display().to_string();
                let io_err = |source| RemoteError::Io {
                    path: name.clone(),
                    source,
                };
                let mut file = tokio::fs::File::open(&full).await.map_err(io_err)?;
                if from > 0 {
                    use tokio::io::AsyncSeekExt;
                    file.seek(std::io::SeekFrom::Start(from))
                        .await
                        .map_err(io_err)?;
                }
                Ok(Body {
                    name,
                    skip: 0,
                    // Local storage gains nothing from parallel streams: never split.
                    range: None,
                    inner: BodyInner::File(file, *stall),
                })
            }
        }
    }
}

impl Remote {
    /// Reads `len` bytes at `from` with one ranged request. `Ok(None)` when the server does not
    /// do ranges (it answered 200 with the whole file): the caller then fetches the file whole.
    pub async fn read_range(
        &self,
        path: &str,
        from: u64,
        len: u64,
    ) -> Result<Option<Vec<u8>>, RemoteError> {
        match self {
            Remote::Http { base, client } => {
                let url = Self::http_url(base, path);
                let http_err = |source| RemoteError::Http {
                    url: url.to_string(),
                    source,
                };
                let last = from + len - 1;
                let mut resp = client
                    .get(url.clone())
                    .header(header::RANGE, format!("bytes={from}-{last}"))
                    .send()
                    .await
                    .map_err(http_err)?;
                match resp.status() {
                    StatusCode::PARTIAL_CONTENT => {}
                    StatusCode::OK => return Ok(None),
                    status => {
                        return Err(RemoteError::Status {
                            url: url.to_string(),
                            status,
                        });
                    }
                }
                let range = resp
                    .headers()
                    .get(header::CONTENT_RANGE)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("")
                    .to_string();
                if !matches!(parse_content_range(&range), Some((a, b, _)) if a == from && b == last + 1)
                {
                    return Err(RemoteError::BadRange {
                        url: url.to_string(),
                        range,
                    });
                }
                let mut out = Vec::with_capacity(len as usize);
                while let Some(chunk) = resp.chunk().await.map_err(http_err)? {
                    if out.len() + chunk.len() > len as usize {
                        return Err(RemoteError::BadRange {
                            url: url.to_string(),
                            range: format!("{range} (body longer than the range)"),
                        });
                    }
                    out.extend_from_slice(&chunk);
                }
                if out.len() as u64 != len {
                    return Err(RemoteError::BadRange {
                        url: url.to_string(),
                        range: format!("{range} (body of {} bytes)", out.len()),
                    });
                }
                Ok(Some(out))
            }
            Remote::File { base, stall } => {
                use std::os::unix::fs::FileExt;
                let full = base.join(path);
                let name = full.display().to_string();
                let read = tokio::task::spawn_blocking(move || {
                    let file = std::fs::File::open(&full)?;
                    let mut out = vec![0u8; len as usize];
                    file.read_exact_at(&mut out, from)?;
                    Ok(Some(out))
                });
                match tokio::time::timeout(*stall, read).await {
                    Ok(Ok(result)) => result,
                    Ok(Err(join)) => Err(std::io::Error::other(join)),
                    Err(_) => Err(std::io::ErrorKind::TimedOut.into()),
                }
                .map_err(|source| RemoteError::Io { path: name, source })
            }
        }
    }
}

/// A package body being received.
pub struct Body {
    name: String,
    /// Bytes still to drop from the front (a 200 answer to a Range request).
    skip: u64,
    /// For a 206 answer: where the range ends (exclusive) and the file's total length, if
    /// the server said.
    range: Option<(u64, Option<u64>)>,
    inner: BodyInner,
}

enum BodyInner {
    Http(reqwest::Response),
    File(tokio::fs::File, Duration),
}

const FILE_CHUNK: usize = 1 << 20;

impl Body {
    /// How many bytes the server announced it will send from the caller's start offset, if it
    /// said (checked before any byte is kept): the rest of the file, or for an honoured
    /// bounded range (`is_partial`), the range.
    pub fn announced_len(&self) -> Option<u64> {
        match &self.inner {
            BodyInner::Http(resp) => resp.content_length().map(|n| n.saturating_sub(self.skip)),
            BodyInner::File(..) => None,
        }
    }

    /// The server answered with a range (206), not the whole file.
    pub fn is_partial(&self) -> bool {
        self.range.is_some()
    }

    /// Where the body ends (exclusive) if the server sent a range.
    pub fn range_end(&self) -> Option<u64> {
        self.range.map(|(end, _)| end)
    }

    /// The whole file's length as a 206 answer states it (`bytes a-b/TOTAL`).
    pub fn total_len(&self) -> Option<u64> {
        self.range.and_then(|(_, total)| total)
    }

    /// The next chunk, or `None` at the end of the body.
    pub async fn chunk(&mut self) -> Result<Option<Bytes>, RemoteError> {
        loop {
            let Some(mut chunk) = self.raw_chunk().await? else {
                return Ok(None);
            };
            if self.skip >= chunk.len() as u64 {
                self.skip -= chunk.len() as u64;
                continue;
            }
            let rest = chunk.split_off(self.skip as usize);
            self.skip = 0;
            return Ok(Some(rest));
        }
    }

    async fn raw_chunk(&mut self) -> Result<Option<Bytes>, RemoteError> {
        match &mut self.inner {
            BodyInner::Http(resp) => resp.chunk().await.map_err(|source| RemoteError::Http {
                url: self.name.clone(),
                source,
            }),
            BodyInner::File(file, stall) => {
                let mut buf = Vec::with_capacity(FILE_CHUNK);
                let mut limited = (&mut *file).take(FILE_CHUNK as u64);
                let n = tokio::time::timeout(*stall, limited.read_to_end(&mut buf))
                    .await
                    .unwrap_or_else(|_| Err(std::io::ErrorKind::TimedOut.into()))
                    .map_err(|source| RemoteError::Io {
                        path: self.name.clone(),
                        source,
                    })?;
                Ok((n > 0).then(|| buf.into()))
            }
        }
    }
}

/// `bytes A-B/T` as `(A, B + 1, T)`; T is `None` for `*`.
fn parse_content_range(v: &str) -> Option<(u64, u64, Option<u64>)> {
    let (span, total) = v.trim().strip_prefix("bytes ")?.split_once('/')?;
    let (a, b) = span.split_once('-')?;
    let (a, b) = (a.trim().parse::<u64>().ok()?, b.trim().parse::<u64>().ok()?);
    let total = match total.trim() {
        "*" => None,
        t => Some(t.parse::<u64>().ok()?),
    };
    (a <= b && total.is_none_or(|t| b < t)).then_some((a, b + 1, total))
}

/// Formats an error with its whole `source()` chain on one line, for warnings.
pub fn chain(err: &dyn std::error::Error) -> String {
    let mut out = err.to_string();
    let mut cur = err.source();
    while let Some(e) = cur {
        let s = e.to_string();
        if !out.contains(&s) {
            out.push_str(": ");
            out.push_str(&s);
        }
        cur = e.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts() -> RemoteOptions {
        RemoteOptions {
            connect_timeout: Duration::from_secs(1),
            stall_timeout: Duration::from_secs(1),
        }
    }

    #[test]
    fn content_ranges_are_parsed_strictly() {
        assert_eq!(
            parse_content_range("bytes 0-99/1000"),
            Some((0, 100, Some(1000)))
        );
        assert_eq!(parse_content_range("bytes 5-5/*"), Some((5, 6, None)));
        for bad in [
            "",
            "bytes 10-5/100",
            "bytes 0-100/100",
            "bytes -5/100",
            "items 0-1/2",
            "bytes 0-1",
            "bytes a-b/c",
        ] {
            assert_eq!(parse_content_range(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn urls_are_validated() {
        for bad in [
            "ftp://x/y",
            "not a url",
            "http://",
            "file://host/x",
            "/plain/path",
        ] {
            assert!(
                matches!(Remote::new(bad, &opts()), Err(RemoteError::BadUrl(_))),
                "{bad}"
            );
        }
        assert!(matches!(
            Remote::new("file:///srv/binpkgs", &opts()),
            Ok(Remote::File { .. })
        ));
    }

    #[test]
    fn package_urls_are_joined_and_escaped() {
        let Remote::Http { base, .. } = Remote::new("https://h/amd64", &opts()).unwrap() else {
            panic!()
        };
        assert_eq!(
            Remote::http_url(&base, "dev-libs/libsigc++/libsigc++-2-1.gpkg.tar").as_str(),
            "https://h/amd64/dev-libs/libsigc++/libsigc++-2-1.gpkg.tar"
        );
        assert_eq!(
            Remote::http_url(&base, "a/b#c?d.tbz2").as_str(),
            "https://h/amd64/a/b%23c%3Fd.tbz2"
        );
    }
}
