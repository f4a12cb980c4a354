import subprocess
import sys

import pytest

from dsxfer.config import ExperimentConfig, load_config
from dsxfer.errors import ConfigError


def test_defaults_round_trip_through_yaml(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(ExperimentConfig().to_yaml())
    assert load_config(path) == ExperimentConfig()


def test_file_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  lr: 1e-2\n  max_steps: 7\ninjection:\n  layers: top_k\n")
    cfg = load_config(path, ["train.lr=3e-3", "injection.layers=[10, 11]", "model.name_or_path=xlm-roberta-base"])
    assert cfg.train.lr == pytest.approx(3e-3)
    assert cfg.train.max_steps == 7
    assert cfg.injection.layers == [10, 11]
    assert cfg.model.name_or_path == "xlm-roberta-base"


def test_float_written_without_dot_is_a_number(tmp_path):
    # YAML 1.1 reads "3e-3" as a string; the config must still take it as a float
    assert load_config(None, ["train.lr=3e-3"]).train.lr == pytest.approx(0.003)


@pytest.mark.parametrize(
    "override, message",
    [
        ("trian.lr=1", "unknown config key 'trian': did you mean 'train'?"),
        ("train.learning_rate=1", "unknown config key 'train.learning_rate': did you mean"),
        ("train.lr=fast", "train.lr='fast' is invalid: expected a number"),
        ("train.max_steps=1.5", "train.max_steps=1.5 is invalid: expected an integer"),
        ("train.tensorboard=yes please", "expected true/false"),
        ("alignment.loss=l1", "alignment.loss='l1' is invalid: expected one of 'cosine', 'mse', 'infonce', 'kl'"),
        ("injection.layers=some", "expected one of 'all', 'top_k' or a list of an integer"),
        ("train.max_steps=0", "train.max_steps=0 is invalid: must be > 0"),
        ("model.doc_stride=300", "must be smaller than model.max_length"),
        ("noequals", "is not of the form section.key=value"),
    ],
)
def test_bad_values_name_field_and_allowed(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert message in str(e.value)


def test_missing_and_broken_files(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  lr: [1,\n")
    with pytest.raises(ConfigError, match="not valid YAML at line"):
        load_config(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(listy)


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "dsxfer.cli", *args], capture_output=True, text=True)


def test_cli_errors_are_one_line_exit_2(tmp_path):
    for args in (["config", "show", "trian.lr=1"], ["config", "show", "train.lr=x"],
                 ["config", "show", "--config", str(tmp_path / "missing.yaml")]):
        r = _cli(*args)
        assert r.returncode == 2, r
        assert r.stderr.startswith("dsxfer: error: ") and r.stderr.count("\n") == 1, r.stderr
        assert "Traceback" not in r.stderr


def test_cli_config_show_applies_override():
    r = _cli("config", "show", "train.lr=0.001")
    assert r.returncode == 0, r.stderr
    assert "lr: 0.001" in r.stdout


@pytest.mark.parametrize("override, expected", [
    ("alignment.target_langs=deu,fra", ["deu", "fra"]),
    ("alignment.target_langs=[deu, fra]", ["deu", "fra"]),
    ("alignment.target_langs=deu", ["deu"]),
    ("injection.layers=10,11", [10, 11]),
    ("injection.layers=11", [11]),
    ("injection.layers=all", "all"),  # the field takes the scalar as it is
    ("eval.langs=de, es", ["de", "es"]),
    ("eval.files=my.json:de,pairs.tsv:fr", ["my.json:de", "pairs.tsv:fr"]),
    ("model.name_or_path=a,b", "a,b"),  # scalar fields keep commas
])
def test_list_overrides_take_comma_lists(override, expected):
    section, key = override.split("=")[0].split(".")
    assert getattr(getattr(load_config(None, [override]), section), key) == expected


def test_comma_list_items_are_still_type_checked():
    with pytest.raises(ConfigError, match=r"injection.layers=\[10, 'x'\] is invalid: expected one of 'all', 'top_k' or a list of an integer"):
        load_config(None, ["injection.layers=10,x"])
    with pytest.raises(ConfigError, match="train.lr='1,5' is invalid: expected a number"):
        load_config(None, ["train.lr=1,5"])
