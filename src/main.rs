//! The `binpkgfs` command: parses the command line and hands it to the library (`src/lib.rs`).

use clap::Parser;

use binpkgfs::config::{Cli, Command, MountConfig, PrefetchConfig};

fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Mount(args) => MountConfig::from_args(*args).and_then(binpkgfs::daemon::mount),
        Command::Demo => binpkgfs::demo::run(),
        Command::Daemon => binpkgfs::daemon::run_detached(),
        Command::Prefetch(args) => {
            PrefetchConfig::from_args(args).and_then(binpkgfs::prefetch::run)
        }
        Command::Status { json, mountpoint } => binpkgfs::status::read(&mountpoint).map(|v| {
            if json {
                println!("{v}");
            } else {
                print!("{}", binpkgfs::status::render(&v));
            }
        }),
    };
    if let Err(msg) = result {
        eprintln!("binpkgfs: error: {msg}");
        std::process::exit(1);
    }
}
