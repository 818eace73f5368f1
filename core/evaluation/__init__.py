"""Evaluation: the offline feature extractor and its training recipe (``extractor``), the
torch-fidelity adapter (``fidelity``), the Fréchet distance formula as an independent reference
(``frechet``), and the eval cards that say when two numbers are comparable (``evalcard``).
Imports the layers below.
"""
