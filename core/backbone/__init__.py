"""The backbone and its training: the transformer every order runs on (``model``), its KV cache
(``kvcache``) and CPU kernels (``kernels``), the instrumented wrapper that counts cost and is what
generators receive (``instrumented``), teacher-forced training (``train``) and the process group
(``dist``). Imports :mod:`tokenloom.contract` and :mod:`tokenloom.blocks`.
"""
