"""Human-readable output: the console tables and report.md (same tables, plus the run's context)."""

from __future__ import annotations

from typing import Any

from bench.systems import BASELINE


def _f(v: float | None, fmt: str = "{:.1f}") -> str:
    return "-" if v is None else fmt.format(v)


def _ratio(v: float | None) -> str:
    return "" if v is None else f" ({v:.2f}x)"


def speed_rows(results: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Throughput by batch size and latency at batch 1, with ratios against the baseline."""
    bss = [str(b) for b in results["settings"]["batch_sizes"]]
    head = ["system", *[f"q/s @{b}" for b in bss], "p50 ms", "p90 ms", "p99 ms"]
    rows = []
    for s in results["systems"]:
        if not s["available"]:
            continue
        r = s.get("ratios") or {}
        thr = [_f(s["throughput_qps"].get(b)) + _ratio((r.get("throughput_qps") or {}).get(b)) for b in bss]
        lat = s.get("latency_ms") or {}
        rows.append([s["name"], *thr, _f(lat.get("p50"), "{:.2f}") + _ratio(r.get("latency_p50")),
                     _f(lat.get("p90"), "{:.2f}"), _f(lat.get("p99"), "{:.2f}")])
    return head, rows


def cost_rows(results: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Accuracy, agreement with the baseline, load/cold start, memory and stage shares."""
    big = str(max(results["settings"]["batch_sizes"]))
    head = ["system", "backend", "prec", "EM", "F1", "agree", "import s", "load s", "cold ms", "peak RSS MB",
            f"tok/model/dec/other @{big}"]
    rows = []
    for s in results["systems"]:
        if not s["available"]:
            continue
        sh = (s.get("time_shares") or {}).get(big)
        shares = "-" if not sh else "/".join(f"{100 * sh[k]:.0f}" for k in ("tokenize", "model", "decode", "other")) + " %"
        rows.append([s["name"], str(s["backend"]), str(s["precision"]), _f(s["exact_match"], "{:.2f}"), _f(s["f1"], "{:.2f}"),
                     _f(None if s.get("agreement") is None else 100 * s["agreement"], "{:.1f}%"),
                     _f(s["import_s"], "{:.2f}"), _f(s["load_s"], "{:.2f}"), _f(s["cold_start_ms"], "{:.0f}"),
                     _f(s["peak_rss_mb"], "{:.0f}"), shares])
    return head, rows


def _text_table(head: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(head)]
    line = "  ".join(h.ljust(w) for h, w in zip(head, widths, strict=True))
    out = [line, "  ".join("-" * w for w in widths)]
    out += ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))) for r in rows]
    return "\n".join(out)


def _md_table(head: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(head) + " |", "|" + "|".join("---" if i == 0 else "---:" for i in range(len(head))) + "|"]
    out += ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in rows]
    return "\n".join(out)


def _unavailable(results: dict[str, Any]) -> list[str]:
    return [f"{s['name']}: {s['status'].upper()}: {s.get('reason', '')}" for s in results["systems"] if not s["available"]]


def _targets(results: dict[str, Any]) -> list[str]:
    out = []
    for t in results.get("targets", []):
        mark = {True: "met", False: "NOT MET", None: "not measured"}[t["met"]]
        value = "-" if t["value"] is None else f"{t['value']:.3g}"
        out.append(f"{t['target']}: {value} (target {t['op']} {t['threshold']:g}) {mark}")
    return out


def _settings_line(results: dict[str, Any]) -> str:
    st = results["settings"]
    qa = ", ".join(f"{k}={v}" for k, v in st["qa"].items())
    return (f"{st['n_questions']} questions of {st['data']['file']} (SQuAD v{st['data']['version']}), threads={st['threads']}, "
            f"repeats={st['repeats']} (median), warm-up {st['warmup_calls']} calls per batch size; {qa}")


def console(results: dict[str, Any]) -> str:
    """The tables printed at the end of a run."""
    m = results["machine"]
    parts = [
        f"SpanRT bench: {results['model']['label']} on {m['cpu_model']} ({m['physical_cores']} cores"
        + (f", GPU {'; '.join(m['gpus'])}" if m["gpus"] else ", no GPU") + ")",
        _settings_line(results),
        f"ratios (in parentheses) are against {BASELINE}; q/s: questions per second in calls of that many questions",
        "",
        _text_table(*speed_rows(results)),
        "",
        _text_table(*cost_rows(results)),
    ]
    if un := _unavailable(results):
        parts += ["", "not measured:", *[f"  {u}" for u in un]]
    if tg := _targets(results):
        parts += ["", "targets:", *[f"  {t}" for t in tg]]
    return "\n".join(parts)


def markdown(results: dict[str, Any], plots: list[str]) -> str:
    """report.md: the same tables with the machine, versions and settings."""
    m, v, g = results["machine"], results["versions"], results["git"]
    parts = [
        "# SpanRT bench report", "",
        f"- model: {results['model']['label']}",
        f"- machine: {m['cpu_model']}, {m['physical_cores']} physical cores ({m['logical_cpus']} logical), "
        f"flags {' '.join(m['cpu_flags']) or '-'}, GPU: {'; '.join(m['gpus']) or 'none'}, {m['os']}, Python {m['python']}",
        f"- git: {g['commit']}{' (uncommitted changes)' if g.get('dirty') else ''}",
        "- versions: " + ", ".join(f"{k} {val}" for k, val in v.items() if val),
        f"- settings: {_settings_line(results)}",
        f"- command: `{results['command']}`; started {results['started_utc']}, {results['duration_s']:.0f} s",
        "",
        "## Speed", "",
        f"Questions per second in calls of 1, 8, 32 ... questions (ratio against `{BASELINE}`), "
        "and latency of one question at a time. Medians over the repeats.", "",
        _md_table(*speed_rows(results)), "",
        "## Accuracy and cost", "",
        "EM/F1: official SQuAD scoring of the one-question-at-a-time answers; agree: answer text equal to the "
        "baseline's; import/load: library import and model load in a fresh process; cold: first question after load; "
        "peak RSS: the system's own process; shares: wall time in the system's tokenize / model / decode stages.", "",
        _md_table(*cost_rows(results)), "",
    ]
    if un := _unavailable(results):
        parts += ["## Not measured", "", *[f"- {u}" for u in un], ""]
    if tg := _targets(results):
        parts += ["## Targets", "", *[f"- {t}" for t in tg], ""]
    notes = results.get("notes") or []
    if notes:
        parts += ["## Notes", "", *[f"- {n}" for n in notes], ""]
    if plots:
        parts += ["## Plots", "", *[f"![{p}]({p})" for p in plots], ""]
    return "\n".join(parts)
