//! [`InMemoryTransport`], the producer side of the in-memory broker: the hand-off (stored,
//! refused or lost, per the injected fault) and the confirm.
//!
//! A publish costs one lock of the broker: the hand-off logs it, applies its fault, stores a
//! copy of the message and, for a confirm that never comes, holds its completion, all under that
//! one lock; consumers are notified only when one waits. A confirm that comes at once is
//! answered inline: no task, no timer, no subscription to connection losses.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::watch;

use super::{InMemoryBroker, PublishFault, DEFAULT_QUEUE};
use crate::message::Message;
use crate::transport::{Attempt, Completion, PublishError, Submission, Transport};

/// The producer side of [`InMemoryBroker`].
#[derive(Clone, Debug)]
pub struct InMemoryTransport {
    pub(super) broker: InMemoryBroker,
}

/// What the confirm of a handed-off message does.
enum Then {
    /// Confirm at once.
    Confirm,
    /// Never confirm: the broker holds the attempt's completion and fails it on a connection
    /// loss.
    Held,
    /// Never confirm: fail once the connection is lost (subscribed during the hand-off).
    Never(watch::Receiver<u64>),
    /// Confirm after the delay, or fail if the connection is lost first (subscribed during the
    /// hand-off).
    After(Duration, watch::Receiver<u64>),
}

/// What the injected fault makes of a publish, before the checks of size and route.
enum Fate {
    Confirm,
    Fail(PublishError),
    Never,
    After(Duration),
}

fn lost() -> PublishError {
    PublishError::ConnectionLost {
        reason: "connection lost while waiting for the confirm".into(),
    }
}

impl InMemoryTransport {
    /// The hand-off: the broker stores (or, under a fault, refuses or loses) the message at
    /// once, in call order, all under one lock. A refusal (an injected nack or failure
    /// included) is the `Err`. For a confirm that never comes the broker takes `done`, when
    /// given, to fail it on a connection loss ([`Then::Held`]); otherwise it leaves `done` as
    /// it is.
    fn hand_off(&self, msg: &Message, done: &mut Option<Completion>) -> Result<Then, PublishError> {
        let broker = &self.broker;
        let mut st = broker.lock();
        st.publish_log.push(msg.id());
        let fault = if st.silent {
            Some(PublishFault::LoseMessage)
        } else {
            st.publish_faults.pop_front()
        };
        let (store, fate) = match fault {
            None => (true, Fate::Confirm),
            Some(PublishFault::DropConfirm) => (true, Fate::Never),
            Some(PublishFault::LoseMessage) => (false, Fate::Never),
            Some(PublishFault::Nack) => (
                false,
                Fate::Fail(PublishError::Nacked {
                    reason: "injected nack".into(),
                }),
            ),
            Some(PublishFault::Fail(e)) => (false, Fate::Fail(e)),
            Some(PublishFault::Delay(d)) => (true, Fate::After(d)),
            Some(PublishFault::ConnectionLost { stored }) => (
                stored,
                Fate::Fail(PublishError::ConnectionLost {
                    reason: "injected connection loss".into(),
                }),
            ),
        };
        let size = msg.payload().len();
        if let Some(limit) = st.max_message_size.filter(|l| size > *l) {
            return Err(PublishError::TooLarge { size, limit });
        }
        let queue = msg.destination().unwrap_or(DEFAULT_QUEUE);
        let Some(q) = st.queues.get_mut(queue) else {
            return Err(PublishError::Unroutable {
                reason: format!("no queue named {queue:?}"),
            });
        };
        if store {
            q.ready.push_back((msg.clone(), false));
        }
        // Held or subscribed under the lock: a connection loss after the hand-off fails it.
        let then = match fate {
            Fate::Confirm => Ok(Then::Confirm),
            Fate::Fail(e) => Err(e),
            Fate::Never => match done.take() {
                Some(done) => {
                    st.held.push(done);
                    Ok(Then::Held)
                }
                None => Ok(Then::Never(broker.inner.connection.subscribe())),
            },
            Fate::After(delay) => Ok(Then::After(delay, broker.inner.connection.subscribe())),
        };
        drop(st);
        if store {
            broker.changed();
        }
        then
    }
}

/// The confirm of a handed-off message, failed by a connection loss while it waits.
async fn confirm(then: Then) -> Result<(), PublishError> {
    match then {
        Then::Confirm => Ok(()),
        // Its completion is answered by the broker, not here.
        Then::Held => std::future::pending().await,
        Then::Never(mut connection) => {
            let _ = connection.changed().await;
            Err(lost())
        }
        Then::After(delay, mut connection) => tokio::select! {
            _ = tokio::time::sleep(delay) => Ok(()),
            _ = connection.changed() => Err(lost()),
        },
    }
}

/// The broker takes a message in the submission (refusals included) and confirms it in the
/// attempt (by callback when at once), so a producer's messages land in its send order per queue (its lane).
#[async_trait]
impl Transport for InMemoryTransport {
    async fn publish(&self, msg: &Message) -> Result<(), PublishError> {
        let then = self.hand_off(msg, &mut None)?;
        confirm(then).await
    }

    /// Answers through `done`: at once for a confirm; a delayed confirm from a task (failed
    /// by a connection loss first); a confirm that never comes is held by the broker until a
    /// connection loss fails it.
    fn submit(self: Arc<Self>, msg: Arc<Message>, done: Completion) -> Submission {
        let mut slot = Some(done);
        let then = self.hand_off(&msg, &mut slot);
        let Some(done) = slot else {
            return Submission::Now(Ok(Attempt::Callback)); // held by the broker
        };
        match then {
            Err(e) => {
                done.dismiss();
                return Submission::Now(Err(e));
            }
            Ok(Then::Confirm) => done.complete(Ok(())),
            Ok(Then::After(delay, mut connection)) => {
                tokio::spawn(async move {
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => done.complete(Ok(())),
                        _ = connection.changed() => done.complete(Err(lost())),
                    }
                });
            }
            // Not reached: given a completion, the hand-off holds it rather than subscribe.
            Ok(then @ (Then::Held | Then::Never(_))) => {
                done.dismiss();
                return Submission::Now(Ok(Attempt::Future(Box::pin(confirm(then)))));
            }
        }
        Submission::Now(Ok(Attempt::Callback))
    }

    fn lane(&self, msg: &Message) -> u64 {
        use std::hash::BuildHasher;
        rustc_hash::FxBuildHasher.hash_one(msg.destination().unwrap_or(DEFAULT_QUEUE))
    }

    /// Always `Some(true)`: the broker lives in this process. A
    /// [`lose_connection`](super::InMemoryBroker::lose_connection) fails the confirms waiting
    /// at that moment, and the next publish goes through at once.
    fn connected(&self) -> Option<bool> {
        Some(true)
    }
}
