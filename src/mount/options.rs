//! The options of a mount: `ferryfs mount --threads 4 -o ro,copy_rate=200M`, and the options
//! field of an /etc/fstab line, which mount(8) hands to `mount.fuse.ferryfs` as `-o`.

use crate::geometry::parse_size;

/// Threads serving FUSE requests by default: one per core, at least 2 and at most 8. No
/// thread is kept spare for a blocked fsync: fsyncs wait on workers of their own
/// (fs/syncs.rs), and a thread more than the cores costs every request wake-ups (on 2 cores,
/// unlinks ran at half the rate with 3 threads as with 2: docs/benchmarks.md, "Issue 10,
/// fifth round"). One thread alone was slower than two at metadata there too.
pub fn threads_default() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get()).clamp(2, 8)
}
/// More threads than this only add contention on a pool's catalog lock.
pub const THREADS_MAX: usize = 64;

/// What a mount takes besides the pool and the mountpoint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MountOptions {
    pub threads: usize,
    /// Migration jobs that copy at once.
    pub max_jobs: usize,
    /// Pool-wide copy rate cap, bytes per second (0: none).
    pub copy_rate: u64,
    /// `ro`: the kernel refuses every change with EROFS, the control file takes no command
    /// and no job starts; the catalog is left as it was found (after a recovery, if the pool
    /// needed one).
    pub read_only: bool,
    /// `noexec`: the kernel refuses to execute files of the mount.
    pub no_exec: bool,
    /// `noatime`: reads never update access times.
    pub no_atime: bool,
    /// `dev`: device nodes of the mount open their devices (root only). By default a mount
    /// is `nodev`: the kernel refuses to open them (EACCES), though they can be made.
    pub dev: bool,
    /// `writeback`: the kernel caches writes and sends them later (FUSE_WRITEBACK_CACHE).
    /// Off by default: a write acknowledged but not yet fsync'd is lost if the daemon dies
    /// (as on any file system at a power cut); fsync stays durable.
    pub writeback: bool,
    /// `uring`: ask the kernel for FUSE over io_uring (its `fuse` module's `enable_uring`
    /// parameter must be on): a queue per CPU, served by a thread pinned to it, beside the
    /// /dev/fuse threads. Off by default; without the kernel's offer the mount serves
    /// through /dev/fuse alone, and says so in its log and its status.
    pub uring: bool,
}

impl Default for MountOptions {
    fn default() -> MountOptions {
        MountOptions {
            threads: threads_default(),
            max_jobs: crate::migrate::DEFAULT_MAX_JOBS,
            copy_rate: 0,
            read_only: false,
            no_exec: false,
            no_atime: false,
            dev: false,
            writeback: false,
            uring: false,
        }
    }
}

/// Options that belong to mount(8), the boot or systemd, not to the file system: accepted
/// and left alone.
fn is_not_ours(name: &str) -> bool {
    matches!(name, "defaults" | "auto" | "noauto" | "nofail" | "_netdev" | "user" | "users" | "nouser" | "owner")
        || matches!(name, "group" | "comment" | "uhelper" | "helper")
        || name.starts_with("x-")
}

/// The options a user can give, for the error that names an unknown one.
pub const KNOWN: &str = "ro, rw, threads=N, max_jobs=N, copy_rate=SIZE, noexec, exec, noatime, atime, nosuid, \
                         nodev, dev (root), writeback, nowriteback, uring, nouring, default_permissions, allow_other (root), and \
                         mount(8)'s and systemd's own \
                         (defaults, auto, noauto, nofail, _netdev, user, users, x-*)";

impl MountOptions {
    /// Apply a comma-separated option list (later options win). Every unknown option is
    /// named in the error, unless `sloppy` (mount's `-s`), which skips them.
    pub fn apply(&mut self, list: &str, sloppy: bool) -> Result<(), String> {
        let mut unknown = Vec::new();
        for opt in list.split(',').map(str::trim).filter(|o| !o.is_empty()) {
            let (name, value) = match opt.split_once('=') {
                Some((n, v)) => (n, Some(v)),
                None => (opt, None),
            };
            let need = || {
                value.filter(|v| !v.is_empty()).ok_or_else(|| format!("mount option {name} needs a value ({name}=...)"))
            };
            let number = || -> Result<usize, String> {
                let v = need()?;
                v.parse().map_err(|_| format!("mount option {name}={v}: not a number"))
            };
            match name {
                "ro" | "rw" if value.is_none() => self.read_only = name == "ro",
                "noexec" | "exec" if value.is_none() => self.no_exec = name == "noexec",
                "noatime" | "atime" | "relatime" if value.is_none() => self.no_atime = name == "noatime",
                "writeback" | "nowriteback" if value.is_none() => self.writeback = name == "writeback",
                "uring" | "nouring" if value.is_none() => self.uring = name == "uring",
                "threads" => self.threads = number()?,
                "max_jobs" | "max-jobs" => self.max_jobs = number()?,
                "copy_rate" | "copy-rate" => {
                    let v = need()?;
                    self.copy_rate = parse_size(v).map_err(|e| format!("mount option {name}={v}: {e}"))?;
                }
                // Always so: set-user-id bits take no effect in a ferryfs mount, and the kernel
                // checks permissions.
                "nosuid" | "default_permissions" if value.is_none() => {}
                "suid" if value.is_none() => {
                    return Err(format!("mount option {name}: ferryfs mounts are always no{name}"))
                }
                // Device nodes open their devices only if root asks for it.
                "dev" | "nodev" if value.is_none() => {
                    // SAFETY: geteuid can't fail.
                    if name == "dev" && unsafe { libc::geteuid() } != 0 {
                        return Err("mount option dev: only a mount by root opens device nodes".into());
                    }
                    self.dev = name == "dev";
                }
                // A mount by root serves every user (the kernel checks their permissions); a
                // mount by another user serves only that user.
                "allow_other" if value.is_none() => {
                    // SAFETY: geteuid can't fail.
                    if unsafe { libc::geteuid() } != 0 {
                        return Err("mount option allow_other: only a mount by root serves other users".into());
                    }
                }
                n if is_not_ours(n) => {}
                _ if sloppy => {}
                _ => unknown.push(opt.to_string()),
            }
        }
        if !unknown.is_empty() {
            return Err(format!(
                "unknown mount option{} {} (known: {KNOWN})",
                if unknown.len() > 1 { "s" } else { "" },
                unknown.join(", ")
            ));
        }
        self.check()
    }

    /// The limits every way of giving options meets.
    pub fn check(&self) -> Result<(), String> {
        if !(1..=THREADS_MAX).contains(&self.threads) {
            return Err(format!("threads must be 1..={THREADS_MAX}, not {}", self.threads));
        }
        let max = crate::migrate::command::MAX_JOBS_LIMIT;
        if !(1..=max).contains(&self.max_jobs) {
            return Err(format!("max_jobs must be 1..={max}, not {}", self.max_jobs));
        }
        Ok(())
    }

    /// The options as one `-o` list, which [`MountOptions::apply`] reads back to the same.
    pub fn to_list(&self) -> String {
        let mut o = vec![
            if self.read_only { "ro" } else { "rw" }.to_string(),
            format!("threads={}", self.threads),
            format!("max_jobs={}", self.max_jobs),
            format!("copy_rate={}", self.copy_rate),
        ];
        if self.no_exec {
            o.push("noexec".into());
        }
        if self.no_atime {
            o.push("noatime".into());
        }
        if self.dev {
            o.push("dev".into());
        }
        if self.writeback {
            o.push("writeback".into());
        }
        if self.uring {
            o.push("uring".into());
        }
        o.join(",")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parsed(list: &str) -> Result<MountOptions, String> {
        let mut o = MountOptions::default();
        o.apply(list, false).map(|()| o)
    }

    #[test]
    fn fstab_options_parse() {
        let o =
            parsed("defaults,nofail,_netdev,x-systemd.requires-mounts-for=/data2,ro,threads=5,copy_rate=200M").unwrap();
        assert!(o.read_only);
        assert_eq!((o.threads, o.copy_rate), (5, 200 << 20));
        assert!(!parsed("ro,rw").unwrap().read_only, "the last of ro and rw wins");
        let o = parsed("noexec,noatime,max_jobs=2").unwrap();
        assert!(o.no_exec && o.no_atime && o.max_jobs == 2);
    }

    #[test]
    fn the_list_reads_back() {
        let o = parsed("ro,threads=7,max_jobs=3,copy_rate=1M,noexec,noatime,writeback,uring").unwrap();
        assert!(o.writeback && !parsed("writeback,nowriteback").unwrap().writeback);
        assert!(o.uring && !parsed("uring,nouring").unwrap().uring);
        assert_eq!(parsed(&o.to_list()).unwrap(), o);
        assert_eq!(parsed(&MountOptions::default().to_list()).unwrap(), MountOptions::default());
    }

    #[test]
    fn unknown_and_bad_options_are_named() {
        let e = parsed("ro,bogus,threads=2,frobnicate=3").unwrap_err();
        assert!(e.starts_with("unknown mount options bogus, frobnicate=3 (known: ro, rw"), "{e}");
        assert!(parsed("threads=x").unwrap_err().contains("threads=x: not a number"));
        assert!(parsed("threads=0").unwrap_err().contains("threads must be 1..=64"));
        assert!(parsed("threads").unwrap_err().contains("needs a value"));
        assert!(parsed("copy_rate=fast").unwrap_err().starts_with("mount option copy_rate=fast:"));
        assert!(parsed("ro=1").unwrap_err().contains("unknown mount option ro=1"));
        assert!(parsed("suid").unwrap_err().contains("always nosuid"));
        assert!(!parsed("nodev").unwrap().dev, "nodev is the default, and accepted");
        // SAFETY: geteuid can't fail.
        if unsafe { libc::geteuid() } == 0 {
            assert!(parsed("dev").unwrap().dev);
            assert!(!parsed("dev,nodev").unwrap().dev, "the last wins");
        } else {
            assert!(parsed("dev").unwrap_err().contains("only a mount by root"));
        }
        let mut o = MountOptions::default();
        o.apply("bogus,ro", true).expect("sloppy skips what it does not know");
        assert!(o.read_only);
    }
}
