//! [`DedupeLayer`]: runs the handler at most once per idempotency key (loss-matrix row L8), and
//! keeps the key's lease alive while the handler runs and until the key is recorded (row L11).

use std::panic::AssertUnwindSafe;
use std::pin::pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures::FutureExt;
use tokio::time::Instant;
use tracing::Instrument;

mod lease;

use lease::{keep_all, Lease};

use super::{Handler, HandlerError, Layer};
use crate::backoff::BackoffPolicy;
use crate::idempotency::{Completion, IdempotencyStore, LeaseToken, Reservation};
use crate::message::{IdempotencyKey, Message};

/// Why the [`DedupeLayer`] did not run a message's handler. Carried as the source of a
/// [`HandlerError`] of kind [`Unavailable`](crate::pipeline::ErrorKind::Unavailable): the
/// pipeline requeues the message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DedupeError {
    /// Another worker still held the message's key when this copy stopped waiting. The message
    /// is requeued and will be deduplicated once that worker completes the key; to wait longer
    /// in place, raise [`DedupeLayer::with_in_progress_wait`].
    #[error("idempotency key {key} is still held by another worker after waiting {waited:?}; the message will be requeued (raise DedupeLayer::with_in_progress_wait to wait longer in place)")]
    StillHeld {
        /// The message's idempotency key.
        key: IdempotencyKey,
        /// How long this copy waited.
        waited: Duration,
    },
}

/// Runs the handler at most once per idempotency key, keeping the key's lease renewed while it
/// runs (loss-matrix rows L8 and L11).
///
/// Each message goes through four steps, all inside a `reliable.dedupe` tracing span that
/// carries the key:
///
/// 1. **Reserve.** A duplicate is skipped (`Ok`, so it is acked). A key held by another worker
///    is polled with backoff until that worker completes it (then this copy is a duplicate) or
///    releases it (then this copy runs), for at most the layer's in-progress wait; after that the
///    copy fails with [`ErrorKind::Unavailable`](crate::pipeline::ErrorKind::Unavailable) and
///    [`DedupeError::StillHeld`]: the pipeline requeues it, never dead-letters it (the message is
///    fine, it is only early).
/// 2. **Run the handler, renewing the lease** every third of the store's
///    [`lease_duration`](IdempotencyStore::lease_duration), so a handler slower than the lease
///    (retries, timeouts, a slow dependency) keeps its key and no second copy runs alongside it.
///    A failed renewal is retried with backoff. A renewal that finds the lease
///    [`Lost`](crate::idempotency::Renewal::Lost) (it ran out, say the store was unreachable
///    for a whole lease, and another worker took the key) does not stop the handler, which may
///    be half-way through its effect: the layer logs an error, counts it in
///    [`DedupeLayer::leases_lost`], and carries on.
/// 3. **On success, complete the key.** A failed `complete` is retried with backoff, the lease
///    kept renewed in between, for up to the layer's complete-retry time. The effect has run, so
///    the message is acknowledged whatever happens here: requeueing it would only make one more
///    copy, which runs the effect again once the lease is gone unless `complete` landed. If
///    every attempt fails, the layer logs an error, counts it in [`DedupeLayer::unrecorded`] and
///    acknowledges; the key frees when its lease ends, after which a further duplicate (a
///    producer's resend) would apply the effect again. A completion the store answers with
///    [`Completion::Superseded`] (another worker held or completed the key) is recorded all the
///    same, logged as an error and counted in [`DedupeLayer::leases_lost`].
/// 4. **On failure, release the key** (only this reservation's: the token says whose), so a
///    redelivery can run at once; if the release fails the key frees when its lease ends.
///
/// Renewals run inside the message's own future, never in a detached task: if the future is
/// dropped (the process stops, an outer timeout fires) renewals stop with it and the lease
/// runs out as it should.
///
/// Put it outside the [`RetryLayer`](crate::pipeline::RetryLayer) so the key stays reserved
/// across retries.
pub struct DedupeLayer<S: ?Sized> {
    store: Arc<S>,
    counters: Arc<Counters>,
    in_progress_wait: Duration,
    complete_retry_for: Duration,
}

#[derive(Debug, Default)]
struct Counters {
    duplicates: AtomicU64,
    /// The same for the `metrics` recorder (nothing without the feature).
    hits: crate::metrics::DedupeMetrics,
    leases_lost: AtomicU64,
    unrecorded: AtomicU64,
}

impl<S: ?Sized> Clone for DedupeLayer<S> {
    fn clone(&self) -> Self {
        Self {
            store: self.store.clone(),
            counters: self.counters.clone(),
            in_progress_wait: self.in_progress_wait,
            complete_retry_for: self.complete_retry_for,
        }
    }
}

impl<S: IdempotencyStore + ?Sized> DedupeLayer<S> {
    /// Deduplicates against `store`.
    pub fn new(store: Arc<S>) -> Self {
        Self {
            store,
            counters: Arc::default(),
            in_progress_wait: Duration::from_secs(300),
            complete_retry_for: Duration::from_secs(60),
        }
    }

    /// How long a copy waits for another worker holding its key before it is requeued (with
    /// [`DedupeError::StillHeld`]). Default 5 minutes. The holder renews its lease, so a longer
    /// wait only ties up a concurrency slot; giving up never loses or dead-letters the message.
    pub fn with_in_progress_wait(mut self, wait: Duration) -> Self {
        self.in_progress_wait = wait;
        self
    }

    /// How long a failed `complete` is retried (with backoff, the lease kept renewed) before
    /// the layer gives up on recording the key; see [`unrecorded`](Self::unrecorded). Default
    /// 1 minute.
    pub fn with_complete_retry_for(mut self, limit: Duration) -> Self {
        self.complete_retry_for = limit;
        self
    }

    /// Duplicates skipped so far by handlers made from this layer (and its clones).
    pub fn duplicates(&self) -> u64 {
        self.counters.duplicates.load(Ordering::Relaxed)
    }

    /// Messages whose lease was found lost while their handler ran or at their completion
    /// (another worker took the key over): each may have had its effect applied twice. Nonzero
    /// means the store was unreachable for longer than a lease, or the lease is too short for
    /// renewals to get through.
    pub fn leases_lost(&self) -> u64 {
        self.counters.leases_lost.load(Ordering::Relaxed)
    }

    /// Messages whose handler succeeded but whose key could not be recorded (every `complete`
    /// failed): each was acknowledged, and a duplicate of it arriving after its lease ends would
    /// be applied again.
    pub fn unrecorded(&self) -> u64 {
        self.counters.unrecorded.load(Ordering::Relaxed)
    }
}

impl<S: IdempotencyStore + ?Sized, H: Handler> Layer<H> for DedupeLayer<S> {
    type Handler = Dedupe<H, S>;
    fn layer(&self, inner: H) -> Dedupe<H, S> {
        Dedupe {
            inner,
            layer: self.clone(),
        }
    }
}

/// Polling of a key held by another worker.
const IN_PROGRESS_POLL: BackoffPolicy = BackoffPolicy {
    min_delay: Duration::from_millis(20),
    max_delay: Duration::from_secs(2),
    factor: 2.0,
    jitter: true,
};

/// Retries of a `complete` that failed.
const COMPLETE_RETRY: BackoffPolicy = BackoffPolicy {
    min_delay: Duration::from_millis(50),
    max_delay: Duration::from_secs(5),
    factor: 2.0,
    jitter: true,
};

/// The handler made by [`DedupeLayer`].
pub struct Dedupe<H, S: ?Sized> {
    inner: H,
    layer: DedupeLayer<S>,
}

#[async_trait]
impl<H: Handler, S: IdempotencyStore + ?Sized> Handler for Dedupe<H, S> {
    async fn handle(&self, msg: &Message) -> Result<(), HandlerError> {
        let key = msg.idempotency_key();
        let span = tracing::info_span!("reliable.dedupe", key = %key);
        self.dedupe(msg, &key).instrument(span).await
    }

    /// The batch form of the four steps above: one [`reserve_many`](IdempotencyStore::reserve_many)
    /// for the batch, the inner handler's [`handle_batch`](Handler::handle_batch) over the
    /// messages reserved (their leases renewed while it runs), one
    /// [`complete_many`](IdempotencyStore::complete_many) for the ones that succeeded (retried
    /// as a whole, leases kept, like `complete`), and a release per failure. Duplicates are
    /// skipped (`Ok`); a key held elsewhere, or twice in the batch, is then handled on its
    /// own as [`handle`](Handler::handle) does (waiting for the holder). A store that fails the
    /// reservation fails every message as unavailable. If the inner handler panics, the keys it
    /// held are released before the panic goes on.
    async fn handle_batch(&self, msgs: &[&Message]) -> Vec<Result<(), HandlerError>> {
        if msgs.len() <= 1 {
            let mut out = Vec::with_capacity(msgs.len());
            for msg in msgs {
                out.push(self.handle(msg).await);
            }
            return out;
        }
        self.dedupe_batch(msgs).await
    }
}

impl<H: Handler, S: IdempotencyStore + ?Sized> Dedupe<H, S> {
    async fn dedupe(&self, msg: &Message, key: &IdempotencyKey) -> Result<(), HandlerError> {
        let Some(token) = self.reserve(key).await? else {
            self.layer
                .counters
                .duplicates
                .fetch_add(1, Ordering::Relaxed);
            self.layer.counters.hits.hit();
            tracing::debug!("duplicate skipped");
            return Ok(());
        };
        let mut lease = Lease::new(&*self.layer.store, key, token);
        let outcome = {
            let handler = pin!(self.inner.handle(msg));
            tokio::select! {
                outcome = handler => outcome,
                never = lease.keep() => match never {},
            }
        };
        match outcome {
            Ok(()) => {
                self.complete(&mut lease).await;
                Ok(())
            }
            Err(err) => {
                if let Err(e) = self.layer.store.release(key, token).await {
                    tracing::warn!(error = %e, "could not release the key; it frees when its lease ends");
                }
                self.count_lost(&lease);
                Err(err)
            }
        }
    }

    async fn dedupe_batch(&self, msgs: &[&Message]) -> Vec<Result<(), HandlerError>> {
        let store = &*self.layer.store;
        let keys: Vec<IdempotencyKey> = msgs.iter().map(|m| m.idempotency_key().clone()).collect();
        let answers = match store.reserve_many(&keys).await {
            Ok(answers) if answers.len() == keys.len() => answers,
            Ok(answers) => {
                // A store that answers the wrong number of keys: release what it reserved.
                for (key, answer) in keys.iter().zip(&answers) {
                    if let Reservation::New(token) = answer {
                        let _ = store.release(key, *token).await;
                    }
                }
                return keys
                    .iter()
                    .map(|_| {
                        Err(HandlerError::unavailable(format!(
                            "the idempotency store answered {} of {} keys",
                            answers.len(),
                            keys.len()
                        )))
                    })
                    .collect();
            }
            // The store being down says nothing about the messages: requeue, never
            // dead-letter (ErrorKind::Unavailable).
            Err(e) => {
                return keys
                    .iter()
                    .map(|_| Err(HandlerError::unavailable(e.clone())))
                    .collect()
            }
        };
        let mut out: Vec<Option<Result<(), HandlerError>>> = keys.iter().map(|_| None).collect();
        let mut run = Vec::new();
        let mut alone = Vec::new();
        for (i, answer) in answers.into_iter().enumerate() {
            match answer {
                Reservation::New(token) => run.push((i, token)),
                Reservation::Duplicate => {
                    self.layer
                        .counters
                        .duplicates
                        .fetch_add(1, Ordering::Relaxed);
                    self.layer.counters.hits.hit();
                    tracing::debug!(key = %keys[i], "duplicate skipped");
                    out[i] = Some(Ok(()));
                }
                Reservation::InProgress => alone.push(i),
            }
        }
        // Copies whose key is held (elsewhere, or by an earlier copy in this batch) wait for
        // it alongside the batch, as concurrent deliveries do one by one.
        let waiting = futures::future::join_all(alone.iter().map(|&i| {
            let key = &keys[i];
            let span = tracing::info_span!("reliable.dedupe", key = %key);
            self.dedupe(msgs[i], key).instrument(span)
        }));
        let (ran, waited) = tokio::join!(self.run_reserved(msgs, &keys, &run), waiting);
        for (i, outcome) in ran.into_iter().chain(alone.into_iter().zip(waited)) {
            out[i] = Some(outcome);
        }
        out.into_iter()
            .map(|o| {
                o.unwrap_or_else(|| Err(HandlerError::permanent("message left without an outcome")))
            })
            .collect()
    }

    /// Runs the inner batch handler over the messages at `run` (index, token), their leases
    /// renewed meanwhile; completes the keys of the successes, releases the others.
    async fn run_reserved(
        &self,
        msgs: &[&Message],
        keys: &[IdempotencyKey],
        run: &[(usize, LeaseToken)],
    ) -> Vec<(usize, Result<(), HandlerError>)> {
        if run.is_empty() {
            return Vec::new();
        }
        let store = &*self.layer.store;
        let mut leases: Vec<Lease<'_, S>> = run
            .iter()
            .map(|&(i, token)| Lease::new(store, &keys[i], token))
            .collect();
        let run_msgs: Vec<&Message> = run.iter().map(|&(i, _)| msgs[i]).collect();
        let outcomes = {
            let handler = pin!(AssertUnwindSafe(self.inner.handle_batch(&run_msgs)).catch_unwind());
            tokio::select! {
                outcome = handler => outcome,
                never = keep_all(&mut leases) => match never {},
            }
        };
        let outcomes = match outcomes {
            Ok(outcomes) => outcomes,
            Err(panic) => {
                for lease in &leases {
                    let _ = store.release(lease.key, lease.token).await;
                }
                std::panic::resume_unwind(panic);
            }
        };
        let mut outcomes = outcomes.into_iter();
        let mut kept = Vec::with_capacity(leases.len());
        let mut out = Vec::with_capacity(leases.len());
        for (lease, &(i, _)) in leases.into_iter().zip(run) {
            let outcome = outcomes.next().unwrap_or_else(|| {
                Err(HandlerError::permanent(
                    "Handler::handle_batch answered fewer outcomes than messages",
                ))
            });
            if let Err(err) = &outcome {
                if let Err(e) = store.release(lease.key, lease.token).await {
                    tracing::warn!(key = %lease.key, error = %e, handler_error = %err, "could not release the key; it frees when its lease ends");
                }
                self.count_lost(&lease);
            } else {
                kept.push(lease);
            }
            out.push((i, outcome));
        }
        if !kept.is_empty() {
            self.complete_batch(&mut kept).await;
        }
        out
    }

    /// [`complete`](Self::complete) for the keys of a batch whose handlers succeeded: one
    /// `complete_many`, retried as a whole with the leases kept.
    async fn complete_batch(&self, leases: &mut [Lease<'_, S>]) {
        let store = &self.layer.store;
        let pairs: Vec<(IdempotencyKey, LeaseToken)> =
            leases.iter().map(|l| (l.key.clone(), l.token)).collect();
        let limit = self.layer.complete_retry_for;
        let give_up = Instant::now().checked_add(limit);
        let mut delays = COMPLETE_RETRY.delays();
        let mut attempt = 1u32;
        loop {
            match store.complete_many(&pairs).await {
                Ok(answers) => {
                    for (lease, answer) in leases.iter_mut().zip(answers) {
                        if answer == Completion::Superseded {
                            lease.lost = true;
                        }
                    }
                    break;
                }
                Err(e) => {
                    let delay = delays.next().unwrap_or(COMPLETE_RETRY.max_delay);
                    if give_up.is_some_and(|g| Instant::now() + delay > g) {
                        self.layer
                            .counters
                            .unrecorded
                            .fetch_add(pairs.len() as u64, Ordering::Relaxed);
                        tracing::error!(error = %e, keys = pairs.len(), attempts = attempt, ?limit, "effects applied but the keys could not be recorded; acknowledging (a requeue would run them again), a duplicate arriving after the lease ends will apply them again");
                        break;
                    }
                    tracing::warn!(error = %e, keys = pairs.len(), attempt, ?delay, "recording the keys failed; retrying while keeping the leases");
                    let sleep = pin!(tokio::time::sleep(delay));
                    tokio::select! {
                        () = sleep => {}
                        never = keep_all(leases) => match never {},
                    }
                    attempt += 1;
                }
            }
        }
        for lease in leases.iter() {
            self.count_lost(lease);
        }
    }

    /// Reserves `key`: `Some(token)` to run the handler, `None` for a duplicate.
    async fn reserve(&self, key: &IdempotencyKey) -> Result<Option<LeaseToken>, HandlerError> {
        let store = &self.layer.store;
        let started = Instant::now();
        // `None`: a wait too long to represent is no limit.
        let give_up = started.checked_add(self.layer.in_progress_wait);
        let mut delays = IN_PROGRESS_POLL.delays();
        loop {
            // The store being down says nothing about the message: requeue it, never
            // dead-letter it (ErrorKind::Unavailable).
            match store
                .reserve(key)
                .await
                .map_err(HandlerError::unavailable)?
            {
                Reservation::New(token) => return Ok(Some(token)),
                Reservation::Duplicate => return Ok(None),
                Reservation::InProgress if give_up.is_none_or(|g| Instant::now() < g) => {
                    let delay = delays.next().unwrap_or(IN_PROGRESS_POLL.max_delay);
                    tokio::time::sleep(delay).await;
                }
                Reservation::InProgress => {
                    let waited = started.elapsed();
                    tracing::debug!(?waited, "key still held by another worker; requeueing");
                    return Err(HandlerError::unavailable(DedupeError::StillHeld {
                        key: key.clone(),
                        waited,
                    }));
                }
            }
        }
    }

    /// Records the key after a successful handler: retried with backoff, the lease renewed in
    /// between, for up to the layer's complete-retry time. Never fails the message: the effect
    /// has run (see step 3 of the [`DedupeLayer`] docs). A batch of one.
    async fn complete(&self, lease: &mut Lease<'_, S>) {
        self.complete_batch(std::slice::from_mut(lease)).await;
    }

    fn count_lost(&self, lease: &Lease<'_, S>) {
        if lease.lost {
            self.layer
                .counters
                .leases_lost
                .fetch_add(1, Ordering::Relaxed);
            tracing::error!("the key's lease was lost while its handler ran (another worker took the key over): the effect may have been applied twice; lengthen the store's lease or look at why renewals failed");
        }
    }
}
