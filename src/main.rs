use std::ffi::OsString;

use clap::Parser;

fn main() {
    // What ferryfs writes (the pool directory, the catalog, images, logs, markers) is its
    // owner's alone: files 0600, directories 0700, unless a command says otherwise.
    // SAFETY: umask only sets this process's file mode creation mask; it can't fail.
    unsafe { libc::umask(0o077) };
    ferryfs::logging::init();
    let args: Vec<OsString> = std::env::args_os().collect();
    // Installed as /sbin/mount.fuse.ferryfs and /sbin/umount.fuse.ferryfs, ferryfs is the
    // mount helper that mount(8) and umount(8) run for `-t fuse.ferryfs` and fstab lines.
    let cli = match ferryfs::helper::personality(&args) {
        Some(Ok(cli)) => cli,
        Some(Err(e)) => {
            eprintln!("ferryfs: error: {e}");
            std::process::exit(ferryfs::cli::Exit::Usage.code());
        }
        None => ferryfs::cli::Cli::parse(),
    };
    ferryfs::cli::main(cli)
}
