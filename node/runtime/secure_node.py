"""The node's side of a secure round (issue 22): what Node does at the machine's actions when
the consortium's [rules] say `secure = true`. The steps and their math:
node/runtime/secure_round.py; the rule: node/strategy/consortium_rules.py `secure_rule`.

- `setup` (at build): the secure rule, checked against this node (sealing must be on: a
  deal is sealed to its one recipient), and the agreed encoding. privacy.mode "off":
  FixedPoint over the consortium's clip (rules.clip, SECURE_DEFAULT_CLIP if none), the
  model's size and the member count. privacy.mode "record" (DP on the sum, issue 22): the
  consortium's distributed DP-SGD plan (node/privacy/secure.py secure_plan) from the
  [rules]' secure_rows / secure_epsilon / secure_delta, n, t, the model's size and the
  clip (this node's privacy config must say the same epsilon, delta and clip), pinned in
  the state dir (SECURE_PLAN_FILE) at the first start; the encoding is IntegerCodec at the
  plan's coordinate bound; the variant must be sum_only or range (the one-bit per-member
  range check at the plan's member bound: node/runtime/secure_range.py); update mode is refused.
- `release` (at Train), DP on the sum: charge the round (`record_secure_charge`, the one
  call site: fsync'd, budget-checked, before anything is computed or dealt; a refusal
  stops the node with the reason named), then this member's integer vector
  (node/learn/dstep.py consortium_step: Poisson sample at the plan's q, per-example
  clipping and rounding, its Skellam share; sampling and noise from the OS, never seeded),
  entered through IntegerCodec unchanged and dealt. PrivacyBudget's local DP-SGD plan is
  not run (node/runtime/build.py builds it "off" in this mode).
- `release` (at Train), no DP: train as today (Releaser.train: the budget, the local training),
  clip the update to the agreed clip, record the round's charge (`record_secure_charge`:
  the one call site), deal it, tell the machine; once it names the recipients (SendShare),
  seal each recipient's deal to it, sign it (kind "deal") and send it to that member only.
- `send_phase` (at SendPhase): our body for the step from what the machine collected
  (`SendPhase.got`) and the deals the round book holds; signed (kind "secagg"), sent to the
  phase's peers.
- `receive` (in Node.handle): a "secagg" message goes to `RoundMachine.phase_message`
  (the machine files it for its phase: late, unknown or second messages are refused
  there); a deal goes to `receive` like a share and, once filed, is stored as it arrived
  (node/runtime/secure_deals.py: a restart gives the round's received deals and step
  messages back to the machine, `refeed` at the first Train).
- `aggregate` (at Close): the round's outcome; on success every member applies the same
  step: the mean of the selected members' clipped updates (start + sum / m), through the
  agreed server optimizer if the [rules] have one (FedAdam in the default recipe; its state
  is the strategy's, checkpointed as today), and evaluates; a failed round keeps the
  model it started from (named in the log and the audit line) and the next round goes
  on. No seen report follows a secure round (each member holds a different deal of every
  other: digests that differ by design). With DP on the sum the step is the plan's SGD
  step, identical at every member: w -= lr * decode_sum(total) / (q rows_total).
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

import msgpack
import numpy as np
import torch
from nacl.exceptions import BadSignatureError
from nacl.signing import VerifyKey

from gossip.bodies import SECAGG_WITNESS_MAX, SecAgg, decode_secagg, encode_secagg
from gossip.envelope import KIND_DEAL, KIND_SECAGG, Accepted, decode_outer
from gossip.errors import LocalError, RemoteError
from gossip.membership import Consortium
from gossip.protocol import events as ev
from gossip.seal import KEY_BYTES as SEAL_KEY_BYTES
from gossip.seal import open_with_key, seal_ad, share_key, sole_recipient
from node.learn.models import get_flat, set_flat
from node.learn.train import evaluate
from node.privacy.secure import (
    SecurePlan,
    SecureRoundRefused,
    charge_secure_round,
    coordinate_bound_of,
    secure_plan,
)
from node.runtime import audit, echo_round
from node.runtime.evidence import envelope_bytes
from node.runtime.release import Stopped, Trained
from node.runtime.secure_bounds import largest_secure_message, sum_l2_bound
from node.runtime.secure_deals import keep_received, keep_step, prune, refeed, restored_deals
from node.runtime.secure_evidence import (
    keep_deal,
    keep_evidence,
    keep_signed_step,
    keep_split_evidence,
    step_path,
)
from node.runtime.secure_open import OptimisticRounds, open_phases, optimistic
from node.runtime.secure_range import range_params_of
from node.runtime.secure_round import (
    AGREE_PHASE,
    SUM_PHASE,
    SecureOutcome,
    SecureRounds,
    secure_phases,
)
from node.runtime.signer import sign_all
from node.runtime.state import atomic_write
from node.secagg.encoding import FixedPoint, IntegerCodec
from node.strategy import consortium_rules
from node.strategy.consortium_rules import parse_rules, secure_rule

if TYPE_CHECKING:
    from node.runtime.node import Node

log = logging.getLogger("flnode.node")

# The clip of a secure round's contributions when the consortium's [rules] give none: the
# encoding's bound R and the norm check are derived from it (node/secagg/encoding.py), and a
# member's update is clipped to it before dealing. `flnode simulate --secure` pins it.
SECURE_DEFAULT_CLIP = 1.0


def machine_args(consortium: Consortium, strategy_params: dict[str, Any],
                 me: str | None = None) -> dict[str, Any]:
    """RoundMachine's phases: the secure steps if the [rules] say secure (member `me`'s: its
    sum goes to its ring, node/runtime/secure_open.py), else the echo's."""
    rule = secure_rule(consortium)
    if rule is not None and me is not None:
        return {"phases": open_phases(rule.variant, me, [m.name for m in consortium.members],
                                      rule.threshold)}
    if rule is not None:
        return {"phases": secure_phases(rule.variant)}
    return echo_round.machine_args(consortium, strategy_params)


@dataclass
class Secure:
    """A node's secure mode: the rule's parts and the rounds' state."""

    rounds: SecureRounds
    codec: FixedPoint | IntegerCodec
    outcomes: dict[int, SecureOutcome]
    plan: SecurePlan | None = None  # DP on the sum (privacy.mode "record"), else None
    # round -> (sender, step) -> its signed check / degree2 / agree message as it reached
    # us (the first one): the evidence when an agreement shows a split view (`aggregate`)
    signed: dict[int, dict[tuple[str, str], bytes]] = field(default_factory=dict)
    # round -> its outcome, opened off the event loop before `aggregate` (`open_sum`)
    opened: dict[int, SecureOutcome] = field(default_factory=dict)
    # round -> the evidence `open_sum` wrote for its named members (off the event loop)
    kept: dict[int, dict[str, str | list[str]]] = field(default_factory=dict)
    # round -> (sender, step) already given an `accepted` audit line (rounds within the
    # machine's lookahead: `phase_drop`; pruned at the round's close)
    audited: dict[int, set[tuple[str, str]]] = field(default_factory=dict)
    # round -> the received deals a restart reloaded from the state dir (secure_deals.py),
    # read once per round; pruned at the round's close
    restored: dict[int, dict[str, Accepted]] = field(default_factory=dict)
    refed: bool = False  # given back what a run before a restart received (secure_deals)


def held_deals(node: Node, r: int) -> dict[str, Accepted]:
    """Round r's deals we hold: the round book's, and those a run before a restart received
    and stored (node/runtime/secure_deals.py) for dealers the book lacks now."""
    sec = node.secure
    assert sec is not None
    book = node.book.shares(r)
    if r not in sec.restored:
        sec.restored = {k: v for k, v in sec.restored.items() if k >= r}  # bounded
        sec.restored[r] = restored_deals(node, r, set(book))
    return {**sec.restored[r], **book}


# The consortium's distributed DP-SGD plan, pinned in the state dir at the first start (a
# budget partly spent is never re-planned; a plan that no longer matches the [rules] stops
# the node).
SECURE_PLAN_FILE = "secure_plan.json"


def plan_for(node: Node, rule_select: str) -> SecurePlan:
    """The consortium's plan from the [rules] (every member derives the same: its inputs are
    all in the consortium file), checked against this node's privacy config, pinned."""
    rules, pc = parse_rules(node.consortium), node.cfg.privacy
    assert rules is not None
    if pc.mode != "record":
        raise LocalError(f"the consortium's [rules] say secure = true and privacy.mode = "
                         f"{pc.mode!r}: a secure round carries DP per record on the sum "
                         "(privacy.mode = \"record\") or none (\"off\")")
    if rules.secure_rows is None or rules.secure_epsilon is None or rules.secure_delta is None:
        raise LocalError("privacy.mode = \"record\" with secure = true, but the consortium's "
                         "[rules] have no secure_rows / secure_epsilon / secure_delta: every "
                         "member must plan the same noise; rebuild the consortium file with "
                         "them (flnode consortium build --secure, or simulate --secure)")
    if rules.clip is None:  # each member would plan with its own (review 2 F11)
        raise LocalError("the consortium's [rules] plan DP on the secure sum (secure_rows / "
                         "secure_epsilon / secure_delta) but pin no clip: every member would "
                         "decode the same opened sum with its own privacy.clip and apply a "
                         "different step; rebuild the consortium file with --clip")
    clip = rules.clip
    for key, mine, agreed in (("epsilon", pc.epsilon, rules.secure_epsilon),
                              ("delta", pc.delta, rules.secure_delta), ("clip", pc.clip, clip)):
        if mine != agreed:
            raise LocalError(f"privacy.{key} = {mine!r} but the consortium's [rules] pin "
                             f"{agreed!r} for secure rounds (every member's noise share is "
                             "sized from it): set privacy." + key + " to the agreed value")
    if node.schema.mode == "federated":  # its statistics would go out exact (no local plan)
        raise LocalError("the schema says normalize = \"federated\" and the [rules] say secure "
                         "rounds with DP on the sum: the statistics exchange is not part of the "
                         "secure plan's budget yet (its charge would be missing); use "
                         "normalize = \"range\" (the schema's declared ranges) or \"declared\" "
                         "(means and stds from a public source) and rebuild the consortium file")
    if rule_select not in consortium_rules.DP_SELECTS:
        raise LocalError(f"rules.secure_select = {rule_select!r} with DP on the sum: only "
                         "\"range\" and \"sum\" are charged at the sum's noise "
                         "(docs/privacy-secure.md)")
    rule = secure_rule(node.consortium)
    assert rule is not None
    plan = secure_plan(rows_total=rules.secure_rows, members=len(node.consortium.members),
                       coalition=rule.threshold, epsilon=rules.secure_epsilon,
                       delta=rules.secure_delta, dim=int(get_flat(node.model).numel()),
                       clip_norm=clip, variant=rule.variant)
    path = node.state.path / SECURE_PLAN_FILE
    pinned = SecurePlan.load(path)
    if pinned is None:
        plan.save(path)
        return plan
    if pinned.digest() != plan.digest():
        raise LocalError(f"{path}: the pinned secure plan (digest {pinned.digest()}) is not the "
                         f"one the consortium's [rules] give now ({plan.digest()}): the rules or "
                         "the model changed under a partly spent budget; start a new state dir")
    return pinned


def setup(node: Node) -> Secure | None:
    """The node's secure mode (None: plain rounds); LocalError if this node cannot run it."""
    rule = secure_rule(node.consortium)
    if rule is None:
        return None
    if node.sealing is None:
        raise LocalError("the consortium's [rules] say secure = true: a secure round seals "
                         "each member's pieces to their one recipient; set gossip.seal = "
                         "\"on\" in the node config")
    members = [m.name for m in node.consortium.members]
    what, size = largest_secure_message(len(members), rule.threshold,
                                        int(get_flat(node.model).numel()),
                                        SECAGG_WITNESS_MAX if rule.variant == "range" else 0)
    if size > node.cfg.gossip.max_envelope_bytes:
        raise LocalError(f"a secure round of this model sends {what} of up to {size} bytes, "
                         f"over gossip.max_envelope_bytes = {node.cfg.gossip.max_envelope_bytes}"
                         ": raise it at every member, or use a smaller model (8 bytes per "
                         "value per deal)")
    if node.cfg.privacy.mode != "off":
        plan = plan_for(node, rule.select)
        icodec = IntegerCodec(len(members), plan.dim, coordinate_bound_of(plan))
        log.info("%s: secure DP-SGD plan %s: %d rounds, q %.4g, sigma %.4g, lr %.4g, floor %d",
                 node.name, plan.digest(), plan.steps, plan.sample_rate,
                 plan.noise_multiplier, plan.lr, plan.min_contributors)
        return Secure(rounds(node.name, members, rule.threshold, rule.variant, icodec,
                             node.consortium.id, plan.min_contributors,
                             sum_l2_bound(plan), range_params_of(plan)
                             if rule.variant == "range" else None), icodec, {}, plan)
    rules = parse_rules(node.consortium)
    if rules is not None and rules.secure_rows is not None:  # check_secure: all DP keys or none
        raise LocalError("privacy.mode = 'off' but the consortium's [rules] plan DP on the "
                         "secure sum (secure_rows / secure_epsilon / secure_delta): every "
                         "member adds its share of the sum's noise with the agreed encoding, "
                         "and the others' ledgers count ours; set privacy.mode = \"record\" "
                         "with the agreed epsilon, delta and clip")
    clip = rules.clip if rules is not None and rules.clip is not None else SECURE_DEFAULT_CLIP
    codec = FixedPoint.choose(clip, int(get_flat(node.model).numel()), len(members))
    log.warning("%s: secure aggregation is EXPERIMENTAL (t = %d, %s): the members agree before "
                "opening the sum, not before the degree-2 values (docs/privacy-secure.md, "
                "'What the agreement does not close')", node.name, rule.threshold, rule.variant)
    return Secure(rounds(node.name, members, rule.threshold, rule.variant, codec,
                         node.consortium.id), codec, {})


def rounds(me: str, members: list[str], threshold: int, *args: Any) -> SecureRounds:
    """The rounds' state: the optimistic sum opening when the ring saves pieces
    (node/runtime/secure_open.py, the phases `machine_args` gives), else today's."""
    kind = OptimisticRounds if optimistic(len(members), threshold) else SecureRounds
    return kind(me, members, threshold, *args)


def contribution(node: Node, t: Trained, clip: float) -> np.ndarray:
    """Our contribution to the secure sum: the round's update clipped to the agreed clip.
    (With DP on the sum this becomes node/learn/dstep.py's consortium_step: the clipped
    per-example gradient sum plus our Skellam noise share.)"""
    update = t.update.detach().double().numpy()
    norm = float(np.linalg.norm(update))
    return update * min(1.0, clip / norm) if norm > 0 and np.isfinite(norm) else update * 0


def record_secure_charge(node: Node, r: int, t: Trained | None) -> None:
    """THE call site where a secure round's privacy charge is recorded, before any piece of
    our contribution exists outside memory (as the Releaser charges before a share's bytes
    exist). DP on the sum: the round's "secure" record (node/privacy/secure.py
    charge_secure_round: at the plan's floor of contributors, which the round enforces
    before opening; the plan's digest in the record), fsync'd; SecureRoundRefused (nothing
    written) when the budget is spent. Without DP (`t` from the local training): nothing."""
    sec = node.secure
    assert sec is not None
    if sec.plan is not None:
        charge_secure_round(node.ledger, sec.plan, round_=r, digest=sec.plan.digest())
        return
    if node.cfg.privacy.mode != "off" or t is None or t.charges:
        raise LocalError(f"{node.name}: round {r + 1}: a secure round with charges to record "
                         "but no secure plan: refusing to deal (a bug)")


def dp_contribution(node: Node, plan: SecurePlan) -> np.ndarray:
    """Our integer vector for a DP-on-the-sum round (node/learn/dstep.py consortium_step):
    sampling, rounding and noise from the OS (never a config seed: it protects records)."""
    from node.learn.dstep import consortium_step  # lean start: torch per-example gradients
    from node.privacy.distributed import os_generator  # lean start: with the step above
    from node.privacy.mechanisms import OsNoise  # lean start: with the step above

    data = node.train_data
    vec, _batch = consortium_step(node.model, np.asarray(data.X), np.asarray(data.y),
                                  sample_rate=plan.sample_rate, mech=plan.mechanism(),
                                  sigma=plan.noise_multiplier, noise=OsNoise(),
                                  rng=os_generator())
    return vec


# Our dealing of a round, stored before any deal is sent (outbox/round-N.deals, pruned with
# the round's other outbox files once it is closed): after a restart the same deals are
# re-sent byte for byte, never redrawn, so no member holds two different deals of ours for
# one round (which the round book would take as an equivocation).
DEALS_SUFFIX = ".deals"
DEALS_VERSION = 1


def _deals_path(node: Node, r: int) -> Path:
    return node.state.outbox_path(r).with_suffix(DEALS_SUFFIX)


def _store_deals(node: Node, r: int, doc: dict[str, Any]) -> None:
    atomic_write(_deals_path(node, r), msgpack.packb({"version": DEALS_VERSION, "round": r,
                                                      **doc}, use_bin_type=True))


def stored_deals(node: Node, r: int) -> dict[str, Any] | None:
    """Our stored dealing of round r ({"own", "bodies", "sent"}), if a run stored one."""
    path = _deals_path(node, r)
    if not path.exists():
        return None
    try:
        doc = msgpack.unpackb(path.read_bytes(), raw=False)
        if doc["version"] != DEALS_VERSION or doc["round"] != r:
            raise ValueError(f"version {doc['version']}, round {doc['round']}")
        return {"own": tuple(doc["own"]), "bodies": dict(doc["bodies"]), "sent": dict(doc["sent"])}
    except (ValueError, KeyError, TypeError, msgpack.UnpackException) as exc:
        raise LocalError(f"{path}: not our stored dealing of round {r + 1} ({exc}): move it "
                         "away to deal again (the others may then hold two deals of ours)") from None


async def release(node: Node, r: int) -> None:
    """Train, clip, charge, deal (or our stored dealing after a restart); once the machine
    names the recipients, seal, sign and send each member's deal to it alone."""
    m, loop, st, sec = node.machine, asyncio.get_running_loop(), node._round, node.secure
    assert st is not None and sec is not None
    if not sec.refed:  # the first round this process runs: a restart's (secure_deals.py)
        sec.refed = True
        for ahead in range(r, r + node.book.lookahead + 1):
            refeed(node, ahead, loop.time(), receive)
    stored = stored_deals(node, r)
    if stored is not None:
        sr = sec.rounds.round(r)
        sr.restore(stored["own"][:2], stored["own"][2])
        await _send_deals(node, r, stored)
        return
    if sec.plan is not None:  # DP on the sum: charge, then our integer vector, then deal
        try:
            record_secure_charge(node, r, None)
        except SecureRoundRefused as exc:
            log.warning("%s: round %d: %s: not dealing", node.name, r + 1, exc)
            node._feed(m.released(ev.Released(r, "stopped", why=f"{exc.reason}: {exc}"),
                                  loop.time()))
            return
        vec = await asyncio.to_thread(dp_contribution, node, sec.plan)
        st.norm, st.own = math.nan, None
        await _deal(node, r, sec.codec.encode(vec))
        return
    trained = await node.releaser.train(r)
    if isinstance(trained, Stopped):
        node._feed(m.released(ev.Released(r, "stopped", why=trained.reason), loop.time()))
        return
    if not isinstance(trained, Trained):  # a stored plain release: not a secure round's
        raise LocalError(f"{node.name}: round {r + 1}: a stored plain share in a secure "
                         "consortium (the state dir is from another consortium?)")
    st.norm = trained.norm
    st.own = None
    if not bool(torch.isfinite(trained.update).all()):
        node.counters.rejected["non_finite_local"] += 1
        node._feed(m.released(ev.Released(r, "non_finite"), loop.time()))
        return
    record_secure_charge(node, r, trained)
    assert isinstance(sec.codec, FixedPoint)
    await _deal(node, r, sec.codec.encode(contribution(node, trained, sec.codec.clip)))


async def _deal(node: Node, r: int, encoded: np.ndarray) -> None:
    """Deal our encoded contribution, store the dealing, then send it."""
    sec = node.secure
    assert sec is not None
    deals = sec.rounds.deal(r, encoded)
    sr = sec.rounds.round(r)
    own = sr.own_pieces()
    if own is None:  # variant range: our own vector fails its range (the 2^-40 tail): no deal
        log.warning("%s: round %d: %s: not dealing", node.name, r + 1, sr.out.detail)
        m, loop = node.machine, asyncio.get_running_loop()
        node._feed(m.released(ev.Released(r, "non_finite", why=sr.out.detail), loop.time()))
        return
    doc: dict[str, Any] = {"own": [*own, sr.commitments[sr.i]], "bodies": deals, "sent": {}}
    _store_deals(node, r, doc)  # before any deal exists outside memory
    await _send_deals(node, r, doc)


async def _send_deals(node: Node, r: int, doc: dict[str, Any]) -> None:
    """Tell the machine our deals are ready; to each recipient it names, the deal already
    signed for it (a restart), else its body sealed to its prekey and signed now (stored
    before it is sent)."""
    m, loop = node.machine, asyncio.get_running_loop()
    node._go = loop.create_future()
    node._feed(m.released(ev.Released(r, "new"), loop.time()))
    seal_for = await node._go
    assert node.sealing is not None
    bodies, sent = doc["bodies"], doc["sent"]
    fresh = [p for p in seal_for if p in bodies and p not in sent]
    recipients, missing = node.sealing.recipients(r, fresh)
    if missing:
        log.warning("%s: round %d: no prekey from %s: they get no deal from us", node.name,
                    r + 1, ", ".join(missing))
    sealed = {peer: node.signer.seal(r, bodies[peer], {peer: prekey})
              for peer, prekey in sorted(recipients.items())}
    ready = {peer: s for peer, s in sealed.items() if s is not None}
    # one durable seq reservation for the round's deals (Signer.sign_many), not one each
    sent.update(zip(ready, sign_all(node.signer, KIND_DEAL, r, list(ready.values())), strict=True))
    if recipients:
        _store_deals(node, r, doc)
    for peer in sorted(p for p in seal_for if p in sent):
        await node._in_background(node._send(peer, sent[peer]), f"deal-{r}-{peer}")
    # dealt: the machine's share phase gets a full deadline from now on (our prekey wait,
    # up to one deadline for a member that is down, must not leave none for the deals)
    node._feed(m.signed(ev.Signed(r, None, dealt=bool(sent)), loop.time()))


async def send_phase(node: Node, a: ev.SendPhase) -> None:
    """Our message of a secure step, to the step's peers. Stored before it leaves; after a
    restart the stored message is re-sent byte for byte, never recomputed: a restarted
    member whose view of the round changed would otherwise open a second, different piece
    of the step (two sum pieces over different selections reveal their difference)."""
    sec = node.secure
    assert sec is not None
    deals = {s: acc.secagg for s, acc in held_deals(node, a.round).items()
             if acc.secagg is not None}
    # The round's state for the step, computed in a worker thread: judging every dealing and
    # decoding the degree-2 values (Berlekamp-Welch per coordinate) cost what the peers'
    # pieces make them cost, and must not stall the event loop (transports, deadlines). The
    # driver awaits it before its next action, so nothing else touches the round meanwhile.
    def step() -> bytes:  # the reveals' signatures and decryption too: the peers' sizes
        reveals = read_reveals(node, a.round, a.got.get(AGREE_PHASE, {})) \
            if a.phase == SUM_PHASE else None
        return sec.rounds.phase(a.round, a.phase, a.got, deals, reveals)

    body = await asyncio.to_thread(step)
    path = step_path(node, a.round, a.phase)
    if path.exists():
        data = path.read_bytes()
        sent = decode_outer(data)
        if (sent.kind, sent.round) != (KIND_SECAGG, a.round):
            raise LocalError(f"{path}: not our {a.phase} message of round {a.round + 1} "
                             f"(kind {sent.kind!r}, round {sent.round + 1}): move it away")
        sec.rounds.keep_own(a.round, a.phase, sent.body)
        if bytes(sent.body) != body:
            log.warning("%s: round %d: our %s step differs from the one sent before the "
                        "restart: re-sending the stored one", node.name, a.round + 1, a.phase)
    else:
        if a.phase == AGREE_PHASE:  # our disputes: the dealer-signed deals, for everyone
            body = with_reveals(node, a.round, body)
            sec.rounds.keep_own(a.round, a.phase, body)
        data = node._sign(KIND_SECAGG, a.round, body)
        atomic_write(path, data)  # before it exists outside memory
    if set(a.peers) >= set(node.book.neighbours):
        await node._in_background(node._broadcast(a.round, data), f"{a.phase}-{a.round}")
    else:
        for peer in a.peers:
            await node._in_background(node._send(peer, data), f"{a.phase}-{a.round}-{peer}")


def with_reveals(node: Node, r: int, body: bytes) -> bytes:
    """Our agreement with one reveal per dealer our check disputes: the key of its sealed
    deal (fresh per message, committed to in the signed header: it opens that deal and no
    other) and the deal's signed envelope as it reached us. Revealing our piece of that
    dealer's vector tells a coalition nothing it could not learn: either the dealer lied
    (its own vector) or we did (then we are the coalition's)."""
    sec = node.secure
    assert sec is not None and node.signer.sealing is not None
    sr = sec.rounds.round(r)
    msg = decode_secagg(body, len(sr.members))
    if not msg.pieces:
        return body  # we open nothing: no statement to attach reveals to
    shares = held_deals(node, r)
    reveals = []
    for i in sr.my_disputes():
        acc = shares.get(sr.members[i - 1])
        if acc is None:
            continue
        key = share_key(acc.envelope.body, node.signer.sealing.own)
        reveals.append(key + envelope_bytes(acc.envelope))
    if not reveals:
        return body
    log.warning("%s: round %d: revealing %d disputed deal(s) signed by their dealers",
                node.name, r + 1, len(reveals))
    return encode_secagg(SecAgg(AGREE_PHASE, (msg.pieces[0], *reveals)))


def read_reveals(node: Node, r: int, agreements: Mapping[str, bytes]
                 ) -> dict[tuple[int, int], SecAgg | str]:
    """(holder, dealer) -> the deal the dealer signed for the holder, opened with the key
    the holder revealed (the dealer's signature and the sealed body's key commitment
    checked), or why the reveal is no proof (the holder's fault)."""
    if not agreements:
        return {}
    members = tuple(sorted(m.name for m in node.consortium.members))
    index = {m: k + 1 for k, m in enumerate(members)}
    keys = {m.public_key: m.name for m in node.consortium.members}
    out: dict[tuple[int, int], SecAgg | str] = {}
    for holder, body in sorted(agreements.items()):
        if holder not in index:
            continue
        try:
            pieces = decode_secagg(body, len(members), holder).pieces[1:]
        except RemoteError:
            continue  # named by the round (bad_agree)
        j = index[holder]
        known = _prekeys_of(node, holder)
        if not known:
            continue  # we cannot tell whom its deals were sealed to: its disputes stay claims
        for data in pieces:
            try:
                env = decode_outer(data[SEAL_KEY_BYTES:])
            except RemoteError:
                continue  # no dealer to attribute it to: the dispute stays unbacked
            dealer = keys.get(env.sender)
            if dealer is None:
                continue
            try:
                if env.consortium_id != node.consortium.id or (env.kind, env.round) != (KIND_DEAL, r):
                    raise ValueError(f"a {env.kind} of round {env.round + 1}, not this round's deal")
                try:
                    VerifyKey(env.sender).verify(env.digest, env.sig)
                except BadSignatureError:
                    raise ValueError(f"{dealer}'s signature does not verify") from None
                if sole_recipient(env.body, dealer) not in known:
                    raise ValueError(f"that deal is sealed to another member than {holder} "
                                     "(not its deal: review 2 F2)")
                plain = open_with_key(env.body, data[:SEAL_KEY_BYTES],
                                      seal_ad(node.consortium.id, env.sender, r), holder)
                out[(j, index[dealer])] = decode_secagg(plain, len(members), dealer, deal=True)
            except (ValueError, RemoteError) as exc:
                out.setdefault((j, index[dealer]), f"its reveal of {dealer}'s deal is no proof: "
                               f"{exc}")
    return out


def _prekeys_of(node: Node, member: str) -> set[bytes]:
    """The X25519 prekeys we know `member` signed (ours: the ones we hold): a revealed deal
    must be sealed to one of them, or it is not the revealer's."""
    sealing = node.signer.sealing
    if sealing is None:
        return set()
    if member == node.name:
        return {bytes(k.public_key) for k in sealing.own.keys.values()}
    return {p.x25519 for p in sealing.peers.get(member, {}).values()}


def receive(node: Node, acc: Accepted, now: float, data: bytes, token: Any) -> list[ev.Action]:
    """An accepted message for the machine: a secure step's to its phase, the rest as usual."""
    if acc.envelope.kind != KIND_SECAGG or acc.secagg is None:
        actions = node.machine.receive(acc, now, data=data, token=token)
        if acc.envelope.kind == KIND_DEAL and any(isinstance(a, ev.Filed) and a.accepted is acc
                                                  for a in actions):
            keep_received(node, acc)  # durable before it is acked (a SIGKILL loses nothing)
        return actions
    out: list[ev.Action] = [ev.Ack((token,))] if token is not None else []
    env, step = acc.envelope, acc.secagg.step
    dropped = phase_drop(node, acc)
    if dropped is not None:  # the machine would drop it silently: say so (review finding M2)
        node.counters.rejected[dropped[0]] += 1
        node.audit.write(audit.Refused(acc.round, acc.sender, env.digest.hex(), env.kind,
                                       *dropped))
        return out
    keep_signed_step(node, acc, data)
    filed = node.machine.phase_message(
        ev.PhaseMessage(acc.sender, acc.round, step, bytes(env.body)), now)
    if not any(isinstance(a, ev.Refused) and a.member == acc.sender for a in filed):
        seen = node.secure.audited.setdefault(acc.round, set())  # type: ignore[union-attr]
        if (acc.sender, step) in seen:  # a re-signed copy: counted, not audited (review 2 F14)
            node.counters.rejected["duplicate_step"] += 1
        else:
            seen.add((acc.sender, step))
            node.audit.write(audit.Accepted(acc.round, acc.sender, env.seq, env.digest.hex(),
                                            env.kind, step))
        keep_step(node, acc, data)  # durable before it is acked (a SIGKILL loses nothing)
    return out + filed


def phase_drop(node: Node, acc: Accepted) -> tuple[str, str] | None:
    """Why the round machine drops a verified secure-step message unseen (bounded memory:
    gossip/protocol/machine.py `_phase_in`, the same rules), or None: it files it."""
    step, r, book = acc.secagg.step, acc.round, node.book  # type: ignore[union-attr]
    spec = next((p for p in node.machine.phases[1:] if p.name == step), None)
    if spec is None:
        return "no_phase", f"our rounds have no {step} phase"
    if acc.sender not in book.neighbours or (spec.peers is not None and acc.sender not in spec.peers):
        return "not_phase_peer", f"not a peer of our {step} phase"
    if r < book.current:
        return f"late_{step}", f"{step} for round {r}, we are at round {book.current}"
    if r > book.current + book.lookahead:
        return "too_far", f"{step} for round {r}, beyond round {book.current + book.lookahead}"
    return None


def open_sum(node: Node, c: ev.Close) -> None:
    """The round's outcome (the sum's pieces decoded), kept for `aggregate`; run in a worker
    thread (node/runtime/closing.py aggregate_off_loop): it touches only the round's state,
    which nothing else touches until the driver's next action."""
    sec = node.secure
    assert sec is not None
    out = sec.rounds.close(c.round, c.phases)
    held = {**sec.restored.get(c.round, {}), **c.shares}  # a restart's reloaded deals too
    sec.kept = {c.round: keep_evidence(node, c.round, out, held)}  # bounded: the last round
    sec.opened = {c.round: out}


def aggregate(node: Node, c: ev.Close) -> dict[str, Accepted]:
    """The secure round's outcome applied (module docstring); no share is "used": the seen
    report stays empty."""
    st, sec = node._round, node.secure
    assert st is not None and sec is not None
    r = c.round
    opened = sec.opened.pop(r, None)  # opened off the event loop (open_sum), or now
    out = sec.outcomes[r] = opened if opened is not None else sec.rounds.close(r, c.phases)
    sec.outcomes = {k: v for k, v in sec.outcomes.items() if k >= r - 1}  # bounded
    if out.ok and sec.plan is not None:  # the plan's SGD step on the noised gradient sum
        from node.privacy.distributed import decode_sum  # lean start: with the DP step
        assert out.total is not None
        grad = decode_sum(out.total, sec.plan.mechanism()) / sec.plan.expected_batch
        combined = st.reference.double() - sec.plan.lr * torch.from_numpy(grad)
        set_flat(node.model, combined.to(st.reference.dtype))
    elif out.ok:
        assert out.total is not None
        mean = torch.from_numpy(out.total / len(out.selected))
        combined = st.reference.double() + mean
        server = getattr(node.strategy, "server", None)  # the agreed server optimizer
        if server is not None:  # its notes (a skipped non-finite step) go to the log
            notes = SimpleNamespace(fallbacks=[], server_opt=None)
            combined = server.step(r, st.reference.double(), combined, notes)
            for note in notes.fallbacks:
                log.warning("%s: round %d: %s", node.name, r + 1, note.detail)
        set_flat(node.model, combined.to(st.reference.dtype))
    else:
        log.warning("%s: round %d: the secure round failed (%s: %s); keeping the model it "
                    "started from", node.name, r + 1, out.reason, out.detail)
        set_flat(node.model, st.reference)
        if out.missed:  # the others applied an aggregate we cannot: the models diverge
            log.warning("%s: round %d: missed_opening: %d member(s) (%s) opened the sum while "
                        "our round failed: where its decoding succeeded they applied the "
                        "round's aggregate, and our model now differs from theirs "
                        "(docs/privacy-secure.md)", node.name, r + 1,
                        len(out.missed), ", ".join(out.missed))
            node.counters.aggregation[f"{node.name}:secure:missed_opening"] += 1
    kept = sec.kept.pop(r, None)  # written off the event loop (open_sum), or now
    evidence = kept if kept is not None else keep_evidence(
        node, r, out, {**sec.restored.get(r, {}), **c.shares})
    for member, why in sorted(out.named.items()):
        if node.audit.once(member, f"secure:{why.split(':')[0]}"):
            log.warning("%s: round %d: %s named by the secure round: %s (further are "
                        "counted, not logged)", node.name, r + 1, member, why)
        node.counters.aggregation[f"{member}:secure:{why.split(':')[0]}"] += 1
    excluded = {m: {"reason": why.split(":")[0], "detail": why}
                for m, why in sorted(out.excluded.items())}
    diagnostics = {"rule": "secure", "used": list(out.selected), "excluded": excluded,
                   "clipped": {}, "weight_capped": {}, "down_weighted": {}, "fallbacks": [],
                   "secure": {"ok": out.ok, "reason": out.reason, "detail": out.detail,
                              "dealt": list(out.dealt), "entered": list(out.entered),
                              "named": dict(out.named), "evidence": evidence,
                              "missed_opening": list(out.missed)}}
    node.audit.aggregate(r, diagnostics, node.counters.aggregation)
    sec.signed = {k: v for k, v in sec.signed.items() if k > r}  # the evidence is on disk
    sec.audited = {k: v for k, v in sec.audited.items() if k > r}
    sec.restored = {k: v for k, v in sec.restored.items() if k > r}
    # the rounds before: round r's received files stay until the next round closes, so a kill
    # before this close's checkpoint re-runs round r with them (the last round: pruned now)
    prune(node, r if r + 1 < node.machine.params.rounds else r + 1)
    st.close, st.received, st.diagnostics = c, sorted(out.selected), diagnostics
    st.metrics = evaluate(node.model, node.held_out.X, node.held_out.y)
    return {}


__all__ = ["SECURE_DEFAULT_CLIP", "SECURE_PLAN_FILE", "Secure", "aggregate", "audit",
           "dp_contribution", "keep_deal", "keep_signed_step", "keep_split_evidence",
           "machine_args", "plan_for", "receive", "record_secure_charge", "release",
           "send_phase", "setup", "step_path"]
