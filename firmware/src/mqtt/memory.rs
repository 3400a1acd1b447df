//! [`MemoryLink`]: an in-memory `embedded-io-async` transport. Reads return a fixed script of
//! broker bytes (then end of stream); writes are recorded into a caller's buffer. No allocation,
//! so the MCU self-test uses it as well as the host tests.
//!
//! Invariant: a write that does not fit the record buffer fails with `OutOfMemory` and records
//! nothing of itself.

use core::convert::Infallible;

use embedded_io_async::{ErrorKind, ErrorType, Read, Write};

use crate::uplink::Link;

pub struct MemoryLink<'a> {
    replies: &'a [u8],
    read_pos: usize,
    written: &'a mut [u8],
    written_len: usize,
    /// Largest chunk one `read` returns, to exercise partial reads.
    read_chunk: usize,
}

impl<'a> MemoryLink<'a> {
    pub fn new(replies: &'a [u8], written: &'a mut [u8]) -> Self {
        Self {
            replies,
            read_pos: 0,
            written,
            written_len: 0,
            read_chunk: 3,
        }
    }

    /// Everything written so far.
    pub fn written(&self) -> &[u8] {
        &self.written[..self.written_len]
    }

    /// Script bytes not read yet.
    pub fn unread(&self) -> usize {
        self.replies.len() - self.read_pos
    }
}

impl ErrorType for MemoryLink<'_> {
    type Error = ErrorKind;
}

impl Read for MemoryLink<'_> {
    async fn read(&mut self, buf: &mut [u8]) -> Result<usize, ErrorKind> {
        let n = buf.len().min(self.unread()).min(self.read_chunk);
        buf[..n].copy_from_slice(&self.replies[self.read_pos..self.read_pos + n]);
        self.read_pos += n;
        Ok(n)
    }
}

impl Write for MemoryLink<'_> {
    async fn write(&mut self, buf: &[u8]) -> Result<usize, ErrorKind> {
        let dst = self
            .written
            .get_mut(self.written_len..self.written_len + buf.len())
            .ok_or(ErrorKind::OutOfMemory)?;
        dst.copy_from_slice(buf);
        self.written_len += buf.len();
        Ok(buf.len())
    }

    async fn flush(&mut self) -> Result<(), ErrorKind> {
        Ok(())
    }
}

/// Opening a memory link always succeeds and keeps the script position: the script is one
/// broker conversation.
impl Link for MemoryLink<'_> {
    type OpenError = Infallible;
    async fn open(&mut self) -> Result<(), Infallible> {
        Ok(())
    }
}
