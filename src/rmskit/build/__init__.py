"""The build pipeline. `rmskit.build(cfg)` runs (or resumes) a build: see rmskit.build.runner.build."""

from rmskit._callable import make_callable

make_callable(__name__, "rmskit.build.runner:build")
