"""The outputs of ``latentdiff eval``: ``metrics.json``, ``report.md``, grids and the FD-vs-CLIP plot.

    DIR/metrics.json         every number and every setting of the run
    DIR/report.md            the same as Markdown tables, with the images inline
    DIR/grid_<setting>.png   rows: the first prompts; columns: their images
    DIR/fd_vs_clip.png       FD against CLIP score across guidance scales, a line per sampler
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from PIL import Image

from ..checkpoints.io import atomic_path
from ..png import save_png
from .plot import Series, image_grid, line_plot

PLOT_NAME = "fd_vs_clip.png"


def grid_name(setting_key: str) -> str:
    return f"grid_{setting_key}.png"


def write_grid(out_dir: Path, setting: Any, rows: list[list[Any]]) -> str:
    """Save the grid of one setting (``setting`` has ``key``, ``sampler``, ``steps``, ``guidance``); return its file name."""
    title = f"{setting.sampler}, {setting.steps} steps, guidance {setting.guidance:g}"
    name = grid_name(setting.key)
    save_png(image_grid(rows, title=title), Path(out_dir) / name, title)
    return name


def _json_safe(value: Any) -> Any:
    """NaN / inf become None (JSON has no such numbers)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def fd_clip_plot(metrics: dict[str, Any]) -> Image.Image:
    """FD (y) against CLIP score (x), a line per ``sampler:steps`` through its guidance scales."""
    series: dict[str, Series] = {}
    for r in sorted(metrics["results"], key=lambda r: r["guidance"]):
        label = f"{r['sampler']}:{r['steps']}"
        s = series.setdefault(label, Series(label, [], [], []))
        s.x.append(float("nan") if r["clip_score"] is None else r["clip_score"])  # type: ignore[attr-defined]
        s.y.append(float("nan") if r["fd"] is None else r["fd"])  # type: ignore[attr-defined]
        s.labels.append(f"w={r['guidance']:g}")  # type: ignore[attr-defined]
    fd_name = metrics["fd_name"]
    return line_plot(list(series.values()), f"{fd_name} vs CLIP score across guidance scales",
                     "CLIP score (higher: more faithful)", f"{fd_name} (lower: more realistic)")


def _number(value: Any, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}" if math.isfinite(value) else "-"
    return str(value)


def _percent(value: Any) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def markdown_report(metrics: dict[str, Any]) -> str:
    """The run as Markdown: what was run, a results table, the judge's accuracies, the plot and the grids."""
    from ..world import ATTRIBUTES

    fd_name = metrics["fd_name"]
    ref = metrics["reference"]
    lines = [
        "# latentdiff evaluation",
        "",
        f"- model: `{metrics['model']}`",
        f"- prompts: `{metrics['prompts']}` ({metrics['n_prompts']} prompts x {metrics['images_per_prompt']} images"
        f" = {metrics['n_prompts'] * metrics['images_per_prompt']} images per setting), {metrics['width']}x{metrics['height']},"
        f" seeds {metrics['seed']}..{metrics['seed'] + metrics['n_prompts'] * metrics['images_per_prompt'] - 1}",
        f"- {fd_name}: features of `{metrics['features']['source']}` against the reference: {ref.get('source')}"
        + (f" ({ref['n_images']} images)" if ref.get("n_images") else ""),
        f"- CLIP score: mean of max(100 cos, 0) with `{metrics['clip_model']}`",
        f"- processes: {metrics['world_size']}",
        "",
        "## Results",
        "",
        f"| setting | sampler | steps | guidance | {fd_name} | CLIP score | caption accuracy | images/s |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in metrics["results"]:
        world = r.get("world") or {}
        lines.append(
            f"| {r['setting']} | {r['sampler']} | {r['steps']} | {r['guidance']:g} | {_number(r['fd'])} | "
            f"{_number(r['clip_score'])} | {_percent(world.get('caption'))} | {_number(r.get('images_per_second'), 2)} |"
        )
    if any(r.get("world") for r in metrics["results"]):
        lines += [
            "",
            "## Shapes World judge",
            "",
            "Accuracy per attribute over the images whose prompt names it; caption: every named attribute right.",
            "",
            "| setting | objects | n | caption | " + " | ".join(ATTRIBUTES) + " |",
            "|---|---|---:|---:|" + "---:|" * len(ATTRIBUTES),
        ]
        for r in metrics["results"]:
            groups = [("all", r["world"])] + list((r.get("world_by_objects") or {}).items())
            for name, rep in groups:
                lines.append(f"| {r['setting']} | {name} | {rep['n']} | {_percent(rep['caption'])} | "
                             + " | ".join(_percent(rep.get(a)) for a in ATTRIBUTES) + " |")
    lines += ["", f"## {fd_name} vs CLIP score", "", f"![{fd_name} vs CLIP score]({PLOT_NAME})", "", "## Grids", ""]
    if metrics.get("grid_prompts"):
        layout = "Columns" if metrics["images_per_prompt"] == 1 else "Rows"
        lines.append(f"{layout} (prompts): " + "; ".join(f"{i + 1}. {p}" for i, p in enumerate(metrics["grid_prompts"])))
        lines.append("")
    for r in metrics["results"]:
        lines += [f"### {r['setting']}", "", f"![{r['setting']}]({r['grid']})", ""]
    return "\n".join(lines)


def write_outputs(out_dir: str | Path, metrics: dict[str, Any]) -> dict[str, Path]:
    """Write ``metrics.json``, ``report.md`` and ``fd_vs_clip.png`` (the grids are written as they are made)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"metrics": out_dir / "metrics.json", "report": out_dir / "report.md", "plot": out_dir / PLOT_NAME}
    safe = _json_safe(metrics)
    with atomic_path(paths["metrics"]) as tmp:
        tmp.write_text(json.dumps(safe, indent=2) + "\n", encoding="utf-8")
    with atomic_path(paths["report"]) as tmp:
        tmp.write_text(markdown_report(safe) + "\n", encoding="utf-8")
    save_png(fd_clip_plot(safe), paths["plot"], f"{metrics['fd_name']} vs CLIP score")
    return paths
