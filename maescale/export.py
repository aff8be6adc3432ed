"""Old home of the run-folder and export helpers, now in maescale/interop.py (one module for
weights files); kept as an import path for tests/test_distributed.py and tests/test_faults.py."""

from .interop import export, export_consolidated, load_run_model, run_config_of

__all__ = ["export", "export_consolidated", "load_run_model", "run_config_of"]
