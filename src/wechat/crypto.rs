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
    /// Bad base64, a key or iv that is not 16 bytes, or a ciphertext that is empty or not a
    /// whole number of AES blocks.
    Malformed,
    /// Padding or JSON failed: most often the wrong session_key.
    Undecryptable,
    /// Decrypted, but `watermark.appid` is missing or names another app.
    ForeignWatermark,
}

/// AES's block size: the iv is one block, a ciphertext whole blocks.
const BLOCK: usize = 16;

fn block16(text: &str) -> Result<[u8; BLOCK], OpenDataError> {
    let bytes = STANDARD
        .decode(text)
        .map_err(|_| OpenDataError::Malformed)?;
    bytes.try_into().map_err(|_| OpenDataError::Malformed)
}

/// `encryptedData` and `iv` whose shape is right: base64, an iv of one block, a ciphertext of
/// one or more whole blocks. That much needs no key, so input that no key could decrypt is
/// refused before one is looked up.
pub struct SealedData {
    ciphertext: Vec<u8>,
    iv: [u8; BLOCK],
}

impl SealedData {
    pub fn parse(encrypted_data: &str, iv: &str) -> Result<SealedData, OpenDataError> {
        let iv = block16(iv)?;
        let ciphertext = STANDARD
            .decode(encrypted_data)
            .map_err(|_| OpenDataError::Malformed)?;
        if ciphertext.is_empty() || ciphertext.len() % BLOCK != 0 {
            return Err(OpenDataError::Malformed);
        }
        Ok(SealedData { ciphertext, iv })
    }

    /// Decrypts and checks the watermark; returns the object without its `watermark`. A
    /// session_key that is not 16 bytes of base64 is `Malformed`.
    pub fn open(
        &self,
        session_key: &Secret,
        appid: &str,
    ) -> Result<serde_json::Map<String, serde_json::Value>, OpenDataError> {
        let key = block16(session_key.expose())?;
        let plaintext = Decryptor::new(&key.into(), &self.iv.into())
            .decrypt_padded_vec_mut::<Pkcs7>(&self.ciphertext)
            .map_err(|_| OpenDataError::Undecryptable)?;
        let mut object: serde_json::Map<String, serde_json::Value> =
            serde_json::from_slice(&plaintext).map_err(|_| OpenDataError::Undecryptable)?;
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
}

/// [`SealedData::parse`], then [`SealedData::open`].
pub fn decrypt_open_data(
    session_key: &Secret,
    encrypted_data: &str,
    iv: &str,
    appid: &str,
) -> Result<serde_json::Map<String, serde_json::Value>, OpenDataError> {
    SealedData::parse(encrypted_data, iv)?.open(session_key, appid)
}

/// Seals `plaintext` the way WeChat seals open data, with a fresh random iv: what the mock
/// WeChat hands out. Returns (encryptedData, iv), both base64.
pub fn encrypt_open_data(
    session_key: &Secret,
    plaintext: &[u8],
) -> Result<(String, String), OpenDataError> {
    let key = block16(session_key.expose())?;
    let mut iv = [0u8; BLOCK];
    rand::rngs::OsRng.fill_bytes(&mut iv);
    let sealed = Encryptor::new(&key.into(), &iv.into()).encrypt_padded_vec_mut::<Pkcs7>(plaintext);
    Ok((STANDARD.encode(sealed), STANDARD.encode(iv)))
}

/// `rawData`'s signature as WeChat computes it: hex(sha1(rawData + session_key)).
pub fn sign_raw_data(raw_data: &str, session_key: &Secret) -> String {
    let mut hasher = Sha1::new();
    hasher.update(raw_data.as_bytes());
    hasher.update(session_key.expose().as_bytes());
    hex::encode(hasher.finalize())
}

/// `signature == hex(sha1(rawData + session_key))`, compared in constant time so that timing
/// tells nothing about how much of a forged signature was right.
pub fn signature_matches(raw_data: &str, session_key: &Secret, signature: &str) -> bool {
    sign_raw_data(raw_data, session_key)
        .as_bytes()
        .ct_eq(signature.to_ascii_lowercase().as_bytes())
        .into()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// WeChat's published sample (the open-data docs and every SDK's tests).
    const SAMPLE_APPID: &str = "wx4f4bc4dec97d474b";
    const SAMPLE_SESSION_KEY: &str = "tiihtNczf5v6AKRyjwEUhQ==";
    const SAMPLE_IV: &str = "r7BXXKkLb8qrSNn05n0qiA==";
    const SAMPLE_ENCRYPTED_DATA: &str = concat!(
        "CiyLU1Aw2KjvrjMdj8YKliAjtP4gsMZMQmRzooG2xrDcvSnxIMXFufNstNGTyaGS9uT5geRa0W4oTOb1WT7fJlAC",
        "+oNPdbB+3hVbJSRgv+4lGOETKUQz6OYStslQ142dNCuabNPGBzlooOmB231qMM85d2/fV6ChevvXvQP8Hkue1po",
        "OFtnEtpyxVLW1zAo6/1Xx1COxFvrc2d7UL/lmHInNlxuacJXwu0fjpXfz/YqYzBIBzD6WUfTIF9GRHpOn/Hz7saL",
        "8xz+W//FRAUid1OksQaQx4CMs8LOddcQhULW4ucetDf96JcR3g0gfRK4PC7E/r7Z6xNrXd2UIeorGj5Ef7b1pJAY",
        "B6Y5anaHqZ9J6nKEBvB4DnNLIVWSgARns/8wR2SiRS7MNACwTyrGvt9ts8p12PKFdlqYTopNHR1Vf7XjfhQlVsAJ",
        "dNiKdYmYVoKlaRv85IfVunYzO0IKXsyl7JCUjCpoG20f0a04COwfneQAGGwd5oa+T8yO5hzuyDb/XcxxmK01EpqO",
        "yuxINew==",
    );

    /// WeChat's published `rawData` signature sample.
    const SIGNATURE_SESSION_KEY: &str = "HyVFkGl5F5OQWJZZaNzBBg==";
    const SIGNATURE_RAW_DATA: &str = r#"{"nickName":"Band","gender":1,"language":"zh_CN","city":"Guangzhou","province":"Guangdong","country":"CN","avatarUrl":"http://wx.qlogo.cn/mmopen/vi_32/1vZvI39NWFQ9XM4LtQpFrQJ1xlgZxx3w7bQxKARol6503Iuswjjn6nIGBiaycAjAtpujxyzYsrztuuICqIM5ibXQ/0"}"#;
    const SIGNATURE: &str = "75e81ceda165f4ffa64f4068af58c64b8f54b88c";

    fn sample_key() -> Secret {
        Secret::new(SAMPLE_SESSION_KEY)
    }

    #[test]
    fn the_official_sample_decrypts_to_band_without_its_watermark() {
        let user = decrypt_open_data(
            &sample_key(),
            SAMPLE_ENCRYPTED_DATA,
            SAMPLE_IV,
            SAMPLE_APPID,
        )
        .unwrap();
        assert_eq!(user["nickName"], "Band");
        assert_eq!(user["openId"], "oGZUI0egBJY1zhBYw2KhdUfwVJJE");
        assert_eq!(user["city"], "Guangzhou");
        assert!(!user.contains_key("watermark"));
    }

    #[test]
    fn the_official_sample_is_foreign_to_another_app() {
        let err = decrypt_open_data(
            &sample_key(),
            SAMPLE_ENCRYPTED_DATA,
            SAMPLE_IV,
            "wx0000000000000000",
        )
        .unwrap_err();
        assert_eq!(err, OpenDataError::ForeignWatermark);
    }

    #[test]
    fn tampered_ciphertext_is_refused() {
        let sealed = STANDARD.decode(SAMPLE_ENCRYPTED_DATA).unwrap();
        // The last block decrypts to noise, padding included.
        let mut tampered = sealed.clone();
        let last = tampered.len() - 1;
        tampered[last] ^= 0x01;
        let err = decrypt_open_data(
            &sample_key(),
            &STANDARD.encode(&tampered),
            SAMPLE_IV,
            SAMPLE_APPID,
        )
        .unwrap_err();
        assert!(
            matches!(
                err,
                OpenDataError::Undecryptable | OpenDataError::ForeignWatermark
            ),
            "{err:?}"
        );
        let cut = STANDARD.encode(&sealed[..sealed.len() - 1]);
        assert_eq!(
            decrypt_open_data(&sample_key(), &cut, SAMPLE_IV, SAMPLE_APPID),
            Err(OpenDataError::Malformed),
            "not a whole number of blocks: no key could decrypt it"
        );
    }

    #[test]
    fn another_session_key_cannot_decrypt() {
        let other = Secret::new(STANDARD.encode([7u8; 16]));
        assert_eq!(
            decrypt_open_data(&other, SAMPLE_ENCRYPTED_DATA, SAMPLE_IV, SAMPLE_APPID),
            Err(OpenDataError::Undecryptable)
        );
    }

    #[test]
    fn bad_base64_and_wrong_lengths_are_malformed() {
        let short_key = Secret::new(STANDARD.encode([1u8; 15]));
        let long_iv = STANDARD.encode([1u8; 17]);
        let short_data = STANDARD.encode([1u8; 15]);
        let long_data = STANDARD.encode([1u8; 33]);
        let cases = [
            (Secret::new("not base64!"), SAMPLE_ENCRYPTED_DATA, SAMPLE_IV),
            (short_key, SAMPLE_ENCRYPTED_DATA, SAMPLE_IV),
            (sample_key(), SAMPLE_ENCRYPTED_DATA, long_iv.as_str()),
            (
                sample_key(),
                SAMPLE_ENCRYPTED_DATA,
                "r7BXXKkLb8qrSNn05n0qiA",
            ),
            (sample_key(), "CiyLU1Aw*", SAMPLE_IV),
            (sample_key(), "", SAMPLE_IV),
            (sample_key(), &short_data, SAMPLE_IV),
            (sample_key(), &long_data, SAMPLE_IV),
        ];
        for (key, data, iv) in &cases {
            assert_eq!(
                decrypt_open_data(key, data, iv, SAMPLE_APPID),
                Err(OpenDataError::Malformed),
                "{data:.10} {iv}"
            );
            if key.expose() == SAMPLE_SESSION_KEY {
                assert!(SealedData::parse(data, iv).is_err(), "{data:.10} {iv}");
            }
        }
    }

    #[test]
    fn sealed_data_round_trips_with_a_fresh_iv_each_time() {
        let key = Secret::new(STANDARD.encode([9u8; 16]));
        let plaintext = serde_json::json!({
            "stepInfoList": [{"timestamp": 1, "step": 42}],
            "watermark": {"appid": SAMPLE_APPID, "timestamp": 1},
        })
        .to_string();
        let (first, first_iv) = encrypt_open_data(&key, plaintext.as_bytes()).unwrap();
        let (second, second_iv) = encrypt_open_data(&key, plaintext.as_bytes()).unwrap();
        assert_ne!(first_iv, second_iv);
        assert_ne!(first, second);
        for (data, iv) in [(first, first_iv), (second, second_iv)] {
            let opened = decrypt_open_data(&key, &data, &iv, SAMPLE_APPID).unwrap();
            assert_eq!(
                serde_json::Value::Object(opened),
                serde_json::json!({"stepInfoList": [{"timestamp": 1, "step": 42}]})
            );
        }
        assert_eq!(
            encrypt_open_data(&Secret::new("c2hvcnQ="), b"{}"),
            Err(OpenDataError::Malformed)
        );
    }

    #[test]
    fn decrypted_data_must_be_an_object_with_this_apps_watermark() {
        let key = Secret::new(STANDARD.encode([3u8; 16]));
        let open = |plaintext: &str| {
            let (data, iv) = encrypt_open_data(&key, plaintext.as_bytes()).unwrap();
            decrypt_open_data(&key, &data, &iv, SAMPLE_APPID)
        };
        assert_eq!(open("[1, 2]"), Err(OpenDataError::Undecryptable));
        assert_eq!(open("not json"), Err(OpenDataError::Undecryptable));
        assert_eq!(
            open(r#"{"nickName": "Band"}"#),
            Err(OpenDataError::ForeignWatermark)
        );
        assert_eq!(
            open(r#"{"watermark": {"timestamp": 1}}"#),
            Err(OpenDataError::ForeignWatermark)
        );
        assert_eq!(
            open(r#"{"watermark": {"appid": 7}}"#),
            Err(OpenDataError::ForeignWatermark)
        );
    }

    #[test]
    fn the_official_signature_sample_matches() {
        let key = Secret::new(SIGNATURE_SESSION_KEY);
        assert!(signature_matches(SIGNATURE_RAW_DATA, &key, SIGNATURE));
        assert!(signature_matches(
            SIGNATURE_RAW_DATA,
            &key,
            &SIGNATURE.to_ascii_uppercase()
        ));
    }

    #[test]
    fn a_changed_raw_data_key_or_signature_does_not_match() {
        let key = Secret::new(SIGNATURE_SESSION_KEY);
        let tampered = SIGNATURE_RAW_DATA.replace("Band", "Bond");
        assert!(!signature_matches(&tampered, &key, SIGNATURE));
        assert!(!signature_matches(
            SIGNATURE_RAW_DATA,
            &sample_key(),
            SIGNATURE
        ));
        for signature in [
            "",
            &SIGNATURE[..39],
            "75e81ceda165f4ffa64f4068af58c64b8f54b88d",
        ] {
            assert!(
                !signature_matches(SIGNATURE_RAW_DATA, &key, signature),
                "{signature}"
            );
        }
    }
}
