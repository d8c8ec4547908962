//! The per-endpoint queue: where URB ordering and the error hold live.
//!
//! Linux guarantees that when an URB on an endpoint fails, the endpoint's
//! next queued URB does not start until the failed URB's completion handler
//! has returned, and drivers depend on it: `usb_sg_wait` (usb-storage)
//! unlinks the rest of a scatter-gather transfer from that handler, so that
//! the next URB does not swallow the data meant for the next stage (the
//! mass-storage CSW). Across USB/IP that handler runs a network round trip
//! away, so a server that starts every queued URB at once breaks the
//! guarantee. This queue restores it: URBs of one endpoint run in
//! submission order, and after an error the queue is *held*: nothing queued
//! behind the failed URB starts until the importer reacts (an unlink, a
//! CLEAR_FEATURE(ENDPOINT_HALT), SET_INTERFACE, SET_CONFIGURATION or a
//! reset), or a grace window that covers its reaction time runs out, which
//! is the point at which a local completion handler would have returned.

use std::collections::VecDeque;

use std::time::Instant;

use crate::Urb;

#[derive(Default)]
pub struct EndpointQueue {
    /// URBs not yet started, in submission order.
    pub waiting: VecDeque<Urb>,
    /// URBs started in the backend, oldest first.
    pub active: VecDeque<Urb>,
    /// While set, nothing in `waiting` may start.
    held_until: Option<Instant>,
}

impl EndpointQueue {
    pub fn is_held(&self) -> bool {
        self.held_until.is_some()
    }

    pub fn hold(&mut self, until: Instant) {
        self.held_until = Some(until);
    }

    pub fn release(&mut self) {
        self.held_until = None;
    }

    pub fn deadline(&self) -> Option<Instant> {
        self.held_until
    }

    /// Ends the hold if its grace window has run out.
    pub fn expire(&mut self, now: Instant) -> bool {
        match self.held_until {
            Some(t) if t <= now => {
                self.held_until = None;
                true
            }
            _ => false,
        }
    }

    /// Moves the next waiting URB to the active list if the queue may start
    /// it and the backend has room for another.
    pub fn start_next(&mut self, max_active: usize) -> bool {
        if self.is_held() || self.active.len() >= max_active {
            return false;
        }
        match self.waiting.pop_front() {
            Some(u) => {
                self.active.push_back(u);
                true
            }
            None => false,
        }
    }

    /// Removes a not-yet-started URB.
    pub fn remove_waiting(&mut self, seqnum: u32) -> Option<Urb> {
        let i = self.waiting.iter().position(|u| u.seqnum == seqnum)?;
        self.waiting.remove(i)
    }

    pub fn is_empty(&self) -> bool {
        self.waiting.is_empty() && self.active.is_empty()
    }
}
