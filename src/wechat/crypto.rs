//! Open data (`encryptedData`): AES-128-CBC with PKCS#7, keyed by the session_key, and the
//! `rawData` signature (SPEC §7).

use aes::cipher::block_padding::Pkcs7;
use aes::cipher::{BlockDecryptMut, BlockEncryptMut, KeyIvInit};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use rand::RngCore;
use sha1::{Digest, Sha1};
use subtle::ConstantTimeEq;

use crate::config::Secret;

type Decryptor = cbc::Decryptor<aes::Aes128>;
type Encryptor = cbc::Encryptor<aes::Aes128>;

/// Why open data was refused; the caller maps it to an [`crate::error::Error`], since the same
/// failure means different things at login and at `/auth/decrypt`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpenDataError {
    /// Bad base64, or a key or iv that is not 16 bytes.
    Malformed,
    /// Padding or JSON failed: most often the wrong session_key.
    Undecryptable,
    /// Decrypted, but `watermark.appid` is missing or names another app.
    ForeignWatermark,
}

fn block16(text: &str) -> Result<[u8; 16], OpenDataError> {
    let bytes = STANDARD
        .decode(text)
        .map_err(|_| OpenDataError::Malformed)?;
    bytes.try_into().map_err(|_| OpenDataError::Malformed)
}

/// Decrypts and checks the watermark; returns the object without its `watermark`.
pub fn decrypt_open_data(
    session_key: &Secret,
    encrypted_data: &str,
    iv: &str,
    appid: &str,
) -> Result<serde_json::Map<String, serde_json::Value>, OpenDataError> {
    let key = block16(session_key.expose())?;
    let iv = block16(iv)?;
    let mut buffer = STANDARD
        .decode(encrypted_data)
        .map_err(|_| OpenDataError::Malformed)?;
    let plaintext = Decryptor::new(&key.into(), &iv.into())
        .decrypt_padded_mut::<Pkcs7>(&mut buffer)
        .map_err(|_| OpenDataError::Undecryptable)?;
    let mut object: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(plaintext).map_err(|_| OpenDataError::Undecryptable)?;
    let watermark_appid = object
        .get("watermark")
        .and_then(|watermark| watermark.get("appid"))
        .and_then(serde_json::Value::as_str);
    if watermark_appid != Some(appid) {
        return Err(OpenDataError::ForeignWatermark);
    }
    object.remove("watermark");
    Ok(object)
}

/// Seals `plaintext` the way WeChat seals open data, with a fresh random iv: what the mock
/// WeChat hands out. Returns (encryptedData, iv), both base64.
pub fn encrypt_open_data(
    session_key: &Secret,
    plaintext: &[u8],
) -> Result<(String, String), OpenDataError> {
    let key = block16(session_key.expose())?;
    let mut iv = [0u8; 16];
    rand::rngs::OsRng.fill_bytes(&mut iv);
    let sealed = Encryptor::new(&key.into(), &iv.into()).encrypt_padded_vec_mut::<Pkcs7>(plaintext);
    Ok((STANDARD.encode(sealed), STANDARD.encode(iv)))
}

/// `signature == hex(sha1(rawData + session_key))`, compared in constant time so that timing
/// tells nothing about how much of a forged signature was right.
pub fn signature_matches(raw_data: &str, session_key: &Secret, signature: &str) -> bool {
    let mut hasher = Sha1::new();
    hasher.update(raw_data.as_bytes());
    hasher.update(session_key.expose().as_bytes());
    let expected = hex::encode(hasher.finalize());
    expected
        .as_bytes()
        .ct_eq(signature.to_ascii_lowercase().as_bytes())
        .into()
}
