//! CPU time and memory of a process tree from /proc, for comparing proxies by the
//! resources they use (not only by wall-clock throughput on a shared machine).

use std::collections::HashMap;

/// Clock ticks per second of /proc/PID/stat times (USER_HZ, 100 on Linux).
const TICKS_PER_SEC: f64 = 100.0;

/// CPU seconds (user + system) used so far by `pid` and all its live descendants.
#[must_use]
pub fn cpu_seconds(pid: u32) -> f64 {
    tree(pid)
        .iter()
        .filter_map(|p| stat_fields(*p))
        .map(|f| f.0)
        .sum()
}

/// Resident memory (kB) of `pid` and its live descendants.
#[must_use]
pub fn rss_kb(pid: u32) -> u64 {
    tree(pid)
        .iter()
        .filter_map(|p| status_kb(*p, "VmRSS:"))
        .sum()
}

/// Peak resident memory (kB, VmHWM) of `pid` and its live descendants.
#[must_use]
pub fn peak_rss_kb(pid: u32) -> u64 {
    tree(pid)
        .iter()
        .filter_map(|p| status_kb(*p, "VmHWM:"))
        .sum()
}

/// TCP connections this machine has opened so far (`ActiveOpens` of /proc/net/snmp):
/// the difference over a run counts the client's connections and the upstream
/// connections a proxy opened, so a proxy that churns upstream connections shows.
#[must_use]
pub fn tcp_active_opens() -> u64 {
    let Ok(text) = std::fs::read_to_string("/proc/net/snmp") else {
        return 0;
    };
    let mut tcp = text.lines().filter(|l| l.starts_with("Tcp:"));
    let (Some(names), Some(values)) = (tcp.next(), tcp.next()) else {
        return 0;
    };
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(name, _)| *name == "ActiveOpens")
        .and_then(|(_, value)| value.parse().ok())
        .unwrap_or(0)
}

/// (cpu seconds, parent pid) from /proc/PID/stat.
fn stat_fields(pid: u32) -> Option<(f64, u32)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may contain spaces: split after it.
    let rest = &text[text.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ppid: u32 = fields.get(1)?.parse().ok()?;
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some(((utime + stime) / TICKS_PER_SEC, ppid))
}

fn status_kb(pid: u32, key: &str) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    text.lines()
        .find(|l| l.starts_with(key))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// `pid` and its descendants.
fn tree(pid: u32) -> Vec<u32> {
    let mut children: HashMap<u32, Vec<u32>> = HashMap::new();
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for entry in dir.flatten() {
            let Some(p) = entry
                .file_name()
                .to_str()
                .and_then(|s| s.parse::<u32>().ok())
            else {
                continue;
            };
            if let Some((_, ppid)) = stat_fields(p) {
                children.entry(ppid).or_default().push(p);
            }
        }
    }
    let mut out = vec![pid];
    let mut i = 0;
    while i < out.len() {
        if let Some(c) = children.get(&out[i]) {
            out.extend(c);
        }
        i += 1;
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn reads_this_process() {
        let me = std::process::id();
        // Burn a little CPU so the counter is visibly positive.
        let mut x = 0u64;
        for i in 0..20_000_000u64 {
            x = x.wrapping_add(i * i);
        }
        assert!(x > 0);
        assert!(super::cpu_seconds(me) > 0.0);
        assert!(super::rss_kb(me) > 1000);
    }
}
