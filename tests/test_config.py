from __future__ import annotations

import pytest

from seqedit.config import ConfigError, RunConfig, load_config, parse_override


def test_defaults_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("name: x\nn_edits: 5\neditor:\n  name: random\n  relative_norm: 0.1\n")
    cfg = load_config(path, ["editor.layers=[1]", "data.seed=3", "wandb.tags=[a, b]", "model.revision=null"])
    assert cfg.name == "x" and cfg.n_edits == 5 and cfg.data.seed == 3
    assert cfg.editor.name == "random"
    # the fully built config: every editor default is filled in, so a changed default changes the hash
    assert cfg.editor.options == {"relative_norm": 0.1, "layers": [1], "norm": None, "spike_probability": 0.0,
                                  "spike_factor": 100.0}
    assert cfg.wandb.tags == ("a", "b")
    assert cfg.model.revision is None


def test_unknown_keys_get_did_you_mean():
    with pytest.raises(ConfigError, match=r"unknown config key 'n_edit'.*Did you mean 'n_edits'"):
        load_config(None, ["n_edit=3"])
    with pytest.raises(ConfigError, match=r"unknown config key 'data.sede'.*Did you mean 'seed'"):
        load_config(None, ["data.sede=3"])
    with pytest.raises(ConfigError, match=r"unknown config key 'editor.lrr'.*Did you mean 'lr'"):
        load_config(None, ["editor.name=ft", "editor.lrr=0.1"])
    with pytest.raises(KeyError, match=r"unknown editor 'fft'"):
        load_config(None, ["editor.name=fft"])


def test_type_errors_name_key_and_value():
    with pytest.raises(ConfigError, match=r"n_edits: expected an integer, got 'many'"):
        load_config(None, ["n_edits=many"])
    with pytest.raises(ConfigError, match=r"eval.immediate: expected true/false, got 3"):
        load_config(None, ["eval.immediate=3"])
    with pytest.raises(ConfigError, match=r"model.dtype: 'fp8' is not allowed; allowed: float32, bfloat16, float16"):
        load_config(None, ["model.dtype=fp8"])
    with pytest.raises(ConfigError, match=r"batch_size: 0 must be >= 1"):
        load_config(None, ["batch_size=0"])
    with pytest.raises(ConfigError, match="editor: .*objective='sgd'"):
        load_config(None, ["editor.name=ft", "editor.objective=sgd"])
    with pytest.raises(ConfigError, match="must look like key.path=value"):
        parse_override("n_edits")
    with pytest.raises(ConfigError, match="not found"):
        load_config("/nonexistent.yaml")


def test_hash_is_stable_and_sensitive():
    a = load_config(None, ["editor.name=random", "editor.relative_norm=0.1"])
    b = load_config(None, ["editor.relative_norm=0.1", "editor.name=random"])
    c = load_config(None, ["editor.name=random", "editor.relative_norm=0.2"])
    assert a.config_hash() == b.config_hash() != c.config_hash()
    assert a.run_id.startswith("default-") and a.run_id.endswith("-s0")
    assert RunConfig().config_hash() == RunConfig().config_hash()
    # one config however it is spelt: a scalar layer is a one-element list, an explicit default is the default
    assert (load_config(None, ["editor.layers=0"]).config_hash() == load_config(None, ["editor.layers=[0]"]).config_hash()
            == load_config(None, ["editor.layers=[0]", "editor.lr=0.005"]).config_hash())
    # resume-safe keys do not change the hash; result-changing ones do
    base = load_config(None, []).config_hash()
    assert load_config(None, ["threads=1", "wandb.mode=offline", "checkpoint.snapshot_every=7"]).config_hash() == base
    assert load_config(None, ["guard.policy=reject"]).config_hash() != base


def test_zero_counts_are_refused_before_any_work():
    with pytest.raises(ConfigError, match=r"telemetry.state_every: 0 must be >= 1"):
        load_config(None, ["telemetry.state_every=0"])
    with pytest.raises(ConfigError, match=r"checkpoint.snapshot_every: 0 must be >= 1"):
        load_config(None, ["checkpoint.snapshot_every=0"])
    with pytest.raises(ConfigError, match=r"guard.policy: 'ignore' is not allowed; allowed: reject, stop, allow"):
        load_config(None, ["guard.policy=ignore"])


def test_shipped_default_config_loads():
    from seqedit.cli import default_config_path

    cfg = load_config(default_config_path())
    assert cfg.model.name == "world:standard" and cfg.data.source == "world"


@pytest.mark.parametrize("name", ["default.yaml", "long_2000.yaml", "rrome_medium.yaml"])
def test_example_configs_load_and_name_real_probes_and_editors(name):
    from pathlib import Path

    from seqedit.editors.base import make_editor
    from seqedit.probe_api import make_probe
    from seqedit.schedule import parse_schedule

    cfg = load_config(Path(__file__).resolve().parents[1] / "runs" / "configs" / name)
    make_editor(cfg.editor.name, cfg.editor.options)  # name and options resolve
    for spec in cfg.probes:
        make_probe(spec.name, spec.options)
        parse_schedule(spec.schedule)
    if name == "long_2000.yaml":
        assert cfg.n_edits == 2000 and cfg.wandb.mode == "offline"
        assert {(p.name, p.schedule) for p in cfg.probes} >= {("retention", "every:100")}


def test_scientific_floats_without_a_dot_are_numbers():
    from seqedit.config import load_config

    cfg = load_config(None, ["guard.max_update_rel=1e-9", "guard.max_update_norm=2E3"])
    assert cfg.guard.max_update_rel == 1e-9 and cfg.guard.max_update_norm == 2000.0
    with pytest.raises(ValueError, match="guard.max_update_norm"):
        load_config(None, ["guard.max_update_norm=big"])
