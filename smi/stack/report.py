"""Text and JSON renderings of what the stack manager did or found."""

from __future__ import annotations

import json

from schemas.topics import ALL_TOPICS
from smi.stack.layout import Layout
from smi.stack.manager import ComponentState, StopResult, UpReport


def _row(state: ComponentState, last: str) -> str:
    pid = f"pid {state.pid}" if state.pid else "-"
    return f"{state.name:<12} {state.state:<9} {pid:<11} {state.address:<22} {last}"


def render_up(report: UpReport, layout: Layout) -> str:
    failed = [c for c in report.components if not c.answers]
    lines = [_row(c, "FAILED (see below)" if c in failed else c.note) for c in report.components]
    for c in failed:
        lines += ["", f"{c.name}: FAILED: {c.note}"]
    if report.topics_error:
        lines.append(f"topics: FAILED: {report.topics_error}")
    elif report.topics_created:
        lines.append(f"topics: created {len(report.topics_created)}: {', '.join(report.topics_created)}")
    elif report.topics_created is not None:
        lines.append(f"topics: all {len(ALL_TOPICS)} exist")
    if not report.ok:
        lines.append("stack is NOT up (see above); `smi stack down` stops what did start")
    elif report.started_any:
        lines.append(f"stack is up (logs and data in {layout.var_dir})")
    else:
        lines.append("stack already running: nothing to do")
    return "\n".join(lines)


def render_status(states: list[ComponentState]) -> str:
    return "\n".join(_row(s, "answers" if s.answers else "NOT ANSWERING") for s in states)


def status_json(states: list[ComponentState], layout: Layout) -> str:
    return json.dumps({
        "ok": all(s.answers for s in states),
        "var_dir": str(layout.var_dir),
        "components": {
            s.name: {"state": s.state, "pid": s.pid, "address": s.address, "answers": s.answers} for s in states
        },
    }, indent=2)


def render_down(results: list[StopResult]) -> str:
    if not results:
        return "nothing to stop: no pid files"
    return "\n".join(f"{r.name:<12} pid {r.pid or '?':<9} {r.outcome}" for r in results)
