//! System integration: the real binary behind the real util-linux mount(8), through
//! `mount-helpers/mount.binpkgfs` (by hand and from an fstab line), and behind real OpenRC,
//! through `openrc/init.d/binpkgfs` under `rc-service`.
//!
//! These tests install files where the system looks for them (`/sbin/mount.binpkgfs`,
//! `/etc/init.d/binpkgfs`, `/etc/conf.d/binpkgfs`), so they run one at a time under a lock
//! that also holds across processes, move aside anything they would overwrite, and put
//! everything back when they end, also when they fail. They need root, `/dev/fuse`,
//! util-linux `mount` and OpenRC's `openrc-run`; a missing part fails the test and says what
//! to install. Nothing is skipped.
//!
//! OpenRC is not pid 1 on a CI machine. `rc-service` then refuses to run anything until
//! `/run/openrc/softlevel` exists (and `rc-update -u` has created OpenRC's state
//! directories); Debian also has no `localmount` service, which the script needs. The
//! [`OpenRc`] guard provides both for the duration of a test and removes what it added.

use std::fs::{self, File};
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::thread::sleep;
use std::time::{Duration, Instant};

use tempfile::TempDir;

const BIN: &str = env!("CARGO_BIN_EXE_binpkgfs");
const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// How long a mount, `rc-service ... start` or `stop` may take.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(90);
/// How long a daemon may take to exit once unmounted.
const EXIT_TIMEOUT: Duration = Duration::from_secs(20);

const HELPER: &str = "/sbin/mount.binpkgfs";
const INIT_SCRIPT: &str = "/etc/init.d/binpkgfs";
const CONF_DIR: &str = "/etc/conf.d";
const CONF_FILE: &str = "/etc/conf.d/binpkgfs";
const SERVICE_PIDFILE: &str = "/run/binpkgfs.pid";
/// Stands in for Gentoo's `localmount` and `net` where the machine has neither (Debian).
const DEPS_STUB: &str = "/etc/init.d/binpkgfs-test-deps";
const DEPS_STUB_SCRIPT: &str = "#!/sbin/openrc-run
description=\"binpkgfs system tests: stands in for Gentoo's localmount and net\"
depend() { provide localmount net; }
start() { return 0; }
stop() { return 0; }
";

// ---------------------------------------------------------------------------
// mount(8) and the mount helper
// ---------------------------------------------------------------------------

#[test]
fn mount_t_binpkgfs_serves_the_binhost_and_umount_ends_the_daemon() {
    let case = HelperCase::new();
    let (binhost, tmp, mnt, pid_file) = (&case.binhost, &case.tmp, &case.mnt, &case.pid_file);

    let opts = format!(
        "ro,cache_dir={},pid_file={}",
        tmp.path().join("cache").display(),
        pid_file.display()
    );
    let r = run(mount_cmd()
        .args(["-t", "binpkgfs", &binhost.url()])
        .arg(mnt)
        .args(["-o", &opts]));
    assert!(r.ok(), "mount -t binpkgfs failed:\n{}", r.out);

    let (fstype, source) = mounted(mnt).expect("mount(8) succeeded but nothing is mounted");
    assert!(fstype.starts_with("fuse"), "mounted as {fstype}, not FUSE");
    assert_eq!(source, binhost.url(), "mount source in mountinfo");
    binhost.assert_served_at(mnt);
    let pid = daemon_pid(pid_file);

    let r = run(Command::new("umount").arg(mnt));
    assert!(r.ok(), "umount failed:\n{}", r.out);
    assert_eq!(mounted(mnt), None, "still mounted after umount");
    assert_daemon_exits(pid);
    assert!(!pid_file.exists(), "the daemon left its pid file behind");
}

#[test]
fn fstab_line_mounts_by_directory_and_mount_a_is_idempotent() {
    let case = HelperCase::new();
    let (binhost, tmp, mnt, pid_file) = (&case.binhost, &case.tmp, &case.mnt, &case.pid_file);
    let fstab = tmp.path().join("fstab");
    fs::write(
        &fstab,
        format!(
            "# binpkgfs system test\n{} {} binpkgfs ro,_netdev,cache_dir={},pid_file={} 0 0\n",
            binhost.url(),
            mnt.display(),
            tmp.path().join("cache").display(),
            pid_file.display()
        ),
    )
    .unwrap();

    // What localmount does at boot: network filesystems are left for netmount.
    let r = run(mount_cmd()
        .args(["-a", "-O", "no_netdev", "--fstab"])
        .arg(&fstab));
    assert!(r.ok(), "mount -a -O no_netdev failed:\n{}", r.out);
    assert_eq!(
        mounted(mnt),
        None,
        "a _netdev line was mounted without the network"
    );

    let r = run(mount_cmd().arg("--fstab").arg(&fstab).arg(mnt));
    assert!(r.ok(), "mount DIR with the fstab line failed:\n{}", r.out);
    assert!(
        mounted(mnt).is_some(),
        "mount(8) succeeded but nothing is mounted"
    );
    binhost.assert_served_at(mnt);
    let pid = daemon_pid(pid_file);

    // What netmount does at boot or restart: mounting again is a no-op, not a second mount.
    let r = run(mount_cmd()
        .args(["-a", "-O", "_netdev", "--fstab"])
        .arg(&fstab));
    assert!(
        r.ok(),
        "mount -a -O _netdev on a mounted line failed:\n{}",
        r.out
    );
    assert_eq!(mount_count(mnt), 1, "mount -a stacked a second mount");
    assert_eq!(daemon_pid(pid_file), pid);

    let r = run(Command::new("umount").arg(mnt));
    assert!(r.ok(), "umount failed:\n{}", r.out);
    assert_eq!(mounted(mnt), None, "still mounted after umount");
    assert_daemon_exits(pid);
}

#[test]
fn mount_helper_mounts_read_only_by_default_fakes_and_names_a_missing_binary() {
    let case = HelperCase::new();
    let (binhost, tmp, mnt, pid_file) = (&case.binhost, &case.tmp, &case.mnt, &case.pid_file);
    let opts = format!(
        "cache_dir={},pid_file={}",
        tmp.path().join("cache").display(),
        pid_file.display()
    );

    // -f: mount(8) goes through the motions, the helper says what it would run, nothing mounts.
    let r = run(mount_cmd()
        .args(["-f", "-v", "-t", "binpkgfs", &binhost.url()])
        .arg(mnt)
        .args(["-o", &opts]));
    assert!(r.ok(), "mount -f failed:\n{}", r.out);
    assert!(
        r.out.contains(&format!("{BIN} mount -o ro,")),
        "mount -f -v did not show the command:\n{}",
        r.out
    );
    assert_eq!(mounted(mnt), None, "mount -f mounted something");

    // A missing binary is a one-line error and mount(8)'s failure status, not a hang.
    let r = run(mount_cmd()
        .env("BINPKGFS_BIN", "/nonexistent/binpkgfs")
        .args(["-t", "binpkgfs", &binhost.url()])
        .arg(mnt)
        .args(["-o", &opts]));
    assert!(!r.ok(), "mount with a missing binary succeeded:\n{}", r.out);
    assert!(
        r.out
            .contains("BINPKGFS_BIN=/nonexistent/binpkgfs is not executable"),
        "{}",
        r.out
    );
    assert_eq!(mounted(mnt), None);

    // No `ro` given: mount(8) passes `rw`, which binpkgfs refuses; the helper mounts read-only.
    let r = run(mount_cmd()
        .args(["-t", "binpkgfs", &binhost.url()])
        .arg(mnt)
        .args(["-o", &opts]));
    assert!(r.ok(), "mount without `ro` failed:\n{}", r.out);
    let line = mountinfo_line(mnt).expect("nothing mounted");
    assert!(
        line.split(' ')
            .nth(5)
            .unwrap()
            .split(',')
            .any(|o| o == "ro"),
        "not read-only: {line}"
    );
    binhost.assert_served_at(mnt);
    let pid = daemon_pid(pid_file);
    let r = run(Command::new("umount").arg(mnt));
    assert!(r.ok(), "umount failed:\n{}", r.out);
    assert_daemon_exits(pid);
}

// ---------------------------------------------------------------------------
// OpenRC
// ---------------------------------------------------------------------------

#[test]
fn openrc_service_starts_serves_reports_and_stops() {
    let case = ServiceCase::new();
    let (binhost, mnt) = (&case.binhost, &case.mnt);

    let r = rc_service("start");
    assert!(r.ok(), "rc-service binpkgfs start failed:\n{}", r.out);
    // start returned, so the mount must answer now, with no waiting.
    assert!(
        mounted(mnt).is_some(),
        "start succeeded but {} is not mounted",
        mnt.display()
    );
    binhost.assert_served_at(mnt);
    let pid = daemon_pid(Path::new(SERVICE_PIDFILE));

    let r = rc_service("status");
    assert!(r.ok(), "status of a running service failed:\n{}", r.out);
    assert!(r.out.contains("status: started"), "{}", r.out);

    let r = rc_service("stop");
    assert!(r.ok(), "rc-service binpkgfs stop failed:\n{}", r.out);
    // stop waits for the daemon: gone already, not soon.
    assert_eq!(mounted(mnt), None, "still mounted after stop");
    assert!(
        !running(pid),
        "daemon {pid} still running after stop returned"
    );
    assert!(!Path::new(SERVICE_PIDFILE).exists(), "pid file left behind");

    let r = rc_service("status");
    assert_eq!(r.code, Some(3), "status of a stopped service:\n{}", r.out);
    assert!(r.out.contains("status: stopped"), "{}", r.out);
}

#[test]
fn openrc_status_reports_a_crashed_daemon_and_restart_recovers_the_mount() {
    let case = ServiceCase::new();
    let (binhost, mnt) = (&case.binhost, &case.mnt);

    let r = rc_service("start");
    assert!(r.ok(), "rc-service binpkgfs start failed:\n{}", r.out);
    let pid = daemon_pid(Path::new(SERVICE_PIDFILE));
    kill(pid, libc::SIGKILL);
    wait_until("the killed daemon to die", || !running(pid));

    // The kernel keeps the dead FUSE mount; the service must not call that "started".
    let r = rc_service("status");
    assert_eq!(
        r.code,
        Some(32),
        "status after the daemon was killed:\n{}",
        r.out
    );
    assert!(r.out.contains("crashed"), "{}", r.out);

    let r = rc_service("restart");
    assert!(r.ok(), "restart after a crash failed:\n{}", r.out);
    assert_eq!(
        mount_count(mnt),
        1,
        "restart left the dead mount underneath"
    );
    binhost.assert_served_at(mnt);
    let pid = daemon_pid(Path::new(SERVICE_PIDFILE));
    let r = rc_service("status");
    assert!(r.ok(), "status after restart:\n{}", r.out);

    let r = rc_service("stop");
    assert!(r.ok(), "stop failed:\n{}", r.out);
    assert_eq!(mounted(mnt), None, "still mounted after stop");
    assert!(
        !running(pid),
        "daemon {pid} still running after stop returned"
    );
}

#[test]
fn openrc_start_failures_are_explained_and_leave_nothing_behind() {
    let _lock = system_lock();
    require_real_parts(true);
    let tmp = TempDir::with_prefix("binpkgfs-system.").unwrap();
    let mnt = tmp.path().join("binpkgs");
    let _cleanup = MountGuard::new(&mnt, Path::new(SERVICE_PIDFILE));

    // No BINPKGFS_URL at all.
    let conf = service_conf("", &mnt, tmp.path());
    let openrc = OpenRc::install(&conf);
    let r = rc_service("start");
    assert!(!r.ok(), "start without BINPKGFS_URL succeeded:\n{}", r.out);
    assert!(r.out.contains("BINPKGFS_URL is not set"), "{}", r.out);
    assert!(
        r.out.contains(CONF_FILE),
        "the message should name {CONF_FILE}:\n{}",
        r.out
    );
    drop(openrc);

    // A binhost that is not there: binpkgfs's own one-line error reaches the console.
    let missing = format!("file://{}/no-such-binhost", tmp.path().display());
    let _openrc = OpenRc::install(&service_conf(&missing, &mnt, tmp.path()));
    let r = rc_service("start");
    assert!(
        !r.ok(),
        "start with a missing binhost succeeded:\n{}",
        r.out
    );
    assert!(
        r.out.contains("binpkgfs: error:"),
        "binpkgfs's error is not shown:\n{}",
        r.out
    );
    assert_eq!(mounted(&mnt), None, "a failed start left a mount");
    assert!(
        !Path::new(SERVICE_PIDFILE).exists(),
        "a failed start left a pid file"
    );
    let r = rc_service("status");
    assert_eq!(r.code, Some(3), "status after a failed start:\n{}", r.out);
}

// ---------------------------------------------------------------------------
// The scripts themselves
// ---------------------------------------------------------------------------

#[test]
fn shell_scripts_parse_and_pass_shellcheck() {
    let scripts = [
        "mount-helpers/mount.binpkgfs",
        "openrc/init.d/binpkgfs",
        "openrc/conf.d/binpkgfs",
    ];
    for s in scripts {
        let path = Path::new(ROOT).join(s);
        let r = run(Command::new("sh").arg("-n").arg(&path));
        assert!(r.ok(), "sh -n {s}:\n{}", r.out);
    }
    for s in ["mount-helpers/mount.binpkgfs", "openrc/init.d/binpkgfs"] {
        let mode = fs::metadata(Path::new(ROOT).join(s))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(
            mode & 0o111,
            0o111,
            "{s} must be executable (mount(8) silently fails otherwise)"
        );
    }
    assert!(
        which("shellcheck").is_some(),
        "`shellcheck` is missing (Debian: apt-get install shellcheck)"
    );
    let mut cmd = Command::new("shellcheck");
    cmd.args(["--shell=sh"]);
    for s in scripts {
        cmd.arg(Path::new(ROOT).join(s));
    }
    let r = run(&mut cmd);
    assert!(r.ok(), "shellcheck:\n{}", r.out);
}

// ---------------------------------------------------------------------------
// Helpers: the binhost
// ---------------------------------------------------------------------------

/// A private copy of the fixture binhost, served as a `file://` URL.
struct Binhost {
    dir: TempDir,
}

impl Binhost {
    fn new() -> Binhost {
        let fixture = Path::new(ROOT).join("tests/fixtures/binhost");
        assert!(
            fixture.join("Packages").is_file(),
            "the fixture binhost is missing ({} has no Packages)",
            fixture.display()
        );
        let dir = TempDir::with_prefix("binpkgfs-binhost.").unwrap();
        copy_tree(&fixture, dir.path());
        Binhost { dir }
    }

    fn url(&self) -> String {
        format!("file://{}", self.dir.path().display())
    }

    /// Every `PATH` in the index.
    fn packages(&self) -> Vec<String> {
        let index = fs::read_to_string(self.dir.path().join("Packages")).unwrap();
        let paths: Vec<String> = index
            .lines()
            .filter_map(|l| l.strip_prefix("PATH: "))
            .map(str::to_owned)
            .collect();
        assert!(!paths.is_empty(), "the fixture index lists no packages");
        paths
    }

    /// Every package reads back through `mnt` byte for byte.
    fn assert_served_at(&self, mnt: &Path) {
        for p in self.packages() {
            let want = fs::read(self.dir.path().join(&p)).unwrap();
            let got = fs::read(mnt.join(&p))
                .unwrap_or_else(|e| panic!("reading {p} through the mount: {e}"));
            assert!(
                got == want,
                "{p} differs through the mount ({} vs {} bytes)",
                got.len(),
                want.len()
            );
        }
    }
}

fn copy_tree(from: &Path, to: &Path) {
    for entry in fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            fs::create_dir_all(&target).unwrap();
            copy_tree(&entry.path(), &target);
        } else {
            fs::copy(entry.path(), &target).unwrap();
        }
    }
}

fn mkdir(parent: &Path, name: &str) -> PathBuf {
    let dir = parent.join(name);
    fs::create_dir_all(&dir).unwrap();
    dir
}

// ---------------------------------------------------------------------------
// Helpers: commands, mounts, processes
// ---------------------------------------------------------------------------

struct Ran {
    code: Option<i32>,
    /// stdout and stderr, interleaved.
    out: String,
}

impl Ran {
    fn ok(&self) -> bool {
        self.code == Some(0)
    }
}

/// Runs `cmd` to completion within [`COMMAND_TIMEOUT`]. Output goes to a file, not a pipe:
/// a daemon that kept an inherited pipe open would make reading it hang.
fn run(cmd: &mut Command) -> Ran {
    let mut log = tempfile::tempfile().unwrap();
    cmd.stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log.try_clone().unwrap());
    let what = format!("{cmd:?}");
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {what}: {e}"));
    let deadline = Instant::now() + COMMAND_TIMEOUT;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break Some(status);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        sleep(Duration::from_millis(20));
    };
    let mut out = String::new();
    log.seek(SeekFrom::Start(0)).unwrap();
    log.read_to_string(&mut out).unwrap();
    let Some(status) = status else {
        panic!("{what} did not finish within {COMMAND_TIMEOUT:?}; output so far:\n{out}");
    };
    Ran {
        code: status.code(),
        out,
    }
}

/// `mount`, with the helper pointed at the binary under test (mount(8) passes the
/// environment to helpers, all but PATH).
fn mount_cmd() -> Command {
    let mut cmd = Command::new("mount");
    cmd.env("BINPKGFS_BIN", BIN);
    cmd
}

fn rc_service(action: &str) -> Ran {
    run(Command::new("rc-service").args(["binpkgfs", action]))
}

/// The mountinfo line of the topmost mount on `dir`.
fn mountinfo_line(dir: &Path) -> Option<String> {
    let want = dir.to_str().unwrap();
    fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .rfind(|l| l.split(' ').nth(4).map(unescape).as_deref() == Some(want))
        .map(str::to_owned)
}

/// (filesystem type, source) of the topmost mount on `dir`.
fn mounted(dir: &Path) -> Option<(String, String)> {
    let line = mountinfo_line(dir)?;
    let fields: Vec<&str> = line.split(' ').collect();
    let sep = fields.iter().position(|f| *f == "-")?;
    Some((fields[sep + 1].to_owned(), unescape(fields[sep + 2])))
}

fn mount_count(dir: &Path) -> usize {
    let want = dir.to_str().unwrap();
    fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter(|l| l.split(' ').nth(4).map(unescape).as_deref() == Some(want))
        .count()
}

/// Undoes mountinfo's octal escapes (`\040` for a space, ...).
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let octal = (b[i] == b'\\')
            .then(|| b.get(i + 1..i + 4))
            .flatten()
            .and_then(|d| std::str::from_utf8(d).ok())
            .and_then(|d| u8::from_str_radix(d, 8).ok());
        match octal {
            Some(v) => {
                out.push(v);
                i += 4;
            }
            None => {
                out.push(b[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The pid in `pid_file`, which must name a running binpkgfs.
fn daemon_pid(pid_file: &Path) -> i32 {
    let text = fs::read_to_string(pid_file)
        .unwrap_or_else(|e| panic!("pid file {}: {e}", pid_file.display()));
    let pid: i32 = text
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("pid file holds {text:?}"));
    assert!(
        running(pid),
        "pid {pid} from {} is not running",
        pid_file.display()
    );
    let comm = fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
    assert_eq!(
        comm.trim(),
        "binpkgfs",
        "pid {pid} from {} is not binpkgfs",
        pid_file.display()
    );
    pid
}

/// True if `pid` exists and is not a zombie: in a container pid 1 may never reap the
/// detached daemon, so a zombie counts as gone.
fn running(pid: i32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => false,
        Ok(stat) => {
            let state = stat
                .rsplit_once(") ")
                .and_then(|(_, rest)| rest.chars().next());
            !matches!(state, Some('Z' | 'X'))
        }
    }
}

fn assert_daemon_exits(pid: i32) {
    wait_until(&format!("daemon {pid} to exit after unmount"), || {
        !running(pid)
    });
}

fn kill(pid: i32, sig: i32) {
    // SAFETY: kill(2) has no memory-safety preconditions.
    unsafe { libc::kill(pid, sig) };
}

fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + EXIT_TIMEOUT;
    while !done() {
        assert!(
            Instant::now() < deadline,
            "timed out after {EXIT_TIMEOUT:?} waiting for {what}"
        );
        sleep(Duration::from_millis(50));
    }
}

fn which(tool: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .chain(["/usr/sbin", "/sbin"].map(PathBuf::from))
        .map(|d| d.join(tool))
        .find(|p| p.is_file())
}

/// Fails, naming every missing part, unless this machine has what the tests drive.
fn require_real_parts(openrc: bool) {
    let mut missing = Vec::new();
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        missing
            .push("root (the tests install /sbin/mount.binpkgfs and an OpenRC service)".to_owned());
    }
    if !Path::new("/dev/fuse").exists() {
        missing.push("/dev/fuse (modprobe fuse; in a container pass the device)".to_owned());
    }
    let util_linux = Command::new("mount")
        .arg("--version")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("util-linux"));
    if !util_linux {
        missing.push("util-linux mount(8) (Debian: apt-get install mount)".to_owned());
    }
    if which("umount").is_none() {
        missing.push("umount (Debian: apt-get install mount)".to_owned());
    }
    if openrc {
        // The init script's interpreter, as Gentoo installs it.
        if !Path::new("/sbin/openrc-run").is_file() {
            missing.push("/sbin/openrc-run (Debian: apt-get install openrc)".to_owned());
        }
        for tool in ["rc-service", "rc-update", "start-stop-daemon"] {
            if which(tool).is_none() {
                missing.push(format!("{tool} (Debian: apt-get install openrc)"));
            }
        }
    }
    assert!(
        missing.is_empty(),
        "these system tests need real parts that are missing on this machine:\n  - {}",
        missing.join("\n  - ")
    );
}

// ---------------------------------------------------------------------------
// Helpers: global state, put back on drop
// ---------------------------------------------------------------------------

static LOCK: Mutex<()> = Mutex::new(());

/// This process's mutex plus an flock in /run/lock, so tests that change the system's
/// configuration never overlap, within or across test processes.
struct SystemLock {
    _file: File,
    _guard: MutexGuard<'static, ()>,
}

fn system_lock() -> SystemLock {
    let guard = LOCK.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    let dir = if Path::new("/run/lock").is_dir() {
        PathBuf::from("/run/lock")
    } else {
        std::env::temp_dir()
    };
    let path = dir.join("binpkgfs-system-tests.lock");
    let file = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .unwrap_or_else(|e| panic!("lock file {}: {e}", path.display()));
    // SAFETY: flock on an fd we own.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) };
    assert_eq!(
        rc,
        0,
        "flock {}: {}",
        path.display(),
        std::io::Error::last_os_error()
    );
    SystemLock {
        _file: file,
        _guard: guard,
    }
}

/// A file put where the system looks for it. Whatever was there is moved aside and put
/// back on drop.
struct Installed {
    path: PathBuf,
    saved: Option<PathBuf>,
}

impl Installed {
    fn new(path: &str, contents: &[u8], mode: u32) -> Installed {
        let path = PathBuf::from(path);
        let aside = PathBuf::from(format!("{}.binpkgfs-test-saved", path.display()));
        let saved = if aside.exists() {
            // Left by a test run that was killed: that is the original, keep it.
            Some(aside)
        } else if fs::symlink_metadata(&path).is_ok() {
            fs::rename(&path, &aside).unwrap();
            Some(aside)
        } else {
            None
        };
        fs::write(&path, contents).unwrap_or_else(|e| panic!("installing {}: {e}", path.display()));
        fs::set_permissions(&path, fs::Permissions::from_mode(mode)).unwrap();
        Installed { path, saved }
    }
}

impl Drop for Installed {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.path);
        if let Some(saved) = &self.saved {
            let _ = fs::rename(saved, &self.path);
        }
    }
}

/// What the OpenRC tests share: the system lock, a binhost, and the service installed with a
/// mount point (not created: the service makes it) in a scratch directory, guarded so that
/// whatever is left mounted is unmounted. Fields drop in order: service, unmount, the rest.
struct ServiceCase {
    _openrc: OpenRc,
    _cleanup: MountGuard,
    mnt: PathBuf,
    _tmp: TempDir,
    binhost: Binhost,
    _lock: SystemLock,
}

impl ServiceCase {
    fn new() -> ServiceCase {
        let lock = system_lock();
        require_real_parts(true);
        let binhost = Binhost::new();
        let tmp = TempDir::with_prefix("binpkgfs-system.").unwrap();
        let mnt = tmp.path().join("binpkgs");
        ServiceCase {
            _openrc: OpenRc::install(&service_conf(&binhost.url(), &mnt, tmp.path())),
            _cleanup: MountGuard::new(&mnt, Path::new(SERVICE_PIDFILE)),
            mnt,
            _tmp: tmp,
            binhost,
            _lock: lock,
        }
    }
}

/// What the mount(8) tests share: the system lock, the helper installed, a binhost, and a
/// scratch directory with a mount point and a pid file, guarded so that whatever is left
/// mounted is unmounted. Fields drop in order: unmount, scratch, binhost, helper, lock.
struct HelperCase {
    _cleanup: MountGuard,
    tmp: TempDir,
    mnt: PathBuf,
    pid_file: PathBuf,
    binhost: Binhost,
    _helper: Installed,
    _lock: SystemLock,
}

impl HelperCase {
    fn new() -> HelperCase {
        let lock = system_lock();
        require_real_parts(false);
        let helper = install_helper();
        let binhost = Binhost::new();
        let tmp = TempDir::with_prefix("binpkgfs-system.").unwrap();
        let mnt = mkdir(tmp.path(), "pkgdir");
        let pid_file = tmp.path().join("binpkgfs.pid");
        HelperCase {
            _cleanup: MountGuard::new(&mnt, &pid_file),
            tmp,
            mnt,
            pid_file,
            binhost,
            _helper: helper,
            _lock: lock,
        }
    }
}

fn install_helper() -> Installed {
    let helper = fs::read(Path::new(ROOT).join("mount-helpers/mount.binpkgfs")).unwrap();
    Installed::new(HELPER, &helper, 0o755)
}

/// Makes sure nothing outlives a test: unmounts `dir` and kills the daemon named by
/// `pid_file` if they are still there when the test ends (normally they are not).
struct MountGuard {
    dir: PathBuf,
    pid_file: PathBuf,
}

impl MountGuard {
    fn new(dir: &Path, pid_file: &Path) -> MountGuard {
        MountGuard {
            dir: dir.to_owned(),
            pid_file: pid_file.to_owned(),
        }
    }
}

impl Drop for MountGuard {
    fn drop(&mut self) {
        let pid = fs::read_to_string(&self.pid_file)
            .ok()
            .and_then(|t| t.trim().parse::<i32>().ok());
        while mounted(&self.dir).is_some() {
            let ok = Command::new("umount")
                .arg("-l")
                .arg(&self.dir)
                .stderr(Stdio::null())
                .status();
            if !ok.is_ok_and(|s| s.success()) {
                break;
            }
        }
        if let Some(pid) = pid.filter(|&p| running(p)) {
            let comm = fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
            if comm.trim() == "binpkgfs" {
                kill(pid, libc::SIGKILL);
            }
        }
    }
}

/// The conf.d text for a service mounting `url` on `mnt`, with everything else under `tmp`.
fn service_conf(url: &str, mnt: &Path, tmp: &Path) -> String {
    let url_line = if url.is_empty() {
        String::new()
    } else {
        format!("BINPKGFS_URL=\"{url}\"\n")
    };
    format!(
        "# written by tests/system.rs\n{url_line}\
         BINPKGFS_MOUNTPOINT=\"{}\"\n\
         BINPKGFS_CACHE_DIR=\"{}\"\n\
         BINPKGFS_LOGFILE=\"{}\"\n\
         BINPKGFS_BIN=\"{BIN}\"\n\
         BINPKGFS_OPTS=\"--log-level debug\"\n",
        mnt.display(),
        tmp.join("cache").display(),
        tmp.join("log/binpkgfs.log").display(),
    )
}

/// The binpkgfs service installed into a usable OpenRC: init script and conf.d in place,
/// OpenRC's run state set up as if it had booted the machine, and a stand-in for
/// `localmount`/`net` if the machine has no `localmount`. Drop stops the service and
/// removes everything it added.
struct OpenRc {
    created_run_dir: bool,
    created_softlevel: bool,
    created_conf_dir: bool,
    deps_stub: Option<Installed>,
    files: Vec<Installed>,
}

impl OpenRc {
    fn install(conf: &str) -> OpenRc {
        let run_dir = Path::new("/run/openrc");
        let softlevel = run_dir.join("softlevel");
        let created_run_dir = !run_dir.exists();
        let created_softlevel = !softlevel.exists();
        let created_conf_dir = !Path::new(CONF_DIR).exists();
        // Checked before anything is installed: dropping the guard stops `binpkgfs`.
        let live = fs::read_to_string(SERVICE_PIDFILE)
            .ok()
            .and_then(|t| t.trim().parse::<i32>().ok())
            .filter(|&pid| running(pid));
        assert!(
            live.is_none(),
            "a binpkgfs service is running on this machine ({SERVICE_PIDFILE}); \
             stop it before running the system tests"
        );
        let mut env = OpenRc {
            created_run_dir,
            created_softlevel,
            created_conf_dir,
            deps_stub: None,
            files: Vec::new(),
        };
        if created_conf_dir {
            fs::create_dir_all(CONF_DIR).unwrap();
        }
        let script = fs::read(Path::new(ROOT).join("openrc/init.d/binpkgfs")).unwrap();
        env.files.push(Installed::new(INIT_SCRIPT, &script, 0o755));
        env.files
            .push(Installed::new(CONF_FILE, conf.as_bytes(), 0o644));
        if !Path::new("/etc/init.d/localmount").exists() {
            env.deps_stub = Some(Installed::new(
                DEPS_STUB,
                DEPS_STUB_SCRIPT.as_bytes(),
                0o755,
            ));
        }
        // rc-update -u builds the dependency tree and creates OpenRC's state directories;
        // softlevel is what tells rc-service that OpenRC booted this machine.
        let r = run(Command::new("rc-update").arg("-u"));
        assert!(r.ok(), "rc-update -u failed:\n{}", r.out);
        if created_softlevel {
            fs::write(&softlevel, "default\n").unwrap();
        }
        env
    }
}

impl Drop for OpenRc {
    fn drop(&mut self) {
        let quiet = |args: &[&str]| {
            let _ = Command::new("rc-service")
                .args(args)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        };
        quiet(&["binpkgfs", "stop"]);
        quiet(&["binpkgfs", "zap"]);
        if self.deps_stub.is_some() {
            quiet(&["binpkgfs-test-deps", "stop"]);
            quiet(&["binpkgfs-test-deps", "zap"]);
        }
        let _ = fs::remove_file(SERVICE_PIDFILE);
        self.files.clear();
        self.deps_stub = None;
        if self.created_conf_dir {
            let _ = fs::remove_dir(CONF_DIR);
        }
        if self.created_run_dir {
            let _ = fs::remove_dir_all("/run/openrc");
        } else {
            if self.created_softlevel {
                let _ = fs::remove_file("/run/openrc/softlevel");
            }
            // Forget the removed services in the cached dependency tree.
            let _ = Command::new("rc-update")
                .arg("-u")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    }
}
