//! The leader balancer's plan: which partition leaderships to move so that no node leads more
//! than its share.
//!
//! A node's share is `⌈led / nodes⌉`, where `led` counts the partitions that have a leader and
//! `nodes` the nodes that may lead. A leadership can only move to another replica of its
//! partition, so moving one from an overloaded node straight to an underloaded one is not
//! always possible (no partition of the first has a replica on the second); then a chain of
//! moves does it (A's partition to B, one of B's to C). The plan finds such chains as shortest
//! paths, one unit of overload at a time, so it reaches every node within its share whenever
//! the replicas allow it (each chain lowers one overloaded node by one and raises only a node
//! below its share). Where they do not, it goes on with chains from an overloaded node to one
//! leading at least two fewer (each lowers the first by one and raises the last to at most one
//! below where the first was, so the sum of the squared loads falls and it ends): with none
//! left, no choice of leaders has a lower largest load.

use std::collections::{BTreeMap, VecDeque};

/// A partition's group as the balancer sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Led {
    pub group: String,
    /// Its leader now, if one is known.
    pub leader: Option<u64>,
    /// The nodes holding a replica.
    pub replicas: Vec<u64>,
}

/// One leadership to move.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Move {
    pub group: String,
    pub from: u64,
    pub to: u64,
}

/// Every node's share: at most this many leaderships each.
pub fn share(led: usize, nodes: usize) -> usize {
    led.div_ceil(nodes.max(1))
}

/// The moves that bring each of `nodes` (those that may lead) within its share of `groups`'
/// leaderships, where the replicas allow it; in the order to make them. Groups without a
/// leader, or led by a node not in `nodes`, stay as they are and do not count.
pub fn plan(nodes: &[u64], groups: &[Led]) -> Vec<Move> {
    // The groups each node leads, by index into `groups`.
    let mut leads: BTreeMap<u64, Vec<usize>> = nodes.iter().map(|&n| (n, Vec::new())).collect();
    for (i, g) in groups.iter().enumerate() {
        if let Some(list) = g.leader.and_then(|l| leads.get_mut(&l)) {
            list.push(i);
        }
    }
    let led: usize = leads.values().map(Vec::len).sum();
    let cap = share(led, leads.len());
    let mut moves = Vec::new();
    loop {
        // The first overloaded node a chain frees; none left: done (a node no chain frees
        // keeps its surplus: its partitions' replicas are all on nodes at their share).
        let path = leads
            .iter()
            .filter(|(_, l)| l.len() > cap)
            .find_map(|(&over, _)| chain(&leads, groups, over, cap))
            .or_else(|| {
                // No node below its share is in reach: the most loaded first, to one leading
                // at least two fewer.
                let mut over: Vec<(usize, u64)> = (leads.iter())
                    .filter(|(_, l)| l.len() > cap)
                    .map(|(&n, l)| (l.len(), n))
                    .collect();
                over.sort_unstable_by(|a, b| b.cmp(a));
                over.into_iter()
                    .find_map(|(load, n)| chain(&leads, groups, n, load - 1))
            });
        let Some(path) = path else {
            return moves;
        };
        // Made from the far end back, so no node leads more than it did along the way.
        for (group, from, to) in path.into_iter().rev() {
            if let Some(list) = leads.get_mut(&from) {
                list.retain(|&g| g != group);
            }
            leads.entry(to).or_default().push(group);
            moves.push(Move {
                group: groups[group].group.clone(),
                from,
                to,
            });
        }
    }
}

/// Where a consumer group's leadership belongs, given how many of its members are connected to
/// each node (`None`: to `me`, its leader now): the voter with the most members, when it has
/// more than `me` (ties: the lowest id). `None`: it stays. A group led where its members are
/// sends their deliveries and takes their acks itself instead of through another node.
pub fn group_home(me: u64, members: &BTreeMap<Option<u64>, usize>, voters: &[u64]) -> Option<u64> {
    let on = |node: u64| {
        let here = if node == me { members.get(&None) } else { None };
        here.copied().unwrap_or(0) + members.get(&Some(node)).copied().unwrap_or(0)
    };
    let here = on(me);
    let (best, most) = voters
        .iter()
        .filter(|&&v| v != me)
        .map(|&v| (v, on(v)))
        .min_by_key(|&(v, n)| (std::cmp::Reverse(n), v))?;
    (most > here).then_some(best)
}

/// The shortest chain of moves `(group, from, to)` from node `start` to a node leading fewer
/// than `cap`, each moving a group its `from` leads to another replica of it.
fn chain(
    leads: &BTreeMap<u64, Vec<usize>>,
    groups: &[Led],
    start: u64,
    cap: usize,
) -> Option<Vec<(usize, u64, u64)>> {
    // How each node was first reached: (the group moved to it, from which node).
    let mut reached: BTreeMap<u64, Option<(usize, u64)>> = BTreeMap::from([(start, None)]);
    let mut queue = VecDeque::from([start]);
    while let Some(node) = queue.pop_front() {
        for &g in &leads[&node] {
            for &to in &groups[g].replicas {
                if reached.contains_key(&to) || !leads.contains_key(&to) {
                    continue;
                }
                reached.insert(to, Some((g, node)));
                if leads[&to].len() < cap {
                    let mut path = Vec::new();
                    let mut at = to;
                    while let Some(&Some((g, from))) = reached.get(&at) {
                        path.push((g, from, at));
                        at = from;
                    }
                    path.reverse();
                    return Some(path);
                }
                queue.push_back(to);
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A group moves only to a voter with more members than its leader has, the one with the
    /// most (ties: lowest id); never to a node that is not a voter, never on a tie with here.
    #[test]
    fn a_group_goes_where_most_of_its_members_are() {
        let voters = [1, 2, 3];
        // (members here on node 1, members via other nodes, expected home)
        type Case = (usize, &'static [(u64, usize)], Option<u64>);
        let table: &[Case] = &[
            (0, &[], None),
            (1, &[], None),
            (0, &[(2, 1)], Some(2)),
            (1, &[(2, 1)], None),
            (1, &[(2, 2)], Some(2)),
            (0, &[(2, 1), (3, 1)], Some(2)),
            (0, &[(2, 1), (3, 2)], Some(3)),
            (2, &[(2, 2), (3, 2)], None),
            (1, &[(2, 2), (3, 2)], Some(2)),
            (0, &[(4, 5)], None),
            (0, &[(4, 5), (3, 1)], Some(3)),
            // A member relayed from the leader's own node counts as here.
            (0, &[(1, 1), (2, 1)], None),
        ];
        for &(here, via, home) in table {
            let mut members = BTreeMap::new();
            if here > 0 {
                members.insert(None, here);
            }
            for &(node, n) in via {
                members.insert(Some(node), n);
            }
            assert_eq!(
                group_home(1, &members, &voters),
                home,
                "{here} here, {via:?}"
            );
        }
    }

    fn led(group: &str, leader: u64, replicas: &[u64]) -> Led {
        Led {
            group: group.into(),
            leader: Some(leader),
            replicas: replicas.to_vec(),
        }
    }

    /// Applies `moves` to `groups`, checking each: `from` leads the group then, `to` holds a
    /// replica. The count of leaderships per node of `nodes` afterwards.
    fn apply(nodes: &[u64], groups: &mut [Led], moves: &[Move]) -> BTreeMap<u64, usize> {
        for m in moves {
            let g = groups.iter_mut().find(|g| g.group == m.group).unwrap();
            assert_eq!(g.leader, Some(m.from), "{m:?} moves from its leader");
            assert!(g.replicas.contains(&m.to), "{m:?} moves to a replica");
            assert_ne!(m.from, m.to, "{m:?} moves somewhere");
            g.leader = Some(m.to);
        }
        let mut counts: BTreeMap<u64, usize> = nodes.iter().map(|&n| (n, 0)).collect();
        for g in groups.iter() {
            if let Some(c) = g.leader.and_then(|l| counts.get_mut(&l)) {
                *c += 1;
            }
        }
        counts
    }

    #[test]
    fn every_leader_on_one_node_is_spread_over_all_three() {
        let nodes = [1, 2, 3];
        let mut groups: Vec<Led> = (0..8).map(|p| led(&format!("t/{p}"), 1, &nodes)).collect();
        let moves = plan(&nodes, &groups);
        let counts = apply(&nodes, &mut groups, &moves);
        assert_eq!(counts.values().max(), Some(&3), "{counts:?}");
        assert_eq!(moves.len(), 5, "only the surplus moves: {moves:?}");
        assert!(plan(&nodes, &groups).is_empty(), "balanced stays put");
    }

    #[test]
    fn a_chain_moves_what_no_single_move_can() {
        // Node 1 leads two groups replicated on 1 and 2 only; node 2 leads one replicated on 2
        // and 3; node 3 leads nothing. Only 2's group can go to 3, then one of 1's to 2.
        let nodes = [1, 2, 3];
        let mut groups = vec![
            led("a", 1, &[1, 2]),
            led("b", 1, &[1, 2]),
            led("c", 2, &[2, 3]),
        ];
        let moves = plan(&nodes, &groups);
        let counts = apply(&nodes, &mut groups, &moves);
        assert_eq!(counts, BTreeMap::from([(1, 1), (2, 1), (3, 1)]));
        assert_eq!(moves.len(), 2);
        assert_eq!(
            (moves[0].from, moves[0].to),
            (2, 3),
            "the far end moves first"
        );
    }

    #[test]
    fn leaderless_groups_and_other_nodes_stay_as_they_are() {
        let nodes = [1, 2];
        let mut groups = vec![
            Led {
                group: "none".into(),
                leader: None,
                replicas: vec![1, 2],
            },
            led("gone", 9, &[9, 1, 2]),
            led("a", 1, &[1, 2]),
            led("b", 1, &[1, 2]),
        ];
        let moves = plan(&nodes, &groups);
        assert!(moves.iter().all(|m| m.group == "a" || m.group == "b"));
        let counts = apply(&nodes, &mut groups, &moves);
        assert_eq!(counts, BTreeMap::from([(1, 1), (2, 1)]));
    }

    /// A placement: `nodes` nodes, groups each with `rf` replicas (rotating start) and a
    /// leader among them; `skew` makes the leaders pile up on the first replica.
    fn placement() -> impl Strategy<Value = (Vec<u64>, Vec<Led>)> {
        (1usize..=6)
            .prop_flat_map(|n| {
                let nodes: Vec<u64> = (1..=n as u64).collect();
                let group = (0..n, 1..=n, 0..n);
                (Just(nodes), prop::collection::vec(group, 0..40))
            })
            .prop_map(|(nodes, specs)| {
                let n = nodes.len();
                let groups = specs
                    .into_iter()
                    .enumerate()
                    .map(|(i, (start, rf, pick))| {
                        let replicas: Vec<u64> = (0..rf).map(|k| nodes[(start + k) % n]).collect();
                        let leader = replicas[pick % rf];
                        led(&format!("g{i}"), leader, &replicas)
                    })
                    .collect();
                (nodes, groups)
            })
    }

    /// The least largest load any choice of leaders among the replicas of `groups[from..]`
    /// gives, with `loads` (by position in `nodes`) taken already.
    fn best_max(nodes: &[u64], groups: &[Led], loads: &mut Vec<usize>, from: usize) -> usize {
        let Some(g) = groups.get(from) else {
            return loads.iter().copied().max().unwrap_or(0);
        };
        let mut best = usize::MAX;
        for r in &g.replicas {
            let k = nodes.iter().position(|n| n == r).unwrap();
            loads[k] += 1;
            best = best.min(best_max(nodes, groups, loads, from + 1));
            loads[k] -= 1;
        }
        best
    }

    /// Found by the property below (CI, a random seed): node 1 is at its share (2) and node 3
    /// holds no replica, so no chain reaches a node below the share; moving one of the groups
    /// on nodes 1 and 2 to node 1 still lowers the largest load from 4 to 3.
    #[test]
    fn a_node_above_its_share_is_lowered_even_when_no_node_below_it_is_in_reach() {
        let nodes = [1, 2, 3];
        let groups = [
            led("g0", 2, &[2]),
            led("g1", 1, &[1]),
            led("g2", 2, &[1, 2]),
            led("g3", 2, &[2]),
            led("g4", 1, &[1]),
            led("g5", 2, &[1, 2]),
        ];
        let counts = apply(&nodes, &mut groups.clone(), &plan(&nodes, &groups));
        assert_eq!(counts.values().copied().max(), Some(3), "{counts:?}");
    }

    proptest! {
        /// Every move is valid when made; no node ends above the largest load it started
        /// with; with every partition on every node, each node ends within its share; and a
        /// second plan after the first finds nothing more to move.
        #[test]
        fn a_plan_only_moves_to_replicas_and_brings_nodes_within_their_share(
            (nodes, groups) in placement()
        ) {
            let before = apply(&nodes, &mut groups.clone(), &[]);
            let mut after = groups.clone();
            let moves = plan(&nodes, &groups);
            let counts = apply(&nodes, &mut after, &moves);
            let cap = share(counts.values().sum(), nodes.len());
            let max_before = before.values().copied().max().unwrap_or(0);
            let max_after = counts.values().copied().max().unwrap_or(0);
            prop_assert!(max_after <= max_before.max(cap), "{before:?} -> {counts:?}");
            if groups.iter().all(|g| g.replicas.len() == nodes.len()) {
                prop_assert!(max_after <= cap, "{counts:?} over {cap}");
            }
            prop_assert!(plan(&nodes, &after).is_empty() || max_after > cap);
            prop_assert_eq!(counts.values().sum::<usize>(), before.values().sum::<usize>());
        }

        /// On placements small enough to try every choice of leaders: the plan's largest load
        /// is the least any choice reaches, or within the share when that is lower.
        #[test]
        fn a_plan_is_as_good_as_the_best_choice_of_leaders(
            (nodes, groups) in placement().prop_filter("small", |(n, g)| n.len() <= 4 && g.len() <= 7)
        ) {
            let mut after = groups.clone();
            let counts = apply(&nodes, &mut after, &plan(&nodes, &groups));
            let max_after = counts.values().copied().max().unwrap_or(0);
            let cap = share(groups.len(), nodes.len());
            let best = best_max(&nodes, &groups, &mut vec![0; nodes.len()], 0);
            prop_assert!(max_after <= best.max(cap), "{max_after} where {best} is possible");
        }
    }
}
