//! One operation at a time per volume: the spec has a plugin answer
//! ABORTED when a call arrives for a volume another call is still working
//! on (the CO retries it later).

use std::collections::HashSet;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use tonic::Status;

/// The volumes with an operation in progress.
#[derive(Debug, Clone, Default)]
pub struct Busy(Arc<Mutex<HashSet<String>>>);

/// Held while an operation runs; frees its volume when dropped.
#[derive(Debug)]
pub struct Claim {
    busy: Busy,
    key: String,
}

impl Busy {
    /// Claims `key` (a volume id or name), or ABORTED if it is taken.
    pub fn claim(&self, key: &str) -> Result<Claim, Status> {
        let mut held = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        if !held.insert(key.to_string()) {
            return Err(Status::aborted(format!(
                "an operation on volume '{key}' is already in progress"
            )));
        }
        Ok(Claim {
            busy: self.clone(),
            key: key.to_string(),
        })
    }
}

impl Busy {
    /// Claims `key`, waiting up to `wait` for the operation holding it to
    /// end (for the plugin's own work, such as start-up recovery; a CO's
    /// call is answered ABORTED at once instead).
    pub fn wait_claim(&self, key: &str, wait: Duration) -> Result<Claim, Status> {
        let deadline = Instant::now() + wait;
        loop {
            match self.claim(key) {
                Err(_) if Instant::now() < deadline => std::thread::sleep(WAIT_POLL),
                Err(_) => {
                    return Err(Status::aborted(format!(
                        "an operation on volume '{key}' is still in progress after {} s",
                        wait.as_secs()
                    )));
                }
                claimed => return claimed,
            }
        }
    }
}

/// How often a waiting claim tries again.
const WAIT_POLL: Duration = Duration::from_millis(50);

impl Drop for Claim {
    fn drop(&mut self) {
        self.busy
            .0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&self.key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_volume_is_claimed_once_until_released() {
        let busy = Busy::default();
        let claim = busy.claim("pvc-1").expect("free");
        let second = busy.claim("pvc-1").expect_err("taken");
        assert_eq!(second.code(), tonic::Code::Aborted);
        assert!(busy.claim("pvc-2").is_ok(), "another volume is free");
        drop(claim);
        assert!(busy.claim("pvc-1").is_ok(), "released");
    }

    #[test]
    fn a_waiting_claim_gets_the_volume_once_it_is_released() {
        let busy = Busy::default();
        let claim = busy.claim("pvc-1").expect("free");
        let waited = busy.wait_claim("pvc-1", Duration::from_millis(100));
        assert_eq!(
            waited.map(drop).map_err(|s| s.code()),
            Err(tonic::Code::Aborted)
        );
        let release = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(100));
            drop(claim);
        });
        assert!(busy.wait_claim("pvc-1", Duration::from_secs(10)).is_ok());
        release.join().expect("thread");
    }
}
