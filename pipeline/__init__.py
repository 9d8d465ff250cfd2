"""linewatch's pipeline: everything between the camera's drop folder and the alert, except orchestration.

Sub-packages follow the data (each imports only from those above it):
``common`` -> ``line`` -> ``catalog`` -> ``latent`` -> ``analysis`` -> ``handoff`` -> ``training`` /
``monitoring`` -> ``tracking`` (the only MLflow importer) -> ``cli``. See docs/architecture.md.

Module paths from before the sub-packages (``pipeline.drift``, ``pipeline.monitor``, ...) still import, as
aliases of their new homes (:data:`MOVED`), so notebooks and scripts written against them keep working.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings
from types import ModuleType

MOVED: dict[str, str] = {
    "pipeline.schemas": "pipeline.common.schemas",
    "pipeline.images": "pipeline.common.images",
    "pipeline.elpv": "pipeline.line.elpv",
    "pipeline.faults": "pipeline.line.faults",
    "pipeline.simulate": "pipeline.line.simulate",
    "pipeline.store": "pipeline.catalog.store",
    "pipeline.ingest": "pipeline.catalog.ingest",
    "pipeline.encode": "pipeline.latent.encode",
    "pipeline.properties": "pipeline.latent.properties",
    "pipeline.latent_quality": "pipeline.latent.quality",
    "pipeline.detectors": "pipeline.analysis.detectors",
    "pipeline.drift": "pipeline.analysis.drift",
    "pipeline.axes": "pipeline.analysis.axes",
    "pipeline.retrain": "pipeline.training.retrain",
    "pipeline.sweep": "pipeline.training.sweep",
    "pipeline.monitor": "pipeline.monitoring.monitor",
    "pipeline.alerts": "pipeline.monitoring.alerts",
    "pipeline.report": "pipeline.monitoring.report",
    "pipeline.cli_line": "pipeline.cli.catalog",
    "pipeline.cli_sim": "pipeline.cli.simulate",
    "pipeline.cli_model": "pipeline.cli.model",
    "pipeline.cli_monitor": "pipeline.cli.monitor",
    "pipeline.cli_ops": "pipeline.cli.ops",
    "pipeline.cli_sweep": "pipeline.cli.sweep",
}
"""Old module path -> new module path."""


class _AliasLoader(importlib.abc.Loader):
    """Loads an old module path as the already-imported module at its new path."""

    def __init__(self, target: str) -> None:
        self.target = target

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        warnings.warn(f"{spec.name} moved to {self.target}", DeprecationWarning, stacklevel=3)
        return importlib.import_module(self.target)

    def exec_module(self, module: ModuleType) -> None:
        """Nothing to run: the target module is already executed."""


class _AliasFinder(importlib.abc.MetaPathFinder):
    """Finds old module paths (and their sub-modules, e.g. ``pipeline.detectors.base``) under :data:`MOVED`."""

    def find_spec(self, fullname: str, path: object = None, target: object = None) -> importlib.machinery.ModuleSpec | None:
        for old, new in MOVED.items():
            if fullname == old or fullname.startswith(old + "."):
                return importlib.util.spec_from_loader(fullname, _AliasLoader(new + fullname[len(old):]))
        return None


if not any(isinstance(f, _AliasFinder) for f in sys.meta_path):
    sys.meta_path.append(_AliasFinder())
