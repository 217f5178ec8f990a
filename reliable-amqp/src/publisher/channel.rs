//! The publisher's channel: opened on demand (one open shared by every caller waiting for it),
//! reused while usable, dropped when its connection or a confirm is lost so the next publish
//! opens another, on another node when the node is to blame (loss-matrix row L13).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use futures::future::{BoxFuture, Shared};
use futures::FutureExt;
use lapin::options::ConfirmSelectOptions;
use lapin::{Channel, Connection};
use tokio::sync::Mutex;

use super::confirms::Confirms;
use super::{AmqpPublisher, Inner};
use crate::connect::Link;
use crate::settings::PublishMode;

pub(super) type Opening = Shared<BoxFuture<'static, Result<Arc<LiveChannel>, lapin::Error>>>;

/// The publisher's channel: none, being opened (shared by all waiting callers), or open.
pub(super) enum State {
    Idle,
    Opening(Opening),
    Live(Arc<LiveChannel>),
}

/// Opens a channel in the configured mode and starts its confirm driver.
async fn open_live(inner: &Inner) -> Result<Arc<LiveChannel>, lapin::Error> {
    let settings = &inner.settings;
    let mode = settings.publish_mode();
    let confirms = settings.publisher_confirms();
    let link: Link = inner
        .source
        .open(settings.reconnect(), |channel| async move {
            match mode {
                PublishMode::Transactions => channel.tx_select().await,
                PublishMode::Confirms if confirms => {
                    channel
                        .confirm_select(ConfirmSelectOptions::default())
                        .await
                }
                PublishMode::Confirms => Ok(()),
            }
        })
        .await?;
    let generation = inner.generation.fetch_add(1, Ordering::Relaxed) + 1;
    let confirms = Confirms::start(
        link.channel.clone(),
        tracing::debug_span!("amqp_confirm_driver", generation),
        inner.inflight.clone(),
    );
    tracing::info!(
        generation,
        channel = link.channel.id(),
        target_broker = %link.target,
        "AMQP publisher channel open"
    );
    let drain_bound = settings.confirm_timeout() + 3 * settings.heartbeat();
    inner
        .channels
        .opened(generation, confirms.settlement(), drain_bound);
    Ok(Arc::new(LiveChannel {
        generation,
        node: link.node,
        channel: link.channel,
        connection: link.connection,
        confirms,
        drain_bound,
        tx: Mutex::new(()),
    }))
}

/// One open publisher channel, with its confirm driver.
pub(super) struct LiveChannel {
    pub(super) generation: u64,
    /// The node of the source's list the channel's connection goes to (URL sources).
    pub(super) node: Option<usize>,
    pub(super) channel: Channel,
    /// Kept alive (and closed on drop) when the adapter owns the connection.
    pub(super) connection: Option<Connection>,
    /// Decides this channel's confirms (confirm mode).
    pub(super) confirms: Confirms,
    /// How long a dropped channel waits for its undecided publishes before its connection is
    /// closed: the confirm timeout plus three heartbeats, by when a silent connection has been
    /// declared dead (and its publishes failed) by the heartbeat.
    pub(super) drain_bound: Duration,
    /// Serialises transactions on the channel (transaction mode only).
    pub(super) tx: Mutex<()>,
}

impl LiveChannel {
    pub(super) fn usable(&self) -> bool {
        self.channel.status().connected() && self.confirms.is_running()
    }
}

impl Drop for LiveChannel {
    fn drop(&mut self) {
        let Some(connection) = self.connection.take() else {
            return;
        };
        // Best effort: the connection is usually already gone when a channel is dropped.
        // Outside a runtime there is nothing to close it on; dropping it ends its I/O loop.
        // Its undecided publishes settle first (bounded): closing under them would fail them
        // and turn each into a resend, a duplicate when the broker already had it.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let settled = self.confirms.settlement().settled();
            let bound = self.drain_bound;
            runtime.spawn(async move {
                let _ = tokio::time::timeout(bound, settled).await;
                let _ = connection
                    .close(200, "reliable publisher closing".into())
                    .await;
            });
        }
    }
}

impl AmqpPublisher {
    /// The current channel, or a freshly opened one.
    ///
    /// Opening runs in a task of its own, shared by every caller waiting for it: a caller
    /// that gives up (the core's attempt timeout drops its future) does not abort the open,
    /// so a slow broker start cannot make every attempt start over.
    pub(super) async fn live(&self) -> Result<Arc<LiveChannel>, lapin::Error> {
        if self.is_closed() {
            return Err(
                lapin::ErrorKind::InvalidConnectionState(lapin::ConnectionState::Closed).into(),
            );
        }
        let opening = {
            let mut state = self.inner.lock_state();
            match &*state {
                State::Live(current) if current.usable() => return Ok(current.clone()),
                State::Opening(opening) => opening.clone(),
                State::Idle | State::Live(_) => {
                    let inner = self.inner.clone();
                    let task = tokio::spawn(async move {
                        let result = open_live(&inner).await;
                        let closed = inner.closed.load(Ordering::Acquire);
                        *inner.lock_state() = match &result {
                            Ok(live) if !closed => State::Live(live.clone()),
                            _ => State::Idle,
                        };
                        result
                    });
                    let opening = task
                        .map(|joined| {
                            joined.unwrap_or_else(|e| {
                                Err(std::io::Error::other(e.to_string()).into())
                            })
                        })
                        .boxed()
                        .shared();
                    *state = State::Opening(opening.clone());
                    opening
                }
            }
        };
        opening.await
    }

    /// Drops the channel of `generation` so the next publish re-opens one.
    pub(super) fn invalidate(&self, generation: u64) {
        let mut state = self.inner.lock_state();
        let State::Live(live) = &*state else {
            return;
        };
        if live.generation != generation {
            return;
        }
        // A channel the broker closed under a live connection is that channel's matter (a
        // publish it refused); a lost connection, or a confirm that did not come (the link
        // may be silent), is the node's: the next connection tries the next node first (L13).
        let connected = live
            .connection
            .as_ref()
            .is_some_and(|c| c.status().connected());
        if !connected {
            self.inner
                .source
                .avoid(live.node, "its connection was lost");
        } else if live.channel.status().connected() {
            self.inner
                .source
                .avoid(live.node, "a confirm on it did not come in time");
        }
        *state = State::Idle;
    }
}
