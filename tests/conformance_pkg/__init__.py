"""A third-party test package for the conformance kit: a raster generator
written from :mod:`tokenloom.interfaces` alone (the ``Generator`` base, the
``Backbone``, ``Chain`` and ``RNG`` protocols it is handed, ``ModelSpec``,
``TrainBatch``, ``StepInfo``), importing only public ``tokenloom`` names.
``tests/test_conformance_meaning.py`` shows that it passes the kit and that
deliberately wrong variants of it fail."""

from .raster import PLUGIN, PlainRaster

__all__ = ["PLUGIN", "PlainRaster"]
