"""The native engine's kernel (app/engine/recurrence.c), a plain C library loaded by ctypes:
pyproject.toml holds everything else. -fno-trapping-math lets GCC vectorise the
activations' clamps (no result changes); no -ffast-math, so every operation stays IEEE."""

from setuptools import Extension, setup

setup(ext_modules=[Extension(
    "app.engine._recurrence",
    sources=["app/engine/recurrence.c"],
    extra_compile_args=["-O3", "-std=gnu11", "-fno-trapping-math", "-pthread", "-Wno-psabi"],
    extra_link_args=["-pthread"],
    libraries=["m"],
    optional=True,  # without a C compiler the package installs, and ENGINE=auto serves the others
)])
