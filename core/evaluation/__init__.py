"""Evaluation: the offline feature extractor and the torch-fidelity adapter (``fidelity``) and the
eval cards that say when two numbers are comparable (``evalcard``). Imports the layers below.
"""
