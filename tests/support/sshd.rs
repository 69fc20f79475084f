//! A real OpenSSH server for the ssh:// tests: `/usr/sbin/sshd` on a loopback port, keys made
//! at test time with `ssh-keygen`, killed (with every session process) on drop.
//!
//! Keys: the host key, a second host key for "wrong host key" cases, a client key with full
//! access, and a restricted one (`restrict,command="internal-sftp -R"`, the read-only key
//! the README recommends). `StrictModes no`, since the keys live under /tmp.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tempfile::TempDir;

use super::{free_port, process_alive, run_ok, wait_until, which};

pub const SSHD: &str = "/usr/sbin/sshd";

/// The host name the fixture's ssh config maps to 127.0.0.1 and its port.
pub const SSH_ALIAS: &str = "binpkgfs-test-binhost";

pub struct Sshd {
    dir: TempDir,
    port: u16,
    child: Option<Child>,
}

/// Panics, naming what is missing, unless sshd and the ssh client are installed.
pub fn require_sshd() {
    let mut missing = Vec::new();
    if !Path::new(SSHD).is_file() {
        missing.push(format!("{SSHD} (Debian: openssh-server)"));
    }
    for tool in ["ssh", "ssh-keygen"] {
        if which(tool).is_none() {
            missing.push(format!("`{tool}` on PATH (Debian: openssh-client)"));
        }
    }
    assert!(
        missing.is_empty(),
        "the ssh:// tests need a real OpenSSH: missing {}; run `bash .ci/run`",
        missing.join(", ")
    );
}

impl Sshd {
    pub fn start() -> Sshd {
        require_sshd();
        let dir = TempDir::with_prefix("binpkgfs-sshd.").expect("sshd dir");
        fs::create_dir_all("/run/sshd").expect("create /run/sshd (sshd's privsep dir)");
        let d = dir.path();
        for (name, comment) in [
            ("host_ed25519", "fixture-host"),
            ("other_host", "other-host"),
            ("id_ed25519", "fixture-client"),
            ("ro_ed25519", "fixture-ro"),
        ] {
            run_ok(
                Command::new("ssh-keygen")
                    .args(["-q", "-t", "ed25519", "-N", "", "-C", comment, "-f"])
                    .arg(d.join(name)),
            );
        }
        let pubkey = |name: &str| {
            fs::read_to_string(d.join(format!("{name}.pub")))
                .expect("read public key")
                .trim()
                .to_string()
        };
        fs::write(
            d.join("authorized_keys"),
            format!(
                "{}\nrestrict,command=\"internal-sftp -R\" {}\n",
                pubkey("id_ed25519"),
                pubkey("ro_ed25519")
            ),
        )
        .unwrap();
        fs::write(d.join("known_hosts_empty"), "").unwrap();
        // A free port can be taken before sshd binds it: retry with another.
        let mut last = String::new();
        for _ in 0..5 {
            let port = free_port();
            let key_only = |name: &str| {
                let k = pubkey(name);
                k.split_whitespace().take(2).collect::<Vec<_>>().join(" ")
            };
            fs::write(
                d.join("known_hosts"),
                format!("[127.0.0.1]:{port} {}\n", key_only("host_ed25519")),
            )
            .unwrap();
            fs::write(
                d.join("known_hosts_wrong"),
                format!("[127.0.0.1]:{port} {}\n", key_only("other_host")),
            )
            .unwrap();
            // The client's config, as a user's ~/.ssh/config would be: hermetic (no global
            // known hosts), and a Host alias that only this file knows.
            fs::write(
                d.join("ssh_config"),
                format!(
                    "GlobalKnownHostsFile /dev/null\nLogLevel ERROR\n\
                     Host {SSH_ALIAS}\n  HostName 127.0.0.1\n  Port {port}\n"
                ),
            )
            .unwrap();
            fs::write(
                d.join("sshd_config"),
                format!(
                    "ListenAddress 127.0.0.1:{port}\nHostKey {dir}/host_ed25519\n\
                     PidFile none\nAuthorizedKeysFile {dir}/authorized_keys\nStrictModes no\n\
                     PermitRootLogin prohibit-password\nPasswordAuthentication no\n\
                     KbdInteractiveAuthentication no\nUsePAM no\n\
                     Subsystem sftp internal-sftp\nLogLevel VERBOSE\n",
                    dir = d.display()
                ),
            )
            .unwrap();
            run_ok(
                Command::new(SSHD)
                    .arg("-t")
                    .arg("-f")
                    .arg(d.join("sshd_config")),
            );
            let log = fs::File::create(d.join("sshd.log")).unwrap();
            let mut child = Command::new(SSHD)
                .args(["-D", "-e", "-f"])
                .arg(d.join("sshd_config"))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .expect("spawn sshd");
            let up = wait_until(Duration::from_secs(10), || {
                std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
                    || child.try_wait().ok().flatten().is_some()
            });
            if up && child.try_wait().ok().flatten().is_none() {
                return Sshd {
                    dir,
                    port,
                    child: Some(child),
                };
            }
            let _ = child.kill();
            let _ = child.wait();
            last = fs::read_to_string(d.join("sshd.log")).unwrap_or_default();
        }
        panic!("sshd did not start: {last}");
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn file(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// `ssh://root@127.0.0.1:PORT/<root>`.
    pub fn url(&self, root: &Path) -> String {
        format!("ssh://root@127.0.0.1:{}{}", self.port, root.display())
    }

    /// Mount arguments for the full-access key, the right known_hosts and the fixture's
    /// ssh config.
    pub fn mount_args(&self) -> Vec<String> {
        self.args_with("id_ed25519", "known_hosts")
    }

    pub fn args_with(&self, key: &str, known_hosts: &str) -> Vec<String> {
        vec![
            "--ssh-identity".into(),
            self.file(key).display().to_string(),
            "--ssh-known-hosts".into(),
            self.file(known_hosts).display().to_string(),
            "--ssh-config".into(),
            self.file("ssh_config").display().to_string(),
        ]
    }

    fn listener(&self) -> i32 {
        self.child.as_ref().expect("sshd runs").id() as i32
    }

    /// The per-connection sshd processes (descendants of the listener).
    pub fn session_pids(&self) -> Vec<i32> {
        descendants(self.listener())
    }

    /// SIGKILLs every session process; the listener keeps accepting.
    pub fn kill_sessions(&self) {
        for pid in self.session_pids() {
            // SAFETY: kill(2) on processes of the sshd this fixture started.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }

    /// SIGSTOPs (or SIGCONTs) the listener and every session process.
    pub fn signal_all(&self, sig: i32) {
        let mut pids = vec![self.listener()];
        pids.extend(self.session_pids());
        for pid in pids {
            // SAFETY: as above.
            unsafe { libc::kill(pid, sig) };
        }
    }

    /// Running ssh client processes that use this fixture's keys (ControlMasters).
    pub fn client_pids(&self) -> Vec<i32> {
        self.clients().into_iter().map(|(pid, _)| pid).collect()
    }

    /// The control sockets (`-S`) of the running ssh clients that use this fixture's keys.
    pub fn control_sockets(&self) -> Vec<PathBuf> {
        self.clients()
            .into_iter()
            .filter_map(|(_, args)| {
                let i = args.iter().position(|a| a == "-S")?;
                args.get(i + 1).map(PathBuf::from)
            })
            .collect()
    }

    fn clients(&self) -> Vec<(i32, Vec<String>)> {
        let needle = self.dir.path().display().to_string();
        let mut out = Vec::new();
        for e in fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            let Ok(cmd) = fs::read(e.path().join("cmdline")) else {
                continue;
            };
            let args: Vec<String> = cmd
                .split(|b| *b == 0)
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect();
            let is_ssh = args
                .first()
                .is_some_and(|a| a == "ssh" || a.ends_with("/ssh"));
            if is_ssh && args.iter().any(|a| a.contains(&needle)) && process_alive(pid) {
                out.push((pid, args));
            }
        }
        out
    }

    pub fn log(&self) -> String {
        fs::read_to_string(self.file("sshd.log")).unwrap_or_default()
    }
}

fn descendants(pid: i32) -> Vec<i32> {
    let mut all = Vec::new();
    let mut frontier = vec![pid];
    while let Some(p) = frontier.pop() {
        for e in fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Ok(child) = e.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            let Ok(stat) = fs::read_to_string(e.path().join("stat")) else {
                continue;
            };
            let ppid = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().nth(1))
                .and_then(|s| s.parse::<i32>().ok());
            if ppid == Some(p) {
                all.push(child);
                frontier.push(child);
            }
        }
    }
    all
}

impl Drop for Sshd {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let pid = child.id() as i32;
            let mut pids = descendants(pid);
            pids.push(pid);
            for p in pids {
                // SAFETY: kill(2) on processes of the sshd this fixture started.
                unsafe {
                    libc::kill(p, libc::SIGCONT);
                    libc::kill(p, libc::SIGKILL);
                }
            }
            let _ = child.wait();
        }
    }
}
