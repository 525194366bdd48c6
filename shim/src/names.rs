//! Name lookup for endpoints: `<name>.<dc>.dvk` answers with the endpoint's
//! virtual IP (only for the caller's own DC). Every other name goes to libc.

use crate::link;
use std::ffi::CStr;

/// The VIP for a `.dvk` host name: Some(Some(vip)) resolved, Some(None) a `.dvk` name that
/// does not resolve, None not a `.dvk` name.
pub fn lookup(host: &CStr) -> Option<Option<[u8; 4]>> {
    let (name, dc) = pidvirt::endpoint::parse_dvk_host(host.to_str().ok()?)?;
    Some(link::resolve(dc, name))
}

/// "a.b.c.d\0" in a stack buffer.
pub fn dotted(ip: [u8; 4], out: &mut [u8; 16]) -> &CStr {
    let mut n = 0;
    for (i, octet) in ip.iter().enumerate() {
        if i > 0 {
            out[n] = b'.';
            n += 1;
        }
        let digits = [octet / 100, octet / 10 % 10, octet % 10];
        let skip = if *octet >= 100 {
            0
        } else if *octet >= 10 {
            1
        } else {
            2
        };
        for d in &digits[skip..] {
            out[n] = b'0' + d;
            n += 1;
        }
    }
    out[n] = 0;
    CStr::from_bytes_with_nul(&out[..=n]).expect("one NUL at the end")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_dotted_quads() {
        let mut b = [0u8; 16];
        assert_eq!(dotted([127, 77, 0, 5], &mut b).to_str().unwrap(), "127.77.0.5");
        assert_eq!(dotted([255, 10, 100, 9], &mut b).to_str().unwrap(), "255.10.100.9");
    }
}
