//! Logging setup: `tracing` to stderr in the foreground, to a file when detached.
//!
//! A detached daemon must never log to a terminal that may be gone, so it writes to
//! `--log-file` (default `<cache-dir>/binpkgfs.log`) and points its own stderr there too, so a
//! panic message lands beside the log lines that led to it. fuser's `log` records are bridged in.

use std::fs::OpenOptions;
use std::os::unix::io::AsRawFd;
use std::sync::Mutex;

use tracing_subscriber::EnvFilter;

use crate::config::MountConfig;

pub fn init(cfg: &MountConfig) -> Result<(), String> {
    let filter = EnvFilter::try_new(&cfg.log_level).map_err(|e| format!("log level: {e}"))?;
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    let result = match &cfg.log_file {
        Some(path) => {
            let file = OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|e| format!("log file {}: {e}", path.display()))?;
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
