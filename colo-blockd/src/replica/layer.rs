//! One epoch's writes of one VM (the PVM log P or the SVM overlay A): an
//! extent map whose data stays in memory up to a budget and goes to an
//! append-only spill file beyond it. A write is never refused for lack of
//! memory: past the budget it costs one `pwrite` into the page cache.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

use bytes::Bytes;

use super::extents::{ExtentMap, Source};

/// What a commit writes for one extent.
#[derive(Debug)]
pub(crate) enum Chunk {
    Data(Bytes),
    Zeroes(u64),
}

/// One epoch layer.
#[derive(Debug)]
pub(crate) struct Layer {
    extents: ExtentMap,
    memory_budget: u64,
    spill: File,
    /// Where the next spilled write goes. Overwritten spill data is not
    /// reclaimed before the epoch ends: the file is emptied at every reset.
    spill_end: u64,
}

impl Layer {
    /// A layer spilling into `spill_path`, which is created or emptied:
    /// a spill file never outlives its epoch, not even across a restart.
    pub(crate) fn create(spill_path: &Path, memory_budget: u64) -> io::Result<Layer> {
        let spill = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(spill_path)?;
        Ok(Layer {
            extents: ExtentMap::default(),
            memory_budget,
            spill,
            spill_end: 0,
        })
    }

    pub(crate) fn write(&mut self, offset: u64, data: Bytes) -> io::Result<()> {
        let len = data.len() as u64;
        if len == 0 {
            return Ok(());
        }
        if self.extents.memory_bytes() + len <= self.memory_budget {
            self.extents
                .insert(offset, offset + len, Source::Memory(data));
        } else {
            self.spill.write_all_at(&data, self.spill_end)?;
            self.extents
                .insert(offset, offset + len, Source::Spill(self.spill_end));
            self.spill_end += len;
        }
        Ok(())
    }

    pub(crate) fn write_zeroes(&mut self, offset: u64, len: u64) {
        if len > 0 {
            self.extents.insert(offset, offset + len, Source::Zero);
        }
    }

    /// Fills `buf` with what the layer holds at `offset`, reading `lower`
    /// (what lies under the layer) wherever the layer has not written.
    pub(crate) fn read_over(
        &self,
        lower: &dyn Fn(u64, &mut [u8]) -> io::Result<()>,
        offset: u64,
        buf: &mut [u8],
    ) -> io::Result<()> {
        for seg in self.extents.segments(offset, offset + buf.len() as u64) {
            let out = &mut buf[(seg.start - offset) as usize..(seg.end - offset) as usize];
            match seg.source {
                None => lower(seg.start, out)?,
                Some(Source::Memory(b)) => out.copy_from_slice(&b),
                Some(Source::Spill(at)) => self.spill.read_exact_at(out, at)?,
                Some(Source::Zero) => out.fill(0),
            }
        }
        Ok(())
    }

    /// Every written range in disk order with its data, read back from the
    /// spill file where needed.
    pub(crate) fn for_each_chunk(
        &self,
        mut f: impl FnMut(u64, Chunk) -> io::Result<()>,
    ) -> io::Result<()> {
        for (start, extent) in self.extents.iter() {
            let len = extent.end - start;
            let chunk = match &extent.source {
                Source::Memory(b) => Chunk::Data(b.clone()),
                Source::Spill(at) => {
                    let mut buf = vec![0u8; len as usize];
                    self.spill.read_exact_at(&mut buf, *at)?;
                    Chunk::Data(Bytes::from(buf))
                }
                Source::Zero => Chunk::Zeroes(len),
            };
            f(start, chunk)?;
        }
        Ok(())
    }

    /// Forgets the epoch: the map and the spill file are emptied.
    pub(crate) fn reset(&mut self) -> io::Result<()> {
        self.extents.clear();
        if self.spill_end > 0 {
            self.spill.set_len(0)?;
            self.spill_end = 0;
        }
        Ok(())
    }

    /// How many extents the layer has and how many of their bytes are data
    /// (not zeroes): what sizes a journal of it.
    pub(crate) fn extents_and_data_bytes(&self) -> (u64, u64) {
        self.extents.iter().fold((0, 0), |(n, bytes), (start, e)| {
            let data = match e.source {
                Source::Zero => 0,
                _ => e.end - start,
            };
            (n + 1, bytes + data)
        })
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.extents.is_empty()
    }

    pub(crate) fn memory_bytes(&self) -> u64 {
        self.extents.memory_bytes()
    }

    pub(crate) fn spilled_bytes(&self) -> u64 {
        self.spill_end
    }

    /// True once the layer holds more than its memory budget (in memory
    /// and spilled together): for the PVM log, the moment to ask for a
    /// checkpoint.
    pub(crate) fn over_budget(&self) -> bool {
        self.memory_bytes() + self.spilled_bytes() > self.memory_budget
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A lower level reading `fill` everywhere.
    fn base(fill: u8) -> impl Fn(u64, &mut [u8]) -> io::Result<()> {
        move |_, buf| {
            buf.fill(fill);
            Ok(())
        }
    }

    #[test]
    fn writes_past_the_memory_budget_spill_and_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let base = base(b'.');
        let mut layer = Layer::create(&dir.path().join("spill"), 8).unwrap();
        layer.write(0, Bytes::from_static(b"12345678")).unwrap();
        assert_eq!((layer.memory_bytes(), layer.spilled_bytes()), (8, 0));
        assert!(!layer.over_budget());
        layer.write(20, Bytes::from_static(b"abcd")).unwrap();
        assert_eq!((layer.memory_bytes(), layer.spilled_bytes()), (8, 4));
        assert!(layer.over_budget());
        layer.write_zeroes(2, 2);
        let mut buf = [0u8; 26];
        layer.read_over(&base, 0, &mut buf).unwrap();
        assert_eq!(&buf, b"12\0\x005678............abcd..");
    }

    #[test]
    fn overwriting_memory_data_frees_budget() {
        let dir = tempfile::tempdir().unwrap();
        let mut layer = Layer::create(&dir.path().join("spill"), 8).unwrap();
        layer.write(0, Bytes::from_static(b"12345678")).unwrap();
        layer.write_zeroes(0, 4);
        assert_eq!(layer.memory_bytes(), 4);
        layer.write(100, Bytes::from_static(b"abcd")).unwrap();
        assert_eq!((layer.memory_bytes(), layer.spilled_bytes()), (8, 0));
    }

    #[test]
    fn reset_empties_memory_and_spill_file() {
        let dir = tempfile::tempdir().unwrap();
        let base = base(b'.');
        let mut layer = Layer::create(&dir.path().join("spill"), 0).unwrap();
        layer.write(0, Bytes::from_static(b"xy")).unwrap();
        layer.reset().unwrap();
        assert!(layer.is_empty());
        assert_eq!(layer.spilled_bytes(), 0);
        assert_eq!(
            std::fs::metadata(dir.path().join("spill")).unwrap().len(),
            0
        );
        let mut buf = [0u8; 2];
        layer.read_over(&base, 0, &mut buf).unwrap();
        assert_eq!(&buf, b"..");
    }
}
