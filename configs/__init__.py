"""The shipped presets (JSON), installed as ``llave_fast.configs``: training presets
(``tiny_cpu.json``, ``llave_0.5b.json``, ...) and DeepSpeed configs (``zero2.json``,
``zero3.json``). ``llave-fast train --config NAME`` finds them by name."""
