"""Human-readable output: the console tables and report.md (same tables, plus the run's context)."""

from __future__ import annotations

from typing import Any

from bench.systems import BASELINE


def _f(v: float | None, fmt: str = "{:.1f}") -> str:
    return "-" if v is None else fmt.format(v)


def _ratio(v: float | None) -> str:
    return "" if v is None else f" ({v:.2f}x)"


def _spread(s: dict[str, Any], b: str) -> str:
    lo_hi = (s.get("throughput_qps_range") or {}).get(b)
    med = s["throughput_qps"].get(b)
    if not lo_hi or not med or lo_hi[0] == lo_hi[1]:
        return ""
    return f" ±{100 * (lo_hi[1] - lo_hi[0]) / 2 / med:.0f}%"


def speed_rows(results: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Throughput by batch size (± half the min-max spread over repeats) and latency at batch 1, with ratios."""
    bss = [str(b) for b in results["settings"]["batch_sizes"]]
    head = ["system", *[f"q/s @{b}" for b in bss], "p50 ms", "p90 ms", "p99 ms"]
    rows = []
    for s in results["systems"]:
        if not s["available"]:
            continue
        r = s.get("ratios") or {}
        thr = [_f(s["throughput_qps"].get(b)) + _spread(s, b) + _ratio((r.get("throughput_qps") or {}).get(b)) for b in bss]
        lat = s.get("latency_ms") or {}
        rows.append([s["name"], *thr, _f(lat.get("p50"), "{:.2f}") + _ratio(r.get("latency_p50")),
                     _f(lat.get("p90"), "{:.2f}"), _f(lat.get("p99"), "{:.2f}")])
    return head, rows


def spread_rows(results: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Min-max over the repeats of every median figure: throughput per batch size and p50 latency."""
    bss = [str(b) for b in results["settings"]["batch_sizes"]]
    head = ["system", *[f"q/s @{b} min-max" for b in bss], "p50 ms min-max"]
    rows = []
    for s in results["systems"]:
        if not s["available"]:
            continue
        rng = s.get("throughput_qps_range") or {}
        lat = s.get("latency_p50_ms_range")
        rows.append([s["name"], *[f"{rng[b][0]:.1f}-{rng[b][1]:.1f}" if b in rng else "-" for b in bss],
                     f"{lat[0]:.2f}-{lat[1]:.2f}" if lat else "-"])
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


def accuracy_rows(results: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """EM / F1, agreement with the baseline's batch-1 answers, and answers changed against the system's own
    batch-1 answers, side by side for every batch size; CHANGES marks a system whose answers depend on the batch."""
    bss = [str(b) for b in results["settings"]["batch_sizes"]]
    head = ["system", *[f"EM/F1 @{b}" for b in bss], *[f"agree @{b}" for b in bss], *[f"changed @{b}" for b in bss[1:]],
            "by batch"]
    rows = []
    for s in results["systems"]:
        if not s["available"]:
            continue
        acc = s.get("accuracy_by_batch_size") or {}
        agree = s.get("agreement_by_batch_size") or {}
        flag = {True: "CHANGES", False: "same", None: "-"}[s.get("answers_depend_on_batch_size")]
        rows.append([s["name"], *[f"{acc[b]['exact_match']:.2f}/{acc[b]['f1']:.2f}" if b in acc else "-" for b in bss],
                     *[_f(None if agree.get(b) is None else 100 * agree[b], "{:.1f}%") for b in bss],
                     *[_f(None if b not in acc else 100 * acc[b]["changed_vs_batch_1"], "{:.1f}%") for b in bss[1:]], flag])
    return head, rows


def peak_rows(results: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Model-only throughput (tokens/s in the model stage) and its share of this precision's peak, per batch size."""
    bss = [str(b) for b in results["settings"]["batch_sizes"]]
    head = ["system", "prec", "ISA", *[f"model tok/s @{b}" for b in bss], *[f"% of peak @{b}" for b in bss]]
    rows = []
    for s in results["systems"]:
        if not s["available"]:
            continue
        mt = s.get("model_throughput") or {}
        rows.append([s["name"], str(s["precision"]), s.get("isa") or "-",
                     *[_f((mt.get(b) or {}).get("tokens_per_s"), "{:.0f}") for b in bss],
                     *[_f(None if (mt.get(b) or {}).get("share_of_peak") is None else 100 * mt[b]["share_of_peak"], "{:.1f}")
                       for b in bss]])
    return head, rows


def _machine_lines(results: dict[str, Any]) -> list[str]:
    m = results["machine"]
    feats = m.get("isa_features")
    out = [f"CPU: {m['cpu_model']}, {m['physical_cores']} physical cores ({m['logical_cpus']} logical)"
           + (f", GPU {'; '.join(m['gpus'])}" if m["gpus"] else ", no GPU"),
           "ISA: " + (", ".join(f"{k} {'yes' if v else 'no'}" for k, v in feats.items()) if feats else "not reported by the OS")]
    peaks = results.get("peaks") or {}
    parts = []
    for kind in ("int8", "fp32"):
        p = peaks.get(kind) or {}
        parts.append(f"{kind} {p['ops_per_s'] / 1e12:.2f} Tops/s ({p['isa']})" if "ops_per_s" in p else f"{kind} not measured: {p.get('reason', '-')}")
    if peaks:
        out.append(f"peak on {peaks['threads']} threads (multiply-add loop, 1 MAC = 2 ops, per CPU-second each thread got): "
                   + ", ".join(parts))
    if feats and feats.get("AMX-INT8"):
        out.append("this CPU has AMX, which the peak loop does not use: a system running int8 on AMX can pass 100 % of the int8 peak")
    w = results.get("model_work") or {}
    if "ops" in w:
        out.append(f"model work per pass: {w['windows']} windows, {w['tokens']} tokens, {w['ops'] / 1e9:.1f} Gops "
                   f"({w['ops_per_token'] / 1e6:.2f} Mops per token; {w['shape']['layers']} layers, hidden {w['shape']['hidden']}, "
                   f"feed-forward {w['shape']['ffn']})")
    elif w:
        out.append(f"model work not counted: {w.get('reason')}")
    return out


def _run_time(results: dict[str, Any]) -> str:
    d = results["duration_s"]
    ph = results.get("phases_s") or {}
    return (f"run time {int(d // 60)} min {d % 60:.0f} s" +
            (f" (preparation {ph['prepare']:.0f} s, peaks {ph['peaks']:.0f} s, loads + warm-up + measurement {ph['measure']:.0f} s)"
             if ph else ""))


def _batch_dependent(results: dict[str, Any]) -> list[str]:
    return [s["name"] for s in results["systems"] if s["available"] and s.get("answers_depend_on_batch_size")]


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
    parts = [
        f"SpanRT bench: {results['model']['label']}",
        *_machine_lines(results),
        _settings_line(results),
        _run_time(results),
        f"ratios (in parentheses) are against {BASELINE}; q/s: questions per second in calls of that many questions, "
        "± half the min-max spread over the repeats",
        "",
        _text_table(*speed_rows(results)),
        "",
        _text_table(*cost_rows(results)),
        "",
        "accuracy by batch size (agree: same answer text as the baseline at batch 1; changed: answer spans that differ "
        "from the system's own at batch 1):",
        _text_table(*accuracy_rows(results)),
        "",
        "model-only throughput and share of this machine's peak (int8 systems against the int8 peak, fp32 against fp32):",
        _text_table(*peak_rows(results)),
    ]
    if dep := _batch_dependent(results):
        parts += ["", "answers change with the batch size: " + ", ".join(dep)]
    if un := _unavailable(results):
        parts += ["", "not measured:", *[f"  {u}" for u in un]]
    if tg := _targets(results):
        parts += ["", "targets:", *[f"  {t}" for t in tg]]
    return "\n".join(parts)


def markdown(results: dict[str, Any], plots: list[str]) -> str:
    """report.md: the same tables with the machine, versions and settings."""
    v, g = results["versions"], results["git"]
    m = results["machine"]
    parts = [
        "# SpanRT bench report", "",
        f"- model: {results['model']['label']}",
        *[f"- {line}" for line in _machine_lines(results)],
        f"- OS: {m['os']}, Python {m['python']}; load average before/after: "
        f"{_f(m.get('load_average_before'), '{:.2f}')}/{_f(m.get('load_average_after'), '{:.2f}')}, CPU used by other "
        f"processes during the run: {_f(None if m.get('cpu_used_by_other_processes') is None else 100 * m['cpu_used_by_other_processes'], '{:.0f}')} %",
        f"- git: {g['commit']}{' (uncommitted changes)' if g.get('dirty') else ''}",
        "- versions: " + ", ".join(f"{k} {val}" for k, val in v.items() if val),
        f"- settings: {_settings_line(results)}",
        f"- command: `{results['command']}`; started {results['started_utc']}; {_run_time(results)}",
        "",
        "## Speed", "",
        f"Questions per second in calls of 1, 8, 32 ... questions (± half the min-max spread over the repeats; ratio "
        f"against `{BASELINE}`), and latency of one question at a time. Medians over the repeats; `-`: not run at "
        "that batch size (the slow peers answer at batch 1 and the largest batch only in the default run).", "",
        _md_table(*speed_rows(results)), "",
        "Spread: the lowest and highest figure over the repeats.", "",
        _md_table(*spread_rows(results)), "",
        "## Accuracy and cost", "",
        "EM/F1: official SQuAD scoring of the one-question-at-a-time answers; agree: answer text equal to the "
        "baseline's; import/load: library import and model load in a fresh process; cold: first question after load; "
        "peak RSS: the system's own process; shares: wall time in the system's tokenize / model / decode stages.", "",
        _md_table(*cost_rows(results)), "",
        "## Accuracy by batch size", "",
        "The same questions answered in calls of 1, 8, 32 ... questions (first repeat of each): EM/F1; agree: answer "
        "text equal to the baseline's at batch 1; changed: share of answer spans that differ from the system's own at "
        "batch 1. `CHANGES`: the system's answers depend on their batch mates (e.g. activation scales computed per call).", "",
        _md_table(*accuracy_rows(results)), "",
        "## Share of the machine", "",
        "Model-only throughput: real (unpadded) tokens per second spent in the system's model stage, and the "
        "operations of the encoder's matrix products (1 multiply-add = 2 operations) per second as a share of this "
        "CPU's measured peak of the system's precision (int8 or fp32; none for bf16). ISA: the code path the "
        "system's backend reports, where it reports one.", "",
        _md_table(*peak_rows(results)), "",
    ]
    if dep := _batch_dependent(results):
        parts += [f"Answers change with the batch size: {', '.join(dep)}.", ""]
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
