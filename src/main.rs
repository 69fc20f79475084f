//! binpkgfs: a Gentoo binhost as a lazy, verified, read-only PKGDIR over FUSE.
//!
//! The pipeline, one module each: `index` (parse `Packages` into a snapshot) -> `namespace`
//! (inodes and attributes from the snapshot) -> `cache` (the on-disk store) and `fetch` (shared,
//! verified transfers into it) -> `remote` (transports). `fs` translates FUSE requests onto that;
//! `lifecycle` keeps the index fresh; `prefetch` fetches ahead of emerge (its merge list, or the
//! `prefetch` command); `daemon`, `config`, `logging` and `status` are the process around it.

mod cache;
mod config;
mod daemon;
mod demo;
mod error;
mod fetch;
mod fs;
mod index;
mod lifecycle;
mod logging;
mod namespace;
mod prefetch;
mod remote;
mod segment;
mod sparse;
mod status;

use clap::Parser;

use config::{Cli, Command, MountConfig, PrefetchConfig};

fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Mount(args) => MountConfig::from_args(*args).and_then(daemon::mount),
        Command::Demo => demo::run(),
        Command::Prefetch(args) => PrefetchConfig::from_args(args).and_then(prefetch::run),
        Command::Status { json, mountpoint } => status::read(&mountpoint).map(|v| {
            if json {
                println!("{v}");
            } else {
                print!("{}", status::render(&v));
            }
        }),
    };
    if let Err(msg) = result {
        eprintln!("binpkgfs: error: {msg}");
        std::process::exit(1);
    }
}
