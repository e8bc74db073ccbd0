"""Hypothesis profiles for the property-based tests (tests/test_fuzz_*.py).

`ci` (the default): a fixed, small number of derandomised examples so `make test` stays fast and
repeatable. `fuzz` (`make fuzz`, i.e. HYPOTHESIS_PROFILE=fuzz): random and many more examples
(FUZZ_EXAMPLES, default 3000 per property), with failures kept in .hypothesis/ for replay."""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

_SLOW_OK = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture]
settings.register_profile(
    "ci", max_examples=40, deadline=None, derandomize=True, database=None, suppress_health_check=_SLOW_OK
)
settings.register_profile(
    "fuzz",
    max_examples=int(os.environ.get("FUZZ_EXAMPLES", "3000")),
    deadline=None,
    suppress_health_check=_SLOW_OK,
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# Any JSON value, bounded in size (depth is fuzzed separately: see `deep_json`).
json_leaf = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
)
json_values = st.recursive(
    json_leaf,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
# Far deeper than Python's recursion limit, or just under it.
deep_json = st.sampled_from([5, 900, 3000, 60_000]).flatmap(
    lambda n: st.sampled_from(["[" * n + "]" * n, '{"a":' * n + "1" + "}" * n, "[" * n])
)
