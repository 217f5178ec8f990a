//! Refusals of settings overrides: the settings that lose data ([`DataLoss`]) and the typed
//! errors that name them.

/// A setting that loses data, for [`AmqpSettings::unsafe_allow_data_loss`](super::AmqpSettings::unsafe_allow_data_loss).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum DataLoss {
    /// Declare non-durable classic queues: the queue and its messages vanish on restart.
    NonDurableQueues,
    /// Publish with delivery mode 1: messages are kept only in memory and lost on restart.
    TransientMessages,
    /// Publish without publisher confirms: a publish counts as done once written to the
    /// socket, and messages lost in flight go unnoticed.
    NoPublisherConfirms,
    /// Publish without `mandatory`: the broker drops unroutable messages and still acks them.
    NoMandatory,
    /// Consume with auto-ack: messages are acked before the handler ran, and lost if it fails.
    AutoAck,
}

impl DataLoss {
    pub(super) fn setting(self) -> &'static str {
        match self {
            DataLoss::NonDurableQueues => "queue_type",
            DataLoss::TransientMessages => "persistent_messages",
            DataLoss::NoPublisherConfirms => "publisher_confirms",
            DataLoss::NoMandatory => "mandatory",
            DataLoss::AutoAck => "manual_ack",
        }
    }

    pub(super) fn value(self) -> &'static str {
        match self {
            DataLoss::NonDurableQueues => "ClassicTransient",
            _ => "false",
        }
    }

    pub(super) fn why(self) -> &'static str {
        match self {
            DataLoss::NonDurableQueues => {
                "a non-durable queue and every message in it are deleted when the broker restarts"
            }
            DataLoss::TransientMessages => {
                "transient messages (delivery mode 1) are kept only in memory and lost when the \
                 broker restarts"
            }
            DataLoss::NoPublisherConfirms => {
                "without publisher confirms a publish counts as done once written to the socket; \
                 messages lost on the way or in a broker crash go unnoticed"
            }
            DataLoss::NoMandatory => {
                "without mandatory the broker acks and drops a message no queue is bound for"
            }
            DataLoss::AutoAck => {
                "with auto-ack the broker forgets a message when it is sent, so a consumer that \
                 crashes or fails in its handler loses it"
            }
        }
    }
}

/// A settings override refused because it loses data (invariant 7).
///
/// Keep the preset's value; if losing data is really acceptable (a throw-away test queue, a
/// negative control), opt out with [`AmqpSettings::unsafe_allow_data_loss`](super::AmqpSettings::unsafe_allow_data_loss).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "refused `{setting} = {value}`: {why}; keep the safe value, or opt out explicitly with \
     AmqpSettings::unsafe_allow_data_loss(DataLoss::{opt_out:?})"
)]
pub struct UnsafeSetting {
    /// The setting's name, as its `with_*` method spells it.
    pub setting: &'static str,
    /// The refused value.
    pub value: &'static str,
    /// Why the value loses data.
    pub why: &'static str,
    /// The [`DataLoss`] to pass to the opt-out, if the caller accepts the loss.
    pub opt_out: DataLoss,
}

impl From<DataLoss> for UnsafeSetting {
    fn from(loss: DataLoss) -> Self {
        Self {
            setting: loss.setting(),
            value: loss.value(),
            why: loss.why(),
            opt_out: loss,
        }
    }
}

/// A settings value out of range (not a data-loss question).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("`{setting} = {value}` is out of range: {expected}")]
pub struct InvalidSetting {
    /// The setting's name.
    pub setting: &'static str,
    /// The refused value.
    pub value: String,
    /// The accepted range, in words.
    pub expected: &'static str,
}

/// Refusal of a settings override: it loses data, or it is out of range.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SettingsError {
    /// The override loses data.
    #[error(transparent)]
    Unsafe(#[from] UnsafeSetting),
    /// The value is out of range.
    #[error(transparent)]
    Invalid(#[from] InvalidSetting),
}
