//! Contracts of the test guest (`integration/make-guest.sh`): what it prints on its serial
//! console and what it writes to its disk, and the checks built on them.
//!
//! Every second the guest writes heartbeat record `n` to sector `n` of its disk, makes it
//! durable, and only then prints `COLO-HB n=<n>`. So on any disk that belongs to a guest whose
//! last printed heartbeat is `H`, sectors `1..=H` hold records `1..=H`, sector `H+1` may hold
//! record `H+1` (written, not yet printed), and nothing beyond is written. A gap is a lost
//! acknowledged write; a sector that is neither zero nor its record is corruption.

use std::path::Path;

use anyhow::{Context, Result};
use serde::Serialize;

/// Sector size of the guest's records.
pub const SECTOR: usize = 512;

/// Kernel command line for a guest that dirties `load_mib_s` MiB of memory per second.
///
/// `no_timer_check` skips the kernel's early IO-APIC timer test, as virtual-machine images
/// do: under TCG on a loaded host the test can miss its ticks and panic the boot ("IO-APIC +
/// timer doesn't work!"). COLO makes that likelier than a plain VM, because a pair started
/// during the guest's boot has the secondary run the test again, on its own clock, after a
/// checkpoint taken mid-test.
pub fn kernel_cmdline(guest_cidr: &str, load_mib_s: u32) -> String {
    format!(
        "console=ttyS0 quiet panic=-1 no_timer_check colo_ip={guest_cidr} colo_load={load_mib_s}"
    )
}

/// The 512-byte record for heartbeat `n`.
pub fn record(n: u64) -> Vec<u8> {
    format!("REC{n:012}\n").repeat(SECTOR / 16).into_bytes()
}

/// What the serial log of a guest says.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct SerialSummary {
    /// The guest printed `COLO-READY`.
    pub ready: bool,
    /// Last heartbeat number printed, if any.
    pub last_heartbeat: Option<u64>,
    /// Lines the guest flagged as errors (`COLO-ERR ...`) or kernel oopses.
    pub errors: Vec<String>,
}

/// Reads a serial log. Missing files read as empty (the guest has not printed yet).
pub fn read_serial(path: &Path) -> SerialSummary {
    let bytes = std::fs::read(path).unwrap_or_default();
    let text = String::from_utf8_lossy(&bytes);
    let mut summary = SerialSummary::default();
    for line in text.lines() {
        let line = line.trim_matches(|c: char| c == '\r' || c.is_whitespace());
        if line == "COLO-READY" {
            summary.ready = true;
        } else if let Some(n) = line.strip_prefix("COLO-HB n=") {
            if let Ok(n) = n.trim().parse() {
                summary.last_heartbeat = Some(n);
            }
        } else if line.starts_with("COLO-ERR")
            || line.contains("Kernel panic")
            || line.contains("kernel BUG")
            || line.contains("Oops")
        {
            summary.errors.push(line.to_string());
        }
    }
    summary
}

/// Result of checking a disk image against the heartbeat contract.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DiskCheck {
    /// Highest record found (0 when none).
    pub highest_record: u64,
    /// Records in `1..=highest` that are missing (sector still zero).
    pub missing: Vec<u64>,
    /// Sectors that hold neither zeros nor their own record.
    pub torn: Vec<u64>,
    /// The last heartbeat the guest printed, which the disk must cover.
    pub last_heartbeat: u64,
}

impl DiskCheck {
    /// Every printed heartbeat is on disk, contiguously, nothing torn, nothing from the future.
    pub fn is_consistent(&self) -> bool {
        self.missing.is_empty()
            && self.torn.is_empty()
            && self.highest_record >= self.last_heartbeat
            && self.highest_record <= self.last_heartbeat + 1
    }
}

/// Checks a raw image: records `1..=k` present and intact with `k` in `{H, H+1}`.
pub fn check_disk(image: &Path, last_heartbeat: u64) -> Result<DiskCheck> {
    let data = std::fs::read(image).with_context(|| format!("reading {}", image.display()))?;
    Ok(check_disk_bytes(&data, last_heartbeat))
}

/// [`check_disk`] on bytes already read.
pub fn check_disk_bytes(data: &[u8], last_heartbeat: u64) -> DiskCheck {
    let mut highest = 0;
    let mut torn = Vec::new();
    let mut present = Vec::new();
    for (n, sector) in data.chunks(SECTOR).enumerate().skip(1) {
        let n = n as u64;
        if sector.iter().all(|&b| b == 0) {
            continue;
        }
        if sector == record(n).as_slice() {
            present.push(n);
            highest = n;
        } else {
            torn.push(n);
        }
    }
    let missing = (1..=highest)
        .filter(|n| present.binary_search(n).is_err())
        .collect();
    DiskCheck {
        highest_record: highest,
        missing,
        torn,
        last_heartbeat,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(records: &[u64], sectors: usize) -> Vec<u8> {
        let mut data = vec![0u8; sectors * SECTOR];
        for &n in records {
            let at = n as usize * SECTOR;
            data[at..at + SECTOR].copy_from_slice(&record(n));
        }
        data
    }

    #[test]
    fn record_is_one_sector_of_repeated_lines() {
        let r = record(7);
        assert_eq!(r.len(), SECTOR);
        assert!(r.starts_with(b"REC000000000007\n"));
    }

    #[test]
    fn contiguous_records_up_to_heartbeat_are_consistent() {
        let data = image(&[1, 2, 3, 4], 16);
        assert!(check_disk_bytes(&data, 4).is_consistent());
        assert!(
            check_disk_bytes(&data, 3).is_consistent(),
            "H+1 may be written"
        );
        assert!(
            !check_disk_bytes(&data, 2).is_consistent(),
            "H+2 is from the future"
        );
        assert!(
            !check_disk_bytes(&data, 5).is_consistent(),
            "a printed heartbeat is missing"
        );
    }

    #[test]
    fn gaps_and_torn_sectors_are_reported() {
        let mut data = image(&[1, 2, 4], 16);
        data[5 * SECTOR + 100] = 0xff;
        let check = check_disk_bytes(&data, 4);
        assert_eq!(check.missing, vec![3]);
        assert_eq!(check.torn, vec![5]);
        assert!(!check.is_consistent());
    }

    #[test]
    fn serial_log_parsing() {
        let dir = std::env::temp_dir().join(format!("colo-serial-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("serial.log");
        std::fs::write(
            &path,
            "boot\r\nCOLO-READY\r\nCOLO-HB n=1\r\nCOLO-HB n=2\nCOLO-ERR md5\n",
        )
        .unwrap();
        let s = read_serial(&path);
        assert!(s.ready);
        assert_eq!(s.last_heartbeat, Some(2));
        assert_eq!(s.errors, vec!["COLO-ERR md5".to_string()]);
        std::fs::remove_dir_all(dir).unwrap();
    }
}
