//! CPU time of a process, from `/proc/<pid>/stat` (user + system, all its threads), to
//! charge a run's CPU to the router, the worker and the load generator itself; and its
//! resident memory, from `/proc/<pid>/status`, for the soak's growth check.

use std::time::Duration;

use crate::error::{Error, Result};

/// Clock ticks per second of `/proc/<pid>/stat`'s times. `USER_HZ` is part of Linux's ABI
/// and 100 on every architecture Aspire builds for (x86_64, aarch64).
pub const USER_HZ: u64 = 100;

/// The resolution of [`cpu_time`]: one clock tick.
pub const RESOLUTION: Duration = Duration::from_millis(1000 / USER_HZ);

/// User + system CPU time `pid` has used so far (`None`: this process).
pub fn cpu_time(pid: Option<u32>) -> Result<Duration> {
    let path = match pid {
        Some(pid) => format!("/proc/{pid}/stat"),
        None => "/proc/self/stat".to_string(),
    };
    let text =
        std::fs::read_to_string(&path).map_err(|e| Error::io(format!("reading {path}"), e))?;
    parse_cpu_ticks(&text)
        .map(|ticks| Duration::from_millis(ticks * 1000 / USER_HZ))
        .ok_or_else(|| Error::BadResult(format!("{path} has no utime/stime fields: {text:?}")))
}

/// CPU time every process on the machine has used so far, all CPUs together (`/proc/stat`:
/// user, nice, system, irq, softirq and steal; not idle or iowait). Over a window, minus
/// the CPU of the processes a run knows about, it shows how much else was running.
pub fn machine_busy() -> Result<Duration> {
    let text =
        std::fs::read_to_string("/proc/stat").map_err(|e| Error::io("reading /proc/stat", e))?;
    parse_machine_busy_ticks(&text)
        .map(|ticks| Duration::from_millis(ticks * 1000 / USER_HZ))
        .ok_or_else(|| Error::BadResult("/proc/stat has no cpu line".to_string()))
}

/// The busy ticks of `/proc/stat`'s first (`cpu`) line.
pub fn parse_machine_busy_ticks(stat: &str) -> Option<u64> {
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let fields: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|f| f.parse().ok())
        .collect::<Option<_>>()?;
    // user nice system idle iowait irq softirq steal [guest guest_nice, already in user]
    let at = |i: usize| fields.get(i).copied().unwrap_or(0);
    Some(at(0) + at(1) + at(2) + at(5) + at(6) + at(7))
}

/// `utime + stime` (fields 14 and 15) of a `/proc/<pid>/stat` line. The command name
/// (field 2) is in parentheses and may hold spaces and parentheses, so fields are counted
/// from the last `)`.
pub fn parse_cpu_ticks(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    // After the name: field 3 (state) is the first; utime and stime are fields 14 and 15.
    let mut fields = rest.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

/// Resident memory of `pid` (`VmRSS` of `/proc/<pid>/status`), bytes.
pub fn rss_bytes(pid: u32) -> Result<u64> {
    let path = format!("/proc/{pid}/status");
    let text =
        std::fs::read_to_string(&path).map_err(|e| Error::io(format!("reading {path}"), e))?;
    parse_vm_rss(&text).ok_or_else(|| Error::BadResult(format!("{path} has no VmRSS line")))
}

/// The `VmRSS:` line of a `/proc/<pid>/status` text, in bytes (the kernel writes kB,
/// meaning KiB). A zombie has no such line.
pub fn parse_vm_rss(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let mut fields = line["VmRSS:".len()..].split_whitespace();
    let kib: u64 = fields.next()?.parse().ok()?;
    match fields.next() {
        Some("kB") | None => kib.checked_mul(1024),
        Some(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_utime_and_stime_past_a_strange_name() {
        let line = "4242 (tokio (rt) x) S 1 4242 4242 0 -1 4194560 1234 0 0 0 \
                    250 75 0 0 20 0 9 0 12345 1000000 500 18446744073709551615";
        assert_eq!(parse_cpu_ticks(line), Some(325));
        assert_eq!(parse_cpu_ticks("garbage"), None);
    }

    #[test]
    fn machine_busy_counts_all_but_idle_and_iowait() {
        let stat = "cpu  100 5 50 1000 20 3 2 7 0 0\ncpu0 50 2 25 500 10 1 1 3 0 0\n";
        assert_eq!(parse_machine_busy_ticks(stat), Some(167));
        assert_eq!(parse_machine_busy_ticks("intr 1 2 3"), None);
        assert!(machine_busy().unwrap() > Duration::ZERO);
    }

    #[test]
    fn this_process_uses_some_cpu() {
        let before = cpu_time(None).unwrap();
        let start = std::time::Instant::now();
        let mut x = 0u64;
        while start.elapsed() < Duration::from_millis(60) {
            x = std::hint::black_box(x.wrapping_add(1));
        }
        let after = cpu_time(None).unwrap();
        assert!(after > before, "{before:?} -> {after:?}");
        assert!(cpu_time(Some(u32::MAX)).is_err());
    }

    #[test]
    fn reads_vm_rss_in_bytes() {
        let status = "Name:\tetcd\nVmPeak:\t  999 kB\nVmRSS:\t   30720 kB\nThreads:\t9\n";
        assert_eq!(parse_vm_rss(status), Some(30 << 20));
        assert_eq!(parse_vm_rss("Name:\tzombie\nState:\tZ\n"), None);
        assert_eq!(parse_vm_rss("VmRSS:\t12 MB\n"), None);
        assert_eq!(parse_vm_rss("VmRSS:\tlots kB\n"), None);
        assert!(rss_bytes(std::process::id()).unwrap() > 1 << 20);
        assert!(rss_bytes(u32::MAX).is_err());
    }
}
