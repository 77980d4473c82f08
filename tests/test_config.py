"""Node config errors name the key and the file."""

from __future__ import annotations

import pytest

from gossip.errors import LocalError
from node.runtime.config import load_config

GOOD = """
state_dir = "state"
[identity]
key = "k.key"
[consortium]
path = "c.toml"
[data]
path = "d.parquet"
[training]
lr = 0.1
[privacy]
mode = "update"
sigma = 1.0
"""


def write(tmp_path, text):
    p = tmp_path / "node.toml"
    p.write_text(text)
    return p


def test_good_config_resolves_paths_relative_to_the_file(tmp_path):
    cfg = load_config(write(tmp_path, GOOD))
    assert cfg.identity.key == tmp_path / "k.key"
    assert cfg.training.lr == 0.1 and cfg.privacy.mode == "update"


@pytest.mark.parametrize("edit, key", [
    (lambda t: t.replace("lr = 0.1", "lr = -1"), "training.lr"),
    (lambda t: t.replace("lr = 0.1", "lr = 0.1\nepohcs = 3"), "training.epohcs: unknown key"),
    (lambda t: t.replace('mode = "update"', 'mode = "record2"'), "privacy.mode"),
    (lambda t: t.replace("sigma = 1.0", "sigma = 0"), "privacy: privacy.sigma = 0 gives no privacy"),
    (lambda t: t.replace("sigma = 1.0", "epsilon = 3.0\nsigma = 1.0"), "not both"),
    (lambda t: t.replace("sigma = 1.0", ""), "needs privacy.epsilon"),
    (lambda t: t + '\n[gossip]\naggregation = "krum2"\n', "gossip: aggregation 'krum2'"),
    (lambda t: t.replace('[data]\npath = "d.parquet"', ""), "data: Field required"),
    (lambda t: t + "\n[model]\nkind = 'resnet'\n", "model.kind"),
])
def test_bad_values_name_the_key(tmp_path, edit, key):
    path = write(tmp_path, edit(GOOD))
    with pytest.raises(LocalError) as info:
        load_config(path)
    assert key in str(info.value) and str(path) in str(info.value)


@pytest.mark.parametrize("edit, key", [
    (lambda t: t.replace("sigma = 1.0", 'epsilon = "3"'), "privacy.epsilon"),
    (lambda t: t.replace("lr = 0.1", 'lr = "0.1"'), "training.lr"),
    (lambda t: t.replace("lr = 0.1", "rounds = 30.5"), "training.rounds"),
    (lambda t: t.replace("lr = 0.1", 'rounds = "30"'), "training.rounds"),
    (lambda t: t + '\n[gossip]\nround_deadline_s = "60"\n', "gossip.round_deadline_s"),
    (lambda t: "keep_releases = 1\n" + t, "keep_releases"),
    (lambda t: t + '\n[gossip]\nmin_members = "3"\n', "gossip.min_members"),
    (lambda t: t + '\n[gossip]\nmin_members = "all"\n', "gossip.min_members"),
    (lambda t: 'keep_releases = "true"\n' + t, "keep_releases"),
])
def test_quoted_or_mistyped_values_are_refused_not_coerced(tmp_path, edit, key):
    """`epsilon = "3"` was accepted as 3.0 (pydantic's lax mode): a privacy budget
    typed as a string is a mistake to name, like every other mistyped value."""
    path = write(tmp_path, edit(GOOD))
    with pytest.raises(LocalError) as info:
        load_config(path)
    assert key in str(info.value), info.value


def test_round_1_waits_for_a_majority_by_default(tmp_path):
    """min_members used to default to 0: a node up first trained and released round 1
    alone, spending ε on a model nobody averaged."""
    from node.runtime.config import quorum

    cfg = load_config(write(tmp_path, GOOD))
    assert cfg.gossip.min_members == "majority"
    assert [quorum("majority", n) for n in (1, 2, 3, 4, 8)] == [1, 2, 2, 3, 5]
    assert quorum(0, 3) == 0 and quorum(3, 3) == 3
    gossip = GOOD + '\n[gossip]\nmin_members = 0\n'
    assert load_config(write(tmp_path, gossip)).gossip.min_members == 0


def test_an_integer_still_counts_as_a_float(tmp_path):
    cfg = load_config(write(tmp_path, GOOD.replace("sigma = 1.0", "epsilon = 3")))
    assert cfg.privacy.epsilon == 3.0 and isinstance(cfg.privacy.epsilon, float)


def test_invalid_toml_names_the_file(tmp_path):
    with pytest.raises(LocalError, match="not valid TOML"):
        load_config(write(tmp_path, "state_dir = \n"))


def test_a_misspelled_flag_is_reported_with_its_own_commands_usage(capsys):
    """`flnode simulate --roundz 3` used to print flnode's top-level usage
    ({keygen,consortium,...}), not simulate's."""
    from node.cli import main

    for argv, prog in ((["simulate", "--roundz", "3"], "flnode simulate"),
                       (["consortium", "show", "x.toml", "--bogus"], "flnode consortium show")):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert f"{prog}: error: unrecognized arguments: {argv[-2] if argv[-1] == '3' else argv[-1]}" \
            in err and err.startswith(f"usage: {prog}"), err
