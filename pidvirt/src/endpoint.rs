//! Endpoints: location-free service addresses `<name>:<port>` in a DC, and the
//! virtual IPs that name them (DESIGN §4).
//!
//! A virtual IP belongs to an endpoint *name* within a DC (`redis.dc0.dvk` →
//! 127.77.x.y); the port picks the endpoint among that name's listeners. VIPs
//! default to the loopback range 127.77.0.0/16 so nothing leaks onto a real
//! network when a program runs without the shim. The VIP is derived from a hash
//! of (DC, name) and probed past collisions by the agent that first registers
//! the name; it then travels with the endpoint entry and never changes.

use crate::{DcName, NodeId, Vpid};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::net::Ipv4Addr;

/// First two octets of every virtual IP.
pub const VIP_PREFIX: [u8; 2] = [127, 77];

/// An IPv4 address and port as the program sees them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
pub struct VirtualAddr {
    pub ip: [u8; 4],
    pub port: u16,
}

impl fmt::Display for VirtualAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", Ipv4Addr::from(self.ip), self.port)
    }
}

pub fn is_virtual_ip(ip: [u8; 4]) -> bool {
    ip[0] == VIP_PREFIX[0] && ip[1] == VIP_PREFIX[1]
}

/// An endpoint registered somewhere in the cluster.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointEntry {
    pub dc: DcName,
    pub name: String,
    pub port: u16,
    pub vip: [u8; 4],
    /// The process that listens.
    pub vpid: Vpid,
    /// Where that process runs.
    pub node: NodeId,
}

impl EndpointEntry {
    pub fn key(&self) -> EndpointKey {
        EndpointKey { dc: self.dc.clone(), name: self.name.clone(), port: self.port }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct EndpointKey {
    pub dc: DcName,
    pub name: String,
    pub port: u16,
}

impl fmt::Display for EndpointKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{} in {}", self.name, self.port, self.dc)
    }
}

/// FNV-1a: stable across versions and architectures (the VIP must be the same on every node).
fn fnv1a(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf29ce484222325;
    for part in parts {
        for b in *part {
            h ^= *b as u64;
            h = h.wrapping_mul(0x100000001b3);
        }
        h ^= 0xff;
        h = h.wrapping_mul(0x100000001b3);
    }
    h
}

/// The sequence of VIPs to try for `name` in `dc`: the first free one is taken.
/// Never 127.77.0.0 or 127.77.255.255.
pub fn vip_candidates(dc: &str, name: &str) -> impl Iterator<Item = [u8; 4]> {
    let start = fnv1a(&[dc.as_bytes(), name.as_bytes()]);
    (0..u16::MAX as u64).map(move |i| {
        let low = ((start.wrapping_add(i)) % 0xfffe + 1) as u16;
        let [a, b] = low.to_be_bytes();
        [VIP_PREFIX[0], VIP_PREFIX[1], a, b]
    })
}

/// The client-side address of a process whose endpoint name is `name`: its
/// preferred VIP (not reserved: clients only need a stable, plausible address).
pub fn client_vip(dc: &str, name: &str) -> [u8; 4] {
    vip_candidates(dc, name).next().expect("at least one candidate")
}

/// Splits a host name `<name>.<dc>.dvk` (case-insensitive suffix, optional final dot)
/// into (name, dc). The DC is the last label before `.dvk`; the name may contain dots.
pub fn parse_dvk_host(host: &str) -> Option<(&str, &str)> {
    let host = host.strip_suffix('.').unwrap_or(host);
    let cut = host.len().checked_sub(4)?;
    if !host.get(cut..)?.eq_ignore_ascii_case(".dvk") {
        return None;
    }
    let (name, dc) = host[..cut].rsplit_once('.')?;
    (!name.is_empty() && !dc.is_empty()).then_some((name, dc))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn candidates_are_stable_virtual_and_distinct() {
        let a: Vec<_> = vip_candidates("dc0", "redis").take(5).collect();
        let b: Vec<_> = vip_candidates("dc0", "redis").take(5).collect();
        assert_eq!(a, b, "the same on every node and every run");
        assert!(a.iter().all(|ip| is_virtual_ip(*ip)));
        assert!(a.iter().all(|ip| *ip != [127, 77, 0, 0] && *ip != [127, 77, 255, 255]));
        let set: std::collections::HashSet<_> = a.iter().collect();
        assert_eq!(set.len(), 5);
        assert_ne!(client_vip("dc0", "redis"), client_vip("dc1", "redis"), "DCs hash apart");
    }

    #[test]
    fn parses_dvk_host_names() {
        assert_eq!(parse_dvk_host("redis.dc0.dvk"), Some(("redis", "dc0")));
        assert_eq!(parse_dvk_host("Web.Server.dc1.DVK."), Some(("Web.Server", "dc1")));
        assert_eq!(parse_dvk_host("example.com"), None);
        assert_eq!(parse_dvk_host("dc0.dvk"), None);
        assert_eq!(parse_dvk_host(".dvk"), None);
        assert_eq!(parse_dvk_host("x.dvk.com"), None);
        assert_eq!(parse_dvk_host("a.b.dv"), None);
    }

    #[test]
    fn virtual_ip_range() {
        assert!(is_virtual_ip([127, 77, 1, 2]));
        assert!(!is_virtual_ip([127, 0, 0, 1]));
        assert!(!is_virtual_ip([192, 0, 2, 1]));
        assert_eq!(VirtualAddr { ip: [127, 77, 1, 2], port: 80 }.to_string(), "127.77.1.2:80");
    }
}
