//! ferryfs as mount(8)'s and umount(8)'s helper. For a file system of type `fuse.ferryfs`
//! (`mount -t fuse.ferryfs POOL MNT -o OPTS`, or an /etc/fstab line), mount(8) runs
//! `/sbin/mount.fuse.ferryfs POOL MNT [-sfnv] [-N NS] [-o OPTS] [-t TYPE]`, and umount(8)
//! runs `/sbin/umount.fuse.ferryfs MNT [-flnrv] [-N NS] [-t TYPE]`. Both are links to the
//! ferryfs binary (scripts/install.sh puts them in place); the name it is run as says which.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use crate::cli::{Cli, Cmd};
use crate::mount::MountOptions;

pub const MOUNT_HELPER: &str = "mount.fuse.ferryfs";
pub const UMOUNT_HELPER: &str = "umount.fuse.ferryfs";

/// The command line of a helper, as the command it stands for; None when run as `ferryfs`.
pub fn personality(args: &[OsString]) -> Option<Result<Cli, String>> {
    let name = Path::new(args.first()?).file_name()?.to_string_lossy().into_owned();
    match name.as_str() {
        MOUNT_HELPER => Some(mount_args(&args[1..])),
        UMOUNT_HELPER => Some(umount_args(&args[1..])),
        _ => None,
    }
}

/// Split flags from operands: `-o OPTS` and `-oOPTS`, `-N NS`, `-t TYPE`, and letter flags
/// (`-sfnv`, `-flnrv`), in any order.
struct HelperArgs {
    operands: Vec<OsString>,
    flags: String,
    options: Vec<String>,
}

fn split(args: &[OsString]) -> Result<HelperArgs, String> {
    let mut h = HelperArgs { operands: Vec::new(), flags: String::new(), options: Vec::new() };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let s = a.to_string_lossy();
        let mut value =
            |what: &str| it.next().map(|v| v.to_string_lossy().into_owned()).ok_or_else(|| format!("{s} needs {what}"));
        match s.as_ref() {
            "-o" => h.options.push(value("a list of options")?),
            "-N" => return Err("mount namespaces (-N) are not supported; run the helper inside the namespace".into()),
            "-t" => {
                let t = value("a type")?;
                if t != crate::mounts::FSTYPE {
                    return Err(format!("type {t}: this helper mounts {}", crate::mounts::FSTYPE));
                }
            }
            o if o.starts_with("-o") => h.options.push(o[2..].to_string()),
            f if f.starts_with('-') && f.len() > 1 => h.flags.push_str(&f[1..]),
            _ => h.operands.push(a.clone()),
        }
    }
    Ok(h)
}

fn mount_args(args: &[OsString]) -> Result<Cli, String> {
    let h = split(args)?;
    let [pool, mountpoint] = &h.operands[..] else {
        return Err(format!("usage: {MOUNT_HELPER} POOL MOUNTPOINT [-sfnv] [-o OPTIONS]"));
    };
    if let Some(bad) = h.flags.chars().find(|c| !"sfnvwr".contains(*c)) {
        return Err(format!("{MOUNT_HELPER}: unknown flag -{bad}"));
    }
    // -r and -w are mount(8)'s spellings of -o ro and -o rw.
    let mut options = h.options;
    for (flag, opt) in [('r', "ro"), ('w', "rw")] {
        if h.flags.contains(flag) {
            options.push(opt.into());
        }
    }
    let defaults = MountOptions::default();
    Ok(Cli {
        cmd: Cmd::Mount {
            pool: PathBuf::from(pool),
            mountpoint: PathBuf::from(mountpoint),
            foreground: false,
            threads: defaults.threads,
            max_jobs: defaults.max_jobs,
            copy_rate: defaults.copy_rate,
            options,
            sloppy: h.flags.contains('s'),
            fake: h.flags.contains('f'),
        },
    })
}

fn umount_args(args: &[OsString]) -> Result<Cli, String> {
    let h = split(args)?;
    let [mountpoint] = &h.operands[..] else {
        return Err(format!("usage: {UMOUNT_HELPER} MOUNTPOINT [-flnrv]"));
    };
    if let Some(bad) = h.flags.chars().find(|c| !"flnrv".contains(*c)) {
        return Err(format!("{UMOUNT_HELPER}: unknown flag -{bad}"));
    }
    Ok(Cli { cmd: Cmd::Umount { mountpoint: PathBuf::from(mountpoint), lazy: h.flags.contains('l') } })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(a: &[&str]) -> Vec<OsString> {
        a.iter().map(OsString::from).collect()
    }

    #[test]
    fn mount_helper_arguments() {
        let cli =
            personality(&args(&["/sbin/mount.fuse.ferryfs", "/srv/p", "/mnt/a b", "-n", "-o", "ro,nofail", "-s"]))
                .unwrap()
                .unwrap();
        match cli.cmd {
            Cmd::Mount { pool, mountpoint, options, sloppy, fake, foreground, .. } => {
                assert_eq!((pool, mountpoint), (PathBuf::from("/srv/p"), PathBuf::from("/mnt/a b")));
                assert_eq!(options, vec!["ro,nofail".to_string()]);
                assert!(sloppy && !fake && !foreground);
            }
            c => panic!("{c:?}"),
        }
        let cli = personality(&args(&["mount.fuse.ferryfs", "-fv", "p", "m", "-othreads=2", "-t", "fuse.ferryfs"]))
            .unwrap()
            .unwrap();
        assert!(matches!(cli.cmd, Cmd::Mount { fake: true, ref options, .. } if options == &["threads=2"]));
        let e = personality(&args(&["mount.fuse.ferryfs", "p"])).unwrap().unwrap_err();
        assert!(e.starts_with("usage: mount.fuse.ferryfs POOL MOUNTPOINT"), "{e}");
        let e = personality(&args(&["mount.fuse.ferryfs", "p", "m", "-t", "fuse.sshfs"])).unwrap().unwrap_err();
        assert!(e.contains("this helper mounts fuse.ferryfs"), "{e}");
    }

    #[test]
    fn umount_helper_arguments() {
        let cli = personality(&args(&["/sbin/umount.fuse.ferryfs", "/mnt/x", "-l", "-n"])).unwrap().unwrap();
        assert!(matches!(cli.cmd, Cmd::Umount { lazy: true, ref mountpoint } if mountpoint == Path::new("/mnt/x")));
        assert!(personality(&args(&["ferryfs", "ls"])).is_none());
    }
}
