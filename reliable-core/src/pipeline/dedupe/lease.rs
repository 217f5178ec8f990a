//! [`Lease`]: the caller's hold on one idempotency key, renewed while its handler runs and until
//! the key is recorded (loss-matrix row L11).

use std::time::Duration;

use tokio::time::Instant;

use crate::backoff::BackoffPolicy;
use crate::idempotency::{IdempotencyStore, LeaseToken, Renewal};
use crate::message::IdempotencyKey;

/// Retries of a renewal that failed (the store did not answer). Each delay is also capped at
/// the renewal interval, so a short lease is retried well within its life.
const RENEW_RETRY: BackoffPolicy = BackoffPolicy {
    min_delay: Duration::from_millis(20),
    max_delay: Duration::from_secs(5),
    factor: 2.0,
    jitter: true,
};

/// Keeps every lease of `leases` renewed, for as long as it is polled; never returns.
pub(super) async fn keep_all<S: IdempotencyStore + ?Sized>(
    leases: &mut [Lease<'_, S>],
) -> std::convert::Infallible {
    // Returns only for an empty slice.
    let _ = futures::future::join_all(leases.iter_mut().map(|l| l.keep())).await;
    std::future::pending().await
}

/// The caller's lease on one key, renewed by [`keep`](Self::keep).
pub(super) struct Lease<'a, S: ?Sized> {
    pub(super) store: &'a S,
    pub(super) key: &'a IdempotencyKey,
    pub(super) token: LeaseToken,
    /// A third of the store's lease; `None` when its reservations never run out.
    every: Option<Duration>,
    /// When the next renewal is due.
    due: Instant,
    /// Whether a renewal or the completion found the lease taken over.
    pub(super) lost: bool,
}

impl<'a, S: IdempotencyStore + ?Sized> Lease<'a, S> {
    pub(super) fn new(store: &'a S, key: &'a IdempotencyKey, token: LeaseToken) -> Self {
        let now = Instant::now();
        // A lease too long to represent as an instant never needs renewing.
        let schedule = store
            .lease_duration()
            .map(|lease| (lease / 3).max(Duration::from_millis(1)))
            .and_then(|every| Some((every, now.checked_add(every)?)));
        Self {
            store,
            key,
            token,
            every: schedule.map(|(every, _)| every),
            due: schedule.map_or(now, |(_, due)| due),
            lost: false,
        }
    }

    /// Renews the lease whenever it is due, for as long as it is polled; never returns. Stops
    /// renewing once the lease is lost or when the store's leases never run out. Dropping the
    /// future mid-renewal is harmless: the next call renews at once.
    pub(super) async fn keep(&mut self) -> std::convert::Infallible {
        let Some(every) = self.every.filter(|_| !self.lost) else {
            return std::future::pending().await;
        };
        let mut retries = RENEW_RETRY.delays();
        loop {
            tokio::time::sleep_until(self.due).await;
            match self.store.renew(self.key, self.token).await {
                Ok(Renewal::Renewed) => {
                    let Some(due) = Instant::now().checked_add(every) else {
                        return std::future::pending().await;
                    };
                    self.due = due;
                    retries = RENEW_RETRY.delays();
                }
                Ok(Renewal::Lost) => {
                    self.lost = true;
                    // Reported as an error once the handler is done (`count_lost`).
                    tracing::warn!("lease lost while the handler runs: another worker took the key over and may apply the effect too; the handler carries on");
                    return std::future::pending().await;
                }
                Err(e) => {
                    let delay = retries.next().unwrap_or(every).min(every);
                    tracing::warn!(error = %e, ?delay, "renewing the key's lease failed; retrying");
                    self.due = Instant::now() + delay;
                }
            }
        }
    }
}
