//! One shared copy of the strings that repeat across objects: namespaces, port names, node
//! names and zones. At 10,000 Services each object would otherwise hold its own copy of its
//! namespace (several, counting the model's names and the manifest index's keys), and each
//! EndpointSlice one of every node name it lists.
//!
//! Names no object holds any more are dropped as the set grows (a node replaced by the
//! autoscaler does not stay for ever), so the set stays the size of what is in use.

use std::collections::HashSet;
use std::sync::{Arc, LazyLock, Mutex, PoisonError};

/// The strings in use, and the size at which unused ones are next dropped.
struct Strings {
    set: HashSet<Arc<str>>,
    prune_at: usize,
}

static STRINGS: LazyLock<Mutex<Strings>> = LazyLock::new(|| {
    Mutex::new(Strings {
        set: HashSet::new(),
        prune_at: 1024,
    })
});

/// The shared copy of `s`.
pub fn intern(s: &str) -> Arc<str> {
    let mut strings = STRINGS.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some(shared) = strings.set.get(s) {
        return shared.clone();
    }
    if strings.set.len() >= strings.prune_at {
        // Held by the set alone: no object uses it any more. Amortised: the next prune waits
        // until the set has doubled again.
        strings.set.retain(|a| Arc::strong_count(a) > 1);
        strings.prune_at = (2 * strings.set.len()).max(1024);
    }
    let shared: Arc<str> = s.into();
    strings.set.insert(shared.clone());
    shared
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
