//! The connection registry and the subscription index of a shard: registering a
//! connection (its `welcome` queued), removing it, and the `index[feed][instrument]` lists
//! dispatch walks, with each connection's position in them so removal is O(1).

use std::collections::HashMap;
use std::rc::Rc;

use tokio::sync::Notify;

use super::core::{Conn, ConnHandles, ConnKey, ShardCore, Sub};
use super::outbound::Outbound;
use crate::auth::validate::Principal;
use tickgate_proto::control::ServerMsg;

impl ShardCore {
    /// Number of connections.
    pub fn connection_count(&self) -> usize {
        self.conns.len()
    }

    /// Subscribed (connection, instrument) pairs on this shard.
    pub fn subscription_count(&self) -> usize {
        self.subscriptions
    }

    /// A connection by key.
    pub fn conn(&self, key: ConnKey) -> Option<&Conn> {
        self.conns.get(key)
    }

    /// A connection by key, mutably.
    pub fn conn_mut(&mut self, key: ConnKey) -> Option<&mut Conn> {
        self.conns.get_mut(key)
    }

    /// Registers a connection and queues its `welcome`.
    pub fn add_conn(&mut self, principal: Principal, session: String) -> ConnHandles {
        let notify = Rc::new(Notify::new());
        let kill = Rc::new(Notify::new());
        let welcome = ServerMsg::Welcome {
            protocol: 1,
            session: session.clone(),
            sub: principal.sub.clone(),
            exp: principal.exp,
            heartbeat_ms: self.limits.heartbeat_ms,
            feeds: self.feeds_for(&principal.entitlements),
        };
        let mut out = Outbound::default();
        out.push_text(welcome.to_json());
        self.next_serial += 1;
        let key = self.conns.insert(Conn {
            out,
            notify: notify.clone(),
            kill: kill.clone(),
            session,
            principal,
            subs: HashMap::new(),
            rare: None,
            serial: self.next_serial,
            expire_timer: None,
            expiring_timer: None,
            last_refresh: None,
            blocked_since: None,
            over: false,
            progress: None,
            byte_rate: None,
            direct: None,
        });
        notify.notify_one();
        self.schedule_token_timers(key);
        ConnHandles { key, notify, kill }
    }

    /// Forgets a connection and its subscriptions.
    pub fn remove_conn(&mut self, key: ConnKey) {
        self.cancel_token_timers(key);
        if let Some(conn) = self.conns.try_remove(key) {
            for ((f, i), pos) in conn.subs {
                self.unindex(key, f, i, pos);
            }
        }
    }

    /// Removes `key`'s subscription to (f, i), wherever it sits (see [`Sub`]).
    pub(super) fn unindex(&mut self, key: ConnKey, f: u16, i: u32, sub: Sub) {
        match sub {
            Sub::Live(pos) => self.unindex_live(key, f, i, pos),
            Sub::Throttled(gid, pos) => self.leave_group(f, i, gid, pos),
        }
    }

    /// Removes `key` from the index list of (f, i), where it sits at `pos`; the entry moved
    /// into its place has its recorded position updated.
    fn unindex_live(&mut self, key: ConnKey, f: u16, i: u32, pos: u32) {
        let Some(list) = self.index.get_mut(f as usize).and_then(|v| v.get_mut(i as usize)) else { return };
        let pos = pos as usize;
        debug_assert_eq!(list.get(pos), Some(&key), "index position out of date");
        if list.get(pos) != Some(&key) {
            return;
        }
        list.swap_remove(pos);
        self.subscriptions -= 1;
        if let Some(&moved) = list.get(pos) {
            if let Some(p) = self.conns.get_mut(moved).and_then(|c| c.subs.get_mut(&(f, i))) {
                *p = Sub::Live(pos as u32);
            }
        }
    }

    /// Removes the given subscriptions of a connection; returns those that existed.
    pub(super) fn drop_subs(&mut self, key: ConnKey, f: u16, instruments: &[u32]) -> Vec<u32> {
        let Some(conn) = self.conns.get_mut(key) else {
            return Vec::new();
        };
        let removed: Vec<(u32, Sub)> =
            instruments.iter().filter_map(|&i| conn.subs.remove(&(f, i)).map(|pos| (i, pos))).collect();
        for &(i, _) in &removed {
            if let Some(r) = conn.rare.as_deref_mut() {
                if let Some(cf) = r.conflation.as_mut() {
                    cf.forget(f, i);
                }
                r.skip_upto.remove(&(f, i));
            }
        }
        for &(i, pos) in &removed {
            self.unindex(key, f, i, pos);
        }
        removed.into_iter().map(|(i, _)| i).collect()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use crate::engine::core::ConnKey;
    use crate::engine::outbound::OutItem;
    use crate::engine::testkit::{core, drain, principal, subscribe, tick};
    use tickgate_proto::control::ClientMsg;
    use tickgate_proto::now_ns;

    /// Index positions stay exact through removals in any order: after connections
    /// leave, exactly the remaining ones get the next tick.
    #[test]
    fn index_positions_survive_removals_in_any_order() {
        let mut core = core();
        let now = now_ns() / 1_000_000_000;
        let keys: Vec<ConnKey> =
            (0..200).map(|k| core.add_conn(principal(now, now + 100), format!("c{k}")).key).collect();
        for &k in &keys {
            core.handle(k, subscribe(&["A", "B"]));
            drain(&mut core, k);
        }
        let mut gone = HashSet::new();
        for (n, &k) in keys.iter().enumerate() {
            match n % 3 {
                0 => {
                    core.remove_conn(k);
                    gone.insert(k);
                }
                1 if n % 2 == 0 => {
                    core.handle(k, ClientMsg::Unsubscribe { id: None, feed: "T".into(), symbols: vec!["A".into()] });
                    drain(&mut core, k);
                    gone.insert(k);
                }
                _ => {}
            }
        }
        core.dispatch(&tick(1));
        for &k in keys.iter().filter(|k| !gone.contains(k)) {
            assert!(matches!(core.pop(k), Some(OutItem::Batch(_))), "connection {k} lost its subscription");
        }
        for &k in keys.iter().filter(|k| gone.contains(k)) {
            assert!(core.pop(k).is_none(), "connection {k} still indexed");
        }
    }
}
