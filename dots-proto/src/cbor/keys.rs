//! The CBOR key map of the DOTS signal channel (RFC 9132, Table 5 and the
//! IANA "DOTS Signal Channel CBOR Key Values" registry) and of Call Home
//! (RFC 9066, Table 1), with the type of every data node.
//!
//! Names are the JSON member names of the RFC figures: module-qualified at the
//! top level (`ietf-dots-signal-channel:...`) and for the leaves Call Home
//! augments into the base module (`ietf-dots-call-home:...`); everything
//! else is bare, as RFC 7951 prescribes.

/// Keys with this bit set are comprehension-optional (RFC 9132 §9): a peer
/// that does not know one ignores it.
pub const COMPREHENSION_OPTIONAL: u64 = 0x8000;

/// Whether an unknown `key` may be ignored rather than rejected.
pub fn is_comprehension_optional(key: u64) -> bool {
    key & COMPREHENSION_OPTIONAL != 0
}

/// Named CBOR keys, so code never spells a bare number.
pub mod key {
    pub const MITIGATION_SCOPE: u64 = 1;
    pub const SCOPE: u64 = 2;
    pub const CDID: u64 = 3;
    pub const CUID: u64 = 4;
    pub const MID: u64 = 5;
    pub const TARGET_PREFIX: u64 = 6;
    pub const TARGET_PORT_RANGE: u64 = 7;
    pub const LOWER_PORT: u64 = 8;
    pub const UPPER_PORT: u64 = 9;
    pub const TARGET_PROTOCOL: u64 = 10;
    pub const TARGET_FQDN: u64 = 11;
    pub const TARGET_URI: u64 = 12;
    pub const ALIAS_NAME: u64 = 13;
    pub const LIFETIME: u64 = 14;
    pub const MITIGATION_START: u64 = 15;
    pub const STATUS: u64 = 16;
    pub const CONFLICT_INFORMATION: u64 = 17;
    pub const CONFLICT_STATUS: u64 = 18;
    pub const CONFLICT_CAUSE: u64 = 19;
    pub const RETRY_TIMER: u64 = 20;
    pub const CONFLICT_SCOPE: u64 = 21;
    pub const ACL_LIST: u64 = 22;
    pub const ACL_NAME: u64 = 23;
    pub const ACL_TYPE: u64 = 24;
    pub const BYTES_DROPPED: u64 = 25;
    pub const BPS_DROPPED: u64 = 26;
    pub const PKTS_DROPPED: u64 = 27;
    pub const PPS_DROPPED: u64 = 28;
    pub const ATTACK_STATUS: u64 = 29;
    pub const SIGNAL_CONFIG: u64 = 30;
    pub const SID: u64 = 31;
    pub const MITIGATING_CONFIG: u64 = 32;
    pub const HEARTBEAT_INTERVAL: u64 = 33;
    pub const MAX_VALUE: u64 = 34;
    pub const MIN_VALUE: u64 = 35;
    pub const CURRENT_VALUE: u64 = 36;
    pub const MISSING_HB_ALLOWED: u64 = 37;
    pub const MAX_RETRANSMIT: u64 = 38;
    pub const ACK_TIMEOUT: u64 = 39;
    pub const ACK_RANDOM_FACTOR: u64 = 40;
    pub const MAX_VALUE_DECIMAL: u64 = 41;
    pub const MIN_VALUE_DECIMAL: u64 = 42;
    pub const CURRENT_VALUE_DECIMAL: u64 = 43;
    pub const IDLE_CONFIG: u64 = 44;
    pub const TRIGGER_MITIGATION: u64 = 45;
    pub const REDIRECTED_SIGNAL: u64 = 46;
    pub const ALT_SERVER: u64 = 47;
    pub const ALT_SERVER_RECORD: u64 = 48;
    pub const HEARTBEAT: u64 = 49;
    pub const PROBING_RATE: u64 = 50;
    pub const PEER_HB_STATUS: u64 = 51;
    pub const SOURCE_PREFIX: u64 = 0x8000;
    pub const SOURCE_PORT_RANGE: u64 = 0x8001;
    pub const SOURCE_ICMP_TYPE_RANGE: u64 = 0x8002;
    pub const LOWER_TYPE: u64 = 0x8003;
    pub const UPPER_TYPE: u64 = 0x8004;
    pub const ALT_CH_CLIENT: u64 = 0x8005;
    pub const ALT_CH_CLIENT_RECORD: u64 = 0x8006;
    pub const TTL: u64 = 0x8007;
}

/// How a data node is carried in CBOR and in JSON (RFC 7951).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ValueType {
    /// YANG container: CBOR map, JSON object.
    Container,
    /// YANG list: CBOR array of maps, JSON array of objects.
    List,
    /// string, FQDN, identityref: CBOR text, JSON string.
    Text,
    /// leaf-list of strings (prefixes, addresses, names).
    TextList,
    /// uint8/16/32 up to `max`: CBOR unsigned, JSON number.
    Uint { max: u64 },
    /// leaf-list of unsigned up to `max` (target-protocol).
    UintList { max: u64 },
    /// uint64 counters and timestamps: CBOR unsigned, JSON string (RFC 7951 §6.1).
    Uint64,
    /// `lifetime`, a union of uint32 and int32: CBOR major type 0 or 1, JSON number.
    Lifetime,
    /// enumeration: CBOR unsigned, JSON string holding the enum name.
    Enum(&'static [(u64, &'static str)]),
    /// boolean: CBOR simple 20/21, JSON true/false.
    Bool,
    /// decimal64 with 2 fraction digits: CBOR tag 4 `[-2, m]`, JSON string "2.00".
    Decimal,
}

/// One row of the key map.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyDef {
    pub key: u64,
    pub name: &'static str,
    pub ty: ValueType,
}

/// `status` codes (RFC 9132 §4.4.2).
pub const STATUS_NAMES: &[(u64, &str)] = &[
    (1, "attack-mitigation-in-progress"),
    (2, "attack-successfully-mitigated"),
    (3, "attack-stopped"),
    (4, "attack-exceeded-capability"),
    (5, "dots-client-withdrawn-mitigation"),
    (6, "attack-mitigation-terminated"),
    (7, "attack-mitigation-withdrawn"),
    (8, "attack-mitigation-signal-loss"),
];
/// `conflict-status` codes (RFC 9132 §4.4.1).
pub const CONFLICT_STATUS_NAMES: &[(u64, &str)] = &[
    (1, "request-inactive-other-active"),
    (2, "request-active"),
    (3, "all-requests-inactive"),
];
/// `conflict-cause` codes (RFC 9132 §4.4.1, RFC 9066 §7.2 for 4).
pub const CONFLICT_CAUSE_NAMES: &[(u64, &str)] = &[
    (1, "overlapping-targets"),
    (2, "conflict-with-acceptlist"),
    (3, "cuid-collision"),
    (4, "request-rejected-legitimate-traffic"),
];
/// `attack-status` codes (RFC 9132 §4.4.3).
pub const ATTACK_STATUS_NAMES: &[(u64, &str)] =
    &[(1, "under-attack"), (2, "attack-successfully-mitigated")];

const U8: ValueType = ValueType::Uint {
    max: u8::MAX as u64,
};
const U16: ValueType = ValueType::Uint {
    max: u16::MAX as u64,
};
const U32: ValueType = ValueType::Uint {
    max: u32::MAX as u64,
};

const fn def(key: u64, name: &'static str, ty: ValueType) -> KeyDef {
    KeyDef { key, name, ty }
}

/// The whole key map, sorted by key.
pub const KEYS: &[KeyDef] = {
    use key::*;
    use ValueType::*;
    &[
        def(
            MITIGATION_SCOPE,
            "ietf-dots-signal-channel:mitigation-scope",
            Container,
        ),
        def(SCOPE, "scope", List),
        def(CDID, "cdid", Text),
        def(CUID, "cuid", Text),
        def(MID, "mid", U32),
        def(TARGET_PREFIX, "target-prefix", TextList),
        def(TARGET_PORT_RANGE, "target-port-range", List),
        def(LOWER_PORT, "lower-port", U16),
        def(UPPER_PORT, "upper-port", U16),
        def(
            TARGET_PROTOCOL,
            "target-protocol",
            UintList {
                max: u8::MAX as u64,
            },
        ),
        def(TARGET_FQDN, "target-fqdn", TextList),
        def(TARGET_URI, "target-uri", TextList),
        def(ALIAS_NAME, "alias-name", TextList),
        def(LIFETIME, "lifetime", Lifetime),
        def(MITIGATION_START, "mitigation-start", Uint64),
        def(STATUS, "status", Enum(STATUS_NAMES)),
        def(CONFLICT_INFORMATION, "conflict-information", Container),
        def(
            CONFLICT_STATUS,
            "conflict-status",
            Enum(CONFLICT_STATUS_NAMES),
        ),
        def(CONFLICT_CAUSE, "conflict-cause", Enum(CONFLICT_CAUSE_NAMES)),
        def(RETRY_TIMER, "retry-timer", U32),
        def(CONFLICT_SCOPE, "conflict-scope", Container),
        def(ACL_LIST, "acl-list", List),
        def(ACL_NAME, "acl-name", Text),
        def(ACL_TYPE, "acl-type", Text),
        def(BYTES_DROPPED, "bytes-dropped", Uint64),
        def(BPS_DROPPED, "bps-dropped", Uint64),
        def(PKTS_DROPPED, "pkts-dropped", Uint64),
        def(PPS_DROPPED, "pps-dropped", Uint64),
        def(ATTACK_STATUS, "attack-status", Enum(ATTACK_STATUS_NAMES)),
        def(
            SIGNAL_CONFIG,
            "ietf-dots-signal-channel:signal-config",
            Container,
        ),
        def(SID, "sid", U32),
        def(MITIGATING_CONFIG, "mitigating-config", Container),
        def(HEARTBEAT_INTERVAL, "heartbeat-interval", Container),
        // max/min/current-value are uint16 except under probing-rate (uint64),
        // so the table admits the wider range; the typed model narrows it.
        def(MAX_VALUE, "max-value", Uint { max: u64::MAX }),
        def(MIN_VALUE, "min-value", Uint { max: u64::MAX }),
        def(CURRENT_VALUE, "current-value", Uint { max: u64::MAX }),
        def(MISSING_HB_ALLOWED, "missing-hb-allowed", Container),
        def(MAX_RETRANSMIT, "max-retransmit", Container),
        def(ACK_TIMEOUT, "ack-timeout", Container),
        def(ACK_RANDOM_FACTOR, "ack-random-factor", Container),
        def(MAX_VALUE_DECIMAL, "max-value-decimal", Decimal),
        def(MIN_VALUE_DECIMAL, "min-value-decimal", Decimal),
        def(CURRENT_VALUE_DECIMAL, "current-value-decimal", Decimal),
        def(IDLE_CONFIG, "idle-config", Container),
        def(TRIGGER_MITIGATION, "trigger-mitigation", Bool),
        def(
            REDIRECTED_SIGNAL,
            "ietf-dots-signal-channel:redirected-signal",
            Container,
        ),
        def(ALT_SERVER, "alt-server", Text),
        def(ALT_SERVER_RECORD, "alt-server-record", TextList),
        def(HEARTBEAT, "ietf-dots-signal-channel:heartbeat", Container),
        def(PROBING_RATE, "probing-rate", Container),
        def(PEER_HB_STATUS, "peer-hb-status", Bool),
        def(SOURCE_PREFIX, "ietf-dots-call-home:source-prefix", TextList),
        def(
            SOURCE_PORT_RANGE,
            "ietf-dots-call-home:source-port-range",
            List,
        ),
        def(
            SOURCE_ICMP_TYPE_RANGE,
            "ietf-dots-call-home:source-icmp-type-range",
            List,
        ),
        def(LOWER_TYPE, "lower-type", U8),
        def(UPPER_TYPE, "upper-type", U8),
        def(ALT_CH_CLIENT, "ietf-dots-call-home:alt-ch-client", Text),
        def(
            ALT_CH_CLIENT_RECORD,
            "ietf-dots-call-home:alt-ch-client-record",
            TextList,
        ),
        def(TTL, "ietf-dots-call-home:ttl", U32),
    ]
};

/// The row for a CBOR key.
pub fn by_key(key: u64) -> Option<&'static KeyDef> {
    KEYS.binary_search_by_key(&key, |d| d.key)
        .ok()
        .and_then(|i| KEYS.get(i))
}

/// The row for a JSON name.
pub fn by_name(name: &str) -> Option<&'static KeyDef> {
    KEYS.iter().find(|d| d.name == name)
}

/// CBOR key -> JSON name.
pub fn name_of(key: u64) -> Option<&'static str> {
    by_key(key).map(|d| d.name)
}

/// JSON name -> CBOR key.
pub fn key_of(name: &str) -> Option<u64> {
    by_name(name).map(|d| d.key)
}

/// The name of `key` for error messages, or the number when unknown.
pub(crate) fn describe(key: u64) -> String {
    name_of(key).map_or_else(|| key.to_string(), str::to_owned)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_is_sorted_and_unique() {
        for pair in KEYS.windows(2) {
            assert!(
                pair[0].key < pair[1].key,
                "{:?} before {:?}",
                pair[0],
                pair[1]
            );
        }
        for d in KEYS {
            assert_eq!(
                KEYS.iter().filter(|o| o.name == d.name).count(),
                1,
                "{}",
                d.name
            );
        }
    }

    #[test]
    fn both_directions() {
        assert_eq!(key_of("ietf-dots-signal-channel:mitigation-scope"), Some(1));
        assert_eq!(name_of(51), Some("peer-hb-status"));
        assert_eq!(key_of("ietf-dots-call-home:source-prefix"), Some(32768));
        assert_eq!(name_of(32772), Some("upper-type"));
        assert_eq!(key_of("ietf-dots-call-home:ttl"), Some(32775));
        assert_eq!(name_of(52), None);
        assert_eq!(
            key_of("source-prefix"),
            None,
            "Call Home leaves are module-qualified"
        );
        for d in KEYS {
            assert_eq!(by_key(d.key), Some(d));
            assert_eq!(by_name(d.name), Some(d));
        }
    }

    #[test]
    fn call_home_keys_are_comprehension_optional() {
        for d in KEYS.iter().filter(|d| d.key >= 0x8000) {
            assert!(is_comprehension_optional(d.key), "{}", d.name);
        }
        assert!(!is_comprehension_optional(key::LIFETIME));
    }
}
