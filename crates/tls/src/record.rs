use std::io::{self, Read};

/// The length of a TLS record header: type, legacy version, length.
const HEADER_LEN: usize = 5;

/// Where a byte stream stands relative to TLS record boundaries, so that
/// reads for rustls never take a byte past the end of the current record.
///
/// Before a connection's keys go to kernel TLS, everything the peer sent
/// after the last record user space has seen must still be in the
/// socket: the kernel decrypts it with the next record sequence number.
/// rustls reads as much as a read gives it, so the reads it makes during
/// the handshake and the OP phase go through [`RecordBoundary::reader`].
#[derive(Debug, Default, Clone)]
pub struct RecordBoundary {
    header: [u8; HEADER_LEN],
    /// Header bytes read of the current record.
    header_read: usize,
    /// Body bytes of the current record not yet read.
    body_left: usize,
}

impl RecordBoundary {
    /// Whether every record begun has been read whole: nothing of the
    /// peer's next record is in user space.
    pub fn at_record_start(&self) -> bool {
        self.header_read == 0 && self.body_left == 0
    }

    /// `inner`, read no further than the end of the current record.
    pub fn reader<R: Read>(&mut self, inner: R) -> RecordBounded<'_, R> {
        RecordBounded {
            boundary: self,
            inner,
        }
    }
}

/// A reader that ends each read at a TLS record boundary (see [`RecordBoundary`]).
pub struct RecordBounded<'a, R> {
    boundary: &'a mut RecordBoundary,
    inner: R,
}

impl<R: Read> Read for RecordBounded<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let b = &mut *self.boundary;
        if b.header_read < HEADER_LEN {
            let want = (HEADER_LEN - b.header_read).min(buf.len());
            let n = self.inner.read(&mut buf[..want])?;
            b.header[b.header_read..b.header_read + n].copy_from_slice(&buf[..n]);
            b.header_read += n;
            if b.header_read == HEADER_LEN {
                b.body_left = usize::from(u16::from_be_bytes([b.header[3], b.header[4]]));
                if b.body_left == 0 {
                    b.header_read = 0;
                }
            }
            return Ok(n);
        }
        let want = b.body_left.min(buf.len());
        let n = self.inner.read(&mut buf[..want])?;
        b.body_left -= n;
        if b.body_left == 0 {
            b.header_read = 0;
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(kind: u8, body: &[u8]) -> Vec<u8> {
        let mut r = vec![kind, 3, 3];
        r.extend_from_slice(&(body.len() as u16).to_be_bytes());
        r.extend_from_slice(body);
        r
    }

    /// A reader that hands out at most `chunk` bytes per read, as a
    /// socket might.
    struct Trickle<'a> {
        data: &'a [u8],
        chunk: usize,
    }

    impl Read for Trickle<'_> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let n = buf.len().min(self.chunk).min(self.data.len());
            buf[..n].copy_from_slice(&self.data[..n]);
            self.data = &self.data[n..];
            Ok(n)
        }
    }

    #[test]
    fn reads_stop_at_each_record_end_whatever_the_chunking() {
        let first = record(0x16, &[1; 300]);
        let empty = record(0x17, &[]);
        let second = record(0x17, &[2; 40]);
        let stream = [first.clone(), empty.clone(), second.clone()].concat();
        let ends = [first.len(), first.len() + empty.len(), stream.len()];
        for chunk in [1, 2, 3, 5, 7, 64, 4096] {
            let mut boundary = RecordBoundary::default();
            let mut source = Trickle {
                data: &stream,
                chunk,
            };
            let mut got = Vec::new();
            let mut buf = [0u8; 1024];
            // Bounded: each turn reads at least one byte of a finite stream.
            for _ in 0..stream.len() {
                let n = boundary.reader(&mut source).read(&mut buf).unwrap();
                if n == 0 {
                    break;
                }
                let before = got.len();
                got.extend_from_slice(&buf[..n]);
                // No read spans a record end.
                assert!(
                    !ends.iter().any(|&e| before < e && e < got.len()),
                    "chunk {chunk}: read {before}..{} spans a record end",
                    got.len()
                );
                assert_eq!(boundary.at_record_start(), ends.contains(&got.len()));
            }
            assert_eq!(got, stream, "chunk {chunk}");
        }
    }

    #[test]
    fn a_record_in_flight_is_not_a_boundary() {
        let mut boundary = RecordBoundary::default();
        assert!(boundary.at_record_start());
        let data = record(0x17, &[9; 10]);
        let mut source = Trickle {
            data: &data[..7],
            chunk: 7,
        };
        let mut buf = [0u8; 64];
        let n = boundary.reader(&mut source).read(&mut buf).unwrap();
        assert_eq!(n, 5);
        assert!(!boundary.at_record_start());
        let n = boundary.reader(&mut source).read(&mut buf).unwrap();
        assert_eq!(n, 2);
        assert!(!boundary.at_record_start());
    }
}
