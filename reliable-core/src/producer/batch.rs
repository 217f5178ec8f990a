//! [`BatchHandle`]: one handle for a whole batch sent with
//! [`Producer::send_many`](super::Producer::send_many), resolving once every message of the
//! batch is settled to how many were confirmed and the messages handed back.
//!
//! One shared state per batch replaces a channel per message: the driver counts each settled
//! message into it and wakes the handle once, when the last one is settled. Handed-back
//! messages keep their outbox claims (feature `outbox`) until the handle yields them, as a
//! [`SendHandle`](super::SendHandle) does: a batch handle dropped before that leaves them in the
//! outbox for the next replay (invariant 10).

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};

use futures::task::AtomicWaker;

use crate::message::MessageId;

use super::handle::Outcome;
use super::SendError;

/// What a batch came to.
#[derive(Debug)]
#[non_exhaustive]
pub struct BatchOutcome {
    /// Messages the broker confirmed.
    pub confirmed: usize,
    /// The messages handed back, in send order, each with the reason (see [`SendError`]).
    pub handed_back: Vec<SendError>,
}

impl BatchOutcome {
    /// Whether every message of the batch was confirmed.
    pub fn all_confirmed(&self) -> bool {
        self.handed_back.is_empty()
    }
}

/// The state one batch's messages settle into.
pub(super) struct BatchState {
    left: AtomicUsize,
    confirmed: AtomicUsize,
    /// Handed-back outcomes by position in the batch.
    handed_back: Mutex<Vec<(usize, MessageId, Outcome)>>,
    waker: AtomicWaker,
}

impl BatchState {
    fn lock(&self) -> MutexGuard<'_, Vec<(usize, MessageId, Outcome)>> {
        self.handed_back.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn one_settled(&self) {
        if self.left.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.waker.wake();
        }
    }
}

impl Drop for BatchState {
    /// The handle is gone and so is every reply: outcomes nobody received are reported (their
    /// claims end here, so their outbox entries stay for replay).
    fn drop(&mut self) {
        let handed_back = std::mem::take(
            self.handed_back
                .get_mut()
                .unwrap_or_else(|p| p.into_inner()),
        );
        for (_, id, outcome) in handed_back {
            outcome.unreceived(id);
        }
    }
}

/// A new batch of `size` messages: its handle and the replies the driver settles into.
pub(super) fn batch(size: usize) -> (BatchHandle, Vec<BatchReply>) {
    let state = Arc::new(BatchState {
        left: AtomicUsize::new(size),
        confirmed: AtomicUsize::new(0),
        handed_back: Mutex::new(Vec::new()),
        waker: AtomicWaker::new(),
    });
    let replies = (0..size)
        .map(|position| BatchReply {
            state: Some(Arc::clone(&state)),
            position,
            id: None,
        })
        .collect();
    (BatchHandle { state, size }, replies)
}

/// One message's place in its batch; settled once by the driver. Dropped unsettled (the
/// driver stopped with the runtime), the message counts as [`SendError::Aborted`].
pub(super) struct BatchReply {
    state: Option<Arc<BatchState>>,
    position: usize,
    id: Option<MessageId>,
}

impl BatchReply {
    /// Names the message this reply settles (for the `Aborted` report).
    pub(super) fn for_message(mut self, id: MessageId) -> Self {
        self.id = Some(id);
        self
    }

    /// Settles the message into its batch.
    pub(super) fn send(mut self, id: MessageId, outcome: Outcome) {
        let Some(state) = self.state.take() else {
            return;
        };
        match outcome.result {
            Ok(_) => {
                state.confirmed.fetch_add(1, Ordering::Relaxed);
            }
            Err(_) => state.lock().push((self.position, id, outcome)),
        }
        state.one_settled();
    }
}

impl Drop for BatchReply {
    fn drop(&mut self) {
        if let (Some(state), Some(id)) = (self.state.take(), self.id) {
            let outcome = Outcome {
                result: Err(SendError::Aborted { id }),
                claim: None,
            };
            state.lock().push((self.position, id, outcome));
            state.one_settled();
        }
    }
}

/// Resolves once every message of its batch is settled, to a [`BatchOutcome`].
///
/// Dropping it cancels nothing: the messages are still delivered. Messages handed back after
/// the handle was dropped are logged (and, with an outbox, stay in it for the next replay).
#[must_use = "a batch handle resolves to the messages handed back; await it"]
pub struct BatchHandle {
    state: Arc<BatchState>,
    size: usize,
}

impl BatchHandle {
    /// How many messages the batch holds.
    pub fn len(&self) -> usize {
        self.size
    }

    /// Whether the batch is empty (it then resolves at once).
    pub fn is_empty(&self) -> bool {
        self.size == 0
    }
}

impl std::fmt::Debug for BatchHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BatchHandle")
            .field("size", &self.size)
            .field("left", &self.state.left.load(Ordering::Relaxed))
            .finish()
    }
}

impl Future for BatchHandle {
    type Output = BatchOutcome;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<BatchOutcome> {
        self.state.waker.register(cx.waker());
        if self.state.left.load(Ordering::Acquire) > 0 {
            return Poll::Pending;
        }
        let mut handed_back = std::mem::take(&mut *self.state.lock());
        handed_back.sort_by_key(|(position, _, _)| *position);
        let handed_back = handed_back
            .into_iter()
            .filter_map(|(_, _, outcome)| {
                if let Some(claim) = outcome.claim {
                    // Handed to the caller right now: it may leave the outbox.
                    claim.remove();
                }
                outcome.result.err()
            })
            .collect();
        Poll::Ready(BatchOutcome {
            confirmed: self.state.confirmed.load(Ordering::Relaxed),
            handed_back,
        })
    }
}
