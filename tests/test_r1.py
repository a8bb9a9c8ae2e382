"""The R1 pipeline's dense student presets and `nanoseek r1` (the full toy-scale run is a slow test)."""

from nanoseek import cli
from nanoseek.config import ModelConfig
from nanoseek.model import Transformer


def test_dense_presets_have_no_experts_and_match_their_moe_activated_size():
    for dense, moe in (("tiny-dense", "tiny"), ("small-dense", "small")):
        cfg = ModelConfig.preset(dense)
        assert cfg.n_moe_layers == 0 and cfg.n_mtp == 0
        assert cfg.kv_lora_rank == ModelConfig.preset(moe).kv_lora_rank  # MLA kept
        a, b = cfg.param_counts()["active"], ModelConfig.preset(moe).param_counts()["active"]
        assert abs(a - b) / b < 0.02, (dense, a, b)
    model = Transformer(ModelConfig.preset("tiny-dense"))
    assert not model.moe_layers()
    assert model.num_params() == ModelConfig.preset("tiny-dense").param_counts()["total"]


def test_info_lists_the_dense_presets(capsys):
    assert cli.main(["info", "--list"]) == 0
    out = capsys.readouterr().out
    assert "tiny-dense" in out and "992,640" in out
