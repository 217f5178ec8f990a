//! Confirm tracking for one confirm-mode channel (loss-matrix rows L1, L2; invariant 9).
//!
//! lapin hands a `basic.return` to whichever confirm resolves next (or to a confirm nobody
//! holds any more), and settles a multiple-ack in map order, so a return often rides on
//! another publish's confirm. A publish is therefore decided here only once every return that
//! could belong to it is in hand:
//!
//! * **Registration cannot be cancelled half-way.** [`Confirms::register`] polls lapin's
//!   `basic_publish` once under the channel's registry lock (lapin assigns the delivery tag
//!   and queues the frames in that first poll) and hands the publish to the driver in the
//!   same synchronous step. From then on the driver owns it, whatever happens to the caller:
//!   no confirm is ever dropped, so no return is ever lost with it.
//! * **Decisions in delivery-tag order, after the returns are accounted for.** The broker
//!   sends a message's return before its ack, and lapin attaches each waiting return to the
//!   next confirm it completes. It follows that once every publish up to X has resolved,
//!   every return of a publish up to X has been attached to a confirm that already resolved
//!   (possibly one registered after X). The driver decides X only when every publish up to X
//!   has resolved *and* it holds and has collected every publish registered so far; then X's
//!   return, if any, is in its table, matched by message id.
//! * Returns that no publish claims can only be left when the channel is quiescent (nothing
//!   registered is undecided); only then are they dropped.
//! * **One undecided copy at a time.** [`Inflight`] lists, per message id, the publisher's
//!   undecided attempt across all its channels. A resend of a message whose earlier attempt is
//!   still undecided on a suspect channel waits for that attempt instead of writing a second
//!   copy: the earlier one may still land when a silent link heals (its confirm then settles
//!   both), and once the suspect connection is declared dead its attempts fail retryable and
//!   the resend goes out on the fresh connection (loss-matrix row L12). An attempt decided
//!   after its caller gave up keeps its outcome for the resend (a few minutes at most), so a
//!   confirm that arrives between two attempts is not followed by a second copy.
//!
//! A channel closed by the broker fails every pending confirm with the same error; only the
//! publish the error names is refused for good (see [`classify_for`]), the others are
//! retryable and go out again on a fresh channel.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::Poll;

use futures::stream::FuturesUnordered;
use futures::{FutureExt, StreamExt};
use lapin::message::BasicReturnMessage;
use lapin::types::AMQPValue;
use lapin::{BasicProperties, Channel, Confirmation, PublisherConfirm};
use reliable_core::message::headers;
use reliable_core::PublishError;
use tokio::sync::{mpsc, watch};

use super::classify::{classify_for, lost, unroutable};
use super::inflight::Inflight;

/// What a publish was sent to, to tell whether a channel error names it.
#[derive(Clone, Debug)]
pub(super) struct Target {
    /// The message id (also the key returns are matched by).
    pub(super) id: String,
    /// The exchange it was published to.
    pub(super) exchange: String,
    /// The body size in bytes.
    pub(super) size: usize,
    /// What makes two publishes attempts of one message: the id and the destination (a
    /// dead-letter copy keeps its message's id but goes elsewhere).
    attempt_key: String,
}

impl Target {
    /// The target of a publish of message `id` to `exchange` with `routing_key`.
    pub(super) fn new(id: &str, exchange: &str, routing_key: &str, size: usize) -> Self {
        Self {
            id: id.to_owned(),
            exchange: exchange.to_owned(),
            size,
            attempt_key: format!("{exchange}\0{routing_key}\0{id}"),
        }
    }

    /// A target to `exchange` with an empty routing key, for tests.
    #[cfg(test)]
    pub(super) fn for_test(id: &str, exchange: &str, size: usize) -> Self {
        Self::new(id, exchange, "", size)
    }

    /// The key of this message and destination in [`Inflight`].
    pub(super) fn attempt_key(&self) -> &str {
        &self.attempt_key
    }
}

pub(super) type Outcome = Result<(), PublishError>;
/// Where an attempt's outcome is published once decided (`None` until then).
pub(super) type Decision = watch::Receiver<Option<Outcome>>;
type Publishing = Pin<Box<dyn Future<Output = lapin::Result<PublisherConfirm>> + Send>>;

/// A publish handed to the driver, in registration order.
struct Registered {
    seq: u64,
    target: Target,
    publishing: Publishing,
    reply: watch::Sender<Option<Outcome>>,
    /// This attempt's token in [`Inflight`].
    token: u64,
}

/// The confirm side of one channel: the registry publishes go through and its driver's inbox.
pub(super) struct Confirms {
    /// Publishes registered so far; held while lapin assigns a delivery tag, so this order is
    /// lapin's delivery-tag order.
    registry: Arc<Mutex<u64>>,
    driver: mpsc::UnboundedSender<Registered>,
    inflight: Arc<Inflight>,
    /// Publishes registered so far against publishes decided so far.
    settlement: Settlement,
}

/// Whether every publish registered on one channel is decided: the registrations (counted
/// under the registry lock) against the decisions (counted by the driver).
#[derive(Clone)]
pub(super) struct Settlement {
    registry: Arc<Mutex<u64>>,
    decided: watch::Receiver<u64>,
}

impl Settlement {
    /// Whether a publish registered on the channel is not decided yet.
    pub(super) fn undecided(&self) -> bool {
        // A stopped driver (its sender gone) decides nothing more.
        self.decided.has_changed().is_ok() && *lock(&self.registry) > *self.decided.borrow()
    }

    /// Resolves once every publish registered on the channel so far is decided (or the driver
    /// is gone, which decides nothing more).
    pub(super) fn settled(&self) -> impl Future<Output = ()> + Send + 'static {
        let registered = *lock(&self.registry);
        let mut decided = self.decided.clone();
        async move {
            let _ = decided.wait_for(|d| *d >= registered).await;
        }
    }
}

impl Confirms {
    /// The channel's confirm tracking, with its driver spawned on the current runtime.
    ///
    /// The driver holds `channel` until every publish registered on it is decided: lapin
    /// closes a channel when its last handle is dropped, and a close under undecided publishes
    /// would fail them and turn each into a resend (a duplicate when the broker had it).
    pub(super) fn start(channel: Channel, span: tracing::Span, inflight: Arc<Inflight>) -> Self {
        let registry = Arc::new(Mutex::new(0));
        let (driver, inbox) = mpsc::unbounded_channel();
        let (count, decided) = watch::channel(0);
        tokio::spawn(tracing::Instrument::instrument(
            drive(channel, registry.clone(), inbox, inflight.clone(), count),
            span,
        ));
        Self {
            settlement: Settlement {
                registry: registry.clone(),
                decided,
            },
            registry,
            driver,
            inflight,
        }
    }

    /// Whether every publish registered on this channel is decided, now and later.
    pub(super) fn settlement(&self) -> Settlement {
        self.settlement.clone()
    }

    /// Whether the driver still runs (it stops only once every sender is gone).
    pub(super) fn is_running(&self) -> bool {
        !self.driver.is_closed()
    }

    /// Registers `publish` (lapin's `basic_publish` future) with the driver and resolves, in
    /// its first poll, to the [`Pending`] wait for its outcome. lapin assigns the delivery tag
    /// and queues the frames in that same poll, so publishes registered one after another go
    /// out in that order. Registration and hand-off are one synchronous step: dropping the
    /// [`Pending`] (a cancelled caller) leaves the publish tracked to its end.
    pub(super) fn register(
        &self,
        target: Target,
        publish: impl Future<Output = lapin::Result<PublisherConfirm>> + Send + 'static,
    ) -> impl Future<Output = Result<Pending, PublishError>> + Send + 'static {
        let mut publishing: Publishing = Box::pin(publish);
        let (reply, outcome) = watch::channel(None);
        let driver = self.driver.clone();
        let registry = self.registry.clone();
        let inflight = self.inflight.clone();
        let mut target = Some(target);
        let mut reply = Some(reply);
        let mut outcome = Some(outcome);
        std::future::poll_fn(move |cx| {
            let mut next = lock(&registry);
            // lapin assigns the delivery tag and queues the frames in this first poll.
            let first = publishing.as_mut().poll(cx);
            let seq = *next;
            *next += 1;
            let (Some(target), Some(reply), Some(outcome)) =
                (target.take(), reply.take(), outcome.take())
            else {
                return Poll::Ready(Err(lost("publish polled after registration")));
            };
            let token = inflight.insert(target.attempt_key(), reply.subscribe());
            let publishing: Publishing = match first {
                Poll::Ready(result) => Box::pin(std::future::ready(result)),
                Poll::Pending => std::mem::replace(
                    &mut publishing,
                    Box::pin(std::future::pending::<lapin::Result<PublisherConfirm>>()),
                ),
            };
            let sent = driver.send(Registered {
                seq,
                target,
                publishing,
                reply,
                token,
            });
            drop(next);
            Poll::Ready(
                sent.map(|_| Pending(outcome))
                    .map_err(|_| lost("the confirm driver stopped with its channel")),
            )
        })
    }
}

/// A registered publish: the wait for the driver's decision on it.
pub(super) struct Pending(Decision);

impl Pending {
    /// Waits for the decision: the broker's ack (`Ok`), or why the publish is refused.
    pub(super) async fn decided(mut self) -> Outcome {
        match self.0.wait_for(Option::is_some).await {
            Ok(decided) => decided
                .clone()
                .unwrap_or_else(|| Err(lost("the channel closed before the confirm"))),
            Err(_) => Err(lost("the channel closed before the confirm")),
        }
    }
}

fn lock(registry: &Mutex<u64>) -> MutexGuard<'_, u64> {
    // A counter is never left half-written: a poisoned lock is usable.
    registry.lock().unwrap_or_else(|e| e.into_inner())
}

/// A registered publish not yet decided.
struct Entry {
    target: Target,
    reply: watch::Sender<Option<Outcome>>,
    token: u64,
    /// `None` until its confirm (or error) arrived.
    resolved: Option<Result<bool, lapin::Error>>,
}

/// The per-channel confirm driver (see the module docs for the rule it follows).
async fn drive(
    _channel: Channel,
    registry: Arc<Mutex<u64>>,
    mut inbox: mpsc::UnboundedReceiver<Registered>,
    inflight: Arc<Inflight>,
    decided: watch::Sender<u64>,
) {
    let mut entries: BTreeMap<u64, Entry> = BTreeMap::new();
    let mut received = 0u64;
    let mut waiting = FuturesUnordered::new();
    let mut returns = Returns::default();
    let mut open = true;
    let mut decisions = 0u64;
    loop {
        tokio::select! {
            next = inbox.recv(), if open => match next {
                Some(r) => {
                    received += 1;
                    admit(r, &mut entries, &mut waiting);
                }
                None => open = false,
            },
            Some((seq, result)) = waiting.next(), if !waiting.is_empty() => {
                record(seq, result, &mut entries, &mut returns);
            }
            else => break,
        }
        // Everything already registered and everything already resolved, then the count of
        // registrations: a confirm that carries a return of a resolved publish resolved before
        // it, so it was registered before this count was read.
        while let Ok(r) = inbox.try_recv() {
            received += 1;
            admit(r, &mut entries, &mut waiting);
        }
        while let Some(Some((seq, result))) = waiting.next().now_or_never() {
            record(seq, result, &mut entries, &mut returns);
        }
        if received < *lock(&registry) {
            continue; // a registration is on its way to the inbox
        }
        while let Some(entry) = entries.first_entry() {
            if entry.get().resolved.is_none() {
                break;
            }
            let Entry {
                target,
                reply,
                token,
                resolved,
            } = entry.remove();
            let outcome = decide(&target, resolved, &mut returns);
            tracing::trace!(message_id = %target.id, ?outcome, "confirm decided");
            // Counted before the outcome is sent: a caller still waiting holds its receiver
            // until it has the outcome.
            let watchers = reply.receiver_count();
            inflight.decided(target.attempt_key(), token, &outcome, watchers);
            reply.send_replace(Some(outcome));
            decisions += 1;
        }
        decided.send_if_modified(|d| std::mem::replace(d, decisions) != decisions);
        if entries.is_empty() && !returns.0.is_empty() {
            // Quiescent: every publish of this channel is decided, so no publish can claim
            // these (messages published on the channel outside this adapter).
            tracing::warn!(
                count = returns.0.len(),
                "dropping returns no publish of this channel claims"
            );
            returns.0.clear();
        }
        if !open && entries.is_empty() {
            break;
        }
    }
}

type Resolving = Pin<Box<dyn Future<Output = (u64, lapin::Result<Confirmation>)> + Send>>;

fn admit(
    r: Registered,
    entries: &mut BTreeMap<u64, Entry>,
    waiting: &mut FuturesUnordered<Resolving>,
) {
    let Registered {
        seq,
        target,
        publishing,
        reply,
        token,
    } = r;
    entries.insert(
        seq,
        Entry {
            target,
            reply,
            token,
            resolved: None,
        },
    );
    waiting.push(Box::pin(async move {
        let result = match publishing.await {
            Ok(confirm) => confirm.await,
            Err(e) => Err(e),
        };
        (seq, result)
    }));
}

fn record(
    seq: u64,
    result: lapin::Result<Confirmation>,
    entries: &mut BTreeMap<u64, Entry>,
    returns: &mut Returns,
) {
    let resolved = result.map(|confirmation| {
        let acked = confirmation.is_ack();
        if let Some(r) = confirmation.take_message() {
            returns.add(r);
        }
        acked
    });
    if let Some(entry) = entries.get_mut(&seq) {
        entry.resolved = Some(resolved);
    }
}

/// The outcome of one resolved publish, once the returns it could own are collected:
/// returned -> Unroutable, else ack -> Ok, nack -> Nacked, error -> [`classify_for`].
fn decide(
    target: &Target,
    resolved: Option<Result<bool, lapin::Error>>,
    returns: &mut Returns,
) -> Outcome {
    match resolved {
        Some(Ok(acked)) => match returns.take(&target.id) {
            Some(r) => Err(unroutable(&r)),
            None if acked => Ok(()),
            None => Err(PublishError::Nacked {
                reason: "basic.nack: the queue refused it (full with reject-publish, or a \
                         broker-side error)"
                    .to_owned(),
            }),
        },
        Some(Err(e)) => Err(classify_for(&e, target)),
        None => Err(lost("the publish was decided before it resolved")),
    }
}

/// Returned messages not yet matched to their publish, by message id (several per id when
/// the same message was published more than once).
#[derive(Default)]
pub(super) struct Returns(HashMap<String, VecDeque<BasicReturnMessage>>);

impl Returns {
    pub(super) fn add(&mut self, message: BasicReturnMessage) {
        let id = message
            .delivery
            .properties
            .message_id()
            .as_ref()
            .map(|id| id.to_string())
            .or_else(|| header(&message.delivery.properties, headers::MESSAGE_ID))
            .unwrap_or_default();
        self.0.entry(id).or_default().push_back(message);
    }

    pub(super) fn take(&mut self, id: &str) -> Option<BasicReturnMessage> {
        let queue = self.0.get_mut(id)?;
        let message = queue.pop_front();
        if queue.is_empty() {
            self.0.remove(id);
        }
        message
    }
}

/// A text header of `properties`.
fn header(properties: &BasicProperties, name: &str) -> Option<String> {
    let value = properties.headers().as_ref()?.inner().get(name)?.clone();
    match value {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.to_string()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lapin::message::Delivery;

    fn returned(id: &str) -> BasicReturnMessage {
        let mut delivery = Delivery::mock(0, "".into(), "nowhere".into(), false, b"x".to_vec());
        delivery.properties = BasicProperties::default().with_message_id(id.into());
        BasicReturnMessage {
            delivery,
            reply_code: 312,
            reply_text: "NO_ROUTE".into(),
        }
    }

    #[test]
    fn a_return_attached_to_another_publish_goes_to_its_own() {
        let mut returns = Returns::default();
        returns.add(returned("x"));
        assert_eq!(
            decide(&Target::for_test("w", "", 1), Some(Ok(true)), &mut returns),
            Ok(())
        );
        assert!(matches!(
            decide(&Target::for_test("x", "", 1), Some(Ok(true)), &mut returns),
            Err(PublishError::Unroutable { .. })
        ));
        assert!(returns.0.is_empty());
    }

    #[test]
    fn nack_and_connection_loss_are_classified() {
        let io = lapin::Error::from(std::io::Error::from(std::io::ErrorKind::ConnectionReset));
        let mut returns = Returns::default();
        assert!(matches!(
            decide(&Target::for_test("n", "", 1), Some(Ok(false)), &mut returns),
            Err(PublishError::Nacked { .. })
        ));
        let lost = decide(&Target::for_test("l", "", 1), Some(Err(io)), &mut returns);
        assert!(matches!(lost, Err(PublishError::ConnectionLost { .. })));
        assert!(lost.unwrap_err().is_retryable());
    }
}
