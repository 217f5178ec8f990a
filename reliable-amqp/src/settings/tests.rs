//! The presets and the refusal of lossy or out-of-range overrides.

use super::*;

#[test]
fn every_lossy_override_is_refused_with_its_name_and_reason() {
    let cases: [(Result<AmqpSettings, UnsafeSetting>, &str); 5] = [
        (
            AmqpSettings::safe().with_queue_type(QueueType::ClassicTransient),
            "queue_type",
        ),
        (
            AmqpSettings::safe().with_persistent_messages(false),
            "persistent_messages",
        ),
        (
            AmqpSettings::safe().with_publisher_confirms(false),
            "publisher_confirms",
        ),
        (AmqpSettings::safe().with_mandatory(false), "mandatory"),
        (AmqpSettings::safe().with_manual_ack(false), "manual_ack"),
    ];
    for (result, setting) in cases {
        let err = result.unwrap_err();
        assert_eq!(err.setting, setting);
        let text = err.to_string();
        assert!(text.contains(setting), "{text}");
        assert!(text.contains("unsafe_allow_data_loss"), "{text}");
        assert!(!err.why.is_empty());
    }
}

#[test]
fn safe_overrides_are_accepted() {
    let s = AmqpSettings::transactional()
        .with_queue_type(QueueType::ClassicDurable)
        .unwrap()
        .with_persistent_messages(true)
        .unwrap()
        .with_prefetch(150)
        .unwrap();
    assert_eq!(s.publish_mode(), PublishMode::Transactions);
    assert_eq!(s.queue_type(), QueueType::ClassicDurable);
    assert_eq!(s.prefetch(), 150);
    assert!(s.data_loss_opt_outs().is_empty());
}

#[test]
fn presets_are_safe_and_prefetch_is_bounded() {
    for s in [
        AmqpSettings::safe(),
        AmqpSettings::classic_durable(),
        AmqpSettings::transactional(),
        AmqpSettings::high_throughput(),
    ] {
        assert!(s.queue_type().durable());
        assert!(s.persistent_messages() && s.publisher_confirms() && s.mandatory());
        assert!(s.manual_ack());
        assert!((100..=300).contains(&s.prefetch()), "{s:?}");
    }
    assert!(AmqpSettings::safe().with_prefetch(0).is_err());
}

#[test]
fn the_confirm_timeout_defaults_to_30s_and_is_bounded() {
    assert_eq!(
        AmqpSettings::safe().confirm_timeout(),
        Duration::from_secs(30)
    );
    let s = AmqpSettings::safe()
        .with_confirm_timeout(Duration::from_secs(5))
        .unwrap();
    assert_eq!(s.confirm_timeout(), Duration::from_secs(5));
    let err = AmqpSettings::safe()
        .with_confirm_timeout(Duration::ZERO)
        .unwrap_err();
    assert_eq!(err.setting, "confirm_timeout");
}

#[test]
fn every_preset_proposes_a_short_heartbeat_and_off_is_refused() {
    for s in [
        AmqpSettings::safe(),
        AmqpSettings::classic_durable(),
        AmqpSettings::transactional(),
        AmqpSettings::high_throughput(),
    ] {
        assert_eq!(s.heartbeat(), Duration::from_secs(5), "{s:?}");
    }
    let s = AmqpSettings::safe()
        .with_heartbeat(Duration::from_secs(20))
        .unwrap();
    assert_eq!(s.heartbeat(), Duration::from_secs(20));
    for refused in [
        Duration::ZERO,
        Duration::from_millis(500),
        Duration::from_millis(5_500),
        Duration::from_secs(61),
        Duration::from_secs(3600),
    ] {
        let err = AmqpSettings::safe().with_heartbeat(refused).unwrap_err();
        assert_eq!(err.setting, "heartbeat");
        let text = err.to_string();
        assert!(text.contains("1 s to 60 s"), "{text}");
        assert!(text.contains("cannot be turned off"), "{text}");
    }
}

#[test]
fn the_opt_out_applies_the_lossy_value_and_records_it() {
    let s = AmqpSettings::safe()
        .unsafe_allow_data_loss(DataLoss::NoPublisherConfirms)
        .unsafe_allow_data_loss(DataLoss::NonDurableQueues);
    assert!(!s.publisher_confirms());
    assert_eq!(s.queue_type(), QueueType::ClassicTransient);
    assert_eq!(
        s.data_loss_opt_outs(),
        &[DataLoss::NoPublisherConfirms, DataLoss::NonDurableQueues]
    );
}
