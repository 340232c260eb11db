"""wsgi_detach: a WSGI response body you can write to later."""

__version__ = "0.1.0.dev0"
