//! Region tests: hosts on a bridge reach each other, a shaped host sees its configured delay,
//! and a host whose link is set down is partitioned until it is set up again. Need root.

mod support;

use std::net::UdpSocket;
use std::time::Duration;

use novacron_linkemu::{DirectionShape, HostLinkShape, Region, RunningRegion};
use support::{EchoServer, measure_round_trips, median, namespace_exists, wait_until};

fn socket_on(region: &RunningRegion, host: usize) -> UdpSocket {
    let address = region.host(host).expect("host").address();
    region
        .in_host(host, move || UdpSocket::bind((address, 0)))
        .expect("enter host namespace")
        .expect("bind")
}

#[test]
fn hosts_reach_each_other_and_partitions_heal() {
    let one_way = Duration::from_millis(15);
    let shaped = DirectionShape {
        delay: one_way,
        ..Default::default()
    };
    let region = Region::builder()
        .name_prefix("region")
        .hosts(3)
        .shape_host(
            2,
            HostLinkShape {
                outbound: shaped.clone(),
                inbound: shaped,
            },
        )
        .spawn()
        .expect("spawn region");
    let echo_1 = EchoServer::start(socket_on(&region, 1));
    let echo_2 = EchoServer::start(socket_on(&region, 2));
    let client = socket_on(&region, 0);

    let mut fast = measure_round_trips(&client, echo_1.address, 10, Duration::from_secs(2));
    assert_eq!(fast.len(), 10, "host 1 reachable over the bridge");
    assert!(median(&mut fast) < Duration::from_millis(10));

    let mut slow = measure_round_trips(&client, echo_2.address, 10, Duration::from_secs(2));
    assert!(slow.len() >= 9, "host 2 reachable through its shaped link");
    let slow_median = median(&mut slow);
    assert!(
        slow_median >= 2 * one_way && slow_median <= (2 * one_way).mul_f64(1.10),
        "shaped host round trip {slow_median:?}"
    );
    let (outbound, inbound) = region.host_counters(2).expect("host 2 is shaped");
    assert!(outbound.packets_forwarded > 0 && inbound.packets_forwarded > 0);

    region.set_host_link_up(1, false).expect("cut host 1");
    assert!(measure_round_trips(&client, echo_1.address, 3, Duration::from_millis(300)).is_empty());
    region.set_host_link_up(1, true).expect("reconnect host 1");
    assert!(wait_until(Duration::from_secs(10), || {
        !measure_round_trips(&client, echo_1.address, 1, Duration::from_millis(200)).is_empty()
    }));

    let namespaces: Vec<String> = region
        .hosts()
        .iter()
        .map(|host| host.namespace().to_owned())
        .chain([region.switch_namespace().to_owned()])
        .collect();
    drop((echo_1, echo_2));
    drop(region);
    assert!(namespaces.iter().all(|name| !namespace_exists(name)));
}

#[test]
fn sites_are_joined_by_a_shaped_link_that_can_be_cut() {
    let one_way = Duration::from_millis(20);
    let wan = DirectionShape {
        delay: one_way,
        ..Default::default()
    };
    let region = Region::builder()
        .name_prefix("sites")
        .hosts(4)
        .sites(&[0, 0, 1, 1])
        .inter_site_shape(HostLinkShape {
            outbound: wan.clone(),
            inbound: wan,
        })
        .spawn()
        .expect("spawn region");
    assert_eq!(region.host(2).expect("host").site(), 1);
    let echo_1 = EchoServer::start(socket_on(&region, 1));
    let echo_2 = EchoServer::start(socket_on(&region, 2));
    let echo_3 = EchoServer::start(socket_on(&region, 3));
    let client_0 = socket_on(&region, 0);
    let client_2 = socket_on(&region, 2);

    let mut local = measure_round_trips(&client_0, echo_1.address, 10, Duration::from_secs(2));
    assert_eq!(local.len(), 10);
    assert!(median(&mut local) < Duration::from_millis(10));
    let mut remote = measure_round_trips(&client_0, echo_2.address, 10, Duration::from_secs(2));
    assert!(remote.len() >= 9, "the other site is reachable");
    let remote = median(&mut remote);
    assert!(
        remote >= 2 * one_way && remote <= (2 * one_way).mul_f64(1.10),
        "round trip between sites {remote:?}"
    );

    region.set_site_connected(1, false).expect("cut site 1");
    assert!(
        measure_round_trips(&client_0, echo_2.address, 3, Duration::from_millis(300)).is_empty()
    );
    assert_eq!(
        measure_round_trips(&client_2, echo_3.address, 3, Duration::from_secs(2)).len(),
        3,
        "hosts within the cut-off site still reach each other"
    );
    assert!(
        region
            .site_link_counters(1)
            .expect("site link")
            .0
            .dropped_while_disconnected
            > 0
            || region
                .site_link_counters(1)
                .expect("site link")
                .1
                .dropped_while_disconnected
                > 0
    );
    region
        .set_site_connected(1, true)
        .expect("reconnect site 1");
    assert!(wait_until(Duration::from_secs(10), || {
        !measure_round_trips(&client_0, echo_2.address, 1, Duration::from_millis(300)).is_empty()
    }));
    assert!(region.set_site_connected(5, false).is_err());
}
