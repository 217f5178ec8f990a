//! [`Completion`]: how a transport reports the broker's answer to one attempt without a future
//! per message, and the [`Answers`] queue the producer's driver drains.
//!
//! The driver gives every attempt a [`Completion`] naming it (the message's ticket and the
//! attempt's number). A transport that tracks confirms itself (a Kafka delivery callback, an
//! AMQP confirm driver) keeps the completion with the message and calls
//! [`complete`](Completion::complete) once the broker answers; answers land in one queue per
//! producer that the driver takes in bulk, waking the driver once per batch rather than once
//! per message. The number makes answers to an attempt the driver already gave up on (timed
//! out, then resent) harmless: only the answer to the current attempt counts.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};

use futures::task::AtomicWaker;
use tokio::sync::oneshot;

use super::PublishError;

/// Names one attempt of one message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Token {
    pub(crate) ticket: u64,
    pub(crate) attempt: u32,
}

/// One broker answer on its way to the driver.
pub(crate) type Answer = (Token, Result<(), PublishError>);

/// The answers of one producer's attempts, taken by its driver in bulk.
#[derive(Default)]
pub(crate) struct Answers {
    queue: Mutex<Vec<Answer>>,
    waker: AtomicWaker,
}

impl Answers {
    fn lock(&self) -> MutexGuard<'_, Vec<Answer>> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn push(&self, answer: Answer) {
        let first = {
            let mut queue = self.lock();
            queue.push(answer);
            queue.len() == 1
        };
        // A non-empty queue already woke the driver, which takes everything in it.
        if first {
            self.waker.wake();
        }
    }

    /// Moves every answer so far into `into` (empty on entry); registers `cx` to be woken by
    /// the next one when there is none.
    pub(crate) fn take(&self, cx: &mut Context<'_>, into: &mut Vec<Answer>) {
        self.waker.register(cx.waker());
        std::mem::swap(&mut *self.lock(), into);
    }

    /// A completion for `token`, reporting here.
    pub(crate) fn completion(self: &Arc<Self>, token: Token) -> Completion {
        Completion {
            to: Some(To::Driver(Arc::clone(self))),
            token,
        }
    }
}

/// The way a transport reports the broker's answer to one attempt (see
/// [`Transport::submit`](super::Transport::submit)): call [`complete`](Self::complete) exactly
/// once, from any thread, when the broker confirmed or refused the message.
///
/// A completion dropped without an answer reports [`PublishError::ConnectionLost`], so an
/// attempt whose client went away (a purged queue, a dropped delivery callback) is resent
/// rather than left to its timeout. A transport that answers through an
/// [`Attempt::Future`](super::Attempt::Future) instead calls [`dismiss`](Self::dismiss).
///
/// A transport that answers by callback can serve a single
/// [`publish`](super::Transport::publish) through [`Completion::channel`]:
///
/// ```
/// use reliable_core::Completion;
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let (done, answer) = Completion::channel();
/// std::thread::spawn(move || done.complete(Ok(()))); // e.g. a client's delivery callback
/// assert_eq!(answer.await, Ok(()));
/// # }
/// ```
#[must_use = "complete the attempt when the broker answers, or dismiss it"]
pub struct Completion {
    /// `None` once answered or dismissed.
    to: Option<To>,
    token: Token,
}

/// Where a completion's answer goes.
enum To {
    /// The producer's driver.
    Driver(Arc<Answers>),
    /// One waiting caller ([`Completion::channel`]).
    Caller(oneshot::Sender<Result<(), PublishError>>),
}

impl Completion {
    /// A completion whose answer goes to the returned future, for one publish outside a
    /// producer.
    pub fn channel() -> (Self, Answered) {
        let (tx, rx) = oneshot::channel();
        let done = Self {
            to: Some(To::Caller(tx)),
            token: Token {
                ticket: 0,
                attempt: 0,
            },
        };
        (done, Answered(rx))
    }

    /// Reports the broker's answer: `Ok` only for a durable confirm (invariant 1).
    pub fn complete(mut self, result: Result<(), PublishError>) {
        self.send(result);
    }

    /// Gives the completion up without an answer: the transport answers through the
    /// [`Attempt::Future`](super::Attempt::Future) it returns.
    pub fn dismiss(mut self) {
        self.to = None;
    }

    fn send(&mut self, result: Result<(), PublishError>) {
        match self.to.take() {
            Some(To::Driver(answers)) => answers.push((self.token, result)),
            Some(To::Caller(tx)) => drop(tx.send(result)),
            None => {}
        }
    }
}

impl Drop for Completion {
    fn drop(&mut self) {
        if self.to.is_some() {
            self.send(Err(dropped()));
        }
    }
}

fn dropped() -> PublishError {
    PublishError::ConnectionLost {
        reason: "the transport dropped the attempt without an answer".into(),
    }
}

/// The answer of a [`Completion::channel`], resolving once the completion is completed (or
/// dropped: [`PublishError::ConnectionLost`]).
#[derive(Debug)]
pub struct Answered(oneshot::Receiver<Result<(), PublishError>>);

impl Future for Answered {
    type Output = Result<(), PublishError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Pin::new(&mut self.0)
            .poll(cx)
            .map(|answer| answer.unwrap_or_else(|_| Err(dropped())))
    }
}

impl std::fmt::Debug for Completion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Completion")
            .field("ticket", &self.token.ticket)
            .field("attempt", &self.token.attempt)
            .field("answered", &self.to.is_none())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::task::noop_waker_ref;

    fn token(ticket: u64) -> Token {
        Token { ticket, attempt: 1 }
    }

    #[test]
    fn answers_arrive_in_bulk_and_a_dropped_completion_reports_a_lost_connection() {
        let answers = Arc::new(Answers::default());
        answers.completion(token(1)).complete(Ok(()));
        drop(answers.completion(token(2)));
        answers.completion(token(3)).dismiss();
        let mut taken = Vec::new();
        answers.take(&mut Context::from_waker(noop_waker_ref()), &mut taken);
        assert_eq!(taken.len(), 2);
        assert_eq!(taken[0], (token(1), Ok(())));
        assert!(matches!(
            taken[1],
            (t, Err(PublishError::ConnectionLost { .. })) if t == token(2)
        ));
    }
}
