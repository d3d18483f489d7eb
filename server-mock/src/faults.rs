//! Fault injection knobs, settable at start and changed while running
//! through the admin protocol.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::Duration;

use netblk_protocol::pb::{self, CorruptPart, Status, header::Kind};
use netblk_protocol::{Limits, PREAMBLE_LEN, Preamble, decode_header};

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
    if CorruptPart::try_from(faults.corrupt_part).is_err() {
        return Err(format!("unknown corrupt part {}", faults.corrupt_part));
    }
    Ok(())
}

/// How many positions `CorruptPart::Any` tries before it settles for the
/// first magic byte (a flip there is always rejected).
const ANY_TRIES: usize = 64;

/// One byte of a reply frame to flip: `at` counts from the frame's first
/// byte (preamble, then header, then payload).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Corruption {
    pub at: usize,
    pub mask: u8,
    pub part: CorruptPart,
}

impl Corruption {
    /// Flips the byte in `head` (preamble and header) or, past it, in a copy
    /// of `payload`, which is returned.
    pub fn apply(&self, head: &mut [u8], payload: &[u8]) -> Option<Vec<u8>> {
        if let Some(byte) = head.get_mut(self.at) {
            *byte ^= self.mask;
            return None;
        }
        let mut copy = payload.to_vec();
        if let Some(byte) = copy.get_mut(self.at - head.len()) {
            *byte ^= self.mask;
        }
        Some(copy)
    }
}

/// True if a frame that starts with `head` (its preamble and header) can no
/// longer be taken for a reply: the preamble or the header it announces is
/// refused, or decodes as something else. A header length grown past the
/// header is not rejected (a receiver would wait for more), nor is a payload
/// length that still fits the limits (only the requester can tell).
fn rejected_alone(head: &[u8], limits: &Limits) -> bool {
    let Some((preamble, rest)) = head.split_first_chunk::<PREAMBLE_LEN>() else {
        return false;
    };
    let preamble = match Preamble::parse(preamble, limits) {
        Ok(preamble) => preamble,
        Err(_) => return true,
    };
    let Some(header) = rest.get(..preamble.header_len as usize) else {
        return false;
    };
    !matches!(
        decode_header(&preamble, header),
        Ok(pb::Header {
            kind: Some(Kind::Reply(_))
        })
    )
}

/// The node's current faults, with the small amount of state they need.
pub struct Knobs {
    faults: Mutex<pb::Faults>,
    unstalled: Condvar,
    /// With `stall_open_only`: connections numbered from this one on (opened
    /// after the stall was set) are not held.
    stall_cutoff: AtomicU64,
    rng: Mutex<u64>,
    /// Where corruption lands: a stream of its own, so that the same seed
    /// corrupts the same bytes whatever jitter and errors drew.
    corrupt_rng: Mutex<u64>,
}

/// splitmix64: small, seedable, good enough to pick faults.
fn next_random(state: &Mutex<u64>) -> u64 {
    let mut state = state.lock().unwrap_or_else(|p| p.into_inner());
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

impl Knobs {
    pub fn new(faults: pb::Faults, seed: u64) -> Self {
        Knobs {
            faults: Mutex::new(faults),
            unstalled: Condvar::new(),
            stall_cutoff: AtomicU64::new(u64::MAX),
            rng: Mutex::new(seed),
            corrupt_rng: Mutex::new(seed ^ 0x636f_7272_7570_7421),
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

    /// Whether `faults` (as read with [`Knobs::get`]) stall connection
    /// `conn`.
    pub fn stalls(&self, faults: &pb::Faults, conn: u64) -> bool {
        faults.stall && conn < self.stall_cutoff.load(Ordering::Relaxed)
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
        next_random(&self.rng)
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

    /// The byte to flip in this reply frame, if it must be corrupted (and
    /// then counts it off). `head` is the frame's preamble and header,
    /// `payload_len` the length of the payload sent after it. With
    /// [`CorruptPart::Payload`], a frame without a payload is passed over
    /// and not counted.
    /// Where to flip a byte of a write payload of `len` bytes as it
    /// arrives, if `corrupt_writes` says so (one fewer left then): the
    /// offset and the nonzero XOR mask, from the corruption stream.
    pub fn take_corrupt_write(&self, len: usize) -> Option<(usize, u8)> {
        if len == 0 {
            return None;
        }
        let mut faults = self.lock();
        if faults.corrupt_writes == 0 {
            return None;
        }
        faults.corrupt_writes -= 1;
        drop(faults);
        let x = next_random(&self.corrupt_rng);
        Some(((x % len as u64) as usize, ((x >> 32) % 255 + 1) as u8))
    }

    pub fn take_corrupt(
        &self,
        head: &[u8],
        payload_len: usize,
        limits: &Limits,
    ) -> Option<Corruption> {
        let mut faults = self.lock();
        if faults.corrupt_replies == 0 {
            return None;
        }
        let part = CorruptPart::try_from(faults.corrupt_part).unwrap_or(CorruptPart::Any);
        let span = match part {
            CorruptPart::Any => 0..head.len(),
            CorruptPart::Preamble => 0..PREAMBLE_LEN.min(head.len()),
            CorruptPart::Header => PREAMBLE_LEN.min(head.len())..head.len(),
            CorruptPart::Payload => head.len()..head.len() + payload_len,
        };
        if span.is_empty() {
            return None;
        }
        faults.corrupt_replies -= 1;
        drop(faults);
        let draw = || {
            let x = next_random(&self.corrupt_rng);
            let at = span.start + (x % span.len() as u64) as usize;
            // 1..=255: never 0, which would change nothing.
            let mask = ((x >> 32) % 255 + 1) as u8;
            Corruption { at, mask, part }
        };
        if part != CorruptPart::Any {
            return Some(draw());
        }
        let mut scratch = head.to_vec();
        for _ in 0..ANY_TRIES {
            let corruption = draw();
            scratch[corruption.at] ^= corruption.mask;
            if rejected_alone(&scratch, limits) {
                return Some(corruption);
            }
            scratch[corruption.at] ^= corruption.mask;
        }
        Some(Corruption {
            at: 0,
            mask: 0xff,
            part,
        })
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

    /// Preamble and header of a reply to `id`, with a payload of `len` bytes.
    fn reply_head(id: u64, len: usize) -> Vec<u8> {
        let mut head = Vec::new();
        let reply = pb::Reply {
            id,
            ..Default::default()
        };
        netblk_protocol::encode_head(&pb::Header::reply(reply), len, &mut head).expect("encodes");
        head
    }

    fn knobs(part: CorruptPart, n: u32, seed: u64) -> Knobs {
        let faults = pb::Faults {
            corrupt_replies: n,
            corrupt_part: part as i32,
            ..Default::default()
        };
        Knobs::new(faults, seed)
    }

    #[test]
    fn any_lands_in_preamble_and_header_and_is_always_rejected() {
        let limits = Limits::default();
        let knobs = knobs(CorruptPart::Any, 500, 1);
        let mut in_preamble = 0;
        let mut in_header = 0;
        for i in 0..500u64 {
            let id = i * 37 + 1;
            let len = if i % 2 == 0 { 4096 } else { 0 };
            let mut head = reply_head(id, len);
            let c = knobs.take_corrupt(&head, len, &limits).expect("counted");
            assert_eq!(c.part, CorruptPart::Any);
            assert_ne!(c.mask, 0);
            assert!(c.at < head.len(), "never the payload: {c:?}");
            if c.at < PREAMBLE_LEN {
                in_preamble += 1;
            } else {
                in_header += 1;
            }
            assert!(c.apply(&mut head, &[]).is_none());
            assert!(rejected_alone(&head, &limits), "{c:?} left a reply");
        }
        assert!(
            in_preamble > 0 && in_header > 0,
            "{in_preamble} {in_header}"
        );
        assert_eq!(knobs.get().corrupt_replies, 0);
        assert!(knobs.take_corrupt(&reply_head(1, 0), 0, &limits).is_none());
    }

    #[test]
    fn a_chosen_part_is_hit_anywhere_in_it() {
        let limits = Limits::default();
        let head = reply_head(300, 100);
        let header = PREAMBLE_LEN..head.len();
        let payload = head.len()..head.len() + 100;
        for (part, span) in [
            (CorruptPart::Preamble, 0..PREAMBLE_LEN),
            (CorruptPart::Header, header),
            (CorruptPart::Payload, payload),
        ] {
            let knobs = knobs(part, 2000, 9);
            let mut seen = std::collections::HashSet::new();
            for _ in 0..2000 {
                let c = knobs.take_corrupt(&head, 100, &limits).expect("counted");
                assert_eq!(c.part, part);
                assert_ne!(c.mask, 0);
                assert!(span.contains(&c.at), "{c:?} outside {span:?}");
                seen.insert(c.at);
            }
            assert_eq!(seen.len(), span.len(), "{part:?}: every byte is hit");
        }
    }

    #[test]
    fn payload_corruption_flips_one_byte_of_a_copy_and_skips_frames_without_data() {
        let limits = Limits::default();
        let knobs = knobs(CorruptPart::Payload, 1, 3);
        let empty = reply_head(1, 0);
        assert!(knobs.take_corrupt(&empty, 0, &limits).is_none());
        assert_eq!(knobs.get().corrupt_replies, 1, "not counted");
        let mut head = reply_head(2, 64);
        let clean = head.clone();
        let data = [0x5a; 64];
        let c = knobs
            .take_corrupt(&head, 64, &limits)
            .expect("a read reply");
        let copy = c.apply(&mut head, &data).expect("payload copied");
        assert_eq!(head, clean, "head untouched");
        let diff: Vec<usize> = (0..64).filter(|&i| copy[i] != data[i]).collect();
        assert_eq!(diff, vec![c.at - clean.len()]);
        assert_eq!(knobs.get().corrupt_replies, 0);
    }

    #[test]
    fn the_same_seed_corrupts_the_same_bytes_whatever_else_was_drawn() {
        let limits = Limits::default();
        let head = reply_head(77, 512);
        let run = |seed: u64, other_draws: usize| {
            let knobs = knobs(CorruptPart::Any, 20, seed);
            let jitter = pb::Faults {
                jitter_us: 1000,
                ..Default::default()
            };
            for _ in 0..other_draws {
                knobs.delay(&jitter);
            }
            (0..20)
                .map(|_| knobs.take_corrupt(&head, 512, &limits).expect("counted"))
                .collect::<Vec<_>>()
        };
        assert_eq!(run(5, 0), run(5, 13));
        assert_ne!(run(5, 0), run(6, 0));
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
        assert!(
            check(&pb::Faults {
                corrupt_part: 4,
                ..ok
            })
            .is_err()
        );
    }
}
