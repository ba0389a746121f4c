//! A raw image file as an export. Positional I/O (`pread`/`pwrite`) lets
//! concurrent requests share one file descriptor; the blocking calls run on
//! tokio's blocking pool so they never stall the connection's reader.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};

use super::{BlockBackend, Capabilities};
use crate::proto::ZeroMode;

/// Zeroes are written in pieces of this size so zeroing a large range does
/// not allocate a buffer of the whole range.
const ZERO_CHUNK: usize = 1 << 20;

/// A raw image file.
#[derive(Debug, Clone)]
pub struct FileBackend {
    file: Arc<File>,
    size: u64,
    read_only: bool,
}

impl FileBackend {
    /// Opens `path` for reading and (unless `read_only`) writing. The
    /// export's size is the file's size at open time.
    pub fn open(path: &Path, read_only: bool) -> io::Result<FileBackend> {
        let file = OpenOptions::new().read(true).write(!read_only).open(path)?;
        let size = file.metadata()?.len();
        Ok(FileBackend {
            file: Arc::new(file),
            size,
            read_only,
        })
    }

    async fn blocking<T: Send + 'static>(
        &self,
        op: impl FnOnce(&File) -> io::Result<T> + Send + 'static,
    ) -> io::Result<T> {
        let file = Arc::clone(&self.file);
        tokio::task::spawn_blocking(move || op(&file))
            .await
            .map_err(io::Error::other)?
    }
}

fn write_zero_range(file: &File, offset: u64, length: u32) -> io::Result<()> {
    let zeroes = vec![0u8; ZERO_CHUNK.min(length as usize)];
    let mut done = 0u64;
    while done < u64::from(length) {
        let n = (u64::from(length) - done).min(zeroes.len() as u64) as usize;
        file.write_all_at(&zeroes[..n], offset + done)?;
        done += n as u64;
    }
    Ok(())
}

impl BlockBackend for FileBackend {
    fn size(&self) -> u64 {
        self.size
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            read_only: self.read_only,
            // All connections share one file: fsync covers every write.
            multi_conn: true,
        }
    }

    async fn read_at(&self, offset: u64, length: u32) -> io::Result<Bytes> {
        self.blocking(move |f| {
            let mut buf = BytesMut::zeroed(length as usize);
            f.read_exact_at(&mut buf, offset)?;
            Ok(buf.freeze())
        })
        .await
    }

    async fn write_at(&self, offset: u64, data: Bytes, fua: bool) -> io::Result<()> {
        self.blocking(move |f| {
            f.write_all_at(&data, offset)?;
            if fua { f.sync_data() } else { Ok(()) }
        })
        .await
    }

    async fn flush(&self) -> io::Result<()> {
        self.blocking(|f| f.sync_data()).await
    }

    /// Punching holes needs `fallocate`, which std does not offer; zeroing
    /// instead keeps the file's size and makes trimmed ranges read as
    /// zeroes, as a punched hole would.
    async fn trim(&self, offset: u64, length: u32, fua: bool) -> io::Result<()> {
        self.write_zeroes(
            offset,
            length,
            fua,
            ZeroMode {
                may_trim: true,
                fast_only: false,
            },
        )
        .await
    }

    async fn write_zeroes(
        &self,
        offset: u64,
        length: u32,
        fua: bool,
        mode: ZeroMode,
    ) -> io::Result<()> {
        // Zeroing writes every byte (see `trim`), which is never fast: the
        // client asked to hear so instead of waiting.
        if mode.fast_only {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "zeroing a raw file writes every byte",
            ));
        }
        self.blocking(move |f| {
            write_zero_range(f, offset, length)?;
            if fua { f.sync_data() } else { Ok(()) }
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(len: usize) -> tempfile::NamedTempFile {
        let f = tempfile::NamedTempFile::new().unwrap();
        f.as_file().write_all_at(&vec![0x5a; len], 0).unwrap();
        f
    }

    #[tokio::test]
    async fn write_then_read_back() {
        let img = image(8192);
        let b = FileBackend::open(img.path(), false).unwrap();
        assert_eq!(b.size(), 8192);
        b.write_at(100, Bytes::from_static(b"hello"), true)
            .await
            .unwrap();
        assert_eq!(
            &b.read_at(98, 9).await.unwrap()[..],
            b"\x5a\x5ahello\x5a\x5a"
        );
    }

    #[tokio::test]
    async fn write_zeroes_spanning_several_chunks_zeroes_exactly_the_range() {
        let len = 3 * ZERO_CHUNK + 10;
        let img = image(len);
        let b = FileBackend::open(img.path(), false).unwrap();
        let mode = ZeroMode {
            may_trim: false,
            fast_only: false,
        };
        b.write_zeroes(1, (len - 2) as u32, false, mode)
            .await
            .unwrap();
        let all = b.read_at(0, len as u32).await.unwrap();
        assert_eq!(all[0], 0x5a);
        assert_eq!(all[len - 1], 0x5a);
        assert!(all[1..len - 1].iter().all(|&x| x == 0));
    }

    #[tokio::test]
    async fn fast_zero_is_refused_and_leaves_data() {
        let img = image(4096);
        let b = FileBackend::open(img.path(), false).unwrap();
        let mode = ZeroMode {
            may_trim: true,
            fast_only: true,
        };
        let err = b.write_zeroes(0, 4096, false, mode).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::Unsupported);
        assert!(b.read_at(0, 4096).await.unwrap().iter().all(|&x| x == 0x5a));
    }

    #[tokio::test]
    async fn read_only_backend_cannot_write() {
        let img = image(4096);
        let b = FileBackend::open(img.path(), true).unwrap();
        assert!(b.capabilities().read_only);
        assert!(
            b.write_at(0, Bytes::from_static(b"x"), false)
                .await
                .is_err()
        );
    }
}
