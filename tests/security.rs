//! Security and process hygiene, as a local user (and an attacker among them) sees it: a
//! binhost password never shows in mountinfo, `ps`, status, the log or the cache; credentials
//! from a private netrc file; https never downgraded to http, with an extra CA; the mount type
//! `fuse.binpkgfs`; every exit path of `binpkgfs mount` leaves nothing mounted and no daemon;
//! `file://` never hangs a reader or a mount.
//!
//! Every test runs in both kernel modes (`both_modes!`): FUSE passthrough (the default) and
//! `--no-passthrough`.

mod support;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use support::{Mount, Nginx, both_modes, copy_fixture_binhost, entry_for, is_mounted, wait_until};
use tempfile::TempDir;

const USER: &str = "alice";

/// A password unique to this test (tests run in parallel, and a `binpkgfs mount` still
/// starting shows its own command line), so a hit anywhere is ours.
fn password() -> String {
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!("Pw{}x{n}Secret", std::process::id())
}

/// Runs `cmd ARGS` as user `nobody`.
fn as_nobody(args: &[&str]) -> Output {
    Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .args(args)
        .output()
        .expect("run setpriv")
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// A fixture binhost behind nginx Basic auth for `USER` / `pw`.
fn private_binhost(pw: &str) -> (TempDir, Nginx, TempDir) {
    support::require_real_parts();
    let binhost = TempDir::with_prefix("binpkgfs-binhost.").unwrap();
    copy_fixture_binhost(binhost.path());
    let auth = TempDir::with_prefix("binpkgfs-auth.").unwrap();
    let hash = support::run_ok(Command::new("openssl").args(["passwd", "-apr1", pw]));
    let htpasswd = auth.path().join("htpasswd");
    fs::write(
        &htpasswd,
        format!("{USER}:{}", String::from_utf8_lossy(&hash.stdout)),
    )
    .unwrap();
    let nginx = Nginx::start_with(
        binhost.path(),
        &format!(
            "auth_basic \"binhost\"; auth_basic_user_file {};",
            htpasswd.display()
        ),
    );
    (binhost, nginx, auth)
}

/// A cache directory that does not exist yet, in a world-readable parent.
fn fresh_cache() -> (TempDir, PathBuf) {
    let parent = TempDir::with_prefix("binpkgfs-cacheparent.").unwrap();
    fs::set_permissions(parent.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let cache = parent.path().join("cache");
    (parent, cache)
}

/// Every file below `dir` whose bytes contain `needle`.
fn files_containing(dir: &Path, needle: &str) -> Vec<PathBuf> {
    let mut hits = Vec::new();
    for rel in support::list_files(dir) {
        let path = dir.join(&rel);
        if fs::read(&path).is_ok_and(|b| b.windows(needle.len()).any(|w| w == needle.as_bytes())) {
            hits.push(rel);
        }
    }
    hits
}

/// (source, fstype) of the mount on `mnt`, per findmnt.
fn findmnt(mnt: &Path) -> (String, String) {
    let out = support::run_ok(
        Command::new("findmnt")
            .args(["-n", "-o", "SOURCE,FSTYPE", "--mountpoint"])
            .arg(mnt),
    );
    let line = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let (source, fstype) = line.rsplit_once(' ').expect("two columns");
    (source.trim().to_string(), fstype.to_string())
}

both_modes! {
    fn a_password_in_the_url_authenticates_and_shows_nowhere(mode) {
        let pw = password();
        let (binhost, nginx, _auth) = private_binhost(&pw);
        let e = entry_for("dev-libs/libdemo-2.1");
        let plain = format!("http://127.0.0.1:{}/", nginx.port());
        let url = format!("http://{USER}:{pw}@127.0.0.1:{}", nginx.port());
        let (_parent, cache) = fresh_cache();
        let args = vec!["--log-level", "debug"];
        let mount = Mount::new(mode, &url, &cache, &args).unwrap();
        let mnt = mount.path();
        // It authenticates: the package comes through, byte for byte.
        let got = fs::read(mnt.join(&e["PATH"])).unwrap();
        assert!(got == fs::read(binhost.path().join(&e["PATH"])).unwrap());

        // The mount source is the URL without userinfo, the type fuse.binpkgfs.
        assert_eq!(findmnt(mnt), (plain.clone(), "fuse.binpkgfs".into()));
        let listed = support::run_ok(Command::new("findmnt").args(["-n", "-t", "fuse.binpkgfs"]));
        assert!(text(&listed).contains(mnt.to_str().unwrap()));

        // What another local user can see.
        let mountinfo = as_nobody(&["cat", "/proc/self/mountinfo"]);
        assert!(mountinfo.status.success());
        assert!(!text(&mountinfo).contains(&pw), "password in mountinfo");
        let ps = as_nobody(&["ps", "-eo", "args"]);
        assert!(ps.status.success());
        assert!(!text(&ps).contains(&pw), "password in ps");
        assert!(text(&ps).contains("binpkgfs daemon"), "{}", text(&ps));
        let bin = support::binpkgfs_bin().to_str().unwrap();
        let mnt_arg = mnt.to_str().unwrap();
        for status in [
            as_nobody(&[bin, "status", mnt_arg]),
            as_nobody(&[bin, "status", "--json", mnt_arg]),
        ] {
            assert!(status.status.success(), "{}", text(&status));
            assert!(text(&status).contains(&plain), "{}", text(&status));
            assert!(!text(&status).contains(&pw), "password in status");
        }
        let log = cache.join("binpkgfs.log");
        let denied = as_nobody(&["cat", log.to_str().unwrap()]);
        assert!(!denied.status.success(), "nobody can read the log");
        let denied = as_nobody(&["ls", cache.to_str().unwrap()]);
        assert!(!denied.status.success(), "nobody can list the cache");

        // Not even root finds it on disk; the modes are private.
        assert!(fs::read_to_string(&log).unwrap().contains("mounted"));
        assert_eq!(files_containing(&cache, &pw), Vec::<PathBuf>::new());
        let perm = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(perm(&cache), 0o700);
        assert_eq!(perm(&log), 0o640);
        for rel in support::list_files(&cache) {
            assert_eq!(perm(&cache.join(&rel)) & 0o007, 0, "{}", rel.display());
        }
        drop(mount);
    }
}

both_modes! {
    fn a_wrong_password_is_refused_in_one_line_that_does_not_repeat_it(mode) {
        let pw = password();
        let (_binhost, nginx, _auth) = private_binhost(&pw);
        let (_parent, cache) = fresh_cache();
        let wrong = format!("{pw}Wrong");
        let url = format!("http://{USER}:{wrong}@127.0.0.1:{}", nginx.port());
        let err = Mount::new(mode, &url, &cache, &[]).err().expect("refused");
        assert!(err.contains("401") && !err.contains(&wrong), "{err}");
        assert_eq!(err.lines().count(), 1, "{err}");
    }
}

both_modes! {
    fn credentials_come_from_a_private_netrc_file(mode) {
        let pw = password();
        let (binhost, nginx, _auth) = private_binhost(&pw);
        let e = entry_for("sys-apps/demo-base-1.0");
        let dir = TempDir::new().unwrap();
        let netrc = dir.path().join("netrc");
        fs::write(
            &netrc,
            format!(
                "machine elsewhere login x password y\nmachine 127.0.0.1 login {USER} password {pw}\n"
            ),
        )
        .unwrap();
        let netrc_arg = netrc.to_str().unwrap();
        // Readable by others: refused, with what to do.
        fs::set_permissions(&netrc, fs::Permissions::from_mode(0o644)).unwrap();
        let (_parent, cache) = fresh_cache();
        let err = Mount::new(mode, &nginx.url(), &cache, &["--netrc-file", netrc_arg])
            .err()
            .expect("a world-readable netrc is refused");
        assert!(err.contains("chmod 600"), "{err}");
        fs::set_permissions(&netrc, fs::Permissions::from_mode(0o600)).unwrap();
        let (_parent, cache) = fresh_cache();
        let extra = vec!["--netrc-file", netrc_arg];

        let mount = Mount::new(mode, &nginx.url(), &cache, &extra).unwrap();
        let got = fs::read(mount.path().join(&e["PATH"])).unwrap();
        assert!(got == fs::read(binhost.path().join(&e["PATH"])).unwrap());
        assert!(!text(&as_nobody(&["ps", "-eo", "args"])).contains(&pw));
        assert_eq!(files_containing(&cache, &pw), Vec::<PathBuf>::new());
    }
}

both_modes! {
    fn https_trusts_a_ca_file_and_never_follows_a_redirect_to_http(mode) {
        support::require_real_parts();
        let binhost = TempDir::new().unwrap();
        copy_fixture_binhost(binhost.path());
        let plain = Nginx::start(binhost.path());
        let (url, ca, _tls, _dir) = support::tls_nginx(
            binhost.path(),
            &format!(
                "location /down/ {{ return 301 http://127.0.0.1:{}/; }}",
                plain.port()
            ),
        );
        let ca_arg = ca.to_str().unwrap();
        let e = entry_for("app-misc/binpkgfs-demo-0.3");
        // The CA on top of the system store: no SSL_CERT_FILE needed.
        let cache = TempDir::new().unwrap();
        let extra = vec!["--ca-file", ca_arg];

        let mount = Mount::new(mode, &url, cache.path(), &extra).unwrap();
        let got = fs::read(mount.path().join(&e["PATH"])).unwrap();
        assert!(got == fs::read(binhost.path().join(&e["PATH"])).unwrap());
        drop(mount);

        // An https binhost that redirects to plain http: refused, saying so.
        let cache = TempDir::new().unwrap();
        let err = Mount::new(mode, &format!("{url}/down/"), cache.path(), &extra)
            .err()
            .expect("https -> http redirect refused");
        assert!(
            err.contains("refusing to follow a redirect from https to plain http"),
            "{err}"
        );
        assert_eq!(err.lines().count(), 1, "{err}");
        let requests = plain.requests();
        assert!(
            requests.is_empty(),
            "the http server was asked: {requests:?}"
        );
    }
}

// ---------------------------------------------------------------------------
// Nothing left behind
// ---------------------------------------------------------------------------

/// Processes holding any file below `dir` open (the daemon holds its cache's lock and log).
fn holders(dir: &Path) -> Vec<i32> {
    let mut pids = Vec::new();
    for proc_entry in fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = proc_entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(fds) = fs::read_dir(proc_entry.path().join("fd")) else {
            continue;
        };
        let holds = fds
            .flatten()
            .filter_map(|fd| fs::read_link(fd.path()).ok())
            .any(|target| target.starts_with(dir));
        if holds && support::process_alive(pid) {
            pids.push(pid);
        }
    }
    pids
}

/// Runs `binpkgfs mount ARGS` (detached, as a user would) with a deadline.
fn mount_cmd(args: &[&str], scratch: &Path) -> (bool, String) {
    let out = support::run_captured(
        Command::new(support::binpkgfs_bin())
            .arg("mount")
            .args(args),
        scratch,
        support::MOUNT_TIMEOUT,
    )
    .expect("binpkgfs mount returned");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).trim().to_string(),
    )
}

both_modes! {
    fn every_failed_mount_leaves_nothing_mounted_and_no_daemon(mode) {
        support::require_real_parts();
        let binhost = TempDir::new().unwrap();
        copy_fixture_binhost(binhost.path());
        let nginx = Nginx::start(binhost.path());
        let url = nginx.url();
        let dead = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            format!("http://127.0.0.1:{}/", l.local_addr().unwrap().port())
        };
        let scratch = TempDir::new().unwrap();
        let elsewhere = TempDir::new().unwrap();
        let log_target = elsewhere.path().join("log-target");
        let world_netrc = elsewhere.path().join("netrc");
        fs::write(&world_netrc, "machine 127.0.0.1 login a password b\n").unwrap();
        fs::set_permissions(&world_netrc, fs::Permissions::from_mode(0o644)).unwrap();
        let busy_cache = TempDir::new().unwrap();
        let busy = Mount::new(mode, &url, busy_cache.path(), &[]).unwrap();
        let busy_pid = busy.pid();

        let mnt = TempDir::new().unwrap();
        let mnt_arg = mnt.path().to_str().unwrap().to_string();
        // (extra arguments, URL, mount point, what the error says, set-up of the cache dir)
        type Setup = fn(&Path, &Path);
        let none: Setup = |_, _| {};
        let symlinked_objects: Setup = |cache, elsewhere| {
            fs::create_dir_all(cache).unwrap();
            std::os::unix::fs::symlink(elsewhere, cache.join("objects")).unwrap();
        };
        let symlinked_log: Setup = |cache, elsewhere| {
            fs::create_dir_all(cache).unwrap();
            std::os::unix::fs::symlink(elsewhere.join("log-target"), cache.join("binpkgfs.log"))
                .unwrap();
        };
        let cases: Vec<(Vec<String>, &str, String, &str, Setup)> = vec![
            (
                vec![],
                "ftp://x/y",
                mnt_arg.clone(),
                "unsupported URL",
                none,
            ),
            (
                vec![],
                &url,
                "/nonexistent/mnt".into(),
                "does not exist",
                none,
            ),
            (
                vec![],
                &url,
                busy.path().to_str().unwrap().into(),
                "already a mount point",
                none,
            ),
            (
                vec![],
                &dead,
                mnt_arg.clone(),
                "unreachable and no saved index",
                none,
            ),
            (
                vec!["--pid-file".into(), "/nonexistent/dir/pid".into()],
                &url,
                mnt_arg.clone(),
                "pid file",
                none,
            ),
            // Fails after the kernel mount: the pid cannot be written.
            (
                vec!["--pid-file".into(), "/dev/full".into()],
                &url,
                mnt_arg.clone(),
                "pid file /dev/full",
                none,
            ),
            (
                vec![],
                &url,
                mnt_arg.clone(),
                "is a symlink",
                symlinked_objects,
            ),
            (vec![], &url, mnt_arg.clone(), "log file", symlinked_log),
            (
                vec!["--netrc-file".into(), world_netrc.to_str().unwrap().into()],
                &url,
                mnt_arg.clone(),
                "chmod 600",
                none,
            ),
            (
                vec!["--ca-file".into(), "/nonexistent/ca.pem".into()],
                &url,
                mnt_arg.clone(),
                "CA file",
                none,
            ),
        ];
        for (extra, url, target, want, setup) in cases {
            let cache_parent = TempDir::new().unwrap();
            let cache = cache_parent.path().join("cache");
            setup(&cache, elsewhere.path());
            let mut args: Vec<&str> = vec!["--cache-dir", cache.to_str().unwrap()];
            args.extend(extra.iter().map(String::as_str));
            args.extend_from_slice(mode.args());
            args.extend([url, &target]);
            let (ok, stderr) = mount_cmd(&args, scratch.path());
            assert!(!ok, "{args:?} succeeded");
            assert_eq!(stderr.lines().count(), 1, "{args:?}: {stderr}");
            assert!(
                stderr.starts_with("binpkgfs: error: ") && stderr.contains(want),
                "{args:?}: {stderr}"
            );
            assert!(!is_mounted(mnt.path()), "{args:?} left a mount");
            let gone = wait_until(support::EXIT_TIMEOUT, || holders(&cache).is_empty());
            assert!(gone, "{args:?} left a daemon: {:?}", holders(&cache));
            assert!(!log_target.exists(), "{args:?} followed the log symlink");
        }
        // The cache another daemon holds: refused, and only that daemon holds it.
        let mut args = vec!["--cache-dir", busy_cache.path().to_str().unwrap()];
        args.extend_from_slice(mode.args());
        args.extend([&url, mnt_arg.as_str()]);
        let (ok, stderr) = mount_cmd(&args, scratch.path());
        assert!(
            !ok && stderr.contains("in use by another binpkgfs"),
            "{stderr}"
        );
        assert!(!is_mounted(mnt.path()));
        let only_busy = wait_until(support::EXIT_TIMEOUT, || {
            holders(busy_cache.path()) == vec![busy_pid]
        });
        assert!(only_busy, "{:?}", holders(busy_cache.path()));

        // The two ways a running mount ends: unmount, and SIGTERM.
        for by_signal in [false, true] {
            let cache = TempDir::new().unwrap();
            let mut m = Mount::new(mode, &url, cache.path(), &[]).unwrap();
            if by_signal {
                // SAFETY: plain kill(2) on the daemon this test started.
                unsafe { libc::kill(m.pid(), libc::SIGTERM) };
                m.wait_for_exit(support::EXIT_TIMEOUT).unwrap();
            } else {
                m.unmount().unwrap();
            }
            assert!(!is_mounted(m.path()));
            assert!(wait_until(support::EXIT_TIMEOUT, || holders(cache.path()).is_empty()));
        }
    }
}

// ---------------------------------------------------------------------------
// file:// never hangs
// ---------------------------------------------------------------------------

fn mkfifo(path: &Path) {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: a valid C string.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0);
}

both_modes! {
    fn a_fifo_planted_as_a_package_fails_the_read_at_once(mode) {
        support::require_real_parts();
        let binhost = TempDir::new().unwrap();
        copy_fixture_binhost(binhost.path());
        // One small package (fetched whole) and the large one (read by ranges first).
        let small = entry_for("dev-libs/libdemo-2.1");
        let large = entry_for("app-misc/demo-data-1.0");
        for e in [&small, &large] {
            let path = binhost.path().join(&e["PATH"]);
            fs::remove_file(&path).unwrap();
            mkfifo(&path);
        }
        let cache = TempDir::new().unwrap();
        let extra = vec!["--stall-timeout", "5"];

        let mount = Mount::new(mode, &support::file_url(binhost.path()), cache.path(), &extra).unwrap();
        for e in [&small, &large] {
            let started = Instant::now();
            let err = fs::read(mount.path().join(&e["PATH"])).expect_err("a FIFO is no package");
            assert_eq!(err.raw_os_error(), Some(libc::EIO), "{}: {err}", e["PATH"]);
            // Refused, not waited for: well inside the stall timeout.
            assert!(
                started.elapsed() < Duration::from_secs(4),
                "{:?}",
                started.elapsed()
            );
        }
        // The rest of the binhost is served as before.
        let ok = entry_for("sys-apps/demo-base-1.0");
        assert!(fs::read(mount.path().join(&ok["PATH"])).is_ok());
    }
}

/// Keeps a process stopped (SIGSTOP) and continues it however the test ends.
struct Stopped(i32);

impl Stopped {
    fn new(pid: i32) -> Stopped {
        // SAFETY: plain kill(2) on a daemon this test started.
        unsafe { libc::kill(pid, libc::SIGSTOP) };
        Stopped(pid)
    }
}

impl Drop for Stopped {
    fn drop(&mut self) {
        // SAFETY: as above.
        unsafe { libc::kill(self.0, libc::SIGCONT) };
    }
}

both_modes! {
    fn a_file_binhost_that_blocks_fails_the_mount_in_time_or_mounts_from_the_saved_index(mode) {
        support::require_real_parts();
        let binhost = TempDir::new().unwrap();
        copy_fixture_binhost(binhost.path());
        let nginx = Nginx::start(binhost.path());
        // A directory whose every access blocks: a FUSE mount whose daemon is stopped (what a
        // hung NFS server looks like to a reader).
        let lower_cache = TempDir::new().unwrap();
        let lower = Mount::new(mode, &nginx.url(), lower_cache.path(), &[]).unwrap();
        let url = support::file_url(lower.path());
        let e = entry_for("dev-libs/libdemo-2.1");
        let stall = 3;
        let extra = vec!["--stall-timeout", "3"];

        // No saved index: the mount fails within the bound, in one line.
        let cache = TempDir::new().unwrap();
        let started = Instant::now();
        let err = {
            let _stopped = Stopped::new(lower.pid());
            Mount::new(mode, &url, cache.path(), &extra)
                .err()
                .expect("a blocked binhost without a saved index cannot mount")
        };
        let took = started.elapsed();
        assert!(
            err.contains("no saved index") && err.contains("no answer"),
            "{err}"
        );
        assert!(took < Duration::from_secs(stall * 3 + 5), "took {took:?}");

        // With a saved index: it mounts from it, and a read fails in time instead of hanging.
        let cache = TempDir::new().unwrap();
        drop(Mount::new(mode, &url, cache.path(), &extra).unwrap());
        let _stopped = Stopped::new(lower.pid());
        let mount = Mount::new(mode, &url, cache.path(), &extra).unwrap();
        let started = Instant::now();
        let err = fs::read(mount.path().join(&e["PATH"])).expect_err("the binhost is hung");
        assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
        assert!(started.elapsed() < Duration::from_secs(stall * 6 + 5));
        drop(mount);
    }
}
