"""``python -m wsgi_detach._demo``: serve the demo chat."""

from wsgi_detach._demo import main

main(prog="python -m wsgi_detach._demo")
