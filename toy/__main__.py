"""`python -m toy ...` runs the toy pipeline (pipeline.py)."""

from .pipeline import main

main()
