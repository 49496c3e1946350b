"""The bench report: ``report.json`` and ``report.html`` (a results table and, per device, a latency-vs-PSNR
plot with the Pareto front marked), plus a rich table for the terminal."""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

_COLUMNS = ("device", "file", "precision", "resolution", "threads", "load_ms", "first_ms", "median_ms", "p90_ms", "p99_ms", "min_ms", "fps", "peak_rss_mb", "psnr_vs_torch")


def pareto(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both latency (lower) and PSNR (higher)."""
    front = []
    for i, (lat, q) in enumerate(points):
        if not any((l2 <= lat and q2 >= q) and (l2 < lat or q2 > q) for j, (l2, q2) in enumerate(points) if j != i):
            front.append(i)
    return front


def _svg(rows: list[dict[str, Any]], target_fps: float) -> str:
    """A small scatter plot: median latency (x) against PSNR vs torch (y); the Pareto front in red."""
    points = [(r["median_ms"], min(r["psnr_vs_torch"], 80.0)) for r in rows]
    if not points:
        return "<p>no measured variant with a PSNR to plot</p>"
    w, h, pad = 420, 260, 48
    xmax = max(p[0] for p in points + [(1e3 / target_fps if target_fps else 0, 0)]) * 1.15 or 1
    ymin, ymax = min(p[1] for p in points) - 2, max(p[1] for p in points) + 2
    sx = lambda x: pad + x / xmax * (w - 2 * pad)  # noqa: E731
    sy = lambda y: h - pad - (y - ymin) / max(ymax - ymin, 1e-6) * (h - 2 * pad)  # noqa: E731
    front = set(pareto(points))
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="11">',
             f'<line x1="{pad}" y1="{h - pad}" x2="{w - pad}" y2="{h - pad}" stroke="black"/><line x1="{pad}" y1="{pad}" x2="{pad}" y2="{h - pad}" stroke="black"/>',
             f'<text x="{w / 2}" y="{h - 12}" text-anchor="middle">median latency (ms)</text>',
             f'<text x="12" y="{h / 2}" transform="rotate(-90 12 {h / 2})" text-anchor="middle">PSNR vs torch fp32 (dB)</text>']
    if target_fps:
        x = sx(1e3 / target_fps)
        parts.append(f'<line x1="{x:.1f}" y1="{pad}" x2="{x:.1f}" y2="{h - pad}" stroke="gray" stroke-dasharray="4"/><text x="{x + 3:.1f}" y="{pad + 10}">{target_fps:g} FPS</text>')
    for i, ((x, y), row) in enumerate(zip(points, rows)):
        colour = "crimson" if i in front else "steelblue"
        parts.append(f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="5" fill="{colour}"><title>{html.escape(row["file"])}: {x:.1f} ms, {y:.1f} dB</title></circle>')
        parts.append(f'<text x="{sx(x) + 7:.1f}" y="{sy(y) + 4:.1f}">{html.escape(row["precision"])}</text>')
    parts.append(f'<text x="{pad}" y="{pad - 8}">{xmax:.0f} ms full scale; red: Pareto front</text></svg>')
    return "".join(parts)


def _sweep_html(sweep: dict[str, Any]) -> str:
    c = sweep["choice"]
    trained = {(t["depth"], t["width"], t["long_side"]): t for t in sweep["trained"]}
    lines = [f"<p><b>chosen: {c['depth']} blocks x {c['width']} at {html.escape(str(c['resolution']))} px</b>, {c['fps']} FPS"
             f"{' (estimated)' if c['estimate'] else ''}, PSNR {c['psnr']} dB; {html.escape(c['how'])}</p>",
             "<table><tr><th>depth</th><th>width</th><th>resolution</th><th>GMAC</th><th>latency ms</th><th>FPS</th><th>meets target</th><th>trained PSNR</th></tr>"]
    for r in sweep["rows"]:
        t = trained.get((r["depth"], r["width"], r["long_side"]), {})
        lines.append(f"<tr><td>{r['depth']}</td><td>{r['width']}</td><td>{r['resolution'][0]}x{r['resolution'][1]}</td><td>{r['gmacs']}</td><td>{r['latency_ms']}"
                     f"{' (est.)' if r['estimate'] else ''}</td><td>{r['fps']}</td><td>{'yes' if r['meets_target'] else 'no'}</td><td>{t.get('psnr', '')}</td></tr>")
    return "".join(lines) + "</table>"


def write_report(folder: Path, devices: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Write report.json and report.html into ``folder``; return the report."""
    report = {"devices": devices}
    (folder / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    body = ["<!doctype html><meta charset='utf-8'><title>mg3d bench</title>",
            "<style>body{font-family:sans-serif;margin:2em}td,th{padding:2px 8px;text-align:right}th{background:#eee}.est{color:#a60}</style>",
            "<h1>mg3d bench</h1>"]
    for name, result in devices.items():
        body.append(f"<h2>{html.escape(name)}</h2><p>{html.escape(result.get('description', ''))}; {html.escape(result.get('mode', ''))}; {html.escape(str(result.get('status', '')))}</p>")
        if result.get("mode") == "estimate":
            body.append("<p class='est'>Roofline estimates from the profile's peak rates, not measurements.</p>")
        body.append("<table><tr>" + "".join(f"<th>{c}</th>" for c in _COLUMNS) + "<th>error</th></tr>")
        for row in result.get("rows", []):
            cells = "".join(f"<td>{html.escape(str(row.get(c, '')))}</td>" for c in _COLUMNS)
            body.append(f"<tr>{cells}<td>{html.escape(row.get('error', ''))}</td></tr>")
        body.append("</table>")
        plotted = [r for r in result.get("rows", []) if r.get("psnr_vs_torch") is not None and "median_ms" in r]
        if plotted or "sweep" not in result:
            body.append(_svg(plotted, float(result.get("target_fps") or 0)))
        if "sweep" in result:
            body.append(_sweep_html(result["sweep"]))
    (folder / "report.html").write_text("\n".join(body) + "\n")
    return report


def table(report: dict[str, Any]) -> Any:
    """A rich table of every row of every device."""
    from rich.table import Table

    t = Table(title="mg3d bench", header_style="bold")
    for col in ("device", "file", "precision", "load ms", "first ms", "median ms", "p90 ms", "FPS", "peak MB", "PSNR vs torch", "note"):
        t.add_column(col, justify="left" if col in ("device", "file", "precision", "note") else "right")
    fmt = lambda v: "-" if v is None else (f"{v:.4g}" if isinstance(v, float) else str(v))  # noqa: E731
    for result in report["devices"].values():
        for r in result.get("rows", []):
            note = r.get("error", "") or ("estimate (" + r.get("bound", "") + "-bound)" if r.get("estimate") else "")
            if r.get("numerics_only"):
                note = f"emulated: numerics only, {r.get('psnr_vs_x86')} dB vs x86 onnxruntime"
            t.add_row(r["device"], r["file"], r["precision"], fmt(r.get("load_ms")), fmt(r.get("first_ms")), fmt(r.get("median_ms")), fmt(r.get("p90_ms")),
                      fmt(r.get("fps")), fmt(r.get("peak_rss_mb", r.get("peak_gpu_mb"))), fmt(r.get("psnr_vs_torch")), note)
    return t


def sweep_table(device: str, sweep: dict[str, Any]) -> Any:
    """The sweep's grid for the terminal: latency, FPS, whether it meets the target, trained PSNR."""
    from rich.table import Table

    c = sweep["choice"]
    trained = {(t["depth"], t["width"], t["long_side"]): t for t in sweep["trained"]}
    t = Table(title=f"sweep on {device}: chose {c['depth']} blocks x {c['width']} at {c['resolution']} px ({c['fps']} FPS, PSNR {c['psnr']} dB)", header_style="bold")
    for col in ("depth", "width", "size", "ms", "FPS", "target", "PSNR"):
        t.add_column(col, justify="right")
    for r in sorted(sweep["rows"], key=lambda r: -r["fps"]):
        done = trained.get((r["depth"], r["width"], r["long_side"]), {})
        t.add_row(str(r["depth"]), str(r["width"]), f"{r['resolution'][0]}x{r['resolution'][1]}", f"{r['latency_ms']:.1f}" + ("*" if r["estimate"] else ""),
                  f"{r['fps']:.1f}", "yes" if r["meets_target"] else "no", f"{done['psnr']:.2f}" if done.get("psnr") is not None else "")
    return t
