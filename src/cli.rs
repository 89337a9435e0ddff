//! The command line: parses, calls the library, prints one clear line on error, and exits
//! with a code that says what kind of outcome it was ([`Exit`]).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{CommandFactory, Parser, Subcommand, ValueHint};

use crate::catalog::check::check;
use crate::catalog::store::SNAP_FILE;
use crate::client;
use crate::geometry::{parse_size, Geometry};
use crate::migrate::command::quote;
use crate::mount::{self, status_of_mount, threads_default, MountOptions};
use crate::pool::{self, Pool, PoolError};
use crate::report;

#[derive(Parser, Debug)]
#[command(
    name = "ferryfs",
    version,
    about = "A FUSE-backed virtual volume layer that moves data sets between volumes while applications keep writing",
    after_long_help = exit_status_help()
)]
pub struct Cli {
    #[command(subcommand)]
    pub cmd: Cmd,
}

#[derive(Subcommand, Debug)]
pub enum Cmd {
    /// Create a pool: a directory for the catalog and the volume images.
    Init {
        /// The pool directory to create (it may exist, but must be empty).
        #[arg(value_hint = ValueHint::DirPath)]
        pool: PathBuf,
        /// Track size: a power of two, 4K to 64M.
        #[arg(long, default_value = "64K", value_parser = track_size_arg)]
        track_size: Geometry,
    },
    /// Add, list, retire or reopen volumes.
    Volume {
        #[command(subcommand)]
        cmd: VolumeCmd,
    },
    /// Mount a pool; returns once the mount serves (unless --foreground).
    Mount {
        /// The pool directory.
        #[arg(value_hint = ValueHint::DirPath)]
        pool: PathBuf,
        /// Where to mount it: an empty directory.
        #[arg(value_hint = ValueHint::DirPath)]
        mountpoint: PathBuf,
        /// Serve in this process, logging to stderr, until unmounted.
        #[arg(long)]
        foreground: bool,
        /// Threads serving FUSE requests (default: one per core, at least 2 and at most 8).
        #[arg(long, default_value_t = threads_default())]
        threads: usize,
        /// Migration jobs that copy at once (more wait in a queue).
        #[arg(long, default_value_t = crate::migrate::DEFAULT_MAX_JOBS)]
        max_jobs: usize,
        /// Pool-wide cap on the copy rate of migrations, bytes per second (a size: 64M, 1.5G;
        /// 0: none).
        #[arg(long, default_value = "0", value_parser = size_arg)]
        copy_rate: u64,
        /// Mount options, comma-separated, as in an fstab line: ro, rw, threads=N,
        /// max_jobs=N, copy_rate=SIZE, noexec, noatime (docs/cli.md lists them all).
        #[arg(short = 'o', value_name = "OPTIONS")]
        options: Vec<String>,
        /// Skip unknown mount options instead of refusing them (mount's -s).
        #[arg(long, hide = true)]
        sloppy: bool,
        /// Check the options and stop before mounting (mount's -f).
        #[arg(long, hide = true)]
        fake: bool,
    },
    /// Unmount and wait for the daemon to write its catalog.
    Umount {
        /// The mountpoint.
        #[arg(value_hint = ValueHint::DirPath)]
        mountpoint: PathBuf,
        /// Detach the mount even if files are open on it, and return at once; the daemon
        /// writes its catalog and exits once the last of them is closed.
        #[arg(long)]
        lazy: bool,
    },
    /// List data sets, with their size, extents and volumes.
    Ls {
        /// A pool directory or a mountpoint.
        #[arg(value_hint = ValueHint::DirPath)]
        target: PathBuf,
        /// A path inside the pool; a directory lists everything below it.
        path: Option<String>,
        /// Also list each data set's extents.
        #[arg(long)]
        extents: bool,
        /// Print JSON (docs/cli.md describes it).
        #[arg(long)]
        json: bool,
    },
    /// Show a mount's status (volumes and jobs).
    Status {
        /// The mountpoint.
        #[arg(value_hint = ValueHint::DirPath)]
        mountpoint: PathBuf,
        /// Print the status as JSON (with --watch: one line of JSON per reading).
        #[arg(long)]
        json: bool,
        /// Show it again every --interval seconds until Ctrl-C or until the mount goes away
        /// (on a terminal, in place).
        #[arg(long)]
        watch: bool,
        /// Seconds between two readings with --watch.
        #[arg(long, value_name = "SECS", default_value = "2", value_parser = interval_arg, requires = "watch")]
        interval: Duration,
    },
    /// Print a mount's metrics (the Prometheus text format of .ferry/metrics).
    Metrics {
        /// The mountpoint.
        #[arg(value_hint = ValueHint::DirPath)]
        mountpoint: PathBuf,
    },
    /// Move data sets (a directory: every data set under it) to other volumes while they
    /// stay in use.
    Migrate {
        /// The mountpoint.
        #[arg(value_hint = ValueHint::DirPath)]
        mountpoint: PathBuf,
        /// Paths in the mount (absolute, or relative to the mount's root).
        #[arg(required = true)]
        paths: Vec<String>,
        /// Target volumes, comma-separated.
        #[arg(long, required = true)]
        to: String,
        #[command(flatten)]
        job: JobArgs,
    },
    /// Move every data set with an extent on the source volumes into one volume.
    Merge {
        /// The mountpoint.
        #[arg(value_hint = ValueHint::DirPath)]
        mountpoint: PathBuf,
        /// The volumes to empty.
        #[arg(required = true)]
        sources: Vec<String>,
        /// The volume that takes their data sets.
        #[arg(long, required = true)]
        into: String,
        #[command(flatten)]
        job: JobArgs,
    },
    /// Move every data set off a volume, to the volumes with the most free space.
    Drain {
        /// The mountpoint.
        #[arg(value_hint = ValueHint::DirPath)]
        mountpoint: PathBuf,
        /// The volume to empty.
        volume: String,
        /// Target volumes, comma-separated (default: every other volume).
        #[arg(long)]
        to: Option<String>,
        #[command(flatten)]
        job: JobArgs,
    },
    /// Follow running jobs and plans to their end, as --wait does, and exit with the same
    /// codes.
    Wait {
        /// The mountpoint.
        #[arg(value_hint = ValueHint::DirPath)]
        mountpoint: PathBuf,
        /// Job or plan ids, as `ferryfs status` lists them (default: every job and plan that
        /// has not ended).
        ids: Vec<u64>,
        /// Seconds between two progress lines when stdout is not a terminal.
        #[arg(long, value_name = "SECS", default_value = "10", value_parser = interval_arg)]
        interval: Duration,
    },
    /// Cancel a job (or a plan) before its switch: the target is freed, the source untouched.
    Cancel {
        /// The mountpoint.
        #[arg(value_hint = ValueHint::DirPath)]
        mountpoint: PathBuf,
        /// A job id, or a plan id (all its jobs).
        job: u64,
    },
    /// Check every invariant of a pool's catalog.
    Fsck {
        /// The pool directory (mounted or not).
        #[arg(value_hint = ValueHint::DirPath)]
        pool: PathBuf,
        /// Before checking, cut a damaged catalog log at its last good frame (unmounted
        /// pools only; a copy of the log is kept next to it).
        #[arg(long)]
        repair: bool,
    },
    /// Build a temporary pool, mount it, write and verify data, and clean up.
    Demo {
        /// Keep the temporary pool instead of deleting it.
        #[arg(long)]
        keep: bool,
    },
    /// Print a completion script for a shell to stdout.
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Write the man pages (ferryfs.1, and ferryfs-SUBCOMMAND.1 for each subcommand) into a
    /// directory.
    Manpages {
        /// Where to write them (created if missing).
        #[arg(value_hint = ValueHint::DirPath)]
        dir: PathBuf,
    },
}

#[derive(Subcommand, Debug)]
pub enum VolumeCmd {
    /// Add a volume to a pool (unmounted) or a mount: a sparse image file, or a block device
    /// (a disk, a partition, a LUN, a loop device). It takes allocations and can be a
    /// migration target at once.
    Add {
        /// A pool directory or a mountpoint.
        #[arg(value_hint = ValueHint::DirPath)]
        target: PathBuf,
        /// The volume's name: 1 to 32 of A-Z a-z 0-9 _ -, starting with a letter or a digit.
        #[arg(value_parser = volume_name_arg)]
        name: String,
        /// Its size (a size: 64M, 1.5G), rounded down to whole tracks; needed for an image
        /// file; a device's default is all of it (less its 4 KiB label).
        #[arg(long, value_parser = size_arg)]
        size: Option<u64>,
        /// Where the image lives (any file system; default POOL/volumes/NAME.img), or the
        /// block device to use (/dev/...; it is zeroed and labelled).
        #[arg(long, value_hint = ValueHint::FilePath)]
        path: Option<PathBuf>,
        /// Take a device even if it holds a file system, another signature or another
        /// pool's label (what it holds is lost). A device in use is refused all the same.
        #[arg(long)]
        force: bool,
    },
    /// List volumes with their size, usage and data set count.
    List {
        /// A pool directory or a mountpoint.
        #[arg(value_hint = ValueHint::DirPath)]
        target: PathBuf,
        /// Print JSON (docs/cli.md describes it).
        #[arg(long)]
        json: bool,
    },
    /// Give a closed volume (the source of a finished merge or drain) back to allocation, in
    /// a pool (unmounted) or a mount.
    Reopen {
        /// A pool directory or a mountpoint.
        #[arg(value_hint = ValueHint::DirPath)]
        target: PathBuf,
        /// The volume.
        name: String,
    },
    /// Remove an empty volume from a pool (unmounted) or a mount. Its image is deleted if it
    /// lives in the pool directory.
    Retire {
        /// A pool directory or a mountpoint.
        #[arg(value_hint = ValueHint::DirPath)]
        target: PathBuf,
        /// The volume.
        name: String,
    },
}

#[derive(clap::Args, Debug)]
pub struct JobArgs {
    /// live: hold writes for a few milliseconds at the switch; close: wait for the data set
    /// to be closed and hold opens during the switch.
    #[arg(long, default_value = "live", value_parser = ["live", "close"])]
    cutover: String,
    /// Cap each job's copy rate, bytes per second (a size: 4M, 1.5G).
    #[arg(long, value_parser = size_arg)]
    rate: Option<u64>,
    /// Before the switch, with writes held, compare a checksum of every track of the source
    /// and the target; a mismatch fails the job (it rolls back, the source stays). In live
    /// mode the comparison's time adds to the stall.
    #[arg(long)]
    verify: bool,
    /// Follow the jobs to their end; the exit code says how they ended.
    #[arg(long)]
    wait: bool,
    /// With --wait, seconds between two progress lines when stdout is not a terminal.
    #[arg(long, value_name = "SECS", default_value = "10", value_parser = interval_arg)]
    interval: Duration,
}

impl JobArgs {
    fn options(&self) -> String {
        let mut s = format!("cutover={}", self.cutover);
        if let Some(bytes) = self.rate {
            s.push_str(&format!(" rate={bytes}"));
        }
        if self.verify {
            s.push_str(" verify=yes");
        }
        s
    }
}

fn size_arg(text: &str) -> Result<u64, String> {
    parse_size(text)
}

fn track_size_arg(text: &str) -> Result<Geometry, String> {
    Geometry::new(parse_size(text)?).map_err(|e| e.to_string())
}

fn volume_name_arg(name: &str) -> Result<String, String> {
    pool::validate_volume_name(name).map_err(|e| e.to_string())?;
    Ok(name.to_string())
}

/// The longest `--interval`: a day.
const INTERVAL_MAX: Duration = Duration::from_secs(24 * 3600);

/// Seconds, decimals allowed (`0.5`), more than 0 and at most a day.
fn interval_arg(text: &str) -> Result<Duration, String> {
    let secs: f64 = text.trim().parse().map_err(|_| format!("{text:?} is not a number of seconds"))?;
    if !(secs > 0.0 && secs <= INTERVAL_MAX.as_secs_f64()) {
        return Err(format!("{text:?}: the interval is more than 0 and at most {} seconds", INTERVAL_MAX.as_secs()));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// How `ferryfs` exits: one code per kind of outcome, so that a script can tell them apart.
/// `ferryfs --help`, the man page and docs/cli.md show this table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Exit {
    Ok = 0,
    Error = 1,
    Usage = 2,
    Refused = 3,
    JobFailed = 4,
    JobCancelled = 5,
    Stopped = 6,
}

impl Exit {
    pub const ALL: [Exit; 7] =
        [Exit::Ok, Exit::Error, Exit::Usage, Exit::Refused, Exit::JobFailed, Exit::JobCancelled, Exit::Stopped];

    pub fn code(self) -> i32 {
        self as i32
    }

    /// One line each, word for word the table in docs/cli.md.
    pub fn meaning(self) -> &'static str {
        match self {
            Exit::Ok => {
                "success; with --wait or `wait`, every job switched (or found its data set deleted: nothing to \
                 move) and every plan finished"
            }
            Exit::Error => "an error: I/O, not a pool or a mount, a damaged catalog, problems found by fsck",
            Exit::Usage => "a usage error: an unknown flag, a missing argument, a malformed value",
            Exit::Refused => "refused: the mount or the pool understood the request and declined it; nothing changed",
            Exit::JobFailed => "a job or a plan that was followed failed",
            Exit::JobCancelled => "a job or a plan that was followed was cancelled (and none failed)",
            Exit::Stopped => {
                "the mount went away, or stopped the jobs to unmount, while they were followed (none failed or \
                 was cancelled; its next mount starts them again)"
            }
        }
    }
}

/// The exit status table, as `--help` prints it.
fn exit_status_help() -> String {
    let mut s = String::from("Exit status:\n");
    for e in Exit::ALL {
        s.push_str(&format!("  {}  {}\n", e.code(), e.meaning()));
    }
    s
}

/// Why a command did not succeed: one line for stderr, and the exit code.
#[derive(Debug, PartialEq, Eq)]
pub struct Failure {
    pub exit: Exit,
    pub message: String,
}

impl Failure {
    pub fn new(exit: Exit, message: impl Into<String>) -> Failure {
        Failure { exit, message: message.into() }
    }
}

impl From<String> for Failure {
    fn from(message: String) -> Failure {
        Failure::new(Exit::Error, message)
    }
}

impl From<&str> for Failure {
    fn from(message: &str) -> Failure {
        Failure::new(Exit::Error, message)
    }
}

impl From<client::SendError> for Failure {
    fn from(e: client::SendError) -> Failure {
        match e {
            client::SendError::Refused(why) => Failure::new(Exit::Refused, why),
            client::SendError::Failed(why) => Failure::new(Exit::Error, why),
        }
    }
}

impl From<client::Unfinished> for Failure {
    fn from(u: client::Unfinished) -> Failure {
        let exit = match u.ending {
            client::Ending::Switched => Exit::Ok,
            client::Ending::Stopped => Exit::Stopped,
            client::Ending::Cancelled => Exit::JobCancelled,
            client::Ending::Failed => Exit::JobFailed,
        };
        Failure::new(exit, u.why)
    }
}

/// The pool's refusals (a rule said no, nothing changed) exit as the mount's do.
impl From<PoolError> for Failure {
    fn from(e: PoolError) -> Failure {
        let exit = match &e {
            PoolError::NotEmpty { .. }
            | PoolError::Locked { .. }
            | PoolError::BadVolumeName { .. }
            | PoolError::VolumeExists { .. }
            | PoolError::ImageExists { .. }
            | PoolError::ImageInsideMount { .. }
            | PoolError::StrayImage { .. }
            | PoolError::VolumeTooSmall { .. }
            | PoolError::NoVolume { .. }
            | PoolError::NotRetirable { .. }
            | PoolError::NotReopenable { .. }
            | PoolError::DeviceRefused { .. } => Exit::Refused,
            PoolError::Store(_) | PoolError::Io { .. } | PoolError::Image { .. } | PoolError::DeviceMissing { .. } => {
                Exit::Error
            }
        };
        Failure::new(exit, e.to_string())
    }
}

pub type CliResult = Result<(), Failure>;

/// Parse the command line, run it, and exit: with 0, or with the failure's line on stderr
/// and its code. (A usage error never gets here: clap prints it and exits 2.)
pub fn main(cli: Cli) -> ! {
    let result = run(cli);
    // A failed write to stdout (a closed pipe) must not turn success into a panic.
    let _ = std::io::stdout().flush();
    match result {
        Ok(()) => std::process::exit(Exit::Ok.code()),
        Err(f) => {
            eprintln!("ferryfs: error: {}", f.message);
            std::process::exit(f.exit.code())
        }
    }
}

/// A path as the mount sees it: "/a/b" for MOUNT/a/b, an absolute path inside the mount, or a
/// relative one (to the current directory if that is inside the mount, else to its root).
fn path_in_mount(mnt: &Path, p: &str) -> String {
    let mnt_abs = mnt.canonicalize().unwrap_or_else(|_| mnt.to_path_buf());
    let cand = if Path::new(p).is_absolute() {
        PathBuf::from(p)
    } else {
        std::env::current_dir().map(|d| d.join(p)).unwrap_or_else(|_| PathBuf::from(p))
    };
    let cand = cand.canonicalize().unwrap_or(cand);
    match cand.strip_prefix(&mnt_abs) {
        Ok(rel) => format!("/{}", rel.to_string_lossy()),
        Err(_) if !p.starts_with('/') => format!("/{p}"),
        Err(_) => p.to_string(),
    }
}

/// Send a command line; print the reply; with `wait`, follow what it started.
fn command(mnt: &Path, line: &str, wait: Option<Duration>) -> CliResult {
    let reply = client::send(mnt, line)?;
    println!("{reply}");
    if let Some(interval) = wait {
        client::wait(mnt, &client::started(&reply), interval)?;
    }
    Ok(())
}

/// A pool directory or a mountpoint, resolved to the pool.
enum Target {
    Pool(PathBuf),
    Mount { pool: PathBuf },
}

///
/// Another user learns nothing from it: a mount's catalog (every path, extent and job) is
/// its owner's, and so is a pool directory (0700). What they may see of the data sets,
/// `ls -l` shows them through the mount, with its permission checks.
fn resolve_target(path: &Path) -> Result<Target, String> {
    match mount::mount_status(path) {
        Ok(s) => return Ok(Target::Mount { pool: PathBuf::from(s.pool) }),
        Err(e) if e.contains("only the mount's owner") => return Err(e),
        Err(_) => {}
    }
    match std::fs::metadata(path.join(SNAP_FILE)) {
        Ok(_) => return Ok(Target::Pool(path.to_path_buf())),
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
            return Err(format!("{}: permission denied (a pool is its owner's alone)", path.display()))
        }
        Err(_) => {}
    }
    if !path.exists() {
        return Err(format!("{}: no such file or directory", path.display()));
    }
    Err(format!("{} is neither a ferryfs pool nor a ferryfs mount", path.display()))
}

fn target_catalog(path: &Path) -> Result<crate::catalog::Catalog, String> {
    let pool = match resolve_target(path)? {
        Target::Pool(p) | Target::Mount { pool: p } => p,
    };
    Ok(pool::open_read_only(&pool).map_err(|e| e.to_string())?.catalog)
}

pub fn run(cli: Cli) -> CliResult {
    match cli.cmd {
        Cmd::Init { pool, track_size } => {
            pool::init(&pool, track_size)?;
            println!("initialized pool {} (track size {} bytes)", pool.display(), track_size.track_size_bytes());
            Ok(())
        }
        Cmd::Volume { cmd: VolumeCmd::Add { target, name, size, path, force } } => {
            let device = path.as_deref().is_some_and(crate::device::is_block_device);
            let size =
                match size {
                    Some(n) => n,
                    None if device => 0,
                    None => return Err(Failure::new(
                        Exit::Usage,
                        "--size is needed for an image file (a block device brings its own); usage: ferryfs volume \
                         add TARGET NAME --size SIZE [--path FILE]",
                    )),
                };
            let pool = match resolve_target(&target)? {
                Target::Pool(pool) => pool,
                Target::Mount { .. } => {
                    let mut line = format!("add {}", quote(&name));
                    if size > 0 {
                        line.push_str(&format!(" size={size}"));
                    }
                    if let Some(p) = path {
                        let p = std::path::absolute(&p).map_err(|e| format!("{}: {e}", p.display()))?;
                        line.push_str(&format!(" path={}", quote(&p.to_string_lossy())));
                    }
                    if force {
                        line.push_str(" force=yes");
                    }
                    return command(&target, &line, None);
                }
            };
            let mut p = Pool::open(&pool)?;
            let v = p.add_volume(&name, size, path.as_deref(), force)?;
            println!(
                "added volume {} ({} bytes, {} tracks) at {}",
                v.name,
                v.size_bytes,
                v.free.tracks_total(),
                v.path
            );
            Ok(())
        }
        Cmd::Volume { cmd: VolumeCmd::Reopen { target, name } } => match resolve_target(&target)? {
            Target::Mount { .. } => command(&target, &format!("reopen {}", quote(&name)), None),
            Target::Pool(pool) => {
                let mut p = Pool::open(&pool)?;
                p.reopen_volume(&name)?;
                println!("reopened volume {name}");
                Ok(())
            }
        },
        Cmd::Volume { cmd: VolumeCmd::Retire { target, name } } => match resolve_target(&target)? {
            Target::Mount { .. } => command(&target, &format!("retire {}", quote(&name)), None),
            Target::Pool(pool) => {
                let mut p = Pool::open(&pool)?;
                let (path, removed) = p.retire_volume(&name)?;
                if removed {
                    println!("retired volume {name}; removed its image {path}");
                } else if path.starts_with("/dev/") {
                    println!("retired volume {name}; device {path} keeps its bytes, its label is wiped");
                } else {
                    println!("retired volume {name}; its image {path} is outside the pool and was kept");
                }
                Ok(())
            }
        },
        Cmd::Migrate { mountpoint, paths, to, job } => {
            let paths: Vec<String> = paths.iter().map(|p| quote(&path_in_mount(&mountpoint, p))).collect();
            let line = format!("migrate {} to {} {}", paths.join(" "), quote(&to), job.options());
            command(&mountpoint, &line, job.wait.then_some(job.interval))
        }
        Cmd::Merge { mountpoint, sources, into, job } => {
            let srcs: Vec<String> = sources.iter().map(|s| quote(s)).collect();
            let line = format!("merge {} into {} {}", srcs.join(" "), quote(&into), job.options());
            command(&mountpoint, &line, job.wait.then_some(job.interval))
        }
        Cmd::Drain { mountpoint, volume, to, job } => {
            let to = to.map(|t| format!(" to {}", quote(&t))).unwrap_or_default();
            let line = format!("drain {}{to} {}", quote(&volume), job.options());
            command(&mountpoint, &line, job.wait.then_some(job.interval))
        }
        Cmd::Wait { mountpoint, ids, interval } => {
            let st = mount::mount_status(&mountpoint)?;
            let what = client::resolve(&st, &ids)?;
            if what.jobs.is_empty() && what.plans.is_empty() {
                println!("nothing to wait for: no job or plan of {} is running", mountpoint.display());
                return Ok(());
            }
            client::wait(&mountpoint, &what, interval)?;
            Ok(())
        }
        Cmd::Cancel { mountpoint, job } => command(&mountpoint, &format!("cancel {job}"), None),
        Cmd::Volume { cmd: VolumeCmd::List { target, json } } => {
            // A mount's status holds the list (O(volumes)); reading the pool's catalog from
            // disk instead decodes all of it (a second at 10^6 data sets).
            let list = match mount::mount_status(&target) {
                Ok(s) => report::VolumeList { track_size_bytes: s.track_size_bytes, volumes: s.volumes },
                Err(_) => {
                    let c = target_catalog(&target)?;
                    report::VolumeList { track_size_bytes: c.geometry.track_size_bytes(), volumes: report::volumes(&c) }
                }
            };
            if json {
                println!("{}", serde_json::to_string_pretty(&list).expect("serializes"));
            } else {
                print_volumes(&list.volumes);
            }
            Ok(())
        }
        Cmd::Mount { pool, mountpoint, foreground, threads, max_jobs, copy_rate, options, sloppy, fake } => {
            let mut opts = MountOptions { threads, max_jobs, copy_rate, ..MountOptions::default() };
            for list in &options {
                opts.apply(list, sloppy).map_err(|e| Failure::new(Exit::Usage, e))?;
            }
            opts.check().map_err(|e| Failure::new(Exit::Usage, e))?;
            if fake {
                println!("would mount {} at {} -o {}", pool.display(), mountpoint.display(), opts.to_list());
                return Ok(());
            }
            if foreground {
                Ok(mount::mount_foreground(&pool, &mountpoint, &opts)?)
            } else {
                let pid = mount::mount_daemon(&pool, &mountpoint, &opts)?;
                println!("mounted {} at {} (pid {pid})", pool.display(), mountpoint.display());
                Ok(())
            }
        }
        Cmd::Umount { mountpoint, lazy } => {
            mount::umount(&mountpoint, lazy)?;
            if lazy {
                println!("detached {}; the daemon exits once its last file is closed", mountpoint.display());
            } else {
                println!("unmounted {}", mountpoint.display());
            }
            Ok(())
        }
        Cmd::Ls { target, path, extents, json } => {
            let c = target_catalog(&target)?;
            let path = path.unwrap_or_else(|| "/".into());
            let listing = report::list(&c, &path).ok_or_else(|| format!("{path}: no such data set or directory"))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&listing).expect("serializes"));
            } else {
                print_listing(&listing, extents);
            }
            Ok(())
        }
        Cmd::Status { mountpoint, json, watch: false, .. } => {
            print_status(&mount::mount_status(&mountpoint)?, json);
            Ok(())
        }
        Cmd::Status { mountpoint, json, watch: true, interval } => watch_status(&mountpoint, json, interval),
        Cmd::Metrics { mountpoint } => Ok(client::print_metrics(&mountpoint)?),
        Cmd::Fsck { pool, repair } => {
            // The lock holds through the check, so no mount starts in between.
            let _lock = if repair { Some(repair_log(&pool)?) } else { None };
            fsck(&pool)
        }
        Cmd::Demo { keep } => demo(keep),
        Cmd::Completions { shell } => {
            clap_complete::generate(shell, &mut Cli::command(), "ferryfs", &mut std::io::stdout());
            Ok(())
        }
        Cmd::Manpages { dir } => {
            for page in write_man_pages(&dir).map_err(|e| format!("{}: {e}", dir.display()))? {
                println!("{}", page.display());
            }
            Ok(())
        }
    }
}

/// `ferryfs status`, once.
fn print_status(s: &report::Status, json: bool) {
    if json {
        println!("{}", serde_json::to_string_pretty(s).expect("serializes"));
        return;
    }
    println!("pool {} mounted at {} (pid {}), track size {} bytes", s.pool, s.mountpoint, s.pid, s.track_size_bytes);
    print_volumes(&s.volumes);
    if !s.closed_volumes.is_empty() {
        println!("closed to new data: {}", s.closed_volumes.join(", "));
    }
    client::print_jobs(s);
}

/// `ferryfs status --watch`: the status every `interval`, until the mount goes away (or
/// Ctrl-C). On a terminal each reading replaces the last; otherwise each is a new block
/// under a time stamp line (with --json, one line of JSON).
fn watch_status(mnt: &Path, json: bool, interval: Duration) -> CliResult {
    use std::io::IsTerminal;
    let tty = std::io::stdout().is_terminal();
    let mut first = true;
    loop {
        let s = match mount::mount_status(mnt) {
            Ok(s) => s,
            Err(e) if first => return Err(e.into()),
            Err(_) => {
                return Err(Failure::new(
                    Exit::Stopped,
                    format!("{} is no longer mounted; stopped watching", mnt.display()),
                ))
            }
        };
        first = false;
        if json {
            println!("{}", serde_json::to_string(&s).expect("serializes"));
        } else {
            let now = humantime::format_rfc3339_seconds(std::time::SystemTime::now());
            if tty {
                // Home the cursor and clear the screen: the reading replaces the last one.
                print!("\x1b[H\x1b[2J");
                println!("{now}, every {} s (Ctrl-C stops)", interval.as_secs_f64());
            } else {
                println!("--- {now}");
            }
            print_status(&s, false);
        }
        std::thread::sleep(interval);
    }
}

/// Write ferryfs.1 and a page per subcommand (ferryfs-volume-add.1, ...) into `dir`; the
/// paths written. The main page ends with the exit status table.
fn write_man_pages(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    fn pages(cmd: clap::Command, dir: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
        for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
            pages(sub.clone(), dir, out)?;
        }
        out.push(clap_mangen::Man::new(cmd).generate_to(dir)?);
        Ok(())
    }
    std::fs::create_dir_all(dir)?;
    let mut cmd = Cli::command().disable_help_subcommand(true);
    cmd.build();
    let mut out = Vec::new();
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        pages(sub.clone(), dir, &mut out)?;
    }
    // The main page: clap_mangen's sections, with the exit codes as an EXIT STATUS section
    // (clap_mangen would print them as one paragraph under EXTRA).
    let man = clap_mangen::Man::new(cmd);
    let path = dir.join(man.get_filename());
    let mut page = Vec::new();
    man.render_title(&mut page)?;
    man.render_name_section(&mut page)?;
    man.render_synopsis_section(&mut page)?;
    man.render_description_section(&mut page)?;
    man.render_options_section(&mut page)?;
    man.render_subcommands_section(&mut page)?;
    page.extend_from_slice(b".SH \"EXIT STATUS\"\n");
    for e in Exit::ALL {
        page.extend_from_slice(format!(".TP\n\\fB{}\\fR\n{}\n", e.code(), roff_text(e.meaning())).as_bytes());
    }
    man.render_version_section(&mut page)?;
    std::fs::write(&path, page)?;
    out.push(path);
    Ok(out)
}

/// Text for a roff line: backslashes doubled, dashes as dashes (not hyphens), and no line
/// starts with a control character.
fn roff_text(text: &str) -> String {
    let t = text.replace('\\', "\\\\").replace('-', "\\-");
    if t.starts_with(['.', '\'']) {
        format!("\\&{t}")
    } else {
        t
    }
}

fn print_volumes(vols: &[report::VolumeReport]) {
    println!("{:<12} {:>14} {:>10} {:>10} {:>10} {:>9}  PATH", "VOLUME", "SIZE", "TRACKS", "USED", "FREE", "DATASETS");
    for v in vols {
        println!(
            "{:<12} {:>14} {:>10} {:>10} {:>10} {:>9}  {}",
            v.name, v.size_bytes, v.tracks_total, v.tracks_used, v.tracks_free, v.data_sets, v.path
        );
    }
}

fn print_listing(l: &report::Listing, extents: bool) {
    println!("{:<40} {:>12} {:>8} {:>7}  VOLUMES", "DATA SET", "SIZE", "TRACKS", "EXTENTS");
    for d in &l.data_sets {
        println!(
            "{:<40} {:>12} {:>8} {:>7}  {}",
            d.path,
            d.size_bytes,
            d.allocated_tracks,
            d.extent_count,
            d.volumes.join(",")
        );
        if extents {
            for e in &d.extents {
                println!(
                    "    at {:>8}  {:<10} first track {:>8}  tracks {:>8}",
                    e.logical_track, e.volume, e.first_track, e.track_count
                );
            }
        }
    }
    for f in &l.special_files {
        let what = match &f.device {
            Some(dev) => format!("({} {dev})", f.kind),
            None => format!("({})", f.kind),
        };
        println!("{:<40} {:>12} {:>8} {:>7}  {what}", f.path, 0, 0, 0);
    }
}

fn check_fsck_target(pool: &Path) -> CliResult {
    if !pool.join(SNAP_FILE).exists() {
        if status_of_mount(pool).is_some() {
            return Err(format!("{} is a mountpoint; fsck takes the pool directory", pool.display()).into());
        }
        return Err(format!("{} is not a ferryfs pool (no {SNAP_FILE})", pool.display()).into());
    }
    Ok(())
}

/// `fsck --repair`: under the pool lock (refused while mounted), keep a copy of a damaged
/// catalog log and cut the log at its last good frame. Says what it did, or that the log
/// needed nothing.
fn repair_log(pool: &Path) -> Result<pool::PoolLock, Failure> {
    check_fsck_target(pool)?;
    let lock = pool::PoolLock::take(pool).map_err(|e| e.to_string())?;
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let r = crate::catalog::store::repair_log(&lock.dir, now).map_err(|e| e.to_string())?;
    let Some(damage_at) = r.damage_at else {
        println!("repair: the catalog log has nothing after its last good frame; nothing changed");
        return Ok(lock);
    };
    if let Some(copy) = &r.copy {
        println!("repair: kept a copy of the damaged catalog log at {}", copy.display());
    }
    println!(
        "repair: cut the catalog log at byte {} (the end of the last good frame; the damage began at byte \
         {damage_at}): {} bytes removed",
        r.cut_at,
        r.log_bytes - r.cut_at
    );
    println!(
        "repair: {} whole frame(s) after the damage were lost with it (their catalog changes are gone)",
        r.frames_lost
    );
    println!(
        "repair: the frames kept are folded into a new catalog snapshot (copies of the log in the volumes' rings, \
         written after the frames that were cut, no longer apply)"
    );
    Ok(lock)
}

/// What other users could read: the pool directory, its files, and every image (a file or
/// a device), each with a mode that lets anyone but the owner in.
fn exposure_warnings(dir: &Path, c: &crate::catalog::Catalog) -> Vec<String> {
    use std::os::unix::fs::PermissionsExt;
    let mut out = Vec::new();
    let mode_of = |p: &Path| std::fs::metadata(p).ok().map(|m| m.permissions().mode() & 0o777);
    let mut check = |what: String, p: &Path| {
        if let Some(mode) = mode_of(p).filter(|m| m & 0o077 != 0) {
            out.push(format!(
                "{what} {} is mode {mode:04o}: other users can read it; chmod go-rwx {}",
                p.display(),
                p.display()
            ));
        }
    };
    check("the pool directory".into(), dir);
    check("the volumes directory".into(), &dir.join(crate::pool::VOLUMES_DIR));
    for f in [crate::catalog::store::SNAP_FILE, crate::catalog::store::LOG_FILE, crate::pool::MOUNT_LOG_FILE] {
        check("the pool's file".into(), &dir.join(f));
    }
    for v in c.volumes.values() {
        check(format!("volume {}'s image", v.name), Path::new(&v.path));
    }
    out
}

fn fsck(pool: &Path) -> CliResult {
    check_fsck_target(pool)?;
    let dir = pool.canonicalize().map_err(|e| format!("{}: {e}", pool.display()))?;
    let (store, report) = crate::catalog::Store::open(&dir, false).map_err(|e| e.to_string())?;
    let c = &store.catalog;
    let mut r = check(c);
    for v in c.volumes.values() {
        if crate::pool::is_device_volume(v) {
            // A device volume: its label names this pool and volume, wherever it is now.
            match crate::pool::locate_device(&dir, v) {
                Ok(at) if at != Path::new(&v.path) => r.notes.push(format!(
                    "volume {}: its device is {} now (recorded: {})",
                    v.name,
                    at.display(),
                    v.path
                )),
                Ok(_) => {}
                Err(e) => r.problems.push(e.to_string()),
            }
            continue;
        }
        match std::fs::metadata(&v.path) {
            Ok(m) if m.len() < v.size_bytes => r.problems.push(format!(
                "volume {}: image {} is {} bytes, expected {}",
                v.name,
                v.path,
                m.len(),
                v.size_bytes
            )),
            Ok(_) => {}
            Err(e) => r.problems.push(format!("volume {}: image {}: {e}", v.name, v.path)),
        }
    }
    for w in exposure_warnings(&dir, c) {
        println!("warning: {w}");
    }
    let volumes = c.volumes.len();
    // The process ends after this: freeing a catalog of 10^6 data sets one allocation at a
    // time would take a tenth of a second for nothing.
    std::mem::forget(store);
    if report.torn_tail_bytes > 0 {
        r.notes.push(format!(
            "the catalog log ends in a torn append of {} bytes (the next mount cuts it)",
            report.torn_tail_bytes
        ));
    }
    if report.frames_dropped > 0 {
        r.notes.push(format!(
            "the torn tail holds {} whole frame(s) written after the lost bytes and never synced; \
             they are dropped",
            report.frames_dropped
        ));
    }
    if report.ring_frames > 0 {
        r.notes.push(format!(
            "{} catalog change(s) that fsyncs made durable are missing from the log and kept in the volumes' \
             rings (what a power cut leaves); the check counts them, and the next mount replays them",
            report.ring_frames
        ));
    }
    for n in &r.notes {
        println!("note: {n}");
    }
    if r.problems.is_empty() {
        println!(
            "clean: {} data sets, {} directories, {}{} volumes, catalog generation {} + {} logged ops",
            r.data_sets,
            r.directories,
            if r.special_files > 0 { format!("{} special files, ", r.special_files) } else { String::new() },
            volumes,
            report.generation,
            report.ops_replayed
        );
        Ok(())
    } else {
        for p in &r.problems {
            println!("problem: {p}");
        }
        Err(format!("{} problem(s) found in {}", r.problems.len(), pool.display()).into())
    }
}

/// Deterministic bytes for the demo's data sets (xorshift), so that verification needs no
/// second copy.
fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

fn demo(keep: bool) -> CliResult {
    let base = std::env::temp_dir().join(format!("ferryfs-demo-{}", std::process::id()));
    let pool = base.join("pool");
    let mnt = base.join("mnt");
    std::fs::create_dir_all(&mnt).map_err(|e| format!("{}: {e}", mnt.display()))?;
    let result = demo_in(&pool, &mnt);
    if status_of_mount(&mnt).is_some() {
        let _ = mount::umount(&mnt, false);
    }
    if keep {
        println!("kept the demo pool at {}", pool.display());
    } else {
        let _ = std::fs::remove_dir_all(&base);
    }
    result
}

fn demo_mount_options() -> MountOptions {
    MountOptions::default()
}

fn step(what: &str) {
    println!("\n== {what}");
}

fn demo_in(pool: &Path, mnt: &Path) -> CliResult {
    let e = |e: std::io::Error| e.to_string();
    step("create a pool with two volumes (64 KiB tracks)");
    let g = Geometry::new(64 * 1024).expect("valid");
    pool::init(pool, g).map_err(|e| e.to_string())?;
    add_demo_volumes(pool, &[("VOL001", 16), ("VOL002", 16)])?;
    step("mount it and write data sets with ordinary file I/O");
    let pid = mount::mount_daemon(pool, mnt, &demo_mount_options())?;
    println!("mounted {} at {} (daemon pid {pid})", pool.display(), mnt.display());
    let files: [(&str, usize); 6] = [
        ("db/base.dat", 6 << 20),
        ("db/index.dat", 3 << 20),
        ("db/journal", 2 << 20),
        ("logs/app.log", 700 << 10),
        ("notes.txt", 12_345),
        ("big/archive.bin", 12 << 20),
    ];
    for (i, (name, len)) in files.iter().enumerate() {
        if let Some(dir) = Path::new(name).parent() {
            std::fs::create_dir_all(mnt.join(dir)).map_err(e)?;
        }
        let data = pattern(i as u64 + 1, *len);
        let mut f = std::fs::File::create(mnt.join(name)).map_err(e)?;
        // Grow the way applications do: many appends.
        for chunk in data.chunks(256 << 10) {
            f.write_all(chunk).map_err(e)?;
        }
        f.sync_all().map_err(e)?;
        println!("wrote /{name}: {len} bytes (fsync'ed)");
    }
    verify(mnt, &files)?;

    step("applications keep writing: /db/base.dat (held open) and /db/journal (reopened often)");
    let base = DemoWriter::start(mnt.join("db/base.dat"), 1, 6 << 20, false);
    let journal = DemoWriter::start(mnt.join("db/journal"), 3, 2 << 20, true);
    std::thread::sleep(std::time::Duration::from_millis(300));

    step("add a bigger volume to the running mount, while they write");
    println!("$ ferryfs volume add {} VOL003 --size 48M", mnt.display());
    println!("{}", client::send(mnt, &format!("add VOL003 size={}", 48u64 << 20))?);
    println!("\n$ ferryfs ls {} --extents   (before)", mnt.display());
    print_listing(&report::list(&target_catalog(mnt)?, "/").expect("root exists"), true);

    step("merge VOL001 and VOL002 into VOL003: /db/journal with a close cutover, the rest live");
    let line = "migrate /db/journal to VOL003 cutover=close";
    println!("$ echo '{line}' > {}/.ferry/control", mnt.display());
    let r1 = client::send(mnt, line)?;
    println!("{r1}");
    println!("$ ferryfs merge {} VOL001 VOL002 --into VOL003 --wait", mnt.display());
    let r2 = client::send(mnt, "merge VOL001 VOL002 into VOL003 cutover=live")?;
    println!("{r2}");
    let mut started = client::started(&r2);
    started.jobs.extend(client::started(&r1).jobs);
    let waited = client::wait(mnt, &started, Duration::from_secs(10));
    let (base_log, _) = base.stop()?;
    let (journal_log, open_waits) = journal.stop()?;
    waited?;

    step("what the migration did");
    let st = status_of_mount(mnt).ok_or("the mount went away")?;
    println!("{}", String::from_utf8_lossy(&std::fs::read(mnt.join(".ferry/events")).map_err(e)?));
    let mut stalls = Vec::new();
    for j in &st.jobs {
        if let Some(w) = j.window_us {
            println!("close cutover of {}: downtime window {:.3} ms", j.path, w as f64 / 1000.0);
        }
        if let Some(s) = j.stall_us {
            stalls.push((s, j.path.clone()));
        }
    }
    stalls.sort();
    if let (Some(min), Some(max)) = (stalls.first(), stalls.last()) {
        let med = &stalls[stalls.len() / 2];
        println!(
            "live cutovers: {} jobs, writes held {:.3} ms median, {:.3} ms max ({})",
            stalls.len(),
            med.0 as f64 / 1000.0,
            max.0 as f64 / 1000.0,
            max.1
        );
        let _ = min;
    }
    let copied: u64 = st.jobs.iter().map(|j| j.bytes_copied + j.bytes_resynced).sum();
    let busy_s: f64 =
        st.jobs.iter().filter_map(|j| Some((j.ended_ns? - j.started_ns) as f64 / 1e9)).fold(0.0, f64::max);
    let rates: Vec<u64> = st.jobs.iter().map(|j| j.copy_rate_bytes_per_s).collect();
    println!(
        "copied {:.1} MiB in {} jobs; fastest job copied at {:.1} MiB/s; the longest job took {busy_s:.2} s",
        copied as f64 / (1 << 20) as f64,
        st.jobs.len(),
        rates.iter().max().copied().unwrap_or(0) as f64 / (1 << 20) as f64
    );
    println!(
        "the journal writer reopened /db/journal {} times during the merge; the longest open waited {:.3} ms",
        open_waits.len(),
        open_waits.iter().copied().fold(0.0, f64::max)
    );
    println!(
        "blocks rewritten during the merge: /db/base.dat {}, /db/journal {}",
        base_log.iter().filter(|c| **c > 0).count(),
        journal_log.iter().filter(|c| **c > 0).count()
    );
    println!("\n$ ferryfs ls {} --extents   (after)", mnt.display());
    let c = target_catalog(mnt)?;
    let listing = report::list(&c, "/").expect("root exists");
    print_listing(&listing, true);
    if let Some(d) = listing.data_sets.iter().find(|d| d.volumes != ["VOL003"] || d.extent_count != 1) {
        return Err(format!("{} is not in one extent on VOL003 after the merge", d.path).into());
    }
    print_volumes(&report::volumes(&c));

    step("verify every byte: the data sets as written, plus every acknowledged write of the writers");
    verify_demo(mnt, &files, &[("db/base.dat", 1, &base_log), ("db/journal", 3, &journal_log)])?;

    step("retire the emptied volumes");
    for v in ["VOL001", "VOL002"] {
        println!("$ ferryfs volume retire {} {v}", mnt.display());
        println!("{}", client::send(mnt, &format!("retire {v}"))?);
    }
    print_volumes(&report::volumes(&target_catalog(mnt)?));

    step("unmount, remount, verify again, and check the catalog");
    mount::umount(mnt, false)?;
    mount::mount_daemon(pool, mnt, &demo_mount_options())?;
    verify_demo(mnt, &files, &[("db/base.dat", 1, &base_log), ("db/journal", 3, &journal_log)])?;
    mount::umount(mnt, false)?;
    fsck(pool)?;
    println!("\ndemo finished: merged while writing, every byte verified, catalog clean");
    Ok(())
}

fn add_demo_volumes(pool: &Path, vols: &[(&str, u64)]) -> CliResult {
    let mut p = Pool::open(pool).map_err(|e| e.to_string())?;
    for (name, mib) in vols {
        let v = p.add_volume(name, mib << 20, None, false).map_err(|e| e.to_string())?;
        println!("volume {} {} MiB ({} tracks) at {}", v.name, mib, v.free.tracks_total(), v.path);
    }
    Ok(())
}

/// Block size of the demo writers.
const DEMO_BLOCK: usize = 4096;

/// The bytes of write `counter` to block `block` of data set number `file` (0: the bytes the
/// data set was created with).
fn demo_block(file: u64, block: u64, counter: u64) -> Vec<u8> {
    pattern((file << 40) ^ (block << 20) ^ counter ^ 0xD3E0, DEMO_BLOCK)
}

/// An application writing random 4 KiB blocks of a data set, logging each acknowledged write.
/// With `reopen`, it closes and reopens the data set between bursts (as a close-mode cutover
/// needs), timing how long each open takes.
struct DemoWriter {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<Result<WriterLog, String>>,
}

/// What a demo writer did: per block, the counter of its last acknowledged write (0: none);
/// and how long each reopen waited, in milliseconds.
type WriterLog = (Vec<u64>, Vec<f64>);

impl DemoWriter {
    fn start(path: PathBuf, file: u64, len: usize, reopen: bool) -> DemoWriter {
        use std::os::unix::fs::FileExt;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let st = stop.clone();
        let thread = std::thread::spawn(move || {
            let blocks = (len / DEMO_BLOCK) as u64;
            let mut log = vec![0u64; blocks as usize];
            let mut waits = Vec::new();
            let open = || std::fs::OpenOptions::new().read(true).write(true).open(&path);
            let mut f = open().map_err(|e| format!("{}: {e}", path.display()))?;
            let mut x = 0x2545_F491u64 ^ file;
            let mut n = 0u64;
            while !st.load(std::sync::atomic::Ordering::Relaxed) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let b = x % blocks;
                n += 1;
                f.write_all_at(&demo_block(file, b, n), b * DEMO_BLOCK as u64)
                    .map_err(|e| format!("write to {}: {e}", path.display()))?;
                log[b as usize] = n;
                if n % 64 == 0 {
                    std::thread::sleep(std::time::Duration::from_millis(2));
                    if reopen {
                        drop(f);
                        let t = std::time::Instant::now();
                        f = open().map_err(|e| format!("reopen {}: {e}", path.display()))?;
                        waits.push(t.elapsed().as_secs_f64() * 1000.0);
                    }
                }
            }
            Ok((log, waits))
        });
        DemoWriter { stop, thread }
    }

    fn stop(self) -> Result<WriterLog, String> {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.thread.join().map_err(|_| "a writer panicked".to_string())?
    }
}

/// Every data set holds its created bytes, except the blocks the writers overwrote, which
/// hold their last acknowledged write.
fn verify_demo(mnt: &Path, files: &[(&str, usize)], logs: &[(&str, u64, &Vec<u64>)]) -> CliResult {
    for (i, (name, len)) in files.iter().enumerate() {
        let mut want = pattern(i as u64 + 1, *len);
        let mut writes = 0;
        if let Some((_, file, log)) = logs.iter().find(|(n, ..)| n == name) {
            for (b, &c) in log.iter().enumerate() {
                if c > 0 {
                    want[b * DEMO_BLOCK..(b + 1) * DEMO_BLOCK].copy_from_slice(&demo_block(*file, b as u64, c));
                    writes += 1;
                }
            }
        }
        let got = std::fs::read(mnt.join(name)).map_err(|e| format!("{name}: {e}"))?;
        if got != want {
            let at = got.iter().zip(&want).position(|(a, b)| a != b).unwrap_or(got.len().min(want.len()));
            return Err(format!("/{name}: bytes differ from what was written, from byte {at}").into());
        }
        if writes > 0 {
            println!("/{name}: {len} bytes verified ({writes} blocks hold their last acknowledged write)");
        } else {
            println!("/{name}: {len} bytes verified");
        }
    }
    Ok(())
}

fn verify(mnt: &Path, files: &[(&str, usize)]) -> CliResult {
    for (i, (name, len)) in files.iter().enumerate() {
        let want = pattern(i as u64 + 1, *len);
        let got = std::fs::read(mnt.join(name)).map_err(|e| format!("{name}: {e}"))?;
        if got != want {
            return Err(format!("/{name}: bytes differ from what was written").into());
        }
        println!("/{name}: {len} bytes verified");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every argument and flag of every subcommand says what it is in `--help` (and so in
    /// the man pages and the completions).
    #[test]
    fn every_argument_has_a_help_line() {
        fn walk(cmd: &clap::Command, path: &str, missing: &mut Vec<String>) {
            if cmd.get_about().is_none() && !path.is_empty() {
                missing.push(format!("subcommand `{path}`"));
            }
            for arg in cmd.get_arguments() {
                if arg.get_help().is_none() && arg.get_long_help().is_none() {
                    missing.push(format!("`{path}` argument {}", arg.get_id()));
                }
            }
            for sub in cmd.get_subcommands() {
                walk(sub, format!("{path} {}", sub.get_name()).trim(), missing);
            }
        }
        let mut cmd = Cli::command();
        cmd.build();
        let mut missing = Vec::new();
        walk(&cmd, "", &mut missing);
        assert!(missing.is_empty(), "no help line for: {missing:#?}");
        cmd.debug_assert();
    }

    /// docs/cli.md's table says what [`Exit::meaning`] says, code for code.
    #[test]
    fn the_exit_code_table_in_the_docs_matches() {
        let doc = include_str!("../docs/cli.md");
        for e in Exit::ALL {
            let row = format!("| {} | {} |", e.code(), e.meaning());
            assert!(doc.contains(&row), "docs/cli.md lacks the row {row}");
        }
        let rows = doc.lines().filter(|l| l.starts_with("| ") && l[2..].starts_with(|c: char| c.is_ascii_digit()));
        assert_eq!(rows.count(), Exit::ALL.len(), "docs/cli.md has exit codes ferryfs does not");
        assert!(exit_status_help().lines().count() == Exit::ALL.len() + 1);
    }

    #[test]
    fn exit_codes_are_distinct_and_clap_agrees_on_usage() {
        let codes: std::collections::BTreeSet<i32> = Exit::ALL.iter().map(|e| e.code()).collect();
        assert_eq!(codes.len(), Exit::ALL.len());
        let err = Cli::try_parse_from(["ferryfs", "frobnicate"]).unwrap_err();
        assert_eq!(err.exit_code(), Exit::Usage.code());
        let err = Cli::try_parse_from(["ferryfs", "init", "p", "--track-size", "3K"]).unwrap_err();
        assert_eq!(err.exit_code(), Exit::Usage.code());
    }

    #[test]
    fn intervals_parse() {
        assert_eq!(interval_arg("10"), Ok(Duration::from_secs(10)));
        assert_eq!(interval_arg("0.5"), Ok(Duration::from_millis(500)));
        for bad in ["0", "-1", "x", "", "1e9", "NaN", "inf"] {
            assert!(interval_arg(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn roff_text_escapes() {
        assert_eq!(roff_text("a-b \\ c"), "a\\-b \\\\ c");
        assert_eq!(roff_text(".x"), "\\&.x");
    }
}
