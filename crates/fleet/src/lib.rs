//! The fleet: one namespace of exported USB/IP devices across many usbipd
//! servers, kept in etcd (never a coordinator of our own).
//!
//! # Keys (all under [`PREFIX`], values JSON)
//!
//! | key | written by | lease | value |
//! |---|---|---|---|
//! | `servers/<server-id>` | usbipd | server's | [`record::ServerRecord`]: address, port, TLS, fingerprint |
//! | `devices/<name>` | usbipd | server's | [`record::DeviceRecord`]: the published device (server, busid, ids, classes, speed, serial, labels, TLS, fingerprint, owner server-id) |
//! | `transition/<name>` | usbipd | server's | present while a device is being withdrawn or re-published: a reservation answers EAGAIN |
//! | `reservations/<name>` | client | client's | holder identity, token, since, ttl |
//!
//! A device's name is `HOST/BUSID` by default (HOST: the server id,
//! `--fleet-name`, by default the host name), or the `name` its
//! configuration gives it.
//!
//! Every write that must not be seen half-done is one etcd transaction:
//! publishing creates `devices/<name>` only if it does not exist
//! (`create_revision == 0`) or is already this server's; a second server
//! publishing the same name gets EEXIST. A reservation is created only if
//! `devices/<name>` exists, `transition/<name>` does not and
//! `reservations/<name>` does not. See [`publish`] for the order of the
//! writes.

pub mod list;
pub mod publish;
pub mod record;

/// Where every usbwire fleet key lives.
pub const PREFIX: &str = "/usbwire/v1/";

pub mod reserve;
