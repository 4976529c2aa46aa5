"""fedcell: a federated-learning workflow engine.

Layers (dependencies point down only): ``client``/CLI → ``controllers``/``executors`` →
``engine`` → ``transports``. See ARCHITECTURE.md.
"""

__version__ = "0.1.0"
