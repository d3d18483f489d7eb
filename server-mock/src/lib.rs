//! `netblk-mock-node`: a storage node that speaks the netblk wire protocol,
//! for tests, demos and benchmarks.
//!
//! - [`Server`]: binds, accepts, serves data connections on a few worker
//!   threads (epoll; `reactor`), and shuts down gracefully
//!   ([`ShutdownHandle`]).
//! - `store`: sparse memory and directory stores.
//! - `faults`: latency, errors, dropped connections, stalls, corrupted
//!   replies and crashes, changed at run time over the admin protocol.
//! - `policy`: which clients may open, resize and delete which volumes.

mod activity;
mod conn;
mod delay;
mod exec;
pub mod faults;
mod fence;
mod frames;
mod inquiry;
mod missed;
mod node;
mod peer;
pub mod policy;
mod reactor;
mod reply;
pub mod store;

pub use node::{Broken, CRASH_EXIT_CODE, Config, Server, ShutdownHandle};
pub use store::StoreKind;

pub use netblk_protocol::units::parse_size;
