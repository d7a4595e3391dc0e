"""A dependency-free SVG chart of the load-test table: one panel per figure, one bar per target
(direct, pglb, HAProxy), each panel scaled to its own largest value, the raw value printed at the
end of each bar and whether higher or lower is better next to the figure's name."""

from xml.sax.saxutils import escape

COLORS = {"direct": "#9aa0a6", "pglb": "#1a73e8", "haproxy": "#e8710a"}
LABELS = {"direct": "direct", "pglb": "pglb", "haproxy": "HAProxy"}


def _fmt(v, fmt):
    return "n/a" if v is None else format(v, fmt)


def render(rows, title, subtitle, path):
    """rows: list of dicts with label, unit, fmt, better ('higher'|'lower'), values {target: v}."""
    width, left, bar_h, gap, panel_gap = 980, 330, 13, 2, 14
    bar_max = width - left - 110
    targets = ["direct", "pglb", "haproxy"]
    y = 78
    parts = []
    for row in rows:
        present = [t for t in targets if row["values"].get(t) is not None]
        if not present:
            continue
        top = max(abs(row["values"][t]) for t in present) or 1.0
        panel_h = len(present) * (bar_h + gap)
        arrow = "\u2191 higher is better" if row["better"] == "higher" else "\u2193 lower is better"
        parts.append(
            f'<text x="{left - 10}" y="{y + panel_h / 2 - 3:.1f}" text-anchor="end" class="l">'
            f'{escape(row["label"])}</text>'
            f'<text x="{left - 10}" y="{y + panel_h / 2 + 10:.1f}" text-anchor="end" class="s">'
            f'{escape(row["unit"])} \u00b7 {arrow}</text>'
        )
        for t in present:
            v = row["values"][t]
            w = max(1.0, bar_max * abs(v) / top)
            parts.append(
                f'<rect x="{left}" y="{y}" width="{w:.1f}" height="{bar_h}" fill="{COLORS[t]}"/>'
                f'<text x="{left + w + 4:.1f}" y="{y + bar_h - 3}" class="v">'
                f'{escape(_fmt(v, row["fmt"]))}</text>'
            )
            y += bar_h + gap
        y += panel_gap
        parts.append(
            f'<line x1="20" x2="{width - 20}" y1="{y - panel_gap / 2:.1f}" '
            f'y2="{y - panel_gap / 2:.1f}" stroke="#eee"/>'
        )
    legend = "".join(
        f'<rect x="{left + i * 120}" y="48" width="12" height="12" fill="{COLORS[t]}"/>'
        f'<text x="{left + i * 120 + 17}" y="58" class="l">{LABELS[t]}</text>'
        for i, t in enumerate(targets)
    )
    height = y + 10
    svg = (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" font-family="Helvetica, Arial, sans-serif">'
        "<style>.l{font-size:12px;fill:#202124}.s{font-size:10px;fill:#5f6368}"
        ".v{font-size:11px;fill:#202124}.t{font-size:16px;font-weight:bold;fill:#202124}</style>"
        f'<rect width="100%" height="100%" fill="white"/>'
        f'<text x="20" y="24" class="t">{escape(title)}</text>'
        f'<text x="20" y="40" class="s">{escape(subtitle)}</text>'
        f"{legend}{''.join(parts)}</svg>\n"
    )
    with open(path, "w") as f:
        f.write(svg)
