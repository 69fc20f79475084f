//! ssh:// binhosts through real mounts, against a real OpenSSH server (`/usr/sbin/sshd` on a
//! loopback port, keys made at test time): exact bytes, real `emerge` installs, ranged
//! metadata scans, a wrong host key, a server killed or stopped mid-use, a restricted
//! read-only key, and no ssh master left behind however the daemon ends.

mod support;

use std::fs;
use std::io::Read;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use support::{
    Mode, Mount, PortageSandbox, SSH_ALIAS, Sshd, both_modes, copy_fixture_binhost,
    fixture_packages, is_mounted, wait_until,
};
use tempfile::TempDir;

/// How long an orphaned master may live: ControlPersist (10 s) plus margin.
const MASTER_GONE: Duration = Duration::from_secs(25);

fn args<'a>(ssh: &'a [String], extra: &[&'a str]) -> Vec<&'a str> {
    let mut v: Vec<&str> = ssh.iter().map(String::as_str).collect();
    v.extend_from_slice(extra);
    v
}

fn fixture_copy() -> TempDir {
    support::require_real_parts();
    let dir = TempDir::with_prefix("binpkgfs-sshbh.").unwrap();
    copy_fixture_binhost(dir.path());
    dir
}

fn mount(mode: Mode, sshd: &Sshd, root: &Path, cache: &Path, extra: &[&str]) -> Mount {
    let ssh = sshd.mount_args();
    let url = sshd.url(root);
    Mount::new(mode, &url, cache, &args(&ssh, extra)).unwrap_or_else(|e| {
        panic!(
            "binpkgfs mount {url} failed: {e}\nsshd log:\n{}",
            sshd.log()
        )
    })
}

fn read_all_packages(mount: &Path, binhost: &Path) {
    for p in fixture_packages() {
        let got = fs::read(mount.join(&p["PATH"])).unwrap();
        assert!(
            got == fs::read(binhost.join(&p["PATH"])).unwrap(),
            "{} differs",
            p["PATH"]
        );
    }
}

/// A binhost with one incompressible package of `mib` MiB, its index entry made by hand.
fn big_synthetic(mib: usize) -> (TempDir, String) {
    let dir = TempDir::with_prefix("binpkgfs-sshbig.").unwrap();
    let path = "app-misc/huge/huge-1-1.gpkg.tar".to_string();
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    let mut data = Vec::with_capacity(mib << 20);
    for _ in 0..(mib << 17) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        data.extend_from_slice(&x.to_le_bytes());
    }
    fs::create_dir_all(dir.path().join("app-misc/huge")).unwrap();
    let file = dir.path().join(&path);
    fs::write(&file, &data).unwrap();
    let digest = |tool: &str| {
        let out = support::run_ok(Command::new(tool).arg(&file));
        String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .next()
            .unwrap()
            .to_string()
    };
    fs::write(
        dir.path().join("Packages"),
        format!(
            "TIMESTAMP: 1\nVERSION: 0\n\nCPV: app-misc/huge-1\nPATH: {path}\nSIZE: {}\n\
             MTIME: 1\nSHA1: {}\nMD5: {}\n\n",
            data.len(),
            digest("sha1sum"),
            digest("md5sum")
        ),
    )
    .unwrap();
    (dir, path)
}

fn no_master_within(sshd: &Sshd, timeout: Duration, when: &str) {
    assert!(
        wait_until(timeout, || sshd.client_pids().is_empty()),
        "ssh processes still run {timeout:?} {when}: {:?}",
        sshd.client_pids()
    );
}

both_modes! {
    /// Every package read through an ssh:// mount is byte-equal to the file on the server;
    /// `status` names the transport.
    fn every_package_reads_exactly_over_ssh(mode) {
        let sshd = Sshd::start();
        let binhost = fixture_copy();
        let cache = TempDir::new().unwrap();
        let m = mount(mode, &sshd, binhost.path(), cache.path(), &[]);
        read_all_packages(m.path(), binhost.path());
        let st = m.status_json();
        assert_eq!(st["transport"], "ssh", "{st}");
        assert!(st["bytes_fetched"].as_u64().unwrap() > 0);
    }

    /// Real `emerge --usepkgonly` installs a dependency chain through an ssh:// mount.
    fn emerge_installs_from_an_ssh_binhost(mode) {
        let sshd = Sshd::start();
        let binhost = fixture_copy();
        let cache = TempDir::new().unwrap();
        let m = mount(mode, &sshd, binhost.path(), cache.path(), &["--no-prefetch"]);
        let sandbox = PortageSandbox::new(m.path());
        sandbox.emerge_ok(&["--oneshot", "--usepkgonly", "app-misc/binpkgfs-demo"]);
        assert_eq!(
            sandbox.installed(),
            [
                "app-misc/binpkgfs-demo-0.3",
                "dev-libs/libdemo-2.1",
                "sys-apps/demo-base-1.0"
            ]
        );
        let installed = support::list_files(&sandbox.root().join("var/db/pkg"));
        assert!(!installed.is_empty());
    }

    /// Portage's reindex scan over ssh:// reads a few percent of a large package (SFTP reads
    /// at offsets), and the install after it fetches it about once.
    fn metadata_scan_over_ssh_fetches_a_few_percent(mode) {
        const BIG: &str = "app-misc/demo-big/demo-big-1.0-1.gpkg.tar";
        let sshd = Sshd::start();
        let binhost = support::big_binhost();
        let cache = TempDir::new().unwrap();
        let m = mount(mode, &sshd, &binhost, cache.path(), &[]);
        let n = fs::metadata(binhost.join(BIG)).unwrap().len();
        let mut sandbox = PortageSandbox::new(m.path());
        sandbox.add_feature("-pkgdir-index-trusted");
        sandbox.emerge_ok(&["-p", "--usepkgonly", "app-misc/demo-big"]);
        let scan = m.status_json()["bytes_fetched"].as_u64().unwrap();
        eprintln!("ssh reindex scan: {scan} of {n} bytes ({:.2}%)", scan as f64 * 100.0 / n as f64);
        assert!(scan > 0 && scan * 20 <= n, "scan fetched {scan} of {n} bytes (more than 5%)");
        sandbox.emerge_ok(&["--oneshot", "--usepkgonly", "app-misc/demo-big"]);
        let total = m.status_json()["bytes_fetched"].as_u64().unwrap();
        assert!(total <= n + n / 10, "install fetched {total} bytes of {n}");
    }

    /// A server whose host key is not the one in known_hosts: `binpkgfs mount` fails with one
    /// line that says so, nothing is mounted, no daemon and no ssh process stay behind.
    fn wrong_or_unknown_host_key_fails_the_mount_with_one_line(mode) {
        let sshd = Sshd::start();
        let binhost = fixture_copy();
        for (known_hosts, says) in [
            ("known_hosts_wrong", "has changed"),
            ("known_hosts_empty", "host key is known"),
        ] {
            let cache = TempDir::new().unwrap();
            let ssh = sshd.args_with("id_ed25519", known_hosts);
            let started = Instant::now();
            let err = Mount::new(mode, &sshd.url(binhost.path()), cache.path(), &args(&ssh, &[]))
                .err()
                .expect("the mount must fail");
            assert!(started.elapsed() < Duration::from_secs(15), "{:?}", started.elapsed());
            assert_eq!(err.lines().count(), 1, "not one line: {err}");
            assert!(err.starts_with("binpkgfs: error:"), "{err}");
            assert!(err.contains("host key verification failed") && err.contains(says), "{err}");
            assert!(!fs::read_to_string("/proc/self/mountinfo").unwrap().contains(cache.path().to_str().unwrap()));
            no_master_within(&sshd, Duration::from_secs(5), "after a failed mount");
            assert!(
                !daemon_running_for(cache.path()),
                "a daemon still runs for {}",
                cache.path().display()
            );
        }
        // Opting in to accept-new lets an unknown key in (and remembers it), never a changed one.
        let cache = TempDir::new().unwrap();
        let kh = sshd.file("known_hosts_empty");
        let ssh = sshd.args_with("id_ed25519", "known_hosts_empty");
        let m = Mount::new(mode, &sshd.url(binhost.path()), cache.path(), &args(&ssh, &["-o", "ssh_accept_new"]))
            .unwrap();
        assert!(fs::read_to_string(&kh).unwrap().contains("ssh-ed25519"));
        drop(m);
        let cache = TempDir::new().unwrap();
        let ssh = sshd.args_with("id_ed25519", "known_hosts_wrong");
        let err = Mount::new(mode, &sshd.url(binhost.path()), cache.path(), &args(&ssh, &["--ssh-accept-new"]))
            .err()
            .expect("a changed key is refused even with accept-new");
        assert!(err.contains("has changed"), "{err}");
    }

    /// The server's session process is killed while a large package streams: the read
    /// completes with the right bytes after a reconnect that resumes where it stopped.
    fn sshd_killed_mid_transfer_resumes_and_the_bytes_are_right(mode) {
        let sshd = Sshd::start();
        let (binhost, path) = big_synthetic(128);
        let want = fs::read(binhost.path().join(&path)).unwrap();
        let cache = TempDir::new().unwrap();
        let log = cache.path().join("daemon.log");
        let m = mount(mode, &sshd, binhost.path(), cache.path(), &["--log-file", log.to_str().unwrap()]);
        let mut f = fs::File::open(m.path().join(&path)).unwrap();
        let mut got = vec![0u8; 4 << 20];
        f.read_exact(&mut got).unwrap();
        sshd.kill_sessions();
        f.read_to_end(&mut got).unwrap();
        assert!(got == want, "bytes differ after the reconnect");
        let text = fs::read_to_string(&log).unwrap();
        assert!(text.contains("transfer interrupted"), "the kill did not land mid-transfer:\n{text}");
        assert!(text.matches("ssh connected").count() >= 2, "no reconnect:\n{text}");
        let fetched = m.status_json()["bytes_fetched"].as_u64().unwrap();
        assert!(fetched < want.len() as u64 + (want.len() as u64) / 8, "resumed, not restarted: {fetched}");
    }

    /// A server that stops answering (SIGSTOP): a read fails with EIO within the stall
    /// bound, never hangs; once it answers again, reads work without a remount.
    fn stopped_sshd_gives_eio_within_the_stall_bound(mode) {
        let sshd = Sshd::start();
        let binhost = fixture_copy();
        let cache = TempDir::new().unwrap();
        let m = mount(mode, &sshd, binhost.path(), cache.path(), &["--stall-timeout", "2"]);
        let pkg = &support::entry_for("app-misc/demo-data-1.0")["PATH"];
        sshd.signal_all(libc::SIGSTOP);
        let started = Instant::now();
        let err = fs::read(m.path().join(pkg)).unwrap_err();
        let took = started.elapsed();
        sshd.signal_all(libc::SIGCONT);
        assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
        eprintln!("EIO after {took:?} with --stall-timeout 2");
        // 2 s stall, then three retries, each bounded by the 2 s connect timeout.
        assert!(took < Duration::from_secs(20), "EIO took {took:?}");
        let want = fs::read(binhost.path().join(pkg)).unwrap();
        assert!(
            wait_until(Duration::from_secs(30), || fs::read(m.path().join(pkg)).is_ok_and(|b| b == want)),
            "reads did not recover after SIGCONT"
        );
    }

    /// The read-only key servers should hand out (`restrict,command="internal-sftp -R"`)
    /// is all a mount needs.
    fn restricted_sftp_only_key_works(mode) {
        let sshd = Sshd::start();
        let binhost = fixture_copy();
        let cache = TempDir::new().unwrap();
        let ssh = sshd.args_with("ro_ed25519", "known_hosts");
        let m = Mount::new(mode, &sshd.url(binhost.path()), cache.path(), &args(&ssh, &[]))
            .unwrap();
        read_all_packages(m.path(), binhost.path());
        assert!(sshd.log().contains("fixture-ro") || sshd.log().contains("ED25519"), "{}", sshd.log());
    }

    /// Extra ssh options go into a generated config that still includes the ssh config
    /// (here the fixture's, with a Host alias only it knows).
    fn extra_options_keep_the_users_ssh_config(mode) {
        let sshd = Sshd::start();
        let binhost = fixture_copy();
        let cache = TempDir::new().unwrap();
        let ssh = sshd.mount_args();
        let kh = fs::read_to_string(sshd.file("known_hosts")).unwrap();
        fs::write(
            sshd.file("known_hosts"),
            format!("{kh}{}", kh.replace("127.0.0.1", SSH_ALIAS)),
        )
        .unwrap();
        let url = format!("ssh://root@{SSH_ALIAS}{}", binhost.path().display());
        let m = Mount::new(
            mode,
            &url,
            cache.path(),
            &args(&ssh, &["--ssh-option", "ServerAliveCountMax=2", "-o", "ssh_option=Compression=no"]),
        )
        .unwrap();
        read_all_packages(m.path(), binhost.path());
    }

    /// The index is re-checked by a stat (size and mtime are SFTP's only validators): an
    /// unchanged index is "not modified", a republished one is picked up without a remount.
    fn index_refresh_over_ssh_sees_changes_and_skips_unchanged(mode) {
        let sshd = Sshd::start();
        let binhost = fixture_copy();
        let cache = TempDir::new().unwrap();
        let m = mount(mode, &sshd, binhost.path(), cache.path(), &["--index-ttl", "1"]);
        let last = |m: &Mount| m.status_json()["index"]["last_check_result"].as_str().unwrap_or("").to_string();
        assert!(
            wait_until(Duration::from_secs(20), || last(&m) == "not modified"),
            "never 'not modified': {}",
            last(&m)
        );
        let index = binhost.path().join("Packages");
        let text = fs::read_to_string(&index).unwrap();
        let old: u64 = support::parse_packages(&text).0["TIMESTAMP"].parse().unwrap();
        fs::write(&index, text.replace(&format!("TIMESTAMP: {old}"), &format!("TIMESTAMP: {}", old + 1))).unwrap();
        assert!(
            wait_until(Duration::from_secs(20), || m.status_json()["index"]["timestamp"].as_u64() == Some(old + 1)),
            "the republished index was not picked up: {}",
            m.status_json()
        );
        read_all_packages(m.path(), binhost.path());
    }

    /// No ssh master outlives the daemon: not after `umount`, not after SIGKILL (the master
    /// exits once idle, ControlPersist 10 s), and a remount after SIGKILL works.
    fn no_ssh_master_survives_the_daemon(mode) {
        let sshd = Sshd::start();
        let binhost = fixture_copy();
        let cache = TempDir::new().unwrap();
        let mut m = mount(mode, &sshd, binhost.path(), cache.path(), &[]);
        read_all_packages(m.path(), binhost.path());
        let sockets = sshd.control_sockets();
        assert_eq!(sockets.len(), 1, "one ssh master while mounted: {sockets:?}");
        // /run/binpkgfs/ssh-<mount>/.ssh-connectionXXXX/master
        let control_dir = sockets[0].parent().and_then(Path::parent).unwrap().to_path_buf();
        assert!(control_dir.starts_with("/run/binpkgfs"), "{}", control_dir.display());
        m.unmount().unwrap();
        // Well before ControlPersist (10 s) could end it: the daemon tells it to exit.
        no_master_within(&sshd, Duration::from_secs(5), "after umount");
        assert!(!control_dir.exists(), "{} left behind", control_dir.display());

        let cache = TempDir::new().unwrap();
        let mut m = mount(mode, &sshd, binhost.path(), cache.path(), &[]);
        read_all_packages(m.path(), binhost.path());
        let sockets = sshd.control_sockets();
        assert_eq!(sockets.len(), 1, "{sockets:?}");
        // SAFETY: kill(2) on the daemon this test started.
        unsafe { libc::kill(m.pid(), libc::SIGKILL) };
        m.wait_for_exit(Duration::from_secs(10)).unwrap();
        let _ = Command::new("umount").arg("-l").arg(m.path()).status();
        assert!(!is_mounted(m.path()));
        no_master_within(&sshd, MASTER_GONE, "after SIGKILL of the daemon");
        // The next mount of the same mount point would clean it; this one's is random.
        let control_dir = sockets[0].parent().and_then(Path::parent).unwrap();
        let _ = fs::remove_dir_all(control_dir);
    }
}

/// Whether a binpkgfs daemon runs with `cache` as its cache directory.
fn daemon_running_for(cache: &Path) -> bool {
    let needle = cache.display().to_string();
    fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .any(|e| {
            let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
                return false;
            };
            fs::read(e.path().join("cmdline")).is_ok_and(|c| {
                let c = String::from_utf8_lossy(&c);
                c.contains("binpkgfs") && c.contains(&needle)
            }) && support::process_alive(pid)
        })
}
