//! When the soak's faults and changes happen: a new model version every `version_every`,
//! one pin and one unpin, an etcd restart, a worker killed and started again, and etcd
//! frozen for longer than the lease TTL. Computed once, before the run, from the run's
//! length, so the same flags give the same schedule and it can be checked without
//! starting anything.

use std::fmt;
use std::time::Duration;

/// Quiet time the schedule leaves after the last fault, so the run ends with the stack
/// recovered and the last minute shows whether it did.
pub const QUIET_TAIL: Duration = Duration::from_secs(10);

/// The shortest soak: the faults need room between them.
pub const MIN_TOTAL: Duration = Duration::from_secs(60);

/// One thing the soak does to the running stack.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// Copy this pre-exported version into the watched directory.
    NewVersion(u32),
    /// `aspirectl pin mnist <version>`.
    Pin(u32),
    /// `aspirectl unpin mnist`.
    Unpin,
    /// Kill etcd (SIGKILL) and start it again on the same ports and data.
    EtcdRestart,
    /// SIGKILL the second worker.
    WorkerKill,
    /// Start the second worker again, same flags.
    WorkerStart,
    /// SIGSTOP etcd.
    EtcdFreeze,
    /// SIGCONT etcd.
    EtcdThaw,
}

impl fmt::Display for Event {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NewVersion(v) => write!(f, "new version {v} copied into the watched directory"),
            Self::Pin(v) => write!(f, "pin mnist to version {v}"),
            Self::Unpin => write!(f, "unpin mnist"),
            Self::EtcdRestart => write!(f, "etcd killed and restarted"),
            Self::WorkerKill => write!(f, "worker-2 SIGKILLed"),
            Self::WorkerStart => write!(f, "worker-2 started again"),
            Self::EtcdFreeze => write!(f, "etcd frozen (SIGSTOP)"),
            Self::EtcdThaw => write!(f, "etcd thawed (SIGCONT)"),
        }
    }
}

/// What the schedule is computed from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScheduleConfig {
    /// The whole run, load included.
    pub total: Duration,
    /// A new version arrives this often (version 1 is there from the start).
    pub version_every: Duration,
    /// How long the killed worker stays down.
    pub worker_down: Duration,
    /// How long etcd stays frozen; must exceed `lease_ttl`.
    pub freeze: Duration,
    /// The workers' lease TTL (`--lease-ttl`), which the freeze must outlast.
    pub lease_ttl: Duration,
}

/// An event and when it happens, from the start of the load.
pub type Scheduled = (Duration, Event);

/// The newest version present strictly before `at`: version 1 from the start, then one
/// more at each multiple of `every`.
pub fn newest_before(at: Duration, every: Duration) -> u32 {
    if every.is_zero() || at.is_zero() {
        return 1;
    }
    // Arrivals k * every < at, k >= 1.
    let arrived = (at.as_nanos() - 1) / every.as_nanos();
    u32::try_from(arrived).map_or(u32::MAX, |n| n.saturating_add(1))
}

/// The run's events in time order, or a sentence naming the flag to change when they do
/// not fit.
///
/// Fractions of the run: pin at 20 %, unpin at 30 %, etcd restart at 40 %, the worker
/// killed at 50 % (started again `worker_down` later), etcd frozen at 65 % (thawed
/// `freeze` later); the last fault must end [`QUIET_TAIL`] before the end. The pin names
/// the newest version already there, so `aspirectl` finds it available.
pub fn schedule(config: &ScheduleConfig) -> Result<Vec<Scheduled>, String> {
    let total = config.total;
    if total < MIN_TOTAL {
        return Err(format!(
            "the soak lasts {} s; it needs at least {} s for its faults (--minutes, SOAK_MINUTES)",
            total.as_secs(),
            MIN_TOTAL.as_secs()
        ));
    }
    if config.version_every.is_zero() {
        return Err("--version-every-secs is 0; a new version needs some time".to_string());
    }
    if config.freeze <= config.lease_ttl {
        return Err(format!(
            "etcd would be frozen for {} s, not longer than the lease TTL of {} s; raise \
             --freeze-secs (SOAK_FREEZE_SECONDS) or lower --lease-ttl (SOAK_LEASE_TTL)",
            config.freeze.as_secs_f64(),
            config.lease_ttl.as_secs_f64()
        ));
    }
    let at = |percent: u32| total * percent / 100;
    let kill = at(50);
    let freeze = at(65);
    let thaw = freeze + config.freeze;
    if kill + config.worker_down >= freeze {
        return Err(format!(
            "the worker would still be down ({} s) when etcd freezes; lower --worker-down-secs \
             or make the run longer (--minutes)",
            config.worker_down.as_secs_f64()
        ));
    }
    if thaw + QUIET_TAIL > total {
        return Err(format!(
            "etcd frozen at {} s for {} s leaves less than {} s before the end at {} s; \
             lower --freeze-secs or make the run longer (--minutes)",
            freeze.as_secs(),
            config.freeze.as_secs_f64(),
            QUIET_TAIL.as_secs(),
            total.as_secs()
        ));
    }
    let mut events = Vec::new();
    let mut k = 1u32;
    while config.version_every * k < total {
        events.push((config.version_every * k, Event::NewVersion(k + 1)));
        k += 1;
    }
    let pin_at = at(20);
    events.push((
        pin_at,
        Event::Pin(newest_before(pin_at, config.version_every)),
    ));
    events.push((at(30), Event::Unpin));
    events.push((at(40), Event::EtcdRestart));
    events.push((kill, Event::WorkerKill));
    events.push((kill + config.worker_down, Event::WorkerStart));
    events.push((freeze, Event::EtcdFreeze));
    events.push((thaw, Event::EtcdThaw));
    // Stable: at the same instant a new version comes before the fault.
    events.sort_by_key(|(t, _)| *t);
    Ok(events)
}

/// The newest version the schedule delivers (the number to export beforehand).
pub fn last_version(events: &[Scheduled]) -> u32 {
    events
        .iter()
        .filter_map(|(_, e)| match e {
            Event::NewVersion(v) => Some(*v),
            _ => None,
        })
        .max()
        .unwrap_or(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(minutes: u64) -> ScheduleConfig {
        ScheduleConfig {
            total: Duration::from_secs(minutes * 60),
            version_every: Duration::from_secs(30),
            worker_down: Duration::from_secs(5),
            freeze: Duration::from_secs(15),
            lease_ttl: Duration::from_secs(10),
        }
    }

    fn find(events: &[Scheduled], wanted: Event) -> Duration {
        events
            .iter()
            .find(|(_, e)| *e == wanted)
            .map(|(t, _)| *t)
            .unwrap_or_else(|| panic!("{wanted:?} missing from {events:?}"))
    }

    #[test]
    fn ten_minutes_has_every_fault_in_order_and_a_version_every_30_s() {
        let events = schedule(&config(10)).unwrap();
        let s = Duration::from_secs;
        assert!(events.windows(2).all(|w| w[0].0 <= w[1].0), "{events:?}");
        // Versions 2..=20 at 30, 60, ..., 570 s.
        let versions: Vec<_> = events
            .iter()
            .filter_map(|(t, e)| match e {
                Event::NewVersion(v) => Some((*t, *v)),
                _ => None,
            })
            .collect();
        assert_eq!(versions.len(), 19);
        assert_eq!(versions[0], (s(30), 2));
        assert_eq!(versions[18], (s(570), 20));
        assert_eq!(last_version(&events), 20);
        // At 120 s version 5 arrives; the pin names version 4, there since 90 s.
        assert_eq!(find(&events, Event::Pin(4)), s(120));
        assert_eq!(find(&events, Event::Unpin), s(180));
        assert_eq!(find(&events, Event::EtcdRestart), s(240));
        assert_eq!(find(&events, Event::WorkerKill), s(300));
        assert_eq!(find(&events, Event::WorkerStart), s(305));
        assert_eq!(find(&events, Event::EtcdFreeze), s(390));
        assert_eq!(find(&events, Event::EtcdThaw), s(405));
        // The version arriving at the pin's instant comes first.
        let at_120: Vec<_> = events.iter().filter(|(t, _)| *t == s(120)).collect();
        assert_eq!(at_120[0].1, Event::NewVersion(5));
    }

    #[test]
    fn two_minutes_fits_and_pins_version_1() {
        let events = schedule(&config(2)).unwrap();
        assert_eq!(last_version(&events), 4);
        assert_eq!(find(&events, Event::Pin(1)), Duration::from_secs(24));
        let thaw = find(&events, Event::EtcdThaw);
        assert!(thaw + QUIET_TAIL <= Duration::from_secs(120), "{thaw:?}");
        // Every fault happens exactly once.
        for e in [
            Event::Unpin,
            Event::EtcdRestart,
            Event::WorkerKill,
            Event::WorkerStart,
            Event::EtcdFreeze,
            Event::EtcdThaw,
        ] {
            assert_eq!(events.iter().filter(|(_, x)| *x == e).count(), 1, "{e:?}");
        }
    }

    #[test]
    fn refuses_what_does_not_fit_and_names_the_flag() {
        let err = schedule(&ScheduleConfig {
            total: Duration::from_secs(30),
            ..config(1)
        })
        .unwrap_err();
        assert!(err.contains("SOAK_MINUTES"), "{err}");
        let err = schedule(&ScheduleConfig {
            freeze: Duration::from_secs(10),
            ..config(10)
        })
        .unwrap_err();
        assert!(
            err.contains("--freeze-secs") && err.contains("lease TTL"),
            "{err}"
        );
        let err = schedule(&ScheduleConfig {
            freeze: Duration::from_secs(60),
            ..config(2)
        })
        .unwrap_err();
        assert!(err.contains("before the end"), "{err}");
        let err = schedule(&ScheduleConfig {
            worker_down: Duration::from_secs(60),
            ..config(2)
        })
        .unwrap_err();
        assert!(err.contains("--worker-down-secs"), "{err}");
        let err = schedule(&ScheduleConfig {
            version_every: Duration::ZERO,
            ..config(2)
        })
        .unwrap_err();
        assert!(err.contains("--version-every-secs"), "{err}");
    }

    #[test]
    fn newest_before_counts_strictly_earlier_arrivals() {
        let every = Duration::from_secs(30);
        assert_eq!(newest_before(Duration::ZERO, every), 1);
        assert_eq!(newest_before(Duration::from_secs(29), every), 1);
        assert_eq!(newest_before(Duration::from_secs(30), every), 1);
        assert_eq!(newest_before(Duration::from_millis(30_001), every), 2);
        assert_eq!(newest_before(Duration::from_secs(120), every), 4);
    }
}
