//! Envoy's priority and locality load: a priority takes traffic in proportion to its
//! healthy share times the overprovisioning factor (1.4), the rest spills to the next
//! priority; below the panic threshold health is ignored; with locality-weighted
//! balancing a locality of the chosen priority is drawn by its weight scaled the same way.
//!
//! Health is passed in per pick (outlier ejection changes it without a reload), so the
//! counts are taken on the data path: linear in the endpoints, without allocation unless
//! some endpoint of the chosen cell must be avoided.

use std::ops::Range;
use std::time::Instant;

use crate::{Balancer, Member, Policy, SlowStart};

/// Envoy's default overprovisioning factor, in percent.
const OVERPROVISIONING: u64 = 140;

/// One locality of one priority, as EDS lists it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Group {
    /// EDS priority; 0 takes traffic first.
    pub priority: u32,
    /// The locality's `load_balancing_weight`; 0 (unset) takes no traffic under
    /// locality-weighted balancing, as in Envoy.
    pub weight: u32,
    /// Endpoints EDS lists in it, usable or not: its health is the share of these that
    /// are healthy.
    pub hosts: u32,
    /// Its usable endpoints, as indices into the members given to [`Balancer::layered`].
    pub members: Vec<usize>,
}

/// How the endpoints of a cluster are grouped.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Layout {
    /// The localities of every priority.
    pub groups: Vec<Group>,
    /// Envoy's `locality_weighted_lb_config`: a pick first draws a locality by weight.
    pub locality_weighted: bool,
}

/// Envoy's `previous_priorities` retry priority for one pick: every `update_frequency`
/// attempts, the priorities of the endpoints attempted so far take no more load.
#[derive(Debug, Clone, Copy)]
pub struct PreviousPriorities<'a> {
    /// The endpoints of the attempts made, in order (indices into the members).
    pub attempted: &'a [usize],
    /// Envoy's `update_frequency`, above zero (Istio: 2).
    pub update_frequency: u32,
}

/// A set the policy picks within: a locality (locality-weighted) or a whole priority.
#[derive(Debug)]
struct Cell {
    members: Box<[usize]>,
    hosts: u64,
    weight: u64,
    balancer: Balancer,
}

/// One priority: its cells and the hosts EDS lists in it.
#[derive(Debug)]
struct Tier {
    hosts: u64,
    cells: Range<usize>,
}

/// The priorities and cells of a layered balancer.
#[derive(Debug)]
pub(crate) struct Layers {
    tiers: Box<[Tier]>,
    cells: Box<[Cell]>,
    locality_weighted: bool,
}

impl Layers {
    /// Groups `members` by `layout`: priorities in ascending order, cells per locality when
    /// locality-weighted, else one per priority, each with `slow_start`. Members in no
    /// group are never picked.
    pub(crate) fn new(
        policy: Policy,
        members: &[Member],
        layout: Layout,
        slow_start: Option<SlowStart>,
    ) -> Layers {
        let mut groups = layout.groups;
        groups.sort_by_key(|g| g.priority);
        let mut tiers = Vec::new();
        let mut cells: Vec<Cell> = Vec::new();
        let mut start = 0;
        while start < groups.len() {
            let priority = groups[start].priority;
            let end = start + groups[start..].partition_point(|g| g.priority == priority);
            let tier = &groups[start..end];
            let first = cells.len();
            let mut cell = |parts: &[Group]| {
                let indices: Box<[usize]> = parts
                    .iter()
                    .flat_map(|g| &g.members)
                    .copied()
                    .filter(|&i| i < members.len())
                    .collect();
                let balancer = Balancer::new(
                    policy,
                    indices.iter().map(|&i| members[i].clone()).collect(),
                )
                .with_slow_start(slow_start);
                cells.push(Cell {
                    members: indices,
                    hosts: parts.iter().map(|g| u64::from(g.hosts)).sum(),
                    weight: parts.iter().map(|g| u64::from(g.weight)).sum(),
                    balancer,
                });
            };
            if layout.locality_weighted {
                tier.iter().for_each(|g| cell(std::slice::from_ref(g)));
            } else {
                cell(tier);
            }
            tiers.push(Tier {
                hosts: tier.iter().map(|g| u64::from(g.hosts)).sum(),
                cells: first..cells.len(),
            });
            start = end;
        }
        Layers {
            tiers: tiers.into(),
            cells: cells.into(),
            locality_weighted: layout.locality_weighted,
        }
    }

    /// Picks a member index: a priority by load, a locality by weight, then an endpoint by
    /// the policy, avoiding `tried` and, outside panic, endpoints `healthy` rejects;
    /// endpoints warming up at `now` weigh less. `None` when nothing may take the request
    /// (Envoy's `no healthy upstream`).
    pub(crate) fn pick(
        &self,
        hash: Option<u64>,
        (tried, previous): (&[usize], Option<PreviousPriorities<'_>>),
        healthy: Option<&dyn Fn(usize) -> bool>,
        panic_threshold: f64,
        now: Option<Instant>,
    ) -> Option<usize> {
        // One priority, one locality and no health check, as most clusters are: the loads
        // below could only choose that cell, which then has nothing to avoid but `tried`.
        if let ([tier], None, None, false) =
            (&*self.tiers, healthy, previous, self.locality_weighted)
        {
            return self.cells[tier.cells.clone()]
                .first()?
                .pick(hash, tried, None, now);
        }
        let is_healthy = |i: usize| healthy.is_none_or(|h| h(i));
        // Without a health check every member counts, without walking them.
        let healthy_in = |c: &Cell| match healthy {
            None => c.members.len() as u64,
            Some(_) => c.members.iter().filter(|&&i| is_healthy(i)).count() as u64,
        };
        let tier_healthy = |t: &Tier| self.cells[t.cells.clone()].iter().map(healthy_in).sum();
        let health = |healthy: u64, hosts: u64| {
            (OVERPROVISIONING * healthy)
                .checked_div(hosts)
                .map_or(0, |h| h.min(100))
        };
        let total_health: u64 = self
            .tiers
            .iter()
            .map(|t| health(tier_healthy(t), t.hosts))
            .sum::<u64>()
            .min(100);
        let total_panic = total_health == 0 || (total_health as f64) < panic_threshold;
        if total_health == 0 && panic_threshold <= 0.0 {
            return None;
        }
        // Envoy draws the priority from the request's hash when it has one, so that a
        // consistent-hash cluster keeps a key within one priority.
        let draw = hash.map_or_else(|| fastrand::u64(..100), |h| h % 100);
        let tier = if total_panic {
            // Envoy's total panic: load by host count, health ignored.
            let hosts: u64 = self.tiers.iter().map(|t| t.hosts).sum();
            pick_by_load(&self.tiers, draw, |_, t| {
                (t.hosts * 100).checked_div(hosts).unwrap_or(0)
            })
        } else {
            // The retry priority's load: the priorities it leaves take none, the others
            // theirs by health; none left with health, the load as it was (Envoy).
            let left = previous.map_or(0, |p| self.attempted_tiers(p));
            let kept = |i: usize| i >= 64 || left & (1 << i) == 0;
            let kept_health: u64 = self
                .tiers
                .iter()
                .enumerate()
                .filter(|&(i, _)| kept(i))
                .map(|(_, t)| health(tier_healthy(t), t.hosts))
                .sum::<u64>()
                .min(100);
            if left != 0 && kept_health > 0 {
                pick_by_load(&self.tiers, draw, |i, t| {
                    if kept(i) {
                        health(tier_healthy(t), t.hosts) * 100 / kept_health
                    } else {
                        0
                    }
                })
            } else {
                pick_by_load(&self.tiers, draw, |_, t| {
                    health(tier_healthy(t), t.hosts) * 100 / total_health
                })
            }
        }?;
        let panic = total_panic || {
            let hosts = tier.hosts.max(1) as f64;
            100.0 * tier_healthy(tier) as f64 / hosts < panic_threshold
        };
        let cells = &self.cells[tier.cells.clone()];
        let cell = if self.locality_weighted {
            let effective = |c: &Cell| {
                if panic {
                    c.weight * 100
                } else {
                    c.weight * health(healthy_in(c), c.hosts)
                }
            };
            let total: u64 = cells.iter().map(effective).sum();
            if total == 0 {
                return None;
            }
            let mut position = fastrand::u64(..total);
            cells.iter().find(|c| {
                let w = effective(c);
                let here = position < w;
                position = position.saturating_sub(w);
                here
            })?
        } else {
            cells.first()?
        };
        // Without a health check the cell has nothing to avoid on a first attempt: its
        // fast path, without a walk over the members.
        cell.pick(hash, tried, healthy.filter(|_| !panic), now)
    }
}

impl Layers {
    /// The tiers (as bits by position) `previous` leaves: those of the endpoints attempted
    /// up to the last multiple of its update frequency, as Envoy's retry priority adds
    /// them at each update.
    fn attempted_tiers(&self, previous: PreviousPriorities<'_>) -> u64 {
        let every = previous.update_frequency.max(1) as usize;
        let counted = previous.attempted.len() / every * every;
        previous.attempted[..counted]
            .iter()
            .filter_map(|&member| {
                self.tiers.iter().position(|t| {
                    self.cells[t.cells.clone()]
                        .iter()
                        .any(|c| c.members.contains(&member))
                })
            })
            .filter(|&i| i < 64)
            .fold(0, |bits, i| bits | (1 << i))
    }
}

/// The tier `draw` (0..100) falls in by cumulative `load`; any remainder of rounding goes
/// to the first tier with load, as Envoy gives it to the first priority.
fn pick_by_load(tiers: &[Tier], draw: u64, load: impl Fn(usize, &Tier) -> u64) -> Option<&Tier> {
    let mut remaining = 100u64;
    let mut first = None;
    let mut position = draw;
    for (i, t) in tiers.iter().enumerate() {
        let l = load(i, t).min(remaining);
        remaining -= l;
        if l > 0 && first.is_none() {
            first = Some(t);
        }
        if position < l {
            return Some(t);
        }
        position -= l;
    }
    first.or(tiers.first())
}

impl Cell {
    /// Picks within the cell, avoiding `tried` and (when `healthy` is given) unhealthy
    /// members; when that leaves none, only the unhealthy ones are avoided.
    fn pick(
        &self,
        hash: Option<u64>,
        tried: &[usize],
        healthy: Option<&dyn Fn(usize) -> bool>,
        now: Option<Instant>,
    ) -> Option<usize> {
        // A first attempt without health checks avoids nothing: no walk over the members.
        if healthy.is_none() && tried.is_empty() {
            let position = self.balancer.select(hash, &[], now)?;
            return self.members.get(position).copied();
        }
        let unhealthy = |i: usize| healthy.is_some_and(|h| !h(i));
        let local = |avoid: &dyn Fn(usize) -> bool| -> Vec<usize> {
            (0..self.members.len())
                .filter(|&p| avoid(self.members[p]))
                .collect()
        };
        let sick = local(&unhealthy);
        if sick.len() == self.members.len() {
            return None;
        }
        let mut excluded = local(&|i| unhealthy(i) || tried.contains(&i));
        if excluded.len() == self.members.len() {
            excluded = sick;
        }
        let position = self.balancer.select(hash, &excluded, now)?;
        self.members.get(position).copied()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::EndpointState;

    fn members(n: usize) -> Vec<Member> {
        (0..n)
            .map(|i| Member {
                weight: 1,
                state: Arc::new(EndpointState::new()),
                key: format!("10.0.0.{}:80", i + 1),
            })
            .collect()
    }

    fn group(priority: u32, weight: u32, members: Range<usize>) -> Group {
        Group {
            priority,
            weight,
            hosts: members.len() as u32,
            members: members.collect(),
        }
    }

    /// Shares of `picks` picks per member.
    fn shares(n: usize, picks: usize, mut pick: impl FnMut() -> Option<usize>) -> Vec<f64> {
        let mut counts = vec![0usize; n];
        for _ in 0..picks {
            counts[pick().expect("picks")] += 1;
        }
        counts.iter().map(|&c| c as f64 / picks as f64).collect()
    }

    fn two_priorities(policy: Policy) -> Balancer {
        let layout = Layout {
            groups: vec![group(0, 0, 0..10), group(1, 0, 10..20)],
            locality_weighted: false,
        };
        Balancer::layered(policy, members(20), layout, None)
    }

    #[test]
    fn a_healthy_priority_takes_all_traffic() {
        let b = two_priorities(Policy::RoundRobin);
        let s = shares(20, 2_000, || {
            b.choose(None, (&[], None), None, 50.0, Instant::now())
        });
        assert_eq!(s[10..].iter().sum::<f64>(), 0.0);
    }

    #[test]
    fn load_spills_by_healthy_share_times_overprovisioning() {
        for policy in [Policy::LeastRequest, Policy::RoundRobin, Policy::Random] {
            let b = two_priorities(policy);
            // 5 of 10 healthy in priority 0: 1.4 * 50% = 70% stays, 30% spills.
            let healthy = |i: usize| i >= 5;
            let s = shares(20, 40_000, || {
                b.choose(None, (&[], None), Some(&healthy), 0.0, Instant::now())
            });
            let p0: f64 = s[..10].iter().sum();
            assert!((p0 - 0.7).abs() < 0.02, "{policy:?}: {s:?}");
            assert_eq!(s[..5].iter().sum::<f64>(), 0.0, "{policy:?}");
            // 8 of 10 healthy: 1.4 * 80% caps at 100%, nothing spills.
            let healthy = |i: usize| i >= 2;
            let s = shares(20, 5_000, || {
                b.choose(None, (&[], None), Some(&healthy), 0.0, Instant::now())
            });
            assert_eq!(s[10..].iter().sum::<f64>(), 0.0, "{policy:?}");
        }
    }

    #[test]
    fn an_unhealthy_priority_fails_over_whole() {
        let b = two_priorities(Policy::RoundRobin);
        let healthy = |i: usize| i >= 10;
        let s = shares(20, 5_000, || {
            b.choose(None, (&[], None), Some(&healthy), 50.0, Instant::now())
        });
        assert_eq!(s[..10].iter().sum::<f64>(), 0.0);
    }

    #[test]
    fn total_panic_ignores_health_and_spreads_by_hosts() {
        let b = two_priorities(Policy::Random);
        // 2 healthy of 10 in each priority: 28% + 28% = 56% total health; below a 60%
        // threshold the priorities share load by host count and ejected endpoints serve.
        let healthy = |i: usize| i % 10 < 2;
        let s = shares(20, 40_000, || {
            b.choose(None, (&[], None), Some(&healthy), 60.0, Instant::now())
        });
        let p0: f64 = s[..10].iter().sum();
        assert!((p0 - 0.5).abs() < 0.02, "{s:?}");
        assert!(s[5] > 0.03, "{s:?}");
        // Total health above the threshold, but each priority's own healthy share (20%)
        // below it: Envoy's per-priority panic still uses every endpoint of a priority.
        let s = shares(20, 40_000, || {
            b.choose(None, (&[], None), Some(&healthy), 50.0, Instant::now())
        });
        assert!(s[5] > 0.03, "{s:?}");
        // Below neither: the healthy ones only, 28% / 56% of the load per priority.
        let s = shares(20, 40_000, || {
            b.choose(None, (&[], None), Some(&healthy), 10.0, Instant::now())
        });
        assert!((s[..10].iter().sum::<f64>() - 0.5).abs() < 0.02, "{s:?}");
        assert_eq!(s[5], 0.0);
    }

    #[test]
    fn nothing_healthy_without_panic_picks_nothing() {
        let b = two_priorities(Policy::LeastRequest);
        let none = |_: usize| false;
        assert_eq!(
            b.choose(None, (&[], None), Some(&none), 0.0, Instant::now()),
            None
        );
        assert!(
            b.choose(None, (&[], None), Some(&none), 50.0, Instant::now())
                .is_some()
        );
    }

    #[test]
    fn localities_are_drawn_by_weight() {
        let layout = Layout {
            groups: vec![group(0, 1, 0..2), group(0, 3, 2..4), group(0, 0, 4..6)],
            locality_weighted: true,
        };
        let b = Balancer::layered(Policy::LeastRequest, members(6), layout, None);
        let s = shares(6, 40_000, || {
            b.choose(None, (&[], None), None, 50.0, Instant::now())
        });
        assert!((s[0] + s[1] - 0.25).abs() < 0.02, "{s:?}");
        assert!((s[2] + s[3] - 0.75).abs() < 0.02, "{s:?}");
        assert_eq!(s[4] + s[5], 0.0, "weightless locality: {s:?}");
        // Half of the heavy locality ejected: its weight scales by 1.4 * 50%.
        let healthy = |i: usize| i != 2;
        let s = shares(6, 40_000, || {
            b.choose(None, (&[], None), Some(&healthy), 0.0, Instant::now())
        });
        let light = 1.0 / (1.0 + 3.0 * 0.7);
        assert!((s[0] + s[1] - light).abs() < 0.02, "{s:?}");
        assert_eq!(s[2], 0.0);
    }

    #[test]
    fn retries_avoid_tried_endpoints_within_the_cell() {
        let b = two_priorities(Policy::RoundRobin);
        let tried: Vec<usize> = (0..9).collect();
        for _ in 0..100 {
            assert_eq!(
                b.choose(None, (&tried, None), None, 50.0, Instant::now()),
                Some(9)
            );
        }
        let all: Vec<usize> = (0..10).collect();
        assert!(
            b.choose(None, (&all, None), None, 50.0, Instant::now())
                .is_some_and(|i| i < 10)
        );
    }

    #[test]
    fn consistent_hash_keeps_a_key_on_one_endpoint() {
        let ring = Policy::RingHash {
            minimum_ring_size: 1024,
            maximum_ring_size: 8192,
        };
        let b = two_priorities(ring);
        for h in [1u64, 77, 123_456_789, u64::MAX] {
            let first = b.choose(Some(h), (&[], None), None, 50.0, Instant::now());
            assert!(first.is_some_and(|i| i < 10));
            assert_eq!(
                b.choose(Some(h), (&[], None), None, 50.0, Instant::now()),
                first
            );
        }
    }

    #[test]
    fn flat_picks_go_through_the_layers() {
        let b = two_priorities(Policy::RoundRobin);
        assert_eq!(b.len(), 20);
        for _ in 0..100 {
            assert!(b.pick().is_some_and(|i| i < 10));
            assert!(
                b.pick_hashed(None, &[0])
                    .is_some_and(|i| (1..10).contains(&i))
            );
        }
    }
    #[test]
    fn previous_priorities_move_the_load_every_update_frequency_attempts() {
        let b = two_priorities(Policy::RoundRobin);
        let tier = |attempted: &[usize], update_frequency: u32| {
            let previous = PreviousPriorities {
                attempted,
                update_frequency,
            };
            let picks: Vec<usize> = (0..200)
                .map(|_| {
                    b.choose(None, (&[], Some(previous)), None, 50.0, Instant::now())
                        .expect("picks")
                })
                .collect();
            match (
                picks.iter().all(|&i| i < 10),
                picks.iter().all(|&i| i >= 10),
            ) {
                (true, _) => 0,
                (_, true) => 1,
                _ => panic!("picks in both priorities: {picks:?}"),
            }
        };
        // Healthy priority 0 takes everything until two attempts have been made there.
        assert_eq!(tier(&[], 2), 0);
        assert_eq!(tier(&[3], 2), 0);
        assert_eq!(tier(&[3, 4], 2), 1);
        // Between updates the last one holds.
        assert_eq!(tier(&[3, 4, 12], 2), 1);
        // Every priority attempted: the load as it was.
        assert_eq!(tier(&[3, 14], 2), 0);
        assert_eq!(tier(&[3], 1), 1);
    }
}
