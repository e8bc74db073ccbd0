"""schemathesis against the review server's OpenAPI schema: every operation, valid and invalid inputs
generated from the schema, sent through the whole app (guard, body limit, routes, ledger writes). No
response may be a 500, exceed its size bound, or quote the input back in an error."""

from __future__ import annotations

import json

import fuzzing  # noqa: F401 - loads the hypothesis profile (ci / fuzz)
from fastapi.testclient import TestClient
from rundir_fixture import RunInfo

from rmskit.review import create_app

BASE = "http://127.0.0.1:8765"


def test_schemathesis_finds_no_500_and_no_oversized_response(run: RunInfo) -> None:
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    app = create_app(run.run_dir)
    client = TestClient(app, base_url=BASE, raise_server_exceptions=False)
    headers = {"X-CSRF-Token": app.state.csrf_token}
    schema = schemathesis.openapi.from_dict(app.openapi())
    ops = [r.ok() for r in schema.get_all_operations()]
    assert {op.path for op in ops} >= {"/api/samples", "/api/samples/{sample_id}/edit"}
    real_ids = st.sampled_from([*run.ok_ids, *run.failed_ids])

    for op in ops:
        modes = (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE)
        cases = st.one_of([op.as_strategy(generation_mode=m) for m in modes])  # valid and invalid inputs

        # examples, randomness and replay come from the loaded profile (tests/fuzzing.py): `ci` by default
        # (40 derandomised examples per operation, ~10 s), `fuzz` under HYPOTHESIS_PROFILE=fuzz
        @settings(suppress_health_check=list(HealthCheck))
        @given(case=cases, sid=real_ids, real=st.booleans())
        def check(case, sid: str, real: bool) -> None:  # noqa: ANN001
            if real and case.path_parameters and "sample_id" in case.path_parameters:
                case.path_parameters["sample_id"] = sid  # reach past the 404 half the time
            kw = case.as_transport_kwargs(base_url=BASE)
            r = client.request(
                kw["method"],
                kw["url"],
                params=kw.get("params"),
                content=json.dumps(kw["json"]) if "json" in kw else None,
                headers={**(kw.get("headers") or {}), **headers, "Content-Type": "application/json"},
            )
            where = (case.method, case.formatted_path)
            assert r.status_code < 500, (*where, r.text[:300])
            limit = 4096 if r.status_code >= 400 else 2_000_000
            assert len(r.content) <= limit, (*where, len(r.content))
            if r.status_code >= 400:  # an error never quotes what was sent
                sent = [x for x in _strings([kw.get("json"), kw.get("params")]) if len(x) >= 12]
                assert not [x for x in sent if x in r.text], (*where, r.text[:300])

        check()


def _strings(obj: object) -> list[str]:
    if isinstance(obj, str):
        return [obj]
    if isinstance(obj, dict):
        return [s for k, v in obj.items() for s in (*_strings(k), *_strings(v))]
    if isinstance(obj, list | tuple):
        return [s for x in obj for s in _strings(x)]
    return []
