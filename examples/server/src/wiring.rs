//! Sign-in composed from the configuration: stores on the configured backends, the
//! configured providers, the event log.

use std::sync::Arc;

use upcoach_auth::flow::{FlowStore, MemoryFlowStore, RedisFlowStore};
use upcoach_auth::http::AuthRoutes;
use upcoach_auth::refresh::{MemoryRefreshStore, PgRefreshStore, RefreshPolicy, RefreshStore};

use upcoach_auth::session::AccessTokens;
use upcoach_auth::sessions::Sessions;
use upcoach_auth::users::{MemoryUserStore, PgUserStore, UserStore};
use upcoach_auth::{ProviderId, google::GoogleProvider};
use upcoach_core::event::EventLog;
use upcoach_core::postgres::MeteredPool;
use upcoach_core::redis::RedisConnection;
use upcoach_core::{Clock, Config};

use crate::StartError;

/// The refresh-token store on `postgres` (in memory without it).
pub(crate) fn refresh_store(
    config: &Config,
    postgres: &Option<MeteredPool>,
) -> Arc<dyn RefreshStore> {
    let policy = RefreshPolicy::default()
        .with_grace(config.refresh_grace)
        .with_family_lifetime(config.session_lifetime);
    match postgres {
        Some(pool) => Arc::new(PgRefreshStore::new(pool.clone()).with_policy(policy)),
        None => Arc::new(MemoryRefreshStore::new(policy)),
    }
}

/// The sign-in routes over stores on `postgres` / `redis` (in memory without them).
pub(crate) async fn sessions(
    config: &Config,
    tokens: Arc<AccessTokens>,
    refresh: Arc<dyn RefreshStore>,
    postgres: &Option<MeteredPool>,
    redis: &Option<RedisConnection>,
    events: &Arc<dyn EventLog>,
    clock: &Arc<dyn Clock>,
) -> Result<AuthRoutes, StartError> {
    let users: Arc<dyn UserStore> = match postgres {
        Some(pool) => Arc::new(PgUserStore::new(pool.clone())),
        None => Arc::new(MemoryUserStore::new()),
    };
    let flows: Arc<dyn FlowStore> = match redis {
        Some(redis) => Arc::new(
            RedisFlowStore::new(redis.clone())
                .with_prefix(format!("{}:flow:", config.cache_prefix)),
        ),
        None => Arc::new(MemoryFlowStore::new()),
    };
    let public_url = config
        .public_url
        .clone()
        .unwrap_or_else(|| format!("http://{}", config.addr));
    let mut builder = Sessions::builder(tokens, public_url.clone())
        .refresh_store(refresh)
        .user_store(users)
        .flow_store(flows)
        .return_to_allowlist(config.return_to_allowlist.clone())
        .events(events.clone())
        .clock(clock.clone());
    if let Some(google) = &config.google {
        let callback = Sessions::callback_url_of(&public_url, ProviderId::Google);
        let provider = GoogleProvider::discover(google, &callback, clock.clone())
            .await
            .map_err(|source| StartError::Provider {
                provider: "google",
                source,
            })?;
        builder = builder.provider(Arc::new(provider));
    }
    Ok(AuthRoutes::new(Arc::new(builder.build())))
}
