//! The netblk client library.
//!
//! - [`layout`]: volume geometry, byte range -> pieces per node.
//! - [`engine`]: the sans-IO request engine (no sockets, rings or clock).

pub mod activity;
pub mod bench;
pub mod config;
pub mod control;
pub mod engine;
pub mod epochs;
pub mod frontend;
pub mod inquiry;
pub mod layout;
pub mod ledger;
pub mod manage;
pub mod membership;
pub mod mock;
pub mod net;
pub mod notify;
pub mod openers;
pub mod placement;
pub mod pool;
pub mod pooled;
pub mod reconcile;
pub mod record_lock;
pub mod records;
pub mod recv;
pub mod regions;
pub mod replicas;
pub mod resize;
pub mod resync;
pub mod rng;
pub mod scrub;
pub mod state;
pub mod stats;
pub mod telemetry;
pub mod ublk;
pub mod uring;
