"""Server-side tooling for TorchServe: start/stop/restore a server, the management and
inference clients, and the load generator the benchmark drives.

``scripts/`` holds the command-line entry points (``python -m scripts.serve``, ...); this
package is what they, the demo and the tests import.
"""
