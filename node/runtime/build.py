"""`build_node`: a node from its config files, its parts built and checked here.

What the node's files say is checked before anything exists that could release or
charge: the key file against the consortium's member list, the rows (read, rows dropped
by the schema, a held-out set to evaluate on), federated normalization's usability and
its privacy mode, `gossip.min_members` against the consortium's size. Then the parts
(node/runtime/node.py's collaborators): the state dir, the privacy ledger (repaired
after a crash: node/privacy/ledger.py) and plan, the consortium's aggregation rule, the
model, sealing, the verifier, the round book and the signer. A rehearsal composes its
wrappers here too (`rows_transform`, `compose`: node/rehearsal/build.py), never after.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from nacl.public import PrivateKey

from gossip.envelope import Verifier
from gossip.errors import LocalError
from gossip.membership import Consortium, load_consortium
from gossip.protocol.book import RoundBook
from gossip.seal import Sealing
from gossip.sparse import sparse_book
from gossip.topology import build_topology
from gossip.transports.base import Transport
from node.data.schema import FeatureSchema
from node.learn.control import ControlVariates
from node.learn.dpsgd import dp_engine
from node.learn.models import agreed_model, init_seed_from, tensor_spec
from node.learn.normalize import (
    DEFAULT_NORMALIZE_NOISE,
    numeric_columns,
    provisional_schema,
    range_report,
    resolve,
)
from node.learn.train import metric_name, warn_about_held_out
from node.privacy.budget import PrivacyBudget
from node.privacy.ledger import Ledger
from node.privacy.mechanisms import NoiseSource, OsNoise, SeededNoise
from node.runtime.audit import NodeCounters
from node.runtime.compression import Compressor
from node.runtime.config import NodeConfig, quorum
from node.runtime.identity import Identity, load_identity
from node.runtime.normalization import LocalData, LocalTables
from node.runtime.release import Releaser
from node.runtime.signer import Signer
from node.runtime.state import StateDir
from node.strategy.consortium_rules import (
    AgreedStrategy,
    agreed_codec,
    agreed_topology,
    build_strategy,
    few_rounds_warning,
    secure_rule,
)

if TYPE_CHECKING:
    import torch

    from node.privacy.secure import SecurePlan
    from node.runtime.node import Node
    from node.strategy.base import Strategy

log = logging.getLogger("flnode.node")

# A seeded simulation's int8 rounding stream: seeded from the member's training seed
# times this (a prime), apart from its privacy noise (rounding_for).
ROUNDING_SEED = 104_729
# A rehearsal's wrappers of the honest releaser and signer (node/rehearsal/build.py):
# given them and the node's transport, the parts the node uses instead.
Compose = Callable[[Releaser, Signer, Transport], tuple[Releaser, Signer]]


@dataclass
class Parts:
    """A node's collaborators, built and checked from its files (`build_parts`)."""

    cfg: NodeConfig
    identity: Identity
    consortium: Consortium
    schema: FeatureSchema
    train: LocalData  # encoded (provisional statistics until normalization is agreed)
    held_out: LocalData
    tables: LocalTables | None  # the rows as read: federated normalization only
    norm_fallback: str | None  # why we vote for range scaling, if we do
    state: StateDir
    ledger: Ledger
    budget: PrivacyBudget
    strategy: Strategy
    strategy_params: dict
    model: torch.nn.Module
    metric: str
    sealing: Sealing | None
    verifier: Verifier
    book: RoundBook
    signer: Signer
    control: ControlVariates | None
    releaser: Releaser  # the honest one: Node binds it, a rehearsal may wrap it (compose)


def read_rows(cfg: NodeConfig, name: str, consortium: Consortium, schema: FeatureSchema
              ) -> tuple[LocalTables, LocalData, LocalData, str | None]:
    """The member's rows: as read, encoded for training and held out; and why we vote
    for range scaling (federated normalization), if we do. Refuses what cannot train."""
    tables = LocalTables.read(cfg, schema)
    for path, n, of in ((cfg.data.path, tables.dropped, tables.read_rows),
                        (cfg.data.eval_path, tables.dropped_eval, None)):
        if n:  # a count only, in our own log: the rows themselves never leave
            log.warning("%s: %s: the schema's missing = \"drop_row\" drops %d%s row(s) "
                        "with an empty cell; every count below is after dropping",
                        name, path, n, f" of its {of}" if of else "")
    if len(tables.train) == 0:
        raise LocalError(f"{cfg.data.path}: no training rows"
                         + (" left after missing = \"drop_row\"" if tables.dropped else ""))
    # normalize = "federated": will the agreed statistics be usable? Checked before
    # anything is released or charged; refuses, or votes for range scaling, as the
    # schema's normalize_fallback says (node/learn/normalize.py, resolve); the consortium
    # decides from every member's vote before round 1 (the round machine's
    # StatsAgreement, carried out by Node).
    # Then the declared ranges against our own rows (a local check: releases nothing).
    resolved, _, fallback = resolve(schema, len(consortium.members), len(tables.train),
                                    cfg.privacy.mode, cfg.privacy.delta, name)
    if fallback is not None:
        log.warning("%s", fallback)
    for line in range_report(tables.train, resolved, str(cfg.data.path)):
        log.warning("%s: %s", name, line)
    federated = schema.mode == "federated"
    # Federated normalization: encoded with provisional statistics (never trained on)
    # until the members agree theirs before round 1 (the round machine's StatsAgreement, carried out by Node).
    train, held = tables.encode(provisional_schema(schema) if federated else schema)
    total = len(tables.train) + (len(tables.held) if cfg.data.eval_path is None else 0)
    if len(train.X) == 0:
        raise LocalError(f"{cfg.data.path}: no training rows")
    if len(held.X) == 0:
        raise LocalError(f"{cfg.data.eval_path or cfg.data.path}: no held-out rows to "
                         "evaluate on (too few rows for data.eval_fraction; give "
                         "data.eval_path)")
    warn_about_held_out(name, held.y, schema.classes, eval_path=cfg.data.eval_path,
                        eval_fraction=cfg.data.eval_fraction, total_rows=total,
                        dropped=tables.dropped if cfg.data.eval_path is None else 0)
    return tables, train, held, fallback


# A share is the model's float32 values plus msgpack framing (names, shapes, weight):
# bytes per value, for the check that a network fits gossip.max_envelope_bytes at all.
BYTES_PER_VALUE = 4


def own_model(cfg: NodeConfig, consortium: Consortium, schema: FeatureSchema,
              name: str) -> torch.nn.Module:
    """The network this member trains, checked at start: the consortium's [model] table
    if it has one (kind, options and every parameter's shape: a member that builds
    another network is refused here, naming each parameter with both shapes), else the
    node config's [model] (node/learn/models.py agreed_model). A plug-in kind is imported
    from this member's own files only, never from anything a peer sends."""
    model = agreed_model(cfg.model.kind, cfg.model.resolved(), bool(cfg.model.model_fields_set),
                         consortium.model, schema.n_features, schema.n_classes,
                         init_seed_from(consortium), str(cfg.consortium.path))
    values = sum(t.numel() for t in model.state_dict().values())
    if BYTES_PER_VALUE * values > cfg.gossip.max_envelope_bytes:
        raise LocalError(f"model: {values} parameters ({BYTES_PER_VALUE * values} bytes a "
                         f"share) do not fit gossip.max_envelope_bytes = "
                         f"{cfg.gossip.max_envelope_bytes}: a smaller network, or a larger "
                         "limit at every member")
    if cfg.privacy.mode == "record":
        engine = dp_engine(model, cfg.privacy.grad_sample_mode)
        if engine != cfg.privacy.grad_sample_mode:
            log.info("%s: DP-SGD through Opacus (%s): the fast path takes stacks of Linear "
                     "and ReLU only, not this %s network", name, engine,
                     consortium.model.get("kind", cfg.model.kind))
    return model


def build_parts(cfg: NodeConfig, rejected: Counter[str], noise: NoiseSource) -> Parts:
    """Every part of the node of `cfg`, checked (`rejected`: the node's rejection
    counter, which the signer counts into; `noise`: the privacy noise's source)."""
    identity = load_identity(cfg.identity.key)
    consortium = load_consortium(cfg.consortium.path)
    schema = FeatureSchema.from_dict(consortium.schema, str(cfg.consortium.path))
    tables, train, held, norm_fallback = read_rows(cfg, identity.name, consortium, schema)
    if schema.mode != "federated":
        tables = None
    member = consortium.by_name(identity.name)
    if member.public_key != identity.public_key:
        raise LocalError(
            f"key file {cfg.identity.key} is for {identity.name!r} but the consortium file "
            f"lists another public key for that member: wrong key file or stale peer list"
        )
    # The network, checked against the consortium's [model] before any state exists.
    model = own_model(cfg, consortium, schema, identity.name)
    state = StateDir(cfg.state_dir)
    ledger = Ledger(state.ledger_path, repair=True)
    for what in ledger.recovered:
        log.warning("%s: privacy ledger %s: %s", identity.name, state.ledger_path, what)
    tc = cfg.training
    norm_sigma = None
    if schema.mode == "federated":
        if cfg.privacy.mode == "update":
            raise LocalError(
                "the schema says normalize = \"federated\" but privacy.mode = \"update\": "
                "the statistics are protected per record (one row's sensitivity), which "
                "says nothing at the level update mode protects (a member's whole "
                "contribution). Use privacy.mode = \"record\" (or \"off\"), or "
                "normalize = \"declared\"")
        # a member voting for range scaling never sends statistics: nothing to reserve
        norm_sigma = None if norm_fallback is not None else (
            schema.normalize_noise or DEFAULT_NORMALIZE_NOISE)
    if quorum(cfg.gossip.min_members, len(consortium.members)) > len(consortium.members):
        raise LocalError(f"gossip.min_members = {cfg.gossip.min_members} but the consortium "
                         f"has {len(consortium.members)} members: it could never start")

    def strategy(noise_multiplier: float | None) -> AgreedStrategy:
        return build_strategy(consortium, cfg.gossip.aggregation, cfg.privacy.mode,
                              cfg.privacy.clip, str(cfg.consortium.path), noise_multiplier)

    # Update mode checks our planned sigma against the rules, so the plan comes first;
    # record mode's plan needs to know whether the rule reads declared weights
    # (privacy.weight = "auto"), so the rules come first.
    agreed = None if cfg.privacy.mode == "update" else strategy(None)
    # Secure rounds with DP on the sum (issue 22) charge the consortium's plan
    # (node/runtime/secure_node.py), never a local DP-SGD plan as well: the budget is "off".
    budget_cfg = cfg.privacy if secure_rule(consortium) is None else \
        cfg.privacy.model_copy(update={"mode": "off"})
    budget = PrivacyBudget(
        budget_cfg, rows=len(train.X), rounds=tc.rounds, epochs=tc.epochs,
        batch_size=tc.batch_size, state_dir=state.path, ledger=ledger,
        normalize_sigma=norm_sigma, lr=tc.lr,
        declared_weights=agreed is None or agreed.strategy.reads_declared_weights)
    if agreed is None:
        plan = budget.plan
        agreed = strategy(plan.noise_multiplier if plan is not None else None)
    if not agreed.agreed:
        log.warning("%s: the consortium file has no [rules]: shares are combined by this "
                    "node's own rule (%s), which the others may not share", identity.name,
                    agreed.params["rule"])
    # FedAdam's few-rounds warning is for runs it steps: every run but secure rounds with DP
    # on the sum, which take the plan's SGD step (node/runtime/secure_node.py aggregate).
    secure_dp = secure_rule(consortium) is not None and cfg.privacy.mode != "off"
    few = None if secure_dp else few_rounds_warning(agreed.strategy.params, tc.rounds,
                                                    cfg.privacy.mode)
    if few is not None:
        log.warning("%s: %s", identity.name, few)
    neighbours = [m.name for m in consortium.members if m.name != identity.name]
    # The consortium's topology (rules.topology, gossip/topology.py): whom our share goes
    # to and whose we wait for, each round (gossip/sparse.py); the plain book at full mesh.
    book = sparse_book(build_topology(agreed_topology(consortium, str(cfg.consortium.path)),
                                      [m.name for m in consortium.members], consortium.id),
                       identity.name)
    keys = {m.public_key: m.name for m in consortium.members}
    sealing: Sealing | None = None
    if cfg.gossip.sealed:
        sealing = Sealing(consortium.id, identity.signing_key, keys,
                          cfg.gossip.prekey_rotate_rounds, cfg.gossip.lookahead)
        sealing.own.keys = {e: PrivateKey(raw) for e, raw in state.load_prekeys().items()}
    # The consortium's compression (rules.compression, gossip/compress.py): a compressed
    # share is the sender's update, read on top of the round's start by whoever combines
    # it (node/runtime/compression.py share_vector): the Verifier gets no base to read it on.
    codec = agreed_codec(consortium, str(cfg.consortium.path))
    verifier = Verifier(consortium.id, keys, identity.public_key, tensor_spec(model),
                        cfg.gossip.max_envelope_bytes, sealing=sealing,
                        stats_columns=len(numeric_columns(schema))
                        if schema.mode == "federated" else None,
                        codec=codec,
                        secure=secure_rule(consortium, str(cfg.consortium.path)) is not None)
    # What this member signs (the sequence number on disk first): node/runtime/signer.py.
    signer = Signer(identity, consortium.id, state, sealing, rejected)
    # training.control_variates: this member's c_i and c (node/learn/control.py), restored
    # from the checkpoint (node/runtime/checkpoint.py)
    control = ControlVariates.for_node(cfg.training.control_variates, agreed.params)
    # What this member releases (charged first): node/runtime/release.py.
    releaser = Releaser(cfg, identity.name, model, verifier.spec, state, ledger, budget, noise,
                        control)
    if codec.compressed:  # before anything is released or the checkpoint restores a residual
        releaser.compressor = Compressor(codec, model, rounding_for(noise, tc.seed))
    return Parts(cfg, identity, consortium, schema, train, held, tables, norm_fallback, state,
                 ledger, budget, agreed.strategy, agreed.params, model,
                 metric_name(schema.n_classes), sealing, verifier,
                 book(neighbours, cfg.gossip.lookahead), signer, control, releaser)


def build_node(cfg: NodeConfig, transport: Transport, *, node_cls: type[Node],
               noise: NoiseSource | None = None,
               rows_transform: Callable[[LocalData], LocalData] | None = None,
               compose: Compose | None = None) -> Node:
    """The node of `cfg` on `transport`, a `node_cls` (Node, or a test's subclass; this
    module never imports node.py: node.py's Node.from_config calls this). Privacy noise
    comes from os.urandom unless a simulation passes its own seeded source.
    `rows_transform` (applied to the training rows each time they are set) and `compose`
    (wrapping the releaser and signer) are a rehearsal's only (node/rehearsal/build.py)."""
    counters, noise = NodeCounters(), noise or OsNoise()
    parts = build_parts(cfg, counters.rejected, noise)
    return node_cls(parts, transport, noise, counters, rows_transform=rows_transform,
                    compose=compose)


def rounding_for(noise: NoiseSource, seed: int) -> NoiseSource:
    """The int8 codec's rounding stream: not privacy noise but, like it, from the OS; only
    a simulation that passes its own seeded privacy noise gets a seeded rounding too, a
    stream of its own, so compressing never shifts the privacy noise's draws."""
    return OsNoise() if isinstance(noise, OsNoise) else SeededNoise(seed * ROUNDING_SEED + 1)


def secure_rounds_warning(rounds: int, plan: SecurePlan) -> str | None:
    """[training] rounds against the consortium's secure plan (node/privacy/secure.py
    SecurePlan, pinned at the first start): the node does not adjust one to the other. Fewer
    rounds spend less than the budget and stop the model early; more cannot over-spend (a
    charge over the budget is refused, `budget_exhausted`, and this member stops dealing from
    the round after the plan's last), but every round past the plan then fails at every
    member. None when they agree. ε is the accountant's (SecurePlan.epsilon_after)."""
    steps = plan.steps
    if rounds == steps:
        return None
    budget = f" of the budget {plan.epsilon:g}" if plan.epsilon is not None else ""
    if rounds < steps:
        what = (f"the run stops after {rounds} of the plan's {steps} DP-SGD steps, spending "
                f"ε {plan.epsilon_after(rounds):.2f}{budget} at δ {plan.delta:g}")
    else:
        what = (f"the budget is spent at round {steps}; from round {steps + 1} this member's "
                "charge is refused (budget_exhausted) and it stops dealing, so those rounds "
                "fail (nothing is spent past the budget)")
    return (f"training.rounds = {rounds} but the consortium's secure plan "
            f"(secure_plan.json) has {steps} rounds: {what}; set [training] rounds = {steps} "
            "in the node config")
