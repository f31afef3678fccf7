//! NAT and FORWARD rules in the pod's network namespace, through `iptables -w` run by the
//! caller's [`CommandRunner`]. Every rule carries `-m comment --comment envbox` so stale
//! ones (an earlier start with other settings) can be found with `iptables -S` and removed.

use super::{CommandRunner, LinkPlan, NetError, RULE_COMMENT};

/// One rule: table, chain, whether it goes first in the chain, and its match/target spec
/// in the order `iptables -S` prints it (so listed rules compare equal to ours).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Rule {
    pub table: &'static str,
    pub chain: &'static str,
    pub insert: bool,
    pub spec: Vec<String>,
}

/// The chains envbox adds rules to.
const CHAINS: [(&str, &str); 2] = [("nat", "POSTROUTING"), ("filter", "FORWARD")];

pub(crate) fn desired_rules(plan: &LinkPlan) -> Vec<Rule> {
    let tag = ["-m", "comment", "--comment", RULE_COMMENT];
    let spec = |parts: &[&str], target: &[&str]| -> Vec<String> {
        parts
            .iter()
            .chain(tag.iter())
            .chain(target.iter())
            .map(|s| s.to_string())
            .collect()
    };
    let net = plan.network().to_string();
    let host = plan.host_ifname.as_str();
    vec![
        Rule {
            table: "nat",
            chain: "POSTROUTING",
            insert: false,
            // Out of any interface but the workspace's own link, as Docker's bridge rule: traffic
            // that the pod routes through a secondary interface (Multus) needs the pod's address too.
            spec: spec(&["-s", &net, "!", "-o", host], &["-j", "MASQUERADE"]),
        },
        Rule {
            table: "filter",
            chain: "FORWARD",
            insert: true,
            spec: spec(&["-i", host], &["-j", "ACCEPT"]),
        },
        Rule {
            table: "filter",
            chain: "FORWARD",
            insert: true,
            spec: spec(
                &[
                    "-o",
                    host,
                    "-m",
                    "conntrack",
                    "--ctstate",
                    "RELATED,ESTABLISHED",
                ],
                &["-j", "ACCEPT"],
            ),
        },
    ]
}

fn run(cmd: &dyn CommandRunner, argv: &[&str]) -> Result<String, NetError> {
    cmd.run(argv).map_err(|message| NetError::Iptables {
        argv: argv.join(" "),
        message: message.trim().to_string(),
    })
}

fn with_spec<'a>(head: &[&'a str], spec: &'a [String]) -> Vec<&'a str> {
    head.iter()
        .copied()
        .chain(spec.iter().map(String::as_str))
        .collect()
}

/// Removes stale `envbox` rules, then adds each desired rule that `iptables -C` reports
/// missing. Safe to repeat.
pub(crate) fn ensure_rules(
    cmd: &dyn CommandRunner,
    iptables: &str,
    plan: &LinkPlan,
) -> Result<(), NetError> {
    let rules = desired_rules(plan);
    let removed = remove_rules(cmd, iptables, &rules)?;
    if removed > 0 {
        log::info!("removed {removed} stale envbox iptables rule(s)");
    }
    for r in &rules {
        let check = with_spec(&[iptables, "-w", "-t", r.table, "-C", r.chain], &r.spec);
        if cmd.run(&check).is_ok() {
            continue;
        }
        let add = if r.insert {
            with_spec(
                &[iptables, "-w", "-t", r.table, "-I", r.chain, "1"],
                &r.spec,
            )
        } else {
            with_spec(&[iptables, "-w", "-t", r.table, "-A", r.chain], &r.spec)
        };
        run(cmd, &add)?;
    }
    Ok(())
}

/// Deletes every `envbox`-tagged rule in the chains envbox uses, except one copy of each
/// rule in `keep`. Returns how many were deleted.
pub(crate) fn remove_rules(
    cmd: &dyn CommandRunner,
    iptables: &str,
    keep: &[Rule],
) -> Result<usize, NetError> {
    let mut removed = 0;
    for (table, chain) in CHAINS {
        let listing = run(cmd, &[iptables, "-w", "-t", table, "-S", chain])?;
        let mut kept: Vec<&Rule> = Vec::new();
        for spec in tagged_rules(&listing, chain) {
            let wanted = keep
                .iter()
                .find(|r| r.table == table && r.chain == chain && r.spec == spec);
            match wanted {
                Some(r) if !kept.contains(&r) => kept.push(r),
                _ => {
                    let del = with_spec(&[iptables, "-w", "-t", table, "-D", chain], &spec);
                    run(cmd, &del)?;
                    removed += 1;
                }
            }
        }
    }
    Ok(removed)
}

/// The specs (everything after `-A <chain>`) of the rules in an `iptables -S <chain>`
/// listing that carry the envbox comment.
pub(crate) fn tagged_rules(listing: &str, chain: &str) -> Vec<Vec<String>> {
    listing
        .lines()
        .filter_map(|line| {
            let words = split_words(line);
            if words.len() < 2 || words[0] != "-A" || words[1] != chain {
                return None;
            }
            let spec = words[2..].to_vec();
            let tagged = spec
                .windows(2)
                .any(|w| w[0] == "--comment" && w[1] == RULE_COMMENT);
            tagged.then_some(spec)
        })
        .collect()
}

/// Splits an `iptables -S` line into words: whitespace-separated, with `"..."` quoting
/// and `\"` / `\\` escapes inside quotes (how iptables prints comments with spaces).
pub(crate) fn split_words(line: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut cur = String::new();
    let mut in_word = false;
    let mut quoted = false;
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            '"' => {
                quoted = !quoted;
                in_word = true;
            }
            '\\' if quoted => {
                if let Some(n) = chars.next() {
                    cur.push(n);
                }
            }
            c if c.is_whitespace() && !quoted => {
                if in_word {
                    words.push(std::mem::take(&mut cur));
                    in_word = false;
                }
            }
            c => {
                cur.push(c);
                in_word = true;
            }
        }
    }
    if in_word {
        words.push(cur);
    }
    words
}
