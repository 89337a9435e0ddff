//! POSIX ACLs as the catalog stores them: the `system.posix_acl_access` and `_default`
//! attributes, in the kernel's encoding. The kernel parses them and enforces them (the mount
//! asks for FUSE_POSIX_ACL); the catalog keeps an access ACL and the node's permission bits
//! saying the same thing, as every Linux file system does: setting an access ACL sets the
//! bits (the group bits are the mask), and a chmod rewrites the ACL's owner, mask (or
//! group) and other entries. Both happen in [`super::model::Catalog::apply`], so a replay
//! makes the same choice.

/// The POSIX ACL attribute names.
pub const ACL_ACCESS: &[u8] = b"system.posix_acl_access";
pub const ACL_DEFAULT: &[u8] = b"system.posix_acl_default";
/// The kernel's ACL attribute encoding: a u32 version, then entries of (u16 tag, u16 perm,
/// u32 id), little-endian.
pub const ACL_VERSION: u32 = 2;
pub const ACL_HEADER_BYTES: usize = 4;
pub const ACL_ENTRY_BYTES: usize = 8;
pub const ACL_USER_OBJ: u16 = 0x01;
pub const ACL_USER: u16 = 0x02;
pub const ACL_GROUP_OBJ: u16 = 0x04;
pub const ACL_GROUP: u16 = 0x08;
pub const ACL_MASK: u16 = 0x10;
pub const ACL_OTHER: u16 = 0x20;

/// The owner, group-class and other permissions an ACL gives, as mode bits (0o777); `None`
/// for an ACL that does not decode.
pub fn mode_of(acl: &[u8]) -> Option<u32> {
    if !valid(acl) {
        return None;
    }
    let (mut user, mut group, mut mask, mut other) = (0, 0, None, 0);
    for (at, tag) in entries(acl) {
        let p = perm_at(acl, at);
        match tag {
            ACL_USER_OBJ => user = p,
            ACL_GROUP_OBJ => group = p,
            ACL_MASK => mask = Some(p),
            ACL_OTHER => other = p,
            _ => {}
        }
    }
    Some((user << 6) | (mask.unwrap_or(group) << 3) | other)
}

/// The ACL after a chmod to `perm` (the kernel's posix_acl_chmod): the owner, mask (or, with
/// no mask, group) and other entries take the new bits; named entries stay.
pub fn chmod(acl: &[u8], perm: u32) -> Vec<u8> {
    let mut out = acl.to_vec();
    if !valid(acl) {
        return out;
    }
    let has_mask = entries(acl).any(|(_, t)| t == ACL_MASK);
    for (at, tag) in entries(acl) {
        match tag {
            ACL_USER_OBJ => put_perm(&mut out, at, perm >> 6),
            ACL_MASK => put_perm(&mut out, at, perm >> 3),
            ACL_GROUP_OBJ if !has_mask => put_perm(&mut out, at, perm >> 3),
            ACL_OTHER => put_perm(&mut out, at, perm),
            _ => {}
        }
    }
    out
}

fn perm_at(acl: &[u8], at: usize) -> u32 {
    u32::from(u16::from_le_bytes([acl[at], acl[at + 1]]))
}

fn put_perm(acl: &mut [u8], at: usize, perm: u32) {
    acl[at..at + 2].copy_from_slice(&((perm & 0o7) as u16).to_le_bytes());
}

/// An ACL attribute in the kernel's encoding, with the three entries every ACL has.
pub fn valid(b: &[u8]) -> bool {
    b.len() >= ACL_HEADER_BYTES
        && (b.len() - ACL_HEADER_BYTES) % ACL_ENTRY_BYTES == 0
        && u32::from_le_bytes([b[0], b[1], b[2], b[3]]) == ACL_VERSION
        && [ACL_USER_OBJ, ACL_GROUP_OBJ, ACL_OTHER].iter().all(|t| entries(b).any(|(_, tag)| tag == *t))
}

/// (byte offset of the perm field, tag) of each entry.
pub fn entries(b: &[u8]) -> impl Iterator<Item = (usize, u16)> + '_ {
    b[ACL_HEADER_BYTES..]
        .chunks_exact(ACL_ENTRY_BYTES)
        .enumerate()
        .map(|(i, e)| (ACL_HEADER_BYTES + i * ACL_ENTRY_BYTES + 2, u16::from_le_bytes([e[0], e[1]])))
}

/// Mask an inherited ACL with the requested mode, and the mode with the ACL (the kernel's
/// posix_acl_create_masq). Returns the new permission bits and whether the ACL says more
/// than they can (named entries or a mask).
pub fn create_masq(acl: &mut [u8], perm: u32) -> (u32, bool) {
    let mut mode = perm & 0o777;
    let mut extended = false;
    let (mut group_obj, mut mask) = (None, None);
    let entries: Vec<(usize, u16)> = entries(acl).collect();
    for (at, tag) in entries {
        match tag {
            ACL_USER_OBJ => {
                let p = perm_at(acl, at) & (mode >> 6);
                put_perm(acl, at, p);
                mode &= (p << 6) | !0o700;
            }
            ACL_USER | ACL_GROUP => extended = true,
            ACL_GROUP_OBJ => group_obj = Some(at),
            ACL_OTHER => {
                let p = perm_at(acl, at) & mode;
                put_perm(acl, at, p);
                mode &= p | !0o007;
            }
            ACL_MASK => {
                mask = Some(at);
                extended = true;
            }
            _ => {}
        }
    }
    if let Some(at) = mask.or(group_obj) {
        let p = perm_at(acl, at) & (mode >> 3);
        put_perm(acl, at, p);
        mode &= (p << 3) | !0o070;
    }
    ((perm & !0o777) | (mode & 0o777), extended)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// An ACL's xattr bytes from (tag, perm, id) entries.
    pub(crate) fn acl(entries: &[(u16, u16, u32)]) -> Vec<u8> {
        let mut b = ACL_VERSION.to_le_bytes().to_vec();
        for (tag, perm, id) in entries {
            b.extend_from_slice(&tag.to_le_bytes());
            b.extend_from_slice(&perm.to_le_bytes());
            b.extend_from_slice(&id.to_le_bytes());
        }
        b
    }

    #[test]
    fn mode_and_chmod_agree() {
        let u = u32::MAX;
        let a = acl(&[
            (ACL_USER_OBJ, 6, u),
            (ACL_USER, 4, 65534),
            (ACL_GROUP_OBJ, 0, u),
            (ACL_MASK, 4, u),
            (ACL_OTHER, 0, u),
        ]);
        assert_eq!(mode_of(&a), Some(0o640), "the group bits are the mask");
        let b = chmod(&a, 0o705);
        assert_eq!(mode_of(&b), Some(0o705));
        assert_eq!(
            b,
            acl(&[
                (ACL_USER_OBJ, 7, u),
                (ACL_USER, 4, 65534),
                (ACL_GROUP_OBJ, 0, u),
                (ACL_MASK, 0, u),
                (ACL_OTHER, 5, u)
            ])
        );
        assert_eq!(mode_of(b"junk"), None);
    }
}
