//! Logging setup: `tracing` to stderr in the foreground, to a file when detached.
//!
//! A detached daemon must never log to a terminal that may be gone, so it writes to
//! `--log-file` (default `<cache-dir>/binpkgfs.log`) and points its own stderr there too, so a
//! panic message lands beside the log lines that led to it. fuser's `log` records are bridged in.
//!
//! The log file is mode 0640 (tightened if an older one was world-readable) and is never opened
//! through a symlink: the daemon runs as root, and a link planted where the log goes must not
//! make it append to (or create) a file elsewhere.

use std::fs::OpenOptions;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::os::unix::io::AsRawFd;
use std::sync::Mutex;

use tracing_subscriber::EnvFilter;

use crate::config::MountConfig;

pub fn init(cfg: &MountConfig) -> Result<(), String> {
    let filter = EnvFilter::try_new(&cfg.log_level).map_err(|e| format!("log level: {e}"))?;
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    let result = match &cfg.log_file {
        Some(path) => {
            let err = |e: std::io::Error| format!("log file {}: {e}", path.display());
            let file = OpenOptions::new()
                .create(true)
                .append(true)
                .mode(0o640)
                .custom_flags(libc::O_NOFOLLOW)
                .open(path)
                .map_err(err)?;
            let meta = file.metadata().map_err(err)?;
            if meta.is_file() && meta.permissions().mode() & 0o007 != 0 {
                file.set_permissions(std::fs::Permissions::from_mode(0o640))
                    .map_err(err)?;
            }
            // SAFETY: both fds are valid for the duration of the call.
            unsafe { libc::dup2(file.as_raw_fd(), 2) };
            builder
                .with_ansi(false)
                .with_writer(Mutex::new(file))
                .try_init()
        }
        None => builder.with_writer(std::io::stderr).try_init(),
    };
    // A second init (tests, embedding) keeps the first subscriber; that is fine.
    let _ = result;
    Ok(())
}
