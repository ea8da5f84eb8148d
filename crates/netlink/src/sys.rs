//! Socket options that `netlink-sys` does not expose: the only unsafe code in this crate.
//!
//! Every wait on the kernel is bounded (`SO_RCVTIMEO`, `SO_SNDTIMEO`), and the buffers are
//! sized for a whole batch of requests and of error replies.
#![allow(unsafe_code)]

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::time::Duration;

/// Bounds every blocking receive (`SO_RCVTIMEO`) or send (`SO_SNDTIMEO`) on `fd`: it fails
/// with `EAGAIN` once `timeout` has passed.
pub(crate) fn set_timeout(
    fd: BorrowedFd<'_>,
    name: libc::c_int,
    timeout: Duration,
) -> io::Result<()> {
    let tv = libc::timeval {
        tv_sec: libc::time_t::try_from(timeout.as_secs()).unwrap_or(libc::time_t::MAX),
        tv_usec: libc::suseconds_t::from(timeout.subsec_micros().min(999_999).cast_signed()),
    };
    set_option(fd, name, &tv)
}

/// Sets an integer socket option (`SO_RCVBUF`, `SO_RCVBUFFORCE`, `SO_SNDBUF`).
pub(crate) fn set_int(fd: BorrowedFd<'_>, name: libc::c_int, value: usize) -> io::Result<()> {
    let value = libc::c_int::try_from(value).unwrap_or(libc::c_int::MAX);
    set_option(fd, name, &value)
}

/// Reads an integer socket option back (what the kernel granted).
pub(crate) fn get_int(fd: BorrowedFd<'_>, name: libc::c_int) -> io::Result<usize> {
    let mut value: libc::c_int = 0;
    let mut len = libc::socklen_t::try_from(size_of::<libc::c_int>())
        .map_err(|_| io::ErrorKind::InvalidInput)?;
    // SAFETY: `fd` is a live socket for the duration of the borrow; `value` and `len` are
    // valid for writes of the sizes given, and the kernel writes at most `len` bytes.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            name,
            std::ptr::from_mut(&mut value).cast(),
            &raw mut len,
        )
    };
    if rc == 0 {
        Ok(usize::try_from(value).unwrap_or(0))
    } else {
        Err(io::Error::last_os_error())
    }
}

fn set_option<T>(fd: BorrowedFd<'_>, name: libc::c_int, value: &T) -> io::Result<()> {
    let len = libc::socklen_t::try_from(size_of::<T>()).map_err(|_| io::ErrorKind::InvalidInput)?;
    // SAFETY: `fd` is a live socket for the duration of the borrow; `value` points to an
    // initialised `T` of exactly `len` bytes that the kernel only reads.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            name,
            std::ptr::from_ref(value).cast(),
            len,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}
