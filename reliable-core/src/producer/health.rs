//! [`Producer::health`]: a small snapshot for readiness and liveness probes.

use std::sync::atomic::Ordering;
use std::time::Duration;

use super::Producer;

/// What a producer can say about its health now; see [`Producer::health`].
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct ProducerHealth {
    /// [`Producer::close`] was called: the producer refuses new messages (not ready).
    pub closed: bool,
    /// Messages accepted and not yet confirmed or handed back.
    pub in_flight: u64,
    /// The size of the in-flight window ([`ProducerConfig::max_in_flight`](super::ProducerConfig::max_in_flight)).
    pub max_in_flight: usize,
    /// How long the oldest unconfirmed message has waited since its first send (`None` when
    /// nothing is unconfirmed). It grows while the broker is unreachable or stops confirming:
    /// the resends go on, but nothing settles.
    pub oldest_unconfirmed_age: Option<Duration>,
    /// Whether the transport is connected to its broker now
    /// ([`Transport::connected`](crate::Transport::connected)): `Some(true)` or
    /// `Some(false)`, or `None` when the transport cannot tell (a custom transport, a Kafka
    /// transport over an application's own producer). RabbitMQ: the publisher's channel and
    /// connection are open (after a loss it reconnects on the next publish). Kafka: at least
    /// one of the client's broker connections is up, per librdkafka's statistics (every
    /// `statistics.interval.ms`, 1 s by default) and its all-brokers-down error. Messages are
    /// kept and resent while it is `false`, so use it for readiness or an alert, not to
    /// restart.
    pub connected: Option<bool>,
}

impl ProducerHealth {
    /// Whether the oldest unconfirmed message has waited longer than `limit`: the broker has
    /// confirmed nothing of it for that long. A liveness probe can report this; restarting
    /// rarely helps (the messages are resent anyway), so prefer alerting on it.
    pub fn stalled(&self, limit: Duration) -> bool {
        self.oldest_unconfirmed_age.is_some_and(|age| age > limit)
    }
}

impl Producer {
    /// A snapshot for readiness and liveness probes: closed or not, messages in flight, the
    /// age of the oldest unconfirmed one (asked of the producer's driver, like
    /// [`unconfirmed`](Self::unconfirmed)) and whether the transport says it is
    /// [connected](ProducerHealth::connected). With a transport that cannot tell, a lost
    /// connection shows only as a growing
    /// [`oldest_unconfirmed_age`](ProducerHealth::oldest_unconfirmed_age).
    ///
    /// ```
    /// use std::time::Duration;
    /// use reliable_core::memory::InMemoryBroker;
    /// use reliable_core::producer::{Producer, ProducerConfig};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() {
    /// let broker = InMemoryBroker::new();
    /// let producer = Producer::new(broker.transport(), ProducerConfig::default());
    ///
    /// let health = producer.health().await;
    /// let ready = !health.closed; // readiness: takes messages
    /// let live = !health.stalled(Duration::from_secs(120)); // liveness / alert
    /// assert!(ready && live);
    /// assert_eq!(health.connected, Some(true)); // the in-memory broker is always reachable
    /// assert_eq!(health.in_flight, 0);
    /// # }
    /// ```
    pub async fn health(&self) -> ProducerHealth {
        let oldest = self.unconfirmed(Duration::ZERO).await;
        let now = tokio::time::Instant::now();
        ProducerHealth {
            closed: self.is_closed(),
            in_flight: self.inner.in_flight.load(Ordering::Relaxed),
            max_in_flight: self.inner.config.max_in_flight,
            oldest_unconfirmed_age: oldest
                .first()
                .map(|u| now.saturating_duration_since(u.first_sent)),
            connected: self.inner.transport.connected(),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use crate::memory::InMemoryBroker;
    use crate::producer::{Producer, ProducerConfig};
    use crate::Message;

    #[tokio::test(start_paused = true)]
    async fn health_reports_in_flight_and_the_oldest_unconfirmed_age() {
        let broker = InMemoryBroker::new();
        broker.declare_queue("q");
        let producer = Producer::new(broker.transport(), ProducerConfig::default());
        let idle = producer.health().await;
        assert_eq!(idle.in_flight, 0);
        assert_eq!(idle.oldest_unconfirmed_age, None);
        assert!(!idle.closed && !idle.stalled(Duration::ZERO));

        producer
            .send_confirmed(Message::new("a").with_destination("q"))
            .await
            .expect("confirmed");
        broker.go_silent();
        let _pending = producer
            .send(Message::new("b").with_destination("q"))
            .await
            .expect("accepted");
        tokio::time::sleep(Duration::from_secs(3)).await;
        let stuck = producer.health().await;
        assert_eq!(stuck.in_flight, 1);
        let age = stuck.oldest_unconfirmed_age.expect("one unconfirmed");
        assert!(age >= Duration::from_secs(3), "{age:?}");
        assert!(stuck.stalled(Duration::from_secs(2)));
        assert!(!stuck.stalled(Duration::from_secs(60)));
    }
}
