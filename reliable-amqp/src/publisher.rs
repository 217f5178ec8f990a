//! The confirming publisher: implements the core's [`Transport`] over a lapin channel
//! (loss-matrix rows L1, L2).
//!
//! * Every channel it opens is in confirm mode (or, with [`PublishMode::Transactions`], in
//!   transaction mode); every message is persistent (delivery mode 2) and published with
//!   `mandatory`; the message id travels as the AMQP `message-id` property and, with the
//!   idempotency key, as headers in the core's wire format.
//! * A publish resolves `Ok` only on the broker's `basic.ack` (invariant 1).
//! * An unroutable message is returned by the broker *and then acked*. lapin attaches a
//!   return to whichever confirm resolves next, and a multiple-ack resolves its confirms in no
//!   fixed order, so a per-channel confirm driver collects every return of a batch, keyed by
//!   the message id the return carries, before it decides any confirm of that batch: a
//!   returned message resolves [`PublishError::Unroutable`], never `Ok`.
//! * A publish waits for its confirm (or, with transactions, its commit) at most the settings'
//!   [`confirm_timeout`](AmqpSettings::confirm_timeout), then fails with the retryable
//!   [`PublishError::Timeout`]: the message is not known to be confirmed; resend it.
//! * When the channel or connection goes away, pending publishes fail with the retryable
//!   [`PublishError::ConnectionLost`] and the next publish re-opens a channel (backoff per
//!   [`ReconnectPolicy`](crate::settings::ReconnectPolicy)). The caller — usually the core's
//!   reliable producer — resends the same [`Message`], so the resend carries the original id.
//!
//! # Transactions, the slower alternative
//!
//! With [`AmqpSettings::transactional`] the channel is in transaction mode instead:
//! [`Transport::publish`] commits each message on its own (`tx.commit` waits for the broker to
//! have it durably), and [`AmqpPublisher::publish_batch`] commits a batch at once, rolling back
//! on failure so the whole batch can be retried. Each commit is a synchronous round trip with
//! an fsync, and only one transaction runs per channel at a time, so throughput is far below
//! confirms (which keep many publishes in flight); use it when a batch must commit as a whole.
//!
//! # Resend across recovery
//!
//! Put the publisher under the core's reliable producer
//! (`reliable_core::producer::Producer::new(publisher, config)`): it times out, backs off and
//! resends the same message after a `ConnectionLost`, and this publisher re-opens the channel
//! (and, for URL publishers, the connection) on the next attempt.
//!
//! ```no_run
//! use reliable_amqp::publisher::AmqpPublisher;
//! use reliable_amqp::settings::AmqpSettings;
//! use reliable_core::{Message, Transport};
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let publisher = AmqpPublisher::connect("amqp://guest:guest@127.0.0.1:5672/%2f", AmqpSettings::safe()).await?;
//! let msg = Message::new(&b"hello"[..]).with_routing_key("orders.eu"); // default exchange
//! publisher.publish(&msg).await?; // Ok only once the broker confirmed it
//!
//! // Or wrap a connection the application already has:
//! let conn = reliable_amqp::lapin::Connection::connect(
//!     "amqp://guest:guest@127.0.0.1:5672/%2f",
//!     Default::default(),
//! ).await?;
//! let publisher = AmqpPublisher::from_connection(conn, AmqpSettings::safe()).await?;
//! # let _ = publisher;
//! # Ok(()) }
//! ```

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use futures::future::{BoxFuture, Shared};
use futures::stream::FuturesUnordered;
use futures::{FutureExt, StreamExt};
use lapin::message::BasicReturnMessage;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::protocol::AMQPSoftError;
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, Connection};
use lapin::{Confirmation, PublisherConfirm};
use reliable_core::message::headers;
use reliable_core::{Message, PublishError, Transport};
use tokio::sync::{mpsc, oneshot, Mutex};
use tracing::Instrument;

use crate::connect::{retryable, Link, Source};
use crate::error::{soft_error, AmqpError};
use crate::settings::{AmqpSettings, PublishMode};

/// A publish refused, with the message handed back to the caller (invariant 2).
#[derive(Debug, thiserror::Error)]
#[error("{error}")]
pub struct Refused {
    /// Why it was not confirmed; [`PublishError::is_retryable`] says whether resending helps.
    pub error: PublishError,
    /// The message, unchanged: resend it (same id) or hand it on.
    pub message: Message,
}

/// A RabbitMQ publisher that resolves each publish only on the broker's confirm.
///
/// Cheap to clone (shared state); safe to use from many tasks at once. Implements the core's
/// [`Transport`], so the core's reliable producer can drive it.
#[derive(Clone)]
pub struct AmqpPublisher {
    inner: Arc<Inner>,
}

struct Inner {
    source: Source,
    settings: AmqpSettings,
    exchange: String,
    live: std::sync::Mutex<State>,
    generation: AtomicU64,
}

impl Inner {
    fn lock_state(&self) -> std::sync::MutexGuard<'_, State> {
        // The state is replaced whole, never left half-written: a poisoned lock is usable.
        self.live.lock().unwrap_or_else(|e| e.into_inner())
    }
}

type Opening = Shared<BoxFuture<'static, Result<Arc<LiveChannel>, lapin::Error>>>;

/// The publisher's channel: none, being opened (shared by all waiting callers), or open.
enum State {
    Idle,
    Opening(Opening),
    Live(Arc<LiveChannel>),
}

/// Opens a channel in the configured mode and starts its confirm driver.
async fn open_live(inner: &Inner) -> Result<Arc<LiveChannel>, lapin::Error> {
    let settings = &inner.settings;
    let mode = settings.publish_mode();
    let confirms = settings.publisher_confirms();
    let link: Link = inner
        .source
        .open(settings.reconnect(), |channel| async move {
            match mode {
                PublishMode::Transactions => channel.tx_select().await,
                PublishMode::Confirms if confirms => {
                    channel
                        .confirm_select(ConfirmSelectOptions::default())
                        .await
                }
                PublishMode::Confirms => Ok(()),
            }
        })
        .await?;
    let generation = inner.generation.fetch_add(1, Ordering::Relaxed) + 1;
    let (driver, pending) = mpsc::unbounded_channel();
    tokio::spawn(
        drive_confirms(link.channel.clone(), pending)
            .instrument(tracing::debug_span!("amqp_confirm_driver", generation)),
    );
    tracing::info!(
        generation,
        channel = link.channel.id(),
        target_broker = %inner.source.target(),
        "AMQP publisher channel open"
    );
    Ok(Arc::new(LiveChannel {
        generation,
        channel: link.channel,
        connection: link.connection,
        driver,
        tx: Mutex::new(()),
    }))
}

/// One open publisher channel, with its confirm driver.
struct LiveChannel {
    generation: u64,
    channel: Channel,
    /// Kept alive (and closed on drop) when the adapter owns the connection.
    connection: Option<Connection>,
    driver: mpsc::UnboundedSender<Pending>,
    /// Serialises transactions on the channel (transaction mode only).
    tx: Mutex<()>,
}

impl LiveChannel {
    fn usable(&self) -> bool {
        self.channel.status().connected() && !self.driver.is_closed()
    }
}

impl Drop for LiveChannel {
    fn drop(&mut self) {
        let Some(connection) = self.connection.take() else {
            return;
        };
        // Best effort: the connection is usually already gone when a channel is dropped.
        // Outside a runtime there is nothing to close it on; dropping it ends its I/O loop.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                let _ = connection
                    .close(200, "reliable publisher closing".into())
                    .await;
            });
        }
    }
}

impl fmt::Debug for AmqpPublisher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AmqpPublisher")
            .field("source", &self.inner.source)
            .field("exchange", &self.inner.exchange)
            .field("settings", &self.inner.settings)
            .finish()
    }
}

impl AmqpPublisher {
    /// Connects to `url` and opens a confirm-mode channel. The adapter owns the connection and
    /// re-opens it after a loss. The URL's credentials never appear in logs or errors. An
    /// unparsable URL fails at once with [`AmqpError::InvalidUrl`] (no connect attempt).
    pub async fn connect(url: &str, settings: AmqpSettings) -> Result<Self, AmqpError> {
        Self::start(Source::url(url)?, settings).await
    }

    /// Publishes on channels opened on an existing connection. After a channel loss the
    /// adapter opens a new channel on it; after a connection loss the owner must reconnect
    /// (publishes fail with the retryable [`PublishError::ConnectionLost`] meanwhile).
    pub async fn from_connection(
        connection: Connection,
        settings: AmqpSettings,
    ) -> Result<Self, AmqpError> {
        Self::start(Source::Connection(Arc::new(connection)), settings).await
    }

    /// Publishes on an existing channel, which is put in confirm (or transaction) mode. The
    /// adapter cannot re-open a channel it was handed: once it closes, publishes fail with
    /// [`PublishError::ConnectionLost`]. Prefer [`from_connection`](Self::from_connection).
    ///
    /// Do not publish on the channel elsewhere, nor call its `wait_for_confirms`: the adapter
    /// owns its confirms and returns (it uses `wait_for_confirms` itself to collect returns).
    pub async fn from_channel(channel: Channel, settings: AmqpSettings) -> Result<Self, AmqpError> {
        Self::start(Source::Channel(channel), settings).await
    }

    async fn start(source: Source, settings: AmqpSettings) -> Result<Self, AmqpError> {
        let publisher = Self {
            inner: Arc::new(Inner {
                source,
                settings,
                exchange: String::new(),
                live: std::sync::Mutex::new(State::Idle),
                generation: AtomicU64::new(0),
            }),
        };
        publisher
            .live()
            .await
            .map_err(|source| AmqpError::Connect {
                target: publisher.inner.source.target(),
                source,
            })?;
        Ok(publisher)
    }

    /// Sets the exchange used for messages without a destination (default: the AMQP default
    /// exchange `""`, which routes by queue name).
    pub fn with_default_exchange(self, exchange: impl Into<String>) -> Self {
        let exchange = exchange.into();
        let inner = match Arc::try_unwrap(self.inner) {
            Ok(mut inner) => {
                inner.exchange = exchange;
                inner
            }
            // Shared with clones: those keep their exchange and channel; this one opens its own.
            Err(shared) => Inner {
                source: shared.source.clone(),
                settings: shared.settings.clone(),
                exchange,
                live: std::sync::Mutex::new(State::Idle),
                generation: AtomicU64::new(0),
            },
        };
        Self {
            inner: Arc::new(inner),
        }
    }

    /// The settings in use.
    pub fn settings(&self) -> &AmqpSettings {
        &self.inner.settings
    }

    /// Publishes an owned message; on failure the message is handed back inside [`Refused`].
    pub async fn send(&self, message: Message) -> Result<(), Refused> {
        match self.publish(&message).await {
            Ok(()) => Ok(()),
            Err(error) => Err(Refused { error, message }),
        }
    }

    /// Transaction mode: publishes `batch` in one transaction (`tx.commit` once) and returns
    /// one result per message, in order. On a failed commit the transaction is rolled back
    /// and every message gets the (retryable) error; resend the batch with the same messages.
    /// Returned (unroutable) messages get [`PublishError::Unroutable`]. Slower than confirms;
    /// fails with [`PublishError::Fatal`] unless the settings use [`PublishMode::Transactions`].
    pub async fn publish_batch(&self, batch: &[Message]) -> Vec<Result<(), PublishError>> {
        if self.inner.settings.publish_mode() != PublishMode::Transactions {
            let error = PublishError::Fatal {
                reason:
                    "publish_batch needs PublishMode::Transactions (AmqpSettings::transactional())"
                        .to_owned(),
            };
            return batch.iter().map(|_| Err(error.clone())).collect();
        }
        match self.publish_tx(batch).await {
            Ok(results) => results,
            Err(error) => batch.iter().map(|_| Err(error.clone())).collect(),
        }
    }

    /// The current channel, or a freshly opened one.
    ///
    /// Opening runs in a task of its own, shared by every caller waiting for it: a caller
    /// that gives up (the core's attempt timeout drops its future) does not abort the open,
    /// so a slow broker start cannot make every attempt start over.
    async fn live(&self) -> Result<Arc<LiveChannel>, lapin::Error> {
        let opening = {
            let mut state = self.inner.lock_state();
            match &*state {
                State::Live(current) if current.usable() => return Ok(current.clone()),
                State::Opening(opening) => opening.clone(),
                State::Idle | State::Live(_) => {
                    let inner = self.inner.clone();
                    let task = tokio::spawn(async move {
                        let result = open_live(&inner).await;
                        *inner.lock_state() = match &result {
                            Ok(live) => State::Live(live.clone()),
                            Err(_) => State::Idle,
                        };
                        result
                    });
                    let opening = task
                        .map(|joined| {
                            joined.unwrap_or_else(|e| {
                                Err(std::io::Error::other(e.to_string()).into())
                            })
                        })
                        .boxed()
                        .shared();
                    *state = State::Opening(opening.clone());
                    opening
                }
            }
        };
        opening.await
    }

    /// Drops the channel of `generation` so the next publish re-opens one.
    fn invalidate(&self, generation: u64) {
        let mut state = self.inner.lock_state();
        if matches!(&*state, State::Live(l) if l.generation == generation) {
            *state = State::Idle;
        }
    }

    fn properties(&self, msg: &Message) -> BasicProperties {
        let mut table = FieldTable::default();
        for (name, value) in msg.wire_headers() {
            table.insert(
                ShortString::from(name),
                AMQPValue::LongString(LongString::from(value.as_bytes())),
            );
        }
        let mode = if self.inner.settings.persistent_messages() {
            2
        } else {
            1
        };
        BasicProperties::default()
            .with_message_id(ShortString::from(msg.id_text()))
            .with_delivery_mode(mode)
            .with_headers(table)
    }

    async fn basic_publish(
        &self,
        channel: &Channel,
        msg: &Message,
    ) -> Result<PublisherConfirm, lapin::Error> {
        let exchange = msg.destination().unwrap_or(&self.inner.exchange);
        let routing_key = msg.routing_key().unwrap_or_default();
        channel
            .basic_publish(
                ShortString::from(exchange),
                ShortString::from(routing_key),
                BasicPublishOptions {
                    mandatory: self.inner.settings.mandatory(),
                    immediate: false,
                },
                msg.payload(),
                self.properties(msg),
            )
            .await
    }

    async fn publish_confirmed(&self, msg: &Message) -> Result<(), PublishError> {
        let live = self.live().await.map_err(|e| classify(&e))?;
        let result = self.publish_on(&live, msg).await;
        if matches!(result, Err(PublishError::ConnectionLost { .. })) {
            self.invalidate(live.generation);
        }
        result
    }

    /// Publishes `msg` on `live` and waits for its confirm, at most the settings'
    /// [`confirm_timeout`](AmqpSettings::confirm_timeout); then [`PublishError::Timeout`].
    async fn publish_on(&self, live: &LiveChannel, msg: &Message) -> Result<(), PublishError> {
        let timeout = self.inner.settings.confirm_timeout();
        tokio::time::timeout(timeout, self.publish_on_unbounded(live, msg))
            .await
            .unwrap_or_else(|_| {
                tracing::warn!(message_id = %msg.id(), ?timeout, "no confirm within the confirm timeout");
                Err(PublishError::Timeout)
            })
    }

    async fn publish_on_unbounded(
        &self,
        live: &LiveChannel,
        msg: &Message,
    ) -> Result<(), PublishError> {
        let confirm = self
            .basic_publish(&live.channel, msg)
            .await
            .map_err(|e| classify(&e))?;
        if !self.inner.settings.publisher_confirms() {
            // Explicit opt-out (DataLoss::NoPublisherConfirms): written to the socket is all
            // we know.
            drop(confirm);
            return Ok(());
        }
        let (reply, outcome) = oneshot::channel();
        live.driver
            .send(Pending {
                id: msg.id_text().to_owned(),
                confirm,
                reply,
            })
            .map_err(|_| lost("the confirm driver stopped with its channel"))?;
        outcome
            .await
            .unwrap_or_else(|_| Err(lost("the channel closed before the confirm")))
    }

    async fn publish_tx(
        &self,
        batch: &[Message],
    ) -> Result<Vec<Result<(), PublishError>>, PublishError> {
        let live = self.live().await.map_err(|e| classify(&e))?;
        let timeout = self.inner.settings.confirm_timeout();
        let result = tokio::time::timeout(timeout, self.commit_on(&live, batch))
            .await
            .unwrap_or_else(|_| {
                tracing::warn!(
                    messages = batch.len(),
                    ?timeout,
                    "no tx.commit-ok within the confirm timeout"
                );
                if !matches!(self.inner.source, Source::Channel(_)) {
                    // The channel may hold this batch's publishes uncommitted: close it (which
                    // discards them) rather than let the next batch commit them.
                    let channel = live.channel.clone();
                    tokio::spawn(async move {
                        let _ = channel.close(200, "transaction timed out".into()).await;
                    });
                    self.invalidate(live.generation);
                }
                Err(PublishError::Timeout)
            });
        if matches!(result, Err(PublishError::ConnectionLost { .. })) {
            self.invalidate(live.generation);
        }
        result
    }

    /// Publishes and commits `batch` in one transaction, unbounded in time: the caller
    /// ([`publish_tx`](Self::publish_tx)) bounds it by the confirm timeout.
    async fn commit_on(
        &self,
        live: &LiveChannel,
        batch: &[Message],
    ) -> Result<Vec<Result<(), PublishError>>, PublishError> {
        let _transaction = live.tx.lock().await;
        let attempt = async {
            for msg in batch {
                self.basic_publish(&live.channel, msg).await?;
            }
            live.channel.tx_commit().await?;
            // Returns arrive before commit-ok; outside confirm mode lapin keeps them here.
            live.channel.wait_for_confirms().await
        };
        match attempt.await {
            Ok(returned) => {
                let mut returns = Returns::default();
                returned.into_iter().for_each(|r| returns.add(r));
                Ok(batch
                    .iter()
                    .map(|msg| match returns.take(msg.id_text()) {
                        Some(r) => Err(unroutable(&r)),
                        None => Ok(()),
                    })
                    .collect())
            }
            Err(e) => {
                let error = classify(&e);
                if !matches!(error, PublishError::ConnectionLost { .. }) {
                    let _ = live.channel.tx_rollback().await;
                }
                tracing::warn!(%error, messages = batch.len(), "AMQP transaction rolled back");
                Err(error)
            }
        }
    }
}

#[async_trait]
impl Transport for AmqpPublisher {
    async fn publish(&self, msg: &Message) -> Result<(), PublishError> {
        let span = tracing::debug_span!(
            "amqp_publish",
            message_id = %msg.id(),
            idempotency_key = %msg.idempotency_key(),
        );
        async {
            let result = match self.inner.settings.publish_mode() {
                PublishMode::Confirms => self.publish_confirmed(msg).await,
                PublishMode::Transactions => self
                    .publish_tx(std::slice::from_ref(msg))
                    .await
                    .and_then(only_result),
            };
            if let Err(error) = &result {
                tracing::debug!(%error, retryable = error.is_retryable(), "publish not confirmed");
            }
            result
        }
        .instrument(span)
        .await
    }
}

/// The one result of a one-message transaction. No result means no commit is known to stand
/// behind the message, so it is never `Ok` (invariant 1).
fn only_result(mut results: Vec<Result<(), PublishError>>) -> Result<(), PublishError> {
    match (results.pop(), results.is_empty()) {
        (Some(result), true) => result,
        (None, _) => Err(PublishError::Fatal {
            reason: "the transaction reported no result for the message, so no commit is known \
                     to include it"
                .to_owned(),
        }),
        (Some(_), false) => Err(PublishError::Fatal {
            reason: "the transaction reported several results for one message".to_owned(),
        }),
    }
}

/// Returns kept for publishes not yet handed to the driver, at most.
const MAX_UNMATCHED_RETURNS: usize = 4096;

/// A publish waiting for its confirm, held by the channel's driver.
struct Pending {
    id: String,
    confirm: PublisherConfirm,
    reply: oneshot::Sender<Result<(), PublishError>>,
}

/// Returned messages not yet matched to their publish, by message id (several per id when
/// the same message was published more than once).
#[derive(Default)]
struct Returns(HashMap<String, VecDeque<BasicReturnMessage>>);

impl Returns {
    fn add(&mut self, message: BasicReturnMessage) {
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

    fn take(&mut self, id: &str) -> Option<BasicReturnMessage> {
        let queue = self.0.get_mut(id)?;
        let message = queue.pop_front();
        if queue.is_empty() {
            self.0.remove(id);
        }
        message
    }
}

/// A text header of `properties`.
pub(crate) fn header(properties: &BasicProperties, name: &str) -> Option<String> {
    let value = properties.headers().as_ref()?.inner().get(name)?.clone();
    match value {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.to_string()),
        _ => None,
    }
}

/// The per-channel confirm driver: awaits every pending confirm and decides each one only
/// after the returns of its batch are collected (see the module docs).
async fn drive_confirms(channel: Channel, mut incoming: mpsc::UnboundedReceiver<Pending>) {
    type Resolved = (
        String,
        oneshot::Sender<Result<(), PublishError>>,
        lapin::Result<Confirmation>,
    );
    let mut waiting = FuturesUnordered::new();
    let mut returns = Returns::default();
    let mut open = true;
    while open || !waiting.is_empty() {
        tokio::select! {
            next = incoming.recv(), if open => match next {
                Some(Pending { id, confirm, reply }) => {
                    waiting.push(async move { (id, reply, confirm.await) });
                }
                None => open = false,
            },
            Some(first) = waiting.next(), if !waiting.is_empty() => {
                let first: Resolved = first;
                // A multiple-ack resolves its confirms one by one under lapin's lock; taking
                // that lock (wait_for_confirms does, synchronously) waits until the whole
                // batch is resolved. Then every confirm of the batch is ready to collect.
                if let Some(Ok(returned)) = channel.wait_for_confirms().now_or_never() {
                    returned.into_iter().for_each(|r| returns.add(r));
                }
                let mut batch = vec![first];
                while let Some(Some(resolved)) = waiting.next().now_or_never() {
                    batch.push(resolved);
                }
                for (id, reply, result) in decide_batch(batch, &mut returns) {
                    tracing::trace!(message_id = %id, ?result, "confirm decided");
                    let _ = reply.send(result);
                }
                if returns.0.len() > MAX_UNMATCHED_RETURNS {
                    // Returns of publishes that were cancelled before reaching the driver
                    // (their caller resends them); bounded so they cannot pile up.
                    tracing::warn!(count = returns.0.len(), "dropping returns no publish claimed");
                    returns.0.clear();
                }
            }
        }
    }
}

/// Decides a batch of resolved confirms. Every return the batch carries is collected first
/// (lapin may have attached it to any confirm of the batch, or to an earlier one), then each
/// publish is decided by its own message id: returned -> Unroutable, else ack -> Ok, nack ->
/// Nacked, error -> classified.
fn decide_batch<T>(
    batch: Vec<(String, T, lapin::Result<Confirmation>)>,
    returns: &mut Returns,
) -> Vec<(String, T, Result<(), PublishError>)> {
    let mut collected = Vec::with_capacity(batch.len());
    for (id, extra, result) in batch {
        let outcome = match result {
            Ok(confirmation) => {
                let acked = confirmation.is_ack();
                if let Some(r) = confirmation.take_message() {
                    returns.add(r);
                }
                Ok(acked)
            }
            Err(e) => Err(classify(&e)),
        };
        collected.push((id, extra, outcome));
    }
    collected
        .into_iter()
        .map(|(id, extra, outcome)| {
            let result = match outcome {
                Ok(acked) => match returns.take(&id) {
                    Some(r) => Err(unroutable(&r)),
                    None if acked => Ok(()),
                    None => Err(PublishError::Nacked {
                        reason: "basic.nack: the queue refused it (full with reject-publish, \
                                 or a broker-side error)"
                            .to_owned(),
                    }),
                },
                Err(e) => Err(e),
            };
            (id, extra, result)
        })
        .collect()
}

fn unroutable(r: &BasicReturnMessage) -> PublishError {
    PublishError::Unroutable {
        reason: format!(
            "{} {} (exchange `{}`, routing key `{}`)",
            r.reply_code, r.reply_text, r.delivery.exchange, r.delivery.routing_key
        ),
    }
}

fn lost(reason: &str) -> PublishError {
    PublishError::ConnectionLost {
        reason: reason.to_owned(),
    }
}

/// Classifies a lapin error of a publish: lost connection/channel is retryable; a channel
/// closed by the broker for a configuration reason is fatal.
pub(crate) fn classify(error: &lapin::Error) -> PublishError {
    match soft_error(error) {
        Some((AMQPSoftError::NOTFOUND, text)) => PublishError::Fatal {
            reason: format!("{text}: declare the exchange first"),
        },
        Some((AMQPSoftError::ACCESSREFUSED, text)) => PublishError::Fatal {
            reason: format!("{text}: grant the user write access"),
        },
        Some((AMQPSoftError::PRECONDITIONFAILED, text)) => PublishError::Fatal { reason: text },
        _ if retryable(error) => lost(&error.to_string()),
        _ => PublishError::Fatal {
            reason: error.to_string(),
        },
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
    fn a_return_attached_to_another_confirm_goes_to_its_own_publish() {
        // A multiple-ack resolved W and X together and lapin attached X's return to W.
        let batch = vec![
            (
                "w".to_owned(),
                (),
                Ok(Confirmation::Ack(Some(returned("x")))),
            ),
            ("x".to_owned(), (), Ok(Confirmation::Ack(None))),
        ];
        let decided = decide_batch(batch, &mut Returns::default());
        assert_eq!(decided[0].2, Ok(()), "w was routed");
        assert!(matches!(decided[1].2, Err(PublishError::Unroutable { .. })));
    }

    #[test]
    fn a_return_that_arrived_before_its_publish_was_decided_is_kept_for_it() {
        let mut returns = Returns::default();
        let first = decide_batch(
            vec![(
                "w".to_owned(),
                (),
                Ok(Confirmation::Ack(Some(returned("x")))),
            )],
            &mut returns,
        );
        assert_eq!(first[0].2, Ok(()));
        let later = decide_batch(
            vec![("x".to_owned(), (), Ok(Confirmation::Ack(None)))],
            &mut returns,
        );
        assert!(matches!(later[0].2, Err(PublishError::Unroutable { .. })));
        assert!(returns.0.is_empty());
    }

    #[test]
    fn a_transaction_without_a_result_is_never_ok() {
        assert!(matches!(
            only_result(Vec::new()),
            Err(PublishError::Fatal { .. })
        ));
        assert!(matches!(
            only_result(vec![Ok(()), Ok(())]),
            Err(PublishError::Fatal { .. })
        ));
        assert_eq!(only_result(vec![Ok(())]), Ok(()));
        assert_eq!(
            only_result(vec![Err(PublishError::Timeout)]),
            Err(PublishError::Timeout)
        );
    }

    #[tokio::test]
    async fn an_unparsable_url_fails_at_once_without_quoting_it() {
        let started = std::time::Instant::now();
        let error = AmqpPublisher::connect("amqp:user:secret@host", AmqpSettings::safe())
            .await
            .unwrap_err();
        assert!(matches!(error, AmqpError::InvalidUrl), "{error:?}");
        let text = format!("{error} {error:?}");
        assert!(!text.contains("secret"), "{text}");
        assert!(text.contains("could not be parsed"), "{text}");
        assert!(
            started.elapsed() < std::time::Duration::from_secs(1),
            "retried"
        );
        let error =
            crate::AmqpConsumer::connect("amqp://user:12/secret@host/v", "q", AmqpSettings::safe())
                .await
                .unwrap_err();
        assert!(matches!(error, AmqpError::InvalidUrl), "{error:?}");
    }

    #[test]
    fn nack_and_connection_loss_are_classified() {
        let io = lapin::Error::from(std::io::Error::from(std::io::ErrorKind::ConnectionReset));
        let decided = decide_batch(
            vec![
                ("n".to_owned(), (), Ok(Confirmation::Nack(None))),
                ("l".to_owned(), (), Err(io)),
            ],
            &mut Returns::default(),
        );
        assert!(matches!(decided[0].2, Err(PublishError::Nacked { .. })));
        assert!(matches!(
            decided[1].2,
            Err(PublishError::ConnectionLost { .. })
        ));
        assert!(decided
            .iter()
            .all(|d| d.2.as_ref().unwrap_err().is_retryable()));
    }
}
