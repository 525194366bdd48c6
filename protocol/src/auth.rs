//! Peer authentication: HMAC-SHA256 challenge-response over the cluster key.

use crate::peer::{Mac, Nonce};
use hmac::{Hmac, Mac as _};
use pidvirt::NodeId;
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// Shortest cluster key accepted (bytes).
pub const MIN_KEY_LEN: usize = 16;

/// The shared secret of a cluster.
#[derive(Clone)]
pub struct ClusterKey(Vec<u8>);

impl std::fmt::Debug for ClusterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClusterKey(..)")
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KeyError {
    #[error("cluster key is {0} bytes; at least {MIN_KEY_LEN} are required")]
    TooShort(usize),
}

impl ClusterKey {
    pub fn new(bytes: Vec<u8>) -> Result<Self, KeyError> {
        if bytes.len() < MIN_KEY_LEN {
            return Err(KeyError::TooShort(bytes.len()));
        }
        Ok(ClusterKey(bytes))
    }
}

/// Which side of the handshake a proof is for; part of the MAC input so a
/// proof made for one role is worthless in the other.
#[derive(Clone, Copy, Debug)]
pub enum Role {
    Dialer,
    Acceptor,
}

/// Everything both sides must agree on for a proof to verify.
#[derive(Clone, Copy, Debug)]
pub struct Transcript {
    pub dialer: NodeId,
    pub acceptor: NodeId,
    pub dialer_nonce: Nonce,
    pub acceptor_nonce: Nonce,
}

impl Transcript {
    fn mac(&self, key: &ClusterKey, role: Role) -> HmacSha256 {
        let mut mac = HmacSha256::new_from_slice(&key.0).expect("HMAC takes keys of any length");
        mac.update(match role {
            Role::Dialer => b"dvk-peer-v1 dialer  ",
            Role::Acceptor => b"dvk-peer-v1 acceptor",
        });
        mac.update(&self.dialer.0.to_le_bytes());
        mac.update(&self.acceptor.0.to_le_bytes());
        mac.update(&self.dialer_nonce);
        mac.update(&self.acceptor_nonce);
        mac
    }

    pub fn prove(&self, key: &ClusterKey, role: Role) -> Mac {
        self.mac(key, role).finalize().into_bytes().into()
    }

    /// Constant-time check of a peer's proof.
    pub fn verify(&self, key: &ClusterKey, role: Role, proof: &Mac) -> bool {
        self.mac(key, role).verify_slice(proof).is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn transcript() -> Transcript {
        Transcript { dialer: NodeId(1), acceptor: NodeId(2), dialer_nonce: [7; 32], acceptor_nonce: [9; 32] }
    }

    #[test]
    fn same_key_verifies_other_key_does_not() {
        let k = ClusterKey::new(vec![1; 32]).unwrap();
        let wrong = ClusterKey::new(vec![2; 32]).unwrap();
        let t = transcript();
        let p = t.prove(&k, Role::Dialer);
        assert!(t.verify(&k, Role::Dialer, &p));
        assert!(!t.verify(&wrong, Role::Dialer, &p));
    }

    #[test]
    fn proofs_cannot_be_reflected_or_replayed() {
        let k = ClusterKey::new(vec![1; 32]).unwrap();
        let t = transcript();
        let p = t.prove(&k, Role::Dialer);
        assert!(!t.verify(&k, Role::Acceptor, &p), "a dialer proof is not an acceptor proof");
        let mut fresh = t;
        fresh.acceptor_nonce = [10; 32];
        assert!(!fresh.verify(&k, Role::Dialer, &p), "a proof is bound to the nonces");
        let mut other = t;
        other.dialer = NodeId(3);
        assert!(!other.verify(&k, Role::Dialer, &p), "a proof is bound to the node ids");
    }

    #[test]
    fn short_keys_are_refused() {
        assert_eq!(ClusterKey::new(vec![0; 8]).unwrap_err(), KeyError::TooShort(8));
    }
}
