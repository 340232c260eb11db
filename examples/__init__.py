"""Runnable examples: each module exposes a WSGI ``app``; tests/test_examples.py serves them."""
