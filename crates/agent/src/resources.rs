//! This host's capacity, read from the kernel.

/// CPUs and memory of this host.
#[derive(Debug, Clone, Copy)]
pub struct HostCapacity {
    pub cpus: u32,
    pub memory_bytes: u64,
}

impl HostCapacity {
    pub fn read() -> Self {
        let cpus = std::thread::available_parallelism()
            .map(|count| u32::try_from(count.get()).unwrap_or(u32::MAX))
            .unwrap_or(1);
        let memory_bytes = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|text| parse_mem_total(&text))
            .unwrap_or(0);
        Self { cpus, memory_bytes }
    }
}

/// Memory the kernel says is available for new work (`MemAvailable`).
pub fn memory_available_bytes() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text
        .lines()
        .find(|line| line.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

fn parse_mem_total(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|line| line.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

#[cfg(test)]
mod tests {
    #[test]
    fn parses_mem_total() {
        let text = "MemTotal:       24579812 kB\nMemFree:        1 kB\n";
        assert_eq!(super::parse_mem_total(text), Some(24_579_812 * 1024));
        assert_eq!(super::parse_mem_total("garbage"), None);
    }
}
