use super::*;
use proptest::prelude::*;

const A: NodeId = 1;
const B: NodeId = 2;

/// Two agents in one group: what either sends is delivered to both in one order, unless the
/// pair is split, when each delivers only its own.
struct Pair {
    nodes: [Arbiter; 2],
    queue: Vec<(NodeId, Message)>,
    split: bool,
    takeovers: Vec<NodeId>,
    fenced: Vec<NodeId>,
}

fn idx(node: NodeId) -> usize {
    (node - 1) as usize
}

impl Pair {
    /// Both quorate on ring 1, A primary, B secondary, states delivered: a period runs.
    fn protected() -> Pair {
        let mut p = Pair {
            nodes: [Arbiter::new(A), Arbiter::new(B)],
            queue: Vec::new(),
            split: false,
            takeovers: Vec::new(),
            fenced: Vec::new(),
        };
        for n in [A, B] {
            p.feed(n, Input::Ring { seq: 1 });
            p.feed(
                n,
                Input::Quorum {
                    quorate: true,
                    ring: 1,
                },
            );
        }
        p.feed(A, Input::Local(VmState::Primary));
        p.feed(B, Input::Local(VmState::Secondary));
        p.deliver_all();
        assert!(p.nodes.iter().all(Arbiter::period_active));
        p
    }

    fn feed(&mut self, node: NodeId, input: Input) {
        for action in self.nodes[idx(node)].handle(input) {
            match action {
                Action::Send(m) => self.queue.push((node, m)),
                Action::TakeOver { .. } => self.takeovers.push(node),
                Action::Fence { .. } => self.fenced.push(node),
                Action::StartQuorumGrace | Action::CancelQuorumGrace => {}
            }
        }
    }

    fn deliver_one(&mut self) {
        if self.queue.is_empty() {
            return;
        }
        let (from, message) = self.queue.remove(0);
        let to: Vec<NodeId> = if self.split { vec![from] } else { vec![A, B] };
        for n in to {
            self.feed(
                n,
                Input::Delivered {
                    from,
                    message: message.clone(),
                },
            );
        }
    }

    fn deliver_all(&mut self) {
        // Bounded: every delivery can only add a few messages, and states do not repeat.
        for _ in 0..64 {
            if self.queue.is_empty() {
                return;
            }
            self.deliver_one();
        }
        panic!("the agents keep talking: {:?}", self.queue);
    }
}

#[test]
fn the_first_delivered_claim_wins_on_both_sides() {
    let mut p = Pair::protected();
    p.feed(
        A,
        Input::LocalTrigger {
            reason: "colo-exit".into(),
        },
    );
    p.feed(
        B,
        Input::Delivered {
            from: A,
            message: Message::State { vm: VmState::Gone },
        },
    );
    // B's claim is queued after A's: A's is delivered first.
    p.feed(
        B,
        Input::LocalTrigger {
            reason: "late".into(),
        },
    );
    p.deliver_all();
    assert_eq!(p.takeovers, vec![A]);
    assert_eq!(p.nodes[0].winner(), Some(A));
    assert_eq!(p.nodes[1].winner(), Some(A));
}

#[test]
fn a_dead_primary_vm_makes_the_secondary_take_over_and_nothing_else() {
    let mut p = Pair::protected();
    p.feed(A, Input::Local(VmState::Gone));
    p.deliver_all();
    assert_eq!(p.takeovers, vec![B]);
    assert!(p.fenced.is_empty(), "{:?}", p.fenced);
}

#[test]
fn a_primary_that_left_colo_alone_ends_the_period_so_its_later_death_makes_no_take_over() {
    // COLO ended on the primary and it serves alone (nobody claimed): the secondary's copy
    // goes stale from then on, so when the primary later dies the secondary must not serve.
    let mut p = Pair::protected();
    p.feed(A, Input::Local(VmState::Alone));
    p.deliver_all();
    assert!(p.nodes.iter().all(|n| !n.period_active()));
    p.feed(A, Input::Local(VmState::Gone));
    p.deliver_all();
    p.feed(
        B,
        Input::Left {
            node: A,
            cause: LeaveCause::NodeDown,
        },
    );
    p.deliver_all();
    assert!(p.takeovers.is_empty(), "{:?}", p.takeovers);
}

#[test]
fn a_claim_won_after_the_claimant_left_colo_alone_still_takes_over() {
    // The primary saw COLO end (its trigger), claimed, and reported itself alone before its
    // claim came back: the claim still wins and its failover sequence still runs.
    let mut p = Pair::protected();
    p.feed(
        A,
        Input::LocalTrigger {
            reason: "colo-exit".into(),
        },
    );
    p.feed(A, Input::Local(VmState::Alone));
    p.deliver_all();
    assert_eq!(p.takeovers, vec![A]);
    // The secondary, still in COLO, lost the claim: it stops its stale copy.
    assert_eq!(p.fenced, vec![B]);
}

#[test]
fn a_peer_agent_that_dies_alone_is_no_reason_to_take_over() {
    for cause in [LeaveCause::ProcessDown, LeaveCause::Left] {
        let mut p = Pair::protected();
        p.feed(B, Input::Left { node: A, cause });
        p.deliver_all();
        assert!(p.takeovers.is_empty(), "{cause:?}");
    }
}

#[test]
fn a_quorum_verdict_about_an_older_ring_does_not_allow_a_claim() {
    let mut p = Pair::protected();
    p.split = true;
    p.feed(B, Input::Ring { seq: 2 });
    p.feed(
        B,
        Input::Left {
            node: A,
            cause: LeaveCause::NodeDown,
        },
    );
    p.deliver_all();
    assert!(p.takeovers.is_empty(), "claimed on ring 1's verdict");
    p.feed(
        B,
        Input::Quorum {
            quorate: true,
            ring: 2,
        },
    );
    p.deliver_all();
    assert_eq!(p.takeovers, vec![B]);
}

#[test]
fn no_quorum_through_the_grace_fences_and_never_takes_over() {
    let mut p = Pair::protected();
    p.split = true;
    p.feed(A, Input::Ring { seq: 2 });
    p.feed(
        A,
        Input::Left {
            node: B,
            cause: LeaveCause::NodeDown,
        },
    );
    p.feed(
        A,
        Input::Quorum {
            quorate: false,
            ring: 2,
        },
    );
    p.feed(A, Input::GraceExpired);
    p.deliver_all();
    assert!(p.takeovers.is_empty());
    assert_eq!(p.fenced, vec![A]);
    // A verdict that comes back later does not resume a fenced VM.
    p.feed(
        A,
        Input::Quorum {
            quorate: true,
            ring: 2,
        },
    );
    p.feed(A, Input::Local(VmState::Primary));
    p.deliver_all();
    assert!(p.takeovers.is_empty());
}

#[test]
fn losing_corosync_fences_at_once() {
    let mut p = Pair::protected();
    p.feed(B, Input::ClusterLost);
    assert_eq!(p.fenced, vec![B]);
}

#[test]
fn an_unprotected_vm_keeps_serving_without_quorum() {
    let mut p = Pair::protected();
    p.feed(A, Input::Local(VmState::Gone));
    p.deliver_all();
    p.feed(B, Input::Local(VmState::Alone));
    p.feed(B, Input::Ring { seq: 2 });
    p.feed(
        B,
        Input::Quorum {
            quorate: false,
            ring: 2,
        },
    );
    p.feed(B, Input::GraceExpired);
    assert!(p.fenced.is_empty());
}

#[test]
fn strangers_cannot_grow_the_state_table() {
    let mut a = Arbiter::new(A);
    for node in 0..1000 {
        a.handle(Input::Delivered {
            from: node,
            message: Message::State { vm: VmState::Alone },
        });
    }
    assert!(a.views.len() <= MAX_TRACKED_NODES);
}

/// One step of a random run.
#[derive(Debug, Clone)]
enum Step {
    Trigger(NodeId),
    VmGone(NodeId),
    PeerNodeDown(NodeId),
    Deliver,
}

fn step() -> impl Strategy<Value = Step> {
    let node = prop_oneof![Just(A), Just(B)];
    prop_oneof![
        node.clone().prop_map(Step::Trigger),
        node.clone().prop_map(Step::VmGone),
        node.prop_map(Step::PeerNodeDown),
        Just(Step::Deliver),
        Just(Step::Deliver),
    ]
}

fn run(p: &mut Pair, steps: &[Step]) {
    for s in steps {
        match s {
            Step::Trigger(n) => p.feed(*n, Input::LocalTrigger { reason: "t".into() }),
            Step::VmGone(n) => p.feed(*n, Input::Local(VmState::Gone)),
            Step::PeerNodeDown(n) => {
                let peer = if *n == A { B } else { A };
                p.feed(
                    *n,
                    Input::Left {
                        node: peer,
                        cause: LeaveCause::NodeDown,
                    },
                );
            }
            Step::Deliver => p.deliver_one(),
        }
    }
    p.deliver_all();
}

proptest! {
    /// Connected: whatever both sides see and claim, in whatever interleaving, at most one
    /// takes over, and a winner's peer still in COLO is fenced.
    #[test]
    fn never_two_take_overs_in_one_group(steps in proptest::collection::vec(step(), 0..24)) {
        let mut p = Pair::protected();
        run(&mut p, &steps);
        prop_assert!(p.takeovers.len() <= 1, "{:?}", p.takeovers);
        if let Some(&w) = p.takeovers.first() {
            let loser = if w == A { B } else { A };
            prop_assert!(!p.nodes[idx(loser)].my_vm_protected(), "loser still in COLO");
            prop_assert!(!p.fenced.contains(&w));
        }
    }

    /// Split: each side delivers only its own messages; the witness gives the new ring's
    /// vote to one side at most. At most one side takes over, and only a quorate one; a side
    /// in COLO without quorum ends fenced.
    #[test]
    fn a_split_never_makes_two_primaries(
        steps in proptest::collection::vec(step(), 0..24),
        quorate_side in prop_oneof![Just(None), Just(Some(A)), Just(Some(B))],
    ) {
        let mut p = Pair::protected();
        p.split = true;
        for n in [A, B] {
            p.feed(n, Input::Ring { seq: 2 });
        }
        run(&mut p, &steps);
        for n in [A, B] {
            let peer = if n == A { B } else { A };
            p.feed(n, Input::Left { node: peer, cause: LeaveCause::NodeDown });
            p.feed(n, Input::Quorum { quorate: quorate_side == Some(n), ring: 2 });
            p.feed(n, Input::GraceExpired);
        }
        p.deliver_all();
        prop_assert!(p.takeovers.len() <= 1, "{:?}", p.takeovers);
        for &t in &p.takeovers {
            prop_assert_eq!(Some(t), quorate_side);
        }
        for n in [A, B] {
            if quorate_side != Some(n) {
                prop_assert!(!p.nodes[idx(n)].my_vm_protected(), "node {} in COLO without quorum", n);
            }
        }
    }
}
