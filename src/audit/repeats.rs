//! Repeated refusals, summarised. A client with a bad token, or a caller past its rate or
//! the in-flight cap, is refused on every request, as fast as it sends them; one record each
//! would let any client on the network grow the audit log at its own pace. Refusals of that
//! kind are grouped by (peer address, caller, RPC, status code): the first in a window is
//! written as it is, the later ones are counted and only the latest is kept, and when the
//! window closes that latest record is written with `repeats` set to how many refusals it
//! stands for. So each group writes at most two records per window, and the sum over all
//! records of `repeats` (1 where absent) is still the number of requests decided.
//! Refusals by the policy are never grouped: each names the tenant a caller was refused.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::AuditRecord;

/// How long refusals of one group are gathered before their summary is written.
pub const WINDOW: Duration = Duration::from_secs(1);

/// Groups held at once. Past this (a flood from many addresses), new groups share one group
/// per RPC and code, whose summary names no peer or caller.
const MAX_GROUPS: usize = 4096;

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Group {
    peer: Option<IpAddr>,
    caller: Option<String>,
    rpc: &'static str,
    code: &'static str,
}

impl Group {
    fn of(r: &AuditRecord) -> Group {
        Group {
            peer: r.peer.map(|a| a.ip()),
            caller: r.caller.clone(),
            rpc: r.rpc,
            code: r.code,
        }
    }

    /// The group of every refusal that found the table full.
    fn overflow(r: &AuditRecord) -> Group {
        Group {
            peer: None,
            caller: None,
            rpc: r.rpc,
            code: r.code,
        }
    }

    fn is_overflow(&self) -> bool {
        self.peer.is_none() && self.caller.is_none()
    }
}

#[derive(Debug)]
struct Held {
    opened: Instant,
    /// Refusals since the one written in full, and the latest of them.
    count: u64,
    latest: Option<AuditRecord>,
}

impl Held {
    fn open(now: Instant) -> Held {
        Held {
            opened: now,
            count: 0,
            latest: None,
        }
    }

    fn closed(&self, now: Instant) -> bool {
        now.saturating_duration_since(self.opened) >= WINDOW
    }

    /// The record that stands for the refusals held, if any.
    fn summary(&mut self, overflow: bool) -> Option<AuditRecord> {
        let mut r = self.latest.take()?;
        if self.count > 1 {
            r.repeats = Some(self.count);
            if overflow {
                // The refusals came from many peers and callers: naming the last would mislead.
                r.peer = None;
                r.caller = None;
                r.proof = None;
                r.app_id = None;
            }
        }
        self.count = 0;
        Some(r)
    }
}

/// The groups of the current window.
#[derive(Debug, Default)]
pub struct Repeats {
    groups: Mutex<HashMap<Group, Held>>,
}

impl Repeats {
    /// A repeatable refusal: what to write now (none, it, or a closed window's summary
    /// and it).
    pub fn admit(&self, record: AuditRecord, now: Instant) -> [Option<AuditRecord>; 2] {
        let mut groups = self.groups.lock().unwrap_or_else(|p| p.into_inner());
        let mut group = Group::of(&record);
        if groups.len() >= MAX_GROUPS && !groups.contains_key(&group) {
            group = Group::overflow(&record);
        }
        let overflow = group.is_overflow();
        match groups.entry(group) {
            Entry::Vacant(v) => {
                v.insert(Held::open(now));
                [Some(record), None]
            }
            Entry::Occupied(mut o) => {
                let held = o.get_mut();
                if held.closed(now) {
                    let summary = held.summary(overflow);
                    *held = Held::open(now);
                    [summary, Some(record)]
                } else {
                    held.count += 1;
                    held.latest = Some(record);
                    [None, None]
                }
            }
        }
    }

    /// The summaries of the windows closed by `now`; their groups are forgotten.
    pub fn closed(&self, now: Instant) -> Vec<AuditRecord> {
        let mut out = Vec::new();
        let mut groups = self.groups.lock().unwrap_or_else(|p| p.into_inner());
        groups.retain(|group, held| {
            if !held.closed(now) {
                return true;
            }
            out.extend(held.summary(group.is_overflow()));
            false
        });
        out
    }

    /// Every summary held, windows closed or not (at shutdown).
    pub fn drain(&self) -> Vec<AuditRecord> {
        let mut groups = self.groups.lock().unwrap_or_else(|p| p.into_inner());
        groups
            .drain()
            .filter_map(|(group, mut held)| held.summary(group.is_overflow()))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::Outcome;
    use std::net::SocketAddr;

    fn refusal(peer: &str, caller: Option<&str>, code: &'static str, n: u32) -> AuditRecord {
        let mut r = AuditRecord::pending("GetToken", Some(peer.parse().unwrap()));
        r.request_id = format!("req-{n}");
        r.caller = caller.map(str::to_owned);
        r.outcome = Outcome::Denied;
        r.code = code;
        r.repeatable = true;
        r
    }

    fn written(out: [Option<AuditRecord>; 2]) -> Vec<String> {
        out.into_iter().flatten().map(|r| r.request_id).collect()
    }

    /// How many requests the records stand for.
    fn requests(records: &[AuditRecord]) -> u64 {
        records.iter().map(|r| r.repeats.unwrap_or(1)).sum()
    }

    #[test]
    fn a_burst_from_one_peer_is_its_first_record_and_one_summary() {
        let repeats = Repeats::default();
        let t0 = Instant::now();
        let mut all = Vec::new();
        for n in 0..100 {
            let out = repeats.admit(
                refusal("10.0.0.1:4000", None, "UNAUTHENTICATED", n),
                t0 + Duration::from_millis(u64::from(n)),
            );
            all.extend(out.into_iter().flatten());
        }
        assert_eq!(
            all.iter()
                .map(|r| r.request_id.as_str())
                .collect::<Vec<_>>(),
            ["req-0"]
        );
        assert!(repeats.closed(t0 + Duration::from_millis(999)).is_empty());
        let summaries = repeats.closed(t0 + WINDOW);
        assert_eq!(summaries.len(), 1);
        assert_eq!(
            summaries[0].request_id, "req-99",
            "the latest refusal is kept"
        );
        assert_eq!(summaries[0].repeats, Some(99));
        assert_eq!(summaries[0].peer, Some("10.0.0.1:4000".parse().unwrap()));
        all.extend(summaries);
        assert_eq!(requests(&all), 100, "every request is accounted for");
        // The group was forgotten: the next refusal is written in full again.
        let out = repeats.admit(
            refusal("10.0.0.1:4000", None, "UNAUTHENTICATED", 100),
            t0 + WINDOW,
        );
        assert_eq!(written(out), ["req-100"]);
    }

    #[test]
    fn a_refusal_after_the_window_writes_the_summary_and_itself() {
        let repeats = Repeats::default();
        let t0 = Instant::now();
        let peer = "10.0.0.1:4000";
        assert_eq!(
            written(repeats.admit(refusal(peer, None, "UNAUTHENTICATED", 0), t0)),
            ["req-0"]
        );
        assert!(written(repeats.admit(refusal(peer, None, "UNAUTHENTICATED", 1), t0)).is_empty());
        let out = repeats.admit(refusal(peer, None, "UNAUTHENTICATED", 2), t0 + WINDOW);
        assert_eq!(
            out[0].as_ref().unwrap().repeats,
            None,
            "one held: as it was"
        );
        assert_eq!(written(out), ["req-1", "req-2"]);
        assert!(
            repeats.closed(t0 + WINDOW * 3).is_empty(),
            "req-2 was written"
        );
    }

    #[test]
    fn peers_callers_and_codes_are_grouped_apart() {
        let repeats = Repeats::default();
        let t0 = Instant::now();
        let kinds = [
            ("10.0.0.1:1", None, "UNAUTHENTICATED"),
            ("10.0.0.1:2", None, "UNAUTHENTICATED"), // same address, another port: same group
            ("10.0.0.2:1", None, "UNAUTHENTICATED"),
            ("10.0.0.1:1", Some("collector"), "RESOURCE_EXHAUSTED"),
            ("10.0.0.1:1", Some("other"), "RESOURCE_EXHAUSTED"),
            ("10.0.0.1:1", None, "UNAVAILABLE"),
        ];
        let mut first = Vec::new();
        for round in 0..3 {
            for (i, (peer, caller, code)) in kinds.iter().enumerate() {
                let n = round * 10 + u32::try_from(i).unwrap();
                first.extend(written(repeats.admit(refusal(peer, *caller, code, n), t0)));
            }
        }
        assert_eq!(first, ["req-0", "req-2", "req-3", "req-4", "req-5"]);
        let summaries = repeats.closed(t0 + WINDOW);
        let mut counts: Vec<_> = summaries
            .iter()
            .map(|r| (r.request_id.as_str(), r.repeats))
            .collect();
        counts.sort();
        assert_eq!(
            counts,
            [
                ("req-21", Some(5)),
                ("req-22", Some(2)),
                ("req-23", Some(2)),
                ("req-24", Some(2)),
                ("req-25", Some(2)),
            ]
        );
    }

    #[test]
    fn past_the_group_limit_new_peers_share_a_summary_naming_none_of_them() {
        let repeats = Repeats::default();
        let t0 = Instant::now();
        let mut records = Vec::new();
        let peers = MAX_GROUPS + 50;
        for p in 0..peers {
            let addr = SocketAddr::from(([10, 1, (p >> 8) as u8, p as u8], 1000));
            for n in 0..2 {
                let mut r = refusal(&addr.to_string(), Some("c"), "UNAUTHENTICATED", n);
                r.peer = Some(SocketAddr::from((addr.ip(), 1000 + n as u16)));
                records.extend(repeats.admit(r, t0).into_iter().flatten());
            }
        }
        assert_eq!(
            records.len(),
            MAX_GROUPS + 1,
            "one record per group, the overflow group is one"
        );
        records.extend(repeats.drain());
        assert_eq!(requests(&records), 2 * peers as u64);
        let overflow: Vec<_> = records.iter().filter(|r| r.repeats == Some(99)).collect();
        assert_eq!(overflow.len(), 1, "the 50 peers' other 99 refusals");
        assert_eq!(
            (overflow[0].peer, overflow[0].caller.as_deref()),
            (None, None)
        );
        assert!(repeats.drain().is_empty());
    }
}
