"""The public contract: what a plugin author reads and what every other layer builds on.

``errors`` (the exception types), ``interfaces`` (the component bases and the protocols a generator
receives), ``hookspecs`` (the pluggy hooks), ``registry`` (entry-point discovery, building a component
from its config), ``config`` (the TOML schema of a run) and ``checkpoint`` (atomic, hashed files).
Imports nothing from the other layers.
"""
