//! Codec round trips of the typed messages over generated values.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use proptest::collection::vec;
use proptest::option;
use proptest::prelude::*;

use super::*;
use crate::cbor::Decimal;

fn ip_net() -> impl Strategy<Value = IpNet> {
    prop_oneof![
        (any::<u32>(), 0..=32u8).prop_filter_map("v4", |(a, l)| {
            Ipv4Net::new(Ipv4Addr::from(a), l).ok().map(IpNet::V4)
        }),
        (any::<u128>(), 0..=128u8).prop_filter_map("v6", |(a, l)| {
            Ipv6Net::new(Ipv6Addr::from(a), l).ok().map(IpNet::V6)
        }),
    ]
}

fn ip_addr() -> impl Strategy<Value = IpAddr> {
    prop_oneof![
        any::<u32>().prop_map(|a| IpAddr::V4(a.into())),
        any::<u128>().prop_map(|a| IpAddr::V6(a.into())),
    ]
}

fn name() -> impl Strategy<Value = String> {
    "[a-z0-9.-]{1,16}"
}

fn port_range() -> impl Strategy<Value = PortRange> {
    (any::<u16>(), option::of(any::<u16>())).prop_map(|(lower, upper)| PortRange { lower, upper })
}

fn conflict_information() -> impl Strategy<Value = ConflictInformation> {
    (
        option::of((1..=3u64).prop_filter_map("code", ConflictStatus::from_code)),
        option::of((1..=4u64).prop_filter_map("code", ConflictCause::from_code)),
        option::of(any::<u32>()),
        option::of((
            vec(ip_net(), 0..3),
            vec(port_range(), 0..3),
            option::of(any::<u32>()),
            vec(
                (name(), option::of(name())).prop_map(|(name, acl_type)| Acl { name, acl_type }),
                0..2,
            ),
        )),
    )
        .prop_map(|(conflict_status, conflict_cause, retry_timer, scope)| {
            ConflictInformation {
                conflict_status,
                conflict_cause,
                retry_timer,
                conflict_scope: scope.map(|(target_prefix, target_port_range, mid, acl_list)| {
                    ConflictScope {
                        target_prefix,
                        target_port_range,
                        mid,
                        acl_list,
                        ..Default::default()
                    }
                }),
            }
        })
}

fn scope() -> impl Strategy<Value = Scope> {
    let ids = (
        option::of(name()),
        option::of(name()),
        option::of(any::<u32>()),
    );
    let targets = (
        vec(ip_net(), 0..4),
        vec(port_range(), 0..3),
        vec(any::<u8>(), 0..3),
        vec(name(), 0..2),
        vec(name(), 0..2),
        vec(name(), 0..2),
    );
    let sources = (
        vec(ip_net(), 0..4),
        vec(port_range(), 0..3),
        vec(
            (any::<u8>(), option::of(any::<u8>()))
                .prop_map(|(lower, upper)| IcmpTypeRange { lower, upper }),
            0..3,
        ),
    );
    let state = (
        option::of(i64::from(i32::MIN)..=i64::from(u32::MAX)),
        option::of(any::<bool>()),
        option::of((1..=8u64).prop_filter_map("code", MitigationStatus::from_code)),
        option::of(any::<u64>()),
        [
            option::of(any::<u64>()),
            option::of(any::<u64>()),
            option::of(any::<u64>()),
            option::of(any::<u64>()),
        ],
        option::of((1..=2u64).prop_filter_map("code", AttackStatus::from_code)),
        option::of(conflict_information()),
    );
    (ids, targets, sources, state).prop_map(|(ids, targets, sources, state)| Scope {
        cdid: ids.0,
        cuid: ids.1,
        mid: ids.2,
        target_prefix: targets.0,
        target_port_range: targets.1,
        target_protocol: targets.2,
        target_fqdn: targets.3,
        target_uri: targets.4,
        alias_name: targets.5,
        source_prefix: sources.0,
        source_port_range: sources.1,
        source_icmp_type_range: sources.2,
        lifetime: state.0,
        trigger_mitigation: state.1,
        status: state.2,
        mitigation_start: state.3,
        bytes_dropped: state.4[0],
        bps_dropped: state.4[1],
        pkts_dropped: state.4[2],
        pps_dropped: state.4[3],
        attack_status: state.5,
        conflict_information: state.6,
    })
}

fn min_max_current<T: std::fmt::Debug>(
    value: impl Strategy<Value = T> + Clone,
) -> impl Strategy<Value = MinMaxCurrent<T>> {
    (
        option::of(value.clone()),
        option::of(value.clone()),
        option::of(value),
    )
        .prop_map(|(max, min, current)| MinMaxCurrent { max, min, current })
}

fn config_set() -> impl Strategy<Value = ConfigSet> {
    let decimal = any::<i64>().prop_map(Decimal::from_hundredths);
    (
        min_max_current(any::<u16>()),
        min_max_current(any::<u16>()),
        min_max_current(any::<u16>()),
        min_max_current(decimal.clone()),
        min_max_current(decimal),
        min_max_current(any::<u64>()),
    )
        .prop_map(
            |(hb, missing, retransmit, ack_timeout, factor, probing)| ConfigSet {
                heartbeat_interval: hb,
                missing_hb_allowed: missing,
                max_retransmit: retransmit,
                ack_timeout,
                ack_random_factor: factor,
                probing_rate: probing,
            },
        )
}

/// CBOR and JSON round trips of one message.
fn round_trips<M: DotsMessage + PartialEq + std::fmt::Debug>(m: &M) -> Result<(), TestCaseError> {
    prop_assert_eq!(&M::decode(&m.encode())?, m);
    let json = m.to_json()?;
    prop_assert_eq!(&M::from_json(&json)?, m);
    Ok(())
}

proptest! {
    #[test]
    fn mitigation_scope(scopes in vec(scope(), 0..3)) {
        round_trips(&MitigationScope { scopes })?;
    }

    #[test]
    fn signal_config(
        sid in option::of(any::<u32>()),
        mitigating in option::of(config_set()),
        idle in option::of(config_set()),
    ) {
        round_trips(&SignalConfig { sid, mitigating_config: mitigating, idle_config: idle })?;
    }

    #[test]
    fn heartbeat(peer_hb_status in any::<bool>()) {
        round_trips(&Heartbeat { peer_hb_status })?;
    }

    #[test]
    fn redirected_signal(
        alt_ch_client in name(),
        records in vec(ip_addr(), 0..4),
        ttl in option::of(any::<u32>()),
    ) {
        round_trips(&RedirectedSignal { alt_ch_client, alt_ch_client_record: records, ttl })?;
    }

    /// Arbitrary bytes never panic the decoders.
    #[test]
    fn decoding_garbage_does_not_panic(bytes in vec(any::<u8>(), 0..64)) {
        let _ = MitigationScope::decode(&bytes);
        let _ = SignalConfig::decode(&bytes);
        let _ = crate::cbor::cbor_to_json(&bytes);
    }
}
