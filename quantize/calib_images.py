"""Image-text calibration for vision-language models: a local JSONL file of ``{"image": path, "text": str}``.

Text-only calibration (the default, as in AutoRound) shows the language blocks no image tokens; with
``--calib-images FILE.jsonl`` each sample is one record: its image and text through the model's own
processor (chat template when it has one, else the processor's image token before the text), so the
blocks are tuned on the hidden states an image prompt gives them.

Every sample must lay out its tokens the same way: the tuning step runs a batch of samples with one set
of position ids and masks (Qwen2-VL's 3-D rotary positions depend on where the image tokens lie and on
the image's grid). So every image is resized to the first one's size, a sample longer than ``--seqlen``
is cut at the end (never inside the image), and a shorter one is filled up with text tokens from the
records' texts. Image paths are relative to the JSONL file's folder unless absolute.

Models whose language blocks take image features as a separate input (Mllama's cross-attention layers)
are refused: their features differ per sample, and text-only calibration keeps those layers 16-bit.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from quantize.model import UserError

# Processor outputs that run along the tokens (cut and filled with the ids); the rest describe the image.
TOKEN_ALIGNED = ("attention_mask", "token_type_ids", "mm_token_type_ids")


@dataclass
class ImageCalibration:
    ids: torch.Tensor  # [n, seqlen], image placeholders expanded to the model's image tokens
    inputs: list[dict[str, torch.Tensor]]  # per sample, batch of one: pixel_values, image_grid_thw, ...

    def key(self) -> torch.Tensor:
        """One tensor standing for ids and images, for the resume fingerprint."""
        h = hashlib.blake2b(digest_size=16)
        for sample in self.inputs:
            for name, t in sorted(sample.items()):
                h.update(name.encode())
                h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
        return torch.cat([self.ids.flatten(), torch.frombuffer(bytearray(h.digest()), dtype=torch.uint8).long()])


def read_records(path: Path) -> list[tuple[Path, str]]:
    """(image path, text) per line of the JSONL file; a bad line or a missing image names the line."""
    if not path.is_file():
        raise UserError(f"--calib-images {path}: no such file (give a JSONL file of {{\"image\": path, \"text\": ...}} lines)")
    records = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}, line {n}: not JSON ({e.msg})") from None
        if not isinstance(rec, dict) or not isinstance(rec.get("image"), str) or not isinstance(rec.get("text"), str):
            raise UserError(f'{path}, line {n}: expected {{"image": "path/to/file.jpg", "text": "..."}}, got {line[:80]!r}')
        image = Path(rec["image"])
        image = image if image.is_absolute() else path.parent / image
        if not image.is_file():
            raise UserError(f"{path}, line {n}: image {image} does not exist")
        records.append((image, rec["text"]))
    if not records:
        raise UserError(f"{path} holds no records")
    return records


def check_model(model) -> None:
    """Refuse models whose blocks take image features as an input of their own (per sample)."""
    from quantize.vlm import is_vlm

    config = model.config
    if not is_vlm(config):
        raise UserError(f"--calib-images is for vision-language models; {type(model).__name__} has no vision tower: drop it")
    if getattr(config.get_text_config(), "cross_attention_layers", None):
        raise UserError(f"--calib-images: {type(model).__name__} reads image features in cross-attention layers, which "
                        "image-text calibration does not cover yet; text-only calibration keeps those layers 16-bit: drop --calib-images")


def load_processor(model_dir: str | None):
    from transformers import AutoProcessor

    if not model_dir:
        raise UserError("--calib-images needs the model's processor files (preprocessor_config.json): give a local folder or hub id")
    try:
        return AutoProcessor.from_pretrained(model_dir)
    except Exception as e:  # noqa: BLE001 - missing files, missing torchvision, unknown processor class
        raise UserError(f"--calib-images: the model's processor did not load from {model_dir} ({type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''}); it needs preprocessor_config.json (and some "
                        "processors need torchvision: pip install torchvision)") from None


def _prompt(processor, text: str) -> str:
    if getattr(processor, "chat_template", None):
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
        return processor.apply_chat_template(messages, tokenize=False)
    token = getattr(processor, "image_token", None)
    if not token:
        raise UserError(f"--calib-images: {type(processor).__name__} has neither a chat template nor an image token")
    return f"{token}\n{text}"


def image_token_id(config) -> int | None:
    """The token the model replaces with image features (Gemma 3's processor names its begin-of-image
    token instead, so the model's config decides)."""
    for key in ("image_token_id", "image_token_index"):
        if isinstance(getattr(config, key, None), int):
            return getattr(config, key)
    return None


def _image_token_id(processor) -> int | None:
    tid = getattr(processor, "image_token_id", None)
    if tid is None and getattr(processor, "image_token", None):
        tid = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    return tid


def image_calibration(path: Path, processor, nsamples: int, seqlen: int, seed: int = 42,
                      image_token: int | None = None) -> ImageCalibration:
    """``nsamples`` records drawn with ``seed``, each ``seqlen`` tokens with its image (see the module doc);
    ``image_token``: the model's image token id (:func:`image_token_id`), else the processor's."""
    from PIL import Image

    records = read_records(path)
    if len(records) < nsamples:
        raise UserError(f"{path} holds {len(records)} records, fewer than the {nsamples} samples asked for: lower "
                        "--nsamples or add records")
    gen = torch.Generator().manual_seed(seed)
    picked = [records[i] for i in torch.randperm(len(records), generator=gen)[:nsamples].tolist()]
    tok = processor.tokenizer
    filler = tok("\n\n".join(text for _, text in records), add_special_tokens=False)["input_ids"] or [tok.eos_token_id or 0]
    image_id = image_token if image_token is not None else _image_token_id(processor)
    size = None
    ids, inputs, layout = [], [], None
    for n, (image_path, text) in enumerate(picked):
        try:
            image = Image.open(image_path).convert("RGB")
        except Exception as e:  # noqa: BLE001 - PIL raises several types for unreadable files
            raise UserError(f"{image_path}: not a readable image ({type(e).__name__}: {e})") from None
        size = size or image.size
        image = image if image.size == size else image.resize(size)
        out = processor(text=[_prompt(processor, text)], images=[image], return_tensors="pt")
        row = out.pop("input_ids")[0]
        where = (row == image_id).nonzero().flatten() if image_id is not None else torch.empty(0, dtype=torch.long)
        if len(where) and int(where[-1]) >= seqlen:
            raise UserError(f"{image_path}: the prompt's image tokens reach position {int(where[-1]) + 1}, beyond --seqlen "
                            f"{seqlen}: raise --seqlen or give smaller images")
        layout = where if layout is None else layout
        if not torch.equal(where, layout):
            raise UserError(f"{image_path}: its image tokens lie elsewhere than the first sample's ({len(where)} vs "
                            f"{len(layout)} tokens); give images of one size and texts that follow the image")
        need = seqlen - len(row)
        if need > 0:  # fill with the records' text, starting at a different place for each sample
            start = (n * seqlen) % len(filler)
            extra = (filler[start:] + filler * (need // len(filler) + 1))[:need]
            row = torch.cat([row, torch.tensor(extra, dtype=row.dtype)])
        sample = {}
        for name, t in out.items():
            if name in TOKEN_ALIGNED and t.dim() == 2 and t.shape[1] == len(row) - max(need, 0):
                pad = torch.full((1, max(need, 0)), 1 if name == "attention_mask" else 0, dtype=t.dtype)
                t = torch.cat([t, pad], 1)[:, :seqlen]
                if name == "attention_mask":
                    continue  # every calibration token is attended to, as in text-only calibration
            sample[name] = t
        ids.append(row[:seqlen])
        inputs.append(sample)
    return ImageCalibration(torch.stack(ids), inputs)
