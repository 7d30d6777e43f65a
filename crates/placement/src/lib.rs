//! Placement core (being written).
