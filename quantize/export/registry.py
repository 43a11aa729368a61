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


EXPORTERS: dict[str, Exporter] = {}


def exporter(name: str, options: tuple[str, ...] = (), summary: str = "", requires: tuple[str, str] | None = None):
    def register(write: Callable) -> Callable:
        EXPORTERS[name] = Exporter(write, options, summary, requires)
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


def export(source, formats: list[FormatSpec], output_dir: str | Path, overwrite: bool = False) -> list[Path]:
    """Write every format; one format fills ``output_dir``, several get a subfolder each. All of it
    appears at once or not at all (a format that refuses leaves nothing behind)."""
    out = Path(output_dir).expanduser().resolve()
    with atomic_dir(out, overwrite) as tmp:
        folders = []
        for spec in formats:
            folder = tmp if len(formats) == 1 else tmp / spec.folder
            folder.mkdir(exist_ok=True)
            EXPORTERS[spec.name].write(source, folder, spec.option)
            folders.append(out if len(formats) == 1 else out / spec.folder)
    return folders
