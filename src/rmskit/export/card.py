"""The dataset card (README.md): YAML front matter the Hub understands, then statistics, taxonomy,
provenance, the resolved config (scrubbed) and the probe numbers."""

from __future__ import annotations

import datetime as dt
import html
import json
import re
from collections import Counter
from typing import Any

import yaml

import rmskit
from rmskit.config import STAGES
from rmskit.export.prepare import Prepared
from rmskit.export.secrets import redact_text, scrub_config
from rmskit.stats import fmt_estimate

# licenses the Hub knows by id; anything else (or a mix) is "other"
_HUB_LICENSES = {
    "apache-2.0",
    "mit",
    "cc0-1.0",
    "cc-by-2.0",
    "cc-by-3.0",
    "cc-by-4.0",
    "cc-by-sa-3.0",
    "cc-by-sa-4.0",
    "cc-by-nc-2.0",
    "cc-by-nc-4.0",
    "cc-by-nc-sa-4.0",
    "cc-by-nd-4.0",
    "cc-by-nc-nd-4.0",
    "odc-by",
    "pddl",
    "odbl",
    "openrail",
    "bsd-3-clause",
    "gpl-3.0",
    "unknown",
}


def _cell(value: Any) -> str:
    """Markdown table cell: escaped HTML, no pipes or newlines."""
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str)
    return html.escape(text).replace("|", "\\|").replace("\n", " ")


def _table(header: list[str], rows: list[list[Any]]) -> str:
    if not rows:
        return "_none_\n"
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _when(ts: Any) -> str:
    if not isinstance(ts, int | float):
        return "unknown"
    return dt.datetime.fromtimestamp(ts, tz=dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def size_category(n: int) -> str:
    for bound, label in (
        (1_000, "n<1K"),
        (10_000, "1K<n<10K"),
        (100_000, "10K<n<100K"),
        (1_000_000, "100K<n<1M"),
        (10_000_000, "1M<n<10M"),
    ):
        if n < bound:
            return label
    return "10M<n<100M"


def license_of(prep: Prepared) -> tuple[str, dict[str, int]]:
    """The Hub license id for the whole dataset, and per-license sample counts."""
    counts = prep.samples.digest.licenses
    ids = {lic.strip().lower() for lic in counts}
    if not counts or ids == {"unknown"}:
        return "unknown", dict(counts)
    if len(ids) == 1 and next(iter(ids)) in _HUB_LICENSES:
        return next(iter(ids)), dict(counts)
    return "other", dict(counts)


def front_matter(prep: Prepared, data_files: dict[str, list[str]]) -> dict[str, Any]:
    lic, _ = license_of(prep)
    fm: dict[str, Any] = {
        "pretty_name": f"rmskit dataset: {prep.run_dir.resolve().name}",
        "license": lic,
    }
    if lic == "other":
        fm["license_name"] = "mixed"
        fm["license_details"] = "Per-sample licenses of the source photos; see the `license` field."
    fm.update(
        {
            "language": ["en"],
            "task_categories": ["visual-question-answering", "image-text-to-text"],
            "size_categories": [size_category(len(prep.samples))],
            "tags": [
                "safety",
                "multimodal",
                "real-world-multimodal-safety",
                "rmskit",
                "guidance",
                "over-refusal",
            ],
        }
    )
    if data_files:  # an empty run has no parquet (datasets cannot load an empty split)
        fm["configs"] = [
            {
                "config_name": "default",
                "data_files": [{"split": split, "path": f"data/{split}-*.parquet"} for split in data_files],
            }
        ]
    return fm


def _models_per_stage(prep: Prepared) -> list[list[Any]]:
    config = prep.meta.get("config") or {}
    main = (config.get("model") or {}).get("spec")
    per_stage = config.get("stage_models") or {}
    used = prep.samples.digest.models
    rows = []
    for stage in sorted(
        set(STAGES) | set(used), key=lambda x: (x not in STAGES, STAGES.index(x) if x in STAGES else 0, x)
    ):
        configured = (per_stage.get(stage) or {}).get("spec") or main
        seen = ", ".join(f"{m} ({n})" for m, n in sorted(used.get(stage, Counter()).items()))
        if configured or seen:
            rows.append([stage, configured or "", seen])
    return rows


def _prompt_versions(prep: Prepared) -> list[list[Any]]:
    current = prep.meta.get("prompt_versions") or {}
    used = prep.samples.digest.prompts
    rows = []
    for stage in sorted(set(current) | set(used)):
        seen = ", ".join(f"{v} ({n})" for v, n in sorted(used.get(stage, Counter()).items()))
        rows.append([stage, current.get(stage, ""), seen])
    return rows


def _is_estimate(obj: Any) -> bool:
    return isinstance(obj, dict) and {"metric", "value", "n"} <= obj.keys()


def _flatten(obj: Any, prefix: str = "") -> list[list[Any]]:
    """Nested probe numbers as (name, value) rows; an rmskit.stats Estimate is one row that reads
    `0.71 [0.64, 0.78], n=412` (or `insufficient (...)`), never a bare number."""
    if _is_estimate(obj):
        return [[prefix.rstrip("."), fmt_estimate(obj, 3)]]
    if isinstance(obj, dict):
        rows: list[list[Any]] = []
        for k, v in obj.items():
            rows += _flatten(v, f"{prefix}{k}.")
        return rows
    return [[prefix.rstrip("."), obj]]


def safe_dump(data: Any, **kwargs: Any) -> str:
    """`yaml.safe_dump` through libyaml's emitter where PyYAML has it: ~0.4 instead of ~2.5 ms per block,
    two blocks per card, which a build's finish waits for. It reads back as written (fuzzed; PyYAML's own
    emitter does not, for a key '\x85')."""
    return yaml.dump(data, Dumper=getattr(yaml, "CSafeDumper", yaml.SafeDumper), **kwargs)


def render_card(
    prep: Prepared,
    *,
    data_files: dict[str, list[str]],
    probes: dict[str, Any] | None,
    files: list[str],
    exported_at: float,
) -> str:
    head, tail = card_parts(prep, data_files=data_files, files=files, exported_at=exported_at)
    return assemble_card(head, tail, probes)


def assemble_card(head: str, tail: str, probes: dict[str, Any] | None) -> str:
    """The card from its parts and the probe numbers (a build's finish renders the parts while its
    probes run, then only this)."""
    return redact_text(head + probes_section(probes) + tail)


def probes_section(probes: dict[str, Any] | None) -> str:
    if not probes:
        return ""
    return (
        "\n## Probes\n\n"
        "CPU probes measured on this dataset (text-only leakage: a classifier on the queries "
        "alone; balanced accuracy near 0.5 means the text does not give the risk away; plain "
        "accuracy is only meaningful against the majority baseline). Figures read `value [95% "
        "interval], n=items`; below 20 items per class a figure is withheld as `insufficient`.\n\n"
        + _table(["probe", "value"], _flatten(probes))
    )


def card_parts(
    prep: Prepared, *, data_files: dict[str, list[str]], files: list[str], exported_at: float
) -> tuple[str, str]:
    """The card before and after its probes section (not yet redacted: `assemble_card` does)."""
    st = prep.result.stats
    splits = ["train", "test"]
    fm = safe_dump(front_matter(prep, data_files), sort_keys=False, allow_unicode=True, width=1000)
    out: list[str] = [f"---\n{fm}---\n"]
    name = prep.run_dir.resolve().name
    out.append(f"# rmskit dataset: {_cell(name)}\n\n")
    out.append(
        f"Real-world multimodal safety (RMS) data built image-first with rmskit {rmskit.__version__}. "
        "A **risky** sample pairs a real photo that is safe on its own with a query that is safe as text "
        "alone and risky together with the photo (label `unsafe`), plus a guidance response that "
        "recognises the visual risk and still helps. A "
        "**control** sample asks a benign question about the same kind of photo (label `safe`) with a normal "
        "helpful answer, to measure over-refusal. Train and test are split by image: no photo is in both.\n"
    )
    out.append("\n## Files\n\n")
    out.append("\n".join(f"- `{f}`" for f in files) + "\n")
    out.append(
        "\nThe parquet files carry an `Image` feature (`datasets.load_dataset(...)` gives PIL images). "
        "Nested fields (`checks`, `models`, `prompt_versions`, `scenario`, `edited`) are JSON strings there "
        "and objects in `samples.jsonl`.\n"
    )

    # -- statistics
    out.append("\n## Statistics\n\n")
    rows = []
    for split in splits:
        kinds = st.by_kind.get(split, {})
        labels = st.by_label.get(split, {})
        rows.append(
            [
                split,
                st.samples.get(split, 0),
                st.images.get(split, 0),
                kinds.get("risky", 0),
                kinds.get("control", 0),
                labels.get("unsafe", 0),
                labels.get("safe", 0),
            ]
        )
    rows.append(
        [
            "total",
            sum(st.samples.values()),
            sum(st.images.values()),
            *[sum(r[i] for r in rows) for i in range(3, 7)],
        ]
    )
    out.append(_table(["split", "samples", "images", "risky", "control", "unsafe", "safe"], rows))
    out.append("\n### Categories\n\n")
    cats = sorted({c for per in st.by_category.values() for c in per})
    cat_rows = [
        [
            c,
            *[st.by_category.get(sp, {}).get(c, 0) for sp in splits],
            sum(st.by_category.get(sp, {}).get(c, 0) for sp in splits),
        ]
        for c in cats
    ]
    cat_rows.sort(key=lambda r: (-r[-1], r[0]))
    out.append(_table(["category", *splits, "total"], cat_rows))
    lic, lic_counts = license_of(prep)
    out.append("\n### Licenses\n\n")
    lic_rows = [[k, v] for k, v in sorted(lic_counts.items(), key=lambda kv: (-kv[1], kv[0]))]
    out.append(_table(["license", "samples"], lic_rows))
    out.append("\n### Curation\n\n")
    funnel = [
        ["images accepted at ingest", prep.ingest.get("accepted", 0)],
        ["images refused at ingest", prep.ingest.get("refused", 0)],
        ["images that failed a stage", prep.ingest.get("failed", 0)],
        ["samples generated (passed all checks)", prep.ledger_samples.get("ok", 0)],
        ["samples that failed checks or stages", prep.ledger_samples.get("failed", 0)],
        *[[f"dropped: {rule}", n] for rule, n in st.dropped_by_rule.items()],
        ["edited in review (kept)", st.edited],
        ["kept", st.kept],
    ]
    out.append(_table(["step", "count"], funnel))
    params = prep.curate_params
    out.append(
        f"\nNear-duplicate images: perceptual hash Hamming distance ≤ {params.get('phash_distance')}; "
        f"near-duplicate queries: word-shingle Jaccard ≥ {params.get('query_dup_threshold')} (MinHash LSH), "
        f"risky compared with risky and control with control; the later sample (by id) is dropped. Split: "
        f"seed {params.get('seed')}, test fraction {params.get('test_fraction')}, by image"
        + (f"; risky samples capped at {params['balance']} per category." if params.get("balance") else ".")
        + "\n"
    )

    # -- taxonomy
    out.append("\n## Taxonomy\n\n")
    out.append(
        "Categories grew from the data: proposed names were merged into existing categories (aliases) "
        "or became new ones.\n\n"
    )
    counts = prep.samples.digest.risky_categories
    tax_rows = [
        [
            t["name"],
            ", ".join(t.get("aliases") or []),
            t.get("description") or "",
            counts.get(t["name"], 0),
            _when(t.get("created")),
        ]
        for t in prep.taxonomy
    ]
    known = {t["name"] for t in prep.taxonomy}
    tax_rows += [
        [c, "", "(not in the run's taxonomy, e.g. renamed in review)", n, ""]
        for c, n in sorted(counts.items())
        if c not in known
    ]
    out.append(_table(["category", "aliases", "description", "risky samples", "created"], tax_rows))

    # -- provenance
    meta = prep.meta
    config = meta.get("config") or {}
    out.append("\n## Provenance\n\n")
    sources = config.get("sources") or []
    out.append("- Sources: " + (", ".join(f"`{_cell(s)}`" for s in sources) if sources else "unknown") + "\n")
    out.append(
        f"- Built with rmskit {_cell(meta.get('rmskit_version') or 'unknown')}, exported with rmskit "
        f"{rmskit.__version__}\n"
    )
    out.append(
        f"- Build started {_when(meta.get('started_at'))}, finished {_when(meta.get('finished_at'))}, "
        f"exported {_when(exported_at)}\n"
    )
    out.append("\n### Models per stage\n\n")
    out.append(_table(["stage", "configured", "used by kept samples (count)"], _models_per_stage(prep)))
    out.append("\n### Prompt versions\n\n")
    out.append(_table(["prompt", "current", "used by kept samples (count)"], _prompt_versions(prep)))
    if prep.usage:
        out.append("\n### Model requests\n\n")
        out.append(
            _table(
                ["stage", "requests", "prompt tokens", "completion tokens"],
                [
                    [s, u["requests"], u["prompt_tokens"], u["completion_tokens"]]
                    for s, u in sorted(prep.usage.items())
                ],
            )
        )

    # -- config
    out.append("\n## Configuration\n\n")
    cfg_text = safe_dump(scrub_config(config), sort_keys=True, allow_unicode=True) if config else "{}\n"
    fence = "`" * max(3, 1 + max((len(m) for m in re.findall(r"`+", cfg_text)), default=0))
    out.append(
        "The resolved build configuration (secrets are never stored; key-like fields are removed "
        f"defensively).\n\n{fence}yaml\n{cfg_text}{fence}\n"
    )

    out.extend(_quality_sections(prep.meta))
    head = "".join(out)

    # -- the probes section goes here
    out = ["\n## Fields\n\n"]
    out.append(
        _table(
            ["field", "meaning"],
            [
                ["id", "stable sample id"],
                ["image", "the photo (images/<sha256>.jpg in samples.jsonl)"],
                ["image_sha256", "sha256 of the original image bytes"],
                ["source_path", "path inside its source"],
                ["query", "user query"],
                ["response", "guidance (risky) or helpful (control) response"],
                ["label", "unsafe (risky) or safe (control)"],
                ["kind", "risky or control"],
                ["category", "risk category (none for controls)"],
                ["checks", "verifier verdicts and reasons"],
                ["rounds", "compose/verify rounds needed"],
                ["models", "model per stage"],
                ["prompt_versions", "prompt version per stage"],
                ["license", "license of the photo, null if unknown"],
                ["split", "train or test (by image)"],
                ["scenario", "the discovered risk scenario"],
                ["source_url", "where the photo came from"],
                ["edited", "review edits: fields, time, original values"],
            ],
        )
    )
    return head, "".join(out)


def _quality_sections(meta: dict[str, Any]) -> list[str]:
    """Pass rates per category (which hazards the model can encode without leakage) and verifier
    agreement (Cohen's kappa per check), each figure with its interval and n."""
    out: list[str] = []
    rates = meta.get("pass_rates") or []
    if rates:
        out.append("\n## Pass rates per category\n\n")
        out.append(
            "Risky samples kept / finished per category (all checks passed within the rewrite rounds), "
            "with a 95% Wilson interval: low rates mark hazards the model could not encode without "
            "leakage or without a good response.\n\n"
        )
        rows = [[r["category"], r["kept"], r["n"], fmt_estimate(r["rate"])] for r in rates]
        out.append(_table(["category", "kept", "finished", "pass rate"], rows))
    agreement = meta.get("agreement")
    if agreement and agreement.get("checks"):  # re-checks by a second verifier
        out.append("\n## Verifier agreement\n\n")
        out.append(
            f"{agreement.get('n_rounds')} verified rounds, passed and failed (seed {agreement.get('seed')}) were re-checked by "
            f"a second verifier ({_cell(agreement.get('second_verifier'))}). Cohen's kappa corrects "
            "raw agreement for chance (0 = chance, 1 = perfect).\n\n"
        )
        rows = [
            [name, fmt_estimate(c.get("kappa")), fmt_estimate(c.get("agreement"))]
            for name, c in sorted(agreement["checks"].items())
        ]
        out.append(_table(["check", "Cohen's kappa", "raw agreement"], rows))
    reg = meta.get("prompt_regression")
    if reg:
        out.append("\n### Verify-prompt regression\n\n")
        out.append(
            f"`rmskit prompts regress` with {_cell(reg.get('model'))} on {reg.get('n')} cases with known "
            f"verdicts: agreement {fmt_estimate(reg.get('agreement_ci'))}; balanced accuracy "
            f"(chance-corrected) {fmt_estimate(reg.get('balanced_accuracy'))}.\n"
        )
    return out
