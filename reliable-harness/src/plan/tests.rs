//! Unit tests of the plan.

use super::*;

#[test]
fn faults_are_spread_inside_the_run() {
    let t: Vec<_> = (0..5).map(|i| fault_threshold(100_000, 5, i)).collect();
    assert_eq!(t, [16_666, 33_333, 50_000, 66_666, 83_333]);
    assert_eq!(fault_threshold(3_000, 1, 0), 1_500);
}

#[test]
fn the_control_flips_only_the_component_the_fault_hits() {
    for s in Scenario::ALL {
        let safe = roles(s, Variant::Safe);
        assert!(!safe.unsafe_producer && !safe.unsafe_consumer, "{s}");
        assert_eq!(safe.outbox, s.target() == Target::Producer, "{s}");
        let c = roles(s, Variant::Control);
        assert_eq!(
            c.unsafe_consumer,
            s.target() == Target::Consumer || s.nemesis(),
            "{s}"
        );
        assert_eq!(
            c.unsafe_producer,
            matches!(
                s.target(),
                Target::Broker | Target::Publishes | Target::Link | Target::Node
            ),
            "{s}"
        );
        assert!(!c.outbox, "{s}");
        assert_eq!(
            c.classic_queue,
            matches!(
                s,
                Scenario::AmqpBrokerKill
                    | Scenario::AmqpPoison
                    | Scenario::AmqpNodeKill
                    | Scenario::AmqpPartition
                    | Scenario::AmqpNemesis
            ),
            "{s}"
        );
        assert_eq!(safe.attempt_counter, s.poison(), "{s}");
        assert!(!c.attempt_counter, "{s}");
    }
}

#[test]
fn the_consumer_is_slower_than_the_producer_so_a_backlog_exists_at_each_fault() {
    for m in [Mode::Short, Mode::Long] {
        let s = m.sizes();
        assert!(s.consumer_capacity < s.rate);
        assert!(s.faults >= 1);
    }
    assert!(Mode::Long.sizes().messages >= 100_000);
    assert!(Mode::Long.sizes().faults >= 5);
}

#[test]
fn a_silent_network_outlasts_the_heartbeat_timeouts_of_both_sides() {
    let heartbeat = reliable_amqp::settings::DEFAULT_HEARTBEAT;
    for m in [Mode::Short, Mode::Long] {
        // RabbitMQ gives a silent client up after about three heartbeats.
        assert!(m.sizes().blackhole > heartbeat * 3, "{m:?}");
    }
}

#[test]
fn bad_publishes_are_mixed_only_into_their_scenario() {
    let kinds: Vec<Publish> = (0..100)
        .map(|s| Publish::of(Scenario::AmqpBadPublish, s))
        .collect();
    let count = |k| kinds.iter().filter(|&&x| x == k).count();
    assert_eq!(count(Publish::Unroutable), 10);
    assert_eq!(count(Publish::MissingExchange), 2);
    assert_eq!(count(Publish::Good), 88);
    let cut: Vec<u64> = (0..100)
        .filter(|&s| Publish::cut_short(Scenario::AmqpBadPublish, s).is_some())
        .collect();
    assert_eq!(cut.len(), 15);
    assert!(cut
        .iter()
        .any(|&s| Publish::of(Scenario::AmqpBadPublish, s) == Publish::Unroutable));
    for s in Scenario::ALL
        .into_iter()
        .filter(|&s| s != Scenario::AmqpBadPublish)
    {
        assert!((0..100)
            .all(|q| Publish::of(s, q) == Publish::Good && Publish::cut_short(s, q).is_none()));
    }
}

#[test]
fn a_continuous_fault_is_one_fault_in_every_mode() {
    let long = Mode::Long.sizes();
    assert_eq!(Scenario::AmqpBadPublish.faults(&long), 1);
    assert_eq!(Scenario::AmqpSilentNetwork.faults(&long), long.faults);
    let names: std::collections::HashSet<_> = Scenario::ALL.iter().map(|s| s.name()).collect();
    assert_eq!(names.len(), Scenario::ALL.len());
}
