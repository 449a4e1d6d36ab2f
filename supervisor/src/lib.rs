//! holdfast: a socket-activation supervisor. See ARCHITECTURE.md for the layering.

pub mod unit;
