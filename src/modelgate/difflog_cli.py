"""`modelgate difflog summarize|show|export`: the diff log (modelgate.difflog) for people and
for other tools. Imports numpy only when a command runs, so `modelgate --help` stays quick.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import sys
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from typing import IO, TYPE_CHECKING, Any

from modelgate.diff import Verdict

if TYPE_CHECKING:
    import numpy as np

    from modelgate.difflog import DiffLogNames

__all__ = ["configure_parser", "main", "summarize"]

_VERDICTS = tuple(verdict.value for verdict in Verdict)  # in code order
# Both sides answered without a server error: the pairs an agreement rate is about.
_COMPARED = ("equal", "within_tolerance", "differs", "not_json")
_QUANTILES = (50, 90, 99)


def _quantiles(values: np.ndarray) -> dict[str, float | None]:
    import numpy as np

    values = values[np.isfinite(values)]
    if not len(values):
        return {f"p{q}": None for q in _QUANTILES}
    found = np.percentile(values, _QUANTILES)
    return {f"p{q}": float(v) for q, v in zip(_QUANTILES, found, strict=True)}


def summarize(records: np.ndarray, names: DiffLogNames, top: int = 10) -> dict[str, Any]:
    """Counts, agreement with its Wilson 95% interval and latency quantiles per (route,
    shadow), and the most frequently differing fields from the sampled payloads."""
    import numpy as np

    from modelgate.difflog import FLAG_ARGMAX_CHANGED, FLAG_VECTORS, iter_payloads
    from modelgate.stats import wilson_interval

    pairs = []
    keys = records["route_id"].astype(np.int64) << 8 | records["shadow_id"]
    for key in np.unique(keys).tolist():
        group = records[keys == key]
        counts = np.bincount(group["verdict"], minlength=len(_VERDICTS))
        by_verdict = {v: int(counts[i]) for i, v in enumerate(_VERDICTS) if i < len(counts)}
        compared = sum(by_verdict[v] for v in _COMPARED)
        agreed = by_verdict["equal"] + by_verdict["within_tolerance"]
        low, high = wilson_interval(agreed, compared)
        # Pairs with identical bodies are not parsed, so their vectors are not flagged: the
        # argmax agreement is over every pair whose bodies were compared, shown when any
        # pair had probability vectors at all.
        has_vectors = bool((group["flags"] & FLAG_VECTORS).any())
        bodies = compared - by_verdict["not_json"]
        argmax_changed = int(((group["flags"] & FLAG_ARGMAX_CHANGED) != 0).sum())
        primary = group["primary_ms"].astype(np.float64)
        shadow = group["shadow_ms"].astype(np.float64)
        pairs.append(
            {
                "route": names.routes[key >> 8],
                "shadow": names.shadows[key & 255],
                "records": len(group),
                "verdicts": by_verdict,
                "compared": compared,
                "agreement": agreed / compared if compared else None,
                "agreement_ci95": None if not compared else [low, high],
                "argmax_agreement": 1 - argmax_changed / bodies if has_vectors else None,
                "latency_ms": {
                    "primary": _quantiles(primary),
                    "shadow": _quantiles(shadow),
                    "shadow_minus_primary": _quantiles(shadow - primary),
                },
            }
        )
    fields: Counter[tuple[str, str, str, str]] = Counter()
    sampled = 0
    for payload in iter_payloads(names):
        sampled += 1
        for difference in payload.get("differences", ()):
            key4 = (payload["route"], payload["shadow"], difference["pointer"], difference["kind"])
            fields[key4] += 1
    return {
        "files": [str(segment.path) for segment in names.segments],
        "records": len(records),
        "first_ns": int(records["ts_ns"].min()) if len(records) else None,
        "last_ns": int(records["ts_ns"].max()) if len(records) else None,
        "pairs": pairs,
        "payloads": sampled,
        "fields": [
            {"route": r, "shadow": s, "pointer": p, "kind": k, "count": n}
            for (r, s, p, k), n in fields.most_common(top)
        ],
    }


def _iso(ns: int | None) -> str:
    if ns is None:
        return "-"
    seconds, rest = divmod(ns, 10**9)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{rest // 10**6:03d}Z"


def _table(rows: list[list[str]], out: IO[str], left: int = 2) -> None:
    """Columns padded to their widest cell: the first `left` flush left, numbers right."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        cells = [
            c.ljust(w) if i < left else c.rjust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        ]
        print("  ".join(cells).rstrip(), file=out)


def _pct(value: float | None) -> str:
    return "-" if value is None or math.isnan(value) else f"{100 * value:.2f}%"


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _print_summary(summary: dict[str, Any], path: str, out: IO[str]) -> None:
    files = len(summary["files"])
    print(
        f"diff log {path}: {files} file{'s' if files != 1 else ''}, {summary['records']} records,"
        f" {_iso(summary['first_ns'])} .. {_iso(summary['last_ns'])}",
        file=out,
    )
    if not summary["pairs"]:
        return
    print(
        "\nverdicts (agreement = equal + within_tolerance over compared pairs; 95% Wilson CI)",
        file=out,
    )
    rows = [["route", "shadow", "records", *_VERDICTS, "agreement", "95% CI", "argmax agrees"]]
    for pair in summary["pairs"]:
        ci = pair["agreement_ci95"]
        rows.append(
            [
                pair["route"],
                pair["shadow"],
                str(pair["records"]),
                *(str(pair["verdicts"][v]) for v in _VERDICTS),
                _pct(pair["agreement"]),
                "-" if ci is None else f"[{_pct(ci[0])}, {_pct(ci[1])}]",
                _pct(pair["argmax_agreement"]),
            ]
        )
    _table(rows, out)
    print("\nlatency (ms)", file=out)
    rows = [["route", "shadow", "", *(f"p{q}" for q in _QUANTILES)]]
    for pair in summary["pairs"]:
        for side, label in (
            ("primary", "primary"),
            ("shadow", "shadow"),
            ("shadow_minus_primary", "shadow - primary"),
        ):
            q = pair["latency_ms"][side]
            rows.append(
                [pair["route"], pair["shadow"], label, *(_ms(q[f"p{n}"]) for n in _QUANTILES)]
            )
    _table(rows, out, left=3)
    if summary["fields"]:
        print(
            f"\nmost frequently differing fields (in {summary['payloads']} sampled payloads)",
            file=out,
        )
        rows = [["route", "shadow", "pointer", "kind", "count"]]
        rows += [
            [f["route"], f["shadow"], f["pointer"], f["kind"], str(f["count"])]
            for f in summary["fields"]
        ]
        _table(rows, out, left=4)


def _request_id(record: Any) -> str:
    from modelgate.difflog import FLAG_REQUEST_ID_CUT

    rid = bytes(record["request_id"]).decode("utf-8", "replace")
    return ("..." + rid) if record["flags"] & FLAG_REQUEST_ID_CUT else rid


def _json(value: Any) -> str:
    import orjson

    return orjson.dumps(value).decode()


def _show(records: np.ndarray, names: DiffLogNames, ns: argparse.Namespace, out: IO[str]) -> None:
    import numpy as np

    from modelgate.difflog import read_payload

    mask = np.ones(len(records), dtype=bool)
    if ns.verdict != "all":
        mask &= records["verdict"] == _VERDICTS.index(ns.verdict)
    for option, table, column in (
        (ns.route, names.routes, "route_id"),
        (ns.shadow, names.shadows, "shadow_id"),
    ):
        if option is not None:
            mask &= np.isin(records[column], [i for i, name in enumerate(table) if name == option])
    rows = np.flatnonzero(mask)
    print(
        f"{len(rows)} records with verdict {ns.verdict}; showing {min(len(rows), ns.limit)}",
        file=out,
    )
    for row in rows[: ns.limit].tolist():
        record = records[row]
        print(
            f"\n--- {_request_id(record)}  {_iso(int(record['ts_ns']))}  "
            f"{names.routes[record['route_id']]} -> {names.shadows[record['shadow_id']]}"
            f"  [{names.variants[record['variant_id']] or 'no experiment'}]",
            file=out,
        )
        print(
            f"verdict {names.verdicts[record['verdict']]}, {record['n_diff']} differing; status "
            f"{record['primary_status']} vs {record['shadow_status']}; latency "
            f"{record['primary_ms']:.2f} vs {record['shadow_ms']:.2f} ms; "
            f"max |diff| {record['max_abs_diff']:.6g}",
            file=out,
        )
        payload = read_payload(names, row, int(record["payload_offset"]))
        if payload is None:
            print(
                "(no payload kept for this record: sampled out, or not kept for its verdict)",
                file=out,
            )
            continue
        if payload.get("request_id"):
            print(f"request id {payload['request_id']}", file=out)
        if payload.get("detail"):
            print(f"detail: {payload['detail']}", file=out)
        for d in payload.get("differences", ()):
            where, kind = d["pointer"] or "(root)", d["kind"]
            print(f"  {where}  {kind}  {_json(d['primary'])} -> {_json(d['shadow'])}", file=out)
        if payload["n_diff"] > len(payload.get("differences", ())):
            print(f"  ... {payload['n_diff'] - len(payload['differences'])} more", file=out)
        for label, key in (
            ("request", "request"),
            ("primary", "primary"),
            ("shadow", "shadow_answer"),
        ):
            part = payload.get(key)
            if part is not None:
                cut = " (truncated)" if part.get("truncated") else ""
                print(f"{label}{cut}: {part.get('body', '')}", file=out)


def _export_rows(records: np.ndarray, names: DiffLogNames) -> Iterator[dict[str, Any]]:
    from modelgate.difflog import NO_PAYLOAD

    columns = {name: records[name].tolist() for name in records.dtype.names or ()}
    for name in ("primary_ms", "shadow_ms", "max_abs_diff"):
        # float32 printed with its own precision (7 digits), not float64's; NaN is "none"
        columns[name] = [None if v != v else float(f"{v:.7g}") for v in columns[name]]
    columns["payload_offset"] = [None if v == NO_PAYLOAD else v for v in columns["payload_offset"]]
    for values in zip(*columns.values(), strict=True):
        row = dict(zip(columns, values, strict=True))
        row["request_id"] = row["request_id"].decode("utf-8", "replace")
        row["time"] = _iso(row["ts_ns"])
        row["route"] = names.routes[row.pop("route_id")]
        row["variant"] = names.variants[row.pop("variant_id")]
        row["shadow"] = names.shadows[row.pop("shadow_id")]
        row["verdict"] = names.verdicts[row["verdict"]]
        yield row


def _export(records: np.ndarray, names: DiffLogNames, fmt: str, out: IO[str]) -> None:
    rows = _export_rows(records, names)
    if fmt == "jsonl":
        for row in rows:
            out.write(_json(row) + "\n")
        return
    first = next(rows, None)
    if first is None:
        return
    writer = csv.DictWriter(out, fieldnames=list(first), lineterminator="\n")
    writer.writeheader()
    writer.writerow(first)
    writer.writerows(rows)  # None is written as an empty cell


def _run(ns: argparse.Namespace) -> int:
    from modelgate.difflog import DiffLogError, read_difflog

    try:
        records, names = read_difflog(ns.path)
    except DiffLogError as exc:
        print(f"modelgate difflog: error: {exc}", file=sys.stderr)
        return 1
    output = getattr(ns, "output", None)
    try:
        out = open(output, "w", encoding="utf-8", newline="") if output else sys.stdout
    except OSError as exc:
        print(f"modelgate difflog: error: {output}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    try:
        if ns.action == "summarize":
            summary = summarize(records, names, top=ns.top)
            if ns.json:
                out.write(_json(summary) + "\n")
            else:
                _print_summary(summary, ns.path, out)
        elif ns.action == "show":
            _show(records, names, ns, out)
        else:
            _export(records, names, ns.format, out)
    except BrokenPipeError:  # `| head` closed the pipe: not an error of ours
        # Python would report the pipe again when it flushes stdout at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    finally:
        if out is not sys.stdout:
            out.close()
    return 0


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return int(text)


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Adds the summarize / show / export actions to `parser` (`modelgate difflog`)."""
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    path_help = "a diff log file (difflog-*.bin) or the log directory"
    summarize_p = actions.add_parser("summarize", help="verdicts, agreement, latency, top fields")
    summarize_p.add_argument("path", help=path_help)
    summarize_p.add_argument(
        "--json", action="store_true", help="one JSON object instead of tables"
    )
    summarize_p.add_argument(
        "--top", type=_positive, default=10, help="differing fields listed (10)"
    )
    show = actions.add_parser("show", help="example records with their differences and bodies")
    show.add_argument("path", help=path_help)
    show.add_argument("--verdict", choices=(*_VERDICTS, "all"), default="differs", help="(differs)")
    show.add_argument("--limit", type=_positive, default=10, help="records shown (10)")
    show.add_argument("--route", default=None, help="only this route")
    show.add_argument("--shadow", default=None, help="only this shadow")
    export = actions.add_parser("export", help="every record as JSON lines or CSV")
    export.add_argument("path", help=path_help)
    export.add_argument("--format", choices=("jsonl", "csv"), default="jsonl", help="(jsonl)")
    export.add_argument("--output", default=None, help="a file to write (default: stdout)")
    for action in (summarize_p, show, export):
        action.set_defaults(func=_run)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="modelgate difflog", description=__doc__)
    configure_parser(parser)
    ns = parser.parse_args(argv)
    code: int = ns.func(ns)
    return code


if __name__ == "__main__":
    sys.exit(main())
