"""The round protocol, sans-IO (h11 style): events in, actions out.

- book.py      RoundBook: who has sent which share for which round (the window, skipping
               ahead, the majority rule)
- liveness.py  Liveness (up, missed, absent, silent, ignorable) and StartBarrier
- seen.py      SeenReports: closed digests, early reports, split-equivocation findings
- hello.py     HelloLimiter: how often a member's hello is answered
- stats.py     StatsAgreement, Normalization: normalization votes and statistics before
               round 1
- echo.py      agree / EchoState: the digest echo, which shares a round combines (the rule,
               what it guarantees and costs: its docstring)
- phases.py    RoundParams, PhaseSpec, SHARE, ECHO, Wait (what a stage waits for)
- events.py    the inputs and actions (frozen dataclasses)
- machine.py   RoundMachine: phases, deadlines, the closing rule (how a driver calls it: below)

Nothing here reads a clock, does I/O, or imports node or torch.

For the lead: wiring Node (node/runtime/node.py) to the machine is mechanical:

    machine = RoundMachine(name, [m.name for m in consortium.members], book, params,
                           keys={m.name: m.public_key ...}, restarted=...,
                           prekeys_missing=lambda r, peers: sealing.recipients(r, peers)[1],
                           normalization=Normalization(...) if federated else None,
                           phases=(SHARE, ECHO) if rules.echo else (SHARE,),  # [rules] echo
                           faulty=the strategy's f)    # node/runtime/echo_round.machine_args
    do(machine.start(now()))
    while not machine.done:                     # one loop; the receiver task feeds a queue
        event = await next_event(until=machine.next_deadline)   # or None on timeout
        match event:
            Incoming msg: verify(msg.data, machine.current) ->
                machine.receive(acc, now, data=msg.data, token=msg.ack)  or
                machine.rejected(Rejected(exc.reason, exc.detail, exc.peer, exc.signed_round,
                                          msg.peer_hint, blake(msg.data), msg.ack), now)
            Released/Signed from a finished release task -> machine.released/.signed
            None -> machine.tick(now)
    do(actions), today's Node method for each:
      Broadcast/SendTo(Sign(k, r, body))  _sign(k, r, body) then _broadcast / _send
      Broadcast/SendTo(Stored(name))      _announcement / VOTE_FILE / STATS_FILE bytes
      RotatePrekeys(r, hello)             _rotate_prekeys(r, announce=hello)
      ForgetPrekeys                       Signer.forget_prekeys
      Train(r)                            _rotate_prekeys already done; reference model;
                                          Releaser.release(r) -> Released(r, outcome...)
      SendShare(r, seal_for, to, stored)  _pack_share (sealing.recipients(r, seal_for)),
                                          charge, store_release, broadcast -> Signed(r, own)
      Close(r, shares, missing, why)      norm_mismatch filter, strategy.aggregate (our own
                                          release only if close.own_enters(name)),
                                          AuditLog.aggregate, evaluate -> machine.closed(r, used);
                                          with the echo: close.echo.excluded -> audit lines,
                                          their held/claims/proof envelopes kept as evidence
      Advanced(r, nxt) / Joined           the "behind the consortium"/"joining" log lines
      Checkpoint(n)                       checkpoint.save (then the Ack that follows)
      Ack(tokens)                         call each ack
      Retire(r, why)                      _retire
      SendFinal(r) / Finals(...)          the final digest's send / finals.record (final.json)
      FinalSeenMissing                    the "no seen report for the last round" log line
      SendVote / SendStats                _own_vote / _own_stats, then broadcast
      AdoptRange / Combine                range_agreed / combine, then _adopt + audit line
      Abort(why)                          raise LocalError(why)
      Filed / Refused                     counters, audit.jsonl line, log once per (member, reason)
      Equivocation                        Findings.equivocation(second) with `first` (an echo's
                                          first is the first echo, not book.held)
      SeenMismatch                        the digest_mismatch counter, evidence file, audit claim
      Presence                            the absent / heard again log lines
      Waiting / WaitOver                  _report_wait / _write_activity(None)
"""

from gossip.protocol.book import RoundBook
from gossip.protocol.echo import Agreement, Exclusion, agree
from gossip.protocol.events import (
    Abort,
    Ack,
    Action,
    AdoptRange,
    Advanced,
    Broadcast,
    Checkpoint,
    Close,
    Combine,
    Equivocation,
    Filed,
    Finals,
    FinalSeenMissing,
    ForgetPrekeys,
    Joined,
    Message,
    PhaseMessage,
    Presence,
    Refused,
    Rejected,
    Released,
    Retire,
    RotatePrekeys,
    SeenMismatch,
    SendFinal,
    SendPhase,
    SendShare,
    SendStats,
    SendTo,
    SendVote,
    Sign,
    Signed,
    Stored,
    Tick,
    Train,
    Waiting,
    WaitOver,
)
from gossip.protocol.hello import HELLO_INTERVAL_S, HelloLimiter
from gossip.protocol.liveness import Liveness, StartBarrier, members_needed
from gossip.protocol.machine import AUTHENTIC_REASONS, Normalization, RoundMachine
from gossip.protocol.phases import ECHO, SHARE, PhaseSpec, RoundParams
from gossip.protocol.seen import FINAL_SEEN_WAIT_S, SEEN_KEEP_ROUNDS, SeenReports
from gossip.protocol.stats import StatsAgreement

__all__ = [
    "AUTHENTIC_REASONS", "ECHO", "FINAL_SEEN_WAIT_S", "HELLO_INTERVAL_S", "SEEN_KEEP_ROUNDS", "SHARE",
    "Abort", "Ack", "Action", "AdoptRange", "Advanced", "Agreement", "Broadcast", "Checkpoint", "Close",
    "Combine", "Equivocation", "Exclusion", "FinalSeenMissing", "Filed", "Finals", "ForgetPrekeys",
    "HelloLimiter", "Joined", "Liveness", "Message", "Normalization", "PhaseMessage",
    "PhaseSpec", "Presence", "Refused", "Rejected", "Released", "Retire", "RotatePrekeys",
    "RoundBook", "RoundMachine", "RoundParams", "SeenMismatch", "SeenReports", "SendFinal",
    "SendPhase", "SendShare", "SendStats", "SendTo", "SendVote", "Sign", "Signed",
    "StartBarrier", "StatsAgreement", "Stored", "Tick", "Train", "WaitOver", "Waiting",
    "agree", "members_needed",
]
