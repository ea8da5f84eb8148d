//! The changes between the sources and the sync loop: a bounded, coalescing queue.
//!
//! Sources push [`SourceUpdate`]s from their tasks; the sync loop takes everything pending at
//! once. A change to an object replaces the pending change to the same object (latest wins: an
//! apply after a delete is an apply, a delete after an apply stays a delete), so a storm of
//! updates to one object is one pending change and the queue never holds more than one change
//! per object (two while InitialSyncDone waits between them), however fast the sources are and
//! however long a sync blocks.
//!
//! Order is kept where it means something: [`SourceUpdate::InitialSyncDone`] is taken only with
//! the changes pushed before it (later ones are taken next), and a batch is never split (a
//! relist is taken whole). The node's eligibility and its addresses are values: the latest
//! wins, and the addresses are taken before the changes, so the sync that follows serves
//! NodePorts on them.
//!
//! The queue also records, in the daemon's [`Health`], when a change was queued and when the
//! loop took it, under its own lock. Both happen off the sync thread's work: a sync thread that
//! blocks cannot hide a change it never took, so `/livez` turns 503 once that change has waited
//! longer than the health timeout.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::SystemTime;

use tokio::sync::Notify;

use crate::health::Health;
use crate::sync_loop::SourceUpdate;

/// A change a source reports, and the object it is about: two changes with one key coalesce.
pub trait Keyed {
    /// The object's identity (kind, namespace, name).
    type Key: Hash + Eq + Clone + std::fmt::Debug;
    fn key(&self) -> Self::Key;
}

/// The loop is gone: a source can stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the sync loop is gone")]
pub struct Closed;

/// Changes to distinct objects, in the order each object first changed, the latest change
/// of each.
#[derive(Debug)]
struct Batch<C: Keyed> {
    order: Vec<C::Key>,
    latest: HashMap<C::Key, C>,
}

impl<C: Keyed> Default for Batch<C> {
    fn default() -> Self {
        Batch {
            order: Vec::new(),
            latest: HashMap::new(),
        }
    }
}

impl<C: Keyed> Batch<C> {
    fn push(&mut self, change: C) {
        let key = change.key();
        if self.latest.insert(key.clone(), change).is_none() {
            self.order.push(key);
        }
    }

    fn is_empty(&self) -> bool {
        self.order.is_empty()
    }

    fn into_changes(mut self) -> Vec<C> {
        let mut latest = std::mem::take(&mut self.latest);
        self.order
            .into_iter()
            .filter_map(|k| latest.remove(&k))
            .collect()
    }
}

#[derive(Debug)]
struct Queue<C: Keyed> {
    /// Changes pushed before a pending InitialSyncDone (or all of them, when none is pending).
    before: Batch<C>,
    /// Set once InitialSyncDone is pushed and until it is taken: the changes pushed after it.
    after: Option<Batch<C>>,
    node_eligible: Option<bool>,
    local_addresses: Option<netif::NodeAddresses>,
    senders: usize,
    receiver: bool,
}

impl<C: Keyed> Queue<C> {
    fn has_work(&self) -> bool {
        !self.before.is_empty()
            || self.after.is_some()
            || self.node_eligible.is_some()
            || self.local_addresses.is_some()
    }
}

#[derive(Debug)]
struct Shared<C: Keyed> {
    queue: Mutex<Queue<C>>,
    /// Wakes the receiver: something was pushed, or the last sender went.
    changed: Notify,
    /// Wakes the senders waiting in [`Sender::closed`].
    gone: Notify,
    health: Option<Health>,
}

impl<C: Keyed> Shared<C> {
    fn lock(&self) -> MutexGuard<'_, Queue<C>> {
        self.queue.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A new queue: its sending side for the sources, its receiving side for the loop. With a
/// `health`, pushes and takes are recorded in it.
#[must_use]
pub fn channel<C: Keyed>(health: Option<Health>) -> (Sender<C>, Receiver<C>) {
    let shared = Arc::new(Shared {
        queue: Mutex::new(Queue {
            before: Batch::default(),
            after: None,
            node_eligible: None,
            local_addresses: None,
            senders: 1,
            receiver: true,
        }),
        changed: Notify::new(),
        gone: Notify::new(),
        health,
    });
    (
        Sender {
            shared: shared.clone(),
        },
        Receiver {
            shared,
            ready: std::collections::VecDeque::new(),
        },
    )
}

/// The sources' side; clone it for each source.
#[derive(Debug)]
pub struct Sender<C: Keyed> {
    shared: Arc<Shared<C>>,
}

impl<C: Keyed> Clone for Sender<C> {
    fn clone(&self) -> Self {
        self.shared.lock().senders += 1;
        Sender {
            shared: self.shared.clone(),
        }
    }
}

impl<C: Keyed> Drop for Sender<C> {
    fn drop(&mut self) {
        let mut queue = self.shared.lock();
        queue.senders -= 1;
        if queue.senders == 0 {
            drop(queue);
            self.shared.changed.notify_one();
        }
    }
}

impl<C: Keyed> Sender<C> {
    /// Queues `update`, coalesced with what is pending; fails once the loop is gone.
    pub fn send(&self, update: SourceUpdate<Vec<C>>) -> Result<(), Closed> {
        let mut queue = self.shared.lock();
        if !queue.receiver {
            return Err(Closed);
        }
        match update {
            SourceUpdate::Events(changes) => {
                if changes.is_empty() {
                    return Ok(());
                }
                let batch = match &mut queue.after {
                    Some(after) => after,
                    None => &mut queue.before,
                };
                for change in changes {
                    batch.push(change);
                }
                if let Some(health) = &self.shared.health {
                    health.queued(SystemTime::now());
                }
            }
            SourceUpdate::InitialSyncDone => {
                queue.after.get_or_insert_with(Batch::default);
            }
            SourceUpdate::NodeEligible(eligible) => queue.node_eligible = Some(eligible),
            SourceUpdate::LocalAddresses(local) => queue.local_addresses = Some(local),
        }
        drop(queue);
        self.shared.changed.notify_one();
        Ok(())
    }

    /// Resolves once the loop is gone.
    pub async fn closed(&self) {
        loop {
            // Registered before the check, so a drop between the two still wakes it.
            let gone = self.shared.gone.notified();
            if !self.shared.lock().receiver {
                return;
            }
            gone.await;
        }
    }
}

/// The loop's side.
#[derive(Debug)]
pub struct Receiver<C: Keyed> {
    shared: Arc<Shared<C>>,
    /// Updates taken and not yet handed out by [`Receiver::recv`].
    ready: std::collections::VecDeque<SourceUpdate<Vec<C>>>,
}

impl<C: Keyed> Drop for Receiver<C> {
    fn drop(&mut self) {
        self.shared.lock().receiver = false;
        self.shared.gone.notify_waiters();
    }
}

impl<C: Keyed> Receiver<C> {
    /// Everything pending, as the updates to fold in order: the changes (one batch), the node's
    /// eligibility, then InitialSyncDone if it was pushed after them. Changes pushed after
    /// InitialSyncDone stay for the next take. `None` when nothing is pending.
    pub fn take(&mut self) -> Option<Vec<SourceUpdate<Vec<C>>>> {
        let mut queue = self.shared.lock();
        if !queue.has_work() {
            return None;
        }
        let changes = std::mem::take(&mut queue.before);
        let initial_sync_done = match queue.after.take() {
            Some(after) => {
                queue.before = after;
                true
            }
            None => false,
        };
        let eligible = queue.node_eligible.take();
        let local = queue.local_addresses.take();
        if let Some(health) = &self.shared.health {
            health.taken();
        }
        let more = !queue.before.is_empty();
        drop(queue);
        if more {
            // What was pushed after InitialSyncDone: the next take.
            self.shared.changed.notify_one();
        }
        let mut updates = Vec::with_capacity(4);
        updates.extend(local.map(SourceUpdate::LocalAddresses));
        if !changes.is_empty() {
            updates.push(SourceUpdate::Events(changes.into_changes()));
        }
        updates.extend(eligible.map(SourceUpdate::NodeEligible));
        if initial_sync_done {
            updates.push(SourceUpdate::InitialSyncDone);
        }
        Some(updates)
    }

    /// Waits until something is pending (true) or every sender is gone and nothing is (false).
    pub async fn wait(&self) -> bool {
        loop {
            {
                let queue = self.shared.lock();
                if queue.has_work() {
                    return true;
                }
                if queue.senders == 0 {
                    return false;
                }
            }
            // A push between the check and here left a permit: this returns at once.
            self.shared.changed.notified().await;
        }
    }

    /// The next update, as from a channel: `None` once every sender is gone and all was taken.
    pub async fn recv(&mut self) -> Option<SourceUpdate<Vec<C>>> {
        loop {
            if let Some(update) = self.ready.pop_front() {
                return Some(update);
            }
            if !self.wait().await {
                return None;
            }
            let taken = self.take().unwrap_or_default();
            self.ready.extend(taken);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    /// A change to object `.0`: applied with version `.1`, or deleted (`None`).
    #[derive(Debug, Clone, PartialEq, Eq)]
    struct Change(&'static str, Option<u32>);

    impl Keyed for Change {
        type Key = &'static str;
        fn key(&self) -> &'static str {
            self.0
        }
    }

    fn apply(name: &'static str, version: u32) -> Change {
        Change(name, Some(version))
    }

    fn events(changes: &[Change]) -> SourceUpdate<Vec<Change>> {
        SourceUpdate::Events(changes.to_vec())
    }

    #[test]
    fn a_storm_of_updates_to_one_object_is_one_pending_change_the_latest() {
        let (tx, mut rx) = channel::<Change>(None);
        for version in 0..10_000 {
            tx.send(events(&[apply("web", version)])).unwrap();
        }
        assert_eq!(rx.take(), Some(vec![events(&[apply("web", 9_999)])]));
        assert_eq!(rx.take(), None);
    }

    #[test]
    fn a_delete_is_kept_and_an_apply_after_it_wins() {
        let (tx, mut rx) = channel::<Change>(None);
        tx.send(events(&[apply("a", 1), apply("b", 1)])).unwrap();
        tx.send(events(&[Change("a", None)])).unwrap();
        tx.send(events(&[Change("b", None), apply("b", 2)]))
            .unwrap();
        // In the order each object first changed.
        assert_eq!(
            rx.take(),
            Some(vec![events(&[Change("a", None), apply("b", 2)])])
        );
    }

    #[test]
    fn initial_sync_done_comes_after_the_changes_before_it_and_before_those_after() {
        let (tx, mut rx) = channel::<Change>(None);
        tx.send(events(&[apply("a", 1), apply("b", 1)])).unwrap();
        tx.send(SourceUpdate::NodeEligible(true)).unwrap();
        tx.send(SourceUpdate::InitialSyncDone).unwrap();
        tx.send(events(&[apply("a", 2), apply("c", 1)])).unwrap();
        assert_eq!(
            rx.take(),
            Some(vec![
                events(&[apply("a", 1), apply("b", 1)]),
                SourceUpdate::NodeEligible(true),
                SourceUpdate::InitialSyncDone,
            ])
        );
        assert_eq!(
            rx.take(),
            Some(vec![events(&[apply("a", 2), apply("c", 1)])])
        );
        assert_eq!(rx.take(), None);
    }

    #[test]
    fn a_batch_is_taken_whole_and_the_latest_eligibility_wins() {
        let (tx, mut rx) = channel::<Change>(None);
        let relist: Vec<Change> = ["a", "b", "c", "d"].map(|n| apply(n, 1)).to_vec();
        tx.send(SourceUpdate::NodeEligible(false)).unwrap();
        tx.send(SourceUpdate::Events(relist.clone())).unwrap();
        tx.send(SourceUpdate::NodeEligible(true)).unwrap();
        assert_eq!(
            rx.take(),
            Some(vec![
                SourceUpdate::Events(relist),
                SourceUpdate::NodeEligible(true)
            ])
        );
    }

    #[test]
    fn the_ends_know_when_the_other_is_gone() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let (tx, mut rx) = channel::<Change>(None);
        let second = tx.clone();
        tx.send(events(&[apply("a", 1)])).unwrap();
        drop(tx);
        drop(second);
        runtime.block_on(async {
            // What was sent is still received, then the end.
            assert_eq!(rx.recv().await, Some(events(&[apply("a", 1)])));
            assert_eq!(rx.recv().await, None);
        });

        let (tx, rx) = channel::<Change>(None);
        drop(rx);
        assert_eq!(tx.send(events(&[apply("a", 1)])), Err(Closed));
        runtime.block_on(tx.closed());
    }

    #[test]
    fn a_waiting_receiver_wakes_on_a_push_from_another_thread() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let (tx, mut rx) = channel::<Change>(None);
        let pusher = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            tx.send(events(&[apply("a", 1)])).unwrap();
            tx
        });
        let got = runtime
            .block_on(async { tokio::time::timeout(Duration::from_secs(10), rx.recv()).await });
        assert_eq!(got, Ok(Some(events(&[apply("a", 1)]))));
        drop(pusher.join());
    }

    #[test]
    fn health_sees_a_change_queued_while_the_loop_does_not_take_it() {
        let timeout = Duration::from_secs(60);
        let start = SystemTime::now();
        let health = Health::new(timeout, start);
        health.synced(start);
        let (tx, mut rx) = channel::<Change>(Some(health.clone()));
        assert!(health.report(start + 2 * timeout).healthy, "nothing queued");
        tx.send(events(&[apply("a", 1)])).unwrap();
        // The loop is blocked: it never takes the change.
        let later = SystemTime::now() + timeout;
        assert!(!health.report(later).healthy);
        // Taken, and not applied yet: still late.
        rx.take();
        assert!(!health.report(later).healthy);
        health.synced(SystemTime::now());
        assert!(health.report(later).healthy);
    }
}
