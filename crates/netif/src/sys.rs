//! Socket options that `netlink-sys` does not expose: the only unsafe code in this crate.
//!
//! Every wait on the kernel is bounded (`SO_RCVTIMEO`), and the receive buffer is made large
//! enough for a whole batch of error replies (`SO_RCVBUFFORCE`, root only, else `SO_RCVBUF`).
#![allow(unsafe_code)]

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::time::Duration;

/// Bounds every blocking `recv` on `fd`: it fails with `EAGAIN` once `timeout` has passed.
pub(crate) fn set_receive_timeout(fd: BorrowedFd<'_>, timeout: Duration) -> io::Result<()> {
    let tv = libc::timeval {
        tv_sec: libc::time_t::try_from(timeout.as_secs()).unwrap_or(libc::time_t::MAX),
        tv_usec: libc::suseconds_t::from(timeout.subsec_micros().min(999_999).cast_signed()),
    };
    set_option(fd, libc::SO_RCVTIMEO, &tv)
}

/// Sets the receive buffer past `net.core.rmem_max` (needs CAP_NET_ADMIN, which this crate
/// needs anyway); falls back to the capped `SO_RCVBUF` without it.
pub(crate) fn set_receive_buffer(fd: BorrowedFd<'_>, bytes: usize) -> io::Result<()> {
    let bytes = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX);
    set_option(fd, libc::SO_RCVBUFFORCE, &bytes)
        .or_else(|_| set_option(fd, libc::SO_RCVBUF, &bytes))
}

/// Sets `SO_RCVBUF` as given (the kernel doubles it and applies its minimum).
#[cfg(test)]
pub(crate) fn set_receive_buffer_exact(fd: BorrowedFd<'_>, bytes: libc::c_int) -> io::Result<()> {
    set_option(fd, libc::SO_RCVBUF, &bytes)
}

fn set_option<T>(fd: BorrowedFd<'_>, name: libc::c_int, value: &T) -> io::Result<()> {
    let len = libc::socklen_t::try_from(size_of::<T>()).map_err(|_| io::ErrorKind::InvalidInput)?;
    // SAFETY: `fd` is a live socket for the duration of the borrow; `value` points to a
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
