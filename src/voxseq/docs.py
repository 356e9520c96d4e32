"""Generate ``docs/configuration.md`` from the config dataclasses, so the reference never drifts.

    python -m voxseq.docs > docs/configuration.md
"""

from __future__ import annotations

import dataclasses
import typing

from voxseq.config import to_dict


def _type_name(tp) -> str:
    text = str(tp).replace("typing.", "")
    return text.replace("<class '", "").replace("'>", "")


def _section(cls, prefix: str, lines: list[str]) -> None:
    hints = typing.get_type_hints(cls)
    defaults = to_dict(cls())
    nested = []
    lines += [f"### `{prefix or 'top level'}` ({cls.__name__})", ""]
    doc = (cls.__doc__ or "").strip()
    if doc and not doc.startswith(cls.__name__ + "("):
        lines += [doc.split("\n\n")[0].replace("\n", " "), ""]
    lines += ["| field | type | default |", "|---|---|---|"]
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            nested.append((tp, f"{prefix}.{f.name}" if prefix else f.name))
            lines.append(f"| `{f.name}` | section | see `{(prefix + '.') if prefix else ''}{f.name}` |")
            continue
        lines.append(f"| `{f.name}` | `{_type_name(tp)}` | `{defaults[f.name]!r}` |")
    lines.append("")
    for tp, name in nested:
        _section(tp, name, lines)


def configuration_reference() -> str:
    from voxseq.data.preprocess import Preprocess
    from voxseq.tasks.finetune_cls import ClsConfig
    from voxseq.tasks.finetune_seg import SegConfig
    from voxseq.tasks.pretrain_ar import ARPretrainConfig
    from voxseq.tasks.pretrain_vlp import VLPPretrainConfig

    lines = ["# Configuration reference", "",
             "Generated from the config dataclasses by `python -m voxseq.docs`; do not edit by hand.",
             "Every field can be set in a YAML config or on the command line as `key=value` (dotted for",
             "nested sections, e.g. `model.depth=4`, `data.preprocess.window=liver`).", "",
             "## `voxseq pretrain ar`", ""]
    _section(ARPretrainConfig, "", lines)
    for title, cls in (("voxseq pretrain vlp", VLPPretrainConfig), ("voxseq finetune seg", SegConfig),
                       ("voxseq finetune cls", ClsConfig)):
        lines += [f"## `{title}`", ""]
        _section(cls, "", lines)
    lines += ["## `voxseq prepare` (the `Preprocess` config, also `data.preprocess` above)", ""]
    _section(Preprocess, "preprocess", lines)
    return "\n".join(lines).rstrip() + "\n"


if __name__ == "__main__":
    print(configuration_reference(), end="")
