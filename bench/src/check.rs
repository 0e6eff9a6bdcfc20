//! Per-client integrity checks: the session's seq continuity, per-sender order, loss and
//! duplication.
//!
//! Each client keeps one [`Tracker`]. Every RECV must carry the seq after the previous one
//! (starting after the SYNC's seq). Every bench message carries its sender's counter, so for
//! each sender of the session the tracker knows the next counter it expects and the ranges
//! it has skipped: a counter inside a skipped range arrived late (a reorder), one below the
//! expected counter and outside every range is a duplicate, and whatever is still missing at
//! the end, or was never received, is lost.

use serde::Serialize;

use crate::wire::seq_after;

/// Skipped ranges remembered per sender; beyond this, gaps are only counted.
const MAX_GAPS: usize = 1024;

#[derive(Debug, Default, Clone)]
struct Sender {
    next: u64,
    /// Half-open ranges of counters skipped and not (yet) received.
    gaps: Vec<(u64, u64)>,
    /// Counters skipped beyond `MAX_GAPS` ranges (can no longer be matched).
    untracked: u64,
}

impl Sender {
    fn missing(&self) -> u64 {
        self.gaps.iter().map(|(a, b)| b - a).sum::<u64>() + self.untracked
    }
}

/// What one client saw go wrong (all zero on a correct run).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Faults {
    /// Messages sent to the session that this client never received.
    pub lost: u64,
    /// Messages received more than once.
    pub duplicated: u64,
    /// Messages that arrived after a later message of the same sender.
    pub reordered: u64,
    /// RECVs whose seq skipped ahead of the expected one.
    pub seq_gaps: u64,
    /// RECVs whose seq was not after the previous one.
    pub seq_backwards: u64,
    /// Bench messages from a client of another session.
    pub misrouted: u64,
}

impl Faults {
    /// True when nothing went wrong.
    pub fn is_clean(&self) -> bool {
        *self == Faults::default()
    }

    /// Adds another client's faults.
    pub fn add(&mut self, o: &Faults) {
        self.lost += o.lost;
        self.duplicated += o.duplicated;
        self.reordered += o.reordered;
        self.seq_gaps += o.seq_gaps;
        self.seq_backwards += o.seq_backwards;
        self.misrouted += o.misrouted;
    }
}

/// The checks of one client.
#[derive(Debug, Clone)]
pub struct Tracker {
    next_seq: Option<u32>,
    first_sender: u32,
    senders: Vec<Sender>,
    /// Distinct bench messages received.
    pub unique: u64,
    faults: Faults,
}

impl Tracker {
    /// A tracker for a session whose senders have global indices
    /// `first_sender..first_sender + senders`.
    pub fn new(first_sender: u32, senders: usize) -> Self {
        Tracker {
            next_seq: None,
            first_sender,
            senders: vec![Sender::default(); senders],
            unique: 0,
            faults: Faults::default(),
        }
    }

    /// The SYNC's seq: the first RECV must carry the one after it.
    pub fn synced(&mut self, seq: u32) {
        self.next_seq = Some(seq.wrapping_add(1));
    }

    /// Checks a RECV's seq.
    pub fn seq(&mut self, seq: u32) {
        match self.next_seq {
            Some(next) if seq == next => {}
            Some(next) if seq_after(next.wrapping_sub(1), seq) => self.faults.seq_gaps += 1,
            Some(_) => {
                self.faults.seq_backwards += 1;
                return;
            }
            None => {}
        }
        self.next_seq = Some(seq.wrapping_add(1));
    }

    /// Checks a bench message; returns true when it is new (not a duplicate or misrouted).
    pub fn message(&mut self, sender: u32, counter: u64) -> bool {
        let Some(s) = sender
            .checked_sub(self.first_sender)
            .and_then(|i| self.senders.get_mut(i as usize))
        else {
            self.faults.misrouted += 1;
            return false;
        };
        if counter == s.next {
            s.next += 1;
        } else if counter > s.next {
            if s.gaps.len() < MAX_GAPS {
                s.gaps.push((s.next, counter));
            } else {
                s.untracked += counter - s.next;
            }
            s.next = counter + 1;
        } else if let Some(i) = s
            .gaps
            .iter()
            .position(|&(a, b)| a <= counter && counter < b)
        {
            let (a, b) = s.gaps[i];
            s.gaps.remove(i);
            if counter + 1 < b {
                s.gaps.insert(i, (counter + 1, b));
            }
            if a < counter {
                s.gaps.insert(i, (a, counter));
            }
            self.faults.reordered += 1;
        } else {
            self.faults.duplicated += 1;
            return false;
        }
        self.unique += 1;
        true
    }

    /// The faults, given how many messages each sender of the session sent in total
    /// (indexed like the senders; `None` for a sender whose messages are not expected).
    pub fn finish(&self, sent: &[Option<u64>]) -> Faults {
        let mut f = self.faults;
        for (s, sent) in self.senders.iter().zip(sent) {
            let Some(sent) = *sent else { continue };
            let received = s.next.saturating_sub(s.missing());
            f.lost += sent.saturating_sub(received);
        }
        f
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(order: &[(u32, u64)], sent: &[u64]) -> Faults {
        let mut t = Tracker::new(10, sent.len());
        for &(s, c) in order {
            t.message(s, c);
        }
        let sent: Vec<_> = sent.iter().map(|&n| Some(n)).collect();
        t.finish(&sent)
    }

    #[test]
    fn an_orderly_stream_is_clean() {
        let f = run(&[(10, 0), (11, 0), (10, 1), (11, 1)], &[2, 2]);
        assert!(f.is_clean(), "{f:?}");
    }

    #[test]
    fn a_missing_message_is_lost() {
        let f = run(&[(10, 0), (10, 2)], &[3]);
        assert_eq!(f.lost, 1);
        let tail = run(&[(10, 0)], &[3]);
        assert_eq!(tail.lost, 2);
    }

    #[test]
    fn a_repeat_is_a_duplicate_and_a_late_one_a_reorder() {
        let f = run(&[(10, 0), (10, 1), (10, 1)], &[2]);
        assert_eq!((f.duplicated, f.lost, f.reordered), (1, 0, 0));
        let f = run(&[(10, 1), (10, 0), (10, 2)], &[3]);
        assert_eq!((f.duplicated, f.lost, f.reordered), (0, 0, 1));
        let f = run(&[(10, 3), (10, 1), (10, 0), (10, 2), (10, 1)], &[4]);
        assert_eq!((f.duplicated, f.lost, f.reordered), (1, 0, 3));
    }

    #[test]
    fn other_sessions_messages_are_misrouted() {
        let f = run(&[(3, 0)], &[0]);
        assert_eq!(f.misrouted, 1);
    }

    #[test]
    fn seqs_must_follow_the_sync_and_each_other_across_the_wrap() {
        let mut t = Tracker::new(0, 0);
        t.synced(u32::MAX - 1);
        t.seq(u32::MAX);
        t.seq(0);
        t.seq(1);
        assert!(t.finish(&[]).is_clean());
        t.seq(3);
        t.seq(2);
        let f = t.finish(&[]);
        assert_eq!((f.seq_gaps, f.seq_backwards), (1, 1));
    }
}
