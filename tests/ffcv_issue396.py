"""Builds and runs an FFCV Loader whose pipeline has a compiled operation after a Python one.

With FFCV 1.0.2 as released, ``Loader(...)`` never returns for such a pipeline (upstream
issue 396); ``import_ffcv`` applies maescale's fix. Run: python ffcv_issue396.py FILE.beton
"""

import sys
from dataclasses import replace

from maescale.data.ffcv_compat import import_ffcv

import_ffcv()
from ffcv.fields.basics import IntDecoder  # noqa: E402
from ffcv.loader import Loader  # noqa: E402
from ffcv.pipeline.operation import Operation  # noqa: E402


class CompiledPassthrough(Operation):
    jit = True

    def generate_code(self):
        def passthrough(labels, destination):
            return labels

        return passthrough

    def declare_state_and_memory(self, previous_state):
        return replace(previous_state, jit_mode=self.jit), None


class PythonPassthrough(CompiledPassthrough):
    jit = False


loader = Loader(sys.argv[1], batch_size=4, num_workers=1,
                pipelines={"image": None, "label": [IntDecoder(), PythonPassthrough(), CompiledPassthrough()]})
print("stages", len(loader.graph.group_operations()))
labels, = next(iter(loader))
print("labels", labels.reshape(-1).tolist())
