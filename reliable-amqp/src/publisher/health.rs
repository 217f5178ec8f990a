//! Whether the publisher is connected, for
//! [`ProducerHealth::connected`](reliable_core::producer::ProducerHealth::connected).

use super::{AmqpPublisher, State};

impl AmqpPublisher {
    /// Whether the publisher holds an open channel on an open connection now.
    ///
    /// `false` before the first channel, after a loss and after
    /// [`close`](AmqpPublisher::close). lapin marks a connection closed when its socket fails
    /// or its heartbeat finds it silent, so a silent link reads `true` until the heartbeat
    /// declares it dead.
    ///
    /// After a loss, the publisher re-opens its channel on the next publish; reading `false`
    /// here starts that re-open at once (in the background, on the current Tokio runtime, shared
    /// with any publish that needs it), as the next publish would. So an idle publisher comes
    /// back by itself, and a readiness probe that reads this does not wait for traffic that
    /// waits for it.
    pub(super) fn link_up(&self) -> bool {
        if self.is_closed() {
            return false;
        }
        match &*self.inner.lock_state() {
            State::Live(live)
                if live.usable()
                    && live
                        .connection
                        .as_ref()
                        .is_none_or(|c| c.status().connected()) =>
            {
                return true
            }
            State::Opening(_) => return false,
            State::Live(_) | State::Idle => {}
        }
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let publisher = self.clone();
            runtime.spawn(async move {
                if let Err(error) = publisher.live().await {
                    tracing::debug!(%error, "re-opening the publisher's channel failed; the next publish or health read tries again");
                }
            });
        }
        false
    }
}
