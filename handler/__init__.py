"""The TorchServe handler and everything it imports: exactly what the model archive ships.

``training/archive.py`` copies this package whole into the archive, next to the entry module
``classifier_handler.py``. Nothing here imports from ``training/`` or ``scripts/``.
"""
