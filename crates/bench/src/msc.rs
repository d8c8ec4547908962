//! Mass-storage READ(10) throughput through the client library
//! (`usbwire-client`), raw Bulk-Only Transport: CBW on 0x02, data and the
//! 13-byte CSW on 0x81. Commands are pipelined: `depth` commands of
//! `cmd_bytes` each are queued at once (CBW, data, CSW URBs submitted in
//! order), and a new one is queued as each completes.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use usbwire_client::{PendingTransfer, RemoteDevice, TransferRequest};

pub const BLOCK: u64 = 512;
const CBW_SIG: u32 = 0x4342_5355;
const CSW_SIG: u32 = 0x5342_5355;

/// Writes a `mib` MiB image whose every 512-byte block starts with its LBA
/// (u64 LE), then reads it back once so that it sits in the page cache.
pub fn make_image(path: &Path, mib: u64) -> io::Result<()> {
    let mut f = File::create(path)?;
    let mut chunk = vec![0u8; 1 << 20];
    for m in 0..mib {
        for (i, blk) in chunk.chunks_mut(BLOCK as usize).enumerate() {
            let lba = m * (1 << 20) / BLOCK + i as u64;
            blk[..8].copy_from_slice(&lba.to_le_bytes());
        }
        f.write_all(&chunk)?;
    }
    f.sync_all()?;
    drop(f);
    let mut f = File::open(path)?;
    // Bounded by the file size.
    while f.read(&mut chunk)? != 0 {}
    Ok(())
}

fn cbw(tag: u32, lba: u32, blocks: u16) -> Vec<u8> {
    let mut c = Vec::with_capacity(31);
    c.extend_from_slice(&CBW_SIG.to_le_bytes());
    c.extend_from_slice(&tag.to_le_bytes());
    c.extend_from_slice(&(u32::from(blocks) * BLOCK as u32).to_le_bytes());
    c.push(0x80); // data IN
    c.push(0); // LUN
    c.push(10); // CDB length
    let mut cdb = [0u8; 16];
    cdb[0] = 0x28; // READ(10)
    cdb[2..6].copy_from_slice(&lba.to_be_bytes());
    cdb[7..9].copy_from_slice(&blocks.to_be_bytes());
    c.extend_from_slice(&cdb);
    c
}

fn test_unit_ready_cbw(tag: u32) -> Vec<u8> {
    let mut c = Vec::with_capacity(31);
    c.extend_from_slice(&CBW_SIG.to_le_bytes());
    c.extend_from_slice(&tag.to_le_bytes());
    c.extend_from_slice(&0u32.to_le_bytes());
    c.extend_from_slice(&[0, 0, 6]);
    c.extend_from_slice(&[0u8; 16]);
    c
}

fn check_csw(csw: &[u8], tag: u32) -> Result<(), String> {
    if csw.len() != 13 {
        return Err(format!("CSW of {} bytes", csw.len()));
    }
    let sig = u32::from_le_bytes(csw[0..4].try_into().unwrap());
    let t = u32::from_le_bytes(csw[4..8].try_into().unwrap());
    let residue = u32::from_le_bytes(csw[8..12].try_into().unwrap());
    if sig != CSW_SIG || t != tag || csw[12] != 0 || residue != 0 {
        return Err(format!(
            "bad CSW: sig {sig:#x} tag {t} (want {tag}) residue {residue} status {}",
            csw[12]
        ));
    }
    Ok(())
}

pub struct MscResult {
    pub commands: u64,
    pub bytes: u64,
    pub elapsed: Duration,
    /// Per command, CBW submitted to CSW received, ns.
    pub lat: Vec<u32>,
    pub errors: u64,
    pub first_error: Option<String>,
}

struct Pending {
    tag: u32,
    lba: u64,
    at: Instant,
    cbw: PendingTransfer,
    data: PendingTransfer,
    csw: PendingTransfer,
}

pub async fn prepare(addr: SocketAddr, busid: &str) -> Result<RemoteDevice, String> {
    let dev = usbwire_client::import(addr, busid)
        .await
        .map_err(|e| format!("import {busid}: {e}"))?;
    dev.set_configuration(1)
        .await
        .map_err(|e| format!("SET_CONFIGURATION: {e}"))?;
    // A fresh medium may answer the first command with UNIT ATTENTION.
    for tag in 1..=4u32 {
        dev.bulk_out(0x02, &test_unit_ready_cbw(tag))
            .await
            .map_err(|e| format!("CBW: {e}"))?;
        let csw = dev
            .bulk_in(0x81, 13)
            .await
            .map_err(|e| format!("CSW: {e}"))?;
        if check_csw(&csw, tag).is_ok() {
            return Ok(dev);
        }
    }
    Err("the disk never became ready (TEST UNIT READY)".into())
}

/// Reads for `dur`, `depth` commands of `cmd_bytes` queued, cycling over
/// the first `span_bytes` of the disk.
pub async fn read_loop(
    dev: &RemoteDevice,
    dur: Duration,
    depth: usize,
    cmd_bytes: u32,
    span_bytes: u64,
    lat_cap: usize,
) -> MscResult {
    let blocks = (u64::from(cmd_bytes) / BLOCK) as u16;
    let span_cmds = (span_bytes / u64::from(cmd_bytes)).max(1);
    let mut r = MscResult {
        commands: 0,
        bytes: 0,
        elapsed: Duration::ZERO,
        lat: Vec::with_capacity(lat_cap),
        errors: 0,
        first_error: None,
    };
    let mut q: VecDeque<Pending> = VecDeque::with_capacity(depth);
    let mut next = 0u64;
    let mut tag = 100u32;
    let start = Instant::now();
    // Bounded by the deadline: nothing is queued after it.
    loop {
        while q.len() < depth && start.elapsed() < dur {
            let lba = (next % span_cmds) * u64::from(blocks);
            next += 1;
            tag = tag.wrapping_add(1);
            let at = Instant::now();
            let cbw = dev.submit(TransferRequest::bulk_out(
                0x02,
                cbw(tag, lba as u32, blocks),
            ));
            let data = dev.submit(TransferRequest::bulk_in(0x81, cmd_bytes));
            let csw = dev.submit(TransferRequest::bulk_in(0x81, 13));
            q.push_back(Pending {
                tag,
                lba,
                at,
                cbw,
                data,
                csw,
            });
        }
        let Some(p) = q.pop_front() else {
            break;
        };
        let Pending {
            tag,
            lba,
            at,
            cbw,
            data,
            csw,
        } = p;
        let done = tokio::time::timeout(Duration::from_secs(10), async move {
            (cbw.await, data.await, csw.await)
        })
        .await;
        let Ok((c, d, s)) = done else {
            r.errors += 1;
            r.first_error
                .get_or_insert_with(|| format!("command at LBA {lba} timed out"));
            break;
        };
        crate::load::record_latency(&mut r.lat, at.elapsed());
        r.commands += 1;
        r.bytes += u64::from(d.actual_length);
        let outcome = (|| -> Result<(), String> {
            c.status.map_err(|e| format!("CBW: {e}"))?;
            d.status.map_err(|e| format!("data: {e}"))?;
            if d.data.len() != cmd_bytes as usize {
                return Err(format!("short read: {} bytes", d.data.len()));
            }
            let first = u64::from_le_bytes(d.data[..8].try_into().unwrap());
            if first != lba {
                return Err(format!("LBA {lba} read back as {first}"));
            }
            let csw = s.into_result().map_err(|e| format!("CSW: {e}"))?;
            check_csw(&csw, tag)
        })();
        if let Err(e) = outcome {
            r.errors += 1;
            r.first_error.get_or_insert(e);
            // The BOT pipeline is out of step after a failure: stop.
            break;
        }
    }
    // Drain whatever is left (after an error), bounded by the queue.
    let _ = tokio::time::timeout(Duration::from_secs(5), async move {
        for p in q.drain(..) {
            let _ = p.cbw.await;
            let _ = p.data.await;
            let _ = p.csw.await;
        }
    })
    .await;
    r.elapsed = start.elapsed();
    r
}
