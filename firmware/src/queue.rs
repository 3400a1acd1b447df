//! [`OfflineQueue`]: a fixed-capacity FIFO of encoded messages, kept while the network is down.
//!
//! Invariants: at most `SLOTS` messages of at most `BYTES` bytes each, stored inline (no
//! allocation; the whole queue is `SLOTS * (BYTES + 4)` bytes). When full, pushing drops the
//! *oldest* message and counts it in [`OfflineQueue::dropped`]: fresh readings are worth more
//! than stale ones, and the count tells the operator exactly how many messages were lost. A
//! message leaves the queue only by [`OfflineQueue::pop_front`], which the uplink calls after the
//! broker acknowledged it, or by being dropped as the oldest.
//!
//! Tested below, including a comparison with `VecDeque` as the reference model.

use core::fmt;

/// A message longer than the queue's slots.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MessageTooLarge {
    pub len: usize,
    pub max: usize,
}

impl fmt::Display for MessageTooLarge {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "message of {} bytes does not fit a queue slot of {} bytes",
            self.len, self.max
        )
    }
}

/// What [`OfflineQueue::push`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pushed {
    Stored,
    /// Stored, and the oldest message was dropped to make room.
    DroppedOldest,
}

#[derive(Clone, Copy)]
struct Slot<const BYTES: usize> {
    len: u16,
    /// Send attempts so far (a re-send of a QoS 1 message carries the DUP flag).
    attempts: u16,
    bytes: [u8; BYTES],
}

/// One queued message, as the uplink sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Queued<'a> {
    pub payload: &'a [u8],
    pub attempts: u16,
}

pub struct OfflineQueue<const SLOTS: usize, const BYTES: usize> {
    slots: [Slot<BYTES>; SLOTS],
    head: usize,
    len: usize,
    dropped: u32,
}

impl<const SLOTS: usize, const BYTES: usize> Default for OfflineQueue<SLOTS, BYTES> {
    fn default() -> Self {
        Self::new()
    }
}

impl<const SLOTS: usize, const BYTES: usize> OfflineQueue<SLOTS, BYTES> {
    const EMPTY: Slot<BYTES> = Slot {
        len: 0,
        attempts: 0,
        bytes: [0; BYTES],
    };

    pub const fn new() -> Self {
        assert!(SLOTS > 0 && BYTES <= u16::MAX as usize);
        Self {
            slots: [Self::EMPTY; SLOTS],
            head: 0,
            len: 0,
            dropped: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Messages dropped because the queue was full, since start.
    pub fn dropped(&self) -> u32 {
        self.dropped
    }

    /// Append a copy of `message`; when full, drop the oldest first.
    pub fn push(&mut self, message: &[u8]) -> Result<Pushed, MessageTooLarge> {
        if message.len() > BYTES {
            return Err(MessageTooLarge {
                len: message.len(),
                max: BYTES,
            });
        }
        let mut pushed = Pushed::Stored;
        if self.len == SLOTS {
            self.head = (self.head + 1) % SLOTS;
            self.len -= 1;
            self.dropped = self.dropped.saturating_add(1);
            pushed = Pushed::DroppedOldest;
        }
        let slot = &mut self.slots[(self.head + self.len) % SLOTS];
        slot.bytes[..message.len()].copy_from_slice(message);
        slot.len = message.len() as u16;
        slot.attempts = 0;
        self.len += 1;
        Ok(pushed)
    }

    /// The oldest message.
    pub fn front(&self) -> Option<Queued<'_>> {
        if self.len == 0 {
            return None;
        }
        let s = &self.slots[self.head];
        Some(Queued {
            payload: &s.bytes[..usize::from(s.len)],
            attempts: s.attempts,
        })
    }

    /// Record a send attempt of the oldest message.
    pub fn mark_attempt(&mut self) {
        if self.len > 0 {
            let s = &mut self.slots[self.head];
            s.attempts = s.attempts.saturating_add(1);
        }
    }

    /// Remove the oldest message (it was delivered).
    pub fn pop_front(&mut self) -> bool {
        if self.len == 0 {
            return false;
        }
        self.head = (self.head + 1) % SLOTS;
        self.len -= 1;
        true
    }
}

#[cfg(test)]
mod tests {
    extern crate std;
    use std::collections::VecDeque;
    use std::vec::Vec;

    use super::*;
    use crate::prng::SplitMix64;

    #[test]
    fn fifo_with_the_oldest_dropped_and_counted_when_full() {
        let mut q = OfflineQueue::<3, 4>::new();
        assert_eq!(q.front(), None);
        for m in [&b"a"[..], b"bb", b"ccc"] {
            assert_eq!(q.push(m), Ok(Pushed::Stored));
        }
        assert_eq!(q.push(b"dddd"), Ok(Pushed::DroppedOldest));
        assert_eq!((q.len(), q.dropped()), (3, 1));
        assert_eq!(q.front().unwrap().payload, b"bb");
        q.mark_attempt();
        assert_eq!(q.front().unwrap().attempts, 1);
        assert!(q.pop_front());
        assert_eq!(
            q.front().unwrap(),
            Queued {
                payload: b"ccc",
                attempts: 0
            }
        );
        assert_eq!(q.push(b"eeeee"), Err(MessageTooLarge { len: 5, max: 4 }));
        assert!(q.pop_front() && q.pop_front() && !q.pop_front());
        assert!(q.is_empty());
    }

    #[test]
    fn matches_a_vecdeque_model_over_random_operations() {
        let mut q = OfflineQueue::<5, 8>::new();
        let mut model: VecDeque<Vec<u8>> = VecDeque::new();
        let mut dropped = 0;
        let mut rng = SplitMix64::new(3);
        for i in 0..5_000u32 {
            if rng.chance(0.55) {
                let len = rng.below(9) as usize;
                let msg: Vec<u8> = (0..len).map(|k| (i as u8).wrapping_add(k as u8)).collect();
                q.push(&msg).unwrap();
                if model.len() == 5 {
                    model.pop_front();
                    dropped += 1;
                }
                model.push_back(msg);
            } else {
                assert_eq!(q.pop_front(), model.pop_front().is_some());
            }
            assert_eq!(q.len(), model.len());
            assert_eq!(
                q.front().map(|m| m.payload.to_vec()),
                model.front().cloned()
            );
        }
        assert_eq!(q.dropped(), dropped);
        assert!(dropped > 100);
    }
}
