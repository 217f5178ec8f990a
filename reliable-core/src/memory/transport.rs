//! [`InMemoryTransport`], the producer side of the in-memory broker: the hand-off (stored,
//! refused or lost, per the injected fault) and the confirm.

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

enum Then {
    Confirm,
    Fail(PublishError),
    Never,
    ConfirmAfter(Duration),
}

impl InMemoryTransport {
    /// The hand-off: the broker stores (or, under a fault, refuses or loses) the message at
    /// once, in call order. A refusal is returned here; what the confirm does is the `Then`.
    fn hand_off(&self, msg: &Message) -> Result<(Then, watch::Receiver<u64>), PublishError> {
        let inner = &self.broker.inner;
        let then = {
            let mut st = self.broker.lock();
            st.publish_log.push(msg.id());
            let fault = if st.silent {
                Some(PublishFault::LoseMessage)
            } else {
                st.publish_faults.pop_front()
            };
            let queue = msg.destination().unwrap_or(DEFAULT_QUEUE);
            let size = msg.payload().len();
            let (store, then) = match fault {
                None => (true, Then::Confirm),
                Some(PublishFault::DropConfirm) => (true, Then::Never),
                Some(PublishFault::LoseMessage) => (false, Then::Never),
                Some(PublishFault::Nack) => (
                    false,
                    Then::Fail(PublishError::Nacked {
                        reason: "injected nack".into(),
                    }),
                ),
                Some(PublishFault::Fail(e)) => (false, Then::Fail(e)),
                Some(PublishFault::Delay(d)) => (true, Then::ConfirmAfter(d)),
                Some(PublishFault::ConnectionLost { stored }) => (
                    stored,
                    Then::Fail(PublishError::ConnectionLost {
                        reason: "injected connection loss".into(),
                    }),
                ),
            };
            if let Some(limit) = st.max_message_size.filter(|l| size > *l) {
                return Err(PublishError::TooLarge { size, limit });
            }
            let Some(q) = st.queues.get_mut(queue) else {
                return Err(PublishError::Unroutable {
                    reason: format!("no queue named {queue:?}"),
                });
            };
            if store {
                q.ready.push_back((msg.clone(), false));
            }
            // Subscribed under the lock: a connection loss after this fails the wait below.
            (then, inner.connection.subscribe())
        };
        inner.changed.notify_waiters();
        if let (Then::Fail(e), _) = then {
            return Err(e);
        }
        Ok(then)
    }
}

/// The confirm of a handed-off message, failed by a connection loss while it waits.
async fn confirm(then: Then, mut connection: watch::Receiver<u64>) -> Result<(), PublishError> {
    let lost = async move {
        let _ = connection.changed().await;
        Err(PublishError::ConnectionLost {
            reason: "connection lost while waiting for the confirm".into(),
        })
    };
    match then {
        Then::Confirm => Ok(()),
        Then::Fail(e) => Err(e),
        Then::Never => lost.await,
        Then::ConfirmAfter(d) => tokio::select! {
            _ = tokio::time::sleep(d) => Ok(()),
            lost = lost => lost,
        },
    }
}

/// The broker takes a message in the submission (refusals included) and confirms it in the
/// attempt (by callback when at once), so a producer's messages land in its send order per queue (its lane).
#[async_trait]
impl Transport for InMemoryTransport {
    async fn publish(&self, msg: &Message) -> Result<(), PublishError> {
        let (then, connection) = self.hand_off(msg)?;
        confirm(then, connection).await
    }

    /// Answers through `done`: at once for a confirm; a delayed confirm from a task (failed
    /// by a connection loss first); a confirm that never comes is held by the broker until a
    /// connection loss fails it.
    fn submit(self: Arc<Self>, msg: Arc<Message>, done: Completion) -> Submission {
        let (then, mut connection) = match self.hand_off(&msg) {
            Ok(handed) => handed,
            Err(e) => {
                done.dismiss();
                return Submission::Now(Err(e));
            }
        };
        match then {
            Then::Confirm => done.complete(Ok(())),
            Then::Fail(e) => done.complete(Err(e)),
            Then::Never => {
                let mut st = self.broker.lock();
                if connection.has_changed().unwrap_or(true) {
                    drop(st);
                    done.complete(Err(PublishError::ConnectionLost {
                        reason: "connection lost while waiting for the confirm".into(),
                    }));
                } else {
                    st.held.push(done);
                }
            }
            Then::ConfirmAfter(delay) => {
                tokio::spawn(async move {
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => done.complete(Ok(())),
                        _ = connection.changed() => done.complete(Err(PublishError::ConnectionLost {
                            reason: "connection lost while waiting for the confirm".into(),
                        })),
                    }
                });
            }
        }
        Submission::Now(Ok(Attempt::Callback))
    }

    fn lane(&self, msg: &Message) -> u64 {
        use std::hash::BuildHasher;
        rustc_hash::FxBuildHasher.hash_one(msg.destination().unwrap_or(DEFAULT_QUEUE))
    }
}
