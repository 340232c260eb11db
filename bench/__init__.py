"""Benchmark harness for wsgi_detach: ``python -m bench --quick``.

It compares a detached WSGI body with what people use instead (a gevent
queue body, Tornado, Starlette on uvicorn) and with the raw limit of the
stack, each target a separate server process on 127.0.0.1 driven by a
gevent load generator in another process. See bench/README.md.
"""
