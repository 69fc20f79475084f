//! `file://` binhosts: a directory on local or network storage (NFS, a bind mount).
//!
//! Every file operation runs on the blocking pool under the stall timeout, so a hung NFS
//! server or a FIFO planted as a package fails a reader instead of blocking it (or one of the
//! runtime's workers) forever. Only regular files are read; `O_NONBLOCK` on open keeps a FIFO
//! from blocking the open itself. ENOENT says the file is not there.

use std::fs::File;
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use super::{
    Body, Chunks, ErrorKind, IndexFetch, RemoteOptions, Transport, TransportError, packages_gz,
};
use crate::index::{MAX_INDEX_BYTES, Validators};

pub struct LocalDir {
    base: PathBuf,
    /// A file operation that takes longer fails instead of blocking a reader.
    stall: Duration,
}

const FILE_CHUNK: usize = 1 << 20;

impl LocalDir {
    pub fn new(base: PathBuf, opts: &RemoteOptions) -> LocalDir {
        LocalDir {
            base,
            stall: opts.stall_timeout,
        }
    }
}

fn io_error(path: &Path, e: &io::Error) -> TransportError {
    let kind = match e.kind() {
        io::ErrorKind::NotFound => ErrorKind::NotFound,
        io::ErrorKind::InvalidInput => ErrorKind::Fatal,
        _ => ErrorKind::Retryable,
    };
    TransportError::new(kind, format!("{}: {e}", path.display()))
}

/// Runs `op` on the blocking pool, bounded by `stall`. A thread stuck in the kernel stays
/// stuck, but nobody waits for it.
async fn bounded<T: Send + 'static>(
    path: &Path,
    stall: Duration,
    op: impl FnOnce() -> io::Result<T> + Send + 'static,
) -> Result<T, TransportError> {
    let r = match tokio::time::timeout(stall, tokio::task::spawn_blocking(op)).await {
        Ok(Ok(r)) => r,
        Ok(Err(join)) => Err(io::Error::other(join)),
        Err(_) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("no answer from the file system in {}s", stall.as_secs_f64()),
        )),
    };
    r.map_err(|e| io_error(path, &e))
}

/// Opens a regular file for reading; anything else (a FIFO, a device, a directory) is refused.
fn open_regular(path: &Path) -> io::Result<(File, std::fs::Metadata)> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)?;
    let meta = file.metadata()?;
    if !meta.is_file() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not a regular file",
        ));
    }
    Ok((file, meta))
}

struct Reader {
    file: Arc<File>,
    path: PathBuf,
    at: u64,
    end: u64,
    stall: Duration,
}

#[async_trait::async_trait]
impl Chunks for Reader {
    async fn next(&mut self) -> Result<Option<Bytes>, TransportError> {
        if self.at >= self.end {
            return Ok(None);
        }
        let (file, at) = (self.file.clone(), self.at);
        let want = (self.end - at).min(FILE_CHUNK as u64) as usize;
        let buf = bounded(&self.path, self.stall, move || {
            let mut buf = vec![0u8; want];
            let n = file.read_at(&mut buf, at)?;
            buf.truncate(n);
            Ok(buf)
        })
        .await?;
        if buf.is_empty() {
            // Shorter than it was at open: the fetcher sees a truncated body.
            self.end = self.at;
            return Ok(None);
        }
        self.at += buf.len() as u64;
        Ok(Some(buf.into()))
    }
}

impl LocalDir {
    /// One index file (`Packages` or `Packages.gz`); its stat is the validator.
    async fn fetch_named(
        &self,
        name: &str,
        since: Option<&Validators>,
    ) -> Result<IndexFetch, TransportError> {
        let path = self.base.join(name);
        let since = since.and_then(|v| v.etag.clone());
        let p = path.clone();
        bounded(&path, self.stall, move || {
            let (file, meta) = open_regular(&p)?;
            if meta.len() > MAX_INDEX_BYTES as u64 {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("index larger than {MAX_INDEX_BYTES} bytes"),
                ));
            }
            let stamp = format!("{}.{}:{}", meta.mtime(), meta.mtime_nsec(), meta.len());
            if since.as_deref() == Some(stamp.as_str()) {
                return Ok(IndexFetch::NotModified);
            }
            let mut raw = vec![0u8; meta.len() as usize];
            file.read_exact_at(&mut raw, 0)?;
            Ok(IndexFetch::Fresh {
                raw: raw.into(),
                validators: Validators {
                    etag: Some(stamp),
                    last_modified: None,
                    compressed: false,
                },
            })
        })
        .await
    }
}

#[async_trait::async_trait]
impl Transport for LocalDir {
    async fn fetch_index(&self, since: Option<&Validators>) -> Result<IndexFetch, TransportError> {
        packages_gz::gz_then_plain(since, |name, v| async move {
            self.fetch_named(name, v.as_ref()).await
        })
        .await
    }

    async fn open(&self, path: &str, from: u64, to: Option<u64>) -> Result<Body, TransportError> {
        let full = self.base.join(path);
        let p = full.clone();
        let (file, meta) = bounded(&full, self.stall, move || open_regular(&p)).await?;
        let end = to.map_or(meta.len(), |t| t.min(meta.len()));
        let reader = Reader {
            file: Arc::new(file),
            path: full,
            at: from,
            end,
            stall: self.stall,
        };
        // The rest of the file (or the bounded span, for a caller that asked for one):
        // what a server would call a whole answer from `from`.
        Ok(Body::whole(Box::new(reader), 0, None))
    }

    async fn read_range(
        &self,
        path: &str,
        from: u64,
        len: u64,
    ) -> Result<Option<Vec<u8>>, TransportError> {
        let full = self.base.join(path);
        let p = full.clone();
        bounded(&full, self.stall, move || {
            let (file, _) = open_regular(&p)?;
            let mut out = vec![0u8; len as usize];
            file.read_exact_at(&mut out, from)?;
            Ok(Some(out))
        })
        .await
    }

    /// Local storage gains nothing from parallel streams.
    fn may_split(&self) -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir() -> (tempfile::TempDir, LocalDir) {
        let d = tempfile::tempdir().unwrap();
        let opts = RemoteOptions {
            connect_timeout: Duration::from_secs(1),
            stall_timeout: Duration::from_millis(300),
            ..RemoteOptions::default()
        };
        let t = LocalDir::new(d.path().to_path_buf(), &opts);
        (d, t)
    }

    #[tokio::test]
    async fn a_fifo_is_refused_at_once_not_waited_for() {
        let (d, t) = dir();
        let fifo = d.path().join("p.tbz2");
        let c = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: a valid C string.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let started = std::time::Instant::now();
        let err = t.open("p.tbz2", 0, None).await.err().expect("refused");
        assert_eq!(err.kind, ErrorKind::Fatal, "{err}");
        assert!(err.message.contains("not a regular file"), "{err}");
        let err = t.read_range("p.tbz2", 0, 10).await.expect_err("refused");
        assert!(err.message.contains("not a regular file"), "{err}");
        assert!(started.elapsed() < Duration::from_secs(2));
    }

    #[tokio::test]
    async fn missing_files_are_not_found_and_bodies_start_at_the_offset() {
        let (d, t) = dir();
        let err = t.open("nope.tbz2", 0, None).await.err().unwrap();
        assert_eq!(err.kind, ErrorKind::NotFound);
        std::fs::write(d.path().join("a.tbz2"), b"0123456789").unwrap();
        let mut body = t.open("a.tbz2", 3, None).await.unwrap();
        let mut got = Vec::new();
        while let Some(c) = body.chunk().await.unwrap() {
            got.extend_from_slice(&c);
        }
        assert_eq!(got, b"3456789");
        assert_eq!(t.read_range("a.tbz2", 2, 3).await.unwrap().unwrap(), b"234");
    }
}
