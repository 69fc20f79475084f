//! Several binhosts in one PKGDIR, through real mounts, real nginx and real emerge.
//!
//! Two binhosts, as a driver that takes most packages from a main binhost and a few from its
//! own builds would have them:
//! * `main` (priority 1): the committed fixture binhost, four packages;
//! * `mine` (priority 10): `dev-libs/libdemo` and `sys-apps/demo-base` rebuilt by real Portage
//!   at test time (other builds at the same PATHs as main's), plus a byte-identical copy of
//!   main's `app-misc/demo-data` (the same instance on both).
//!
//! What Portage's `--getbinpkgonly` would do with that binrepos.conf: demo-data once, from
//! `mine`; both builds of libdemo and demo-base (main's at another PATH); the newest builds
//! (mine's) chosen; binpkgfs-demo from main.
//!
//! Every mount-level test runs in both kernel modes (passthrough and `--no-passthrough`).

mod support;

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use support::{
    IndexEntry, Mode, Mount, Nginx, PortageSandbox, both_modes, parse_packages, wait_until,
};
use tempfile::TempDir;

const MODES: [Mode; 2] = [Mode::Passthrough, Mode::NoPassthrough];
const DATA: &str = "app-misc/demo-data/demo-data-1.0-1.gpkg.tar";
const LIBDEMO: &str = "dev-libs/libdemo/libdemo-2.1-1.gpkg.tar";

/// Portage's rebuild of libdemo and demo-base, once per test binary, in a builder prefix of
/// our own (the ranged tests use the default one at the same time).
fn rebuilt() -> &'static Path {
    static DIR: OnceLock<TempDir> = OnceLock::new();
    DIR.get_or_init(|| {
        support::require_real_parts();
        let dir = TempDir::with_prefix("binpkgfs-mine.").unwrap();
        support::run_ok(
            Command::new("bash")
                .arg(support::crate_root().join("tests/fixtures/make-binhost.sh"))
                .arg(dir.path())
                .arg("dev-libs/libdemo")
                .env("BINPKGFS_BUILDER_PREFIX", "/var/tmp/binpkgfs-multi-builder"),
        );
        dir
    })
    .path()
}

/// The two binhosts on disk, served by two nginx, and a binrepos.conf naming them.
///
/// Each is served under its own path (`/main`, `/mine`): Portage keys its cache of a remote
/// index by host name and path but not port (`_populate_remote_repo`), so two binhosts at
/// `127.0.0.1:A/` and `127.0.0.1:B/` would share one cached index in Portage.
struct Binhosts {
    // Drop order: servers before their directories.
    main: Nginx,
    mine: Nginx,
    main_root: TempDir,
    mine_root: TempDir,
    conf_dir: TempDir,
}

fn write_index(dir: &Path, header: &IndexEntry, blocks: &[String]) {
    let mut text = String::new();
    for (k, v) in header {
        let v = if k == "PACKAGES" {
            blocks.len().to_string()
        } else {
            v.clone()
        };
        text += &format!("{k}: {v}\n");
    }
    text += "\n";
    for b in blocks {
        text += b.trim_end();
        text += "\n\n";
    }
    fs::write(dir.join("Packages"), text).unwrap();
}

/// The raw block of `path` in an index text.
fn block_of(text: &str, path: &str) -> String {
    text.split("\n\n")
        .find(|b| b.lines().any(|l| l == format!("PATH: {path}")))
        .unwrap_or_else(|| panic!("{path} not in index"))
        .to_string()
}

impl Binhosts {
    fn new() -> Binhosts {
        let main_root = TempDir::with_prefix("binpkgfs-main.").unwrap();
        let main_dir = main_root.path().join("main");
        support::copy_fixture_binhost(&main_dir);
        let mine_root = TempDir::with_prefix("binpkgfs-mine.").unwrap();
        let mine_dir = mine_root.path().join("mine");
        support::copy_tree(rebuilt(), &mine_dir).unwrap();
        // Keep the rebuilt files' mtimes (copy_tree may not).
        let mine_text = fs::read_to_string(mine_dir.join("Packages")).unwrap();
        let (header, entries) = parse_packages(&mine_text);
        for e in &entries {
            set_mtime(&mine_dir.join(&e["PATH"]), &e["MTIME"]);
        }
        // The same instance of demo-data on both.
        let fixture_text = fs::read_to_string(support::fixture_binhost().join("Packages")).unwrap();
        fs::create_dir_all(mine_dir.join("app-misc/demo-data")).unwrap();
        fs::copy(main_dir.join(DATA), mine_dir.join(DATA)).unwrap();
        let data_entry = support::entry_for("app-misc/demo-data-1.0");
        set_mtime(&mine_dir.join(DATA), &data_entry["MTIME"]);
        let mut blocks: Vec<String> = mine_text
            .split("\n\n")
            .skip(1)
            .filter(|b| !b.trim().is_empty())
            .map(str::to_string)
            .collect();
        blocks.push(block_of(&fixture_text, DATA));
        write_index(&mine_dir, &header, &blocks);
        let _ = fs::remove_file(mine_dir.join("Packages.gz"));
        let _ = fs::remove_file(main_dir.join("Packages.gz"));

        let main = Nginx::start(main_root.path());
        let mine = Nginx::start(mine_root.path());
        let conf_dir = TempDir::with_prefix("binpkgfs-binrepos.").unwrap();
        let b = Binhosts {
            main,
            mine,
            main_root,
            mine_root,
            conf_dir,
        };
        fs::write(b.conf(), b.conf_text()).unwrap();
        b
    }

    fn main_dir(&self) -> PathBuf {
        self.main_root.path().join("main")
    }

    fn mine_dir(&self) -> PathBuf {
        self.mine_root.path().join("mine")
    }

    fn conf(&self) -> PathBuf {
        self.conf_dir.path().join("binrepos.conf")
    }

    /// Explicit `verify-signature = false`: Portage's shipped [DEFAULT] says true, and the
    /// fixture packages are not signed.
    fn conf_text(&self) -> String {
        self.conf_with(1, 10)
    }

    fn conf_with(&self, main: i64, mine: i64) -> String {
        format!(
            "[main]\npriority = {main}\nsync-uri = {}/main\nverify-signature = false\n\n\
             [mine]\npriority = {mine}\nsync-uri = {}/mine/\nverify-signature = false\n",
            self.main.url(),
            self.mine.url()
        )
    }

    fn mount(&self, mode: Mode, cache: &Path) -> Mount {
        let conf = format!("--binrepos={}", self.conf().display());
        let args = vec![conf.as_str(), "--no-prefetch"];
        Mount::new(mode, "binrepos", cache, &args).unwrap_or_else(|e| panic!("mount: {e}"))
    }

    /// What the merged tree must hold: served PATH -> the file it must be, byte for byte.
    fn expected(&self) -> BTreeMap<String, PathBuf> {
        let mut out = BTreeMap::new();
        let mine = read_entries(&self.mine_dir());
        for e in &mine {
            out.insert(e["PATH"].clone(), self.mine_dir().join(&e["PATH"]));
        }
        for e in read_entries(&self.main_dir()) {
            let file = self.main_dir().join(&e["PATH"]);
            if mine.iter().any(|m| same_instance(m, &e)) {
                continue;
            }
            let path = if out.contains_key(&e["PATH"]) {
                e["PATH"].replace("-1.gpkg.tar", "-2.gpkg.tar")
            } else {
                e["PATH"].clone()
            };
            out.insert(path, file);
        }
        out
    }
}

fn read_entries(dir: &Path) -> Vec<IndexEntry> {
    parse_packages(&fs::read_to_string(dir.join("Packages")).unwrap()).1
}

fn same_instance(a: &IndexEntry, b: &IndexEntry) -> bool {
    ["CPV", "BUILD_ID", "SIZE", "BUILD_TIME", "MTIME"]
        .iter()
        .all(|k| a.get(*k) == b.get(*k))
}

fn set_mtime(path: &Path, mtime: &str) {
    let t = std::time::UNIX_EPOCH + Duration::from_secs(mtime.parse().unwrap());
    fs::File::options()
        .write(true)
        .open(path)
        .and_then(|f| f.set_modified(t))
        .unwrap();
}

fn files_under(root: &Path) -> Vec<String> {
    support::list_files(root)
        .into_iter()
        .map(|p| {
            p.strip_prefix(root)
                .unwrap_or(&p)
                .to_string_lossy()
                .into_owned()
        })
        .filter(|p| p != "Packages")
        .collect()
}

/// `cat/pf -> BUILD_TIME` of everything installed in a sandbox.
fn installed_builds(s: &PortageSandbox) -> BTreeMap<String, String> {
    s.installed()
        .into_iter()
        .map(|pf| {
            let bt = fs::read_to_string(s.root().join("var/db/pkg").join(&pf).join("BUILD_TIME"))
                .unwrap_or_default();
            (pf, bt.trim().to_string())
        })
        .collect()
}

#[test]
fn merged_tree_has_both_binhosts_packages_with_exact_bytes_and_priority_decides_duplicates() {
    let b = Binhosts::new();
    let expected = b.expected();
    assert_eq!(expected.len(), 6, "{expected:?}");
    for mode in MODES {
        b.main.clear_log();
        b.mine.clear_log();
        let cache = TempDir::new().unwrap();
        let mount = b.mount(mode, cache.path());
        let mut listed = files_under(mount.path());
        listed.sort();
        let want: Vec<String> = expected.keys().cloned().collect();
        assert_eq!(listed, want, "{mode:?}");
        // Listing and stat sent no package request to either binhost.
        assert_eq!(b.main.count_matching(|l| l.is_package()), 0);
        assert_eq!(b.mine.count_matching(|l| l.is_package()), 0);
        for (path, file) in &expected {
            let got = fs::read(mount.path().join(path)).unwrap();
            assert!(
                got == fs::read(file).unwrap(),
                "{mode:?}: {path} differs from {}",
                file.display()
            );
        }
        // The index emerge reads: one entry per file, PACKAGES recomputed.
        let (header, entries) =
            parse_packages(&fs::read_to_string(mount.path().join("Packages")).unwrap());
        assert_eq!(header["PACKAGES"], "6");
        assert_eq!(entries.len(), 6);
        // The same instance came from the higher priority: mine's server got the request,
        // main's none. The moved build came from main, by its own PATH there.
        let data = format!("/mine/{DATA}");
        assert!(wait_until(Duration::from_secs(5), || b
            .mine
            .count_matching(|l| l.uri == data)
            > 0));
        assert_eq!(
            b.main.count_matching(|l| l.uri.ends_with(DATA)),
            0,
            "{mode:?}"
        );
        let lib = format!("/main/{LIBDEMO}");
        assert!(wait_until(Duration::from_secs(5), || b
            .main
            .count_matching(|l| l.uri == lib)
            > 0));
        assert!(
            b.mine
                .count_matching(|l| l.uri == format!("/mine/{LIBDEMO}"))
                > 0
        );
        assert_eq!(
            b.main.count_matching(|l| l.uri.ends_with("-2.gpkg.tar")),
            0,
            "a moved PATH is never asked of a binhost"
        );
        let status = mount.status_json();
        let names: Vec<&str> = status["binhosts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|h| h["name"].as_str().unwrap())
            .collect();
        assert_eq!(names, ["mine", "main"]);
    }
}

/// The same binrepos.conf, given to Portage's own `--getbinpkgonly` and to the mount under
/// `--usepkgonly`: the same packages and the same builds get installed.
#[test]
fn emerge_chooses_the_same_builds_as_portage_getbinpkgonly_and_installs_from_both() {
    same_builds_as_portage(1, 10);
}

/// With main above mine, mine's newer builds are the ones moved to another PATH (`-2`, their
/// BUILD_ID line still 1, as Portage's own inject writes it); emerge still picks them, as
/// Portage's --getbinpkgonly does, and installs them.
#[test]
fn emerge_installs_a_build_the_merge_moved_to_another_path() {
    same_builds_as_portage(10, 1);
}

fn same_builds_as_portage(main_priority: i64, mine_priority: i64) {
    let b = Binhosts::new();
    fs::write(b.conf(), b.conf_with(main_priority, mine_priority)).unwrap();
    let atoms = ["app-misc/binpkgfs-demo", "app-misc/demo-data"];

    let empty = TempDir::new().unwrap();
    let portage = PortageSandbox::new(empty.path());
    fs::write(
        portage.root().join("etc/portage/binrepos.conf"),
        b.conf_with(main_priority, mine_priority),
    )
    .unwrap();
    let mut args = vec!["--getbinpkgonly", "--oneshot"];
    args.extend(atoms);
    portage.emerge_ok(&args);
    let theirs = installed_builds(&portage);
    assert_eq!(theirs.len(), 4, "{theirs:?}");

    for mode in MODES {
        b.main.clear_log();
        b.mine.clear_log();
        let cache = TempDir::new().unwrap();
        let mount = b.mount(mode, cache.path());
        let ours = PortageSandbox::new(mount.path());
        let mut pretend = vec!["-p", "--usepkgonly", "--oneshot"];
        pretend.extend(atoms);
        let out = ours.emerge_ok(&pretend);
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains("dev-libs/libdemo-2.1"), "{text}");
        let mut install = vec!["--usepkgonly", "--oneshot"];
        install.extend(atoms);
        ours.emerge_ok(&install);
        assert_eq!(installed_builds(&ours), theirs, "{mode:?}");
        if main_priority > mine_priority {
            // mine's libdemo was served at the moved PATH, fetched by its PATH on mine.
            let moved = mount.path().join("dev-libs/libdemo/libdemo-2.1-2.gpkg.tar");
            assert!(moved.exists());
            assert!(
                b.mine
                    .count_matching(|l| l.uri == format!("/mine/{LIBDEMO}"))
                    > 0
            );
        }
        // Both binhosts served packages for it.
        assert!(b.main.count_matching(|l| l.is_package()) > 0, "{mode:?}");
        assert!(b.mine.count_matching(|l| l.is_package()) > 0, "{mode:?}");
    }
}

/// main's server is down and there is no saved index for it: the mount still starts, and
/// mine's packages install; status says main is not answering.
#[test]
fn one_binhost_down_the_others_packages_still_install() {
    let mut b = Binhosts::new();
    b.main.stop();
    for mode in MODES {
        let cache = TempDir::new().unwrap();
        let mount = b.mount(mode, cache.path());
        let listed = files_under(mount.path());
        assert!(listed.contains(&LIBDEMO.to_string()) && listed.contains(&DATA.to_string()));
        assert!(
            !listed.iter().any(|p| p.contains("binpkgfs-demo")),
            "main's packages are not there: {listed:?}"
        );
        let s = PortageSandbox::new(mount.path());
        s.emerge_ok(&[
            "--usepkgonly",
            "--oneshot",
            "dev-libs/libdemo",
            "app-misc/demo-data",
        ]);
        assert_eq!(s.installed().len(), 3, "{:?}", s.installed());
        let status = Command::new(support::binpkgfs_bin())
            .arg("status")
            .arg(mount.path())
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&status.stdout);
        assert!(
            text.contains("main (priority 1)") && text.contains("failed"),
            "{text}"
        );
    }
}

both_modes! {
/// Portage's shipped [DEFAULT] asks for signatures; binpkgfs cannot check them, so it
/// refuses to start rather than drop that silently, and says what to do.
fn verify_signature_is_refused_unless_portage_requires_signatures(mode) {
    let b = Binhosts::new();
    fs::write(
        b.conf(),
        format!(
            "[DEFAULT]\nverify-signature = true\n[main]\nsync-uri = {}/main\n",
            b.main.url()
        ),
    )
    .unwrap();
    let cache = TempDir::new().unwrap();
    let conf = format!("--binrepos={}", b.conf().display());
    let err = Mount::new(mode, "binrepos", cache.path(), &[conf.as_str()])
        .err()
        .unwrap();
    assert!(
        err.contains("binpkg-request-signature") && err.contains("[main]"),
        "{err}"
    );
    // Confirmed: it mounts, and serves only gpkg (all of the fixture).
    let mount = Mount::new(mode, "binrepos", cache.path(), &[conf.as_str(), "--request-signature"]).unwrap();
    assert_eq!(files_under(mount.path()).len(), 4);
}
}

/// Two mirrors of one binhost: the first is down, then the second is; a package read in
/// between comes from whichever answers, with exact bytes and no error.
#[test]
fn mirrors_fail_over_without_an_error_to_the_reader() {
    let b = Binhosts::new();
    for mode in MODES {
        let mut first = Nginx::start(&b.main_dir());
        let second = Nginx::start(&b.main_dir());
        let cache = TempDir::new().unwrap();
        let args = vec!["--no-prefetch"];
        let url = format!("{}|{}", first.url(), second.url());
        let mount = Mount::new(mode, &url, cache.path(), &args).unwrap();
        let fixture = support::fixture_packages();
        let (one, rest) = fixture.split_first().unwrap();
        let got = fs::read(mount.path().join(&one["PATH"])).unwrap();
        assert!(got == fs::read(b.main_dir().join(&one["PATH"])).unwrap());
        let p1 = format!("/{}", one["PATH"]);
        assert!(wait_until(Duration::from_secs(5), || first
            .count_matching(|l| l.uri == p1)
            > 0));
        assert_eq!(
            second.count_matching(|l| l.is_package()),
            0,
            "first mirror first"
        );
        first.stop();
        for e in rest {
            let got = fs::read(mount.path().join(&e["PATH"]))
                .unwrap_or_else(|err| panic!("{mode:?} {}: {err}", e["PATH"]));
            assert!(got == fs::read(b.main_dir().join(&e["PATH"])).unwrap());
        }
        let p2 = format!("/{}", rest[0]["PATH"]);
        assert!(wait_until(Duration::from_secs(5), || second
            .count_matching(|l| l.uri == p2)
            > 0));
        let status = Command::new(support::binpkgfs_bin())
            .arg("status")
            .arg(mount.path())
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&status.stdout);
        assert!(
            text.contains(&format!("mirror {}: passed over", first.url()))
                && text.contains(&format!("mirror {}: ok", second.url())),
            "{text}"
        );
    }
}

// ---------------------------------------------------------------------------
// Proxies and a site cache: stock nginx in front of the binhost
// ---------------------------------------------------------------------------

/// An nginx with a `server` block of our own (a proxy or a site cache), killed on drop.
struct Front {
    child: std::process::Child,
    dir: TempDir,
    port: u16,
}

impl Front {
    /// `server` gets `{port}`, `{dir}` and `{origin}` filled in.
    fn start(http_extra: &str, server: &str, origin: &str) -> Front {
        let dir = TempDir::with_prefix("binpkgfs-front.").unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let d = dir.path().display().to_string();
        let fill = |s: &str| {
            s.replace("{port}", &port.to_string())
                .replace("{dir}", &d)
                .replace("{origin}", origin)
        };
        let conf = format!(
            "daemon off;\nmaster_process off;\nworker_processes 1;\npid {d}/nginx.pid;\n\
             error_log {d}/error.log warn;\nevents {{ worker_connections 256; }}\n\
             http {{\n  log_format front '$request_uri\\t$status\\t$body_bytes_sent\\t$http_range';\n\
             access_log {d}/access.log front;\n  client_body_temp_path {d}/cb;\n  proxy_temp_path {d}/pt;\n\
             fastcgi_temp_path {d}/ft;\n  uwsgi_temp_path {d}/ut;\n  scgi_temp_path {d}/st;\n{}\n{}\n}}\n",
            fill(http_extra),
            fill(server)
        );
        fs::write(dir.path().join("nginx.conf"), conf).unwrap();
        let child = Command::new("/usr/sbin/nginx")
            .arg("-c")
            .arg(dir.path().join("nginx.conf"))
            .arg("-p")
            .arg(dir.path())
            .arg("-e")
            .arg(dir.path().join("error.log"))
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
        assert!(
            wait_until(Duration::from_secs(10), || {
                std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
            }),
            "front nginx did not start: {}",
            fs::read_to_string(dir.path().join("error.log")).unwrap_or_default()
        );
        Front { child, dir, port }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn requests(&self) -> Vec<String> {
        fs::read_to_string(self.dir.path().join("access.log"))
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect()
    }
}

impl Drop for Front {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `--proxy`: every request goes through the proxy, so a binhost the driver cannot resolve
/// itself is served, with exact bytes.
#[test]
fn proxy_option_sends_every_request_through_the_proxy() {
    let b = Binhosts::new();
    let origin = b.main.url();
    let proxy = Front::start(
        "",
        "server { listen 127.0.0.1:{port}; location / { proxy_pass {origin}; } }",
        &origin,
    );
    for mode in MODES {
        let cache = TempDir::new().unwrap();
        let mut args = vec!["--no-prefetch", "--proxy"];
        let p = proxy.url();
        args.push(&p);
        // `.invalid` never resolves: only the proxy can reach it.
        let mount = Mount::new(mode, "http://binhost.invalid/main", cache.path(), &args)
            .unwrap_or_else(|e| panic!("mount through the proxy: {e}"));
        for e in support::fixture_packages() {
            let got = fs::read(mount.path().join(&e["PATH"])).unwrap();
            assert!(got == fs::read(b.main_dir().join(&e["PATH"])).unwrap());
        }
        let want = format!("/main/{LIBDEMO}");
        assert!(wait_until(Duration::from_secs(5), || {
            proxy.requests().iter().any(|l| l.starts_with(&want))
        }));
    }
}

/// The site-cache recipe of the README: stock nginx `proxy_cache` with `slice` in front of
/// the binhost. Eight mounts (eight cache directories) read every package at the same time;
/// the origin sends each package's bytes about once.
#[test]
fn a_site_cache_makes_eight_mounts_cost_the_origin_about_one_download() {
    let b = Binhosts::new();
    let cache_front = Front::start(SITE_CACHE_HTTP, SITE_CACHE_SERVER, &b.main.url());
    b.main.clear_log();
    let fixture = support::fixture_packages();
    let total: u64 = fixture
        .iter()
        .map(|e| e["SIZE"].parse::<u64>().unwrap())
        .sum();
    let url = format!("{}/main", cache_front.url());
    let mut mounts = Vec::new();
    let mut caches = Vec::new();
    for i in 0..8 {
        let cache = TempDir::new().unwrap();
        let mode = MODES[i % 2];
        let args = vec!["--no-prefetch"];
        mounts.push(Mount::new(mode, &url, cache.path(), &args).unwrap());
        caches.push(cache);
    }
    std::thread::scope(|s| {
        for m in &mounts {
            let fixture = &fixture;
            let b = &b;
            s.spawn(move || {
                for e in fixture {
                    let got = fs::read(m.path().join(&e["PATH"])).unwrap();
                    assert!(got == fs::read(b.main_dir().join(&e["PATH"])).unwrap());
                }
            });
        }
    });
    let sent = || -> u64 {
        b.main
            .requests()
            .iter()
            .filter(|l| l.is_package())
            .map(|l| l.bytes_sent)
            .sum()
    };
    // nginx logs just after the last byte: wait for every package to show.
    wait_until(Duration::from_secs(5), || sent() >= total);
    let sent = sent();
    eprintln!(
        "origin sent {sent} bytes of packages for 8 mounts reading {total} bytes each ({:.2}x)",
        sent as f64 / total as f64
    );
    assert!(
        sent >= total,
        "every package came from the origin at least once"
    );
    assert!(
        sent * 10 <= total * 11,
        "origin sent {sent} bytes for {total} bytes of packages: {:?}",
        b.main.requests()
    );
}

/// The README's recipe, as tested (`{origin}`: the binhost; `{dir}`, `{port}`: this test's).
const SITE_CACHE_HTTP: &str = "
  proxy_cache_path {dir}/cache levels=1:2 keys_zone=binpkgs:10m max_size=50g inactive=60d use_temp_path=off;";
const SITE_CACHE_SERVER: &str = "
  server {
    listen 127.0.0.1:{port};
    # The index changes: keep it for a minute at most, revalidated.
    location ~ /Packages(\\.gz)?$ {
      proxy_pass {origin};
      proxy_cache binpkgs;
      proxy_cache_valid 200 1m;
      proxy_cache_revalidate on;
      proxy_cache_lock on;
    }
    # Packages never change at one PATH and digest: cache them in 1 MiB slices, so whole
    # and ranged requests share one copy, and concurrent misses wait for one download.
    location / {
      slice 1m;
      proxy_pass {origin};
      proxy_cache binpkgs;
      proxy_cache_key $uri$slice_range;
      proxy_set_header Range $slice_range;
      proxy_http_version 1.1;
      proxy_cache_valid 200 206 60d;
      proxy_cache_lock on;
      proxy_cache_lock_timeout 5m;
      proxy_cache_use_stale error timeout updating;
    }
  }";

/// A mirror that goes down in the middle of a transfer: the read completes with exact bytes,
/// the rest of the file coming from the next mirror as a ranged request.
#[test]
fn a_mirror_going_down_mid_transfer_costs_the_reader_nothing() {
    let b = Binhosts::new();
    for mode in MODES {
        // ~1 MB at 200 KB/s: about five seconds on the first mirror.
        let mut first = Nginx::start_limited(&b.main_dir(), "200k");
        let second = Nginx::start(&b.main_dir());
        let cache = TempDir::new().unwrap();
        let args = vec!["--no-prefetch"];
        let url = format!("{}|{}", first.url(), second.url());
        let mount = Mount::new(mode, &url, cache.path(), &args).unwrap();
        let path = mount.path().join(DATA);
        let reader = std::thread::spawn(move || fs::read(path));
        let fetched = |m: &Mount| {
            let out = Command::new(support::binpkgfs_bin())
                .args(["status", "--json"])
                .arg(m.path())
                .output()
                .unwrap();
            let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
            v["bytes_fetched"].as_u64().unwrap_or(0)
        };
        // Under way on the first mirror (the daemon counts bytes as they land): cut it.
        assert!(wait_until(Duration::from_secs(10), || fetched(&mount) > 0
            || support::list_files(cache.path())
                .iter()
                .any(|p| p.to_string_lossy().contains("partial"))));
        first.stop();
        let got = reader
            .join()
            .unwrap()
            .unwrap_or_else(|e| panic!("{mode:?}: {e}"));
        assert!(
            got == fs::read(b.main_dir().join(DATA)).unwrap(),
            "{mode:?}"
        );
        let uri = format!("/{DATA}");
        assert!(wait_until(Duration::from_secs(5), || second
            .count_matching(|l| l.uri == uri)
            > 0));
        let resumed = second
            .requests()
            .into_iter()
            .find(|l| l.uri == uri)
            .unwrap();
        assert!(
            resumed.range.is_some(),
            "{mode:?}: resumed with a range: {resumed:?}"
        );
    }
}
