//! The ssh:// options of a mount: identity, known_hosts, config file, extra `ssh -o` lines and
//! `ssh_accept_new`, from long options and `-o` words, and the mount's control directory.

use std::path::{Path, PathBuf};

use super::{MountArgs, absolute};
use crate::remote::SshOptions;

/// The `-o` words of this module, as given (the last of each wins; options accumulate).
#[derive(Default)]
pub(super) struct SshWords {
    identity: Option<PathBuf>,
    known_hosts: Option<PathBuf>,
    config: Option<PathBuf>,
    options: Vec<String>,
    accept_new: bool,
}

impl SshWords {
    /// Takes `opt` if it is one of this module's words (`false`: someone else's).
    pub fn take(&mut self, opt: &str) -> bool {
        match opt.split_once('=') {
            Some(("ssh_identity", v)) => self.identity = Some(PathBuf::from(v)),
            Some(("ssh_known_hosts", v)) => self.known_hosts = Some(PathBuf::from(v)),
            Some(("ssh_config", v)) => self.config = Some(PathBuf::from(v)),
            Some(("ssh_option", v)) => self.options.push(v.to_string()),
            None if opt == "ssh_accept_new" => self.accept_new = true,
            _ => return false,
        }
        true
    }

    /// With the long options, which win over `-o` (extra options add up); every option line
    /// is checked now, so a bad one is an error before anything starts.
    pub fn settle(mut self, a: &MountArgs, mountpoint: &Path) -> Result<SshOptions, String> {
        self.options.extend(a.ssh_options.iter().cloned());
        for o in &self.options {
            crate::remote::ssh_option_line(o)?;
        }
        let path = |long: &Option<PathBuf>, word: Option<PathBuf>| {
            long.clone().or(word).map(|p| absolute(&p)).transpose()
        };
        Ok(SshOptions {
            identity: path(&a.ssh_identity, self.identity)?,
            known_hosts: path(&a.ssh_known_hosts, self.known_hosts)?,
            config: path(&a.ssh_config, self.config)?,
            options: self.options,
            accept_new: a.ssh_accept_new || self.accept_new,
            control_dir: control_dir(mountpoint),
        })
    }
}

/// One control directory per mount point, so a restart of the same mount finds (and ends)
/// the masters a killed daemon left, and mounts never share one.
fn control_dir(mountpoint: &Path) -> PathBuf {
    use sha1::Digest;
    let h = sha1::Sha1::digest(mountpoint.as_os_str().as_encoded_bytes());
    Path::new(crate::remote::SSH_CONTROL_ROOT).join(format!("ssh-{}", &hex::encode(h)[..16]))
}
