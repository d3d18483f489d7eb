//! `netblk-mock-node`: a storage node that speaks the netblk wire protocol,
//! for tests, demos and benchmarks.
//!
//! - [`Server`]: binds, accepts, serves one thread per connection, and shuts
//!   down gracefully ([`ShutdownHandle`]).
//! - `store`: sparse memory and directory stores.
//! - `faults`: latency, errors, dropped connections, stalls, corrupted
//!   replies and crashes, changed at run time over the admin protocol.
//! - `policy`: which clients may open, resize and delete which volumes.

mod activity;
mod conn;
mod delay;
pub mod faults;
mod fence;
mod missed;
mod node;
mod peer;
pub mod policy;
pub mod store;

pub use node::{Broken, CRASH_EXIT_CODE, Config, Server, ShutdownHandle};
pub use store::StoreKind;

pub use netblk_protocol::units::parse_size;
