//! Watching one file for replacement, with raw inotify on a dedicated thread.
//!
//! Portage replaces `mtimedb` atomically (a temporary file in the same directory, then
//! `rename`), so the file's own inode is never the one to watch: the thread watches the parent
//! directory for `IN_MOVED_TO`/`IN_CLOSE_WRITE` of the file's name. The directory may not exist
//! yet (a fresh system, a sandbox created after the mount): then the nearest existing ancestor
//! is watched for creations, and the choice is re-checked every `RECHECK` in any case, so a
//! missed event (or a directory replaced under us) costs at most that long.
//!
//! The thread reports by bumping a `watch` counter; it ends once the receiver is gone.

use std::ffi::{CString, OsStr};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::io::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::sync::watch;
use tracing::{debug, warn};

/// How often the watched directory is re-chosen even without an event.
const RECHECK: Duration = Duration::from_secs(3);

/// Starts watching `file`; the receiver changes whenever the file may have been replaced.
pub fn spawn(file: &Path) -> io::Result<watch::Receiver<u64>> {
    let (Some(dir), Some(name)) = (file.parent(), file.file_name()) else {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not a file path",
        ));
    };
    // SAFETY: plain syscall; the fd is owned below.
    let fd = unsafe { libc::inotify_init1(libc::IN_CLOEXEC | libc::IN_NONBLOCK) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh, valid descriptor that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let (tx, rx) = watch::channel(0u64);
    let mut w = Watch {
        fd,
        dir: dir.to_path_buf(),
        name: name.to_os_string(),
        current: None,
        failed: None,
    };
    w.rechoose(&tx);
    std::thread::Builder::new()
        .name("mtimedb-watch".into())
        .spawn(move || w.run(&tx))?;
    Ok(rx)
}

struct Watch {
    fd: OwnedFd,
    /// The directory that holds the file.
    dir: PathBuf,
    name: std::ffi::OsString,
    /// `(watch descriptor, watched directory)`.
    /// The watch, the directory it is on, and that directory's (device, inode): a path can
    /// come to name another directory (a filesystem mounted over an ancestor) without any
    /// event reaching the watched one.
    current: Option<(i32, PathBuf, (u64, u64))>,
    /// The directory that could not be watched last time, if any.
    failed: Option<PathBuf>,
}

impl Watch {
    fn run(mut self, tx: &watch::Sender<u64>) {
        let mut buf = [0u8; 4096];
        while !tx.is_closed() {
            let mut pfd = libc::pollfd {
                fd: self.fd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd.
            let n = unsafe { libc::poll(&mut pfd, 1, RECHECK.as_millis() as i32) };
            if n > 0 {
                // SAFETY: reading into our own buffer.
                let len =
                    unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
                if len > 0 {
                    self.handle(&buf[..len as usize], tx);
                }
            }
            self.rechoose(tx);
        }
        debug!("merge list watcher stopped");
    }

    /// Handles one buffer of events.
    fn handle(&mut self, buf: &[u8], tx: &watch::Sender<u64>) {
        let header = std::mem::size_of::<libc::inotify_event>();
        let mut at = 0;
        while at + header <= buf.len() {
            // SAFETY: the kernel wrote a whole event header here; read_unaligned copes with
            // the byte buffer's alignment.
            let ev: libc::inotify_event =
                unsafe { std::ptr::read_unaligned(buf[at..].as_ptr().cast()) };
            let name_bytes = &buf[at + header..(at + header + ev.len as usize).min(buf.len())];
            let name = OsStr::from_bytes(name_bytes.split(|&b| b == 0).next().unwrap_or(&[]));
            at += header + ev.len as usize;
            let watching_dir = self
                .current
                .as_ref()
                .is_some_and(|(wd, d, _)| *wd == ev.wd && *d == self.dir);
            if ev.mask & libc::IN_Q_OVERFLOW != 0 {
                tx.send_modify(|n| *n += 1);
            } else if watching_dir
                && name == self.name
                && ev.mask & (libc::IN_MOVED_TO | libc::IN_CLOSE_WRITE) != 0
            {
                tx.send_modify(|n| *n += 1);
            }
            if ev.mask & (libc::IN_IGNORED | libc::IN_DELETE_SELF | libc::IN_MOVE_SELF) != 0
                && self.current.as_ref().is_some_and(|(wd, _, _)| *wd == ev.wd)
            {
                self.unwatch();
            }
        }
    }

    /// Watches the file's directory, or its nearest existing ancestor while it is missing.
    fn rechoose(&mut self, tx: &watch::Sender<u64>) {
        let Some(want) = self.dir.ancestors().find(|d| d.is_dir()) else {
            return;
        };
        let Some(id) = dir_id(want) else {
            return;
        };
        if self
            .current
            .as_ref()
            .is_some_and(|(_, d, was)| d == want && *was == id)
        {
            return;
        }
        let want = want.to_path_buf();
        self.unwatch();
        let target = want == self.dir;
        let mask = if target {
            libc::IN_MOVED_TO | libc::IN_CLOSE_WRITE
        } else {
            libc::IN_CREATE | libc::IN_MOVED_TO
        } | libc::IN_DELETE_SELF
            | libc::IN_MOVE_SELF
            | libc::IN_ONLYDIR;
        let Ok(c) = CString::new(want.as_os_str().as_bytes()) else {
            return;
        };
        // SAFETY: valid fd and C string.
        let wd = unsafe { libc::inotify_add_watch(self.fd.as_raw_fd(), c.as_ptr(), mask) };
        if wd < 0 {
            // Retried every RECHECK; said once per directory.
            if self.failed.as_ref() != Some(&want) {
                let e = io::Error::last_os_error();
                warn!(dir = %want.display(), "cannot watch for the merge list: {e}");
                self.failed = Some(want);
            }
            return;
        }
        self.failed = None;
        debug!(dir = %want.display(), "watching for the merge list");
        self.current = Some((wd, want, id));
        // The file may have appeared before the watch did.
        if target && self.dir.join(&self.name).exists() {
            tx.send_modify(|n| *n += 1);
        }
    }

    fn unwatch(&mut self) {
        if let Some((wd, _, _)) = self.current.take() {
            // SAFETY: valid fd; a stale wd only yields EINVAL.
            unsafe { libc::inotify_rm_watch(self.fd.as_raw_fd(), wd) };
        }
    }
}

/// A directory's (device, inode).
fn dir_id(dir: &Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(dir).ok().map(|m| (m.dev(), m.ino()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn changed_within(rx: &mut watch::Receiver<u64>, secs: u64) -> bool {
        let deadline = std::time::Instant::now() + Duration::from_secs(secs);
        while std::time::Instant::now() < deadline {
            if rx.has_changed().unwrap_or(false) {
                rx.mark_unchanged();
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    /// A filesystem mounted over an ancestor after the watch began (a late /var mount, a
    /// chroot): the path now names another directory, and no event reaches the old one.
    #[test]
    fn follows_a_directory_replaced_by_a_mount_over_an_ancestor() {
        let tmp = tempfile::tempdir().unwrap();
        let var = tmp.path().join("var");
        let dir = var.join("cache/edb");
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("mtimedb");
        let mut rx = spawn(&file).unwrap();
        rx.mark_unchanged();
        let mounted = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "tmpfs"])
            .arg(&var)
            .status()
            .unwrap();
        assert!(mounted.success(), "mount tmpfs (the tests run as root)");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("mtimedbXYZ"), "{}").unwrap();
        std::fs::rename(dir.join("mtimedbXYZ"), &file).unwrap();
        let seen = changed_within(&mut rx, 10);
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&var)
            .status();
        assert!(seen, "replacement under a new mount not seen");
    }

    #[test]
    fn sees_atomic_replacement_in_a_directory_created_later() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("var/cache/edb");
        let file = dir.join("mtimedb");
        let mut rx = spawn(&file).unwrap();
        rx.mark_unchanged();
        assert!(!changed_within(&mut rx, 0));
        std::fs::create_dir_all(&dir).unwrap();
        // Portage's way: a temporary file beside it, then rename.
        std::fs::write(dir.join("mtimedbXYZ"), "{}").unwrap();
        std::fs::rename(dir.join("mtimedbXYZ"), &file).unwrap();
        assert!(changed_within(&mut rx, 10), "replacement not seen");
        // Other files in the directory are not reported.
        std::fs::write(dir.join("counter"), "1").unwrap();
        assert!(!changed_within(&mut rx, 1), "unrelated file reported");
        std::fs::write(&file, "{\"x\": 1}").unwrap();
        assert!(changed_within(&mut rx, 10), "in-place write not seen");
        // The directory replaced whole: still followed.
        std::fs::remove_dir_all(&dir).unwrap();
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("mtimedbXYZ"), "{}").unwrap();
        std::fs::rename(dir.join("mtimedbXYZ"), &file).unwrap();
        assert!(
            changed_within(&mut rx, 10),
            "replacement after re-creation not seen"
        );
    }
}
