//! Client authentication: JWT verification (HS256 with `jwt_secret`; RS256 / ES256 with the
//! keys of `jwks_url`, see [`jwks`]), HS256 minting, and the loopback-only dev mode.
//!
//! Owns no state beyond the HS256 key and a handle on the shared JWKS key set. The upgrade
//! path calls [`Authenticator::authenticate`] once per handshake; nothing here runs per
//! message, and nothing here waits on the network.
//!
//! Which key verifies a token is decided by the token's `alg` alone, each alg with one kind of
//! key: HS256 only ever with the secret, RS256 only with an RSA key of the JWKS and ES256 only
//! with a P-256 key, found by `kid`. An alg with no key configured is refused, and so are
//! `none` and every other alg: an HS256 token "signed" with a public key never meets that key.

mod hs256;
pub mod jwks;

use std::time::{SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};

use hs256::{ClaimRules, Hs256Key};
use serde::{Deserialize, Serialize};

/// Clock skew tolerated on `exp` and `nbf`, in seconds. Small: an expired token must be
/// refused, and so must one that is not valid yet.
pub const EXP_LEEWAY_S: u64 = 5;
/// Longest user or device id accepted (bytes): ids are copied into every message header.
pub const MAX_ID_LEN: usize = 128;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Claims {
    pub sub: String,
    pub exp: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rooms: Option<Vec<String>>,
}

/// Who a connection belongs to, once authenticated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// Inline up to 24 bytes: typical ids cost no allocation per connection.
    pub user: compact_str::CompactString,
    /// Rooms the user may join; `None` = any (`*`). Used by rooms (later issue).
    pub rooms: Option<Vec<Box<str>>>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("missing token")]
    Missing,
    #[error("invalid token: {0}")]
    Invalid(String),
    #[error("token expired")]
    Expired,
    /// Signed with a key the JWKS does not hold (yet): it is being refetched, so the same
    /// token may pass in a moment (a key rotation at the identity provider).
    #[error("invalid token: unknown kid (the key set is refetched; retry later)")]
    UnknownKid,
    #[error("token not valid yet (nbf)")]
    NotYetValid,
    #[error("invalid user id")]
    BadUser,
    #[error("user ids starting with '@' are the gateway's own (e.g. @backend)")]
    Reserved,
}

/// The `WWW-Authenticate` of a 401 (RFC 9110 section 11.6.1) when no credentials came: the
/// gateway takes bearer tokens (RFC 6750), a JWT on /ws and the API key on the admin API.
pub const BEARER_CHALLENGE: &str = "Bearer";
/// The `WWW-Authenticate` of a 401 for credentials that came and were refused (RFC 6750
/// section 3.1).
pub const BEARER_INVALID_TOKEN: &str = "Bearer error=\"invalid_token\"";

/// The credentials of an `Authorization: Bearer <credentials>` value: the scheme's name is
/// case-insensitive (RFC 9110 section 11.1), so `BEARER x` is a bearer token too.
pub fn bearer_credentials(value: &str) -> Option<&str> {
    let (scheme, rest) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| rest.trim_start_matches(' '))
}

/// Ids the gateway sends as itself start with this (`@backend` for `POST /api/send`); no client
/// may connect as one, so no client can speak for the backend.
pub const RESERVED_PREFIX: char = '@';

/// A user id a client may connect as: a valid id outside the gateway's reserved ones.
pub fn client_user(user: &str) -> Result<(), AuthError> {
    valid_id(user)?;
    if user.starts_with(RESERVED_PREFIX) {
        return Err(AuthError::Reserved);
    }
    Ok(())
}

pub struct Authenticator {
    /// The HS256 key (`jwt_secret`), checked by [`hs256`] rather than jsonwebtoken.
    secret: Option<Hs256Key>,
    /// The RS256 / ES256 keys (`jwks_url`). Neither = dev mode (`?user=` trusted); config
    /// validation guarantees loopback-only.
    jwks: Option<jwks::Jwks>,
    /// The claim rules: HS256's for [`hs256`], and one jsonwebtoken `Validation` per JWKS alg
    /// (the alg is part of jsonwebtoken's check).
    rules: ClaimRules,
    rs256: Validation,
    es256: Validation,
}

/// The claim rules: `sub` and `exp` required, `nbf` honoured, [`EXP_LEEWAY_S`] of skew.
fn validation(alg: Algorithm) -> Validation {
    let mut v = Validation::new(alg);
    v.leeway = EXP_LEEWAY_S;
    v.validate_nbf = true;
    v.set_required_spec_claims(&["exp", "sub"]);
    v
}

/// `aud` / `iss` required and matched where given; where not, not checked.
fn require_claims(v: &mut Validation, audience: Option<&str>, issuer: Option<&str>) {
    let mut required = vec!["exp", "sub"];
    match audience {
        Some(aud) => {
            v.validate_aud = true;
            v.set_audience(&[aud]);
            required.push("aud");
        }
        None => v.validate_aud = false,
    }
    if let Some(iss) = issuer {
        v.set_issuer(&[iss]);
        required.push("iss");
    }
    v.set_required_spec_claims(&required);
}

impl Authenticator {
    /// HS256 only (or dev mode without a secret).
    pub fn new(secret: Option<&str>) -> Self {
        Self::with_jwks(secret, None)
    }

    /// HS256 with `secret` and/or RS256 / ES256 with the keys of `jwks`.
    pub fn with_jwks(secret: Option<&str>, jwks: Option<jwks::Jwks>) -> Self {
        Authenticator {
            secret: secret.map(|s| Hs256Key::new(s.as_bytes())),
            jwks,
            rules: ClaimRules {
                leeway: EXP_LEEWAY_S,
                audience: None,
                issuer: None,
            },
            rs256: validation(Algorithm::RS256),
            es256: validation(Algorithm::ES256),
        }
        .with_claims(None, None)
    }

    /// Tokens must carry `aud` = `audience` and `iss` = `issuer` where given; where not, those
    /// claims are not checked (an identity provider's tokens carry both).
    pub fn with_claims(mut self, audience: Option<&str>, issuer: Option<&str>) -> Self {
        self.rules.audience = audience.map(str::to_string);
        self.rules.issuer = issuer.map(str::to_string);
        for v in [&mut self.rs256, &mut self.es256] {
            require_claims(v, audience, issuer);
        }
        self
    }

    pub fn dev_mode(&self) -> bool {
        self.secret.is_none() && self.jwks.is_none()
    }

    /// The JWKS in use (its metrics), if `jwks_url` is set.
    pub fn jwks(&self) -> Option<&jwks::Jwks> {
        self.jwks.as_ref()
    }

    /// Check the signature of `token` with the one key its `alg` and `kid` select, and its
    /// claims.
    fn verify(&self, token: &str) -> Result<Claims, AuthError> {
        let header = hs256::read_header(token)?;
        let header = header.parse()?;
        let alg = match &*header.alg {
            "HS256" => {
                let key = self.secret.as_ref().ok_or_else(|| {
                    AuthError::Invalid("HS256 tokens are not accepted (no jwt_secret)".into())
                })?;
                return key.verify(token, &self.rules, now_unix());
            }
            "RS256" => Algorithm::RS256,
            "ES256" => Algorithm::ES256,
            // `none` included.
            other => {
                return Err(AuthError::Invalid(format!(
                    "bad header: alg {other:?} is not accepted (HS256, RS256, ES256)"
                )))
            }
        };
        let keys = self.jwks.as_ref().ok_or_else(|| {
            AuthError::Invalid(format!("{alg:?} tokens are not accepted (no jwks_url)"))
        })?;
        // jsonwebtoken reads the whole header, as its `decode` will: one it refuses never
        // reaches the key set (where an unknown kid asks for a refetch).
        let header = jsonwebtoken::decode_header(token)
            .map_err(|e| AuthError::Invalid(format!("bad header: {e}")))?;
        let validation = if alg == Algorithm::RS256 {
            &self.rs256
        } else {
            &self.es256
        };
        let set = keys.keys();
        match set.find(header.kid.as_deref(), alg) {
            jwks::Lookup::Found(key) => decode(token, key, validation),
            jwks::Lookup::WrongAlg => Err(AuthError::Invalid(format!(
                "its kid names a key that is not for {alg:?}"
            ))),
            jwks::Lookup::NoKid => Err(AuthError::Invalid(
                "no kid, and the key set has not exactly one key for its alg".into(),
            )),
            jwks::Lookup::Unknown => {
                keys.refetch();
                Err(AuthError::UnknownKid)
            }
        }
    }

    /// `token` from `Authorization: Bearer` or `?token=`; `dev_user` from `?user=`.
    pub fn authenticate(
        &self,
        token: Option<&str>,
        dev_user: Option<&str>,
    ) -> Result<Identity, AuthError> {
        if self.dev_mode() {
            // Dev mode: a token is not checked (there is no key); the user id is taken as
            // given, from the token's unverified `sub` is NOT done on purpose.
            let user = dev_user.ok_or(AuthError::Missing)?;
            client_user(user)?;
            return Ok(Identity {
                user: user.into(),
                rooms: None,
            });
        }
        let token = token.ok_or(AuthError::Missing)?;
        let claims = self.verify(token)?;
        client_user(&claims.sub)?;
        let rooms = match claims.rooms {
            Some(r) if !r.iter().any(|x| x == "*") => Some(r.into_iter().map(Into::into).collect()),
            _ => None,
        };
        Ok(Identity {
            user: claims.sub.into(),
            rooms,
        })
    }
}

fn decode(token: &str, key: &DecodingKey, validation: &Validation) -> Result<Claims, AuthError> {
    jsonwebtoken::decode::<Claims>(token, key, validation)
        .map(|data| data.claims)
        .map_err(|e| match e.kind() {
            jsonwebtoken::errors::ErrorKind::ExpiredSignature => AuthError::Expired,
            jsonwebtoken::errors::ErrorKind::ImmatureSignature => AuthError::NotYetValid,
            _ => AuthError::Invalid(e.to_string()),
        })
}

/// A user or device id: 1..=128 bytes, no control characters (they end up in JSON and logs).
pub fn valid_id(id: &str) -> Result<(), AuthError> {
    if id.is_empty() || id.len() > MAX_ID_LEN || id.chars().any(|c| c.is_control()) {
        return Err(AuthError::BadUser);
    }
    Ok(())
}

pub fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Mint a token (what `ringgate token` prints). `ttl_s` from now.
pub fn mint(secret: &str, user: &str, rooms: Option<Vec<String>>, ttl_s: u64) -> String {
    let claims = Claims {
        sub: user.to_string(),
        exp: now_unix() + ttl_s,
        rooms,
    };
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .expect("HS256 encoding cannot fail")
}

/// As [`mint`], with the `aud` and `iss` a gateway with `jwt_audience` / `jwt_issuer` wants.
pub fn mint_for(
    secret: &str,
    user: &str,
    rooms: Option<Vec<String>>,
    ttl_s: u64,
    audience: Option<&str>,
    issuer: Option<&str>,
) -> String {
    let mut claims = serde_json::json!({"sub": user, "exp": now_unix() + ttl_s});
    if let Some(rooms) = rooms {
        claims["rooms"] = rooms.into();
    }
    if let Some(aud) = audience {
        claims["aud"] = aud.into();
    }
    if let Some(iss) = issuer {
        claims["iss"] = iss.into();
    }
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .expect("HS256 encoding cannot fail")
}

/// Parse a TTL such as `3600`, `90s`, `30m`, `1h`, `7d` into seconds.
pub fn parse_ttl(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let (num, mult) = match text.char_indices().last() {
        Some((i, 's')) => (&text[..i], 1),
        Some((i, 'm')) => (&text[..i], 60),
        Some((i, 'h')) => (&text[..i], 3600),
        Some((i, 'd')) => (&text[..i], 86_400),
        _ => (text, 1),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("`{text}` is not a duration (e.g. 3600, 90s, 30m, 1h, 7d)"))?;
    if n == 0 {
        return Err("ttl must be positive".into());
    }
    Ok(n * mult)
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_bearer_scheme_is_case_insensitive() {
        for v in ["Bearer abc", "bearer abc", "BEARER abc", "bEaReR  abc"] {
            assert_eq!(super::bearer_credentials(v), Some("abc"), "{v}");
        }
        for v in ["Basic abc", "Bearerabc", "Bearer", ""] {
            assert_eq!(super::bearer_credentials(v), None, "{v}");
        }
    }

    use super::*;

    const SECRET: &str = "test-secret-0123456789";

    #[test]
    fn valid_token_round_trips_with_rooms() {
        let a = Authenticator::new(Some(SECRET));
        let t = mint(SECRET, "alice", Some(vec!["a".into(), "b".into()]), 60);
        let id = a.authenticate(Some(&t), None).unwrap();
        assert_eq!(&*id.user, "alice");
        assert_eq!(id.rooms.unwrap().len(), 2);
        let star = mint(SECRET, "bob", Some(vec!["*".into()]), 60);
        assert_eq!(a.authenticate(Some(&star), None).unwrap().rooms, None);
    }

    /// A token with `aud` / `iss` (as identity providers issue them) passes when the gateway
    /// checks neither; with `jwt_audience` / `jwt_issuer` set, the claim must be there and match.
    #[test]
    fn audience_and_issuer_are_checked_only_when_configured() {
        let token = |claims: serde_json::Value| {
            jsonwebtoken::encode(
                &Header::new(Algorithm::HS256),
                &claims,
                &EncodingKey::from_secret(SECRET.as_bytes()),
            )
            .unwrap()
        };
        let exp = now_unix() + 60;
        let full = token(serde_json::json!({"sub":"a","exp":exp,"aud":"chat","iss":"https://idp"}));
        let bare = token(serde_json::json!({"sub":"a","exp":exp}));
        let other =
            token(serde_json::json!({"sub":"a","exp":exp,"aud":"mail","iss":"https://evil"}));
        // One claim wrong at a time: the other check alone must not be what refuses it.
        let wrong_aud =
            token(serde_json::json!({"sub":"a","exp":exp,"aud":"mail","iss":"https://idp"}));
        let wrong_iss =
            token(serde_json::json!({"sub":"a","exp":exp,"aud":"chat","iss":"https://evil"}));
        let open = Authenticator::new(Some(SECRET));
        for t in [&full, &bare, &other] {
            assert!(
                open.authenticate(Some(t), None).is_ok(),
                "no aud/iss configured"
            );
        }
        let strict =
            Authenticator::new(Some(SECRET)).with_claims(Some("chat"), Some("https://idp"));
        assert!(strict.authenticate(Some(&full), None).is_ok());
        // What `ringgate token --jwt-audience chat --jwt-issuer https://idp` mints passes.
        let minted = mint_for(SECRET, "a", None, 60, Some("chat"), Some("https://idp"));
        assert!(strict.authenticate(Some(&minted), None).is_ok());
        for t in [&bare, &other, &wrong_aud, &wrong_iss] {
            let err = strict.authenticate(Some(t), None).unwrap_err();
            assert!(matches!(err, AuthError::Invalid(_)), "{err:?}");
        }
    }

    #[test]
    fn wrong_secret_expired_missing_are_refused() {
        let a = Authenticator::new(Some(SECRET));
        let other = mint("another-secret-987654", "alice", None, 60);
        assert!(matches!(
            a.authenticate(Some(&other), None),
            Err(AuthError::Invalid(_))
        ));
        let claims = Claims {
            sub: "alice".into(),
            exp: now_unix() - 3600,
            rooms: None,
        };
        let expired = jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(SECRET.as_bytes()),
        )
        .unwrap();
        assert_eq!(
            a.authenticate(Some(&expired), None),
            Err(AuthError::Expired)
        );
        assert_eq!(a.authenticate(None, Some("alice")), Err(AuthError::Missing));
        assert!(a.authenticate(Some("garbage"), None).is_err());
    }

    /// `nbf` is honoured with the same leeway as `exp`.
    #[test]
    fn a_token_not_valid_yet_is_refused() {
        let a = Authenticator::new(Some(SECRET));
        let with_nbf = |nbf: u64| {
            let claims = serde_json::json!({"sub": "alice", "exp": now_unix() + 7200, "nbf": nbf});
            jsonwebtoken::encode(
                &Header::new(Algorithm::HS256),
                &claims,
                &EncodingKey::from_secret(SECRET.as_bytes()),
            )
            .unwrap()
        };
        let hour_ahead = with_nbf(now_unix() + 3600);
        assert_eq!(
            a.authenticate(Some(&hour_ahead), None),
            Err(AuthError::NotYetValid)
        );
        let within_leeway = with_nbf(now_unix() + EXP_LEEWAY_S / 2);
        assert!(a.authenticate(Some(&within_leeway), None).is_ok());
        let past = with_nbf(now_unix() - 60);
        assert!(a.authenticate(Some(&past), None).is_ok());
    }

    /// Nobody connects as the gateway's own sender, by token or in dev mode.
    #[test]
    fn reserved_ids_cannot_be_taken_by_a_client() {
        let a = Authenticator::new(Some(SECRET));
        let t = mint(SECRET, "@backend", None, 60);
        assert_eq!(a.authenticate(Some(&t), None), Err(AuthError::Reserved));
        let dev = Authenticator::new(None);
        assert_eq!(
            dev.authenticate(None, Some("@backend")),
            Err(AuthError::Reserved)
        );
        assert!(dev.authenticate(None, Some("back@end")).is_ok());
    }

    #[test]
    fn dev_mode_takes_user_param_only() {
        let a = Authenticator::new(None);
        assert_eq!(&*a.authenticate(None, Some("carol")).unwrap().user, "carol");
        assert_eq!(a.authenticate(None, None), Err(AuthError::Missing));
        assert_eq!(a.authenticate(None, Some("")), Err(AuthError::BadUser));
    }

    /// Test-only private keys (made with openssl; `testdata/`): RSA PKCS#1 and P-256 PKCS#8 DER.
    const RSA_A: &[u8] = include_bytes!("auth/testdata/rsa-a.der");
    const RSA_B: &[u8] = include_bytes!("auth/testdata/rsa-b.der");
    const P256_A: &[u8] = include_bytes!("auth/testdata/p256-a.der");

    fn public_jwk(key: &EncodingKey, alg: Algorithm, kid: &str) -> serde_json::Value {
        let mut jwk = jsonwebtoken::jwk::Jwk::from_encoding_key(key, alg).unwrap();
        jwk.common.key_id = Some(kid.into());
        serde_json::to_value(jwk).unwrap()
    }

    /// A JWKS with RSA_A as "r1" and P256_A as "e1".
    fn jwks() -> jwks::Jwks {
        let doc = serde_json::json!({"keys": [
            public_jwk(&EncodingKey::from_rsa_der(RSA_A), Algorithm::RS256, "r1"),
            public_jwk(&EncodingKey::from_ec_der(P256_A), Algorithm::ES256, "e1"),
        ]});
        let (set, skipped) = jwks::KeySet::parse(doc.to_string().as_bytes()).unwrap();
        assert!(skipped.is_empty(), "{skipped:?}");
        jwks::Jwks::fixed(set)
    }

    fn signed(alg: Algorithm, kid: Option<&str>, key: &EncodingKey, sub: &str) -> String {
        let mut header = Header::new(alg);
        header.kid = kid.map(Into::into);
        let claims = serde_json::json!({"sub": sub, "exp": now_unix() + 600});
        jsonwebtoken::encode(&header, &claims, key).unwrap()
    }

    fn b64url(bytes: &[u8]) -> String {
        const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
        let mut out = String::new();
        for chunk in bytes.chunks(3) {
            let n = chunk.iter().fold(0u32, |n, &b| (n << 8) | b as u32) << (8 * (3 - chunk.len()));
            for i in 0..=chunk.len() {
                out.push(A[(n >> (18 - 6 * i) & 63) as usize] as char);
            }
        }
        out
    }

    fn invalid(a: &Authenticator, token: &str) -> String {
        match a.authenticate(Some(token), Some("alice")) {
            Err(AuthError::Invalid(why)) => why,
            Err(e @ AuthError::UnknownKid) => e.to_string(),
            other => panic!("expected invalid token, got {other:?}"),
        }
    }

    /// The token's alg picks the key: HS256 the secret, RS256 an RSA key and ES256 a P-256
    /// key of the JWKS by kid; an alg with no key configured is refused.
    #[test]
    fn the_alg_picks_the_key_and_an_alg_without_a_key_is_refused() {
        let rsa = EncodingKey::from_rsa_der(RSA_A);
        let ec = EncodingKey::from_ec_der(P256_A);
        let both = Authenticator::with_jwks(Some(SECRET), Some(jwks()));
        let rs = signed(Algorithm::RS256, Some("r1"), &rsa, "alice");
        let es = signed(Algorithm::ES256, Some("e1"), &ec, "bob");
        let hs = mint(SECRET, "carol", None, 60);
        assert_eq!(&*both.authenticate(Some(&rs), None).unwrap().user, "alice");
        assert_eq!(&*both.authenticate(Some(&es), None).unwrap().user, "bob");
        assert_eq!(&*both.authenticate(Some(&hs), None).unwrap().user, "carol");
        assert!(!both.dev_mode());

        let jwks_only = Authenticator::with_jwks(None, Some(jwks()));
        assert!(!jwks_only.dev_mode(), "a JWKS alone is not dev mode");
        assert!(jwks_only.authenticate(Some(&rs), None).is_ok());
        assert!(invalid(&jwks_only, &hs).contains("no jwt_secret"));
        assert_eq!(
            jwks_only.authenticate(None, Some("alice")),
            Err(AuthError::Missing),
            "no ?user= outside dev mode"
        );
        let secret_only = Authenticator::new(Some(SECRET));
        assert!(invalid(&secret_only, &rs).contains("no jwks_url"));
        assert!(invalid(&secret_only, &es).contains("no jwks_url"));

        // A key of the set signs, but not the one the kid names / not for that alg.
        let other = EncodingKey::from_rsa_der(RSA_B);
        let wrong_key = signed(Algorithm::RS256, Some("r1"), &other, "alice");
        assert!(invalid(&both, &wrong_key).contains("InvalidSignature"));
        let es_kid_of_rsa = signed(Algorithm::ES256, Some("r1"), &ec, "alice");
        assert!(invalid(&both, &es_kid_of_rsa).contains("not for ES256"));
        let rs_kid_of_ec = signed(Algorithm::RS256, Some("e1"), &rsa, "alice");
        assert!(invalid(&both, &rs_kid_of_ec).contains("not for RS256"));
        let unknown = signed(Algorithm::RS256, Some("r9"), &rsa, "alice");
        assert!(invalid(&both, &unknown).contains("unknown kid"));
        // No kid: the one RSA key of the set is the key.
        let no_kid = signed(Algorithm::RS256, None, &rsa, "alice");
        assert!(both.authenticate(Some(&no_kid), None).is_ok());
        // Algs the gateway does not take, even with a key that would verify them.
        let rs384 = signed(Algorithm::RS384, Some("r1"), &rsa, "alice");
        assert!(invalid(&both, &rs384).contains("RS384"));
        let hs512 = jsonwebtoken::encode(
            &Header::new(Algorithm::HS512),
            &serde_json::json!({"sub": "alice", "exp": now_unix() + 60}),
            &EncodingKey::from_secret(SECRET.as_bytes()),
        )
        .unwrap();
        assert!(invalid(&both, &hs512).contains("HS512"));
        // Same claim rules as HS256: exp, reserved ids.
        let reserved = signed(Algorithm::ES256, Some("e1"), &ec, "@backend");
        assert_eq!(
            both.authenticate(Some(&reserved), None),
            Err(AuthError::Reserved)
        );
        let mut header = Header::new(Algorithm::RS256);
        header.kid = Some("r1".into());
        let expired = jsonwebtoken::encode(
            &header,
            &serde_json::json!({"sub": "alice", "exp": now_unix() - 3600}),
            &rsa,
        )
        .unwrap();
        assert_eq!(
            both.authenticate(Some(&expired), None),
            Err(AuthError::Expired)
        );
    }

    /// `alg: none` and algorithm confusion: an HS256 token whose HMAC key is the public key
    /// (as JWK `n`, as the JWK JSON, as DER) is never checked against that key.
    #[test]
    fn none_and_hs256_signed_with_the_public_key_are_refused() {
        let both = Authenticator::with_jwks(Some(SECRET), Some(jwks()));
        let jwks_only = Authenticator::with_jwks(None, Some(jwks()));
        let claims = serde_json::json!({"sub": "mallory", "exp": now_unix() + 600});
        let payload = b64url(claims.to_string().as_bytes());
        for header in [
            r#"{"alg":"none","typ":"JWT"}"#,
            r#"{"alg":"none","kid":"r1"}"#,
            r#"{"alg":"None","kid":"r1"}"#,
        ] {
            let token = format!("{}.{payload}.", b64url(header.as_bytes()));
            for a in [&both, &jwks_only] {
                assert!(invalid(a, &token).contains("bad header"), "{header}");
            }
        }
        let public = public_jwk(&EncodingKey::from_rsa_der(RSA_A), Algorithm::RS256, "r1");
        let n = public["n"].as_str().unwrap().to_string();
        for hmac_key in [n.as_bytes(), public.to_string().as_bytes(), RSA_A] {
            let forged = signed(
                Algorithm::HS256,
                Some("r1"),
                &EncodingKey::from_secret(hmac_key),
                "mallory",
            );
            assert!(invalid(&both, &forged).contains("InvalidSignature"));
            assert!(invalid(&jwks_only, &forged).contains("no jwt_secret"));
        }
    }

    /// What a check answered, compared between the two: the claims when accepted, else the
    /// kind of refusal (expired, not yet valid, anything else).
    fn outcome(r: Result<Claims, AuthError>) -> Result<(String, u64, Option<Vec<String>>), String> {
        match r {
            Ok(c) => Ok((c.sub, c.exp, c.rooms)),
            Err(AuthError::Invalid(_)) => Err("invalid".into()),
            Err(e) => Err(e.to_string()),
        }
    }

    /// The HS256 path (`auth::hs256`) answers every token of a seeded corpus as jsonwebtoken's
    /// `decode` does with the rules it replaced: claims of every type and none, expiry and
    /// `nbf` around the leeway, `aud` / `iss` as strings and lists with and without the rules,
    /// duplicate claims, header and claims as arrays, bad signatures, padding, tampered
    /// payloads and wrong part counts. (The differences `auth::hs256` names are left out.)
    #[test]
    fn hs256_answers_every_token_as_jsonwebtoken_does() {
        use hmac::Mac;
        use rand::{Rng, SeedableRng};
        let seed: u64 = std::env::var("RINGGATE_JWT_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(20261206);
        println!("RINGGATE_JWT_SEED={seed}");
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let now = now_unix();
        let exps = [
            format!("{}", now + 600),
            format!("{}", now - 3600),
            format!("{}", now - EXP_LEEWAY_S),
            format!("{}", now - EXP_LEEWAY_S - 1),
            format!("{}.0", now + 600),
            "1.5e9".into(),
            "\"123\"".into(),
            "null".into(),
            "-5".into(),
            "1e30".into(),
        ];
        let nbfs = [
            format!("{}", now - 60),
            format!("{}", now + 600),
            format!("{}", now + EXP_LEEWAY_S),
            format!("{}", now + EXP_LEEWAY_S + 1),
            format!("{}.4", now - 1),
            "null".into(),
            "\"x\"".into(),
            "-1".into(),
            "1e30".into(),
        ];
        let subs = ["\"alice\"", "\"\"", "5", "null", "\"b\\u0062\""];
        let auds = [
            "\"chat\"",
            "\"other\"",
            "[\"x\",\"chat\"]",
            "[\"x\"]",
            "[]",
            "5",
            "null",
            "[5]",
            "\"ch\\u0061t\"",
        ];
        let isss = [
            "\"https://idp\"",
            "\"evil\"",
            "[\"https://idp\"]",
            "[]",
            "7",
            "null",
        ];
        let roomss = ["[\"a\",\"*\"]", "\"a\"", "null", "[1]", "[]"];
        let headers = [
            r#"{"alg":"HS256","typ":"JWT"}"#,
            r#"{"alg":"HS256"}"#,
            r#"{"typ":"JWT","alg":"HS256","kid":"k"}"#,
            r#"{"alg":"HS256","kid":5}"#,
            r#"{"alg":"HS384"}"#,
            r#"{"alg":"none"}"#,
            r#"["HS256"]"#,
            r#"  ["HS256","k"]"#,
        ];
        let mac = |key: &[u8], message: &str| {
            let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(key).unwrap();
            mac.update(message.as_bytes());
            mac.finalize().into_bytes()
        };
        let sign = |key: &[u8], message: &str| b64url(&mac(key, message));
        // Each list starts with a value that passes: taken half the time, absent one time in
        // ten, any value otherwise (so tokens are good often enough to reach every answer).
        let pick = |rng: &mut rand::rngs::StdRng, list: &[String]| -> Option<String> {
            match rng.random_range(0..10) {
                0 => None,
                1..=5 => Some(list[0].clone()),
                _ => Some(list[rng.random_range(0..list.len())].clone()),
            }
        };
        let strs = |l: &[&str]| l.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let rules = [
            (None, None),
            (Some("chat"), None),
            (None, Some("https://idp")),
            (Some("chat"), Some("https://idp")),
        ];
        let mut accepted = 0;
        let mut seen = std::collections::BTreeMap::<String, usize>::new();
        for _ in 0..6_000 {
            let mut fields = Vec::new();
            for (name, list) in [
                ("sub", strs(&subs)),
                ("exp", exps.to_vec()),
                ("nbf", nbfs.to_vec()),
                ("aud", strs(&auds)),
                ("iss", strs(&isss)),
                ("rooms", strs(&roomss)),
            ] {
                if let Some(v) = pick(&mut rng, &list) {
                    fields.push(format!("\"{name}\":{v}"));
                }
            }
            if rng.random_range(0..20) == 0 && !fields.is_empty() {
                let again = fields[rng.random_range(0..fields.len())].clone();
                fields.push(again); // a claim given twice
            }
            let payload = if rng.random_range(0..20) == 0 {
                // The claims' values by position, as an array.
                let values: Vec<_> = fields
                    .iter()
                    .map(|f| f.split_once(':').unwrap().1)
                    .collect();
                format!(" [{}]", values.join(","))
            } else {
                format!("{{{}}}", fields.join(","))
            };
            let header = headers[rng.random_range(0..headers.len())];
            let (h, p) = (b64url(header.as_bytes()), b64url(payload.as_bytes()));
            let message = format!("{h}.{p}");
            let token = match rng.random_range(0..24) {
                0 => format!("{message}.{}", sign(b"another-secret", &message)),
                1 => format!("{message}.{}", &sign(SECRET.as_bytes(), &message)[1..]),
                2 => format!("{message}.{}=", sign(SECRET.as_bytes(), &message)),
                3 => format!("{message}x.{}", sign(SECRET.as_bytes(), &message)),
                4 => format!("{message}.{}.x", sign(SECRET.as_bytes(), &message)),
                5 => format!("{h}.{p}=.{}", sign(SECRET.as_bytes(), &format!("{h}.{p}="))),
                6 => message.clone(),
                7 => {
                    // Right but for its last byte.
                    let mut sig = mac(SECRET.as_bytes(), &message);
                    sig[31] ^= 1;
                    format!("{message}.{}", b64url(&sig))
                }
                _ => format!("{message}.{}", sign(SECRET.as_bytes(), &message)),
            };
            for (aud, iss) in rules {
                let ours = Authenticator::new(Some(SECRET)).with_claims(aud, iss);
                let mut v = validation(Algorithm::HS256);
                require_claims(&mut v, aud, iss);
                let key = DecodingKey::from_secret(SECRET.as_bytes());
                // Both read the clock: compared only when they read the same second.
                let (a, b) = loop {
                    let second = now_unix();
                    let answers = (
                        outcome(ours.verify(&token)),
                        outcome(decode(&token, &key, &v)),
                    );
                    if now_unix() == second {
                        break answers;
                    }
                };
                assert_eq!(
                    a, b,
                    "seed {seed}: header {header} payload {payload} token {token} aud {aud:?} iss {iss:?}"
                );
                accepted += a.is_ok() as usize;
                *seen
                    .entry(a.err().unwrap_or_else(|| "ok".into()))
                    .or_default() += 1;
            }
        }
        // The corpus reaches every answer, each many times.
        println!("{seen:?}");
        assert!(accepted > 100, "{seen:?}");
        for kind in [
            "ok",
            "invalid",
            "token expired",
            "token not valid yet (nbf)",
        ] {
            assert!(seen.get(kind).is_some_and(|n| *n > 50), "{kind}: {seen:?}");
        }
    }

    #[test]
    fn ttl_parsing() {
        assert_eq!(parse_ttl("1h").unwrap(), 3600);
        assert_eq!(parse_ttl("90s").unwrap(), 90);
        assert_eq!(parse_ttl("30m").unwrap(), 1800);
        assert_eq!(parse_ttl("120").unwrap(), 120);
        assert!(parse_ttl("abc").is_err());
        assert!(parse_ttl("0").is_err());
    }
}
