"""Charts drawn on the server as inline SVG: no chart library, no JavaScript, nothing fetched, so the page works
offline and a chart can only show what the view handed it (private documents are filtered before). Every label is
HTML-escaped; numbers are formatted by the caller's `fmt`."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from markupsafe import Markup, escape

WIDTH, HEIGHT = 640, 200
PAD_LEFT, PAD_BOTTOM, PAD_TOP = 96, 28, 16
BAR_ROW = 22  # px per row of a horizontal bar chart


def _plain(value: float) -> str:
    return f"{value:,.0f}" if float(value).is_integer() else f"{value:,.3g}"


def bar_chart(labels: Sequence[str], values: Sequence[float], title: str,
              fmt: Callable[[float], str] = _plain) -> Markup:
    """Vertical bars, one per label (a time series); the y axis from 0 to the largest value."""
    top = max(values, default=0) or 1
    plot_w, plot_h = WIDTH - PAD_LEFT - 8, HEIGHT - PAD_BOTTOM - PAD_TOP
    step = plot_w / max(len(values), 1)
    parts = [f'<svg class="chart" viewBox="0 0 {WIDTH} {HEIGHT}" role="img" aria-label="{escape(title)}">',
             f"<title>{escape(title)}</title>",
             f'<line class="axis" x1="{PAD_LEFT}" y1="{PAD_TOP + plot_h}" x2="{WIDTH - 8}" y2="{PAD_TOP + plot_h}"/>',
             f'<text class="tick" x="{PAD_LEFT - 6}" y="{PAD_TOP + 4}" text-anchor="end">{escape(fmt(top))}</text>',
             f'<text class="tick" x="{PAD_LEFT - 6}" y="{PAD_TOP + plot_h}" text-anchor="end">0</text>']
    for i, (label, value) in enumerate(zip(labels, values, strict=True)):
        h = plot_h * value / top
        x = PAD_LEFT + i * step
        parts.append(f'<rect class="bar" x="{x + 1:.1f}" y="{PAD_TOP + plot_h - h:.1f}" width="{max(step - 2, 1):.1f}" '
                     f'height="{h:.1f}"><title>{escape(label)}: {escape(fmt(value))}</title></rect>')
        if i in (0, len(values) // 2, len(values) - 1):
            parts.append(f'<text class="tick" x="{x + step / 2:.1f}" y="{HEIGHT - 8}" text-anchor="middle">'
                         f"{escape(label)}</text>")
    parts.append("</svg>")
    return Markup("".join(parts))


def hbar_chart(items: Sequence[tuple[str, float]], title: str, fmt: Callable[[float], str] = _plain) -> Markup:
    """Horizontal bars, one row per (label, value): a ranking such as the top documents."""
    top = max((v for _, v in items), default=0) or 1
    label_w, height = 220, PAD_TOP + BAR_ROW * max(len(items), 1) + 8
    plot_w = WIDTH - label_w - 90
    parts = [f'<svg class="chart" viewBox="0 0 {WIDTH} {height}" role="img" aria-label="{escape(title)}">',
             f"<title>{escape(title)}</title>"]
    for i, (label, value) in enumerate(items):
        y = PAD_TOP + i * BAR_ROW
        short = label if len(label) <= 30 else label[:29] + "\u2026"
        parts.append(f'<text class="label" x="{label_w - 8}" y="{y + 14}" text-anchor="end">{escape(short)}</text>')
        parts.append(f'<rect class="bar" x="{label_w}" y="{y + 3}" width="{plot_w * value / top:.1f}" '
                     f'height="{BAR_ROW - 6}"><title>{escape(label)}: {escape(fmt(value))}</title></rect>')
        parts.append(f'<text class="tick" x="{label_w + plot_w * value / top + 6:.1f}" y="{y + 14}">'
                     f"{escape(fmt(value))}</text>")
    parts.append("</svg>")
    return Markup("".join(parts))
