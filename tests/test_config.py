"""Tests for advtrain.config: validation of every dataclass, the dict round trip and load_yaml."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from advtrain.config import AttackConfig, EvalConfig, TrainConfig, check_eps_fits, load_yaml

# --------------------------------------------------------------------------------------------
# AttackConfig
# --------------------------------------------------------------------------------------------


def test_attack_config_defaults_valid_and_normalized():
    cfg = AttackConfig(norm="LINF", loss="CE", name="PGD")
    assert (cfg.name, cfg.norm, cfg.loss) == ("pgd", "linf", "ce")
    assert cfg.eps == 0.3 and cfg.steps == 40 and cfg.restarts == 1
    assert cfg.resolved_step_size() == pytest.approx(2.5 * 0.3 / 40)
    assert AttackConfig(step_size=0.01).resolved_step_size() == 0.01


def test_attack_config_l2_eps_range_wider_than_linf():
    assert AttackConfig(norm="l2", eps=2.0).eps == 2.0
    # l2's bound is the diameter of the data's image space, known once the data is: 28 on MNIST.
    assert AttackConfig(norm="l2", eps=29.0).eps == 29.0
    with pytest.raises(
        ValueError,
        match=r"`eps` must be in \[0.0, 28\] for 28x28x1 images \(l2 diameter of \[0, 1\]\^784\). "
        r"Received: eps=29.0",
    ):
        check_eps_fits("eps", 29.0, "l2", (28, 28, 1))
    check_eps_fits("eps", 55.0, "l2", (32, 32, 3))
    with pytest.raises(ValueError, match=r"`eps` must be in \[0.0, 1.0\]. Received: eps=2.0"):
        AttackConfig(norm="linf", eps=2.0)


def test_attack_config_int_eps_stored_as_float():
    cfg = AttackConfig(eps=1)
    assert cfg.eps == 1.0 and isinstance(cfg.eps, float)


@pytest.mark.parametrize(
    "field, value, error, match",
    [
        ("eps", -0.1, ValueError, r"`eps` must be in \[0.0, 1.0\]. Received: eps=-0.1"),
        ("eps", 1.5, ValueError, r"`eps` must be in \[0.0, 1.0\]. Received: eps=1.5"),
        ("eps", float("nan"), ValueError, r"`eps` must be finite. Received: eps=nan"),
        ("eps", "0.3", TypeError, r"`eps` must be a number. Received: eps='0.3'"),
        ("eps", True, TypeError, r"`eps` must be a number. Received: eps=True"),
        ("steps", 0, ValueError, r"`steps` must be in \[1, inf\]. Received: steps=0"),
        ("steps", 2.0, TypeError, r"`steps` must be an integer. Received: steps=2.0"),
        ("steps", True, TypeError, r"`steps` must be an integer. Received: steps=True"),
        (
            "step_size",
            0.0,
            ValueError,
            r"`step_size` must be in \(0.0, inf\]. Received: step_size=0.0",
        ),
        ("norm", "l3", ValueError, r"`norm` must be one of 'linf', 'l2'. Received: norm='l3'"),
        ("norm", 2, ValueError, r"`norm` must be one of 'linf', 'l2'. Received: norm=2"),
        (
            "loss",
            "foo",
            ValueError,
            r"`loss` must be one of 'ce', 'margin', 'dlr'. Received: loss='foo'",
        ),
        (
            "name",
            "cw",
            ValueError,
            r"`name` must be one of 'fgsm', 'pgd', 'apgd', 'square'. Received: name='cw'",
        ),
        ("restarts", 0, ValueError, r"`restarts` must be in \[1, inf\]. Received: restarts=0"),
        (
            "random_start",
            1,
            TypeError,
            r"`random_start` must be true or false. Received: random_start=1",
        ),
        ("seed", -1, ValueError, r"`seed` must be in \[0, inf\]. Received: seed=-1"),
    ],
)
def test_attack_config_bad_field_raises(field, value, error, match):
    with pytest.raises(error, match=match):
        AttackConfig(**{field: value})


# --------------------------------------------------------------------------------------------
# TrainConfig
# --------------------------------------------------------------------------------------------


def test_train_config_defaults_valid():
    cfg = TrainConfig()
    assert cfg.method == "pgd" and cfg.model == "cnn" and cfg.mix == 1.0
    assert cfg.resolved_step_size() == pytest.approx(2.5 * 0.3 / 10)
    assert TrainConfig(method="fgsm").resolved_step_size() == pytest.approx(1.25 * 0.3)


@pytest.mark.parametrize(
    "field, value, error, match",
    [
        ("eps", -0.01, ValueError, r"`eps` must be in \[0.0, 1.0\]. Received: eps=-0.01"),
        ("eps", 1.01, ValueError, r"`eps` must be in \[0.0, 1.0\]. Received: eps=1.01"),
        ("steps", 0, ValueError, r"`steps` must be in \[1, 1000\]. Received: steps=0"),
        ("mix", 1.5, ValueError, r"`mix` must be in \[0.0, 1.0\]. Received: mix=1.5"),
        ("mix", -0.5, ValueError, r"`mix` must be in \[0.0, 1.0\]. Received: mix=-0.5"),
        (
            "learning_rate",
            0.0,
            ValueError,
            r"`learning_rate` must be in \(0.0, 10.0\]. Received: learning_rate=0.0",
        ),
        (
            "learning_rate",
            -1e-3,
            ValueError,
            r"`learning_rate` must be in \(0.0, 10.0\]. Received: learning_rate=-0.001",
        ),
        (
            "method",
            "mart",
            ValueError,
            (
                r"`method` must be one of 'clean', 'fgsm', 'pgd', 'trades', 'ibp', 'crown-ibp'. "
                r"Received: method='mart'"
            ),
        ),
        (
            "model",
            "resnet50",
            ValueError,
            (
                r"`model` must be one of 'mlp', 'cnn', 'madry', 'resnet', a .keras file or "
                r"package.module:function. Received: model='resnet50'"
            ),
        ),
        ("norm", "l1", ValueError, r"`norm` must be one of 'linf', 'l2'. Received: norm='l1'"),
        ("schedule", "step", ValueError, r"`schedule` must be one of .*Received: schedule='step'"),
        (
            "optimizer",
            "rmsprop",
            ValueError,
            r"`optimizer` must be one of 'adam', 'sgd'. Received: optimizer='rmsprop'",
        ),
        ("epochs", True, TypeError, r"`epochs` must be an integer. Received: epochs=True"),
        (
            "batch_size",
            0,
            ValueError,
            r"`batch_size` must be in \[1, 65536\]. Received: batch_size=0",
        ),
        ("beta", -1.0, ValueError, r"`beta` must be in \[0.0, inf\]. Received: beta=-1.0"),
        ("val_size", 0, ValueError, r"`val_size` must be in \[1, inf\]. Received: val_size=0"),
        (
            "train_size",
            0,
            ValueError,
            r"`train_size` must be in \[1, inf\]. Received: train_size=0",
        ),
        ("guard", 0, TypeError, r"`guard` must be true or false. Received: guard=0"),
        ("data", "", TypeError, r"`data` must be a non-empty string. Received: data=''"),
    ],
)
def test_train_config_bad_field_raises(field, value, error, match):
    with pytest.raises(error, match=match):
        TrainConfig(**{field: value})


@pytest.mark.parametrize(
    "field, value, match",
    [
        ("kappa_end", 1.5, r"`kappa_end` must be in \[0.0, 1.0\]. Received: kappa_end=1.5"),
        ("beta_end", -0.1, r"`beta_end` must be in \[0.0, 1.0\]. Received: beta_end=-0.1"),
        (
            "eps_ramp_epochs",
            0,
            r"`eps_ramp_epochs` must be >= 1 for method 'crown-ibp' .* Received: eps_ramp_epochs=0",
        ),
    ],
)
def test_certified_train_config_bad_field_raises(field, value, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**{"method": "crown-ibp", "eps_ramp_epochs": 2, field: value})


def test_certified_train_config_at_eps_zero_needs_no_ramp():
    assert TrainConfig(method="ibp", eps=0.0).eps_ramp_epochs == 0


# --------------------------------------------------------------------------------------------
# EvalConfig
# --------------------------------------------------------------------------------------------


def test_eval_config_scalar_eps_becomes_tuple():
    assert EvalConfig(eps=0.1).eps == (0.1,)
    assert EvalConfig(eps=[0.1, 0.2]).eps == (0.1, 0.2)
    assert EvalConfig(norm="l2", eps=[0.5, 2.0]).eps == (0.5, 2.0)


@pytest.mark.parametrize(
    "field, value, error, match",
    [
        ("eps", [0.1, 1.2], ValueError, r"`eps` must be in \[0.0, 1.0\]. Received: eps=1.2"),
        ("eps", -0.3, ValueError, r"`eps` must be in \[0.0, 1.0\]. Received: eps=-0.3"),
        (
            "eps",
            [],
            ValueError,
            r"`eps` must be a number or a non-empty list of numbers. Received: eps=\[\]",
        ),
        ("eps", True, ValueError, r"non-empty list of numbers. Received: eps=True"),
        (
            "suite",
            "full",
            ValueError,
            r"`suite` must be one of 'fgsm', 'quick', 'standard'. Received: suite='full'",
        ),
        (
            "split",
            "train",
            ValueError,
            r"`split` must be one of 'val', 'test'. Received: split='train'",
        ),
        ("norm", "l3", ValueError, r"`norm` must be one of 'linf', 'l2'. Received: norm='l3'"),
        ("eps", 1.5, ValueError, r"`eps` must be in \[0.0, 1.0\]. Received: eps=1.5"),
        ("n", 0, ValueError, r"`n` must be in \[1, inf\]. Received: n=0"),
        ("sanity", 1, TypeError, r"`sanity` must be true or false. Received: sanity=1"),
    ],
)
def test_eval_config_bad_field_raises(field, value, error, match):
    with pytest.raises(error, match=match):
        EvalConfig(**{field: value})


# --------------------------------------------------------------------------------------------
# Round trip and from_dict
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "cfg",
    [
        AttackConfig(name="apgd", eps=0.1, steps=10, norm="l2", loss="dlr", restarts=2, seed=3),
        AttackConfig(step_size=0.01, random_start=False),
        TrainConfig(model="madry", method="trades", beta=3.0, train_size=1000, step_size=0.02),
        EvalConfig(eps=(0.1, 0.3), suite="quick", n=100, split="val"),
    ],
)
def test_config_to_dict_from_dict_round_trip_equal(cfg):
    d = cfg.to_dict()
    assert isinstance(d, dict)
    again = type(cfg).from_dict(d)
    assert again == cfg
    assert again.to_dict() == d


def test_eval_config_certify_default_none_and_comma_list():
    assert EvalConfig().certify == ("ibp", "crown-ibp")
    assert EvalConfig(certify="none").certify == () == EvalConfig(certify=[]).certify
    assert EvalConfig(certify="crown, IBP,crown").certify == ("crown", "ibp")
    assert EvalConfig(certify=("crown-ibp",)).to_dict()["certify"] == ["crown-ibp"]
    assert EvalConfig.from_dict(EvalConfig(certify=["ibp"]).to_dict()).certify == ("ibp",)


def test_eval_config_certify_methods_are_the_bounds_methods():
    from advtrain import bounds
    from advtrain.config import CERTIFY_METHODS

    assert bounds.METHODS == CERTIFY_METHODS == ("ibp", "crown-ibp", "crown")


@pytest.mark.parametrize(
    "value, error, match",
    [
        (
            "deeppoly",
            ValueError,
            (
                r"`certify` must list methods among 'ibp', 'crown-ibp', 'crown' \(or be 'none'\). "
                r"Received: certify='deeppoly'"
            ),
        ),
        (["ibp", 3], ValueError, r"Received: certify=3"),
        (1, TypeError, r"`certify` must be a list of bound methods .* Received: certify=1"),
    ],
)
def test_eval_config_bad_certify_raises(value, error, match):
    with pytest.raises(error, match=match):
        EvalConfig(certify=value)


def test_load_spec_eval_certify_from_yaml(tmp_path):
    from workflows.spec import load_spec

    p = tmp_path / "run.yaml"
    p.write_text("eval: {eps: [0.1], certify: [crown-ibp]}\n")
    assert load_spec(p).eval.certify == ("crown-ibp",)
    p.write_text("eval: {certify: none}\n")
    assert load_spec(p).eval.certify == ()


def test_eval_config_to_dict_eps_is_list():
    assert EvalConfig(eps=(0.1, 0.2)).to_dict()["eps"] == [0.1, 0.2]


@pytest.mark.parametrize("cls", [AttackConfig, TrainConfig, EvalConfig])
def test_config_from_dict_unknown_key_raises_listing_known(cls):
    with pytest.raises(
        ValueError, match=rf"Unknown {cls.__name__} key\(s\): alpha, nb_iter\. Known keys: .*eps"
    ):
        cls.from_dict({"eps": 0.1, "alpha": 0.01, "nb_iter": 3})


def test_config_from_dict_non_mapping_raises():
    with pytest.raises(TypeError, match=r"AttackConfig expects a mapping. Received: \[1, 2\]"):
        AttackConfig.from_dict([1, 2])


def test_config_from_dict_bad_value_raises():
    with pytest.raises(ValueError, match=r"Received: steps=0"):
        AttackConfig.from_dict({"steps": 0})


def test_config_frozen_assignment_raises():
    cfg = AttackConfig()
    with pytest.raises(AttributeError, match="eps"):
        cfg.eps = 0.5  # type: ignore[misc]


def test_config_replace_validates():
    assert AttackConfig().replace(eps=0.1).eps == 0.1
    with pytest.raises(ValueError, match=r"Received: eps=2.0"):
        AttackConfig().replace(eps=2.0)


# --------------------------------------------------------------------------------------------
# load_yaml
# --------------------------------------------------------------------------------------------


def test_load_yaml_mapping_returns_dict(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model: madry\neps: 0.1\n")
    data = load_yaml(path)
    assert data == {"model": "madry", "eps": 0.1}
    assert TrainConfig.from_dict(data).model == "madry"


def test_load_yaml_empty_file_returns_empty_dict(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("")
    assert load_yaml(path) == {}


def test_load_yaml_missing_file_raises(tmp_path):
    path = tmp_path / "nope.yaml"
    with pytest.raises(ValueError, match=r"Cannot read config file '.*nope\.yaml'"):
        load_yaml(path)


def test_load_yaml_bad_yaml_raises(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model: [cnn\neps: 0.1\n")
    with pytest.raises(
        ValueError, match=r"Config file '.*bad\.yaml' is not valid YAML: .*\(line \d+, column \d+\)"
    ):
        load_yaml(path)


def test_load_yaml_non_mapping_raises(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- 1\n- 2\n")
    with pytest.raises(
        ValueError, match=r"'.*list\.yaml' must hold a mapping at the top level. Received: list"
    ):
        load_yaml(path)


# --------------------------------------------------------------------------------------------
# One unknown-key check, the key reference (docs/config.md), `advtrain config`
# --------------------------------------------------------------------------------------------

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


def _advtrain(*argv, cwd=ROOT):
    """`advtrain ARGV` in a fresh interpreter (what a user's shell runs)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "workflows.cli", *argv],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize(
    "text, match",
    [
        (
            "train: {learnig_rate: 0.1}\n",
            r"Unknown key\(s\) in `train`: learnig_rate\. .*; did you mean `learning_rate`\?$",
        ),
        (
            "eval: {suit: quick}\n",
            r"Unknown key\(s\) in `eval`: suit\. .*; did you mean `suite`\?$",
        ),
        (
            "scaling: {worker: 2}\n",
            r"Unknown key\(s\) in `scaling`: worker\. .*; did you mean `workers`\?$",
        ),
        (
            "trains: {eps: 0.1}\n",
            (
                r"Unknown section\(s\) in .*: trains\. Known sections: train, eval, search, "
                r"scaling; did you mean `train`\?$"
            ),
        ),
        (
            "train: {epz: 0.1, stpes: 3, zzz: 1}\n",
            r"epz, stpes, zzz\. .*; did you mean `eps` for `epz`, `steps` for `stpes`\?$",
        ),
        ("train: {zzz: 1}\n", r"Unknown key\(s\) in `train`: zzz\. Known keys: .*val_size\.$"),
    ],
)
def test_load_spec_unknown_key_says_did_you_mean_in_every_section(tmp_path, text, match):
    from workflows.spec import load_spec

    (tmp_path / "run.yaml").write_text(text)
    with pytest.raises(ValueError, match=match):
        load_spec(tmp_path / "run.yaml")


def test_search_and_from_dict_unknown_key_say_did_you_mean():
    from workflows.search import SearchSpec

    with pytest.raises(
        ValueError, match=r"Unknown key\(s\) in `search`: sampels\. .*; did you mean `samples`\?$"
    ):
        SearchSpec.from_dict({"sampels": 3})
    with pytest.raises(
        ValueError,
        match=r"Unknown or unsearchable key 'mixx' in `search.space`.*; did you mean `mix`\?$",
    ):
        SearchSpec.from_dict({"space": {"mixx": {"choice": [0.5]}}})
    with pytest.raises(
        ValueError,
        match=r"Unknown TrainConfig key\(s\): learnig_rate\. .*did you mean `learning_rate`\?$",
    ):
        TrainConfig.from_dict({"learnig_rate": 0.1})


def test_check_keys_is_the_one_unknown_key_check():
    # Every section goes through advtrain.config.check_keys: no module writes its own.
    sources = [
        ROOT / "advtrain/config.py",
        ROOT / "workflows/spec.py",
        ROOT / "workflows/search.py",
        ROOT / "workflows/tune.py",
    ]
    for path in sources:
        text = path.read_text()
        assert "set(data) - known" not in text and "set(values) - known" not in text, path


def _section_classes():
    from workflows.configdoc import SECTION_CLASSES

    return SECTION_CLASSES


def test_every_key_of_every_section_is_documented():
    from advtrain.config import describe_fields

    for name, cls in _section_classes().items():
        for row in describe_fields(cls):
            assert row["help"] and row["type"] and row["allowed"], (name, row)


def test_docs_config_md_is_up_to_date():
    from workflows.configdoc import markdown

    assert (ROOT / "docs/config.md").read_text() == markdown(), (
        "docs/config.md is stale: regenerate it with `advtrain config --markdown > docs/config.md`"
    )


def test_config_show_round_trips_through_load_spec(tmp_path):
    import yaml

    from workflows.search import SearchSpec
    from workflows.spec import load_spec

    done = _advtrain("config", "--show", "--config", "configs/quick.yaml")
    assert done.returncode == 0, done.stderr
    shown = yaml.safe_load(done.stdout)
    assert (
        list(shown) == ["train", "eval", "search", "scaling"] and shown["train"]["guard"] is True
    )  # defaults in
    (tmp_path / "shown.yaml").write_text(done.stdout)
    before, after = load_spec(ROOT / "configs/quick.yaml"), load_spec(tmp_path / "shown.yaml")
    assert (after.train, after.eval, after.scaling) == (before.train, before.eval, before.scaling)
    assert SearchSpec.from_dict(after.search, base=after.train.to_dict()) == SearchSpec.from_dict(
        before.search, base=before.train.to_dict()
    )
    again = _advtrain("config", "--show", "--config", str(tmp_path / "shown.yaml"))
    assert (
        again.stdout.splitlines()[1:] == done.stdout.splitlines()[1:]
    )  # a fixed point, but for the source line


def test_config_schema_validates_every_run_file_and_refuses_bad_ones():
    import json

    import jsonschema
    import yaml

    done = _advtrain("config", "--schema")
    assert done.returncode == 0, done.stderr
    schema = json.loads(done.stdout)
    jsonschema.Draft202012Validator.check_schema(schema)
    validator = jsonschema.Draft202012Validator(schema)
    assert CONFIGS
    for path in CONFIGS:
        assert not list(validator.iter_errors(yaml.safe_load(path.read_text()))), path
    quick = yaml.safe_load((ROOT / "configs/quick.yaml").read_text())
    for bad in (
        {"train": {**quick["train"], "learnig_rate": 0.1}},
        {"trian": quick["train"]},
        {"train": {"steps": 0}},
        {"train": {"learning_rate": 0}},
        {"eval": {"suite": "full"}},
        {"search": {"space": {"val_size": {"choice": [1]}}}},
        {"scaling": {"workers": "two"}},
    ):
        assert not validator.is_valid(bad), bad


def test_config_command_imports_neither_tensorflow_nor_ray():
    code = (
        "import contextlib, io, sys\nfrom workflows import cli\nfor argv in (['config', '--show', "
        "'--config', 'configs/quick.yaml'], ['config', '--schema'],\n             ['config', "
        "'--markdown']):\n    with contextlib.redirect_stdout(io.StringIO()):\n        assert "
        "cli.main(argv) == 0, argv\nheavy = ('ray', 'tensorflow', "
        "'keras')\nprint(sorted({m.split('.')[0] for m in sys.modules} & set(heavy)))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_config_command_errors_are_one_line_exit_2(tmp_path):
    done = _advtrain("config", "--show", "--config", str(tmp_path / "missing.yaml"))
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.splitlines() == [
        (
            f"advtrain config: error: Cannot read config file "
            f"'{tmp_path / 'missing.yaml'}': No such file or directory"
        )
    ]
    done = _advtrain("config", "--schema", "--config", "configs/quick.yaml")
    assert done.returncode == 2 and len(done.stderr.splitlines()) == 1


def test_train_key_typo_is_one_line_did_you_mean_exit_2_nothing_written(tmp_path):
    (tmp_path / "bad.yaml").write_text("train:\n  learnig_rate: 0.1\n")
    done = _advtrain("train", "--local", "--config", "bad.yaml", cwd=tmp_path)
    assert done.returncode == 2
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        "advtrain train: error: Unknown key(s) in `train`: learnig_rate."
    )
    assert "did you mean `learning_rate`" in lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.yaml"]  # no runs/ folder
