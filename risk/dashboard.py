"""The risk dashboard: one self-contained HTML page (no scripts, no external assets).

Per platform: the current level (the most severe open alert, GREEN when none), the gate, open
alerts by level, the open alerts, the reconciliation history, and indicator trends over the last
30 business days as inline SVG charts. Labels are in Chinese and English. Everything is read
from the engine's read model; nothing here writes.
"""

from __future__ import annotations

import datetime as dt
import html
from typing import Any, Final

from risk import store as rs
from risk.matrix import LEVELS, highest
from risk.rules import decode_state
from risk.ruleset import RULE_NAMES

TREND_DAYS: Final = 30
_COLOURS: Final = {
    "GREEN": "#2e7d32",
    "YELLOW": "#f9a825",
    "ORANGE": "#ef6c00",
    "RED": "#c62828",
}
_LEVEL_ZH: Final = {"GREEN": "正常", "YELLOW": "关注", "ORANGE": "警告", "RED": "严重"}
_GATE_ZH: Final = {"NORMAL": "正常", "RESTRICTED": "限制", "WIND_DOWN": "清退", "FROZEN": "冻结"}
_STATUS_ZH: Final = {"raised": "已发出", "acknowledged": "已确认", "closed": "已关闭"}
_TRENDS: Final = (
    ("custody_", "托管余额 Custody balance"),
    ("outflow_", "资金流出 Outflow"),
    ("inflow_", "资金流入 Inflow"),
    ("refusals", "拒绝指令 Refusals"),
    ("records", "记录数 Records"),
    ("lvt_tags", "大额交易标记 Large-value tags"),
)
_CSS: Final = """
body{font-family:system-ui,"PingFang SC","Microsoft YaHei",sans-serif;margin:1.5em;color:#222}
h1{font-size:1.4em}h2{font-size:1.2em;margin-top:1.6em}h3{font-size:1em}
table{border-collapse:collapse;margin:.5em 0;font-size:.9em}
td,th{border:1px solid #ccc;padding:.25em .5em;text-align:left;vertical-align:top}
th{background:#f3f3f3}.num{text-align:right;font-variant-numeric:tabular-nums}
.badge{display:inline-block;color:#fff;padding:.1em .6em;border-radius:.3em;font-weight:bold}
.charts{display:flex;flex-wrap:wrap;gap:1em}.chart{border:1px solid #ddd;padding:.4em}
.muted{color:#777;font-size:.85em}
"""


def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def _time(ms: int | None) -> str:
    if ms is None:
        return ""
    return dt.datetime.fromtimestamp(ms / 1000, tz=dt.UTC).strftime("%Y-%m-%d %H:%M UTC")


def _badge(level: str) -> str:
    colour = _COLOURS.get(level, "#555")
    return (
        f'<span class="badge level-{_e(level)}" style="background:{colour}">'
        f"{_e(_LEVEL_ZH.get(level, ''))} {_e(level)}</span>"
    )


def _state(db: rs.RiskDb, platform: str) -> tuple[str, int]:
    """(gate, last record time) as the engine last read them."""
    with db.reading() as cur:
        row = db.fetchone(
            cur, f"SELECT state FROM {db.t('risk_positions')} WHERE platform = {db.ph}", (platform,)
        )
    if row is None:
        return "NORMAL", 0
    state = decode_state(bytes(row[0]))
    return state.gate, state.last_ts


def sparkline(points: list[tuple[int, int]], title: str, width: int = 280, height: int = 80) -> str:
    """An inline SVG line chart of (day, value) points; integers only in, text coordinates out."""
    pad = 6
    if not points:
        body = f'<text x="{pad}" y="{height // 2}" font-size="11" fill="#777">—</text>'
    else:
        xs = [d for d, _ in points]
        ys = [v for _, v in points]
        x0, x1 = min(xs), max(xs)
        y0, y1 = min(0, min(ys)), max(ys)
        span_x = max(1, x1 - x0)
        span_y = max(1, y1 - y0)
        coords = " ".join(
            f"{pad + (d - x0) * (width - 2 * pad) // span_x},"
            f"{height - pad - (v - y0) * (height - 2 * pad) // span_y}"
            for d, v in points
        )
        body = (
            f'<polyline fill="none" stroke="#1565c0" stroke-width="2" points="{coords}"/>'
            f'<text x="{pad}" y="12" font-size="10" fill="#555">max {y1:,}</text>'
            f'<text x="{pad}" y="{height - 1}" font-size="10" fill="#555">last {ys[-1]:,}</text>'
        )
    return (
        f'<div class="chart"><div>{_e(title)}</div>'
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img" aria-label="{_e(title)}">'
        f'<rect width="{width}" height="{height}" fill="#fafafa"/>{body}</svg></div>'
    )


def platform_section(db: rs.RiskDb, platform: str) -> tuple[str, str]:
    """(current level, HTML section) of one platform."""
    counts = rs.open_counts(db, platform)
    current = highest(*counts) if counts else "GREEN"
    gate, last_ts = _state(db, platform)
    parts = [
        f'<section id="platform-{_e(platform)}"><h2>平台 Platform {_e(platform)}</h2>',
        "<table><tr><th>当前风险等级 Current level</th><th>准入状态 Gate</th>"
        "<th>已读到 Read up to</th></tr>",
        f"<tr><td>{_badge(current)}</td><td>{_e(_GATE_ZH.get(gate, ''))} {_e(gate)}</td>"
        f"<td>{_e(_time(last_ts) if last_ts else '')}</td></tr></table>",
        "<h3>未关闭预警 Open alerts by level</h3><table><tr>",
    ]
    parts += [f"<th>{_badge(level)}</th>" for level in reversed(LEVELS)]
    parts.append("</tr><tr>")
    parts += [f'<td class="num">{counts.get(level, 0)}</td>' for level in reversed(LEVELS)]
    parts.append("</tr></table>")
    open_alerts = rs.alerts(db, platform, open_only=True, limit=200)
    parts.append(
        "<h3>未关闭预警 Open alerts</h3><table><tr><th>等级 Level</th><th>规则 Rule</th>"
        "<th>对象 Subject</th><th>说明 Summary</th><th>状态 Status</th>"
        "<th>发出时间 Raised</th><th>编号 Alert id</th></tr>"
    )
    for a in open_alerts:
        parts.append(
            f"<tr><td>{_badge(a['level'])}</td>"
            f"<td>{_e(a['rule'])} {_e(RULE_NAMES.get(a['rule'], ''))}</td>"
            f"<td>{_e(a['subject'])}</td><td>{_e(a['summary'])}</td>"
            f"<td>{_e(_STATUS_ZH.get(a['status'], ''))} {_e(a['status'])}</td>"
            f"<td>{_e(_time(a['raised_ts']))}</td><td><code>{_e(a['alert_id'])}</code></td></tr>"
        )
    if not open_alerts:
        parts.append('<tr><td colspan="7">无 None</td></tr>')
    parts.append("</table>")
    recons = rs.reconciliations(db, platform, limit=30)
    parts.append(
        "<h3>对账记录 Reconciliation history</h3><table><tr><th>截至 As of</th>"
        "<th>币种 Currency</th><th>客户资金需求 Requirement</th><th>银行资源 Resource</th>"
        "<th>差额 Difference</th><th>未达项 Breaks</th><th>结果 Result</th></tr>"
    )
    for r in recons:
        parts.append(
            f"<tr><td>{_e(_time(r['as_of']))}</td><td>{_e(r['ccy'])}</td>"
            f'<td class="num">{r["requirement"]:,}</td><td class="num">{r["resource"]:,}</td>'
            f'<td class="num">{r["difference"]:,}</td><td class="num">{r["breaks"]}</td>'
            f"<td>{_e(r['result'])}</td></tr>"
        )
    if not recons:
        parts.append('<tr><td colspan="7">尚无对账 No reconciliation yet</td></tr>')
    parts.append("</table><h3>指标趋势 Indicator trends (minor units, counts)</h3>")
    since = (last_ts // 86_400_000) - TREND_DAYS if last_ts else 0
    series = rs.indicators(db, platform, since)
    parts.append('<div class="charts">')
    for prefix, label in _TRENDS:
        for name in sorted(n for n in series if n.startswith(prefix)):
            suffix = name[len(prefix) :]
            parts.append(sparkline(series[name], f"{label} {suffix}".strip()))
    alerts_series: dict[int, int] = {}
    for level in LEVELS:
        for day, value in series.get(f"alerts_{level}", []):
            alerts_series[day] = alerts_series.get(day, 0) + value
    parts.append(sparkline(sorted(alerts_series.items()), "新增预警 Alerts raised"))
    parts.append("</div></section>")
    return current, "".join(parts)


def render(db: rs.RiskDb, platforms: list[str], generated_ms: int) -> str:
    """The whole page for `platforms`."""
    sections = [platform_section(db, p) for p in platforms]
    summary = ["<table><tr><th>平台 Platform</th><th>当前风险等级 Current level</th></tr>"]
    for platform, (level, _) in zip(platforms, sections, strict=True):
        summary.append(
            f'<tr><td><a href="#platform-{_e(platform)}">{_e(platform)}</a></td>'
            f"<td>{_badge(level)}</td></tr>"
        )
    summary.append("</table>")
    return (
        '<!DOCTYPE html><html lang="zh-CN"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        "<title>风险预警 Risk dashboard</title>"
        f"<style>{_CSS}</style></head><body>"
        "<h1>资金存管风险预警 Custody risk early-warning dashboard</h1>"
        f'<p class="muted">生成时间 Generated {_e(_time(generated_ms))}. 等级 Levels: '
        + " ".join(_badge(level) for level in LEVELS)
        + "</p>"
        + "".join(summary)
        + "".join(section for _, section in sections)
        + "</body></html>"
    )
