//! Everything that touches `/dev/ublk*`: the kernel UAPI ([`sys`]) and the
//! control device ([`ctrl`]). The queue side (FETCH / COMMIT_AND_FETCH in
//! each queue's ring) comes with the ublk frontend.

pub mod ctrl;
pub mod device;
pub mod queue;
pub mod sys;
