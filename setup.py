"""The optional compiled part: oneDNN convolutions as XLA FFI handlers (`maml.nn._onednn`).

Everything else is declared in setup.cfg. The extension needs oneDNN's headers and library (Debian:
`apt-get install libdnnl-dev`) and XLA's FFI headers, which jaxlib ships; where either is missing the
build of this extension is skipped with a warning and `maml.nn.OneDNN` runs its JAX fallback.
"""

import importlib.util
import os

from setuptools import Extension, setup


def _jaxlib_include() -> list[str]:
    spec = importlib.util.find_spec("jaxlib")
    return [os.path.join(p, "include") for p in (spec.submodule_search_locations or [])] if spec else []


setup(
    ext_modules=[
        Extension(
            "maml.nn._onednn",
            sources=["maml/nn/_onednn.cc"],
            include_dirs=_jaxlib_include(),
            libraries=["dnnl", "gomp"],  # gomp: omp_set_num_threads (oneDNN runs single-threaded per item)
            extra_compile_args=["-std=c++17", "-O2", "-Wno-attributes", "-Wno-return-type"],
            language="c++",
            optional=True,
        )
    ]
)
