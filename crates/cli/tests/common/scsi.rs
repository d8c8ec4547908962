//! SCSI commands through mass-storage Bulk-Only Transport, sent with the
//! project's client library: what the disk tests drive the emulated disk
//! with.

use usbwire_client::{RemoteDevice, TransferError};

pub const BULK_IN: u8 = 0x81;
pub const BULK_OUT: u8 = 0x02;

pub struct Csw {
    pub tag: u32,
    pub residue: u32,
    pub status: u8,
}

/// One SCSI command through BOT: CBW, data phase, CSW. Stalls are cleared
/// the way usb-storage does.
pub async fn scsi(
    dev: &RemoteDevice,
    tag: u32,
    cdb: &[u8],
    data_in: u32,
    data_out: &[u8],
) -> (Vec<u8>, Csw) {
    let mut cbw = Vec::with_capacity(31);
    cbw.extend_from_slice(&0x4342_5355u32.to_le_bytes());
    cbw.extend_from_slice(&tag.to_le_bytes());
    let len = if data_out.is_empty() {
        data_in
    } else {
        data_out.len() as u32
    };
    cbw.extend_from_slice(&len.to_le_bytes());
    cbw.push(if data_out.is_empty() && data_in > 0 {
        0x80
    } else {
        0
    });
    cbw.push(0);
    cbw.push(cdb.len() as u8);
    let mut cb = [0u8; 16];
    cb[..cdb.len()].copy_from_slice(cdb);
    cbw.extend_from_slice(&cb);
    assert_eq!(dev.bulk_out(BULK_OUT, &cbw).await.expect("CBW"), 31);
    let mut data = Vec::new();
    if data_in > 0 {
        match dev.bulk_in(BULK_IN, data_in).await {
            Ok(d) => data = d,
            Err(TransferError::Stall) => dev.clear_halt(BULK_IN).await.expect("clear halt"),
            Err(e) => panic!("data phase: {e}"),
        }
    } else if !data_out.is_empty() {
        match dev.bulk_out(BULK_OUT, data_out).await {
            Ok(_) => {}
            Err(TransferError::Stall) => dev.clear_halt(BULK_OUT).await.expect("clear halt"),
            Err(e) => panic!("data phase: {e}"),
        }
    }
    let raw = match dev.bulk_in(BULK_IN, 13).await {
        Ok(c) => c,
        Err(TransferError::Stall) => {
            dev.clear_halt(BULK_IN).await.unwrap();
            dev.bulk_in(BULK_IN, 13)
                .await
                .expect("CSW after clearing the halt")
        }
        Err(e) => panic!("CSW: {e}"),
    };
    assert_eq!(raw.len(), 13, "CSW length");
    assert_eq!(&raw[..4], &0x5342_5355u32.to_le_bytes(), "CSW signature");
    let csw = Csw {
        tag: u32::from_le_bytes(raw[4..8].try_into().unwrap()),
        residue: u32::from_le_bytes(raw[8..12].try_into().unwrap()),
        status: raw[12],
    };
    assert_eq!(csw.tag, tag, "CSW tag");
    (data, csw)
}

pub fn rw10(op: u8, lba: u32, blocks: u16) -> Vec<u8> {
    let mut c = vec![op, 0];
    c.extend_from_slice(&lba.to_be_bytes());
    c.push(0);
    c.extend_from_slice(&blocks.to_be_bytes());
    c.push(0);
    c
}
