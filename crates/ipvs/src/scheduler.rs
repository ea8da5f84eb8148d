use std::fmt;
use std::str::FromStr;

/// An IPVS scheduling algorithm, named as `ipvsadm -s` names it.
///
/// Each one lives in its own kernel module (`ip_vs_<name>`), loaded on first use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[non_exhaustive]
pub enum Scheduler {
    /// Round robin.
    RoundRobin,
    /// Weighted round robin.
    WeightedRoundRobin,
    /// Least connection.
    LeastConnection,
    /// Weighted least connection.
    WeightedLeastConnection,
    /// Locality-based least connection.
    LocalityBasedLeastConnection,
    /// Locality-based least connection with replication.
    LocalityBasedLeastConnectionReplication,
    /// Destination hashing.
    DestinationHashing,
    /// Source hashing.
    SourceHashing,
    /// Shortest expected delay.
    ShortestExpectedDelay,
    /// Never queue.
    NeverQueue,
    /// Maglev hashing.
    Maglev,
    /// Weighted failover.
    WeightedFailover,
    /// Weighted overflow.
    WeightedOverflow,
    /// Weighted random twos choice.
    TwoRandomChoices,
}

impl Scheduler {
    /// Every scheduler the kernel ships, in `ipvsadm`'s order.
    pub const ALL: [Scheduler; 14] = [
        Scheduler::RoundRobin,
        Scheduler::WeightedRoundRobin,
        Scheduler::LeastConnection,
        Scheduler::WeightedLeastConnection,
        Scheduler::LocalityBasedLeastConnection,
        Scheduler::LocalityBasedLeastConnectionReplication,
        Scheduler::DestinationHashing,
        Scheduler::SourceHashing,
        Scheduler::ShortestExpectedDelay,
        Scheduler::NeverQueue,
        Scheduler::Maglev,
        Scheduler::WeightedFailover,
        Scheduler::WeightedOverflow,
        Scheduler::TwoRandomChoices,
    ];

    /// The kernel's name for it, as sent in `IPVS_SVC_ATTR_SCHED_NAME` and printed by `ipvsadm`.
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            Scheduler::RoundRobin => "rr",
            Scheduler::WeightedRoundRobin => "wrr",
            Scheduler::LeastConnection => "lc",
            Scheduler::WeightedLeastConnection => "wlc",
            Scheduler::LocalityBasedLeastConnection => "lblc",
            Scheduler::LocalityBasedLeastConnectionReplication => "lblcr",
            Scheduler::DestinationHashing => "dh",
            Scheduler::SourceHashing => "sh",
            Scheduler::ShortestExpectedDelay => "sed",
            Scheduler::NeverQueue => "nq",
            Scheduler::Maglev => "mh",
            Scheduler::WeightedFailover => "fo",
            Scheduler::WeightedOverflow => "ovf",
            Scheduler::TwoRandomChoices => "twos",
        }
    }

    /// The kernel module that implements it.
    #[must_use]
    pub fn module(self) -> String {
        format!("ip_vs_{}", self.name())
    }
}

impl fmt::Display for Scheduler {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A scheduler name the kernel does not know.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "unknown IPVS scheduler {name:?} (known: rr, wrr, lc, wlc, lblc, lblcr, dh, sh, sed, nq, mh, fo, ovf, twos)"
)]
pub struct UnknownScheduler {
    /// The name that was given.
    pub name: String,
}

impl FromStr for Scheduler {
    type Err = UnknownScheduler;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Scheduler::ALL
            .into_iter()
            .find(|sched| sched.name() == s)
            .ok_or_else(|| UnknownScheduler { name: s.to_owned() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_scheduler_round_trips_through_its_name() {
        for sched in Scheduler::ALL {
            assert_eq!(sched.name().parse::<Scheduler>(), Ok(sched));
        }
    }

    #[test]
    fn unknown_scheduler_is_named_in_the_error() {
        let err = "roundrobin".parse::<Scheduler>().unwrap_err();
        assert!(err.to_string().contains("\"roundrobin\""), "{err}");
    }
}
