use std::io::{self, Read};

/// Socket bytes read ahead of rustls: its `read_tls` asks for 4 KiB at a
/// time, sixteen system calls per 64 KiB; through this, one read brings
/// many records. Only where reads need not stop at record ends (see
/// [`crate::RecordBoundary`]).
pub struct ReadAhead {
    buf: Box<[u8]>,
    start: usize,
    end: usize,
}

impl ReadAhead {
    pub fn new(capacity: usize) -> ReadAhead {
        ReadAhead {
            buf: vec![0; capacity].into_boxed_slice(),
            start: 0,
            end: 0,
        }
    }

    /// Whether every byte read has gone to rustls.
    pub fn is_empty(&self) -> bool {
        self.start == self.end
    }

    /// Gives rustls what was read ahead, first reading `socket` once if
    /// nothing is left; `Ok(0)` is the end of the stream.
    pub fn read_tls<D>(
        &mut self,
        tls: &mut rustls::ConnectionCommon<D>,
        mut socket: impl Read,
    ) -> io::Result<usize> {
        if self.is_empty() {
            let n = socket.read(&mut self.buf)?;
            self.start = 0;
            self.end = n;
            if n == 0 {
                return Ok(0);
            }
        }
        let mut unread = &self.buf[self.start..self.end];
        let n = tls.read_tls(&mut unread)?;
        self.start += n;
        Ok(n)
    }
}
