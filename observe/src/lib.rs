//! What netblk's long-running processes share to be observed: how they log
//! ([`logging`]), the latency histograms they keep on the data path
//! ([`histogram`]), and the Prometheus endpoint that serves what they
//! measured ([`endpoint`]).

pub mod endpoint;
pub mod histogram;
pub mod logging;
