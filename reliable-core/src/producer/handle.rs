//! [`SendHandle`]: the caller's end of one delivery, and [`Confirmed`], what it resolves to.
//!
//! The producer's driver sends the outcome through a oneshot channel together with the message's
//! outbox [claim](crate::outbox) (feature `outbox`). Whoever ends up holding that outcome
//! decides the entry's fate: the handle removes the entry when it hands an error carrying the
//! message to the caller; an outcome nobody receives (handle dropped before or after the
//! hand-back) drops the claim, which keeps the entry for the next replay (invariant 10).

use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use tokio::sync::oneshot;

use crate::message::MessageId;

use super::SendError;

/// The broker confirmed a message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Confirmed {
    /// The confirmed message's id.
    pub id: MessageId,
    /// Attempts it took (1 when no resend was needed).
    pub attempts: u32,
    /// Time from the first send to the confirm.
    pub latency: Duration,
}

/// This process's hold on the message's outbox entry (see [`crate::outbox`]).
#[cfg(feature = "outbox")]
pub(super) type Claim = crate::outbox::Claim;

/// Without the `outbox` feature there is no entry to hold.
#[cfg(not(feature = "outbox"))]
#[derive(Debug)]
pub(super) enum Claim {}

#[cfg(not(feature = "outbox"))]
impl Claim {
    pub(super) fn remove(self) {
        match self {}
    }
}

/// A settled delivery on its way to the caller.
#[derive(Debug)]
pub(super) struct Outcome {
    pub(super) result: Result<Confirmed, SendError>,
    /// Held while the message is handed back and not yet received; `None` once confirmed (the
    /// entry is removed then) or without an outbox.
    pub(super) claim: Option<Claim>,
}

impl Outcome {
    /// The outcome reached nobody: its handle was dropped. A handed-back message stays in the
    /// outbox if there is one (the claim ends as `self` drops); without one it is gone.
    pub(super) fn unreceived(self, id: MessageId) {
        let Err(e) = &self.result else {
            return; // confirmed: nothing is lost
        };
        if self.claim.is_some() {
            tracing::warn!(message_id = %id, error = %e, "message handed back, but its send handle was dropped; it stays in the outbox and the next replay_outbox sends it again");
        } else {
            tracing::error!(message_id = %id, error = %e, "message handed back, but its send handle was dropped; nobody holds the message now");
        }
    }
}

/// Resolves when the message is confirmed (`Ok`) or handed back (`Err`).
///
/// Dropping the handle does not cancel the delivery: the producer keeps resending until the
/// message is settled. A dropped handle never counts as having received the message back
/// (invariant 10): with an outbox (feature `outbox`), a handed-back message whose handle was
/// dropped (before the hand-back, or after it without being awaited) stays in the outbox and is
/// sent again by the next `Producer::replay_outbox`; its entry
/// is removed only when the handle yields the error carrying it. Without an outbox such a
/// message is logged at `error` level with its id and is gone: await your handles.
#[derive(Debug)]
pub struct SendHandle {
    id: MessageId,
    rx: oneshot::Receiver<Outcome>,
}

impl SendHandle {
    pub(super) fn new(id: MessageId, rx: oneshot::Receiver<Outcome>) -> Self {
        Self { id, rx }
    }

    /// The id of the message this handle tracks.
    pub fn id(&self) -> MessageId {
        self.id
    }
}

impl Future for SendHandle {
    type Output = Result<Confirmed, SendError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let id = self.id;
        let Ok(Outcome { result, claim }) = ready!(Pin::new(&mut self.rx).poll(cx)) else {
            // The driver was dropped unfinished (runtime shutdown); its claim ended
            // with it, so the outbox entry, if any, stays for replay.
            return Poll::Ready(Err(SendError::Aborted { id }));
        };
        if let Some(claim) = claim {
            // The message is handed to the caller right now: it may leave the outbox.
            claim.remove();
        }
        Poll::Ready(result)
    }
}

impl Drop for SendHandle {
    fn drop(&mut self) {
        // After `close` the driver can no longer send; it reports an outcome it still
        // holds itself. An outcome already sent is taken here and reported unreceived.
        self.rx.close();
        if let Ok(outcome) = self.rx.try_recv() {
            outcome.unreceived(self.id);
        }
    }
}
