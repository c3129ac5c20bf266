"""Backends: one sub-package each; importing one registers its op classes with the dispatcher.

No backend imports another. A backend whose library or GPU is missing still registers its classes,
which then report why they cannot run (``python -m sparsecore info`` shows it).
"""
