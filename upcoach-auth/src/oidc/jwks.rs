//! A provider's signing keys: fetched, cached by `Cache-Control: max-age`, re-fetched
//! once (single-flight, rate limited) for a key id it does not know.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use jsonwebtoken::jwk::{AlgorithmParameters, JwkSet, KeyAlgorithm, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey};
use oauth2::reqwest;

use super::IdTokenError;

/// The shortest and longest a fetched key set is trusted without asking again.
const MIN_MAX_AGE: Duration = Duration::from_secs(60);
const MAX_MAX_AGE: Duration = Duration::from_secs(24 * 3600);
/// Without `Cache-Control: max-age`, keys are kept this long.
const DEFAULT_MAX_AGE: Duration = Duration::from_secs(3600);
/// The largest key set accepted.
const MAX_JWKS_BYTES: usize = 256 * 1024;

/// One verification key.
#[derive(Clone)]
pub(crate) struct Key {
    pub(crate) decoding: DecodingKey,
    /// The algorithms this key may verify (from its type and its `alg`, if given).
    pub(crate) algorithms: Vec<Algorithm>,
}

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Key")
            .field("algorithms", &self.algorithms)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Default)]
struct Cached {
    keys: HashMap<String, Arc<Key>>,
    fetched: Option<Instant>,
    max_age: Duration,
}

/// The JWK Set of one issuer.
#[derive(Debug)]
pub struct JwksCache {
    url: String,
    http: reqwest::Client,
    cached: RwLock<Cached>,
    /// One fetch at a time; waiters use its result.
    fetching: tokio::sync::Mutex<()>,
    /// When an unknown key id last caused a fetch.
    last_unknown_fetch: Mutex<Option<Instant>>,
    unknown_kid_interval: Duration,
    fetches: std::sync::atomic::AtomicU64,
}

impl JwksCache {
    /// Keys from `url`, fetched with `http` when first needed. A key id the set does
    /// not hold causes at most one fetch per `unknown_kid_interval` (default 30 s).
    pub fn new(url: impl Into<String>, http: reqwest::Client) -> Self {
        Self {
            url: url.into(),
            http,
            cached: RwLock::new(Cached::default()),
            fetching: tokio::sync::Mutex::new(()),
            last_unknown_fetch: Mutex::new(None),
            unknown_kid_interval: Duration::from_secs(30),
            fetches: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// Changes how often an unknown key id may cause a fetch.
    pub fn with_unknown_kid_interval(mut self, interval: Duration) -> Self {
        self.unknown_kid_interval = interval;
        self
    }

    /// How many times the set was fetched.
    pub fn fetches(&self) -> u64 {
        self.fetches.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The URL keys come from.
    pub fn url(&self) -> &str {
        &self.url
    }

    fn lookup(&self, kid: &str) -> (Option<Arc<Key>>, bool) {
        let cached = self.cached.read().unwrap_or_else(|e| e.into_inner());
        let fresh = cached
            .fetched
            .is_some_and(|at| at.elapsed() < cached.max_age);
        (cached.keys.get(kid).cloned(), fresh)
    }

    /// The key `kid`, fetching the set when it is stale, or once when it lacks `kid`.
    pub(crate) async fn key(&self, kid: &str) -> Result<Arc<Key>, IdTokenError> {
        let (found, fresh) = self.lookup(kid);
        if let (Some(key), true) = (&found, fresh) {
            return Ok(key.clone());
        }
        if !fresh {
            // Stale or never fetched: refresh; on failure a stale key still serves.
            match self.refresh(None).await {
                Ok(()) => {}
                Err(e) => match found {
                    Some(key) => {
                        tracing::warn!(url = %self.url, error = %e, "provider keys could not be refreshed; using the previous set");
                        return Ok(key);
                    }
                    None if self.is_empty() => return Err(e),
                    None => {}
                },
            }
            if let (Some(key), _) = self.lookup(kid) {
                return Ok(key);
            }
        }
        // Fresh but without this kid: the provider may have rotated. Ask once, unless
        // someone asked recently (a flood of random kids must not hammer the provider).
        if !self.may_fetch_for_unknown() {
            return Err(IdTokenError::UnknownKid);
        }
        self.refresh(Some(kid)).await?;
        self.lookup(kid).0.ok_or(IdTokenError::UnknownKid)
    }

    fn is_empty(&self) -> bool {
        self.cached
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .fetched
            .is_none()
    }

    fn may_fetch_for_unknown(&self) -> bool {
        let mut last = self
            .last_unknown_fetch
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        if last.is_some_and(|at| now.duration_since(at) < self.unknown_kid_interval) {
            return false;
        }
        *last = Some(now);
        true
    }

    /// Fetches the set, unless another caller did while this one waited (and, when
    /// `wanted` is given, brought that kid, or the set is fresh from that fetch).
    async fn refresh(&self, wanted: Option<&str>) -> Result<(), IdTokenError> {
        let before = self.fetches();
        let _guard = self.fetching.lock().await;
        if self.fetches() != before {
            // Someone fetched while we waited: use theirs.
            return match wanted {
                Some(kid) if self.lookup(kid).0.is_none() => Err(IdTokenError::UnknownKid),
                _ => Ok(()),
            };
        }
        let fetched = self.fetch().await;
        self.fetches
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let (keys, max_age) = fetched?;
        let mut cached = self.cached.write().unwrap_or_else(|e| e.into_inner());
        *cached = Cached {
            keys,
            fetched: Some(Instant::now()),
            max_age,
        };
        Ok(())
    }

    async fn fetch(&self) -> Result<(HashMap<String, Arc<Key>>, Duration), IdTokenError> {
        let unavailable =
            |e: Box<dyn std::error::Error + Send + Sync>| IdTokenError::KeysUnavailable(e);
        let response = self
            .http
            .get(&self.url)
            .timeout(Duration::from_secs(5))
            .send()
            .await
            .map_err(|e| unavailable(Box::new(e)))?;
        if !response.status().is_success() {
            return Err(unavailable(
                format!("the key set answered {}", response.status()).into(),
            ));
        }
        let max_age = response
            .headers()
            .get(http_cache_control())
            .and_then(|v| v.to_str().ok())
            .and_then(max_age_of)
            .map_or(DEFAULT_MAX_AGE, |age| age.clamp(MIN_MAX_AGE, MAX_MAX_AGE));
        let mut response = response;
        let body = super::read_capped(&mut response, MAX_JWKS_BYTES, "the key set")
            .await
            .map_err(unavailable)?;
        let set: JwkSet = serde_json::from_slice(&body).map_err(|e| unavailable(Box::new(e)))?;
        let mut keys = HashMap::new();
        for jwk in &set.keys {
            let Some(kid) = &jwk.common.key_id else {
                continue;
            };
            if matches!(&jwk.common.public_key_use, Some(u) if *u != PublicKeyUse::Signature) {
                continue;
            }
            let family: &[Algorithm] = match &jwk.algorithm {
                AlgorithmParameters::RSA(_) => &[
                    Algorithm::RS256,
                    Algorithm::RS384,
                    Algorithm::RS512,
                    Algorithm::PS256,
                    Algorithm::PS384,
                    Algorithm::PS512,
                ],
                AlgorithmParameters::EllipticCurve(_) => &[Algorithm::ES256, Algorithm::ES384],
                AlgorithmParameters::OctetKeyPair(_) => &[Algorithm::EdDSA],
                // A symmetric key in a public key set is a misconfiguration: never used;
                // nor is any key type this build does not know.
                _ => continue,
            };
            // A key that names its algorithm is used for that one only (and not at all
            // if it names one outside its key type's family, or an encryption one).
            let algorithms: Vec<Algorithm> = match jwk.common.key_algorithm {
                Some(alg) => signing_algorithm(alg)
                    .filter(|a| family.contains(a))
                    .into_iter()
                    .collect(),
                None => family.to_vec(),
            };
            let Ok(decoding) = DecodingKey::from_jwk(jwk) else {
                continue;
            };
            keys.insert(
                kid.clone(),
                Arc::new(Key {
                    decoding,
                    algorithms,
                }),
            );
        }
        Ok((keys, max_age))
    }
}

/// The signature algorithm a JWK's `alg` names; `None` for encryption algorithms and
/// names this build does not know.
fn signing_algorithm(alg: KeyAlgorithm) -> Option<Algorithm> {
    Some(match alg {
        KeyAlgorithm::HS256 => Algorithm::HS256,
        KeyAlgorithm::HS384 => Algorithm::HS384,
        KeyAlgorithm::HS512 => Algorithm::HS512,
        KeyAlgorithm::ES256 => Algorithm::ES256,
        KeyAlgorithm::ES384 => Algorithm::ES384,
        KeyAlgorithm::RS256 => Algorithm::RS256,
        KeyAlgorithm::RS384 => Algorithm::RS384,
        KeyAlgorithm::RS512 => Algorithm::RS512,
        KeyAlgorithm::PS256 => Algorithm::PS256,
        KeyAlgorithm::PS384 => Algorithm::PS384,
        KeyAlgorithm::PS512 => Algorithm::PS512,
        KeyAlgorithm::EdDSA => Algorithm::EdDSA,
        _ => return None,
    })
}

fn http_cache_control() -> reqwest::header::HeaderName {
    reqwest::header::CACHE_CONTROL
}

/// `max-age=N` of a `Cache-Control` value.
fn max_age_of(value: &str) -> Option<Duration> {
    value.split(',').find_map(|directive| {
        let (name, seconds) = directive.trim().split_once('=')?;
        name.trim()
            .eq_ignore_ascii_case("max-age")
            .then(|| seconds.trim().trim_matches('"').parse::<u64>().ok())
            .flatten()
            .map(Duration::from_secs)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn max_age_is_read_from_cache_control() {
        assert_eq!(
            max_age_of("public, max-age=21573, must-revalidate, no-transform"),
            Some(Duration::from_secs(21573))
        );
        assert_eq!(max_age_of("no-cache"), None);
        assert_eq!(max_age_of("max-age=abc"), None);
    }

    #[test]
    fn a_jwk_alg_names_one_signing_algorithm_or_none() {
        assert_eq!(
            signing_algorithm(KeyAlgorithm::RS256),
            Some(Algorithm::RS256)
        );
        assert_eq!(
            signing_algorithm(KeyAlgorithm::PS512),
            Some(Algorithm::PS512)
        );
        assert_eq!(
            signing_algorithm(KeyAlgorithm::EdDSA),
            Some(Algorithm::EdDSA)
        );
        for encryption in [
            KeyAlgorithm::RSA1_5,
            KeyAlgorithm::RSA_OAEP,
            KeyAlgorithm::RSA_OAEP_256,
            KeyAlgorithm::UNKNOWN_ALGORITHM,
        ] {
            assert_eq!(signing_algorithm(encryption), None, "{encryption:?}");
        }
    }
}
