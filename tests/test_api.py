"""The public surface: what `import wsgi_detach` offers is exactly `__all__`."""

from __future__ import annotations

import wsgi_detach


def test_all_lists_exactly_the_public_names() -> None:
    public = {name for name in vars(wsgi_detach) if not name.startswith("_")}
    # Submodules imported by the package are attributes too; they are not API.
    modules = {name for name in public if type(getattr(wsgi_detach, name)).__name__ == "module"}
    lazy = set(wsgi_detach._LAZY)  # imported on first use, so `serve` can monkey-patch first
    assert sorted(wsgi_detach.__all__) == sorted((public - modules - {"annotations"}) | lazy)
    for name in lazy:
        assert getattr(wsgi_detach, name) is not None
    assert wsgi_detach.__all__ == sorted(wsgi_detach.__all__)


def test_every_error_derives_from_the_one_base() -> None:
    for name in wsgi_detach.__all__:
        obj = getattr(wsgi_detach, name)
        if isinstance(obj, type) and issubclass(obj, Exception):
            assert issubclass(obj, wsgi_detach.DetachError), name


def test_version_is_single_sourced() -> None:
    from importlib.metadata import version

    assert version("wsgi_detach") == wsgi_detach.__version__
