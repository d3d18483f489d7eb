//! Requests held back by the latency knob, released in due-time order by one
//! thread per node.

use std::cmp::Ordering;
use std::collections::BinaryHeap;
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

/// A min-heap of items by due time; ties keep arrival order.
pub struct DelayQueue<T> {
    heap: Mutex<(BinaryHeap<Entry<T>>, u64)>,
    changed: Condvar,
}

struct Entry<T> {
    due: Instant,
    seq: u64,
    item: T,
}

impl<T> PartialEq for Entry<T> {
    fn eq(&self, other: &Self) -> bool {
        (self.due, self.seq) == (other.due, other.seq)
    }
}
impl<T> Eq for Entry<T> {}
impl<T> PartialOrd for Entry<T> {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl<T> Ord for Entry<T> {
    fn cmp(&self, other: &Self) -> Ordering {
        // Reversed: BinaryHeap is a max-heap, we want the earliest first.
        (other.due, other.seq).cmp(&(self.due, self.seq))
    }
}

impl<T> DelayQueue<T> {
    pub fn new() -> Self {
        DelayQueue {
            heap: Mutex::new((BinaryHeap::new(), 0)),
            changed: Condvar::new(),
        }
    }

    pub fn push(&self, due: Instant, item: T) {
        let mut guard = self.heap.lock().unwrap_or_else(|p| p.into_inner());
        let (heap, seq) = &mut *guard;
        *seq += 1;
        heap.push(Entry {
            due,
            seq: *seq,
            item,
        });
        self.changed.notify_one();
    }

    /// Wakes a waiting [`DelayQueue::pop_due`] so it can look at the clock
    /// and its stop condition again.
    pub fn wake(&self) {
        self.changed.notify_all();
    }

    /// Waits for the next item to fall due and returns it. Returns `None`
    /// once the queue is empty and `stop()` is true.
    pub fn pop_due(&self, stop: impl Fn() -> bool) -> Option<T> {
        let mut guard = self.heap.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            let now = Instant::now();
            let wait = match guard.0.peek() {
                Some(entry) if entry.due <= now => return guard.0.pop().map(|e| e.item),
                Some(entry) => entry.due - now,
                None if stop() => return None,
                // Look at `stop` again now and then.
                None => Duration::from_millis(100),
            };
            guard = self
                .changed
                .wait_timeout(guard, wait)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn releases_in_due_order_and_not_before() {
        let q = DelayQueue::new();
        let start = Instant::now();
        q.push(start + Duration::from_millis(60), "late");
        q.push(start + Duration::from_millis(20), "early");
        q.push(start + Duration::from_millis(20), "early-second");
        assert_eq!(q.pop_due(|| false), Some("early"));
        assert_eq!(q.pop_due(|| false), Some("early-second"));
        assert!(start.elapsed() >= Duration::from_millis(20));
        assert_eq!(q.pop_due(|| false), Some("late"));
        assert!(start.elapsed() >= Duration::from_millis(60));
        assert_eq!(q.pop_due(|| true), None);
    }
}
