//! How many uploads the files endpoint reads at once, per peer address and in total.
//!
//! An upload holds a buffer and a storage request for as long as its body takes to arrive,
//! so a few slow or stalled bodies could otherwise pin memory and storage connections. A
//! request that finds no free slot is answered at once (429 for its peer, 503 in total)
//! instead of waiting.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard};

use prometheus::IntGauge;

/// Which cap a refused upload hit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Busy {
    /// `--max-uploads-per-peer` uploads from this address are in progress.
    Peer,
    /// `--max-uploads` uploads are in progress.
    Total,
}

#[derive(Debug, Default)]
struct Counts {
    total: usize,
    per_peer: HashMap<IpAddr, usize>,
}

/// The upload slots of one files endpoint.
#[derive(Debug)]
pub struct UploadSlots {
    max_total: usize,
    max_per_peer: usize,
    counts: Mutex<Counts>,
    /// Mirrors the total in use.
    gauge: Option<IntGauge>,
}

/// A taken slot, given back when dropped.
#[derive(Debug)]
pub struct Slot {
    slots: Arc<UploadSlots>,
    peer: IpAddr,
}

impl UploadSlots {
    /// Slots for at most `max_total` uploads, `max_per_peer` of them from one address
    /// (each at least 1); `gauge` follows the number in use.
    pub fn new(max_total: usize, max_per_peer: usize, gauge: Option<IntGauge>) -> Arc<Self> {
        Arc::new(Self {
            max_total: max_total.max(1),
            max_per_peer: max_per_peer.max(1),
            counts: Mutex::default(),
            gauge,
        })
    }

    fn publish(&self, total: usize) {
        if let Some(g) = &self.gauge {
            g.set(i64::try_from(total).unwrap_or(i64::MAX));
        }
    }

    fn counts(&self) -> MutexGuard<'_, Counts> {
        self.counts.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes a slot for an upload from `peer`, or says which cap is reached.
    pub fn try_take(self: &Arc<Self>, peer: IpAddr) -> Result<Slot, Busy> {
        let mut c = self.counts();
        let mine = c.per_peer.get(&peer).copied().unwrap_or(0);
        if mine >= self.max_per_peer {
            return Err(Busy::Peer);
        }
        if c.total >= self.max_total {
            return Err(Busy::Total);
        }
        c.total += 1;
        c.per_peer.insert(peer, mine + 1);
        self.publish(c.total);
        Ok(Slot {
            slots: self.clone(),
            peer,
        })
    }

    /// Uploads in progress.
    pub fn in_use(&self) -> usize {
        self.counts().total
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut c = self.slots.counts();
        c.total = c.total.saturating_sub(1);
        if let Some(n) = c.per_peer.get_mut(&self.peer) {
            *n -= 1;
            if *n == 0 {
                c.per_peer.remove(&self.peer);
            }
        }
        self.slots.publish(c.total);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_capped_per_peer_and_in_total_and_come_back() {
        let slots = UploadSlots::new(3, 2, None);
        let a: IpAddr = "10.0.0.1".parse().expect("ip");
        let b: IpAddr = "10.0.0.2".parse().expect("ip");
        let a1 = slots.try_take(a).expect("a1");
        let _a2 = slots.try_take(a).expect("a2");
        assert_eq!(slots.try_take(a).err(), Some(Busy::Peer));
        let _b1 = slots.try_take(b).expect("b1");
        assert_eq!(slots.try_take(b).err(), Some(Busy::Total));
        drop(a1);
        assert_eq!(slots.in_use(), 2);
        assert!(slots.try_take(b).is_ok());
    }
}
