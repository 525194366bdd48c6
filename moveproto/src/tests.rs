//! Directed tests of specific orderings (the seeded simulation in `tests/sim.rs` covers the rest).

use crate::*;
use std::collections::{BTreeMap, BTreeSet};

const S: NodeId = NodeId(1);
const D: NodeId = NodeId(2);
const F: NodeId = NodeId(3);
const TAG: MoveTag = MoveTag { mid: 1 << 48 | 7, epoch: 0 };
const T: Timeouts =
    Timeouts { start: 1_000, detach: 1_000, transfer_idle: 1_000, restore: 1_000, query_every: 100, hold: 5_000 };

fn vpid() -> Vpid {
    Vpid::compose(S, 1).unwrap()
}

/// The messages among `acts` sent to `to`, in order.
fn sent_to(acts: &[CoordAction], to: NodeId) -> Vec<MoveMsg> {
    acts.iter()
        .filter_map(|a| match a {
            CoordAction::Send(n, m) if *n == to => Some(m.clone()),
            _ => None,
        })
        .collect()
}

fn replies(acts: &[PartAction]) -> Vec<MoveMsg> {
    acts.iter().filter_map(|a| if let PartAction::Reply(m) = a { Some(m.clone()) } else { None }).collect()
}

/// A move of P from S to D; stream 1's fixed end is on F, stream 2's on D.
struct Move {
    c: Coordinator,
    d: Participant,
    f: Participant,
    now: Millis,
}

impl Move {
    fn new() -> Move {
        let streams: BTreeMap<u64, NodeId> = [(1, F), (2, D)].into();
        let mut c = Coordinator::new(TAG, vpid(), S, D, Vec::new(), BTreeSet::from([D, F]), streams, T, 0);
        let acts = c.start();
        let start = sent_to(&acts, D).pop().expect("Start to D");
        assert_eq!(sent_to(&acts, F), vec![start.clone()]);
        let mut d = Participant::new(D, &start, T, 1).unwrap();
        let mut f = Participant::new(F, &start, T, 1).unwrap();
        for (n, p) in [(D, &mut d), (F, &mut f)] {
            let acts = p.start(&start);
            assert!(matches!(acts[0], PartAction::MarkMigrating { .. }));
            for r in replies(&acts) {
                c.handle(2, CoordEvent::Msg(n, r));
            }
        }
        Move { c, d, f, now: 2 }
    }

    fn coord(&mut self, ev: CoordEvent) -> Vec<CoordAction> {
        self.now += 1;
        self.c.handle(self.now, ev)
    }

    /// Freeze, detach both streams, send the image: the coordinator is then Restoring.
    fn reach_restoring(&mut self) {
        assert_eq!(self.c.phase(), &Phase::Freezing);
        self.c.streams_found([(1, F), (2, D)].into());
        let acts = self.coord(CoordEvent::Frozen);
        assert_eq!(acts[0], CoordAction::DetachLocal);
        assert_eq!(sent_to(&acts, F), vec![MoveMsg::StreamDetach { tag: TAG, stream: 1 }]);
        assert_eq!(sent_to(&acts, D), vec![MoveMsg::StreamDetach { tag: TAG, stream: 2 }]);
        for (n, s) in [(F, 1), (D, 2)] {
            let p = if n == F { &mut self.f } else { &mut self.d };
            assert_eq!(
                p.handle(self.now, PartEvent::Msg(MoveMsg::StreamDetach { tag: TAG, stream: s })),
                vec![PartAction::DetachStream(s)]
            );
            let acts = self.coord(CoordEvent::Msg(n, MoveMsg::StreamDetached { tag: TAG, stream: s, held: true }));
            assert_eq!(acts.contains(&CoordAction::DumpAndSend), n == D, "dump once both are detached");
        }
        assert!(self.coord(CoordEvent::Progress).is_empty());
        let acts = self.coord(CoordEvent::ImageSent);
        assert_eq!(sent_to(&acts, D), vec![MoveMsg::Restore { tag: TAG }]);
        assert_eq!(self.c.phase(), &Phase::Restoring);
        assert_eq!(
            self.d.handle(self.now, PartEvent::Msg(MoveMsg::Restore { tag: TAG })),
            vec![PartAction::StartRestore]
        );
    }

    /// The restore succeeds; the coordinator sends Commit (returned) and is in doubt.
    fn reach_in_doubt(&mut self) -> MoveMsg {
        self.reach_restoring();
        let acts = self.d.handle(self.now, PartEvent::RestoreDone(Ok(4242)));
        assert_eq!(self.d.phase(), &PartPhase::Held { pid: 4242 });
        let restored = replies(&acts).pop().unwrap();
        let acts = self.coord(CoordEvent::Msg(D, restored));
        assert_eq!(acts[0], CoordAction::KillOriginalOnExit, "before Commit leaves");
        assert_eq!(self.c.phase(), &Phase::InDoubt);
        let commit = sent_to(&acts, D).pop().unwrap();
        assert!(matches!(commit, MoveMsg::Commit { pid: 4242, .. }));
        commit
    }
}

#[test]
fn happy_path_commits() {
    let mut m = Move::new();
    assert_eq!(m.c.phase(), &Phase::Freezing);
    let commit = m.reach_in_doubt();
    let acts = m.d.handle(m.now, PartEvent::Msg(commit));
    assert_eq!(acts[0], PartAction::ResumeHeld);
    assert!(acts.contains(&PartAction::RouteCommitted { dest: D, pid: 4242, group: vec![] }));
    assert_eq!(m.d.phase(), &PartPhase::Committed);
    let acts = m.coord(CoordEvent::Msg(D, replies(&acts).pop().unwrap()));
    // Routed to D before the original dies (its exit must not look like the process's end).
    assert_eq!(acts[0], CoordAction::RouteCommitted { dest: D, pid: 4242, group: vec![] });
    assert_eq!(acts[1], CoordAction::KillOriginal);
    assert!(!acts.contains(&CoordAction::Thaw));
    assert_eq!(acts.last(), Some(&CoordAction::Finish(Outcome::Committed { pid: 4242 })));
    let to_f = sent_to(&acts, F);
    assert_eq!(to_f.len(), 1);
    assert_eq!(
        m.f.handle(m.now, PartEvent::Msg(to_f[0].clone())),
        vec![PartAction::RouteCommitted { dest: D, pid: 4242, group: vec![] }]
    );
    assert!(m.c.is_done() && m.d.is_done() && m.f.is_done());
    // A late answer to an earlier Query changes nothing.
    assert!(m.coord(CoordEvent::Msg(D, MoveMsg::Outcome { tag: TAG, committed: false })).is_empty());
}

#[test]
fn destination_link_cut_while_restoring_rolls_back() {
    let mut m = Move::new();
    m.reach_restoring();
    let acts = m.coord(CoordEvent::LinkDown(D));
    assert!(matches!(acts.last(), Some(CoordAction::Finish(Outcome::RolledBack { .. }))));
    assert!(acts.contains(&CoordAction::ReattachLocal));
    assert!(acts.contains(&CoordAction::Thaw));
    assert!(!acts.iter().any(|a| matches!(a, CoordAction::KillOriginalOnExit | CoordAction::KillOriginal)));
    // F's fixed end is reattached to S, and F rolls back.
    let to_f = sent_to(&acts, F);
    assert!(to_f.contains(&MoveMsg::StreamReattach { tag: TAG, stream: 1 }));
    assert!(to_f.contains(&MoveMsg::Abort { tag: TAG, vpid: vpid() }));
    // D never hears of it (the link is down): its copy, restored after all, is held until the
    // hold timeout kills it.
    let acts = m.d.handle(m.now, PartEvent::RestoreDone(Ok(4242)));
    assert_eq!(replies(&acts), vec![MoveMsg::Restored { tag: TAG, pid: 4242, group: vec![] }]);
    assert!(m.d.handle(m.now + 10, PartEvent::Tick).is_empty());
    let acts = m.d.handle(m.d.deadline(), PartEvent::Tick);
    assert_eq!(acts, vec![PartAction::DiscardCopy, PartAction::RouteRolledBack]);
    // If S asked now, D would say: never resumed.
    let acts = m.d.handle(m.now, PartEvent::Msg(MoveMsg::Query { tag: TAG, vpid: vpid() }));
    assert_eq!(replies(&acts), vec![MoveMsg::Outcome { tag: TAG, committed: false }]);
}

#[test]
fn commit_lost_then_query_answered_aborted_thaws() {
    let mut m = Move::new();
    let _lost_commit = m.reach_in_doubt();
    // Nothing happens before the next query is due; then S asks.
    assert!(m.coord(CoordEvent::Tick).is_empty());
    let due = m.c.deadline();
    m.now = due;
    let acts = m.c.handle(due, CoordEvent::Tick);
    assert_eq!(acts, vec![CoordAction::Send(D, MoveMsg::Query { tag: TAG, vpid: vpid() })]);
    // D still holds the copy: it kills it first, then answers.
    let acts = m.d.handle(m.now, PartEvent::Msg(MoveMsg::Query { tag: TAG, vpid: vpid() }));
    assert_eq!(acts[0], PartAction::DiscardCopy);
    assert_eq!(replies(&acts), vec![MoveMsg::Outcome { tag: TAG, committed: false }]);
    assert_eq!(m.d.phase(), &PartPhase::Aborted);
    let acts = m.coord(CoordEvent::Msg(D, MoveMsg::Outcome { tag: TAG, committed: false }));
    assert!(acts.contains(&CoordAction::Thaw));
    assert!(acts.contains(&CoordAction::ReattachLocal));
    assert!(!acts.contains(&CoordAction::KillOriginal));
    assert!(matches!(m.c.phase(), Phase::Done(Outcome::RolledBack { .. })));
    // The lost Commit, had it come late after all, is refused (and S is done anyway).
    let acts = m
        .d
        .handle(m.now, PartEvent::Msg(MoveMsg::Commit { tag: TAG, vpid: vpid(), dest: D, pid: 4242, group: vec![] }));
    assert!(!acts.contains(&PartAction::ResumeHeld));
}

#[test]
fn in_doubt_ignores_link_down_and_asks_on_link_up() {
    let mut m = Move::new();
    m.reach_in_doubt();
    assert!(m.coord(CoordEvent::LinkDown(D)).is_empty(), "in doubt: never roll back on a link");
    assert!(m.coord(CoordEvent::LinkDown(F)).is_empty());
    assert_eq!(m.coord(CoordEvent::LinkUp(D)), vec![CoordAction::Send(D, MoveMsg::Query { tag: TAG, vpid: vpid() })]);
    // D had resumed: the answer commits.
    let acts = m.coord(CoordEvent::Msg(D, MoveMsg::Outcome { tag: TAG, committed: true }));
    assert_eq!(acts[1], CoordAction::KillOriginal);
}

#[test]
fn late_stream_detached_of_an_old_tag_is_ignored() {
    let old = MoveTag { mid: 1 << 48 | 6, epoch: 0 };
    let mut m = Move::new();
    m.c.streams_found([(1, F)].into());
    let acts = m.coord(CoordEvent::Frozen);
    assert_eq!(sent_to(&acts, F), vec![MoveMsg::StreamDetach { tag: TAG, stream: 1 }]);
    assert_eq!(m.c.phase(), &Phase::Detaching);
    // The previous attempt's answer for the same stream arrives late: not ours.
    assert!(m.coord(CoordEvent::Msg(F, MoveMsg::StreamDetached { tag: old, stream: 1, held: true })).is_empty());
    assert_eq!(m.c.phase(), &Phase::Detaching);
    // So are any other messages of it.
    assert!(m.coord(CoordEvent::Msg(D, MoveMsg::Restored { tag: old, pid: 1, group: vec![] })).is_empty());
    let acts = m.coord(CoordEvent::Msg(F, MoveMsg::StreamDetached { tag: TAG, stream: 1, held: true }));
    assert_eq!(acts, vec![CoordAction::DumpAndSend]);
    // A participant ignores other moves' messages too.
    assert!(m.f.handle(m.now, PartEvent::Msg(MoveMsg::Abort { tag: old, vpid: vpid() })).is_empty());
    assert_eq!(m.f.phase(), &PartPhase::Started);
}

#[test]
fn freeze_that_outlives_its_timeout_is_thawed() {
    let mut m = Move::new();
    let due = m.c.deadline();
    let acts = m.c.handle(due, CoordEvent::Tick);
    assert!(matches!(acts.last(), Some(CoordAction::Finish(Outcome::RolledBack { .. }))));
    assert!(!acts.contains(&CoordAction::Thaw), "not frozen (yet)");
    // The freeze completes after all: the process must not stay frozen.
    assert_eq!(m.c.handle(due + 5, CoordEvent::Frozen), vec![CoordAction::Thaw]);
}

#[test]
fn abort_before_restore_deletes_the_partial_image() {
    let mut m = Move::new();
    let acts = m.d.handle(m.now, PartEvent::Msg(MoveMsg::Abort { tag: TAG, vpid: vpid() }));
    assert_eq!(acts, vec![PartAction::DiscardCopy, PartAction::RouteRolledBack]);
    let acts = m.f.handle(m.now, PartEvent::Msg(MoveMsg::Abort { tag: TAG, vpid: vpid() }));
    assert_eq!(acts, vec![PartAction::RouteRolledBack]);
}

#[test]
fn without_a_machine_the_registry_answers() {
    let query = MoveMsg::Query { tag: TAG, vpid: vpid() };
    let commit = MoveMsg::Commit { tag: TAG, vpid: vpid(), dest: D, pid: 4242, group: vec![] };
    let reply = |me, msg: &MoveMsg, resumed| replies(&Participant::without_machine(me, msg, resumed));
    assert_eq!(reply(D, &query, true), vec![MoveMsg::Outcome { tag: TAG, committed: true }]);
    assert_eq!(reply(D, &query, false), vec![MoveMsg::Outcome { tag: TAG, committed: false }]);
    assert_eq!(reply(D, &commit, true), vec![MoveMsg::Committed { tag: TAG }]);
    assert_eq!(reply(D, &commit, false), vec![MoveMsg::Outcome { tag: TAG, committed: false }]);
    assert!(reply(F, &commit, false).is_empty());
    assert!(matches!(reply(D, &MoveMsg::Restore { tag: TAG }, false).as_slice(), [MoveMsg::Failed { .. }]));
    assert_eq!(
        Participant::without_machine(F, &MoveMsg::StreamDetach { tag: TAG, stream: 3 }, false),
        vec![PartAction::DetachStream(3)]
    );
}

#[test]
fn a_group_move_names_every_member_and_commits_them_with_their_pids() {
    let others = vec![Vpid::compose(S, 2).unwrap(), Vpid::compose(S, 3).unwrap()];
    let mut c = Coordinator::new(TAG, vpid(), S, D, Vec::new(), BTreeSet::from([D, F]), BTreeMap::new(), T, 0)
        .with_group(others.clone());
    let acts = c.start();
    let start = sent_to(&acts, D).pop().expect("Start to D");
    assert!(matches!(&start, MoveMsg::Start { group, .. } if *group == others), "Start names the others");
    let mut d = Participant::new(D, &start, T, 1).unwrap();
    let mut f = Participant::new(F, &start, T, 1).unwrap();
    assert_eq!(d.group, others);
    assert_eq!(f.group, others);
    for (n, p) in [(D, &mut d), (F, &mut f)] {
        for r in replies(&p.start(&start)) {
            c.handle(2, CoordEvent::Msg(n, r));
        }
    }
    c.handle(3, CoordEvent::Frozen);
    c.handle(4, CoordEvent::ImageSent);
    assert_eq!(d.handle(5, PartEvent::Msg(MoveMsg::Restore { tag: TAG })), vec![PartAction::StartRestore]);
    let pids = vec![(others[0], 501), (others[1], 502)];
    d.set_group_pids(pids.clone());
    let restored = replies(&d.handle(6, PartEvent::RestoreDone(Ok(500)))).pop().unwrap();
    assert_eq!(restored, MoveMsg::Restored { tag: TAG, pid: 500, group: pids.clone() });
    // A Restore repeated while held is answered with the same pids.
    assert_eq!(replies(&d.handle(7, PartEvent::Msg(MoveMsg::Restore { tag: TAG }))), vec![restored.clone()]);
    let commit = sent_to(&c.handle(8, CoordEvent::Msg(D, restored)), D).pop().unwrap();
    assert_eq!(commit, MoveMsg::Commit { tag: TAG, vpid: vpid(), dest: D, pid: 500, group: pids.clone() });
    let acts = d.handle(9, PartEvent::Msg(commit));
    assert!(acts.contains(&PartAction::RouteCommitted { dest: D, pid: 500, group: pids.clone() }));
    let acts = c.handle(10, CoordEvent::Msg(D, replies(&acts).pop().unwrap()));
    assert_eq!(acts[0], CoordAction::RouteCommitted { dest: D, pid: 500, group: pids.clone() });
    let to_f = sent_to(&acts, F).pop().unwrap();
    assert_eq!(f.handle(11, PartEvent::Msg(to_f)), vec![PartAction::RouteCommitted { dest: D, pid: 500, group: pids }]);
}
