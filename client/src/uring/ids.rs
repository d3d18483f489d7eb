//! User data of the ring's operations: what a completion is for.

// user_data: kind in the top byte, connection index below it, detail below that.
pub(super) const K_HEAD: u64 = 1;
pub(super) const K_DATA: u64 = 2;
pub(super) const K_RECV: u64 = 3;
pub(super) const K_RECV_PAYLOAD: u64 = 4;
pub(super) const K_WAKE: u64 = 5;
pub(super) const K_CANCEL: u64 = 6;
pub(super) const K_FRONTEND: u64 = 7;
pub(super) const K_VEC: u64 = 8;

/// The connection field of user data: node index (12 bits) and the
/// connection's generation (4 bits), so that a completion from a connection
/// that was replaced is never taken for one of its successor's.
pub(super) fn conn_id(node: usize, generation: u8) -> usize {
    (usize::from(generation & 0xf) << 12) | (node & 0xfff)
}

pub(super) fn user_data(kind: u64, conn: usize, detail: u64) -> u64 {
    (kind << 56) | ((conn as u64 & 0xffff) << 40) | (detail & 0xff_ffff_ffff)
}

pub(super) fn split_user_data(ud: u64) -> (u64, usize, u64) {
    (
        ud >> 56,
        ((ud >> 40) & 0xffff) as usize,
        ud & 0xff_ffff_ffff,
    )
}
