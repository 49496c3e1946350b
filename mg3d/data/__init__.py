"""Data shipped with the package: the built-in demo scene (``demo/``), made by ``scripts/make_demo.py``."""
