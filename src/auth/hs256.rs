//! HS256 tokens checked on the upgrade path without jsonwebtoken's general decoder.
//!
//! Every authenticated upgrade checks one token. jsonwebtoken's `decode` parses the header
//! twice (three times with the parse that picks the key), the claims twice, and keys a new
//! HMAC for every token: about a fifth of a shard's CPU per connect in a profile of a connect
//! storm (docs/performance.md). Here the HMAC is keyed once, the header and the claims are
//! parsed once each, and the claims go through the rules of jsonwebtoken's `validate` as
//! [`super::Authenticator`] configures them: `sub` and `exp` required, `exp`/`nbf` with the
//! leeway, `aud`/`iss` required and matched only when configured. A differential test
//! (`auth::tests`) holds this and jsonwebtoken to the same answer on a corpus of good and
//! bad tokens. RS256 / ES256 (JWKS) still go through jsonwebtoken.
//!
//! Differences, each about a token only the secret's holder can sign (an independent review
//! found them; the first is on purpose, the others are how serde_json reads claims nobody
//! checks):
//! - The header is read for `alg` and `kid` only: another field of the wrong JSON type
//!   (`"typ": 5`), given twice, or not UTF-8 passes here where jsonwebtoken refuses.
//! - `aud` / `iss` are read only when a rule wants them. Where none does, one holding bytes
//!   that are not UTF-8 is refused here (jsonwebtoken lets it by), and one holding a lone
//!   surrogate escape (`"\udc00"`) passes here (jsonwebtoken refuses).
//!
//! Header and claims must be JSON objects, as there.

use std::borrow::Cow;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use hmac::{Hmac, Mac};
use serde::Deserialize;
use serde_json::value::RawValue;
use sha2::Sha256;

use super::{AuthError, Claims};

/// What picks a token's key: its header's `alg` (RS256 / ES256 headers are then read whole by
/// jsonwebtoken, `kid` included).
#[derive(Deserialize)]
pub struct JoseHeader<'a> {
    #[serde(borrow)]
    pub alg: Cow<'a, str>,
    /// Not used for HS256, but a `kid` that is not a string is refused, as by jsonwebtoken.
    #[serde(rename = "kid", borrow, default)]
    _kid: Option<Cow<'a, str>>,
}

/// The header of `token` (its part before the first `.`), base64url without padding.
pub fn read_header(token: &str) -> Result<JoseHeaderBuf, AuthError> {
    let (header, _) = token
        .split_once('.')
        .ok_or_else(|| AuthError::Invalid("bad header: not a JWT".into()))?;
    let bytes = URL_SAFE_NO_PAD
        .decode(header)
        .map_err(|e| AuthError::Invalid(format!("bad header: {e}")))?;
    Ok(JoseHeaderBuf(bytes))
}

/// A decoded header's JSON, parsed by [`JoseHeaderBuf::parse`] (which borrows from it).
pub struct JoseHeaderBuf(Vec<u8>);

impl JoseHeaderBuf {
    pub fn parse(&self) -> Result<JoseHeader<'_>, AuthError> {
        object(&self.0).map_err(|e| AuthError::Invalid(format!("bad header: {e}")))
    }
}

/// A JSON object into `T` (serde would also fill a struct from an array, by position; a JOSE
/// header and a JWT's claims are objects only).
fn object<'a, T: Deserialize<'a>>(json: &'a [u8]) -> Result<T, String> {
    if json.trim_ascii_start().first() != Some(&b'{') {
        return Err("not a JSON object".into());
    }
    serde_json::from_slice(json).map_err(|e| e.to_string())
}

/// The claim rules besides `sub` and `exp` (always required).
#[derive(Debug, Clone, Default)]
pub struct ClaimRules {
    /// Seconds of clock skew on `exp` and `nbf`.
    pub leeway: u64,
    /// `aud` must be present and name this (or, as a list, include it).
    pub audience: Option<String>,
    /// `iss` must be present and be this (or, as a list, include it).
    pub issuer: Option<String>,
}

/// The claims as a token carries them. `aud` and `iss` stay raw JSON: they are read only when
/// a rule asks for them, so a token with an `aud` of another type passes where no audience is
/// configured, as with jsonwebtoken.
#[derive(Deserialize)]
struct Payload<'a> {
    sub: Option<String>,
    exp: Option<u64>,
    /// Kept as given, `null` too (a `null` nbf refuses the token, as with jsonwebtoken).
    #[serde(borrow, default, deserialize_with = "crate::proto::present")]
    nbf: Option<&'a RawValue>,
    #[serde(borrow)]
    aud: Option<&'a RawValue>,
    #[serde(borrow)]
    iss: Option<&'a RawValue>,
    rooms: Option<Vec<String>>,
}

/// `aud` and `iss`: one string or a list of them.
#[derive(Deserialize)]
#[serde(untagged)]
enum OneOrMany<'a> {
    One(#[serde(borrow)] Cow<'a, str>),
    Many(Vec<Cow<'a, str>>),
}

impl OneOrMany<'_> {
    fn names(&self, wanted: &str) -> bool {
        match self {
            OneOrMany::One(one) => one == wanted,
            OneOrMany::Many(many) => many.iter().any(|n| n == wanted),
        }
    }
}

/// A claim a rule wants: present and of the right type, else the token is refused.
fn required<'a>(raw: Option<&'a RawValue>, name: &str) -> Result<OneOrMany<'a>, AuthError> {
    raw.and_then(|raw| serde_json::from_str(raw.get()).ok())
        .ok_or_else(|| AuthError::Invalid(format!("Missing required claim: {name}")))
}

/// `nbf` as jsonwebtoken reads it: a whole number, or a finite non-negative one rounded;
/// anything else (`null` included) refuses the token.
fn numeric(raw: &RawValue, name: &str) -> Result<u64, AuthError> {
    let bad = || AuthError::Invalid(format!("{name} is not a number of seconds"));
    let n: serde_json::Number = serde_json::from_str(raw.get()).map_err(|_| bad())?;
    if let Some(n) = n.as_u64() {
        return Ok(n);
    }
    match n.as_f64() {
        Some(f) if f.is_finite() && f >= 0.0 && f < u64::MAX as f64 => Ok(f.round() as u64),
        _ => Err(bad()),
    }
}

/// The secret, keyed into an HMAC once.
pub struct Hs256Key {
    mac: Hmac<Sha256>,
}

impl Hs256Key {
    pub fn new(secret: &[u8]) -> Self {
        Hs256Key {
            mac: Hmac::new_from_slice(secret).expect("HMAC takes a key of any length"),
        }
    }

    /// Check `token` (its header already read as HS256): the signature over its first two
    /// parts, then its claims against `rules` at `now` (Unix seconds).
    pub fn verify(&self, token: &str, rules: &ClaimRules, now: u64) -> Result<Claims, AuthError> {
        let invalid = |what: &str| AuthError::Invalid(what.to_string());
        let mut parts = token.split('.');
        let (Some(header), Some(payload), Some(signature), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(invalid("not a JWT (three parts)"));
        };
        let message = &token[..header.len() + 1 + payload.len()];
        let signature = URL_SAFE_NO_PAD
            .decode(signature)
            .map_err(|e| AuthError::Invalid(e.to_string()))?;
        let mut mac = self.mac.clone();
        mac.update(message.as_bytes());
        // Constant time.
        mac.verify_slice(&signature)
            .map_err(|_| invalid("InvalidSignature"))?;
        let payload = URL_SAFE_NO_PAD
            .decode(payload)
            .map_err(|e| AuthError::Invalid(e.to_string()))?;
        let claims: Payload = object(&payload).map_err(AuthError::Invalid)?;
        // In jsonwebtoken's order: required claims, `exp`, `nbf`, `iss`, `aud`.
        let nbf = claims.nbf.map(|raw| numeric(raw, "nbf")).transpose()?;
        let sub = claims
            .sub
            .ok_or_else(|| invalid("Missing required claim: sub"))?;
        let exp = claims
            .exp
            .ok_or_else(|| invalid("Missing required claim: exp"))?;
        let audience = match &rules.audience {
            Some(wanted) => Some((wanted, required(claims.aud, "aud")?)),
            None => None,
        };
        let issuer = match &rules.issuer {
            Some(wanted) => Some((wanted, required(claims.iss, "iss")?)),
            None => None,
        };
        if exp < now.saturating_sub(rules.leeway) {
            return Err(AuthError::Expired);
        }
        if nbf.is_some_and(|nbf| nbf > now + rules.leeway) {
            return Err(AuthError::NotYetValid);
        }
        if issuer.is_some_and(|(wanted, iss)| !iss.names(wanted)) {
            return Err(invalid("InvalidIssuer"));
        }
        if audience.is_some_and(|(wanted, aud)| !aud.names(wanted)) {
            return Err(invalid("InvalidAudience"));
        }
        Ok(Claims {
            sub,
            exp,
            rooms: claims.rooms,
        })
    }
}
