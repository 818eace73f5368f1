"""The backbone and its training: the transformer every order runs on, its KV cache and CPU kernels,
the instrumented wrapper that counts cost (``model``), teacher-forced training (``train``) and the
process group (``dist``). Imports :mod:`tokenloom.contract` and :mod:`tokenloom.blocks`.
"""
