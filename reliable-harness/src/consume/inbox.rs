//! The safe consumer's durable dedupe inbox: the effect journal itself.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use dashmap::DashSet;
use reliable_core::idempotency::{
    Completion, IdempotencyStore, LeaseToken, Renewal, Reservation, StoreError,
};
use reliable_core::IdempotencyKey;

use crate::journal::{ConsumerView, Journal};

/// A durable dedupe store whose records are the effects themselves: a key is done once the
/// journal holds the effect line of its sequence number. Loaded from the journal at start, so
/// a restarted consumer remembers every effect its predecessors applied.
#[derive(Debug)]
pub struct Inbox {
    journal: Arc<Journal>,
    applied: DashSet<String>,
    reserved: DashSet<String>,
}

impl Inbox {
    /// Opens the inbox over `journal`, whose existing effects are read from `view`.
    pub fn new(journal: Arc<Journal>, view: &ConsumerView) -> Self {
        Self {
            journal,
            applied: view.effects.keys().map(u64::to_string).collect(),
            reserved: DashSet::new(),
        }
    }

    /// Applies the effect of `seq`: one journal record holding the effect and its key.
    pub fn apply(&self, seq: u64) -> std::io::Result<()> {
        self.journal.record(&format!("E {seq}"))?;
        self.applied.insert(seq.to_string());
        Ok(())
    }
}

// A reservation lives in this process's memory until its holder completes or releases it (or
// the process dies with it), so it never runs out, needs no renewal, and only its holder can
// release it: tokens need no checking.
#[async_trait]
impl IdempotencyStore for Inbox {
    fn lease_duration(&self) -> Option<Duration> {
        None
    }
    async fn reserve(&self, key: &IdempotencyKey) -> Result<Reservation, StoreError> {
        if self.applied.contains(key.as_str()) {
            return Ok(Reservation::Duplicate);
        }
        if !self.reserved.insert(key.as_str().to_owned()) {
            return Ok(Reservation::InProgress);
        }
        // Checked again under the reservation: a holder that applied and completed between the
        // first check and the insert left its effect in `applied` (written before it let go).
        if self.applied.contains(key.as_str()) {
            self.reserved.remove(key.as_str());
            return Ok(Reservation::Duplicate);
        }
        Ok(Reservation::New(LeaseToken::generate()))
    }
    async fn renew(&self, _: &IdempotencyKey, _: LeaseToken) -> Result<Renewal, StoreError> {
        Ok(Renewal::Renewed)
    }
    async fn complete(
        &self,
        key: &IdempotencyKey,
        _: LeaseToken,
    ) -> Result<Completion, StoreError> {
        // The effect record already holds the key; only the reservation remains.
        self.reserved.remove(key.as_str());
        Ok(Completion::Recorded)
    }
    async fn release(&self, key: &IdempotencyKey, _: LeaseToken) -> Result<(), StoreError> {
        self.reserved.remove(key.as_str());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::journal::Tail;

    #[tokio::test]
    async fn the_inbox_remembers_effects_across_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("consumer.log");
        let key = |s: u64| IdempotencyKey::new(s.to_string()).unwrap();
        {
            let inbox = Inbox::new(
                Arc::new(Journal::open(&path).unwrap()),
                &ConsumerView::default(),
            );
            let token = inbox.reserve(&key(1)).await.unwrap().token().unwrap();
            assert_eq!(
                inbox.reserve(&key(1)).await.unwrap(),
                Reservation::InProgress
            );
            inbox.apply(1).unwrap();
            inbox.complete(&key(1), token).await.unwrap();
            assert_eq!(
                inbox.reserve(&key(1)).await.unwrap(),
                Reservation::Duplicate
            );
            // Reserved but never applied: the process dies here.
            assert!(inbox.reserve(&key(2)).await.unwrap().is_new());
        }
        let mut view = ConsumerView::default();
        Tail::new(&path).read(|l| view.apply(l)).unwrap();
        let inbox = Inbox::new(Arc::new(Journal::open(&path).unwrap()), &view);
        assert_eq!(
            inbox.reserve(&key(1)).await.unwrap(),
            Reservation::Duplicate
        );
        assert!(inbox.reserve(&key(2)).await.unwrap().is_new());
    }
}
