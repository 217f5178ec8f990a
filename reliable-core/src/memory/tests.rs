//! Unit tests of the in-memory broker.

use super::*;
use crate::transport::Transport;

#[tokio::test]
async fn unroutable_and_too_large_are_refused() {
    let broker = InMemoryBroker::new();
    let t = broker.transport();
    let msg = Message::new("abc").with_destination("nowhere");
    assert!(matches!(
        t.publish(&msg).await,
        Err(PublishError::Unroutable { .. })
    ));
    broker.declare_queue("q");
    broker.set_max_message_size(Some(2));
    let msg = Message::new("abc").with_destination("q");
    assert_eq!(
        t.publish(&msg).await,
        Err(PublishError::TooLarge { size: 3, limit: 2 })
    );
    assert_eq!(broker.queue_len("q"), 0);
}

#[tokio::test]
async fn crash_mid_handler_requeues_and_fails_the_ack() -> Result<(), Box<dyn std::error::Error>> {
    let broker = InMemoryBroker::new();
    broker.declare_queue("q");
    broker
        .transport()
        .publish(&Message::new("a").with_destination("q"))
        .await?;
    broker.inject_delivery_fault("q", DeliveryFault::CrashMidHandler);
    let mut c = broker.consumer("q");
    let first = c.next().await?.ok_or("no delivery")?;
    assert!(!first.redelivered());
    assert_eq!(broker.queue_len("q"), 1);
    assert!(matches!(
        first.ack().await,
        Err(AckError::ConnectionLost { .. })
    ));
    let again = c.next().await?.ok_or("no redelivery")?;
    assert!(again.redelivered());
    again.ack().await?;
    assert_eq!(broker.acked_count("q"), 1);
    Ok(())
}

#[tokio::test]
async fn duplicate_delivers_twice_and_nack_requeues() -> Result<(), Box<dyn std::error::Error>> {
    let broker = InMemoryBroker::new();
    broker.declare_queue("q");
    let msg = Message::new("a").with_destination("q");
    broker.transport().publish(&msg).await?;
    broker.inject_delivery_fault("q", DeliveryFault::Duplicate);
    let mut c = broker.consumer("q").end_when_drained();
    let d1 = c.next().await?.ok_or("none")?;
    d1.nack(true).await?;
    let d2 = c.next().await?.ok_or("none")?;
    let d3 = c.next().await?.ok_or("none")?;
    assert_eq!(d2.message().id(), msg.id());
    assert_eq!(d3.message().id(), msg.id());
    d2.ack().await?;
    d3.reject().await?;
    assert!(c.next().await?.is_none());
    assert_eq!(broker.rejected("q").len(), 1);
    Ok(())
}

#[tokio::test(start_paused = true)]
async fn lose_connection_fails_waiting_publishes() {
    let broker = InMemoryBroker::new();
    broker.declare_queue(DEFAULT_QUEUE);
    broker.inject_publish_fault(PublishFault::DropConfirm);
    let t = broker.transport();
    let msg = Message::new("a");
    let b = broker.clone();
    let waiting = tokio::spawn(async move { t.publish(&msg).await });
    tokio::time::sleep(Duration::from_millis(10)).await;
    b.lose_connection();
    let r = waiting.await.map_err(|e| e.to_string());
    assert!(matches!(r, Ok(Err(PublishError::ConnectionLost { .. }))));
    assert_eq!(broker.queue_len(DEFAULT_QUEUE), 1);
}

#[tokio::test]
async fn submit_answers_inline_and_holds_a_dropped_confirm_until_the_connection_loss() {
    use crate::transport::{Attempt, Completion, Submission};
    use futures::FutureExt;

    let broker = InMemoryBroker::new();
    broker.declare_queue("q");
    let t = Arc::new(broker.transport());
    let msg = Arc::new(Message::new("a").with_destination("q"));

    let (done, answer) = Completion::channel();
    let submission = Arc::clone(&t).submit(Arc::clone(&msg), done);
    assert!(matches!(submission, Submission::Now(Ok(Attempt::Callback))));
    assert_eq!(answer.now_or_never(), Some(Ok(())));

    broker.inject_publish_fault(PublishFault::DropConfirm);
    let (done, mut answer) = Completion::channel();
    let submission = Arc::clone(&t).submit(Arc::clone(&msg), done);
    assert!(matches!(submission, Submission::Now(Ok(Attempt::Callback))));
    assert_eq!((&mut answer).now_or_never(), None);
    assert_eq!(broker.queue_len("q"), 2);
    broker.lose_connection();
    assert!(matches!(
        answer.await,
        Err(PublishError::ConnectionLost { .. })
    ));

    broker.inject_publish_fault(PublishFault::Nack);
    let (done, answer) = Completion::channel();
    let submission = Arc::clone(&t).submit(Arc::clone(&msg), done);
    assert!(matches!(
        submission,
        Submission::Now(Err(PublishError::Nacked { .. }))
    ));
    drop(submission);
    assert!(matches!(
        answer.await,
        Err(PublishError::ConnectionLost { .. }) // dismissed: the sender is gone
    ));
    assert_eq!(broker.publish_log().len(), 3);
    assert_eq!(broker.queue_len("q"), 2);
}

#[tokio::test]
async fn waiting_consumers_are_woken_by_later_publishes() -> Result<(), Box<dyn std::error::Error>>
{
    let broker = InMemoryBroker::new();
    broker.declare_queue("q");
    let waiting = || broker.inner.waiting.load(Ordering::SeqCst);

    // A wait given up (its future dropped) is no longer counted.
    let mut c = broker.consumer("q");
    assert!(futures::FutureExt::now_or_never(c.next()).is_none());
    assert_eq!(waiting(), 0);

    let mut tasks = Vec::new();
    for _ in 0..2 {
        let mut c = broker.consumer("q");
        tasks.push(tokio::spawn(async move {
            let d = c.next().await?.ok_or("ended")?;
            let id = d.message().id();
            d.ack().await?;
            Ok::<_, Box<dyn std::error::Error + Send + Sync>>(id)
        }));
    }
    while waiting() < 2 {
        tokio::task::yield_now().await;
    }
    let t = broker.transport();
    let (a, b) = (Message::new("a"), Message::new("b"));
    broker.declare_queue(DEFAULT_QUEUE);
    // Routed elsewhere: the consumers of "q" wait on.
    t.publish(&Message::new("x")).await?;
    t.publish(&a.clone().with_destination("q")).await?;
    t.publish(&b.clone().with_destination("q")).await?;
    let mut got = Vec::new();
    for task in tasks {
        got.push(task.await?.map_err(|e| e.to_string())?);
    }
    got.sort();
    let mut want = vec![a.id(), b.id()];
    want.sort();
    assert_eq!(got, want);
    assert_eq!(waiting(), 0);
    assert_eq!(broker.acked_count("q"), 2);
    Ok(())
}
