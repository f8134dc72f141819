//! Fixtures shared by the engine's unit tests: one synthetic feed `T` (id 1), a shard core
//! over it, a principal, a tick, and what a connection has queued. Built once here so the
//! tests of `core`, `index`, `session`, `shard`, `subscribe`, `handle` and the engine's
//! root describe the same feed and the same core.

use std::sync::Arc;

use super::core::{ConnKey, CoreLimits, ShardCore};
use super::outbound::OutItem;
use super::Tick;
use crate::auth::scopes::Entitlements;
use crate::auth::validate::Principal;
use crate::config::Config;
use crate::feeds::{Catalog, FeedDef};
use tickgate_proto::codec::{Body, Quote, Record, Trade};
use tickgate_proto::control::ClientMsg;

/// A catalog of one synthetic feed `T` (id 1, epoch 1) with these symbols.
pub(crate) fn catalog(symbols: &[&str]) -> Arc<Catalog> {
    let list: Vec<String> = symbols.iter().map(|s| format!("\"{s}\"")).collect();
    let text = format!(
        "name = \"T\"\nid = 1\nsource = \"synthetic\"\nsymbols = [{}]\n[synthetic]\nseed = 1\nrate_per_s = 1.0\n",
        list.join(", ")
    );
    Arc::new(Catalog::new(vec![FeedDef::parse("t", &text).expect("feed")], 1).expect("catalog"))
}

/// The engine limits of the default configuration.
pub(crate) fn limits() -> CoreLimits {
    CoreLimits::from(&Config::default())
}

/// A shard core over feed `T` (symbols `A`, `B`) with `limits`.
pub(crate) fn core_with(limits: CoreLimits) -> ShardCore {
    ShardCore::new(catalog(&["A", "B"]), limits)
}

/// A shard core over feed `T` (symbols `A`, `B`) with the default limits.
pub(crate) fn core() -> ShardCore {
    core_with(limits())
}

/// A plain `subscribe` to these symbols of feed `T`: no id, snapshot or resume.
pub(crate) fn subscribe(symbols: &[&str]) -> ClientMsg {
    ClientMsg::Subscribe {
        id: None,
        feed: "T".into(),
        symbols: symbols.iter().map(|s| (*s).to_owned()).collect(),
        snapshot: false,
        resume: None,
        epoch: None,
        max_rate: None,
    }
}

/// A principal `s` (jti `j`) reading every feed, issued at `iat`, expiring at `exp`.
pub(crate) fn principal(iat: u64, exp: u64) -> Principal {
    Principal {
        sub: "s".into(),
        iss: "i".into(),
        jti: Some("j".into()),
        client_id: None,
        exp,
        iat: Some(iat),
        entitlements: Entitlements::from_scopes(["md:read:*"]),
    }
}

/// A quote of instrument `A` of feed `T` with this seq.
pub(crate) fn tick(seq: u64) -> Tick {
    Tick { feed_idx: 0, instr: 0, record: quote(seq) }
}

/// A quote record of instrument `A` of feed `T` (ids 1 and 1) with this seq.
pub(crate) fn quote(seq: u64) -> Record {
    Record::encode(1, 1, seq, 0, 0, &Body::Quote(Quote::default()), 0)
}

/// A trade record of instrument `A` of feed `T` with this seq.
pub(crate) fn trade(seq: u64) -> Record {
    Record::encode(1, 1, seq, 0, 0, &Body::Trade(Trade::default()), 0)
}

/// Everything queued for `key`, in order.
pub(crate) fn drain(core: &mut ShardCore, key: ConnKey) -> Vec<OutItem> {
    std::iter::from_fn(|| core.pop(key)).collect()
}

/// The text frames among `items`.
pub(crate) fn texts(items: &[OutItem]) -> Vec<String> {
    items
        .iter()
        .filter_map(|i| match i {
            OutItem::Text(t) => Some(t.clone()),
            _ => None,
        })
        .collect()
}
