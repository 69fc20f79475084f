//! Servers that lie, truncate, stall or vanish, broken indexes, a full disk and a killed daemon,
//! through real FUSE mounts of the real binary.
//!
//! nginx cannot misbehave on demand, so these tests use a small fault-injecting HTTP server
//! (`Faulty`) that serves the real fixture binhost and breaks one package in a chosen way. What
//! every case asserts is what a user would notice: the reader gets `EIO` (never a completed
//! wrong file), within a bound, nothing wrong is kept in the cache, one warning names the file,
//! and the same mount reads correctly once the server behaves again.

mod support;

use std::fs;
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use support::{Mode, Mount, both_modes, fixture_binhost, fixture_packages, is_mounted, wait_until};
use tempfile::TempDir;

#[derive(Clone, Debug, PartialEq)]
enum Fault {
    Honest,
    /// Announces the full length, sends this many body bytes, closes.
    Truncate(usize),
    /// Like `Truncate`, but only for the first request; later ones (Range) are honest.
    TruncateOnce(usize),
    /// Sends this many bytes, then resets the connection (RST).
    Reset(usize),
    /// Sends the file plus extra bytes, and a Content-Length to match.
    Extra(usize),
    /// Same length, one byte flipped in the middle.
    WrongBytes,
    /// Content-Length one more than the file, body the exact file.
    LyingLength,
    NotFound,
    ServerError,
    RedirectLoop,
    /// Sends this many bytes, then nothing, keeping the connection open.
    StallAfter(usize),
    /// Honest, but at this many bytes per second (ranges too).
    Slow(usize),
    /// Like `Slow`, with bytes 4096..4104 wrong.
    SlowCorrupt(usize),
    /// No Content-Length; the file plus this many extra bytes, then close.
    ExtraNoLength(usize),
    /// Honest, except that the last part of a split transfer (a range of 1 MiB or more that
    /// ends at the end of the file) has its middle byte flipped.
    CorruptLastPart,
    /// Honest, except that the last part's first request stops after this many bytes.
    TruncateLastPartOnce(usize),
    /// Honours the first range of 1 MiB or more (a split transfer's head), answers later
    /// ones (its parts) with the whole file.
    HeadRangeOnly,
    /// Answers every open-ended range, and every range of 1 MiB or more, with at most this
    /// many bytes (and says so in Content-Range). Sparse blocks are answered honestly.
    CappedRanges(usize),
    /// Ignores Range headers: always the whole file with 200.
    NoRanges,
    /// Answers every bounded range under 1 MiB (a sparse block: a metadata scan's read) with
    /// every byte inverted; whole-file answers and split parts are honest.
    WrongSmallRanges,
    /// Honest, except that a short range (a sparse block, under 1 MiB) that ends at the end of
    /// the file has its 100th-last byte flipped: a metadata scan's tail comes back wrong.
    LieShortTailRange,
}

struct Faulty {
    port: u16,
    fault: Arc<Mutex<Fault>>,
    /// The package the fault applies to; every other file is served honestly.
    target: String,
    /// Bytes per second every answer is sent at (0: as fast as it goes).
    pace: Arc<AtomicUsize>,
    /// "METHOD URI FROM TO" of every request (the Range header's bounds, as Options).
    log: Arc<Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
    index: Arc<Mutex<Vec<u8>>>,
}

impl Faulty {
    fn start(root: &Path, target: &str, fault: Fault) -> Faulty {
        Faulty::start_on(0, root, target, fault)
    }

    /// On a given port (0: any), so a test can bring "the same binhost" back.
    fn start_on(port: u16, root: &Path, target: &str, fault: Fault) -> Faulty {
        let listener = TcpListener::bind(("127.0.0.1", port)).unwrap();
        let port = listener.local_addr().unwrap().port();
        let server = Faulty {
            port,
            fault: Arc::new(Mutex::new(fault)),
            target: format!("/{target}"),
            pace: Arc::default(),
            log: Arc::default(),
            stop: Arc::default(),
            index: Arc::new(Mutex::new(fs::read(root.join("Packages")).unwrap())),
        };
        let (root, fault, target, log, stop, index, pace) = (
            root.to_path_buf(),
            server.fault.clone(),
            server.target.clone(),
            server.log.clone(),
            server.stop.clone(),
            server.index.clone(),
            server.pace.clone(),
        );
        thread::spawn(move || {
            let first = Arc::new(AtomicBool::new(true));
            for conn in listener.incoming() {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let Ok(conn) = conn else { continue };
                let ctx = (
                    root.clone(),
                    fault.lock().unwrap().clone(),
                    target.clone(),
                    log.clone(),
                    first.clone(),
                    index.lock().unwrap().clone(),
                    stop.clone(),
                );
                let pace = pace.load(Ordering::Relaxed);
                thread::spawn(move || {
                    PACE.set(pace);
                    let _ = serve(conn, ctx);
                });
            }
        });
        server
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}/", self.port)
    }

    /// Sends every later answer at `rate` bytes per second, per connection.
    fn pace(&self, rate: usize) {
        self.pace.store(rate, Ordering::Relaxed);
    }

    fn set(&self, fault: Fault) {
        *self.fault.lock().unwrap() = fault;
    }

    fn set_index(&self, text: &[u8]) {
        *self.index.lock().unwrap() = text.to_vec();
    }

    fn requests_for(&self, uri: &str) -> Vec<String> {
        self.log
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.split(' ').nth(1) == Some(uri))
            .cloned()
            .collect()
    }
}

impl Drop for Faulty {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

type Ctx = (
    PathBuf,
    Fault,
    String,
    Arc<Mutex<Vec<String>>>,
    Arc<AtomicBool>,
    Vec<u8>,
    Arc<AtomicBool>,
);

fn serve(
    mut conn: TcpStream,
    (root, fault, target, log, first, index, stop): Ctx,
) -> std::io::Result<()> {
    let mut reader = BufReader::new(conn.try_clone()?);
    let mut request = String::new();
    reader.read_line(&mut request)?;
    let mut range = None;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 || line == "\r\n" {
            break;
        }
        if let Some(v) = line.to_ascii_lowercase().strip_prefix("range: bytes=") {
            let (from, to) = v.trim().split_once('-').unwrap_or((v.trim(), ""));
            range = from
                .parse::<usize>()
                .ok()
                .map(|f| (f, to.parse::<usize>().ok()));
        }
    }
    let mut parts = request.split_whitespace();
    let (method, uri) = (
        parts.next().unwrap_or(""),
        parts.next().unwrap_or("").to_string(),
    );
    log.lock().unwrap().push(format!(
        "{method} {uri} {:?} {:?}",
        range.map(|r| r.0),
        range.and_then(|r| r.1)
    ));

    // The index is the one the test set, published as `Packages` only.
    let body = if uri == "/Packages" {
        index
    } else if uri == "/Packages.gz" {
        return respond(&mut conn, "404 Not Found", &[], b"");
    } else {
        match fs::read(root.join(uri.trim_start_matches('/'))) {
            Ok(b) => b,
            Err(_) => return respond(&mut conn, "404 Not Found", &[], b""),
        }
    };
    let fault = if uri == target { fault } else { Fault::Honest };
    let is_first = uri == target
        && matches!(fault, Fault::TruncateOnce(_))
        && first.swap(false, Ordering::Relaxed);
    let big_range = matches!(range, Some((from, Some(to))) if from > 0 && to - from >= 1 << 20);
    let last_part = big_range && matches!(range, Some((_, Some(to))) if to + 1 == body.len());
    let first_last_part = uri == target
        && last_part
        && matches!(fault, Fault::TruncateLastPartOnce(_))
        && first.swap(false, Ordering::Relaxed);
    let first_big_range = uri == target
        && big_range
        && matches!(fault, Fault::HeadRangeOnly)
        && first.swap(false, Ordering::Relaxed);
    let len = body.len();
    match fault {
        Fault::Honest => honest(&mut conn, &body, range),
        Fault::Slow(rate) | Fault::SlowCorrupt(rate) => {
            let mut body = body.clone();
            if matches!(fault, Fault::SlowCorrupt(_)) {
                body[4096..4104].copy_from_slice(b"CORRUPT!");
            }
            let (status, from) = match range {
                Some((from, _)) if from < len => ("206 Partial Content", from),
                _ => ("200 OK", 0),
            };
            let to = range
                .and_then(|(_, to)| to)
                .map_or(len, |t| (t + 1).min(len));
            let mut headers = vec![("Content-Length", (to - from).to_string())];
            if status.starts_with("206") {
                headers.push(("Content-Range", format!("bytes {from}-{}/{len}", to - 1)));
            }
            write_head(&mut conn, status, &headers)?;
            for chunk in body[from..to].chunks(rate / 10) {
                conn.write_all(chunk)?;
                thread::sleep(Duration::from_millis(100));
            }
            Ok(())
        }
        Fault::TruncateOnce(_) if !is_first => honest(&mut conn, &body, range),
        Fault::CorruptLastPart if last_part => {
            let (from, to) = range.unwrap();
            let to = to.map_or(len, |t| t + 1);
            let mut body = body.clone();
            body[(from + to) / 2] ^= 0x01;
            honest(&mut conn, &body, range)
        }
        Fault::TruncateLastPartOnce(n) if first_last_part => {
            let (from, to) = range.unwrap();
            let to = to.map_or(len, |t| t + 1);
            respond(
                &mut conn,
                "206 Partial Content",
                &[
                    ("Content-Length", (to - from).to_string()),
                    ("Content-Range", format!("bytes {from}-{}/{len}", to - 1)),
                ],
                &body[from..from + n],
            )
        }
        Fault::CorruptLastPart | Fault::TruncateLastPartOnce(_) => honest(&mut conn, &body, range),
        Fault::HeadRangeOnly if big_range && !first_big_range => honest(&mut conn, &body, None),
        Fault::HeadRangeOnly => honest(&mut conn, &body, range),
        Fault::CappedRanges(cap) => {
            let range = range.map(|(from, to)| match to {
                Some(to) if to - from < 1 << 20 => (from, Some(to)),
                _ => {
                    let to = to.map_or(len - 1, |t| t.min(len - 1));
                    (from, Some(to.min(from + cap - 1)))
                }
            });
            honest(&mut conn, &body, range)
        }
        Fault::NoRanges => honest(&mut conn, &body, None),
        Fault::WrongSmallRanges => match range {
            Some((from, Some(to))) if to - from < 1 << 20 && from < len => {
                let mut wrong = body.clone();
                let to = (to + 1).min(len);
                wrong[from..to].iter_mut().for_each(|b| *b = !*b);
                honest(&mut conn, &wrong, range)
            }
            _ => honest(&mut conn, &body, range),
        },
        Fault::LieShortTailRange => match range {
            Some((from, Some(to))) if to + 1 == len && to - from < 1 << 20 => {
                let mut body = body.clone();
                body[to - 100] ^= 0x01;
                honest(&mut conn, &body, range)
            }
            _ => honest(&mut conn, &body, range),
        },
        Fault::ExtraNoLength(n) => {
            write_head(&mut conn, "200 OK", &[])?;
            conn.write_all(&body)?;
            conn.write_all(&vec![0x55; n])?;
            conn.shutdown(Shutdown::Write)
        }
        Fault::Truncate(n) | Fault::TruncateOnce(n) => respond(
            &mut conn,
            "200 OK",
            &[("Content-Length", len.to_string())],
            &body[..n],
        ),
        Fault::Reset(n) => {
            write_head(&mut conn, "200 OK", &[("Content-Length", len.to_string())])?;
            conn.write_all(&body[..n])?;
            // SO_LINGER 0 makes close() send RST.
            let linger = libc::linger {
                l_onoff: 1,
                l_linger: 0,
            };
            unsafe {
                libc::setsockopt(
                    std::os::unix::io::AsRawFd::as_raw_fd(&conn),
                    libc::SOL_SOCKET,
                    libc::SO_LINGER,
                    (&linger as *const libc::linger).cast(),
                    std::mem::size_of::<libc::linger>() as u32,
                )
            };
            Ok(())
        }
        Fault::Extra(n) => {
            let mut more = body.clone();
            more.extend(std::iter::repeat_n(0x55, n));
            respond(
                &mut conn,
                "200 OK",
                &[("Content-Length", more.len().to_string())],
                &more,
            )
        }
        Fault::WrongBytes => {
            let mut wrong = body.clone();
            wrong[len / 2] ^= 0x01;
            respond(
                &mut conn,
                "200 OK",
                &[("Content-Length", len.to_string())],
                &wrong,
            )
        }
        Fault::LyingLength => respond(
            &mut conn,
            "200 OK",
            &[("Content-Length", (len + 1).to_string())],
            &body,
        ),
        Fault::NotFound => respond(&mut conn, "404 Not Found", &[], b""),
        Fault::ServerError => respond(&mut conn, "503 Service Unavailable", &[], b""),
        Fault::RedirectLoop => respond(&mut conn, "302 Found", &[("Location", uri.clone())], b""),
        Fault::StallAfter(n) => {
            write_head(&mut conn, "200 OK", &[("Content-Length", len.to_string())])?;
            conn.write_all(&body[..n])?;
            conn.flush()?;
            // Hold the connection open, sending nothing, until the client gives up or we stop.
            let mut buf = [0u8; 1];
            conn.set_read_timeout(Some(Duration::from_millis(200)))?;
            while !stop.load(Ordering::Relaxed) {
                match conn.read(&mut buf) {
                    Ok(0) => break,
                    Ok(_) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                    Err(_) => break,
                }
            }
            Ok(())
        }
    }
}

fn honest(
    conn: &mut TcpStream,
    body: &[u8],
    range: Option<(usize, Option<usize>)>,
) -> std::io::Result<()> {
    match range {
        Some((from, to)) if from < body.len() => {
            let to = to.map_or(body.len(), |t| (t + 1).min(body.len()));
            respond(
                conn,
                "206 Partial Content",
                &[
                    ("Content-Length", (to - from).to_string()),
                    (
                        "Content-Range",
                        format!("bytes {from}-{}/{}", to - 1, body.len()),
                    ),
                ],
                &body[from..to],
            )
        }
        _ => respond(
            conn,
            "200 OK",
            &[("Content-Length", body.len().to_string())],
            body,
        ),
    }
}

fn write_head(
    conn: &mut TcpStream,
    status: &str,
    headers: &[(&str, String)],
) -> std::io::Result<()> {
    let mut head = format!("HTTP/1.1 {status}\r\nConnection: close\r\n");
    for (k, v) in headers {
        head += &format!("{k}: {v}\r\n");
    }
    head += "\r\n";
    conn.write_all(head.as_bytes())
}

fn respond(
    conn: &mut TcpStream,
    status: &str,
    headers: &[(&str, String)],
    body: &[u8],
) -> std::io::Result<()> {
    let mut headers = headers.to_vec();
    if !headers.iter().any(|(k, _)| *k == "Content-Length") {
        headers.push(("Content-Length", body.len().to_string()));
    }
    write_head(conn, status, &headers)?;
    let _ = write_paced(conn, body);
    let _ = conn.shutdown(Shutdown::Write);
    Ok(())
}

thread_local! {
    /// This connection's `Faulty::pace` (0: none).
    static PACE: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// Writes `body` at the connection's pace: a twentieth of a second's worth at a time.
fn write_paced(conn: &mut TcpStream, body: &[u8]) -> std::io::Result<()> {
    let rate = PACE.get();
    if rate == 0 {
        return conn.write_all(body);
    }
    for chunk in body.chunks((rate / 20).max(1)) {
        conn.write_all(chunk)?;
        thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// The largest fixture package (about 1 MiB), so faults land mid-body.
fn big() -> support::IndexEntry {
    fixture_packages()
        .into_iter()
        .max_by_key(|e| e["SIZE"].parse::<u64>().unwrap())
        .unwrap()
}

fn dir_len(p: &Path) -> usize {
    fs::read_dir(p).map_or(0, |d| d.count())
}

struct Case {
    cache: TempDir,
    log: TempDir,
    server: Faulty,
    mount: Mount,
}

fn mount_with(mode: Mode, fault: Fault, extra: &[&str]) -> Case {
    support::require_real_parts();
    mount_case(mode, &fixture_binhost(), &big()["PATH"], fault, extra)
}

/// A mount of the binhost at `root` behind a `Faulty` server whose `fault` hits `target`.
fn mount_case(mode: Mode, root: &Path, target: &str, fault: Fault, extra: &[&str]) -> Case {
    let server = Faulty::start(root, target, fault);
    let cache = TempDir::with_prefix("binpkgfs-cache.").unwrap();
    let log = TempDir::with_prefix("binpkgfs-log.").unwrap();
    let log_file = log.path().join("log");
    let mut args = vec![
        "--stall-timeout",
        "2",
        "--log-file",
        log_file.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let mount = Mount::new(mode, &server.url(), cache.path(), &args).unwrap();
    Case {
        cache,
        log,
        server,
        mount,
    }
}

impl Case {
    fn log_text(&self) -> String {
        fs::read_to_string(self.log.path().join("log")).unwrap_or_default()
    }
}

both_modes! {
    fn every_lying_or_broken_server_gets_eio_and_nothing_is_cached(mode) {
        let e = big();
        let want = fs::read(fixture_binhost().join(&e["PATH"])).unwrap();
        let cases = [
            (
                Fault::Truncate(300_000),
                "end of file before message length",
            ),
            (Fault::Reset(300_000), "transfer interrupted"),
            (Fault::Extra(10), "server announces"),
            (Fault::ExtraNoLength(10), "more than SIZE"),
            (Fault::WrongBytes, "SHA1 mismatch"),
            (Fault::LyingLength, "server announces"),
            (Fault::NotFound, "404"),
            (Fault::ServerError, "503"),
            (Fault::RedirectLoop, "redirect"),
            (Fault::StallAfter(300_000), "download failed"),
        ];
        for (fault, says) in cases {
            let case = mount_with(mode, fault.clone(), &[]);
            let file = case.mount.path().join(&e["PATH"]);
            let started = Instant::now();
            let err = fs::read(&file).expect_err(&format!("{fault:?}: read succeeded"));
            assert_eq!(err.raw_os_error(), Some(libc::EIO), "{fault:?}: {err}");
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "{fault:?}: {:?}",
                started.elapsed()
            );
            assert_eq!(
                dir_len(&case.cache.path().join("objects")),
                0,
                "{fault:?}: kept a bad file"
            );
            let gone = wait_until(Duration::from_secs(5), || {
                dir_len(&case.cache.path().join("partial")) == 0
            });
            assert!(gone, "{fault:?}: partial left behind");
            let log = case.log_text();
            assert!(
                log.contains("download failed") && log.contains(&*e["PATH"]) && log.contains(says),
                "{fault:?}: log lacks {says:?}:\n{log}"
            );
            assert_eq!(
                log.matches("download failed").count(),
                1,
                "{fault:?}: logged more than once"
            );

            if fault == Fault::NotFound {
                // An answer, not a fault: hidden from now on (see the test of its own below).
                continue;
            }
            // The binhost recovers; the same mount now serves the file.
            case.server.set(Fault::Honest);
            assert!(
                fs::read(&file).unwrap() == want,
                "{fault:?}: wrong bytes after recovery"
            );
        }
    }
}

both_modes! {
    fn an_interrupted_transfer_resumes_where_it_stopped(mode) {
        let e = big();
        let case = mount_with(mode, Fault::TruncateOnce(400_000), &[]);
        let got = fs::read(case.mount.path().join(&e["PATH"])).unwrap();
        assert!(got == fs::read(fixture_binhost().join(&e["PATH"])).unwrap());
        let reqs = case.server.requests_for(&format!("/{}", e["PATH"]));
        assert_eq!(reqs.len(), 2, "{reqs:?}");
        assert!(
            reqs[1].ends_with("Some(400000) None"),
            "resumed with a Range request: {reqs:?}"
        );
    }
}

both_modes! {
    fn early_bytes_are_served_before_the_transfer_ends_and_a_stall_ends_in_eio(mode) {
        let e = big();
        let case = mount_with(mode, Fault::StallAfter(600_000), &[]);
        let mut f = fs::File::open(case.mount.path().join(&e["PATH"])).unwrap();
        let started = Instant::now();
        let mut head = vec![0u8; 4096];
        f.read_exact(&mut head).unwrap();
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "head waited {:?}",
            started.elapsed()
        );
        let want = fs::read(fixture_binhost().join(&e["PATH"])).unwrap();
        assert!(head == want[..4096]);
        let mut rest = Vec::new();
        let err = f.read_to_end(&mut rest).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EIO));
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "{:?}",
            started.elapsed()
        );
    }
}

both_modes! {
    fn sigkill_mid_download_leaves_a_cache_that_serves_only_correct_bytes(mode) {
        let e = big();
        let mut case = mount_with(mode, Fault::StallAfter(500_000), &["--stall-timeout", "60"]);
        let mut f = fs::File::open(case.mount.path().join(&e["PATH"])).unwrap();
        let mut head = vec![0u8; 4096];
        f.read_exact(&mut head).unwrap();
        assert_eq!(dir_len(&case.cache.path().join("partial")), 1);
        unsafe { libc::kill(case.mount.pid(), libc::SIGKILL) };
        case.mount.wait_for_exit(Duration::from_secs(10)).unwrap();
        drop(f);
        let status = Command::new("umount")
            .arg("-l")
            .arg(case.mount.path())
            .status()
            .unwrap();
        assert!(status.success() && !is_mounted(case.mount.path()));

        case.server.set(Fault::Honest);
        let mount = Mount::new(mode, &case.server.url(), case.cache.path(), &[]).unwrap();
        assert_eq!(
            dir_len(&case.cache.path().join("partial")),
            0,
            "leftover partial not cleaned"
        );
        for p in fixture_packages() {
            let got = fs::read(mount.path().join(&p["PATH"])).unwrap();
            assert!(
                got == fs::read(fixture_binhost().join(&p["PATH"])).unwrap(),
                "{}",
                p["PATH"]
            );
        }
    }
}

/// A small tmpfs as the cache's disk, unmounted on drop.
struct Tmpfs(TempDir);

impl Tmpfs {
    fn new(size: &str) -> Tmpfs {
        let dir = TempDir::with_prefix("binpkgfs-tmpfs.").unwrap();
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .status()
            .unwrap();
        assert!(ok.success(), "mount tmpfs");
        Tmpfs(dir)
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(self.0.path()).status();
    }
}

both_modes! {
    fn a_full_cache_disk_evicts_to_make_room_or_fails_cleanly(mode) {
        support::require_real_parts();
        let server = Faulty::start(&fixture_binhost(), "none", Fault::Honest);
        let logs = TempDir::new().unwrap();
        let log = logs.path().join("log");
        let packages = fixture_packages();
        let big = big();

        // Room for the big package and a little more: reading the rest must evict it.
        let disk = Tmpfs::new("1100k");
        let args = ["--cache-size", "1G", "--log-file", log.to_str().unwrap()];
        let mut mount = Mount::new(mode, &server.url(), disk.0.path(), &args).unwrap();
        for p in packages
            .iter()
            .filter(|p| p["PATH"] == big["PATH"])
            .chain(&packages)
        {
            let got = fs::read(mount.path().join(&p["PATH"])).unwrap();
            assert!(
                got == fs::read(fixture_binhost().join(&p["PATH"])).unwrap(),
                "{}",
                p["PATH"]
            );
        }
        assert!(
            fs::read_to_string(&log)
                .unwrap()
                .contains("cache disk full: evicting")
        );
        mount.unmount().unwrap();

        // No room at all: EIO, one clear line, nothing half-written left.
        let disk = Tmpfs::new("256k");
        let mount = Mount::new(mode, &server.url(), disk.0.path(), &args).unwrap();
        let err = fs::read(mount.path().join(&big["PATH"])).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EIO));
        assert!(
            fs::read_to_string(&log)
                .unwrap()
                .contains("cache disk full and nothing left to evict")
        );
        assert_eq!(dir_len(&disk.0.path().join("objects")), 0);
        assert!(wait_until(Duration::from_secs(5), || dir_len(
            &disk.0.path().join("partial")
        ) == 0));
    }
}

both_modes! {
    fn broken_indexes_are_clear_errors_and_hostile_paths_are_refused(mode) {
        support::require_real_parts();
        let server = Faulty::start(&fixture_binhost(), "none", Fault::Honest);
        for (index, says) in [
            (&b"garbage without colons\n"[..], "malformed"),
            (&b""[..], "index is empty"),
            (&b"VERSION: 7\n\n"[..], "VERSION 7"),
            (&b"PACKAGES: 1\n\0\0\0"[..], "not text"),
        ] {
            server.set_index(index);
            let cache = TempDir::new().unwrap();
            let err = Mount::new(mode, &server.url(), cache.path(), &[])
                .err()
                .expect("mounted a broken index");
            assert!(
                err.contains(says) && err.lines().count() == 1,
                "{says}: {err}"
            );
        }

        let good = fs::read_to_string(fixture_binhost().join("Packages")).unwrap();
        let hostile = [
            "/etc/passwd",
            "../../../etc/shadow",
            "a/../../b.gpkg.tar",
            "x//y.gpkg.tar",
        ];
        let mut text = good.clone();
        for p in hostile {
            text += &format!("CPV: evil/x-1\nPATH: {p}\nSIZE: 10\nMTIME: 1\n\n");
        }
        server.set_index(text.as_bytes());
        let cache = TempDir::new().unwrap();
        let logs = TempDir::new().unwrap();
        let log = logs.path().join("log");
        let mount = Mount::new(
            mode,
            &server.url(),
            cache.path(),
            &["--log-file", log.to_str().unwrap()],
        )
        .unwrap();
        let files = support::list_files(mount.path());
        assert_eq!(files.len(), fixture_packages().len() + 1, "{files:?}");
        let log = fs::read_to_string(&log).unwrap();
        assert_eq!(
            log.matches("refusing index entry").count(),
            hostile.len(),
            "{log}"
        );
    }
}

/// Issue 11.5: a file the index names but the server does not have (404) is an answer: the
/// reader gets EIO at once after one request, one log line names the file, and then the entry
/// is an absent file (lookup, readdir, the served `Packages`) until the index changes.
#[test]
fn a_file_missing_on_the_server_fails_at_once_and_is_hidden_until_the_index_changes() {
    for mode in [Mode::Passthrough, Mode::NoPassthrough] {
        let e = big();
        let args = ["--index-ttl", "1"];
        let case = mount_with(mode, Fault::NotFound, &args);
        let file = case.mount.path().join(&e["PATH"]);
        let started = Instant::now();
        let err = fs::read(&file).expect_err("read of a missing file succeeded");
        assert_eq!(err.raw_os_error(), Some(libc::EIO), "{mode:?}: {err}");
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{mode:?}: a 404 took {:?}",
            started.elapsed()
        );
        let uri = format!("/{}", e["PATH"]);
        assert_eq!(
            case.server.requests_for(&uri).len(),
            1,
            "{mode:?}: a 404 was asked again: {:?}",
            case.server.requests_for(&uri)
        );
        let log = case.log_text();
        let lines: Vec<&str> = log
            .lines()
            .filter(|l| l.contains(&*e["PATH"]) && l.contains("WARN"))
            .collect();
        assert!(
            lines.len() == 1 && lines[0].contains("404"),
            "{mode:?}: want one warning naming the file: {lines:#?}"
        );

        let dir = file.parent().unwrap().to_path_buf();
        let name = file.file_name().unwrap().to_owned();
        let hidden = wait_until(Duration::from_secs(10), || {
            let listed = fs::read_dir(&dir)
                .map(|d| d.flatten().any(|x| x.file_name() == name))
                .unwrap_or(false);
            // Until inodes outlive swaps (issue 11.2), `Packages` can answer ENOENT just after
            // one: that is a "not yet" here.
            let index = fs::read_to_string(case.mount.path().join("Packages")).unwrap_or_default();
            fs::metadata(&file).is_err_and(|e| e.kind() == std::io::ErrorKind::NotFound)
                && !listed
                && !index.contains(&*e["PATH"])
                && index.contains(&format!("PACKAGES: {}\n", fixture_packages().len() - 1))
        });
        assert!(hidden, "{mode:?}: the missing file is still shown");

        // The binhost publishes (a new index): the file gets a fresh chance.
        case.server.set(Fault::Honest);
        let index = fs::read_to_string(fixture_binhost().join("Packages")).unwrap();
        case.server
            .set_index(index.replace("TIMESTAMP: ", "TIMESTAMP: 1").as_bytes());
        let want = fs::read(fixture_binhost().join(&e["PATH"])).unwrap();
        let back = wait_until(Duration::from_secs(15), || {
            fs::read(&file).is_ok_and(|b| b == want)
        });
        assert!(
            back,
            "{mode:?}: the file did not come back with a new index"
        );
    }
}

both_modes! {
    fn an_offline_binhost_fails_reads_fast_and_the_mount_recovers_when_it_returns(mode) {
        support::require_real_parts();
        let packages = fixture_packages();
        let cache = TempDir::new().unwrap();
        let server = Faulty::start(&fixture_binhost(), "none", Fault::Honest);
        let (port, url) = (server.port, server.url());
        let mut mount = Mount::new(mode, &url, cache.path(), &[]).unwrap();
        mount.unmount().unwrap();
        drop(server);
        assert!(wait_until(Duration::from_secs(5), || TcpStream::connect((
            "127.0.0.1",
            port
        ))
        .is_err()));

        // Offline: mounts from the saved index; uncached reads fail at once, every time.
        let mount = Mount::new(mode, &url, cache.path(), &[]).unwrap();
        for p in &packages[..2] {
            let started = Instant::now();
            let err = fs::read(mount.path().join(&p["PATH"])).unwrap_err();
            assert_eq!(err.raw_os_error(), Some(libc::EIO));
            assert!(
                started.elapsed() < Duration::from_secs(2),
                "{:?}",
                started.elapsed()
            );
        }

        // The binhost returns on the same address: the same mount reads again, no remount.
        let _server = Faulty::start_on(port, &fixture_binhost(), "none", Fault::Honest);
        let file = mount.path().join(&packages[0]["PATH"]);
        let want = fs::read(fixture_binhost().join(&packages[0]["PATH"])).unwrap();
        let back = wait_until(Duration::from_secs(20), || {
            fs::read(&file).is_ok_and(|b| b == want)
        });
        assert!(back, "reads did not recover after the binhost came back");
    }
}

both_modes! {
    fn pages_read_during_a_failed_transfer_are_never_served_again(mode) {
        // The binhost streams a package with wrong bytes early in the file, slowly enough that the
        // reader gets those pages before the check fails; then it serves the right file.
        let e = big();
        let want = fs::read(fixture_binhost().join(&e["PATH"])).unwrap();
        let case = mount_with(mode, Fault::SlowCorrupt(512 * 1024), &[]);
        let file = case.mount.path().join(&e["PATH"]);
        let err = fs::read(&file).expect_err("a corrupt file was completed");
        assert_eq!(err.raw_os_error(), Some(libc::EIO));

        case.server.set(Fault::Honest);
        let got = fs::read(&file).unwrap();
        assert!(
            got == want,
            "stale pages from the failed transfer were served"
        );
    }
}

both_modes! {
    fn a_whole_reader_after_ranged_tail_reads_cannot_complete_a_wrong_file(mode) {
        // Portage's order: a metadata scan reads the head and the tail (ranged), then the digest
        // pass reads the file whole. The binhost serves a large package with a wrong middle, slowly.
        support::require_real_parts();
        let size = 3 << 20;
        let (dir, _) = synthetic_binhost(size, Some(1_600_000));
        let server = Faulty::start(dir.path(), BIG, Fault::Slow(256 * 1024));
        let cache = TempDir::new().unwrap();
        let mount = Mount::new(mode, &server.url(), cache.path(), &[]).unwrap();
        let file = mount.path().join(BIG);

        let mut f = fs::File::open(&file).unwrap();
        let mut buf = vec![0u8; 4096];
        f.read_exact(&mut buf).unwrap();
        f.seek(SeekFrom::Start(size as u64 - 4096)).unwrap();
        f.read_exact(&mut buf).unwrap();
        // Same handle, then a fresh one: both read the whole file; neither may succeed.
        f.seek(SeekFrom::Start(0)).unwrap();
        let mut all = Vec::new();
        let same = f.read_to_end(&mut all);
        assert!(
            same.is_err(),
            "read the wrong file to the end on the scanning handle"
        );
        let fresh = fs::read(&file);
        assert!(
            fresh.is_err(),
            "read the wrong file to the end on a fresh handle"
        );
    }
}

/// The kernel modes every mount-level test here runs in: passthrough (where the kernel has
/// it) and reads served through the daemon, as on kernels before 6.9.
const MODES: [Mode; 2] = [Mode::Passthrough, Mode::NoPassthrough];

/// Issue 11.1: a metadata scan reads a large package's tail through a ranged request whose
/// answer is wrong (unchecked, as a scan may); emerge's merge list then names the package and
/// the daemon fetches and verifies it whole; a later `cat` must return the index's bytes, not
/// the scan's tail the kernel kept.
#[test]
fn cat_after_a_verified_prefetch_never_returns_a_scanned_unchecked_tail() {
    support::require_real_parts();
    for mode in MODES {
        scanned_tail_then_prefetch_then_cat(mode);
    }
}

fn scanned_tail_then_prefetch_then_cat(mode: Mode) {
    let size = 3 << 20;
    let (dir, good) = synthetic_binhost(size, None);
    let server = Faulty::start(dir.path(), BIG, Fault::LieShortTailRange);
    let cache = TempDir::new().unwrap();
    let edb = TempDir::new().unwrap();
    let mtimedb = edb.path().join("mtimedb");
    // One stream: the fault is for short ranges only, and the test is about the scan's.
    let args = ["--mtimedb", mtimedb.to_str().unwrap(), "--streams", "1"];
    let mount = Mount::new(mode, &server.url(), cache.path(), &args).unwrap();
    let file = mount.path().join(BIG);

    // The scan: the first header and the tail, each a ranged read.
    let mut f = fs::File::open(&file).unwrap();
    let mut head = vec![0u8; 4096];
    f.read_exact(&mut head).unwrap();
    let mut tail = vec![0u8; 4096];
    f.seek(SeekFrom::Start(size as u64 - 4096)).unwrap();
    f.read_exact(&mut tail).unwrap();
    drop(f);
    let ranged_tail_lied = tail != good[size - 4096..];
    assert!(
        ranged_tail_lied,
        "{mode:?}: setup: the scan did not get the server's wrong tail"
    );

    // emerge publishes its merge list: the daemon fetches the package whole and verifies it.
    let db = format!(
        r#"{{"info": {{}}, "resume": {{"favorites": [], "mergelist": [["binary", "/", "c/big-1", "merge"]],
            "binpkgs": [{{"CPV": "c/big-1", "BUILD_ID": null, "BUILD_TIME": 0, "MTIME": 1, "SIZE": {size}, "EROOT": "/"}}],
            "myopts": {{}}}}, "version": "3.0.83"}}"#
    );
    fs::write(edb.path().join("mtimedb.new"), db).unwrap();
    fs::rename(edb.path().join("mtimedb.new"), &mtimedb).unwrap();
    let objects = cache.path().join("objects");
    assert!(
        wait_until(Duration::from_secs(30), || dir_len(&objects) == 1),
        "{mode:?}: the merge list's package was not prefetched"
    );

    let got = fs::read(&file).unwrap();
    let differ = got.iter().zip(&good).position(|(a, b)| a != b);
    assert!(
        got == good,
        "{mode:?}: cat after the prefetch returned other bytes (first difference at {differ:?}; \
         the scan's ranged tail was {}wrong)",
        if ranged_tail_lied { "" } else { "not " }
    );
    let cmp = Command::new("cmp")
        .arg(&file)
        .arg(dir.path().join(BIG))
        .output()
        .unwrap();
    assert!(
        cmp.status.success(),
        "{mode:?}: cmp: {}",
        String::from_utf8_lossy(&cmp.stdout)
    );
}

/// The one package of `synthetic_binhost`.
const BIG: &str = "c/big/big-1-1.gpkg.tar";

/// A binhost holding one package of `size` bytes (not a real gpkg: fetching only cares about
/// SIZE and digests). With `corrupt_at`, the file on the server has that byte flipped while
/// the index lists the digests of the right file. Returns the binhost and the right bytes.
fn synthetic_binhost(size: usize, corrupt_at: Option<usize>) -> (TempDir, Vec<u8>) {
    let dir = TempDir::new().unwrap();
    let good: Vec<u8> = (0..size as u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    let (sha1, md5) = (
        support::digest_hex("sha1sum", &good),
        support::digest_hex("md5sum", &good),
    );
    let mut served = good.clone();
    if let Some(at) = corrupt_at {
        served[at] ^= 0xff;
    }
    fs::create_dir_all(dir.path().join("c/big")).unwrap();
    fs::write(dir.path().join(BIG), &served).unwrap();
    fs::write(
        dir.path().join("Packages"),
        format!(
            "TIMESTAMP: 1\nVERSION: 0\n\nCPV: c/big-1\nPATH: {BIG}\n\
             SIZE: {size}\nMTIME: 1\nSHA1: {sha1}\nMD5: {md5}\n\n"
        ),
    )
    .unwrap();
    (dir, good)
}

/// Mounts a synthetic binhost with one 20 MiB package behind `fault`, each connection paced at
/// 4 MiB/s (one stream is slow): read from the start, it is promoted after 1 MiB and the rest
/// comes as a head and three parts.
fn mount_large(mode: Mode, fault: Fault, extra: &[&str]) -> (Case, Vec<u8>, TempDir) {
    support::require_real_parts();
    let (dir, good) = synthetic_binhost(20 << 20, None);
    let case = mount_case(mode, dir.path(), BIG, fault, extra);
    case.server.pace(4 << 20);
    (case, good, dir)
}

/// The `(from, to)` of every request for `BIG`, `to` inclusive or `None` (to the end).
fn ranges_asked(server: &Faulty) -> Vec<(u64, Option<u64>)> {
    let num = |w: &str| {
        w.strip_prefix("Some(")?
            .strip_suffix(')')?
            .parse::<u64>()
            .ok()
    };
    let mut out: Vec<_> = server
        .requests_for(&format!("/{BIG}"))
        .iter()
        .map(|r| {
            let w: Vec<&str> = r.split(' ').collect();
            (num(w[2]).unwrap_or(0), num(w[3]))
        })
        .collect();
    out.sort();
    out
}

/// The bounded ranges of 1 MiB or more asked for `BIG`: parts of a split transfer (sparse
/// blocks are smaller).
fn parts_asked(server: &Faulty) -> Vec<(u64, u64)> {
    let mut out = ranges_of(&server.requests_for(&format!("/{BIG}")));
    out.sort();
    out
}

fn objects_kept(case: &Case) -> usize {
    dir_len(&case.cache.path().join("objects"))
}

both_modes! {
    fn a_large_package_comes_as_parallel_ranges_and_is_checked_as_one_file(mode) {
        let (case, good, _dir) = mount_large(mode, Fault::Honest, &[]);
        let got = fs::read(case.mount.path().join(BIG)).unwrap();
        assert!(got == good, "wrong bytes");
        // The first reads are ranged (sparse) until the reader holds 1 MiB; the whole transfer
        // then takes the rest as a head and three parts that join up to the end, each asked for
        // once, and nothing as one open-ended stream.
        let parts = parts_asked(&case.server);
        assert_eq!(parts.len(), 4, "head and three parts: {parts:?}");
        for w in parts.windows(2) {
            assert_eq!(w[0].1 + 1, w[1].0, "parts join: {parts:?}");
        }
        assert_eq!(parts.last().unwrap().1, good.len() as u64 - 1);
        let all = ranges_asked(&case.server);
        assert!(all.iter().all(|(_, b)| b.is_some()), "{all:?}");
        let kept = wait_until(Duration::from_secs(5), || objects_kept(&case) == 1);
        assert!(kept, "the checked file is kept");

        // One stream when the first one is fast: the head ends where the parts would have
        // started, and the rest comes as one open-ended request. Whether loopback counts as fast
        // on this machine is timing
        // (issue 11.6: under load a real stream *is* slow), so the fetcher runs in-process with
        // a threshold every stream beats; the decision itself is tested with controlled waits
        // in `fetch::split`.
        let (case, good, _dir) = mount_large(mode, Fault::Honest, &[]);
        let got = fetch_in_process(&case.server, 0.0);
        assert!(got == good, "wrong bytes in-process");
        let asked = ranges_asked(&case.server);
        let open_ended = asked.iter().filter(|(_, b)| b.is_none()).count();
        assert!(
            parts_asked(&case.server).len() == 1 && open_ended == 1,
            "a fast stream was split: {asked:?}"
        );

        // One stream when told so.
        let (case, good, _dir) = mount_large(mode, Fault::Honest, &["-o", "streams=1"]);
        assert!(fs::read(case.mount.path().join(BIG)).unwrap() == good);
        assert_eq!(parts_asked(&case.server), []);
        let open_ended = ranges_asked(&case.server)
            .iter()
            .filter(|(_, b)| b.is_none())
            .count();
        assert_eq!(open_ended, 1, "{:?}", ranges_asked(&case.server));
    }
}

both_modes! {
    fn a_wrong_last_part_or_a_wrong_size_fails_the_file_and_nothing_is_kept(mode) {
        let (case, good, _dir) = mount_large(mode, Fault::CorruptLastPart, &[]);
        let file = case.mount.path().join(BIG);
        let err = fs::read(&file).expect_err("a file with a wrong part was completed");
        assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
        assert_eq!(objects_kept(&case), 0);
        let gone = wait_until(Duration::from_secs(5), || {
            dir_len(&case.cache.path().join("partial")) == 0
        });
        assert!(gone, "partial left behind");
        let log = case.log_text();
        assert!(log.contains("mismatch"), "log says why:\n{log}");
        case.server.set(Fault::Honest);
        assert!(
            fs::read(&file).unwrap() == good,
            "recovers once the server does"
        );

        // The server's file is longer than the index says: the first ranged answer of the whole
        // transfer says so (`bytes a-b/TOTAL`), before the parts are fetched.
        let (case, _, dir) = mount_large(mode, Fault::Honest, &[]);
        let mut longer = fs::read(dir.path().join(BIG)).unwrap();
        longer.extend_from_slice(&[0; 4096]);
        fs::write(dir.path().join(BIG), &longer).unwrap();
        let err = fs::read(case.mount.path().join(BIG)).expect_err("read a file of the wrong size");
        assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
        let log = case.log_text();
        assert!(
            log.contains("server says the file has 20975616 bytes, index SIZE is 20971520"),
            "{log}"
        );
        assert!(parts_asked(&case.server).len() <= 1, "no parts fetched");
        assert_eq!(objects_kept(&case), 0);
    }
}

both_modes! {
    fn interrupted_parts_resume_and_odd_range_servers_still_work(mode) {
        let (case, good, _dir) = mount_large(mode, Fault::TruncateLastPartOnce(100_000), &[]);
        assert!(fs::read(case.mount.path().join(BIG)).unwrap() == good);
        let parts = parts_asked(&case.server);
        let last = *parts.last().unwrap();
        assert!(
            parts.contains(&(last.0 - 100_000, last.1)),
            "the last part was asked for, then resumed after the bytes it had: {parts:?}"
        );

        // Honours the head's range, then answers the parts with the whole file: still right.
        let (case, good, _dir) = mount_large(mode, Fault::HeadRangeOnly, &[]);
        assert!(fs::read(case.mount.path().join(BIG)).unwrap() == good);
        assert!(case.log_text().contains("fetched as one stream"));

        // Caps every range at 2 MiB: the shorter answers are progress, not failures.
        let (case, good, _dir) = mount_large(mode, Fault::CappedRanges(2 << 20), &[]);
        assert!(fs::read(case.mount.path().join(BIG)).unwrap() == good);
        assert!(!case.log_text().contains("download failed"));

        // Caps them at 4 KiB: that is not asked for 5,000 times; it fails after the retries.
        let (case, _, _dir) = mount_large(mode, Fault::CappedRanges(4096), &[]);
        let err = fs::read(case.mount.path().join(BIG)).expect_err("4 KiB at a time");
        assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
        let log = case.log_text();
        assert!(log.contains("answered with only 4096 bytes"), "{log}");
        let reqs = case.server.requests_for(&format!("/{BIG}"));
        assert!(reqs.len() < 20, "{} requests", reqs.len());

        // The sparse read learns there are no ranges (200), then one whole stream.
        let (case, good, _dir) = mount_large(mode, Fault::NoRanges, &[]);
        assert!(fs::read(case.mount.path().join(BIG)).unwrap() == good);
        let reqs = case.server.requests_for(&format!("/{BIG}"));
        assert_eq!(reqs.len(), 2, "{reqs:?}");
    }
}

both_modes! {
    fn a_package_fetched_while_another_transfer_runs_is_not_split(mode) {
        // Two large packages: the first comes slowly (its transfer stays in flight), the second is
        // read whole meanwhile. The link already carries a stream: the second is not split.
        support::require_real_parts();
        let (dir, good) = synthetic_binhost(20 << 20, None);
        let other = "c/big/big-2-1.gpkg.tar";
        fs::copy(dir.path().join(BIG), dir.path().join(other)).unwrap();
        let index = fs::read_to_string(dir.path().join("Packages")).unwrap();
        let second = index
            .split("\n\n")
            .nth(1)
            .unwrap()
            .replace("c/big-1", "c/big-2")
            .replace(BIG, other);
        fs::write(dir.path().join("Packages"), format!("{index}{second}\n\n")).unwrap();
        let server = Faulty::start(dir.path(), BIG, Fault::Slow(1 << 20));
        // Slow enough that the second would be split if it ran alone.
        server.pace(4 << 20);
        let cache = TempDir::new().unwrap();
        let mount = Mount::new(mode, &server.url(), cache.path(), &[]).unwrap();

        let mut slow = fs::File::open(mount.path().join(BIG)).unwrap();
        let mut head = vec![0u8; 2 << 20];
        slow.read_exact(&mut head).unwrap();
        assert!(head == good[..2 << 20]);
        // The parts start once the head's first window measured slow: wait for their requests.
        let split = wait_until(Duration::from_secs(20), || parts_asked(&server).len() >= 2);
        assert!(
            split,
            "the first, alone, was not split: {:?}",
            parts_asked(&server)
        );
        assert!(fs::read(mount.path().join(other)).unwrap() == good);
        let reqs = server.requests_for(&format!("/{other}"));
        assert_eq!(
            ranges_of(&reqs),
            [],
            "the second package was split: {reqs:?}"
        );
        let whole = reqs.iter().filter(|r| r.ends_with(" None")).count();
        assert_eq!(whole, 1, "one open-ended stream: {reqs:?}");
    }
}

/// Fetches `BIG` whole from `server` with the library's fetcher in this process, splitting a
/// lone head only below `split_below` bytes per second; returns the cached file's bytes.
fn fetch_in_process(server: &Faulty, split_below: f64) -> Vec<u8> {
    use binpkgfs::{cache::Store, fetch::Fetcher, index::Index, remote};
    let cache = TempDir::new().unwrap();
    let opts = remote::RemoteOptions {
        connect_timeout: Duration::from_secs(10),
        stall_timeout: Duration::from_secs(10),
        ..Default::default()
    };
    let endpoint = Arc::new(remote::Endpoint::new(
        remote::connect(&server.url(), &opts).unwrap(),
    ));
    let store = Arc::new(Store::open(cache.path(), 1 << 30).unwrap());
    let index = Index::parse(server.index.lock().unwrap().clone().into()).unwrap();
    let pkg = index
        .packages
        .iter()
        .find(|p| &*p.path == BIG)
        .unwrap()
        .clone();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let fetcher = Arc::new(
            Fetcher::new(endpoint, store.clone())
                .with_streams(4)
                .with_split_below(split_below),
        );
        let blob = fetcher.open(&pkg).unwrap();
        // A large file starts sparse; a whole transfer is what is tested here.
        blob.promote().unwrap();
        blob.wait_complete().await.unwrap();
        // Committing to the cache follows completion.
        let key = pkg.cache_key();
        for _ in 0..200 {
            if store.contains(&key) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
    let file = store
        .open_object(&pkg.cache_key(), pkg.size)
        .unwrap()
        .unwrap();
    let mut out = Vec::new();
    std::io::Read::read_to_end(&mut &file, &mut out).unwrap();
    out
}

/// The bounded ranges of 1 MiB or more among logged requests (`to` inclusive).
fn ranges_of(reqs: &[String]) -> Vec<(u64, u64)> {
    let num = |w: &str| {
        w.strip_prefix("Some(")?
            .strip_suffix(')')?
            .parse::<u64>()
            .ok()
    };
    reqs.iter()
        .filter_map(|r| {
            let w: Vec<&str> = r.split(' ').collect();
            Some((num(w[2])?, num(w[3])?))
        })
        .filter(|(a, b)| b - a >= 1 << 20)
        .collect()
}

/// Issue 11.1, as a user on a kernel before 6.9 meets it. A metadata scan reads the tail of a
/// 3 MiB package through a ranged request whose answer is wrong (nothing can check a range);
/// then emerge's merge list names the package and the daemon fetches it whole and verifies it
/// (merge-list prefetch, no open); then a fresh `cat` of the file must give exactly the
/// index's bytes.
#[test]
fn no_passthrough_a_wrong_ranged_tail_is_not_served_after_the_file_is_verified() {
    support::require_real_parts();
    let size = (3 << 20) + 12_345;
    let (dir, good) = synthetic_binhost(size, None);
    let eroot = TempDir::new().unwrap();
    let mtimedb = eroot.path().join("mtimedb");
    let case = mount_case(
        Mode::NoPassthrough,
        dir.path(),
        BIG,
        Fault::WrongSmallRanges,
        &["--mtimedb", mtimedb.to_str().unwrap()],
    );
    let file = case.mount.path().join(BIG);

    // The scan: a small read of the tail.
    let mut tail = vec![0u8; 8192];
    let mut f = fs::File::open(&file).unwrap();
    f.seek(SeekFrom::Start((size - tail.len()) as u64)).unwrap();
    f.read_exact(&mut tail).unwrap();
    drop(f);
    assert!(
        tail != good[size - tail.len()..],
        "the server did not lie: the test does not reproduce the case"
    );

    // emerge publishes its merge list; the daemon fetches the file whole and verifies it.
    case.server.set(Fault::Honest);
    let db = format!(
        r#"{{"info": {{}}, "resume": {{"binpkgs": [{{"BUILD_ID": null, "BUILD_TIME": 0, "CPV": "c/big-1", "EROOT": "{e}/", "MTIME": 1, "SIZE": {size}}}], "favorites": [], "mergelist": [["binary", "{e}/", "c/big-1", "merge"]], "myopts": {{}}}}, "version": "3.0.83"}}"#,
        e = eroot.path().display()
    );
    fs::write(eroot.path().join("mtimedb.tmp"), db).unwrap();
    fs::rename(eroot.path().join("mtimedb.tmp"), &mtimedb).unwrap();
    let kept = wait_until(Duration::from_secs(20), || objects_kept(&case) == 1);
    assert!(
        kept,
        "the merge list's package was not fetched and kept:\n{}",
        case.log_text()
    );

    // A fresh reader, as `cat` would: exactly the index's bytes.
    let got = support::run_ok(Command::new("cat").arg(&file)).stdout;
    let first_diff = got.iter().zip(&good).position(|(a, b)| a != b);
    assert!(
        got.len() == good.len() && first_diff.is_none(),
        "cat returned other bytes than the index's: {} of {} bytes, first difference at byte {:?}",
        got.len(),
        good.len(),
        first_diff.map(|i| i + 1)
    );
}

both_modes! {
    /// Issue 11.4: once the binhost answers again, the very next read succeeds; no read fails in
    /// the 10 s after it is back.
    fn the_first_read_after_the_binhost_returns_succeeds(mode) {
        support::require_real_parts();
        let packages = fixture_packages();
        let cache = TempDir::new().unwrap();
        let server = Faulty::start(&fixture_binhost(), "none", Fault::Honest);
        let (port, url) = (server.port, server.url());
        let mount = Mount::new(mode, &url, cache.path(), &["--stall-timeout", "3"]).unwrap();
        drop(server);
        let gone = wait_until(Duration::from_secs(5), || {
            TcpStream::connect(("127.0.0.1", port)).is_err()
        });
        assert!(gone, "the binhost is still answering");
        for p in &packages[..2] {
            let err = fs::read(mount.path().join(&p["PATH"])).unwrap_err();
            assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
        }

        let _server = Faulty::start_on(port, &fixture_binhost(), "none", Fault::Honest);
        let back = Instant::now();
        let mut failures = Vec::new();
        for p in &packages {
            let read_at = back.elapsed();
            match fs::read(mount.path().join(&p["PATH"])) {
                Ok(got) => assert!(
                    got == fs::read(fixture_binhost().join(&p["PATH"])).unwrap(),
                    "{}: wrong bytes",
                    p["PATH"]
                ),
                Err(err) => failures.push(format!("{} at {read_at:?}: {err}", p["PATH"])),
            }
        }
        assert!(
            failures.is_empty(),
            "reads failed after the binhost was back:\n{}",
            failures.join("\n")
        );
    }
}
