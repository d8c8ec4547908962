//! The storage behind a disk: what the I/O thread reads, writes and
//! syncs.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

/// Where a mass-storage device keeps its blocks: a raw image file, or
/// anything else that reads and writes at offsets (a test's image that
/// holds its I/O until told to go on). Its reads, writes and syncs run on
/// the disk's own I/O thread, so they may block; only
/// [`DiskImage::read_at_nowait`] runs on the thread that polls the device.
pub trait DiskImage: Send + Sync + 'static {
    /// Reads into `buf` at `offset`; fewer bytes than asked, or 0 at the
    /// end of the image, as `pread` does.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize>;
    /// Reads what can be read without waiting for the storage (what is in
    /// the page cache), as `preadv2(RWF_NOWAIT)` does: `WouldBlock` when
    /// that is not all of it (then `read_at` runs on the I/O thread), or
    /// `Unsupported`. The default never tries.
    fn read_at_nowait(&self, _buf: &mut [u8], _offset: u64) -> io::Result<usize> {
        Err(io::ErrorKind::Unsupported.into())
    }
    /// Writes from `data` at `offset`; possibly fewer bytes, as `pwrite`.
    fn write_at(&self, data: &[u8], offset: u64) -> io::Result<usize>;
    /// Makes every completed write durable (`fdatasync`).
    fn sync_data(&self) -> io::Result<()>;
}

impl DiskImage for File {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        FileExt::read_at(self, buf, offset)
    }
    fn read_at_nowait(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        use rustix::io::{preadv2, ReadWriteFlags};
        let mut bufs = [io::IoSliceMut::new(buf)];
        Ok(preadv2(self, &mut bufs, offset, ReadWriteFlags::NOWAIT)?)
    }
    fn write_at(&self, data: &[u8], offset: u64) -> io::Result<usize> {
        FileExt::write_at(self, data, offset)
    }
    fn sync_data(&self) -> io::Result<()> {
        File::sync_data(self)
    }
}
