"""Make a subpackage callable, so the documented API `rmskit.build(cfg)` / `rmskit.score(cfg)` works
even though `rmskit.build` and `rmskit.score` are also packages (importing a submodule binds the
package object to that attribute, which would otherwise shadow a plain function)."""

from __future__ import annotations

import importlib
import sys
import types
from typing import Any


def make_callable(module_name: str, target: str) -> None:
    """Calling module `module_name` calls `target` ("pkg.mod:function"), imported on first call."""
    mod_path, func = target.split(":")

    class _CallableModule(types.ModuleType):
        def __call__(self, *args: Any, **kwargs: Any) -> Any:
            return getattr(importlib.import_module(mod_path), func)(*args, **kwargs)

    sys.modules[module_name].__class__ = _CallableModule
