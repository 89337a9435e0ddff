fn main() {
    // What ferryfs writes (the pool directory, the catalog, images, logs, markers) is its
    // owner's alone: files 0600, directories 0700, unless a command says otherwise.
    // SAFETY: umask only sets this process's file mode creation mask; it can't fail.
    unsafe { libc::umask(0o077) };
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .format_timestamp_micros()
        .init();
    ferryfs::cli::main()
}
