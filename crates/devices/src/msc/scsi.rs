//! The SCSI transparent command set (SPC-4, SBC-3 subset) a USB stick
//! needs: what each command asks of the transport, and running it.

use super::bot::Dir;
use super::sense::Sense;
use super::{MassStorage, BLOCK_SIZE};

/// SCSI operation codes this device implements.
pub(super) mod op {
    pub const TEST_UNIT_READY: u8 = 0x00;
    pub const REQUEST_SENSE: u8 = 0x03;
    pub const READ_6: u8 = 0x08;
    pub const WRITE_6: u8 = 0x0a;
    pub const INQUIRY: u8 = 0x12;
    pub const MODE_SENSE_6: u8 = 0x1a;
    pub const START_STOP_UNIT: u8 = 0x1b;
    pub const PREVENT_ALLOW: u8 = 0x1e;
    pub const READ_FORMAT_CAPACITIES: u8 = 0x23;
    pub const READ_CAPACITY_10: u8 = 0x25;
    pub const READ_10: u8 = 0x28;
    pub const WRITE_10: u8 = 0x2a;
    pub const VERIFY_10: u8 = 0x2f;
    pub const SYNCHRONIZE_CACHE_10: u8 = 0x35;
    pub const MODE_SENSE_10: u8 = 0x5a;
    pub const READ_16: u8 = 0x88;
    pub const WRITE_16: u8 = 0x8a;
    pub const VERIFY_16: u8 = 0x8f;
    pub const SYNCHRONIZE_CACHE_16: u8 = 0x91;
    pub const SERVICE_ACTION_IN_16: u8 = 0x9e;
    pub const SAI_READ_CAPACITY_16: u8 = 0x10;
    pub const READ_12: u8 = 0xa8;
    pub const WRITE_12: u8 = 0xaa;
}

/// What a command needs of the transport, known from the CDB before it runs.
pub(super) struct Shape {
    pub(super) cdb_len: usize,
    pub(super) dir: Dir,
    /// Bytes the device intends to move (allocation or transfer length).
    pub(super) len: u64,
    pub(super) needs_medium: bool,
}

/// What a command that ran wants moved in the data phase.
pub(super) enum Exec {
    Nothing,
    /// `reply` holds the bytes.
    Reply,
    Read {
        offset: u64,
        len: u64,
    },
    Write {
        offset: u64,
        len: u64,
        fua: bool,
    },
}

/// SCSI ASCII fields admit printable ASCII only, space padded.
pub(super) fn ascii_field<const N: usize>(s: &str) -> [u8; N] {
    let mut out = [b' '; N];
    for (o, c) in out.iter_mut().zip(s.bytes()) {
        *o = if c.is_ascii_graphic() || c == b' ' {
            c
        } else {
            b'_'
        };
    }
    out
}

fn be16(cdb: &[u8; 16], i: usize) -> u64 {
    u64::from(u16::from_be_bytes([cdb[i], cdb[i + 1]]))
}

fn be32(cdb: &[u8; 16], i: usize) -> u64 {
    u64::from(u32::from_be_bytes([
        cdb[i],
        cdb[i + 1],
        cdb[i + 2],
        cdb[i + 3],
    ]))
}

fn be64(cdb: &[u8; 16], i: usize) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&cdb[i..i + 8]);
    u64::from_be_bytes(b)
}

/// LBA, block count and FUA of a READ/WRITE/VERIFY CDB.
fn rw_params(cdb: &[u8; 16]) -> (u64, u64, bool) {
    let fua = cdb[1] & 0x08 != 0;
    match cdb[0] {
        op::READ_6 | op::WRITE_6 => {
            let lba = (u64::from(cdb[1] & 0x1f) << 16) | be16(cdb, 2);
            // A transfer length of 0 means 256 blocks in the 6-byte commands.
            let count = if cdb[4] == 0 { 256 } else { u64::from(cdb[4]) };
            (lba, count, false)
        }
        op::READ_12 | op::WRITE_12 => (be32(cdb, 2), be32(cdb, 6), fua),
        op::READ_16 | op::WRITE_16 | op::VERIFY_16 => (be64(cdb, 2), be32(cdb, 10), fua),
        // READ(10), WRITE(10), VERIFY(10)
        _ => (be32(cdb, 2), be16(cdb, 7), fua),
    }
}

pub(super) fn shape(cdb: &[u8; 16], given_len: usize) -> Shape {
    let s = |cdb_len, dir, len, needs_medium| Shape {
        cdb_len,
        dir,
        len,
        needs_medium,
    };
    let blocks = || rw_params(cdb).1 * BLOCK_SIZE;
    match cdb[0] {
        op::TEST_UNIT_READY => s(6, Dir::None, 0, true),
        op::REQUEST_SENSE => s(6, Dir::In, u64::from(cdb[4]), false),
        op::READ_6 => s(6, Dir::In, blocks(), true),
        op::WRITE_6 => s(6, Dir::Out, blocks(), true),
        op::INQUIRY => s(6, Dir::In, be16(cdb, 3), false),
        op::MODE_SENSE_6 => s(6, Dir::In, u64::from(cdb[4]), false),
        op::START_STOP_UNIT | op::PREVENT_ALLOW => s(6, Dir::None, 0, false),
        op::READ_FORMAT_CAPACITIES => s(10, Dir::In, be16(cdb, 7), false),
        op::READ_CAPACITY_10 => s(10, Dir::In, 8, true),
        op::READ_10 => s(10, Dir::In, blocks(), true),
        op::WRITE_10 => s(10, Dir::Out, blocks(), true),
        op::VERIFY_10 | op::SYNCHRONIZE_CACHE_10 => s(10, Dir::None, 0, true),
        op::MODE_SENSE_10 => s(10, Dir::In, be16(cdb, 7), false),
        op::READ_12 => s(12, Dir::In, blocks(), true),
        op::WRITE_12 => s(12, Dir::Out, blocks(), true),
        op::READ_16 => s(16, Dir::In, blocks(), true),
        op::WRITE_16 => s(16, Dir::Out, blocks(), true),
        op::VERIFY_16 | op::SYNCHRONIZE_CACHE_16 => s(16, Dir::None, 0, true),
        op::SERVICE_ACTION_IN_16 if cdb[1] & 0x1f == op::SAI_READ_CAPACITY_16 => {
            s(16, Dir::In, be32(cdb, 10), true)
        }
        // Unknown commands (and service actions) move no data; whatever
        // the host expected is stalled or discarded, and the sense says why.
        _ => s(given_len, Dir::None, 0, false),
    }
}

impl MassStorage {
    /// Runs one command whose transport checks passed. `len` is how many
    /// bytes the data phase may carry. Replies are built in full and cut to
    /// `len` by the caller, which is how allocation lengths truncate.
    pub(super) fn execute(&mut self, cdb: &[u8; 16], len: u64) -> Exec {
        match cdb[0] {
            op::TEST_UNIT_READY => Exec::Nothing,
            op::REQUEST_SENSE => self.request_sense(),
            op::INQUIRY => self.inquiry(cdb),
            op::MODE_SENSE_6 => self.mode_sense(cdb, false),
            op::MODE_SENSE_10 => self.mode_sense(cdb, true),
            op::PREVENT_ALLOW
            | op::START_STOP_UNIT
            | op::SYNCHRONIZE_CACHE_10
            | op::SYNCHRONIZE_CACHE_16 => self.medium_control(cdb),
            op::READ_FORMAT_CAPACITIES | op::READ_CAPACITY_10 | op::SERVICE_ACTION_IN_16 => {
                self.capacity(cdb)
            }
            op::READ_6 | op::READ_10 | op::READ_12 | op::READ_16 => self.read(cdb, len),
            op::WRITE_6 | op::WRITE_10 | op::WRITE_12 | op::WRITE_16 => self.write(cdb, len),
            op::VERIFY_10 | op::VERIFY_16 => self.verify(cdb),
            _ => {
                self.fail(Sense::INVALID_OPCODE);
                Exec::Nothing
            }
        }
    }

    fn request_sense(&mut self) -> Exec {
        let fixed = self.sense.fixed();
        self.reply.extend_from_slice(&fixed);
        self.sense = Sense::NONE;
        Exec::Reply
    }

    /// PREVENT ALLOW MEDIUM REMOVAL, START STOP UNIT and SYNCHRONIZE CACHE:
    /// no data, at most a flush before the CSW.
    fn medium_control(&mut self, cdb: &[u8; 16]) -> Exec {
        match cdb[0] {
            op::PREVENT_ALLOW => {
                // Nothing can pull an emulated medium out from under the
                // host, so PREVENT has nothing to prevent.
                if cdb[4] & !0x01 != 0 {
                    self.fail(Sense::INVALID_FIELD);
                }
            }
            op::START_STOP_UNIT => {
                // Nothing spins; but a host stopping the unit is about to
                // unplug it, so this is the moment to be durable.
                if cdb[4] & 0x01 == 0 {
                    self.sync_before_csw();
                }
            }
            // SYNCHRONIZE CACHE (10) and (16)
            _ => self.sync_before_csw(),
        }
        Exec::Nothing
    }

    /// READ FORMAT CAPACITIES, READ CAPACITY (10) and (16).
    fn capacity(&mut self, cdb: &[u8; 16]) -> Exec {
        match cdb[0] {
            op::READ_FORMAT_CAPACITIES => {
                let blocks = u32::try_from(self.blocks).unwrap_or(u32::MAX);
                // Descriptor type 2 "formatted media", 3 "no media present".
                let code = if self.blocks > 0 { 0x02 } else { 0x03 };
                self.reply.extend_from_slice(&[0, 0, 0, 8]);
                self.reply.extend_from_slice(&blocks.to_be_bytes());
                self.reply.push(code);
                self.reply
                    .extend_from_slice(&(BLOCK_SIZE as u32).to_be_bytes()[1..]);
                Exec::Reply
            }
            op::READ_CAPACITY_10 => {
                // 0xffffffff tells the host to use READ CAPACITY(16).
                let last = u32::try_from(self.blocks.saturating_sub(1)).unwrap_or(u32::MAX);
                self.reply.extend_from_slice(&last.to_be_bytes());
                self.reply
                    .extend_from_slice(&(BLOCK_SIZE as u32).to_be_bytes());
                Exec::Reply
            }
            op::SERVICE_ACTION_IN_16 if cdb[1] & 0x1f == op::SAI_READ_CAPACITY_16 => {
                self.reply
                    .extend_from_slice(&self.blocks.saturating_sub(1).to_be_bytes());
                self.reply
                    .extend_from_slice(&(BLOCK_SIZE as u32).to_be_bytes());
                self.reply.extend_from_slice(&[0u8; 20]);
                Exec::Reply
            }
            // Other service actions of SERVICE ACTION IN (16).
            _ => {
                self.fail(Sense::INVALID_FIELD);
                Exec::Nothing
            }
        }
    }

    /// READ (6), (10), (12) and (16): the good blocks up to the first bad
    /// one, at most `len` bytes of them.
    fn read(&mut self, cdb: &[u8; 16], len: u64) -> Exec {
        let (lba, count, _) = rw_params(cdb);
        if !self.in_range(lba, count) {
            return Exec::Nothing;
        }
        let mut bytes = count * BLOCK_SIZE;
        if let Some(bad) = self.first_bad(lba, count) {
            self.fail(Sense::unrecovered_read(bad));
            bytes = (bad - lba) * BLOCK_SIZE;
        }
        Exec::Read {
            offset: lba * BLOCK_SIZE,
            len: bytes.min(len),
        }
    }

    /// WRITE (6), (10), (12) and (16), at most `len` bytes.
    fn write(&mut self, cdb: &[u8; 16], len: u64) -> Exec {
        let (lba, count, fua) = rw_params(cdb);
        if self.read_only {
            self.fail(Sense::WRITE_PROTECTED);
            return Exec::Nothing;
        }
        if !self.in_range(lba, count) {
            return Exec::Nothing;
        }
        Exec::Write {
            offset: lba * BLOCK_SIZE,
            len: (count * BLOCK_SIZE).min(len),
            fua,
        }
    }

    /// VERIFY (10) and (16).
    fn verify(&mut self, cdb: &[u8; 16]) -> Exec {
        // BYTCHK asks us to compare against data the host sends;
        // only the medium check (BYTCHK=0) is offered.
        if cdb[1] & 0x06 != 0 {
            self.fail(Sense::INVALID_FIELD);
            return Exec::Nothing;
        }
        let (lba, count, _) = rw_params(cdb);
        if self.in_range(lba, count) {
            if let Some(bad) = self.first_bad(lba, count) {
                self.fail(Sense::unrecovered_read(bad));
            }
        }
        Exec::Nothing
    }

    /// The command's CSW waits for an `fdatasync`; its failure fails the
    /// command.
    fn sync_before_csw(&mut self) {
        if !self.read_only {
            self.sync_pending = true;
        }
    }

    fn in_range(&mut self, lba: u64, count: u64) -> bool {
        let ok = lba.checked_add(count).is_some_and(|end| end <= self.blocks);
        if !ok {
            self.fail(Sense::LBA_OUT_OF_RANGE);
        }
        ok
    }

    /// The first injected bad block in `lba..lba + count`.
    fn first_bad(&self, lba: u64, count: u64) -> Option<u64> {
        let bad = self.bad_lbas.as_ref()?;
        let end = lba.saturating_add(count);
        let first = bad.start.max(lba);
        (first < end && first < bad.end).then_some(first)
    }

    fn inquiry(&mut self, cdb: &[u8; 16]) -> Exec {
        let evpd = cdb[1] & 0x01 != 0;
        let page = cdb[2];
        // CMDDT is obsolete; a page code without EVPD is meaningless.
        if cdb[1] & 0x02 != 0 || (!evpd && page != 0) {
            self.fail(Sense::INVALID_FIELD);
            return Exec::Nothing;
        }
        let r = &mut self.reply;
        if !evpd {
            // Direct access, removable (what hosts expect of a stick; it
            // also makes an empty image a drive with no medium), SPC-4.
            r.extend_from_slice(&[0x00, 0x80, 0x06, 0x02, 31, 0, 0, 0]);
            r.extend_from_slice(b"usbwire ");
            r.extend_from_slice(&self.inquiry_product);
            r.extend_from_slice(b"0100");
            return Exec::Reply;
        }
        match page {
            0x00 => r.extend_from_slice(&[0x00, 0x00, 0x00, 2, 0x00, 0x80]),
            0x80 => {
                let serial: [u8; 64] = ascii_field(&self.serial);
                let n = self.serial.len().clamp(1, 64);
                r.extend_from_slice(&[0x00, 0x80, 0x00, n as u8]);
                r.extend_from_slice(&serial[..n]);
            }
            _ => {
                self.fail(Sense::INVALID_FIELD);
                return Exec::Nothing;
            }
        }
        Exec::Reply
    }

    fn mode_sense(&mut self, cdb: &[u8; 16], ten: bool) -> Exec {
        let control = cdb[2] >> 6;
        let page = cdb[2] & 0x3f;
        let subpage = cdb[3];
        if control == 3 {
            self.fail(Sense::SAVING_NOT_SUPPORTED);
            return Exec::Nothing;
        }
        let all = page == 0x3f;
        if !(page == 0x08 || all) || (subpage != 0 && !(all && subpage == 0xff)) {
            self.fail(Sense::INVALID_FIELD);
            return Exec::Nothing;
        }
        let wp = if self.read_only { 0x80 } else { 0 };
        let header = if ten { 8 } else { 4 };
        let r = &mut self.reply;
        // No block descriptors: their length field stays 0.
        r.resize(header, 0);
        if ten {
            r[3] = wp;
        } else {
            r[2] = wp;
        }
        // Caching page: write cache enabled, since acknowledged writes sit
        // in the page cache until SYNCHRONIZE CACHE. Nothing is changeable.
        let mut caching = [0u8; 20];
        caching[0] = 0x08;
        caching[1] = 0x12;
        if control != 1 {
            caching[2] = 0x04;
            caching[4..6].copy_from_slice(&[0xff, 0xff]);
            caching[8..12].copy_from_slice(&[0xff, 0xff, 0xff, 0xff]);
        }
        r.extend_from_slice(&caching);
        let total = r.len();
        if ten {
            r[0..2].copy_from_slice(&((total - 2) as u16).to_be_bytes());
        } else {
            r[0] = (total - 1) as u8;
        }
        Exec::Reply
    }
}
