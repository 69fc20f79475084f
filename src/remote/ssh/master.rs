//! The ControlMaster's surroundings: the per-mount control directory (made 0700, emptied of
//! stale masters), and what a failed master start means, read from ssh's own log text.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tracing::debug;

use super::super::{ErrorKind, TransportError};

pub(super) fn home_dir() -> Option<PathBuf> {
    // SAFETY: getpwuid returns a pointer into static storage or NULL; read at once.
    unsafe {
        let pw = libc::getpwuid(libc::geteuid());
        if pw.is_null() || (*pw).pw_dir.is_null() {
            return None;
        }
        let dir = std::ffi::CStr::from_ptr((*pw).pw_dir);
        Some(PathBuf::from(dir.to_string_lossy().into_owned()))
    }
}

/// Creates the control directory (0700) and tells any master a killed daemon left in it to
/// exit.
pub(super) fn prepare_control_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    if let Some(parent) = dir.parent() {
        std::fs::create_dir_all(parent)?;
    }
    if dir.exists() {
        stop_masters(dir);
        std::fs::remove_dir_all(dir)?;
    }
    std::fs::DirBuilder::new().mode(0o700).create(dir)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
}

/// `ssh -O exit` for every control socket in `dir` (each waited for at most 2 s).
pub(super) fn stop_masters(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let sock = e.path().join("master");
        if !e
            .file_name()
            .to_string_lossy()
            .starts_with(".ssh-connection")
            || !sock.exists()
        {
            continue;
        }
        let child = std::process::Command::new("ssh")
            .args(["-F", "/dev/null", "-o", "BatchMode=yes", "-S"])
            .arg(&sock)
            .args(["-O", "exit", "binpkgfs-stale-master"])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn();
        if let Ok(mut child) = child {
            let deadline = Instant::now() + Duration::from_secs(2);
            while child.try_wait().ok().flatten().is_none() {
                if Instant::now() > deadline {
                    let _ = child.kill();
                    let _ = child.wait();
                    break;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            debug!(socket = %sock.display(), "told a stale ssh master to exit");
        }
    }
}

/// Classifies a failed master start by what ssh logged.
pub(super) fn connect_error(name: &str, e: &openssh::Error) -> TransportError {
    // The ssh log is the source of Connect/Master; the crate's own words add nothing.
    let text = match e {
        openssh::Error::Connect(io) | openssh::Error::Master(io) => io.to_string(),
        other => super::super::chain(other),
    };
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('@'))
        .collect();
    let find = |needle: &str| lines.iter().find(|l| l.contains(needle)).copied();
    if text.contains("Host key verification failed") || text.contains("host key") {
        let why = if let Some(l) = find("has changed") {
            format!(
                "{l} The server's host key does not match known_hosts (possibly a \
                 man-in-the-middle): fix known_hosts if the key was changed on purpose"
            )
        } else if let Some(l) = find("host key is known") {
            format!(
                "{l} Add the server's key to known_hosts (or mount once with \
                 -o ssh_accept_new)"
            )
        } else {
            lines.join(" ")
        };
        return TransportError::fatal(format!("{name}: host key verification failed: {why}"));
    }
    if text.contains("Permission denied") || text.contains("Too many authentication failures") {
        let l = find("Permission denied").unwrap_or("authentication failed");
        return TransportError::fatal(format!(
            "{name}: ssh authentication failed: {l} (check the key: -o ssh_identity=, the agent, \
             or authorized_keys on the server)"
        ));
    }
    if text.contains("Bad configuration option")
        || text.contains("Unsupported option")
        || text.contains("terminating,")
        || text.contains("Could not resolve hostname")
    {
        let one = lines.join(" ");
        let kind = if text.contains("Could not resolve hostname") {
            ErrorKind::Offline
        } else {
            ErrorKind::Fatal
        };
        return TransportError::new(kind, format!("{name}: ssh: {one}"));
    }
    // Refused, unreachable, timed out, the server closed the connection: try again later.
    TransportError::new(
        ErrorKind::Offline,
        format!("{name}: ssh: {}", lines.join(" ")),
    )
}
