//! The mount as a user sees it, through real FUSE mounts of the real binary served by real nginx
//! from the real Portage-built fixture binhost: the tree, exact attributes, byte-identical reads,
//! one transfer per file, the persistent cache, read-only behaviour, refresh, offline use, and
//! clear errors from the command line.

mod support;

use std::collections::BTreeSet;
use std::fs;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use support::{
    IndexEntry, Mode, Mount, Nginx, both_modes, copy_fixture_binhost, fixture_packages, is_mounted,
};
use tempfile::TempDir;

fn setup() -> (TempDir, Nginx, TempDir) {
    support::require_real_parts();
    let binhost = TempDir::with_prefix("binpkgfs-binhost.").unwrap();
    copy_fixture_binhost(binhost.path());
    let nginx = Nginx::start(binhost.path());
    let cache = TempDir::with_prefix("binpkgfs-cache.").unwrap();
    (binhost, nginx, cache)
}

/// Package requests nginx logged, once every answer the daemon received is in the log.
fn package_gets(nginx: &Nginx) -> Vec<String> {
    nginx.sync_log();
    nginx
        .requests()
        .into_iter()
        .filter(|l| l.is_package())
        .map(|l| l.uri)
        .collect()
}

fn objects(cache: &Path) -> usize {
    fs::read_dir(cache.join("objects")).map_or(0, |d| d.count())
}

both_modes! {
    fn tree_and_attributes_come_from_the_index_without_package_requests(mode) {
        let (binhost, nginx, cache) = setup();
        let mount = Mount::new(mode, &nginx.url(), cache.path(), &[]).unwrap();
        let entries = fixture_packages();

        let mut want: BTreeSet<PathBuf> = entries.iter().map(|e| PathBuf::from(&e["PATH"])).collect();
        want.insert(PathBuf::from("Packages"));
        let got: BTreeSet<PathBuf> = support::list_files(mount.path()).into_iter().collect();
        assert_eq!(got, want);

        for e in &entries {
            let meta = fs::metadata(mount.path().join(&e["PATH"])).unwrap();
            assert_eq!(meta.len().to_string(), e["SIZE"], "{}", e["PATH"]);
            assert_eq!(meta.mtime().to_string(), e["MTIME"], "{}", e["PATH"]);
            assert_eq!(meta.mode() & 0o7777, 0o444);
        }
        assert_eq!(
            fs::read(mount.path().join("Packages")).unwrap(),
            fs::read(binhost.path().join("Packages")).unwrap()
        );
        assert_eq!(
            package_gets(&nginx),
            Vec::<String>::new(),
            "stat and listing fetched packages"
        );
    }
}

both_modes! {
    fn concurrent_readers_share_one_transfer_and_get_exact_bytes(mode) {
        let (binhost, nginx, cache) = setup();
        let mount = Mount::new(mode, &nginx.url(), cache.path(), &[]).unwrap();
        let entries = fixture_packages();
        std::thread::scope(|s| {
            for _ in 0..6 {
                for e in &entries {
                    let (mnt, src) = (
                        mount.path().join(&e["PATH"]),
                        binhost.path().join(&e["PATH"]),
                    );
                    s.spawn(move || assert!(fs::read(mnt).unwrap() == fs::read(src).unwrap()));
                }
            }
        });
        let mut gets = package_gets(&nginx);
        gets.sort();
        let mut want: Vec<String> = entries.iter().map(|e| format!("/{}", e["PATH"])).collect();
        want.sort();
        assert_eq!(gets, want, "each package crosses the network exactly once");
        // Readers get the last byte once the file is checked; keeping it follows just after.
        let kept = support::wait_until(Duration::from_secs(5), || {
            objects(cache.path()) == entries.len()
        });
        assert!(kept, "{} of {} kept", objects(cache.path()), entries.len());
    }
}

both_modes! {
    fn scattered_reads_return_the_right_bytes(mode) {
        let (binhost, nginx, cache) = setup();
        let mount = Mount::new(mode, &nginx.url(), cache.path(), &[]).unwrap();
        let e = fixture_packages()
            .into_iter()
            .max_by_key(|e| e["SIZE"].parse::<u64>().unwrap())
            .unwrap();
        let src = fs::read(binhost.path().join(&e["PATH"])).unwrap();
        let mut f = fs::File::open(mount.path().join(&e["PATH"])).unwrap();
        // Tail first, as Portage's tar reader does, then headers in the middle.
        for &offset in &[src.len() as u64 - 1024, 0, 512, src.len() as u64 / 2, 1] {
            let mut buf = vec![0; 700];
            f.seek(SeekFrom::Start(offset)).unwrap();
            let n = f.read(&mut buf).unwrap();
            let end = (offset as usize + n).min(src.len());
            assert_eq!(&buf[..n], &src[offset as usize..end], "offset {offset}");
        }
    }
}

both_modes! {
    fn cache_survives_remount_and_a_rebuilt_package_is_fetched_again(mode) {
        let (binhost, nginx, cache) = setup();
        let entries = fixture_packages();
        let mut mount = Mount::new(mode, &nginx.url(), cache.path(), &[]).unwrap();
        for e in &entries {
            fs::read(mount.path().join(&e["PATH"])).unwrap();
        }
        mount.unmount().unwrap();
        nginx.clear_log();

        let mut mount = Mount::new(mode, &nginx.url(), cache.path(), &[]).unwrap();
        for e in &entries {
            let got = fs::read(mount.path().join(&e["PATH"])).unwrap();
            assert!(
                got == fs::read(binhost.path().join(&e["PATH"])).unwrap(),
                "{}",
                e["PATH"]
            );
        }
        assert_eq!(
            package_gets(&nginx),
            Vec::<String>::new(),
            "warm reads must not fetch"
        );
        mount.unmount().unwrap();

        // Rebuild one package at the same PATH: same size, new bytes, new digests.
        let rebuilt = &entries[0];
        let path = binhost.path().join(&rebuilt["PATH"]);
        let mut bytes = fs::read(&path).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0xff;
        fs::write(&path, &bytes).unwrap();
        rewrite_entry(binhost.path(), &rebuilt["PATH"], &bytes);
        nginx.clear_log();

        let mount = Mount::new(mode, &nginx.url(), cache.path(), &[]).unwrap();
        assert!(
            fs::read(mount.path().join(&rebuilt["PATH"])).unwrap() == bytes,
            "stale bytes served"
        );
        assert_eq!(package_gets(&nginx), vec![format!("/{}", rebuilt["PATH"])]);
    }
}

/// An index's text from its header and entries, as Portage writes it.
fn render_index<'a>(
    header: &IndexEntry,
    entries: impl IntoIterator<Item = &'a IndexEntry>,
) -> String {
    let block = |b: &IndexEntry| -> String {
        b.iter()
            .map(|(k, v)| format!("{k}: {v}\n"))
            .collect::<String>()
            + "\n"
    };
    entries
        .into_iter()
        .fold(block(header), |out, e| out + &block(e))
}

/// Updates one entry's SHA1/MD5/SIZE in the binhost's `Packages` for new file contents, and
/// bumps TIMESTAMP, as a binhost that rebuilt the package would.
fn rewrite_entry(binhost: &Path, path: &str, bytes: &[u8]) {
    let text = fs::read_to_string(binhost.join("Packages")).unwrap();
    let (mut header, mut entries) = support::parse_packages(&text);
    let ts: u64 = header["TIMESTAMP"].parse().unwrap();
    header.insert("TIMESTAMP".into(), (ts + 10).to_string());
    for e in entries.iter_mut().filter(|e| e["PATH"] == path) {
        e.insert("SHA1".into(), support::digest_hex("sha1sum", bytes));
        e.insert("MD5".into(), support::digest_hex("md5sum", bytes));
        e.insert("SIZE".into(), bytes.len().to_string());
    }
    let out = render_index(&header, &entries);
    publish_index(binhost, &out);
}

/// Replaces the binhost's index as a binhost does (write aside, rename), with an mtime in the
/// future: nginx's ETag is mtime-size, and a same-size rewrite within one second would
/// rightly be answered 304.
fn publish_index(binhost: &Path, text: &str) {
    publish_index_ahead(binhost, text, 5);
}

/// [`publish_index`] with the file's mtime `secs` seconds ahead, so that indexes published
/// within one second of each other still carry increasing mtimes.
fn publish_index_ahead(binhost: &Path, text: &str, secs: u64) {
    let tmp = binhost.join("Packages.new");
    fs::write(&tmp, text).unwrap();
    let later = std::time::SystemTime::now() + Duration::from_secs(secs);
    fs::File::options()
        .write(true)
        .open(&tmp)
        .unwrap()
        .set_modified(later)
        .unwrap();
    fs::rename(&tmp, binhost.join("Packages")).unwrap();
}

both_modes! {
    fn everything_is_read_only_and_readable_by_other_users(mode) {
        let (_binhost, nginx, cache) = setup();
        let mount = Mount::new(mode, &nginx.url(), cache.path(), &[]).unwrap();
        let e = &fixture_packages()[0];
        let file = mount.path().join(&e["PATH"]);
        let erofs = |r: std::io::Result<()>| {
            let err = r.expect_err("write-like operation succeeded");
            assert_eq!(err.raw_os_error(), Some(libc::EROFS), "{err}");
        };
        erofs(fs::write(mount.path().join("new"), b"x"));
        erofs(fs::OpenOptions::new().write(true).open(&file).map(drop));
        erofs(fs::create_dir(mount.path().join("d")));
        erofs(fs::remove_file(&file));
        erofs(fs::rename(&file, mount.path().join("moved")));
        erofs(fs::set_permissions(
            &file,
            std::os::unix::fs::PermissionsExt::from_mode(0o644),
        ));
        // What Portage asks before it would write anything.
        let c = std::ffi::CString::new(mount.path().as_os_str().as_encoded_bytes()).unwrap();
        assert_eq!(unsafe { libc::access(c.as_ptr(), libc::W_OK) }, -1);
        assert_eq!(
            std::io::Error::last_os_error().raw_os_error(),
            Some(libc::EROFS)
        );

        let info = fs::read_to_string("/proc/self/mountinfo").unwrap();
        let line = info
            .lines()
            .find(|l| l.contains(&*mount.path().to_string_lossy()))
            .unwrap();
        for opt in ["ro", "nosuid", "nodev"] {
            assert!(
                line.split(' ').nth(5).unwrap().split(',').any(|o| o == opt),
                "{opt}: {line}"
            );
        }
        // The `portage` user reads through the mount.
        let out = support::run_ok(
            Command::new("setpriv")
                .args(["--reuid=250", "--regid=250", "--clear-groups", "cat"])
                .arg(&file),
        );
        assert_eq!(out.stdout.len().to_string(), e["SIZE"]);
    }
}

fn mount_cmd(args: &[&str]) -> (bool, String) {
    let out = Command::new(support::binpkgfs_bin())
        .arg("mount")
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).trim().to_string(),
    )
}

#[test]
fn command_line_errors_are_one_clear_line() {
    support::require_real_parts();
    let cache = TempDir::new().unwrap();
    let mnt = TempDir::new().unwrap();
    let cache_arg = cache.path().to_str().unwrap();
    let mnt_arg = mnt.path().to_str().unwrap();
    let file = cache.path().join("plain-file");
    fs::write(&file, b"").unwrap();
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://127.0.0.1:{}/", l.local_addr().unwrap().port())
    };
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec!["--cache-dir", cache_arg, "ftp://x/y", mnt_arg],
            "unsupported URL",
        ),
        (
            vec!["--cache-dir", cache_arg, "http://h/x", "/nonexistent/mnt"],
            "does not exist",
        ),
        (
            vec![
                "--cache-dir",
                cache_arg,
                "http://h/x",
                file.to_str().unwrap(),
            ],
            "not a directory",
        ),
        (
            vec!["--cache-dir", cache_arg, "-o", "rw", "http://h/x", mnt_arg],
            "read-only",
        ),
        (
            vec!["--cache-dir", cache_arg, &dead, mnt_arg],
            "unreachable and no saved index",
        ),
    ];
    for (args, want) in cases {
        let (ok, stderr) = mount_cmd(&args);
        assert!(!ok, "{args:?} succeeded");
        assert_eq!(stderr.lines().count(), 1, "{args:?}: {stderr}");
        assert!(
            stderr.starts_with("binpkgfs: error: ") && stderr.contains(want),
            "{args:?}: {stderr}"
        );
        assert!(!is_mounted(mnt.path()));
    }
}

both_modes! {
    fn already_mounted_and_shared_cache_are_refused(mode) {
        let (_binhost, nginx, cache) = setup();
        let mount = Mount::new(mode, &nginx.url(), cache.path(), &[]).unwrap();
        let (ok, stderr) = mount_cmd(&[
            "--cache-dir",
            TempDir::new().unwrap().path().to_str().unwrap(),
            &nginx.url(),
            mount.path().to_str().unwrap(),
        ]);
        assert!(!ok && stderr.contains("already a mount point"), "{stderr}");
        let err = Mount::new(mode, &nginx.url(), cache.path(), &[])
            .err()
            .expect("second daemon on one cache");
        assert!(err.contains("in use by another binpkgfs"), "{err}");
    }
}

both_modes! {
    fn sigterm_unmounts_and_exits(mode) {
        let (_binhost, nginx, cache) = setup();
        let mut mount = Mount::new(mode, &nginx.url(), cache.path(), &[]).unwrap();
        unsafe { libc::kill(mount.pid(), libc::SIGTERM) };
        mount.wait_for_exit(Duration::from_secs(10)).unwrap();
        assert!(!is_mounted(mount.path()));
    }
}

both_modes! {
    fn offline_remount_serves_cached_packages_and_fails_fast_on_the_rest(mode) {
        let (_binhost, mut nginx, cache) = setup();
        let entries = fixture_packages();
        let (cached, uncached) = (&entries[0], &entries[1]);
        let mut mount = Mount::new(mode, &nginx.url(), cache.path(), &[]).unwrap();
        let want = fs::read(mount.path().join(&cached["PATH"])).unwrap();
        mount.unmount().unwrap();
        let url = nginx.url();
        nginx.stop();

        let mount = Mount::new(mode, &url, cache.path(), &["--stall-timeout", "3"]).unwrap();
        assert_eq!(support::list_files(mount.path()).len(), entries.len() + 1);
        assert!(fs::read(mount.path().join(&cached["PATH"])).unwrap() == want);
        let started = Instant::now();
        let err = fs::read(mount.path().join(&uncached["PATH"])).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{:?}",
            started.elapsed()
        );
    }
}

both_modes! {
    fn index_refresh_shows_new_builds_and_keeps_open_readers_on_their_version(mode) {
        let (binhost, nginx, cache) = setup();
        let entries = fixture_packages();
        let mount = Mount::new(mode, &nginx.url(), cache.path(), &["--index-ttl", "1"]).unwrap();
        let victim = &entries[0];
        let victim_bytes = fs::read(binhost.path().join(&victim["PATH"])).unwrap();
        let mut reader = fs::File::open(mount.path().join(&victim["PATH"])).unwrap();
        let mut head = vec![0; 100];
        reader.read_exact(&mut head).unwrap();

        // The binhost withdraws `victim` and publishes a new build elsewhere: packages first,
        // index last, as binhosts do.
        let text = fs::read_to_string(binhost.path().join("Packages")).unwrap();
        let (mut header, rest) = support::parse_packages(&text);
        let new_path = "app-misc/newcomer/newcomer-1-1.gpkg.tar";
        fs::create_dir_all(binhost.path().join("app-misc/newcomer")).unwrap();
        fs::copy(
            binhost.path().join(&entries[1]["PATH"]),
            binhost.path().join(new_path),
        )
        .unwrap();
        let mut newcomer = entries[1].clone();
        newcomer.insert("PATH".into(), new_path.into());
        newcomer.insert("CPV".into(), "app-misc/newcomer-1".into());
        let ts: u64 = header["TIMESTAMP"].parse().unwrap();
        header.insert("TIMESTAMP".into(), (ts + 60).to_string());
        let kept = rest.iter().filter(|e| e["PATH"] != victim["PATH"]);
        let out = render_index(&header, kept.chain([&newcomer]));
        publish_index(binhost.path(), &out);
        fs::remove_file(binhost.path().join(&victim["PATH"])).unwrap();

        // Lookups while polling answer "there" or "not there"; any other error fails the test.
        let exists = |rel: &str| {
            mount
                .path()
                .join(rel)
                .try_exists()
                .unwrap_or_else(|err| panic!("lookup of {rel} during a refresh: {err}"))
        };
        let appeared = support::wait_until(Duration::from_secs(10), || {
            exists(new_path) && !exists(&victim["PATH"])
        });
        assert!(appeared, "refresh did not show the new index");
        assert!(
            fs::read(mount.path().join(new_path)).unwrap()
                == fs::read(binhost.path().join(new_path)).unwrap()
        );
        // The reader that opened the withdrawn file before the refresh reads it to the end.
        let mut rest_bytes = Vec::new();
        reader.read_to_end(&mut rest_bytes).unwrap();
        assert!(
            [head, rest_bytes].concat() == victim_bytes,
            "pinned reader saw other bytes"
        );
        assert!(
            fs::read(mount.path().join("Packages")).unwrap()
                == fs::read(binhost.path().join("Packages")).unwrap(),
            "served index matches the tree"
        );
    }
}

both_modes! {
    fn status_reports_the_mount(mode) {
        let (_binhost, nginx, cache) = setup();
        let mount = Mount::new(mode, &nginx.url(), cache.path(), &[]).unwrap();
        let e = &fixture_packages()[0];
        fs::read(mount.path().join(&e["PATH"])).unwrap();
        let status = || {
            let out = support::run_ok(
                Command::new(support::binpkgfs_bin())
                    .args(["status", "--json"])
                    .arg(mount.path()),
            );
            String::from_utf8(out.stdout).unwrap()
        };
        // The reader is answered once the file is verified; committing it to the cache follows.
        let idle = support::wait_until(Duration::from_secs(5), || {
            let s = status();
            s.contains("\"downloads_in_flight\":0") && s.contains("\"entries\":1")
        });
        assert!(idle, "a download still in flight 5 s after the read: {}", status());
        let text = status();
        for want in [
            format!("\"packages\":{}", fixture_packages().len()),
            "\"misses\":1".to_string(),
            format!("\"bytes_fetched\":{}", e["SIZE"]),
            "\"downloads_in_flight\":0".to_string(),
            "\"entries\":1".to_string(),
        ] {
            assert!(text.contains(&want), "{want} not in {text}");
        }
        let out = Command::new(support::binpkgfs_bin())
            .arg("status")
            .arg("/")
            .output()
            .unwrap();
        assert!(!out.status.success());
        assert!(String::from_utf8_lossy(&out.stderr).contains("not a binpkgfs mount"));
    }
}

#[test]
fn demo_mounts_the_builtin_binhost_reads_every_package_and_cleans_up() {
    support::require_real_parts();
    let out = support::run_ok(Command::new(support::binpkgfs_bin()).arg("demo"));
    let stdout = String::from_utf8_lossy(&out.stdout);
    for e in fixture_packages() {
        let pf = e["CPV"].rsplit('/').next().unwrap().to_string();
        assert!(
            stdout.contains(&e["PATH"]) && stdout.contains(&pf),
            "{pf} missing:\n{stdout}"
        );
    }
    let misses = format!("{} misses", fixture_packages().len());
    assert!(stdout.contains(&misses), "{stdout}");
    let mounts = fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(
        !mounts.contains("binpkgfs-demo."),
        "demo left a mount behind"
    );
}

/// READ requests the daemon logged (at debug level) for inode `ino`.
fn logged_reads(log: &Path, ino: u64) -> usize {
    let needle = format!("ino {ino:#018x} READ");
    fs::read_to_string(log)
        .unwrap_or_default()
        .matches(&needle)
        .count()
}

#[test]
fn warm_reads_bypass_the_daemon_and_return_the_same_bytes() {
    let (binhost, nginx, cache) = setup();
    let logs = TempDir::new().unwrap();
    let log = logs.path().join("log");
    let args = ["--log-level", "debug", "--log-file", log.to_str().unwrap()];
    let e = fixture_packages()
        .into_iter()
        .max_by_key(|e| e["SIZE"].parse::<u64>().unwrap())
        .unwrap();
    let want = fs::read(binhost.path().join(&e["PATH"])).unwrap();

    let mut mount = Mount::new(Mode::Passthrough, &nginx.url(), cache.path(), &args).unwrap();
    let file = mount.path().join(&e["PATH"]);
    let ino = fs::metadata(&file).unwrap().ino();
    assert!(
        fs::read(&file).unwrap() == want,
        "cold read (through the daemon)"
    );
    assert!(
        logged_reads(&log, ino) > 0,
        "a cold read is served by the daemon"
    );
    mount.unmount().unwrap();

    // A new mount: the kernel has no page cache for the file, and the cache has it complete.
    fs::remove_file(&log).unwrap();
    let mount = Mount::new(Mode::Passthrough, &nginx.url(), cache.path(), &args).unwrap();
    let file = mount.path().join(&e["PATH"]);
    assert!(fs::read(&file).unwrap() == want, "warm read (passthrough)");
    assert_eq!(logged_reads(&log, ino), 0, "warm read reached the daemon");
    drop(mount);

    // The fallback: with passthrough off, the same warm read is served by the daemon.
    fs::remove_file(&log).unwrap();
    let mount = Mount::new(Mode::NoPassthrough, &nginx.url(), cache.path(), &args).unwrap();
    let file = mount.path().join(&e["PATH"]);
    assert!(
        fs::read(&file).unwrap() == want,
        "warm read (daemon-served)"
    );
    assert!(
        logged_reads(&log, ino) > 0,
        "--no-passthrough still passed through"
    );
}

both_modes! {
    /// Reading `Packages` while polling hits issue 11.2 (ENOENT during the swap), which the
    /// old `is_ok_and` poll retried past.
    fn a_same_size_index_refresh_serves_the_new_index_bytes(mode) {
        let (binhost, nginx, cache) = setup();
        let mount = Mount::new(mode, &nginx.url(), cache.path(), &["--index-ttl", "1"]).unwrap();
        let served = mount.path().join("Packages");
        let before = fs::read(&served).unwrap(); // now in the kernel's page cache
        let e = &fixture_packages()[0];
        let mut bytes = fs::read(binhost.path().join(&e["PATH"])).unwrap();
        bytes[100] ^= 1;
        fs::write(binhost.path().join(&e["PATH"]), &bytes).unwrap();
        rewrite_entry(binhost.path(), &e["PATH"], &bytes);
        let after = fs::read(binhost.path().join("Packages")).unwrap();
        assert_eq!(
            before.len(),
            after.len(),
            "the test needs a same-size index"
        );
        // Every read while polling must succeed: an error is a failure, not a retry.
        let fresh = support::wait_until(Duration::from_secs(10), || {
            let read = fs::read(&served);
            read.unwrap_or_else(|err| panic!("reading Packages during a refresh: {err}")) == after
        });
        assert!(fresh, "the mount kept serving the old index bytes");
        assert!(fs::read(mount.path().join(&e["PATH"])).unwrap() == bytes);
    }
}

both_modes! {
    fn https_binhosts_are_verified_against_the_system_trust_store(mode) {
        support::require_real_parts();
        let binhost = TempDir::new().unwrap();
        copy_fixture_binhost(binhost.path());
        let (url, cert, _nginx, _dir) = support::tls_nginx(binhost.path(), "");
        let mnt = TempDir::new().unwrap();
        let cache = TempDir::new().unwrap();

        // An untrusted certificate: the mount is refused, with the reason, in one line.
        let (ok, stderr) = mount_cmd(&[
            "--cache-dir",
            cache.path().to_str().unwrap(),
            &url,
            mnt.path().to_str().unwrap(),
        ]);
        assert!(!ok && stderr.lines().count() == 1, "{stderr}");
        assert!(stderr.to_lowercase().contains("certificate"), "{stderr}");
        assert!(!is_mounted(mnt.path()));

        // The same server, its certificate in the trust store the daemon reads: it works.
        support::run_ok(
            Command::new(support::binpkgfs_bin())
                .env("SSL_CERT_FILE", &cert)
                .args(["mount", "--pid-file"])
                .arg(cache.path().join("pid"))
                .args(mode.args())
                .arg("--cache-dir")
                .arg(cache.path())
                .arg(&url)
                .arg(mnt.path()),
        );
        let e = &fixture_packages()[0];
        let got = fs::read(mnt.path().join(&e["PATH"]));
        let _ = Command::new("umount").arg(mnt.path()).status();
        assert!(got.unwrap() == fs::read(binhost.path().join(&e["PATH"])).unwrap());
    }
}

both_modes! {
    fn an_older_index_never_replaces_a_newer_one(mode) {
        let (binhost, nginx, cache) = setup();
        let mount = Mount::new(mode, &nginx.url(), cache.path(), &["--index-ttl", "1"]).unwrap();
        let entries = fixture_packages();
        // The binhost rolls back to an older index without the first package.
        let text = fs::read_to_string(binhost.path().join("Packages")).unwrap();
        let (mut header, rest) = support::parse_packages(&text);
        let ts: u64 = header["TIMESTAMP"].parse().unwrap();
        header.insert("TIMESTAMP".into(), (ts - 100).to_string());
        let out = render_index(&header, rest.iter().skip(1));
        publish_index(binhost.path(), &out);
        // Wait until the daemon has fetched and judged it: it says so in its log.
        let log = cache.path().join("binpkgfs.log");
        let judged = support::wait_until(Duration::from_secs(10), || {
            fs::read_to_string(&log)
                .unwrap_or_default()
                .contains("binhost served an older index; keeping ours")
        });
        assert!(
            judged,
            "the daemon never judged the older index; nginx logged {:#?}\nlog:\n{}",
            nginx.requests(),
            fs::read_to_string(&log).unwrap_or_default()
        );
        assert!(
            mount.path().join(&entries[0]["PATH"]).exists(),
            "older index replaced ours"
        );
        assert!(fs::read(mount.path().join("Packages")).unwrap() == text.as_bytes());
    }
}

/// Publishes the binhost's index again with TIMESTAMP `ts` (same entries: a no-op release, as a
/// binhost that re-ran `emaint binhost` makes) and returns its text.
fn republish_with_timestamp(binhost: &Path, ts: u64, secs_ahead: u64) -> String {
    let text = fs::read_to_string(binhost.join("Packages")).unwrap();
    let (mut header, entries) = support::parse_packages(&text);
    header.insert("TIMESTAMP".into(), ts.to_string());
    let out = render_index(&header, &entries);
    publish_index_ahead(binhost, &out, secs_ahead);
    out
}

/// Waits (failing the test) until the mount serves `want` as its `Packages`; every read while
/// waiting must succeed.
fn wait_for_served_index(mount: &Mount, want: &str) {
    let served = mount.path().join("Packages");
    let fresh = support::wait_until(Duration::from_secs(15), || {
        let read = fs::read(&served);
        read.unwrap_or_else(|err| panic!("reading Packages during a refresh: {err}"))
            == want.as_bytes()
    });
    assert!(fresh, "the mount did not serve the new index within 15 s");
}

both_modes! {
    /// Issue 11.2: a file opened before an index refresh stays a file: `fstat` on the open
    /// handle answers (as `cat` asks) and the reader reads it to the end, for a package and for
    /// `Packages` itself.
    fn a_file_opened_before_a_refresh_reads_to_the_end_and_fstat_answers(mode) {
        let (binhost, nginx, cache) = setup();
        let mount = Mount::new(mode, &nginx.url(), cache.path(), &["--index-ttl", "1"]).unwrap();
        let e = &fixture_packages()[0];
        let want = fs::read(binhost.path().join(&e["PATH"])).unwrap();
        let old_index = fs::read(mount.path().join("Packages")).unwrap();
        let package = fs::File::open(mount.path().join(&e["PATH"])).unwrap();
        let index = fs::File::open(mount.path().join("Packages")).unwrap();

        let text = fs::read_to_string(binhost.path().join("Packages")).unwrap();
        let ts: u64 = support::parse_packages(&text).0["TIMESTAMP"].parse().unwrap();
        let new = republish_with_timestamp(binhost.path(), ts + 60, 5);
        wait_for_served_index(&mount, &new);

        for (name, file, len) in [
            ("the package", &package, want.len()),
            ("Packages", &index, old_index.len()),
        ] {
            let meta = file
                .metadata()
                .unwrap_or_else(|err| panic!("fstat of {name} opened before the refresh: {err}"));
            assert_eq!(meta.len(), len as u64, "fstat of {name}");
        }
        // `cat` of the open package: it fstats its input, then reads it to the end.
        let out = Command::new("cat")
            .stdin(package.try_clone().unwrap())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "cat of a file opened before the refresh: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
        assert!(out.stdout == want, "cat read other bytes");
        let mut rest = Vec::new();
        (&index).read_to_end(&mut rest).unwrap();
        assert!(rest == old_index, "the open Packages changed under its reader");
    }
}

both_modes! {
    /// Issue 11.2: `Packages` read 20 times a second across 10 refreshes never fails: every
    /// error counts.
    fn packages_read_20_times_a_second_across_10_refreshes_never_fails(mode) {
        let (binhost, nginx, cache) = setup();
        let mount = Mount::new(mode, &nginx.url(), cache.path(), &["--index-ttl", "1"]).unwrap();
        let served = mount.path().join("Packages");
        let text = fs::read_to_string(binhost.path().join("Packages")).unwrap();
        let ts: u64 = support::parse_packages(&text).0["TIMESTAMP"].parse().unwrap();
        let stop = std::sync::atomic::AtomicBool::new(false);
        let (reads, errors) = std::thread::scope(|s| {
            // Stops the reader however the refreshes end (a panic too), or the scope never ends.
            let stopper = StopOnDrop(&stop);
            let reader = s.spawn(|| {
                let (mut reads, mut errors) = (0, Vec::new());
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let started = Instant::now();
                    match fs::read(&served) {
                        Ok(bytes) if !bytes.is_empty() => {}
                        Ok(_) => errors.push("an empty Packages".to_string()),
                        Err(err) => errors.push(err.to_string()),
                    }
                    reads += 1;
                    std::thread::sleep(Duration::from_millis(50).saturating_sub(started.elapsed()));
                }
                (reads, errors)
            });
            for i in 1..=10 {
                let new = republish_with_timestamp(binhost.path(), ts + 60 * i, 5 + i);
                wait_for_served_index(&mount, &new);
            }
            drop(stopper);
            reader.join().unwrap()
        });
        assert!(reads >= 20, "only {reads} reads");
        assert!(
            errors.is_empty(),
            "{} of {reads} reads of Packages failed across 10 refreshes: {errors:?}",
            errors.len()
        );
    }
}

/// Sets its flag when dropped.
struct StopOnDrop<'a>(&'a std::sync::atomic::AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

/// The kernel modes every new mount-level test runs in: passthrough (where the kernel has it)
/// and reads served through the daemon, as on kernels before 6.9.
const MODES: [Mode; 2] = [Mode::Passthrough, Mode::NoPassthrough];

/// Publishes the binhost's index again with a later TIMESTAMP and without `drop` (if given);
/// the files stay on the server, as binhosts keep them until `eclean-pkg`.
fn republish(binhost: &Path, bump: u64, drop: Option<&str>) -> String {
    let text = fs::read_to_string(binhost.join("Packages")).unwrap();
    let (mut header, entries) = support::parse_packages(&text);
    let ts: u64 = header["TIMESTAMP"].parse().unwrap();
    header.insert("TIMESTAMP".into(), (ts + bump).to_string());
    let kept = entries.iter().filter(|e| Some(e["PATH"].as_str()) != drop);
    let out = render_index(&header, kept);
    publish_index(binhost, &out);
    out
}

/// Issue 11.2: `cat` of a file opened before a refresh that withdraws it reads it to the end,
/// and `fstat` of the open file works (it answered ENOENT once the index swapped).
#[test]
fn a_file_opened_before_a_refresh_reads_to_the_end_and_fstat_works() {
    for mode in MODES {
        let (binhost, nginx, cache) = setup();
        let args = ["--index-ttl", "1"];
        let mount = Mount::new(mode, &nginx.url(), cache.path(), &args).unwrap();
        let victim = &fixture_packages()[0];
        let want = fs::read(binhost.path().join(&victim["PATH"])).unwrap();
        let path = mount.path().join(&victim["PATH"]);
        let mut file = fs::File::open(&path).unwrap();
        let mut head = vec![0u8; 100];
        file.read_exact(&mut head).unwrap();

        republish(binhost.path(), 60, Some(&victim["PATH"]));
        let gone = support::wait_until(Duration::from_secs(10), || !path.exists());
        assert!(gone, "{mode:?}: the refresh did not withdraw the file");

        let meta = file.metadata();
        assert!(
            meta.as_ref().is_ok_and(|m| m.len() == want.len() as u64),
            "{mode:?}: fstat of the open file after the refresh: {meta:?}"
        );
        // `cat` reads on from the shared offset; it fstats its input first, as in the report.
        let out = Command::new("cat")
            .stdin(file.try_clone().unwrap())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{mode:?}: cat of the open file failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            [head, out.stdout].concat() == want,
            "{mode:?}: cat returned other bytes"
        );
    }
}

/// Issue 11.2: reading `Packages` 20 times a second across 10 refreshes never fails, and each
/// read is one whole index the binhost published.
#[test]
fn packages_read_20_times_a_second_across_10_refreshes_never_fails() {
    for mode in MODES {
        let (binhost, nginx, cache) = setup();
        let args = ["--index-ttl", "1"];
        let mount = Mount::new(mode, &nginx.url(), cache.path(), &args).unwrap();
        let served = mount.path().join("Packages");
        let published =
            std::sync::Mutex::new(vec![fs::read(binhost.path().join("Packages")).unwrap()]);
        let done = std::sync::atomic::AtomicBool::new(false);
        let (reads, failures) = std::thread::scope(|s| {
            let reader = s.spawn(|| {
                let (mut reads, mut failures) = (0, Vec::new());
                while !done.load(std::sync::atomic::Ordering::Relaxed) {
                    let got = fs::read(&served);
                    reads += 1;
                    match got {
                        Ok(b) if published.lock().unwrap().contains(&b) => {}
                        Ok(b) => {
                            failures.push(format!("a torn or unknown index ({} bytes)", b.len()))
                        }
                        Err(e) => failures.push(e.to_string()),
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
                (reads, failures)
            });
            // A refresh that never shows ends the loop, not the test: the reader must stop.
            let mut missed = None;
            for i in 1..=10 {
                let text = {
                    let mut p = published.lock().unwrap();
                    let text = republish(binhost.path(), i, None);
                    p.push(text.clone().into_bytes());
                    text
                };
                let swapped = support::wait_until(Duration::from_secs(10), || {
                    fs::read(&served).is_ok_and(|b| b == text.as_bytes())
                });
                if !swapped {
                    missed = Some(i);
                    break;
                }
            }
            done.store(true, std::sync::atomic::Ordering::Relaxed);
            let (reads, failures) = reader.join().unwrap();
            assert_eq!(missed, None, "{mode:?}: a refresh never showed");
            (reads, failures)
        });
        assert!(reads >= 100, "{mode:?}: only {reads} reads");
        assert!(
            failures.is_empty(),
            "{mode:?}: {} of {reads} reads of Packages failed across 10 refreshes: {failures:?}",
            failures.len()
        );
    }
}
