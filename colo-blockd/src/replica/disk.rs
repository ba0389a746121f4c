//! The file operations of a commit (journal writes, base-image writes,
//! syncs), all through one place so a test can stop a commit
//! after any of them, as a `kill -9` would: [`CrashHook`].

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

/// Zeroes are written in pieces of this size so zeroing a large range does
/// not allocate a buffer of the whole range.
const ZERO_CHUNK: usize = 1 << 20;

/// Simulates a process kill in the middle of a commit: after `remaining`
/// more operations the next one fails, and if it is a write only its first
/// half reaches the file (a torn write); every later operation fails too,
/// as nothing runs in a dead process. Disarmed by default.
#[derive(Debug, Default)]
pub(crate) struct CrashHook {
    remaining: Option<u64>,
    dead: bool,
}

impl CrashHook {
    pub(crate) fn arm(&mut self, operations: u64) {
        self.remaining = Some(operations);
    }

    pub(crate) fn disarm(&mut self) {
        self.remaining = None;
    }

    /// Counts one operation; true when this one is where the crash happens.
    fn fires(&mut self) -> bool {
        match &mut self.remaining {
            Some(0) => {
                self.remaining = None;
                self.dead = true;
                true
            }
            Some(n) => {
                *n -= 1;
                false
            }
            None => false,
        }
    }
}

/// The error of a simulated crash; the replica refuses every request after
/// it, as a dead process would.
pub(crate) fn simulated_crash() -> io::Error {
    io::Error::other("simulated crash (test hook)")
}

/// Counted file operations.
#[derive(Debug)]
pub(crate) struct Disk<'a> {
    hook: &'a mut CrashHook,
}

impl<'a> Disk<'a> {
    pub(crate) fn new(hook: &'a mut CrashHook) -> Disk<'a> {
        Disk { hook }
    }

    pub(crate) fn write_at(&mut self, file: &File, data: &[u8], offset: u64) -> io::Result<()> {
        if self.hook.dead {
            return Err(simulated_crash());
        }
        if self.hook.fires() {
            file.write_all_at(&data[..data.len() / 2], offset)?;
            return Err(simulated_crash());
        }
        file.write_all_at(data, offset)
    }

    pub(crate) fn write_zeroes_at(&mut self, file: &File, offset: u64, len: u64) -> io::Result<()> {
        let zeroes = vec![0u8; ZERO_CHUNK.min(len as usize)];
        let mut done = 0u64;
        while done < len {
            let n = (len - done).min(zeroes.len() as u64) as usize;
            self.write_at(file, &zeroes[..n], offset + done)?;
            done += n as u64;
        }
        Ok(())
    }

    /// `fdatasync`: the data and the size are durable, which is all a
    /// commit needs (not the timestamps).
    pub(crate) fn sync(&mut self, file: &File) -> io::Result<()> {
        if self.hook.dead || self.hook.fires() {
            return Err(simulated_crash());
        }
        file.sync_data()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn armed_hook_tears_the_write_it_stops_at() {
        let f = tempfile::tempfile().unwrap();
        let mut hook = CrashHook::default();
        hook.arm(1);
        let mut disk = Disk::new(&mut hook);
        disk.write_at(&f, b"abcd", 0).unwrap();
        assert!(disk.write_at(&f, b"wxyz", 4).is_err());
        // The process is dead: nothing reaches the file any more.
        assert!(disk.write_at(&f, b"!", 8).is_err());
        assert!(disk.sync(&f).is_err());
        assert_eq!(f.metadata().unwrap().len(), 6);
        let mut buf = [0u8; 6];
        f.read_exact_at(&mut buf, 0).unwrap();
        assert_eq!(&buf, b"abcdwx");
    }
}
