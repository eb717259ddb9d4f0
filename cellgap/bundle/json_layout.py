"""The JSON layout of the generated configs: short dicts and lists on one line, so a config reads as a list
of options."""

from __future__ import annotations

import json

JSON_WIDTH = 120


def _json_lines(obj, indent: int, lead: str) -> list[str]:
    """``obj`` as JSON after ``lead``: on one line where it fits JSON_WIDTH; a dict or list of one-line items
    packed several to a line (as Python is wrapped); else one entry a line."""
    flat = json.dumps(obj, ensure_ascii=False)
    if not isinstance(obj, (dict, list)) or not obj or len(lead) + len(flat) + 1 <= JSON_WIDTH:
        return [lead + flat]
    is_dict = isinstance(obj, dict)
    entries = ([json.dumps(k, ensure_ascii=False) + ": " for k in obj] if is_dict else [""] * len(obj))
    values = list(obj.values()) if is_dict else obj
    flats = [e + json.dumps(v, ensure_ascii=False) for e, v in zip(entries, values)]
    pad = " " * (len(lead) + 1)
    if all(not isinstance(v, (dict, list)) or len(pad) + len(f) + 2 <= JSON_WIDTH for v, f in zip(values, flats)):
        lines, line = [], lead + ("{" if is_dict else "[")
        for i, f in enumerate(flats):
            f += "," if i < len(flats) - 1 else ("}" if is_dict else "]")
            if len(line) + len(f) + 1 > JSON_WIDTH and line.strip() not in ("{", "["):
                lines.append(line.rstrip())
                line = pad
            line += f + " "
        return lines + [line.rstrip()]
    pad = " " * (indent + 2)
    lines = [lead + ("{" if is_dict else "[")]
    for i, (entry, value) in enumerate(zip(entries, values)):
        part = _json_lines(value, indent + 2, pad + entry)
        if i < len(values) - 1:
            part[-1] += ","
        lines += part
    return lines + [" " * indent + ("}" if is_dict else "]")]


def json_text(obj: dict) -> str:
    """Indented JSON whose short dicts and lists stay on one line (the configs read as a list of options)."""
    return "\n".join(_json_lines(obj, 0, "")) + "\n"
