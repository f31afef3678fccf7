use std::net::Ipv4Addr;

use super::fake::{FakeIptables, FakeSys};
use super::nat::{split_words, tagged_rules};
use super::*;

const IPT: &str = "/usr/sbin/iptables";

fn plan() -> LinkPlan {
    LinkPlan::new(
        Ipv4Addr::new(172, 19, 0, 1),
        Ipv4Addr::new(172, 19, 0, 2),
        30,
    )
}

fn strs(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

/// Every interface but the workspace's own link, as Docker does, so secondary interfaces (Multus) work.
const MASQ: &str = "-s 172.19.0.0/30 ! -o envbox0 -m comment --comment envbox -j MASQUERADE";
const FWD_IN: &str = "-i envbox0 -m comment --comment envbox -j ACCEPT";
const FWD_OUT: &str =
    "-o envbox0 -m conntrack --ctstate RELATED,ESTABLISHED -m comment --comment envbox -j ACCEPT";

#[test]
fn setup_order_on_a_fresh_pod() {
    let mut sys = FakeSys::new();
    let ipt = FakeIptables::default();
    setup_with(&mut sys, &plan(), 4242, 1450, &ipt).unwrap();

    assert_eq!(
        sys.take_log(),
        strs(&[
            "sys: open_netns 4242",
            "pod: delete_link envbox0 (false)",
            "pod: delete_link envbox0-p (false)",
            "pod: create_veth envbox0 envbox0-p mtu=1450",
            "pod: move_to_netns envbox0-p",
            "pod: add_addr envbox0 172.19.0.1/30",
            "pod: set_up envbox0",
            "sys: enter workspace netns",
            "ws: rename envbox0-p eth0",
            "ws: set_mtu eth0 1450",
            "ws: add_addr eth0 172.19.0.2/30",
            "ws: set_up eth0",
            "ws: set_up lo",
            "ws: add_default_route via 172.19.0.1 dev eth0",
            "sys: leave workspace netns",
            "sys: ip_forward=1",
        ])
    );
    let w = sys.world();
    assert!(w.ip_forward);
    let ws_eth0 = &w.ws["eth0"];
    assert_eq!((ws_eth0.mtu, ws_eth0.up), (1450, true));
    assert_eq!(ws_eth0.addrs, vec![(Ipv4Addr::new(172, 19, 0, 2), 30)]);
    assert!(w.ws["lo"].up);
    assert_eq!(
        w.ws_default_route,
        Some((Ipv4Addr::new(172, 19, 0, 1), "eth0".into()))
    );
    let host = &w.pod["envbox0"];
    assert_eq!((host.mtu, host.up), (1450, true));
    assert_eq!(host.addrs, vec![(Ipv4Addr::new(172, 19, 0, 1), 30)]);
    assert!(!w.pod.contains_key("envbox0-p"));
    drop(w);

    // iptables: list both chains (stale cleanup), then check-and-add each rule.
    assert_eq!(
        *ipt.calls.borrow(),
        vec![
            format!("{IPT} -w -t nat -S POSTROUTING"),
            format!("{IPT} -w -t filter -S FORWARD"),
            format!("{IPT} -w -t nat -C POSTROUTING {MASQ}"),
            format!("{IPT} -w -t nat -A POSTROUTING {MASQ}"),
            format!("{IPT} -w -t filter -C FORWARD {FWD_IN}"),
            format!("{IPT} -w -t filter -I FORWARD 1 {FWD_IN}"),
            format!("{IPT} -w -t filter -C FORWARD {FWD_OUT}"),
            format!("{IPT} -w -t filter -I FORWARD 1 {FWD_OUT}"),
        ]
    );
    assert_eq!(ipt.rules_in("nat", "POSTROUTING"), vec![MASQ]);
    assert_eq!(ipt.rules_in("filter", "FORWARD"), vec![FWD_OUT, FWD_IN]);
}

#[test]
fn setup_twice_replaces_the_stale_link_and_keeps_one_copy_of_each_rule() {
    let mut sys = FakeSys::new();
    let ipt = FakeIptables::default();
    setup_with(&mut sys, &plan(), 100, 1450, &ipt).unwrap();
    sys.take_log();
    ipt.calls.borrow_mut().clear();

    // A crash-restart in the same pod netns: the old link is still there.
    setup_with(&mut sys, &plan(), 200, 1450, &ipt).unwrap();
    let log = sys.take_log();
    assert_eq!(log[1], "pod: delete_link envbox0 (true)");
    // Deleting one end removed the peer too, so the rest runs as on a fresh pod.
    assert_eq!(log[2], "pod: delete_link envbox0-p (false)");
    assert!(log.contains(&"ws: rename envbox0-p eth0".to_string()));

    assert_eq!(ipt.rules_in("nat", "POSTROUTING"), vec![MASQ]);
    assert_eq!(ipt.rules_in("filter", "FORWARD"), vec![FWD_OUT, FWD_IN]);
    // No rule was deleted or added again.
    assert!(
        ipt.calls
            .borrow()
            .iter()
            .all(|c| !c.contains(" -A ") && !c.contains(" -I ") && !c.contains(" -D ")),
        "{:?}",
        ipt.calls.borrow()
    );
}

#[test]
fn setup_removes_stale_rules_of_other_settings_and_leaves_foreign_rules() {
    let mut sys = FakeSys::new();
    let ipt = FakeIptables::default();
    ipt.add(
        "nat",
        "POSTROUTING",
        "-s 10.0.0.0/24 -o eth0 -m comment --comment envbox -j MASQUERADE",
    );
    // What envbox before `! -o <link>` added: replaced on upgrade.
    ipt.add(
        "nat",
        "POSTROUTING",
        "-s 172.19.0.0/30 -o eth0 -m comment --comment envbox -j MASQUERADE",
    );
    ipt.add("nat", "POSTROUTING", "-s 10.9.0.0/16 -o eth0 -j MASQUERADE");
    ipt.add("nat", "POSTROUTING", MASQ);
    ipt.add("nat", "POSTROUTING", MASQ); // duplicate from a racy earlier start
    ipt.add(
        "filter",
        "FORWARD",
        "-i old0 -m comment --comment envbox -j ACCEPT",
    );
    ipt.add(
        "filter",
        "FORWARD",
        "-i x -m comment --comment \"envbox other\" -j ACCEPT",
    );

    setup_with(&mut sys, &plan(), 1, 1500, &ipt).unwrap();
    assert_eq!(
        ipt.rules_in("nat", "POSTROUTING"),
        vec!["-s 10.9.0.0/16 -o eth0 -j MASQUERADE", MASQ]
    );
    assert_eq!(
        ipt.rules_in("filter", "FORWARD"),
        vec![
            FWD_OUT,
            FWD_IN,
            "-i x -m comment --comment \"envbox other\" -j ACCEPT"
        ]
    );
}

#[test]
fn teardown_removes_link_and_rules_and_is_idempotent() {
    let mut sys = FakeSys::new();
    let ipt = FakeIptables::default();
    ipt.add("nat", "POSTROUTING", "-s 10.9.0.0/16 -o eth0 -j MASQUERADE");
    setup_with(&mut sys, &plan(), 7, 1450, &ipt).unwrap();
    teardown_with(&mut sys, &plan(), &ipt).unwrap();
    {
        let w = sys.world();
        assert!(!w.pod.contains_key("envbox0"));
        assert!(!w.ws.contains_key("eth0"), "peer goes with the pod side");
        assert_eq!(w.ws_default_route, None);
    }
    assert_eq!(
        ipt.rules_in("nat", "POSTROUTING"),
        vec!["-s 10.9.0.0/16 -o eth0 -j MASQUERADE"]
    );
    assert!(ipt.rules_in("filter", "FORWARD").is_empty());

    sys.take_log();
    teardown_with(&mut sys, &plan(), &ipt).unwrap();
    assert_eq!(
        sys.take_log(),
        strs(&[
            "pod: delete_link envbox0 (false)",
            "pod: delete_link envbox0-p (false)"
        ])
    );
}

#[test]
fn teardown_without_iptables_still_removes_the_link() {
    let mut sys = FakeSys::new();
    let ipt = FakeIptables::default();
    setup_with(&mut sys, &plan(), 7, 1450, &ipt).unwrap();
    sys.world().iptables = None;
    teardown_with(&mut sys, &plan(), &ipt).unwrap();
    assert!(!sys.world().pod.contains_key("envbox0"));
}

#[test]
fn missing_iptables_fails_before_any_change() {
    let mut sys = FakeSys::new();
    sys.world().iptables = None;
    let ipt = FakeIptables::default();
    let err = setup_with(&mut sys, &plan(), 7, 1450, &ipt).unwrap_err();
    assert!(matches!(err, NetError::IptablesMissing { .. }));
    assert!(
        err.to_string().contains("iptables not found on PATH"),
        "{err}"
    );
    assert!(sys.take_log().is_empty());
    assert!(ipt.calls.borrow().is_empty());
}

#[test]
fn workspace_side_failure_names_op_and_interface_and_rolls_back() {
    let mut sys = FakeSys::new();
    sys.world().fail = Some("ws: add_addr eth0".into());
    let ipt = FakeIptables::default();
    let err = setup_with(&mut sys, &plan(), 7, 1450, &ipt).unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("add address") && msg.contains("\"eth0\""),
        "{msg}"
    );
    assert_eq!(err.raw_os_error(), Some(libc::EPERM));
    let w = sys.world();
    assert!(
        !w.pod.contains_key("envbox0"),
        "pod side removed after failure"
    );
    assert!(!w.ws.contains_key("eth0"));
    assert!(!w.ip_forward, "no NAT after a failed link");
    assert!(ipt.calls.borrow().is_empty());
}

#[test]
fn pod_side_failure_names_op_and_interface() {
    let mut sys = FakeSys::new();
    sys.world().fail = Some("pod: create_veth".into());
    let ipt = FakeIptables::default();
    let msg = setup_with(&mut sys, &plan(), 7, 1450, &ipt)
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("create veth pair") && msg.contains("\"envbox0\""),
        "{msg}"
    );
}

#[test]
fn iptables_failure_names_command_and_stderr() {
    let mut sys = FakeSys::new();
    let ipt = FakeIptables::default();
    *ipt.fail.borrow_mut() = Some((
        "MASQUERADE".into(),
        "iptables v1.8.9 (nf_tables): Couldn't load target `MASQUERADE'".into(),
    ));
    let msg = setup_with(&mut sys, &plan(), 7, 1450, &ipt)
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains(&format!("{IPT} -w -t nat -A POSTROUTING")),
        "{msg}"
    );
    assert!(msg.contains("Couldn't load target"), "{msg}");
}

#[test]
fn invalid_plans_fail_before_any_change() {
    let cases: Vec<(LinkPlan, u32, &str)> = vec![
        (
            LinkPlan {
                prefix: 31,
                ..plan()
            },
            1450,
            "CODER_DOCKER_BRIDGE_CIDR",
        ),
        (
            LinkPlan {
                workspace_addr: Ipv4Addr::new(172, 19, 0, 3),
                ..plan()
            },
            1450,
            "broadcast",
        ),
        (
            LinkPlan {
                workspace_addr: Ipv4Addr::new(10, 0, 0, 2),
                ..plan()
            },
            1450,
            "outside",
        ),
        (
            LinkPlan {
                workspace_addr: Ipv4Addr::new(172, 19, 0, 1),
                ..plan()
            },
            1450,
            "same",
        ),
        (
            LinkPlan {
                host_ifname: "a-very-long-name0".into(),
                ..plan()
            },
            1450,
            "interface name",
        ),
        (
            LinkPlan {
                uplink: "eth0/../x".into(),
                ..plan()
            },
            1450,
            "interface name",
        ),
        (plan(), 20, "MTU 20"),
        (plan(), 70000, "MTU 70000"),
    ];
    for (p, mtu, want) in cases {
        let mut sys = FakeSys::new();
        let ipt = FakeIptables::default();
        let msg = setup_with(&mut sys, &p, 7, mtu, &ipt)
            .unwrap_err()
            .to_string();
        assert!(msg.contains(want), "{p:?}: {msg}");
        assert!(sys.take_log().is_empty());
    }
}

#[test]
fn temp_peer_name_fits_ifnamsiz() {
    let mut p = plan();
    assert_eq!(p.temp_peer_name(), "envbox0-p");
    p.host_ifname = "abcdefghijklmno".into();
    assert_eq!(p.temp_peer_name(), "abcdefghijklm-p");
    assert!(p.temp_peer_name().len() <= 15);
}

// ---- overlap -------------------------------------------------------------------------

fn pn(ifname: &str, cidr: &str, source: PodNetSource) -> PodNet {
    PodNet {
        ifname: ifname.into(),
        cidr: cidr.parse().unwrap(),
        source,
    }
}

#[test]
fn cidr_basics() {
    let c: Ipv4Cidr = "172.19.0.1/30".parse().unwrap();
    assert_eq!(c.network(), Ipv4Addr::new(172, 19, 0, 0));
    assert_eq!(c.broadcast(), Ipv4Addr::new(172, 19, 0, 3));
    assert_eq!(c.to_network().to_string(), "172.19.0.0/30");
    assert!(c.contains(Ipv4Addr::new(172, 19, 0, 2)));
    assert!(!c.contains(Ipv4Addr::new(172, 19, 0, 4)));
    let zero: Ipv4Cidr = "0.0.0.0/0".parse().unwrap();
    assert!(zero.contains(Ipv4Addr::new(8, 8, 8, 8)));
    assert!("1.2.3.4".parse::<Ipv4Cidr>().is_err());
    assert!("1.2.3.4/33".parse::<Ipv4Cidr>().is_err());
    assert!("1.2.3/8".parse::<Ipv4Cidr>().is_err());
    let big: Ipv4Cidr = "172.16.0.0/12".parse().unwrap();
    assert!(big.overlaps(&c) && c.overlaps(&big));
    let other: Ipv4Cidr = "172.19.0.4/30".parse().unwrap();
    assert!(!other.overlaps(&c));
}

#[test]
fn overlap_with_a_pod_address_is_reported_with_the_variable() {
    let nets = vec![
        pn("lo", "127.0.0.1/8", PodNetSource::Address),
        pn("eth0", "172.16.5.9/12", PodNetSource::Address),
    ];
    let err = check_overlap(&plan(), &nets).unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("CODER_DOCKER_BRIDGE_CIDR"), "{msg}");
    assert!(msg.contains("172.19.0.0/30"), "{msg}");
    assert!(msg.contains("172.16.0.0/12"), "{msg}");
    assert!(msg.contains("address on eth0"), "{msg}");
}

#[test]
fn overlap_with_a_route_is_reported() {
    let nets = vec![
        pn("eth0", "0.0.0.0/0", PodNetSource::Route),
        pn("eth0", "10.0.0.0/24", PodNetSource::Route),
        pn("eth0", "172.19.0.0/16", PodNetSource::Route),
    ];
    let msg = check_overlap(&plan(), &nets).unwrap_err().to_string();
    assert!(msg.contains("172.19.0.0/16 (route on eth0)"), "{msg}");
}

#[test]
fn no_overlap_ignores_default_route_and_our_own_stale_link() {
    let nets = vec![
        pn("lo", "127.0.0.1/8", PodNetSource::Address),
        pn("eth0", "0.0.0.0/0", PodNetSource::Route),
        pn("eth0", "10.244.1.7/24", PodNetSource::Address),
        pn("eth0", "10.244.1.0/24", PodNetSource::Route),
        pn("eth0", "169.254.1.1/32", PodNetSource::Route),
        pn("envbox0", "172.19.0.1/30", PodNetSource::Address),
        pn("envbox0", "172.19.0.0/30", PodNetSource::Route),
    ];
    check_overlap(&plan(), &nets).unwrap();
    // A host route inside the link network does overlap.
    let nets = vec![pn("eth0", "172.19.0.2/32", PodNetSource::Route)];
    assert!(check_overlap(&plan(), &nets).is_err());
}

// ---- MTU -----------------------------------------------------------------------------

#[test]
fn parse_mtu_values() {
    assert_eq!(parse_mtu("1450\n"), Some(1450));
    assert_eq!(parse_mtu(" 9001 "), Some(9001));
    assert_eq!(parse_mtu("65535"), Some(65535));
    assert_eq!(parse_mtu("65536"), None); // loopback's MTU is no veth MTU
    assert_eq!(parse_mtu("67"), None);
    assert_eq!(parse_mtu(""), None);
    assert_eq!(parse_mtu("abc"), None);
    assert_eq!(parse_mtu("-1"), None);
}

#[test]
fn uplink_mtu_from_a_sysfs_tree() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("eth0")).unwrap();
    std::fs::write(dir.path().join("eth0/mtu"), "1450\n").unwrap();
    assert_eq!(uplink_mtu_in(dir.path(), "eth0").unwrap(), 1450);

    let err = uplink_mtu_in(dir.path(), "ens5").unwrap_err();
    assert!(matches!(err, NetError::UplinkMissing { .. }));
    let msg = err.to_string();
    assert!(
        msg.contains("\"ens5\"") && msg.contains("CODER_ETHLINK"),
        "{msg}"
    );

    std::fs::create_dir(dir.path().join("bad0")).unwrap();
    std::fs::write(dir.path().join("bad0/mtu"), "lots\n").unwrap();
    let msg = uplink_mtu_in(dir.path(), "bad0").unwrap_err().to_string();
    assert!(msg.contains("\"lots\""), "{msg}");

    let msg = uplink_mtu_in(dir.path(), "../etc").unwrap_err().to_string();
    assert!(msg.contains("CODER_ETHLINK"), "{msg}");
}

#[test]
fn find_in_path_skips_missing_and_relative_dirs() {
    let dir = tempfile::tempdir().unwrap();
    let bin = dir.path().join("iptables");
    std::fs::write(&bin, "#!/bin/sh\n").unwrap();
    let path = format!("relative:/nonexistent:{}", dir.path().display());
    assert_eq!(find_in_path("iptables", &path), None, "not executable");
    std::fs::set_permissions(
        &bin,
        <std::fs::Permissions as std::os::unix::fs::PermissionsExt>::from_mode(0o755),
    )
    .unwrap();
    assert_eq!(
        find_in_path("iptables", &path),
        Some(bin.to_string_lossy().into_owned())
    );
    assert_eq!(find_in_path("iptables", ""), None);
}

// ---- iptables listing ----------------------------------------------------------------

#[test]
fn split_words_handles_quotes() {
    assert_eq!(
        split_words(r#"-A FORWARD -i x -m comment --comment "a \"b\" c" -j ACCEPT"#),
        strs(&[
            "-A",
            "FORWARD",
            "-i",
            "x",
            "-m",
            "comment",
            "--comment",
            "a \"b\" c",
            "-j",
            "ACCEPT"
        ])
    );
    assert_eq!(split_words("  a   b "), strs(&["a", "b"]));
    assert_eq!(split_words(r#"x """#), strs(&["x", ""]));
}

#[test]
fn tagged_rules_selects_envbox_rules_of_the_chain() {
    let listing = format!(
        "-P POSTROUTING ACCEPT\n-N OTHER\n-A POSTROUTING {MASQ}\n\
         -A POSTROUTING -o eth0 -j MASQUERADE\n\
         -A POSTROUTING -m comment --comment \"envbox x\" -j RETURN\n\
         -A OTHER -m comment --comment envbox -j RETURN\n"
    );
    let got = tagged_rules(&listing, "POSTROUTING");
    assert_eq!(got, vec![split_words(MASQ)]);
}

// ---- daemon.json ---------------------------------------------------------------------

#[test]
fn daemon_json_written_when_the_image_has_none() {
    match inner_docker_daemon_json(None, 1450) {
        DaemonJsonDecision::Write(s) => {
            assert_eq!(s, "{\"mtu\":1450}\n");
            let v: serde_json::Value = serde_json::from_str(&s).unwrap();
            assert_eq!(v["mtu"], 1450);
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn daemon_json_with_mtu_is_kept() {
    let existing = r#"{ "mtu": 1400, "storage-driver": "overlay2" }"#;
    assert_eq!(
        inner_docker_daemon_json(Some(existing), 1450),
        DaemonJsonDecision::Keep
    );
    assert_eq!(
        inner_docker_daemon_json(Some(r#"{"mtu": 1450}"#), 1450),
        DaemonJsonDecision::Keep
    );
}

#[test]
fn daemon_json_without_mtu_is_kept_with_a_warning() {
    let existing = r#"{ "storage-driver": "vfs" }"#;
    match inner_docker_daemon_json(Some(existing), 1450) {
        DaemonJsonDecision::KeepWithWarning(w) => {
            assert!(w.contains("\"mtu\": 1450"), "{w}");
            assert!(w.contains("/etc/docker/daemon.json"), "{w}");
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn daemon_json_with_a_larger_mtu_warns() {
    match inner_docker_daemon_json(Some(r#"{"mtu": 1500}"#), 1450) {
        DaemonJsonDecision::KeepWithWarning(w) => {
            assert!(w.contains("1500") && w.contains("1450"), "{w}")
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn daemon_json_broken_or_empty_is_kept_with_a_warning() {
    for existing in ["", "  \n", "{ not json", "[1, 2]"] {
        match inner_docker_daemon_json(Some(existing), 1450) {
            DaemonJsonDecision::KeepWithWarning(w) => {
                assert!(w.contains("\"mtu\": 1450"), "{existing:?}: {w}")
            }
            other => panic!("{existing:?}: {other:?}"),
        }
    }
}

fn own_ids() -> (u32, u32) {
    (
        rustix::process::getuid().as_raw(),
        rustix::process::getgid().as_raw(),
    )
}

#[test]
fn daemon_json_write_creates_etc_docker_in_the_root() {
    use std::os::unix::fs::PermissionsExt;
    let root = tempfile::tempdir().unwrap();
    std::fs::create_dir(root.path().join("etc")).unwrap();
    write_daemon_json(root.path(), "{\"mtu\":1450}\n", own_ids()).unwrap();
    let dir = root.path().join("etc/docker");
    assert_eq!(
        std::fs::metadata(&dir).unwrap().permissions().mode() & 0o7777,
        0o755
    );
    assert_eq!(
        std::fs::read_to_string(dir.join("daemon.json")).unwrap(),
        "{\"mtu\":1450}\n"
    );
    // Into an existing /etc/docker too; an existing file is never rewritten.
    let err = write_daemon_json(root.path(), "{}", own_ids()).unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::AlreadyExists);
    assert_eq!(
        std::fs::read_to_string(dir.join("daemon.json")).unwrap(),
        "{\"mtu\":1450}\n"
    );
}

#[test]
fn daemon_json_write_never_leaves_the_root() {
    let outside = tempfile::tempdir().unwrap();
    let root = tempfile::tempdir().unwrap();
    std::fs::create_dir(root.path().join("etc")).unwrap();
    // An image whose /etc/docker points at a host path: resolved inside the root.
    std::os::unix::fs::symlink(outside.path(), root.path().join("etc/docker")).unwrap();
    let inside = root.path().join(outside.path().strip_prefix("/").unwrap());
    std::fs::create_dir_all(&inside).unwrap();
    write_daemon_json(root.path(), "{\"mtu\":1400}\n", own_ids()).unwrap();
    assert!(!outside.path().join("daemon.json").exists());
    assert_eq!(
        std::fs::read_to_string(inside.join("daemon.json")).unwrap(),
        "{\"mtu\":1400}\n"
    );

    // A daemon.json that is a link to a host file is neither followed nor replaced.
    let root2 = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(root2.path().join("etc/docker")).unwrap();
    let target = outside.path().join("victim");
    std::os::unix::fs::symlink(&target, root2.path().join("etc/docker/daemon.json")).unwrap();
    assert!(write_daemon_json(root2.path(), "{}", own_ids()).is_err());
    assert!(!target.exists());
}

#[test]
fn uplink_mtu_over_netlink() {
    // `lo` exists in every network namespace; its MTU (65536) is no veth MTU.
    match uplink_mtu("lo") {
        Err(NetError::MtuParse { value, .. }) => assert_eq!(value, "65536"),
        other => panic!("{other:?}"),
    }
    match uplink_mtu("ebx-no-such0") {
        Err(NetError::UplinkMissing { ifname, .. }) => assert_eq!(ifname, "ebx-no-such0"),
        other => panic!("{other:?}"),
    }
}
