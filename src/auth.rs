//! Client authentication: HS256 JWT verification and minting, and the loopback-only dev mode.
//!
//! Owns no state beyond the decoded key. The upgrade path calls [`Authenticator::authenticate`]
//! once per handshake; nothing here runs per message.

use std::time::{SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
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
    #[error("token not valid yet (nbf)")]
    NotYetValid,
    #[error("invalid user id")]
    BadUser,
    #[error("user ids starting with '@' are the gateway's own (e.g. @backend)")]
    Reserved,
}

/// Ids the gateway sends as itself start with this (`@backend` for `POST /api/send`); no client
/// may connect as one, so no client can speak for the backend.
pub const RESERVED_PREFIX: char = '@';

/// A user id a client may connect as: a valid id outside the gateway's reserved ones.
fn client_user(user: &str) -> Result<(), AuthError> {
    valid_id(user)?;
    if user.starts_with(RESERVED_PREFIX) {
        return Err(AuthError::Reserved);
    }
    Ok(())
}

pub struct Authenticator {
    /// None = dev mode (`?user=` trusted); config validation guarantees loopback-only.
    key: Option<(DecodingKey, Validation)>,
}

impl Authenticator {
    pub fn new(secret: Option<&str>) -> Self {
        let key = secret.map(|s| {
            let mut v = Validation::new(Algorithm::HS256);
            v.leeway = EXP_LEEWAY_S;
            v.validate_nbf = true;
            v.set_required_spec_claims(&["exp", "sub"]);
            (DecodingKey::from_secret(s.as_bytes()), v)
        });
        Authenticator { key }
    }

    pub fn dev_mode(&self) -> bool {
        self.key.is_none()
    }

    /// `token` from `Authorization: Bearer` or `?token=`; `dev_user` from `?user=`.
    pub fn authenticate(
        &self,
        token: Option<&str>,
        dev_user: Option<&str>,
    ) -> Result<Identity, AuthError> {
        match &self.key {
            None => {
                // Dev mode: a token is not checked (there is no secret); the user id is taken
                // as given, from the token's unverified `sub` is NOT done on purpose.
                let user = dev_user.ok_or(AuthError::Missing)?;
                client_user(user)?;
                Ok(Identity {
                    user: user.into(),
                    rooms: None,
                })
            }
            Some((key, validation)) => {
                let token = token.ok_or(AuthError::Missing)?;
                let data =
                    jsonwebtoken::decode::<Claims>(token, key, validation).map_err(|e| match e
                        .kind()
                    {
                        jsonwebtoken::errors::ErrorKind::ExpiredSignature => AuthError::Expired,
                        jsonwebtoken::errors::ErrorKind::ImmatureSignature => {
                            AuthError::NotYetValid
                        }
                        _ => AuthError::Invalid(e.to_string()),
                    })?;
                client_user(&data.claims.sub)?;
                let rooms = match data.claims.rooms {
                    Some(r) if !r.iter().any(|x| x == "*") => {
                        Some(r.into_iter().map(Into::into).collect())
                    }
                    _ => None,
                };
                Ok(Identity {
                    user: data.claims.sub.into(),
                    rooms,
                })
            }
        }
    }
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
