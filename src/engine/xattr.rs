//! Extended attributes: a node's name -> value map in the catalog, with Linux's limits and
//! errors. Each change is one log frame written before the reply, like a setattr; an fsync of
//! the file (or of any file or directory of the mount) makes it durable.
//!
//! The kernel checks who may touch which namespace before a request reaches us (`trusted.*`
//! needs CAP_SYS_ADMIN, `user.*` lives only on regular files and directories, and with the
//! mount's `default_permissions` it checks the node's permissions). With FUSE_POSIX_ACL it
//! also parses, validates and enforces `system.posix_acl_access` and `_default`: here they
//! are stored bytes like any other attribute.

use super::{Engine, Error, Result};
use crate::catalog::acl;
use crate::catalog::model::{
    now_ns, xattr_bytes, xattr_list_bytes, xattr_name_valid, Ino, NewKind, Op, Xattrs, XATTR_LIST_MAX_BYTES,
    XATTR_NAME_MAX_BYTES, XATTR_NODE_MAX_BYTES, XATTR_PREFIXES, XATTR_SYSTEM_NAMES, XATTR_VALUE_MAX_BYTES,
};

/// setxattr(2) flags, as the kernel passes them.
pub const XATTR_CREATE: i32 = libc::XATTR_CREATE;
pub const XATTR_REPLACE: i32 = libc::XATTR_REPLACE;

/// A name the catalog may hold, or the error Linux gives for it: ERANGE for a name over
/// XATTR_NAME_MAX (the kernel refuses longer ones itself), EOPNOTSUPP for a namespace we
/// don't store, EINVAL for a prefix with nothing after it.
fn check_xattr_name(name: &[u8]) -> Result<&[u8]> {
    if name.len() > XATTR_NAME_MAX_BYTES {
        return Err(Error::OutOfRange);
    }
    if xattr_name_valid(name) {
        return Ok(name);
    }
    if XATTR_PREFIXES.iter().any(|p| name == p.as_bytes()) {
        return Err(Error::Invalid);
    }
    Err(Error::NotSupported)
}

impl Engine {
    /// The value of attribute `name` of `ino`.
    pub fn getxattr(&self, ino: Ino, name: &[u8]) -> Result<Vec<u8>> {
        let name = check_xattr_name(name)?;
        let cat = self.catalog.lock();
        cat.catalog.get(ino).ok_or(Error::NotFound)?;
        cat.catalog.xattrs.get(&ino).and_then(|x| x.get(name)).cloned().ok_or(Error::NoData)
    }

    /// The names of `ino`'s attributes, each followed by a NUL, as listxattr(2) returns them.
    pub fn listxattr(&self, ino: Ino) -> Result<Vec<u8>> {
        let cat = self.catalog.lock();
        cat.catalog.get(ino).ok_or(Error::NotFound)?;
        let mut out = Vec::new();
        for name in cat.catalog.xattrs.get(&ino).into_iter().flat_map(|x| x.keys()) {
            out.extend_from_slice(name);
            out.push(0);
        }
        Ok(out)
    }

    /// setxattr(2): `flags` is 0, [`XATTR_CREATE`] (EEXIST if it exists) or
    /// [`XATTR_REPLACE`] (ENODATA if it does not).
    pub fn setxattr(&self, ino: Ino, name: &[u8], value: &[u8], flags: i32) -> Result<()> {
        let name = check_xattr_name(name)?;
        if value.len() > XATTR_VALUE_MAX_BYTES {
            return Err(Error::TooBig);
        }
        if flags & !(XATTR_CREATE | XATTR_REPLACE) != 0 || flags == XATTR_CREATE | XATTR_REPLACE {
            return Err(Error::Invalid);
        }
        let mut cat = self.catalog.lock();
        cat.catalog.get(ino).ok_or(Error::NotFound)?;
        let empty = Default::default();
        let have = cat.catalog.xattrs.get(&ino).unwrap_or(&empty);
        let old = have.get(name);
        match (old, flags) {
            (Some(_), XATTR_CREATE) => return Err(Error::Exists),
            (None, XATTR_REPLACE) => return Err(Error::NoData),
            _ => {}
        }
        let old_bytes = old.map_or(0, |v| name.len() + 1 + v.len());
        let new_bytes = xattr_bytes(have) - old_bytes + name.len() + 1 + value.len();
        let new_list = xattr_list_bytes(have) + if old.is_some() { 0 } else { name.len() + 1 };
        if new_bytes > XATTR_NODE_MAX_BYTES || new_list > XATTR_LIST_MAX_BYTES {
            return Err(Error::XattrFull);
        }
        self.commit(&mut cat, Op::SetXattr { ino, name: name.to_vec(), value: value.to_vec(), ctime_ns: now_ns() })?;
        drop(cat);
        if name == super::node::CAPABILITY_XATTR {
            self.may_be_privileged(ino);
        }
        Ok(())
    }

    /// removexattr(2).
    pub fn removexattr(&self, ino: Ino, name: &[u8]) -> Result<()> {
        let name = check_xattr_name(name)?;
        let mut cat = self.catalog.lock();
        cat.catalog.get(ino).ok_or(Error::NotFound)?;
        if !cat.catalog.xattrs.get(&ino).is_some_and(|x| x.contains_key(name)) {
            return Err(Error::NoData);
        }
        self.commit(&mut cat, Op::RemoveXattr { ino, name: name.to_vec(), ctime_ns: now_ns() })?;
        Ok(())
    }
}

/// Is `name` one of the POSIX ACL attributes?
pub fn is_acl_name(name: &[u8]) -> bool {
    XATTR_SYSTEM_NAMES.iter().any(|n| n.as_bytes() == name)
}

/// A new node's permission bits and first attributes, as Linux makes them (posix_acl_create):
/// in a directory with a default ACL the umask is ignored, the node's access ACL is the
/// default ACL masked by the requested mode (kept only when the mode can't say it all), and
/// a new directory inherits the default ACL too. Elsewhere the umask applies. A symlink
/// takes neither.
pub fn inherit(parent: Option<&Xattrs>, perm: u32, umask: u32, kind: &NewKind) -> (u32, Xattrs) {
    let mut xattrs = Xattrs::new();
    if matches!(kind, NewKind::Symlink { .. }) {
        return (perm, xattrs);
    }
    let Some(default) = parent.and_then(|x| x.get(acl::ACL_DEFAULT)).filter(|d| acl::valid(d)) else {
        return (perm & !umask, xattrs);
    };
    let mut access = default.clone();
    let (perm, extended) = acl::create_masq(&mut access, perm);
    if extended {
        xattrs.insert(acl::ACL_ACCESS.to_vec(), access);
    }
    if matches!(kind, NewKind::Dir) {
        xattrs.insert(acl::ACL_DEFAULT.to_vec(), default.clone());
    }
    (perm, xattrs)
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::catalog::acl::tests::acl;
    use crate::catalog::acl::{ACL_GROUP_OBJ, ACL_MASK, ACL_OTHER, ACL_USER, ACL_USER_OBJ};

    #[test]
    fn a_default_acl_is_inherited_masked_by_the_mode() {
        let u = u32::MAX;
        let default = acl(&[
            (ACL_USER_OBJ, 7, u),
            (ACL_USER, 6, 65534),
            (ACL_GROUP_OBJ, 5, u),
            (ACL_MASK, 7, u),
            (ACL_OTHER, 5, u),
        ]);
        let parent: Xattrs = [(acl::ACL_DEFAULT.to_vec(), default.clone())].into();
        let (perm, x) = inherit(Some(&parent), 0o640, 0o077, &NewKind::File);
        assert_eq!(perm, 0o640, "the umask does not apply under a default ACL");
        let want = acl(&[
            (ACL_USER_OBJ, 6, u),
            (ACL_USER, 6, 65534),
            (ACL_GROUP_OBJ, 5, u),
            (ACL_MASK, 4, u),
            (ACL_OTHER, 0, u),
        ]);
        assert_eq!(x.get(acl::ACL_ACCESS), Some(&want));
        assert!(!x.contains_key(acl::ACL_DEFAULT), "a file has no default ACL");
        let (_, x) = inherit(Some(&parent), 0o755, 0o022, &NewKind::Dir);
        assert_eq!(x.get(acl::ACL_DEFAULT), Some(&default), "a directory passes it on");
        assert_eq!(inherit(None, 0o666, 0o022, &NewKind::File), (0o644, Xattrs::new()));
        let minimal: Xattrs =
            [(acl::ACL_DEFAULT.to_vec(), acl(&[(ACL_USER_OBJ, 7, u), (ACL_GROUP_OBJ, 0, u), (ACL_OTHER, 0, u)]))]
                .into();
        assert_eq!(
            inherit(Some(&minimal), 0o666, 0o022, &NewKind::File),
            (0o600, Xattrs::new()),
            "no access ACL when the mode says it all"
        );
    }

    #[test]
    fn names_follow_the_namespaces() {
        assert!(check_xattr_name(b"user.a").is_ok());
        assert!(check_xattr_name(b"trusted.x").is_ok());
        assert!(check_xattr_name(b"security.capability").is_ok());
        assert!(check_xattr_name(b"system.posix_acl_access").is_ok());
        assert!(matches!(check_xattr_name(b"system.other"), Err(Error::NotSupported)));
        assert!(matches!(check_xattr_name(b"os2.x"), Err(Error::NotSupported)));
        assert!(matches!(check_xattr_name(b"user."), Err(Error::Invalid)));
        let long = [b"user.".to_vec(), vec![b'a'; 251]].concat();
        assert!(matches!(check_xattr_name(&long), Err(Error::OutOfRange)));
        assert!(check_xattr_name(&long[..255]).is_ok());
    }
}
