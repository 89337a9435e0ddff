use std::io;
use std::os::fd::AsFd;
use std::os::fd::BorrowedFd;
use std::sync::Arc;

use nix::errno::Errno as NixErrno;

use crate::Errno;
use crate::dev_fuse::DevFuse;
use crate::ll;
use crate::ll::reply::Response;
use crate::passthrough::BackingId;

/// A raw communication channel to the FUSE kernel driver
#[derive(Debug, Clone)]
pub(crate) struct Channel(Arc<DevFuse>);

impl AsFd for Channel {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.0.as_fd()
    }
}

impl Channel {
    /// Create a new communication channel to the kernel driver by mounting the
    /// given path. The kernel driver will delegate filesystem operations of
    /// the given path to the channel.
    pub(crate) fn new(device: Arc<DevFuse>) -> Self {
        Self(device)
    }

    /// Receives data up to the capacity of the given buffer (can block).
    fn receive(&self, buffer: &mut [u8]) -> nix::Result<usize> {
        nix::unistd::read(&self.0, buffer)
    }

    /// Receives data up to the capacity of the given buffer (can block),
    /// retrying on errors that are safe to retry (ENOENT, EINTR, EAGAIN).
    ///
    /// - ENOENT: Operation interrupted. According to FUSE, this is safe to retry.
    /// - EINTR: Interrupted system call, retry.
    /// - EAGAIN: Explicitly instructed to try again.
    pub(crate) fn receive_retrying(&self, buffer: &mut [u8]) -> nix::Result<usize> {
        loop {
            match self.receive(buffer) {
                Ok(size) => return Ok(size),
                Err(NixErrno::ENOENT | NixErrno::EINTR | NixErrno::EAGAIN) => continue,
                Err(err) => return Err(err),
            }
        }
    }

    /// Returns a sender object for this channel. The sender object can be
    /// used to send to the channel. Multiple sender objects can be used
    /// and they can safely be sent to other threads.
    pub(crate) fn sender(&self) -> ChannelSender {
        // Since write/writev syscalls are threadsafe, we can simply create
        // a sender by using the same file and use it in other threads.
        ChannelSender { dev: self.0.clone(), ring: None }
    }

    /// A sender whose reply goes back through the io_uring entry that carried the request
    /// (uring.rs); anything else it sends (backing files) goes through this channel.
    #[cfg(target_os = "linux")]
    pub(crate) fn ring_sender(&self, slot: crate::uring::RingSlot) -> ChannelSender {
        ChannelSender { dev: self.0.clone(), ring: Some(slot) }
    }

    /// Clone the FUSE device fd using FUSE_DEV_IOC_CLONE ioctl.
    ///
    /// This creates a new fd that can read FUSE requests independently,
    /// enabling true parallel request processing. The kernel distributes
    /// requests across all cloned fds.
    ///
    /// Requires Linux 4.5+. Returns an error on older kernels or non-Linux.
    #[cfg(target_os = "linux")]
    pub(crate) fn clone_fd(&self) -> io::Result<Channel> {
        use std::os::fd::AsRawFd;

        let new_dev = DevFuse::open()?;

        let mut source_fd = self.0.as_raw_fd() as u32;
        // SAFETY: fuse_dev_ioc_clone is a valid ioctl for /dev/fuse
        unsafe {
            crate::ll::ioctl::fuse_dev_ioc_clone(new_dev.as_raw_fd(), &mut source_fd)?;
        }

        Ok(Channel::new(Arc::new(new_dev)))
    }
}

#[derive(Clone, Debug)]
pub(crate) struct ChannelSender {
    dev: Arc<DevFuse>,
    /// Set for the reply to a request that came through an io_uring entry.
    #[cfg(target_os = "linux")]
    ring: Option<crate::uring::RingSlot>,
    #[cfg(not(target_os = "linux"))]
    ring: Option<std::convert::Infallible>,
}

impl ChannelSender {
    pub(crate) fn send(&self, bufs: &[io::IoSlice<'_>]) -> io::Result<()> {
        #[cfg(target_os = "linux")]
        if let Some(slot) = &self.ring {
            return slot.reply(bufs);
        }
        let rc = nix::sys::uio::writev(&self.dev, bufs)?;
        // writev is atomic, so do not need to check how many bytes are written.
        // libfuse does not do it either
        // https://github.com/libfuse/libfuse/blob/6278995cca991978abd25ebb2c20ebd3fc9e8a13/lib/fuse_lowlevel.c#L267
        debug_assert_eq!(bufs.iter().map(|b| b.len()).sum::<usize>(), rc);
        Ok(())
    }

    /// Send a reply of at most `max` bytes that `fill` writes: into the io_uring entry's
    /// payload where it can (no copy), else into a buffer this thread keeps between replies
    /// (no allocation, no zeroing), sent with `writev(2)` or handed to the entry.
    pub(crate) fn send_filled<F>(&self, unique: ll::RequestId, max: usize, fill: F) -> io::Result<()>
    where
        F: FnOnce(&mut [u8]) -> Result<usize, Errno>,
    {
        #[cfg(target_os = "linux")]
        let fill = match &self.ring {
            Some(slot) => match slot.reply_filled(unique, max, fill) {
                Ok(sent) => return sent,
                Err(fill) => fill,
            },
            None => fill,
        };
        thread_local! {
            static REPLY_BUF: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
        }
        REPLY_BUF.with(|b| {
            let mut b = b.borrow_mut();
            if b.len() < max {
                b.resize(max, 0);
            }
            match fill(&mut b[..max]) {
                Ok(n) => ll::ResponseSlice(&b[..n.min(max)]).with_iovec(unique, |iov| self.send(iov)),
                Err(e) => ll::ResponseErrno(e).with_iovec(unique, |iov| self.send(iov)),
            }
        })
    }

    pub(crate) fn open_backing(&self, fd: BorrowedFd<'_>) -> std::io::Result<BackingId> {
        BackingId::create(&self.dev, fd)
    }

    pub(crate) unsafe fn wrap_backing(&self, id: u32) -> BackingId {
        unsafe { BackingId::wrap_raw(&self.dev, id) }
    }
}
