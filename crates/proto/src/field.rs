//! The fixed-width text fields of the `OP_*` phase (`busid`, `path`), kept
//! as the bytes that were on the wire.
//!
//! Nothing obliges a peer to send UTF-8 there. Reading a field into a
//! `String` replaced invalid bytes, so a re-encoded field differed from the
//! one received and a bus id of odd bytes could match another name. Bytes
//! make a decode-encode round trip exact and an import match its bus id
//! byte for byte; [`Display`](fmt::Display) shows them to people.

use std::borrow::Cow;
use std::fmt;

/// The content of an `N`-byte, NUL-padded field: the bytes before the first
/// NUL, at most `N` (a peer may fill the field without ending it).
#[derive(Clone, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct WireString<const N: usize> {
    /// At most `N` bytes, none of them NUL.
    bytes: Vec<u8>,
}

/// A bus id (`1-1`, `3-2.4`), as in `OP_REQ_IMPORT` and device records.
pub type BusId = WireString<{ crate::op::BUSID_LEN }>;
/// A device's sysfs path, as in device records.
pub type DevicePath = WireString<{ crate::op::PATH_LEN }>;

impl<const N: usize> WireString<N> {
    /// Reads a field as a peer sent it: up to the first NUL, or the first
    /// `N` bytes if there is none. Anything after the NUL is padding.
    pub fn from_field(field: &[u8]) -> Self {
        let field = &field[..field.len().min(N)];
        let end = field.iter().position(|&c| c == 0).unwrap_or(field.len());
        WireString {
            bytes: field[..end].to_vec(),
        }
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// The text, if it is UTF-8 (every name this project exports is).
    pub fn as_str(&self) -> Option<&str> {
        std::str::from_utf8(&self.bytes).ok()
    }

    /// The text with invalid bytes replaced, for people.
    pub fn to_string_lossy(&self) -> Cow<'_, str> {
        String::from_utf8_lossy(&self.bytes)
    }

    pub fn len(&self) -> usize {
        self.bytes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    /// Writes the field: the bytes, then NULs up to `N`.
    pub(crate) fn encode_field(&self, out: &mut [u8]) {
        debug_assert_eq!(out.len(), N);
        out.fill(0);
        out[..self.bytes.len()].copy_from_slice(&self.bytes);
    }
}

/// Text of our own: cut before a NUL and to at most `N - 1` bytes (at a
/// character boundary), so that a NUL always ends the field, as the C tools
/// expect, and the peer never reads half a character.
impl<const N: usize> From<&str> for WireString<N> {
    fn from(s: &str) -> Self {
        let s = s.split('\0').next().unwrap_or_default();
        let mut n = s.len().min(N.saturating_sub(1));
        while !s.is_char_boundary(n) {
            n -= 1;
        }
        WireString {
            bytes: s.as_bytes()[..n].to_vec(),
        }
    }
}

impl<const N: usize> From<String> for WireString<N> {
    fn from(s: String) -> Self {
        Self::from(s.as_str())
    }
}

impl<const N: usize> From<&String> for WireString<N> {
    fn from(s: &String) -> Self {
        Self::from(s.as_str())
    }
}

impl<const N: usize> fmt::Display for WireString<N> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(&self.to_string_lossy())
    }
}

/// As a string literal when the bytes are UTF-8, as a byte string when not,
/// so that a test failure shows exactly what was on the wire.
impl<const N: usize> fmt::Debug for WireString<N> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.as_str() {
            Some(s) => fmt::Debug::fmt(s, f),
            None => write!(f, "b\"{}\"", self.bytes.escape_ascii()),
        }
    }
}

impl<const N: usize> PartialEq<str> for WireString<N> {
    fn eq(&self, other: &str) -> bool {
        self.bytes == other.as_bytes()
    }
}

impl<const N: usize> PartialEq<&str> for WireString<N> {
    fn eq(&self, other: &&str) -> bool {
        self.bytes == other.as_bytes()
    }
}

impl<const N: usize> PartialEq<String> for WireString<N> {
    fn eq(&self, other: &String) -> bool {
        self.bytes == other.as_bytes()
    }
}

impl<const N: usize> PartialEq<WireString<N>> for str {
    fn eq(&self, other: &WireString<N>) -> bool {
        other == self
    }
}

impl<const N: usize> PartialEq<WireString<N>> for &str {
    fn eq(&self, other: &WireString<N>) -> bool {
        other == self
    }
}

impl<const N: usize> PartialEq<WireString<N>> for String {
    fn eq(&self, other: &WireString<N>) -> bool {
        other == self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_field_is_read_up_to_its_nul_or_its_width() {
        assert_eq!(BusId::from_field(b"1-1\0garbage").as_bytes(), b"1-1");
        assert_eq!(BusId::from_field(&[0xff; 40]).as_bytes(), &[0xff; 32][..]);
        assert!(BusId::from_field(&[0; 32]).is_empty());
    }

    #[test]
    fn text_of_ours_always_leaves_room_for_the_nul() {
        assert_eq!(BusId::from("a".repeat(40).as_str()).len(), 31);
        // 16 two-byte characters: the 16th would need byte 32.
        assert_eq!(BusId::from("é".repeat(16).as_str()), "é".repeat(15));
        assert_eq!(BusId::from("1-1\0x"), "1-1");
    }

    #[test]
    fn shown_to_people_lossily_and_to_tests_exactly() {
        let odd = BusId::from_field(b"1-\xff");
        assert_eq!(odd.to_string(), "1-\u{fffd}");
        assert_eq!(format!("{odd:?}"), r#"b"1-\xff""#);
        assert_eq!(format!("{:>5}|", BusId::from("1-1")), "  1-1|");
        assert_eq!(format!("{:?}", BusId::from("1-1")), r#""1-1""#);
        assert_eq!(odd.as_str(), None);
        assert_ne!(odd, "1-\u{fffd}", "compared as bytes, not as their display");
    }
}
