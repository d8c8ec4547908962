//! Big-endian field access over a slice whose length was checked first,
//! in the manner of smoltcp: callers check the length once, then read fields
//! by offset without further bounds failures.

#[inline]
pub(crate) fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

#[inline]
pub(crate) fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

#[inline]
pub(crate) fn i32_at(b: &[u8], at: usize) -> i32 {
    u32_at(b, at) as i32
}

#[inline]
pub(crate) fn put_u16(out: &mut [u8], at: usize, v: u16) {
    out[at..at + 2].copy_from_slice(&v.to_be_bytes());
}

#[inline]
pub(crate) fn put_u32(out: &mut [u8], at: usize, v: u32) {
    out[at..at + 4].copy_from_slice(&v.to_be_bytes());
}

/// Reads a fixed-size, NUL-padded string field. Peers send fields with no
/// NUL at all, or garbage after the NUL; both are read up to the first NUL
/// (or the whole field) and never fail.
pub(crate) fn cstr_field(b: &[u8]) -> String {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    String::from_utf8_lossy(&b[..end]).into_owned()
}

/// Writes a string into a fixed-size field, NUL-padded. A string that does
/// not fit is cut (at a character boundary) so that a NUL always ends the
/// field, as the C tools expect.
pub(crate) fn put_cstr_field(out: &mut [u8], s: &str) {
    out.fill(0);
    let mut n = s.len().min(out.len().saturating_sub(1));
    // Never cut a character in half: the peer would read invalid UTF-8.
    while !s.is_char_boundary(n) {
        n -= 1;
    }
    out[..n].copy_from_slice(&s.as_bytes()[..n]);
}
