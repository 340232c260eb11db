"""The pytest entry point of :mod:`wsgi_detach.testing`: inert until enabled.

Installing the package registers this module with pytest (entry point
``pytest11``), in every test suite of that environment. It therefore does
nothing by itself: it imports neither gevent nor anything of ``wsgi_detach``,
adds no option and no fixture, and uses only hooks that pytest 7 and later
all know. It registers the real plugin, :mod:`wsgi_detach_pytest.plugin`,
when one of these asks for it:

* the ini option ``wsgi_detach_testing = true`` (``pytest.ini``,
  ``[tool.pytest.ini_options]``, ``setup.cfg``, ``tox.ini``);
* the environment variable ``WSGI_DETACH_TESTING=1``.

``-p wsgi_detach_pytest.plugin`` or ``pytest_plugins =
["wsgi_detach_pytest.plugin"]`` in the root ``conftest.py`` enable the real
plugin directly, with or without this module (a checkout on ``PYTHONPATH``).
Enabled more than one way, it is registered once.
"""

from __future__ import annotations

import os
from typing import Any

#: The ini option that enables the plugin.
INI_OPTION = "wsgi_detach_testing"
#: The environment variable that enables the plugin (``1``, ``true`` or ``yes``).
ENV_VAR = "WSGI_DETACH_TESTING"
#: The module of the real plugin.
PLUGIN = "wsgi_detach_pytest.plugin"


def pytest_addoption(parser: Any) -> None:
    parser.addini(INI_OPTION, type="bool", default=False,
                  help=f"enable wsgi_detach's testing fixtures ({PLUGIN})")


def pytest_load_initial_conftests(early_config: Any, parser: Any, args: Any) -> None:
    # Before the command line is parsed for good, so that the real plugin's
    # options (--wsgi-detach-server) are known by then.
    wanted = os.environ.get(ENV_VAR, "").strip().lower() in ("1", "true", "yes")
    if wanted or early_config.getini(INI_OPTION):
        early_config.pluginmanager.import_plugin(PLUGIN)
