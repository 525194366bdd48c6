//! Every message dvk sends: shim/CLI ↔ local agent ([`local`]) and agent ↔
//! agent ([`peer`]), the framing they share ([`frame`]), and peer
//! authentication ([`auth`]). No sockets here: callers own their I/O.
//!
//! Every enum starts with a `Reserved` variant (wire value 0) that is never
//! sent, so an all-zero or truncated frame can never decode into a command.

pub mod auth;
pub mod frame;
pub mod local;
pub mod peer;
pub mod relink;
pub mod stream;

pub use frame::FrameError;
