//! Open data (`encryptedData`) as an attacker can send it: any session_key, iv, ciphertext and
//! appid, as text or as bytes. Decryption must never panic, must answer `Malformed` for input of
//! the wrong shape, and data sealed with a key must open with it exactly when its watermark
//! names the app.

#![no_main]

use arbitrary::Arbitrary;
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use libfuzzer_sys::fuzz_target;
use serde_json::{Map, Value};
use wxgate::config::Secret;
use wxgate::wechat::crypto::{OpenDataError, SealedData, decrypt_open_data, encrypt_open_data};

#[derive(Arbitrary, Debug)]
enum Case<'a> {
    /// The strings of a request body as sent: base64 or not.
    Text {
        session_key: &'a str,
        encrypted_data: &'a str,
        iv: &'a str,
        appid: &'a str,
    },
    /// Any bytes, well-formed base64 of them.
    Bytes {
        session_key: &'a [u8],
        encrypted_data: &'a [u8],
        iv: &'a [u8],
        appid: &'a str,
    },
    /// A plaintext sealed the way WeChat seals it, then opened for `appid`.
    Sealed {
        session_key: [u8; 16],
        plaintext: &'a [u8],
        appid: &'a str,
    },
    /// A JSON object with a watermark, which random bytes seldom make, sealed and opened.
    Watermarked {
        session_key: [u8; 16],
        fields: Vec<(&'a str, &'a str)>,
        watermark_appid: Option<&'a str>,
        appid: &'a str,
    },
}

fuzz_target!(|case: Case<'_>| match case {
    Case::Text {
        session_key,
        encrypted_data,
        iv,
        appid,
    } => open(session_key, encrypted_data, iv, appid),
    Case::Bytes {
        session_key,
        encrypted_data,
        iv,
        appid,
    } => open(
        &STANDARD.encode(session_key),
        &STANDARD.encode(encrypted_data),
        &STANDARD.encode(iv),
        appid,
    ),
    Case::Sealed {
        session_key,
        plaintext,
        appid,
    } => {
        let opened = seal_and_open(session_key, plaintext, appid);
        assert_eq!(opened, expected(plaintext, appid));
    }
    Case::Watermarked {
        session_key,
        fields,
        watermark_appid,
        appid,
    } => {
        let mut object: Map<String, Value> = fields
            .into_iter()
            .map(|(name, value)| (name.to_string(), Value::from(value)))
            .collect();
        object.insert(
            "watermark".into(),
            serde_json::json!({ "appid": watermark_appid, "timestamp": 1 }),
        );
        let plaintext = Value::Object(object.clone()).to_string();
        let opened = seal_and_open(session_key, plaintext.as_bytes(), appid);
        if watermark_appid == Some(appid) {
            object.remove("watermark");
            assert_eq!(opened, Ok(object));
        } else {
            assert_eq!(opened, Err(OpenDataError::ForeignWatermark));
        }
    }
});

fn seal_and_open(
    session_key: [u8; 16],
    plaintext: &[u8],
    appid: &str,
) -> Result<Map<String, Value>, OpenDataError> {
    let key = Secret::new(STANDARD.encode(session_key));
    let (encrypted_data, iv) =
        encrypt_open_data(&key, plaintext).expect("a 16-byte key always seals");
    decrypt_open_data(&key, &encrypted_data, &iv, appid)
}

fn open(session_key: &str, encrypted_data: &str, iv: &str, appid: &str) {
    let opened = decrypt_open_data(&Secret::new(session_key), encrypted_data, iv, appid);
    // Whatever the key, data of the wrong shape is refused as such, before any decryption.
    if SealedData::parse(encrypted_data, iv).is_err() {
        assert_eq!(opened, Err(OpenDataError::Malformed));
    }
    if let Ok(object) = opened {
        assert!(!object.contains_key("watermark"));
    }
}

/// What opening `plaintext` for `appid` must give, from the rules alone.
fn expected(plaintext: &[u8], appid: &str) -> Result<Map<String, Value>, OpenDataError> {
    let mut object: Map<String, Value> =
        serde_json::from_slice(plaintext).map_err(|_| OpenDataError::Undecryptable)?;
    let watermark_appid = object
        .get("watermark")
        .and_then(|watermark| watermark.get("appid"))
        .and_then(Value::as_str);
    if watermark_appid != Some(appid) {
        return Err(OpenDataError::ForeignWatermark);
    }
    object.remove("watermark");
    Ok(object)
}
