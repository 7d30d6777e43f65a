//! Sans-IO state of one direction of one ordered, reliable channel: sequence numbers, the
//! retransmission store, flow-control credit and the receiver's reorder buffer.
//!
//! The session layer feeds events in (frame received, acknowledgement received, connection lost)
//! and asks what to transmit next; nothing here touches a socket or a clock, so the resume and
//! memory-bound rules are unit-tested directly.
//!
//! Memory accounting charges every frame its payload length plus [`FRAME_CHARGE_BYTES`], so a
//! peer that sends many tiny frames cannot grow the bookkeeping beyond the window either. Rules:
//! - the sender keeps at most `send_window_bytes` (charged) of frames that are not yet
//!   acknowledged as received, queued or in flight;
//! - the sender transmits a frame only when its cumulative charged end offset is within the
//!   credit the receiver granted (bytes the receiver's application consumed + its window), and
//!   within its own send window of what the receiver's application consumed: frames the peer
//!   holds unconsumed count against the window as frames in flight do (the first unconsumed
//!   frame always goes, so a window smaller than a frame cannot deadlock);
//! - the receiver therefore never holds more than its `receive_window_bytes` and treats a frame
//!   beyond that as a protocol violation;
//! - an acknowledgement says every sequence number below `contiguous_sequence` was received; such
//!   frames are dropped from the store and never transmitted again, even after a reconnection;
//! - once the end of the stream is queued and every frame written, a frame unacknowledged for
//!   longer than it should be is sent once more on another connection
//!   ([`OutboundChannel::next_hedge`]); the receiver keeps whichever copy arrives first.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::error::TransportError;
use crate::frame::Acknowledgement;

/// Bookkeeping cost charged per frame on top of its payload.
pub const FRAME_CHARGE_BYTES: u64 = 128;

/// Most frames awaiting their acknowledgement with a second copy on the way (see
/// [`OutboundChannel::next_hedge`]), and how far past the first unacknowledged frame one is
/// looked for: a megabyte of 128 KiB frames.
pub const HEDGED_FRAMES_MAX: usize = 8;

/// A frame is overdue once unacknowledged for this many times the smoothed delay from a
/// frame's write to its acknowledgement: a connection's fast retransmit lands within about
/// one and a quarter; its tail-loss probe waits two round trips, its retransmission timeout
/// more, and a connection still in start-up sends its share slowly.
pub const HEDGE_AFTER_DELAYS: f64 = 1.5;

/// Never hedge a frame younger than this (a LAN's delays are scheduling noise).
pub const HEDGE_AFTER_MIN: Duration = Duration::from_millis(10);

pub fn charge_of(payload_len: usize) -> u64 {
    payload_len as u64 + FRAME_CHARGE_BYTES
}

#[derive(Debug)]
struct OutboundFrame {
    payload: Bytes,
    end_of_stream: bool,
    end_offset: u64,
    assigned_connection: Option<u64>,
    /// When it was last written to a connection.
    sent_at: Option<Instant>,
}

/// A frame chosen for transmission.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transmission {
    pub sequence: u64,
    pub payload: Bytes,
    pub end_of_stream: bool,
    pub retransmission: bool,
}

/// The sending half of a channel.
#[derive(Debug)]
pub struct OutboundChannel {
    send_window_bytes: u64,
    next_sequence: u64,
    next_end_offset: u64,
    frames: BTreeMap<u64, OutboundFrame>,
    pending: BTreeSet<u64>,
    transmitted_once: BTreeSet<u64>,
    buffered_bytes: u64,
    /// Charged bytes of the frames in `pending`: queued here, not on any connection.
    unsent_bytes: u64,
    acknowledged_sequence: u64,
    credit_limit: u64,
    peer_receive_window: u64,
    /// Charged bytes the peer's application consumed, as last acknowledged.
    peer_consumed: u64,
    end_of_stream_queued: bool,
    pub payload_bytes_enqueued: u64,
    pub payload_bytes_acknowledged: u64,
    pub payload_bytes_retransmitted: u64,
    /// Times a connection free to send found the next frame held back by the send window: the
    /// window, not the path, limited the rate then (a connection the path holds back is still
    /// writing its last frame and does not ask).
    pub send_window_holds: u64,
    /// Times a connection free to send found nothing queued while the send window was too
    /// full for another frame as large as the largest queued so far: every byte the window
    /// allows was out, so the window, not the path, was the limit (the sender waits on the
    /// window then).
    pub send_window_starved: u64,
    /// Times a connection free to send found the next frame beyond the credit the peer granted
    /// (its receive window past what its application consumed): the receiver, not this side's
    /// window, limited the rate then.
    pub credit_holds: u64,
    largest_charge: u64,
    /// Frames sent a second time (`next_hedge`) and not yet acknowledged.
    hedged: BTreeSet<u64>,
    /// Payload bytes sent a second time by `next_hedge` (not counted as retransmitted).
    pub payload_bytes_hedged: u64,
    /// Smoothed delay from a frame's write to its acknowledgement (of the newest frame each
    /// acknowledgement covers).
    acknowledgement_delay: Option<Duration>,
}

impl OutboundChannel {
    pub fn new(send_window_bytes: u64, peer_receive_window: u64) -> OutboundChannel {
        OutboundChannel {
            send_window_bytes,
            next_sequence: 0,
            next_end_offset: 0,
            frames: BTreeMap::new(),
            pending: BTreeSet::new(),
            transmitted_once: BTreeSet::new(),
            buffered_bytes: 0,
            unsent_bytes: 0,
            acknowledged_sequence: 0,
            credit_limit: peer_receive_window,
            peer_receive_window,
            peer_consumed: 0,
            end_of_stream_queued: false,
            payload_bytes_enqueued: 0,
            payload_bytes_acknowledged: 0,
            payload_bytes_retransmitted: 0,
            send_window_holds: 0,
            send_window_starved: 0,
            credit_holds: 0,
            largest_charge: 0,
            hedged: BTreeSet::new(),
            payload_bytes_hedged: 0,
            acknowledgement_delay: None,
        }
    }

    /// Changes the send window. Frames already queued stay; a smaller window only makes new
    /// payloads wait longer.
    pub fn set_send_window(&mut self, send_window_bytes: u64) {
        self.send_window_bytes = send_window_bytes.max(1);
    }

    pub fn send_window(&self) -> u64 {
        self.send_window_bytes
    }

    /// Whether a payload of this length fits the send window now. An empty store always accepts
    /// one frame so that a window smaller than a frame cannot deadlock.
    pub fn has_room_for(&self, payload_len: usize) -> bool {
        self.frames.is_empty()
            || self.buffered_bytes + charge_of(payload_len) <= self.send_window_bytes
    }

    pub fn end_of_stream_queued(&self) -> bool {
        self.end_of_stream_queued
    }

    pub fn buffered_bytes(&self) -> u64 {
        self.buffered_bytes
    }

    /// Charged bytes of the frames waiting for a connection (never written, or written on a
    /// connection that was lost): the rest of `buffered_bytes` is on its way to the peer.
    pub fn unsent_bytes(&self) -> u64 {
        self.unsent_bytes
    }

    /// Queues a frame; returns its sequence number. The caller checks `has_room_for` first.
    /// Whether any frame (payload or the end of the stream) was ever queued.
    pub fn anything_enqueued(&self) -> bool {
        self.next_sequence > 0
    }

    pub fn enqueue(&mut self, payload: Bytes, end_of_stream: bool) -> Result<u64, TransportError> {
        if self.end_of_stream_queued {
            return Err(TransportError::Protocol {
                reason: "send after end of stream".to_string(),
            });
        }
        let sequence = self.next_sequence;
        self.next_sequence += 1;
        let charge = charge_of(payload.len());
        self.largest_charge = self.largest_charge.max(charge);
        self.next_end_offset += charge;
        self.buffered_bytes += charge;
        self.unsent_bytes += charge;
        self.payload_bytes_enqueued += payload.len() as u64;
        self.end_of_stream_queued = end_of_stream;
        self.frames.insert(
            sequence,
            OutboundFrame {
                payload,
                end_of_stream,
                end_offset: self.next_end_offset,
                assigned_connection: None,
                sent_at: None,
            },
        );
        self.pending.insert(sequence);
        Ok(sequence)
    }

    /// The lowest-numbered frame not on a live connection, if the receiver's credit allows it;
    /// the frame is then assigned to `connection_id` until acknowledged or that connection is lost.
    /// `now` is when it is written.
    pub fn next_transmission(&mut self, connection_id: u64, now: Instant) -> Option<Transmission> {
        let Some(&sequence) = self.pending.first() else {
            if self.largest_charge > 0
                && self.buffered_bytes + self.largest_charge > self.send_window_bytes
            {
                self.send_window_starved += 1;
            }
            return None;
        };
        let frame = self.frames.get_mut(&sequence)?;
        if frame.end_offset > self.credit_limit {
            self.credit_holds += 1;
            return None;
        }
        // What the peer would hold unconsumed: a receiver that consumes slower than the link
        // delivers (a migration's destination loading QEMU) must not build a backlog larger than
        // this side's window, however large its own receive window.
        let start_offset = frame.end_offset - charge_of(frame.payload.len());
        if frame.end_offset > self.peer_consumed.saturating_add(self.send_window_bytes)
            && start_offset > self.peer_consumed
        {
            self.send_window_holds += 1;
            return None;
        }
        self.pending.remove(&sequence);
        self.unsent_bytes -= charge_of(frame.payload.len());
        frame.assigned_connection = Some(connection_id);
        frame.sent_at = Some(now);
        let retransmission = !self.transmitted_once.insert(sequence);
        if retransmission {
            self.payload_bytes_retransmitted += frame.payload.len() as u64;
        }
        Some(Transmission {
            sequence,
            payload: frame.payload.clone(),
            end_of_stream: frame.end_of_stream,
            retransmission,
        })
    }

    /// Applies an acknowledgement received at `now`; returns whether it freed space or granted
    /// credit.
    pub fn on_acknowledgement(
        &mut self,
        ack: Acknowledgement,
        now: Instant,
    ) -> Result<bool, TransportError> {
        if ack.contiguous_sequence > self.next_sequence {
            return Err(TransportError::Protocol {
                reason: format!(
                    "acknowledgement of sequence {} beyond the {} frames sent",
                    ack.contiguous_sequence, self.next_sequence
                ),
            });
        }
        let mut changed = false;
        let mut newest_sent = None;
        let mut covers_copies = false;
        while self.acknowledged_sequence < ack.contiguous_sequence {
            let sequence = self.acknowledged_sequence;
            covers_copies |= self.hedged.remove(&sequence);
            if let Some(frame) = self.frames.remove(&sequence) {
                newest_sent = frame.sent_at.or(newest_sent);
                self.buffered_bytes -= charge_of(frame.payload.len());
                self.payload_bytes_acknowledged += frame.payload.len() as u64;
                // Received before its connection was lost, and queued again since.
                if self.pending.remove(&sequence) {
                    self.unsent_bytes -= charge_of(frame.payload.len());
                }
            }
            self.transmitted_once.remove(&sequence);
            self.acknowledged_sequence += 1;
            changed = true;
        }
        // Not measured across a copy: the frames it released waited for the stall it went
        // around (as TCP takes no round trip from a retransmitted segment).
        if let Some(sent) = newest_sent.filter(|_| !covers_copies) {
            let delay = now.saturating_duration_since(sent);
            self.acknowledgement_delay = Some(match self.acknowledgement_delay {
                // An eighth of each new sample, as TCP smooths its round trip.
                Some(smoothed) => smoothed.mul_f64(0.875) + delay.mul_f64(0.125),
                None => delay,
            });
        }
        if ack.consumed_bytes > self.peer_consumed {
            self.peer_consumed = ack.consumed_bytes;
            changed = true;
        }
        let credit_limit = ack.consumed_bytes.saturating_add(self.peer_receive_window);
        if credit_limit > self.credit_limit {
            self.credit_limit = credit_limit;
            changed = true;
        }
        Ok(changed)
    }

    /// The peer announced its receive window (a dialer starts from the protocol's early window
    /// until the listener's hello reply says more). The credit only grows: a window smaller
    /// than the one assumed so far changes nothing (the peer's own rule keeps it at least
    /// that). True when the credit grew.
    pub fn raise_peer_receive_window(&mut self, window: u64) -> bool {
        if window <= self.peer_receive_window {
            return false;
        }
        self.peer_receive_window = window;
        let credit_limit = self.peer_consumed.saturating_add(window);
        let grew = credit_limit > self.credit_limit;
        self.credit_limit = self.credit_limit.max(credit_limit);
        grew
    }

    /// Every frame assigned to the lost connection and not yet acknowledged goes back to pending.
    pub fn on_connection_lost(&mut self, connection_id: u64) -> usize {
        let mut requeued = 0;
        for (sequence, frame) in self.frames.iter_mut() {
            if frame.assigned_connection == Some(connection_id) {
                frame.assigned_connection = None;
                self.hedged.remove(sequence);
                if self.pending.insert(*sequence) {
                    self.unsent_bytes += charge_of(frame.payload.len());
                }
                requeued += 1;
            }
        }
        requeued
    }

    /// Whether a frame written on this connection awaits its acknowledgement.
    pub fn unacknowledged_on(&self, connection_id: u64) -> bool {
        self.frames
            .values()
            .any(|frame| frame.assigned_connection == Some(connection_id))
    }

    /// Everything queued, including the end-of-stream marker if any, was acknowledged.
    pub fn all_acknowledged(&self) -> bool {
        self.frames.is_empty()
    }

    pub fn has_pending(&self) -> bool {
        !self.pending.is_empty()
    }

    /// How long a frame may go unacknowledged before it is overdue; `None` until an
    /// acknowledgement has measured the delay.
    pub fn hedge_after(&self) -> Option<Duration> {
        self.acknowledgement_delay
            .map(|delay| delay.mul_f64(HEDGE_AFTER_DELAYS).max(HEDGE_AFTER_MIN))
    }

    /// Frames that could be hedged on `connection_id`, lowest first: the end of the stream is
    /// queued and nothing waits to be sent, and among the first [`HEDGED_FRAMES_MAX`]
    /// unacknowledged frames, those written on another connection and not hedged yet. Empty
    /// while [`HEDGED_FRAMES_MAX`] hedges await their acknowledgement.
    fn hedge_candidates(&self, connection_id: u64) -> impl Iterator<Item = (&u64, &OutboundFrame)> {
        let open = self.end_of_stream_queued
            && self.pending.is_empty()
            && self.hedged.len() < HEDGED_FRAMES_MAX;
        self.frames
            .iter()
            .take(if open { HEDGED_FRAMES_MAX } else { 0 })
            .filter(move |(sequence, frame)| {
                frame
                    .assigned_connection
                    .is_some_and(|assigned| assigned != connection_id)
                    && !self.hedged.contains(sequence)
            })
    }

    /// At the end of the stream (its end queued, every frame written), a copy of the lowest
    /// frame that is overdue on another connection (see [`Self::hedge_after`]), to send on
    /// `connection_id`. The receiver keeps the first copy to arrive: a frame behind a loss its
    /// connection has not yet repaired, queued on a connection slower than the rest (one still
    /// in TCP's start-up), or on one whose path stalled, no longer holds the stream's last byte
    /// for a round trip, a retransmission timeout or the 15 s until TCP gives up. The copy is
    /// written only when the connection would otherwise be idle; at most [`HEDGED_FRAMES_MAX`]
    /// await their acknowledgement, each frame is copied once, and the frame stays assigned to
    /// its first connection. Not earlier in the stream: copies taken whenever the send window
    /// was full (4 MB of a 2 GiB transfer at 1 Gbit/s, 50 ms, 0.5 % loss) did not make it any
    /// faster (bench/transport/README.md).
    pub fn next_hedge(&mut self, connection_id: u64, now: Instant) -> Option<Transmission> {
        let overdue = self.hedge_after()?;
        let (&sequence, frame) = self.hedge_candidates(connection_id).find(|(_, frame)| {
            frame
                .sent_at
                .is_some_and(|sent| now.saturating_duration_since(sent) >= overdue)
        })?;
        let transmission = Transmission {
            sequence,
            payload: frame.payload.clone(),
            end_of_stream: frame.end_of_stream,
            retransmission: true,
        };
        self.hedged.insert(sequence);
        self.payload_bytes_hedged += transmission.payload.len() as u64;
        Some(transmission)
    }

    /// When [`Self::next_hedge`] on `connection_id` could next find a frame, if nothing else
    /// changes first (new data, an acknowledgement).
    pub fn next_hedge_due(&self, connection_id: u64) -> Option<Instant> {
        let overdue = self.hedge_after()?;
        self.hedge_candidates(connection_id)
            .filter_map(|(_, frame)| frame.sent_at)
            .min()
            .map(|sent| sent + overdue)
    }
}

/// Result of offering a received frame to the inbound half.
#[derive(Debug, PartialEq, Eq)]
pub enum Reception {
    /// New frame stored; the contiguous prefix may have advanced.
    Stored,
    /// Already received earlier (a retransmission after a reconnection); dropped.
    Duplicate,
}

/// A frame handed to the application, in order.
#[derive(Debug, PartialEq, Eq)]
pub struct Delivery {
    pub payload: Bytes,
    pub end_of_stream: bool,
    /// Charged bytes to pass to `mark_consumed` once the application is done with it.
    pub charge: u64,
}

/// The receiving half of a channel.
#[derive(Debug)]
pub struct InboundChannel {
    receive_window_bytes: u64,
    next_delivery: u64,
    contiguous: u64,
    reorder: BTreeMap<u64, (Bytes, bool)>,
    held_bytes: u64,
    consumed_bytes: u64,
    end_of_stream_sequence: Option<u64>,
    pub payload_bytes_received: u64,
    pub duplicate_frames: u64,
}

impl InboundChannel {
    pub fn new(receive_window_bytes: u64) -> InboundChannel {
        InboundChannel {
            receive_window_bytes,
            next_delivery: 0,
            contiguous: 0,
            reorder: BTreeMap::new(),
            held_bytes: 0,
            consumed_bytes: 0,
            end_of_stream_sequence: None,
            payload_bytes_received: 0,
            duplicate_frames: 0,
        }
    }

    pub fn on_data(
        &mut self,
        sequence: u64,
        payload: Bytes,
        end_of_stream: bool,
    ) -> Result<Reception, TransportError> {
        if sequence < self.contiguous || self.reorder.contains_key(&sequence) {
            self.duplicate_frames += 1;
            return Ok(Reception::Duplicate);
        }
        if payload.is_empty() && !end_of_stream {
            return Err(TransportError::Protocol {
                reason: format!("empty data frame {sequence}"),
            });
        }
        if let Some(last) = self.end_of_stream_sequence
            && (sequence > last || end_of_stream)
        {
            return Err(TransportError::Protocol {
                reason: format!("frame {sequence} after end of stream at {last}"),
            });
        }
        if end_of_stream
            && self
                .reorder
                .keys()
                .next_back()
                .is_some_and(|high| *high > sequence)
        {
            return Err(TransportError::Protocol {
                reason: format!("end of stream at {sequence} before frames already received"),
            });
        }
        let charge = charge_of(payload.len());
        if self.held_bytes + charge > self.receive_window_bytes {
            return Err(TransportError::Protocol {
                reason: format!(
                    "frame {sequence} overflows the receive window ({} of {} bytes held)",
                    self.held_bytes, self.receive_window_bytes
                ),
            });
        }
        self.held_bytes += charge;
        self.payload_bytes_received += payload.len() as u64;
        if end_of_stream {
            self.end_of_stream_sequence = Some(sequence);
        }
        self.reorder.insert(sequence, (payload, end_of_stream));
        while self.reorder.contains_key(&self.contiguous) {
            self.contiguous += 1;
        }
        Ok(Reception::Stored)
    }

    /// The next frame in order, if it has arrived. Its charge stays held until `mark_consumed`.
    pub fn take_next(&mut self) -> Option<Delivery> {
        let (payload, end_of_stream) = self.reorder.remove(&self.next_delivery)?;
        self.next_delivery += 1;
        Some(Delivery {
            charge: charge_of(payload.len()),
            payload,
            end_of_stream,
        })
    }

    pub fn mark_consumed(&mut self, charge: u64) {
        self.held_bytes = self.held_bytes.saturating_sub(charge);
        self.consumed_bytes += charge;
    }

    pub fn acknowledgement(&self) -> Acknowledgement {
        Acknowledgement {
            contiguous_sequence: self.contiguous,
            consumed_bytes: self.consumed_bytes,
        }
    }

    pub fn held_bytes(&self) -> u64 {
        self.held_bytes
    }

    pub fn has_deliverable(&self) -> bool {
        self.reorder.contains_key(&self.next_delivery)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn payload(byte: u8, len: usize) -> Bytes {
        Bytes::from(vec![byte; len])
    }

    #[test]
    fn frames_are_delivered_in_order_whatever_the_arrival_order() {
        let mut inbound = InboundChannel::new(1 << 20);
        for sequence in [2u64, 0, 3, 1] {
            assert_eq!(
                inbound
                    .on_data(sequence, payload(sequence as u8, 10), false)
                    .unwrap(),
                Reception::Stored
            );
        }
        assert_eq!(inbound.acknowledgement().contiguous_sequence, 4);
        for expected in 0..4u8 {
            let delivery = inbound.take_next().unwrap();
            assert_eq!(delivery.payload[0], expected);
            inbound.mark_consumed(delivery.charge);
        }
        assert!(inbound.take_next().is_none());
        assert_eq!(inbound.held_bytes(), 0);
    }

    #[test]
    fn duplicates_after_resume_are_dropped() {
        let mut inbound = InboundChannel::new(1 << 20);
        inbound.on_data(0, payload(1, 10), false).unwrap();
        inbound.on_data(2, payload(3, 10), false).unwrap();
        assert_eq!(
            inbound.on_data(0, payload(1, 10), false).unwrap(),
            Reception::Duplicate
        );
        assert_eq!(
            inbound.on_data(2, payload(3, 10), false).unwrap(),
            Reception::Duplicate
        );
        assert_eq!(inbound.duplicate_frames, 2);
    }

    #[test]
    fn receiver_rejects_frames_beyond_its_window() {
        let mut inbound = InboundChannel::new(charge_of(100) * 2);
        inbound.on_data(0, payload(0, 100), false).unwrap();
        inbound.on_data(1, payload(0, 100), false).unwrap();
        let error = inbound.on_data(2, payload(0, 100), false).unwrap_err();
        assert!(error.to_string().contains("receive window"), "{error}");
        let delivery = inbound.take_next().unwrap();
        inbound.mark_consumed(delivery.charge);
        inbound.on_data(2, payload(0, 100), false).unwrap();
    }

    #[test]
    fn data_after_end_of_stream_is_a_protocol_violation() {
        let mut inbound = InboundChannel::new(1 << 20);
        inbound.on_data(1, Bytes::new(), true).unwrap();
        assert!(inbound.on_data(2, payload(0, 1), false).is_err());
        assert!(
            inbound.on_data(0, Bytes::new(), false).is_err(),
            "empty non-final frame"
        );
    }

    #[test]
    fn unsent_bytes_count_frames_waiting_for_a_connection() {
        let mut outbound = OutboundChannel::new(1 << 20, 1 << 20);
        let mut inbound = InboundChannel::new(1 << 20);
        for byte in 0..3u8 {
            outbound.enqueue(payload(byte, 1000), false).unwrap();
        }
        assert_eq!(outbound.unsent_bytes(), 3 * charge_of(1000));
        let first = outbound.next_transmission(1, Instant::now()).unwrap();
        outbound.next_transmission(2, Instant::now()).unwrap();
        assert_eq!(outbound.unsent_bytes(), charge_of(1000));
        assert_eq!(outbound.buffered_bytes(), 3 * charge_of(1000));
        // The first frame arrived, then its connection was lost before the acknowledgement:
        // it waits again, until the acknowledgement takes it out of the queue.
        inbound
            .on_data(first.sequence, first.payload, false)
            .unwrap();
        assert_eq!(outbound.on_connection_lost(1), 1);
        assert_eq!(outbound.unsent_bytes(), 2 * charge_of(1000));
        outbound
            .on_acknowledgement(inbound.acknowledgement(), Instant::now())
            .unwrap();
        assert_eq!(outbound.unsent_bytes(), charge_of(1000));
        assert_eq!(outbound.buffered_bytes(), 2 * charge_of(1000));
        // A second loss of the same connection queues nothing twice.
        assert_eq!(outbound.on_connection_lost(1), 0);
        assert_eq!(outbound.on_connection_lost(2), 1);
        assert_eq!(outbound.unsent_bytes(), 2 * charge_of(1000));
        while outbound.next_transmission(3, Instant::now()).is_some() {}
        assert_eq!(outbound.unsent_bytes(), 0);
    }

    #[test]
    fn a_connection_finding_the_window_full_and_nothing_queued_counts_as_starved() {
        let mut outbound = OutboundChannel::new(charge_of(1000) * 2, charge_of(1000) * 100);
        // Nothing queued, window empty: the path or the sender, not the window.
        assert_eq!(outbound.next_transmission(1, Instant::now()), None);
        assert_eq!(outbound.send_window_starved, 0);
        outbound.enqueue(payload(0, 1000), false).unwrap();
        assert!(outbound.next_transmission(1, Instant::now()).is_some());
        // One frame out, room for another: not starved.
        assert_eq!(outbound.next_transmission(1, Instant::now()), None);
        assert_eq!(outbound.send_window_starved, 0);
        outbound.enqueue(payload(1, 1000), false).unwrap();
        assert!(!outbound.has_room_for(1000));
        assert!(outbound.next_transmission(2, Instant::now()).is_some());
        // Both out, the window full: a free connection starves.
        assert_eq!(outbound.next_transmission(1, Instant::now()), None);
        assert_eq!(outbound.send_window_starved, 1);
    }

    #[test]
    fn frames_the_peer_has_not_consumed_count_against_the_send_window() {
        let window = charge_of(1000) * 2;
        let mut outbound = OutboundChannel::new(window, charge_of(1000) * 100);
        let mut inbound = InboundChannel::new(charge_of(1000) * 100);
        for round in 0..2u8 {
            outbound.enqueue(payload(round, 1000), false).unwrap();
        }
        for _ in 0..2 {
            let sent = outbound.next_transmission(1, Instant::now()).unwrap();
            inbound.on_data(sent.sequence, sent.payload, false).unwrap();
        }
        // Received (so no longer buffered here) but not consumed by the peer's application.
        assert!(
            outbound
                .on_acknowledgement(inbound.acknowledgement(), Instant::now())
                .unwrap()
        );
        assert_eq!(outbound.buffered_bytes(), 0);
        assert_eq!(outbound.next_transmission(1, Instant::now()), None);
        assert_eq!(
            outbound.send_window_holds, 0,
            "nothing queued: not the window's doing"
        );
        outbound.enqueue(payload(2, 1000), false).unwrap();
        outbound.enqueue(payload(3, 1000), false).unwrap();
        assert_eq!(outbound.next_transmission(1, Instant::now()), None);
        assert_eq!(outbound.send_window_holds, 1);
        // The application takes one frame: one more may go.
        let delivery = inbound.take_next().unwrap();
        inbound.mark_consumed(delivery.charge);
        assert!(
            outbound
                .on_acknowledgement(inbound.acknowledgement(), Instant::now())
                .unwrap()
        );
        assert_eq!(
            outbound
                .next_transmission(1, Instant::now())
                .unwrap()
                .sequence,
            2
        );
        assert_eq!(outbound.next_transmission(1, Instant::now()), None);
    }

    #[test]
    fn a_window_smaller_than_a_frame_still_sends_one_frame_at_a_time() {
        let mut outbound = OutboundChannel::new(10, charge_of(1000) * 100);
        let mut inbound = InboundChannel::new(charge_of(1000) * 100);
        for round in 0..2u8 {
            assert!(outbound.has_room_for(1000));
            outbound.enqueue(payload(round, 1000), false).unwrap();
            let sent = outbound.next_transmission(1, Instant::now()).unwrap();
            assert_eq!(outbound.next_transmission(1, Instant::now()), None);
            inbound.on_data(sent.sequence, sent.payload, false).unwrap();
            let delivery = inbound.take_next().unwrap();
            inbound.mark_consumed(delivery.charge);
            outbound
                .on_acknowledgement(inbound.acknowledgement(), Instant::now())
                .unwrap();
        }
        assert!(outbound.all_acknowledged());
    }

    #[test]
    fn sender_respects_window_and_credit() {
        let window = charge_of(1000) * 4;
        let mut outbound = OutboundChannel::new(window, charge_of(1000) * 2);
        for _ in 0..4 {
            assert!(outbound.has_room_for(1000));
            outbound.enqueue(payload(0, 1000), false).unwrap();
        }
        assert!(!outbound.has_room_for(1000));
        assert_eq!(
            outbound
                .next_transmission(1, Instant::now())
                .unwrap()
                .sequence,
            0
        );
        assert_eq!(
            outbound
                .next_transmission(1, Instant::now())
                .unwrap()
                .sequence,
            1
        );
        assert!(
            outbound.next_transmission(1, Instant::now()).is_none(),
            "credit for two frames only"
        );
        outbound
            .on_acknowledgement(
                Acknowledgement {
                    contiguous_sequence: 2,
                    consumed_bytes: charge_of(1000),
                },
                Instant::now(),
            )
            .unwrap();
        assert!(outbound.has_room_for(1000));
        assert_eq!(
            outbound
                .next_transmission(1, Instant::now())
                .unwrap()
                .sequence,
            2
        );
        assert!(outbound.next_transmission(1, Instant::now()).is_none());
    }

    #[test]
    fn the_announced_receive_window_raises_the_early_credit_and_never_lowers_it() {
        let mut outbound = OutboundChannel::new(charge_of(1000) * 8, charge_of(1000));
        for _ in 0..4 {
            outbound.enqueue(payload(0, 1000), false).unwrap();
        }
        assert!(outbound.next_transmission(1, Instant::now()).is_some());
        assert!(
            outbound.next_transmission(1, Instant::now()).is_none(),
            "the early credit holds one frame"
        );
        assert!(
            !outbound.raise_peer_receive_window(charge_of(500)),
            "a smaller window changes nothing"
        );
        assert!(outbound.next_transmission(1, Instant::now()).is_none());
        assert!(outbound.raise_peer_receive_window(charge_of(1000) * 3));
        assert!(!outbound.raise_peer_receive_window(charge_of(1000) * 3));
        assert_eq!(
            outbound
                .next_transmission(1, Instant::now())
                .unwrap()
                .sequence,
            1
        );
        assert_eq!(
            outbound
                .next_transmission(1, Instant::now())
                .unwrap()
                .sequence,
            2
        );
        assert!(outbound.next_transmission(1, Instant::now()).is_none());
        // Later acknowledgements grant credit from the announced window.
        outbound
            .on_acknowledgement(
                Acknowledgement {
                    contiguous_sequence: 3,
                    consumed_bytes: charge_of(1000),
                },
                Instant::now(),
            )
            .unwrap();
        assert_eq!(
            outbound
                .next_transmission(1, Instant::now())
                .unwrap()
                .sequence,
            3
        );
    }

    #[test]
    fn acknowledged_frames_are_never_transmitted_again_after_a_connection_loss() {
        let mut outbound = OutboundChannel::new(1 << 20, 1 << 20);
        for _ in 0..6 {
            outbound.enqueue(payload(0, 100), false).unwrap();
        }
        // Frames 0, 2, 4 go on connection 1; 1, 3, 5 on connection 2.
        for index in 0..6 {
            let transmission = outbound
                .next_transmission(1 + index % 2, Instant::now())
                .unwrap();
            assert_eq!(transmission.sequence, index);
        }
        outbound
            .on_acknowledgement(
                Acknowledgement {
                    contiguous_sequence: 3,
                    consumed_bytes: 0,
                },
                Instant::now(),
            )
            .unwrap();
        assert_eq!(
            outbound.on_connection_lost(1),
            1,
            "only frame 4 is unacknowledged on 1"
        );
        let resent = outbound.next_transmission(3, Instant::now()).unwrap();
        assert_eq!(resent.sequence, 4);
        assert!(resent.retransmission);
        assert!(
            outbound.next_transmission(3, Instant::now()).is_none(),
            "frames on connection 2 stay there"
        );
        assert_eq!(outbound.on_connection_lost(2), 2);
        let again: Vec<u64> = std::iter::from_fn(|| outbound.next_transmission(3, Instant::now()))
            .map(|transmission| transmission.sequence)
            .collect();
        assert_eq!(again, vec![3, 5]);
        assert_eq!(outbound.payload_bytes_retransmitted, 300);
    }

    #[test]
    fn acknowledgement_beyond_what_was_sent_is_rejected() {
        let mut outbound = OutboundChannel::new(1 << 20, 1 << 20);
        outbound.enqueue(payload(0, 1), false).unwrap();
        assert!(
            outbound
                .on_acknowledgement(
                    Acknowledgement {
                        contiguous_sequence: 5,
                        consumed_bytes: 0,
                    },
                    Instant::now()
                )
                .is_err()
        );
    }

    /// Acknowledges every frame below `contiguous` at `at` (the peer consumed nothing yet).
    fn acknowledge_up_to(outbound: &mut OutboundChannel, contiguous: u64, at: Instant) {
        outbound
            .on_acknowledgement(
                Acknowledgement {
                    contiguous_sequence: contiguous,
                    consumed_bytes: 0,
                },
                at,
            )
            .unwrap();
    }

    /// Frames 0-3 written on connections 1 and 2 at `start`, frame 0 acknowledged 100 ms later
    /// (the measured delay), the end of the stream queued and written on connection 1.
    fn four_frames_and_one_acknowledged(start: Instant) -> OutboundChannel {
        let mut outbound = OutboundChannel::new(1 << 20, 1 << 20);
        for byte in 0..4u8 {
            outbound.enqueue(payload(byte, 100), false).unwrap();
        }
        for connection in [1, 2, 1, 2] {
            outbound.next_transmission(connection, start).unwrap();
        }
        acknowledge_up_to(&mut outbound, 1, start + Duration::from_millis(100));
        outbound.enqueue(Bytes::new(), true).unwrap();
        outbound
            .next_transmission(1, start + Duration::from_millis(100))
            .unwrap();
        outbound
    }

    #[test]
    fn an_overdue_frame_is_sent_once_more_on_another_connection_with_nothing_else_to_send() {
        let start = Instant::now();
        let mut outbound = four_frames_and_one_acknowledged(start);
        assert_eq!(outbound.hedge_after(), Some(Duration::from_millis(150)));
        // Not overdue yet: nothing, and when to look again.
        let early = start + Duration::from_millis(120);
        assert_eq!(outbound.next_hedge(3, early), None);
        assert_eq!(
            outbound.next_hedge_due(3),
            Some(start + Duration::from_millis(150))
        );
        // Overdue: the lowest frames first, each once, never on the connection it is on.
        let late = start + Duration::from_millis(160);
        let on_connection_2: Vec<u64> = std::iter::from_fn(|| outbound.next_hedge(2, late))
            .map(|hedge| {
                assert!(hedge.retransmission);
                hedge.sequence
            })
            .collect();
        assert_eq!(
            on_connection_2,
            vec![2],
            "frames 1 and 3 are on connection 2"
        );
        let on_connection_3: Vec<u64> = std::iter::from_fn(|| outbound.next_hedge(3, late))
            .map(|hedge| hedge.sequence)
            .collect();
        assert_eq!(
            on_connection_3,
            vec![1, 3],
            "the end marker is not overdue yet"
        );
        assert_eq!(outbound.payload_bytes_hedged, 300);
        assert_eq!(outbound.payload_bytes_retransmitted, 0);
        // The copies leave the frames where they were: acknowledged as usual, and a lost
        // first connection still requeues its own.
        assert!(outbound.unacknowledged_on(2));
        assert_eq!(outbound.on_connection_lost(2), 2);
        assert_eq!(
            outbound
                .next_transmission(3, late)
                .map(|frame| frame.sequence),
            Some(1)
        );
        acknowledge_up_to(&mut outbound, 5, late);
        assert!(outbound.all_acknowledged());
        assert_eq!(
            outbound.hedge_after(),
            Some(Duration::from_millis(150)),
            "no delay measured across a copy"
        );
        assert_eq!(outbound.next_hedge(3, late + Duration::from_secs(1)), None);
    }

    #[test]
    fn no_frame_is_hedged_before_the_end_of_the_stream_or_a_measured_delay() {
        let start = Instant::now();
        let mut outbound = OutboundChannel::new(1 << 20, 1 << 20);
        outbound.enqueue(payload(1, 100), false).unwrap();
        outbound.next_transmission(1, start).unwrap();
        let much_later = start + Duration::from_secs(10);
        assert_eq!(outbound.hedge_after(), None);
        assert_eq!(outbound.next_hedge(2, much_later), None);
        assert_eq!(outbound.next_hedge_due(2), None);

        // A frame waits for a connection: it goes first, and nothing is copied meanwhile.
        let mut outbound = OutboundChannel::new(1 << 20, 1 << 20);
        for byte in 0..3u8 {
            outbound.enqueue(payload(byte, 100), false).unwrap();
        }
        outbound.next_transmission(1, start).unwrap();
        outbound.next_transmission(2, start).unwrap();
        acknowledge_up_to(&mut outbound, 1, start + Duration::from_millis(100));
        assert!(outbound.has_pending());
        assert_eq!(outbound.next_hedge(3, much_later), None);
        assert_eq!(outbound.next_hedge_due(3), None);
        // Every frame written, but the stream goes on: still nothing.
        outbound.next_transmission(1, start).unwrap();
        assert_eq!(outbound.next_hedge(3, much_later), None);
        assert_eq!(outbound.next_hedge_due(3), None);
        // Its end written too: the overdue frames go again.
        outbound.enqueue(Bytes::new(), true).unwrap();
        outbound.next_transmission(2, much_later).unwrap();
        assert_eq!(
            outbound
                .next_hedge(3, much_later)
                .map(|hedge| hedge.sequence),
            Some(1)
        );
    }

    #[test]
    fn at_most_a_megabyte_of_frames_awaits_acknowledgement_with_a_copy_on_the_way() {
        let start = Instant::now();
        let mut outbound = OutboundChannel::new(64 << 20, 64 << 20);
        let frames = HEDGED_FRAMES_MAX as u64 * 2 + 1;
        for _ in 0..frames {
            outbound.enqueue(payload(7, 128 << 10), false).unwrap();
        }
        outbound.enqueue(Bytes::new(), true).unwrap();
        for _ in 0..=frames {
            outbound.next_transmission(1, start).unwrap();
        }
        acknowledge_up_to(&mut outbound, 1, start + Duration::from_millis(20));
        let late = start + Duration::from_secs(1);
        let hedged: Vec<u64> = std::iter::from_fn(|| outbound.next_hedge(2, late))
            .map(|hedge| hedge.sequence)
            .collect();
        assert_eq!(hedged, (1..=HEDGED_FRAMES_MAX as u64).collect::<Vec<_>>());
        // Acknowledging two of them lets the next two go.
        acknowledge_up_to(&mut outbound, 3, late);
        let next: Vec<u64> = std::iter::from_fn(|| outbound.next_hedge(2, late))
            .map(|hedge| hedge.sequence)
            .collect();
        assert_eq!(
            next,
            vec![HEDGED_FRAMES_MAX as u64 + 1, HEDGED_FRAMES_MAX as u64 + 2]
        );
    }
}
