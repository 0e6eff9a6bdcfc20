//! The per-connection send queue shared by a connection's writer and its session.
//!
//! The session puts frames in with `try_send` and never waits: a full queue means the client
//! is not reading fast enough, and it is cut off (close 4001) instead of stalling everyone
//! else. The queue is bounded twice: in frames, and in bytes not yet written to the socket
//! (frames the writer took count until its batch is flushed), because a few thousand frames
//! of up to a megabyte each would let one slow reader pin gigabytes. A SYNC is exempt from
//! the byte bound (it is bounded by the session's retained bytes, and a late joiner must be
//! able to receive it), but whatever is queued behind it is not. A close the connection or session asks for normally travels through the queue, after
//! the frames already in it; a close for a client whose queue is full goes around the queue
//! and interrupts a write that is blocked on the socket.
//!
//! The queue is a `VecDeque` behind a mutex that only the session (pushing) and the writer
//! (taking everything queued at once) touch, so it costs one uncontended lock per frame and
//! one per batch written. It allocates nothing until the first frame and grows only as far as
//! the backlog does, which keeps idle connections small (a tokio mpsc channel allocates a
//! block of 32 slots and a cache-padded channel up front).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::Notify;

use crate::close::Close;
use crate::frame::Text;

/// One item of the send queue.
#[derive(Debug)]
pub enum Out {
    /// A text frame.
    Frame(Text),
    /// Close the connection after the frames before it.
    Close(Close),
}

#[derive(Debug, Default)]
struct Queue {
    frames: VecDeque<Text>,
    /// Bytes of the frames queued or taken by the writer and not yet written.
    bytes: usize,
    /// Bytes of SYNC frames among `bytes` not yet written (exempt from the byte bound). The
    /// SYNC is queued first, so the first bytes written are taken to be its bytes.
    sync_bytes: usize,
    /// A close to send once the frames before it are written.
    close: Option<Close>,
    /// A close that jumps the queue (the client stopped reading).
    urgent: Option<Close>,
}

#[derive(Debug)]
struct Shared {
    queue: Mutex<Queue>,
    capacity: usize,
    /// Most bytes (not counting a SYNC) queued and not yet written.
    max_bytes: usize,
    /// The largest backlog in bytes of any connection so far (see [`QueuePeak`]).
    peak: Option<QueuePeak>,
    /// Live [`Outbox`] handles; the writer ends when the last one is gone.
    senders: AtomicUsize,
    closing: AtomicBool,
    /// Wakes the writer: something was queued, or the last sender left.
    items: Notify,
    /// Wakes the writer while it waits on the socket: an urgent close.
    urgent: Notify,
    /// Tells the connection's reader that a close began, so it starts waiting for the
    /// client's side of it even when the client sends nothing.
    closing_signal: Notify,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Queue> {
        // Nothing panics while holding this lock; keep going with the data if it ever did.
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The largest number of bytes (not counting a SYNC) any one connection had queued and not
/// yet written, shared by all connections of a process and exported as a metric.
///
/// Raising it is a load of a shared value on every queued frame and a write only when a
/// connection's backlog passes every earlier one, which is rare once the process warmed up,
/// so the fan-out never contends on it.
#[derive(Debug, Clone, Default)]
pub struct QueuePeak(Arc<AtomicU64>);

impl QueuePeak {
    /// The peak so far.
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }

    fn raise(&self, held: usize) {
        let held = held as u64;
        if held > self.0.load(Ordering::Relaxed) {
            self.0.fetch_max(held, Ordering::Relaxed);
        }
    }
}

/// How much one connection's queue may hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bounds {
    /// Frames queued and not yet taken by the writer.
    pub frames: usize,
    /// Bytes queued or being written, not counting a SYNC.
    pub bytes: usize,
}

/// Why a frame could not be queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SendError {
    /// The client is too slow: its queue is full.
    Full,
    /// The connection is gone.
    Gone,
}

/// The sending side, cloned into the session.
#[derive(Debug)]
pub struct Outbox {
    shared: Arc<Shared>,
}

/// The receiving side, owned by the connection's writer.
#[derive(Debug)]
pub struct Inbox {
    shared: Arc<Shared>,
}

/// Waits for an urgent close (see [`Inbox::watch`]).
#[derive(Debug)]
pub struct Watch(Arc<Shared>);

impl Watch {
    /// Completes when an urgent close is requested.
    pub async fn urgent_close(&self) -> Close {
        loop {
            let notified = self.0.urgent.notified();
            if let Some(c) = self.0.lock().urgent.take() {
                return c;
            }
            notified.await;
        }
    }
}

/// Waits for the start of a close (see [`Outbox::closing_signal`]).
#[derive(Debug)]
pub struct ClosingSignal(Arc<Shared>);

impl ClosingSignal {
    /// Completes once a close has begun (at once if it already has).
    pub async fn closing(&self) {
        loop {
            let notified = self.0.closing_signal.notified();
            if self.0.closing.load(Ordering::Acquire) {
                return;
            }
            notified.await;
        }
    }
}

/// A new queue holding at most `capacity` frames, without a byte bound.
pub fn pair(capacity: usize) -> (Outbox, Inbox) {
    bounded(
        Bounds {
            frames: capacity,
            bytes: usize::MAX,
        },
        None,
    )
}

/// A new queue within `bounds`, recording its largest backlog in `peak`.
pub fn bounded(bounds: Bounds, peak: Option<QueuePeak>) -> (Outbox, Inbox) {
    let shared = Arc::new(Shared {
        queue: Mutex::new(Queue::default()),
        capacity: bounds.frames.max(1),
        max_bytes: bounds.bytes.max(1),
        peak,
        senders: AtomicUsize::new(1),
        closing: AtomicBool::new(false),
        items: Notify::new(),
        urgent: Notify::new(),
        closing_signal: Notify::new(),
    });
    (
        Outbox {
            shared: shared.clone(),
        },
        Inbox { shared },
    )
}

impl Clone for Outbox {
    fn clone(&self) -> Self {
        self.shared.senders.fetch_add(1, Ordering::Relaxed);
        Self {
            shared: self.shared.clone(),
        }
    }
}

impl Drop for Outbox {
    fn drop(&mut self) {
        if self.shared.senders.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.shared.items.notify_one();
        }
    }
}

impl Outbox {
    /// Queues a frame without waiting.
    pub fn try_send(&self, frame: Text) -> Result<(), SendError> {
        self.push(frame, false)
    }

    /// Queues a piece of a SYNC without waiting: only the frame bound applies to it.
    pub fn try_send_sync(&self, frame: Text) -> Result<(), SendError> {
        self.push(frame, true)
    }

    fn push(&self, frame: Text, sync: bool) -> Result<(), SendError> {
        if self.shared.closing.load(Ordering::Relaxed) {
            return Err(SendError::Gone);
        }
        let len = frame.len();
        let mut q = self.shared.lock();
        if q.frames.len() >= self.shared.capacity {
            return Err(SendError::Full);
        }
        // Bytes held for this client besides its SYNC, this frame included.
        let held = q.bytes.saturating_sub(q.sync_bytes) + len;
        if sync {
            q.sync_bytes += len;
        } else if held > self.shared.max_bytes {
            return Err(SendError::Full);
        } else if let Some(peak) = &self.shared.peak {
            peak.raise(held);
        }
        q.bytes += len;
        let was_empty = q.frames.is_empty();
        q.frames.push_back(frame);
        drop(q);
        if was_empty {
            // The writer takes everything at once, so only the first frame needs to wake it.
            self.shared.items.notify_one();
        }
        Ok(())
    }

    /// True when nothing is waiting to be written (ticks are only sent to such clients).
    pub fn is_idle(&self) -> bool {
        self.shared.lock().frames.is_empty()
    }

    /// Closes after the frames already queued; if the queue is full, closes at once.
    /// Only the first close of a connection counts.
    pub fn close(&self, close: Close) {
        if self.shared.closing.swap(true, Ordering::AcqRel) {
            return;
        }
        self.shared.closing_signal.notify_one();
        let mut q = self.shared.lock();
        if q.frames.len() >= self.shared.capacity {
            drop(q);
            self.urgent(close);
        } else {
            q.close = Some(close);
            drop(q);
            self.shared.items.notify_one();
        }
    }

    /// Closes at once, dropping whatever is still queued (for clients that stopped reading).
    pub fn close_now(&self, close: Close) {
        self.shared.closing.store(true, Ordering::Release);
        self.shared.closing_signal.notify_one();
        self.urgent(close);
    }

    fn urgent(&self, close: Close) {
        self.shared.lock().urgent.get_or_insert(close);
        // Both: the writer may be waiting for frames or blocked on the socket.
        self.shared.urgent.notify_one();
        self.shared.items.notify_one();
    }

    /// Whether a close was asked for.
    pub fn is_closing(&self) -> bool {
        self.shared.closing.load(Ordering::Acquire)
    }

    /// Completes when a close begins.
    pub fn closing_signal(&self) -> ClosingSignal {
        ClosingSignal(self.shared.clone())
    }

    /// Same connection?
    pub fn same(&self, other: &Outbox) -> bool {
        Arc::ptr_eq(&self.shared, &other.shared)
    }
}

/// What [`Inbox::recv_batch`] found.
#[derive(Debug, PartialEq)]
pub enum Batch {
    /// Frames, moved to the caller's buffer.
    Frames,
    /// Close after the frames already taken.
    Close(Close),
    /// Close now: the client stopped reading (queued frames were dropped).
    Urgent(Close),
}

/// Drops what is still queued for a client that is being cut off.
fn discard(q: &mut Queue) {
    let dropped: usize = q.frames.drain(..).map(|t| t.len()).sum();
    q.bytes = q.bytes.saturating_sub(dropped);
    q.sync_bytes = q.sync_bytes.min(q.bytes);
    q.close = None;
}

fn take_frames(q: &mut Queue, into: &mut VecDeque<Text>) -> bool {
    if q.frames.is_empty() {
        return false;
    }
    if into.is_empty() {
        // Swap, so both buffers keep their capacity and nothing is copied.
        std::mem::swap(&mut q.frames, into);
    } else {
        into.append(&mut q.frames);
    }
    true
}

impl Inbox {
    /// Moves every queued frame to the back of `into`, waiting while nothing is queued.
    /// An urgent close drops the queued frames and comes back at once; a queued close comes
    /// back once the frames before it were taken. `None` when every sender is gone and
    /// nothing is left.
    pub async fn recv_batch(&mut self, into: &mut VecDeque<Text>) -> Option<Batch> {
        loop {
            let notified = self.shared.items.notified();
            {
                let mut q = self.shared.lock();
                if let Some(c) = q.urgent.take() {
                    discard(&mut q);
                    return Some(Batch::Urgent(c));
                }
                if take_frames(&mut q, into) {
                    return Some(Batch::Frames);
                }
                if let Some(c) = q.close.take() {
                    return Some(Batch::Close(c));
                }
            }
            if self.shared.senders.load(Ordering::Acquire) == 0 {
                return None;
            }
            notified.await;
        }
    }

    /// The writer wrote `n` bytes of the frames it took: they no longer count against the bound.
    pub fn written(&mut self, n: usize) {
        let mut q = self.shared.lock();
        q.bytes = q.bytes.saturating_sub(n);
        q.sync_bytes = q.sync_bytes.saturating_sub(n);
    }

    /// Moves whatever frames are queued now to the back of `into`; false if there were none.
    pub fn try_take(&mut self, into: &mut VecDeque<Text>) -> bool {
        take_frames(&mut self.shared.lock(), into)
    }

    /// The next item; an urgent close wins over queued frames. `None` when every sender is
    /// gone and nothing is queued.
    pub async fn recv(&mut self) -> Option<Out> {
        loop {
            if let Some(item) = self.try_recv() {
                return Some(item);
            }
            if self.shared.senders.load(Ordering::Acquire) == 0 {
                return None;
            }
            // A frame queued since `try_recv` left a permit: this returns at once then.
            self.shared.items.notified().await;
        }
    }

    /// A handle that waits for an urgent close while the writer is busy with the socket.
    pub fn watch(&self) -> Watch {
        Watch(self.shared.clone())
    }

    /// Takes a queued item without waiting.
    pub fn try_recv(&mut self) -> Option<Out> {
        let mut q = self.shared.lock();
        if let Some(c) = q.urgent.take() {
            discard(&mut q);
            return Some(Out::Close(c));
        }
        match q.frames.pop_front() {
            Some(t) => Some(Out::Frame(t)),
            None => q.close.take().map(Out::Close),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::close;

    #[tokio::test]
    async fn close_follows_the_frames_queued_before_it() {
        let (out, mut inbox) = pair(4);
        out.try_send(Text::from("a")).expect("queued");
        out.close(close::RECONNECT);
        assert!(matches!(
            out.try_send(Text::from("late")),
            Err(SendError::Gone)
        ));
        assert!(matches!(inbox.recv().await, Some(Out::Frame(t)) if t.as_str() == "a"));
        assert!(matches!(inbox.recv().await, Some(Out::Close(c)) if c.code == 4003));
    }

    #[tokio::test]
    async fn a_full_queue_reports_full_and_an_urgent_close_jumps_it() {
        let (out, mut inbox) = pair(2);
        out.try_send(Text::from("1")).expect("queued");
        out.try_send(Text::from("2")).expect("queued");
        assert_eq!(out.try_send(Text::from("3")), Err(SendError::Full));
        assert!(!out.is_idle());
        out.close(close::UNRESPONSIVE);
        assert!(matches!(inbox.recv().await, Some(Out::Close(c)) if c.code == 4001));
    }

    #[tokio::test]
    async fn the_byte_bound_counts_frames_until_they_are_written_and_spares_the_sync() {
        let peak = QueuePeak::default();
        let (out, mut inbox) = bounded(
            Bounds {
                frames: 100,
                bytes: 10,
            },
            Some(peak.clone()),
        );
        // A SYNC larger than the bound still goes in, and does not count against it.
        out.try_send_sync(Text::from("s".repeat(25))).expect("sync");
        out.try_send(Text::from("123456")).expect("queued");
        out.try_send(Text::from("1234"))
            .expect("queued: exactly at the bound");
        assert_eq!(out.try_send(Text::from("x")), Err(SendError::Full));
        assert_eq!(peak.get(), 10);
        // Taken by the writer but not yet written: still counted.
        let mut got = VecDeque::new();
        assert_eq!(inbox.recv_batch(&mut got).await, Some(Batch::Frames));
        assert_eq!(out.try_send(Text::from("x")), Err(SendError::Full));
        // Written: room again; the SYNC's bytes were the first written.
        let n = got.iter().map(|t| t.len()).sum();
        inbox.written(n);
        out.try_send(Text::from("0123456789")).expect("queued");
        assert_eq!(out.try_send(Text::from("x")), Err(SendError::Full));
        assert_eq!(peak.get(), 10, "never above the bound");
    }

    #[tokio::test]
    async fn a_batch_takes_everything_queued_then_the_close() {
        let (out, mut inbox) = pair(8);
        for s in ["a", "b", "c"] {
            out.try_send(Text::from(s)).expect("queued");
        }
        out.close(close::RECONNECT);
        let mut got = VecDeque::new();
        assert_eq!(inbox.recv_batch(&mut got).await, Some(Batch::Frames));
        let texts: Vec<&str> = got.iter().map(|t| t.as_str()).collect();
        assert_eq!(texts, ["a", "b", "c"]);
        assert!(out.is_idle());
        assert!(
            matches!(inbox.recv_batch(&mut got).await, Some(Batch::Close(c)) if c.code == 4003)
        );
    }

    #[tokio::test]
    async fn the_writer_ends_when_every_sender_is_gone() {
        let (out, mut inbox) = pair(8);
        let session_copy = out.clone();
        out.try_send(Text::from("a")).expect("queued");
        drop(out);
        let waiter = tokio::spawn(async move {
            let mut got = VecDeque::new();
            let first = inbox.recv_batch(&mut got).await;
            let second = inbox.recv_batch(&mut got).await;
            (first, second, got.len())
        });
        tokio::task::yield_now().await;
        drop(session_copy);
        let (first, second, n) = waiter.await.expect("joined");
        assert_eq!(first, Some(Batch::Frames));
        assert_eq!(second, None);
        assert_eq!(n, 1);
    }

    #[tokio::test]
    async fn the_reader_hears_of_a_close() {
        let (out, _inbox) = pair(8);
        let signal = out.closing_signal();
        let waiter = tokio::spawn(async move { signal.closing().await });
        tokio::task::yield_now().await;
        out.close(close::RECONNECT);
        tokio::time::timeout(std::time::Duration::from_secs(5), waiter)
            .await
            .expect("in time")
            .expect("joined");
    }
}
