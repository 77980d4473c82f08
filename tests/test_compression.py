"""Compressed shares (gossip/compress.py, node/runtime/compression.py): each codec's
error, top-k's error feedback, the agreed codec in [rules], hostile compressed bodies
signed with a member's key, and the residual in the checkpoint."""

from __future__ import annotations

import math
import tracemalloc
from pathlib import Path

import msgpack
import numpy as np
import pytest
import torch

from gossip import bodies, envelope
from gossip import compress as C
from gossip.bodies import TensorSpec
from gossip.envelope import KIND_SHARE, Verifier
from gossip.errors import LocalError, RemoteError
from gossip.membership import load_consortium
from gossip.wire import WireError
from node.runtime.compression import Compressor
from node.runtime.state import Checkpoint, StateDir, decode_checkpoint, encode_checkpoint
from node.strategy.consortium_rules import agreed_codec, pin_rules, rules_table
from tests.helpers import consortium, keys

GOLDEN = Path(__file__).resolve().parent / "golden"
K = keys(3)  # K[0] is us; K[1] a member whose key signs the hostile bodies
CONS = consortium(K)
MEMBERS = {m.public_key: m.name for m in CONS.members}
# A tensor above the uint16 index limit, one of a few blocks, one of a single value.
SPEC = [TensorSpec("w", (300, 250)), TensorSpec("b", (700,)), TensorSpec("s", (1,))]
SIZES = {s.name: math.prod(s.shape) for s in SPEC}
BASE = {s.name: np.full(s.shape, 0.25, dtype=np.float32) for s in SPEC}


def rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def updates(seed: int = 0, scale: float = 0.01) -> list[tuple[str, np.ndarray]]:
    g = rng(seed)
    return [(s.name, (g.standard_normal(s.shape) * scale).astype(np.float32)) for s in SPEC]


def uniform(seed: int = 1):
    g = rng(seed)
    return lambda n: g.random(n)


# --- the codecs' names -------------------------------------------------------------------

def test_codec_names_parse_to_one_canonical_form():
    assert C.parse_codec("none") == C.NO_COMPRESSION and not C.NO_COMPRESSION.compressed
    assert C.parse_codec("fp16").name == "fp16" and C.parse_codec(" int8 ").name == "int8"
    assert C.parse_codec("topk:0.10").name == "topk:0.1" == C.parse_codec("topk:1e-1").name
    for bad in ("gzip", "topk", "topk:0", "topk:1.5", "topk:x", "int8:4", "fp16:2", 3):
        with pytest.raises(LocalError, match="compression"):
            C.parse_codec(bad)


def test_topk_k_is_a_fraction_of_each_tensor_at_least_one():
    c = C.parse_codec("topk:0.1")
    assert [c.k(n) for n in (1, 9, 10, 11, 75_000)] == [1, 1, 1, 2, 7_500]
    assert C.parse_codec("topk:1").k(7) == 7


# --- error per codec ---------------------------------------------------------------------

def test_fp16_error_is_relative_in_the_normal_range_and_tiny_below():
    x = np.concatenate([rng().standard_normal(10_000) * 10 ** rng(2).uniform(-4, 3, 10_000),
                        rng(3).uniform(-6e-5, 6e-5, 1000)]).astype(np.float32)
    out = C.compress(C.parse_codec("fp16"), [("x", x)]).decoded[0]
    normal = np.abs(x) >= 2.0 ** -14
    assert (np.abs(out - x)[normal] <= 2.0 ** -11 * np.abs(x[normal])).all()
    assert (np.abs(out - x)[~normal] <= 2.0 ** -25).all()
    assert not np.isfinite(C.compress(C.parse_codec("fp16"),
                                      [("x", np.float32([7e4]))]).decoded[0]).any()


def test_int8_error_stays_under_each_blocks_scale():
    x = (rng().standard_normal(5 * C.INT8_BLOCK + 17) * np.repeat(
        [1e-4, 1.0, 30.0, 0.0, 2.0, 5e-3], [C.INT8_BLOCK] * 5 + [17])).astype(np.float32)
    comp = C.compress(C.parse_codec("int8"), [("x", x)], uniform())
    block, scales, q = comp.items[0][3]
    scale = np.repeat(np.frombuffer(scales, "<f4"), C.INT8_BLOCK)[:x.size]
    assert block == C.INT8_BLOCK and len(q) == x.size
    err = np.abs(comp.decoded[0] - x)
    assert (err < scale + 1e-12).all()
    assert (err[scale == 0] == 0).all()  # an all-zero block is exact
    # what goes on the wire is about a quarter of float32
    assert len(q) + len(scales) < x.nbytes / 3.9


def int8_mean_error(x: np.ndarray, draws: int, u) -> float:
    """max |mean of `draws` decodings - x| over the values, in units of the scale."""
    codec = C.parse_codec("int8")
    total = np.zeros_like(x, dtype=np.float64)
    for _ in range(draws):
        total += C.compress(codec, [("x", x)], u).decoded[0]
    scale = np.abs(x).max() / 127
    return float(np.abs(total / draws - x).max() / scale)


def test_int8_stochastic_rounding_is_unbiased():
    """Each value's mean over 4000 decodings is within 6 standard errors of the value
    (rounding's variance is at most scale^2 / 4), where round-to-nearest (u = 0.5) is
    off by up to half a step: the test sees a biased rounding."""
    x = (rng(5).uniform(-1, 1, C.INT8_BLOCK)).astype(np.float32)
    x[0] = 1.0  # the scale is 1/127: every other value sits between two steps
    draws = 4000
    bound = 6 * 0.5 / math.sqrt(draws)
    assert int8_mean_error(x, draws, uniform(6)) < bound
    assert int8_mean_error(x, 50, lambda n: np.full(n, 0.5)) > 5 * bound


def test_topk_sends_the_largest_values_exactly_k_of_them():
    c = C.parse_codec("topk:0.01")
    x = rng().standard_normal(75_000).astype(np.float32)
    comp = C.compress(c, [("x", x)], uniform())
    k, gaps, scales, q = comp.items[0]  # the data alone: no name, dtype, shape
    top = np.sort(np.argsort(-np.abs(x))[:750])
    # a kept value costs its int8 and its gap: one byte while gaps stay under 128, two
    # up to 16,383 (here about 100 apart), against 4 + 2 bytes in version 1
    assert k == 750 and len(q) == 750 and len(scales) == 4 * 3
    assert len(gaps) == len(C.varints(np.diff(top, prepend=0))) < 2 * 750
    sent = np.flatnonzero(comp.decoded[0])
    assert set(sent) <= set(top) and len(sent) >= 740  # a value may round to 0
    scale = np.repeat(np.frombuffer(scales, "<f4"), C.INT8_BLOCK)[:k]
    err = np.abs(comp.decoded[0][top] - x[top])
    assert (err < scale).all()  # int8's bound, per block of kept values


def test_topk_rounding_is_unbiased_so_error_feedback_is_not_needed_to_undo_a_bias():
    x = np.float32([1.0, 0.3, 0.0, 0.0])  # top-2 of 4; 0.3 is 38.1 steps of 1/127
    mean = np.mean([C.compress(C.parse_codec("topk:0.5"), [("x", x)], uniform(s)).decoded[0]
                    for s in range(2000)], axis=0)
    assert abs(mean[1] - 0.3) < 6 * (1 / 127) * 0.5 / math.sqrt(2000) and mean[0] == 1.0


@pytest.mark.parametrize("values", [[0], [1, 127, 128, 16_383, 16_384, 2 ** 32 - 1], []])
def test_varints_round_trip_in_their_shortest_form(values):
    raw = C.varints(np.asarray(values, dtype=np.uint64))
    assert len(raw) == sum(max(1, -(-int(v).bit_length() // 7)) for v in values)
    assert C.read_varints(raw, len(values), 5).tolist() == values


@pytest.mark.parametrize("raw,count,words", [
    (b"\x81", 1, "cut one"), (b"\x01\x02", 1, "2 complete"), (b"\x80\x00", 1, "shortest"),
    (b"\xff\xff\x7f", 1, "longer than 2"), (b"", 1, "no varint")])
def test_read_varints_refuses_cut_extra_overlong_and_non_canonical_bytes(raw, count, words):
    with pytest.raises(WireError, match=words):
        C.read_varints(raw, count, 2)


def tiny_model(d: int = 200) -> torch.nn.Module:
    m = torch.nn.Linear(d // 2 - 1, 2)  # (d/2 - 1) * 2 + 2 = d parameters
    return m


class _Noise:
    def __init__(self, seed: int) -> None:
        self.g = torch.Generator().manual_seed(seed)

    def uniform(self, n: int) -> torch.Tensor:
        return torch.rand(n, generator=self.g, dtype=torch.float64)


def test_topk_error_feedback_sends_the_sum_of_the_updates_over_rounds():
    """Over 60 rounds of top-10 % the sum of what was sent is the sum of the updates less
    the last residual, and the residual stays bounded (it does not grow with the rounds):
    without feedback the gap grows with every round."""
    import dataclasses

    model = tiny_model()
    d = sum(p.numel() for p in model.parameters())
    comp = Compressor(C.parse_codec("topk:0.1"), model, _Noise(0))
    g = torch.Generator().manual_seed(1)
    mean = torch.randn(d, generator=g) * 0.01  # a consistent direction, as training gives
    sent, total, without = torch.zeros(d), torch.zeros(d), torch.zeros(d)
    gaps = []
    for _ in range(60):
        u = mean + torch.randn(d, generator=g) * 0.005
        total += u
        t = dataclasses.make_dataclass("T", ["start", "update", "released", "encoded"])(
            torch.zeros(d), u, u, None)
        out, pending = comp.apply(t)
        comp.commit(pending)
        sent += out.update
        without += comp.compress(u)[1]
        gaps.append(float(torch.linalg.vector_norm(total - sent)))
        assert torch.allclose(total - sent, comp.residual, atol=1e-5)
    assert max(gaps[30:]) < 1.5 * max(gaps[:30])  # bounded
    assert float(torch.linalg.vector_norm(total - without)) > 5 * gaps[-1]
    assert float(torch.linalg.vector_norm(total)) > 10 * gaps[-1]


def test_topk_residual_keeps_the_rounding_error_of_what_it_sent():
    """Version 2 rounds the kept values to int8 (20 + 1 of 200 here): the residual holds,
    at a kept index, what the rounding took off (below one step of its block's scale),
    and elsewhere the whole value."""
    import dataclasses

    model = tiny_model()
    d = sum(p.numel() for p in model.parameters())
    comp = Compressor(C.parse_codec("topk:0.1"), model, _Noise(0))
    u = torch.randn(d, generator=torch.Generator().manual_seed(3)) * 0.01
    t = dataclasses.make_dataclass("T", ["start", "update", "released", "encoded"])(
        torch.zeros(d), u, u, None)
    out, pending = comp.apply(t)
    kept = out.update != 0
    assert 0 < int(kept.sum()) <= 21 and torch.equal(pending.residual, u - out.update)
    assert (pending.residual[kept] != 0).any()  # the rounding error is kept, not lost
    assert float(pending.residual[kept].abs().max()) < float(u.abs().max()) / 127
    assert torch.equal(pending.residual[~kept], u[~kept])


# --- the share body and the verifier ---------------------------------------------------

def verifier(codec: str, base=BASE.__getitem__) -> Verifier:
    return Verifier(CONS.id, MEMBERS, bytes(K[0].verify_key), SPEC,
                    codec=C.parse_codec(codec), base=base)


def signed(body: bytes, seq: int = 0) -> bytes:
    return envelope.pack(K[1], CONS.id, KIND_SHARE, 0, seq, body)


@pytest.mark.parametrize("codec", ["fp16", "int8", "topk:0.1", "topk:1"])
def test_a_compressed_share_reads_as_our_start_plus_its_update(codec):
    c = C.parse_codec(codec)
    comp = C.compress(c, updates(), uniform())
    body = bodies.encode_compressed_share(c, comp, 7.0, b"\x01" * 32)
    acc = verifier(codec).verify(signed(body), 0)
    share = acc.share
    assert share.codec == c.name and share.weight == 7.0 and share.norm == b"\x01" * 32
    for (name, _), dec in zip(updates(), comp.decoded, strict=True):
        np.testing.assert_array_equal(share.tensors.deltas[name], dec)
        np.testing.assert_allclose(share.tensors[name], BASE[name] + dec, rtol=0, atol=1e-7)
    full = 4 * sum(SIZES.values())
    ratio = {"fp16": 1.9, "int8": 3.5, "topk:0.1": 6, "topk:1": 0.6}[codec]  # w: uint32 indices
    assert len(body) < full / ratio


def test_none_is_todays_share_byte_for_byte_and_refuses_a_declared_codec():
    plain = bodies.encode_share(updates(), 3.0)
    assert msgpack.unpackb(plain).keys() == {"weight", "tensors"}
    acc = verifier("none").verify(signed(plain), 0)
    assert acc.share.codec == "none" and isinstance(acc.share.tensors, dict)
    c = C.parse_codec("int8")
    body = bodies.encode_compressed_share(c, C.compress(c, updates(), uniform()), 3.0)
    with pytest.raises(RemoteError) as e:
        verifier("none").verify(signed(body), 0)
    assert (e.value.reason, e.value.peer) == ("codec", "bank-1")


@pytest.mark.parametrize("agreed,sent", [("int8", "none"), ("int8", "fp16"),
                                         ("topk:0.1", "topk:0.2"), ("fp16", "int8")])
def test_a_share_in_another_codec_than_the_agreed_one_is_refused(agreed, sent):
    c = C.parse_codec(sent)
    body = (bodies.encode_share(updates(), 3.0) if not c.compressed else
            bodies.encode_compressed_share(c, C.compress(c, updates(), uniform()), 3.0))
    with pytest.raises(RemoteError) as e:
        verifier(agreed).verify(signed(body), 0)
    assert e.value.reason == "codec" and e.value.peer == "bank-1"
    assert repr(agreed) in e.value.detail


def test_a_version_1_topk_share_is_refused_by_its_name_not_misread():
    """Version 1 declared "topk:F" (uint16/32 indices, float16 values): a node of today
    refuses it as `codec`, naming the version, before reading a tensor."""
    c = C.parse_codec("topk:0.1")
    items = [[name, "<f4", list(a.shape), [1, b"\0\0", b"\0\0"]] for name, a in updates()]
    body = msgpack.packb({"weight": 1.0, "codec": "topk:0.1", "tensors": items},
                         use_bin_type=True)
    with pytest.raises(RemoteError) as e:
        verifier("topk:0.1").verify(signed(body), 0)
    assert (e.value.reason, e.value.peer) == ("codec", "bank-1")
    assert "another version" in e.value.detail and c.wire_name == "topk2:0.1"


def test_topk_tensors_are_their_data_alone_and_count_against_the_spec():
    """Top-k version 2 leaves out each tensor's name, dtype and shape (the receiver's spec):
    a body without them is read; one wrapped as [name, dtype, shape, data], one tensor
    short or one over is refused, naming the sender."""
    c = C.parse_codec("topk:0.1")
    comp = C.compress(c, updates(), uniform())
    body = bodies.encode_compressed_share(c, comp, 1.0)
    sent = msgpack.unpackb(body)["tensors"]
    assert [type(x) for t in sent for x in t] == [int, bytes, bytes, bytes] * len(SPEC)
    assert verifier("topk:0.1").verify(signed(body), 0).share.codec == "topk:0.1"
    wrapped = [[n, "<f4", list(a.shape), d] for (n, a), d in zip(updates(), comp.items,
                                                                  strict=True)]
    for seq, items in enumerate([wrapped, comp.items[:-1], [*comp.items, comp.items[-1]]], 1):
        doc = {"weight": 1.0, "codec": c.wire_name, "tensors": items}
        with pytest.raises(RemoteError) as e:
            verifier("topk:0.1").verify(signed(msgpack.packb(doc, use_bin_type=True), seq), 0)
        assert e.value.reason in ("bad_body", "shape") and e.value.peer == "bank-1"


def body_with(codec: str, edit) -> bytes:
    """A compressed body whose first tensor's data `edit` rewrites (a member's lie)."""
    c = C.parse_codec(codec)
    comp = C.compress(c, updates(), uniform())
    if c.bare:  # top-k: the data alone
        items = [edit(comp.items[0]), *comp.items[1:]]
    else:
        items = [list(i) for i in comp.items]
        items[0][3] = edit(items[0][3])
    return msgpack.packb({"weight": 1.0, "codec": c.wire_name, "tensors": items},
                         use_bin_type=True)


def _gaps(data, gaps):
    """top-k data whose index gaps are `gaps` (a member's lie about its indices)."""
    return [data[0], C.varints(np.asarray(gaps, dtype=np.uint64)), data[2], data[3]]


HOSTILE = {
    # top-k on w (75,000 values, k = 7,500, gaps of at most 3 bytes)
    "k_huge": ("topk:0.1", lambda d: [2 ** 32 - 1, *d[1:]], "bad_body", "k = "),
    "k_over_d": ("topk:0.1", lambda d: [75_001, *d[1:]], "bad_body", "k = "),
    "k_small": ("topk:0.1", lambda d: [3, d[1][:3], d[2][:4], d[3][:3]], "bad_body", "k = "),
    "gaps_short": ("topk:0.1", lambda d: [d[0], d[1][:7499], d[2], d[3]], "shape", "gaps"),
    "gaps_huge": ("topk:0.1", lambda d: [d[0], b"\xff" * (3 * 7500 + 1), d[2], d[3]],
                  "shape", "gaps"),
    "gaps_cut": ("topk:0.1", lambda d: [d[0], d[1][:-1] + b"\x81", d[2], d[3]], "bad_body",
                 "cut one"),
    # 7,500 bytes (a size that passes) holding 7,499 gaps: the count is a lie
    "gaps_count": ("topk:0.1", lambda d: _gaps(d, [200] + [1] * 7498), "bad_body",
                   "7499 complete"),
    "gaps_overlong": ("topk:0.1", lambda d: [d[0], b"\x80\x80\x80\x01" + b"\x01" * 7499,
                                             d[2], d[3]], "bad_body", "longer than 3"),
    "q_long": ("topk:0.1", lambda d: [d[0], d[1], d[2], d[3] + b"\0"], "shape", "int8 values"),
    "scales_long": ("topk:0.1", lambda d: [d[0], d[1], d[2] + b"\0" * 4, d[3]], "shape",
                    "scales"),
    "idx_dup": ("topk:0.1", lambda d: _gaps(d, [5, 0] + [1] * 7498), "bad_body", "gap is 0"),
    # unsorted cannot be said (a gap is unsigned): "back by one" is a gap past the end
    "idx_order": ("topk:0.1", lambda d: _gaps(d, [9, 2 ** 21 - 1] + [1] * 7498), "bad_body",
                  "gap is 2097151, the tensor has 75000"),
    "idx_range": ("topk:0.1", lambda d: _gaps(d, [0] + [1] * 7498 + [75_000 - 7498]),
                  "bad_body", "index is 75000"),
    "not_four": ("topk:0.1", lambda d: d[:3], "bad_body", "[k, gaps, scales, q]"),
    "nan_scale_topk": ("topk:0.1", lambda d: [d[0], d[1], b"\x00\x00\xc0\x7f" + d[2][4:],
                                              d[3]], "non_finite", "scale"),
    # int8 on w (75,000 values, 293 blocks)
    "block": ("int8", lambda d: [64, d[1], d[2]], "bad_body", "block of 64"),
    "scales_short": ("int8", lambda d: [d[0], d[1][:-4], d[2]], "shape", "scales"),
    "q_huge": ("int8", lambda d: [d[0], d[1], d[2] + b"\0" * 10], "shape", "int8 values"),
    "nan_scale": ("int8", lambda d: [d[0], b"\x00\x00\xc0\x7f" + d[1][4:], d[2]], "non_finite",
                  "scale"),
    "neg_scale": ("int8", lambda d: [d[0], np.float32(-1).tobytes() + d[1][4:], d[2]],
                  "bad_body", "negative"),
    # fp16
    "fp16_short": ("fp16", lambda d: d[:-2], "shape", "float16"),
    "fp16_inf": ("fp16", lambda d: b"\x00\x7c" + d[2:], "non_finite", "NaN or infinite"),
    "fp16_not_bin": ("fp16", lambda d: [d], "bad_body", "expected a bin"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_a_members_size_lies_are_refused_by_name_before_allocating(case):
    codec, edit, reason, words = HOSTILE[case]
    data = signed(body_with(codec, edit))
    v = verifier(codec)
    tracemalloc.start()
    try:
        with pytest.raises(RemoteError) as e:
            v.verify(data, 0)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert (e.value.reason, e.value.peer) == (reason, "bank-1"), e.value
    assert words in e.value.detail
    # at most the copy of the body and one tensor of the model as float32 (and change):
    # what a peer declares never sizes an allocation
    assert peak < len(data) + 4 * max(SIZES.values()) + 256 * 1024, peak


@pytest.mark.parametrize("codec", ["int8", "topk:0.1"])
def test_a_truncated_compressed_body_is_refused(codec):
    c = C.parse_codec(codec)
    body = bodies.encode_compressed_share(c, C.compress(c, updates(), uniform()), 1.0)
    for cut in (1, 100, len(body) // 2, len(body) - 1):
        with pytest.raises(RemoteError) as e:
            verifier(codec).verify(signed(body[:cut], seq=cut), 0)
        assert e.value.reason in ("bad_body", "shape") and e.value.peer == "bank-1"


def test_a_compressed_share_needs_a_base_to_be_read_as_a_model():
    c = C.parse_codec("fp16")
    body = bodies.encode_compressed_share(c, C.compress(c, updates()), 1.0)
    share = bodies.decode_share(body, SPEC, c)
    with pytest.raises(LocalError, match="round-start model"):
        share.tensors["w"]


# --- [rules]: pinned, "none" by default, the same id without the key -------------------

def test_a_consortium_without_the_key_is_uncompressed_and_keeps_its_id():
    golden = load_consortium(GOLDEN / "consortium.toml")  # loads: its id is unchanged
    assert "compression" not in golden.rules and agreed_codec(golden) == C.NO_COMPRESSION
    assert "compression" not in rules_table(4, "mean", compression="none")
    table = pin_rules(rules_table(4, "mean", compression="topk:0.10"), 4)
    assert table["compression"] == "topk:0.1"
    with_key = type(golden)(golden.name, golden.schema, golden.members, table)
    without = type(golden)(golden.name, golden.schema, golden.members,
                           {k: v for k, v in table.items() if k != "compression"})
    assert with_key.id != without.id
    assert agreed_codec(with_key).name == "topk:0.1"
    with pytest.raises(LocalError, match="rules.compression"):
        agreed_codec(type(golden)(golden.name, golden.schema, golden.members,
                                  {"aggregation": "mean", "compression": "zstd"}))


# --- the residual in the checkpoint ------------------------------------------------------

def test_a_checkpoint_with_a_residual_saves_and_loads(tmp_path):
    model = tiny_model()
    comp = Compressor(C.parse_codec("topk:0.1"), model, _Noise(0))
    comp.residual = torch.arange(200, dtype=torch.float32) / 7
    cp = Checkpoint(next_round=3, model=b"\0" * 800, seq=5, residual=comp.state())
    state = StateDir(tmp_path)
    state.save_checkpoint(cp)
    back = state.load_checkpoint()
    assert back == cp and list(msgpack.unpackb(encode_checkpoint(cp)))[-1] == "residual"
    again = Compressor(C.parse_codec("topk:0.1"), model, _Noise(0))
    assert again.load(back.residual, "cp") is None
    assert torch.equal(again.residual, comp.residual)
    # another codec: dropped, and said why
    other = Compressor(C.parse_codec("topk:0.2"), model, _Noise(0))
    assert "topk:0.1" in other.load(back.residual, "cp") and other.residual is None
    with pytest.raises(LocalError, match="residual is 12 bytes"):
        again.load({"codec": "topk:0.1", "values": b"\0" * 12}, "cp")


def test_a_golden_checkpoint_from_before_compression_loads_without_a_residual():
    raw = (GOLDEN / "run" / "state" / "telco-0" / "checkpoint.msgpack").read_bytes()
    cp = decode_checkpoint(raw)
    assert cp.residual is None and encode_checkpoint(cp) == raw
    comp = Compressor(C.parse_codec("topk:0.1"), tiny_model(), _Noise(0))
    assert comp.load(cp.residual, "golden") is None and comp.residual is None



# --- end to end: `flnode simulate` with compressed shares ----------------------------

def _simulate(tmp_path: Path, compression: str, nodes: int = 4, rounds: int = 3,
              attacks: tuple[str, ...] = ()) -> dict:
    from rich.console import Console

    from node.rehearsal.simulation.output import simulate
    from node.rehearsal.simulation.spec import SimulationSpec

    torch.set_num_threads(1)
    return simulate(SimulationSpec(dataset="digits", nodes=nodes, partition="dirichlet:0.5",
                                   rounds=rounds, seed=0, out=tmp_path / compression,
                                   compression=compression, attacks=attacks),
                    console=Console(quiet=True))


@pytest.mark.slow  # two runs: 7 s on an idle machine
def test_simulate_int8_costs_a_quarter_of_the_bytes_at_the_same_accuracy(tmp_path):
    plain, small = _simulate(tmp_path, "none"), _simulate(tmp_path, "int8")
    assert small["rules"]["compression"] == "int8" and "compression" not in plain["rules"]
    assert plain["rejected"] == {} == small["rejected"]
    sent = {k: sum(v["sent"] for v in s["bytes"].values()) for k, s in
            (("none", plain), ("int8", small))}
    assert sent["int8"] < sent["none"] / 3  # shares 3.9x smaller; hellos, seen reports equal
    assert abs(small["consortium"]["mean"] - plain["consortium"]["mean"]) < 0.05
    # every member ends with the same model: they read each update on the same start
    assert len(set(small["consortium"]["per_node"].values())) == 1


def test_topk_residual_is_checkpointed_and_a_restart_resumes_it(tmp_path, monkeypatch):
    """After a run, each member's checkpoint holds its residual, and each release was
    stored with the residual it left; a node built again from the state dir resumes with
    the checkpoint's; killed after storing its next release (and that release's
    residual) but before the checkpoint, it resumes with the release's."""
    from gossip.transports.memory import MemoryHub
    from node.rehearsal.build import build_rehearsal_node
    from node.rehearsal.config import load_rehearsal_config
    from node.runtime.checkpoint import compressor
    from node.runtime.compression import residual_path
    from node.runtime.identity import load_identity

    monkeypatch.setattr(StateDir, "prune_outbox", lambda *a, **k: None)  # keep every file
    summary = _simulate(tmp_path, "topk:0.1", nodes=3, rounds=2)
    assert summary["rejected"] == {}
    run = tmp_path / "topk:0.1"
    state = StateDir(run / "state" / "site-0")
    cp = state.load_checkpoint()
    values = cp.residual["values"]
    assert cp.residual["codec"] == "topk:0.1" and len(values) == len(cp.model)
    assert np.abs(np.frombuffer(values, "<f4")).max() > 0
    # the last release's residual file is what the checkpoint kept after it; the first's
    # is another (round 1 added to it)
    assert residual_path(state, 1).read_bytes() == values
    assert residual_path(state, 0).read_bytes() != values
    for r in (0, 1):
        assert state.stored_release(r) is not None
        residual_path(state, r).unlink()
        state.outbox_path(r).unlink()

    def resume():
        cfg = load_rehearsal_config(run / "nodes" / "site-0.toml")
        node = build_rehearsal_node(cfg, MemoryHub().attach("site-0", ["site-1", "site-2"]))
        return compressor(node).residual.numpy().tobytes()
    assert resume() == values

    key = load_identity(run / "keys" / "site-0.key").signing_key
    cons = load_consortium(run / "consortium.toml")
    state.store_release(cp.next_round, envelope.pack(key, cons.id, KIND_SHARE, cp.next_round,
                                                     cp.seq + 5, b"\x80"))
    newer = (np.frombuffer(values, "<f4") + 1).astype("<f4").tobytes()
    residual_path(state, cp.next_round).write_bytes(newer)
    assert resume() == newer


def test_consortium_build_and_a_scenario_choose_it(tmp_path, capsys):
    import tomli_w

    from node.cli import main
    from node.rehearsal.simulation.scenario import build_spec
    from tests.helpers import SCHEMA

    for name in ("bank-0", "bank-1", "bank-2"):
        assert main(["keygen", "--out", str(tmp_path / "keys"), "--name", name]) == 0
    (tmp_path / "schema.toml").write_text(tomli_w.dumps(SCHEMA))
    argv = ["consortium", "build", "--name", "c", "--schema", str(tmp_path / "schema.toml"),
            *[a for n in ("bank-0", "bank-1", "bank-2")
              for a in ("--member", str(tmp_path / "keys" / f"{n}.pub"))]]
    assert main([*argv, "--out", str(tmp_path / "plain.toml")]) == 0
    assert main([*argv, "--out", str(tmp_path / "small.toml"), "--compression", "int8"]) == 0
    plain, small = load_consortium(tmp_path / "plain.toml"), load_consortium(tmp_path / "small.toml")
    assert "compression" not in plain.rules and agreed_codec(small).name == "int8"
    assert main([*argv, "--out", str(tmp_path / "bad.toml"), "--compression", "int4"]) == 2
    assert "--compression" in capsys.readouterr().err

    sc = tmp_path / "s.toml"
    sc.write_text('dataset = "digits"\ncompression = "topk:0.05"\n')
    assert build_spec(sc, {"out": tmp_path / "o"}).compression == "topk:0.05"
    assert build_spec(sc, {"out": tmp_path / "o", "compression": "fp16"}).compression == "fp16"
    sc.write_text('compression = "topk:2"\n')
    with pytest.raises(LocalError, match="compression") as exc:
        build_spec(sc, {"out": tmp_path / "o"})
    assert str(sc) in str(exc.value)


def test_int8_rounding_never_draws_from_the_privacy_noise():
    """Production: the OS; a seeded simulation: a seeded stream of its own, so that a
    compressed run's privacy noise is the uncompressed run's, draw for draw."""
    from node.privacy.mechanisms import OsNoise, SeededNoise
    from node.runtime.build import rounding_for

    os_noise, privacy = OsNoise(), SeededNoise(7)
    for noise, kind in ((os_noise, OsNoise), (privacy, SeededNoise)):
        rounding = rounding_for(noise, 3)
        assert isinstance(rounding, kind) and rounding is not noise
    comp = Compressor(C.parse_codec("int8"), tiny_model(), rounding_for(privacy, 3))
    before = privacy.generator.get_state()
    comp.compress(torch.ones(200))
    assert torch.equal(privacy.generator.get_state(), before)


def test_a_compressed_share_is_combined_on_the_round_start_even_if_the_model_was_replaced(
        tmp_path):
    """closing.aggregate reads a compressed share (the sender's update) on top of the round's
    reference, passed explicitly (compression.share_vector): a model replaced between Train
    and Close (a restore, a bug) changes nothing of what the strategy combines. The
    Verifier is built with no base: nothing reads a share on the live model."""
    from types import SimpleNamespace

    from gossip.protocol import events as ev
    from gossip.transports.memory import MemoryHub
    from node.learn.models import flat_to_named, get_flat, set_flat
    from node.privacy.mechanisms import SeededNoise
    from node.rehearsal.simulation.prepare import prepare
    from node.rehearsal.simulation.spec import SimulationSpec
    from node.runtime import closing
    from node.runtime.checkpoint import compressor
    from node.runtime.config import load_config
    from node.runtime.node import Node
    from node.strategy import WeightedShare

    torch.set_num_threads(1)
    prep = prepare(SimulationSpec(dataset="default", nodes=3, partition="iid", rounds=1,
                                  seed=0, out=tmp_path, compression="fp16"))
    node = Node.from_config(load_config(prep.config_paths[0]),
                            MemoryHub().attach(prep.names[0], prep.names), SeededNoise(0))
    assert compressor(node) is not None  # wired in build_parts
    codec = node.verifier.codec
    start = get_flat(node.model).clone()
    g = torch.Generator().manual_seed(5)
    update = torch.randn(start.numel(), generator=g) * 0.01
    body = bodies.encode_compressed_share(
        codec, C.compress(codec, flat_to_named(node.model, update), uniform()), 1.0)
    share = bodies.decode_share(body, node.verifier.spec, codec, node.verifier.base)
    delta = torch.cat([torch.from_numpy(np.array(share.tensors.deltas[n])).reshape(-1)
                       for n in node.model.state_dict()])
    other = prep.names[1]
    node._round = closing.RoundState(start, 0.0)
    node._round.own = WeightedShare(node.name, 1.0, start + update)
    seen = {}
    real = node.strategy.aggregate

    def aggregate(r, own, shares, missing, reference):
        seen.update(shares)
        return real(r, own, shares, missing, reference=reference)

    node.strategy = SimpleNamespace(aggregate=aggregate)
    set_flat(node.model, start + 100.0)  # replaced before Close
    acc = envelope.Accepted(other, SimpleNamespace(kind=KIND_SHARE, digest=b"\0" * 32), share)
    closing.aggregate(node, ev.Close(0, {other: acc}, (prep.names[2],), "deadline"))
    assert torch.equal(seen[other].vector, start + delta)
    assert node.verifier.base is None


# --- golden: the compressed bodies' bytes (tests/golden/compressed.json) ----------------

def _golden_compressed():
    import json
    import sys

    sys.path.insert(0, str(GOLDEN))
    try:
        import make_golden as G
    finally:
        sys.path.remove(str(GOLDEN))
    return G, json.loads((GOLDEN / "compressed.json").read_text())


def test_compressed_bodies_are_byte_exact_and_read_back():
    """Each codec's body and envelope (top-k in wire version 2) are the frozen bytes, and a
    verifier reads each to the update the codec decodes (on a zero round start)."""
    from nacl.signing import SigningKey

    G, golden = _golden_compressed()
    assert sorted(golden["codecs"]) == sorted(G.COMPRESSED_CODECS)
    keys_ = {n: SigningKey(s) for n, s in G.SEEDS.items()}
    cid = bytes.fromhex(golden["consortium_id"])
    spec = [TensorSpec(n, a.shape) for n, a in G.compressed_update()]
    members = {bytes(k.verify_key): n for n, k in keys_.items()}
    today = G.compressed_bodies()
    for name, frozen in golden["codecs"].items():
        body = bytes.fromhex(frozen["body"])
        assert today[name] == body, f"today's {name} body differs from the golden one"
        packed = envelope.pack(keys_["bob"], cid, KIND_SHARE, golden["round"], frozen["seq"],
                               body)
        assert packed.hex() == frozen["bytes"]
        codec = C.parse_codec(name)
        shapes = {s.name: s.shape for s in spec}
        v = Verifier(cid, members, bytes(keys_["alice"].verify_key), spec, codec=codec,
                     base=lambda n, shapes=shapes: np.zeros(shapes[n], dtype=np.float32))
        share = v.verify(packed, golden["round"]).share
        want = C.compress(codec, G.compressed_update(),
                          lambda n: np.full(n, G.COMPRESSED_UNIFORM)).decoded
        for (n, _), dec in zip(G.compressed_update(), want, strict=True):
            np.testing.assert_array_equal(share.tensors[n], dec)
    # top-k at 0.5 of 12 + 2 values keeps 6 + 1; each kept value a 1-byte gap and an int8
    topk = msgpack.unpackb(bytes.fromhex(golden["codecs"]["topk:0.5"]["body"]))
    assert topk["codec"] == "topk2:0.5"
    assert [(t[0], len(t[1]), len(t[3])) for t in topk["tensors"]] == [(6, 6, 6), (1, 1, 1)]


@pytest.mark.parametrize("kind", ["topk", "int8"])
def test_a_scale_that_overflows_is_refused_quietly(kind):
    """A member's finite scale near float32's max times q = 127 overflows to inf: refused
    as non_finite, without numpy's overflow warning on the node's stderr (a peer must not
    write to it), and so also where warnings are errors."""
    import warnings

    from gossip.wire import Reader

    big = np.array([3e38], dtype="<f4").tobytes()
    if kind == "topk":
        codec, item = C.Codec(C.TOPK, 1.0), [1, b"\x00", big, b"\x7f"]
    else:
        codec, item = C.Codec(C.INT8), [C.INT8_BLOCK, big, b"\x7f"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(RemoteError, match="NaN or infinite"):
            C.read_data(Reader(msgpack.packb(item, use_bin_type=True)), codec, "w", 1)
