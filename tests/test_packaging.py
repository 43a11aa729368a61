"""Installed import names: everything lives under `quantize`, nothing shadows another package."""

import importlib.metadata as md
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _top_level(dist) -> set[str]:
    names = set()
    for f in dist.files or []:
        parts = f.parts
        if not parts or parts[0].endswith((".dist-info", ".egg-info", ".data")) or parts[0] in ("..", "__pycache__"):
            continue
        if parts[0].endswith(".pth") or parts[0].startswith("__editable__"):
            continue
        names.add(parts[0].removesuffix(".py"))
    return names


def test_only_quantize_is_installed_and_unique():
    ours = md.distribution("quantize-llm")
    assert "quantize" in {p.split(".")[0] for p in ours.read_text("top_level.txt").split()} if ours.read_text("top_level.txt") else True
    others = {}
    for dist in md.distributions():
        if dist.metadata["Name"] == "quantize-llm":
            continue
        for name in _top_level(dist):
            others.setdefault(name, dist.metadata["Name"])
    assert "quantize" not in others, f"'quantize' is also installed by {others.get('quantize')}"


@pytest.mark.parametrize("cwd", ["/", str(REPO)], ids=["outside", "repository-root"])
def test_kernels_folder_does_not_shadow_hf_kernels(cwd):
    # `kernels` and `integrations` must not resolve to our folders, and transformers must not believe
    # Hugging Face's `kernels` package is installed because of us: neither from elsewhere nor from the
    # repository root, where `python -m quantize` puts the current folder first on sys.path
    # (transformers 5.25+ imports `kernels` when it is installed, and failed on a folder of ours).
    code = (
        "import importlib.util, quantize.kernels, quantize.integrations.transformers;"
        "from transformers.utils import is_kernels_available;"
        "s = importlib.util.find_spec('kernels');"
        f"assert s is None or not str(s.origin or s.submodule_search_locations).startswith({str(REPO)!r}), s;"
        "assert importlib.util.find_spec('integrations') is None;"
        "import transformers.activations; print(is_kernels_available())"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=cwd)
    assert r.returncode == 0, r.stderr
    has_hf_kernels = subprocess.run([sys.executable, "-c", "import importlib.metadata as m; m.version('kernels')"],
                                    capture_output=True, cwd="/").returncode == 0
    if not has_hf_kernels:  # with it installed, transformers decides by its version; without it, never because of us
        assert r.stdout.strip() == "False"


def test_transformers_registration_is_ours():
    from transformers.quantizers import auto

    import quantize  # noqa: F401
    from quantize.integrations.transformers.config import AutoRoundConfig
    from quantize.integrations.transformers.quantizer import AutoRoundQuantizer

    assert auto.AUTO_QUANTIZER_MAPPING["auto-round"] is AutoRoundQuantizer
    assert auto.AUTO_QUANTIZATION_CONFIG_MAPPING["auto-round"] is AutoRoundConfig
