//! Sealing what the store keeps about a secret it must not hold: the value is encrypted
//! (AES-256-GCM) under a key derived from the secret itself (a refresh token, a login code), and
//! named in the store by a different digest of the same secret. Whoever reads the store learns
//! neither the secret nor the sealed value; whoever presents the secret can open it.

use aes_gcm::aead::{Aead, KeyInit};
use aes_gcm::{Aes256Gcm, Nonce};
use rand::RngCore;
use sha2::{Digest as _, Sha256};

use super::Digest;

/// What the store calls a secret.
pub type Name = Digest;

const NONCE_LEN: usize = 12;

/// The name under which the store knows `secret`, separate per `purpose`.
pub fn name(purpose: &str, secret: &[u8]) -> Name {
    derive(b"wxgate name\0", purpose, secret)
}

pub fn seal(purpose: &str, secret: &[u8], plaintext: &[u8]) -> Vec<u8> {
    let cipher = cipher(purpose, secret);
    let mut nonce = [0u8; NONCE_LEN];
    rand::rngs::OsRng.fill_bytes(&mut nonce);
    let ciphertext = cipher
        .encrypt(&Nonce::from(nonce), plaintext)
        .expect("AES-GCM encryption of an in-memory buffer cannot fail");
    [nonce.as_slice(), &ciphertext].concat()
}

/// `None` when `sealed` was not sealed under this secret and purpose, or was altered.
pub fn open(purpose: &str, secret: &[u8], sealed: &[u8]) -> Option<Vec<u8>> {
    if sealed.len() < NONCE_LEN {
        return None;
    }
    let (nonce, ciphertext) = sealed.split_at(NONCE_LEN);
    let nonce: [u8; NONCE_LEN] = nonce.try_into().ok()?;
    cipher(purpose, secret)
        .decrypt(&Nonce::from(nonce), ciphertext)
        .ok()
}

fn cipher(purpose: &str, secret: &[u8]) -> Aes256Gcm {
    let key = derive(b"wxgate seal\0", purpose, secret);
    Aes256Gcm::new_from_slice(&key).expect("a SHA-256 digest is a valid AES-256 key")
}

fn derive(label: &[u8], purpose: &str, secret: &[u8]) -> Digest {
    let mut hasher = Sha256::new();
    hasher.update(label);
    hasher.update(purpose.as_bytes());
    hasher.update([0]);
    hasher.update(secret);
    hasher.finalize().into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_values_open_only_with_the_same_secret_and_purpose() {
        let sealed = seal("successor", b"token-a", b"pair");
        assert_eq!(
            open("successor", b"token-a", &sealed).as_deref(),
            Some(&b"pair"[..])
        );
        assert_eq!(open("successor", b"token-b", &sealed), None);
        assert_eq!(open("exchange", b"token-a", &sealed), None);
        let mut altered = sealed.clone();
        *altered.last_mut().unwrap() ^= 1;
        assert_eq!(open("successor", b"token-a", &altered), None);
    }

    #[test]
    fn the_name_is_not_the_key_and_reveals_nothing_in_the_sealed_bytes() {
        let secret = b"refresh-token-value";
        let sealed = seal("successor", secret, b"pair");
        assert_ne!(
            name("successor", secret),
            derive(b"wxgate seal\0", "successor", secret)
        );
        assert!(!sealed.windows(secret.len()).any(|w| w == secret));
    }
}
