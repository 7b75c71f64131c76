//! A connection's outbound queue: bounded, single consumer, and empty when idle.
//!
//! tokio's bounded channel allocates a block of 32 slots when it is created and keeps
//! up to two once it has been used, ~4 KiB per connection that idles with nothing
//! queued: at 10,000 connections, 40 MiB for nothing. This queue is a `VecDeque` that
//! grows as frames come and is freed when it drains, so an idle connection holds no
//! buffer at all. A push takes a short uncontended lock; the receiver waits on a
//! `Notify`, whose stored permit means a push between an empty check and the wait is
//! never missed.
//!
//! Policy when full (the count bound; `PeerShared` adds the byte bound): the frame is
//! refused as `Full` and the caller decides (a stored message waits in the store, a
//! live-only frame marks a slow consumer).

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;
use tokio::sync::mpsc::error::{TryRecvError, TrySendError};

use super::{Outbound, lock};

/// Slots a drained queue may keep (frames arrive in bursts; keeping a small buffer
/// avoids reallocating for each burst, keeping a large one costs idle memory).
const KEEP: usize = 4;

#[derive(Debug)]
struct Shared {
    state: Mutex<State>,
    ready: Notify,
    cap: usize,
}

#[derive(Debug, Default)]
struct State {
    queue: VecDeque<Outbound>,
    /// The receiver closed or dropped: nothing more is accepted.
    closed: bool,
    /// The sender dropped: the receiver ends once the queue is empty.
    orphaned: bool,
}

/// The sending side (held by the connection's `PeerShared`).
#[derive(Debug)]
pub(crate) struct OutTx(Arc<Shared>);

/// The receiving side (held by the session).
#[derive(Debug)]
pub(crate) struct OutRx(Arc<Shared>);

/// A queue of at most `cap` frames.
pub(crate) fn channel(cap: usize) -> (OutTx, OutRx) {
    let shared = Arc::new(Shared {
        state: Mutex::new(State::default()),
        ready: Notify::new(),
        cap: cap.max(1),
    });
    (OutTx(shared.clone()), OutRx(shared))
}

impl OutTx {
    /// Queues `out` without waiting.
    ///
    /// # Errors
    /// `out` back, as `Full` (at the bound) or `Closed` (the receiver is gone).
    pub(crate) fn try_send(&self, out: Outbound) -> Result<(), TrySendError<Outbound>> {
        let mut st = lock(&self.0.state);
        if st.closed {
            return Err(TrySendError::Closed(out));
        }
        if st.queue.len() >= self.0.cap {
            return Err(TrySendError::Full(out));
        }
        st.queue.push_back(out);
        drop(st);
        self.0.ready.notify_one();
        Ok(())
    }
}

impl Drop for OutTx {
    fn drop(&mut self) {
        lock(&self.0.state).orphaned = true;
        self.0.ready.notify_one();
    }
}

impl OutRx {
    /// The next frame, or `None` once the sender is gone and the queue is empty.
    /// Cancel-safe: a frame is only taken when it is returned.
    pub(crate) async fn recv(&mut self) -> Option<Outbound> {
        loop {
            match self.try_recv() {
                Ok(out) => return Some(out),
                Err(TryRecvError::Disconnected) => return None,
                Err(TryRecvError::Empty) => self.0.ready.notified().await,
            }
        }
    }

    /// The next frame if one is queued.
    ///
    /// # Errors
    /// `Empty`, or `Disconnected` once the sender is gone (or the queue closed) and
    /// nothing is left.
    pub(crate) fn try_recv(&mut self) -> Result<Outbound, TryRecvError> {
        let mut st = lock(&self.0.state);
        match st.queue.pop_front() {
            Some(out) => {
                if st.queue.is_empty() && st.queue.capacity() > KEEP {
                    st.queue = VecDeque::new();
                }
                Ok(out)
            }
            None if st.orphaned || st.closed => Err(TryRecvError::Disconnected),
            None => Err(TryRecvError::Empty),
        }
    }

    /// Refuses new frames; those already queued can still be taken.
    pub(crate) fn close(&mut self) {
        lock(&self.0.state).closed = true;
    }
}

impl Drop for OutRx {
    fn drop(&mut self) {
        let mut st = lock(&self.0.state);
        st.closed = true;
        st.queue = VecDeque::new();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::extract::ws::Utf8Bytes;

    fn frame(s: &str) -> Outbound {
        Outbound::Frame(Utf8Bytes::from(s.to_owned()))
    }

    fn text(o: Outbound) -> String {
        match o {
            Outbound::Frame(t) | Outbound::Stored { frame: t, .. } => t.as_str().to_owned(),
        }
    }

    #[test]
    fn bounded_in_order_and_freed_when_drained() {
        let (tx, mut rx) = channel(40);
        for i in 0..40 {
            tx.try_send(frame(&i.to_string())).expect("room");
        }
        assert!(matches!(
            tx.try_send(frame("x")),
            Err(TrySendError::Full(_))
        ));
        for i in 0..40 {
            assert_eq!(text(rx.try_recv().expect("queued")), i.to_string());
        }
        assert!(matches!(rx.try_recv(), Err(TryRecvError::Empty)));
        assert_eq!(
            lock(&rx.0.state).queue.capacity(),
            0,
            "a drained queue holds nothing"
        );
    }

    #[test]
    fn closing_refuses_new_frames_and_keeps_queued_ones() {
        let (tx, mut rx) = channel(4);
        tx.try_send(frame("a")).expect("room");
        rx.close();
        assert!(matches!(
            tx.try_send(frame("b")),
            Err(TrySendError::Closed(_))
        ));
        assert_eq!(text(rx.try_recv().expect("queued")), "a");
        assert!(matches!(rx.try_recv(), Err(TryRecvError::Disconnected)));
        drop(rx);
        let (tx, rx) = channel(4);
        drop(rx);
        assert!(matches!(
            tx.try_send(frame("c")),
            Err(TrySendError::Closed(_))
        ));
    }

    #[tokio::test]
    async fn a_waiting_receiver_wakes_and_ends_with_its_sender() {
        let (tx, mut rx) = channel(4);
        let waiter = tokio::spawn(async move {
            let first = rx.recv().await.map(text);
            let second = rx.recv().await.map(text);
            (first, second)
        });
        tokio::task::yield_now().await;
        tx.try_send(frame("hello")).expect("room");
        drop(tx);
        let (first, second) = waiter.await.expect("no panic");
        assert_eq!(first.as_deref(), Some("hello"));
        assert_eq!(second, None);
    }
}
