//! What a publish's failure means for that publish: retryable or final, and which publish a
//! broker's channel close names (invariant 9: one bad message never fails its neighbours).

use lapin::message::BasicReturnMessage;
use lapin::protocol::AMQPSoftError;
use reliable_core::PublishError;

use super::confirms::Target;
use crate::connect::retryable;
use crate::error::soft_error;

pub(super) fn unroutable(r: &BasicReturnMessage) -> PublishError {
    PublishError::Unroutable {
        reason: format!(
            "{} {} (exchange `{}`, routing key `{}`)",
            r.reply_code, r.reply_text, r.delivery.exchange, r.delivery.routing_key
        ),
    }
}

pub(super) fn lost(reason: &str) -> PublishError {
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

/// Classifies the error a publish's confirm failed with, for that publish.
///
/// A broker closing the channel fails every pending confirm with one error. It is final only
/// for the publish it names: a missing or forbidden exchange (`404`/`403` naming the
/// publish's exchange) or a body over the broker's size limit (`406` naming the publish's
/// size, [`PublishError::TooLarge`]). For every other publish on the channel it is the
/// retryable [`PublishError::ConnectionLost`]: the channel went away under it, and it is
/// resent on a fresh one. An error that names no publish is retryable for all of them
/// (bounded by the producer's attempts and deadline).
pub(super) fn classify_for(error: &lapin::Error, target: &Target) -> PublishError {
    let Some((code, text)) = soft_error(error) else {
        return classify(error);
    };
    let names_exchange = || quoted_after(&text, "exchange '") == Some(target.exchange.as_str());
    let final_for_this = match code {
        AMQPSoftError::NOTFOUND | AMQPSoftError::ACCESSREFUSED => names_exchange(),
        AMQPSoftError::PRECONDITIONFAILED => {
            if let Some((size, limit)) = size_limit(&text) {
                if size == target.size {
                    return PublishError::TooLarge { size, limit };
                }
            }
            false
        }
        _ => false,
    };
    if final_for_this {
        classify(error)
    } else {
        lost(&format!(
            "the broker closed the channel because of another publish ({text}); resent on a \
             fresh channel"
        ))
    }
}

/// The text between `prefix` and the next `'` in `text`.
fn quoted_after<'a>(text: &'a str, prefix: &str) -> Option<&'a str> {
    let start = text.find(prefix)? + prefix.len();
    let len = text[start..].find('\'')?;
    Some(&text[start..start + len])
}

/// `(size, limit)` of RabbitMQ's "message size N is larger than configured max size M".
fn size_limit(text: &str) -> Option<(usize, usize)> {
    let number_after = |prefix: &str| -> Option<usize> {
        let start = text.find(prefix)? + prefix.len();
        let digits: String = text[start..]
            .chars()
            .take_while(char::is_ascii_digit)
            .collect();
        digits.parse().ok()
    };
    Some((number_after("message size ")?, number_after("max size ")?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use lapin::protocol::{AMQPError, AMQPErrorKind};

    fn closed(code: AMQPSoftError, text: &str) -> lapin::Error {
        lapin::ErrorKind::ProtocolError(AMQPError::new(AMQPErrorKind::Soft(code), text.into()))
            .into()
    }

    #[test]
    fn a_channel_close_is_final_only_for_the_publish_it_names() {
        let missing = closed(
            AMQPSoftError::NOTFOUND,
            "NOT_FOUND - no exchange 'gone' in vhost '/'",
        );
        assert!(matches!(
            classify_for(&missing, &Target::for_test("a", "gone", 1)),
            PublishError::Fatal { .. }
        ));
        let neighbour = classify_for(&missing, &Target::for_test("b", "", 1));
        assert!(neighbour.is_retryable(), "{neighbour:?}");

        let large = closed(
            AMQPSoftError::PRECONDITIONFAILED,
            "PRECONDITION_FAILED - message size 2000 is larger than configured max size 1000",
        );
        assert_eq!(
            classify_for(&large, &Target::for_test("a", "", 2000)),
            PublishError::TooLarge {
                size: 2000,
                limit: 1000
            }
        );
        assert!(classify_for(&large, &Target::for_test("b", "", 10)).is_retryable());
        let unnamed = closed(AMQPSoftError::PRECONDITIONFAILED, "PRECONDITION_FAILED - x");
        assert!(classify_for(&unnamed, &Target::for_test("b", "", 10)).is_retryable());
    }
}
