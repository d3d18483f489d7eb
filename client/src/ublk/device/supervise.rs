//! What the serving daemon does when one of its queue threads ends by
//! itself.

use super::*;

/// How a queue thread ended.
#[derive(Debug)]
pub enum Ended {
    /// Its thread panicked (with this message).
    Panicked(String),
    /// Its ring or driver failed, or the queue gave up (why).
    Failed(String),
    /// It ended without an error: the kernel aborted its commands, as it
    /// does when the device is stopped.
    Aborted,
}

impl std::fmt::Display for Ended {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Ended::Panicked(why) => write!(f, "panicked: {why}"),
            Ended::Failed(why) => write!(f, "failed: {why}"),
            Ended::Aborted => f.write_str(
                "ended: the kernel aborted its ublk commands (the device was stopped from outside, or another queue failed)",
            ),
        }
    }
}

/// One queue thread that ended, and how.
#[derive(Debug)]
pub struct QueueEnd {
    pub queue: usize,
    pub how: Ended,
}

impl std::fmt::Display for QueueEnd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "queue {} {}", self.queue, self.how)
    }
}

impl QueueEnd {
    /// From what joining the queue's thread gave back.
    pub(super) fn joined(
        queue: usize,
        joined: std::thread::Result<(Option<UblkQueue>, io::Result<()>)>,
    ) -> QueueEnd {
        QueueEnd::classify(
            queue,
            joined.map(|(frontend, result)| {
                (
                    frontend.and_then(|q| q.failure().map(str::to_owned)),
                    result,
                )
            }),
        )
    }

    /// How a queue ended, from its thread's outcome: a panic (with its
    /// payload), or the queue's own account of why it gave up (if it did)
    /// and the driver's result.
    pub fn classify(
        queue: usize,
        outcome: std::thread::Result<(Option<String>, io::Result<()>)>,
    ) -> QueueEnd {
        let how = match outcome {
            Err(payload) => Ended::Panicked(
                payload
                    .downcast_ref::<&str>()
                    .map(|s| (*s).to_owned())
                    .or_else(|| payload.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "(no message)".into()),
            ),
            Ok((_, Err(err))) => Ended::Failed(err.to_string()),
            Ok((Some(why), Ok(()))) => Ended::Failed(why),
            Ok((None, Ok(()))) => Ended::Aborted,
        };
        QueueEnd { queue, how }
    }
}

/// What the daemon does next while it serves.
#[derive(Debug, PartialEq, Eq)]
pub enum Supervision {
    /// Go on serving.
    Serve,
    /// Stop and delete the device, as asked (SIGINT/SIGTERM).
    Stop,
    /// A queue ended by itself: the device serves nothing through it any
    /// more. Exit with this error, leaving the device as it is (not stopped,
    /// not deleted): once the daemon is gone the kernel quiesces it, and
    /// `map --recover` takes over.
    Abandon(String),
}

/// The supervisor's decision, from whether a stop was asked for and which
/// queues have ended. A stop asked for wins: the device is going anyway.
/// Queues that failed are named before queues that were merely aborted
/// (the kernel aborts the others' commands when one queue's ring dies).
pub fn supervise(stop_requested: bool, ended: &[QueueEnd]) -> Supervision {
    if stop_requested {
        return Supervision::Stop;
    }
    if ended.is_empty() {
        return Supervision::Serve;
    }
    let mut ordered: Vec<&QueueEnd> = ended.iter().collect();
    ordered.sort_by_key(|e| (matches!(e.how, Ended::Aborted), e.queue));
    let named: Vec<String> = ordered.iter().map(ToString::to_string).collect();
    Supervision::Abandon(named.join("; "))
}
