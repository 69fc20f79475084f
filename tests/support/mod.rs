//! Real parts for the integration tests: a real nginx, real FUSE mounts of the
//! real `binpkgfs` binary and real Portage sandboxes.
//!
//! Nothing here is mocked and nothing is silently skipped: a test that needs a
//! part calls [`require_real_parts`] first and fails loudly when the machine is
//! not set up (`bash .ci/run` sets it up). Every guard cleans up in `Drop`, so a
//! failing test leaves no nginx, no daemon and no mount behind.
//!
//! Each `tests/*.rs` file includes this with `mod support;`; not every test
//! uses every helper, hence the `dead_code` allowance.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{self, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::symlink;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant, SystemTime};

use tempfile::TempDir;

mod sshd;
#[allow(unused_imports)]
pub use sshd::{SSH_ALIAS, Sshd, require_sshd};

/// How long `binpkgfs mount` may take to answer before a test gives up.
pub const MOUNT_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a daemon may take to exit after its filesystem was unmounted.
pub const EXIT_TIMEOUT: Duration = Duration::from_secs(20);
/// How long one `emerge` run may take before a test gives up.
pub const EMERGE_TIMEOUT: Duration = Duration::from_secs(300);

// ---------------------------------------------------------------------------
// Locations and preconditions
// ---------------------------------------------------------------------------

/// The crate's root directory.
pub fn crate_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The committed ebuild repository the fixture binhost was built from.
pub fn fixture_repo() -> PathBuf {
    crate_root().join("tests/fixtures/repo")
}

/// The committed binhost. Never mutate it: use [`copy_fixture_binhost`].
pub fn fixture_binhost() -> PathBuf {
    crate_root().join("tests/fixtures/binhost")
}

/// The Portage virtualenv: `$BINPKGFS_PORTAGE_VENV`, default `/opt/portage-venv`.
pub fn portage_venv() -> PathBuf {
    std::env::var_os("BINPKGFS_PORTAGE_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/opt/portage-venv"))
}

/// The `binpkgfs` executable Cargo built for this test run.
pub fn binpkgfs_bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_binpkgfs"))
}

/// A `file://` URL for a local directory.
pub fn file_url(path: &Path) -> String {
    format!("file://{}", path.display())
}

/// Finds `name` on `$PATH`.
pub fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
}

/// Panics, naming every missing piece, unless nginx, FUSE, Portage and the
/// tools Portage needs are all present. Real parts are never skipped.
/// The fixture's `app-misc/demo-big` (an 8 MiB package kept out of the committed fixture),
/// built by real Portage once per test binary; the binhost directory holding it.
pub fn big_binhost() -> PathBuf {
    static DIR: std::sync::OnceLock<TempDir> = std::sync::OnceLock::new();
    DIR.get_or_init(|| {
        require_real_parts();
        let dir = TempDir::with_prefix("binpkgfs-big.").unwrap();
        run_ok(
            Command::new("bash")
                .arg(crate_root().join("tests/fixtures/make-binhost.sh"))
                .arg(dir.path())
                .arg("app-misc/demo-big"),
        );
        dir
    })
    .path()
    .to_path_buf()
}

pub fn require_real_parts() {
    let mut missing = Vec::new();
    if !Path::new(NGINX).is_file() {
        missing.push(format!("nginx binary ({NGINX})"));
    }
    if !Path::new("/dev/fuse").exists() {
        missing.push("/dev/fuse (modprobe fuse)".to_owned());
    }
    for tool in ["fusermount3", "umount", "zstd", "tar", "gtar", "wget"] {
        if which(tool).is_none() {
            missing.push(format!("`{tool}` on PATH"));
        }
    }
    // Portage signs and verifies with /usr/bin/gpg (make.globals), signing under /usr/bin/flock.
    for tool in ["/usr/bin/gpg", "/usr/bin/gpgconf", "/usr/bin/flock"] {
        if !Path::new(tool).is_file() {
            missing.push(format!("{tool} (Debian: gnupg, util-linux)"));
        }
    }
    let emerge = portage_venv().join("bin/emerge");
    if !emerge.is_file() {
        missing.push(format!(
            "the Portage venv ({} not found; set BINPKGFS_PORTAGE_VENV)",
            emerge.display()
        ));
    }
    if !user_exists("portage") {
        missing.push("the `portage` user and group (uid/gid 250)".to_owned());
    }
    assert!(
        missing.is_empty(),
        "these tests need real parts that are missing on this machine:\n  - {}\n\
         Run `bash .ci/run` (as root) to install and set them up.",
        missing.join("\n  - ")
    );
}

fn user_exists(name: &str) -> bool {
    fs::read_to_string("/etc/passwd").is_ok_and(|passwd| {
        passwd
            .lines()
            .any(|line| line.split(':').next() == Some(name))
    })
}

// ---------------------------------------------------------------------------
// The fixture binhost
// ---------------------------------------------------------------------------

/// One package entry of a `Packages` index, as `KEY -> value`.
pub type IndexEntry = BTreeMap<String, String>;

/// Parses a `Packages` index the way Portage does: header block first, then
/// blank-line separated entries; `KEY: value` split on the first `:`.
/// Returns `(header, entries)`.
pub fn parse_packages(text: &str) -> (IndexEntry, Vec<IndexEntry>) {
    let mut blocks = text
        .split("\n\n")
        .filter(|block| !block.trim().is_empty())
        .map(|block| {
            block
                .lines()
                .filter_map(|line| line.split_once(':'))
                .map(|(key, value)| (key.to_owned(), value.trim_start().to_owned()))
                .collect::<IndexEntry>()
        });
    let header = blocks.next().unwrap_or_default();
    (header, blocks.collect())
}

/// The committed fixture's package entries.
pub fn fixture_packages() -> Vec<IndexEntry> {
    let text = fs::read_to_string(fixture_binhost().join("Packages"))
        .expect("read tests/fixtures/binhost/Packages");
    parse_packages(&text).1
}

/// Copies the committed fixture binhost to `dst` (created if needed) and gives
/// every package file the mtime its index entry records. Git does not keep
/// mtimes, so a fresh checkout would otherwise disagree with `MTIME`, unlike a
/// real binhost.
/// The copy publishes `Packages` only (its `Packages.gz` is removed), so a test that rewrites
/// `Packages` publishes the whole index; `tests/sources.rs` covers `Packages.gz`.
pub fn copy_fixture_binhost(dst: &Path) {
    copy_tree(&fixture_binhost(), dst).expect("copy the fixture binhost");
    let _ = fs::remove_file(dst.join("Packages.gz"));
    for entry in fixture_packages() {
        let path = dst.join(&entry["PATH"]);
        let mtime: u64 = entry["MTIME"].parse().expect("numeric MTIME");
        File::options()
            .write(true)
            .open(&path)
            .and_then(|file| file.set_modified(SystemTime::UNIX_EPOCH + Duration::from_secs(mtime)))
            .unwrap_or_else(|err| panic!("set mtime of {}: {err}", path.display()));
    }
}

/// Copies the binhost at `src` to `dst` as a plain local PKGDIR: every package file present
/// gets the mtime its index entry records; entries without a file stay absent.
pub fn copy_binhost(src: &Path, dst: &Path) {
    copy_tree(src, dst).expect("copy the binhost");
    let text = fs::read_to_string(dst.join("Packages")).expect("read the copy's Packages");
    for entry in parse_packages(&text).1 {
        let (Some(rel), Some(mtime)) = (entry.get("PATH"), entry.get("MTIME")) else {
            continue;
        };
        let mtime: u64 = mtime.parse().expect("numeric MTIME");
        let path = dst.join(rel);
        if path.is_file() {
            File::options()
                .write(true)
                .open(&path)
                .and_then(|f| f.set_modified(SystemTime::UNIX_EPOCH + Duration::from_secs(mtime)))
                .unwrap_or_else(|err| panic!("set mtime of {}: {err}", path.display()));
        }
    }
}

/// Recursively copies the directory `src` into `dst` (files and directories only).
pub fn copy_tree(src: &Path, dst: &Path) -> io::Result<()> {
    fs::create_dir_all(dst)?;
    for entry in fs::read_dir(src)? {
        let entry = entry?;
        let target = dst.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_tree(&entry.path(), &target)?;
        } else {
            fs::copy(entry.path(), &target)?;
        }
    }
    Ok(())
}

/// Unpacks the image of the gpkg at `gpkg` into `dest` with the `tar` and
/// `zstd` tools and returns the directory that corresponds to the installed
/// root: `dest/image/<EPREFIX the package was built with>`.
pub fn extract_gpkg_image(gpkg: &Path, dest: &Path) -> PathBuf {
    let outer = dest.join("gpkg");
    fs::create_dir_all(&outer).expect("create gpkg extraction dir");
    run_ok(
        Command::new("tar")
            .arg("-xf")
            .arg(gpkg)
            .arg("-C")
            .arg(&outer),
    );
    // The gpkg holds one directory, `<pf>-<build id>/`.
    let member_dir = fs::read_dir(&outer)
        .expect("read extracted gpkg")
        .next()
        .expect("gpkg has a top-level directory")
        .expect("read extracted gpkg")
        .path();
    run_ok(
        Command::new("tar")
            .arg("--use-compress-program=zstd")
            .arg("-xf")
            .arg(member_dir.join("metadata.tar.zst"))
            .arg("-C")
            .arg(dest),
    );
    run_ok(
        Command::new("tar")
            .arg("--use-compress-program=zstd")
            .arg("-xf")
            .arg(member_dir.join("image.tar.zst"))
            .arg("-C")
            .arg(dest),
    );
    let eprefix = fs::read_to_string(dest.join("metadata/EPREFIX")).unwrap_or_default();
    dest.join("image")
        .join(eprefix.trim().trim_start_matches('/'))
}

/// The hex digest of `bytes` by a coreutils tool (`sha1sum`, `md5sum`), as an index would
/// carry it.
pub fn digest_hex(tool: &str, bytes: &[u8]) -> String {
    let dir = TempDir::new().expect("digest temp dir");
    let file = dir.path().join("data");
    fs::write(&file, bytes).expect("write digest input");
    let out = Command::new(tool)
        .arg(&file)
        .output()
        .expect("run digest tool");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or_else(|| panic!("{tool} printed nothing"))
        .to_string()
}

/// Every non-directory below `root`, as sorted paths relative to `root`.
pub fn list_files(root: &Path) -> Vec<PathBuf> {
    fn walk(root: &Path, dir: &Path, files: &mut Vec<PathBuf>) {
        for entry in fs::read_dir(dir).expect("read dir").map(Result::unwrap) {
            let path = entry.path();
            if entry.file_type().expect("file type").is_dir() {
                walk(root, &path, files);
            } else {
                files.push(path.strip_prefix(root).expect("below root").to_owned());
            }
        }
    }
    let mut files = Vec::new();
    walk(root, root, &mut files);
    files.sort();
    files
}

/// Runs `cmd` to completion and panics, with its output, unless it succeeded.
pub fn run_ok(cmd: &mut Command) -> Output {
    let output = cmd
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|err| panic!("run {cmd:?}: {err}"));
    assert!(
        output.status.success(),
        "{cmd:?} failed: {}",
        describe(&output)
    );
    output
}

// ---------------------------------------------------------------------------
// Processes
// ---------------------------------------------------------------------------

/// Polls `done` every 50 ms until it returns true or `timeout` passes.
pub fn wait_until(timeout: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if done() {
            return true;
        }
        if std::time::Instant::now() >= deadline {
            return false;
        }
        thread::sleep(Duration::from_millis(50));
    }
}

/// Runs `cmd` with stdin closed and stdout/stderr captured through files in
/// `scratch` rather than pipes: a daemon that forks and keeps the inherited
/// descriptors cannot make us wait forever. `cmd` runs in its own process
/// group, which is killed if it outlives `timeout`; `None` means it timed out.
pub fn run_captured(cmd: &mut Command, scratch: &Path, timeout: Duration) -> Option<Output> {
    static RUNS: AtomicUsize = AtomicUsize::new(0);
    let n = RUNS.fetch_add(1, Ordering::Relaxed);
    let out_path = scratch.join(format!("run-{n}.stdout"));
    let err_path = scratch.join(format!("run-{n}.stderr"));
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(File::create(&out_path).expect("create stdout capture"))
        .stderr(File::create(&err_path).expect("create stderr capture"))
        .process_group(0)
        .spawn()
        .unwrap_or_else(|err| panic!("spawn {cmd:?}: {err}"));
    let mut status = None;
    wait_until(timeout, || {
        status = child.try_wait().expect("wait for child");
        status.is_some()
    });
    let Some(status) = status else {
        kill_group(&mut child);
        return None;
    };
    Some(Output {
        status,
        stdout: fs::read(&out_path).unwrap_or_default(),
        stderr: fs::read(&err_path).unwrap_or_default(),
    })
}

fn kill_group(child: &mut Child) {
    if let Ok(pid) = i32::try_from(child.id()) {
        // SAFETY: plain kill(2) on the process group we created for this child.
        unsafe { libc::kill(-pid, libc::SIGKILL) };
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// Whether `pid` still runs. A zombie counts as gone: a daemonized process is
/// reparented to PID 1, which in a container may never reap it.
pub fn process_alive(pid: i32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the command name, which is in parentheses.
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X"),
        Err(_) => false,
    }
}

fn describe(output: &Output) -> String {
    format!(
        "{}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

// ---------------------------------------------------------------------------
// nginx
// ---------------------------------------------------------------------------

const NGINX: &str = "/usr/sbin/nginx";

/// The path prefix of [`Nginx::sync_log`]'s marker requests (nothing serves it: 404).
const SYNC_MARKER: &str = "/.binpkgfs-log-sync-";

/// One line of the access log of an [`Nginx`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogLine {
    pub method: String,
    /// The request target as the client sent it (`$request_uri`).
    pub uri: String,
    pub status: u16,
    /// Response body bytes sent (`$body_bytes_sent`).
    pub bytes_sent: u64,
    /// The request's `Range` header, if it had one.
    pub range: Option<String>,
}

impl LogLine {
    fn parse(line: &str) -> Option<LogLine> {
        let mut fields = line.split('\t');
        let method = fields.next()?.to_owned();
        let uri = fields.next()?.to_owned();
        let status = fields.next()?.parse().ok()?;
        let bytes_sent = fields.next()?.parse().ok()?;
        let range = match fields.next()? {
            "-" => None,
            range => Some(range.to_owned()),
        };
        Some(LogLine {
            method,
            uri,
            status,
            bytes_sent,
            range,
        })
    }

    /// Whether this request asked for a package file rather than an index.
    pub fn is_package(&self) -> bool {
        let path = self.uri.split('?').next().unwrap_or_default();
        [".gpkg.tar", ".tbz2", ".xpak"]
            .iter()
            .any(|ext| path.ends_with(ext))
    }
}

/// A real nginx serving a directory on 127.0.0.1, killed on drop.
pub struct Nginx {
    child: Option<Child>,
    dir: TempDir,
    port: u16,
}

impl Nginx {
    /// Starts nginx serving `root` and returns once its port answers.
    pub fn start(root: &Path) -> Nginx {
        Nginx::start_with(root, "")
    }

    /// Like `start`, with each connection capped at `rate` (nginx `limit_rate`, e.g. `8m`).
    pub fn start_limited(root: &Path, rate: &str) -> Nginx {
        Nginx::start_with(root, &format!("limit_rate {rate};"))
    }

    /// Like `start`, with more `http`-level directives (`auth_basic`, ...).
    pub fn start_with(root: &Path, directives: &str) -> Nginx {
        // A free port can be taken by someone else before nginx binds it:
        // retry with another one.
        let mut last_error = String::new();
        for _ in 0..5 {
            match Nginx::try_start(root, directives) {
                Ok(nginx) => return nginx,
                Err(err) => last_error = err,
            }
        }
        panic!("nginx did not start: {last_error}");
    }

    fn try_start(root: &Path, directives: &str) -> Result<Nginx, String> {
        let dir = TempDir::with_prefix("binpkgfs-nginx.").expect("nginx temp dir");
        let port = free_port();
        let conf = dir.path().join("nginx.conf");
        fs::write(&conf, nginx_conf(dir.path(), root, port, directives)).expect("write nginx.conf");
        let child = Command::new(NGINX)
            .arg("-c")
            .arg(&conf)
            .arg("-p")
            .arg(dir.path())
            .arg("-e")
            .arg(dir.path().join("error.log"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|err| panic!("spawn {NGINX}: {err}"));
        let mut nginx = Nginx {
            child: Some(child),
            dir,
            port,
        };
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let mut exited = false;
        let up = wait_until(Duration::from_secs(10), || {
            exited = nginx.has_exited();
            exited || TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
        });
        if up && !exited {
            return Ok(nginx);
        }
        let log = fs::read_to_string(nginx.dir.path().join("error.log")).unwrap_or_default();
        nginx.stop();
        Err(format!("port {port}: {}", log.trim()))
    }

    fn has_exited(&mut self) -> bool {
        self.child
            .as_mut()
            .is_none_or(|child| child.try_wait().ok().flatten().is_some())
    }

    /// `http://127.0.0.1:PORT` (no trailing slash).
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    fn access_log(&self) -> PathBuf {
        self.dir.path().join("access.log")
    }

    /// Every request logged since start (or the last [`Nginx::clear_log`]),
    /// without the markers of [`Nginx::sync_log`]. nginx logs a request just
    /// after sending its last byte, which a fast client can beat: call
    /// `sync_log` (or wait for the line) before relying on what is missing.
    pub fn requests(&self) -> Vec<LogLine> {
        self.all_requests()
            .into_iter()
            .filter(|line| !line.uri.starts_with(SYNC_MARKER))
            .collect()
    }

    fn all_requests(&self) -> Vec<LogLine> {
        let text = fs::read_to_string(self.access_log()).unwrap_or_default();
        text.lines()
            .map(|line| {
                LogLine::parse(line).unwrap_or_else(|| panic!("bad access log line {line:?}"))
            })
            .collect()
    }

    /// Returns once every request whose answer a client has received whole is
    /// in the access log: sends a marker request of its own and waits (with a
    /// deadline, failing the test) for its line. One nginx worker handles the
    /// requests in turn and logs each as it ends, so the earlier ones come first.
    pub fn sync_log(&self) {
        static MARKERS: AtomicUsize = AtomicUsize::new(0);
        let marker = format!("{SYNC_MARKER}{}", MARKERS.fetch_add(1, Ordering::Relaxed));
        let mut conn = TcpStream::connect(("127.0.0.1", self.port)).expect("connect to nginx");
        write!(conn, "GET {marker} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
            .and_then(|()| io::copy(&mut conn, &mut io::sink()).map(drop))
            .expect("marker request to nginx");
        let logged = wait_until(Duration::from_secs(10), || {
            self.all_requests().iter().any(|line| line.uri == marker)
        });
        assert!(logged, "nginx did not log {marker} within 10 s");
    }

    /// Waits (failing the test after `timeout`) until at least `n` logged requests satisfy
    /// `pred`, and returns them.
    pub fn wait_for_requests(
        &self,
        n: usize,
        timeout: Duration,
        pred: impl Fn(&LogLine) -> bool,
    ) -> Vec<LogLine> {
        let mut seen = Vec::new();
        let enough = wait_until(timeout, || {
            seen = self.requests().into_iter().filter(|l| pred(l)).collect();
            seen.len() >= n
        });
        assert!(
            enough,
            "nginx logged {} matching requests within {timeout:?}, want {n}: {seen:#?}",
            seen.len()
        );
        seen
    }

    /// How many logged requests satisfy `pred`.
    pub fn count_matching(&self, pred: impl Fn(&LogLine) -> bool) -> usize {
        self.requests().iter().filter(|line| pred(line)).count()
    }

    /// Forgets every request logged so far. nginx appends (`O_APPEND`), so
    /// truncating the file under it is safe.
    pub fn clear_log(&self) {
        File::options()
            .write(true)
            .open(self.access_log())
            .and_then(|file| file.set_len(0))
            .expect("truncate nginx access log");
    }

    /// Stops nginx (SIGTERM, then SIGKILL after 5 s) and waits for it.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        if let Ok(pid) = i32::try_from(child.id()) {
            // SAFETY: plain kill(2) on our own child.
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
        let exited = wait_until(Duration::from_secs(5), || {
            child.try_wait().ok().flatten().is_some()
        });
        if !exited {
            let _ = child.kill();
        }
        let _ = child.wait();
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        self.stop();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("find a free port")
        .port()
}

/// A single-process nginx (`master_process off`, so one kill stops it all)
/// that keeps every file it writes in `dir`.
fn nginx_conf(dir: &Path, root: &Path, port: u16, limit: &str) -> String {
    let dir = dir.display();
    let root = root.display();
    format!(
        r#"user root;
daemon off;
master_process off;
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;

events {{
    worker_connections 256;
}}

http {{
    log_format binpkgfs '$request_method\t$request_uri\t$status\t$body_bytes_sent\t$http_range';
    access_log {dir}/access.log binpkgfs;
    client_body_temp_path {dir}/client_body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    default_type application/octet-stream;
    sendfile on;
    keepalive_requests 100000;
    {limit}

    server {{
        listen 127.0.0.1:{port};
        root {root};
        location / {{
        }}
    }}
}}
"#
    )
}

// ---------------------------------------------------------------------------
// nginx over TLS
// ---------------------------------------------------------------------------

/// Kills the TLS nginx however the test ends.
pub struct Killed(pub std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A real nginx serving the fixture over HTTPS with a certificate for 127.0.0.1 that no system
/// store trusts, with more `server` directives. Returns (url, the CA's PEM, the nginx guard,
/// its temp dir).
pub fn tls_nginx(root: &Path, directives: &str) -> (String, PathBuf, Killed, TempDir) {
    let dir = TempDir::with_prefix("binpkgfs-tls.").unwrap();
    // A throwaway CA and a server certificate for 127.0.0.1 signed by it.
    let p = |name: &str| dir.path().join(name);
    let (key, cert, ca) = (p("key.pem"), p("cert.pem"), p("ca.pem"));
    fs::write(
        p("ext.cnf"),
        "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n",
    )
    .unwrap();
    let openssl = |args: &[&str]| {
        run_ok(Command::new("openssl").current_dir(dir.path()).args(args));
    };
    openssl(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "1",
        "-subj",
        "/CN=binpkgfs test CA",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
    ]);
    openssl(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-subj",
        "/CN=127.0.0.1",
        "-keyout",
        "key.pem",
        "-out",
        "leaf.csr",
    ]);
    openssl(&[
        "x509",
        "-req",
        "-in",
        "leaf.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "1",
        "-extfile",
        "ext.cnf",
        "-out",
        "cert.pem",
    ]);
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let d = dir.path().display();
    let conf = format!(
        "daemon off; master_process off; user root; error_log {d}/error.log; pid {d}/nginx.pid;\n\
         events {{}}\n\
         http {{ access_log off; client_body_temp_path {d}; proxy_temp_path {d};\n\
           fastcgi_temp_path {d}; uwsgi_temp_path {d}; scgi_temp_path {d};\n\
           server {{ listen 127.0.0.1:{port} ssl; ssl_certificate {}; ssl_certificate_key {};\n\
             root {}; {directives} }} }}\n",
        cert.display(),
        key.display(),
        root.display()
    );
    fs::write(dir.path().join("nginx.conf"), conf).unwrap();
    let child = Killed(
        Command::new("/usr/sbin/nginx")
            .arg("-c")
            .arg(dir.path().join("nginx.conf"))
            .arg("-p")
            .arg(dir.path())
            .spawn()
            .unwrap(),
    );
    let up = wait_until(Duration::from_secs(10), || {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    });
    assert!(up, "TLS nginx did not start");
    (format!("https://127.0.0.1:{port}"), ca, child, dir)
}

// ---------------------------------------------------------------------------
// Portage
// ---------------------------------------------------------------------------

/// A fresh Portage prefix S that installs binary packages from `pkgdir`.
///
/// Layout, as in TESTING-WITH-PORTAGE.md: `S/etc/portage/make.conf`,
/// `S/etc/portage/make.profile` -> the fixture repo's profile,
/// `S/share/portage/config` -> the venv's defaults, `S/var/db/pkg`,
/// `S/var/cache/edb/counter`. Installed files land under S.
pub struct PortageSandbox {
    dir: TempDir,
    pkgdir: PathBuf,
    repo: PathBuf,
    features: Vec<String>,
}

impl PortageSandbox {
    /// A sandbox on the fixture repository (its profile, its ebuilds).
    pub fn new(pkgdir: &Path) -> PortageSandbox {
        PortageSandbox::with_repo(pkgdir, &fixture_repo())
    }

    /// A sandbox whose only repository (and profile, `REPO/profiles/default`) is `repo`.
    pub fn with_repo(pkgdir: &Path, repo: &Path) -> PortageSandbox {
        let dir = TempDir::with_prefix("binpkgfs-portage.").expect("sandbox temp dir");
        let s = dir.path();
        for sub in [
            "etc/portage",
            "share/portage",
            "var/db/pkg",
            "var/cache/edb",
            "var/tmp",
            "distfiles",
            "capture",
        ] {
            fs::create_dir_all(s.join(sub)).expect("create sandbox dirs");
        }
        symlink(
            portage_venv().join("share/portage/config"),
            s.join("share/portage/config"),
        )
        .expect("link Portage defaults");
        symlink(
            repo.join("profiles/default"),
            s.join("etc/portage/make.profile"),
        )
        .expect("link profile");
        fs::write(s.join("var/cache/edb/counter"), "0").expect("write counter");
        let make_conf = format!(
            r#"PKGDIR="{pkgdir}"
DISTDIR="{s}/distfiles"
PORTAGE_TMPDIR="{s}/var/tmp"
ACCEPT_LICENSE="*"
BINPKG_FORMAT="gpkg"
PORTAGE_USERNAME="root"
PORTAGE_GRPNAME="root"
NOCOLOR="true"
FEATURES="-sandbox -usersandbox -userpriv -userfetch -ipc-sandbox -network-sandbox -pid-sandbox -mount-sandbox -news -binpkg-request-signature"
"#,
            pkgdir = pkgdir.display(),
            s = s.display(),
        );
        fs::write(s.join("etc/portage/make.conf"), make_conf).expect("write make.conf");
        PortageSandbox {
            dir,
            pkgdir: pkgdir.to_owned(),
            repo: repo.to_owned(),
            features: Vec::new(),
        }
    }

    /// The prefix S.
    pub fn root(&self) -> &Path {
        self.dir.path()
    }

    pub fn pkgdir(&self) -> &Path {
        &self.pkgdir
    }

    /// Adds FEATURES for later `emerge` runs, e.g. `-pkgdir-index-trusted`.
    pub fn add_feature(&mut self, feature: &str) -> &mut Self {
        self.features.push(feature.to_owned());
        self
    }

    /// Runs `emerge ARGS` in this sandbox; panics if it outlives
    /// [`EMERGE_TIMEOUT`].
    pub fn emerge(&self, args: &[&str]) -> Output {
        let venv = portage_venv();
        let mut cmd = Command::new(venv.join("bin/emerge"));
        cmd.args(args)
            .env("PORTAGE_OVERRIDE_EPREFIX", self.root())
            .env(
                "PORTAGE_REPOSITORIES",
                format!(
                    "[DEFAULT]\nmain-repo = binpkgfs-test\n[binpkgfs-test]\nlocation = {}\n",
                    self.repo.display()
                ),
            )
            .env("FEATURES", self.features.join(" "))
            .env(
                "PATH",
                format!("{}:{}", venv.join("bin").display(), host_path()),
            )
            // Keep the host's Portage settings out of the sandbox.
            .env_remove("ROOT")
            .env_remove("PORTAGE_CONFIGROOT")
            .env_remove("PKGDIR")
            .env_remove("PORTAGE_BINHOST")
            .env_remove("EMERGE_DEFAULT_OPTS")
            .current_dir(self.root());
        run_captured(&mut cmd, &self.root().join("capture"), EMERGE_TIMEOUT)
            .unwrap_or_else(|| panic!("emerge {args:?} did not finish within {EMERGE_TIMEOUT:?}"))
    }

    /// Like [`PortageSandbox::emerge`], but panics with emerge's output
    /// unless it succeeded.
    pub fn emerge_ok(&self, args: &[&str]) -> Output {
        let output = self.emerge(args);
        assert!(
            output.status.success(),
            "emerge {args:?} failed: {}",
            describe(&output)
        );
        output
    }

    /// Installed packages as sorted `cat/pf`, read from `S/var/db/pkg`.
    pub fn installed(&self) -> Vec<String> {
        let db = self.root().join("var/db/pkg");
        let mut installed = Vec::new();
        for cat in read_dir_names(&db) {
            for pf in read_dir_names(&db.join(&cat)) {
                // Skip Portage's in-progress and lock entries.
                if !pf.starts_with('.') && !pf.starts_with("-MERGING-") {
                    installed.push(format!("{cat}/{pf}"));
                }
            }
        }
        installed.sort();
        installed
    }
}

/// Writes into `dir` an ebuild repository with no ebuilds, just enough for Portage to resolve
/// binary packages of a real amd64 binhost whose index is `packages`: every category the index
/// names, a profile accepting `amd64 ~amd64`. Returns `dir`.
pub fn binary_only_repo(dir: &Path, packages: &str) -> PathBuf {
    let categories: Vec<String> = parse_packages(packages)
        .1
        .iter()
        .filter_map(|e| Some(e.get("CPV")?.split('/').next()?.to_owned()))
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    let files = [
        ("profiles/repo_name", "binpkgfs-test\n".to_owned()),
        ("profiles/arch.list", "amd64\n".to_owned()),
        ("profiles/categories", categories.join("\n") + "\n"),
        ("profiles/default/eapi", "8\n".to_owned()),
        (
            "profiles/default/make.defaults",
            "ARCH=\"amd64\"\nACCEPT_KEYWORDS=\"amd64 ~amd64\"\nELIBC=\"glibc\"\n\
             KERNEL=\"linux\"\nUSERLAND=\"GNU\"\nCHOST=\"x86_64-pc-linux-gnu\"\n"
                .to_owned(),
        ),
        (
            "metadata/layout.conf",
            "masters =\nthin-manifests = true\ncache-formats =\n".to_owned(),
        ),
    ];
    for (rel, text) in files {
        let path = dir.join(rel);
        fs::create_dir_all(path.parent().expect("has a parent")).expect("create repo dirs");
        fs::write(&path, text).expect("write repo file");
    }
    dir.to_owned()
}

fn host_path() -> String {
    std::env::var("PATH").unwrap_or_else(|_| "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin".into())
}

fn read_dir_names(dir: &Path) -> Vec<String> {
    let Ok(entries) = fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .filter_map(Result::ok)
        .filter(|entry| entry.file_type().is_ok_and(|t| t.is_dir()))
        .filter_map(|entry| entry.file_name().into_string().ok())
        .collect()
}

// ---------------------------------------------------------------------------
// Kernel modes
// ---------------------------------------------------------------------------

/// How the kernel reads a package the cache holds complete. Every mount-level test runs in
/// both (see [`both_modes!`]): the development kernel has passthrough, most users' kernels
/// (before 6.9, Gentoo's 6.1 and 6.6 LTS on most drivers) take the daemon-served path.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// FUSE passthrough, the default: the kernel reads the cache file itself.
    Passthrough,
    /// `--no-passthrough`: every read goes through the daemon, as before Linux 6.9.
    NoPassthrough,
}

impl Mode {
    /// The `binpkgfs mount` arguments that select this mode.
    pub fn args(self) -> &'static [&'static str] {
        match self {
            Mode::Passthrough => &[],
            Mode::NoPassthrough => &["--no-passthrough"],
        }
    }
}

/// Declares each `fn name(mode) { ... }` as a module `name` with two tests,
/// `name::passthrough` and `name::no_passthrough`, that run the body with that [`Mode`].
/// Attributes (doc comments, `#[ignore]`) apply to both tests.
///
/// ```ignore
/// both_modes! {
///     /// What the test shows.
///     fn reads_are_exact(mode) {
///         let served = Served::new(mode, &[]);
///         // ...
///     }
/// }
/// ```
#[allow(unused_macros)]
macro_rules! both_modes {
    ($($(#[$attr:meta])* fn $name:ident($mode:ident) $body:block)*) => {$(
        mod $name {
            #[allow(unused_imports)]
            use super::*;

            fn run($mode: $crate::support::Mode) $body

            $(#[$attr])*
            #[test]
            fn passthrough() {
                run($crate::support::Mode::Passthrough)
            }

            $(#[$attr])*
            #[test]
            fn no_passthrough() {
                run($crate::support::Mode::NoPassthrough)
            }
        }
    )*};
}
#[allow(unused_imports)]
pub(crate) use both_modes;

// ---------------------------------------------------------------------------
// binpkgfs mounts
// ---------------------------------------------------------------------------

/// Whether `path` is a mount point, according to `/proc/self/mountinfo`.
pub fn is_mounted(path: &Path) -> bool {
    let path = fs::canonicalize(path).unwrap_or_else(|_| path.to_owned());
    let mountinfo = fs::read_to_string("/proc/self/mountinfo").expect("read mountinfo");
    mountinfo
        .lines()
        .filter_map(|line| line.split(' ').nth(4))
        .any(|mount_point| Path::new(&unescape_mountinfo(mount_point)) == path)
}

/// Undoes mountinfo's octal escapes (`\040` for a space, ...).
fn unescape_mountinfo(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes.get(i + 1..i + 4).and_then(|digits| {
            std::str::from_utf8(digits)
                .ok()
                .and_then(|digits| u8::from_str_radix(digits, 8).ok())
        });
        match (bytes[i], octal) {
            (b'\\', Some(byte)) => {
                out.push(byte);
                i += 4;
            }
            (byte, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A `binpkgfs mount` in the background, on a temporary mount point.
///
/// Dropping it unmounts (lazily, if a test left it mounted) and makes sure the
/// daemon is gone, killing it as a last resort.
pub struct Mount {
    mountpoint: TempDir,
    state: TempDir,
    pid: Option<i32>,
}

impl Mount {
    /// Runs `binpkgfs mount --cache-dir CACHE --pid-file PID [MODE] [EXTRA] URL MNT`
    /// and returns once that command has returned with the filesystem ready.
    ///
    /// On failure the error is the command's stderr (the CLI promises one
    /// line), or a description of what went wrong around it.
    pub fn new(
        mode: Mode,
        url: &str,
        cache_dir: &Path,
        extra_args: &[&str],
    ) -> Result<Mount, String> {
        let mount = Mount {
            mountpoint: TempDir::with_prefix("binpkgfs-mnt.").expect("mount point"),
            state: TempDir::with_prefix("binpkgfs-state.").expect("mount state dir"),
            pid: None,
        };
        mount.run(mode, url, cache_dir, extra_args)
    }

    fn run(
        mut self,
        mode: Mode,
        url: &str,
        cache_dir: &Path,
        extra_args: &[&str],
    ) -> Result<Mount, String> {
        let pid_file = self.state.path().join("pid");
        let mut cmd = Command::new(binpkgfs_bin());
        cmd.arg("mount")
            .arg("--cache-dir")
            .arg(cache_dir)
            .arg("--pid-file")
            .arg(&pid_file)
            .args(mode.args())
            .args(extra_args)
            .arg(url)
            .arg(self.path());
        let Some(output) = run_captured(&mut cmd, self.state.path(), MOUNT_TIMEOUT) else {
            return Err(format!(
                "`binpkgfs mount {url}` did not return within {MOUNT_TIMEOUT:?}"
            ));
        };
        // Read the pid file even on failure so that Drop can clean up a
        // daemon that started anyway.
        self.pid = fs::read_to_string(&pid_file)
            .ok()
            .and_then(|pid| pid.trim().parse().ok());
        let stderr = String::from_utf8_lossy(&output.stderr)
            .trim_end()
            .to_owned();
        if !output.status.success() {
            return Err(if stderr.is_empty() {
                format!(
                    "`binpkgfs mount` failed ({}) with empty stderr",
                    output.status
                )
            } else {
                stderr
            });
        }
        if !is_mounted(self.path()) {
            return Err(format!(
                "`binpkgfs mount` exited 0 but {} is not mounted; stderr: {stderr}",
                self.path().display()
            ));
        }
        if self.pid.is_none() {
            return Err(format!(
                "`binpkgfs mount` exited 0 but wrote no pid to {}",
                pid_file.display()
            ));
        }
        Ok(self)
    }

    /// The mount point.
    pub fn path(&self) -> &Path {
        self.mountpoint.path()
    }

    /// The daemon's pid, from its `--pid-file`.
    pub fn pid(&self) -> i32 {
        self.pid.expect("a ready mount has a pid")
    }

    /// `binpkgfs status --json` of this mount, parsed; fails the test if the command fails.
    pub fn status_json(&self) -> serde_json::Value {
        let out = run_ok(
            Command::new(binpkgfs_bin())
                .args(["status", "--json"])
                .arg(self.path()),
        );
        serde_json::from_slice(&out.stdout).expect("status --json is JSON")
    }

    /// `umount MNT`, then waits until the daemon has exited. A mount still "busy" just after
    /// the test closed its last file (the kernel drops the last reference of a closed file
    /// asynchronously, more so on a loaded machine) is tried again for a few seconds; busy
    /// beyond that is a failure.
    pub fn unmount(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let output = Command::new("umount")
                .arg(self.path())
                .stdin(Stdio::null())
                .output()
                .map_err(|err| format!("run umount: {err}"))?;
            if output.status.success() {
                break;
            }
            let stderr = String::from_utf8_lossy(&output.stderr);
            if !stderr.contains("busy") || Instant::now() >= deadline {
                return Err(format!(
                    "umount {} failed: {}",
                    self.path().display(),
                    stderr.trim()
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        self.wait_for_exit(EXIT_TIMEOUT)
    }

    /// Waits until the daemon process is gone.
    pub fn wait_for_exit(&mut self, timeout: Duration) -> Result<(), String> {
        let Some(pid) = self.pid else {
            return Ok(());
        };
        if !wait_until(timeout, || !process_alive(pid)) {
            return Err(format!(
                "binpkgfs daemon {pid} still runs {timeout:?} after unmount"
            ));
        }
        self.pid = None;
        Ok(())
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        if is_mounted(self.path()) {
            let lazy = Command::new("umount")
                .arg("-l")
                .arg(self.path())
                .stdin(Stdio::null())
                .stderr(Stdio::null())
                .status();
            if !lazy.is_ok_and(|status| status.success()) {
                let _ = Command::new("fusermount3")
                    .arg("-uz")
                    .arg(self.path())
                    .stdin(Stdio::null())
                    .stderr(Stdio::null())
                    .status();
            }
        }
        if let Some(pid) = self.pid.take() {
            if !wait_until(Duration::from_secs(5), || !process_alive(pid)) {
                // SAFETY: plain kill(2) on the daemon this guard started.
                unsafe { libc::kill(pid, libc::SIGKILL) };
                wait_until(Duration::from_secs(5), || !process_alive(pid));
            }
        }
        if is_mounted(self.path()) {
            // Never let TempDir recurse into a live mount; leak the directory.
            eprintln!("warning: {} is still mounted", self.path().display());
            let dir = std::mem::replace(
                &mut self.mountpoint,
                TempDir::new().expect("placeholder temp dir"),
            );
            let _ = dir.keep();
        }
    }
}

// ---------------------------------------------------------------------------
// A served, mounted fixture binhost
// ---------------------------------------------------------------------------

/// A copy of the fixture binhost, served by nginx, mounted by binpkgfs.
pub struct Served {
    // Field order is drop order: unmount before nginx stops.
    pub mount: Mount,
    pub nginx: Nginx,
    pub cache: TempDir,
    _binhost: TempDir,
}

impl Served {
    pub fn new(mode: Mode, extra_args: &[&str]) -> Served {
        require_real_parts();
        let binhost = TempDir::new().unwrap();
        copy_fixture_binhost(binhost.path());
        let nginx = Nginx::start(binhost.path());
        let cache = TempDir::new().unwrap();
        let mount = Mount::new(mode, &nginx.url(), cache.path(), extra_args)
            .unwrap_or_else(|err| panic!("binpkgfs mount {} failed: {err}", nginx.url()));
        Served {
            mount,
            nginx,
            cache,
            _binhost: binhost,
        }
    }

    pub fn daemon_log(&self) -> String {
        fs::read_to_string(self.cache.path().join("binpkgfs.log")).unwrap_or_default()
    }

    /// The served copy of the binhost, for a test that publishes a release on it.
    pub fn binhost(&self) -> &Path {
        self._binhost.path()
    }

    /// GET requests nginx logged for `entry`'s file.
    pub fn fetches_of(&self, entry: &IndexEntry) -> Vec<LogLine> {
        let uri = format!("/{}", entry["PATH"]);
        self.nginx
            .requests()
            .into_iter()
            .filter(|line| line.uri == uri)
            .collect()
    }

    /// nginx logs a request just after sending its last byte, which a fast client can beat:
    /// waits until each of `entries` shows up (failing the test after a deadline), then until
    /// every answer already received is logged ([`Nginx::sync_log`]).
    pub fn settle(&self, entries: &[&IndexEntry]) {
        let mut missing = Vec::new();
        let all = wait_until(Duration::from_secs(10), || {
            missing = entries
                .iter()
                .filter(|e| self.fetches_of(e).is_empty())
                .map(|e| e["PATH"].clone())
                .collect();
            missing.is_empty()
        });
        assert!(all, "nginx never logged a request for {missing:?}");
        self.nginx.sync_log();
    }
}

/// The fixture binhost's index entry for `cpv`.
pub fn entry_for(cpv: &str) -> IndexEntry {
    fixture_packages()
        .into_iter()
        .find(|entry| entry["CPV"] == cpv)
        .unwrap_or_else(|| panic!("{cpv} is not in the fixture binhost"))
}
