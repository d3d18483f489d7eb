//! Status codes on the wire and the errno each one means to the block layer.

pub use crate::pb::Status;

// Linux errno values (asm-generic/errno-base.h, errno.h). This crate does no
// I/O and so does not link libc; a test checks these against libc.
const EPERM: i32 = 1;
const ENOENT: i32 = 2;
const EIO: i32 = 5;
const EAGAIN: i32 = 11;
const EINVAL: i32 = 22;
const ENOSPC: i32 = 28;
const ERANGE: i32 = 34;
const EOPNOTSUPP: i32 = 95;
const ETIMEDOUT: i32 = 110;
const ESTALE: i32 = 116;

/// The errno a status means (positive), or 0 for [`Status::Ok`].
///
/// A raw value this side does not know is an I/O error: a newer peer's new
/// code must never read as success.
pub fn errno_of_status(raw: i32) -> i32 {
    match Status::try_from(raw) {
        Ok(Status::Ok) => 0,
        Ok(Status::IoError) | Err(_) => EIO,
        Ok(Status::NoSpace) => ENOSPC,
        Ok(Status::Invalid) => EINVAL,
        Ok(Status::NotSupported) => EOPNOTSUPP,
        Ok(Status::OutOfRange) => ERANGE,
        Ok(Status::Busy) => EAGAIN,
        Ok(Status::TimedOut) => ETIMEDOUT,
        Ok(Status::Refused) => EPERM,
        Ok(Status::NotFound) => ENOENT,
        // Retried by the client; what is left after its retries is EIO.
        Ok(Status::DigestMismatch) => EIO,
        Ok(Status::Conflict) => ESTALE,
    }
}

/// The status that best reports an errno (positive) to a peer.
pub fn status_of_errno(errno: i32) -> Status {
    match errno {
        0 => Status::Ok,
        ENOSPC => Status::NoSpace,
        EINVAL => Status::Invalid,
        EOPNOTSUPP => Status::NotSupported,
        ERANGE => Status::OutOfRange,
        EAGAIN => Status::Busy,
        ETIMEDOUT => Status::TimedOut,
        EPERM => Status::Refused,
        ENOENT => Status::NotFound,
        ESTALE => Status::Conflict,
        _ => Status::IoError,
    }
}
