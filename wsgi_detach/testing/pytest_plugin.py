"""The entry point's former name, kept inert: an install made before the rename names it.

It is :mod:`wsgi_detach_pytest` (enables nothing by itself) under another
name. Enable the kit's fixtures as :mod:`wsgi_detach_pytest` says.
"""

from __future__ import annotations

from wsgi_detach_pytest import pytest_addoption, pytest_load_initial_conftests

__all__ = ["pytest_addoption", "pytest_load_initial_conftests"]
