//! The origins some active `pk` key allows: what a CORS preflight (which carries no key) is
//! answered from. Rebuilt from the store whenever a `pk` key is created, changed, rotated or
//! revoked, here or (through the change feed) on another node.

use crate::engine::Engine;
use keygate_core::{KeyStatus, Kind, OriginList};
use keygate_store::{KeyFilter, PageRequest};
use std::sync::RwLock;

/// Origins allowed by at least one active `pk` key.
#[derive(Debug, Default)]
pub struct CorsIndex {
    origins: RwLock<OriginList>,
}

impl CorsIndex {
    /// Whether some active `pk` key allows `origin`.
    pub fn allows(&self, origin: &str) -> bool {
        self.origins
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .allows(origin)
    }

    fn set(&self, list: OriginList) {
        *self.origins.write().unwrap_or_else(|p| p.into_inner()) = list;
    }
}

/// Rebuilds the index from every active and in-grace `pk` key in the store.
pub async fn refresh(state: &Engine) -> Result<(), keygate_store::StoreError> {
    let mut all: Vec<String> = Vec::new();
    for status in [KeyStatus::Active, KeyStatus::Grace] {
        let mut cursor = None;
        loop {
            let page = PageRequest { cursor, limit: 500 };
            let filter = KeyFilter {
                kind: Some(Kind::Pk),
                status: Some(status),
                ..KeyFilter::default()
            };
            let keys = state.store.list_keys(&filter, &page).await?;
            for k in &keys {
                all.extend(k.allowed_origins.to_strings());
            }
            if keys.len() < 500 {
                break;
            }
            cursor = keys.last().map(|k| k.id.to_string());
        }
    }
    all.sort();
    all.dedup();
    // Entries are parsed one by one: a bad stored entry is skipped, never a reason to keep
    // an older index (which could still hold a revoked key's origins).
    let good: Vec<String> = all
        .into_iter()
        .filter(|o| match keygate_core::OriginPattern::parse(o) {
            Ok(_) => true,
            Err(e) => {
                tracing::error!("skipping a stored origin that does not parse: {e}");
                false
            }
        })
        .collect();
    state.cors.set(OriginList::parse(&good).unwrap_or_default());
    Ok(())
}

/// Rebuilds the index after a `pk` key changed, logging (not failing) on a store error: the
/// real requests are still judged per key, only preflights may be refused until the next
/// successful refresh.
pub async fn refresh_after_change(state: &Engine, kind: Kind) {
    if kind == Kind::Pk {
        if let Err(e) = refresh(state).await {
            tracing::warn!("could not refresh the CORS index: {e}");
        }
    }
}

/// A `pk` key changed here: rebuild this node's index and tell the other nodes to.
pub async fn pk_changed(state: &Engine, kind: Kind) {
    if kind == Kind::Pk {
        refresh_after_change(state, kind).await;
        state.publish("cors".to_owned()).await;
    }
}
