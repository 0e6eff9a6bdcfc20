//! The per-connection send queue shared by a connection's writer and its session.
//!
//! The session puts frames in with `try_send` and never waits: a full queue means the client
//! is not reading fast enough, and it is cut off (close 4001) instead of stalling everyone
//! else. A close the connection or session asks for normally travels through the queue, after
//! the frames already in it; a close for a client whose queue is full goes around the queue
//! and interrupts a write that is blocked on the socket.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::{Notify, mpsc, watch};

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

#[derive(Debug)]
struct Control {
    urgent: Mutex<Option<Close>>,
    closing: AtomicBool,
    notify: Notify,
    /// Tells the connection's reader that a close began, so it starts waiting for the
    /// client's side of it even when the client sends nothing.
    closing_tx: watch::Sender<bool>,
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
#[derive(Debug, Clone)]
pub struct Outbox {
    tx: mpsc::Sender<Out>,
    ctl: Arc<Control>,
}

/// The receiving side, owned by the connection's writer.
#[derive(Debug)]
pub struct Inbox {
    rx: mpsc::Receiver<Out>,
    ctl: Arc<Control>,
}

/// Waits for an urgent close (see [`Inbox::watch`]).
#[derive(Debug)]
pub struct Watch(Arc<Control>);

impl Watch {
    /// Completes when an urgent close is requested.
    pub async fn urgent_close(&self) -> Close {
        loop {
            self.0.notify.notified().await;
            if let Some(c) = self.0.take_urgent() {
                return c;
            }
        }
    }
}

impl Control {
    fn take_urgent(&self) -> Option<Close> {
        self.urgent.lock().ok().and_then(|mut s| s.take())
    }
}

/// A new queue holding at most `capacity` frames.
pub fn pair(capacity: usize) -> (Outbox, Inbox) {
    let (tx, rx) = mpsc::channel(capacity.max(1));
    let ctl = Arc::new(Control {
        urgent: Mutex::new(None),
        closing: AtomicBool::new(false),
        notify: Notify::new(),
        closing_tx: watch::Sender::new(false),
    });
    (
        Outbox {
            tx,
            ctl: ctl.clone(),
        },
        Inbox { rx, ctl },
    )
}

impl Outbox {
    /// Queues a frame without waiting.
    pub fn try_send(&self, frame: Text) -> Result<(), SendError> {
        if self.ctl.closing.load(Ordering::Relaxed) {
            return Err(SendError::Gone);
        }
        self.tx.try_send(Out::Frame(frame)).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => SendError::Full,
            mpsc::error::TrySendError::Closed(_) => SendError::Gone,
        })
    }

    /// True when nothing is waiting to be written (ticks are only sent to such clients).
    pub fn is_idle(&self) -> bool {
        self.tx.capacity() == self.tx.max_capacity()
    }

    /// Closes after the frames already queued; if the queue is full, closes at once.
    /// Only the first close of a connection counts.
    pub fn close(&self, close: Close) {
        if self.ctl.closing.swap(true, Ordering::AcqRel) {
            return;
        }
        self.ctl.closing_tx.send_replace(true);
        if let Err(mpsc::error::TrySendError::Full(Out::Close(close))) =
            self.tx.try_send(Out::Close(close))
        {
            self.urgent(close);
        }
    }

    /// Closes at once, dropping whatever is still queued (for clients that stopped reading).
    pub fn close_now(&self, close: Close) {
        self.ctl.closing.store(true, Ordering::Release);
        self.ctl.closing_tx.send_replace(true);
        self.urgent(close);
    }

    fn urgent(&self, close: Close) {
        if let Ok(mut slot) = self.ctl.urgent.lock() {
            slot.get_or_insert(close);
        }
        self.ctl.notify.notify_one();
    }

    /// Whether a close was asked for.
    pub fn is_closing(&self) -> bool {
        self.ctl.closing.load(Ordering::Acquire)
    }

    /// Changes to true when a close begins.
    pub fn closing_signal(&self) -> watch::Receiver<bool> {
        self.ctl.closing_tx.subscribe()
    }

    /// Same connection?
    pub fn same(&self, other: &Outbox) -> bool {
        Arc::ptr_eq(&self.ctl, &other.ctl)
    }
}

impl Inbox {
    /// The next item; an urgent close wins over queued frames. `None` when every sender is gone.
    pub async fn recv(&mut self) -> Option<Out> {
        loop {
            tokio::select! {
                biased;
                () = self.ctl.notify.notified() => {
                    if let Some(c) = self.ctl.take_urgent() {
                        return Some(Out::Close(c));
                    }
                }
                item = self.rx.recv() => return item,
            }
        }
    }

    /// A handle that waits for an urgent close while the writer is busy with the socket.
    pub fn watch(&self) -> Watch {
        Watch(self.ctl.clone())
    }

    /// Takes a queued item without waiting.
    pub fn try_recv(&mut self) -> Option<Out> {
        self.rx.try_recv().ok()
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
}
