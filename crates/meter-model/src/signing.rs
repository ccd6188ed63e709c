//! Event signatures: how an agent proves the agent id it claims.
//!
//! Each agent holds a secret key, known to the processor under a key id.
//! It signs every record it sends with HMAC-SHA256 over the record's value
//! exactly as sent (framing header and Avro body), and puts the signature in
//! the Kafka header [`HEADER`]:
//!
//! ```text
//! meterline-signature: v1:<key id>:<64 lowercase hex digits of HMAC-SHA256(secret, value)>
//! ```
//!
//! The processor looks the key id up among the keys of the event's
//! `agent_id` (two at once during a rotation) and dead-letters an event
//! whose signature is missing, malformed or wrong as `bad_signature`.
//! Key files hold `key_id:secret_hex` (the agent's) or a TOML table of an
//! agent's keys (the processor's): see `docs/operations.md`.

use hmac::{Hmac, Mac};
use sha2::Sha256;

/// The Kafka header that carries an event's signature.
pub const HEADER: &str = "meterline-signature";

/// The version prefix of the header's value.
const VERSION: &str = "v1";

/// A secret shorter than this is refused: 128 bits.
pub const MIN_SECRET_BYTES: usize = 16;

type HmacSha256 = Hmac<Sha256>;

/// A signing key: its id (named in every signature) and its secret.
#[derive(Clone)]
pub struct Key {
    pub id: String,
    secret: Vec<u8>,
    /// HMAC keyed with the secret, its inner and outer pads hashed once:
    /// each signature then costs only the hashing of the value.
    keyed: HmacSha256,
}

impl PartialEq for Key {
    fn eq(&self, other: &Self) -> bool {
        self.id == other.id && self.secret == other.secret
    }
}

impl Eq for Key {}

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the secret: keys end up in logs through Debug.
        f.debug_struct("Key").field("id", &self.id).finish_non_exhaustive()
    }
}

/// Why a key or a signature was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SigningError {
    #[error("key id {0:?} must be 1..=64 characters of [A-Za-z0-9._-]")]
    BadKeyId(String),
    #[error("the secret of key {0:?} is not hex")]
    NotHex(String),
    #[error("the secret of key {id:?} has {bytes} bytes, at least {MIN_SECRET_BYTES} are required")]
    ShortSecret { id: String, bytes: usize },
    #[error("expected `key_id:secret_hex`")]
    NotAKeyLine,
}

impl Key {
    /// A key from its id and its secret in hex.
    pub fn new(id: &str, secret_hex: &str) -> Result<Self, SigningError> {
        let ok_id = !id.is_empty() && id.len() <= 64 && id.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
        if !ok_id {
            return Err(SigningError::BadKeyId(id.to_owned()));
        }
        let secret = from_hex(secret_hex.trim()).ok_or_else(|| SigningError::NotHex(id.to_owned()))?;
        if secret.len() < MIN_SECRET_BYTES {
            return Err(SigningError::ShortSecret { id: id.to_owned(), bytes: secret.len() });
        }
        Ok(Key::keyed(id, secret))
    }

    fn keyed(id: &str, secret: Vec<u8>) -> Self {
        // HMAC takes keys of any length: this cannot fail.
        let keyed = HmacSha256::new_from_slice(&secret).unwrap_or_else(|_| unreachable!("HMAC accepts any key length"));
        Key { id: id.to_owned(), secret, keyed }
    }

    /// A key from the agent's form, `key_id:secret_hex` (surrounding white
    /// space ignored: key files end with a newline).
    pub fn parse(line: &str) -> Result<Self, SigningError> {
        let (id, secret) = line.trim().split_once(':').ok_or(SigningError::NotAKeyLine)?;
        Key::new(id, secret)
    }

    fn mac(&self, value: &[u8]) -> HmacSha256 {
        let mut mac = self.keyed.clone();
        mac.update(value);
        mac
    }

    /// The header value that signs `value`.
    pub fn sign(&self, value: &[u8]) -> String {
        let tag = self.mac(value).finalize().into_bytes();
        let mut out = String::with_capacity(VERSION.len() + self.id.len() + 2 + 64);
        out.push_str(VERSION);
        out.push(':');
        out.push_str(&self.id);
        out.push(':');
        push_hex(&mut out, &tag);
        out
    }

    /// Whether `tag` (the MAC of a parsed header) is this key's MAC of
    /// `value`, compared in constant time.
    pub fn verify(&self, value: &[u8], tag: &[u8; 32]) -> bool {
        self.mac(value).verify_slice(tag).is_ok()
    }
}

/// A header value taken apart: the key id and the MAC.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Signature<'a> {
    pub key_id: &'a str,
    pub tag: [u8; 32],
}

impl<'a> Signature<'a> {
    /// Parses a [`HEADER`] value; `None` when it is not `v1:<id>:<64 hex>`.
    pub fn parse(header: &'a [u8]) -> Option<Self> {
        let s = std::str::from_utf8(header).ok()?;
        let rest = s.strip_prefix(VERSION)?.strip_prefix(':')?;
        let (key_id, hex) = rest.rsplit_once(':')?;
        if key_id.is_empty() || hex.len() != 64 {
            return None;
        }
        let bytes = from_hex(hex)?;
        let mut tag = [0u8; 32];
        tag.copy_from_slice(&bytes);
        Some(Signature { key_id, tag })
    }
}

const HEX: &[u8; 16] = b"0123456789abcdef";

/// `bytes` as lowercase hex.
pub fn to_hex(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(2 * bytes.len());
    push_hex(&mut out, bytes);
    out
}

fn push_hex(out: &mut String, bytes: &[u8]) {
    for b in bytes {
        out.push(char::from(HEX[usize::from(b >> 4)]));
        out.push(char::from(HEX[usize::from(b & 15)]));
    }
}

/// Hex digits (either case) to bytes; `None` for an odd length or a
/// non-hex character.
pub fn from_hex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    let digit = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    };
    s.as_bytes().chunks(2).map(|p| Some(digit(p[0])? << 4 | digit(p[1])?)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 4231 test case 2 ("Jefe"), a key shorter than the minimum, so
    /// built directly: the MAC must be the standard HMAC-SHA256.
    #[test]
    fn the_mac_is_standard_hmac_sha256() {
        let key = Key::keyed("k", b"Jefe".to_vec());
        let header = key.sign(b"what do ya want for nothing?");
        assert_eq!(header, "v1:k:5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843");
    }

    #[test]
    fn a_signature_verifies_only_with_its_key_and_value() {
        let key = Key::parse("agent-a.2026-12:00112233445566778899aabbccddeeff\n").unwrap();
        let other = Key::new("agent-a.2026-12", "ffeeddccbbaa99887766554433221100").unwrap();
        let header = key.sign(b"payload");
        let sig = Signature::parse(header.as_bytes()).unwrap();
        assert_eq!(sig.key_id, "agent-a.2026-12");
        assert!(key.verify(b"payload", &sig.tag));
        assert!(!key.verify(b"payloae", &sig.tag));
        assert!(!other.verify(b"payload", &sig.tag));
    }

    #[test]
    fn malformed_keys_and_headers_are_refused() {
        assert_eq!(Key::parse("nocolon"), Err(SigningError::NotAKeyLine));
        assert_eq!(Key::new("a b", "00112233445566778899aabbccddeeff"), Err(SigningError::BadKeyId("a b".into())));
        assert_eq!(Key::new("k", "0011zz"), Err(SigningError::NotHex("k".into())));
        assert_eq!(Key::new("k", "0011"), Err(SigningError::ShortSecret { id: "k".into(), bytes: 2 }));
        for bad in ["", "v1", "v2:k:00", "v1::00", "v1:k:0011", &format!("v1:k:{}", "g".repeat(64))] {
            assert_eq!(Signature::parse(bad.as_bytes()), None, "{bad}");
        }
        assert!(!format!("{:?}", Key::new("k", "00112233445566778899aabbccddeeff").unwrap()).contains("0011"));
    }
}
