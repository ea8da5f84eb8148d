//! The Services the kernel refused, each retried on its own: 1 s after the first refusal,
//! doubling up to the sync period, until a sync of it goes through. A refused Service never
//! turns into full syncs (which at 10,000 Services cost seconds of CPU), and the rest of the
//! node keeps its cadence. Its error is logged when it first appears or changes, not at every
//! retry.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use crate::model::ServiceName;
use crate::sync::SyncError;

/// The first retry's delay.
pub const FIRST_RETRY: Duration = Duration::from_secs(1);

#[derive(Debug)]
struct Retry {
    attempts: u32,
    due: Instant,
    /// What the kernel said last, to log only a change.
    error: String,
}

/// The failing Services and when each is tried again.
#[derive(Debug, Default)]
pub struct Retries {
    failing: HashMap<ServiceName, Retry>,
}

impl Retries {
    /// Records a sync at `now` of the Services `synced` says it synced: those with errors in
    /// `errors` fail (again) and are due after their backoff, capped at `cap`; the others
    /// recover. Returns the errors worth logging: a Service's that is new or changed, and every
    /// error no Service is to blame for.
    pub fn record<'e>(
        &mut self,
        synced: impl Fn(&ServiceName) -> bool,
        errors: &'e [SyncError],
        now: Instant,
        cap: Duration,
    ) -> Vec<&'e SyncError> {
        let mut to_log = Vec::new();
        let mut failed: HashMap<&ServiceName, String> = HashMap::new();
        for error in errors {
            match &error.service {
                Some(name) => {
                    let text = failed.entry(name).or_default();
                    if !text.is_empty() {
                        text.push_str("; ");
                    }
                    text.push_str(&error.to_string());
                }
                None => to_log.push(error),
            }
        }
        self.failing
            .retain(|name, _| !synced(name) || failed.contains_key(name));
        for (name, text) in failed {
            let retry = self.failing.entry(name.clone()).or_insert(Retry {
                attempts: 0,
                due: now,
                error: String::new(),
            });
            retry.attempts = retry.attempts.saturating_add(1);
            let backoff = FIRST_RETRY.saturating_mul(1 << (retry.attempts - 1).min(20));
            retry.due = now + backoff.min(cap);
            if retry.error != text {
                to_log.extend(errors.iter().filter(|e| e.service.as_ref() == Some(name)));
                retry.error = text;
            }
        }
        to_log
    }

    /// The next retry due, if any Service is failing.
    #[must_use]
    pub fn next_due(&self) -> Option<Instant> {
        self.failing.values().map(|r| r.due).min()
    }

    /// The failing Services whose retry is due at `now`.
    pub fn due(&self, now: Instant) -> impl Iterator<Item = &ServiceName> {
        self.failing
            .iter()
            .filter(move |(_, r)| r.due <= now)
            .map(|(name, _)| name)
    }

    /// How many Services are failing.
    #[must_use]
    pub fn len(&self) -> usize {
        self.failing.len()
    }

    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.failing.is_empty()
    }
}
