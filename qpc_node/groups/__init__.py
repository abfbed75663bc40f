"""MLS group protocol cores (sans-IO): Stage A in core.py, fork resolution in fork.py."""
