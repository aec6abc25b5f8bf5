from pathlib import Path

import pytest
import yaml

from pmmrec.config import Config, dump_config, load_config, parse_override
from pmmrec.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    config = load_config(path)
    assert isinstance(config, Config)


def test_defaults_follow_the_paper():
    c = load_config()
    assert (c.data.max_seq_len, c.data.min_seq_len) == (20, 3)
    assert (c.model.num_blocks, c.model.num_heads, c.model.dropout) == (2, 2, 0.1)
    assert c.model.fusion == "merged_attention" and c.model.user_encoder == "sasrec"
    assert c.text.trainable_layers == 2 and c.text.max_tokens == 50
    assert c.objectives.weights == {"rec": 1.0, "nicl": 0.4, "nid": 0.2, "rcl": 0.2}


def test_overrides_are_typed():
    c = load_config(REPO / "configs/tiny.yaml",
                    ["model.fusion=sum", "train.epochs=3", "train.lr=1", "data.sources=[a, b]", "seed=7",
                     "train.max_steps=null", "objectives.nicl.tau=0.05", "train.encoder_lr=3e-4"])
    assert c.train.encoder_lr == 3e-4
    assert c.model.fusion == "sum" and c.train.epochs == 3 and c.seed == 7
    assert c.train.lr == 1.0 and isinstance(c.train.lr, float)
    assert c.data.sources == ["a", "b"] and c.train.max_steps is None and c.objectives.nicl.tau == 0.05


def test_machine_readable_keys_exist():
    keys = ["data.domain=x", "data.sources=[x]", "run.dir=r", "train.epochs=1", "train.max_steps=5",
            "train.batch_size=4", "model.fusion=gated", "model.modality=text", "model.item_tower=id",
            "model.user_encoder=gru4rec", "transfer.parts=item_encoder", "seed=1", "train.cache_dir=shared/c"]
    c = load_config(None, keys)
    assert c.run.dir == "r" and c.transfer.parts == "item_encoder" and c.model.item_tower == "id"
    assert c.train.cache_dir == "shared/c" and load_config(None).train.cache_dir == ""  # "" = <run.dir>/cache


def test_unknown_key_in_file_names_file_line_and_suggestion(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("model:\n  dim: 8\n  fusoin: sum\n")
    with pytest.raises(ConfigError, match=r"c\.yaml:3: unknown key 'model\.fusoin' \(did you mean 'model\.fusion'\?\)"):
        load_config(f)


def test_unknown_section_and_override_typos():
    with pytest.raises(ConfigError, match=r"override 'trian.epochs=1': unknown key 'trian' \(did you mean 'train'"):
        load_config(None, ["trian.epochs=1"])
    with pytest.raises(ConfigError, match=r"must be one of .* got 'summ' \(did you mean 'sum'\?\)"):
        load_config(None, ["model.fusion=summ"])


def test_wrong_types_are_errors(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  epochs: ten\n")
    with pytest.raises(ConfigError, match=r"c\.yaml:2: 'train\.epochs' must be an integer, got 'ten'"):
        load_config(f)
    with pytest.raises(ConfigError, match="must be true or false"):
        load_config(None, ["train.deterministic=maybe"])
    with pytest.raises(ConfigError, match="must be a section"):
        load_config(None, ["model=3"])
    with pytest.raises(ConfigError, match="must be positive"):
        load_config(None, ["model.dim=0"])
    with pytest.raises(ConfigError, match="min_seq_len must be >= 3"):
        load_config(None, ["data.min_seq_len=1"])
    with pytest.raises(ConfigError, match=r"objectives\.nicl\.max_slots=0'.*max_slots must be positive"):
        load_config(None, ["objectives.nicl.max_slots=0"])
    with pytest.raises(ConfigError, match="objectives.pretrain must name at least one objective"):
        load_config(None, ["objectives.pretrain=[]"])
    assert load_config(None, ["objectives.nicl.max_slots=null"]).objectives.nicl.max_slots is None


def test_bad_yaml_and_missing_file(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("model:\n  dim: [1, 2\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml:\d+: invalid YAML"):
        load_config(f)
    f.write_text("model:\n  dim: 8\nmodel:\n  dim: 9\n")
    with pytest.raises(ConfigError, match="appears twice"):
        load_config(f)
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    f.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(f)
    with pytest.raises(ConfigError, match="dotted.key=value"):
        parse_override("model.fusion")


def test_dump_round_trips(tmp_path):
    c = load_config(REPO / "configs/tiny.yaml", ["model.fusion=film"])
    dump_config(c, tmp_path / "run" / "config.yaml")
    again = load_config(tmp_path / "run" / "config.yaml")
    assert again == c
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["model"]["fusion"] == "film"


def test_cpu_recipe_matches_the_demo():
    from pmmrec.demo import CPU_RECIPE

    assert load_config(REPO / "configs/cpu.yaml") == load_config(None, CPU_RECIPE)


def test_yaml_booleans_read_as_off_on_words(tmp_path):
    """YAML 1.1 reads a bare `off` as False: a choice field that offers "off" takes it as the word."""
    assert load_config(None, ["train.amp=off"]).train.amp == "off"
    recipe = tmp_path / "r.yaml"
    recipe.write_text("train:\n  amp: off\n")
    assert load_config(recipe).train.amp == "off"
    with pytest.raises(ConfigError, match="must be one of"):
        load_config(None, ["model.fusion=off"])  # no "off" among the fusions: still an error
