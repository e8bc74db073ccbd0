"""Mutation testing of the modules where a silent bug costs users most (issue 15 §1). Not in CI: slow.

    python bench/mutation.py                 # every group, one after another
    python bench/mutation.py curate ingest   # some groups
    python bench/mutation.py --list          # the groups, their modules and tests

Each group runs mutmut (>=3.8) in its own folder mutants/<group>/ (git-ignored), with a generated
[tool.mutmut] that mutates only the group's modules and runs only the tests that exercise them, so a
run stays bounded. Results go to bench/results/mutation.json (per group: counts, every survivor's diff
and its disposition, a history of scores) and are rendered to bench/results/mutation.txt.

A survivor's disposition comes from bench/mutation_equivalent.toml (function + a piece of the mutated
line + why it cannot change behaviour). A survivor without one is listed as OPEN: kill it with a test,
or, if it truly cannot change behaviour, add it there with the reason.

Run it from the repo root with the tree's src/ first on the path: `make mutate` does that."""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
import tomllib
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "mutants"
RESULTS = ROOT / "bench" / "results"
EQUIVALENT = ROOT / "bench" / "mutation_equivalent.toml"
# a mutant that makes a test fail, hang past mutmut's timeout, or fail the type check is detected
DETECTED = {"killed", "timeout", "caught by type check"}


@dataclass(frozen=True)
class Group:
    modules: tuple[str, ...]  # files under src/ to mutate
    tests: tuple[str, ...]  # pytest selection that exercises them (files or node ids)


# the folder-level ingest tests share one large fixture (seconds per mutant) or read datasets: left out
_INGEST_SLOW = (
    "bad_input_refused every_file_is_accounted records_are_normalised cmyk_becomes 16_bit_grey "
    "palette_transparency alpha_is_composited animated_gif exif_orientation odd_names identical_files "
    "hf_hub saved_to_disk parquet materialize example_coco 1500_levels"
).split()

_REQUEST_SLOW = (
    "images_sent tpm_limiter rpm_limiter concurrency_limit 429_retry_after retry_after_ms stall ten_percent"
).split()

GROUPS: dict[str, Group] = {
    "curate": Group(("src/rmskit/curate/",), ("tests/test_curate.py", "tests/test_minhash.py")),
    "ingest": Group(
        ("src/rmskit/ingest/decode.py", "src/rmskit/ingest/base.py"),
        (
            "tests/test_mut_ingest.py",
            "tests/test_ingest.py",
            "tests/test_ingest_hostile.py",
            "-k",
            " and ".join(f"not {n}" for n in _INGEST_SLOW),
        ),
    ),
    "limits": Group(
        ("src/rmskit/models/limits.py",),
        (
            "tests/test_mut_limits.py",
            "tests/test_openai_backend.py",
            "-k",
            "bucket or limiter or retry or concurrency",
        ),
    ),
    # the shared request layer (retries, structured fallback). The HTTP tests that wait on real time
    # (Retry-After, stalls, rate limits) or load photos take seconds per mutant: left out; the scripted
    # wire of test_mut_request.py checks the same arithmetic exactly, on a fake clock.
    "request": Group(
        ("src/rmskit/models/remote.py", "src/rmskit/models/structured.py"),
        (
            "tests/test_mut_request.py",
            "tests/test_openai_backend.py",
            "-k",
            " and ".join(f"not {n}" for n in _REQUEST_SLOW),
        ),
    ),
    # the runner and its resume/target logic, with the stage registry beside it
    "runner": Group(
        ("src/rmskit/pipeline/runner.py", "src/rmskit/pipeline/registry.py", "src/rmskit/pipeline/finish.py"),
        (
            "tests/test_mut_runner.py",
            "tests/test_mut_runner2.py",
            "tests/test_build_pipeline.py",
            "tests/test_stage_resume.py",
            "tests/test_stage_registry.py",
            "tests/test_schema_parity.py",
            "tests/test_finish.py",
            "-k",
            "not encoded_once",  # real HTTP + photos: seconds per mutant; the rest of test_finish covers finish.py
        ),
    ),
    "export": Group(("src/rmskit/export/writer.py",), ("tests/test_mut_export.py", "tests/test_export.py")),
    "metrics": Group(
        ("src/rmskit/scoring/metrics.py", "src/rmskit/stats.py"),
        # the interval-coverage simulations take seconds per mutant: left out
        (
            "tests/test_mut_stats.py",
            "tests/test_mut_metrics.py",
            "tests/test_score_metrics.py",
            "tests/test_stats.py",
            "-k",
            "not covers_truth",
        ),
    ),
}


def _group_dir(name: str, group: Group) -> Path:
    """A fresh folder that looks like the repo to mutmut: src/ and tests/ linked, a pyproject.toml whose
    [tool.mutmut] names this group's modules and tests (the rest of the project's config kept)."""
    d = WORK / name
    shutil.rmtree(d, ignore_errors=True)  # fresh: cached verdicts would survive changed tests
    d.mkdir(parents=True)
    for sub in ("src", "tests"):
        (d / sub).symlink_to(ROOT / sub, target_is_directory=True)
    text = (ROOT / "pyproject.toml").read_text()
    if "[tool.mutmut]" in text:
        raise SystemExit("pyproject.toml has its own [tool.mutmut]; bench/mutation.py owns that config")
    cfg = {
        "source_paths": list(group.modules),
        "pytest_add_cli_args_test_selection": list(group.tests),
        "also_copy": ["src/rmskit/"],  # the unmutated rest of the package, so imports resolve
        "use_git_change_detection": False,  # the folder is a mirror, not a checkout
        # fork each mutant's test run from a process that has only collected the tests, not from the
        # one that ran them for coverage: that one's functools caches (schema_for, ...) would answer
        # for the mutated functions, and their mutants would survive without ever running
        "process_isolation": "forkserver",
        # a mutant that hangs (a retry loop that never ends) is detected after 5x the tests' own time
        # (mutmut's default 15x made each hang cost half a minute)
        "timeout_multiplier": 5.0,
    }
    lines = ["", "[tool.mutmut]", *(f"{k} = {json.dumps(v)}" for k, v in cfg.items())]
    (d / "pyproject.toml").write_text(text + "\n".join(lines) + "\n")
    return d


_COLLECT = """
import json
from mutmut.mutation.data import SourceFileMutationData
from mutmut.mutation.diff_apply import get_diff_for_mutant
from mutmut.stats import status_by_exit_code
from mutmut.utils.file_utils import walk_mutatable_files
out = []
for path in walk_mutatable_files():
    m = SourceFileMutationData(path=path)
    m.load()
    for key, code in m.exit_code_by_key.items():
        status = status_by_exit_code[code]
        diff = get_diff_for_mutant(key, path=path) if status not in ("killed", "timeout") else ""
        out.append({"name": key, "path": str(path), "status": status, "diff": diff})
print(json.dumps(out))
"""


def _env() -> dict[str, str]:
    # mutmut chdirs into mutants/; a relative 'src' then means the mutated copy (the venv's editable
    # install may point at another checkout)
    return {**os.environ, "PYTHONPATH": "src", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def _changed_lines(diff: str) -> tuple[list[str], list[str]]:
    body = [ln for ln in diff.splitlines() if not ln.startswith(("---", "+++", "@@"))]
    return [ln[1:].strip() for ln in body if ln.startswith("-")], [
        ln[1:].strip() for ln in body if ln.startswith("+")
    ]


def _function(name: str) -> str:
    return re.sub(r"__mutmut_\d+$", "", name)


def _equivalents() -> list[dict[str, str]]:
    return tomllib.loads(EQUIVALENT.read_text()).get("equivalent", []) if EQUIVALENT.exists() else []


def _matches(eq: dict[str, str], old: list[str], new: list[str]) -> bool:
    """`change`: a piece of a mutated line; `line`: the whole mutated line; `removed`: a piece of a
    deleted line, for mutants that only delete (an argument, a keyword)."""
    if "line" in eq:
        return eq["line"] in new
    if "removed" in eq:
        return not new and any(eq["removed"] in ln for ln in old)
    return any(eq["change"] in ln for ln in new)


def _disposition(mutant: dict[str, Any], equivalents: list[dict[str, str]]) -> str:
    old, new = _changed_lines(mutant["diff"])
    for eq in equivalents:
        if _function(mutant["name"]) == eq["function"] and _matches(eq, old, new):
            return "equivalent: " + eq["why"]
    return "OPEN: no test kills it and no reason is recorded"


def _collect(name: str, d: Path, err: str = "") -> list[dict[str, Any]]:
    got = subprocess.run(
        [sys.executable, "-c", _COLLECT], cwd=d, env=_env(), capture_output=True, text=True, check=False
    )
    if got.returncode != 0:
        raise SystemExit(f"[{name}] mutmut failed:\n{err[-3000:]}\n{got.stderr[-3000:]}")
    return json.loads(got.stdout)


def run_group(
    name: str, group: Group, timeout_s: float, max_children: int | None, *, retest: bool = False
) -> dict[str, Any]:
    """Run mutmut over the group in a fresh folder; `retest`: in the last run's folder, test again only
    the mutants that were not detected (after new tests: minutes instead of a full run)."""
    cmd = [sys.executable, "-m", "mutmut", "run"]
    if max_children:
        cmd += ["--max-children", str(max_children)]
    if retest:
        d = WORK / name
        if not (d / "mutants").is_dir():
            raise SystemExit(f"[{name}] --retest needs the folder of a full run: {d}/mutants")
        # checked and undetected; an unfinished run's unchecked mutants need a full run
        cmd += [m["name"] for m in _collect(name, d) if m["status"] not in {*DETECTED, "not checked"}]
    else:
        d = _group_dir(name, group)
    t0 = time.monotonic()
    print(f"[{name}] mutmut over {', '.join(group.modules)} with {', '.join(group.tests)}", flush=True)
    proc = subprocess.Popen(
        cmd, cwd=d, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    try:
        _out, err = proc.communicate(timeout=timeout_s)
        completed = proc.returncode == 0
    except subprocess.TimeoutExpired:
        proc.terminate()
        _out, err = proc.communicate()
        completed = False
    wall = time.monotonic() - t0
    mutants = _collect(name, d, err)
    equivalents = _equivalents()
    counts: dict[str, int] = {}
    for m in mutants:
        counts[m["status"]] = counts.get(m["status"], 0) + 1
    survivors = [
        {
            "name": m["name"],
            "status": m["status"],
            "diff": m["diff"],
            "disposition": _disposition(m, equivalents),
        }
        for m in mutants
        if m["status"] not in {*DETECTED, "not checked"}  # unchecked ones: counted, not listed
    ]
    total = len(mutants)
    equivalent = sum(
        s["disposition"].startswith("equivalent") for s in survivors if s["status"] == "survived"
    )
    return {
        "modules": list(group.modules),
        "tests": list(group.tests),
        "completed": completed,
        "wall_s": round(wall),
        "commit": _commit(),
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "total": total,
        "killed": sum(n for status, n in counts.items() if status in DETECTED),
        "counts": dict(sorted(counts.items())),
        "equivalent": equivalent,
        "survivors": survivors,
    }


def _commit() -> str:
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--", "src", "tests"], cwd=ROOT, capture_output=True, text=True
    )
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def _score(killed: int, total: int) -> str:
    return f"{killed}/{total} = {100 * killed / total:.1f}%" if total else "n/a"


def render(data: dict[str, Any]) -> str:
    out = [
        "Mutation testing (bench/mutation.py, `make mutate`; mutmut; not in CI). Regenerated from mutation.json.",
        "score = killed / all mutants (killed: a test failed or timed out); 'excl. equiv.' leaves out the",
        "survivors shown not to change behaviour. Every survivor is listed below with its disposition.",
        "",
        f"{'group':<11} {'killed':>6} {'surv.':>5} {'other':>5} {'total':>5}  {'score':>8}  {'excl. equiv.':>12}  run",
    ]
    for name, g in data["groups"].items():
        survived = len(g["survivors"])
        other = g["total"] - g["killed"] - survived
        excl = 100 * g["killed"] / (g["total"] - g["equivalent"]) if g["total"] > g["equivalent"] else 0.0
        score = 100 * g["killed"] / g["total"] if g["total"] else 0.0
        unchecked = g["counts"].get("not checked", 0)
        checked = g["total"] - unchecked
        flag = "" if g["completed"] else "  (INCOMPLETE: time limit)"
        if unchecked:
            flag += f"  ({unchecked} not checked; of the checked: {_score(g['killed'], checked)})"
        out.append(
            f"{name:<11} {g['killed']:>6} {survived:>5} {other:>5} {g['total']:>5}  {score:>7.1f}%  {excl:>11.1f}%"
            f"  {g['date']} @ {g['commit']}, {g['wall_s']} s{flag}"
        )
    for name in GROUPS:
        if name not in data["groups"]:
            out.append(f"{name:<11} not run yet ({' '.join(GROUPS[name].modules)})")
    for name, g in data["groups"].items():
        out += ["", f"== {name}: {', '.join(g['modules'])}", f"   tests: {' '.join(g['tests'])}"]
        out += [
            f"   history: {h['date']} @ {h['commit']}: {_score(h['killed'], h['total'])}"
            + (f" ({h['note']})" if h.get("note") else "")
            for h in g["history"]
        ]
        for s in g["survivors"]:
            old, new = _changed_lines(s["diff"])
            out.append(f"   - {s['name']} [{s['status']}]")
            out += [f"       - {ln}" for ln in old] + [f"       + {ln}" for ln in new]
            out.append(f"       => {s['disposition']}")
    return "\n".join(out) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("groups", nargs="*", help=f"default: all of {', '.join(GROUPS)}")
    ap.add_argument("--list", action="store_true")
    ap.add_argument(
        "--render",
        action="store_true",
        help="re-apply mutation_equivalent.toml to the stored results, run nothing",
    )
    ap.add_argument("--timeout-min", type=float, default=30.0, help="per group; partial results are kept")
    ap.add_argument("--max-children", type=int, default=None)
    ap.add_argument(
        "--retest",
        action="store_true",
        help="test again only the last run's undetected mutants, in its folder (same test selection)",
    )
    args = ap.parse_args()
    if args.list:
        for name, g in GROUPS.items():
            print(f"{name:<11} {' '.join(g.modules)}  <-  {' '.join(g.tests)}")
        return
    unknown = set(args.groups) - set(GROUPS)
    if unknown:
        raise SystemExit(f"unknown groups {sorted(unknown)}; see --list")
    path = RESULTS / "mutation.json"
    data = json.loads(path.read_text()) if path.exists() else {"groups": {}}
    if args.render:
        equivalents = _equivalents()
        for g in data["groups"].values():
            g["survivors"] = [s for s in g["survivors"] if s["status"] != "not checked"]
            for s in g["survivors"]:
                s["disposition"] = _disposition(s, equivalents)
            g["equivalent"] = sum(
                s["disposition"].startswith("equivalent") for s in g["survivors"] if s["status"] == "survived"
            )
        path.write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n")
        (RESULTS / "mutation.txt").write_text(render(data))
        return
    for name in args.groups or list(GROUPS):
        group = GROUPS[name]
        # modules not written yet (another branch) are left out; a group with none is skipped
        modules = tuple(p for p in group.modules if (ROOT / p).exists())
        if not modules:
            print(f"[{name}] skipped: none of {list(group.modules)} exists", flush=True)
            continue
        # a test file not written yet (or renamed) is left out rather than failing the whole run
        tests = tuple(
            t for t in group.tests if not t.startswith("tests/") or (ROOT / t.split("::")[0]).exists()
        )
        group = Group(modules, tests)
        res = run_group(name, group, args.timeout_min * 60, args.max_children, retest=args.retest)
        history = data["groups"].get(name, {}).get("history", [])
        entry = {k: res[k] for k in ("date", "commit", "killed", "total")}
        if args.retest:
            res["wall_s"] += data["groups"].get(name, {}).get("wall_s", 0)
            entry["note"] = "the previous run's survivors re-tested with the tests at this commit"
        res["history"] = [*history, entry]
        data["groups"][name] = res
        RESULTS.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n")
        (RESULTS / "mutation.txt").write_text(render(data))
        print(f"[{name}] {_score(res['killed'], res['total'])} in {res['wall_s']} s", flush=True)


if __name__ == "__main__":
    main()
