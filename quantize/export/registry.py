"""The formats a quantized model can be written in: a plain dict filled by the ``@exporter`` decorator.

An exporter is ``write(source, folder, option)``: it writes one format's files into ``folder`` (which
exists and is empty) or raises :class:`ExportError` naming the layer it cannot express and why.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from quantize.export.atomic import atomic_dir
from quantize.model import UserError
from quantize.requires import require


class ExportError(UserError):
    """The target format cannot hold this model as quantized; the message names the layer and the fix."""


@dataclass(frozen=True)
class Exporter:
    write: Callable
    options: tuple[str, ...] = ()  # allowed ``name:option`` values; empty: the format takes none
    summary: str = ""
    requires: tuple[str, str] | None = None  # (module, pip requirement) of an optional package it writes with
    # ``holds(scheme) -> None | why not``; None: integer weight-only schemes only (the formats before issue 14)
    holds: Callable | None = None
    streams: bool = False  # writes from deferred tensors (a streamed run: quantize.streaming)


EXPORTERS: dict[str, Exporter] = {}


def exporter(name: str, options: tuple[str, ...] = (), summary: str = "", requires: tuple[str, str] | None = None,
             holds: Callable | None = None, streams: bool = False):
    def register(write: Callable) -> Callable:
        EXPORTERS[name] = Exporter(write, options, summary, requires, holds, streams)
        return write

    return register


@dataclass(frozen=True)
class FormatSpec:
    name: str
    option: str | None = None

    @property
    def label(self) -> str:
        return f"{self.name}:{self.option}" if self.option else self.name

    @property
    def folder(self) -> str:
        return f"{self.name}-{self.option}" if self.option else self.name


def _known() -> str:
    return ", ".join(f"{n}:{{{','.join(e.options)}}}" if e.options else n for n, e in EXPORTERS.items())


def parse_formats(text: str) -> list[FormatSpec]:
    """``"auto_round,auto_gptq,gguf:q4_k_m"`` -> specs, every name and option checked, and every optional
    package a format needs imported now: a missing one fails before the model loads or tuning starts."""
    specs = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        name, _, option = part.partition(":")
        name, option = name.strip().lower().replace("-", "_"), option.strip().lower() or None
        if name not in EXPORTERS:
            raise UserError(f"unknown --format {name!r}: choose from {_known()}")
        allowed = EXPORTERS[name].options
        if allowed and option not in allowed:
            raise UserError(f"format {name} needs one of its types, e.g. {name}:{allowed[0]}; choose from {', '.join(allowed)}")
        if not allowed and option:
            raise UserError(f"format {name} takes no ':{option}' option")
        if EXPORTERS[name].requires:
            require(*EXPORTERS[name].requires, f"format {name}")
        spec = FormatSpec(name, option)
        if spec in specs:
            raise UserError(f"format {spec.label} is listed twice")
        specs.append(spec)
    if not specs:
        raise UserError(f"no format given: choose from {_known()}")
    return specs


def refusal(spec: FormatSpec, scheme) -> str | None:
    """Why format ``spec`` cannot hold layers of ``scheme`` (None: it can)."""
    holds = EXPORTERS[spec.name].holds
    if holds is not None:
        return holds(scheme)
    if scheme.integer_weight_only:
        return None
    return (f"format {spec.label} holds integer weight-only schemes (W2A16-W8A16), not {scheme.name}: "
            "use llm_compressor (or auto_round for MXFP4, MXFP8, NVFP4 and FP8_STATIC)")


def streams(spec: FormatSpec) -> bool:
    """Whether format ``spec`` is written from deferred tensors (a streamed run)."""
    return EXPORTERS[spec.name].streams


def check_streams(formats: list[FormatSpec]) -> None:
    """Refuse formats that need the whole model in memory, for a streamed run."""
    held = [f.label for f in formats if not streams(f)]
    if held:
        raise UserError(f"a streamed run (--stream) writes the auto_round format, not {', '.join(held)}: quantize to "
                        f"auto_round, then `python -m quantize convert CKPT --to {held[0]}`")


def check_formats(formats: list[FormatSpec], schemes) -> None:
    """Refuse, before any tuning, a format that cannot hold one of the run's schemes, saying why."""
    reasons = sorted({why for spec in formats for s in set(schemes) if (why := refusal(spec, s))})
    if reasons:
        raise ExportError("; ".join(reasons))


def export(source, formats: list[FormatSpec], output_dir: str | Path, overwrite: bool = False) -> list[Path]:
    """Write every format; one format fills ``output_dir``, several get a subfolder each. All of it
    appears at once or not at all (a format that refuses leaves nothing behind)."""
    out = Path(output_dir).expanduser().resolve()
    with atomic_dir(out, overwrite) as tmp:
        folders = []
        check_formats(formats, [w.scheme for w in source.layers.values()])
        for spec in formats:
            folder = tmp if len(formats) == 1 else tmp / spec.folder
            folder.mkdir(exist_ok=True)
            EXPORTERS[spec.name].write(source, folder, spec.option)
            folders.append(out if len(formats) == 1 else out / spec.folder)
    return folders
