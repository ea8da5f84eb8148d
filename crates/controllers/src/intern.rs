//! One shared copy of what repeats across objects: namespaces, Service and port names, node
//! names and zones. At 10,000 Services each object would otherwise hold its own copy of its
//! namespace (several, counting the model's names and the manifest index's keys).
//!
//! Values no object holds any more are dropped as a set grows (a node replaced by the
//! autoscaler does not stay for ever), so each set stays the size of what is in use.

use std::borrow::Borrow;
use std::collections::HashSet;
use std::hash::Hash;
use std::sync::{Arc, LazyLock, Mutex, PoisonError};

/// The values in use, and the size at which unused ones are next dropped.
struct Interned<T: ?Sized> {
    set: HashSet<Arc<T>>,
    prune_at: usize,
}

impl<T: ?Sized + Eq + Hash> Interned<T> {
    fn new() -> Mutex<Self> {
        Mutex::new(Interned {
            set: HashSet::new(),
            prune_at: 1024,
        })
    }

    /// The shared copy of `value`, made by `make` when there is none.
    fn get<Q>(&mut self, value: &Q, make: impl FnOnce(&Q) -> Arc<T>) -> Arc<T>
    where
        Arc<T>: Borrow<Q>,
        Q: ?Sized + Eq + Hash,
    {
        if let Some(shared) = self.set.get(value) {
            return shared.clone();
        }
        if self.set.len() >= self.prune_at {
            // Held by the set alone: no object uses it any more. Amortised: the next prune
            // waits until the set has doubled again.
            self.set.retain(|a| Arc::strong_count(a) > 1);
            self.prune_at = (2 * self.set.len()).max(1024);
        }
        let shared = make(value);
        self.set.insert(shared.clone());
        shared
    }
}

static STRINGS: LazyLock<Mutex<Interned<str>>> = LazyLock::new(Interned::new);

/// The shared copy of `s`.
pub fn intern(s: &str) -> Arc<str> {
    let mut strings = STRINGS.lock().unwrap_or_else(PoisonError::into_inner);
    strings.get(s, |s| Arc::from(s))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn equal_strings_share_one_copy_and_unused_ones_are_dropped() {
        let a = intern("intern-test-ns");
        let b = intern("intern-test-ns");
        assert!(Arc::ptr_eq(&a, &b));
        drop((a, b));
        // Enough other strings to reach a prune, all dropped at once.
        for i in 0..5000 {
            drop(intern(&format!("intern-test-{i}")));
        }
        let strings = STRINGS.lock().unwrap();
        assert!(
            !strings.set.contains("intern-test-ns"),
            "an unused string is dropped"
        );
        assert!(strings.set.len() < 3000, "{} kept", strings.set.len());
    }
}
