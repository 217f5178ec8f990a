//! Unit tests of the publisher.

use super::*;

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

#[tokio::test]
async fn a_node_list_that_is_no_cluster_fails_at_once_without_quoting_it() {
    use crate::NodeListError;
    let started = std::time::Instant::now();
    let none: [String; 0] = [];
    let error = AmqpPublisher::connect_cluster(&none, AmqpSettings::safe())
        .await
        .unwrap_err();
    assert!(
        matches!(error, AmqpError::Nodes(NodeListError::Empty)),
        "{error:?}"
    );
    let mixed = [
        "amqp://alice:Xq7secret@127.0.0.1:1/v",
        "amqp://alice:Zk9secret@127.0.0.1:2/v",
    ];
    let error = AmqpPublisher::connect_cluster(&mixed, AmqpSettings::safe())
        .await
        .unwrap_err();
    assert!(
        matches!(
            error,
            AmqpError::Nodes(NodeListError::MixedCredentials { index: 1 })
        ),
        "{error:?}"
    );
    let text = format!("{error} {error:?}");
    assert!(
        !text.contains("Xq7") && !text.contains("Zk9") && !text.contains("alice"),
        "{text}"
    );
    let error = crate::AmqpConsumer::connect_cluster(
        &["amqp://u:p@127.0.0.1:1/v", "amqp:u:p@h"],
        "q",
        AmqpSettings::safe(),
    )
    .await
    .unwrap_err();
    assert!(
        matches!(
            error,
            AmqpError::Nodes(NodeListError::InvalidUrl { index: 1 })
        ),
        "{error:?}"
    );
    assert!(
        started.elapsed() < std::time::Duration::from_secs(1),
        "a connect was tried"
    );
}
