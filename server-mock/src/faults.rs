//! Fault injection knobs, settable at start and changed while running
//! through the admin protocol.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::Duration;

use netblk_protocol::pb::{self, Status};

/// Largest latency or jitter a knob accepts: one hour.
const MAX_DELAY_US: u64 = 3_600_000_000;

/// Checks a fault set before it is applied, saying what is wrong.
pub fn check(faults: &pb::Faults) -> Result<(), String> {
    if !(0.0..=1.0).contains(&faults.error_probability) {
        return Err(format!(
            "error probability {} must be from 0 to 1",
            faults.error_probability
        ));
    }
    if faults.latency_us > MAX_DELAY_US || faults.jitter_us > MAX_DELAY_US {
        return Err(format!(
            "latency and jitter must be at most {MAX_DELAY_US} µs"
        ));
    }
    if Status::try_from(faults.error_status).is_err() {
        return Err(format!("unknown error status {}", faults.error_status));
    }
    Ok(())
}

/// The node's current faults, with the small amount of state they need.
pub struct Knobs {
    faults: Mutex<pb::Faults>,
    unstalled: Condvar,
    /// With `stall_open_only`: connections numbered from this one on (opened
    /// after the stall was set) are not held.
    stall_cutoff: AtomicU64,
    rng: Mutex<u64>,
}

impl Knobs {
    pub fn new(faults: pb::Faults, seed: u64) -> Self {
        Knobs {
            faults: Mutex::new(faults),
            unstalled: Condvar::new(),
            stall_cutoff: AtomicU64::new(u64::MAX),
            rng: Mutex::new(seed),
        }
    }

    fn lock(&self) -> MutexGuard<'_, pb::Faults> {
        self.faults
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// A copy of the current faults.
    pub fn get(&self) -> pb::Faults {
        *self.lock()
    }

    /// Replaces every fault. The caller checked them with [`check`].
    /// `next_conn` is the number the next accepted connection will get: a
    /// stall of the open connections only holds those below it.
    pub fn set(&self, faults: pb::Faults, next_conn: u64) {
        let mut current = self.lock();
        let cutoff = if faults.stall && faults.stall_open_only {
            if current.stall && current.stall_open_only {
                // Still the same stall: it keeps holding the same connections.
                self.stall_cutoff.load(Ordering::Relaxed)
            } else {
                next_conn
            }
        } else {
            u64::MAX
        };
        self.stall_cutoff.store(cutoff, Ordering::Relaxed);
        *current = faults;
        drop(current);
        self.unstalled.notify_all();
    }

    /// Wakes whoever waits in [`Knobs::wait_while_stalled`], to look at
    /// `give_up` again.
    pub fn wake(&self) {
        self.unstalled.notify_all();
    }

    /// Blocks while the stall knob holds connection `conn`, until it is
    /// cleared or `give_up` says so (the node is shutting down, or the
    /// connection was fenced).
    pub fn wait_while_stalled(&self, conn: u64, give_up: impl Fn() -> bool) {
        let mut faults = self.lock();
        while faults.stall && conn < self.stall_cutoff.load(Ordering::Relaxed) && !give_up() {
            faults = self
                .unstalled
                .wait_timeout(faults, Duration::from_millis(100))
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .0;
        }
    }

    fn random(&self) -> u64 {
        // splitmix64: small, seedable, good enough to pick faults.
        let mut state = self.rng.lock().unwrap_or_else(|p| p.into_inner());
        *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = *state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// How long to hold a request before executing it.
    pub fn delay(&self, faults: &pb::Faults) -> Duration {
        let jitter = match faults.jitter_us {
            0 => 0,
            j => self.random() % (j + 1),
        };
        Duration::from_micros(faults.latency_us + jitter)
    }

    /// The error to answer with instead of executing, if one is drawn.
    pub fn draw_error(&self, faults: &pb::Faults) -> Option<Status> {
        if faults.error_probability <= 0.0 {
            return None;
        }
        let draw = (self.random() >> 11) as f64 / (1u64 << 53) as f64;
        if draw >= faults.error_probability {
            return None;
        }
        Some(match Status::try_from(faults.error_status) {
            Ok(Status::Ok) | Err(_) => Status::IoError,
            Ok(status) => status,
        })
    }

    /// True if this reply must be corrupted (and counts it off).
    pub fn take_corrupt(&self) -> bool {
        let mut faults = self.lock();
        if faults.corrupt_replies == 0 {
            return false;
        }
        faults.corrupt_replies -= 1;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_draws_follow_the_probability() {
        let knobs = Knobs::new(pb::Faults::default(), 42);
        let mut faults = pb::Faults {
            error_probability: 0.25,
            error_status: Status::NoSpace as i32,
            ..Default::default()
        };
        let hits = (0..10_000)
            .filter_map(|_| knobs.draw_error(&faults))
            .inspect(|s| assert_eq!(*s, Status::NoSpace))
            .count();
        assert!((2000..3000).contains(&hits), "{hits} of 10000 at p=0.25");
        faults.error_probability = 1.0;
        faults.error_status = Status::Ok as i32;
        assert_eq!(knobs.draw_error(&faults), Some(Status::IoError));
        faults.error_probability = 0.0;
        assert_eq!(knobs.draw_error(&faults), None);
    }

    #[test]
    fn bad_knobs_are_refused() {
        let ok = pb::Faults::default();
        assert!(check(&ok).is_ok());
        assert!(
            check(&pb::Faults {
                error_probability: 1.5,
                ..ok
            })
            .is_err()
        );
        assert!(
            check(&pb::Faults {
                error_probability: f64::NAN,
                ..ok
            })
            .is_err()
        );
        assert!(
            check(&pb::Faults {
                latency_us: u64::MAX,
                ..ok
            })
            .is_err()
        );
        assert!(
            check(&pb::Faults {
                error_status: 99,
                ..ok
            })
            .is_err()
        );
    }
}
