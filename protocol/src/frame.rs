//! Length-prefixed frames: `[u32 little-endian body length][postcard body]`.
//!
//! The length is checked against the socket's limit before anything is
//! allocated, so an oversized or garbage header costs nothing but the
//! connection that sent it.

use serde::{de::DeserializeOwned, Deserialize, Serialize};
use std::io::{Read, Write};

pub const HEADER_LEN: usize = 4;
/// Largest frame on the local (shim/CLI) socket.
pub const LOCAL_MAX_FRAME: usize = 1 << 20;
/// Largest request the agent reads on the local socket. Requests carry a few names and a
/// path; answers (process lists, logs) may be larger, up to [`LOCAL_MAX_FRAME`]. Reading
/// requests into 64 KiB at most bounds what each local connection can make the agent hold.
pub const LOCAL_MAX_REQUEST: usize = 64 << 10;
/// Largest frame on a peer link.
pub const PEER_MAX_FRAME: usize = 8 << 20;

/// The causes (postcard, io) are part of each message rather than `source`s, so a
/// printer of error chains (anyhow's `{:#}`) says them once.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("frame of {len} bytes exceeds the limit of {max}")]
    TooLarge { len: usize, max: usize },
    #[error("empty frame")]
    Empty,
    #[error("malformed frame body: {0}")]
    Malformed(postcard::Error),
    #[error("buffer of {0} bytes too small for the frame")]
    BufferTooSmall(usize),
    #[error("connection closed")]
    Closed,
    #[error("i/o: {0}")]
    Io(std::io::Error),
}

impl From<postcard::Error> for FrameError {
    fn from(e: postcard::Error) -> Self {
        FrameError::Malformed(e)
    }
}

impl From<std::io::Error> for FrameError {
    fn from(e: std::io::Error) -> Self {
        FrameError::Io(e)
    }
}

/// Validates a header and returns the body length it announces.
pub fn body_len(header: [u8; HEADER_LEN], max: usize) -> Result<usize, FrameError> {
    let len = u32::from_le_bytes(header) as usize;
    if len == 0 {
        return Err(FrameError::Empty);
    }
    if len > max {
        return Err(FrameError::TooLarge { len, max });
    }
    Ok(len)
}

/// Encodes `msg` as a whole frame (header + body).
pub fn encode<T: Serialize>(msg: &T, max: usize) -> Result<Vec<u8>, FrameError> {
    let mut out = postcard::to_extend(msg, vec![0u8; HEADER_LEN])?;
    let len = out.len() - HEADER_LEN;
    if len > max {
        return Err(FrameError::TooLarge { len, max });
    }
    out[..HEADER_LEN].copy_from_slice(&(len as u32).to_le_bytes());
    Ok(out)
}

/// Encodes `msg` as a frame into `buf` without allocating (for the shim's
/// hooks, which may run in signal handlers). Returns the frame's bytes.
pub fn encode_into<'a, T: Serialize>(msg: &T, buf: &'a mut [u8]) -> Result<&'a [u8], FrameError> {
    if buf.len() <= HEADER_LEN {
        return Err(FrameError::BufferTooSmall(buf.len()));
    }
    let capacity = buf.len();
    let body_len =
        postcard::to_slice(msg, &mut buf[HEADER_LEN..]).map_err(|_| FrameError::BufferTooSmall(capacity))?.len();
    buf[..HEADER_LEN].copy_from_slice(&(body_len as u32).to_le_bytes());
    Ok(&buf[..HEADER_LEN + body_len])
}

/// Decodes a frame body; trailing bytes are an error (a frame is exactly one message).
pub fn decode<'de, T: Deserialize<'de>>(body: &'de [u8]) -> Result<T, FrameError> {
    let (msg, rest) = postcard::take_from_bytes(body)?;
    if !rest.is_empty() {
        return Err(FrameError::Malformed(postcard::Error::DeserializeBadEncoding));
    }
    Ok(msg)
}

/// Blocking read of one frame.
pub fn read_frame<R: Read, T: DeserializeOwned>(r: &mut R, max: usize) -> Result<T, FrameError> {
    let mut header = [0u8; HEADER_LEN];
    if let Err(e) = r.read_exact(&mut header) {
        return Err(if e.kind() == std::io::ErrorKind::UnexpectedEof { FrameError::Closed } else { e.into() });
    }
    let len = body_len(header, max)?;
    let mut body = vec![0u8; len];
    r.read_exact(&mut body)?;
    decode(&body)
}

/// Blocking write of one frame.
pub fn write_frame<W: Write, T: Serialize>(w: &mut W, msg: &T, max: usize) -> Result<(), FrameError> {
    w.write_all(&encode(msg, max)?)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::local::{LocalRequest, LocalResponse};

    #[test]
    fn round_trip_through_a_stream() {
        let msg = LocalRequest::Kill { vpid: pidvirt::Vpid(1 << 22 | 3), signal: 10, group: false };
        let mut wire = Vec::new();
        write_frame(&mut wire, &msg, LOCAL_MAX_FRAME).unwrap();
        let back: LocalRequest = read_frame(&mut wire.as_slice(), LOCAL_MAX_FRAME).unwrap();
        assert_eq!(back, msg);
    }

    #[test]
    fn encode_into_matches_encode() {
        let msg = LocalResponse::KillDone { errno: 3 };
        let mut buf = [0u8; 64];
        let a = encode_into(&msg, &mut buf).unwrap().to_vec();
        assert_eq!(a, encode(&msg, LOCAL_MAX_FRAME).unwrap());
        let mut tiny = [0u8; 5];
        assert!(matches!(encode_into(&msg, &mut tiny), Err(FrameError::BufferTooSmall(_))));
    }

    #[test]
    fn oversized_and_empty_headers_are_refused_before_allocation() {
        assert!(matches!(body_len([0xff, 0xff, 0xff, 0x7f], LOCAL_MAX_FRAME), Err(FrameError::TooLarge { .. })));
        assert!(matches!(body_len([0, 0, 0, 0], LOCAL_MAX_FRAME), Err(FrameError::Empty)));
    }

    #[test]
    fn garbage_bodies_are_errors_not_panics() {
        // Deterministic pseudo-random bodies of every small length.
        let mut x: u64 = 0x9e3779b97f4a7c15;
        for len in 1..512 {
            let body: Vec<u8> = (0..len)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                })
                .collect();
            let _ = decode::<LocalRequest>(&body);
            let _ = decode::<crate::peer::PeerMessage>(&body);
        }
        // Wire value 0 is reserved and never a command.
        assert!(matches!(decode::<LocalRequest>(&[0]), Ok(LocalRequest::Reserved)));
    }

    #[test]
    fn trailing_bytes_are_malformed() {
        let mut frame = encode(&LocalRequest::ListNodes, LOCAL_MAX_FRAME).unwrap();
        frame.push(0);
        assert!(decode::<LocalRequest>(&frame[HEADER_LEN..]).is_err());
    }

    #[test]
    fn truncated_stream_is_an_error() {
        let frame = encode(&LocalRequest::ListProcesses, LOCAL_MAX_FRAME).unwrap();
        let mut cut = &frame[..frame.len() - 1];
        assert!(read_frame::<_, LocalRequest>(&mut cut, LOCAL_MAX_FRAME).is_err());
        let mut nothing: &[u8] = &[];
        assert!(matches!(read_frame::<_, LocalRequest>(&mut nothing, LOCAL_MAX_FRAME), Err(FrameError::Closed)));
    }
}
