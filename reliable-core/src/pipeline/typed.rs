//! Typed handlers (feature `serde`): [`json_handler`] decodes each message's JSON payload
//! before the user's code runs, so that code takes the typed value.
//!
//! A payload that does not decode never reaches the user's code: the handler fails with a
//! permanent [`HandlerError`] (from [`DecodeError`](crate::message::DecodeError)), which the
//! pipeline dead-letters at once, the decode error as `x-dead-letter-reason`; no
//! [`RetryLayer`](super::RetryLayer) attempt, no requeue.

use std::fmt;
use std::future::Future;
use std::marker::PhantomData;

use async_trait::async_trait;
use serde::de::DeserializeOwned;

use super::{Handler, HandlerError};
use crate::message::Message;

/// A [`Handler`] that decodes the payload as JSON into `T` and hands the value, with the
/// message, to an async closure; see [`json_handler`].
pub struct JsonHandler<T, F> {
    f: F,
    // `fn() -> T`: the handler makes `T`s, it holds none, so it is `Send + Sync` for any `T`.
    _decodes: PhantomData<fn() -> T>,
}

/// Wraps an async closure `Fn(T, Message) -> Future<Output = Result<(), HandlerError>>` as a
/// [`Handler`] that first decodes each payload as JSON into `T`
/// ([`Message::decode_json`]). A payload that does not decode (or whose `content-type` is not
/// JSON) fails as permanent without calling the closure: the message is dead-lettered once,
/// with the decode error as its reason. Stack layers around it as around any handler.
///
/// ```
/// use reliable_core::memory::InMemoryBroker;
/// use reliable_core::pipeline::{json_handler, DeadLetter, HandlerBuilder, Pipeline};
/// use reliable_core::producer::{Producer, ProducerConfig};
/// use reliable_core::{Message, Transport};
///
/// #[derive(serde::Serialize, serde::Deserialize)]
/// struct Paid {
///     order: u64,
/// }
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let broker = InMemoryBroker::new();
/// broker.declare_queue("orders");
/// broker.declare_queue("orders.dlq");
/// let paid = Message::json(&Paid { order: 42 })?.with_destination("orders");
/// broker.transport().publish(&paid).await?;
///
/// let handler = HandlerBuilder::new(json_handler(|paid: Paid, _msg: Message| async move {
///     assert_eq!(paid.order, 42);
///     Ok(())
/// }))
/// .build();
/// let producer = Producer::new(broker.transport(), ProducerConfig::default());
/// let source = broker.consumer("orders").end_when_drained();
/// let stats = Pipeline::new(source, handler, DeadLetter::publish(producer, "orders.dlq"))
///     .run()
///     .await?;
/// assert_eq!(stats.succeeded, 1);
/// # Ok(())
/// # }
/// ```
pub fn json_handler<T, F, Fut>(f: F) -> JsonHandler<T, F>
where
    T: DeserializeOwned + Send,
    F: Fn(T, Message) -> Fut + Send + Sync,
    Fut: Future<Output = Result<(), HandlerError>> + Send,
{
    JsonHandler {
        f,
        _decodes: PhantomData,
    }
}

#[async_trait]
impl<T, F, Fut> Handler for JsonHandler<T, F>
where
    T: DeserializeOwned + Send,
    F: Fn(T, Message) -> Fut + Send + Sync,
    Fut: Future<Output = Result<(), HandlerError>> + Send,
{
    async fn handle(&self, msg: &Message) -> Result<(), HandlerError> {
        // Decoded before the closure runs: garbage never reaches the user's code.
        let value = msg.decode_json::<T>()?;
        (self.f)(value, msg.clone()).await
    }
}

impl<T, F: Clone> Clone for JsonHandler<T, F> {
    fn clone(&self) -> Self {
        Self {
            f: self.f.clone(),
            _decodes: PhantomData,
        }
    }
}

impl<T, F> fmt::Debug for JsonHandler<T, F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JsonHandler")
            .field("decodes", &std::any::type_name::<T>())
            .finish_non_exhaustive()
    }
}
